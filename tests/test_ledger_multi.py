"""Issue 13, the rest: cheap budget reads, the reserve that learns, pinned host memory and the
RAM reserve, multi-GPU all the way (two simulated devices; the fake NVML with two), and the
summary that status, the node and the monitor show."""
import json
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest

import vramguard as vg
from vramguard import _native, hostram, ledger

from conftest import run_py
from test_ledger import CTX as _CTX, _end, _spawn_planner, hammer

GiB = 2**30
MiB = 2**20


@pytest.fixture
def region(tmp_path, monkeypatch):
    path = str(tmp_path / "ledger")
    monkeypatch.setenv(ledger.ENV_PATH, path)
    yield path
    ledger.leave()
    vg.set_learn_reserve(False)
    vg.set_pinned_cap(None)


def _two_devices():
    _native.simulate(0, total=24 * GiB, used=0, process_used=0)
    _native.simulate(1, total=12 * GiB, used=0, process_used=0)
    vg.set_reserve(1 * GiB, device=0)
    vg.set_reserve(2 * GiB, device=1)


def _spawn(path, plans):
    """A participant process with {device: bytes} planned (test_ledger's planner)."""
    return _spawn_planner(path, plans, setup=_two_devices)


# ---------------------------------------------------------------- budget reads: cached, exact

def test_cached_reads_see_every_plan_at_once(region):
    """The cache is keyed by the header's generation word: another process's plan or clear
    shows in the very next budget read, no interval to wait."""
    _two_devices()
    assert ledger.join(region)["joined"]
    p = _spawn(region, {0: 3 * GiB})
    try:
        for _ in range(3):  # repeated reads answer from the cache: same figure
            assert vg.snapshot(0).budget == 23 * GiB - 3 * GiB
        # the participant's plan changes: it is another process, so write through its API
        # by a second participant and watch ours follow without sleeping
        q = _spawn(region, {0: 2 * GiB, 1: 1 * GiB})
        try:
            assert vg.snapshot(0).budget == 23 * GiB - 5 * GiB
            assert vg.snapshot(1).budget == 10 * GiB - 1 * GiB
        finally:
            _end(q)
        assert ledger.sweep() == 1
        assert vg.snapshot(0).budget == 20 * GiB and vg.snapshot(1).budget == 10 * GiB
        assert vg.snapshot(0).others_planned == 3 * GiB  # the Snapshot field
    finally:
        _end(p)


def test_sigkilled_claim_vanishes_within_revalidate_s_without_explicit_sweep(region):
    _two_devices()
    st = ledger.join(region, revalidate_s=0.05)
    assert st["joined"] and st["revalidate_s"] == 0.05
    p = _spawn(region, {0: 4 * GiB})
    assert vg.snapshot(0).budget == 19 * GiB
    p.kill()
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # dead (a zombie), not reaped
    time.sleep(0.12)  # > revalidate_s: the next budget read polls the pidfds
    assert vg.snapshot(0).budget == 23 * GiB
    assert ledger.status()["swept"] >= 1
    p.join()


def test_revalidate_s_is_checked(region):
    with pytest.raises(ValueError, match="revalidate_s"):
        ledger.join(region, revalidate_s=-1)
    with pytest.raises(TypeError, match="revalidate_s"):
        ledger.join(region, revalidate_s="fast")


# ---------------------------------------------------------------- the reserve that learns

def test_learned_reserve_off_by_default(region):
    _native.simulate(0, total=24 * GiB, used=6 * GiB, process_used=1 * GiB)
    s = vg.snapshot(0)
    assert s.learned_reserve == 0 and s.reserve == 0
    lr = vg.learned_reserve(0)
    assert lr["enabled"] is False and "off" in lr["reason"]


def test_learned_reserve_keeps_room_for_the_others_peak(region):
    # others (a game) use 6 GiB - 1 GiB ours = 5 GiB now, at their peak: the margin only
    _native.simulate(0, total=24 * GiB, used=6 * GiB, process_used=1 * GiB)
    vg.set_reserve(512 * MiB, device=0)
    vg.set_learn_reserve(True, window_s=60, margin=256 * MiB)
    s = vg.snapshot(0)
    assert s.learned_reserve == 256 * MiB and s.reserve == 512 * MiB  # configured is larger
    # the game drops to 1 GiB: keep 4 GiB for it to come back, + the margin
    _native.simulate(0, total=24 * GiB, used=2 * GiB, process_used=1 * GiB)
    s = vg.snapshot(0)
    assert s.learned_reserve == 4 * GiB + 256 * MiB
    assert s.reserve == s.learned_reserve  # joins the max
    assert s.budget == 22 * GiB - s.reserve
    lr = vg.learned_reserve(0)
    assert lr["peak"] == 5 * GiB and lr["now"] == 1 * GiB and lr["known"]
    assert "peaked at 5.00 GiB" in lr["reason"] and "1.00 GiB now" in lr["reason"]
    vg.set_learn_reserve(False)  # off forgets, and the configured reserve rules again
    assert vg.snapshot(0).reserve == 512 * MiB
    with pytest.raises(ValueError, match="window_s"):
        vg.set_learn_reserve(True, window_s=0.5)
    with pytest.raises(TypeError, match="enabled"):
        vg.set_learn_reserve(1)


def _user(path, ready):
    """A participant whose measured use (3 GiB on device 0) goes into its slot."""
    _native.simulate(0, total=24 * GiB, used=3 * GiB, process_used=3 * GiB)
    ok = ledger.join(path)["joined"]
    vg.snapshot(0)  # publishes process_used
    ready.put(ok)
    time.sleep(60)


def test_learned_reserve_does_not_count_participants(region):
    """Another vramguard process's measured use is not a foreign application's."""
    assert ledger.join(region)["joined"]
    q = _CTX.Queue()
    p = _CTX.Process(target=_user, args=(region, q), daemon=True)
    p.start()
    try:
        assert q.get(timeout=30) is True
        vg.set_learn_reserve(True, window_s=60, margin=0)
        # used 5 GiB = 1 ours + 3 the participant's + 1 a game's
        _native.simulate(0, total=24 * GiB, used=5 * GiB, process_used=1 * GiB)
        vg.snapshot(0)
        _native.simulate(0, total=24 * GiB, used=4 * GiB, process_used=1 * GiB)
        s = vg.snapshot(0)
        assert vg.learned_reserve(0)["peak"] == 1 * GiB
        assert s.learned_reserve == 1 * GiB  # the game may come back to 1 GiB; now 0
    finally:
        _end(p)


# ---------------------------------------------------------------- multi-GPU, fake NVML

def test_two_nvml_devices_per_device_reserve_cap_ledger_learned(region, fake_nvml, tmp_path):
    """Two processes on the fake NVML's two devices: per-device reserves, caps, plans and
    learned reserves stay per device all the way to the budget and the summary."""
    used = tmp_path / "used"
    used.write_text(f"{2 << 30},{1 << 30}")
    env = {"VRAMGUARD_NVML_LIB": str(fake_nvml), "FAKE_NVML_USED_FILE": str(used),
           "FAKE_NVML_DEVICES": f"{24 << 30}:0,{12 << 30}:0", "FAKE_NVML_PROC_USED": "0",
           "FAKE_NVML_PROC_OTHERS": "0", ledger.ENV_PATH: region}
    planner = subprocess.Popen([sys.executable, "-c", (
        "import sys, vramguard as vg\n"
        "assert vg.ledger.join()['joined']\n"
        "assert vg.ledger.plan(1, 3 << 30, fit=True)\n"
        "print('ok', flush=True); sys.stdin.read()")], env={**os.environ, **env},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert planner.stdout.readline().strip() == "ok"
        code = f"""
            import json, vramguard as vg
            assert vg.device_count() == 2
            vg.set_reserve("1GB", device=0); vg.set_reserve("2GB", device=1)
            vg.set_cap("10GB", device=0)
            vg.ledger.join()
            vg.set_learn_reserve(True, window_s=60, margin=0)
            a = [vg.snapshot(i) for i in (0, 1)]
            open({str(used)!r}, "w").write("{1 << 30},{1 << 30}")  # device 0's other app: -1 GiB
            b = [vg.snapshot(i) for i in (0, 1)]
            print(json.dumps({{"a": [s._asdict() if hasattr(s, "_asdict") else list(s) for s in a],
                              "b0": [b[0].budget, b[0].reserve, b[0].learned_reserve, b[0].cap],
                              "b1": [b[1].budget, b[1].reserve, b[1].learned_reserve, b[1].others_planned],
                              "summary": vg.ledger.summary()}}))
        """
        r = run_py(code, env=env)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        GB = 1 << 30
        # device 0: free 22 GiB, reserve 1 GB, cap 10 GB (process holds 0): min(...)=10 GB
        assert out["b0"][3] == 10 * GB and out["b0"][0] == 10 * GB
        assert out["b0"][2] == 1 << 30  # the other app may come back to 2 GiB
        assert out["b0"][1] == max(1 * GB, 1 << 30)
        # device 1: free 11 GiB - reserve 2 GB - the other process's 3 GiB plan; learned 0
        assert out["b1"][3] == 3 << 30 and out["b1"][2] == 0
        assert out["b1"][1] == 2 * GB and out["b1"][0] == (11 << 30) - 2 * GB - (3 << 30)
        summ = out["summary"]
        assert summ["devices"]["1"]["planned"] == 3 << 30 and summ["devices"]["0"]["planned"] == 0
        assert summ["devices"]["0"]["configured_reserve"] == 1 * GB
        assert summ["devices"]["1"]["configured_reserve"] == 2 * GB
        assert summ["devices"]["0"]["learned_reserve"]["reserve"] == 1 << 30
        assert len(summ["participants"]) == 2
    finally:
        planner.stdin.close()
        planner.wait(30)


# ---------------------------------------------------------------- summary, CLI, node

SUMMARY_KEYS = {"version", "ledger", "participants", "devices", "pinned", "host"}
DEVICE_KEYS = {"participants", "planned", "outstanding", "used", "total", "free", "budget",
               "reserve", "configured_reserve", "cap", "others_planned", "learned_reserve"}
PINNED_KEYS = {"locked", "pinned", "torch_host_cache", "comfy_pinned", "comfy_max", "held", "cap"}


def test_summary_keys_are_stable_and_json_ready(region):
    _two_devices()
    ledger.join(region)
    p = _spawn(region, {0: 1 * GiB, 1: 2 * GiB})
    try:
        s = ledger.summary()
        json.dumps(s)
        assert set(s) == SUMMARY_KEYS and s["version"] == 1
        assert set(s["devices"]) >= {"0", "1"}
        for d in ("0", "1"):
            assert set(s["devices"][d]) == DEVICE_KEYS
        assert set(s["pinned"]) == PINNED_KEYS
        assert s["devices"]["0"]["planned"] == 1 * GiB and s["devices"]["1"]["planned"] == 2 * GiB
        assert s["devices"]["1"]["budget"] == 10 * GiB - 2 * GiB
        other = [q for q in s["participants"] if not q["self"]][0]
        assert other["pid"] == p.pid and other["devices"]["1"]["planned"] == 2 * GiB
        text = ledger.summary_text(s)
        assert f"pid {p.pid}" in text and "GPU 1: 1 claim(s)" in text
    finally:
        _end(p)


def test_cli_status_lists_participants(region):
    _two_devices()
    p = _spawn(region, {0: 2 * GiB, 1: 3 * GiB})
    try:
        env = {**os.environ, ledger.ENV_PATH: region}
        r = subprocess.run([sys.executable, "-m", "vramguard", "status", "--json", "--simulate", "8GB"],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        data = json.loads(r.stdout)
        led = data["ledger"]
        assert led["ledger"]["peeked"] is True
        assert [q["pid"] for q in led["participants"]] == [p.pid]
        assert led["participants"][0]["devices"]["1"]["planned"] == 3 * GiB
        # the table's budget counts the participant's plan, like its own budgets do
        assert data["devices"][0]["budget"] == 6 * GiB == led["devices"]["0"]["budget"]
        r = subprocess.run([sys.executable, "-m", "vramguard", "status", "--simulate", "8GB"],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        assert (f"pid {p.pid}: GPU 0 used 0.00 GiB planned 2.00 GiB, GPU 1 used 0.00 GiB "
                f"planned 3.00 GiB") in r.stdout.replace("\n    ", " ")
        assert "pinned host memory" in r.stdout
        assert ledger.status()["joined"] is False  # this process never joined
    finally:
        _end(p)


def test_memory_snapshot_node_has_a_ledger_output(region):
    pytest.importorskip("torch")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from nodes import pack

    _two_devices()
    ledger.join(region)
    node = pack.MemorySnapshot()
    assert pack.MemorySnapshot.RETURN_NAMES[-1] == "ledger"
    res = node.execute(device=1)["result"]
    assert len(res) == len(pack.MemorySnapshot.RETURN_TYPES)
    assert "GPU 1:" in res[-1] and "GPU 0:" not in res[-1]


# ---------------------------------------------------------------- pinned host memory

def _fake_comfy(monkeypatch, pinned):
    mm = types.ModuleType("comfy.model_management")
    mm.TOTAL_PINNED_MEMORY = pinned
    mm.MAX_PINNED_MEMORY = 64 * GiB
    calls = []

    def free_registrations(n):
        calls.append(("free_registrations", n))
        freed = min(n, mm.TOTAL_PINNED_MEMORY // 2)
        mm.TOTAL_PINNED_MEMORY -= freed
        return freed

    def free_pins(n):
        calls.append(("free_pins", n))
        mm.TOTAL_PINNED_MEMORY -= min(n, mm.TOTAL_PINNED_MEMORY)
        return n

    mm.free_registrations, mm.free_pins = free_registrations, free_pins
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    return mm, calls


def test_pinned_host_counts_comfyui_and_the_kernel(region, monkeypatch):
    mm, _ = _fake_comfy(monkeypatch, 3 * GiB)
    ledger.join(region)
    p = vg.pinned_host()
    assert p["comfy_pinned"] == 3 * GiB and p["comfy_max"] == 64 * GiB
    assert p["held"] >= 3 * GiB and p["locked"] is not None
    assert ledger.participants()[0]["host_pinned"] == p["held"]
    h = vg.host()
    assert h.locked is not None and h.pinned is not None  # VmLck/VmPin in the host source


def test_pinned_cap_unpins_through_the_host_and_logs_in_the_gc_line(region, monkeypatch, caplog):
    import logging

    mm, calls = _fake_comfy(monkeypatch, 6 * GiB)
    assert hostram.enforce_pinned_cap() is None  # no cap
    vg.set_pinned_cap("2GB")
    assert hostram.get_pinned_cap() == 2 * GiB
    rec = hostram.enforce_pinned_cap()
    assert rec is not None and rec["before"] >= 6 * GiB and rec["after"] <= 2 * GiB
    assert rec["host_asked"] and [c[0] for c in calls] == ["free_registrations", "free_pins"]
    # the GC line of a collection carries it
    mm.TOTAL_PINNED_MEMORY = 5 * GiB
    _native.simulate(0, total=8 * GiB, used=7 * GiB, process_used=7 * GiB)
    g = vg.GCGuard(threshold=0)
    with caplog.at_level(logging.DEBUG, logger="vramguard"):
        d = g.check("vae_decode", forced=True)
    assert d.record["gc"]["pinned"] <= 2.0 and d.record["gc"]["unpinned"] >= 3.0
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("GC:")][-1]
    assert "'unpinned':" in line
    assert vg.parse_log_line(line)["gc"]["unpinned"] >= 3.0
    with pytest.raises(ValueError, match="pinned cap"):
        vg.set_pinned_cap(-1)


def test_pinned_pool_gives_way_to_the_ram_reserve(region, monkeypatch):
    """No cap set, but host RAM is 3 GiB short of the RAM reserve: the pinned pool (6 GiB
    ComfyUI pins here) is brought down by the shortfall."""
    mm, calls = _fake_comfy(monkeypatch, 6 * GiB)
    assert hostram.enforce_pinned_cap() is None  # no cap, no RAM reserve: nothing to do
    vg.set_reserve(vg.snapshot(None).free + 3 * GiB, device="host")
    try:
        rec = hostram.enforce_pinned_cap()
    finally:
        vg.set_reserve(0, device="host")
    assert rec is not None and rec["cap"] == 0
    slack = 256 * MiB  # host RAM available moves a little between the two readings
    assert abs(rec["ram_short"] - 3 * GiB) < slack
    assert abs(rec["released"] - 3 * GiB) < slack and rec["after"] <= rec["limit"]
    assert calls and calls[0][0] == "free_registrations"


def test_output_canvas_respects_the_ram_reserve(region):
    avail = vg.snapshot(None).free
    vg.simulate("8GB", "0")
    img = np.zeros((1, 64, 64, 3), np.float32)
    vg.set_reserve(max(avail - 1024, 0), device="host")  # ~1 KiB of host budget left
    try:
        with pytest.raises(vg.HostMemoryLow, match="output canvas needs .* RAM reserve"):
            vg.tiled(lambda t: t, img, scale=1, overlap=8, device=0)
        # streaming into a caller's array (np.memmap in real use) is not a new allocation
        out = np.empty_like(img)
        vg.tiled(lambda t: t, img, scale=1, overlap=8, device=0, out=out)
    finally:
        vg.set_reserve(0, device="host")
    assert vg.tiled(lambda t: t, img, scale=1, overlap=8, device=0).shape == img.shape


# ---------------------------------------------------------------- N processes, two devices

@pytest.mark.slow
def test_two_devices_claims_never_exceed_free_minus_reserve_per_device(region):
    """N real processes planning on two devices with SIGKILLs in the middle: at every
    consistent sample each device's claims stay within its own free - reserve."""
    hammer(region, {0: 23 * GiB, 1: 10 * GiB}, totals={0: 24 * GiB, 1: 12 * GiB},
           setup=_two_devices, min_kills=5)


def _host_reader(path, ready, go):
    _two_devices()
    ok = ledger.join(path)["joined"]
    ready.put(ok)
    go.get(timeout=30)
    for _ in range(50):
        vg.snapshot(None)  # host RAM: its RSS goes to the slot
    ledger.plan(0, GiB)
    ready.put(True)
    time.sleep(60)


def test_host_figures_do_not_invalidate_the_others_cache(region):
    """Only device figures bump the generation the budget cache is keyed by: another
    participant reading host RAM in a loop costs this one's budget reads nothing."""
    _two_devices()
    ledger.join(region)
    ready, go = _CTX.Queue(), _CTX.Queue()
    p = _CTX.Process(target=_host_reader, args=(region, ready, go), daemon=True)
    p.start()
    try:
        assert ready.get(timeout=30) is True
        g0 = ledger.status()["generation"]
        go.put(1)
        assert ready.get(timeout=30) is True
        other = [q for q in ledger.participants() if not q["self"]][0]
        assert other["host_rss"] > 0  # the host figures did arrive
        assert ledger.status()["generation"] == g0 + 1  # the plan alone bumped it
        assert vg.snapshot(0).budget == 22 * GiB
    finally:
        _end(p)


def test_a_replaced_region_is_followed(region):
    """The path removed (a clean-up) or re-created: budget reads notice within revalidate_s,
    leave the old file and join the one at the path, where newcomers meet."""
    _two_devices()
    st = ledger.join(region, revalidate_s=0.02)
    old = os.stat(region).st_ino
    p = _spawn(region, {0: 2 * GiB})  # stays in the old file: it never reads a budget
    try:
        assert vg.snapshot(0).budget == 21 * GiB
        os.unlink(region)
        time.sleep(0.1)
        assert vg.snapshot(0).budget == 23 * GiB  # the old file's plans are not ours now
        st = ledger.status()
        assert st["joined"] and st["rejoins"] == 1 and os.stat(region).st_ino != old
        q = _spawn(region, {0: 5 * GiB})  # a newcomer meets us at the path
        try:
            assert vg.snapshot(0).budget == 18 * GiB
        finally:
            _end(q)
    finally:
        _end(p)
