"""Shared-ledger benchmark (issue 13): what a budget read costs, and two instances on one card.

    python bench/ledger.py [--seconds 3] [--participants 16]

1. Budget read: `_native.snapshot(0).budget` on a simulated device, this process joined with
   participants-1 other real processes (each with a plan), 3 runs of 20000 reads; per read,
   min-max over the runs, next to the same read with the ledger off.  Target <= 2 us.
2. Two instances tiling on one simulated 24 GiB card (reserve 1 GiB), each a real process
   looping: read the budget, pick the largest tile peak it allows (a random wish of 45-80 % of
   the card, at most the budget), allocate it in 4 steps, compute, free.  The card is a shared
   counter; an allocation beyond its size is an OOM (the job frees what it holds and
   counts it).  With the ledger the peak is announced first (ledger.plan(fit=True)) and
   cleared after.  Utilisation = time-average of allocated / (card - reserve), sampled at
   1 kHz by the parent.
   Measured use is published once per job (at its start), so while a job allocates, its
   bytes count both in `free` and in its plan: conservative, never under-counted.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import tempfile
import time

import vramguard as vg
from vramguard import _native, ledger

GiB = 2**30
CTX = mp.get_context("fork")


def _idle_participant(path, nbytes, ready):
    _native.simulate(0, total=24 * GiB, used=0)
    ok = ledger.join(path)["joined"] and ledger.plan(0, nbytes)
    ready.put(ok)
    time.sleep(600)


def per_read_us(n: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        _native.snapshot(0).budget
    return (time.perf_counter_ns() - t0) / n / 1000


def syscall_us(participants: int, n: int = 20000) -> dict:
    """What the two syscalls a ledger read makes cost on this machine (from Python, so each
    figure includes ~0.05 us of call overhead): fstat of the region, one poll over the
    other participants' pidfds."""
    import select
    fd = os.open("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp", os.O_RDONLY)
    p = select.poll()
    fds = [os.pidfd_open(os.getpid()) for _ in range(participants - 1)]
    for x in fds:
        p.register(x, select.POLLIN)
    out = {}
    for name, fn in (("fstat", lambda: os.fstat(fd)), ("poll", lambda: p.poll(0))):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter_ns()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter_ns() - t0) / n / 1000)
        out[f"syscall_{name}_us"] = best
    for x in fds:
        os.close(x)
    os.close(fd)
    return out


def bench_read(path: str, participants: int, n: int = 20000) -> dict:
    vg.simulate_clear()
    vg.simulate("24GB", "0")
    for _ in range(2000):
        _native.snapshot(0)
    off = [per_read_us(n) for _ in range(3)]
    q = CTX.Queue()
    kids = [CTX.Process(target=_idle_participant, args=(path, (i + 1) * 2**20, q), daemon=True)
            for i in range(participants - 1)]
    for k in kids:
        k.start()
    assert all(q.get(timeout=60) for _ in kids)
    assert ledger.join(path)["joined"]
    others = ledger.others_planned(0)
    assert len(ledger.participants()) == participants
    assert _native.snapshot(0).budget == 24 * GiB - others
    for _ in range(2000):
        _native.snapshot(0)
    on = [per_read_us(n) for _ in range(3)]
    ledger.leave()
    for k in kids:
        k.kill()
        k.join()
    return {"budget_read_us": min(on), "budget_read_us_max": max(on),
            "budget_read_us_off": min(off), "budget_read_us_off_max": max(off),
            "participants": participants}


# ---------------------------------------------------------------- two instances, one card

CARD = 24 * GiB
RESERVE = 1 * GiB
MIN_TILE = GiB // 2


def _instance(path, use_ledger, seed, alloc, stats, idx, stop):
    vg.simulate_clear()
    _native.simulate(0, total=CARD, used=0)
    vg.set_reserve(RESERVE, device=0)
    if use_ledger and not ledger.join(path)["joined"]:
        return
    rng = random.Random(seed)
    usable = CARD - RESERVE
    while not stop.is_set():
        with alloc.get_lock():
            used = alloc.value
        _native.simulate(0, used=used, process_used=0)
        budget = _native.snapshot(0).budget
        peak = min(int(rng.uniform(0.45, 0.8) * usable), budget)
        if peak < MIN_TILE:
            stats[4 * idx + 2] += 1  # stalled: no room now
            time.sleep(0.002)
            continue
        if use_ledger and not ledger.plan(0, peak, fit=True):
            stats[4 * idx + 2] += 1
            time.sleep(0.001)
            continue
        held, oom, step = 0, False, peak // 4
        for _ in range(4):
            with alloc.get_lock():
                if alloc.value + step > CARD:
                    oom = True
                else:
                    alloc.value += step
                    held += step
            if oom:
                break
            time.sleep(0.002)
        if not oom:
            time.sleep(0.005)  # compute the tile
        with alloc.get_lock():
            alloc.value -= held
        if use_ledger:
            ledger.clear(0)
        stats[4 * idx + (1 if oom else 0)] += 1


def bench_two(path: str, use_ledger: bool, seconds: float) -> dict:
    alloc = CTX.Value("q", 0)
    stats = CTX.Array("q", 8, lock=False)
    stop = CTX.Event()
    procs = [CTX.Process(target=_instance,
                         args=(path, use_ledger, 100 + i, alloc, stats, i, stop), daemon=True)
             for i in range(2)]
    for p in procs:
        p.start()
    time.sleep(0.3)  # both running
    samples = []
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        samples.append(alloc.value)
        time.sleep(0.001)
    stop.set()
    for p in procs:
        p.join(30)
    done = stats[0] + stats[4]
    ooms = stats[1] + stats[5]
    return {"ooms": ooms, "jobs": done, "stalls": stats[2] + stats[6],
            "utilisation": statistics.fmean(samples) / (CARD - RESERVE) if samples else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--participants", type=int, default=16)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="vg-ledger-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    res: dict = {}
    res.update(bench_read(os.path.join(d, "read"), a.participants))
    res.update(syscall_us(a.participants))
    print(f"budget read, {a.participants} participants: {res['budget_read_us']:.2f}-"
          f"{res['budget_read_us_max']:.2f} us (ledger off: {res['budget_read_us_off']:.2f}-"
          f"{res['budget_read_us_off_max']:.2f} us); its 2 syscalls here: fstat "
          f"{res['syscall_fstat_us']:.2f} us, poll of {a.participants - 1} pidfds "
          f"{res['syscall_poll_us']:.2f} us")
    without = bench_two(os.path.join(d, "two-off"), False, a.seconds)
    with_ = bench_two(os.path.join(d, "two-on"), True, a.seconds)
    for name, r in (("without ledger", without), ("with ledger", with_)):
        print(f"two instances {name}: {r['ooms']} OOMs, {r['jobs']} jobs done, "
              f"{r['stalls']} waits, utilisation {100 * r['utilisation']:.0f} %")
    res.update({"ooms_with_ledger": with_["ooms"], "ooms_without_ledger": without["ooms"],
                "jobs_with_ledger": with_["jobs"], "jobs_without_ledger": without["jobs"],
                "util_with_ledger": round(with_["utilisation"], 3),
                "util_without_ledger": round(without["utilisation"], 3),
                "seconds": a.seconds})
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
