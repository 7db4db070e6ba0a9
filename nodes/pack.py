"""vramguard's ComfyUI nodes: a table of thin adapters.

Each node is its schema and one call into the library (vramguard.adapters.comfyui holds
every call into ComfyUI: model loading, the alpha split, VAE ratios and fallbacks, cost
models).  V1 node classes (NODE_CLASS_MAPPINGS) so the same code loads on 0.3.64 and the
2026 line.

Caching: only nodes that report the present (Memory Snapshot, Memory Timeline) are "always
changed".  The passthroughs (GC Checkpoint, Unload Models, Set Reserve) have no IS_CHANGED:
ComfyUI caches them by their inputs, so an identical queue re-runs nothing downstream; they
act whenever they execute, i.e. whenever what they follow ran again.
"""
from __future__ import annotations

from typing import Any

import vramguard as vg
from vramguard.adapters import comfyui as host

CATEGORY = "vramguard"


class AnyType(str):
    """Matches every socket type (ComfyUI compares types with !=)."""

    def __ne__(self, other: object) -> bool:
        return False

    def __hash__(self) -> int:
        return hash(str(self))


ANY = AnyType("*")


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


def _reserve_input() -> tuple:
    return ("FLOAT", {"default": -1.0, "min": -1.0, "max": 256.0, "step": 0.1,
                      "tooltip": "VRAM to keep free; -1 = the settings' reserve"})


def _value(tooltip: str) -> dict:
    return {"value": (ANY, {"tooltip": tooltip})}


class MemorySnapshot(_Live):
    DESCRIPTION = "Device, framework and host memory right now, as text and numbers."
    RETURN_TYPES = ("STRING", "INT", "INT", "FLOAT", "STRING")
    RETURN_NAMES = ("text", "free_mb", "budget_mb", "used_pct", "ledger")
    OUTPUT_TOOLTIPS = ("Readable snapshot", "Free VRAM in MiB", "Budget (free + evictable - reserve) in MiB",
                       "Device memory in use, percent",
                       "Shared ledger: the processes sharing this GPU and their claims, the learned reserve, "
                       "pinned host memory")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"device": ("INT", {"default": 0, "min": 0, "max": 63,
                                                "tooltip": "GPU index as torch numbers it"})},
                "optional": _opt_any("Connect anything to take the snapshot after that node ran")}

    def execute(self, device: int = 0, passthrough: Any = None):
        text, n = host.memory_report(device)
        ledger_text = vg.ledger.summary_text(device=device)
        return {"ui": {"text": [text]},
                "result": (text, n["free"] >> 20, n["budget"] >> 20, float(n["used_pct"]), ledger_text)}


class GCCheckpoint(_Node):
    DESCRIPTION = ("Pass anything through and run the GC policy here (or force a collection). Cached like "
                   "any node: it runs again when what it follows ran again.")
    RETURN_TYPES = (ANY,)
    RETURN_NAMES = ("value",)
    OUTPUT_TOOLTIPS = ("The input, unchanged",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **_value("Anything; passed through unchanged"),
            "mode": (["policy", "forced"], {"default": "policy",
                                            "tooltip": "policy: collect only when it pays; forced: always"}),
            "stage": (list(vg.STAGES), {"default": "vae_decode",
                                        "tooltip": "Which stage this checkpoint follows (for stats and log)"}),
        }}

    def execute(self, value: Any, mode: str = "policy", stage: str = "vae_decode"):
        return (host.gc_checkpoint(value, mode, stage),)


class UnloadModels(_Node):
    DESCRIPTION = ("Unload every model from VRAM and release caches; passes its input through. Cached like "
                   "any node: it runs again when what it follows ran again.")
    RETURN_TYPES = (ANY,)
    RETURN_NAMES = ("value",)
    OUTPUT_TOOLTIPS = ("The input, unchanged",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": _value("Anything; passed through after unloading")}

    def execute(self, value: Any):
        return (host.unload_models_node(value),)


class SetReserve(_Node):
    DESCRIPTION = ("Set the VRAM reserve and cap for the rest of this prompt (all devices or one); the "
                   "settings' values return when the prompt ends.")
    RETURN_TYPES = (ANY, "INT")
    RETURN_NAMES = ("passthrough", "budget_mb")
    OUTPUT_TOOLTIPS = ("The optional input, unchanged", "Budget after the change, MiB")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "reserve_gb": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 256.0, "step": 0.1,
                                     "tooltip": "VRAM to keep free for other applications, for this prompt"}),
            "cap_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                                 "tooltip": "Absolute cap on this process's VRAM for this prompt; 0 = no cap"}),
            "device": ("INT", {"default": -1, "min": -1, "max": 63, "tooltip": "-1 = every device"}),
        }, "optional": _opt_any("Connect anything to apply after that node ran")}

    def execute(self, reserve_gb: float, cap_gb: float, device: int = -1, passthrough: Any = None):
        return (passthrough, host.set_reserve_for_prompt(reserve_gb, cap_gb, device))


class UpscaleImageTiled(_Node):
    DESCRIPTION = ("Upscale an image with a model in the largest tiles that fit the VRAM budget, blended "
                   "seamlessly; on out-of-memory it shrinks the tile and keeps finished tiles. A drop-in for "
                   "'Upscale Image (using Model)'.")
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The upscaled images",)

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

    def execute(self, upscale_model: Any, image: Any, overlap: int = 32, reserve_gb: float = -1.0, max_tile: int = 0):
        return (host.upscale_tiled(upscale_model, image, overlap, reserve_gb, max_tile),)


class VAEDecodeTiled(_Node):
    DESCRIPTION = ("Decode latents in the largest tiles that fit the VRAM budget (tile size from the planner, "
                   "ComfyUI's own VAE cost estimate), blended seamlessly, with back-off on out-of-memory.")
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("Decoded images",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "Latents to decode"}),
            "vae": ("VAE", {"tooltip": "The VAE"}),
            "overlap": ("INT", {"default": 8, "min": 0, "max": 64, "step": 1,
                                "tooltip": "Latent pixels shared by neighbouring tiles (x8 in the image)"}),
            "reserve_gb": _reserve_input(),
        }}

    def execute(self, samples: dict, vae: Any, overlap: int = 8, reserve_gb: float = -1.0):
        return (host.vae_tiled("decode", vae, samples, overlap, reserve_gb),)


class VAEEncodeTiled(_Node):
    DESCRIPTION = ("Encode images in the largest tiles that fit the VRAM budget, aligned to the VAE's "
                   "downscale, blended seamlessly, with back-off on out-of-memory.")
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Latents",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE", {"tooltip": "Images to encode"}),
            "vae": ("VAE", {"tooltip": "The VAE"}),
            "overlap": ("INT", {"default": 64, "min": 0, "max": 512, "step": 8,
                                "tooltip": "Image pixels shared by neighbouring tiles (a multiple of the VAE's 8)"}),
            "reserve_gb": _reserve_input(),
        }}

    def execute(self, pixels: Any, vae: Any, overlap: int = 64, reserve_gb: float = -1.0):
        return (host.vae_tiled("encode", vae, pixels, overlap, reserve_gb),)


class MemoryGuard(_Node):
    DESCRIPTION = ("MODEL in, MODEL out: runs the GC policy after sampling through ModelPatcher wrappers, "
                   "and records sampling as the 'unet' stage for per-stage peaks.")
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The same model with vramguard's sampling wrapper attached",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model"}),
            "mode": (["policy", "forced", "off"], {"default": "policy",
                                                   "tooltip": "After sampling: collect when it pays, always, or never"}),
        }}

    def execute(self, model: Any, mode: str = "policy"):
        return (host.memory_guard(model, mode),)


class MemoryTimeline(_Live):
    DESCRIPTION = "Draw the memory timeline with per-stage peaks as an image."
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The timeline as an IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 960, "min": 200, "max": 4096, "step": 8, "tooltip": "Image width"}),
            "height": ("INT", {"default": 360, "min": 120, "max": 2048, "step": 8, "tooltip": "Image height"}),
            "reset": ("BOOLEAN", {"default": False, "tooltip": "Clear the timeline after drawing"}),
        }, "optional": _opt_any("Connect the last node of a stage to draw after it ran")}

    def execute(self, width: int = 960, height: int = 360, reset: bool = False, passthrough: Any = None):
        return (host.timeline_image(width, height, reset),)


class BatchSizeAuto(_Node):
    DESCRIPTION = ("The largest batch of images of this size whose working set fits the VRAM budget, from the "
                   "model's and the VAE's own memory estimates (the planner's default cost model without them).")
    RETURN_TYPES = ("INT", "STRING")
    RETURN_NAMES = ("batch_size", "info")
    OUTPUT_TOOLTIPS = ("Batch size (at least 1)", "How it was computed")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 1024, "min": 8, "max": 16384, "step": 8, "tooltip": "Image width"}),
            "height": ("INT", {"default": 1024, "min": 8, "max": 16384, "step": 8, "tooltip": "Image height"}),
            "max_batch": ("INT", {"default": 64, "min": 1, "max": 4096, "tooltip": "Never more than this"}),
            "reserve_gb": _reserve_input(),
        }, "optional": {
            "model": ("MODEL", {"tooltip": "The diffusion model (its own memory estimate)"}),
            "vae": ("VAE", {"tooltip": "The VAE (its decode estimate)"}),
        }}

    def execute(self, width: int, height: int, max_batch: int = 64, reserve_gb: float = -1.0, model: Any = None,
                vae: Any = None):
        return host.batch_size_auto(width, height, max_batch, reserve_gb, model, vae)


class VAEDecodeBatched(_Node):
    DESCRIPTION = ("Decode a batch of latents in the largest chunk that fits the VRAM budget; on out-of-memory "
                   "the chunk halves and finished frames are kept, in order.")
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("Decoded images, in the batch's order",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "Latents to decode"}),
            "vae": ("VAE", {"tooltip": "The VAE"}),
            "reserve_gb": _reserve_input(),
        }}

    def execute(self, samples: dict, vae: Any, reserve_gb: float = -1.0):
        return (host.vae_decode_batched(vae, samples, reserve_gb),)


class ReserveForLargest(_Node):
    DESCRIPTION = ("Before a run of changing sizes, make torch's cache hold one block for the largest size's "
                   "working set, so smaller sizes reuse it instead of fragmenting the cache.")
    RETURN_TYPES = (ANY, "INT")
    RETURN_NAMES = ("passthrough", "reserved_mb")
    OUTPUT_TOOLTIPS = ("The input, unchanged", "MiB now held in torch's cache for the run")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 1360, "min": 8, "max": 16384, "step": 8, "tooltip": "Largest width"}),
            "height": ("INT", {"default": 1536, "min": 8, "max": 16384, "step": 8, "tooltip": "Largest height"}),
            "batch": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "Batch size of the run"}),
        }, "optional": {
            "passthrough": (ANY, {"tooltip": "Connect what must run before the reservation"}),
            "model": ("MODEL", {"tooltip": "The diffusion model (its own memory estimate)"}),
            "vae": ("VAE", {"tooltip": "The VAE (its decode estimate)"}),
        }}

    def execute(self, width: int, height: int, batch: int = 1, passthrough: Any = None, model: Any = None,
                vae: Any = None):
        return (passthrough, host.reserve_for_largest(width, height, batch, model, vae))


# key: (class, display name)
NODES: dict[str, tuple[type, str]] = {
    "VramguardMemorySnapshot": (MemorySnapshot, "Memory Snapshot"),
    "VramguardGCCheckpoint": (GCCheckpoint, "GC Checkpoint"),
    "VramguardUnloadModels": (UnloadModels, "Unload Models"),
    "VramguardSetReserve": (SetReserve, "Set Reserve"),
    "VramguardUpscaleImageTiled": (UpscaleImageTiled, "Upscale Image (tiled, auto)"),
    "VramguardVAEDecodeTiled": (VAEDecodeTiled, "VAE Decode (tiled, auto)"),
    "VramguardVAEEncodeTiled": (VAEEncodeTiled, "VAE Encode (tiled, auto)"),
    "VramguardMemoryGuard": (MemoryGuard, "Memory Guard"),
    "VramguardMemoryTimeline": (MemoryTimeline, "Memory Timeline"),
    "VramguardBatchSizeAuto": (BatchSizeAuto, "Batch Size (auto)"),
    "VramguardVAEDecodeBatched": (VAEDecodeBatched, "VAE Decode (batch guard)"),
    "VramguardReserveForLargest": (ReserveForLargest, "Reserve for Largest"),
}
NODE_CLASS_MAPPINGS = {k: cls for k, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {k: name for k, (_, name) in NODES.items()}
