"""Memory over time: the default sampler and stage marks.

    with vramguard.stage("vae_decode"):
        image = vae.decode(latent)
    vramguard.peaks()["vae_decode"]   # bytes, the highest device use seen in that stage

A stage takes a sample when it opens and when it closes, and the sampler thread (if
started) folds every sample in between, so each stage has a peak even without the thread.
"""
from __future__ import annotations

from typing import Any

from . import _forksafe, _native
from .accounting import default_device

__all__ = ["Sampler", "sampler", "reset_sampler", "start", "stop", "timeline", "stages", "peaks"]

Sampler = _native.Sampler

_lock = _forksafe.lock()
_default: Sampler | None = None


def sampler() -> Sampler:
    """The process-wide sampler: device 0 when a device (or a simulated one) is present,
    host RAM otherwise (a source like a device: 'used' is host used, 'process_used' our RSS).
    Created on first use, not started.  start/stop/reset are safe from several threads."""
    global _default
    s = _default
    if s is None:
        with _lock:
            if _default is None:
                _default = Sampler(default_device())
            s = _default
    return s


def reset_sampler(device: int | None | str = "auto", interval: float = 0.01,
                  nvml_interval: float = 0.25, capacity: int = 65536) -> Sampler:
    """Replace the default sampler (stopping the old one)."""
    global _default
    dev = default_device() if device == "auto" else device
    new = Sampler(dev, interval, nvml_interval, capacity)
    with _lock:
        old, _default = _default, new
    if old is not None:
        old.stop()
    return new


def start() -> Sampler:
    s = sampler()
    s.start()
    return s


def stop() -> None:
    if _default is not None:
        _default.stop()


def timeline() -> dict[str, Any]:
    """{'t', 'used', 'process_used', 'rss'} NumPy arrays (t in monotonic seconds; -1 = unknown).
    For a host-RAM sampler (device None) 'used' is host RAM in use, 'process_used' the RSS."""
    return sampler().timeline()


def stages() -> list[dict]:
    """Every stage record: name, start, end, start_used, end_used, peak_used, peak_process, peak_rss."""
    return sampler().stages()


def peaks() -> dict[str, dict[str, int]]:
    """Per stage name, the highest peak over all its closed records."""
    out: dict[str, dict[str, int]] = {}
    for g in sampler().stages():
        if g["end"] is None:
            continue
        cur = out.setdefault(g["name"], {"peak_used": -1, "peak_process": -1, "peak_rss": -1, "count": 0})
        for k in ("peak_used", "peak_process", "peak_rss"):
            cur[k] = max(cur[k], g[k])
        cur["count"] += 1
    return out
