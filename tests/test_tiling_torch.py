"""The tiler on torch tensors: conv nets, torch OOM errors, bfloat16 results."""
import pytest

import vramguard as vg

torch = pytest.importorskip("torch", reason="torch (CPU build) not installed")

def test_torch_conv_net_tiled_matches_untiled():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 3, 3, padding=1))
    x = torch.rand(2, 70, 90, 3)
    fn = lambda t: net(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    with torch.no_grad():
        ref = fn(x)
        out = vg.tiled(fn, x, overlap=8, tile=32, min_tile=16)
    assert isinstance(out, torch.Tensor) and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_torch_oom_error_type_is_recognised():
    x = torch.rand(1, 64, 64, 3)
    state = {"n": 0}

    def fn(t):
        state["n"] += 1
        if state["n"] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return t.clone()

    st = {}
    out = vg.tiled(fn, x, overlap=8, tile=40, min_tile=16, stats=st)
    torch.testing.assert_close(out, x)
    assert st["retries"] == 1 and "OutOfMemoryError" in st["ooms"][0]


def test_bfloat16_results_are_converted():
    x = torch.rand(1, 32, 32, 3)
    out = vg.tiled(lambda t: t.to(torch.bfloat16), x, overlap=4, tile=16, min_tile=8)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x, atol=1e-2, rtol=0)


class _CudaLike:
    """A CPU tensor that says it is on CUDA, so calibrate() measures (with torch.cuda faked)."""

    def __init__(self, t):
        self.t = t
        self.device = type("Dev", (), {"type": "cuda"})()

    def __getitem__(self, k):
        return _CudaLike(self.t[k])

    def contiguous(self):
        return self

    @property
    def shape(self):
        return self.t.shape

    @property
    def dtype(self):
        return self.t.dtype

    def element_size(self):
        return self.t.element_size()


def test_calibration_cache_follows_the_model_object(monkeypatch):
    """Keyed by the model object (weakly), not id(model): a dead model's entry goes away, so a
    new model that reuses the id is calibrated afresh; plain keys are pruned."""
    import gc
    import weakref

    from vramguard import tiling

    peak = {"v": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: peak["v"])

    def fn(x):
        peak["v"] = 1000 + 10 * x.shape[1] * x.shape[2]
        return x

    sample = _CudaLike(torch.rand(1, 128, 128, 3))
    model = torch.nn.Conv2d(3, 3, 1)
    ref = weakref.ref(model)
    c = vg.calibrate(fn, sample, key=(model, "cuda:0"))
    assert c.source == "measured" and abs(c.per_px - 11.5) < 1e-6
    assert vg.cost_model((model, "cuda:0")) is c and vg.cost_model((model, "cuda:1")) is None
    n = len(tiling._costs)
    del model
    gc.collect()
    assert ref() is None, "the cost cache must not keep the model alive"
    assert len(tiling._costs) == n - 1
    other = torch.nn.Conv2d(3, 3, 1)
    assert vg.cost_model((other, "cuda:0")) is None
    for i in range(tiling._costs.limit + 10):
        tiling._costs.put(("plain", i), c)
    assert vg.cost_model(("plain", 0)) is None and vg.cost_model(("plain", tiling._costs.limit + 9)) is c
    tiling._costs.clear()
