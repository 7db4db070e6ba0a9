"""Memory accounting: devices, snapshots, the host, reserves and caps, probes, simulation.

The C core (vramguard._native) does the reading and computes the budget; this module
validates input and adapts.  It imports neither torch nor ComfyUI: when the host has already
imported torch and initialised CUDA, a torch probe is registered on first use.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Iterable, Mapping

from . import _forksafe, _native
from ._units import parse_size

__all__ = ["Snapshot", "Host", "device_count", "default_device", "gpu_status", "snapshot", "snapshots", "host",
           "set_reserve", "set_cap", "limits", "clear_limits", "register_probe", "probe",
           "simulate", "simulate_clear", "snapshot_dict", "budget_of"]

log = logging.getLogger("vramguard")

Snapshot = _native.Snapshot
Host = _native.Host
Probe = Callable[[int], "Mapping[str, Any] | None"]

_probe_lock = _forksafe.lock()
if hasattr(os, "register_at_fork"):  # a child must not inherit a lock held by a sampler thread
    os.register_at_fork(after_in_child=_native.after_fork_child)
_probe_origin: str | None = None  # "user", "torch", "comfyui"
_probe_failed_once = False


def device_count() -> int:
    """Visible devices (simulated ones while a simulation is on); 0 without a GPU."""
    return _native.device_count()


def default_device() -> int | None:
    """Device 0 when any (real or simulated) device is visible, None (host only) otherwise."""
    return 0 if _native.device_count() > 0 else None


def gpu_status() -> dict:
    """Why NVML / CUDA are (un)available, e.g. {'nvml': 'unavailable: cannot load ...'}."""
    return _native.gpu_status()


def _auto_probe() -> None:
    # Cheap enough for every snapshot: two dict lookups until torch has CUDA up.
    if _probe_origin is not None:
        return
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        ready = torch.cuda.is_available() and torch.cuda.is_initialized()
    except Exception:  # a broken torch install must not break accounting
        return
    if ready:
        from .adapters import torch_adapter

        register_probe(torch_adapter.probe, origin="torch")


def snapshot(device: int | None = 0, *, reserve: int | float | str | None = None,
             card: int | float | str | None = None) -> Snapshot:
    """Memory of one device right now; device=None is host RAM (a source like a device, with
    its own reserve: set_reserve(..., device="host")).  Raises RuntimeError('no GPU: <reason>')
    for a device index without a GPU.

    reserve: a floor for this call; the effective reserve is max(configured, host's, this).
    card: "what would a card of this size do": total = free = card, nothing used, reserve =
    the given one or 0; the device is then not read.  Sizes accept units ('1.5GB')."""
    if reserve is None and card is None:  # the hot path: one positional C call
        if device is not None:
            if type(device) is not int:
                _device_arg(device)  # raises for what is not an int
            if _probe_origin is None:
                _auto_probe()
        return _native.snapshot(device)
    res = None if reserve is None else parse_size(reserve, "reserve")
    c = None if card is None else parse_size(card, "card")
    if c is None and device is not None:
        _auto_probe()
    return _native.snapshot(_device_arg(device), reserve=res, card=c)


def snapshots() -> list[Snapshot]:
    """A snapshot of every visible device (empty without a GPU)."""
    _auto_probe()
    return [_native.snapshot(i) for i in range(_native.device_count())]


def host(fresh: bool = False) -> Host:
    """Host RAM (cgroup-aware) and this process's RSS.

    RSS is read on every call; the system-wide figures are reused for 10 ms
    (_native.set_host_interval) because formatting /proc/meminfo costs the kernel ~5 us.
    fresh=True reads everything now."""
    return _native.host(fresh=fresh)


def snapshot_dict(s: Snapshot | Host) -> dict:
    """A Snapshot or Host as a plain dict (JSON-ready)."""
    return dict(zip(type(s).__match_args__, s))


def budget_of(fields: Mapping[str, Any] | Snapshot) -> int:
    """The budget formula applied to hand-written fields (see README, 'The budget')."""
    return _native.budget(fields)


def _device_arg(device: int | None) -> int | None:
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, int):
        raise TypeError(f"device must be an int or None, got {type(device).__name__} {device!r}")
    return device


def _limits_arg(device: int | str | None) -> int | str | None:
    # "host" addresses host RAM's own limits; None the default for every GPU
    if device == "host":
        return "host"
    return _device_arg(device)  # type: ignore[arg-type]


def set_reserve(reserve: int | float | str, device: int | str | None = None) -> None:
    """Keep `reserve` bytes free on the device (every GPU when device is None; host RAM
    when device is "host").

    Accepts bytes or a string with a unit ('1.5GB').  The effective reserve is the larger of
    this and the host's own (ComfyUI's --reserve-vram / --vram-headroom, via its probe)."""
    _native.set_limits(_limits_arg(device), parse_size(reserve, "reserve"), None)


def set_cap(cap: int | float | str, device: int | str | None = None) -> None:
    """Never let this process's live bytes exceed `cap` (0 = no cap)."""
    _native.set_limits(_limits_arg(device), None, parse_size(cap, "cap"))


def limits(device: int | str | None = None) -> dict:
    """{'reserve': bytes, 'cap': bytes} in force for `device` ("host", or None: the default)."""
    return _native.get_limits(_limits_arg(device))


def clear_limits() -> None:
    """Reset every reserve and cap to 0."""
    _native.clear_limits()


def _safe(fn: Probe, origin: str) -> Probe:
    def wrapped(index: int):
        global _probe_failed_once
        try:
            return fn(index)
        except Exception as e:  # the user's run matters more than one probe reading
            if not _probe_failed_once:
                _probe_failed_once = True
                log.warning("vramguard: %s probe failed (%s: %s); using driver figures", origin,
                            type(e).__name__, e)
            return None

    wrapped.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapped


def register_probe(fn: Probe | None, *, origin: str = "user", safe: bool = True) -> None:
    """Register the framework probe: fn(device_index) -> dict or None.

    Keys (bytes / counts, all optional): reserved, allocated, active, oom_count,
    retry_count, free (the host's own free figure, e.g. ComfyUI's evictable-aware one),
    evictable, reserve (the host's own reserve).  With safe=True a raising probe is logged
    once and ignored.  None unregisters (and lets the torch probe register again)."""
    global _probe_origin
    if fn is not None and not callable(fn):
        raise TypeError(f"probe must be callable or None, got {type(fn).__name__}")
    with _probe_lock:
        _native.set_probe(None if fn is None else (_safe(fn, origin) if safe else fn))
        _probe_origin = None if fn is None else origin


def probe() -> tuple[str | None, Probe | None]:
    """(origin, callable) of the registered probe."""
    return _probe_origin, _native.get_probe()


def _sim_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    for key, val in fields.items():
        if val is None:
            continue
        if key in ("total", "used", "process_used", "reserved", "allocated"):
            kw[key] = parse_size(val, key)
        elif key in ("oom_count", "retry_count"):
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ValueError(f"{key} must be an int >= 0, got {val!r}")
            kw[key] = val
        elif key == "script":
            kw[key] = [tuple(parse_size(v, "script value") if i else v for i, v in enumerate(e))
                       if isinstance(e, (tuple, list)) else e for e in val]
        elif key == "name":
            kw[key] = val
        else:
            raise TypeError(f"unknown simulated-device field {key!r}")
    return kw


def simulate(total: int | str, used: int | str = 0, *, device: int | None = None,
             process_used: int | str | None = None, name: str | None = None,
             reserved: int | str | None = None, allocated: int | str | None = None,
             oom_count: int | None = None, retry_count: int | None = None,
             script: Iterable[tuple] | None = None) -> int:
    """Add a simulated device (or replace `device`).  While any exists, simulated devices
    replace real ones — plan on a card you don't have.  Returns the device index.

    script: [(t_seconds, used[, process_used]), ...], piecewise constant from now."""
    # device None appends: the C core picks the slot atomically (-1)
    return _native.simulate(-1 if device is None else device, **_sim_fields(dict(
        total=total, used=used, process_used=process_used, name=name, reserved=reserved,
        allocated=allocated, oom_count=oom_count, retry_count=retry_count, script=script)))


def update_simulated(device: int = 0, **fields: Any) -> None:
    """Change fields of an existing simulated device (used=, process_used=, oom_count=, ...).
    Setting used= also sets process_used= unless that is given too."""
    _native.simulate(device, **_sim_fields(fields))


def simulate_clear() -> None:
    """Remove simulated devices; real ones (if any) come back."""
    _native.simulate_clear()
