"""vramguard's ComfyUI nodes: thin adapters, each execute calls one library function.

V1 node classes (NODE_CLASS_MAPPINGS) so the same code loads on 0.3.64 and the 2026 line.
"""
from __future__ import annotations

import logging
from typing import Any

import vramguard as vg

from . import host

log = logging.getLogger("vramguard")
CATEGORY = "vramguard"


class AnyType(str):
    """Matches every socket type (ComfyUI compares types with !=)."""

    def __ne__(self, other: object) -> bool:
        return False

    def __hash__(self) -> int:
        return hash(str(self))


ANY = AnyType("*")
GB = float(1 << 30)


class _Node:
    """What every vramguard node shares."""
    FUNCTION = "execute"
    CATEGORY = CATEGORY


class _Live(_Node):
    """Nodes that report the present: ComfyUI must never serve them from its cache."""

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")  # NaN != NaN: always changed


def _opt_any(tooltip: str) -> dict:
    return {"passthrough": (ANY, {"tooltip": tooltip})}


def _snapshot_text(index: int) -> tuple[str, dict]:
    h = vg.host()
    lines, nums = [], {}
    try:
        s = vg.snapshot(index)
        nums = {"free": s.free, "budget": s.budget, "used_pct": 100.0 * s.used / s.total if s.total else 0.0}
        lines.append(f"GPU {s.index} {s.name} ({s.source})")
        for k in ("total", "used", "free", "process_used", "framework_reserved", "framework_allocated",
                  "evictable", "reserve", "cap", "budget"):
            v = getattr(s, k)
            lines.append(f"  {k:20s} {vg.fmt_bytes(v)}")
        if s.oom_count is not None:
            lines.append(f"  {'oom / retries':20s} {s.oom_count} / {s.retry_count}")
    except (RuntimeError, ValueError) as e:
        lines.append(str(e))
        nums = {"free": h.available, "budget": 0, "used_pct": 100.0 * (h.total - h.available) / h.total}
    lines.append(f"host RAM: {vg.fmt_bytes(h.available)} available of {vg.fmt_bytes(h.total)}, "
                 f"this process {vg.fmt_bytes(h.process_rss)}")
    return "\n".join(lines), nums


class MemorySnapshot(_Live):
    DESCRIPTION = "Device, framework and host memory right now, as text and numbers."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"device": ("INT", {"default": 0, "min": 0, "max": 63,
                                                "tooltip": "GPU index as torch numbers it"})},
                "optional": _opt_any("Connect anything to take the snapshot after that node ran")}

    RETURN_TYPES = ("STRING", "INT", "INT", "FLOAT")
    RETURN_NAMES = ("text", "free_mb", "budget_mb", "used_pct")
    OUTPUT_TOOLTIPS = ("Readable snapshot", "Free VRAM in MiB", "Budget (free + evictable - reserve) in MiB",
                       "Device memory in use, percent")
    OUTPUT_NODE = True

    def execute(self, device: int = 0, passthrough: Any = None):
        text, n = _snapshot_text(device)
        res = (text, int(n["free"] >> 20), int(n["budget"] >> 20), float(n["used_pct"]))
        return {"ui": {"text": [text]}, "result": res}


class GCCheckpoint(_Live):
    DESCRIPTION = "Pass anything through and run the GC policy here (or force a collection)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "value": (ANY, {"tooltip": "Anything; passed through unchanged"}),
            "mode": (["policy", "forced"], {"default": "policy",
                                            "tooltip": "policy: collect only when it pays; forced: always"}),
            "stage": (list(vg.STAGES), {"default": "vae_decode",
                                        "tooltip": "Which stage this checkpoint follows (for stats and log)"}),
        }}

    RETURN_TYPES = (ANY,)
    RETURN_NAMES = ("value",)
    OUTPUT_TOOLTIPS = ("The input, unchanged",)

    def execute(self, value: Any, mode: str = "policy", stage: str = "vae_decode"):
        d = vg.gc_check(stage, forced=(mode == "forced"))
        log.info("vramguard: GC checkpoint after %s: %s (%s)", stage, "collected" if d.collect else "skipped", d.reason)
        return (value,)


class UnloadModels(_Live):
    DESCRIPTION = "Unload every model from VRAM and release caches; passes its input through."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": (ANY, {"tooltip": "Anything; passed through after unloading"})}}

    RETURN_TYPES = (ANY,)
    RETURN_NAMES = ("value",)
    OUTPUT_TOOLTIPS = ("The input, unchanged",)

    def execute(self, value: Any):
        host.unload_all()
        return (value,)


class SetReserve(_Node):
    DESCRIPTION = "Set the VRAM reserve and cap at runtime (for all devices or one)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "reserve_gb": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 256.0, "step": 0.1,
                                     "tooltip": "VRAM to keep free for other applications"}),
            "cap_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                                 "tooltip": "Absolute cap on this process's VRAM; 0 = no cap"}),
            "device": ("INT", {"default": -1, "min": -1, "max": 63, "tooltip": "-1 = every device"}),
        }, "optional": _opt_any("Connect anything to apply after that node ran")}

    RETURN_TYPES = (ANY, "INT")
    RETURN_NAMES = ("passthrough", "budget_mb")
    OUTPUT_TOOLTIPS = ("The optional input, unchanged", "Budget after the change, MiB")

    def execute(self, reserve_gb: float, cap_gb: float, device: int = -1, passthrough: Any = None):
        dev = None if device < 0 else device
        vg.set_reserve(int(reserve_gb * GB), device=dev)
        vg.set_cap(int(cap_gb * GB), device=dev)
        budget = 0
        if vg.device_count() > 0:
            budget = vg.snapshot(dev or 0).budget
        return (passthrough, int(budget >> 20))


def _budget_for(dev: Any, reserve_gb: float) -> int:
    reserve = None if reserve_gb < 0 else int(reserve_gb * GB)
    idx = host.device_index(dev)
    if idx is None:  # CPU: host RAM is the device
        return vg.tiling.resolve_budget(reserve=reserve if reserve is not None else vg.limits()["reserve"])
    return vg.tiling.resolve_budget(reserve=reserve, device=idx)


class UpscaleImageTiled(_Node):
    DESCRIPTION = ("Upscale an image with a model in the largest tiles that fit the VRAM budget, blended "
                   "seamlessly; on out-of-memory it shrinks the tile and keeps finished tiles. A drop-in for "
                   "'Upscale Image (using Model)'.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "upscale_model": ("UPSCALE_MODEL", {"tooltip": "From Load Upscale Model"}),
            "image": ("IMAGE", {"tooltip": "Images to upscale"}),
            "overlap": ("INT", {"default": 32, "min": 0, "max": 256, "step": 8,
                                "tooltip": "Input pixels shared by neighbouring tiles; more hides seams of big models"}),
            "reserve_gb": _reserve_input(),
            "max_tile": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 64,
                                 "tooltip": "Never use tiles larger than this; 0 = as large as fits"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The upscaled images",)

    def execute(self, upscale_model: Any, image: Any, overlap: int = 32, reserve_gb: float = -1.0, max_tile: int = 0):
        import torch

        scale = float(getattr(upscale_model, "scale", 0) or 0)
        if scale <= 0:
            raise ValueError(f"upscale model has no usable scale ({getattr(upscale_model, 'scale', None)!r})")
        patcher = getattr(upscale_model, "patcher", None)
        dev = getattr(patcher, "load_device", None) or host.torch_device()
        alpha = None
        if image.shape[-1] == 4:
            alpha, image = image[..., 3:4], image[..., :3]
        host.load_models([patcher] if patcher is not None else [],
                         memory_required=int((512 * 512 * 3) * image.element_size() * max(scale, 1.0) * 384))
        if hasattr(upscale_model, "to"):
            upscale_model.to(dev)

        def fn(t):
            with torch.no_grad():
                y = upscale_model(t.movedim(-1, -3).to(dev).float())
            return y.movedim(-3, -1)

        key = ("upscale", id(getattr(upscale_model, "model", upscale_model)), str(dev))
        cost = vg.cost_model(key)
        if cost is None and host.device_index(dev) is not None:
            cost = vg.calibrate(fn, image[:1].to(dev), key=key)
        # back-off stops at 64 px, or lower when the user capped tiles below that
        floor = max(2 * overlap, min(64, max_tile) if max_tile else 64)
        if max_tile and max_tile < floor:
            raise ValueError(f"max_tile {max_tile} is below 2 x overlap ({2 * overlap}); lower the overlap")
        out = _run_tiled("upscale", fn, image, dev=dev, scale=scale, overlap=overlap, cost=cost,
                         budget=_budget_for(dev, reserve_gb), min_tile=floor, max_tile=max_tile or None, max_batch=1)
        out = torch.clamp(out, 0.0, 1.0)
        if alpha is not None:
            a = torch.nn.functional.interpolate(alpha.movedim(-1, -3).float(), size=out.shape[1:3], mode="bilinear")
            out = torch.cat((out, a.movedim(-3, -1).to(out)), dim=-1)
        return (out.to(host.intermediate_dtype(out.dtype)),)


def _reserve_input() -> tuple:
    return ("FLOAT", {"default": -1.0, "min": -1.0, "max": 256.0, "step": 0.1,
                      "tooltip": "VRAM to keep free; -1 = the settings' reserve"})


def _run_tiled(stage: str, fn: Any, x: Any, *, layout: str = "nhwc", dev: Any = None, **kw: Any) -> Any:
    """Plan once for the progress bar's total, then tile inside a GC stage.  In low-VRAM mode
    other models are unloaded first, until the planned peak plus the reserve is free."""
    H, W = (x.shape[1], x.shape[2]) if layout == "nhwc" else (x.shape[2], x.shape[3])
    plan_kw = {k: kw[k] for k in ("scale", "overlap", "align", "cost", "budget", "min_tile", "max_tile") if k in kw}
    p = vg.plan_tiles(W, H, batch=x.shape[0], **plan_kw)
    if vg.guard().low_vram and p.fits and dev is not None:
        idx = host.device_index(dev)
        reserve = vg.snapshot(idx).reserve if idx is not None and vg.device_count() > idx else 0
        host.make_room(int(p.predicted_peak_bytes) + reserve, dev)
    with vg.stage(stage):
        return vg.tiled(fn, x, layout=layout, progress=host.progress(max(1, p.tiles) * x.shape[0]), **kw)


def _vae_ratio(vae: Any, attr: str) -> int | None:
    """The VAE's integer spatial ratio when vramguard can tile it itself (2-D image VAEs);
    None sends the node to ComfyUI's own code path (video, audio, self-tiling VAEs)."""
    if hasattr(vae, "throw_exception_if_invalid"):
        vae.throw_exception_if_invalid()
    r = getattr(vae, attr, 8)
    if not isinstance(r, int) or r <= 0 or getattr(vae, "latent_dim", 2) != 2:
        return None
    if getattr(vae, "extra_1d_channel", None) is not None or getattr(vae, "handles_tiling", False):
        return None
    return r


class VAEDecodeTiled(_Node):
    DESCRIPTION = ("Decode latents in the largest tiles that fit the VRAM budget (tile size from the planner, "
                   "ComfyUI's own VAE cost estimate), blended seamlessly, with back-off on out-of-memory.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "Latents to decode"}),
            "vae": ("VAE", {"tooltip": "The VAE"}),
            "overlap": ("INT", {"default": 8, "min": 0, "max": 64, "step": 1,
                                "tooltip": "Latent pixels shared by neighbouring tiles (x8 in the image)"}),
            "reserve_gb": _reserve_input(),
        }}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("Decoded images",)

    def execute(self, samples: dict, vae: Any, overlap: int = 8, reserve_gb: float = -1.0):
        import torch

        z = samples["samples"]
        ratio = _vae_ratio(vae, "upscale_ratio")
        if z.ndim != 4 or ratio is None:
            log.info("vramguard: latent %s / this VAE is not 2-D; using ComfyUI's own decode", tuple(z.shape))
            with vg.stage("vae_decode"):
                img = vae.decode(z)
            return (img.reshape(-1, *img.shape[-3:]) if img.ndim == 5 else img,)
        dev, dtype = vae.device, vae.vae_dtype
        # ComfyUI's own estimate per latent pixel; the weights are loaded first, so the budget
        # already excludes them and the fixed term is just workspace
        per_px = vae.memory_used_decode((1, z.shape[1], 1, 1), dtype)
        cost = vg.CostModel(64 * (1 << 20), float(per_px), "ComfyUI VAE estimate")
        host.load_models([vae.patcher], memory_required=int(per_px * 64 * 64),
                         force_full_load=getattr(vae, "disable_offload", False))

        def fn(t):
            with torch.no_grad():
                out = vae.first_stage_model.decode(t.to(dtype).to(dev))
            return vae.process_output(out.float())

        img = _run_tiled("vae_decode", fn, z.float(), layout="nchw", dev=dev, scale=ratio, overlap=overlap, cost=cost,
                         budget=_budget_for(dev, reserve_gb), min_tile=max(16, 2 * overlap))
        return (img.movedim(1, -1).contiguous(),)


class VAEEncodeTiled(_Node):
    DESCRIPTION = ("Encode images in the largest tiles that fit the VRAM budget, aligned to the VAE's "
                   "downscale, blended seamlessly, with back-off on out-of-memory.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE", {"tooltip": "Images to encode"}),
            "vae": ("VAE", {"tooltip": "The VAE"}),
            "overlap": ("INT", {"default": 64, "min": 0, "max": 512, "step": 8,
                                "tooltip": "Image pixels shared by neighbouring tiles (a multiple of the VAE's 8)"}),
            "reserve_gb": _reserve_input(),
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Latents",)

    def execute(self, pixels: Any, vae: Any, overlap: int = 64, reserve_gb: float = -1.0):
        import torch

        ratio = _vae_ratio(vae, "downscale_ratio")
        if ratio is None:
            with vg.stage("vae_encode"):
                return ({"samples": vae.encode(pixels[:, :, :, :3])},)
        overlap = max(ratio, overlap // ratio * ratio) if overlap else 0
        px = vae.vae_encode_crop_pixels(pixels)[:, :, :, :3] if hasattr(vae, "vae_encode_crop_pixels") else pixels[:, :, :, :3]
        dev, dtype = vae.device, vae.vae_dtype
        per_px = vae.memory_used_encode((1, 3, 1, 1), dtype)
        cost = vg.CostModel(64 * (1 << 20), float(per_px), "ComfyUI VAE estimate")
        host.load_models([vae.patcher], memory_required=int(per_px * 512 * 512),
                         force_full_load=getattr(vae, "disable_offload", False))

        def fn(t):
            with torch.no_grad():
                out = vae.first_stage_model.encode(vae.process_input(t.movedim(-1, 1)).to(dtype).to(dev))
            return out.float().movedim(1, -1)

        lat = _run_tiled("vae_encode", fn, px.float().contiguous(), dev=dev, scale=1 / ratio, overlap=overlap, align=ratio,
                         cost=cost, budget=_budget_for(dev, reserve_gb), min_tile=max(8 * ratio, 2 * overlap))
        return ({"samples": lat.movedim(-1, 1).contiguous()},)


class MemoryGuard(_Node):
    DESCRIPTION = ("MODEL in, MODEL out: runs the GC policy around sampling through ModelPatcher wrappers, "
                   "and records sampling as the 'unet' stage for per-stage peaks.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model"}),
            "mode": (["policy", "forced", "off"], {"default": "policy",
                                                   "tooltip": "After sampling: collect when it pays, always, or never"}),
        }}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The same model with vramguard's sampling wrapper attached",)

    def execute(self, model: Any, mode: str = "policy"):
        m = model.clone()
        pe = host.comfy("patcher_extension")
        if pe is None or not hasattr(m, "add_wrapper_with_key"):
            log.warning("vramguard: this ComfyUI has no ModelPatcher wrappers; Memory Guard does nothing")
            return (m,)

        def outer_sample(executor, *args, **kwargs):
            with vg.stage("unet", gc=False):
                out = executor(*args, **kwargs)
            if mode != "off":
                try:
                    vg.gc_check("unet", forced=(mode == "forced"))
                except Exception as e:  # never break sampling
                    log.warning("vramguard: GC after sampling failed: %s", e)
            return out

        m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "vramguard", outer_sample)
        return (m,)


class MemoryTimeline(_Live):
    DESCRIPTION = "Draw the memory timeline with per-stage peaks as an image."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 960, "min": 200, "max": 4096, "step": 8, "tooltip": "Image width"}),
            "height": ("INT", {"default": 360, "min": 120, "max": 2048, "step": 8, "tooltip": "Image height"}),
            "reset": ("BOOLEAN", {"default": False, "tooltip": "Clear the timeline after drawing"}),
        }, "optional": _opt_any("Connect the last node of a stage to draw after it ran")}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The timeline as an IMAGE",)

    def execute(self, width: int = 960, height: int = 360, reset: bool = False, passthrough: Any = None):
        import numpy as np
        import torch

        from vramguard.timeline_png import render_timeline

        s = vg.sampler()
        img = render_timeline(s.timeline(), s.stages(), width=width, height=height)
        if reset:
            s.reset()
        arr = np.asarray(img, dtype=np.float32) / 255.0
        return (torch.from_numpy(arr)[None],)


NODE_CLASS_MAPPINGS = {
    "VramguardMemorySnapshot": MemorySnapshot,
    "VramguardGCCheckpoint": GCCheckpoint,
    "VramguardUnloadModels": UnloadModels,
    "VramguardSetReserve": SetReserve,
    "VramguardUpscaleImageTiled": UpscaleImageTiled,
    "VramguardVAEDecodeTiled": VAEDecodeTiled,
    "VramguardVAEEncodeTiled": VAEEncodeTiled,
    "VramguardMemoryGuard": MemoryGuard,
    "VramguardMemoryTimeline": MemoryTimeline,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VramguardMemorySnapshot": "Memory Snapshot",
    "VramguardGCCheckpoint": "GC Checkpoint",
    "VramguardUnloadModels": "Unload Models",
    "VramguardSetReserve": "Set Reserve",
    "VramguardUpscaleImageTiled": "Upscale Image (tiled, auto)",
    "VramguardVAEDecodeTiled": "VAE Decode (tiled, auto)",
    "VramguardVAEEncodeTiled": "VAE Encode (tiled, auto)",
    "VramguardMemoryGuard": "Memory Guard",
    "VramguardMemoryTimeline": "Memory Timeline",
}
