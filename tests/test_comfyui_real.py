"""Against a real, unmodified ComfyUI: both install routes, every node over the HTTP API, every
automatic seam made to fire (GC checks counted per stage), caching kept, the settings routes and
their persistence across a restart, and importing the pack without a server.

Set VRAMGUARD_COMFYUI to a ComfyUI checkout (never committed) and VRAMGUARD_COMFYUI_PYTHON to a
Python with ComfyUI's requirements and vramguard: `eval "$(bash scripts/comfyui_env.sh)"` builds
both (ComfyUI 0.30.0 from PyPI).  Without them the module is skipped, unless
VRAMGUARD_REQUIRE_COMFYUI=1 (CI), which turns the skip into a failure.  ComfyUI runs with --cpu in
temporary --base-directory folders, so the checkout is not modified.  Models are tiny, seeded and
made at test time: files for the core loaders (tests/comfyui/make_models.py) and a test-only node
pack for the MODEL and CLIP (tests/comfyui/vg_testpack); every node whose seam is tested is
ComfyUI's own.  Optional: a headless Chromium (Debian's `chromium`) and `playwright` take a
screenshot of the settings dialog into VRAMGUARD_SCREENSHOT_DIR.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

ROOT = os.environ.get("VRAMGUARD_COMFYUI")
PY = os.environ.get("VRAMGUARD_COMFYUI_PYTHON", sys.executable)
REPO = Path(__file__).resolve().parent.parent
HELPERS = REPO / "tests" / "comfyui"
REQUIRED = os.environ.get("VRAMGUARD_REQUIRE_COMFYUI") == "1"


def _unavailable(reason: str) -> None:
    if REQUIRED:  # CI: a missing host is a failure, never a silent skip
        pytest.fail(f"VRAMGUARD_REQUIRE_COMFYUI=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


if not ROOT:
    _unavailable("VRAMGUARD_COMFYUI is not set: no ComfyUI checkout to test against")
if not Path(ROOT, "main.py").is_file():
    _unavailable(f"VRAMGUARD_COMFYUI={ROOT} has no main.py")
_probe = subprocess.run([PY, "-c", "import aiohttp, spandrel, safetensors, torch, torchsde, einops, vramguard"],
                        capture_output=True, text=True)
if _probe.returncode != 0:
    _unavailable(f"{PY} lacks ComfyUI's requirements or vramguard: {_probe.stderr.strip()[-300:]}")

STAGES = ("text_encode", "unet", "vae_decode", "vae_encode", "controlnet", "lora_load", "ipadapter", "upscale")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Comfy:
    def __init__(self, base: Path):
        self.base, self.port = base, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(base / "comfyui.log", "a")
        self.proc = subprocess.Popen(
            [PY, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory", str(base),
             "--database-url", "sqlite:///:memory:", "--disable-auto-launch"],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("ComfyUI exited:\n" + self.log_tail())
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        self.stop()
        raise RuntimeError("ComfyUI did not start:\n" + self.log_tail())

    def log_tail(self, n: int = 3000) -> str:
        return (self.base / "comfyui.log").read_text(errors="replace")[-n:]

    def req(self, path, data=None, method=None):
        body = json.dumps(data).encode() if data is not None else None
        r = urllib.request.Request(self.url + path, data=body, method=method,
                                   headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(r, timeout=60) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw[:1] in (b"{", b"[") else raw)

    def get(self, path):
        return self.req(path)[1]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()

    def checks(self) -> dict:
        """GC checks so far, per stage, from the pack's own route."""
        return {k: v["checks"] for k, v in self.get("/vramguard/hooks")["gc_stats"].items()}

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue `prompt`, wait for it; the history entry plus 'fired': GC checks per stage made by it."""
        before = self.checks()
        status, body = self.req("/prompt", {"prompt": prompt, "client_id": "vramguard-test"})
        assert status == 200, body
        pid = body["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = self.get(f"/history/{pid}")
            if pid in h and h[pid].get("status", {}).get("completed") is not None:
                entry = h[pid]
                assert entry["status"]["status_str"] == "success", (
                    json.dumps(entry["status"])[-3000:] + "\n" + self.log_tail())
                after = self.checks()
                entry["fired"] = {s: after.get(s, 0) - before.get(s, 0) for s in set(after) | set(before)
                                  if after.get(s, 0) != before.get(s, 0)}
                return entry
            time.sleep(0.5)
        raise AssertionError("prompt did not finish:\n" + self.log_tail())


def _messages(entry: dict, kind: str) -> list:
    return [data for name, data in entry["status"].get("messages", []) if name == kind]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """The tiny model files, made once per module with ComfyUI's Python."""
    out = tmp_path_factory.mktemp("vg_models")
    r = subprocess.run([PY, str(HELPERS / "make_models.py"), ROOT, str(out)], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _make_base(path: Path, models: Path) -> Path:
    (path / "custom_nodes").mkdir(parents=True)
    (path / "user" / "default").mkdir(parents=True)
    for sub in models.iterdir():
        (path / "models" / sub.name).mkdir(parents=True)
        for f in sub.iterdir():
            (path / "models" / sub.name / f.name).symlink_to(f)
    shutil.copytree(HELPERS / "vg_testpack", path / "custom_nodes" / "vg_testpack",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return path


@pytest.fixture
def base(tmp_path, models):
    return _make_base(tmp_path / "comfy_base", models)


def _pip_install(base: Path) -> None:
    r = subprocess.run([PY, "-m", "vramguard", "install-comfyui", str(base)], capture_output=True, text=True)
    assert r.returncode == 0 and "installed" in r.stdout, r.stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory, models):
    """One ComfyUI (pip route) shared by the seam, caching and workflow tests."""
    base = _make_base(tmp_path_factory.mktemp("shared") / "comfy_base", models)
    _pip_install(base)
    c = Comfy(base)
    yield c
    c.stop()


# ----------------------------------------------------------------------------- prompts
def _tiny(seed: int = 1) -> dict:
    return {"class_type": "VGTestTinyModel", "inputs": {"seed": seed}}


def _encode(clip: list, text: str) -> dict:
    return {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": text}}


def _save(images: list, prefix: str) -> dict:
    return {"class_type": "SaveImage", "inputs": {"images": images, "filename_prefix": prefix}}


def ksampler_prompt(tag: str) -> dict:
    """LoRA, two text encodes, VAE encode, ControlNet, KSampler, VAE decode: all core nodes."""
    return {
        "1": _tiny(11),
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                    "lora_name": "vg_test_lora.safetensors",
                                                    "strength_model": 1.0, "strength_clip": 1.0}},
        "3": _encode(["2", 1], f"a tiny red cube {tag}"),
        "4": _encode(["2", 1], f"blurry {tag}"),
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": "vg_test_vae.safetensors"}},
        "6": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x884422}},
        "7": {"class_type": "VAEEncode", "inputs": {"pixels": ["6", 0], "vae": ["5", 0]}},
        "8": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "vg_test_cn.safetensors"}},
        "9": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["3", 0], "negative": ["4", 0], "control_net": ["8", 0], "image": ["6", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
        "10": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": 1, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["9", 0], "negative": ["9", 1], "latent_image": ["7", 0], "denoise": 1.0}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["5", 0]}},
        "12": _save(["11", 0], "vg_ks"),
    }


def custom_sampler_prompt(tag: str) -> dict:
    """SamplerCustomAdvanced, which calls guider.sample, not comfy.sample.*."""
    return {
        "1": _tiny(21),
        "3": _encode(["1", 1], f"a tiny blue sphere {tag}"),
        "4": _encode(["1", 1], f"noisy {tag}"),
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": "vg_test_vae.safetensors"}},
        "20": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                     "cfg": 2.0}},
        "21": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "22": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 2,
                                                          "denoise": 1.0}},
        "23": {"class_type": "RandomNoise", "inputs": {"noise_seed": 2}},
        "24": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "25": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["23", 0], "guider": ["20", 0],
                                                                 "sampler": ["21", 0], "sigmas": ["22", 0],
                                                                 "latent_image": ["24", 0]}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["25", 0], "vae": ["5", 0]}},
        "12": _save(["11", 0], "vg_sca"),
    }


def upscale_prompt(color: int, between: str | None = None) -> dict:
    """Core ImageUpscaleWithModel (comfy_extras), optionally behind a vramguard passthrough node."""
    p = {
        "30": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": color}},
        "31": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "vg_test_x4.safetensors"}},
        "32": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["31", 0], "image": ["30", 0]}},
        "33": _save(["32", 0], "vg_core_up"),
    }
    if between == "VramguardGCCheckpoint":
        p["34"] = {"class_type": between, "inputs": {"value": ["30", 0], "mode": "forced", "stage": "upscale"}}
    elif between == "VramguardUnloadModels":
        p["34"] = {"class_type": between, "inputs": {"value": ["30", 0]}}
    if between:
        p["32"]["inputs"]["image"] = ["34", 0]
    return p


def _expect(fired: dict, want: dict) -> None:
    """Exactly these checks per stage (lora_unload aside: when ComfyUI unpatches is its business)."""
    got = {s: n for s, n in fired.items() if s != "lora_unload"}
    want = {s: n for s, n in want.items() if n}
    assert got == want, f"GC checks per stage: got {got}, want {want}"


# ----------------------------------------------------------------------------- seams fire
def test_seams_fire_ksampler_pipeline(server):
    """text encode x2, LoRA load, ControlNet, VAE encode, one KSampler run, VAE decode: one check each."""
    e = server.run(ksampler_prompt("ks"))
    _expect(e["fired"], {"text_encode": 2, "lora_load": 1, "controlnet": 1, "vae_encode": 1, "unet": 1,
                         "vae_decode": 1})


def test_seam_fires_sampler_custom_advanced(server):
    """Fails on 0.1.0: the unet hook wraps comfy.sample.sample*, which SamplerCustomAdvanced
    never calls (comfy_extras/nodes_custom_sampler.py: guider.sample(...))."""
    e = server.run(custom_sampler_prompt("sca"))
    _expect(e["fired"], {"text_encode": 2, "unet": 1, "vae_decode": 1})


def test_seam_fires_core_upscale(server):
    """Fails on 0.1.0: the hook wraps a second copy of comfy_extras.nodes_upscale_model that
    ComfyUI never runs (it loads comfy_extras under file-path module names)."""
    e = server.run(upscale_prompt(0x3366AA))
    _expect(e["fired"], {"upscale": 1})
    e = server.run(upscale_prompt(0x3366AB))  # a second run: one more, not accumulated twice
    _expect(e["fired"], {"upscale": 1})


@pytest.mark.parametrize("node", [None, "VramguardGCCheckpoint", "VramguardUnloadModels"])
def test_passthrough_keeps_comfyui_cache(server, node):
    """An identical second queue executes nothing downstream of a vramguard passthrough
    (None: the same prompt without one, ComfyUI's own behaviour).  Fails on 0.1.0: both nodes
    return NaN from IS_CHANGED, so ComfyUI re-runs them and everything after them (the
    upscale) on every queue."""
    color = {None: 0x102030, "VramguardGCCheckpoint": 0x102031, "VramguardUnloadModels": 0x102032}[node]
    downstream = {"32", "33"} | ({"34"} if node else set())
    first = server.run(upscale_prompt(color, between=node))
    assert not downstream & set(_messages(first, "execution_cached")[0]["nodes"])  # a new image: all run
    second = server.run(upscale_prompt(color, between=node))
    cached = set(_messages(second, "execution_cached")[0]["nodes"])
    assert downstream <= cached, f"re-executed on an identical queue: {sorted(downstream - cached)}"
    assert second["fired"].get("upscale", 0) == 0, second["fired"]


# ----------------------------------------------------------------------------- every node
def every_node_prompt() -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0x3366AA}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "vg_test_x4.safetensors"}},
        "3": {"class_type": "VramguardUpscaleImageTiled",
              "inputs": {"upscale_model": ["2", 0], "image": ["1", 0], "overlap": 8, "reserve_gb": -1.0,
                         "max_tile": 32}},
        "4": {"class_type": "VramguardMemorySnapshot", "inputs": {"device": 0, "passthrough": ["3", 0]}},
        "5": {"class_type": "VramguardGCCheckpoint", "inputs": {"value": ["3", 0], "mode": "forced",
                                                                "stage": "upscale"}},
        "6": {"class_type": "VramguardSetReserve", "inputs": {"reserve_gb": 0.5, "cap_gb": 0.0, "device": -1,
                                                              "passthrough": ["5", 0]}},
        "7": {"class_type": "VramguardMemoryTimeline", "inputs": {"width": 400, "height": 200, "reset": False,
                                                                  "passthrough": ["6", 0]}},
        "8": _save(["5", 0], "vg_up"),
        "9": _save(["7", 0], "vg_timeline"),
        "10": {"class_type": "VAELoader", "inputs": {"vae_name": "vg_test_vae.safetensors"}},
        "11": {"class_type": "VramguardVAEEncodeTiled", "inputs": {"pixels": ["1", 0], "vae": ["10", 0],
                                                                   "overlap": 16, "reserve_gb": -1.0}},
        "12": {"class_type": "VramguardVAEDecodeTiled", "inputs": {"samples": ["11", 0], "vae": ["10", 0],
                                                                   "overlap": 2, "reserve_gb": -1.0}},
        "13": {"class_type": "VramguardUnloadModels", "inputs": {"value": ["12", 0]}},
        "14": _save(["13", 0], "vg_vae"),
        "15": _tiny(31),
        "16": {"class_type": "VramguardMemoryGuard", "inputs": {"model": ["15", 0], "mode": "policy"}},
        "17": _encode(["15", 1], "guarded"),
        "18": {"class_type": "KSampler", "inputs": {
            "model": ["16", 0], "seed": 3, "steps": 2, "cfg": 1.5, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["17", 0], "negative": ["17", 0], "latent_image": ["11", 0], "denoise": 1.0}},
        "19": {"class_type": "VAEDecode", "inputs": {"samples": ["18", 0], "vae": ["10", 0]}},
        "20": _save(["19", 0], "vg_guarded"),
        # batches (issue 16): batch size from the budget -> latents -> the pool reserved for the
        # largest size -> a batch-guarded decode, every frame saved
        "21": {"class_type": "VramguardBatchSizeAuto", "inputs": {"width": 64, "height": 48, "max_batch": 3,
                                                                  "reserve_gb": -1.0, "model": ["15", 0],
                                                                  "vae": ["10", 0]}},
        "22": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": ["21", 0]}},
        "23": {"class_type": "VramguardReserveForLargest", "inputs": {"width": 64, "height": 48, "batch": 3,
                                                                     "passthrough": ["22", 0], "vae": ["10", 0]}},
        "24": {"class_type": "VramguardVAEDecodeBatched", "inputs": {"samples": ["23", 0], "vae": ["10", 0],
                                                                     "reserve_gb": -1.0}},
        "25": _save(["24", 0], "vg_batched"),
    }


def test_workflow_uses_every_node():
    from vramguard_nodes import NODE_CLASS_MAPPINGS

    used = {n["class_type"] for n in every_node_prompt().values()}
    assert set(NODE_CLASS_MAPPINGS) <= used, sorted(set(NODE_CLASS_MAPPINGS) - used)


def _check_server(c: Comfy) -> None:
    from vramguard_nodes import NODE_CLASS_MAPPINGS

    info = c.get("/object_info")
    for key in NODE_CLASS_MAPPINGS:
        assert key in info and info[key]["category"] == "vramguard", key
    assert info["VramguardUpscaleImageTiled"]["display_name"] == "Upscale Image (tiled, auto)"
    assert any(e.endswith("/vramguard.js") for e in c.get("/extensions"))
    schema = c.get("/vramguard/settings/schema")
    assert {s["id"] for s in schema} >= {"vramguard.LowVRAM", "vramguard.ReserveGB", "vramguard.GCThreshold"}
    with pytest.raises(urllib.error.HTTPError) as e:
        c.req("/vramguard/settings", {"id": "vramguard.GCThreshold", "value": 500})
    assert e.value.code == 400 and "0..100" in json.loads(e.value.read())["error"]
    status, vals = c.req("/vramguard/settings", {"id": "vramguard.GCThreshold", "value": 65})
    assert status == 200 and vals["vramguard.GCThreshold"] == 65
    hooks = c.get("/vramguard/hooks")
    stages = {stage for _, stage in hooks["installed"]}
    assert stages >= {"text_encode", "unet", "vae_decode", "vae_encode", "controlnet", "lora_load",
                      "lora_unload", "upscale"}, hooks
    assert not hooks["missing"], hooks["missing"]


def _check_every_node_run(c: Comfy) -> None:
    from PIL import Image

    e = c.run(every_node_prompt())
    sizes, counts = {}, {}
    for out in e["outputs"].values():
        for im in out.get("images", []):
            key = im["filename"].split("_0")[0]
            sizes[key] = Image.open(c.base / "output" / im["subfolder"] / im["filename"]).size
            counts[key] = counts.get(key, 0) + 1
    assert sizes == {"vg_up": (256, 192), "vg_timeline": (400, 200), "vg_vae": (64, 48), "vg_guarded": (64, 48),
                     "vg_batched": (64, 48)}
    # the batch size the Batch Size (auto) node chose (1..max_batch 3 on this host) came through
    # the reservation and the batch-guarded decode as that many frames
    assert 1 <= counts["vg_batched"] <= 3, counts
    assert "vramguard prompt" in c.log_tail(200000)  # the per-prompt summary from the prompt hook
    assert "IMPORT FAILED" not in c.log_tail(200000)
    stats = c.get("/vramguard/hooks")["gc_stats"]
    assert stats["upscale"]["collections"] >= 1 and stats["vae_decode"]["checks"] >= 1
    assert e["fired"].get("text_encode") == 1 and e["fired"].get("unet", 0) >= 1, e["fired"]


def test_every_node_over_http(server):
    _check_server(server)
    _check_every_node_run(server)


def test_memory_guard_one_unet_check_per_sampling_run(server):
    """Memory Guard on the MODEL and the automatic unet hook: one sampling run, one check.
    Fails on 0.1.0 (2 checks): MemoryGuard's OUTER_SAMPLE wrapper calls gc_check("unet")
    (nodes/pack.py, MemoryGuard.execute) inside comfy.sample.sample, whose hook checks again
    after it returns (python/vramguard/hooks.py: the depth guard covers nested hooked calls only)."""
    e = server.run({
        "1": _tiny(41),
        "2": {"class_type": "VramguardMemoryGuard", "inputs": {"model": ["1", 0], "mode": "policy"}},
        "3": _encode(["1", 1], "one check"),
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": 4, "steps": 2, "cfg": 1.5, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": "vg_test_vae.safetensors"}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}},
        "8": _save(["7", 0], "vg_guard_once"),
    })
    _expect(e["fired"], {"text_encode": 1, "unet": 1, "vae_decode": 1})


# ----------------------------------------------------------------------------- example workflows
def _tiny_models(prompt: dict) -> dict:
    """An example workflow's API prompt on this suite's tiny models and sizes: the same graph and
    nodes, except that a checkpoint loader becomes the test pack's MODEL + CLIP and a VAELoader."""
    out, vae_of = {}, {}
    for nid, node in prompt.items():
        if node["class_type"] == "CheckpointLoaderSimple":
            out[nid] = _tiny(int(nid))
            vae_of[nid] = f"9{nid}"
            out[vae_of[nid]] = {"class_type": "VAELoader", "inputs": {"vae_name": "vg_test_vae.safetensors"}}
    for nid, node in prompt.items():
        if nid in vae_of:
            continue
        ct, inp = node["class_type"], dict(node["inputs"])
        for k, v in inp.items():
            if isinstance(v, list) and v[0] in vae_of and v[1] == 2:
                inp[k] = [vae_of[v[0]], 0]
        if ct == "UpscaleModelLoader":
            inp["model_name"] = "vg_test_x4.safetensors"
        elif ct == "EmptyLatentImage":
            inp.update(width=64, height=64)
        elif ct == "KSampler":
            inp["steps"] = 2
        elif ct == "LoadImage":
            inp["image"] = "vg_example.png"
        out[nid] = {"class_type": ct, "inputs": inp}
    return out


def test_example_workflows_run(server):
    """example_workflows/*.json: every node type exists in this ComfyUI with the pack loaded, and
    each workflow, converted to an API prompt as the frontend does, runs through the executor."""
    from PIL import Image
    from workflow_api import EXAMPLES, UI_ONLY, load, to_prompt

    info = server.get("/object_info")
    (server.base / "input").mkdir(exist_ok=True)
    Image.new("RGB", (48, 32), (200, 120, 40)).save(server.base / "input" / "vg_example.png")
    paths = sorted(EXAMPLES.glob("*.json"))
    assert len(paths) >= 4
    for path in paths:
        wf = load(path)
        missing = sorted({n["type"] for n in wf["nodes"] if n["type"] not in UI_ONLY and n["type"] not in info})
        assert not missing, f"{path.name}: node types this ComfyUI does not know: {missing}"
        prompt = _tiny_models(to_prompt(wf, info))
        entry = server.run(prompt)
        for nid, node in prompt.items():
            if node["class_type"] in ("SaveImage", "PreviewImage"):
                assert entry["outputs"].get(nid, {}).get("images"), f"{path.name}: node {nid} made no image"


# ----------------------------------------------------------------------------- install routes
def test_git_clone_route(base):
    clone = base / "custom_nodes" / "vramguard"
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.so", "__pycache__",
                                                               ".pytest_cache", "*.egg-info"))
    # what ComfyUI-Manager does: requirements.txt line by line from the pack's folder (the last
    # line builds the C core from source), then install.py
    for line in (clone / "requirements.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            r = subprocess.run([PY, "-m", "pip", "install", "-q", line], cwd=clone, capture_output=True, text=True)
            assert r.returncode == 0, f"pip install {line}: {r.stderr[-2000:]}"
    r = subprocess.run([PY, "install.py"], cwd=clone, capture_output=True, text=True)
    assert r.returncode == 0 and "installed" in r.stdout, r.stderr
    c = Comfy(base)
    try:
        _check_server(c)
        _check_every_node_run(c)
        # the templates browser lists the pack's example_workflows/ (clone route)
        listed = c.get("/workflow_templates").get("vramguard", [])
        assert sorted(listed) == sorted(p.stem for p in (REPO / "example_workflows").glob("*.json")), listed
    finally:
        c.stop()
    # settings persist across restarts: ComfyUI stores the changed value, Python re-applies it
    settings_file = base / "user" / "default" / "comfy.settings.json"
    data = json.loads(settings_file.read_text()) if settings_file.exists() else {}
    data["vramguard.GCThreshold"] = 42.0
    settings_file.write_text(json.dumps(data))
    c = Comfy(base)
    try:
        assert c.get("/vramguard/settings")["vramguard.GCThreshold"] == 42.0
        assert c.get("/vramguard/settings")["vramguard.ReserveGB"] == 1.0  # never changed: the default
        _screenshot(c)
    finally:
        c.stop()


def test_pip_route_settings_survive_restart(base):
    """The frontend's way: onChange POSTs to the pack's route, ComfyUI stores the value with
    POST /settings/{id}; after a restart the pack applies what ComfyUI stored, and a value
    ComfyUI stored that the pack rejects falls back to the default on both sides of the restart."""
    _pip_install(base)
    c = Comfy(base)
    try:
        _check_server(c)
        for key, value in (("vramguard.GCThreshold", 55.0), ("vramguard.LowVRAM", True),
                           ("vramguard.ReserveGB", 2.5)):
            status, vals = c.req("/vramguard/settings", {"id": key, "value": value})
            assert status == 200 and vals[key] == value
            status, _ = c.req(f"/settings/{key}", value)
            assert status == 200
        c.req("/settings/vramguard.MonitorWarn", 500)  # ComfyUI stores what the pack would reject
        assert c.get("/vramguard/settings")["vramguard.MonitorWarn"] == 90.0
    finally:
        c.stop()
    c = Comfy(base)
    try:
        vals = c.get("/vramguard/settings")
        assert vals["vramguard.GCThreshold"] == 55.0 and vals["vramguard.LowVRAM"] is True
        assert vals["vramguard.ReserveGB"] == 2.5
        assert vals["vramguard.MonitorWarn"] == 90.0  # the bad stored value is not applied
        assert vals["vramguard.AutoHooks"] is True    # never changed: the default
    finally:
        c.stop()
    r = subprocess.run([PY, "-m", "vramguard", "install-comfyui", str(base), "--uninstall"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "removed" in r.stdout


# ----------------------------------------------------------------------------- no server
def test_import_pack_without_server():
    """ComfyUI on sys.path, `server` importable, no PromptServer built: importing the pack
    registers nodes and does not crash.  Fails on 0.1.0 with ComfyUI >= 0.30: register_routes()
    reads PromptServer.instance, which exists only once the server is built."""
    code = f"""
import sys
sys.path.insert(0, {ROOT!r})
import comfy.cli_args
comfy.cli_args.args.cpu = True
import utils.extra_config  # as main.py does first: on 0.3.x a later import would find comfy/utils.py as `utils`
import server
assert not hasattr(server.PromptServer, "instance")
import vramguard_nodes
print(len(vramguard_nodes.NODE_CLASS_MAPPINGS))
"""
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    from vramguard_nodes import NODE_CLASS_MAPPINGS

    assert r.stdout.strip().splitlines()[-1] == str(len(NODE_CLASS_MAPPINGS))


def _screenshot(c: Comfy) -> None:
    out = os.environ.get("VRAMGUARD_SCREENSHOT_DIR")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not out or not chromium:
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = b.new_page(viewport={"width": 1400, "height": 900})
        page.goto(c.url)
        page.wait_for_function("window.app && window.app.extensionManager", timeout=60000)
        page.wait_for_timeout(2000)
        page.evaluate("window.app.extensionManager.command.execute('Comfy.ShowSettingsDialog')")
        page.wait_for_timeout(1500)
        page.get_by_text("vramguard", exact=True).first.click()
        page.wait_for_timeout(1000)
        for name in ("Low-VRAM mode", "VRAM reserve (GB)", "GC threshold (%)", "Automatic stage hooks",
                     "Monitor refresh (s)"):
            assert page.get_by_text(name, exact=True).first.is_visible(), name
        page.screenshot(path=os.path.join(out, "settings_dialog.png"))
        b.close()


def test_memory_guard_with_comfyui_patcher_api():
    """Memory Guard on a real ModelPatcher, its OUTER_SAMPLE wrapper run by ComfyUI's own executor."""
    code = f"""
import sys, json, torch
sys.path.insert(0, {ROOT!r})
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_patcher, comfy.patcher_extension as pe
import vramguard as vg
from vramguard_nodes import pack
m = comfy.model_patcher.ModelPatcher(torch.nn.Linear(4, 4), torch.device("cpu"), torch.device("cpu"))
(guarded,) = pack.MemoryGuard().execute(m, "forced")
ws = guarded.get_all_wrappers(pe.WrappersMP.OUTER_SAMPLE)
calls = []
out = pe.WrapperExecutor.new_class_executor(lambda *a, **k: calls.append("sample") or "latent", None, ws).execute()
print(json.dumps({{"n_wrappers": len(ws), "orig_wrappers": len(m.get_all_wrappers(pe.WrappersMP.OUTER_SAMPLE)),
                   "out": out, "calls": calls, "stats": vg.gc_stats().get("unet", {{}}),
                   "stages": [s["name"] for s in vg.stages()]}}))
"""
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["n_wrappers"] == 1 and d["orig_wrappers"] == 0       # the clone carries it, the input is untouched
    assert d["out"] == "latent" and d["calls"] == ["sample"]
    assert d["stats"]["collections"] == 1 and "unet" in d["stages"]
