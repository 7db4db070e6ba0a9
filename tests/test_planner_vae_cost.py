"""plan(..., per_edge_bytes=, per_frame_bytes=, depth_max=): the cost model of a layer-synchronous
VAE (vramguard.vae).  A step reads its tile with a halo, so a tile's working set is area +
perimeter (+ a per-frame part for whole-frame K/V in video): fixed + td (per_px tw th +
per_edge (tw + th) + per_frame).  Checked against a brute-force scan of every (nx, ny, nz)."""
import random

import pytest

from vramguard import _native

from test_planner_bounded import MAX_TILES, SIDE, _align_up
from test_planner_depth import assert_plans_in_bounded_time, axis_options


def reference(w, h, d, *, fixed=0.0, per_px=0.0, per_edge=0.0, per_frame=0.0, budget, d_min=1, d_max=None,
              overlap=0, align=1, feather=0.0):
    tmin = _align_up(max(2 * overlap, align), align)

    def cost(tw, th, td):
        return fixed + td * (per_px * tw * th + per_edge * (tw + th) + per_frame)

    X = axis_options(w, overlap, align, tmin, SIDE, feather)
    Y = axis_options(h, overlap, align, tmin, SIDE, feather)
    Z = axis_options(d, 0, 1, max(d_min, 1), SIDE if d_max is None else d_max, feather) if d else [(1, 1, [0])]
    best = None
    for nz, td, zs in Z:
        for nx, tw, xs in X:
            for ny, th, ys in Y:                     # tiles shrink as ny grows: the first that fits
                if cost(tw, th, td) <= budget:
                    n = nx * ny * nz
                    if n <= MAX_TILES:
                        key = (n, tw * th * td, abs(tw - th))
                        if best is None or key < best[0]:
                            best = (key, (tw, th, td) if d else (tw, th), xs, ys, zs)
                    break
    return best


def _case(rng):
    w, h = rng.randint(1, 40), rng.randint(1, 40)
    d = rng.choice([0, rng.randint(1, 20)])
    kw = dict(fixed_bytes=float(rng.choice([0, 50])), per_px_bytes=float(rng.choice([0, 1, 3])),
              per_edge_bytes=float(rng.choice([0, 2, 10])), feather=0.0)
    if d:
        kw.update(depth=d, depth_min=rng.choice([1, 2, 3]), per_frame_bytes=float(rng.choice([0, 40])))
        if rng.random() < 0.3:
            kw["depth_max"] = rng.randint(kw["depth_min"], max(kw["depth_min"], d))
    full = kw["fixed_bytes"] + max(d, 1) * (kw["per_px_bytes"] * w * h + kw["per_edge_bytes"] * (w + h)
                                            + kw.get("per_frame_bytes", 0))
    kw["budget"] = int(rng.uniform(kw["fixed_bytes"], full + 2)) + 1
    return w, h, kw


def test_area_perimeter_frame_cost_matches_the_brute_force_scan():
    rng = random.Random(12)
    fits = edge_changed = 0
    for _ in range(500):
        w, h, kw = _case(rng)
        d = kw.get("depth", 0)
        ref = reference(w, h, d, fixed=kw["fixed_bytes"], per_px=kw["per_px_bytes"], per_edge=kw["per_edge_bytes"],
                        per_frame=kw.get("per_frame_bytes", 0.0), budget=kw["budget"],
                        d_min=kw.get("depth_min", 1), d_max=kw.get("depth_max"))
        got = _native.plan(w, h, **kw)
        if ref is None:
            assert not got["fits"], (w, h, kw, got)
            continue
        fits += 1
        assert got["fits"], (w, h, kw, ref)
        assert tuple(got["tile"]) == ref[1], (w, h, kw, ref, got)
        assert got["predicted_peak_bytes"] <= kw["budget"]
        tw, th = got["tile"][:2]
        td = got["tile"][2] if d else 1
        want = kw["fixed_bytes"] + td * (kw["per_px_bytes"] * tw * th + kw["per_edge_bytes"] * (tw + th)
                                         + kw.get("per_frame_bytes", 0))
        assert got["predicted_peak_bytes"] == pytest.approx(want)
        if "depth_max" in kw:
            assert td <= kw["depth_max"] or td == d
        if kw["per_edge_bytes"]:
            no_edge = _native.plan(w, h, **{**kw, "per_edge_bytes": 0})
            edge_changed += no_edge["fits"] and no_edge["tile"] != got["tile"]
    assert fits > 150
    assert edge_changed > 10          # the perimeter term does change plans (it is not ignored)


def test_perimeter_term_keeps_the_halo_inside_the_budget():
    # a 3x3-conv step on 64 channels, halo 1: (t+2)^2 * 64 * 4 B; area-only planning at 64*4 B/px
    # picks a tile whose halo'd working set is over budget, the area + perimeter cost does not
    per_px, per_edge, fixed = 64 * 4.0, 2 * 2 * 64 * 4.0, 4 * 64 * 4.0
    budget = int(per_px * 40 * 40)
    area_only = _native.plan(200, 120, per_px_bytes=per_px, budget=budget, feather=0.0)
    tw, th = area_only["tile"]
    assert (tw + 2) * (th + 2) * 64 * 4 > budget
    p = _native.plan(200, 120, per_px_bytes=per_px, per_edge_bytes=per_edge, fixed_bytes=fixed, budget=budget,
                     feather=0.0)
    tw, th = p["tile"]
    assert (tw + 2) * (th + 2) * 64 * 4 <= budget and p["tiles"] > area_only["tiles"]


def test_depth_max_caps_the_time_tile():
    p = _native.plan(16, 16, depth=30, depth_max=4, per_px_bytes=1.0, budget=1 << 30)
    assert p["tile"][2] == 4 and p["grid"][2] == 8
    p = _native.plan(16, 16, depth=3, depth_max=4, per_px_bytes=1.0, budget=1 << 30)
    assert p["tile"][2] == 3 and p["grid"] == (1, 1, 1)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(per_edge_bytes=-1.0), ValueError, "per_edge_bytes"),
    (dict(per_edge_bytes=float("nan")), ValueError, "per_edge_bytes"),
    (dict(per_frame_bytes="x"), TypeError, "per_frame_bytes"),
    (dict(per_frame_bytes=float("inf")), ValueError, "per_frame_bytes"),
    (dict(depth_max=4), TypeError, "need depth"),
    (dict(depth=10, depth_max=0), ValueError, "depth_max"),
    (dict(depth=10, depth_min=5, depth_max=3), ValueError, "depth_max 3 is below"),
    (dict(depth=10, depth_max=2.0), TypeError, "depth_max"),
])
def test_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        _native.plan(64, 64, budget=1 << 20, **kw)


@pytest.mark.parametrize("kw", [
    dict(width=SIDE, height=SIDE, budget=1 << 20, per_edge_bytes=1.0),
    dict(width=SIDE, height=SIDE, budget=1 << 40, per_px_bytes=1.0, per_edge_bytes=1e6),
    dict(width=SIDE, height=SIDE, depth=SIDE, budget=1 << 50, per_px_bytes=1.0, per_edge_bytes=50.0,
         per_frame_bytes=1e6),
    dict(width=4096, height=4096, depth=4096, budget=1 << 30, per_edge_bytes=1000.0, per_frame_bytes=1e5),
])
def test_worst_cases_plan_in_bounded_time(kw):
    assert_plans_in_bounded_time(dict(kw, feather=0.0))
