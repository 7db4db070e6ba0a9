"""Host RAM like VRAM (issue 13): pinned host memory made visible and capped, and a RAM
reserve that host-side work is budgeted against.

Pinned (page-locked) host memory speeds transfers but can hold tens of GB of RAM that the
kernel can never swap out.  Three figures, read where they exist (nothing is imported here):

- ``locked`` / ``pinned``: this process's VmLck / VmPin (``/proc/self/status``);
- ``torch_host_cache``: what torch's caching host allocator holds
  (``torch.cuda.host_memory_stats()["allocated_bytes.current"]``, active + cached);
- ``comfy_pinned``: what ComfyUI pinned for async offload (``comfy.model_management.
  TOTAL_PINNED_MEMORY``; its own cap is ``MAX_PINNED_MEMORY``).

``held`` = max(the kernel's figure, torch + ComfyUI): the drivers pin pages without always
charging VmLck/VmPin, and where they do, adding both would count them twice.

The cap (``set_pinned_cap``; ComfyUI setting "vramguard.PinnedCapGB"): after a GC stage
(``enforce_pinned_cap``, called by the GC guard and logged in its GC line as
``pinned``/``unpinned`` GB) torch's host cache is emptied and ComfyUI is asked to unpin
through its own functions (``free_registrations``, ``free_pins``) until ``held`` is under it
-- and, when host RAM available is below the RAM reserve, under ``held`` minus the shortfall.

The RAM reserve: ``vg.set_limits("host", reserve=...)`` keeps that much host RAM available;
host snapshots' budget is ``available - reserve`` (computed in the one place budgets are).
``check_host_room`` is what the tiler calls before it allocates its output canvas: a canvas
that does not fit raises ``HostMemoryLow`` (a MemoryError) naming the figures instead of
pushing the machine into swap; pass ``out=np.memmap(...)`` to stream the result to disk.
"""
from __future__ import annotations

import logging
import sys
from typing import Any

from . import _forksafe, _native
from ._units import fmt_bytes, parse_size

log = logging.getLogger("vramguard")

_lock = _forksafe.lock()
_cap = 0  # bytes; 0 = no cap


class HostMemoryLow(MemoryError):
    """Host-side work does not fit host RAM available minus the RAM reserve."""


def _torch_host_cache() -> int | None:
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    fn = getattr(cuda, "host_memory_stats", None)
    if fn is None:
        return None
    try:
        stats = fn()
    except Exception:  # an old torch, a broken CUDA: the figure is unknown, not an error
        return None
    v = stats.get("allocated_bytes.current") if hasattr(stats, "get") else None
    return int(v) if isinstance(v, int) and v >= 0 else None


def _comfy_mm() -> Any:
    return sys.modules.get("comfy.model_management")


def _comfy_pinned() -> tuple[int | None, int | None]:
    mm = _comfy_mm()
    if mm is None:
        return None, None
    tot, mx = getattr(mm, "TOTAL_PINNED_MEMORY", None), getattr(mm, "MAX_PINNED_MEMORY", None)
    tot = int(tot) if isinstance(tot, (int, float)) and tot >= 0 else None
    mx = int(mx) if isinstance(mx, (int, float)) and mx > 0 else None
    return tot, mx


def pinned_host() -> dict[str, int | None]:
    """This process's pinned host memory, bytes (None where a source does not say): locked,
    pinned (kernel), torch_host_cache, comfy_pinned, comfy_max, held, cap (0 = none).
    ``held`` is also recorded in this process's ledger slot when joined."""
    k = _native.host_pinned()  # fresh VmLck / VmPin; published to the ledger slot
    torch_b = _torch_host_cache()
    comfy_b, comfy_max = _comfy_pinned()
    kernel = max(k["locked"] or 0, k["pinned"] or 0)
    held = max(kernel, (torch_b or 0) + (comfy_b or 0))
    if held > kernel:
        _native.ledger_host(pinned=held)
    return {"locked": k["locked"], "pinned": k["pinned"], "torch_host_cache": torch_b,
            "comfy_pinned": comfy_b, "comfy_max": comfy_max, "held": held, "cap": get_pinned_cap()}


def set_pinned_cap(cap: int | float | str | None) -> None:
    """Cap this process's pinned host memory (bytes, or a size string like "8GB"; None or 0:
    no cap).  Enforced after GC stages (``enforce_pinned_cap``)."""
    global _cap
    v = 0 if cap is None else parse_size(cap, "pinned cap")
    with _lock:
        _cap = v


def get_pinned_cap() -> int:
    with _lock:
        return _cap


def _empty_torch_host_cache() -> bool:
    torch = sys.modules.get("torch")
    initialized = getattr(getattr(torch, "cuda", None), "is_initialized", None)
    if initialized is None or not initialized():
        return False  # no CUDA in use: torch's pinned cache holds nothing (and raises)
    for owner, name in ((getattr(torch, "accelerator", None), "empty_host_cache"),
                        (getattr(torch, "_C", None), "_host_emptyCache"),
                        (getattr(torch, "_C", None), "_accelerator_emptyHostCache")):
        fn = getattr(owner, name, None)
        if fn is not None:
            try:
                fn()
            except Exception as e:  # a torch without a usable accelerator: nothing to release
                log.debug("vramguard: %s.%s failed: %s", getattr(owner, "__name__", "?"), name, e)
                return False
            return True
    return False


def _ask_comfy_to_unpin(cap: int) -> bool:
    """ComfyUI's own unpinning (registrations first, then its pinned buffers) until this
    process is under `cap`; False when it has neither function."""
    mm = _comfy_mm()
    asked = False
    for name in ("free_registrations", "free_pins"):
        fn = getattr(mm, name, None)
        excess = pinned_host()["held"] - cap
        if fn is None or excess <= 0:
            continue
        fn(excess)
        asked = True
    return asked


def enforce_pinned_cap() -> dict[str, Any] | None:
    """Bring pinned host memory under its limit: the cap, and below it as far as host RAM
    is short of the RAM reserve (the pinned pool is host-side work like any other: it must
    not eat the RAM reserve either).  Empties torch's host cache, then asks the host to unpin
    the rest.  None when nothing is over; else what was done: before, after, limit, cap,
    ram_short (bytes the RAM reserve lacked), released, torch_emptied, host_asked."""
    cap = get_pinned_cap()
    h = _native.snapshot(None)
    short = max(0, h.reserve - h.free)
    if cap <= 0 and short == 0:
        return None
    before = pinned_host()["held"]
    limit = max(0, min(cap if cap > 0 else before, before - short))
    if before <= limit:
        return None
    torch_emptied = _empty_torch_host_cache()
    mid = pinned_host()["held"]
    asked = _ask_comfy_to_unpin(limit) if mid > limit else False
    after = pinned_host()["held"]
    rec = {"before": before, "after": after, "limit": limit, "cap": cap, "ram_short": short,
           "released": max(0, before - after), "torch_emptied": torch_emptied,
           "host_asked": asked}
    if after > limit:
        log.warning("vramguard: pinned host memory %s is over its limit %s (cap %s, RAM reserve "
                    "short by %s) after releasing what could be released", fmt_bytes(after),
                    fmt_bytes(limit), fmt_bytes(cap), fmt_bytes(short))
    return rec


def check_host_room(nbytes: int, what: str) -> None:
    """Raise HostMemoryLow when `nbytes` of host RAM for `what` do not fit the host budget
    (available - RAM reserve; ``vg.set_limits("host", reserve=...)``)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise TypeError(f"nbytes must be an int >= 0, got {nbytes!r}")
    s = _native.snapshot(None)
    if nbytes > s.budget:
        raise HostMemoryLow(
            f"{what} needs {fmt_bytes(nbytes)} of host RAM but only {fmt_bytes(s.budget)} fit "
            f"(available {fmt_bytes(s.free)} - RAM reserve {fmt_bytes(s.reserve)}); allocating "
            f"it would push the machine into swap.  Stream the result instead (out=np.memmap(...)"
            f"), or lower the RAM reserve (set_limits('host', reserve=...))")


__all__ = ["HostMemoryLow", "check_host_room", "enforce_pinned_cap", "get_pinned_cap",
           "pinned_host", "set_pinned_cap"]
