"""GC triggers: release memory after the stages that leave garbage, only when it pays.

The decision is made in C (vramguard._native.Policy); this module runs the actions, keeps
stats, writes the log and offers the host-agnostic hooks:

    @vramguard.after_stage("vae_decode")
    def decode(latent): ...

    with vramguard.stage("unet"):
        samples = sample(...)

    vramguard.gc_check("upscale", forced=True)

A collection is: Python's gc.collect() (optional), the framework's cache release, and in
low-VRAM mode unloading models until the budget covers the reserve.  The full gc.collect()
runs only on a garbage signal (the policy's full_reasons: forced, oom, retries, budget,
growth); a plain threshold crossing gets the cheap release: the cache and a young-generation
gc.collect(1).  On a ComfyUI-sized heap (~630k objects) a full collection costs 0.3-2.3 s (by load) and a
young one under 1 ms, and the young one found the same cyclic objects at most boundaries of the
recorded ComfyUI runs (bench/profiles/).  Each action that raises is logged once and never
breaks the user's run.
"""
from __future__ import annotations

import contextlib
import functools
import gc as _pygc
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

from . import _forksafe, _native
from . import accounting as acc
from . import hostram as _hostram
from . import sampling
from ._units import fmt_bytes, parse_size, short_repr

__all__ = ["STAGES", "GCGuard", "guard", "gc_check", "stage", "after_stage", "gc_stats",
           "configure_gc", "set_log_file", "run", "parse_log_line", "Decision", "register_stage",
           "in_sampling"]

log = logging.getLogger("vramguard")
F = TypeVar("F", bound=Callable[..., Any])

#: The stages that leave garbage, in pipeline order.
STAGES: tuple[str, ...] = ("text_encode", "unet", "vae_decode", "vae_encode", "controlnet",
                           "lora_load", "lora_unload", "ipadapter", "upscale")
_GB = float(1 << 30)
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,63}$")


@dataclass
class Decision:
    collect: bool
    reason: str
    stage: str
    saved: int = 0          # device bytes, before - after
    seconds: float = 0.0
    record: dict | None = None  # the log record when a collection ran


@dataclass
class StageStats:
    checks: int = 0
    collections: int = 0
    seconds: float = 0.0
    saved: int = 0
    skipped: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"checks": self.checks, "collections": self.collections, "seconds": self.seconds,
                "saved": self.saved, "skipped": dict(self.skipped)}


def _gb(n: int | None) -> float:
    return round((n or 0) / _GB, 2)


class GCGuard:
    """Policy + actions + stats + log.  One per process is usual (see guard())."""

    def __init__(self, threshold: float = 70.0, low_vram: bool = False, min_interval: float = 1.0,
                 python_gc: bool = True, device: int | None = None, growth: float = 0.02):
        self.policy = _native.Policy(threshold, low_vram, min_interval, False, growth)
        self.python_gc = bool(python_gc)
        self.enabled = True
        self.device = device
        self._stage_on: dict[str, bool] = {s: True for s in STAGES}
        self._lock = _forksafe.lock()
        self._stats: dict[str, StageStats] = {}
        self._run_stats: dict[str, StageStats] = {}
        self._failed_actions: set[str] = set()
        self._jsonl: str | None = None
        # Host actions; adapters replace them (ComfyUI: soft_empty_cache, free_memory).
        self.release_cache: Callable[[], None] | None = None
        self.unload_models: Callable[[int, int], None] | None = None
        self.zluda_reason: str | None = None

    # ---------------------------------------------------------------- configuration
    @property
    def low_vram(self) -> bool:
        return self.policy.low_vram

    @low_vram.setter
    def low_vram(self, on: bool) -> None:
        if not isinstance(on, bool):
            raise TypeError(f"low_vram must be True or False, got {on!r}")
        self.policy.low_vram = on
        if on:
            self._detect_zluda()

    def _detect_zluda(self) -> None:
        """ZLUDA: forced collection misbehaves there, so low-VRAM keeps the threshold."""
        name = ""
        torch = sys.modules.get("torch")
        try:
            if torch is not None and torch.cuda.is_available():
                name = torch.cuda.get_device_name(self._device() or 0)
            elif acc.device_count() > 0:
                name = acc.snapshot(self._device() or 0).name
        except Exception:
            name = ""
        z = name.endswith("[ZLUDA]") or "ZLUDA" in name
        self.policy.zluda = z
        self.zluda_reason = f"ZLUDA device {name!r}: low-VRAM mode keeps threshold {self.policy.threshold:g}%" if z else None
        if z:
            log.info("vramguard: %s", self.zluda_reason)

    def enable_stage(self, name: str, on: bool = True) -> None:
        _check_stage(name)
        self._stage_on[name] = bool(on)

    def stage_enabled(self, name: str) -> bool:
        return self.enabled and self._stage_on.get(name, False)

    def set_log_file(self, path: str | os.PathLike | None) -> None:
        """Append one JSON object per collection to `path` (None stops)."""
        if path is not None:
            path = os.fspath(path)
            d = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(d):
                raise ValueError(f"log file directory does not exist: {d!r}")
        self._jsonl = path

    # ---------------------------------------------------------------- the check
    def _device(self) -> int | None:
        if self.device is not None:
            return self.device
        return acc.default_device()

    def check(self, stage: str, *, forced: bool = False, need: int = 0,
              device: int | None = None) -> Decision:
        """Run the policy for `stage`; collect when it says so.  Never raises for the
        host's sake once the arguments are valid.  Without a GPU the device is host RAM
        (the C snapshot of device None), judged by the same rules."""
        _check_stage(stage)
        if not self.stage_enabled(stage) and not forced:
            return Decision(False, "disabled", stage)
        dev = self._device() if device is None else device
        sid = _known[stage]
        if in_sampling():
            # a (compiled) sampling run is open: collecting there frees nothing and breaks
            # its allocation plan; the unet check after the sampler returns covers it
            return self._skip(stage, "deferred: inside a sampling run")
        if dev is not None:
            acc._auto_probe()
        collect, reason, snap = self.policy.check(dev, forced, need, sid)
        if not collect:
            return self._skip(stage, reason)
        if not _collect_lock.acquire(blocking=False):
            # a collection is running (e.g. low-VRAM unload -> a hooked unpatch -> here)
            return self._skip(stage, "nested: a collection is already running")
        try:
            self._count(stage, None)
            return self._collect(stage, reason, dev, snap if snap is not None else acc.snapshot(dev), need)
        finally:
            _collect_lock.release()

    def _count(self, stage: str, skipped: str | None) -> None:
        with self._lock:
            for table in (self._stats, self._run_stats):
                st = table.setdefault(stage, StageStats())
                st.checks += 1
                if skipped is not None:
                    st.skipped[skipped] = st.skipped.get(skipped, 0) + 1

    def _skip(self, stage: str, reason: str) -> Decision:
        self._count(stage, reason)
        return Decision(False, reason, stage)

    def _run_action(self, name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:
            if name not in self._failed_actions:
                self._failed_actions.add(name)
                log.warning("vramguard: GC action %s failed once (%s: %s); carrying on", name,
                            type(e).__name__, e)
            return None

    def _collect(self, stage: str, reason: str, dev: int | None, before: Any, need: int) -> Decision:
        t0 = time.perf_counter()
        hb = acc.host()
        collected = 0
        full = reason in self.policy.full_reasons
        if self.python_gc:
            collect = _pygc.collect if full else _collect_young
            collected = self._run_action("gc.collect", collect) or 0
        release = self.release_cache or (lambda: _default_release(dev))
        self._run_action("release_cache", release)
        if self.policy.low_vram and self.unload_models is not None and dev is not None:
            after = acc.snapshot(dev)
            want = max(need, 0)
            if after.budget < max(want, 1):
                self._run_action("unload_models", lambda: self.unload_models(dev, want + after.reserve))  # type: ignore[misc]
                self._run_action("release_cache", release)
        after = acc.snapshot(dev)
        ha = acc.host()
        self.policy.collected(after, full=full)
        dt = time.perf_counter() - t0
        # Other work (another thread, the host's own loads) can raise device use while we
        # collect; "saved" is what we freed, never negative: clamped at 0, growth reported apart.
        delta = before.used - after.used
        saved = max(0, delta)
        gc_rec: dict[str, Any] = {"collected": int(collected), "saved": _gb(saved), "full": int(full)}
        if delta < 0:
            gc_rec["grew"] = _gb(-delta)
        # fragmentation (issue 16), where the framework or the allocator model reports it: the
        # split bytes that were in the way and the largest block a request can get now
        split, largest = getattr(before, "inactive_split", None), getattr(after, "largest_free_block", None)
        if split is not None:
            gc_rec["split"] = _gb(split)
        if largest is not None:
            gc_rec["largest_free"] = _gb(largest)
        # pinned host memory over its cap (hostram.py, issue 13): released here, logged here
        pin = self._run_action("pinned_cap", _hostram.enforce_pinned_cap)
        if pin:
            gc_rec["pinned"], gc_rec["unpinned"] = _gb(pin["after"]), _gb(pin["released"])
        total = before.total
        on_gpu = dev is not None
        rec = {
            "utilization": {"gpu": int(round(100 * before.used / total)) if on_gpu and total else 0,
                            "ram": int(round(100 * (hb.total - hb.available) / hb.total)) if hb.total else 0,
                            "threshold": int(round(self.policy.effective_threshold))},
            "gc": gc_rec,
            "before": {"gpu": _gb(before.used) if on_gpu else 0.0, "ram": _gb(hb.total - hb.available)},
            "after": {"gpu": _gb(after.used) if on_gpu else 0.0, "ram": _gb(ha.total - ha.available),
                      "retries": _get(after, "retry_count"), "oom": _get(after, "oom_count")},
            "device": "cuda" if on_gpu else "cpu",
            "fn": stage, "time": round(dt, 2), "reason": reason,
        }
        log.debug("%s", format_log_line(rec))
        if self._jsonl:
            try:
                with open(self._jsonl, "a", encoding="utf-8") as f:
                    f.write(json.dumps({**rec, "ts": time.time(), "saved_bytes": saved}) + "\n")
            except OSError as e:
                if "jsonl" not in self._failed_actions:
                    self._failed_actions.add("jsonl")
                    log.warning("vramguard: cannot write GC log %s (%s)", self._jsonl, e)
        with self._lock:
            for table in (self._stats, self._run_stats):
                st = table.setdefault(stage, StageStats())
                st.collections += 1
                st.seconds += dt
                st.saved += saved
        return Decision(True, reason, stage, saved, dt, rec)

    # ---------------------------------------------------------------- stats
    def stats(self) -> dict[str, dict]:
        with self._lock:
            return {k: v.as_dict() for k, v in self._stats.items()}

    def reset_stats(self) -> None:
        with self._lock:
            self._stats.clear()
            self._run_stats.clear()

    def run_summary(self, label: str = "run") -> dict:
        """Stats since the last summary, plus per-stage peaks; logged at INFO and reset."""
        with self._lock:
            table, self._run_stats = self._run_stats, {}
        s = {
            "label": label,
            "collections": sum(v.collections for v in table.values()),
            "checks": sum(v.checks for v in table.values()),
            "seconds": round(sum(v.seconds for v in table.values()), 3),
            "saved_gb": _gb(sum(v.saved for v in table.values())),
            "stages": {k: v.as_dict() for k, v in table.items()},
            # device peaks where a device is sampled, host RSS peaks otherwise
            "peaks_gb": {k: _gb(v["peak_used"] if v["peak_used"] >= 0 else v["peak_rss"])
                         for k, v in sampling.peaks().items()},
        }
        saved = sum(v.saved for v in table.values())
        s["saved_bytes"] = saved
        s["peaks_bytes"] = {k: (v["peak_used"], "device") if v["peak_used"] >= 0 else (v["peak_rss"], "host RSS")
                            for k, v in sampling.peaks().items()}
        log.info("vramguard %s: %d GC of %d checks, %.2f s, %s; peaks %s", label, s["collections"], s["checks"],
                 s["seconds"], _saved_text(saved), _peaks_text(s["peaks_bytes"]))
        return s


def _saved_text(saved: int) -> str:
    """'saved 884.00 KiB' (the bytes behind the GB figures); growth is said as growth."""
    if saved >= 0:
        return f"saved {fmt_bytes(saved)}"
    return f"saved nothing (use grew {fmt_bytes(-saved)})"


def _peaks_text(peaks: dict[str, tuple[int, str]]) -> str:
    """"{'unet': 6.20 GiB, 'model_load': 225.00 MiB host RSS}": device peaks, or host RSS
    where no device was sampled (then the reserve and budget do not apply to it)."""
    items = [f"'{k}': {fmt_bytes(n)}" + ("" if where == "device" else f" {where}")
             for k, (n, where) in peaks.items()]
    return "{" + ", ".join(items) + "}"


def _get(snap: Any, key: str) -> int:
    v = getattr(snap, key, None)
    return int(v) if v is not None else 0


# One collection at a time per process; a nested or concurrent check skips instead of waiting.
_collect_lock = _forksafe.lock()
# Open sampling runs (hooks.call_stage("unet", ...)): no collection while any is open.
_sampling_lock = _forksafe.lock()
_sampling_runs = 0


def _sampling_enter() -> None:
    global _sampling_runs
    with _sampling_lock:
        _sampling_runs += 1


def _sampling_exit() -> None:
    global _sampling_runs
    with _sampling_lock:
        _sampling_runs = max(0, _sampling_runs - 1)


def in_sampling() -> bool:
    """True while a sampling run (the 'unet' stage of a hook or Memory Guard) is open."""
    return _sampling_runs > 0


def _reset_in_child() -> None:
    # the sampling runs of other threads do not exist in a forked child (its locks are reset
    # by _forksafe)
    global _sampling_runs
    _sampling_runs = 0


if hasattr(os, "register_at_fork"):  # a child must not inherit a lock held by another thread
    os.register_at_fork(after_in_child=_reset_in_child)


def _collect_young() -> int:
    """The release path's collection: generations 0 and 1 only (young cycles, not the heap)."""
    return _pygc.collect(1)


def _default_release(device: int | None = None) -> None:
    torch = sys.modules.get("torch")
    if torch is not None:
        from .adapters import torch_adapter

        torch_adapter.release_cache()
    # a simulated card with the caching-allocator model (issue 16): its cache is what a GC
    # releases there, as torch.cuda.empty_cache() does on a real one
    if device is not None:
        from . import batch

        sim = batch.simulated_allocator(device)
        if sim is not None:
            sim.empty_cache()


def _check_stage(name: Any) -> None:
    if not isinstance(name, str):
        raise TypeError(f"stage name must be str, got {type(name).__name__} {name!r}")
    if name not in _known:
        raise ValueError(f"unknown GC stage {name!r}; known: {', '.join(sorted(_known))} "
                         "(vramguard.register_stage adds one)")


# stage name -> id; the C policy keeps a live-byte baseline per id (64 at most)
_known: dict[str, int] = {name: i for i, name in enumerate(STAGES)}


def register_stage(name: str) -> None:
    """Allow a custom stage name in the GC hooks."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"stage name must be 1-63 chars of [A-Za-z0-9_.:-], got {name!r}")
    if name not in _known:
        if len(_known) >= 64:
            raise ValueError(f"at most 64 GC stages; cannot add {name!r}")
        _known[name] = len(_known)


def format_log_line(rec: dict) -> str:
    """SD.Next's one-line GC log, plus the reason."""
    def d(x: dict) -> str:
        return "{" + ", ".join(f"'{k}': {v}" for k, v in x.items()) + "}"
    return (f"GC: utilization={d(rec['utilization'])} gc={d(rec['gc'])} before={d(rec['before'])} "
            f"after={d(rec['after'])} device={rec['device']} fn={rec['fn']} time={rec['time']} "
            f"reason={rec['reason']}")


_LINE = re.compile(r"^GC: utilization=(\{.*?\}) gc=(\{.*?\}) before=(\{.*?\}) after=(\{.*?\}) "
                   r"device=(\S+) fn=(\S+) time=(\S+)(?: reason=(.+))?$")


def parse_log_line(line: str) -> dict:
    """The inverse of format_log_line (for tools that read the log).  A line that is not a
    well-formed GC line raises ValueError naming it (cut to 80 characters), never anything
    from ast.literal_eval."""
    import ast

    if not isinstance(line, str):
        raise TypeError(f"a GC line is a str, got {type(line).__name__}")
    if len(line) > 4096:
        raise ValueError(f"not a vramguard GC line (longer than 4096 characters): {short_repr(line)}")
    m = _LINE.match(line.strip())
    if not m:
        raise ValueError(f"not a vramguard GC line: {short_repr(line)}")
    out: dict[str, Any] = {}
    try:
        for key, group in (("utilization", 1), ("gc", 2), ("before", 3), ("after", 4)):
            v = ast.literal_eval(m.group(group))
            if not isinstance(v, dict) or not all(isinstance(k, str) and type(x) in (int, float)
                                                  and math.isfinite(x) for k, x in v.items()):
                raise ValueError(f"{key} is not a dict of finite numbers")
            out[key] = v
        t = float(m.group(7))
        if not math.isfinite(t):
            raise ValueError(f"time {m.group(7)!r} is not finite")
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, OverflowError) as e:
        raise ValueError(f"malformed vramguard GC line ({type(e).__name__}: {short_repr(str(e), 80)}): "
                         f"{short_repr(line)}") from None
    out.update({"device": m.group(5), "fn": m.group(6), "time": t, "reason": m.group(8)})
    return out


# -------------------------------------------------------------------- process-wide guard
_guard: GCGuard | None = None
_guard_lock = _forksafe.lock()


def guard() -> GCGuard:
    global _guard
    if _guard is None:
        with _guard_lock:
            if _guard is None:
                _guard = GCGuard()
    return _guard


def configure_gc(*, threshold: float | None = None, low_vram: bool | None = None,
                 min_interval: float | None = None, growth: float | None = None,
                 python_gc: bool | None = None,
                 enabled: bool | None = None, stages: dict[str, bool] | None = None,
                 log_file: str | None | bool = False) -> GCGuard:
    """Change the process-wide GC settings; validates every value before changing any."""
    g = guard()
    if threshold is not None:
        _native.Policy(threshold)  # validates: 0..100, finite, numeric
    if min_interval is not None:
        _native.Policy(70.0, False, min_interval)
    if growth is not None:
        _native.Policy(growth=growth)
    for name, val in (("low_vram", low_vram), ("python_gc", python_gc), ("enabled", enabled)):
        if val is not None and not isinstance(val, bool):
            raise TypeError(f"{name} must be True or False, got {val!r}")
    for name in (stages or {}):
        _check_stage(name)
    if threshold is not None:
        g.policy.threshold = threshold
    if min_interval is not None:
        g.policy.min_interval = min_interval
    if growth is not None:
        g.policy.growth = growth
    if low_vram is not None:
        g.low_vram = low_vram
    if python_gc is not None:
        g.python_gc = python_gc
    if enabled is not None:
        g.enabled = enabled
    for name, on in (stages or {}).items():
        g.enable_stage(name, bool(on))
    if log_file is not False:
        g.set_log_file(log_file or None)  # type: ignore[arg-type]
    return g


def set_log_file(path: str | os.PathLike | None) -> None:
    guard().set_log_file(path)


def gc_check(stage: str, *, forced: bool = False, need: int | str = 0, device: int | None = None) -> Decision:
    """Run the GC policy for `stage` now (what the hooks call after a stage)."""
    return guard().check(stage, forced=forced, need=parse_size(need, "need"), device=device)


def gc_stats() -> dict[str, dict]:
    """Per stage: checks, collections, seconds, saved (bytes), skipped reasons."""
    return guard().stats()


_reported: set[tuple[str, str, str]] = set()


def _after_work_failed(what: str, name: str, e: BaseException) -> None:
    """Our bookkeeping around a stage failed (a device read, a probe, the sampler): the
    stage's own work is never failed for it.  Logged once per (what, stage, error type)."""
    key = (what, name, type(e).__name__)
    if key in _reported:
        log.debug("vramguard: %s for stage %s failed again: %s: %s", what, name, type(e).__name__, e)
        return
    _reported.add(key)
    log.warning("vramguard: %s for stage %s failed (%s: %s); the stage's result is kept, "
                "later failures of this kind are logged at DEBUG", what, name, type(e).__name__,
                short_repr(str(e), 200))


def _begin(name: str) -> tuple[Any, Any]:
    try:
        s = sampling.sampler()
        return s, s.begin(name)
    except Exception as e:
        _after_work_failed("the sampler's stage mark", name, e)
        return None, None


def _end(name: str, s: Any, token: Any) -> None:
    if s is None:
        return
    try:
        s.end(token)
    except Exception as e:
        _after_work_failed("the sampler's stage mark", name, e)


def _check_after(name: str, need: int, device: int | None) -> None:
    try:
        guard().check(name, need=need, device=device)
    except Exception as e:
        _after_work_failed("the GC check", name, e)


@contextlib.contextmanager
def stage(name: str, *, gc: bool | None = None, need: int | str = 0, device: int | None = None) -> Iterator[None]:
    """Mark a stage on the sampler; on a normal exit run the GC policy for it.

    gc=None runs the policy only for GC stages (STAGES and registered ones); any other name
    is just a mark.  On an exception nothing is collected here: the exception's frames still
    hold the stage's tensors, and the host's own handler runs first.  Bad arguments raise
    at once; once the work has run, nothing of ours (the sampler, a device read, a probe)
    can fail it: such errors are logged once."""
    if gc and (not isinstance(name, str) or name not in _known):
        _check_stage(name)
    need_b = parse_size(need, "need")
    s, token = _begin(name)
    ok = False
    try:
        yield
        ok = True
    finally:
        _end(name, s, token)
    if ok and (gc if gc is not None else name in _known):
        _check_after(name, need_b, device)


def after_stage(name: str, *, need: int | str = 0, device: int | None = None) -> Callable[[F], F]:
    """Decorator: mark `fn` as stage `name` and run the GC policy after it returns.  The
    result of `fn` is returned even when the GC check fails (logged once)."""
    _check_stage(name)
    need_b = parse_size(need, "need")

    def deco(fn: F) -> F:
        if getattr(fn, "__vramguard_stage__", None) == name:
            return fn  # already wrapped for this stage: no double wrapping

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            s, token = _begin(name)
            try:
                result = fn(*args, **kwargs)
            finally:
                _end(name, s, token)
            _check_after(name, need_b, device)
            return result

        wrapper.__vramguard_stage__ = name  # type: ignore[attr-defined]
        wrapper.__vramguard_original__ = fn  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return deco


@contextlib.contextmanager
def run(label: str = "run") -> Iterator[GCGuard]:
    """Scope a run (a prompt, a script): logs the INFO summary at the end."""
    g = guard()
    with g._lock:
        g._run_stats = {}
    try:
        yield g
    finally:
        g.run_summary(label)
