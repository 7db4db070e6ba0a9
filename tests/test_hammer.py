"""Thread hammer: 16+ threads inside vramguard at once for a few seconds.

Runs in a child interpreter with a faulthandler watchdog: a deadlock dumps every thread's stack
and exits (the test fails with the stacks), a crash fails the test, and neither takes pytest or
CI down with it.  Under `scripts/test.sh --sanitize` the child inherits the ASan environment.
"""
import ast
import os
import subprocess
import sys
import textwrap

SANITIZED = bool(os.environ.get("VRAMGUARD_SANITIZED")) or "asan" in os.environ.get("LD_PRELOAD", "")
SECONDS = 3.0
WATCHDOG = 45 if SANITIZED else 20

HAMMER = r"""
import faulthandler, os, random, sys, threading, time
import numpy as np
import vramguard as vg
from vramguard import _native

faulthandler.dump_traceback_later(WATCHDOG, exit=True)   # deadlock: stacks, then exit 1
vg.simulate("8GB", "2GB")
shared = vg.sampler()                  # the process-wide sampler: one object, many threads
own = _native.Sampler(0, interval=0.001, capacity=256)
out = np.zeros((1, 64, 64, 3), np.float32)
canvas = _native.Canvas(out, "nhwc", 2)
policy = _native.Policy(threshold=0.0, min_interval=0.0)
stop_at = time.monotonic() + SECONDS
errors, counts = [], {}
lock = threading.Lock()

def probe_a(i): return {"reserved": 1 << 30, "allocated": 1 << 29}
def probe_b(i): return {"free": 6 << 30, "evictable": 1 << 28}

def op(name, rng):
    if name == "start": rng.choice([shared, own]).start()
    elif name == "stop": rng.choice([shared, own]).stop()
    elif name == "reset": rng.choice([shared, own]).reset()
    elif name == "stage_marks":
        s = rng.choice([shared, own]); s.end(s.begin("hammer"))
    elif name == "read":
        s = rng.choice([shared, own]); s.stages(); s.timeline(); s.last_error; s.running
    elif name == "put":
        x, y = rng.randrange(0, 48), rng.randrange(0, 48)
        try:
            canvas.put(np.ones((1, 16, 16, 3), np.float32), 0, x, y, [(x + 2.0, x + 6.0, True)], [])
        except RuntimeError as e:          # "in use by another thread": the documented answer
            if "in use" not in str(e): raise
    elif name == "coverage": canvas.coverage()
    elif name == "probe": _native.set_probe(rng.choice([probe_a, probe_b, None]))
    elif name == "simulate":
        if rng.random() < 0.5: vg.simulate_clear()
        else:
            try: vg.simulate("8GB", "2GB", device=0)
            except ValueError: pass          # a concurrent simulate added device 0 first
    elif name == "snapshot":
        s = vg.snapshot(0); assert 0 <= s.budget <= s.free + s.evictable, s
    elif name == "policy": policy.check(0, rng.random() < 0.5, 1 << 20)
    elif name == "gc_check": vg.gc_check(rng.choice(["vae_decode", "unet"]), forced=rng.random() < 0.3)
    elif name == "stage":
        with vg.stage("vae_decode"): pass
    elif name == "limits": vg.set_reserve(rng.choice(["0", "1GB"]))

OPS = ["start", "stop", "reset", "stage_marks", "read", "put", "coverage", "probe", "simulate",
       "snapshot", "policy", "gc_check", "stage", "limits"]

def worker(k):
    rng = random.Random(k)
    mine = OPS[k % len(OPS)]                  # every op has a thread of its own ...
    while time.monotonic() < stop_at:
        name = mine if rng.random() < 0.5 else rng.choice(OPS)   # ... and all threads mix
        try:
            op(name, rng)
            with lock: counts[name] = counts.get(name, 0) + 1
        except (RuntimeError, ValueError) as e:
            # simulate_clear() in another thread removed device 0 (there is no GPU here): the
            # answer is a clear "no device" error; anything else is a failure
            if not any(w in str(e) for w in ("device", "GPU", "unavailable")):
                with lock: errors.append(f"{name}: {type(e).__name__}: {e}")
        except Exception as e:
            with lock: errors.append(f"{name}: {type(e).__name__}: {e}")

threads = [threading.Thread(target=worker, args=(k,), name=f"hammer-{k}") for k in range(NTHREADS)]
for t in threads: t.start()
for t in threads: t.join()
shared.stop(); own.stop()
faulthandler.cancel_dump_traceback_later()
print("COUNTS", sorted(counts.items()))
if errors:
    print("ERRORS", len(errors)); print("\n".join(sorted(set(errors))[:30]))
    sys.exit(2)
"""


def run_hammer(nthreads):
    code = HAMMER.replace("WATCHDOG", str(WATCHDOG)).replace("SECONDS", str(SECONDS)) \
                 .replace("NTHREADS", str(nthreads))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    try:
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                           timeout=WATCHDOG + 60, env=env)
    except subprocess.TimeoutExpired as e:  # the watchdog itself did not fire: report what we have
        raise AssertionError(f"hammer hung past its watchdog:\n{(e.stderr or b'')[-4000:]}")
    return r


def test_hammer_16_threads():
    r = run_hammer(16)
    what = ("deadlock (watchdog fired; stacks below)" if "Timeout (" in r.stderr else
            f"crashed ({r.returncode})" if r.returncode < 0 or "Fatal Python error" in r.stderr
            else f"exit {r.returncode}")
    assert r.returncode == 0, f"{what}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-6000:]}"
    counts = dict(ast.literal_eval(r.stdout.split("COUNTS", 1)[1].strip().splitlines()[0]))
    # every kind of call really ran concurrently, many times
    assert all(counts.get(k, 0) >= 5 for k in ("start", "stop", "reset", "put", "probe", "simulate",
                                                "snapshot", "policy", "gc_check", "stage")), counts
