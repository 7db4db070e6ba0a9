"""A short seeded fuzz of Canvas and plan(): hostile offsets, arrays, ramps and arguments must
give clear Python exceptions (never a crash, never another exception type), and plans keep
their invariants.  Runs in a few seconds; the sanitizer pass runs it too."""
import random

import numpy as np

from vramguard import _native

OFFS = [0, 1, 3, 7, 8, 2**31, 2**63 - 1, 2**63 - 2, 2**63, -1, -2**63, 2**64 + 1, True, 1.0, None]
VALS = [0, 1, 2, 3, 7, 8, 16, 64, 1000, 4096, 4097, 1 << 20, (1 << 20) + 1, 2**31, 2**63 - 1, 2**63, 2**64 + 1,
        -1, -2**63, 0.5, 1.5, float("nan"), float("inf"), -0.0, None, True, "8", 1e300, 1e-300]
PLAN_KEYS = ["overlap", "align", "fixed_bytes", "per_px_bytes", "budget", "batch", "min_tile", "max_tile",
             "feather", "depth", "depth_overlap", "depth_align", "depth_min"]


def _array(rng):
    shape = tuple(rng.choice([0, 1, 2, 3, 5, 8]) for _ in range(rng.choice([3, 4, 4, 4, 5])))
    a = np.ones(shape, rng.choice([np.float32, np.float16, np.float64, ">f4", np.int32]))
    if rng.random() < 0.2 and a.ndim == 4 and a.shape[2] > 1:
        a = a[:, :, ::2]
    if rng.random() < 0.1:
        a.flags.writeable = False
    return a


def test_canvas_fuzz():
    rng = random.Random(1234)
    applied = 0
    for _ in range(150):
        out = np.zeros((rng.choice([1, 2]), rng.choice([1, 5, 8]), rng.choice([1, 5, 8]), 3),
                       rng.choice([np.float32, np.float16]))
        layout = rng.choice(["nhwc", "nchw"])
        cv = _native.Canvas(out, layout, rng.choice([0, 1, 2]))
        rows = (out.shape[0], out.shape[1] if layout == "nhwc" else out.shape[2])
        width = out.shape[2] if layout == "nhwc" else out.shape[3]
        for _ in range(20):
            if rng.random() < 0.25:
                res = out[:, rng.randint(0, 1):] if rng.random() < 0.5 else out
            elif rng.random() < 0.3:
                res = np.ones(out.shape, out.dtype)
            else:
                res = _array(rng)
            ramps = rng.choice([(), [(1.0, 2.0, True)], [(float("nan"), 1, 0)], "ab", [(1, 2)], [1], None,
                                [(1e308, -1e308, False)] * 3, [(0.0, 1.0, True)] * 33])
            args = (rng.choice(OFFS), rng.choice(OFFS[:6]), rng.choice(OFFS[:6]), ramps)
            if rng.random() < 0.3:                                   # a valid call now and then
                res, args = np.ones(out.shape, out.dtype), (0, 0, 0, ())
            try:
                cv.put(res, *args, ())
                applied += 1
            except (TypeError, ValueError, RuntimeError):
                pass
            if rng.random() < 0.1:
                try:
                    assert cv.finish() is out
                except RuntimeError as e:
                    assert "incomplete" in str(e) or "closed" in str(e)
            if rng.random() < 0.1:
                cov = cv.coverage()
                assert cov.shape == rows and ((cov >= 0) & (cov <= width)).all()
    assert applied > 50


def test_plan_fuzz():
    rng = random.Random(4321)
    fits = 0
    for _ in range(4000):
        w = rng.choice(VALS + [rng.randint(1, 1 << 20)])
        h = rng.choice(VALS + [rng.randint(1, 1 << 20)])
        kw = {k: rng.choice(VALS + [rng.randint(0, 1 << 20), rng.random()])
              for k in rng.sample(PLAN_KEYS, rng.randint(0, len(PLAN_KEYS)))}
        if rng.random() < 0.8:
            kw["budget"] = rng.choice([1, 1 << 20, 1 << 40, rng.randint(1, 1 << 50)])
        if rng.random() < 0.5:
            w, h = rng.randint(1, 5000), rng.randint(1, 5000)
            kw = {k: v for k, v in kw.items() if k in ("budget", "overlap", "feather")}
            kw["per_px_bytes"] = rng.choice([1.0, 100.0])
        try:
            r = _native.plan(w, h, **kw)
        except (TypeError, ValueError):
            continue
        if r["fits"]:
            fits += 1
            assert r["tiles"] <= 1 << 16
            assert r["tiles"] == len(r["xs"]) * len(r["ys"]) * len(r.get("zs", [0]))
            assert r["xs"][0] == 0 and r["xs"][-1] + r["tile"][0] == w
            assert r["ys"][0] == 0 and r["ys"][-1] + r["tile"][1] == h
            if kw.get("per_px_bytes"):
                assert r["predicted_peak_bytes"] <= r["budget_bytes"]
        else:
            assert r["why"].startswith("no tile fits")
    assert fits > 100
