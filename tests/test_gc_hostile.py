"""The GC guard under hostile conditions: malformed log lines, a failing device read or probe
after the stage's work succeeded, forks while other threads are inside the guard, and what
the run summary says."""
import logging
import re

import pytest

import vramguard as vg
from vramguard import accounting, gcguard

GiB = 1 << 30
GOOD = ("GC: utilization={'gpu': 8, 'ram': 20, 'threshold': 0} gc={'collected': 510, 'saved': 0.25} "
        "before={'gpu': 1.93, 'ram': 9.29} after={'gpu': 1.68, 'ram': 9.29, 'retries': 0, 'oom': 0} "
        "device=cuda fn=vae_decode time=0.25")


@pytest.fixture
def g(monkeypatch):
    gcguard._guard = None
    vg.simulate("8GB", "1GB")
    # a process-wide sampler of our own, on the simulated device (the previous one comes back)
    monkeypatch.setattr(gcguard.sampling, "_default", None)
    yield vg.guard()
    gcguard._guard = None


# ------------------------------------------------------------------ parse_log_line
@pytest.mark.parametrize("line", [
    GOOD.replace("{'gpu': 8,", "{'gpu': ,"),                    # SyntaxError in literal_eval
    GOOD.replace("{'gpu': 1.93,", "{'gpu': __import__('os'),"),  # malformed node
    GOOD.replace("{'collected': 510,", "{'collected': 510 +* 2,"),
    GOOD.replace("{'gpu': 8, 'ram': 20, 'threshold': 0}", "{1, 2}"),  # a set, not a dict
    GOOD.replace("time=0.25", "time=abc"),
    GOOD.replace("time=0.25", "time=nan") + "x",
    GOOD.replace("{'gpu': 8,", "{'gpu': '" + "x" * 100000 + "',"),
    GOOD.replace("{'gpu': 8,", "{'gpu': " + "(" * 5000 + "1" + ")" * 5000 + ","),
    GOOD.replace("{'gpu': 8,", "{'gpu': 1e999999999999999999999,"),
    "GC: nonsense", "", "x" * 1000,
])
def test_parse_log_line_raises_only_valueerror_naming_the_line(line):
    with pytest.raises(ValueError) as ei:
        gcguard.parse_log_line(line)
    msg = str(ei.value)
    assert "GC line" in msg and len(msg) < 400, msg


def test_parse_log_line_wrong_type_and_good_line():
    with pytest.raises(TypeError, match="str"):
        gcguard.parse_log_line(b"GC: x")
    rec = gcguard.parse_log_line(GOOD)
    assert rec["gc"]["saved"] == 0.25 and rec["time"] == 0.25 and rec["reason"] is None


# ------------------------------------------------------------------ the work's result always survives
def _raising(*a, **k):
    raise RuntimeError("device read failed")


@pytest.mark.parametrize("where", ["probe", "snapshot", "check", "sampler"])
def test_stage_and_after_stage_return_the_works_result(g, where, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="vramguard")
    monkeypatch.setattr(gcguard, "_reported", set())  # "once" is per process; start afresh
    vg.update_simulated(0, used="7GB")  # above the threshold: the policy wants to collect
    if where == "probe":
        # the probe is not called on a simulated device: fail where check() runs it
        monkeypatch.setattr(accounting, "_auto_probe", _raising)
    elif where == "snapshot":
        monkeypatch.setattr(accounting, "snapshot", _raising)
        monkeypatch.setattr(g, "policy", _PolicyProxy(g.policy))
    elif where == "check":
        monkeypatch.setattr(g, "check", _raising)
    else:
        class BadSampler:
            begin = end = staticmethod(_raising)
        monkeypatch.setattr(gcguard.sampling, "sampler", lambda: BadSampler())

    @vg.after_stage("vae_decode")
    def work(x):
        return x * 2

    for _ in range(3):
        assert work(21) == 42
        with vg.stage("vae_decode"):
            done = True
        assert done
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "vae_decode" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]  # logged once, not per call


class _PolicyProxy:
    """The real policy, but its check() reads a device that fails."""

    def __init__(self, real):
        self._real = real

    def check(self, *a, **k):
        raise OSError("NVML: GPU is lost")

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_stage_still_propagates_the_works_own_exception(g, monkeypatch):
    class BadSampler:
        def begin(self, name):
            return 1

        def end(self, token):
            raise RuntimeError("sampler end failed")

    monkeypatch.setattr(gcguard.sampling, "sampler", lambda: BadSampler())
    with pytest.raises(KeyError, match="the work's own"):
        with vg.stage("vae_decode"):
            raise KeyError("the work's own")

    @vg.after_stage("unet")
    def bad():
        raise KeyError("the work's own")

    with pytest.raises(KeyError, match="the work's own"):
        bad()


def test_bad_arguments_still_raise_at_once(g):
    with pytest.raises(ValueError):
        with vg.stage("vae_decode", need=float("nan")):
            pass
    with pytest.raises(ValueError):
        vg.after_stage("no such stage")


# ------------------------------------------------------------------ fork under load
def test_fork_while_threads_hammer_the_guard():
    """A child forked while another thread holds the GCGuard lock must not block in
    gc_check()/stage(): >= 100 forks, every child uses the guard and exits in time."""
    from conftest import run_py
    r = run_py("""
        import faulthandler, os, sys, threading, time, traceback
        import vramguard as vg
        vg.simulate("8GB", "7GB")
        vg.configure_gc(threshold=0, min_interval=0)
        g = vg.guard()
        sys.setswitchinterval(1e-6)       # switch threads often: some fork lands inside the lock
        for i in range(40):               # many stages: stats() holds the lock a while
            vg.register_stage(f"s{i}")
            vg.gc_check(f"s{i}")
        stop = threading.Event()
        def hammer(i):
            while not stop.is_set():
                vg.gc_check("vae_decode")
                with vg.stage("unet"):
                    pass
                g.stats(); g.run_summary("t")
        ts = [threading.Thread(target=hammer, args=(i,), daemon=True) for i in range(4)]
        for t in ts: t.start()
        time.sleep(0.05)
        codes = []
        for i in range(120):
            pid = os.fork()
            if pid == 0:
                code = 5
                try:
                    # a hung child prints where it hangs and exits (1) instead of blocking the test
                    faulthandler.dump_traceback_later(8, exit=True)
                    d = vg.gc_check("vae_decode", forced=True)
                    with vg.stage("text_encode"):
                        pass
                    vg.guard().stats(); vg.guard().run_summary("child")
                    code = 0 if d.collect else 3
                except BaseException:
                    traceback.print_exc()
                    code = 4
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            codes.append(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
        stop.set()
        for t in ts: t.join(5)
        print(len(codes), sorted(set(codes)), sum(c != 0 for c in codes))
    """, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[-2] == "120 [0] 0", r.stdout + r.stderr[-3000:]


# ------------------------------------------------------------------ the run summary
def test_run_summary_in_human_units(g, caplog):
    caplog.set_level(logging.INFO, logger="vramguard")
    with vg.run("prompt 3") as guard:
        with vg.stage("vae_decode"):
            vg.update_simulated(0, used="7GB")
        guard._run_stats.setdefault("vae_decode", gcguard.StageStats()).saved += 905216
    msg = [r.getMessage() for r in caplog.records if r.getMessage().startswith("vramguard prompt 3")][-1]
    assert "saved 884.00 KiB" in msg, msg          # 905216 bytes, not "0.00 GB"
    assert re.search(r"'vae_decode': 7\.00 GiB", msg), msg  # peaks carry units
