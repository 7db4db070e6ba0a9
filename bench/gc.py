"""GC benchmark: replay garbage profiles against the policies people actually run.

    python bench/gc.py [--runs 3] [--profiles bench/profiles/*.json] [--heap N] [--card-headroom 1.25]

Profiles (bench/profiles/, made by scripts/record_gc_profiles.py): comfyui_cpu.json is recorded
from a real ComfyUI 0.30.0 run on this machine's CPU (RSS, VmHWM peaks, the cyclic garbage a
collection finds and what it costs, at every stage boundary vramguard sees); synthetic_*.json are
SDXL-shaped runs on a 24 GiB card, made up and labelled so.

Policies, each deciding at the same boundaries over the same simulated device:
  comfyui     ComfyUI's default: after a prompt, gc.collect() + soft_empty_cache(), at most every 10 s
  sdnext      SD.Next: at every stage end, gc.collect() + empty_cache() when used >= its threshold
              (torch_gc_threshold: 70 by default in some releases, 80 or 90 in others: --sdnext-threshold)
  stage_end   always at every stage end: gc.collect() + empty_cache()
  never       nothing
  ours        vramguard's Policy (threshold 70 %, growth 2 %, min interval 1 s) at every stage end:
              a full collection only for its full_reasons (growth, budget, oom...), else the release
              (cache + gc.collect(1))
Every collection is a real gc.collect() (full) or gc.collect(1) (release) over a Python heap of the
size counted in the real ComfyUI process after its nodes loaded (the profile's header; --heap
overrides), so it costs what it costs there; the bench prints both costs side by side.

The device model (bytes): live = the profile's live bytes at the boundary; garbage held by reference
cycles accumulates until a full collection (young garbage is also freed by a release, or by Python's
own young collections by the next boundary); with a caching allocator (synthetic profiles) the pool
only grows until empty_cache; a stage's peak = max(pool, work peak + garbage) + other processes.  An
OOM is a peak above the card; it is counted and answered with a full collection (what hosts do).
Card size for recorded CPU profiles: --card-headroom x the largest recorded peak.
End-to-end time = the profile's stage times + the GC time spent.  Wall times are noisy (a shared,
loaded 2-core box); collections, full/release counts, peaks and OOMs do not depend on load.
Targets (issue 14): ours <= 50 ms GC per prompt on the recorded profile with a ComfyUI-sized heap,
peak within 5 % of stage_end.  Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import statistics
import time

from vramguard import _native, gcguard

HERE = os.path.dirname(os.path.abspath(__file__))
GiB = float(1 << 30)
POLICIES = ("comfyui", "sdnext", "stage_end", "never", "ours")
THRESHOLD = 70.0
SDNEXT = {"threshold": 70.0}


# ---------------------------------------------------------------- profiles
def load_profile(path: str, headroom: float) -> dict:
    """Replay rows {kind, stage, prompt, dt, work_peak, live, garbage_young, garbage_old} and
    the card, from a recorded or a synthetic profile file."""
    with open(path) as f:
        doc = json.load(f)
    h = doc["header"]
    if h.get("synthetic"):
        rows = doc["rows"]
        return {"name": os.path.basename(path)[:-5], "synthetic": True, "rows": rows,
                "card": int(h["card_bytes"]), "other": int(h["other_bytes"]), "cache": bool(h["cache"]),
                "heap": None, "recorded_full_ms": None, "recorded_young_ms": None}
    rows, prev_end = [], None
    for r in doc["rows"]:
        if r["kind"] == "decision":
            continue
        dt = r["t"] - prev_end if prev_end is not None else 0.0
        prev_end = r["t_end"]  # our measuring time between t and t_end is not the host's work
        rows.append({"kind": r["kind"], "stage": r["stage"], "prompt": r["prompt"], "dt": max(0.0, dt),
                     "work_peak": r["rss_peak"], "live": r["rss_after"],
                     "alloc": r.get("tensor_bytes", r["rss_after"]),
                     "garbage_young": r["young_tensor_bytes"],
                     "garbage_old": max(0, r["full_tensor_bytes"] - r["young_tensor_bytes"])})
    peak = max(r["work_peak"] for r in rows)
    meas = [r for r in doc["rows"] if r["kind"] != "decision"]
    return {"name": os.path.basename(path)[:-5], "synthetic": False, "rows": rows,
            "card": int(peak * headroom), "other": 0, "cache": False, "heap": h["heap"]["objects"],
            "recorded_full_ms": statistics.median(r["full_ms"] for r in meas),
            "recorded_young_ms": statistics.median(r["young_ms"] for r in meas),
            "recorded_garbage_tensor_bytes": sum(r["full_tensor_bytes"] for r in meas),
            "recorded_young_found_all": sum(r["young_objects"] == r["full_objects"] for r in meas),
            "boundaries": len(meas)}


# ---------------------------------------------------------------- a heap of the host's size
def _closure(i: int):
    box = [i]

    def f():
        return box
    return f


def make_heap(n: int) -> list:
    """~n GC-tracked objects in the proportions counted in ComfyUI (functions with closure cells,
    tuples, dicts, lists, sets), linked into one graph like a host's modules and caches."""
    heap: list = []
    start = len(gc.get_objects())
    while len(gc.get_objects()) - start < n:
        for i in range(1000):  # ~8 tracked objects per unit
            f = _closure(i)
            d = {"f": f, "i": i, "t": (f, i)}
            heap.append([d, {i} if i % 4 == 0 else (d,), f])
    return heap


def time_collect(gen: int) -> float:
    t0 = time.perf_counter()
    gc.collect(gen)
    return time.perf_counter() - t0


# ---------------------------------------------------------------- the replay
class Device:
    def __init__(self, prof: dict):
        self.card, self.other, self.cache = prof["card"], prof["other"], prof["cache"]
        self.pool = 0        # reserved by the caching allocator (live + garbage + cached blocks)
        self.young = 0       # cyclic garbage of the last stage (young generation)
        self.old = 0         # cyclic garbage in the old generation: only a full collection frees it
        self.live = 0        # what the process holds at the boundary (recorded: RSS)
        self.alloc = 0       # live framework tensors (recorded: tensor storages; synthetic: = live)
        self.peak = 0

    @property
    def garbage(self) -> int:
        return self.young + self.old

    def used(self) -> int:
        held = self.live + self.garbage
        return self.other + (max(self.pool, held) if self.cache else held)

    def run(self, row: dict) -> bool:
        """One interval of host work ending at a boundary; True when it ran out of memory."""
        self.old += self.young   # survived to this boundary: promoted (young collections missed it)
        self.young = 0
        need = row["work_peak"] + self.garbage
        if self.cache:
            self.pool = max(self.pool, need)
            need = self.pool
        stage_peak = self.other + need
        self.peak = max(self.peak, min(stage_peak, self.card))
        self.live = row["live"]
        self.alloc = row.get("alloc", row["live"])
        self.young = row["garbage_young"]
        self.old += row["garbage_old"]
        if self.cache:
            self.pool = max(self.pool, self.live + self.garbage)
        return stage_peak > self.card

    def full(self) -> None:
        self.young = self.old = 0
        self.pool = self.live

    def release(self) -> None:
        self.young = 0
        self.pool = self.live + self.old

    def snapshot(self) -> dict:
        u = min(self.used(), self.card)
        return {"total": self.card, "used": u, "free": self.card - u,
                "framework_allocated": self.alloc + self.garbage}


def replay(prof: dict, policy: str) -> dict:
    dev = Device(prof)
    pol = _native.Policy(THRESHOLD, False, 1.0, False, 0.02) if policy == "ours" else None
    now, last_comfy = 1000.0, -1e9
    out = {"full": 0, "release": 0, "gc_s": 0.0, "ooms": 0, "work_s": 0.0, "reasons": {}}
    prompts = len({r["prompt"] for r in prof["rows"]})

    def act(full: bool) -> None:
        nonlocal now
        dt = time_collect(2 if full else 1)
        (dev.full if full else dev.release)()
        out["gc_s"] += dt
        out["full" if full else "release"] += 1
        now += dt

    for row in prof["rows"]:
        now += row["dt"]
        out["work_s"] += row["dt"]
        if dev.run(row):
            out["ooms"] += 1
            act(True)
        at_stage = row["kind"] == "stage"
        used_pct = 100.0 * dev.used() / dev.card
        if policy == "comfyui" and row["kind"] == "prompt_end" and now - last_comfy >= 10.0:
            act(True)
            last_comfy = now
        elif policy == "sdnext" and at_stage and used_pct >= SDNEXT["threshold"]:
            act(True)
        elif policy == "stage_end" and at_stage:
            act(True)
        elif pol is not None and at_stage:
            sid = gcguard._known.get(row["stage"])
            collect, reason = pol.decide(dev.snapshot(), now=now, stage=sid)
            if collect:
                full = reason in pol.full_reasons
                out["reasons"][reason] = out["reasons"].get(reason, 0) + 1
                act(full)
                pol.collected(dev.snapshot(), now=now, full=full)
    out.update(peak=dev.peak, prompts=prompts, e2e_s=out["work_s"] + out["gc_s"],
               gc_ms_per_prompt=1000 * out["gc_s"] / prompts)
    return out


# ---------------------------------------------------------------- the GPU half
_held: list = []  # what makes garbage "old": reachable through young collections, then dropped


def gpu_replay(prof: dict, policy: str) -> dict | None:
    """The same replay with real CUDA allocations: live and work tensors, garbage tensors in real
    reference cycles (old ones promoted by young collections before they are dropped), real
    gc.collect() + torch.cuda.empty_cache(), decisions over torch.cuda.memory_stats and
    mem_get_info; peak = max_memory_reserved.  Sizes scaled to fit 80 % of the free memory.
    None without torch+CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    dev = torch.device("cuda")
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    need = max(r["work_peak"] for r in prof["rows"]) + sum(r["garbage_young"] + r["garbage_old"] for r in prof["rows"])
    scale = min(1.0, 0.8 * free / need)

    def buf(n):
        return torch.empty(max(1, int(n * scale)), dtype=torch.uint8, device=dev)

    torch.cuda.reset_peak_memory_stats(dev)
    pol = _native.Policy(THRESHOLD, False, 1.0, False, 0.02) if policy == "ours" else None
    out = {"full": 0, "release": 0, "gc_s": 0.0, "ooms": 0}
    live, last_comfy, t_start = buf(prof["rows"][0]["live"]), -1e9, time.monotonic()

    def act(full: bool) -> None:
        t0 = time.perf_counter()
        gc.collect(2 if full else 1)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        out["gc_s"] += time.perf_counter() - t0
        out["full" if full else "release"] += 1

    for row in prof["rows"]:
        try:
            work = buf(max(1, row["work_peak"] - row["live"]))
            del work
        except torch.cuda.OutOfMemoryError:
            out["ooms"] += 1
            act(True)
        live = buf(row["live"])
        if row["garbage_old"]:
            junk = [buf(row["garbage_old"])]
            junk.append(junk)
            _held.append(junk)
            gc.collect(1)          # survives while held: promoted to the old generation
            _held.clear()
            del junk               # now unreachable, in the old generation
        if row["garbage_young"]:
            junk = [buf(row["garbage_young"])]
            junk.append(junk)
            del junk
        st = torch.cuda.memory_stats(dev)
        f, t = torch.cuda.mem_get_info(dev)
        snap = {"total": t, "used": t - f, "free": f, "framework_allocated": st["allocated_bytes.all.current"],
                "oom_count": st.get("num_ooms", 0), "retry_count": st.get("num_alloc_retries", 0)}
        at_stage = row["kind"] == "stage"
        now = time.monotonic()
        if policy == "comfyui" and row["kind"] == "prompt_end" and now - last_comfy >= 10.0:
            act(True)
            last_comfy = now
        elif policy == "sdnext" and at_stage and 100.0 * snap["used"] / t >= SDNEXT["threshold"]:
            act(True)
        elif policy == "stage_end" and at_stage:
            act(True)
        elif pol is not None and at_stage:
            collect, reason = pol.decide(snap, stage=gcguard._known.get(row["stage"]))
            if collect:
                full = reason in pol.full_reasons
                act(full)
                pol.collected(now=time.monotonic(), full=full)
    peak = torch.cuda.max_memory_reserved(dev)
    del live
    gc.collect()
    torch.cuda.empty_cache()
    prompts = len({r["prompt"] for r in prof["rows"]})
    out.update(peak=peak, scale=scale, seconds=time.monotonic() - t_start,
               gc_ms_per_prompt=1000 * out["gc_s"] / prompts)
    return out


def rng(xs: list[float]) -> tuple[float, float, float]:
    return min(xs), statistics.median(xs), max(xs)


def fmt(t: tuple[float, float, float], nd: int = 1) -> str:
    return "/".join(f"{x:.{nd}f}" for x in t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--profiles", nargs="*", default=sorted(glob.glob(os.path.join(HERE, "profiles", "*.json"))))
    ap.add_argument("--heap", type=int, default=0, help="tracked objects (default: the recorded ComfyUI count)")
    ap.add_argument("--card-headroom", type=float, default=1.25)
    ap.add_argument("--sdnext-threshold", type=float, default=70.0)
    a = ap.parse_args()
    SDNEXT["threshold"] = a.sdnext_threshold
    if a.runs < 3:
        ap.error(f"--runs must be >= 3 for ranges, got {a.runs}")
    profs = [load_profile(p, a.card_headroom) for p in a.profiles]
    if not profs:
        ap.error("no profiles (run scripts/record_gc_profiles.py)")
    recorded = [p for p in profs if not p["synthetic"]]
    n_heap = a.heap or (recorded[0]["heap"] if recorded else 630_000)
    gc.collect()
    base_objs = len(gc.get_objects())
    heap = make_heap(max(0, n_heap - base_objs))
    res: dict = {"heap_objects": len(gc.get_objects())}
    idle_full = [time_collect(2) * 1000 for _ in range(3)]
    idle_young = [time_collect(1) * 1000 for _ in range(3)]
    res["bench_full_collect_ms"] = rng(idle_full)
    res["bench_young_collect_ms"] = rng(idle_young)
    if recorded:
        res["comfyui_full_collect_ms_median"] = recorded[0]["recorded_full_ms"]
        res["comfyui_young_collect_ms_median"] = recorded[0]["recorded_young_ms"]
    print(f"heap {res['heap_objects']} tracked objects; gc.collect() here {fmt(res['bench_full_collect_ms'])} ms "
          f"(min/median/max), gc.collect(1) {fmt(res['bench_young_collect_ms'], 3)} ms"
          + (f"; in the recorded ComfyUI process (median) {res['comfyui_full_collect_ms_median']:.0f} ms and "
             f"{res['comfyui_young_collect_ms_median']:.3f} ms" if recorded else ""))
    for p in recorded:
        print(f"{p['name']}: {p['boundaries']} boundaries, cyclic tensor garbage found "
              f"{p['recorded_garbage_tensor_bytes']} bytes; gc.collect(1) found every cyclic object gc.collect() "
              f"found at {p['recorded_young_found_all']} of them")

    per: dict = {}
    for p in profs:
        runs = {pol: [replay(p, pol) for _ in range(a.runs)] for pol in POLICIES}
        cost = (res["comfyui_full_collect_ms_median"], res["comfyui_young_collect_ms_median"]) if recorded else None
        print(f"\n== {p['name']} ({'SYNTHETIC' if p['synthetic'] else 'recorded'}; card {p['card'] / GiB:.2f} GiB, "
              f"{runs['never'][0]['prompts']} prompts, ranges min/median/max of {a.runs} runs)")
        print(f"{'policy':10s} {'full':>5s} {'rel':>5s} {'GC ms/prompt':>22s} {'@ComfyUI cost':>13s} {'e2e s':>20s} "
              f"{'peak GiB':>9s} {'OOM':>4s}  reasons")
        row: dict = {}
        for pol, rs in runs.items():
            r0 = rs[0]
            assert all(r["full"] == r0["full"] and r["peak"] == r0["peak"] for r in rs)  # load-independent
            g = rng([r["gc_ms_per_prompt"] for r in rs])
            e = rng([r["e2e_s"] for r in rs])
            at = (r0["full"] * cost[0] + r0["release"] * cost[1]) / r0["prompts"] if cost else float("nan")
            print(f"{pol:10s} {r0['full']:5d} {r0['release']:5d} {fmt(g):>22s} {at:13.1f} {fmt(e, 2):>20s} "
                  f"{r0['peak'] / GiB:9.3f} {r0['ooms']:4d}  {r0['reasons'] or ''}")
            row[pol] = {"full": r0["full"], "release": r0["release"], "gc_ms_per_prompt": g,
                        "e2e_s": e, "peak_gib": round(r0["peak"] / GiB, 4), "ooms": r0["ooms"]}
            if cost is not None:  # load-independent: counts x the cost measured inside ComfyUI
                row[pol]["gc_ms_per_prompt_at_comfyui_cost"] = (
                    r0["full"] * cost[0] + r0["release"] * cost[1]) / r0["prompts"]
        row["peak_vs_stage_end"] = runs["ours"][0]["peak"] / runs["stage_end"][0]["peak"]
        row["peak_vs_comfyui"] = runs["ours"][0]["peak"] / runs["comfyui"][0]["peak"]
        print(f"ours: peak {row['peak_vs_stage_end']:.4f}x stage_end, {row['peak_vs_comfyui']:.4f}x comfyui")
        per[p["name"]] = row

    gpu: dict = {}
    for p in profs:
        if not p["synthetic"]:
            continue  # the CPU trace's RSS is not device memory
        rs = {pol: [gpu_replay(p, pol) for _ in range(a.runs)] for pol in POLICIES}
        if rs["ours"][0] is None:
            print("\nGPU replay skipped: torch with CUDA is not available here")
            break
        print(f"\n== GPU: {p['name']} with real CUDA allocations (x{rs['ours'][0]['scale']:.3f} of its sizes)")
        for pol, rr in rs.items():
            print(f"{pol:10s} full {rr[0]['full']:4d} release {rr[0]['release']:4d} GC ms/prompt "
                  f"{fmt(rng([r['gc_ms_per_prompt'] for r in rr]))} peak {rr[0]['peak'] / GiB:.3f} GiB "
                  f"OOM {rr[0]['ooms']} s {fmt(rng([r['seconds'] for r in rr]), 2)}")
        gpu[p["name"]] = {"peak_vs_stage_end": round(rs["ours"][0]["peak"] / rs["stage_end"][0]["peak"], 4),
                          "gc_ms_per_prompt": {k: [round(x, 2) for x in rng([r["gc_ms_per_prompt"] for r in v])]
                                               for k, v in rs.items()}}
    del heap

    rec = [n for n, p in zip(per, profs) if not p["synthetic"]]
    head = per[rec[0]] if rec else per[next(iter(per))]
    out = {"profile": rec[0] if rec else next(iter(per)),
           "gc_ms_per_prompt": [round(x, 2) for x in head["ours"]["gc_ms_per_prompt"]],
           "gc_ms_per_prompt_comfyui": [round(x, 2) for x in head["comfyui"]["gc_ms_per_prompt"]],
           "gc_ms_per_prompt_sdnext": [round(x, 2) for x in head["sdnext"]["gc_ms_per_prompt"]],
           "gc_ms_per_prompt_stage_end": [round(x, 2) for x in head["stage_end"]["gc_ms_per_prompt"]],
           "gc_ms_per_prompt_at_comfyui_cost": {k: round(head[k]["gc_ms_per_prompt_at_comfyui_cost"], 2)
                                                for k in POLICIES} if rec else None,
           "peak_vs_stage_end": round(head["peak_vs_stage_end"], 4),
           "full_collections": {k: head[k]["full"] for k in POLICIES},
           "heap_objects": res["heap_objects"],
           "bench_full_collect_ms": [round(x, 1) for x in res["bench_full_collect_ms"]],
           "comfyui_full_collect_ms_median": res.get("comfyui_full_collect_ms_median"),
           "per_profile": {n: {"peak_vs_stage_end": round(r["peak_vs_stage_end"], 4),
                               "gc_ms_per_prompt_ours": [round(x, 2) for x in r["ours"]["gc_ms_per_prompt"]],
                               "full": {k: r[k]["full"] for k in POLICIES},
                               "ooms": {k: r[k]["ooms"] for k in POLICIES}} for n, r in per.items()},
           "gpu": gpu or "skipped: no torch with CUDA here"}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
