"""scripts/gpu_check.sh --cpu-smoke: the GPU command runs end to end without a GPU.

It must write the report, name every GPU step as skipped with a reason, and run the CPU
smoke of each GPU bench (whose code would otherwise first run on a lent GPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
GPU_STEPS = ("tests", "snapshot", "upscale", "calibrate", "gc", "vae", "tiling")


def _run(tmp_path, *args, timeout=170):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    if not SCRIPT.exists():
        pytest.fail(f"{SCRIPT} is missing")
    pytest.importorskip("torch", reason="the benches' CPU smoke runs need torch")
    out = tmp_path_factory.mktemp("gpu_check")
    # --no-build: the extension under test is already importable (building it again costs
    # ~10 s here); the GPU run builds it.
    # budget: the vae step's CPU smoke (bench/vae.py --device cpu at toy sizes) needs ~30 s on an idle
    # box and several times that on a loaded one
    r = _run(out, "--cpu-smoke", "--no-build", "--budget", "280", "--out", str(out), timeout=320)
    return r, out


def test_cpu_smoke_writes_the_report(smoke):
    r, out = smoke
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    md = (out / "gpu_report.md").read_text()
    lines = [json.loads(ln) for ln in (out / "gpu_report.json").read_text().splitlines()]
    assert "mode **cpu-smoke**" in md and "## Machine" in md
    steps = {ln["step"]: ln for ln in lines if ln.get("kind") == "step"}
    assert lines[-1]["kind"] == "summary" and lines[-1]["done"] is True
    for name in GPU_STEPS:
        st = steps[name]
        assert st["status"] == "skipped", (name, st)
        assert st["reason"].startswith("--cpu-smoke: needs an NVIDIA GPU"), (name, st["reason"])
        # the markdown names the step, its status and the reason in the steps table
        assert f"| {name} | skipped |" in md and st["reason"] in md
        assert st["smoke"]["status"] == "ok", (name, st["smoke"])
    assert steps["facts"]["status"] == "passed"
    assert steps["build"]["status"] == "skipped" and "--no-build" in steps["build"]["reason"]


def test_cpu_smoke_ran_the_bench_code(smoke):
    _, out = smoke
    steps = {ln["step"]: ln for ln in map(json.loads, (out / "gpu_report.json").read_text().splitlines())
             if ln.get("kind") == "step"}
    up = steps["upscale"]["smoke"]["result"]["smoke"]
    # injected OOMs: the fixed-tile rival halved and restarted, ours backed off, both finished
    assert up["comfy"]["ooms"] == [1, 1, 1] and up["comfy"]["tiles_tried"] == [32, 16]
    assert all(n >= 1 for n in up["ours"]["ooms"]) and up["shape_ok"] is True
    gc_res = steps["gc"]["smoke"]["result"]["profiles"]
    pols = next(iter(gc_res.values()))["policies"]
    assert set(pols) == {"ours", "comfyui", "sdnext", "always", "never"}
    assert pols["never"]["collections"]["max"] == 0 and pols["always"]["collections"]["min"] > 0
    # the vae step ran bench/vae.py on the CPU: its JSON line is in the report, ours equal to untiled
    vae_res = steps["vae"]["smoke"]["result"]
    assert vae_res["device"] == "cpu" and vae_res["repeat"] >= 3
    for k in ("psnr_min_db", "video_decode_psnr_min_db", "video_encode_psnr_min_db"):
        assert vae_res[k] > 100.0, (k, vae_res[k])
    assert vae_res["peak_budget_pass"] is True and vae_res["peak_budget_rows"] >= 2
    assert all(vae_res["checks"].values()) and len(vae_res["checks"]) == 4
    cases = steps["tests"]["smoke"]["cases"]
    assert cases and all(c["outcome"] == "skipped" and c["message"] for c in cases)


def test_bad_step_name_is_refused(tmp_path):
    r = _run(tmp_path, "--cpu-smoke", "--only", "nope", timeout=60)
    assert r.returncode == 2 and "unknown step" in r.stderr


def test_snapshot_bench_and_sampler_on_the_fake_nvml(fake_nvml, tmp_path):
    """The NVML halves of the GPU benches (vramguard's NVML path next to a raw ctypes NVML read,
    and the NVML sampler helper) run here against tests/fakelibs/fake_nvml.c."""
    env = dict(os.environ, VRAMGUARD_NVML_LIB=str(fake_nvml), FAKE_NVML_DEVICES=f"{8 << 30}:{3 << 30}")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_snapshot.py"), "--calls", "200"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["source_before_context"] == "nvml"
    assert res["us"]["ours_nvml"]["n"] == 5 and res["us"]["ctypes_nvml_before_ctx"]["n"] == 5
    assert res["agree_before_context"] == {"free_ours_vs_ctypes_nvml_max_mib": 0.0, "total_ours_eq_ctypes_nvml": True}
    code = ("import sys, time, json; sys.path.insert(0, sys.argv[1]); from gpu_common import Helper\n"
            "s = Helper('sampler', '-', '0.002'); a = s.ask('read'); s.ask('start w'); time.sleep(0.3)\n"
            "b = s.ask('stop'); s.close(); print(json.dumps([a, b]))")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT / "bench")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    read, win = json.loads(r.stdout.strip().splitlines()[-1])
    assert read == {"total": 8 << 30, "free": 5 << 30, "used": 3 << 30}
    assert win["max_used"] == 3 << 30 and win["samples"] >= 10 and win["hz"] >= 30


_CMP = """
import sys, torch
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
import comfy.utils as cu
from gpu_upscale import comfy_tiled_scale
torch.manual_seed(0)
for H, W, tile, ov in [(100, 130, 32, 4), (64, 64, 32, 4), (50, 70, 16, 4), (33, 20, 64, 8)]:
    x = torch.rand(2, 3, H, W)
    f = lambda a: torch.nn.functional.interpolate(a, scale_factor=4, mode="bicubic") + a.mean()
    ref = cu.tiled_scale(x, f, tile_x=tile, tile_y=tile, overlap=ov, upscale_amount=4, out_channels=3)
    got = comfy_tiled_scale(torch, x, f, tile_x=tile, tile_y=tile, overlap=ov, upscale_amount=4, out_channels=3)
    assert ref.shape == got.shape and torch.equal(ref, got), (H, W, tile, ov, (ref - got).abs().max())
print("same")
"""


@pytest.mark.comfyui
def test_upscale_rival_is_comfyuis_tiled_scale():
    """bench/gpu_upscale.py's copy of ComfyUI's approach computes exactly what comfy.utils.tiled_scale
    does (same tiles, masks and division), so the GPU comparison is against ComfyUI itself."""
    root = os.environ.get("VRAMGUARD_COMFYUI")
    py = os.environ.get("VRAMGUARD_COMFYUI_PYTHON", sys.executable)
    if not root or not Path(root, "comfy", "utils.py").is_file():
        pytest.skip("VRAMGUARD_COMFYUI is not set to a ComfyUI checkout")
    r = subprocess.run([py, "-c", _CMP, str(ROOT / "bench"), root], capture_output=True, text=True, timeout=120)
    if r.returncode != 0 and "ModuleNotFoundError" in r.stderr:
        pytest.skip(f"{py} cannot import comfy.utils: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0 and r.stdout.strip() == "same", r.stderr[-2000:]


def test_gc_profile_loader_is_tolerant(tmp_path):
    """bench/gpu_gc.py reads recorded profiles in the shapes it documents, and reports a file it
    cannot use instead of stopping."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_gc
    finally:
        sys.path.pop(0)
    GiB = 1 << 30
    (tmp_path / "a.json").write_text(json.dumps({
        "name": "canon", "unit": "GiB", "card": 8, "resident": 2, "prompts": 3,
        "stages": [{"stage": "unet", "work": 1.5, "garbage": 0.25, "seconds": 4},
                   {"name": "vae_decode", "working_set_mib": 512, "dt": 1}]}))
    (tmp_path / "b.json").write_text(json.dumps([  # torch.cuda.memory_stats at each stage end, two prompts
        {"stage": "text_encode", "prompt": 0, "allocated_bytes.all.current": 2 * GiB, "allocated_bytes.all.peak": 3 * GiB},
        {"stage": "unet", "prompt": 0, "allocated_bytes.all.current": 3 * GiB, "allocated_bytes.all.peak": 5 * GiB},
        {"stage": "unet", "prompt": 1, "allocated_bytes.all.current": 2 * GiB, "allocated_bytes.all.peak": 4 * GiB,
         "garbage": 123}]))
    (tmp_path / "c.json").write_text('{"stages": [{"no_name": 1}]}')
    (tmp_path / "d.json").write_text("not json")
    profs, errors = gpu_gc.load_profiles(str(tmp_path))
    by = {p["name"]: p for p in profs}
    assert set(by) == {"canon", "b"} and len(errors) == 2
    assert any("c.json" in e and "no usable stages" in e for e in errors) and any("d.json" in e for e in errors)
    c = by["canon"]
    assert c["card"] == 8 * GiB and c["resident"] == 2 * GiB and c["repeat_prompts"] == 3
    assert c["prompts"] == [[{"stage": "unet", "work": 1.5 * GiB, "garbage": 0.25 * GiB, "live": 0.0, "seconds": 4.0},
                             {"stage": "vae_decode", "work": 512.0 * (1 << 20), "garbage": 0.0, "live": 0.0,
                              "seconds": 1.0}]]
    b = by["b"]
    assert b["resident"] == 2 * GiB and [len(p) for p in b["prompts"]] == [2, 1]
    enc, unet0 = b["prompts"][0]
    assert enc["work"] == 1 * GiB and enc["live"] == 0
    assert unet0["work"] == 2 * GiB and unet0["live"] == 1 * GiB
    unet1 = b["prompts"][1][0]
    assert unet1["work"] == 1 * GiB and unet1["live"] == -1 * GiB and unet1["garbage"] == 123
