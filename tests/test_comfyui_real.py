"""Against a real ComfyUI: both install routes, a workflow over the HTTP API, the settings.

Set VRAMGUARD_COMFYUI to a ComfyUI checkout (never committed) and run with a Python that has
ComfyUI's requirements (VRAMGUARD_COMFYUI_PYTHON, default: this one).  ComfyUI runs with
--cpu in a temporary --base-directory, so the checkout is not modified.  Optional: a headless
Chromium (Debian's `chromium`) and `playwright` take a screenshot of the settings dialog
into VRAMGUARD_SCREENSHOT_DIR.
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

if not ROOT:
    pytest.skip("VRAMGUARD_COMFYUI is not set: no ComfyUI checkout to test against", allow_module_level=True)
if not Path(ROOT, "main.py").is_file():
    pytest.skip(f"VRAMGUARD_COMFYUI={ROOT} has no main.py", allow_module_level=True)
_probe = subprocess.run([PY, "-c", "import aiohttp, spandrel, safetensors, torch, torchsde, einops, vramguard_nodes"],
                        capture_output=True, text=True)
if _probe.returncode != 0:
    pytest.skip(f"{PY} lacks ComfyUI's requirements or vramguard: {_probe.stderr.strip()[-200:]}",
                allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_models(base: Path) -> None:
    """A tiny ESRGAN (spandrel architecture, random weights) and an SD-shaped VAE."""
    code = f"""
import sys, torch
sys.path.insert(0, {ROOT!r})
from safetensors.torch import save_file
from spandrel.architectures.ESRGAN import ESRGAN
torch.manual_seed(0)
net = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4)
save_file({{k: v.contiguous() for k, v in net.state_dict().items()}}, {str(base / 'models/upscale_models/vg_test_x4.safetensors')!r})
import comfy.cli_args
comfy.cli_args.args.cpu = True   # model_management probes CUDA at import otherwise
from comfy.ldm.models.autoencoder import AutoencoderKL
dd = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
          ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
vae = AutoencoderKL(ddconfig=dd, embed_dim=4)
save_file({{k: v.half().contiguous() for k, v in vae.state_dict().items()}}, {str(base / 'models/vae/vg_test_vae.safetensors')!r})
"""
    (base / "models/upscale_models").mkdir(parents=True)
    (base / "models/vae").mkdir(parents=True)
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


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
                raise RuntimeError("ComfyUI exited:\n" + (base / "comfyui.log").read_text()[-3000:])
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        raise RuntimeError("ComfyUI did not start:\n" + (base / "comfyui.log").read_text()[-3000:])

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
        self.log.close()


WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0x3366AA}},
    "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "vg_test_x4.safetensors"}},
    "3": {"class_type": "VramguardUpscaleImageTiled",
          "inputs": {"upscale_model": ["2", 0], "image": ["1", 0], "overlap": 8, "reserve_gb": -1.0, "max_tile": 32}},
    "4": {"class_type": "VramguardMemorySnapshot", "inputs": {"device": 0, "passthrough": ["3", 0]}},
    "5": {"class_type": "VramguardGCCheckpoint", "inputs": {"value": ["3", 0], "mode": "forced", "stage": "upscale"}},
    "6": {"class_type": "VramguardSetReserve", "inputs": {"reserve_gb": 0.5, "cap_gb": 0.0, "device": -1,
                                                          "passthrough": ["5", 0]}},
    "7": {"class_type": "VramguardMemoryTimeline", "inputs": {"width": 400, "height": 200, "reset": False,
                                                              "passthrough": ["6", 0]}},
    "8": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "vg_up"}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "vg_timeline"}},
    "10": {"class_type": "VAELoader", "inputs": {"vae_name": "vg_test_vae.safetensors"}},
    "11": {"class_type": "VramguardVAEEncodeTiled", "inputs": {"pixels": ["1", 0], "vae": ["10", 0], "overlap": 16,
                                                               "reserve_gb": -1.0}},
    "12": {"class_type": "VramguardVAEDecodeTiled", "inputs": {"samples": ["11", 0], "vae": ["10", 0], "overlap": 2,
                                                               "reserve_gb": -1.0}},
    "13": {"class_type": "VramguardUnloadModels", "inputs": {"value": ["12", 0]}},
    "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "vg_vae"}},
}


def _run_workflow(c: Comfy) -> dict:
    status, body = c.req("/prompt", {"prompt": WORKFLOW, "client_id": "vramguard-test"})
    assert status == 200, body
    pid = body["prompt_id"]
    deadline = time.time() + 300
    while time.time() < deadline:
        h = c.get(f"/history/{pid}")
        if pid in h and h[pid].get("status", {}).get("completed") is not None:
            return h[pid]
        time.sleep(1)
    raise AssertionError("workflow did not finish:\n" + (c.base / "comfyui.log").read_text()[-3000:])


def _check_server(c: Comfy) -> None:
    info = c.get("/object_info")
    for key in ("VramguardMemorySnapshot", "VramguardUpscaleImageTiled", "VramguardVAEDecodeTiled",
                "VramguardVAEEncodeTiled", "VramguardMemoryGuard", "VramguardMemoryTimeline",
                "VramguardGCCheckpoint", "VramguardUnloadModels", "VramguardSetReserve"):
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


def _check_outputs(c: Comfy, hist: dict) -> None:
    from PIL import Image

    assert hist["status"]["status_str"] == "success", hist["status"]
    sizes = {}
    for node, out in hist["outputs"].items():
        for im in out.get("images", []):
            sizes[im["filename"].split("_0")[0]] = Image.open(c.base / "output" / im["subfolder"] / im["filename"]).size
    assert sizes["vg_up"] == (256, 192)
    assert sizes["vg_timeline"] == (400, 200)
    assert sizes["vg_vae"] == (64, 48)
    log = (c.base / "comfyui.log").read_text()
    assert "IMPORT FAILED" not in log.split("vramguard")[0][-200:] if "vramguard" in log else True
    assert "vramguard prompt" in log  # the per-prompt summary from the prompt hook
    stats = c.get("/vramguard/hooks")["gc_stats"]
    assert stats["upscale"]["collections"] >= 1 and stats["vae_decode"]["checks"] >= 1
    assert "lora_unload" not in stats  # offloads without LoRA patches are not LoRA unloads


@pytest.fixture
def base(tmp_path):
    b = tmp_path / "comfy_base"
    (b / "custom_nodes").mkdir(parents=True)
    (b / "user" / "default").mkdir(parents=True)
    _make_models(b)
    return b


def _serve_and_check(base: Path) -> None:
    c = Comfy(base)
    try:
        _check_server(c)
        _check_outputs(c, _run_workflow(c))
    finally:
        c.stop()


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
    _serve_and_check(base)
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


def test_pip_route(base):
    r = subprocess.run([PY, "-m", "vramguard", "install-comfyui", str(base)], capture_output=True, text=True)
    assert r.returncode == 0 and "installed" in r.stdout, r.stderr
    _serve_and_check(base)
    r = subprocess.run([PY, "-m", "vramguard", "install-comfyui", str(base), "--uninstall"], capture_output=True, text=True)
    assert r.returncode == 0 and "removed" in r.stdout


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
