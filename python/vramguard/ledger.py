"""The shared ledger: several processes on one GPU whose budgets add up (issue 13).

Opt-in.  A process that joins gets a slot in a small shared file (``/dev/shm/vramguard-<uid>``,
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

log = logging.getLogger("vramguard")

ENV_PATH = "VRAMGUARD_LEDGER_PATH"
ENV_JOIN = "VRAMGUARD_LEDGER"


class LedgerFull(MemoryError):
    """A claim with fit=True did not fit this process's budget."""


def default_path() -> str:
    return os.environ.get(ENV_PATH) or f"/dev/shm/vramguard-{os.geteuid()}"


def join(path: str | None = None) -> dict[str, Any]:
    """Join the ledger (idempotent).  Returns status(); on failure ``joined`` is False and
    ``reason`` says why (logged at WARNING)."""
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"ledger path must be a str or os.PathLike, got {type(path).__name__}")
    st = _native.ledger_join(os.fspath(path) if path is not None else default_path())
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
    recorded in the ledger slot (host_pinned) when joined."""
    return _native.host_pinned()


def summary() -> dict[str, Any]:
    """What ``python -m vramguard status`` and the monitor should show: the status and the
    participants, JSON-ready (device keys as strings)."""
    st = status()
    rows = []
    for p in participants():
        rows.append({**p, "devices": {str(k): v for k, v in p["devices"].items()}})
    return {"ledger": st, "participants": rows}


__all__ = ["ENV_JOIN", "ENV_PATH", "LedgerFull", "claim", "clear", "default_path", "join",
           "host_pinned", "join_from_env", "leave", "others_planned", "participants",
           "participants_consistent", "plan", "publish_host", "status", "summary", "sweep"]
