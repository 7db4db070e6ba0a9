"""Write example_workflows/*.json: ComfyUI frontend workflows (the UI graph: nodes and links)
that show vramguard's nodes beside the core ones.  ComfyUI lists a pack's example_workflows/ in
its templates browser (clone route).  Run from the repository root after changing a node's
inputs; tests/test_example_workflows.py checks the files, and tests/test_comfyui_real.py runs
them in a real ComfyUI.

    python scripts/make_example_workflows.py
"""
import json
import os

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "example_workflows")

# output types per node type (what the links carry) and the order of their outputs
OUTPUTS = {
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "EmptyLatentImage": [("LATENT", "LATENT")],
    "KSampler": [("LATENT", "LATENT")],
    "VAEDecode": [("IMAGE", "IMAGE")],
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "UpscaleModelLoader": [("UPSCALE_MODEL", "UPSCALE_MODEL")],
    "ImageUpscaleWithModel": [("IMAGE", "IMAGE")],
    "SaveImage": [],
    "PreviewImage": [],
}
# vramguard's own nodes: outputs as the pack declares them (so a new output cannot go stale here)
from vramguard_nodes import NODE_CLASS_MAPPINGS as _PACK  # noqa: E402  (the installed pack)

for _name, _cls in _PACK.items():
    OUTPUTS[_name] = [(n, str(t)) for n, t in zip(getattr(_cls, "RETURN_NAMES", None) or _cls.RETURN_TYPES,
                                                  _cls.RETURN_TYPES)]

TITLES = {
    "VramguardUpscaleImageTiled": "Upscale Image (tiled, auto)", "VramguardVAEDecodeTiled": "VAE Decode (tiled, auto)",
    "VramguardGCCheckpoint": "GC Checkpoint", "VramguardMemoryGuard": "Memory Guard",
    "VramguardMemoryTimeline": "Memory Timeline", "VramguardMemorySnapshot": "Memory Snapshot",
    "VramguardSetReserve": "Set Reserve",
}


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, type_, pos, widgets=(), size=(320, 120), title=None):
        n = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size), "flags": {},
             "order": len(self.nodes), "mode": 0, "inputs": [],
             "outputs": [{"name": name, "type": t, "links": [], "slot_index": i}
                         for i, (name, t) in enumerate(OUTPUTS[type_])],
             "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        if title or type_ in TITLES:
            n["title"] = title or TITLES[type_]
        self.nodes.append(n)
        return n

    def link(self, src, slot, dst, name, in_type=None):
        """A link from output `slot` of src to dst's input `name` (in_type: the input's declared
        type where it differs from what flows in, e.g. "*" on a passthrough)."""
        lid = len(self.links) + 1
        t = src["outputs"][slot]["type"]
        src["outputs"][slot]["links"].append(lid)
        dst["inputs"].append({"name": name, "type": in_type or t, "link": lid})
        self.links.append([lid, src["id"], slot, dst["id"], len(dst["inputs"]) - 1, t])

    def note(self, text, pos, size=(420, 160)):
        """A Note at pos (its body's top left; the frontend draws a 30 px title bar above it):
        tests/test_frontend_browser.py fails on nodes drawn over each other."""
        n = {"id": len(self.nodes) + 1, "type": "Note", "pos": list(pos), "size": list(size), "flags": {},
             "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
             "widgets_values": [text]}
        self.nodes.append(n)

    def dump(self, name):
        wf = {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
              "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
              "version": 0.4}
        with open(os.path.join(OUT, name), "w", encoding="utf-8") as f:
            json.dump(wf, f, indent=1)
            f.write("\n")


def txt2img(g, decode_with=None):
    """Checkpoint, prompts, empty latent, KSampler; returns (ckpt, sampler, model_for_sampler)."""
    ckpt = g.node("CheckpointLoaderSimple", (20, 160), ["v1-5-pruned-emaonly.safetensors"], (320, 100))
    pos = g.node("CLIPTextEncode", (380, 40), ["a lighthouse on a cliff at sunset, detailed"], (400, 160))
    neg = g.node("CLIPTextEncode", (380, 240), ["blurry, low quality"], (400, 160))
    lat = g.node("EmptyLatentImage", (380, 440), [1024, 1024, 1], (320, 110))
    g.link(ckpt, 1, pos, "clip")
    g.link(ckpt, 1, neg, "clip")
    return ckpt, pos, neg, lat


def ksampler(g, model_src, pos, neg, lat, xy=(820, 160)):
    ks = g.node("KSampler", xy, [42, "fixed", 20, 7.0, "euler", "normal", 1.0], (320, 270))
    g.link(model_src[0], model_src[1], ks, "model")
    g.link(pos, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    return ks


def side_by_side(g, core, tiled, x, prefix):
    """Save the core node's image and vramguard's, one above the other."""
    for node, name, y in ((core, "core", 40), (tiled, "vramguard_tiled", 340)):
        save = g.node("SaveImage", (x, y), [f"{prefix}_{name}"], (320, 270))
        g.link(node, 0, save, "images")


def upscale_vs_core():
    g = Graph()
    img = g.node("LoadImage", (20, 40), ["example.png", "image"], (320, 320))
    up = g.node("UpscaleModelLoader", (20, 400), ["4x-UltraSharp.pth"], (320, 60))
    core = g.node("ImageUpscaleWithModel", (400, 40), [], (260, 50))
    g.link(up, 0, core, "upscale_model")
    g.link(img, 0, core, "image")
    tiled = g.node("VramguardUpscaleImageTiled", (400, 260), [32, -1.0, 0], (320, 130))
    g.link(up, 0, tiled, "upscale_model")
    g.link(img, 0, tiled, "image")
    side_by_side(g, core, tiled, 760, "upscale")
    g.note("Core 'Upscale Image (using Model)' vs vramguard's 'Upscale Image (tiled, auto)'.\n"
           "The tiled node picks the largest tile that fits the VRAM budget (reserve_gb -1 = the settings' "
           "reserve), blends the tiles without seams, and on out-of-memory shrinks the tile and keeps the "
           "finished ones. max_tile 0 = no limit. Load any ESRGAN-type model and an image.", (20, 500))
    g.dump("tiled_upscale_vs_core.json")


def tiled_vae_decode():
    g = Graph()
    ckpt, pos, neg, lat = txt2img(g)
    ks = ksampler(g, (ckpt, 0), pos, neg, lat)
    core = g.node("VAEDecode", (1180, 40), [], (220, 50))
    g.link(ks, 0, core, "samples")
    g.link(ckpt, 2, core, "vae")
    tiled = g.node("VramguardVAEDecodeTiled", (1180, 200), [8, -1.0], (320, 110))
    g.link(ks, 0, tiled, "samples")
    g.link(ckpt, 2, tiled, "vae")
    side_by_side(g, core, tiled, 1540, "vae")
    g.note("'VAE Decode (tiled, auto)' decodes in tiles that fit the budget and gives the untiled image "
           "(GroupNorm statistics over the whole image, global attention): compare the two outputs.",
           (1180, 360), (340, 160))
    g.dump("tiled_vae_decode.json")


def gc_checkpoints_timeline():
    g = Graph()
    ckpt, pos, neg, lat = txt2img(g)
    guard = g.node("VramguardMemoryGuard", (20, 320), ["policy"], (320, 60))
    g.link(ckpt, 0, guard, "model")
    ks = ksampler(g, (guard, 0), pos, neg, lat)
    gc1 = g.node("VramguardGCCheckpoint", (1180, 40), ["policy", "unet"], (300, 90))
    g.link(ks, 0, gc1, "value", "*")
    dec = g.node("VAEDecode", (1180, 180), [], (220, 50))
    g.link(gc1, 0, dec, "samples", "LATENT")
    g.link(ckpt, 2, dec, "vae")
    gc2 = g.node("VramguardGCCheckpoint", (1180, 280), ["forced", "vae_decode"], (300, 90))
    g.link(dec, 0, gc2, "value", "*")
    save = g.node("SaveImage", (1540, 40), ["gc_checkpoints"], (320, 270))
    g.link(gc2, 0, save, "images", "IMAGE")
    tl = g.node("VramguardMemoryTimeline", (1540, 360), [960, 440, False], (320, 130))
    g.link(gc2, 0, tl, "passthrough", "*")
    prev = g.node("PreviewImage", (1900, 360), [], (480, 300))
    g.link(tl, 0, prev, "images")
    snap = g.node("VramguardMemorySnapshot", (1900, 40), [0], (360, 200))
    g.link(gc2, 0, snap, "passthrough", "*")
    g.note("Memory Guard marks sampling as the 'unet' stage; GC Checkpoints run the GC policy where they "
           "sit (policy: only when it pays; forced: always). Memory Timeline draws device use, this process, "
           "RSS, the reserve and budget lines and the stages with their peaks, after the last checkpoint.",
           (20, 420), (340, 220))
    g.dump("gc_checkpoints_memory_timeline.json")


def set_reserve():
    g = Graph()
    res = g.node("VramguardSetReserve", (20, 40), [2.0, 0.0, -1], (320, 130))
    img = g.node("LoadImage", (20, 220), ["example.png", "image"], (320, 320))
    up = g.node("UpscaleModelLoader", (20, 580), ["4x-UltraSharp.pth"], (320, 60))
    tiled = g.node("VramguardUpscaleImageTiled", (400, 220), [32, -1.0, 0], (320, 130))
    g.link(up, 0, tiled, "upscale_model")
    g.link(res, 0, tiled, "image", "IMAGE")  # the passthrough orders the reserve before the upscale
    g.link(img, 0, res, "passthrough", "*")
    snap = g.node("VramguardMemorySnapshot", (400, 420), [0], (360, 200))
    g.link(res, 0, snap, "passthrough", "*")
    save = g.node("SaveImage", (780, 220), ["set_reserve_tiled"], (320, 270))
    g.link(tiled, 0, save, "images")
    g.note("Set Reserve keeps 2 GB free on every GPU (device -1) for the rest of this prompt; the settings' "
           "reserve comes back when the prompt ends. The image goes through it so that the upscale runs "
           "after it; the Memory Snapshot shows the reserve and budget in force.", (780, 520))
    g.dump("set_reserve.json")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    upscale_vs_core()
    tiled_vae_decode()
    gc_checkpoints_timeline()
    set_reserve()
    print("wrote", sorted(os.listdir(OUT)))
