"""Fork under load: 100+ forks while other threads are inside vramguard.

Threads keep the C locks (sampler running, snapshot in a loop, Policy.check) and the Python locks
(gc_check / stage in a loop: the GCGuard lock, the sampler-module lock) busy while the main thread
forks.  Every child uses vramguard (snapshot, gc_check, stage, a Sampler start/stop) and must exit
0 within a timeout; a child that hangs is killed and counted.  The whole thing runs in a child
interpreter so a hang or crash never takes pytest down.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

SANITIZED = bool(os.environ.get("VRAMGUARD_SANITIZED")) or "asan" in os.environ.get("LD_PRELOAD", "")
FORKS = 120
CHILD_TIMEOUT = 15.0 if SANITIZED else 5.0
MAX_BAD = 3  # stop forking after this many hung/crashed children: enough evidence, bounded time

SCRIPT = r"""
import faulthandler, json, os, signal, sys, threading, time
import vramguard as vg
from vramguard import _native

vg.simulate("8GB", "2GB")
vg.register_probe(lambda i: {"reserved": 1 << 30, "allocated": 1 << 29})
shared = vg.sampler()
shared.start()
policy = _native.Policy(threshold=0.0, min_interval=0.0)
stop = threading.Event()

def loop(fn):
    while not stop.is_set():
        try: fn()
        except Exception as e: print("load error:", type(e).__name__, e, file=sys.stderr)

def gc_loop(): vg.gc_check("vae_decode", forced=True)
def stats_loop(): vg.gc_stats(); vg.guard().reset_stats()
def stage_loop():
    with vg.stage("unet"): pass
def snap_loop(): vg.snapshot(0); vg.host(True)
def policy_loop(): policy.check(0, True, 1 << 20)
def sampler_loop(): shared.end(shared.begin("load")); shared.stages(); shared.timeline()
def own_sampler_loop():
    s = _native.Sampler(0, interval=0.0005, capacity=64); s.start(); time.sleep(0.001); s.stop()

threads = [threading.Thread(target=loop, args=(f,), daemon=True)
           for f in (gc_loop, gc_loop, stats_loop, stats_loop, stats_loop, stage_loop, snap_loop, policy_loop,
                     sampler_loop, own_sampler_loop)]
for t in threads: t.start()
time.sleep(0.05)

def child():
    faulthandler.dump_traceback_later(CHILD_TIMEOUT - 1, exit=True)
    s = vg.snapshot(0)
    assert s.total == 8 << 30, s
    vg.gc_check("vae_decode", forced=True)
    with vg.stage("vae_decode"): pass
    sm = vg.sampler(); sm.start(); sm.end(sm.begin("child")); sm.stop()
    own = _native.Sampler(0, interval=0.001); own.start(); own.stop()
    policy.check(0, True, 0)

ok = hung = crashed = failed = 0
details = []
for i in range(FORKS):
    if hung + crashed + failed >= MAX_BAD:
        break
    pid = os.fork()
    if pid == 0:
        try:
            child()
            os._exit(0)
        except BaseException as e:
            print(f"child error: {type(e).__name__}: {e}", file=sys.stderr)
            os._exit(3)
    deadline = time.monotonic() + CHILD_TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0); status = None
            break
        time.sleep(0.002)
    if status is None:
        hung += 1; details.append(f"fork {i}: child hung")
    elif os.WIFSIGNALED(status):
        crashed += 1; details.append(f"fork {i}: child killed by signal {os.WTERMSIG(status)}")
    elif os.WEXITSTATUS(status) == 1:   # faulthandler's watchdog fired: a hang with stacks on stderr
        hung += 1; details.append(f"fork {i}: child hung (watchdog)")
    elif os.WEXITSTATUS(status) != 0:
        failed += 1; details.append(f"fork {i}: child exit {os.WEXITSTATUS(status)}")
    else:
        ok += 1
stop.set()
for t in threads: t.join(10)
shared.stop()
print(json.dumps({"forks": ok + hung + crashed + failed, "ok": ok, "hung": hung, "crashed": crashed, "failed": failed,
                  "details": details[:20], "parent_running": shared.running}))
"""


@pytest.mark.skipif(SANITIZED, reason=(
    "GCC 12's libasan has no fork interceptor (LLVM added allocator fork handlers in 15): a child "
    "forked while another thread is inside ASan's malloc deadlocks in the allocator before any "
    "vramguard code runs (seen as a hang with no faulthandler output, ~1 in 120 forks). The plain "
    "pass runs this test in full; the ASan pass runs the 16-thread hammer."))
def test_fork_under_load():
    code = SCRIPT.replace("CHILD_TIMEOUT", repr(CHILD_TIMEOUT)).replace("FORKS", str(FORKS)) \
                 .replace("MAX_BAD", str(MAX_BAD))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    try:
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                           timeout=FORKS * CHILD_TIMEOUT + 120, env=env)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"fork-under-load parent hung:\n{(e.stderr or b'')[-4000:]}")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert r.returncode == 0 and lines, f"rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    res = json.loads(lines[-1])
    assert res["ok"] == FORKS, (f"{res['hung']} hung, {res['crashed']} crashed, {res['failed']} failed of "
                                f"{res['forks']} forks under load (stopped after {MAX_BAD} bad ones): "
                                f"{res['details']}\nstderr:\n{r.stderr[-4000:]}")
