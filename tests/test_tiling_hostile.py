"""tiled()/tiled_many() under hostile conditions: an OOM near the floor, finished tiles kept,
and bad arguments answered with TypeError/ValueError naming the argument (never an error
from NumPy/torch internals, never after the work was done)."""
import numpy as np
import pytest

from vramguard import tiling

RNG = np.random.default_rng(7)


def up2(t):
    """Nearest-neighbour x2 (NHWC): local, so any tiling gives exactly the untiled result."""
    return np.repeat(np.repeat(t, 2, axis=1), 2, axis=2)


class OOMOnce:
    """fn that raises MemoryError on chosen calls (1-based) and records tile sizes."""

    def __init__(self, fn, fail_on=(1,)):
        self.fn, self.fail_on, self.calls, self.sizes = fn, set(fail_on), 0, []

    def __call__(self, t):
        self.calls += 1
        self.sizes.append((t.shape[2], t.shape[1]))
        if self.calls in self.fail_on:
            raise MemoryError(f"simulated OOM on call {self.calls}")
        return self.fn(t)


def test_one_oom_below_twice_the_floor_tries_the_floor():
    """Tile 100 px, floor 64: halving gives 50 < 64; the floor itself must be tried first."""
    img = RNG.random((1, 100, 100, 3), dtype=np.float32)
    fn = OOMOnce(up2)
    st = {}
    out = tiling.tiled(fn, img, scale=2, overlap=8, min_tile=64, tile=100, stats=st)
    np.testing.assert_allclose(out, up2(img), rtol=0, atol=1e-6)  # feather weights: float rounding
    assert st["retries"] == 1 and fn.sizes[0] == (100, 100)
    # the floor (64), not 100 // 2 = 50 < floor and a TilingError; the even grid then covers
    # 100 px with two 54-px tiles
    assert st["tile_sizes"] == [[100, 100], [64, 100]]
    assert fn.sizes[1:] == [(54, 100), (54, 100)]


def test_oom_after_finished_tiles_keeps_them():
    """Tiles done before an OOM are kept (not recomputed) and the result is exact."""
    img = RNG.random((1, 256, 256, 3), dtype=np.float32)
    fn = OOMOnce(up2, fail_on=(3,))
    st = {}
    out = tiling.tiled(fn, img, scale=2, overlap=8, min_tile=32, tile=128, stats=st)
    np.testing.assert_allclose(out, up2(img), rtol=0, atol=1e-6)  # feather weights: float rounding
    assert st["retries"] == 1
    assert fn.sizes[:2] == [fn.sizes[0]] * 2 and all(max(s) <= max(fn.sizes[0]) for s in fn.sizes)
    # the two finished tiles were not run again at their size and place: fewer successful
    # calls than a restart from scratch at the smaller size would need
    assert st["tiles"] == fn.calls - 1


def test_oom_at_the_floor_gives_up_with_what_was_done():
    img = RNG.random((1, 100, 100, 3), dtype=np.float32)
    fn = OOMOnce(up2, fail_on=set(range(1, 100)))
    st = {}
    with pytest.raises(tiling.TilingError, match="smallest tile") as ei:
        tiling.tiled(fn, img, scale=2, overlap=8, min_tile=64, tile=100, stats=st)
    sizes = st["tile_sizes"]
    assert sizes[1] == [64, 100] and max(sizes[-1]) <= 64   # the floor was tried on both sides
    assert "0 tiles finished" in str(ei.value)
    assert st["retries"] == len(sizes) and ei.value.stats["retries"] == st["retries"]  # stats filled on failure too


@pytest.mark.parametrize("kw,exc,needle", [
    ({"progress": 5}, TypeError, "progress"),
    ({"cancel": "yes"}, TypeError, "cancel"),
    ({"max_batch": "2"}, TypeError, "max_batch"),
    ({"max_batch": -1}, ValueError, "max_batch"),
    ({"max_batch": 0}, ValueError, "max_batch"),
    ({"stats": []}, TypeError, "stats"),
    ({"model_key": [1]}, TypeError, "model_key"),
    ({"cost": "x"}, TypeError, "cost"),
])
def test_bad_arguments_fail_before_any_work(kw, exc, needle):
    img = RNG.random((1, 40, 40, 3), dtype=np.float32)
    calls = []
    with pytest.raises(exc, match=needle):
        tiling.tiled(lambda t: calls.append(1) or t, img, budget="1GB", **kw)
    assert calls == []  # rejected before fn ran


@pytest.mark.parametrize("images,exc,needle", [
    (5, TypeError, "images"), ("abc", TypeError, "images"), ([None], TypeError, r"images\[0\]"),
    ([[1.0, 2.0]], TypeError, r"images\[0\]"), ([np.zeros((4, 4, 3), np.float32), "x"], TypeError, r"images\[1\]"),
    ([np.zeros((10, 10), np.float32)], ValueError, "3-D or 4-D"),
])
def test_tiled_many_names_the_bad_image(images, exc, needle):
    with pytest.raises(exc, match=needle):
        tiling.tiled_many(lambda t: t, images, budget="1GB")


def test_tiled_many_accepts_any_iterable():
    imgs = [RNG.random((1, 20 + 4 * i, 24, 3), dtype=np.float32) for i in range(3)]
    out = tiling.tiled_many(up2, (x for x in imgs), scale=2, budget="1GB")
    for a, b in zip(out, imgs):
        np.testing.assert_allclose(a, up2(b), rtol=0, atol=1e-6)


def test_torch_results_that_are_not_float_are_named():
    torch = pytest.importorskip("torch", reason="torch results")
    img = torch.rand(1, 40, 40, 3)
    for bad in (lambda t: t.int(), lambda t: t.to(torch.complex64), lambda t: t > 0.5,
                lambda t: torch.empty(t.shape, device="meta")):
        with pytest.raises(TypeError, match="fn returned"):
            tiling.tiled(bad, img, budget="1GB")
    out = tiling.tiled(lambda t: t.double(), img, budget="1GB")  # float64 is converted
    assert torch.equal(out, img)


@pytest.mark.parametrize("sample,exc,needle", [
    (np.zeros((10, 10), np.float32), ValueError, "3-D or 4-D"),   # was IndexError: tuple index out of range
    (np.zeros((10,), np.float32), ValueError, "3-D or 4-D"),
    ([[1.0]], TypeError, "numpy.ndarray or torch.Tensor"),
])
def test_calibrate_names_a_bad_sample(sample, exc, needle):
    with pytest.raises(exc, match=needle):
        tiling.calibrate(lambda t: t, sample)


def test_calibrate_3d_sample_without_cuda():
    c = tiling.calibrate(lambda t: t, np.zeros((16, 16, 4), np.float32))
    assert c.source.startswith("default") and c.per_px > 0


def test_explicit_tile_still_checks_budget_and_batches_from_it():
    """Found by the 1M-call fuzz run: with tile= given, budget/card/reserve were never read (a
    budget of '-1GB' passed) and every image of a batch was its own call (75 s for 2**20 1-px
    images)."""
    from numpy.lib.stride_tricks import as_strided

    img = as_strided(np.zeros(1, np.float32), shape=(1 << 20, 3, 1, 1), strides=(0, 0, 0, 0))
    with pytest.raises(ValueError, match="budget"):
        tiling.tiled(lambda t: t, img, tile=74, budget="-1GB")
    with pytest.raises(tiling.TilingError, match="budget is"):  # not even one image fits: say so
        tiling.tiled(lambda t: t, img, tile=175, budget=1)
    calls = []
    out = tiling.tiled(lambda t: calls.append(t.shape[0]) or t, img, tile=74, budget="1GB")
    assert out.shape == img.shape and len(calls) < 64 and sum(calls) == 1 << 20
