"""plan(..., depth=): the time axis of a video tiled by the same planner (cost per voxel),
against a brute-force scan of every (nx, ny, nz) on small sizes."""
import math
import random
import time

import pytest

from vramguard import _native

from test_planner_bounded import LIMIT_S, MAX_TILES, SIDE, _align_up, _axis_tile, _natural


def axis_options(n_len, ov, a, lo, hi, feather):
    """Every valid (count, tile, positions) on one axis, by brute force, counts ascending."""
    out = []
    for n in range(1, n_len + 1):
        t, pos = _axis_tile(n_len, n, ov, a, feather, lo, hi)
        if t < 0:
            if n > 1 and _natural(n_len, n, ov, a) < lo:
                break
            continue
        out.append((n, t, pos))
    return out


def reference_plan_3d(w, h, d, *, overlap=0, align=1, d_overlap=0, d_align=1, d_min=1, fixed=0.0, per_px=0.0,
                      budget, min_tile=0, max_tile=None, feather=0.5):
    """Every tile count on every axis; the fewest tiles that fit, then the smallest voxel count,
    then the squarer (in space) tile, then the first found (fewer frames tiles, fewer columns)."""
    tmin = _align_up(max(min_tile, 2 * overlap, align), align)
    dmin = _align_up(max(d_min, 2 * d_overlap, d_align), d_align)
    tmax = SIDE if max_tile is None else max_tile
    X = axis_options(w, overlap, align, tmin, tmax, feather)
    Y = axis_options(h, overlap, align, tmin, tmax, feather)
    Z = axis_options(d, d_overlap, d_align, dmin, SIDE, feather)
    amax = (budget - fixed) / per_px if per_px > 0 else math.inf
    best = None
    for nz, td, zs in Z:
        for nx, tw, xs in X:
            for ny, th, ys in Y:                         # the first ny that fits
                if tw * th * td <= amax:
                    n = nx * ny * nz
                    if n <= MAX_TILES:
                        key = (n, tw * th * td, abs(tw - th))
                        if best is None or key < best[0]:
                            best = (key, (tw, th, td), xs, ys, zs)
                    break
    return best


def _case(rng):
    a = rng.choice([1, 1, 2, 4])
    da = rng.choice([1, 1, 2, 4])
    w, h = rng.randint(1, 40 // a) * a, rng.randint(1, 40 // a) * a
    d = rng.randint(1, 24 // da) * da
    kw = dict(overlap=rng.choice([0, 1, 2]) * a, align=a, depth=d, depth_overlap=rng.choice([0, 0, 1, 2]) * da,
              depth_align=da, depth_min=rng.choice([1, 1, 2, 5]), fixed_bytes=float(rng.choice([0, 100])),
              per_px_bytes=float(rng.choice([1, 2, 5])), feather=rng.choice([0.0, 0.5, 1.0]))
    kw["budget"] = int(kw["fixed_bytes"] + kw["per_px_bytes"] * rng.uniform(1, w * h * d)) + 1
    return w, h, kw


def test_depth_matches_the_brute_force_scan():
    rng = random.Random(11)
    fits = 0
    for _ in range(400):
        w, h, kw = _case(rng)
        ref = reference_plan_3d(w, h, kw["depth"], overlap=kw["overlap"], align=kw["align"],
                                d_overlap=kw["depth_overlap"], d_align=kw["depth_align"], d_min=kw["depth_min"],
                                fixed=kw["fixed_bytes"], per_px=kw["per_px_bytes"], budget=kw["budget"],
                                feather=kw["feather"])
        got = _native.plan(w, h, **kw)
        if ref is None:
            assert not got["fits"] and got["why"].startswith("no tile fits"), (w, h, kw, got)
            continue
        fits += 1
        assert got["fits"], (w, h, kw, ref)
        assert tuple(got["tile"]) == ref[1], (w, h, kw, ref, got)
        assert (got["xs"], got["ys"], got["zs"]) == (ref[2], ref[3], ref[4]), (w, h, kw, ref, got)
        tw, th, td = got["tile"]
        assert got["grid"] == (len(got["xs"]), len(got["ys"]), len(got["zs"]))
        assert got["tiles"] == len(got["xs"]) * len(got["ys"]) * len(got["zs"])
        assert got["predicted_peak_bytes"] <= kw["budget"]
        assert got["zs"][0] == 0 and got["zs"][-1] + td == kw["depth"]
    assert fits > 100


def test_depth_costs_per_voxel_and_splits_frames_only_when_needed():
    # 33 frames of 256^2 at 10 B/voxel: all fits in 256*256*33*10 = 21.6 MB
    p = _native.plan(256, 256, depth=33, per_px_bytes=10.0, budget=22_000_000)
    assert p["fits"] and p["tile"] == (256, 256, 33) and p["grid"] == (1, 1, 1) and p["zs"] == [0]
    # half the budget: two tiles, in time or space, whichever wastes fewer voxels
    p = _native.plan(256, 256, depth=33, depth_overlap=1, per_px_bytes=10.0, budget=11_500_000)
    assert p["fits"] and p["tiles"] == 2
    assert p["predicted_peak_bytes"] == pytest.approx(10.0 * math.prod(p["tile"]))
    assert p["predicted_peak_bytes"] <= 11_500_000


def test_two_d_callers_see_no_depth_keys():
    p = _native.plan(512, 512, per_px_bytes=10.0, budget=1 << 30)
    assert len(p["tile"]) == 2 and len(p["grid"]) == 2 and "zs" not in p
    with pytest.raises(TypeError, match="need depth"):
        _native.plan(512, 512, budget=1 << 30, depth_overlap=2)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(depth=0), ValueError, "depth"), (dict(depth=-3), ValueError, "depth"), (dict(depth=2.5), TypeError, "depth"),
    (dict(depth=10, depth_align=4), ValueError, "multiples of depth_align"),
    (dict(depth=12, depth_align=4, depth_overlap=2), ValueError, "multiples of depth_align"),
    (dict(depth=10, depth_overlap=-1), ValueError, "depth_overlap"), (dict(depth=10, depth_min=True), TypeError, "depth_min"),
    (dict(depth=SIDE + 1), ValueError, "depth"),
])
def test_depth_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        _native.plan(64, 64, budget=1 << 20, **kw)


@pytest.mark.parametrize("kw", [
    dict(width=SIDE, height=SIDE, depth=SIDE, budget=1 << 20, fixed_bytes=64 << 20, per_px_bytes=1.0),
    dict(width=SIDE, height=SIDE, depth=SIDE, budget=1 << 45, per_px_bytes=1.0),
    dict(width=SIDE, height=SIDE, depth=SIDE, budget=1 << 50, per_px_bytes=1.0, overlap=16, depth_overlap=4),
    dict(width=4096, height=4096, depth=4096, budget=1 << 26, per_px_bytes=1.0),
    dict(width=1280, height=720, depth=121, depth_align=1, depth_overlap=4, overlap=32, budget=6 << 30,
         per_px_bytes=3000.0),
])
def test_depth_worst_cases_plan_in_bounded_time(kw):
    assert_plans_in_bounded_time(kw)


def assert_plans_in_bounded_time(kw):
    """The best of 3 plan() calls answers within LIMIT_S, with at most MAX_TILES tiles."""
    kw = dict(kw)
    w, h = kw.pop("width"), kw.pop("height")
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        p = _native.plan(w, h, **kw)
        best = min(best, time.perf_counter() - t)
    if p["fits"]:
        assert p["tiles"] <= MAX_TILES
    assert best < LIMIT_S, f"{best * 1e3:.1f} ms"
