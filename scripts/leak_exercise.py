"""Drive every C entry point of vramguard._native, good and bad input, many times.

Run under LeakSanitizer by `scripts/test.sh --sanitize` with full stacks; a leak in the
extension then shows up N times with a frame in csrc/, which scripts/check_leaks.py fails
on.  Error paths are where reference leaks hide, so every bad input is exercised too.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np

import vramguard as vg
from vramguard import _native

N = int(os.environ.get("VRAMGUARD_LEAK_ROUNDS", "30"))


def expect_error(fn, *a, **kw):
    try:
        fn(*a, **kw)
    except (ValueError, TypeError, RuntimeError, OverflowError):
        return
    raise AssertionError(f"{fn} accepted {a} {kw}")


def fake_nvml() -> str | None:
    src = os.path.join(os.path.dirname(__file__), "..", "tests", "fakelibs", "fake_nvml.c")
    out = os.path.join(tempfile.mkdtemp(), "libfake-nvml.so")
    r = subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-o", out, src], capture_output=True)
    return out if r.returncode == 0 else None


def accounting():
    vg.simulate("8GB", "3GB", process_used="2GB", reserved="1GB", allocated="512MB", oom_count=1,
                retry_count=2, script=[(0, "1GB"), (0.001, "2GB", "1GB")])
    vg.update_simulated(0, used="4GB")
    s = vg.snapshot(0)
    vg.snapshot_dict(s)
    vg.budget_of(s)
    vg.budget_of({"total": 10, "free": 5, "used": 5, "cap": 3})
    vg.host()
    vg.host(fresh=True)
    vg.set_reserve("1GB")
    vg.set_cap("2GB", device=0)
    vg.limits(0)
    vg.gpu_status()
    _native.set_probe(lambda i: {"reserved": 1})
    _native.set_probe(None)
    for bad in (-1, float("nan"), "x", None):
        expect_error(_native.set_limits, None, bad if bad is not None else -5)
    expect_error(_native.snapshot, 7)
    expect_error(_native.snapshot, "0")
    expect_error(_native.budget, 42)
    expect_error(_native.budget, {"total": -1})
    expect_error(_native.simulate, 9, total=1)
    expect_error(_native.simulate, 0, used=10 ** 19)
    expect_error(_native.simulate, 0, script=[(1.0, 0), (0.5, 1)])
    expect_error(_native.simulate, 0, script=[5])
    expect_error(_native.set_host_interval, -1)
    # host RAM as a source, per-call overrides, hostile numbers
    _native.set_limits("host", reserve=1 << 20, cap=0)
    _native.get_limits("host")
    vg.snapshot_dict(_native.snapshot())
    _native.snapshot(0, reserve=1 << 30)
    _native.snapshot(None, card=8 << 30, reserve=1 << 30)
    expect_error(_native.snapshot, None, card=0)
    expect_error(_native.snapshot, None, reserve=10 ** 400)
    expect_error(_native.set_limits, "gpu", reserve=1)
    expect_error(_native.budget, {"total": 10 ** 400})
    expect_error(_native.budget, {"total": "8"})

    class FloatRaises(int):
        def __float__(self):
            raise RuntimeError("not called")

    _native.budget({"total": FloatRaises(8), "free": FloatRaises(4), "used": 4})
    _native.budget({"total": 9 * 10 ** 18, "free": 9 * 10 ** 18, "evictable": 9 * 10 ** 18, "cap": 1})
    vg.simulate_clear()
    vg.clear_limits()


def sampler():
    vg.simulate("8GB", "1GB")
    s = _native.Sampler(0, 0.001, 0.01, 64)
    s.start()
    for i in range(20):
        g = s.begin(f"s{i % 3}")
        s.sample()
        s.end(g)
    s.timeline()
    s.stages()
    s.stop()
    s.reset()
    s.end(s.begin("x"))
    expect_error(s.end, 10 ** 9)
    expect_error(s.begin, "")
    expect_error(s.begin, 5)
    expect_error(_native.Sampler, 0, 0)
    expect_error(_native.Sampler, 0, 0.01, 0.1, 1)
    for _ in range(3):  # the stage cache: built, reused, replaced as the ring turns
        s.stages()
        s.end(s.begin("y"))
    h = _native.Sampler(None, 0.001)
    h.start()  # dropped while running: dealloc joins
    del h
    import threading
    s.start()
    ts = [threading.Thread(target=s.stop) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    vg.simulate_clear()


def policy():
    p = _native.Policy(70, False, 0.5, False, 0.02)
    snap = {"total": 8 << 30, "used": 6 << 30, "free": 2 << 30, "framework_allocated": 1 << 30}
    p.decide(snap, now=1.0, stage=3)
    p.decide(snap, True, 1 << 30, 2.0, 4)
    p.collected(snap, now=2.0)
    p.threshold = 50
    p.min_interval = 0.1
    p.growth = 0.1
    p.low_vram = True
    p.zluda = False
    p.counts
    vg.simulate("8GB", "7GB")
    p.check(0)
    p.check(0, True, 0, 2)
    p.check(None)
    p.check(None, True)
    expect_error(p.decide, snap, need=10 ** 400)
    expect_error(_native.Policy, 10 ** 400)
    for bad in ((snap,), {"stage": 99}, {"need": -1}):
        if isinstance(bad, dict):
            expect_error(p.decide, snap, **bad)
    expect_error(p.decide, 42)
    expect_error(setattr, p, "threshold", 101)
    expect_error(setattr, p, "low_vram", 1)
    expect_error(_native.Policy, float("nan"))
    expect_error(p.check, 5)
    vg.simulate_clear()


def tiler():
    _native.plan(1000, 704, overlap=16, align=8, fixed_bytes=1e6, per_px_bytes=500.0, budget=1 << 28, batch=3)
    _native.plan(64, 64, budget=10)
    expect_error(_native.plan, 0, 10, budget=1)
    expect_error(_native.plan, 100, 100, align=8, budget=1)
    expect_error(_native.plan, 100, 100)
    for dt, layout in ((np.float32, "nhwc"), (np.float16, "nchw")):
        shape = (2, 40, 50, 3) if layout == "nhwc" else (2, 3, 40, 50)
        out = np.empty(shape, dt)
        cv = _native.Canvas(out, layout, 2)
        half = np.ones(shape, np.float32)[..., :30] if layout == "nchw" else np.ones(shape, np.float32)[:, :, :30]
        cv.put(half.astype(dt), 0, 0, 0, [(20.0, 30.0, False)], ())
        rest = np.ones(shape, np.float32)[..., 20:] if layout == "nchw" else np.ones(shape, np.float32)[:, :, 20:]
        cv.put(rest, 0, 20, 0, [(20.0, 30.0, True)], [])
        cv.coverage()
        cv.finish()
        expect_error(cv.finish)
    cv = _native.Canvas(np.empty((1, 8, 8, 3), np.float32))
    expect_error(cv.put, np.ones((1, 8, 8, 2), np.float32), 0, 0, 0, (), ())
    expect_error(cv.put, np.ones((1, 8, 8, 3), np.float64), 0, 0, 0, (), ())
    expect_error(cv.put, np.ones((1, 8, 8, 3), np.float32), 0, 0, 0, [(1, 2)], ())
    expect_error(cv.put, np.ones((1, 8, 8, 3), np.float32), 0, 0, 0, [(float("inf"), 2, True)], ())
    expect_error(cv.finish)
    expect_error(_native.Canvas, np.empty((8, 8, 3), np.float32))
    _native.Canvas.weights(0, 16, [(2.0, 10.0, True)])
    x = np.random.default_rng(0).random((1, 60, 70, 3), dtype=np.float32)
    vg.tiled(lambda t: t * 1, x, overlap=8, tile=24, min_tile=16)


def ledger_part(path):
    """The shared ledger and the reserve that learns (issue 13)."""
    vg.simulate("8GB", "3GB", process_used="1GB")
    _native.ledger_join(path, revalidate_s=0.0)
    _native.ledger_plan(0, 1 << 30, fit=True)
    _native.ledger_plan(0, 1 << 40, fit=True)
    _native.ledger_participants()
    _native.ledger_others_planned(0)
    _native.ledger_host(rss=1, pinned=2)
    _native.host_pinned()
    _native.ledger_sweep()
    _native.ledger_clear()
    _native.ledger_status()
    _native.set_learn_reserve(True, window_s=10, margin=1)
    vg.snapshot(0)
    _native.learned_reserve(0)
    _native.set_learn_reserve(False)
    for bad in ((-1, 1), (16, 1), (0, -1), (True, 1), (0, "x")):
        expect_error(_native.ledger_plan, *bad)
    expect_error(_native.ledger_join, "a\0b")
    expect_error(_native.ledger_join, path, revalidate_s=-1)
    expect_error(_native.set_learn_reserve, 1)
    expect_error(_native.set_learn_reserve, True, window_s=0.1)
    expect_error(_native.learned_reserve, 99)
    _native.ledger_leave()


def main():
    lib = fake_nvml()
    ledger_path = os.path.join(tempfile.mkdtemp(), "ledger")
    for _ in range(N):
        accounting()
        sampler()
        policy()
        tiler()
        ledger_part(ledger_path)
    if lib:  # the NVML path, in a child with the fake library
        code = ("import vramguard as vg\nfor _ in range(%d):\n    [vg.snapshot_dict(s) for s in vg.snapshots()]\n"
                "    s = vg.Sampler(0, 0.001); s.start(); s.end(s.begin('a')); s.stop()\n" % N)
        for layout in ("24", "32"):
            env = dict(os.environ, VRAMGUARD_NVML_LIB=lib, FAKE_NVML_DEVICES=f"{8 << 30}:{1 << 30}",
                       FAKE_NVML_PROC_USED=str(1 << 28), CUDA_VISIBLE_DEVICES="0",
                       FAKE_NVML_PROC_OTHERS="3", FAKE_NVML_PROC_LAYOUT=layout)
            subprocess.run([sys.executable, "-c", code], check=True, env=env)
    print(f"leak exercise: {N} rounds done")


if __name__ == "__main__":
    main()
