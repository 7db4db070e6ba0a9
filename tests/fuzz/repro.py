"""Minimal reproducers of the defect classes scripts/fuzz.py finds (see FINDINGS.md).

    python tests/fuzz/repro.py            # run each in a child interpreter, print the outcome
    python tests/fuzz/repro.py put_offset # just one

Each snippet is a few lines of plain Python; the expected behaviour once fixed is a clear
exception naming the value (or a correct result), within milliseconds.  Not collected by pytest
(the regression tests are tests/test_fuzz.py, test_hammer.py, test_fork_load.py).
"""
import subprocess
import sys
import textwrap
import time

PRE = "import numpy as np, threading, vramguard as vg\nfrom vramguard import _native as n\n"

REPROS = {
    # Canvas.put: `off + size > limit` wraps for offsets near 2**63 (x, y and image offsets)
    "put_offset": """
        out = np.zeros((1, 2, 9, 1), np.float32); cv = n.Canvas(out)
        cv.put(np.ones((1, 2, 9, 1), np.float32), 0, 2**63 - 1, 0, [], [])
    """,
    "put_batch_offset": """
        out = np.zeros((2, 4, 4, 1), np.float32); cv = n.Canvas(out)
        cv.put(np.ones((1, 4, 4, 1), np.float32), 2**63 - 1, 0, 0, [], [])
        print("no error raised: wrote outside the coverage buffer (ASan: heap-buffer-overflow)")
    """,
    # Canvas.put: Python code run while parsing the ramps closes the canvas; put then writes via NULL
    "put_reentrant_finish": """
        out = np.zeros((1, 3, 21, 3), np.float32); cv = n.Canvas(out)
        cv.put(np.ones_like(out), 0, 0, 0, [], [])
        class Ramps(list):
            def __iter__(self): cv.finish(); return super().__iter__()
        cv.put(np.ones((1, 3, 17, 3), np.float32), 0, 4, 0, Ramps([(0.0, 1.0, True)]), [])
    """,
    "put_reentrant_float": """
        out = np.zeros((1, 4, 4, 1), np.float32); cv = n.Canvas(out)
        class F:
            def __float__(self): cv.finish() if cv.coverage().min() else None; return 1.0
        cv.put(np.ones_like(out), 0, 0, 0, [], [])
        cv.put(np.ones_like(out), 0, 0, 0, [(F(), 2.0, True)], [])
    """,
    # Canvas.put: a result that is a view of the output: overlapping memcpy (ASan: memcpy-param-overlap)
    "put_aliased_result": """
        out = np.zeros((1, 8, 8, 3), np.float32); cv = n.Canvas(out, "nhwc", 1)
        cv.put(out[:, :, 0:6], 0, 2, 0, [], [])
        print("no error raised (ASan build reports memcpy-param-overlap)")
    """,
    # Canvas.finish returns an output whose uncovered part was silently zero-filled
    "finish_with_gap": """
        out = np.zeros((1, 4, 10, 1), np.float32); cv = n.Canvas(out)
        cv.put(np.ones((1, 4, 5, 1), np.float32), 0, 5, 0, [], [])   # columns 0..4 never written
        r = cv.finish(); print("finish() accepted; column 0 =", r[0, :, 0, 0])
    """,
    # Canvas.weights: origin + i overflows (UBSan with -fno-wrapv)
    "weights_origin": """
        print(n.Canvas.weights(2**63 - 1, 2, []), "(UBSan with -fno-wrapv: signed integer overflow)")
    """,
    # Sampler.stop() from two threads: both pthread_join the same thread (deadlock / double free)
    "sampler_double_stop": """
        s = n.Sampler(None, interval=0.001)
        for _ in range(200):   # racy: a few rounds are enough to hit it
            s.start()
            ts = [threading.Thread(target=s.stop) for _ in range(4)]
            [t.start() for t in ts]; [t.join() for t in ts]
        print("stopped")
    """,
    # plan(): O(W x H) when only tiny tiles fit
    "plan_slow": """
        import time; t = time.time()
        r = n.plan(2048, 4096, budget=16 << 20, per_px_bytes=1000, fixed_bytes=(16 << 20) - 65536, min_tile=1)
        print(r["fits"], r.get("tile"), f"{time.time() - t:.2f} s")
    """,
    # plan(): "fits" with a predicted peak far above the budget (per_px_bytes=0, fixed_bytes > budget)
    "plan_fits_over_budget": """
        r = n.plan(64, 2048, budget=1, align=64, fixed_bytes=1 << 30, min_tile=1)
        print(r["fits"], r.get("predicted_peak_bytes"), ">", r["budget_bytes"])
    """,
    # snapshot fields that are no byte count: exception left set (SystemError / leaks into later code)
    "snapshot_field_400_digits": """
        print(n.budget({"retry_count": 10**400}))
    """,
    "snapshot_field_silently_unknown": """
        print(n.budget({"free": 1 << 30, "process_used": 10**400, "cap": 1 << 20}))  # taken as 'unknown'
    """,
    "snapshot_field_float_raises": """
        class Big(int):
            def __float__(self): raise ArithmeticError("boom")
        print(n.Policy().decide({"free": 1 << 30, "retry_count": Big(5)}))
    """,
    # budget: free + evictable (and cap - live) overflow int64: budget 0 instead of a huge number
    "budget_overflow": """
        print(n.budget({"free": 9 * 10**18, "evictable": 9 * 10**18}), "expected", 2**63 - 1)
    """,
    # stage(): a bad device (or a probe's error) raises after the wrapped work succeeded
    "stage_raises_after_work": """
        vg.simulate("8GB", "1GB"); ran = []
        try:
            with vg.stage("vae_decode", device=1): ran.append(1)
        except ValueError as e: print("work ran:", bool(ran), "then", repr(e))
    """,
    # messages: parse_log_line leaks SyntaxError from ast.literal_eval
    "parse_log_line_syntaxerror": """
        line = ("GC: utilization={'gpu': 8, 'ram': 20, 'threshold': 0} gc={'collected': 510, 'saved': " + "[" * 500
                + "} before={'gpu': 1.93} after={'gpu': 1.68, 'retries': 0, 'oom': 0} device=cuda fn=vae_decode time=0.25")
        vg.parse_log_line(line)
    """,
}


def run(name, timeout=20):
    code = PRE + textwrap.dedent(REPROS[name])
    t = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"HANG (> {timeout} s)"
    dt = time.monotonic() - t
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    tail = err[-1] if err else ""
    for ln in err:
        if "Sanitizer" in ln or "runtime error" in ln or "Fatal Python error" in ln:
            tail = ln
            break
    return f"rc {r.returncode} in {dt:.1f} s: {r.stdout.strip()[-200:]} {tail[-240:]}".strip()


if __name__ == "__main__":
    for name in sys.argv[1:] or REPROS:
        print(f"{name:32s} {run(name)}", flush=True)
