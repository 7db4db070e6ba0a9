"""The torch adapter: a framework probe and cache release for plain torch hosts.

Imported only when torch is already imported by the host (see accounting._auto_probe)."""
from __future__ import annotations

from typing import Any


def probe(index: int) -> dict[str, Any] | None:
    """torch's caching-allocator figures for CUDA device `index` (one memory_stats call)."""
    import torch

    if not torch.cuda.is_initialized() or index >= torch.cuda.device_count():
        return None
    st = torch.cuda.memory_stats(index)
    return {
        "reserved": st.get("reserved_bytes.all.current", 0),
        "allocated": st.get("allocated_bytes.all.current", 0),
        "active": st.get("active_bytes.all.current", 0),
        "oom_count": st.get("num_ooms", 0),
        "retry_count": st.get("num_alloc_retries", 0),
    }


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
