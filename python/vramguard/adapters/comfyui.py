"""The ComfyUI adapter: probe, GC actions and stage hooks inside a running ComfyUI.

Imported only from inside ComfyUI (the node pack's __init__), never by `import vramguard`.
Checked against ComfyUI 0.3.64 and the 2026 line; every seam is looked up defensively — a
host version that lacks one logs it once and the rest carry on.

Seams, most stable first (see DESIGN.md):
  text_encode  comfy.sd.CLIP.encode_from_tokens_scheduled / encode_from_tokens
  unet         comfy.sample.sample / sample_custom (module attributes, looked up per call
               by the KSampler nodes)
  vae_decode   comfy.sd.VAE.decode / decode_tiled
  vae_encode   comfy.sd.VAE.encode / encode_tiled
  controlnet   comfy.controlnet.load_controlnet
  lora_load    comfy.sd.load_lora_for_models
  lora_unload  comfy.model_patcher.ModelPatcher.unpatch_model
  upscale      comfy_extras.nodes_upscale_model.ImageUpscaleWithModel.execute / upscale
  ipadapter    the IPAdapter pack's node FUNCTIONs, when that pack is loaded
Per prompt: execution.PromptExecutor.execute / execute_async -> the INFO run summary.
"""
from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

from .. import accounting as acc
from .. import gcguard
from ..hooks import HookSet

log = logging.getLogger("vramguard")

_hooks = HookSet("ComfyUI")
_prompt_hooks = HookSet("ComfyUI prompt")
_GiB = 1 << 30

def _has_patches(patcher: Any, *args: Any, **kwargs: Any) -> bool:
    """unpatch_model runs on every offload; it is a LoRA unload only when patches exist."""
    return bool(getattr(patcher, "patches", None))


# (module, attribute path, stage[, predicate deciding per call whether it is that stage])
SEAMS: list[tuple] = [
    ("comfy.sd", "CLIP.encode_from_tokens_scheduled", "text_encode"),
    ("comfy.sd", "CLIP.encode_from_tokens", "text_encode"),
    ("comfy.sample", "sample", "unet"),
    ("comfy.sample", "sample_custom", "unet"),
    ("comfy.sd", "VAE.decode", "vae_decode"),
    ("comfy.sd", "VAE.decode_tiled", "vae_decode"),
    ("comfy.sd", "VAE.encode", "vae_encode"),
    ("comfy.sd", "VAE.encode_tiled", "vae_encode"),
    ("comfy.controlnet", "load_controlnet", "controlnet"),
    ("comfy.sd", "load_lora_for_models", "lora_load"),
    ("comfy.model_patcher", "ModelPatcher.unpatch_model", "lora_unload", _has_patches),
    ("comfy_extras.nodes_upscale_model", "ImageUpscaleWithModel.execute", "upscale"),
    ("comfy_extras.nodes_upscale_model", "ImageUpscaleWithModel.upscale", "upscale"),
]
IPADAPTER_NODES = ("IPAdapter", "IPAdapterAdvanced", "IPAdapterFaceID", "IPAdapterTiled",
                   "IPAdapterBatch", "IPAdapterEmbeds", "IPAdapterStyleComposition")


def _mm():
    import comfy.model_management as mm

    return mm


def host_reserve() -> int:
    """ComfyUI's own reserve: max(--reserve-vram / its OS default, --vram-headroom)."""
    mm = _mm()
    r = int(getattr(mm, "extra_reserved_memory", lambda: 0)() or 0)
    try:
        from comfy.cli_args import args

        r = max(r, int(float(getattr(args, "vram_headroom", 0) or 0) * _GiB))
    except Exception:
        pass
    return r


def probe(index: int) -> dict[str, Any] | None:
    """ComfyUI's view: its evictable-aware free figure, torch's allocator, its reserve."""
    import torch

    mm = _mm()
    dev = mm.get_torch_device()
    if getattr(dev, "type", "cpu") != "cuda" or not torch.cuda.is_initialized():
        return None
    if (dev.index or 0) != index:
        dev = torch.device("cuda", index)
    free_total = mm.get_free_memory(dev)
    # Dynamic VRAM (2026): idle weights stay resident but evictable; patchers report them.
    for lm in list(getattr(mm, "current_loaded_models", []) or []):
        patcher = getattr(lm, "model", None)
        fn = getattr(patcher, "get_free_memory", None)
        if callable(fn):
            try:
                free_total = max(free_total, int(fn(dev)))
            except Exception:
                pass
    st = torch.cuda.memory_stats(dev)
    return {"reserved": st.get("reserved_bytes.all.current", 0),
            "allocated": st.get("allocated_bytes.all.current", 0),
            "active": st.get("active_bytes.all.current", 0),
            "oom_count": st.get("num_ooms", 0), "retry_count": st.get("num_alloc_retries", 0),
            "free": int(free_total), "reserve": host_reserve()}


def release_cache() -> None:
    _mm().soft_empty_cache()


def unload_models(device_index: int, bytes_needed: int) -> None:
    """Low-VRAM mode: let ComfyUI unload models until `bytes_needed` are free."""
    import torch

    mm = _mm()
    dev = mm.get_torch_device()
    if getattr(dev, "type", "cpu") == "cuda" and (dev.index or 0) != device_index:
        dev = torch.device("cuda", device_index)
    mm.free_memory(bytes_needed, dev)


def is_oom(exc: BaseException) -> bool:
    mm = _mm()
    f = getattr(mm, "is_oom", None)
    if callable(f):
        try:
            return bool(f(exc))
        except Exception:
            pass
    oom = getattr(mm, "OOM_EXCEPTION", None)
    return bool(oom is not None and oom is not Exception and isinstance(exc, oom))


def _resolve(module: str, path: str) -> tuple[Any, str] | None:
    try:
        obj: Any = importlib.import_module(module)
    except Exception as e:
        log.info("vramguard: %s not importable here (%s); skipping its hooks", module, e)
        return None
    *owners, attr = path.split(".")
    for name in owners:
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj, attr


def install_hooks(stages: dict[str, bool] | None = None) -> list[tuple[str, str]]:
    """Install every available stage hook (idempotent) and register the probe and actions.
    Returns the (seam, stage) pairs now installed."""
    g = gcguard.guard()
    g.release_cache = release_cache
    g.unload_models = unload_models
    acc.register_probe(probe, origin="comfyui")
    for module, path, stage, *when in SEAMS:
        if stages is not None and not stages.get(stage, True):
            continue
        found = _resolve(module, path)
        if found is None:
            _hooks.missing[f"{module}.{path}"] = "not found"
            continue
        _hooks.wrap(found[0], found[1], stage, when[0] if when else None)
    install_ipadapter_hooks()
    _install_prompt_hooks()
    return _hooks.installed()


def install_ipadapter_hooks() -> int:
    """IPAdapter nodes come from another pack that may load after ours; call again later."""
    nodes = sys.modules.get("nodes")
    mapping = getattr(nodes, "NODE_CLASS_MAPPINGS", {}) if nodes else {}
    n = 0
    for key in IPADAPTER_NODES:
        cls = mapping.get(key)
        fn = getattr(cls, "FUNCTION", None) if cls is not None else None
        if isinstance(fn, str) and _hooks.wrap(cls, fn, "ipadapter"):
            n += 1
    return n


def _install_prompt_hooks() -> None:
    found = _resolve("execution", "PromptExecutor")
    if found is None:
        return
    holder, name = found
    cls = getattr(holder, name, None)
    if cls is None or getattr(cls, "__vramguard_prompt__", False):
        return
    # execute() runs execute_async() where both exist: wrap one, or prompts count twice
    for meth in ("execute_async", "execute"):
        orig = cls.__dict__.get(meth)
        if orig is None:
            continue
        wrapped = _prompt_wrapper(orig, meth)
        setattr(cls, meth, wrapped)
        _prompt_hooks._installed.append((cls, meth, orig, "prompt"))
        break
    cls.__vramguard_prompt__ = True


def _prompt_wrapper(orig: Any, meth: str) -> Any:
    import functools
    import inspect

    def before() -> None:
        install_ipadapter_hooks()  # packs loaded after ours are there by the first prompt
        g = gcguard.guard()
        with g._lock:
            g._run_stats = {}

    def after(prompt_id: Any) -> None:
        try:
            gcguard.guard().run_summary(f"prompt {prompt_id}")
        except Exception as e:  # pragma: no cover
            log.debug("vramguard: summary failed: %s", e)

    if inspect.iscoroutinefunction(orig):
        @functools.wraps(orig)
        async def awrapper(self, prompt, prompt_id, *a, **kw):
            before()
            try:
                return await orig(self, prompt, prompt_id, *a, **kw)
            finally:
                after(prompt_id)
        return awrapper

    @functools.wraps(orig)
    def wrapper(self, prompt, prompt_id, *a, **kw):
        before()
        try:
            return orig(self, prompt, prompt_id, *a, **kw)
        finally:
            after(prompt_id)
    return wrapper


def uninstall_hooks() -> None:
    _hooks.uninstall()
    while _prompt_hooks._installed:
        cls, meth, orig, _ = _prompt_hooks._installed.pop()
        setattr(cls, meth, orig)
        try:
            del cls.__vramguard_prompt__
        except AttributeError:
            pass
    if acc.probe()[0] == "comfyui":
        acc.register_probe(None)


def hook_report() -> dict[str, Any]:
    return {"installed": _hooks.installed(), "missing": dict(_hooks.missing)}
