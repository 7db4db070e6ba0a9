"""A scoped reserve/cap override and what is in force.

The settings (or a script) set the configured reserve with `set_reserve`.  A graph node may
raise or lower it for a while — in ComfyUI, for the rest of one prompt:

    vramguard.override_limits(reserve="6GB")   # until end_override()
    vramguard.effective_reserve()              # what the planner and the GC policy see now
    vramguard.end_override()                   # back to what was configured before

end_override() puts back only what still holds the override's value: a reserve changed in
between (a settings POST during the prompt) is left as it is.
"""
from __future__ import annotations

from typing import Any

from . import _forksafe
from . import accounting as acc
from ._units import parse_size

__all__ = ["override_limits", "end_override", "effective_reserve"]

_lock = _forksafe.lock()
# device (None = every device) -> {"before": limits, "set": limits} of the open override
_open: dict[int | None, dict[str, dict[str, int]]] = {}


def override_limits(reserve: Any = None, cap: Any = None, device: int | None = None) -> dict:
    """Set reserve and/or cap for `device` (None = every device) until end_override().
    Returns the limits now configured for that device."""
    r = None if reserve is None else parse_size(reserve, "reserve")
    c = None if cap is None else parse_size(cap, "cap")
    before = acc.limits(device)  # validates device
    with _lock:
        rec = _open.get(device)
        # a second override in the same scope keeps the first one's "before"; limits changed
        # by someone else since (a settings POST, clear_limits) are the new baseline
        first = rec["before"] if rec is not None and rec["set"] == before else before
        if r is not None:
            acc.set_reserve(r, device=device)
        if c is not None:
            acc.set_cap(c, device=device)
        now = acc.limits(device)
        _open[device] = {"before": first, "set": now}
    return now


def end_override() -> list[int | None]:
    """Restore what every open override replaced; returns the devices restored."""
    with _lock:
        items = list(_open.items())
        _open.clear()
    done = []
    for device, rec in items:
        try:
            cur = acc.limits(device)
        except Exception:  # the device went away (simulation cleared): nothing to restore
            continue
        if cur.get("reserve") == rec["set"].get("reserve"):
            acc.set_reserve(rec["before"]["reserve"], device=device)
        if cur.get("cap") == rec["set"].get("cap"):
            acc.set_cap(rec["before"]["cap"], device=device)
        done.append(device)
    return done


def _live(device: int | None) -> dict | None:
    """The open override of `device` while it still holds (limits unchanged since)."""
    with _lock:
        rec = _open.get(device)
    try:
        return rec if rec is not None and acc.limits(device) == rec["set"] else None
    except Exception:
        return None


def effective_reserve(device: int | None = None) -> dict:
    """The reserve in force for `device` (default: the default device; host RAM without a
    GPU), for the settings route and the monitor:

    {"device": index or None, "reserve": bytes the budget keeps free now (the C snapshot's:
    the larger of the configured and the host's own), "configured": bytes, "cap": bytes,
    "override": bytes or None while a scoped override holds, "configured_before_override":
    bytes or None}

    Host RAM as the device (no GPU, ComfyUI --cpu) is judged the way the tiled nodes plan
    there: the configured (settings') reserve is a floor over host RAM's own."""
    dev = acc.default_device() if device is None else device
    lim = acc.limits(dev)
    rec = _live(dev) or _live(None)
    try:
        snap = acc.snapshot(dev, reserve=lim["reserve"]) if dev is None else acc.snapshot(dev)
        in_force = int(snap.reserve)
    except Exception:  # no such device right now: the configured figure is all there is
        in_force = int(lim["reserve"])
    return {"device": dev, "reserve": in_force, "configured": int(lim["reserve"]), "cap": int(lim["cap"]),
            "override": int(rec["set"]["reserve"]) if rec else None,
            "configured_before_override": int(rec["before"]["reserve"]) if rec else None}
