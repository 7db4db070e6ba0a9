"""The vectorised blend: every instruction set this CPU runs gives bit-identical results to the
scalar kernels, and all of them match a float64 reference blend; strided tiles (the node's
movedim views) are read in place, not copied."""
import os
import subprocess
import sys
import tracemalloc
import zlib

import numpy as np
import pytest

from vramguard import _native

ISAS = _native.Canvas.isas()
VECTOR = [i for i in ISAS if i != "scalar"]


def grid(n: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis of n px: tiles of `tile` overlapping by >= `overlap`."""
    if tile >= n:
        return [0]
    step = tile - overlap
    pos = list(range(0, n - tile, step)) + [n - tile]
    return sorted(set(pos))


def ramps(pos: list[int], i: int, t: int, feather: float = 0.75) -> tuple:
    """The same ramps vramguard.tiling gives tile i toward its neighbours."""
    out = []
    if i > 0:
        a, b = pos[i], pos[i - 1] + t
        m = (b - a) * (1 - feather) / 2
        out.append((a + m, b - m, True))
    if i < len(pos) - 1:
        a, b = pos[i + 1], pos[i] + t
        m = (b - a) * (1 - feather) / 2
        out.append((a + m, b - m, False))
    return tuple(out)


def make_tiles(rng, B, C, H, W, tile, overlap, src_dtype, layout, view):
    """Tiles of random values over a (tile x tile) grid, each as the caller hands it: a plain
    array, or a view (planar: an NCHW array seen as NHWC, the node's movedim; reversed; sliced)."""
    xs, ys = grid(W, tile, overlap), grid(H, tile, overlap)
    tw, th = min(tile, W), min(tile, H)
    tiles = []
    for r, y in enumerate(ys):
        for c, x in enumerate(xs):
            v = rng.standard_normal((B, th, tw, C)).astype(src_dtype)
            if view == "planar":          # stored NCHW, handed over as an NHWC view
                a = np.ascontiguousarray(v.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
            elif view == "reversed":       # negative strides on x and channels
                a = np.ascontiguousarray(v[:, :, ::-1, ::-1])[:, :, ::-1, ::-1]
            elif view == "sliced":         # every other pixel of a wider result
                wide = np.zeros((B, th, 2 * tw, C), src_dtype)
                wide[:, :, ::2] = v
                a = wide[:, :, ::2]
            else:
                a = v
            assert np.array_equal(a, v)
            if layout == "nchw":
                a = a.transpose(0, 3, 1, 2)
                if view == "plain":
                    a = np.ascontiguousarray(a)
            tiles.append((a, v, x, y, ramps(xs, c, tw), ramps(ys, r, th)))
    return tiles


def stitch(tiles, B, C, H, W, out_dtype, layout, isa, threads=2):
    shape = (B, H, W, C) if layout == "nhwc" else (B, C, H, W)
    out = np.full(shape, np.nan, out_dtype)
    cv = _native.Canvas(out, layout, threads=threads, isa=isa)
    assert cv.isa == isa
    for a, _, x, y, xr, yr in tiles:
        cv.put(a, 0, x, y, xr, yr)
    res = cv.finish()
    return res if layout == "nhwc" else res.transpose(0, 2, 3, 1)


def reference(tiles, B, C, H, W):
    """float64: sum of wx * wy * tile over all tiles, weights from the canvas's own profile."""
    ref = np.zeros((B, H, W, C), np.float64)
    for _, v, x, y, xr, yr in tiles:
        th, tw = v.shape[1], v.shape[2]
        wx = _native.Canvas.weights(x, tw, xr)
        wy = _native.Canvas.weights(y, th, yr)
        ref[:, y:y + th, x:x + tw] += v.astype(np.float64) * wy[None, :, None, None] * wx[None, None, :, None]
    return ref


CASES = [  # B, C, H, W, tile, overlap
    (1, 3, 37, 53, 16, 5),     # odd sizes: every vector loop has a tail
    (2, 4, 29, 70, 24, 8),
    (1, 1, 33, 101, 40, 12),
    (1, 3, 5, 7, 1, 0),        # 1-pixel tiles
    (1, 3, 64, 96, 64, 16),    # one tile per row: whole rows
    (1, 3, 6, 1300, 700, 48),  # rows longer than the strided loop's 512-px chunk
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("src_dtype,out_dtype", [(np.float32, np.float32), (np.float16, np.float32),
                                                 (np.float32, np.float16), (np.float16, np.float16)])
@pytest.mark.parametrize("layout,view", [("nhwc", "plain"), ("nhwc", "planar"), ("nhwc", "reversed"),
                                         ("nhwc", "sliced"), ("nchw", "plain"), ("nchw", "sliced")])
def test_every_isa_is_bit_identical_to_scalar_and_matches_float64(case, src_dtype, out_dtype, layout, view):
    B, C, H, W, tile, overlap = case
    rng = np.random.default_rng(zlib.crc32(repr((case, layout, view)).encode()))
    tiles = make_tiles(rng, B, C, H, W, tile, overlap, src_dtype, layout, view)
    ref = reference(tiles, B, C, H, W)
    base = stitch(tiles, B, C, H, W, out_dtype, layout, "scalar")
    assert np.isfinite(base).all()
    # float32 weights, two roundings per tile; float16 output: half an ulp of float16
    tol = 2e-3 if out_dtype == np.float16 else 2e-6
    np.testing.assert_allclose(base.astype(np.float64), ref, rtol=tol, atol=tol)
    bits = np.uint16 if out_dtype == np.float16 else np.uint32
    for isa in VECTOR:
        got = stitch(tiles, B, C, H, W, out_dtype, layout, isa)
        assert np.array_equal(got.view(bits), base.view(bits)), f"{isa} differs from scalar"


def test_one_thread_and_many_threads_agree():
    B, C, H, W = 2, 3, 300, 260
    rng = np.random.default_rng(3)
    tiles = make_tiles(rng, B, C, H, W, 128, 24, np.float32, "nhwc", "plain")
    for isa in ISAS:
        one = stitch(tiles, B, C, H, W, np.float32, "nhwc", isa, threads=1)
        many = stitch(tiles, B, C, H, W, np.float32, "nhwc", isa, threads=4)
        assert np.array_equal(one.view(np.uint32), many.view(np.uint32))


def test_half_rounding_edges_agree_across_isas():
    """Sums that land on float16 rounding ties, subnormals, overflow to inf."""
    vals = np.array([0.0, -0.0, 1.0, 65504.0, 65519.0, 65520.0, 6e-8, 3e-8, 1e-5, 2049.0, 2051.0,
                     0.333333, -7.77, 1e-3, 5.96e-8, -65504.0], np.float32)
    a = np.tile(vals, 8).reshape(1, 4, 8, 4)
    outs = {}
    for isa in ISAS:
        out = np.zeros((1, 4, 16, 4), np.float16)
        cv = _native.Canvas(out, isa=isa)
        cv.put(a, 0, 0, 0, (), ((0.5, 3.5, False),))
        cv.put(a, 0, 8, 0, (), ((0.5, 3.5, False),))
        cv.put(a * 0.37, 0, 4, 0, (), ((0.5, 3.5, True),))
        outs[isa] = cv.finish()
    for isa in ISAS:
        assert np.array_equal(outs[isa].view(np.uint16), outs["scalar"].view(np.uint16)), isa


def test_unknown_or_unsupported_isa_is_refused():
    out = np.zeros((1, 4, 4, 3), np.float32)
    with pytest.raises(ValueError, match="'mmx'"):
        _native.Canvas(out, isa="mmx")
    missing = [i for i in ("sse2", "avx2", "avx512", "neon") if i not in ISAS]
    for i in missing:
        with pytest.raises(ValueError, match=i):
            _native.Canvas(out, isa=i)
    assert ISAS[0] == "scalar"


@pytest.mark.parametrize("value", ["scalar", "bogus"])
def test_env_var_forces_the_level(value):
    code = ("import numpy as np; from vramguard import _native\n"
            "try:\n    print(_native.Canvas(np.zeros((1, 2, 2, 3), np.float32)).isa)\n"
            "except ValueError as e:\n    print('refused', e)\n")
    env = dict(os.environ, VRAMGUARD_CANVAS_ISA=value)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    if value == "scalar":
        assert p.stdout.strip() == "scalar"
    else:
        assert "refused" in p.stdout and "bogus" in p.stdout


# ------------------------------------------------------------------ the node's tile handoff
def traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_movedim_view_is_read_in_place(dtype):
    """The upscale node hands the canvas y.movedim(-3, -1) of an NCHW network output: a view
    whose channels are a plane apart.  NumPy reports its buffers to tracemalloc, so a copy of
    the 3 MiB tile would show; the canvas's own per-put weights are a few KiB."""
    nchw = np.random.default_rng(0).random((1, 3, 512, 512), dtype=np.float32).astype(dtype)
    view = nchw.transpose(0, 2, 3, 1)
    assert not view.flags.c_contiguous
    out = np.zeros((1, 512, 512, 3), np.float32)
    cv = _native.Canvas(out)
    peak = traced_peak(lambda: cv.put(view, 0, 0, 0, (), ()))
    assert peak < nchw.nbytes // 8, f"put allocated {peak} B for a {nchw.nbytes} B tile: a copy"
    np.testing.assert_array_equal(cv.finish(), view.astype(np.float32))


def test_tiled_with_torch_movedim_results_does_not_copy_tiles():
    torch = pytest.importorskip("torch")
    import vramguard as vg

    img = torch.rand(1, 256, 256, 3)

    def fn(t):  # the node's fn: NHWC -> NCHW network (its output NCHW-contiguous) -> NHWC view
        y = (t.movedim(-1, -3) * 2.0).contiguous()
        assert y.is_contiguous() and not y.movedim(-3, -1).is_contiguous()
        return y.movedim(-3, -1)

    vg.tiled(fn, img, tile=256, overlap=0)  # warm up (imports, caches)
    out_bytes = 256 * 256 * 3 * 4
    peak = traced_peak(lambda: vg.tiled(fn, img, tile=256, overlap=0))
    # the output itself is a NumPy buffer (traced); a per-tile copy would add a second one
    assert peak < out_bytes * 1.25, f"tiled traced {peak} B for a {out_bytes} B output"
    got = vg.tiled(fn, img, tile=128, overlap=32)
    np.testing.assert_allclose(got.numpy(), (img * 2).numpy(), rtol=1e-6)
