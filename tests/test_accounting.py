"""Accounting: snapshots, the budget, limits, probes, host memory, library loading."""
import json
import math
import os

import pytest

import vramguard as vg
from vramguard import _native

from conftest import run_py

GiB = 1 << 30


def test_import_needs_no_gpu():
    r = run_py("import vramguard, json; print(json.dumps(vramguard.gpu_status()))",
               env={"VRAMGUARD_NVML_LIB": "/nonexistent/libnvidia-ml.so.1",
                    "VRAMGUARD_CUDA_LIB": "/nonexistent/libcuda.so.1"})
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["devices"] == 0
    assert st["nvml"].startswith("unavailable: cannot load /nonexistent/libnvidia-ml.so.1")
    assert st["cuda"].startswith("unavailable: cannot load /nonexistent/libcuda.so.1")


def test_override_pointing_at_a_non_library(tmp_path):
    junk = tmp_path / "libnvidia-ml.so.1"
    junk.write_text("not an ELF file\n")
    r = run_py("import vramguard, json; print(json.dumps(vramguard.gpu_status()))",
               env={"VRAMGUARD_NVML_LIB": str(junk)})
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["nvml"].startswith(f"unavailable: cannot load {junk}")
    assert st["devices"] == 0 and "unavailable" in st["devices_reason"]


def test_no_gpu_snapshot_raises_with_reason():
    if vg.device_count() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no GPU: unavailable"):
        vg.snapshot(0)
    assert vg.snapshots() == []


def test_simulated_snapshot_fields():
    vg.simulate("8GB", "3GB", process_used="2GB", name="Test 8G")
    s = vg.snapshot(0)
    assert (s.index, s.name, s.source) == (0, "Test 8G", "simulated")
    assert s.total == 8 * GiB and s.used == 3 * GiB and s.free == 5 * GiB
    assert s.process_used == 2 * GiB
    assert s.framework_reserved is None and s.oom_count is None
    assert s.budget == 5 * GiB
    d = vg.snapshot_dict(s)
    assert list(d)[:4] == ["index", "name", "uuid", "source"] and d["budget"] == s.budget


@pytest.mark.parametrize("free,evictable,reserve,cap,held,expect", [
    (5, 0, 0, 0, 3, 5),        # all free is usable
    (5, 0, 1, 0, 3, 4),        # reserve comes off
    (5, 2, 1, 0, 3, 6),        # evictable counts as usable
    (1, 0, 2, 0, 3, 0),        # never negative
    (5, 0, 1, 4, 3, 1),        # cap: 4 - live 3
    (5, 2, 1, 4, 3, 3),        # cap: live = held - evictable = 1 -> room 3 < 6
    (5, 0, 0, 2, 3, 0),        # already over the cap
])
def test_budget_formula(free, evictable, reserve, cap, held, expect):
    got = vg.budget_of({"total": 8 * GiB, "free": free * GiB, "used": (8 - free) * GiB,
                        "evictable": evictable * GiB, "reserve": reserve * GiB, "cap": cap * GiB,
                        "process_used": held * GiB})
    assert got == expect * GiB


def test_budget_cap_falls_back_to_device_used_when_process_unknown():
    got = vg.budget_of({"total": 8 * GiB, "free": 5 * GiB, "used": 3 * GiB, "cap": 4 * GiB})
    assert got == 1 * GiB


def test_reserve_and_cap_per_device_and_default():
    vg.simulate("8GB", "2GB")
    vg.simulate("16GB", "0")
    vg.set_reserve("1GB")
    vg.set_reserve(3 * GiB, device=1)
    assert vg.snapshot(0).reserve == GiB and vg.snapshot(0).budget == 5 * GiB
    assert vg.snapshot(1).reserve == 3 * GiB and vg.snapshot(1).budget == 13 * GiB
    vg.set_cap("4GB", device=0)
    assert vg.snapshot(0).budget == 2 * GiB  # 4 GiB cap - 2 GiB held
    assert vg.limits(0) == {"reserve": GiB, "cap": 4 * GiB}
    assert vg.limits(1) == {"reserve": 3 * GiB, "cap": 0}


@pytest.mark.parametrize("bad,exc", [(-1, ValueError), (float("nan"), ValueError),
                                     (float("inf"), ValueError), ("lots", ValueError),
                                     ("-2GB", ValueError), (None, TypeError), (True, TypeError),
                                     ([1], TypeError)])
def test_bad_reserve_and_cap(bad, exc):
    with pytest.raises(exc) as e:
        vg.set_reserve(bad)
    assert repr(bad)[:10] in str(e.value) or str(bad)[:10] in str(e.value)
    with pytest.raises(exc):
        vg.set_cap(bad)
    if bad is not None:  # None means "leave as is" for the native call
        with pytest.raises((ValueError, TypeError)):
            _native.set_limits(None, bad if not isinstance(bad, str) else -5, None)
    assert vg.limits() == {"reserve": 0, "cap": 0}


def test_unknown_device_index():
    vg.simulate("8GB")
    with pytest.raises(ValueError, match="unknown device index 3"):
        vg.snapshot(3)
    with pytest.raises(ValueError, match="unknown device index -1"):
        vg.snapshot(-1)
    with pytest.raises(TypeError, match="device must be an int"):
        vg.snapshot("0")
    with pytest.raises(TypeError, match="device index must be an int"):
        _native.snapshot("0")
    with pytest.raises(ValueError):
        vg.set_reserve("1GB", device=7)
    with pytest.raises(ValueError):
        _native.snapshot(2**80)


def test_simulate_bad_input():
    with pytest.raises(ValueError, match="exceeds total"):
        vg.simulate("1GB", "2GB")
    with pytest.raises(ValueError, match="total is required"):
        _native.simulate(0, used=5)
    with pytest.raises(ValueError, match="index must be"):
        _native.simulate(5, total=10)
    with pytest.raises(ValueError, match="non-decreasing"):
        vg.simulate("8GB", script=[(1.0, 0), (0.5, 1)])
    with pytest.raises(TypeError, match="script"):
        vg.simulate("8GB", script=[5])
    assert vg.device_count() == 0 or not vg.gpu_status()["simulated"]


def test_probe_feeds_snapshot_on_real_devices_only():
    calls = []

    def probe(i):
        calls.append(i)
        return {"reserved": 100, "allocated": 40}

    vg.register_probe(probe)
    vg.simulate("8GB", "1GB")
    s = vg.snapshot(0)
    assert calls == [] and s.framework_reserved is None  # simulated devices ignore probes


def test_probe_validation_via_native(fake_nvml):
    code = """
        import vramguard as vg, json
        def good(i): return {"reserved": 3<<30, "allocated": 1<<30, "active": 1<<30,
                             "oom_count": 2, "retry_count": 5}
        vg.register_probe(good)
        s = vg.snapshot(0)
        out = {"evictable": s.evictable, "budget": s.budget, "oom": s.oom_count, "free": s.free,
               "reserved": s.framework_reserved}
        vg.register_probe(lambda i: {"free": 7 << 30, "reserve": 1 << 30})
        s = vg.snapshot(0)
        out["host_free_evictable"] = s.evictable; out["host_reserve"] = s.reserve
        out["host_budget"] = s.budget
        vg.register_probe(lambda i: {"reserved": "x"}, safe=False)
        try:
            vg.snapshot(0); out["err"] = None
        except TypeError as e:
            out["err"] = str(e)
        vg.register_probe(lambda i: 1/0)   # safe: logged once, ignored
        out["safe_budget"] = vg.snapshot(0).budget
        print(json.dumps(out))
    """
    r = run_py(code, env={"VRAMGUARD_NVML_LIB": str(fake_nvml),
                          "FAKE_NVML_DEVICES": f"{8 << 30}:{4 << 30}"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["free"] == 4 << 30
    assert out["evictable"] == 2 << 30             # reserved - active
    assert out["budget"] == 6 << 30
    assert out["oom"] == 2 and out["reserved"] == 3 << 30
    assert out["host_free_evictable"] == 3 << 30   # host free 7 - driver free 4
    assert out["host_reserve"] == 1 << 30 and out["host_budget"] == 6 << 30
    assert "reserved must be a number of bytes" in out["err"]
    assert out["safe_budget"] == 4 << 30
    assert "probe failed" in r.stderr


def test_nvml_path_with_fake_library(fake_nvml):
    code = """
        import vramguard as vg, json
        vg.set_reserve("1GB")
        print(json.dumps([vg.snapshot_dict(s) for s in vg.snapshots()]))
    """
    env = {"VRAMGUARD_NVML_LIB": str(fake_nvml), "FAKE_NVML_DEVICES": f"{8 << 30}:{1 << 30},{24 << 30}:0",
           "FAKE_NVML_PROC_USED": str(500 << 20)}
    r = run_py(code, env=env)
    assert r.returncode == 0, r.stderr
    devs = json.loads(r.stdout)
    assert [d["name"] for d in devs] == ["Fake GPU 0", "Fake GPU 1"]
    assert devs[0]["total"] == 8 << 30 and devs[0]["free"] == 7 << 30 and devs[0]["source"] == "nvml"
    assert devs[0]["process_used"] == 500 << 20
    assert devs[0]["budget"] == 6 << 30 and devs[1]["budget"] == 23 << 30
    assert devs[1]["uuid"] == "GPU-00000001-fake-uuid"
    # v1 fallback gives the same figures
    r2 = run_py(code, env={**env, "FAKE_NVML_NO_V2": "1"})
    assert json.loads(r2.stdout)[0]["free"] == 7 << 30


@pytest.mark.parametrize("cvd,names", [("1", ["Fake GPU 1"]), ("1,0", ["Fake GPU 1", "Fake GPU 0"]),
                                       ("0,7,1", ["Fake GPU 0"]), ("", []),
                                       ("GPU-00000001", ["Fake GPU 1"]), ("-1", [])])
def test_cuda_visible_devices_mapping(fake_nvml, cvd, names):
    code = """
        import vramguard as vg, json
        print(json.dumps({"names": [s.name for s in vg.snapshots()], "st": vg.gpu_status()}))
    """
    r = run_py(code, env={"VRAMGUARD_NVML_LIB": str(fake_nvml), "CUDA_VISIBLE_DEVICES": cvd,
                          "FAKE_NVML_DEVICES": f"{8 << 30}:0,{16 << 30}:0"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["names"] == names
    if not names:
        assert "CUDA_VISIBLE_DEVICES" in out["st"]["devices_reason"]


def test_nvml_init_failure_reason(fake_nvml):
    r = run_py("import vramguard, json; print(json.dumps(vramguard.gpu_status()))",
               env={"VRAMGUARD_NVML_LIB": str(fake_nvml), "FAKE_NVML_INIT_FAIL": "9"})
    st = json.loads(r.stdout)
    assert "nvmlInit_v2 failed: NVML error 9 (Driver Not Loaded)" in st["nvml"]


def _meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            out[k] = int(v.split()[0]) * 1024
    return out


def test_host_matches_proc_and_os():
    h = vg.host()
    mi = _meminfo()
    total = mi["MemTotal"]
    if h.cgroup_limit:
        assert h.cgroup_limit < total and h.total == h.cgroup_limit
    else:
        assert h.total == total
    assert abs(h.available - min(mi["MemAvailable"], h.total)) < 256 << 20
    assert total == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert abs(h.process_rss - rss) < 64 << 20
    import numpy as np
    big = np.ones(200 << 20, dtype=np.uint8)  # RSS must grow by ~200 MiB
    assert vg.host().process_rss - h.process_rss > 150 << 20
    del big


def test_host_rss_after_fork_is_the_childs():
    r = run_py("""
        import os, vramguard as vg, numpy as np
        vg.host()
        pid = os.fork()
        if pid == 0:
            a = np.ones(300 << 20, dtype=np.uint8)
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            os._exit(0 if abs(vg.host().process_rss - rss) < (64 << 20) else 3)
        print(os.waitpid(pid, 0)[1] >> 8)
    """)
    assert r.stdout.strip() == "0", r.stderr


def test_snapshot_type_is_not_constructible_with_garbage():
    with pytest.raises(TypeError):
        vg.budget_of(42)
    with pytest.raises(ValueError):
        vg.budget_of({"total": -5})
    with pytest.raises(ValueError):
        vg.budget_of({"total": math.nan})


# ---------------------------------------------------------------- host RAM as a source, overrides

def test_host_snapshot_is_a_source_with_a_budget():
    h = vg.host(fresh=True)
    s = vg.snapshot(None)
    assert (s.index, s.source, s.name) == (None, "host", "host RAM")
    assert s.total == h.total and s.used == s.total - s.free
    assert abs(s.free - h.available) < 512 << 20       # a fresh read a moment later
    assert s.process_used is not None and s.process_used > 0
    assert s.reserve == 0 and s.budget == s.free        # nothing reserved yet
    assert _native.snapshot().source == "host"          # the C default is host RAM


def test_host_reserve_is_its_own_and_feeds_the_budget():
    vg.set_reserve("1GB")                               # every GPU: not the host
    assert vg.snapshot(None).reserve == 0
    vg.set_reserve("2GiB", device="host")
    assert vg.limits("host") == {"reserve": 2 * GiB, "cap": 0}
    assert vg.limits() == {"reserve": vg.parse_size("1GB"), "cap": 0}
    s = vg.snapshot(None)
    assert s.reserve == 2 * GiB
    assert s.budget == max(0, s.free - s.reserve)
    vg.clear_limits()
    assert vg.limits("host")["reserve"] == 0


def test_per_call_reserve_is_a_floor():
    vg.simulate("8GB", "2GB")
    vg.set_reserve("1GiB", device=0)
    assert vg.snapshot(0, reserve="512MiB").reserve == 1 * GiB   # configured wins
    s = vg.snapshot(0, reserve="3GiB")
    assert s.reserve == 3 * GiB and s.budget == 3 * GiB
    vg.register_probe(lambda i: {"reserve": 4 * GiB})            # probe ignored on simulated
    assert vg.snapshot(0, reserve=2 * GiB).reserve == 2 * GiB


def test_per_call_reserve_and_probe_reserve_take_the_max(fake_nvml):
    code = """
        import vramguard as vg
        G = 1 << 30
        vg.register_probe(lambda i: {"reserve": 3 * G}, safe=False)
        vg.set_reserve(1 * G, device=0)
        print(vg.snapshot(0).reserve // G, vg.snapshot(0, reserve=5 * G).reserve // G,
              vg.snapshot(0, reserve=2 * G).reserve // G)
    """
    r = run_py(code, env={"VRAMGUARD_NVML_LIB": str(fake_nvml), "FAKE_NVML_DEVICES": f"{8 * GiB}:0"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["3", "5", "3"]


def test_card_snapshot():
    s = vg.snapshot(None, card="8GiB", reserve="1GiB")
    assert (s.source, s.total, s.free, s.used, s.process_used) == ("card", 8 * GiB, 8 * GiB, 0, 0)
    assert s.reserve == 1 * GiB and s.budget == 7 * GiB
    assert vg.snapshot(card=8 * GiB).budget == 8 * GiB             # no reserve given: 0
    vg.set_reserve("2GiB")                                          # configured: not for a card
    assert vg.snapshot(card=8 * GiB).reserve == 0
    with pytest.raises(ValueError, match="card"):
        _native.snapshot(card=0)
    with pytest.raises(TypeError, match="card"):
        _native.snapshot(card="8GB")        # the C layer takes bytes; units are the Python layer's


def test_snapshot_bad_arguments():
    with pytest.raises(ValueError, match="reserve"):
        vg.snapshot(None, reserve=-1)
    with pytest.raises(TypeError, match="device"):
        _native.snapshot("host")
    with pytest.raises(ValueError, match="device must be an index"):
        _native.set_limits("gpu0", reserve=1)
    with pytest.raises(TypeError):
        _native.snapshot(None, 5)           # reserve and card are keyword-only


def test_policy_check_and_sampler_on_host_ram():
    p = _native.Policy(threshold=0.0, min_interval=0)
    collect, reason, snap = p.check(None)
    assert collect and reason == "threshold" and snap.source == "host" and snap.index is None
    p2 = _native.Policy(threshold=100.0)
    collect, reason, snap = p2.check(None, False, 1 << 62)  # need more than any host has
    assert collect and reason == "budget"


def test_budget_is_exact_past_int64_in_between():
    """Found by scripts/fuzz.py: free + evictable past INT64_MAX was saturated before the
    reserve was subtracted, so a large reserve took away more than it should."""
    free, ev, res = 9_200_000_000_000_000_000, 4_611_686_018_427_387_904, 9_000_000_000_000_000_000
    assert _native.budget({"free": free, "evictable": ev, "reserve": res}) == free + ev - res
    assert _native.budget({"free": free, "evictable": ev, "reserve": 0}) == 2**63 - 1
    # with a cap: live = max(0, held - evictable), room = cap - live
    assert _native.budget({"free": free, "evictable": ev, "reserve": res, "cap": 2**62,
                           "process_used": 2**62 + 5}) == 2**62


@pytest.mark.skipif(bool(os.environ.get("VRAMGUARD_SANITIZED")) or "asan" in os.environ.get("LD_PRELOAD", ""),
                    reason="GCC 12's libasan has no fork interceptor: a child forked while a thread is "
                           "inside ASan's malloc can deadlock (see tests/test_fork_load.py); the plain pass runs it")
@pytest.mark.parametrize("how", ["os.fork", "libc fork"])
def test_forked_child_reads_its_own_rss(how):
    """The host source's /proc/self files are reopened after a fork (a fork generation bumped by
    pthread_atfork): a child's process_rss is its own, not the parent's -- also after a fork
    from C that runs no Python at-fork hook (another extension's fork)."""
    import ctypes

    from vramguard import _native

    _native.host(True)  # the parent has its files open
    r, w = os.pipe()
    pid = os.fork() if how == "os.fork" else ctypes.CDLL(None, use_errno=True).fork()
    if pid == 0:
        ok = 1
        try:
            os.close(r)
            big = bytearray(160 << 20)  # touched pages: the child is 160 MiB larger than the parent
            big[:: 4096] = b"x" * len(big[:: 4096])
            page = os.sysconf("SC_PAGE_SIZE")
            own = int(open("/proc/self/statm").read().split()[1]) * page
            got = _native.host(True).process_rss
            ok = 0 if abs(got - own) < (32 << 20) else 1
            os.write(w, f"{got} {own}".encode())
        finally:
            os._exit(ok)
    os.close(w)
    msg = os.read(r, 200).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0, f"child's process_rss vs its statm: {msg}"
