"""Batch benchmark (issue 16): a batch run and a changing-size run on the caching-allocator
model (vramguard.AllocSim), what users do now vs vramguard, side by side in one process.

    python bench/batch.py [--seeds 5] [--items 64]

1. Batch run: N frames of per-item work (VAE-decode-like: two activations per item held in
   the allocator model while the chunk runs) on a simulated 8 GiB card with 1.5 GiB taken.
   - naive (what users do now): a fixed batch (the user's guess, 16), the whole batch in
     one call per batch; an OOM fails the prompt: the cache is released, the batch size
     halved and the run restarted from the first item (finished items are lost);
   - ours: vg.guarded_batch, the first chunk from vg.batch_size over the budget, halving
     on OOM, finished items kept.
   After the second call another application takes 2.5 GiB (both runs see it).
   Time is a simulated clock (load-independent): 30 ms per call + 12 ms per item, a failed
   call costs half its work, every release 100 ms (a GC, DESIGN.md).  items/s = N / clock.
2. Changing-size run: seeded sequences of 4 sizes from 1024x1024 .. 1360x1536 scaled down 4x,
   each item's result kept on the device until the sequence ends (the fragmenting pattern
   of tests/test_fragmentation.py), over cards of 22..38 MiB, only sequences whose live
   peak is under 80 % of the card; two workloads: results >= 1 MiB (large pool, beside
   the activations) and < 1 MiB (small pool).  Naive: as given (an OOM fails
   the rest of the sequence); largest first (tiled_many's order, results re-ordered);
   prewarm (vg.prewarm of the largest working set first); expandable_segments as a
   reference (a torch setting, not ours).  Counts: OOMs, items finished.
Figures are counts and the simulated clock (the same on any load); the wall time of the
whole bench is printed for reference only (the box is shared).  Ranges are over --seeds
seeds (min/median/max).  Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time

import numpy as np

import vramguard as vg
from vramguard import _native

MiB, GiB = 1 << 20, 1 << 30
CALL_S, ITEM_S, RELEASE_S = 0.030, 0.012, 0.100
# frame: 1024x1024 decode, about 360 MiB of activations per item (two tensors)
ITEM_BYTES = 360 * MiB
APP_BYTES = 2560 * MiB


class Clock:
    """The simulated clock, advanced by calls, failures and releases."""

    def __init__(self, jitter: random.Random):
        self.t, self.rng = 0.0, jitter

    def call(self, n: int, failed: bool = False) -> None:
        work = (CALL_S + ITEM_S * n) * self.rng.uniform(0.95, 1.05)
        self.t += work / 2 if failed else work

    def release(self) -> None:
        self.t += RELEASE_S


def frame_work(a, clock: Clock, each: int):
    """Per-item work on the allocator model; the clock is advanced as the chunk runs.  After
    the second call another application takes 2.5 GiB (a video player opens): modelled as a
    block held in the same allocator for the rest of the run."""
    inner = vg.batch.simulated_fn(a, each, lambda c: np.asarray(c) * 2)
    calls = [0]

    def fn(chunk):
        calls[0] += 1
        if calls[0] == 3:
            a.malloc(APP_BYTES)
        try:
            out = inner(chunk)
        except MemoryError:
            clock.call(len(chunk), failed=True)
            raise
        clock.call(len(chunk))
        return out

    return fn


def card(seed: int):
    """A fresh simulated 8 GiB card with 1.5 GiB taken, its allocator model, clock and work."""
    vg.clear_allocators()
    vg.simulate_clear()
    vg.simulate("8GB", "1.5GB")
    a = vg.simulate_allocator(0)
    clock = Clock(random.Random(seed))
    return a, clock, frame_work(a, clock, ITEM_BYTES)


def batch_naive(items, seed: int, batch: int = 16) -> dict:
    a, clock, fn = card(seed)
    ooms = 0
    while True:
        done = []
        try:
            for i in range(0, len(items), batch):
                done.append(fn(items[i:i + batch]))
            break
        except MemoryError:
            ooms += 1
            a.empty_cache()
            clock.release()
            if batch == 1:
                raise
            batch //= 2  # and everything again from the first item
    out = np.concatenate(done)
    return {"ooms": ooms, "sim_s": clock.t, "items_per_s": len(items) / clock.t, "ok": bool((out == items * 2).all()),
            "final_batch": batch}


def batch_ours(items, seed: int) -> dict:
    a, clock, fn = card(seed)

    def release():
        a.empty_cache()
        clock.release()

    st: dict = {}
    out = vg.guarded_batch(fn, items, per_item=ITEM_BYTES, device=0, release=release, stats=st)
    return {"ooms": st["ooms"], "sim_s": clock.t, "items_per_s": len(items) / clock.t,
            "ok": bool((out == items * 2).all()), "first_chunk": st["first_chunk"], "final_chunk": st["chunk"]}


# ------------------------------------------------------------------ changing sizes
SIZES = [(256, 256), (256, 288), (288, 320), (320, 352), (340, 384)]
TEMP, TEMP2 = 32, 96
# bytes per pixel of the result kept on the device: >= 1 MiB results live in the large pool
# (beside the activations), < 1 MiB ones in the small pool
WORKLOADS = {"large_results": 24, "small_results": 12}
CAPS_MIB = range(22, 40, 2)


def run_sequence(a, seq, out: int) -> tuple[int, int]:
    """(items finished, OOMs): an OOM fails the rest of the sequence (the prompt)."""
    kept = []
    for k, (w, h) in enumerate(seq):
        try:
            t = a.malloc(TEMP * w * h)
            u = a.malloc(TEMP2 * w * h)
            a.free(t)
            kept.append(a.malloc(out * w * h))
            a.free(u)
        except MemoryError:
            return k, 1
    return len(seq), 0


def peak(seq, out: int) -> int:
    return max(sum(out * w * h for w, h in seq[:i]) + (TEMP + TEMP2) * seq[i][0] * seq[i][1] for i in range(len(seq)))


def changing(seed: int, out: int, n_seq: int = 60, length: int = 4) -> dict:
    """Sequences whose live peak is under 80 % of the card, over a sweep of card sizes."""
    rng = random.Random(seed)
    seqs = [[rng.choice(SIZES) for _ in range(length)] for _ in range(n_seq)]
    res = {k: {"ooms": 0, "items_done": 0, "items": 0} for k in ("naive", "largest_first", "prewarm", "expandable")}
    for cap_mib in CAPS_MIB:
        cap = cap_mib * MiB
        for seq in (q for q in seqs if peak(q, out) < 0.8 * cap):
            # prewarm's rule (its docstring): count the tensors of the large pool (> 1 MiB) only
            kept = sum(out * w * h for w, h in seq if out * w * h > MiB)
            cost = vg.CostModel(float(kept), float(TEMP + TEMP2), "bench")
            for name, r in res.items():
                a = _native.AllocSim(cap, expandable_segments=name == "expandable")
                s = sorted(seq, key=lambda wh: -wh[0] * wh[1]) if name == "largest_first" else seq
                if name == "prewarm" and vg.prewarm(seq, cost=cost, allocator=a) == 0:
                    r["prewarm_did_not_fit"] = r.get("prewarm_did_not_fit", 0) + 1
                d, o = run_sequence(a, s, out)
                r["ooms"] += o
                r["items_done"] += d
                r["items"] += len(seq)
    return res


def rng3(xs):
    return [round(min(xs), 3), round(statistics.median(xs), 3), round(max(xs), 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--items", type=int, default=64)
    a = ap.parse_args()
    logging.getLogger("vramguard").setLevel(logging.ERROR)  # prewarms that do not fit are counted instead
    t0 = time.perf_counter()
    items = np.arange(a.items)
    naive = [batch_naive(items, s) for s in range(a.seeds)]
    ours = [batch_ours(items, s) for s in range(a.seeds)]
    ch = {w: [changing(s, out) for s in range(a.seeds)] for w, out in WORKLOADS.items()}
    vg.clear_allocators()
    vg.simulate_clear()
    assert all(r["ok"] for r in naive + ours)
    print(f"batch run: {a.items} items, {ITEM_BYTES >> 20} MiB each, 8 GiB card with 1.5 GiB taken "
          f"(simulated clock, {a.seeds} seeds, min/median/max)")
    for name, rs in (("naive (batch 16, halve + restart)", naive), ("ours (guarded_batch)", ours)):
        print(f"  {name:36s} OOMs {rng3([r['ooms'] for r in rs])}  items/s {rng3([r['items_per_s'] for r in rs])}")
    print(f"  ours: first chunk {ours[0]['first_chunk']} (from the budget), final chunk {ours[0]['final_chunk']}; "
          f"naive final batch {naive[0]['final_batch']}")
    for w, out in WORKLOADS.items():
        print(f"changing sizes ({w}, {out} B/px kept): 60 sequences x 4 items of {SIZES[0]}..{SIZES[-1]}, "
              f"cards {CAPS_MIB[0]}..{CAPS_MIB[-1]} MiB (live peak < 80 % of the card)")
        for name in ("naive", "largest_first", "prewarm", "expandable"):
            done = [100 * c[name]["items_done"] / c[name]["items"] for c in ch[w]]
            print(f"  {name:14s} OOMs {rng3([c[name]['ooms'] for c in ch[w]])}  items finished % {rng3(done)}")
        miss = [c["prewarm"].get("prewarm_did_not_fit", 0) for c in ch[w]]
        print(f"  (prewarm did not fit the card, run without it: {rng3(miss)} sequences)")
    ratio = [o["items_per_s"] / n["items_per_s"] for o, n in zip(ours, naive)]
    res = {
        "ooms_ours": int(statistics.median(r["ooms"] for r in ours))
        + sum(int(statistics.median(c["prewarm"]["ooms"] for c in ch[w])) for w in ch),
        "ooms_naive": int(statistics.median(r["ooms"] for r in naive))
        + sum(int(statistics.median(c["naive"]["ooms"] for c in ch[w])) for w in ch),
        "throughput_vs_naive": round(statistics.median(ratio), 3),
        "throughput_vs_naive_range": rng3(ratio),
        "batch_ooms_ours": rng3([r["ooms"] for r in ours]), "batch_ooms_naive": rng3([r["ooms"] for r in naive]),
        "changing_ooms": {w: {k: rng3([c[k]["ooms"] for c in ch[w]]) for k in ch[w][0]} for w in ch},
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    print(f"(wall time {res['wall_s']} s on a shared box: reference only)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
