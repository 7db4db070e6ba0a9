"""Shared-ledger benchmark (issue 13): what a budget read costs, and two instances on one card.

    python bench/ledger.py [--seconds 3] [--participants 16] [--runs 3] [--no-callgrind]

1. Budget read: `_native.snapshot(0).budget` on a simulated device, this process joined with
   participants-1 other real processes (each with a plan); per read, min/median/max over
   --runs runs of 20000 reads, side by side in this process:
     off      the ledger not joined (what every read costs anyway)
     cached   joined, the shipped design: sums cached per header generation, the file checked
              and the pidfds polled every revalidate_s (20 ms)
     every    joined with revalidate_s=0: fstat, a stat of the path (replaced?), the header
              and a sweep of every slot with one poll() over the pidfds on every read (the
              design before this change did all of it but the path check; the rival)
   Wall times on a loaded shared machine are noisy; the load-independent figure is callgrind's
   instruction count inside snapshot() per read (valgrind, when installed), for the same three.
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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import vramguard as vg
from vramguard import _native, ledger

GiB = 2**30
CTX = mp.get_context("fork")
MODES = {"off": None, "cached": ledger.DEFAULT_REVALIDATE_S, "every": 0.0}


def _participant_main(path: str, nbytes: int) -> None:
    """A participant in its own interpreter (`--participant PATH NBYTES`): callgrind runs
    the measuring process only, not these."""
    _native.simulate(0, total=24 * GiB, used=0)
    ok = ledger.join(path)["joined"] and ledger.plan(0, nbytes)
    print("ok" if ok else "no", flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or dies)


def start_participants(path: str, n: int) -> list[subprocess.Popen]:
    kids = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--participant", path,
                              str((i + 1) * 2**20)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True) for i in range(n)]
    for k in kids:
        assert k.stdout.readline().strip() == "ok"
    return kids


def stop_participants(kids: list[subprocess.Popen]) -> None:
    for k in kids:
        k.stdin.close()
    for k in kids:
        k.wait(30)


def per_read_us(n: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        _native.snapshot(0).budget
    return (time.perf_counter_ns() - t0) / n / 1000


def _set_mode(path: str, mode: str) -> None:
    ledger.leave()
    if MODES[mode] is not None:
        assert ledger.join(path, revalidate_s=MODES[mode])["joined"]


def bench_read(path: str, participants: int, runs: int, n: int = 20000) -> dict:
    vg.simulate_clear()
    vg.simulate("24GB", "0")
    kids = start_participants(path, participants - 1)
    try:
        assert ledger.join(path)["joined"]
        assert len(ledger.participants()) == participants
        others = ledger.others_planned(0)
        assert others == sum((i + 1) * 2**20 for i in range(participants - 1))
        assert _native.snapshot(0).budget == 24 * GiB - others
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(runs):  # interleaved: load drifts hit every mode alike
            for mode in MODES:
                _set_mode(path, mode)
                for _ in range(2000):
                    _native.snapshot(0)
                times[mode].append(per_read_us(n))
        ledger.leave()
    finally:
        stop_participants(kids)
    out = {"participants": participants}
    for mode, t in times.items():
        out[f"read_us_{mode}"] = [round(min(t), 3), round(statistics.median(t), 3),
                                  round(max(t), 3)]
    out["budget_read_us"] = out["read_us_cached"][1]
    return out


def _callgrind_child(path: str, mode: str, participants: int, n: int) -> None:
    """Under callgrind (collection toggled on inside snapshot()): n reads in `mode`."""
    vg.simulate("24GB", "0")
    kids = start_participants(path, participants - 1) if MODES[mode] is not None else []
    try:
        if MODES[mode] is not None:
            # cached: an interval longer than the run, so every counted read is the hot path
            assert ledger.join(path, revalidate_s=10.0 if MODES[mode] else 0.0)["joined"]
        for _ in range(n):
            _native.snapshot(0).budget
        ledger.leave()
    finally:
        stop_participants(kids)


def callgrind_reads(d: str, participants: int, n: int = 2000) -> dict:
    """Instructions per snapshot(0) call, load-independent (valgrind --tool=callgrind)."""
    if shutil.which("valgrind") is None:
        return {"callgrind": "valgrind not installed"}
    out = {}
    for mode in MODES:
        cg = os.path.join(d, f"cg-{mode}.out")
        subprocess.run(["valgrind", "--tool=callgrind", "--collect-atstart=no",
                        "--toggle-collect=py_snapshot", f"--callgrind-out-file={cg}",
                        sys.executable, os.path.abspath(__file__), "--callgrind-child", mode,
                        "--participants", str(participants), "--path",
                        os.path.join(d, f"cg-{mode}")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(cg) as f:
            total = next(int(line.split()[1]) for line in f if line.startswith("summary:"))
        out[f"instr_per_read_{mode}"] = round(total / n)
        os.unlink(cg)
    return out


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
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-callgrind", action="store_true")
    ap.add_argument("--participant", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--callgrind-child", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.participant:
        return _participant_main(a.participant[0], int(a.participant[1]))
    if a.callgrind_child:
        return _callgrind_child(a.path, a.callgrind_child, a.participants, 2000)
    d = tempfile.mkdtemp(prefix="vg-ledger-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    res: dict = {}
    res.update(bench_read(os.path.join(d, "read"), a.participants, a.runs))
    for mode in MODES:
        lo, med, hi = res[f"read_us_{mode}"]
        print(f"budget read, {a.participants} participants, {mode:>6}: min {lo:.2f} / median "
              f"{med:.2f} / max {hi:.2f} us over {a.runs} runs of 20000")
    if not a.no_callgrind:
        res.update(callgrind_reads(d, a.participants))
        if "instr_per_read_off" in res:
            print("instructions per read (callgrind, inside snapshot()): " + ", ".join(
                f"{m} {res[f'instr_per_read_{m}']}" for m in MODES))
    without = bench_two(os.path.join(d, "two-off"), False, a.seconds)
    with_ = bench_two(os.path.join(d, "two-on"), True, a.seconds)
    for name, r in (("without ledger", without), ("with ledger", with_)):
        print(f"two instances {name}: {r['ooms']} OOMs, {r['jobs']} jobs done, "
              f"{r['stalls']} waits, utilisation {100 * r['utilisation']:.0f} %")
    res.update({"ooms_with_ledger": with_["ooms"], "ooms_without_ledger": without["ooms"],
                "jobs_with_ledger": with_["jobs"], "jobs_without_ledger": without["jobs"],
                "util_with_ledger": round(with_["utilisation"], 3),
                "util_without_ledger": round(without["utilisation"], 3),
                "seconds": a.seconds, "runs": a.runs})
    shutil.rmtree(d, ignore_errors=True)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
