#!/usr/bin/env python3
"""Seeded fuzzer over every public entry point of vramguard (issue 10).

    python scripts/fuzz.py --seed 1 --calls 3000                 # the CI slice (tests/test_fuzz.py)
    nice -n 15 python scripts/fuzz.py --seed 1 --calls 1000000   # the documented long run
    python scripts/fuzz.py --seed 1 --replay 1234                # show (and run) call 1234 in-process

Targets are found by introspection: every function, constructor, method and property of
vramguard._native (dir()), and the public Python API (vramguard.__all__ and every submodule's
__all__), so an entry point added later is fuzzed without editing this file.  Call i of seed S
is generated from random.Random(f"{S}/{i}") alone, after the library state is put back to a
fixed baseline, so any call can be replayed on its own.

Calls run in forked worker processes fed by this (single-threaded) parent; a worker that dies
by a signal, exits on a sanitizer report, or makes no progress within --timeout-per-call is
recorded as a finding (seed, call index, target, arguments, signal, sanitizer excerpt), the
call is replayed alone in a fresh worker to see whether it reproduces on its own, and the run
continues with a new worker.  Per call: any exception must be an ordinary Exception (no
SystemError, no "error return without exception set", nothing left set for the next call: a
sentinel call follows every call), and cheap invariants are checked (budget formula, plan
covers the image, Canvas.finish only when every pixel was written, finite output).

Exit status 1 on any finding; a summary, then one JSON line, on stdout.  Under the sanitizer
build run it with the environment of `bash scripts/test.sh --sanitize` (LD_PRELOAD=libasan,
PYTHONMALLOC=malloc); sanitizer reports in a worker become findings.
"""
from __future__ import annotations

import argparse
import collections
import faulthandler
import inspect
import json
import math
import os
import pkgutil
import random
import re
import select
import signal
import sys
import tempfile
import threading
import time
import traceback

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the parent forks: no BLAS thread pool
os.environ.setdefault("OMP_NUM_THREADS", "1")

SANITIZED = "asan" in os.environ.get("LD_PRELOAD", "") or bool(os.environ.get("VRAMGUARD_SANITIZED"))
if SANITIZED and "allocator_may_return_null" not in os.environ.get("ASAN_OPTIONS", "") \
        and not os.environ.get("VG_FUZZ_REEXEC"):
    # A fuzzed huge array must give MemoryError, not an ASan "allocation-size-too-big" report
    # about NumPy's own malloc; ASan reads its options once, at start-up: re-exec.
    os.environ["ASAN_OPTIONS"] = (os.environ.get("ASAN_OPTIONS", "") +
                                  ":allocator_may_return_null=1:max_allocation_size_mb=4096").lstrip(":")
    os.environ["VG_FUZZ_REEXEC"] = "1"
    os.execv(sys.executable, [sys.executable] + sys.argv)



def _cleanup(path, _pid=os.getpid()):
    import atexit
    import shutil
    atexit.register(lambda: os.getpid() == _pid and shutil.rmtree(path, ignore_errors=True))


def _fake_nvml():
    """Build tests/fakelibs/fake_nvml.c so calls can also run on a 'driver' device, where the
    framework probe applies (simulated devices skip it).  Off with --no-fake-nvml, or when a
    real NVML is in use (VRAMGUARD_NVML_LIB set), or without a C compiler."""
    if "--no-fake-nvml" in sys.argv or os.environ.get("VRAMGUARD_NVML_LIB"):
        return False
    import subprocess
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fakelibs", "fake_nvml.c")
    d = tempfile.mkdtemp(prefix="vgfuzz-nvml-")
    _cleanup(d)
    out = os.path.join(d, "libfake-nvml.so")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    try:
        subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-O1", "-o", out, src], check=True,
                       capture_output=True, env=env, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    os.environ["VRAMGUARD_NVML_LIB"] = out
    os.environ["FAKE_NVML_DEVICES"] = f"{8 << 30}:{3 << 30}"
    os.environ["FAKE_NVML_PROC_USED"] = str(1 << 30)
    return True


FAKE_NVML = _fake_nvml()

import numpy as np  # noqa: E402

import vramguard  # noqa: E402
from vramguard import _native  # noqa: E402

try:  # imported once here, before the workers fork: some targets import torch lazily, and a
    import torch  # noqa: F401,E402  first import (seconds) inside a call would read as a hang
except ImportError:
    pass

GiB = 1 << 30
MiB = 1 << 20
SKIP_NAMES = {"after_fork_child"}  # documented child-only hook: calling it under load is misuse


# ============================================================================ adversarial values

class FuzzBoom(Exception):
    """Raised on purpose by the fuzzer's hostile objects: propagating it is correct."""


class Ctx:
    """Objects of the call being made: hostile objects re-enter vramguard through them."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.canvas = None
        self.canvas_out = None
        self.canvas_mask = None  # pixels written by successful puts (None: untracked)
        self.nonfinite = False
        self.sampler = None
        self.samplers: list = []
        self.policy = None
        self.reentries = 0
        self.python = False

    def reenter(self, action: str) -> None:
        self.reentries += 1
        if getattr(self, "_inside", False):  # one level deep: a probe re-entering itself forever
            return                            # is the caller's infinite recursion, not ours
        if self.reentries > 4:  # a per-tile callback forcing a GC every tile is slow by design
            return
        self._inside = True
        try:
            if action == "finish" and self.canvas is not None:
                self.canvas.finish()
            elif action == "simulate_clear":
                _native.simulate_clear()
            elif action == "set_probe":
                _native.set_probe(lambda i: {"reserved": 10 ** 400})
            elif action == "stop" and self.sampler is not None:
                self.sampler.stop()
            elif action == "reset" and self.sampler is not None:
                self.sampler.reset()
            elif action == "clear_limits":
                _native.clear_limits()
            elif action == "shared_stop":
                vramguard.sampler().stop()
            elif action == "gc_check":
                vramguard.gc_check("vae_decode", forced=True)
        except Exception:
            pass
        finally:
            self._inside = False


REENTER = ["finish", "simulate_clear", "set_probe", "stop", "reset", "clear_limits", "shared_stop",
           "gc_check"]
CTX: Ctx | None = None


def _hostile(mode: str, action: str, value):
    """What a hostile dunder does: raise, re-enter vramguard then answer, or answer oddly."""
    if mode == "raise":
        raise FuzzBoom("hostile dunder")
    if mode == "reenter" and CTX is not None:
        CTX.reenter(action)
    return value


class EvilInt(int):
    """An int whose __float__/__index__/__int__ raise or re-enter (C code reaches them through
    PyFloat_AsDouble and friends even though PyLong_Check passes)."""
    mode = "raise"
    action = "finish"

    def __float__(self):
        return _hostile(self.mode, self.action, float(int(self)))

    def __index__(self):
        return _hostile(self.mode, self.action, int.__index__(self))

    def __int__(self):
        return _hostile(self.mode, self.action, int.__index__(self))


class EvilFloat(float):
    mode = "raise"
    action = "finish"

    def __float__(self):
        return _hostile(self.mode, self.action, float.__float__(self))

    def __index__(self):
        return _hostile(self.mode, self.action, 1)


class Dunder:
    """Not a number, but has __index__/__float__/__bool__/__int__ (for 'n', 'd', 'p' formats)."""

    def __init__(self, value, mode, action):
        self.value, self.mode, self.action = value, mode, action

    def __index__(self):
        return _hostile(self.mode, self.action, int(self.value))

    def __float__(self):
        return _hostile(self.mode, self.action, float(self.value))

    def __int__(self):
        return _hostile(self.mode, self.action, int(self.value))

    def __bool__(self):
        return _hostile(self.mode, self.action, bool(self.value))

    def __repr__(self):
        return f"Dunder({self.value!r}, {self.mode}, {self.action})"


class LyingSeq:
    """A sequence whose __len__/__getitem__/__iter__ lie, raise or re-enter."""

    def __init__(self, items, how, action):
        self.items, self.how, self.action = list(items), how, action

    def __len__(self):
        if self.how == "len_raises":
            raise FuzzBoom("__len__")
        if self.how == "len_huge":
            return sys.maxsize
        if self.how == "len_lies":
            return len(self.items) + 3
        return len(self.items)

    def __getitem__(self, i):
        if self.how == "getitem_raises":
            raise FuzzBoom("__getitem__")
        if self.how == "reenter" and CTX is not None:
            CTX.reenter(self.action)
        return self.items[i]

    def __iter__(self):
        if self.how == "iter_raises":
            raise FuzzBoom("__iter__")
        if self.how == "reenter" and CTX is not None:
            CTX.reenter(self.action)
        return iter(self.items)

    def __repr__(self):
        return f"LyingSeq({self.items!r}, {self.how}, {self.action})"


class ReenterList(list):
    """A list subclass: PySequence_Fast() iterates it, running __iter__ (and re-entering)."""
    action = "finish"

    def __iter__(self):
        if CTX is not None:
            CTX.reenter(self.action)
        return super().__iter__()


class BadMapping(dict):
    def __getitem__(self, k):
        raise FuzzBoom("__getitem__")


EDGE_INTS = [0, 1, -1, 2, 3, 7, 16, 64, 255, 256, 1023, 1024, 4096, 65535, 2 ** 20, 2 ** 24,
             2 ** 31 - 1, 2 ** 31, -2 ** 31, 2 ** 32, 2 ** 53 + 1, 2 ** 62, 2 ** 63 - 1, 2 ** 63 - 2,
             2 ** 63 - 16, 2 ** 63, 2 ** 64 - 1, 2 ** 64 + 1, -2 ** 63, -2 ** 63 - 1, 9 * 10 ** 18,
             10 ** 400, -10 ** 400]
EDGE_FLOATS = [0.0, -0.0, 0.5, 1.0, -1.0, 1e-300, 5e-324, 1e300, 1.8e308, 9.2e18, 9.3e18, 2.0 ** 63,
               float("nan"), float("inf"), float("-inf"), 100.0, 100.0000001, 3600.0, 1e-9]
STRINGS = ["", "x", "vae_decode", "unet", "text_encode", "a\0b", "\udcff", "é" * 3, "x" * 100000,
           "../escape", "nchw", "nhwc", "cuda", "9GB", "1.5GiB", "-1GB", "nanGB", "1e400", "0x10",
           "10" * 300]
STAGES = ["vae_decode", "unet", "text_encode", "controlnet", "lora", "upscale", "custom_x"]


def edge_int(rng):
    v = rng.choice(EDGE_INTS)
    r = rng.random()
    if r < 0.1:
        v = v + rng.randint(-3, 3)
    return v


def hostile_number(rng, base=None):
    base = edge_int(rng) if base is None else base
    if type(base) not in (int, float) or (type(base) is float and not math.isfinite(base)):
        base = 1
    mode = rng.choice(["raise", "reenter", "reenter", "plain"])
    action = rng.choice(REENTER)
    k = rng.randrange(4)
    if k == 0:
        o = EvilInt(base if isinstance(base, int) else 1)
    elif k == 1:
        o = EvilFloat(float(base) if abs(base) < 1e300 else 1.0)
    else:
        return Dunder(base if abs(base) < 10 ** 300 else 1, mode, action)
    o.mode, o.action = mode, action
    return o


def adversarial(rng, depth=0):
    """Any hostile value."""
    k = rng.randrange(22)
    if k == 0:
        return None
    if k == 1:
        return rng.choice([True, False])
    if k in (2, 3, 4):
        return edge_int(rng)
    if k in (5, 6):
        return rng.choice(EDGE_FLOATS)
    if k == 7:
        return rng.choice(STRINGS)
    if k == 8:
        return hostile_number(rng)
    if k == 9:
        return LyingSeq([edge_int(rng) for _ in range(rng.randrange(4))],
                        rng.choice(["len_raises", "len_huge", "len_lies", "getitem_raises",
                                    "iter_raises", "reenter"]), rng.choice(REENTER))
    if k == 10:
        return array(rng)
    if k == 11:
        return {rng.choice(["free", "total", "used", "evictable", "x"]): adversarial(rng, depth + 1)
                for _ in range(rng.randrange(3))} if depth < 2 else {}
    if k == 12:
        return [adversarial(rng, depth + 1) for _ in range(rng.randrange(4))] if depth < 2 else []
    if k == 13:
        return object()
    if k == 14:
        return b"bytes\0"
    if k == 15:
        return rng.choice([np.int64(-1), np.float32("nan"), np.uint64(2 ** 64 - 1), np.float16(65504)])
    if k == 16:
        return callable_value(rng)
    if k == 17:
        return BadMapping(free=1)
    if k == 18:
        return complex(1, 1)
    if k == 19:
        return snap_mapping(rng)
    if k == 20:
        return rng.choice(STAGES)
    return rng.choice(EDGE_FLOATS + [0, 1, 2])


def hostile_probe(rng):
    """A framework probe: good, raising, nonsense, or re-entering vramguard."""
    k = rng.randrange(7)
    if k == 0:
        return (lambda i: {"reserved": 2 << 30, "allocated": 1 << 30, "oom_count": 1}), "good"
    if k == 1:
        def boom(i):
            raise FuzzBoom("probe")
        return boom, "raises"
    if k == 2:
        key = rng.choice(["reserved", "allocated", "active", "free", "evictable", "reserve", "oom_count"])
        val = rng.choice([10 ** 400, -5, 2 ** 63, float("nan"), float("inf"), "x", True, hostile_number(rng, 1)])
        return (lambda i: {key: val}), f"{{{key!r}: {val!r:.40}}}"
    if k == 3:
        val = adversarial(rng, 2)
        return (lambda i: val), f"returns {val!r:.60}"
    if k == 4:
        action = rng.choice(["simulate_clear", "set_probe", "clear_limits", "shared_stop", "gc_check"])

        def reent(i):
            if CTX is not None:
                CTX.reenter(action)
            return {"reserved": 1 << 30}
        return reent, f"re-enters {action}"
    if k == 5:
        return (lambda i: {"free": 9 * 10 ** 18, "evictable": 9 * 10 ** 18}), "huge free+evictable"
    return (lambda: None), "takes no argument"


def callable_value(rng):
    k = rng.randrange(6)
    if k == 0:
        return lambda *a, **kw: a[0] if a else None
    if k == 1:
        def boom(*a, **kw):
            raise FuzzBoom("callback")
        return boom
    if k == 2:
        action = rng.choice(REENTER)

        def reent(*a, **kw):
            if CTX is not None:
                CTX.reenter(action)
            return a[0] if a else None
        return reent
    if k == 3:
        return lambda *a, **kw: {"reserved": 1 << 30, "allocated": 1 << 29}
    if k == 4:
        val = adversarial(rng, 2)
        return lambda *a, **kw: val
    return lambda *a, **kw: np.zeros((1, 1, 1, 1), np.float32)


DTYPES = [np.float32, np.float16, np.float64, np.int8, np.uint8, np.int16, np.int32, np.int64,
          np.uint64, np.bool_, np.complex64, object, "V4", "U3", "datetime64[s]"]


def array(rng, shape=None, dtype=None):
    """An array of any dtype/shape, perhaps non-contiguous, byte-swapped, read-only,
    misaligned, zero-size, huge (broadcast), or a view of the current canvas output."""
    if shape is None:
        nd = rng.choice([0, 1, 2, 3, 4, 4, 4, 5])
        shape = tuple(rng.choice([0, 1, 1, 2, 3, 5, 8]) for _ in range(nd))
    dtype = dtype if dtype is not None else rng.choice(DTYPES)
    k = rng.randrange(10)
    if k == 0 and CTX is not None and CTX.canvas_out is not None:
        a = CTX.canvas_out
        if a.ndim == 4 and a.size:
            return a[:, : rng.randint(1, a.shape[1]), : rng.randint(1, a.shape[2])]
        return a
    if k == 1:  # huge, without allocating
        # Python entry points do work proportional to a valid input: there a "huge" array is
        # 4 M elements (bounded time), in the C core anything up to 2**60 (must be refused)
        cap = 2 ** 22 if CTX is not None and CTX.python else 2 ** 60
        big, total = [], 1
        for _ in range(len(shape) or 4):
            d = rng.choice([1, 3, 2 ** 16, 2 ** 20, 2 ** 31])
            if total * d >= cap:
                d = 1
            big.append(d)
            total *= d
        return np.broadcast_to(np.zeros((), np.float32), tuple(big))
    try:
        a = np.zeros(shape, dtype=dtype)
    except (TypeError, ValueError):
        a = np.zeros(shape, np.float32)
    if a.dtype.kind in "fc" and a.size:
        a[...] = np.asarray(rng.random())
        if rng.random() < 0.1:
            a.flat[0] = rng.choice([np.nan, np.inf])
    if k == 2 and a.ndim:
        a = np.repeat(a, 2, axis=-1)[..., ::2]  # non-contiguous
    elif k == 3 and a.ndim >= 2:
        a = np.swapaxes(a, -1, -2)
    elif k == 4 and a.dtype.kind in "fiu":
        a = a.byteswap().view(a.dtype.newbyteorder())
    elif k == 5:
        a.flags.writeable = False
    elif k == 6 and a.dtype.kind in "fiu" and a.size:
        buf = np.zeros(a.nbytes + 1, np.uint8)
        a = buf[1:].view(a.dtype).reshape(a.shape)  # misaligned
    return a


def snap_mapping(rng, valid=False):
    """A snapshot as a mapping: plausible values, then (unless valid) one or two hostile ones."""
    keys = ["total", "free", "used", "process_used", "framework_reserved", "framework_allocated",
            "evictable", "reserve", "cap", "budget", "oom_count", "retry_count", "index"]
    m = {}
    for k in keys:
        if rng.random() < 0.5:
            m[k] = rng.choice([0, 1, 1 << 20, 4 * GiB, 8 * GiB, 2 ** 62, 9 * 10 ** 18, 9.2e18, -1, None])
    if not valid:
        for _ in range(rng.choice([1, 1, 1, 2])):
            k = rng.choice(keys)
            if rng.random() < 0.6:
                m[k] = rng.choice([10 ** 400, -10 ** 400, 2 ** 63, 2 ** 64 + 1, -2, float("nan"), float("inf"),
                                   True, "1", 1.8e308, hostile_number(rng, 1)])
            else:
                m[k] = adversarial(rng, 2)
    return m


# ============================================================================ targets

class Target:
    def __init__(self, name, kind, obj, owner=None):
        self.name, self.kind, self.obj, self.owner = name, kind, obj, owner


def discover(only=None):
    """Every public callable of vramguard._native and of the Python API (sorted: stable order)."""
    found = {}

    def add_callable(prefix, name, obj):
        if name.startswith("_") or name in SKIP_NAMES:
            return
        full = f"{prefix}.{name}"
        if isinstance(obj, type):
            found[full] = Target(full, "ctor", obj)
            for an in dir(obj):
                if an.startswith("_"):
                    continue
                try:
                    attr = inspect.getattr_static(obj, an)
                except AttributeError:
                    continue
                if isinstance(attr, property) or type(attr).__name__ == "getset_descriptor":
                    found[f"{full}.{an}"] = Target(f"{full}.{an}", "prop", attr, obj)
                elif isinstance(attr, staticmethod) or type(attr).__name__ in ("staticmethod",):
                    found[f"{full}.{an}"] = Target(f"{full}.{an}", "func", getattr(obj, an))
                elif type(attr).__name__ in ("method_descriptor", "function", "classmethod_descriptor",
                                             "builtin_function_or_method"):
                    if type(attr).__name__ == "builtin_function_or_method":  # C static method
                        found[f"{full}.{an}"] = Target(f"{full}.{an}", "func", getattr(obj, an))
                    else:
                        found[f"{full}.{an}"] = Target(f"{full}.{an}", "method", attr, obj)
        elif callable(obj):
            found[full] = Target(full, "func", obj)

    for n in dir(_native):
        add_callable("_native", n, getattr(_native, n))
    mods = {"vramguard": vramguard}
    for mi in pkgutil.walk_packages(vramguard.__path__, "vramguard."):
        if mi.name.endswith(("__main__", "demo", "cli")):
            continue
        try:
            mods[mi.name] = __import__(mi.name, fromlist=["_"])
        except Exception:
            continue
    seen_objs = {id(t.obj) for t in found.values()}
    for mname in sorted(mods):
        mod = mods[mname]
        for n in getattr(mod, "__all__", ()):
            obj = getattr(mod, n, None)
            if obj is None or id(obj) in seen_objs or isinstance(obj, (int, str, dict, tuple)):
                continue
            if isinstance(obj, type) and issubclass(obj, BaseException):
                continue
            seen_objs.add(id(obj))
            add_callable(mname, n, obj)
    ts = [found[k] for k in sorted(found)]
    if only:
        ts = [t for t in ts if re.search(only, t.name)]
    return ts


# ============================================================================ call builders

def valid_ramps(rng, origin, n):
    r = []
    for _ in range(rng.randrange(3)):
        p = origin + rng.uniform(-2, n + 2)
        r.append((p, p + rng.uniform(0, 8), rng.random() < 0.5))
    return r


def hostile_ramps(rng):
    k = rng.randrange(6)
    action = "finish" if rng.random() < 0.5 else rng.choice(REENTER)
    if k == 0:
        return [(Dunder(1.0, "reenter", action), 2.0, True)]
    if k == 1:
        return [(1.0, 2.0, Dunder(True, rng.choice(["reenter", "raise"]), action))]
    if k == 2:
        rl = ReenterList([(0.0, 1.0, True)])
        rl.action = action
        return rl
    if k == 3:
        return LyingSeq([(0.0, 1.0, True)], rng.choice(["len_raises", "len_lies", "getitem_raises",
                                                          "iter_raises", "reenter"]), action)
    if k == 4:
        return [(rng.choice(EDGE_FLOATS), rng.choice(EDGE_FLOATS), True)] * rng.choice([1, 32, 33])
    return adversarial(rng)


def make_canvas(rng, ctx):
    layout = rng.choice(["nhwc", "nchw"])
    dt = rng.choice([np.float32, np.float32, np.float16])
    B, H, W, C = rng.choice([1, 1, 2]), rng.randint(1, 24), rng.randint(1, 24), rng.choice([1, 3, 4])
    shape = (B, H, W, C) if layout == "nhwc" else (B, C, H, W)
    out = np.zeros(shape, dt)
    cv = _native.Canvas(out, layout, rng.choice([0, 1, 2, 4]))
    ctx.canvas, ctx.canvas_out = cv, out
    ctx.canvas_mask = np.zeros((B, H, W), bool)
    ctx.canvas_dims = (layout, dt, B, H, W, C)
    ctx.canvas_desc = f"Canvas(np.zeros({shape}, np.{np.dtype(dt).name}), {layout!r})"
    # sometimes pre-fill it completely, sometimes partly
    if rng.random() < 0.5:
        full = np.ones(shape, dt)
        cv.put(full, 0, 0, 0, [], [])
        ctx.canvas_mask[:] = True
        ctx.canvas_desc += "; put(np.ones(same), 0, 0, 0, [], [])"
    if rng.random() < 0.05:
        try:
            cv.finish()
            ctx.canvas_desc += "; finish()"
        except RuntimeError:
            pass
    return cv


def put_args(rng, ctx):
    layout, dt, B, H, W, C = ctx.canvas_dims
    nb = rng.randint(1, B)
    b0 = rng.randint(0, B - nb)
    h, w = rng.randint(1, H), rng.randint(1, W)
    oy, ox = rng.randint(0, H - h), rng.randint(0, W - w)
    if rng.random() < 0.25:  # a full-height tile on the right: leaves [0, ox) to earlier tiles
        nb, b0, h, oy = B, 0, H, 0
        ox = rng.randint(0, W - 1)
        w = W - ox
    rdt = rng.choice([dt, np.float32, np.float16])
    shape = (nb, h, w, C) if layout == "nhwc" else (nb, C, h, w)
    res = np.asarray(rng.uniform(-2, 2), rdt) + np.zeros(shape, rdt)
    if rng.random() < 0.2:  # a strided view of a bigger result
        big = np.zeros((nb, h + 2, w + 2, C) if layout == "nhwc" else (nb, C, h + 2, w + 2), rdt)
        res = big[:, 1:h + 1, 1:w + 1] if layout == "nhwc" else big[:, :, 1:h + 1, 1:w + 1]
    aliased = rng.random() < 0.2
    if aliased:  # the result is a view of the canvas output, in place or shifted
        out = ctx.canvas_out
        sx = rng.choice([ox, 0, 0, max(0, ox - 1)])
        res = out[b0:b0 + nb, oy:oy + h, sx:sx + w] if layout == "nhwc" else out[b0:b0 + nb, :, oy:oy + h, sx:sx + w]
    args = [res, b0, ox, oy, valid_ramps(rng, ox, w), valid_ramps(rng, oy, h)]
    if aliased and rng.random() < 0.7:  # unit weights: the plain-copy path
        args[4], args[5] = [], []
    nmut = rng.choice([0, 0, 1, 1, 2])
    for _ in range(nmut):
        i = rng.randrange(6)
        if i == 0:
            args[0] = array(rng) if rng.random() < 0.6 else adversarial(rng)
        elif i in (1, 2, 3):
            r = rng.random()
            if r < 0.5:
                edge = rng.choice([2 ** 63 - 1, 2 ** 63 - 2, 2 ** 63 - 1 - rng.randrange(64), 2 ** 62,
                                   2 ** 31, -1, -2 ** 63, 2 ** 63, 2 ** 64 + 1])
                args[i] = edge
            elif r < 0.75:
                args[i] = hostile_number(rng, args[i])
            else:
                args[i] = adversarial(rng)
        else:
            args[i] = hostile_ramps(rng)
    return args, (b0, ox, oy, res)


def band_args(rng, ctx):
    """A band for Canvas.put_band: put_args' tile plus 0-3 more of its images, rows and height at
    random x (a valid band), then sometimes broken: a tile of another height or row, a non-tuple
    item, an empty or hostile container."""
    layout, dt, B, H, W, C = ctx.canvas_dims
    args0, _ = put_args(rng, ctx)
    items = [tuple(args0)]
    res0 = args0[0]
    if (isinstance(res0, np.ndarray) and res0.ndim == 4 and all(type(x) is int for x in args0[1:4])
            and res0.shape[0] * res0.shape[1] * res0.shape[2] <= 4096):   # not a hostile giant's rows
        nb, h = res0.shape[0], (res0.shape[1] if layout == "nhwc" else res0.shape[2])
        for _ in range(rng.choice([0, 1, 2, 3])):
            w = rng.randint(1, W)
            ox = rng.randint(0, W - w)
            hh = h + 1 if rng.random() < 0.05 else h
            shape = (nb, hh, w, C) if layout == "nhwc" else (nb, C, hh, w)
            rdt = rng.choice([dt, np.float32, np.float16])
            res = np.asarray(rng.uniform(-2, 2), rdt) + np.zeros(shape, rdt)
            oy = args0[3] + 1 if rng.random() < 0.05 else args0[3]
            items.append((res, args0[1], ox, oy, valid_ramps(rng, ox, w), args0[5]))
    r = rng.random()
    if r < 0.04:
        return adversarial(rng)
    if r < 0.08:
        return []
    if r < 0.12:
        items.insert(rng.randrange(len(items) + 1), adversarial(rng))
    return items if rng.random() < 0.5 else tuple(items)


def gen_native(t: Target, rng, ctx):
    """(callable, args, kwargs, check) for a native target, valid near the edges, then mutated."""
    n = t.name.split(".", 1)[1]
    A = adversarial
    if n == "Canvas":
        layout = rng.choice(["nhwc", "nchw", "NHWC", "x" * 1000, "nhwc\0"])
        a = array(rng, dtype=rng.choice([np.float32, np.float16, np.float64])) if rng.random() < 0.5 \
            else np.zeros(tuple(rng.randint(0, 9) for _ in range(4)), np.float32)
        args = [a, layout, rng.choice([0, 1, 16, 17, -1, 2 ** 31, hostile_number(rng, 2)])]
        return t.obj, args[: rng.randint(1, 3)], {}, None
    if n in ("Canvas.put", "Canvas.put_band", "Canvas.finish", "Canvas.coverage", "Canvas.puts"):
        cv = make_canvas(rng, ctx)

        def mark(args):
            ok_types = (isinstance(args, (tuple, list)) and len(args) == 6 and isinstance(args[0], np.ndarray)
                        and all(type(x) is int for x in args[1:4]))
            if not ok_types:  # an int-like whose value we can't read back safely: don't judge
                ctx.canvas_mask = None
            if ok_types and args[0].ndim == 4 and ctx.canvas_mask is not None:
                layout = ctx.canvas_dims[0]
                nb = args[0].shape[0]
                h, w = (args[0].shape[1], args[0].shape[2]) if layout == "nhwc" else args[0].shape[2:4]
                ctx.canvas_mask[args[1]:args[1] + nb, args[3]:args[3] + h, args[2]:args[2] + w] = True
                if not np.isfinite(np.asarray(args[0], np.float64)).all():
                    ctx.nonfinite = True

        def finish_check():
            # then finish: must refuse unless every pixel was written; result finite
            try:
                out = cv.finish()
            except RuntimeError:
                return None
            if ctx.canvas_mask is not None and not ctx.canvas_mask.all():
                return ("finish() returned an output with pixels no put() wrote "
                        f"({int((~ctx.canvas_mask).sum())} of {ctx.canvas_mask.size})")
            if not ctx.nonfinite and not np.isfinite(np.asarray(out, np.float64)).all():
                return "finish() returned non-finite values from finite inputs"
            return None

        if n == "Canvas.put_band":
            items = band_args(rng, ctx)

            def check_band(r, items=items):
                for it in items:   # no exception: every item was blended
                    mark(it)
                return finish_check()
            return cv.put_band, [items], {}, check_band
        if n == "Canvas.put":
            args, _ = put_args(rng, ctx)

            def check(r, args=args):
                mark(args)
                return finish_check()
            return cv.put, args, {}, check
        if n == "Canvas.puts":
            return (lambda: cv.puts), [], {}, None
        return getattr(cv, n.split(".")[1]), [], {}, None
    if n == "Canvas.weights":
        n_ = rng.choice([0, 1, 10, 100, 4096, edge_int(rng)])
        if 2 ** 20 < n_ <= 2 ** 24:  # accepted but a 128 MiB answer: slow by nature, not by defect
            n_ = rng.choice([2 ** 20, 2 ** 24 + 1])
        args = [rng.choice([0, 5, -5, edge_int(rng)]), n_,
                valid_ramps(rng, 0, 10) if rng.random() < 0.6 else hostile_ramps(rng)]
        if rng.random() < 0.3:
            k_ = rng.randrange(2)
            args[k_] = hostile_number(rng, args[k_])
        return t.obj, args, {}, None
    if n == "AllocSim" or n.startswith("AllocSim."):  # issue 16: the caching-allocator model
        return gen_allocsim(t, n, rng)
    if n == "Sampler":
        kw = {}
        for k, gen in (("device", lambda: rng.choice([0, None, 1, -1, edge_int(rng)])),
                       ("interval", lambda: rng.choice([0.001, 0.01, 0.0, 1e-300, 3600.0, 3601.0])),
                       ("nvml_interval", lambda: rng.choice([0.0, 0.25, 1e-9])),
                       ("capacity", lambda: rng.choice([2, 1, 65536, 2 ** 24, 2 ** 24 + 1, 2 ** 63]))):
            if rng.random() < 0.5:
                kw[k] = gen() if rng.random() < 0.8 else A(rng)
        return t.obj, [], kw, None
    if n.startswith("Sampler."):
        s = make_sampler(rng, ctx)
        attr = n.split(".")[1]
        if attr == "begin":
            return s.begin, [rng.choice(STAGES) if rng.random() < 0.7 else A(rng)], {}, None
        if attr == "end":
            tok = s.begin("x")
            return s.end, [tok if rng.random() < 0.6 else A(rng)], {}, None
        if t.kind == "prop":
            return (lambda: getattr(s, attr)), [], {}, None
        return getattr(s, attr), [], {}, None
    if n == "Policy":
        args = [rng.choice([0.0, 70.0, 100.0, 100.1, -0.0, float("nan")]), rng.random() < 0.5,
                rng.choice([0.0, 1.0, 1e308]), rng.random() < 0.5, rng.choice([0.02, 0.0, 1.0, 2.0])]
        for _ in range(rng.choice([0, 1, 2])):
            args[rng.randrange(5)] = A(rng)
        return t.obj, args[: rng.randint(0, 5)], {}, None
    if n.startswith("Policy."):
        p = _native.Policy()
        ctx.policy = p
        attr = n.split(".")[1]
        if attr == "decide":
            args = [snap_mapping(rng, valid=rng.random() < 0.5) if rng.random() < 0.8 else
                    (real_snapshot() if rng.random() < 0.5 else A(rng))]
            kw = {}
            if rng.random() < 0.5:
                kw["need"] = rng.choice([0, 1 << 30, edge_int(rng), A(rng)])
            if rng.random() < 0.3:
                kw["now"] = rng.choice([0.0, 1e9, float("nan"), A(rng)])
            if rng.random() < 0.2:
                kw["forced"] = A(rng)
            return p.decide, args, kw, (lambda r, m=args[0]: check_accepts_nonsense(m, r))
        if attr == "check":
            args = [rng.choice([0, 0, 1, -1, edge_int(rng), A(rng)])]
            if rng.random() < 0.5:
                args.append(rng.choice([True, False, A(rng)]))
                if rng.random() < 0.5:
                    args.append(rng.choice([0, 1 << 30, edge_int(rng), A(rng)]))
            return p.check, args, {}, None
        if attr == "collected":
            args = [] if rng.random() < 0.3 else [snap_mapping(rng) if rng.random() < 0.7 else A(rng)]
            return p.collected, args, {}, None
        if t.kind == "prop":
            if rng.random() < 0.5:
                val = rng.choice([0.0, 50.0, 100.0, 101.0, float("nan"), True, A(rng)])

                def setp(p=p, attr=attr, val=val):
                    setattr(p, attr, val)
                return setp, [], {}, None
            return (lambda: getattr(p, attr)), [], {}, None
        return getattr(p, attr), [], {}, None
    if n == "snapshot":
        return t.obj, [rng.choice([0, 0, 1, -1, edge_int(rng), A(rng), hostile_number(rng, 0)])], {}, \
            check_snapshot
    if n == "budget":
        m = snap_mapping(rng, valid=rng.random() < 0.6)
        if rng.random() < 0.25:  # every byte count near the int64 limit: sums must saturate
            for k in ("free", "evictable", "reserve", "cap", "process_used", "used"):
                if rng.random() < 0.6:
                    m[k] = rng.choice([0, 2 ** 62, 9 * 10 ** 18, 9.2e18, 2 ** 63 - 1])
        arg = m if rng.random() < 0.85 else A(rng)
        return t.obj, [arg], {}, (lambda r, m=arg: check_budget(m, r))
    if n == "plan":
        side = lambda: rng.choice([1, 2, 7, 64, 100, 512, 1000, 1024, 2048, 4096, 2 ** 20,  # noqa: E731
                                   2 ** 20 + 1, rng.randint(1, 5000)])
        kw = {"budget": rng.choice([1, 1 << 20, 64 << 20, 1 << 30, 8 << 30, 9 * 10 ** 18, 10 ** 400, 0])}
        for k, gen in (("overlap", lambda: rng.choice([0, 8, 16, 32, 64, 1000])),
                       ("align", lambda: rng.choice([1, 1, 8, 64, 4096])),
                       ("fixed_bytes", lambda: rng.choice([0, 1 << 20, 1 << 30, 1e300])),
                       ("per_px_bytes", lambda: rng.choice([0, 4, 12, 48, 1e-9, 1e30, 2 ** 63])),
                       ("batch", lambda: rng.choice([1, 4, 2 ** 20])),
                       ("min_tile", lambda: rng.choice([0, 1, 16, 64, 2 ** 20])),
                       ("max_tile", lambda: rng.choice([None, 1, 16, 512, 2 ** 20])),
                       ("feather", lambda: rng.choice([0.0, 0.5, 1.0]))):
            if rng.random() < 0.6:
                kw[k] = gen()
        args = [side(), side()]
        if rng.random() < 0.25:  # big image, tiny budget: must answer fast, fits or not
            args = [rng.choice([512, 1024, 2048, 4096]), rng.choice([512, 1024, 2048, 4096])]
            kw.update(budget=rng.choice([1 << 20, 4 << 20, 16 << 20]), per_px_bytes=rng.choice([4, 12, 48, 1000]))
            if rng.random() < 0.5:  # so that only the smallest tiles fit, or none
                kw["fixed_bytes"] = kw["budget"] - rng.choice([1, 100, 1000, 4096, 65536])
        for _ in range(rng.choice([0, 0, 1])):
            k = rng.choice(["width", "height", "overlap", "budget", "per_px_bytes", "align", "feather"])
            v = A(rng)
            if k == "width":
                args[0] = v
            elif k == "height":
                args[1] = v
            else:
                kw[k] = v
        return t.obj, args, kw, (lambda r, a=args, k=kw: check_plan(a, k, r))
    if n == "simulate":
        kw = {}
        for k in ("total", "used", "process_used", "reserved", "allocated", "oom_count", "retry_count"):
            if rng.random() < 0.3:
                kw[k] = rng.choice([0, 1, GiB, 8 * GiB, 9 * 10 ** 18, edge_int(rng), A(rng)])
        if rng.random() < 0.2:
            kw["name"] = rng.choice(STRINGS + [A(rng)])
        if rng.random() < 0.3:
            kw["script"] = rng.choice([[(0.0, GiB)], [(0, 1, 1), (1, 2)],
                                       [(hostile_number(rng, 0), GiB)],
                                       [(0.0, hostile_number(rng, GiB))], A(rng)])
        return t.obj, [rng.choice([0, 1, 2, -1, 63, 64, edge_int(rng)])], kw, None
    if n in ("set_limits",):
        kw = {}
        for k in ("device", "reserve", "cap"):
            if rng.random() < 0.6:
                kw[k] = rng.choice([0, None, GiB, 9 * 10 ** 18, edge_int(rng), A(rng), hostile_number(rng)])
        return t.obj, [], kw, None
    if n == "set_probe":
        return t.obj, [rng.choice([None, callable_value(rng), A(rng)])], {}, None
    if n in ("get_limits",):
        return t.obj, [rng.choice([None, 0, edge_int(rng), A(rng)])], {}, None
    if n in ("set_process_interval", "set_host_interval"):
        return t.obj, [rng.choice([0, 0.5, 1e308, -1, float("nan"), A(rng), hostile_number(rng)])], {}, None
    if n == "host":
        return t.obj, [] if rng.random() < 0.5 else [A(rng)], {}, None
    return generic(t.obj, rng, None)


def real_snapshot():
    """A Snapshot object to decide over; a hostile probe may refuse it: then a mapping."""
    try:
        return _native.snapshot(0)
    except Exception:
        return {"total": 8 * GiB, "free": 6 * GiB}


def check_snapshot(s):
    if s is None or not hasattr(s, "budget"):
        return None
    fe = s.free + s.evictable
    if s.budget < 0 or s.budget > fe:
        return f"snapshot budget {s.budget} outside [0, free + evictable = {fe}]"
    return None


def _num(v):
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or type(v) not in (int, float):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return int(v)


SNAP_KEYS = ("total", "free", "used", "process_used", "framework_reserved", "framework_allocated",
             "evictable", "reserve", "cap", "budget", "oom_count", "retry_count")


def nonsense_field(m):
    """A snapshot field no byte count can be (out of int64, < -1, not finite):
    accepting it as 'unknown' or wrapping it is a wrong result."""
    if type(m) is not dict:
        return None
    for k in SNAP_KEYS:
        v = m.get(k)
        if type(v) is int and not (-1 <= v < 2 ** 63):
            return k, v
        if type(v) is float and not (math.isfinite(v) and -1 <= v < 2.0 ** 63):
            return k, v
    return None


def check_accepts_nonsense(m, r):
    bad = nonsense_field(m)
    if bad is not None:
        return f"accepted snapshot field {bad[0]}={bad[1]!r:.60} and answered {r!r:.80}"
    return None


def check_budget(m, r):
    """budget() against the documented formula in exact integers (saturated to int64)."""
    bad = check_accepts_nonsense(m, r)
    if bad:
        return bad
    if not isinstance(m, dict) or type(m) is not dict or not isinstance(r, int):
        return None
    f = {k: _num(m.get(k)) for k in ("free", "evictable", "reserve", "cap", "process_used",
                                      "framework_reserved", "used", "budget")}
    if any(k in m and m[k] is not None and f[k] is None for k in f):
        return None
    if f["budget"] is not None and f["budget"] >= 0:
        return None  # given budget is taken as is
    free, ev, res, cap = f["free"] or 0, f["evictable"] or 0, f["reserve"] or 0, f["cap"] or 0
    b = max(0, free + ev - res)
    if cap > 0:
        pu, fr, used = f["process_used"], f["framework_reserved"], f["used"] or 0
        held = pu if pu is not None and pu >= 0 else (fr if fr is not None and fr >= 0 else used)
        b = min(b, max(0, cap - max(0, held - ev)))
    b = min(b, 2 ** 63 - 1)
    if r != b:
        return f"budget({m!r}) = {r}, formula gives {b}"
    return None


def check_plan(args, kw, r):
    if not isinstance(r, dict) or not r.get("fits"):
        return None
    w, h = args
    ov = kw.get("overlap", 0)
    tw, th = r["tile"]
    for name, length, t, pos in (("x", w, tw, r["xs"]), ("y", h, th, r["ys"])):
        if not pos or pos[0] != 0 or pos[-1] + t != length:
            return f"plan tiles do not cover {name}: {length} px, tile {t}, positions {pos[:8]}..."
        for a, b in zip(pos, pos[1:]):
            if b <= a or a + t - b < min(ov, t):
                return f"plan {name} positions {a}->{b} leave a gap/overlap < {ov} (tile {t})"
    if r["predicted_peak_bytes"] > r["budget_bytes"] * (1 + 1e-12):
        return f"plan predicted peak {r['predicted_peak_bytes']} > budget {r['budget_bytes']}"
    return None


def gen_allocsim(t, n, rng):
    """AllocSim: a model with a random history (live, freed and stale handles), then one call
    with sizes and handles near the edges or hostile."""
    sizes = [0, 1, 511, 512, 513, MiB, MiB + 1, 10 * MiB - 1, 20 * MiB, GiB, 2 ** 40, 2 ** 40 + 1,
             9 * 10 ** 18, 2 ** 63, -1, edge_int(rng)]
    if n == "AllocSim":
        kw = {}
        if rng.random() < 0.3:
            kw["device"] = rng.choice([0, 1, -1, True, None, edge_int(rng)])
        if rng.random() < 0.4:
            kw["expandable_segments"] = rng.choice([True, False, 0, 1, None, "yes"])
        args = [rng.choice([0, MiB, 64 * MiB, GiB, 2 ** 40, 2 ** 40 + 1, -1, "1GB", None, edge_int(rng)])]
        if rng.random() < 0.2:
            args = [adversarial(rng)]
        return t.obj, args[: rng.randint(0, 1)] if "device" in kw else args, kw, None
    a = _native.AllocSim(rng.choice([8 * MiB, 64 * MiB, GiB]), expandable_segments=rng.random() < 0.4)
    live, dead = [], []
    for _ in range(rng.randint(0, 40)):
        if live and rng.random() < 0.4:
            h = live.pop(rng.randrange(len(live)))
            a.free(h)
            dead.append(h)
        else:
            try:
                live.append(a.malloc(rng.choice([1, 700, 3 * MiB, 12 * MiB, 30 * MiB])))
            except MemoryError:
                pass
        if rng.random() < 0.05:
            a.empty_cache()
    attr = n.split(".")[1]
    if attr in ("malloc",):
        return a.malloc, [rng.choice(sizes) if rng.random() < 0.8 else adversarial(rng)], {}, None
    if attr in ("free", "block_size"):
        pool = live + dead + [0, 1, 2 ** 32, 2 ** 64 - 1, 2 ** 64, -1, edge_int(rng)]
        return getattr(a, attr), [rng.choice(pool) if rng.random() < 0.8 else adversarial(rng)], {}, None
    if t.kind == "prop":
        return (lambda: getattr(a, attr)), [], {}, None
    return getattr(a, attr), [], {}, None


def make_sampler(rng, ctx):
    if rng.random() < 0.3:
        s = vramguard.sampler()  # the process-wide one: shared
    else:
        s = _native.Sampler(rng.choice([0, None]), interval=rng.choice([0.001, 0.005]), capacity=rng.choice([2, 64, 4096]))
        ctx.samplers.append(s)
    if rng.random() < 0.6:
        s.start()
    if rng.random() < 0.3:
        s.begin("x")
    ctx.sampler = s
    return s


def value_for(name, ann, rng, default):
    """A value for a Python parameter: from its name and (string) annotation, else anything."""
    if default is not inspect.Parameter.empty and rng.random() < 0.45:
        return default
    r = rng.random()
    if r < 0.25:
        return adversarial(rng)
    ann = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
    ln = name.lower()
    if ln in ("stage", "name") or "stage" in ln:
        return rng.choice(STAGES + STRINGS[:6])
    if ln in ("fn", "probe", "progress", "cancel") or "Callable" in ann or "Probe" in ann:
        return callable_value(rng)
    if ln in ("image", "sample", "out", "images"):
        img = array(rng, (rng.randint(1, 2), rng.randint(1, 40), rng.randint(1, 40), 3),
                    rng.choice([np.float32, np.float16, np.float64, np.uint8]))
        return [img] if ln == "images" else img
    if ln in ("line", "text"):  # a GC log line, cut or bent somewhere
        good = ("GC: utilization={'gpu': 8, 'ram': 20, 'threshold': 0} gc={'collected': 510, 'saved': 0.25} "
                "before={'gpu': 1.93, 'ram': 9.29} after={'gpu': 1.68, 'ram': 9.29, 'retries': 0, 'oom': 0} "
                "device=cuda fn=vae_decode time=0.25")
        k = rng.randrange(len(good))
        return rng.choice([good, good[:k], good[:k] + rng.choice(["{", "(", "'", "\0", "]]", "1e400"]) + good[k:],
                           good.replace("0.25", rng.choice(["nan", "1e999", "10" * 200, "()", "[" * 500]))])
    if ln in ("path", "log_file", "comfyui"):
        return rng.choice(["vg.jsonl", "vg.log", "comfy.settings.json", "nodir/x.jsonl", None, ""])
    if ln in ("fields", "snapshot", "s"):
        return snap_mapping(rng)
    if ln in ("device",):
        return rng.choice([0, None, 1, -1, edge_int(rng)])
    if ln in ("budget", "reserve", "cap", "card", "need", "total", "used", "model_bytes", "value",
              "process_used", "reserved", "allocated", "n"):
        return rng.choice([0, 1, MiB, GiB, "1GB", "1.5GiB", "-1GB", "nan", 9 * 10 ** 18, edge_int(rng),
                           rng.choice(EDGE_FLOATS)])
    if "bool" in ann:
        return rng.choice([True, False, 0, 1, None, "no"])
    if "float" in ann:
        return rng.choice(EDGE_FLOATS + [0, 1, 70])
    if "int" in ann:
        return rng.choice([edge_int(rng), rng.randint(0, 300)])
    if "str" in ann:
        return rng.choice(STRINGS)
    if "Mapping" in ann or "dict" in ann:
        return snap_mapping(rng)
    if "Sequence" in ann or "Iterable" in ann or "list" in ann:
        return rng.choice([[], [64, 128], [(0.0, GiB)], LyingSeq([1, 2], "iter_raises", "finish")])
    return adversarial(rng)


def generic(fn, rng, owner_ctx):
    """Arguments from the signature (or anything, when there is none), plus sometimes a huge
    or bogus keyword set."""
    args, kw = [], {}
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    if sig is None:
        args = [adversarial(rng) for _ in range(rng.randrange(4))]
    else:
        for p in sig.parameters.values():
            if p.name in ("self", "cls"):
                continue
            if p.kind in (p.VAR_POSITIONAL,):
                args += [adversarial(rng) for _ in range(rng.randrange(3))]
                continue
            if p.kind == p.VAR_KEYWORD:
                if rng.random() < 0.3:
                    for k in rng.sample(["used", "total", "process_used", "oom_count", "name", "script",
                                         "bogus"], rng.randint(1, 3)):
                        kw[k] = value_for(k, "", rng, inspect.Parameter.empty)
                continue
            if p.default is not p.empty and rng.random() < 0.35:
                continue
            v = value_for(p.name, p.annotation, rng, p.default)
            if p.kind == p.POSITIONAL_ONLY or (p.kind == p.POSITIONAL_OR_KEYWORD and rng.random() < 0.5
                                               and len(kw) == 0):
                args.append(v)
            else:
                kw[p.name] = v
    if rng.random() < 0.03:
        kw.update({f"k{i}": i for i in range(rng.choice([50, 5000]))})
    return fn, args, kw, None


def gen_python(t: Target, rng, ctx):
    if t.kind == "ctor" or t.kind == "func":
        fn = t.obj
        if t.name.endswith("Sampler") or "_native" in getattr(fn, "__module__", "") and isinstance(fn, type):
            return gen_native(Target("_native." + t.name.rsplit(".", 1)[1], t.kind, t.obj), rng, ctx)
        f, a, k, c = generic(fn, rng, ctx)
        if t.name.endswith((".snapshot", ".snapshots")):
            c = lambda r: check_snapshot(r if not isinstance(r, list) else (r[0] if r else None))  # noqa
        return f, a, k, c
    # method / property of a Python class: make a receiver from a default constructor
    try:
        recv = t.owner()
    except Exception:
        try:
            recv = t.owner(*generic(t.owner, rng, ctx)[1])
        except Exception:
            return (lambda: None), [], {}, None
    attr = t.name.rsplit(".", 1)[1]
    if t.kind == "prop":
        if rng.random() < 0.4 and getattr(t.obj, "fset", None) is not None:
            val = adversarial(rng)
            return (lambda: setattr(recv, attr, val)), [], {}, None
        return (lambda: getattr(recv, attr)), [], {}, None
    return generic(getattr(recv, attr), rng, ctx)


# ============================================================================ running one call

def baseline():
    """The fixed state every call starts from (so any call replays on its own)."""
    vramguard.sampling._default, old = None, vramguard.sampling._default
    if old is not None:
        old.stop()
    vramguard.register_probe(None)
    _native.simulate_clear()
    _native.simulate(0, total=8 * GiB, used=2 * GiB, reserved=GiB, allocated=GiB // 2)
    _native.clear_limits()
    vramguard.gcguard._guard = None
    vramguard.batch.clear_allocators()


def describe(fn, args, kw, limit=600):
    def r(v):
        if type(v) in (EvilInt, EvilFloat, ReenterList, BadMapping):
            extra = f", action={v.action}" if isinstance(v, ReenterList) else (
                f", {v.mode}, {v.action}" if hasattr(v, "mode") else "")
            return f"{type(v).__name__}({type(v).__mro__[1].__repr__(v)}{extra})"
        if isinstance(v, (list, tuple)) and type(v) in (list, tuple):
            inner = ", ".join(r(x) for x in v[:8]) + (", ..." if len(v) > 8 else "")
            return f"[{inner}]" if type(v) is list else f"({inner}{',' if len(v) == 1 else ''})"
        s = repr(v) if not isinstance(v, np.ndarray) else (
            f"ndarray(shape={v.shape}, dtype={v.dtype}, strides={v.strides}, "
            f"writeable={v.flags.writeable}, c={v.flags.c_contiguous}, aligned={v.flags.aligned})")
        return s if len(s) < 200 else s[:200] + "...(%d chars)" % len(s)
    parts = [r(a) for a in args] + [f"{k}={r(v)}" for k, v in list(kw.items())[:20]]
    if len(kw) > 20:
        parts.append(f"...(+{len(kw) - 20} keywords)")
    name = getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))
    s = f"{name}({', '.join(parts)})"
    return s if len(s) < limit else s[:limit] + "..."


SLOW = 1.5 if SANITIZED else 0.5  # seconds: no C entry point has a reason to take longer here
BAD_MSG = ("without exception set", "with an exception set", "error return without")


def classify(e: BaseException):
    if isinstance(e, FuzzBoom):
        return None
    if isinstance(e, SystemError):
        return "system_error"
    if not isinstance(e, Exception):
        return "base_exception"
    msg = str(e)
    if any(m in msg for m in BAD_MSG):
        return "system_error"
    return None


def foreign(e: BaseException) -> bool:
    """The exception came from NumPy/stdlib internals, not from a check naming the argument."""
    tb = traceback.extract_tb(e.__traceback__)
    if not tb or isinstance(e, FuzzBoom):
        return False
    last = tb[-1].filename
    return "vramguard" not in last and "fuzz.py" not in last and isinstance(e, (IndexError, KeyError,
                                                                                 AttributeError, SyntaxError,
                                                                                 UnboundLocalError, NameError))


# Entry points whose generators know their valid space get more calls (the rest: weight 1).
WEIGHTS = {"_native.Canvas.put": 8, "_native.Canvas.put_band": 6, "_native.plan": 5, "_native.budget": 3, "_native.Policy.decide": 3,
           "_native.snapshot": 2, "_native.simulate": 2, "_native.Canvas.weights": 2, "_native.Sampler.stop": 2,
           "_native.Sampler.start": 2, "vramguard.tiled": 3, "vramguard.plan_tiles": 3, "vramguard.stage": 2,
           "vramguard.gc_check": 2}


def pick(targets, rng):
    w = [WEIGHTS.get(t.name, 1) for t in targets]
    return targets[rng.choices(range(len(targets)), weights=w)[0]]


def build_call(targets, seed, i):
    global CTX
    rng = random.Random(f"{seed}/{i}")
    t = pick(targets, rng)
    ctx = Ctx(rng)
    ctx.python = not t.name.startswith("_native.")
    CTX = ctx
    ctx.state = ""
    if FAKE_NVML and rng.random() < 0.3:  # the 'driver' device (fake NVML): the probe applies
        _native.simulate_clear()
        ctx.state = "[fake NVML device 0"
        if rng.random() < 0.7:
            p, pdesc = hostile_probe(rng)
            if rng.random() < 0.5:
                _native.set_probe(p)
                ctx.state += f"; _native.set_probe({pdesc})"
            else:
                safe = rng.random() < 0.5
                vramguard.register_probe(p, safe=safe)
                ctx.state += f"; register_probe({pdesc}, safe={safe})"
        ctx.state += "]"
    if t.name.startswith("_native."):
        fn, args, kw, check = gen_native(t, rng, ctx)
    else:
        fn, args, kw, check = gen_python(t, rng, ctx)
    threads = 1
    # methods of the stateful objects (one Sampler, one Canvas, one Policy shared by threads) get
    # concurrent calls more often: that is where double joins and torn state live
    shared_obj = t.name.startswith(("_native.Sampler.", "_native.Canvas.", "_native.Policy."))
    if rng.random() < (0.25 if shared_obj else 0.04):
        threads = rng.choice([2, 2, 3, 4])
    return t, ctx, fn, args, kw, check, threads


def run_call(fn, args, kw, threads, timeout):
    """Returns (result, exceptions)."""
    if threads == 1:
        try:
            return fn(*args, **kw), []
        except BaseException as e:  # classified by the caller
            return None, [e]
    bar = threading.Barrier(threads)
    excs, results = [], []

    def body():
        try:
            bar.wait(timeout)
            results.append(fn(*args, **kw))
        except threading.BrokenBarrierError:
            pass
        except BaseException as e:
            excs.append(e)

    ts = [threading.Thread(target=body, daemon=True) for _ in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()  # a deadlock here is the parent's watchdog's to catch
    return (results[0] if results else None), excs


DROP: frozenset = frozenset()  # the minimiser's edits: keyword names to leave out, "__threads__"


def one_call(targets, seed, i, timeout, announce=None):
    """Run call i (less what DROP names); returns {target, desc, findings: [(kind, detail)], exc}."""
    global CTX
    baseline()
    try:
        t, ctx, fn, args, kw, check, threads = build_call(targets, seed, i)
    except Exception as e:  # a generator bug, or a vramguard call made while building
        tname = pick(targets, random.Random(f"{seed}/{i}")).name
        return {"target": tname, "desc": "(setup)", "exc": type(e).__name__, "dt": 0.0,
                "findings": [("system_error", f"while building the call: {type(e).__name__}: {e}")]
                if classify(e) else [], "setup_error": f"{type(e).__name__}: {str(e)[:200]}"}
    kwnames = sorted(kw)
    if DROP:
        kw = {k: v for k, v in kw.items() if k not in DROP}
        if "__threads__" in DROP:
            threads = 1
    desc = describe(fn, args, kw) + (f"  [from {threads} threads at once]" if threads > 1 else "")
    if ctx.canvas is not None:
        desc += f"  [canvas: {ctx.canvas_desc}]"
    if ctx.state:
        desc += f"  {ctx.state}"
    if announce is not None:
        announce(desc, kwnames, threads)
    findings = []
    t0 = time.monotonic()
    try:
        result, excs = run_call(fn, args, kw, threads, timeout)
    except BaseException as e:  # raised *after* the call returned: an exception left set in C
        result, excs = None, []
        findings.append(("leaked_exception", f"{type(e).__name__} surfaced after the call returned "
                         f"(left set by C code): {str(e)[:200]}"))
    # a context manager: enter and leave it (stage(), run()); a decorator: wrap and call
    # (after_stage).  Once the wrapped work has succeeded, nothing may raise: the host's node
    # finished and must not fail because of our GC check.
    work_wrapper = t.name.endswith((".stage", ".after_stage", ".run"))
    if not excs and hasattr(result, "__enter__") and hasattr(result, "__exit__"):
        try:
            result.__enter__()
        except BaseException as e:  # entering may refuse bad arguments
            excs.append(e)
        else:
            try:
                result.__exit__(None, None, None)
            except BaseException as e:
                if work_wrapper:
                    findings.append(("after_work", f"{type(e).__name__} raised after the stage's work "
                                     f"succeeded: {str(e)[:200]}"))
                else:
                    excs.append(e)
    elif not excs and work_wrapper and callable(result):
        try:
            wrapped = result(lambda: 42)
        except BaseException as e:
            excs.append(e)
        else:
            try:
                if wrapped() != 42:
                    findings.append(("after_work", "the wrapped function's result was lost"))
            except BaseException as e:
                findings.append(("after_work", f"{type(e).__name__} raised after the wrapped work "
                                 f"succeeded: {str(e)[:200]}"))
    dt = time.monotonic() - t0
    exc_name = None
    if t.name.startswith("_native.") and threads == 1 and dt > SLOW and ctx.reentries == 0:
        findings.append(("slow", f"a C entry point took {dt:.2f} s (> {SLOW:g} s)"))
    seen = set()
    for e in excs:
        if (type(e), str(e)[:100]) in seen:  # the same error from several threads: once
            continue
        seen.add((type(e), str(e)[:100]))
        kind = classify(e)
        exc_name = type(e).__name__
        if kind:
            findings.append((kind, f"{type(e).__name__}: {str(e)[:300]}"))
        elif foreign(e):
            findings.append(("foreign_exception", f"{type(e).__name__}: {str(e)[:200]} at "
                             f"{traceback.extract_tb(e.__traceback__)[-1].filename.rsplit('/', 1)[-1]}"))
    if check is not None and not excs and not findings:
        try:
            msg = check(result)
        except BaseException as e:
            kind = classify(e)
            msg = f"invariant check raised {kind or type(e).__name__}: {str(e)[:200]}" if kind else None
        if msg:
            findings.append(("invariant", msg))
    # sentinel: nothing left set for the next call
    try:
        _native.device_count()
        _native.gpu_status()
        np.zeros(1).sum()
    except BaseException as e:
        findings.append(("leaked_exception", f"next call raised {type(e).__name__}: {str(e)[:200]}"))
    for s in ctx.samplers:
        s.stop()
    CTX = None
    return {"target": t.name, "desc": desc, "findings": findings, "exc": exc_name, "dt": dt}


# ============================================================================ the worker

def worker_main(targets, seed, start, end, wfd, quarantined, timeout):
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    faulthandler.enable()
    out = os.fdopen(wfd, "w", buffering=1)
    for i in range(start, end):
        # which target call i hits is known without building it
        tname = pick(targets, random.Random(f"{seed}/{i}")).name
        if tname in quarantined:
            out.write(json.dumps({"i": i, "skip": tname}) + "\n")
            continue
        out.write(json.dumps({"i": i, "begin": tname}) + "\n")
        try:
            rec = one_call(targets, seed, i, timeout,
                           lambda d, k, th: out.write(json.dumps({"i": i, "begin": tname, "desc": d, "kw": k,
                                                                  "threads": th}) + "\n"))
        except BaseException as e:  # the harness itself, or a stale exception surfacing in it
            rec = {"target": tname, "desc": "(see replay)", "exc": type(e).__name__, "dt": 0.0,
                   "findings": [("leaked_exception", f"{type(e).__name__} escaped into the harness: "
                                 f"{str(e)[:200]} at {traceback.extract_tb(e.__traceback__)[-1].lineno}")]}
            try:
                baseline()
            except BaseException:
                pass
        rec["i"] = i
        out.write(json.dumps(rec) + "\n")
    out.flush()
    os._exit(0)


SAN_RE = re.compile(r"(ERROR: AddressSanitizer: [^\n]*|runtime error: [^\n]*|"
                    r"ERROR: LeakSanitizer[^\n]*|ThreadSanitizer[^\n]*|Fatal Python error: [^\n]*|"
                    r"free\(\): [^\n]*|double free[^\n]*|malloc\(\): [^\n]*)")


class Worker:
    def __init__(self, targets, seed, start, end, quarantined, timeout, tmp):
        self.errpath = os.path.join(tmp, f"w{start}.err")
        r, w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                fd = os.open(self.errpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.dup2(fd, 2)
                os.dup2(fd, 1)
                os.chdir(tmp)
                if not SANITIZED:
                    try:
                        import resource
                        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
                    except (ImportError, ValueError, OSError):
                        pass
                worker_main(targets, seed, start, end, w, quarantined, timeout)
            finally:
                os._exit(70)
        os.close(w)
        self.pid, self.fd, self.buf = pid, r, b""

    def lines(self, timeout):
        """Yield complete lines; None on timeout; stops at EOF."""
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                yield line.decode("utf-8", "replace")
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                yield None
                return
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return
            self.buf += chunk

    def reap(self, kill=False):
        if kill:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        try:
            with open(self.errpath, "r", errors="replace") as f:
                err = f.read()
            os.unlink(self.errpath)
        except OSError:
            err = ""
        return status, err


def status_text(status):
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"signal {sig} ({signal.Signals(sig).name})"
    return f"exit {os.WEXITSTATUS(status)}"


def run_range(targets, seed, start, end, timeout, tmp, quarantined=frozenset()):
    """Run calls [start, end) in as many workers as needed.  Yields events:
    ('rec', rec), ('skip', i, name), ('dead', i, name, kind, detail, stderr_excerpt)."""
    i = start
    while i < end:
        w = Worker(targets, seed, i, end, quarantined, timeout, tmp)
        current = None
        hung = False
        last = i
        for line in w.lines(timeout):
            if line is None:
                hung = True
                break
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            last = rec["i"]
            if "skip" in rec:
                yield ("skip", rec["i"], rec["skip"])
                current = None
            elif "begin" in rec:
                current = (rec["i"], rec["begin"], rec.get("desc", "(died while building the call)"),
                           rec.get("kw", []), rec.get("threads", 1))
            else:
                current = None
                yield ("rec", rec)
        status, err = w.reap(kill=hung)
        if current is None and not hung:
            if os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0:
                # died between calls (at exit, in a sentinel's cleanup...)
                yield ("dead", last, "(between calls)", "crash", status_text(status), excerpt(err), "", [], 1)
            i = last + 1 if last >= i else end
            if last + 1 >= end:
                return
            continue
        ci, cname, cdesc, ckw, cth = current if current else (last, "?", "?", [], 1)
        san = SAN_RE.search(err)
        if hung:
            kind, detail = "hang", f"no answer within {timeout:g} s"
        elif san and ("Sanitizer" in san.group(0) or "runtime error" in san.group(0)):
            kind, detail = "sanitizer", san.group(0)[:300]
        else:
            kind, detail = "crash", status_text(status) + (f": {san.group(0)[:200]}" if san else "")
        yield ("dead", ci, cname, kind, detail, excerpt(err), cdesc, ckw, cth)
        i = ci + 1


def excerpt(err):
    if not err:
        return ""
    m = SAN_RE.search(err)
    start = max(0, m.start() - 200) if m else max(0, len(err) - 1500)
    return err[start:start + 2500]


def alone(targets, seed, i, timeout, tmp):
    """Replay call i alone in a fresh worker: does it reproduce without earlier calls?"""
    for ev in run_range(targets, seed, i, i + 1, timeout, tmp):
        if ev[0] == "dead":
            return ev[3], ev[6]
        if ev[0] == "rec" and ev[1]["findings"]:
            return ev[1]["findings"][0][0], ev[1]["desc"]
    return None, None


def minimise(targets, seed, i, kind, kwnames, threads, timeout, tmp):
    """Leave out each keyword argument (and the extra threads) in turn; keep every omission
    after which call i alone still fails the same way.  Returns the smallest failing call."""
    global DROP
    dropped, best = set(), None
    try:
        for k in list(kwnames) + (["__threads__"] if threads > 1 else []):
            DROP = frozenset(dropped | {k})
            got, desc = alone(targets, seed, i, timeout, tmp)
            if got == kind:
                dropped.add(k)
                best = desc
    finally:
        DROP = frozenset()
    return best


# ============================================================================ main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--start", type=int, default=0, help="first call index")
    ap.add_argument("--timeout-per-call", type=float, default=None,
                    help="seconds before a call counts as a hang (default 2, 4 under sanitizers)")
    ap.add_argument("--only", default=None, help="regex: fuzz only targets whose name matches")
    ap.add_argument("--replay", type=int, default=None, help="describe and run call N in-process")
    ap.add_argument("--findings", default=None, help="append findings as JSON lines to this file")
    ap.add_argument("--quarantine-after", type=int, default=3,
                    help="after this many hangs/crashes of one target, skip it for the rest of the run")
    ap.add_argument("--strict-messages", action="store_true",
                    help="count exceptions from NumPy/stdlib internals (foreign_exception) as findings")
    ap.add_argument("--list", action="store_true", help="list the targets and exit")
    ap.add_argument("--no-fake-nvml", action="store_true",
                    help="simulated devices only (default: also a fake-NVML 'driver' device, probes on)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--progress", type=int, default=0, help="print a progress line every N calls")
    a = ap.parse_args(argv)
    timeout = a.timeout_per_call or (4.0 if SANITIZED else 2.0)
    targets = discover(a.only)
    if not targets:
        print(f"no target matches {a.only!r}", file=sys.stderr)
        return 2
    if a.list:
        for t in targets:
            print(t.kind.ljust(7), t.name)
        return 0
    if a.replay is not None:
        baseline()
        t, ctx, fn, args, kw, check, threads = build_call(targets, a.seed, a.replay)
        print(f"call {a.replay} (seed {a.seed}): target {t.name}: {describe(fn, args, kw, 4000)}"
              + (f" from {threads} threads" if threads > 1 else "")
              + (f"  [canvas: {ctx.canvas_desc}]" if ctx.canvas is not None else "")
              + (f"  {ctx.state}" if ctx.state else ""), flush=True)
        rec = one_call(targets, a.seed, a.replay, timeout)
        print(json.dumps(rec))
        return 1 if rec["findings"] else 0

    t0 = time.monotonic()
    counts = collections.Counter()
    per_target = collections.defaultdict(collections.Counter)
    findings = []
    fatal_per_target = collections.Counter()
    quarantined = set()
    signatures = collections.Counter()
    fail_kinds = {"crash", "hang", "sanitizer", "system_error", "base_exception", "leaked_exception",
                  "invariant", "slow", "after_work"}
    if a.strict_messages:
        fail_kinds.add("foreign_exception")
    tmp = tempfile.mkdtemp(prefix="vgfuzz-")
    _cleanup(tmp)

    def record(kind, i, target, detail, desc="", err=""):
        sig = (kind, target, re.sub(r"0x[0-9a-f]+|\d+", "N", detail)[:80])
        signatures[sig] += 1
        counts[kind] += 1
        per_target[target][kind] += 1
        f = {"kind": kind, "seed": a.seed, "call": i, "target": target, "detail": detail, "call_repr": desc}
        if err:
            f["stderr"] = err[-1500:]
        if signatures[sig] <= 3:
            findings.append(f)
            if not a.quiet:
                print(f"FINDING {kind} call {i} {target}: {detail}\n    {desc[:400]}", flush=True)
        if a.findings:
            with open(a.findings, "a") as fh:
                fh.write(json.dumps(f) + "\n")

    next_start = a.start
    end = a.start + a.calls
    descs = {}
    while next_start < end:
        restart = None
        for ev in run_range(targets, a.seed, next_start, end, timeout, tmp, frozenset(quarantined)):
            if ev[0] == "skip":
                counts["skipped"] += 1
                per_target[ev[2]]["skipped"] += 1
                continue
            if ev[0] == "rec":
                rec = ev[1]
                counts["calls"] += 1
                if a.progress and counts["calls"] % a.progress == 0:
                    print(f"progress: {counts['calls']} calls, {time.monotonic() - t0:.0f} s, "
                          f"{sum(counts[k] for k in fail_kinds)} findings "
                          f"({dict((k, counts[k]) for k in sorted(fail_kinds) if counts[k])})", flush=True)
                per_target[rec["target"]]["calls"] += 1
                if rec["exc"]:
                    counts["exceptions"] += 1
                if rec.get("setup_error"):
                    counts["setup_errors"] += 1
                    if counts["setup_errors"] <= 5 and not a.quiet:
                        print(f"note: call {rec['i']} ({rec['target']}) could not be built: "
                              f"{rec['setup_error']}", flush=True)
                descs[rec["i"] % 64] = rec["desc"]
                for kind, detail in rec["findings"]:
                    record(kind, rec["i"], rec["target"], detail, rec["desc"])
                continue
            _, i, name, kind, detail, err, desc, kwnames, threads = ev
            counts["calls"] += 1
            per_target[name]["calls"] += 1
            # replay the first few of each kind alone (a hang costs a timeout each time)
            fatal_per_target[(name, kind)] += 1
            if fatal_per_target[(name, kind)] <= (1 if kind == "hang" else 3):
                rep, _ = alone(targets, a.seed, i, timeout, tmp)
                detail += "; reproduces alone" if rep else "; only after earlier calls in this worker"
                if rep == kind and kind != "hang" and (kwnames or threads > 1):
                    small = minimise(targets, a.seed, i, kind, kwnames, threads, timeout, tmp)
                    if small and small != desc:
                        desc = f"{desc}\n      minimised: {small}"
            record(kind, i, name, detail, desc, err)
            # hangs cost a timeout each: quarantine the target after a few; crashes are cheap
            limit = a.quarantine_after if kind == "hang" else 10 * a.quarantine_after
            if fatal_per_target[(name, kind)] >= limit and name not in quarantined:
                quarantined.add(name)
                restart = i + 1
                break
        if restart is None:
            break
        next_start = restart
    dt = time.monotonic() - t0
    nfind = sum(counts[k] for k in fail_kinds)
    if not a.quiet or nfind:
        print(f"\nvramguard fuzz: seed {a.seed}, {counts['calls']} calls in {dt:.1f} s "
              f"({len(targets)} targets, timeout {timeout:g} s, {'sanitized' if SANITIZED else 'plain'})")
        print(f"  crashes {counts['crash']}, sanitizer reports {counts['sanitizer']}, hangs {counts['hang']}, "
              f"system errors {counts['system_error']}, leaked exceptions {counts['leaked_exception']}, "
              f"base exceptions {counts['base_exception']}, invariant violations {counts['invariant']}, "
              f"slow C calls {counts['slow']}, errors after succeeded work {counts['after_work']}, "
              f"foreign exceptions {counts['foreign_exception']}, skipped (quarantined) {counts['skipped']}, "
              f"calls that could not be built {counts['setup_errors']}")
        if quarantined:
            print(f"  quarantined: {', '.join(sorted(quarantined))}")
        print("  per target (calls / findings):")
        for name in sorted(per_target):
            c = per_target[name]
            bad = {k: v for k, v in c.items() if k not in ("calls", "skipped") and v}
            print(f"    {name:40s} {c['calls']:7d}  {bad if bad else ''}")
    summary = {"seed": a.seed, "calls": counts["calls"], "seconds": round(dt, 2), "targets": len(targets),
               "sanitized": SANITIZED, "crashes": counts["crash"], "sanitizer_reports": counts["sanitizer"],
               "hangs": counts["hang"], "system_errors": counts["system_error"],
               "leaked_exceptions": counts["leaked_exception"], "base_exceptions": counts["base_exception"],
               "invariant_violations": counts["invariant"], "slow_calls": counts["slow"], "after_work": counts["after_work"], "foreign_exceptions": counts["foreign_exception"],
               "skipped": counts["skipped"], "quarantined": sorted(quarantined), "findings": nfind,
               "distinct": [{"kind": f["kind"], "target": f["target"], "call": f["call"], "detail": f["detail"][:200],
                             "call_repr": f["call_repr"][:300]} for f in findings]}
    print(json.dumps(summary), flush=True)
    return 1 if nfind else 0


if __name__ == "__main__":
    sys.exit(main())
