"""The sampler: stages and their peaks, the timeline, bad input, and a thread hammer."""
import threading
import time

import numpy as np
import pytest

import vramguard as vg

GiB = 1 << 30


def test_peaks_follow_manual_steps_exactly():
    vg.simulate("8GB", "1GB")
    s = vg.Sampler(0, interval=10.0)  # thread not started: only explicit samples
    a = s.begin("encode")
    vg.update_simulated(0, used="3GB")
    s.sample()
    vg.update_simulated(0, used="2GB")
    ra = s.end(a)
    b = s.begin("unet")
    vg.update_simulated(0, used="6GB", process_used="5GB")
    s.sample()
    vg.update_simulated(0, used="1GB")
    rb = s.end(b)
    assert ra["peak_used"] == 3 * GiB and ra["start_used"] == GiB and ra["end_used"] == 2 * GiB
    assert rb["peak_used"] == 6 * GiB and rb["peak_process"] == 5 * GiB and rb["end_used"] == GiB
    tl = s.timeline()
    assert list(tl["used"]) == [GiB, 3 * GiB, 2 * GiB, 2 * GiB, 6 * GiB, GiB]
    assert np.all(np.diff(tl["t"]) >= 0)


def test_nested_stages_both_see_the_peak():
    vg.simulate("8GB", "1GB")
    s = vg.Sampler(0, interval=10.0)
    outer = s.begin("outer")
    inner = s.begin("inner")
    vg.update_simulated(0, used="5GB")
    s.sample()
    r_in = s.end(inner)
    vg.update_simulated(0, used="1GB")
    r_out = s.end(outer)
    assert r_in["peak_used"] == r_out["peak_used"] == 5 * GiB


def test_scripted_timeline_with_thread():
    # 0-150 ms: 1 GiB, 150-300 ms: 4 GiB, then 2 GiB; stages placed inside each segment.
    vg.simulate("8GB", "0", script=[(0.0, "1GB"), (0.15, "4GB"), (0.30, "2GB")])
    t0 = time.monotonic()
    s = vg.Sampler(0, interval=0.002)
    s.start()
    try:
        def at(t):
            time.sleep(max(0.0, t0 + t - time.monotonic()))
        at(0.03); a = s.begin("a"); at(0.12); ra = s.end(a)
        at(0.18); b = s.begin("b"); at(0.27); rb = s.end(b)
        at(0.33); c = s.begin("c"); at(0.40); rc = s.end(c)
    finally:
        s.stop()
    assert (ra["peak_used"], rb["peak_used"], rc["peak_used"]) == (GiB, 4 * GiB, 2 * GiB)
    tl = s.timeline()
    assert len(tl["t"]) > 50                      # ~2 ms ticks over ~0.4 s
    assert tl["used"].max() == 4 * GiB
    assert set(np.unique(tl["used"])) <= {GiB, 2 * GiB, 4 * GiB}
    peaks = {g["name"]: g["peak_used"] for g in s.stages()}
    assert peaks == {"a": GiB, "b": 4 * GiB, "c": 2 * GiB}


def test_ring_wraps_and_keeps_newest():
    vg.simulate("8GB", "0")
    s = vg.Sampler(0, interval=10.0, capacity=4)
    for i in range(7):
        vg.update_simulated(0, used=i)
        s.sample()
    assert list(s.timeline()["used"]) == [3, 4, 5, 6]
    s.reset()
    assert len(s.timeline()["t"]) == 0


def test_host_only_sampler():
    s = vg.Sampler(None, interval=0.005)
    s.start()
    g = s.begin("host")
    time.sleep(0.05)
    r = s.end(g)
    s.stop()
    # host RAM is a source like a device: used = total - available, ours = RSS
    assert r["peak_used"] > 0 and r["peak_rss"] > 0
    assert r["peak_process"] == r["peak_rss"] or abs(r["peak_process"] - r["peak_rss"]) < (64 << 20)
    assert s.device is None
    tl = s.timeline()
    assert len(tl["rss"]) >= 3 and (tl["used"] > 0).all() and (tl["process_used"] > 0).all()


@pytest.mark.parametrize("kw,exc", [({"interval": 0}, ValueError), ({"interval": -1}, ValueError),
                                     ({"interval": float("nan")}, ValueError),
                                     ({"interval": "fast"}, TypeError), ({"capacity": 0}, ValueError),
                                     ({"capacity": 1 << 40}, ValueError), ({"capacity": (1 << 24) + 1}, ValueError),
                                     ({"nvml_interval": 0}, ValueError)])
def test_bad_sampler_arguments(kw, exc):
    vg.simulate("8GB")
    with pytest.raises(exc):
        vg.Sampler(0, **kw)


def test_bad_stage_arguments():
    vg.simulate("8GB")
    s = vg.Sampler(0)
    with pytest.raises(TypeError):
        s.begin(5)
    with pytest.raises(ValueError):
        s.begin("")
    with pytest.raises(ValueError):
        s.begin("x" * 200)
    with pytest.raises(ValueError, match="no open stage"):
        s.end(12345)
    with pytest.raises(ValueError):
        vg.Sampler(9)


def test_start_stop_idempotent_and_dealloc_while_running():
    vg.simulate("8GB")
    s = vg.Sampler(0, interval=0.001)
    s.start(); s.start()
    assert s.running
    s.stop(); s.stop()
    assert not s.running
    s2 = vg.Sampler(0, interval=0.001)
    s2.start()
    del s2  # must join the thread, not crash


def test_thread_hammer():
    """>= 8 threads calling snapshot, host and the sampler for several seconds."""
    vg.simulate("8GB", "1GB")
    s = vg.Sampler(0, interval=0.001, capacity=1024)
    s.start()
    stop = time.monotonic() + 3.0
    errors = []

    def worker(k):
        try:
            n = 0
            while time.monotonic() < stop:
                snap = vg.snapshot(0)
                assert snap.total == 8 * GiB
                vg.host()
                g = s.begin(f"w{k}")
                if n % 7 == 0:
                    vg.update_simulated(0, used=(n % 8) << 30)
                s.sample()
                s.end(g)
                if n % 50 == 0:
                    s.timeline(); s.stages()
                    vg.set_reserve(n % 3 << 30)
                n += 1
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    alive = [t for t in threads if t.is_alive()]
    s.stop()
    assert not alive, "deadlock: threads still running"
    assert errors == []
    assert len(s.timeline()["t"]) == 1024


def test_stage_ring_keeps_newest_and_open_stages():
    vg.simulate("8GB")
    s = vg.Sampler(0, interval=10.0)
    long_open = s.begin("long")
    for i in range(5000):
        s.end(s.begin(f"s{i % 10}"))
    recs = s.stages()
    assert len(recs) == 4096
    assert recs[-1]["name"] == "s9" and recs[-1]["end"] is not None
    assert s.end(long_open) is None        # wrapped over while open: dropped, not an error
    with pytest.raises(ValueError):
        s.end(10 ** 9)                      # never issued
    held = [s.begin(f"o{i}") for i in range(64)]
    with pytest.raises(RuntimeError, match="open at once"):
        s.begin("one too many")
    for h in held:
        assert s.end(h)["end"] is not None
    s.reset()
    assert s.stages() == []


def test_fork_while_sampling_does_not_deadlock_or_crash():
    """A host that forks (multiprocessing) while the sampler runs: the child can snapshot,
    use and stop the sampler; nothing hangs and the parent's sampler keeps running."""
    from conftest import run_py
    r = run_py("""
        import os, time, vramguard as vg
        vg.simulate("8GB", "1GB")
        s = vg.Sampler(0, interval=0.0005)
        s.start()
        codes = []
        for i in range(40):                   # fork at many points in the thread's cycle
            pid = os.fork()
            if pid == 0:
                ok = vg.snapshot(0).total == 8 << 30
                s.end(s.begin("child")); s.sample(); s.timeline()
                ok = ok and not s.running     # no thread in the child
                s.stop(); s.start(); s.stop()
                os._exit(0 if ok else 3)
            codes.append(os.waitpid(pid, 0)[1])
        time.sleep(0.01)
        print(sum(codes), s.running)
        s.stop()
    """, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "True"]
