"""The tiler: plan properties, stitching against a float64 reference, OOM back-off, cancel."""
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as hs

import vramguard as vg
from vramguard import _native

GiB = 1 << 30
rng = np.random.default_rng(1234)


# ------------------------------------------------------------------ plan properties
def _plan(w, h, budget, per_px=1000.0, fixed=1e6, overlap=8, align=1, batch=1):
    return _native.plan(w, h, overlap=overlap, align=align, fixed_bytes=fixed, per_px_bytes=per_px,
                        budget=budget, batch=batch)


@settings(max_examples=200, deadline=None)
@given(w=hs.integers(1, 3000), h=hs.integers(1, 3000), budget=hs.integers(2_000_000, 10**10),
       per_px=hs.floats(10, 5e4), overlap=hs.sampled_from([0, 8, 16, 32]))
def test_plan_fits_budget_and_covers_image(w, h, budget, per_px, overlap):
    p = _plan(w, h, budget, per_px=per_px, overlap=overlap)
    if not p["fits"]:
        assert "no tile fits" in p["why"]
        return
    tw, th = p["tile"]
    assert p["predicted_peak_bytes"] <= budget
    assert 1e6 + per_px * tw * th <= budget
    for pos, t, n in ((p["xs"], tw, w), (p["ys"], th, h)):
        assert pos[0] == 0 and pos[-1] + t == n                    # covers, no sliver past the edge
        for a, b in zip(pos, pos[1:]):
            assert a + t - b >= overlap                              # overlaps at least `overlap`
        for a, b, c in zip(pos, pos[1:], pos[2:]):                   # feather bands disjoint
            assert a + t - (a + t - b) / 4 <= c + (b + t - c) / 4
    # never more tiles than the best square tiling that fits
    side = int(((budget - 1e6) / per_px) ** 0.5)
    if side > 2 * overlap:
        sq = lambda n: 1 if n <= side else -(-(n - overlap) // (side - overlap))
        assert p["tiles"] <= sq(w) * sq(h)
    if 1e6 + per_px * w * h <= budget:
        assert p["tiles"] == 1


@settings(max_examples=100, deadline=None)
@given(w=hs.integers(64, 4000), h=hs.integers(64, 4000), b1=hs.integers(5 * 10**7, 5 * 10**9),
       factor=hs.floats(1.0, 4.0))
def test_plan_monotone_in_budget(w, h, b1, factor):
    p1, p2 = _plan(w, h, b1), _plan(w, h, int(b1 * factor))
    if p1["fits"]:
        assert p2["fits"] and p2["tiles"] <= p1["tiles"]


@settings(max_examples=100, deadline=None)
@given(wm=hs.integers(1, 300), hm=hs.integers(1, 300), align=hs.sampled_from([2, 8, 16]),
       budget=hs.integers(10**7, 10**9))
def test_plan_respects_alignment(wm, hm, align, budget):
    w, h = wm * align, hm * align
    p = _plan(w, h, budget, overlap=align * 2, align=align)
    if p["fits"]:
        assert all(x % align == 0 for x in p["xs"] + p["ys"])
        assert all(t % align == 0 or t == n for t, n in zip(p["tile"], (w, h)))


def test_plan_batch_and_card_cli_numbers():
    p = vg.plan_tiles(1024, 1024, scale=4, card="8GB", reserve="1.5GB", batch=4,
                      cost=vg.CostModel(64 << 20, 1000.0))
    assert p.fits and p.tiles == 1 and p.batch == 4
    assert p.predicted_peak_bytes <= p.budget_bytes == int(6.5 * GiB)
    small = vg.plan_tiles(1024, 1024, scale=4, card="8GB", reserve="1.5GB", batch=4,
                          cost=vg.CostModel(64 << 20, 20000.0))
    assert small.batch < 4 or small.tiles > 1


@pytest.mark.parametrize("kw,exc", [({"width": 0}, ValueError), ({"width": -5}, ValueError),
                                     ({"width": 2**40}, ValueError), ({"overlap": -1}, ValueError),
                                     ({"scale": float("nan")}, ValueError), ({"scale": 0}, ValueError),
                                     ({"scale": "4"}, TypeError), ({"align": 0}, ValueError),
                                     ({"width": 1.5}, TypeError), ({"reserve": "-1GB", "card": "8GB"}, ValueError),
                                     ({"card": "lots"}, ValueError)])
def test_plan_bad_input(kw, exc):
    args = {"width": 512, "height": 512, "budget": GiB}
    args.update(kw)
    if "card" in kw:
        args.pop("budget")
    w, h = args.pop("width"), args.pop("height")
    with pytest.raises(exc):
        vg.plan_tiles(w, h, **args)


def test_native_plan_rejects_misalignment_and_overflow():
    with pytest.raises(ValueError, match="multiple of align"):
        _native.plan(100, 100, align=8, budget=GiB)
    with pytest.raises(ValueError):
        _native.plan(2**63, 10, budget=GiB)
    with pytest.raises(TypeError, match="budget"):
        _native.plan(100, 100)
    with pytest.raises(ValueError):
        _native.plan(100, 100, budget=float("inf"))


# ------------------------------------------------------------------ stitching vs a float64 reference
def box_blur(x, r, layout="nhwc"):
    """Zero-padded (2r+1)^2 box blur in float64: an operator with receptive radius r."""
    a = x.astype(np.float64)
    if layout == "nchw":
        a = a.transpose(0, 2, 3, 1)
    p = np.pad(a, ((0, 0), (r, r), (r, r), (0, 0)))
    out = np.zeros_like(a)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out += p[:, dy:dy + a.shape[1], dx:dx + a.shape[2]]
    out /= (2 * r + 1) ** 2
    if layout == "nchw":
        out = out.transpose(0, 3, 1, 2)
    return out


def up2(x, layout="nhwc"):
    ax = (1, 2) if layout == "nhwc" else (2, 3)
    return np.repeat(np.repeat(x, 2, axis=ax[0]), 2, axis=ax[1])


@pytest.mark.parametrize("shape", [(1, 37, 53, 3), (2, 64, 64, 4), (1, 1, 1, 3), (1, 1, 200, 3),
                                   (3, 129, 7, 1), (1, 300, 301, 3)])
@pytest.mark.parametrize("tile", [16, 40, 1000])
def test_identity_and_blur_match_reference(shape, tile):
    x = rng.random(shape, dtype=np.float32)
    out = vg.tiled(lambda t: t.copy(), x, overlap=8, tile=tile, min_tile=16)
    np.testing.assert_allclose(out, x, atol=1e-6)
    # radius 2 <= (1 - feather) * overlap / 2 = 2: exact
    blur = lambda t: box_blur(t, 2).astype(np.float32)
    out = vg.tiled(blur, x, overlap=8, tile=tile, min_tile=16)
    np.testing.assert_allclose(out, box_blur(x, 2), atol=1e-5)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_upscale_with_receptive_field_matches_reference(layout):
    shape = (2, 90, 77, 3) if layout == "nhwc" else (2, 3, 90, 77)
    x = rng.random(shape, dtype=np.float32)
    fn = lambda t: up2(box_blur(t, 3, layout), layout).astype(np.float32)
    out = vg.tiled(fn, x, scale=2, overlap=16, tile=32, layout=layout, min_tile=32, feather=0.25)
    np.testing.assert_allclose(out, up2(box_blur(x, 3, layout), layout), atol=1e-5)


def test_non_contiguous_and_3d_inputs():
    base = rng.random((2, 80, 160, 3), dtype=np.float32)
    x = base[:, :, ::2, :]                     # non-contiguous view
    assert not x.flags.c_contiguous
    out = vg.tiled(lambda t: t * 2, x, overlap=8, tile=24, min_tile=16)
    np.testing.assert_allclose(out, x * 2, atol=1e-6)
    one = vg.tiled(lambda t: t[:, :, :, :1], base[0], overlap=8, tile=24, min_tile=16)  # 3-D, channels 3 -> 1
    assert one.shape == (80, 160, 1)
    np.testing.assert_allclose(one, base[0][:, :, :1], atol=1e-6)


def test_float16_and_downscale_with_alignment():
    x = rng.random((1, 64, 96, 4), dtype=np.float32).astype(np.float16)
    out = vg.tiled(lambda t: t.copy(), x, overlap=8, tile=24, min_tile=16)
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float32), x.astype(np.float32), atol=2e-3)
    # /8 "encode": 8x8 mean pooling, aligned to 8 px
    pool = lambda t: t.reshape(t.shape[0], t.shape[1] // 8, 8, t.shape[2] // 8, 8, t.shape[3]).mean(axis=(2, 4))
    y = rng.random((1, 128, 192, 3), dtype=np.float32)
    out = vg.tiled(pool, y, scale=1 / 8, overlap=16, align=8, tile=48, min_tile=40, feather=0.0)
    np.testing.assert_allclose(out, pool(y), atol=1e-6)


# ------------------------------------------------------------------ OOM back-off and cancel
def _reference(x):
    return box_blur(x, 1)


@pytest.mark.parametrize("fail_at", range(0, 12))
def test_oom_injected_at_every_tile_keeps_work(fail_at):
    x = rng.random((1, 96, 112, 3), dtype=np.float32)
    calls = {"n": 0, "failed": False}
    sizes = []

    def fn(t):
        calls["n"] += 1
        if calls["n"] - 1 == fail_at and not calls["failed"]:
            calls["failed"] = True
            raise MemoryError("injected OOM")
        sizes.append(t.shape[1:3])
        return box_blur(t, 1).astype(np.float32)

    plain = {}
    vg.tiled(lambda t: box_blur(t, 1).astype(np.float32), x, overlap=8, tile=48, min_tile=16, stats=plain)
    st = {}
    out = vg.tiled(fn, x, overlap=8, tile=48, min_tile=16, stats=st)
    np.testing.assert_allclose(out, _reference(x), atol=1e-5)
    if fail_at >= plain["tiles"]:                  # the run ended before that index
        assert st["retries"] == 0 and st["tiles"] == plain["tiles"]
        return
    assert st["retries"] == 1 and len(st["tile_sizes"]) == 2
    assert st["tiles"] > plain["tiles"] - 1        # finished tiles kept; the rest re-planned smaller
    assert calls["n"] == st["tiles"] + 1           # no finished tile was computed twice
    assert all(s == sizes[0] for s in sizes[:fail_at])


def test_oom_with_batch_splits_then_shrinks():
    x = rng.random((4, 64, 64, 3), dtype=np.float32)
    seen = []

    def fn(t):
        seen.append(t.shape[0])
        if t.shape[0] > 1 or (t.shape[1] > 32 and len(seen) < 8):
            raise MemoryError("too big")
        return t.copy()

    st = {}
    out = vg.tiled(fn, x, overlap=8, tile=64, min_tile=16, max_batch=4, stats=st)
    np.testing.assert_allclose(out, x, atol=1e-6)
    assert seen[0] == 4 and 1 in seen and st["retries"] >= 3


def test_oom_gives_up_below_minimum_with_history():
    x = rng.random((1, 64, 64, 3), dtype=np.float32)

    def fn(t):
        raise MemoryError("never fits")

    with pytest.raises(vg.TilingError, match=r"smallest tile: tried \[\[64, 64\], \[32, 64\]"):
        vg.tiled(fn, x, overlap=8, tile=64, min_tile=32)


def test_non_oom_errors_propagate_untouched():
    x = rng.random((1, 32, 32, 3), dtype=np.float32)

    def fn(t):
        raise KeyError("user bug")

    with pytest.raises(KeyError, match="user bug"):
        vg.tiled(fn, x, overlap=4, tile=16, min_tile=8)


def test_cancel_and_progress_between_tiles():
    x = rng.random((1, 64, 64, 3), dtype=np.float32)
    progress, calls = [], {"n": 0}

    def fn(t):
        calls["n"] += 1
        return t.copy()

    with pytest.raises(vg.Cancelled, match="after 3"):
        vg.tiled(fn, x, overlap=8, tile=24, min_tile=16, progress=lambda d, t: progress.append((d, t)),
                 cancel=lambda: len(progress) >= 3)
    assert calls["n"] == 3 and progress[-1][0] == 3 and progress[-1][1] > 3

    class Interrupted(Exception):
        pass

    def pbar(d, t):  # ComfyUI raises its interrupt from the progress bar
        if d == 2:
            raise Interrupted()

    with pytest.raises(Interrupted):
        vg.tiled(fn, x, overlap=8, tile=24, min_tile=16, progress=pbar)


@pytest.mark.parametrize("kw,exc,match", [
    ({"overlap": -1}, ValueError, "overlap"), ({"scale": float("inf")}, ValueError, "scale"),
    ({"tile": 10}, ValueError, "too small"), ({"layout": "hwc"}, ValueError, "layout"),
    ({"feather": 2}, ValueError, "feather"), ({"scale": 3.3}, ValueError, "whole number"),
])
def test_tiled_bad_arguments(kw, exc, match):
    x = rng.random((1, 33, 40, 3), dtype=np.float32)
    args = {"overlap": 8, "min_tile": 16}
    args.update(kw)
    with pytest.raises(exc, match=match):
        vg.tiled(lambda t: t, x, **args)


def test_out_buffer_is_written_in_place_and_checked():
    x = rng.random((1, 40, 40, 3), dtype=np.float32)
    buf = np.full((1, 80, 80, 3), -7, np.float32)
    res = vg.tiled(lambda t: up2(t), x, scale=2, overlap=8, tile=24, min_tile=16, out=buf)
    assert res is buf
    np.testing.assert_allclose(buf, up2(x), atol=1e-6)
    with pytest.raises(ValueError, match="out must be"):
        vg.tiled(lambda t: up2(t), x, scale=2, overlap=8, tile=24, min_tile=16, out=np.empty((1, 80, 81, 3), np.float32))


def test_output_larger_than_host_memory_is_refused_up_front():
    calls = []
    with pytest.raises(ValueError, match="host memory"):
        vg.tiled(lambda t: calls.append(1) or t, np.zeros((1, 1000, 1000, 3), np.float32), scale=64)
    assert calls == []


@pytest.mark.parametrize("bad,exc", [(np.zeros((1, 0, 5, 3), np.float32), ValueError),
                                     (np.zeros((1, 8, 8, 3), np.int32), TypeError),
                                     (np.zeros((8, 8), np.float32), ValueError),
                                     ([[1.0]], TypeError)])
def test_tiled_bad_images(bad, exc):
    with pytest.raises(exc):
        vg.tiled(lambda t: t, bad, overlap=0, tile=8, min_tile=8)


def test_wrong_result_shape_is_an_error_and_no_output():
    x = rng.random((1, 40, 40, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="expected scale 2"):
        vg.tiled(lambda t: t, x, scale=2, overlap=8, tile=24, min_tile=16)
    with pytest.raises(TypeError, match="must return"):
        vg.tiled(lambda t: "image", x, overlap=8, tile=24, min_tile=16)


def test_canvas_refuses_incomplete_output_and_bad_arrays():
    out = np.empty((1, 10, 10, 3), np.float32)
    cv = _native.Canvas(out)
    cv.put(np.ones((1, 10, 6, 3), np.float32), 0, 0, 0, (), ())
    with pytest.raises(RuntimeError, match="incomplete"):
        cv.finish()
    with pytest.raises(ValueError, match="does not fit"):
        cv.put(np.ones((1, 10, 6, 3), np.float32), 0, 6, 0, (), ())
    with pytest.raises(ValueError, match="does not fit"):
        cv.put(np.ones((1, 4, 4, 2), np.float32), 0, 0, 0, (), ())
    with pytest.raises(TypeError):
        cv.put(np.ones((1, 4, 4, 3), np.float64), 0, 0, 0, (), ())
    with pytest.raises(TypeError):
        cv.put(np.ones((1, 4, 4, 3), np.float32), 0, 0, 0, [(1, 2)], ())
    with pytest.raises(ValueError, match="non-finite"):
        cv.put(np.ones((1, 4, 4, 3), np.float32), 0, 0, 0, [(float("nan"), 2, True)], ())
    cv.put(np.ones((1, 10, 4, 3), np.float32), 0, 6, 0, (), ())
    assert cv.finish() is out
    with pytest.raises(RuntimeError, match="closed"):
        cv.finish()
    with pytest.raises(ValueError):
        _native.Canvas(np.empty((10, 10, 3), np.float32))
    with pytest.raises(TypeError):
        _native.Canvas(np.empty((1, 10, 10, 3), np.float64))
    with pytest.raises(ValueError):
        _native.Canvas(np.empty((1, 10, 10, 3), np.float32)[:, ::2])
    with pytest.raises(ValueError):
        _native.Canvas(np.empty((1, 10, 10, 3), np.float32), "hwc")


def test_weights_are_a_partition_of_unity():
    ramps_l = [(10.0, 30.0, False)]
    ramps_r = [(10.0, 30.0, True)]
    a = _native.Canvas.weights(0, 40, ramps_l)
    b = _native.Canvas.weights(0, 40, ramps_r)
    np.testing.assert_allclose(a + b, 1.0, atol=1e-12)
    assert a[0] == 1 and a[-1] == 0 and np.all(np.diff(a) <= 0)


def test_canvas_thread_hammer():
    out = np.empty((1, 256, 256, 3), np.float32)
    cv = _native.Canvas(out, threads=2)
    tile = np.ones((1, 256, 256, 3), np.float32)
    errors = []

    def worker():
        for _ in range(30):
            try:
                cv.put(tile, 0, 0, 0, (), ())   # serialised by the canvas's lock, never refused
            except Exception as e:  # pragma: no cover
                errors.append(e)

    ts = [threading.Thread(target=worker) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not errors and not any(t.is_alive() for t in ts)
    assert cv.puts == 8 * 30
    # first put stores, every later one adds: each pixel counts the successful puts exactly
    np.testing.assert_array_equal(cv.finish(), np.full(out.shape, cv.puts, np.float32))


def test_tiled_many_largest_first():
    imgs = [rng.random((1, s, s, 3), dtype=np.float32) for s in (16, 48, 32)]
    order = []
    outs = vg.tiled_many(lambda t: (order.append(t.shape[1]) or t.copy()), imgs, overlap=0, tile=64, min_tile=8)
    assert order == [48, 32, 16]
    for a, b in zip(outs, imgs):
        np.testing.assert_allclose(a, b)
