"""The shared ledger (issue 13): real processes on one simulated device.

Every test uses its own region file (VRAMGUARD_LEDGER_PATH-style path under tmp_path), so
nothing here touches /dev/shm/vramguard-<uid> of a real ComfyUI running beside the tests.
"""
import mmap
import multiprocessing as mp
import os
import random
import signal
import struct
import threading
import time

import pytest

import vramguard as vg
from vramguard import _native, ledger

GiB = 2**30
TOTAL = 24 * GiB
RESERVE = 2 * GiB

# Layout of version 1 (csrc/ledger.c): a 64-byte header, then 64 slots of 448 bytes.
HEADER, SLOT, NSLOTS, NDEV = 64, 448, 64, 16
OFF_PID, OFF_START, OFF_DEV = 8, 16, 48  # within a slot; a device is (used, planned, pending)

CTX = mp.get_context("fork")


@pytest.fixture
def region(tmp_path):
    path = str(tmp_path / "ledger")
    yield path
    ledger.leave()


def _setup_device():
    _native.simulate(0, total=TOTAL, used=0)
    vg.set_reserve(RESERVE, device=0)


def _slot_off(k):
    return HEADER + k * SLOT


def _write_slot(path, k, pid, start, planned0):
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
        o = _slot_off(k)
        m[o + OFF_START:o + OFF_START + 8] = struct.pack("<q", start)
        m[o + OFF_DEV + 8:o + OFF_DEV + 16] = struct.pack("<q", planned0)
        m[o + OFF_PID:o + OFF_PID + 8] = struct.pack("<q", pid)
        m.close()


def _start_time(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


# ---------------------------------------------------------------- helpers run in children

def _planner(path, plans, ready, setup=None):
    """Join, plan `plans` (bytes on device 0, or {device: bytes}), say so, wait to be killed
    (no shared lock is held while waiting: a SIGKILLed waiter would leave it locked)."""
    (setup or _setup_device)()
    plans = plans if isinstance(plans, dict) else {0: plans}
    st = ledger.join(path)
    ok = st["joined"] and all(ledger.plan(d, n) for d, n in plans.items())
    ready.put(ok)
    time.sleep(60)


def _random_claims(path, seed, counts, idx, stop, totals=None, setup=None):
    """Random plans (fit=True) and releases on the devices of `totals` ({index: bytes};
    default device 0 of TOTAL) until `stop`; counts[2*idx] successes, counts[2*idx+1]
    refusals.  No multiprocessing lock is touched: these processes are SIGKILLed at random and
    would leave it held."""
    (setup or _setup_device)()
    if not ledger.join(path)["joined"]:
        return
    totals = totals or {0: TOTAL}
    rng = random.Random(seed)
    while not stop.value:
        d = rng.choice(sorted(totals))
        n = rng.randint(totals[d] // 20, totals[d] // 3)
        if ledger.plan(d, n, fit=True):
            counts[2 * idx] += 1
            time.sleep(rng.uniform(0, 0.004))
            ledger.clear(d)
        else:
            counts[2 * idx + 1] += 1
        time.sleep(rng.uniform(0, 0.002))


def _spawn_planner(path, plans, setup=None):
    q = CTX.Queue()
    p = CTX.Process(target=_planner, args=(path, plans, q, setup), daemon=True)
    p.start()
    assert q.get(timeout=30) is True
    return p


def _wait_zombie(pid):
    """Until a killed child is a zombie, without reaping it (WNOWAIT): the whole thread group
    has exited (its queue feeder thread too), its pid still exists.  Not a sleep: SIGKILL is
    not instant under ASan, where a large address space takes a while to tear down."""
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def _end(p):
    p.kill()
    p.join()


# ---------------------------------------------------------------- basics

def test_off_by_default():
    _setup_device()
    st = ledger.status()
    assert st["joined"] is False and "not joined" in st["reason"]
    assert vg.snapshot(0).budget == TOTAL - RESERVE
    assert ledger.participants() == []
    assert ledger.plan(0, GiB) is True  # nothing to contend with, nothing recorded


def test_join_makes_a_private_versioned_region(region):
    st = ledger.join(region)
    assert st["joined"], st
    assert st["size"] == HEADER + NSLOTS * SLOT and st["slots"] == NSLOTS
    s = os.stat(region)
    assert s.st_mode & 0o777 == 0o600 and s.st_size == st["size"]
    me = ledger.participants()
    assert [p["pid"] for p in me] == [os.getpid()] and me[0]["self"]
    assert me[0]["start_time"] == _start_time(os.getpid())
    assert ledger.join(region)["slot"] == st["slot"]  # idempotent
    ledger.leave()
    assert not ledger.status()["joined"]


def test_package_level_api(region):
    assert vg.ledger_join(region)["joined"]
    with vg.ledger_claim(0, GiB):
        assert vg.ledger_participants()[0]["devices"][0]["planned"] == GiB
    assert vg.ledger_status()["joined"]
    vg.ledger_leave()
    assert not vg.ledger_status()["joined"]


def test_own_plan_does_not_shrink_own_budget(region):
    _setup_device()
    ledger.join(region)
    assert ledger.plan(0, 5 * GiB, fit=True)
    assert vg.snapshot(0).budget == TOTAL - RESERVE
    assert ledger.participants()[0]["devices"][0]["planned"] == 5 * GiB
    ledger.clear(0)
    assert 0 not in ledger.participants()[0]["devices"]


def test_other_plan_shrinks_budget_and_dies_with_its_process(region):
    _setup_device()
    assert ledger.join(region)["joined"]
    p = _spawn_planner(region, 7 * GiB)
    try:
        assert ledger.others_planned(0) == 7 * GiB
        assert vg.snapshot(0).budget == TOTAL - RESERVE - 7 * GiB
        assert ledger.plan(0, TOTAL - RESERVE - 7 * GiB + 1, fit=True) is False
        assert ledger.plan(0, TOTAL - RESERVE - 7 * GiB, fit=True) is True
        ledger.clear(0)
        os.kill(p.pid, signal.SIGKILL)  # mid-plan; left a zombie: not reaped yet
        _wait_zombie(p.pid)
        assert ledger.sweep() == 1  # one sweep
        assert [q["pid"] for q in ledger.participants()] == [os.getpid()]
        assert vg.snapshot(0).budget == TOTAL - RESERVE
    finally:
        _end(p)


def _two_devices():
    _setup_device()
    _native.simulate(1, total=TOTAL // 2, used=0)


def test_plans_are_per_device(region):
    _two_devices()
    vg.set_reserve(RESERVE, device=1)
    ledger.join(region)
    p = _spawn_planner(region, {1: 3 * GiB}, setup=_two_devices)
    try:
        assert vg.snapshot(0).budget == TOTAL - RESERVE
        assert vg.snapshot(1).budget == TOTAL // 2 - RESERVE - 3 * GiB
        assert ledger.others_planned(0) == 0 and ledger.others_planned(1) == 3 * GiB
    finally:
        _end(p)


def test_claim_context_manager(region):
    _setup_device()
    ledger.join(region)
    p = _spawn_planner(region, 20 * GiB)
    try:
        with pytest.raises(ledger.LedgerFull, match="does not fit"):
            with ledger.claim(0, 3 * GiB, fit=True):
                pass
        with ledger.claim(0, 2 * GiB, fit=True):
            mine = [q for q in ledger.participants() if q["self"]][0]
            assert mine["devices"][0]["planned"] == 2 * GiB
        mine = [q for q in ledger.participants() if q["self"]][0]
        assert mine["devices"] == {}
    finally:
        _end(p)


def test_arguments_are_checked(region):
    ledger.join(region)
    with pytest.raises(ValueError, match="0..15"):
        ledger.plan(16, 1)
    with pytest.raises(TypeError, match="int"):
        ledger.plan(True, 1)
    with pytest.raises(ValueError, match="nbytes"):
        ledger.plan(0, -1)
    with pytest.raises(TypeError, match="nbytes"):
        ledger.plan(0, "1GB")
    with pytest.raises(ValueError, match="NUL"):
        _native.ledger_join("a\0b")
    with pytest.raises(TypeError):
        ledger.join(3)


# ---------------------------------------------------------------- liveness: pid + start time

def test_reused_pid_is_not_mistaken(region):
    _setup_device()
    ledger.join(region)
    ppid = os.getppid()  # alive, not a participant
    _write_slot(region, 40, ppid, _start_time(ppid) + 1, 3 * GiB)  # wrong start time: reused
    _write_slot(region, 41, ppid, _start_time(ppid), 4 * GiB)      # right one: alive
    assert ledger.others_planned(0) == 4 * GiB
    pids = sorted(q["slot"] for q in ledger.participants())
    assert 40 not in pids and 41 in pids
    _write_slot(region, 41, 0, 0, 0)


def test_gone_pid_is_swept(region):
    _setup_device()
    ledger.join(region)
    p = CTX.Process(target=time.sleep, args=(0,))
    p.start()
    p.join()  # a pid that existed and is gone
    _write_slot(region, 42, p.pid, 12345, 3 * GiB)
    assert ledger.others_planned(0) == 0
    assert ledger.status()["swept"] >= 1


# ---------------------------------------------------------------- N processes, SIGKILLs

def hammer(region, limits, totals=None, setup=None, nproc=6, seconds=3.0, min_kills=6):
    """N real processes planning at random (_random_claims) while this one samples the
    ledger and SIGKILLs one every 0.3 s: at every consistent sample each device's claims stay
    within its `limits` ({index: free - reserve}); a dead claim is gone after one sweep."""
    (setup or _setup_device)()
    assert ledger.join(region)["joined"]
    counts = CTX.Array("q", 2 * 64, lock=False)
    stop = CTX.Value("b", 0, lock=False)
    procs = {}
    seed = 1000

    def start(i):
        nonlocal seed
        seed += 1
        p = CTX.Process(target=_random_claims,
                        args=(region, seed, counts, i, stop, totals, setup), daemon=True)
        p.start()
        procs[i] = p

    for i in range(nproc):
        start(i)
    rng = random.Random(7)
    samples = kills = 0
    peak = dict.fromkeys(limits, 0)
    t_end = time.monotonic() + seconds
    t_limit = t_end + 30  # a loaded machine: keep going until enough kills happened
    next_kill = time.monotonic() + 0.3
    try:
        while (time.monotonic() < t_end or kills < min_kills) and time.monotonic() < t_limit:
            parts, consistent = ledger.participants_consistent()
            if consistent:
                for d, limit in limits.items():
                    total = sum(q["devices"].get(d, {}).get("planned", 0) for q in parts)
                    assert total <= limit, (d, total, limit, parts)
                    peak[d] = max(peak[d], total)
                samples += 1
            if time.monotonic() >= next_kill:
                i = rng.randrange(nproc)
                victim = procs[i]
                os.kill(victim.pid, signal.SIGKILL)
                victim.join()
                kills += 1
                ledger.sweep()  # one sweep: the dead claim is gone
                assert victim.pid not in [q["pid"] for q in ledger.participants()]
                start(nproc + kills)  # a fresh process in its place (new counters index)
                procs[i] = procs.pop(nproc + kills)
                next_kill = time.monotonic() + 0.3
    finally:
        stop.value = 1
        for p in procs.values():
            p.join(10)
            if p.is_alive():
                p.kill()
    ok = sum(counts[0::2])
    refused = sum(counts[1::2])
    assert kills >= min_kills - 1 and samples >= 50
    assert ok > 20 and refused > 0, (ok, refused)  # contention really happened
    for d, limit in limits.items():  # came close to each limit, not trivially under it
        assert peak[d] > limit // 2, (d, peak[d], limit)
    ledger.sweep()
    assert [q["pid"] for q in ledger.participants()] == [os.getpid()]


@pytest.mark.slow
def test_claims_never_exceed_free_minus_reserve(region):
    hammer(region, {0: TOTAL - RESERVE})


# ---------------------------------------------------------------- foreign and corrupted regions

def test_symlink_is_refused(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"")
    link = tmp_path / "link"
    link.symlink_to(target)
    st = ledger.join(str(link))
    assert not st["joined"] and "open" in st["reason"]


def test_wrong_mode_is_refused(tmp_path):
    path = tmp_path / "ledger"
    path.write_bytes(b"")
    os.chmod(path, 0o644)
    st = ledger.join(str(path))
    assert not st["joined"] and "mode 644" in st["reason"]


def test_not_a_regular_file(tmp_path):
    path = tmp_path / "dir"
    path.mkdir(mode=0o700)
    st = ledger.join(str(path))
    assert not st["joined"] and st["reason"]


@pytest.mark.parametrize("how", ["random", "truncated", "version", "garbage_file"])
def test_corrupted_region_is_survived(region, how):
    _setup_device()
    size = HEADER + NSLOTS * SLOT
    if how == "garbage_file":
        with open(region, "wb") as f:
            f.write(random.Random(1).randbytes(size))
        os.chmod(region, 0o600)
        st = ledger.join(region)
        assert not st["joined"] and "bad magic" in st["reason"]
        assert vg.snapshot(0).budget == TOTAL - RESERVE
        return
    revalidate = ledger.join(region)["revalidate_s"]
    p = _spawn_planner(region, 5 * GiB)
    try:
        assert vg.snapshot(0).budget == TOTAL - RESERVE - 5 * GiB
        with open(region, "r+b") as f:
            if how == "random":
                f.write(random.Random(2).randbytes(size))
            elif how == "truncated":
                f.truncate(size // 2)
            else:
                f.seek(8)
                f.write(struct.pack("<I", 99))
        if how == "truncated":
            # A truncation writes nothing into the region: budget reads notice it at their next
            # file check, at most revalidate_s later (header scribbles are seen at once).
            time.sleep(2 * revalidate)
        b = vg.snapshot(0).budget  # never a crash (a truncated mapping would SIGBUS)
        st = ledger.status()
        assert not st["joined"]
        expect = {"random": "bad magic", "truncated": "size", "version": "version 99"}[how]
        assert expect in st["reason"], st["reason"]
        assert b == TOTAL - RESERVE  # ignored: budgets as without the ledger
        assert ledger.plan(0, GiB, fit=True) is True
        assert ledger.participants() == []
    finally:
        _end(p)


def test_random_slot_bytes_are_survived(region):
    """Header intact, slots full of garbage: reads clamp, garbage pids are swept."""
    _setup_device()
    ledger.join(region)
    me = ledger.status()["slot"]
    rng = random.Random(3)
    with open(region, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
        for k in range(NSLOTS):
            if k != me:
                o = _slot_off(k)
                m[o:o + SLOT] = rng.randbytes(SLOT)
        m.close()
    for _ in range(3):
        b = vg.snapshot(0).budget
        assert 0 <= b <= TOTAL - RESERVE
    ledger.sweep()
    assert [q["pid"] for q in ledger.participants()] == [os.getpid()]
    assert vg.snapshot(0).budget == TOTAL - RESERVE


def test_forked_child_is_not_joined(region):
    ledger.join(region)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        st = ledger.status()
        os.write(w, b"1" if (not st["joined"] and "forked" in st["reason"]) else b"0")
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
    assert ledger.status()["joined"]


def test_thread_hammer(region):
    _setup_device()
    ledger.join(region)
    errors = []

    def work(i):
        try:
            for j in range(200):
                ledger.plan(0, (i * 7 + j) % 5 * GiB, fit=bool(j & 1))
                vg.snapshot(0)
                ledger.participants()
                if j % 50 == 0:
                    ledger.sweep()
            ledger.clear()
        except Exception as e:  # pragma: no cover
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert ledger.participants()[0]["devices"] == {}


# ---------------------------------------------------------------- host RAM held

def test_host_rss_is_published(region):
    ledger.join(region)
    assert ledger.participants()[0]["host_rss"] == 0
    h = vg.snapshot(None)  # host RAM as a source: its process_used (RSS) goes to the slot
    rss = ledger.participants()[0]["host_rss"]
    assert rss > 10 * 2**20 and abs(rss - h.process_used) < 64 * 2**20


def test_host_pinned_counts_locked_pages(region):
    import ctypes
    if os.environ.get("VRAMGUARD_SANITIZED"):
        pytest.skip("ASan intercepts mlock() and makes it a no-op")
    ledger.join(region)
    before = ledger.host_pinned()
    assert isinstance(before["locked"], int) and before["locked"] >= 0
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(16 * 4096)
    if libc.mlock(buf, ctypes.c_size_t(len(buf))) != 0:
        pytest.skip(f"mlock not permitted here (errno {ctypes.get_errno()})")
    try:
        after = ledger.host_pinned()
        assert after["locked"] >= before["locked"] + 15 * 4096
        assert ledger.participants()[0]["host_pinned"] >= after["locked"]
    finally:
        libc.munlock(buf, ctypes.c_size_t(len(buf)))


def test_join_does_not_hang_on_a_held_lock(tmp_path):
    import fcntl
    path = tmp_path / "ledger"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        t0 = time.monotonic()
        st = ledger.join(str(path))
        assert not st["joined"] and "flock" in st["reason"]
        assert time.monotonic() - t0 < 10
    finally:
        os.close(fd)
    assert ledger.join(str(path))["joined"]
    ledger.leave()


def test_tiled_node_stage_announces_its_planned_peak(region, monkeypatch):
    """A tiled stage of the ComfyUI adapter claims its planned peak in the ledger while it runs
    (and clears it after), when this process joined."""
    torch = pytest.importorskip("torch")
    from vramguard.adapters import comfyui

    _setup_device()
    ledger.join(region)
    seen = []

    def fn(t):
        mine = [q for q in ledger.participants() if q["self"]][0]
        seen.append(mine["devices"].get(0, {}).get("planned", 0))
        return t

    x = torch.rand(1, 96, 96, 3)
    out = comfyui._run_tiled("upscale", fn, x, dev=torch.device("cuda", 0), overlap=8, min_tile=16,
                             budget=8 << 20, cost=vg.CostModel(0, 256))
    assert out.shape == x.shape
    assert seen and min(seen) > 0, seen
    mine = [q for q in ledger.participants() if q["self"]][0]
    assert mine["devices"] == {}


def test_default_path_names_the_layout_version(monkeypatch):
    """A region left in /dev/shm by an older build (another layout) must not block this one after
    an upgrade: the default file name carries the layout version."""
    from vramguard import _native

    monkeypatch.delenv(ledger.ENV_PATH, raising=False)
    assert ledger.default_path() == f"/dev/shm/vramguard-{os.geteuid()}-v{_native.LEDGER_VERSION}"
    assert _native.LEDGER_VERSION >= 2
