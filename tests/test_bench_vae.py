"""bench/vae.py: the CPU path end to end at toy sizes (its one-JSON-line contract), the --device
checks, and the host<->device copy counter its CUDA store-traffic figures rest on."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="bench/vae.py needs torch")

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "vae.py"
TOY = ["--quick", "--no-comfy", "--threads", "1", "--latent", "8x8", "--grids", "1x2", "--video-latent", "3x4x4", "--video-grids", "1x2",
       "--video-models", "wan,wan22", "--repeat", "3"]


def _run(*args, timeout=400):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def toy():
    r = _run("--device", "cpu", *TOY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout, json.loads(r.stdout.strip().splitlines()[-1])


def test_json_line_keys_and_figures(toy):
    out, res = toy
    for k in ("psnr_min_db", "psnr_min_db_comfy_tiled", "video_psnr_min_db", "compute_vs_untiled_max",
              "video_decode_psnr_min_db", "video_encode_psnr_min_db", "encode_psnr_min_db", "device", "repeat",
              "wall_median_vs_untiled_max", "peak_vs_budget_max", "peak_budget_pass", "peak_budget_rows",
              "store_h2d_d2h_mib_max", "video_paths", "video_skipped", "peak_kind"):
        assert k in res, k
    assert res["device"] == "cpu" and res["repeat"] == 3 and res["comfyui"] is False
    assert res["psnr_min_db_comfy_tiled"] is None                     # --no-comfy
    # ours equals untiled to float rounding: image decode, image encode, video decode and encode
    for k in ("psnr_min_db", "encode_psnr_min_db", "video_decode_psnr_min_db", "video_encode_psnr_min_db"):
        assert res[k] > 100.0, (k, res[k])
    assert res["video_psnr_min_db"] == min(res["video_decode_psnr_min_db"], res["video_encode_psnr_min_db"])
    assert 1.0 <= res["compute_vs_untiled_max"] < 2.0
    assert res["compute_vs_untiled_max_video_encode"] >= 1.0
    assert res["wall_median_vs_untiled_max"] > 0 and res["seam_max"] < 1.01
    # the video rows went through the node's dispatch: video_program named the Wan path
    assert res["video_paths"]["ours-Wan2.1-shaped"] == "decode_video_tiled"
    assert "video encode ours-Wan2.1-shaped" in out and "the node's encode dispatch" in out
    # Wan 2.2: a row when tests/vae_models.py has a builder, else skipped with the reason printed
    sys.path.insert(0, str(ROOT / "tests"))
    import vae_models as vm
    if callable(getattr(vm, "wan22_vae", None)):
        assert "ours-Wan2.2-shaped" in res["video_paths"] or "ours-Wan2.2-shaped" in res["video_skipped"]
    else:
        why = res["video_skipped"]["ours-Wan2.2-shaped"]
        assert "no Wan 2.2" in why and f"skipped ({why})" in out
    # peak vs the budget each plan was made for: at least one row per table, every row under it
    assert res["peak_budget_rows"] >= 2 and res["peak_budget_pass"] is True
    assert 0 < res["peak_vs_budget_max"] <= 1.0
    assert "PASS" in out and "FAIL" not in out
    # on a CPU the store and the compute share memory: no transfer figures
    assert res["store_h2d_d2h_mib_max"] is None and res["peak_kind"].startswith("LiveBytes")


def test_device_cuda_without_cuda_is_a_reasoned_skip():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: --device cuda runs for real (gpu_check's vae step)")
    r = _run("--device", "cuda", *TOY, timeout=120)
    assert r.returncode == 3, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert "torch.cuda.is_available() is False" in res["skipped"]


@pytest.mark.parametrize("bad", [["--repeat", "2"], ["--device", "tpu"], ["--grids", "2by2"],
                                 ["--video-latent", "3x0x4"]])
def test_bad_arguments_are_refused(bad):
    r = _run("--device", "cpu", *TOY, *bad, timeout=120)
    assert r.returncode == 2 and "error" in r.stderr, (bad, r.stderr[-500:])


def test_transfer_counter_counts_cross_device_copies():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import vae as bench_vae
    finally:
        sys.path.pop(0)
    x = torch.ones(6, 5)
    with bench_vae.Transfers() as tr:
        a = x.to("meta")                       # _to_copy cpu -> meta: "h2d" (host -> another device)
        dst = torch.empty(6, 5, device="meta")
        dst[2:] = x[2:]                        # copy_ into a slice: 4 rows
        _ = x.clone() + 1                      # same device: not counted
        x[:1] = x[1:2]                         # same device copy_: not counted
    assert a.device.type == "meta"
    assert tr.copies == 2 and tr.h2d == (30 + 20) * 4 and tr.d2h == 0 and tr.other == 0
