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
