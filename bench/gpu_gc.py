"""GPU GC benchmark: GC profiles replayed with real CUDA allocations, five policies side by side.

    python bench/gpu_gc.py [--profiles bench/profiles] [--prompts 5] [--heap 1000000] [--repeat 3]
    python bench/gpu_gc.py --smoke       # no GPU: the same replay on the CPU, sizes / 1024

Profiles: every *.json under --profiles (recorded ones, see below), else a built-in synthetic
SDXL-like profile (12 GiB card: 6.6 GiB of weights, text encode, sampling, VAE decode, ESRGAN).
Replay of one stage: allocate its working set (torch.empty on the device: freed at the stage
end, kept in torch's cache), leave its garbage in reference cycles (freed only by gc.collect),
apply its live delta (weights loaded/unloaded), advance a simulated clock by its seconds, then
ask the policy.  The card is emulated with torch.cuda.set_per_process_memory_fraction (real
OOMs when the allocator would pass it); an OOM is counted, the cache is released and the
allocation retried once.  A collection = gc.collect() + torch.cuda.empty_cache(), timed for real
over a Python heap of --heap tracked objects (a ComfyUI-sized heap).
Policies: ours (vramguard's C Policy with GCGuard's defaults, fed a card-sized snapshot),
comfyui (after each prompt, at most every 10 s), sdnext (at stage ends when used >= 70 % of the
card or the allocator's OOM/retry counters grew), always (every stage end), never.
Reported per profile and policy: GC ms per prompt (ranges over --repeat runs), collections,
peak (torch.cuda.max_memory_reserved: load-independent), OOMs, end-to-end seconds (simulated
stage time + real replay time); peak_vs_stage_end = peak / peak of "always".
Targets (issue 14): ours <= 50 ms of GC per prompt, peak within 5 % of always-at-stage-end.

Profile format (tolerant; what the loader accepts):
  {"name": str, "unit": "bytes"|"KiB"|"MiB"|"GiB" (default bytes), "card": size, "prompts": n,
   "resident": size (weights held from the start), "stages": [ENTRY, ...]}
  or a bare list of ENTRYs, or the entries under "events" / "trace" / "boundaries" / "records";
  "prompts": [[ENTRY, ...], ...] or an integer "prompt" field in each entry splits prompts.
  ENTRY: {"stage"|"name"|"fn"|"node": str,
          "work"|"working_set"|"peak"|"transient": size,      transient working set
          "garbage"|"cyclic"|"collectable": size,             left in reference cycles
          "live"|"retained"|"delta_live": size (may be < 0),  kept (weights in / out)
          "seconds"|"dt"|"duration": s}
  or torch.cuda.memory_stats figures at each stage boundary: "allocated_bytes.all.current"
  (and "allocated_bytes.all.peak"): work = peak - max(current, previous current), live = current
  - previous current (the first boundary's current is the resident set), garbage only where given.  A key ending in _bytes/_kib/_mib/_gib overrides the unit.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import gc
import glob
import json
import math
import os
import sys
import time
import weakref
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_common import GiB, MiB, emit, ranges  # noqa: E402

UNITS = {"b": 1, "byte": 1, "bytes": 1, "kib": 1 << 10, "kb": 1 << 10, "mib": MiB, "mb": MiB, "gib": GiB, "gb": GiB}
STAGE_KEYS = ("stage", "name", "fn", "node", "label")
FIELDS = {
    "work": ("work", "working_set", "peak", "transient"),
    "garbage": ("garbage", "cyclic", "collectable"),
    "live": ("live", "retained", "delta_live"),
}
SECONDS_KEYS = ("seconds", "dt", "duration", "time_s")
CUR_KEYS = ("allocated_bytes.all.current", "allocated_current", "allocated")
PEAK_KEYS = ("allocated_bytes.all.peak", "allocated_peak")

SYNTHETIC = {
    "name": "synthetic-sdxl-12gib", "unit": "GiB", "card": 12, "prompts": 5, "resident": 6.6,
    "source": "built in (gpu_gc.py): SDXL fp16 weights (CLIP 1.6 + UNet 4.8 + VAE 0.16 GiB) at 1024^2, x4 ESRGAN",
    "stages": [
        {"stage": "text_encode", "work": 0.25, "garbage": 0.05, "seconds": 0.3},
        {"stage": "unet", "work": 1.6, "garbage": 0.02, "seconds": 8.0},
        {"stage": "vae_decode", "work": 3.2, "garbage": 0.25, "seconds": 1.2},
        {"stage": "upscale", "work": 2.0, "garbage": 0.10, "seconds": 2.5},
    ],
}


# ---------------------------------------------------------------- the tolerant loader

def _size(entry: dict, names: tuple, unit: int) -> float | None:
    for n in names:
        for key, mult in ((n, unit),) + tuple((f"{n}_{u}", m) for u, m in UNITS.items()):
            v = entry.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                return float(v) * mult
    return None


def _entries(doc: Any) -> list:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        for k in ("stages", "events", "trace", "boundaries", "records"):
            if isinstance(doc.get(k), list):
                return doc[k]
    raise ValueError("no list of stages found (expected a list, or one under 'stages'/'events'/'trace'/"
                     "'boundaries'/'records')")


def normalise(doc: Any, name: str) -> dict:
    """Any accepted profile -> {"name", "card", "resident", "prompts": [[step, ...], ...], "notes"}
    with sizes in bytes; step = {"stage", "work", "garbage", "live", "seconds"}."""
    meta = doc if isinstance(doc, dict) else {}
    unit = UNITS.get(str(meta.get("unit", "bytes")).lower())
    if unit is None:
        raise ValueError(f"unknown unit {meta.get('unit')!r}; known: {', '.join(UNITS)}")
    notes = []
    raw_prompts = meta.get("prompts") if isinstance(meta.get("prompts"), list) else None
    groups: list[list] = []
    if raw_prompts and all(isinstance(p, list) for p in raw_prompts):
        groups = raw_prompts
    else:
        ents = _entries(doc)
        if any(isinstance(e, dict) and "prompt" in e for e in ents):
            by: dict = {}
            for e in ents:
                by.setdefault(e.get("prompt", 0) if isinstance(e, dict) else 0, []).append(e)
            groups = [by[k] for k in sorted(by, key=str)]
        else:
            groups = [ents]
    prompts = []
    prev_cur = None
    for g in groups:
        steps = []
        for e in g:
            if not isinstance(e, dict):
                notes.append(f"skipped a non-object entry {str(e)[:40]!r}")
                continue
            st = next((str(e[k]) for k in STAGE_KEYS if isinstance(e.get(k), str)), None)
            if st is None:
                notes.append(f"skipped an entry without a stage name: keys {sorted(e)[:6]}")
                continue
            step = {"stage": st, "work": 0.0, "garbage": 0.0, "live": 0.0, "seconds": 0.0}
            cur = _size(e, CUR_KEYS, 1)
            if cur is not None and _size(e, FIELDS["work"], unit) is None:
                peak = _size(e, PEAK_KEYS, 1) or cur
                base = prev_cur if prev_cur is not None else 0.0
                step["work"] = max(0.0, peak - max(cur, base))
                step["live"] = cur - base if prev_cur is not None else 0.0
                if prev_cur is None:
                    step["resident"] = cur  # the first boundary: what was held before
                prev_cur = cur
            for k, names in FIELDS.items():
                v = _size(e, names, unit)
                if v is not None:
                    step[k] = v
            secs = next((float(e[k]) for k in SECONDS_KEYS if isinstance(e.get(k), (int, float))), 0.0)
            step["seconds"] = max(0.0, secs)
            if step["work"] < 0 or step["garbage"] < 0:
                raise ValueError(f"negative work/garbage in stage {st!r}: {step}")
            steps.append(step)
        if steps:
            prompts.append(steps)
    if not prompts:
        raise ValueError("no usable stages")
    resident = _size(meta, ("resident",), unit) or 0.0
    if "resident" in prompts[0][0]:
        resident = max(resident, prompts[0][0].pop("resident"))
    for p in prompts:
        for s in p:
            s.pop("resident", None)
    card = _size(meta, ("card", "card_bytes", "total"), unit)
    n = meta.get("prompts") if isinstance(meta.get("prompts"), int) else None
    return {"name": str(meta.get("name") or name), "card": card, "resident": resident, "prompts": prompts,
            "repeat_prompts": n, "notes": notes, "source": meta.get("source")}


def load_profiles(folder: str) -> tuple[list[dict], list[str]]:
    out, errors = [], []
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.json"), recursive=True)):
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            out.append(normalise(doc, os.path.splitext(os.path.basename(path))[0]))
            out[-1]["path"] = os.path.relpath(path)
        except (OSError, ValueError, TypeError, KeyError) as e:
            errors.append(f"{os.path.relpath(path)}: {type(e).__name__}: {str(e)[:200]}")
    return out, errors


# ---------------------------------------------------------------- the device

class Device:
    """Real allocations on `dev` with a card of `card` bytes; CPU (smoke) tracks its own bytes."""

    def __init__(self, torch: Any, dev: str, card: int):
        self.torch, self.dev, self.card = torch, dev, card
        self.cuda = dev.startswith("cuda")
        self.tracked = 0
        self.peak_tracked = 0
        if self.cuda:
            total = torch.cuda.mem_get_info()[1]
            torch.cuda.set_per_process_memory_fraction(min(1.0, card / total))

    def alloc(self, nbytes: float) -> Any:
        n = max(1, int(nbytes))
        t = self.torch.empty(n, dtype=self.torch.uint8, device=self.dev)
        if not self.cuda:
            self.tracked += n
            self.peak_tracked = max(self.peak_tracked, self.tracked)
            weakref.finalize(t, self._freed, n)
        return t

    def _freed(self, n: int) -> None:
        self.tracked -= n

    def release(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        self.peak_tracked = self.tracked

    def peak(self) -> int:
        return self.torch.cuda.max_memory_reserved() if self.cuda else self.peak_tracked

    def snapshot(self) -> dict:
        if self.cuda:
            st = self.torch.cuda.memory_stats()
            used, alloc = st.get("reserved_bytes.all.current", 0), st.get("allocated_bytes.all.current", 0)
            ooms, retries = st.get("num_ooms", 0), st.get("num_alloc_retries", 0)
        else:
            used = alloc = self.tracked
            ooms = retries = 0
        used = min(used, self.card)
        return {"total": self.card, "used": used, "free": self.card - used, "framework_allocated": alloc,
                "framework_reserved": used, "oom_count": ooms, "retry_count": retries}

    def is_oom(self, e: BaseException) -> bool:
        from vramguard.adapters import torch_adapter

        return torch_adapter.is_oom(e)

    def close(self) -> None:
        if self.cuda:
            self.torch.cuda.set_per_process_memory_fraction(1.0)


# ---------------------------------------------------------------- policies

class Policy:
    def __init__(self, name: str):
        self.name = name

    def after_stage(self, stage: str, snap: dict, clock: float) -> bool:
        return False

    def after_prompt(self, snap: dict, clock: float) -> bool:
        return False

    def collected(self, snap: dict, clock: float) -> None:
        pass


class Always(Policy):
    def after_stage(self, stage, snap, clock):
        return True


class ComfyUI(Policy):
    """main.py's prompt worker: gc.collect + soft_empty_cache after a prompt, >= 10 s apart."""

    def __init__(self):
        super().__init__("comfyui")
        self.last = -math.inf

    def after_prompt(self, snap, clock):
        return clock - self.last > 10.0

    def collected(self, snap, clock):
        self.last = clock


class SDNext(Policy):
    """modules/devices.torch_gc: at stage ends when used >= threshold % or OOM/retries grew."""

    def __init__(self, threshold: float = 70.0):
        super().__init__("sdnext")
        self.threshold, self.ooms, self.retries = threshold, 0, 0

    def after_stage(self, stage, snap, clock):
        grew = snap["oom_count"] > self.ooms or snap["retry_count"] > self.retries
        self.ooms, self.retries = snap["oom_count"], snap["retry_count"]
        return grew or 100.0 * snap["used"] / snap["total"] >= self.threshold


class Ours(Policy):
    """vramguard's C policy with GCGuard's defaults (so a change of defaults is measured here)."""

    def __init__(self):
        super().__init__("ours")
        import vramguard as vg
        from vramguard import _native, gcguard

        d = vg.GCGuard().policy
        self.settings = {"threshold": d.threshold, "min_interval": d.min_interval, "growth": d.growth}
        self.p = _native.Policy(d.threshold, False, d.min_interval, False, d.growth)
        self.known = gcguard._known
        self.register = vg.register_stage

    def _sid(self, stage: str) -> int | None:
        if stage not in self.known:
            try:
                self.register(stage)
            except (ValueError, TypeError):
                return None
        return self.known.get(stage)

    def after_stage(self, stage, snap, clock):
        collect, _ = self.p.decide(snap, now=clock, stage=self._sid(stage))
        return bool(collect)

    def collected(self, snap, clock):
        self.p.collected(snap, now=clock)


def make_policies() -> list[Policy]:
    return [Ours(), ComfyUI(), SDNext(), Always("always"), Policy("never")]


# ---------------------------------------------------------------- the replay

def replay(torch: Any, dev: Device, prof: dict, pol: Policy, n_prompts: int, scale: float) -> dict:
    gc.collect()
    dev.release()
    dev.reset_peak()
    resident: list = []
    cycles: list = []  # keeps nothing alive itself: cycles are found by gc only
    clock = 1000.0
    rec = {"collections": 0, "gc_seconds": 0.0, "ooms": 0, "failed_stages": 0, "oom_recovery_seconds": 0.0,
           "sim_seconds": 0.0}

    def alloc(nbytes: float) -> Any:
        for attempt in (0, 1):
            oom = False
            try:
                return dev.alloc(nbytes * scale)
            except Exception as e:
                if not dev.is_oom(e):
                    raise
                oom = True
            if oom:  # outside the except block: its frame holds nothing then
                rec["ooms"] += 1
                t0 = time.perf_counter()
                gc.collect()
                dev.release()
                rec["oom_recovery_seconds"] += time.perf_counter() - t0
        rec["failed_stages"] += 1
        return None

    def collect() -> None:
        t0 = time.perf_counter()
        gc.collect()
        dev.release()
        rec["gc_seconds"] += time.perf_counter() - t0
        rec["collections"] += 1
        pol.collected(dev.snapshot(), clock)

    t_wall = time.perf_counter()
    if prof["resident"] > 0:
        resident.append(alloc(prof["resident"]))
    prompts = prof["prompts"]
    for i in range(n_prompts):
        for step in prompts[i % len(prompts)]:
            work = alloc(step["work"]) if step["work"] > 0 else None
            if step["garbage"] > 0:
                junk = [alloc(step["garbage"])]
                junk.append(junk)  # a reference cycle: only gc.collect frees it
                del junk
            if step["live"] > 0:
                resident.append(alloc(step["live"]))
            elif step["live"] < 0:
                drop = -step["live"] * scale
                while resident and drop > 0:
                    t = resident.pop()
                    drop -= t.numel() if t is not None else 0
            del work
            clock += step["seconds"]
            rec["sim_seconds"] += step["seconds"]
            if pol.after_stage(step["stage"], dev.snapshot(), clock):
                collect()
        if pol.after_prompt(dev.snapshot(), clock):
            collect()
    rec["replay_wall_seconds"] = time.perf_counter() - t_wall
    rec["peak"] = dev.peak()
    resident.clear()
    del cycles
    gc.collect()
    dev.release()
    rec["end_to_end_seconds"] = rec["sim_seconds"] + rec["replay_wall_seconds"]
    rec["gc_ms_per_prompt"] = 1000.0 * rec["gc_seconds"] / n_prompts
    return rec


class _Node:
    """A host object: an instance with attributes, a child list and a back reference."""

    def __init__(self, i: int, parent: Any):
        self.key = f"n{i}"
        self.parent = parent
        self.children: list = []


def python_heap(n: int) -> list:
    """About n GC-tracked objects (instances, their __dict__s, child lists) in parent/child
    cycles: the shape of a host's node graph, caches and module objects, for gc.collect to walk."""
    roots: list = []
    parent = None
    for i in range(max(1, n // 2)):  # two tracked objects each: the instance and its list
        node = _Node(i, parent)
        if parent is not None:
            parent.children.append(node)
        parent = node if i % 64 else None  # chains of 64, each a cycle through the back refs
        if parent is None or i % 64 == 1:
            roots.append(node)
    return roots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles"))
    ap.add_argument("--prompts", type=int, default=0, help="prompts per replay (0: the profile's, else 5)")
    ap.add_argument("--heap", type=int, default=1_000_000, help="tracked objects in the Python heap")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--card", default="12", help="GiB, for profiles that name no card")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every size (fit a profile to the card)")
    ap.add_argument("--deadline", type=float, default=150.0, help="stop starting replays after this many s")
    ap.add_argument("--smoke", action="store_true", help="no GPU: CPU allocations, sizes / 1024, small heap")
    a = ap.parse_args()
    t_start = time.perf_counter()
    import torch

    res: dict = {"bench": "gpu_gc", "smoke": a.smoke, "profiles": {}}
    if a.smoke:
        devname, scale, heap_n = "cpu", a.scale / 1024, min(a.heap, 20_000)
    else:
        if not torch.cuda.is_available():
            res["skipped"] = "torch.cuda.is_available() is False"
            emit(res)
            sys.exit(3)
        devname, scale, heap_n = "cuda", a.scale, a.heap
        torch.zeros(1, device="cuda")
    profs, errors = load_profiles(a.profiles) if os.path.isdir(a.profiles) else ([], [])
    res["profile_errors"] = errors
    if not profs:
        profs = [normalise(SYNTHETIC, "synthetic")]
        res["profile_note"] = f"no usable *.json under {a.profiles}: the built-in synthetic profile"
    if a.smoke:  # smoke: collections walk only the small heap below, not torch's objects
        gc.collect()
        gc.freeze()
    heap = python_heap(heap_n)
    t0 = time.perf_counter()
    gc.collect()
    res["heap_objects"] = heap_n
    res["one_gc_collect_ms"] = 1000.0 * (time.perf_counter() - t0)
    for prof in profs:
        card = int(prof["card"] or float(a.card) * GiB)
        n = a.prompts or prof.get("repeat_prompts") or 5
        if a.smoke:
            n = 1
        dev = Device(torch, devname, int(card * scale) if a.smoke else card)
        pres: dict = {"card_gib": round(card / GiB, 2), "prompts": n, "notes": prof["notes"],
                      "source": prof.get("source") or prof.get("path"), "policies": {}}
        try:
            runs: dict[str, list] = {}
            for r in range(max(3, a.repeat)):
                if time.perf_counter() - t_start > a.deadline:
                    pres["truncated"] = f"deadline {a.deadline:.0f} s reached after {r} repeat(s)"
                    break
                for pol in make_policies():
                    if pol.name == "ours":
                        pres["ours_settings"] = pol.settings
                    runs.setdefault(pol.name, []).append(replay(torch, dev, prof, pol, n, scale))
            for name, rs in runs.items():
                pres["policies"][name] = {
                    "gc_ms_per_prompt": ranges([x["gc_ms_per_prompt"] for x in rs], 2),
                    "collections": ranges([x["collections"] for x in rs], 1),
                    "peak_mib": ranges([x["peak"] / (MiB / (1024 if a.smoke else 1)) for x in rs], 1),
                    "ooms": ranges([x["ooms"] for x in rs], 1),
                    "failed_stages": max(x["failed_stages"] for x in rs),
                    "end_to_end_s": ranges([x["end_to_end_seconds"] for x in rs], 3),
                }
            pol_res = pres["policies"]
            if "always" in pol_res and pol_res["always"]["peak_mib"]["median"]:
                for name, d in pol_res.items():
                    if d["peak_mib"]["median"] is not None:
                        d["peak_vs_stage_end"] = round(d["peak_mib"]["median"] / pol_res["always"]["peak_mib"]["median"], 4)
            o = pol_res.get("ours")
            if o and o["gc_ms_per_prompt"]["median"] is not None:
                pres["checks"] = {"ours_gc_le_50ms_per_prompt": o["gc_ms_per_prompt"]["median"] <= 50.0,
                                  "ours_peak_within_5pct_of_stage_end": o.get("peak_vs_stage_end", 9) <= 1.05,
                                  "ours_no_oom": o["ooms"]["max"] == 0}
        finally:
            dev.close()
        res["profiles"][prof["name"]] = pres
        for name, d in pres["policies"].items():
            print(f"{prof['name'][:24]:24s} {name:8s} gc/prompt {d['gc_ms_per_prompt']['median']} ms  "
                  f"collections {d['collections']['median']}  peak {d['peak_mib']['median']} MiB  "
                  f"ooms {d['ooms']['max']}", flush=True)
    del heap
    res["seconds_total"] = time.perf_counter() - t_start
    emit(res)


if __name__ == "__main__":
    main()
