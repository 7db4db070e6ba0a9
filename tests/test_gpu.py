"""Real-GPU checks: run wherever NVML sees a device; skipped with the reason elsewhere."""
import json

import pytest

import vramguard as vg
from vramguard import _native

from conftest import real_gpu_reason, run_py

pytestmark = pytest.mark.gpu

_why = real_gpu_reason()
needs_gpu = pytest.mark.skipif(_why is not None, reason=f"needs an NVIDIA GPU: {_why}")


@pytest.fixture
def torch_cuda():
    """torch with CUDA up and the device mapping refreshed, or a skip saying why not."""
    torch = pytest.importorskip("torch", reason="torch not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    torch.zeros(1, device="cuda")
    _native.refresh_devices()
    return torch


@needs_gpu
def test_nvml_snapshot_is_consistent():
    s = vg.snapshot(0)
    assert s.source in ("nvml", "cuda+nvml")
    assert s.total > 0 and 0 <= s.free <= s.total
    assert abs(s.total - s.free - s.used) <= 64 << 20
    assert s.uuid.startswith(("GPU-", "MIG-"))


@needs_gpu
def test_import_and_snapshot_create_no_cuda_context():
    # A fresh process that only uses vramguard must not appear in NVML's process list.
    r = run_py("""
        import os, json, time, vramguard as vg
        s = vg.snapshot(0)
        _ = vg.Sampler(0, interval=0.01); _.start(); time.sleep(0.1); _.stop()
        print(json.dumps({"cuda_initialized": vg.gpu_status()["cuda_initialized"],
                          "process_used": vg.snapshot(0).process_used}))
    """, env={})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["cuda_initialized"] is False
    assert out["process_used"] in (None, 0)


@needs_gpu
def test_driver_path_matches_torch(torch_cuda):
    torch = torch_cuda
    s = vg.snapshot(0)
    free, total = torch.cuda.mem_get_info(0)
    assert s.source == "cuda+nvml"
    assert s.total == total
    assert abs(s.free - free) <= 256 << 20
    x = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")
    s2 = vg.snapshot(0)
    assert s2.used - s.used >= 500 << 20
    assert s2.framework_allocated is not None and s2.framework_allocated >= 512 << 20  # torch probe
    del x
    torch.cuda.empty_cache()


@needs_gpu
def test_sampler_sees_an_allocation_peak(torch_cuda):
    torch = torch_cuda
    s = vg.Sampler(0, interval=0.002)
    s.start()
    g = s.begin("alloc")
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    base = s.sample()[1]
    del x
    torch.cuda.empty_cache()
    r = s.end(g)
    s.stop()
    assert r["peak_used"] >= base >= r["start_used"] + (900 << 20)
    assert r["end_used"] < r["peak_used"]


@needs_gpu
def test_calibrated_tiling_keeps_the_measured_peak_in_the_budget(torch_cuda):
    # The planner's promise on a real device: with the cost model vramguard.calibrate measured,
    # the tiles it picks for a budget allocate no more than that budget (torch's own peak).
    torch = torch_cuda
    from vramguard.demo import make_net

    net = make_net("cuda", channels=32, blocks=4)
    img = torch.rand(1, 512, 512, 3, device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def fn(t):
        with torch.no_grad():
            return net(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    cost = vg.calibrate(fn, img)
    assert cost.source == "measured" and cost.per_px > 0
    budget = 192 << 20
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    st: dict = {}
    out = vg.tiled(fn, img, scale=4, overlap=16, cost=cost, budget=budget, stats=st)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert st["retries"] == 0 and st["tiles"] > 1, st      # the budget forced tiling, no OOM back-off
    assert peak <= budget, f"measured {peak >> 20} MiB > budget {budget >> 20} MiB; tile {st['tile_sizes']}"
    assert tuple(out.shape) == (1, 2048, 2048, 3) and bool(torch.isfinite(out).all())
    torch.cuda.empty_cache()
