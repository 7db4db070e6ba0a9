"""The shared ledger: several processes on one GPU whose budgets add up (issue 13).

Opt-in.  A process that joins gets a slot in a small shared file (``/dev/shm/vramguard-<uid>-v<layout version>``,
mode 0600; ``VRAMGUARD_LEDGER_PATH`` overrides it) and from then on every snapshot's budget
leaves out what the *other* participants have announced (``plan``) but not yet allocated::

    import vramguard.ledger as ledger
    ledger.join()
    with ledger.claim(0, 6 * 2**30):      # announce a 6 GiB peak on device 0
        run_the_stage()
    ledger.participants()                 # who holds and plans what

Processes that do not join (a game, a video player) are covered by the reserve, as before.
A corrupted or foreign region is ignored: ``status()["reason"]`` says why, nothing raises.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

from . import _native
from ._units import parse_size

log = logging.getLogger("vramguard")

ENV_PATH = "VRAMGUARD_LEDGER_PATH"
ENV_JOIN = "VRAMGUARD_LEDGER"


class LedgerFull(MemoryError):
    """A claim with fit=True did not fit this process's budget."""


def default_path() -> str:
    return os.environ.get(ENV_PATH) or f"/dev/shm/vramguard-{os.geteuid()}-v{_native.LEDGER_VERSION}"


DEFAULT_REVALIDATE_S = 0.02


def join(path: str | None = None, *, revalidate_s: float | None = None) -> dict[str, Any]:
    """Join the ledger (idempotent).  Returns status(); on failure ``joined`` is False and
    ``reason`` says why (logged at WARNING).  ``revalidate_s`` (default 0.02): how often a
    budget read re-checks the file and polls for dead participants; in between it answers from
    sums cached per header generation (0: on every read, the old cost)."""
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"ledger path must be a str or os.PathLike, got {type(path).__name__}")
    st = _native.ledger_join(os.fspath(path) if path is not None else default_path(),
                             revalidate_s=revalidate_s)
    if not st["joined"]:
        log.warning("vramguard ledger not joined: %s", st["reason"])
    return st


def join_from_env() -> dict[str, Any] | None:
    """Join when ``VRAMGUARD_LEDGER=1`` (what a host's setting should call at start-up)."""
    if os.environ.get(ENV_JOIN, "").strip().lower() in ("1", "true", "yes", "on"):
        return join()
    return None


def leave() -> None:
    _native.ledger_leave()


def status() -> dict[str, Any]:
    """joined, path, slot, reason (why not joined), pid, swept, slots, devices, size."""
    return _native.ledger_status()


def _check_device(device: Any) -> int:
    if isinstance(device, bool) or not isinstance(device, int):
        raise TypeError(f"ledger device must be an int, got {type(device).__name__} {device!r}")
    return device


def plan(device: int, nbytes: int, *, fit: bool = False) -> bool:
    """Announce this process's peak on ``device`` (bytes; replaces the previous plan).
    ``fit=True``: only if what is still to allocate fits this process's budget with every
    other participant's plan counted; returns False (old plan kept) otherwise."""
    return _native.ledger_plan(_check_device(device), nbytes, fit=bool(fit))


def clear(device: int | None = None) -> None:
    """Withdraw this process's plan on ``device`` (None: every device)."""
    _native.ledger_clear(None if device is None else _check_device(device))


@contextlib.contextmanager
def claim(device: int, nbytes: int, *, fit: bool = False) -> Iterator[bool]:
    """``with claim(0, n):`` plans ``n`` bytes on device 0 for the block and clears it after
    (even on error).  ``fit=True`` raises LedgerFull when the plan does not fit."""
    ok = plan(device, nbytes, fit=fit)
    if not ok:
        raise LedgerFull(f"a plan of {nbytes} bytes on device {device} does not fit the budget "
                         f"with the other participants' plans ({others_planned(device)} bytes)")
    try:
        yield ok
    finally:
        clear(device)


def participants() -> list[dict[str, Any]]:
    """Live participants (after a sweep): pid, start_time, slot, self, host_rss, host_pinned,
    devices {index: {used, planned, pending, outstanding}}.  [] when not joined."""
    return _native.ledger_participants()[0]


def participants_consistent() -> tuple[list[dict[str, Any]], bool]:
    """participants() plus whether every figure held at one instant."""
    return _native.ledger_participants()


def sweep() -> int:
    """Sweep dead participants now (every budget read does too); returns how many."""
    return _native.ledger_sweep()


def others_planned(device: int) -> int:
    """Bytes the other participants have planned but not yet allocated on ``device``."""
    return _native.ledger_others_planned(_check_device(device))


def publish_host(rss: int | None = None, pinned: int | None = None) -> None:
    """Record host RAM this process holds (bytes) in its slot."""
    _native.ledger_host(rss=rss, pinned=pinned)


def host_pinned() -> dict[str, int | None]:
    """This process's locked / pinned host memory in bytes (/proc/self/status VmLck, VmPin);
    recorded in the ledger slot (host_pinned) when joined.  hostram.pinned_host() adds torch's
    and ComfyUI's figures."""
    return _native.host_pinned()


def set_learn_reserve(enabled: bool, *, window_s: float | None = None,
                      margin: int | float | str | None = None) -> None:
    """The reserve that learns (off by default; ComfyUI setting "vramguard.LearnReserve").
    On: every device reading tracks what the other applications use (device used - this
    process - the other participants' measured use); the reserve becomes at least their peak
    over the last ``window_s`` seconds (600) minus what they use now, plus ``margin`` (256 MiB)
    -- room for them to come back to their peak.  Switching it off forgets what was seen."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__} {enabled!r}")
    m = None if margin is None else parse_size(margin, "margin")
    _native.set_learn_reserve(enabled, window_s=window_s, margin=m)


def learned_reserve(device: int = 0) -> dict[str, Any]:
    """What the reserve that learns saw on ``device`` and why: enabled, known, reserve, peak,
    now, margin (bytes), window_s, age_s (of the latest sample; -1 none), samples, reason."""
    return _native.learned_reserve(device)


def _device_rows(parts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    try:
        n = _native.device_count()
    except Exception:  # no GPU and nothing simulated: the ledger still has its claims
        n = 0
    idx = set(range(min(n, _native.ledger_status()["devices"])))
    for p in parts:
        idx.update(p["devices"])
    for d in sorted(idx):
        claims = [p["devices"][d] for p in parts if d in p["devices"]]
        row: dict[str, Any] = {
            "participants": len(claims),
            "planned": sum(c["planned"] for c in claims),
            "outstanding": sum(c["outstanding"] for c in claims),
            "used": sum(c["used"] for c in claims),
        }
        if d < n:
            try:
                snap = _native.snapshot(d)
                lim = _native.get_limits(d)
                row.update({"total": snap.total, "free": snap.free, "budget": snap.budget,
                            "reserve": snap.reserve, "configured_reserve": lim["reserve"],
                            "cap": snap.cap, "others_planned": snap.others_planned})
            except Exception as e:  # one unreadable device must not hide the others
                row["error"] = f"{type(e).__name__}: {e}"
            row["learned_reserve"] = learned_reserve(d)
        rows[str(d)] = row
    return rows


_peeked = False  # inside peeking(): this process joined only to look


@contextlib.contextmanager
def peeking() -> Iterator[bool]:
    """For a process that has not joined (the CLI): when the region exists, join for the block
    and leave after, so budgets read inside count the participants' plans and summary() lists
    them (without this process).  Yields whether it joined.  A refused region is not logged:
    summary()["ledger"]["reason"] shows why."""
    global _peeked
    joined = False
    if not status()["joined"] and os.path.exists(default_path()):
        joined = _native.ledger_join(default_path())["joined"]
    _peeked = joined
    try:
        yield joined
    finally:
        _peeked = False
        if joined:
            leave()


def summary(*, peek: bool = False) -> dict[str, Any]:
    """Everything ``python -m vramguard status``, the status node and the monitor show about
    the ledger, JSON-ready.  Keys (stable; new ones may be added, none renamed):

    - ``version``: 1 (this layout)
    - ``ledger``: status() -- joined, path, slot, reason, pid, swept, slots, devices, size,
      revalidate_s, generation, rejoins; plus ``peeked`` (True when this process joined only
      to look: see peeking())
    - ``participants``: [{pid, start_time, slot, self, host_rss, host_pinned,
      devices: {"<index>": {used, planned, pending, outstanding}}}]  (bytes)
    - ``devices``: {"<index>": {participants, planned, outstanding, used (sums over the
      participants), total, free, budget, reserve (in force), configured_reserve, cap,
      others_planned (bytes, this process's view), learned_reserve: learned_reserve(index),
      error (only when the device could not be read)}}
    - ``pinned``: hostram.pinned_host() -- locked, pinned, torch_host_cache, comfy_pinned,
      comfy_max, held, cap
    - ``host``: {available, reserve, budget} of host RAM (bytes)

    ``peek=True``: inside peeking() (see there)."""
    if peek and not _peeked:
        with peeking():
            return summary()
    from . import hostram

    st = {**status(), "peeked": _peeked}
    parts = participants()
    if _peeked:
        parts = [p for p in parts if not p["self"]]
    devices = _device_rows(parts)
    rows = [{**p, "devices": {str(k): v for k, v in p["devices"].items()}} for p in parts]
    h = _native.snapshot(None)
    return {"version": 1, "ledger": st, "participants": rows, "devices": devices,
            "pinned": hostram.pinned_host(),
            "host": {"available": h.free, "reserve": h.reserve, "budget": h.budget}}


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def summary_text(data: dict[str, Any] | None = None, device: int | None = None) -> str:
    """summary() as lines of at most ~80 columns (the CLI's status and the Memory Snapshot
    node); `device` limits the per-device lines to one."""
    data = summary() if data is None else data
    st = data["ledger"]
    lines = []
    if st["joined"] or st.get("peeked"):
        lines.append(f"ledger {st['path']}: {len(data['participants'])} participant(s)"
                     + (" besides this one" if st.get("peeked") else ""))
    else:
        lines.append(f"ledger: {st['reason']}")
    for p in data["participants"]:
        claims = ", ".join(f"GPU {k} used {_gib(v['used'])} planned {_gib(v['planned'])}"
                           for k, v in sorted(p["devices"].items(), key=lambda kv: int(kv[0])))
        lines.append(f"  pid {p['pid']}{' (this process)' if p['self'] else ''}: "
                     f"{claims or 'no claims'}; RAM {_gib(p['host_rss'])}, pinned "
                     f"{_gib(p['host_pinned'])}")
    for k, d in data["devices"].items():
        if device is not None and k != str(device):
            continue
        line = (f"GPU {k}: {d['participants']} claim(s), planned {_gib(d['planned'])}, "
                f"not yet allocated {_gib(d['outstanding'])}")
        if "budget" in d:
            line += (f"; reserve {_gib(d['reserve'])} (configured "
                     f"{_gib(d['configured_reserve'])}), budget {_gib(d['budget'])}")
        lines.append(line)
        lr = d.get("learned_reserve")
        if lr and lr["enabled"]:
            lines.append(f"  learned reserve {_gib(lr['reserve'])}: {lr['reason']}")
    pin = data["pinned"]
    cap = f", cap {_gib(pin['cap'])}" if pin["cap"] else ""
    lines.append(f"pinned host memory: {_gib(pin['held'])} (VmLck {_gib(pin['locked'])}, VmPin "
                 f"{_gib(pin['pinned'])}, torch {_gib(pin['torch_host_cache'])}, ComfyUI "
                 f"{_gib(pin['comfy_pinned'])}){cap}")
    h = data["host"]
    lines.append(f"host RAM: available {_gib(h['available'])}, RAM reserve {_gib(h['reserve'])}, "
                 f"budget {_gib(h['budget'])}")
    return "\n".join(lines)


__all__ = ["DEFAULT_REVALIDATE_S", "ENV_JOIN", "ENV_PATH", "LedgerFull", "claim", "clear",
           "default_path", "join", "host_pinned", "join_from_env", "learned_reserve", "leave",
           "others_planned", "participants", "participants_consistent", "peeking", "plan",
           "publish_host",
           "set_learn_reserve", "status", "summary", "summary_text", "sweep"]
