"""The torch adapter: a framework probe and cache release for plain torch hosts.

Imported only when torch is already imported by the host (see accounting._auto_probe)."""
from __future__ import annotations

import os
from typing import Any

# Largest free block per device, from memory_snapshot(): reused while the allocator's
# alloc/free counters stand still (a snapshot lists every block: not for every probe).
_largest: dict[int, tuple[tuple[int, int], int]] = {}
LARGEST_MAX_SEGMENTS = 512  # above this many segments the block list is too long to walk per probe


def expandable_segments(env: dict | None = None) -> bool:
    """Whether PYTORCH_CUDA_ALLOC_CONF (or the newer PYTORCH_ALLOC_CONF) turns on
    expandable_segments — the last setting wins, as in torch's parser."""
    env = os.environ if env is None else env
    on = False
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        for part in str(env.get(var, "") or "").split(","):
            k, _, v = part.partition(":")
            if k.strip() == "expandable_segments":
                on = v.strip().lower() == "true"
    return on


def largest_free_block(segments: list) -> int:
    """The largest inactive block in a torch.cuda.memory_snapshot() segment list."""
    best = 0
    for seg in segments:
        for b in seg.get("blocks", ()):
            if b.get("state") == "inactive" and int(b.get("size", 0)) > best:
                best = int(b["size"])
    return best


def figures(st: dict, env: dict | None = None) -> dict[str, Any]:
    """The probe's dict from a torch.cuda.memory_stats() dict (no largest block)."""
    return {
        "reserved": st.get("reserved_bytes.all.current", 0),
        "allocated": st.get("allocated_bytes.all.current", 0),
        "active": st.get("active_bytes.all.current", 0),
        "oom_count": st.get("num_ooms", 0),
        "retry_count": st.get("num_alloc_retries", 0),
        "inactive_split": st.get("inactive_split_bytes.all.current", 0),
        "expandable_segments": expandable_segments(env),
    }


def probe(index: int) -> dict[str, Any] | None:
    """torch's caching-allocator figures for CUDA device `index` (one memory_stats call; the
    largest free block from memory_snapshot() only when blocks changed and are few)."""
    import torch

    if not torch.cuda.is_initialized() or index >= torch.cuda.device_count():
        return None
    st = torch.cuda.memory_stats(index)
    out = figures(st)
    key = (int(st.get("allocation.all.allocated", 0)), int(st.get("allocation.all.freed", 0)))
    hit = _largest.get(index)
    if hit is not None and hit[0] == key:
        out["largest_free_block"] = hit[1]
    elif int(st.get("segment.all.current", 0)) <= LARGEST_MAX_SEGMENTS:
        segs = [s for s in torch.cuda.memory_snapshot() if s.get("device", index) == index]
        _largest[index] = (key, largest_free_block(segs))
        out["largest_free_block"] = _largest[index][1]
    return out


def release_cache() -> None:
    """Give torch's cached blocks back to the driver (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


def is_oom(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or the newer AcceleratorError with code 2."""
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None) or getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    acc = getattr(torch, "AcceleratorError", None)
    if acc is not None and isinstance(exc, acc) and getattr(exc, "error_code", None) == 2:
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
