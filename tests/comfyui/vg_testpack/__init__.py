"""Test-only ComfyUI node pack: tiny MODEL and CLIP built from ComfyUI's own classes.

Copied into custom_nodes/ by tests/test_comfyui_real.py.  Every node under test stays a core
ComfyUI node; this pack only supplies inputs that no core loader builds at test size.
"""
from . import tiny


class VGTestTinyModel:
    FUNCTION = "load"
    CATEGORY = "vramguard_test"
    RETURN_TYPES = ("MODEL", "CLIP")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 1, "min": 0, "max": 1 << 30})}}

    def load(self, seed):
        return (tiny.make_model(seed), tiny.make_clip(seed + 1))


NODE_CLASS_MAPPINGS = {"VGTestTinyModel": VGTestTinyModel}
NODE_DISPLAY_NAME_MAPPINGS = {"VGTestTinyModel": "vramguard test: tiny model + CLIP"}
