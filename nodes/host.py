"""What the nodes need from the host, with plain-torch fallbacks.

Inside ComfyUI these call comfy.model_management / comfy.utils; elsewhere (tests, other
hosts) they fall back to torch so the nodes still run.  Imported lazily by the nodes.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any, Callable

log = logging.getLogger("vramguard")


def comfy(name: str) -> Any | None:
    """comfy.<name> if this process is a ComfyUI, else None."""
    try:
        return importlib.import_module(f"comfy.{name}")
    except Exception:
        return None


def torch_device() -> Any:
    import torch

    mm = comfy("model_management")
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_index(dev: Any) -> int | None:
    """The CUDA index of a torch device, None for CPU-like devices."""
    if getattr(dev, "type", "cpu") != "cuda":
        return None
    return dev.index or 0


def load_models(patchers: list, memory_required: int = 0, force_full_load: bool = False) -> None:
    mm = comfy("model_management")
    patchers = [p for p in patchers if p is not None]
    if mm is not None and patchers:
        mm.load_models_gpu(patchers, memory_required=memory_required, force_full_load=force_full_load)


def progress(total: int) -> Callable[[int, int], None]:
    """A progress callback; in ComfyUI it also raises the user's Cancel between tiles."""
    utils = comfy("utils")
    mm = comfy("model_management")
    pbar = utils.ProgressBar(total) if utils is not None else None

    def cb(done: int, tot: int) -> None:
        if mm is not None:
            mm.throw_exception_if_processing_interrupted()
        if pbar is not None:
            pbar.update_absolute(done, tot)
    return cb


def make_room(bytes_needed: int, dev: Any) -> None:
    """Ask ComfyUI to unload models until `bytes_needed` are free on `dev` (low-VRAM mode)."""
    mm = comfy("model_management")
    if mm is not None and getattr(dev, "type", "cpu") == "cuda":
        mm.free_memory(bytes_needed, dev)


def unload_all() -> None:
    mm = comfy("model_management")
    if mm is not None:
        mm.unload_all_models()
        mm.soft_empty_cache()
        return
    from vramguard.adapters import torch_adapter

    torch_adapter.release_cache()


def intermediate_dtype(default: Any) -> Any:
    mm = comfy("model_management")
    f = getattr(mm, "intermediate_dtype", None) if mm is not None else None
    return f() if callable(f) else default
