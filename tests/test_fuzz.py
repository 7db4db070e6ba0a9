"""A bounded slice of the seeded fuzzer (scripts/fuzz.py) — in the plain and the sanitized pass.

The fuzzer runs every call in a forked worker, so a segfault, a sanitizer report or a hang in
vramguard becomes a finding here instead of killing pytest.  Under `scripts/test.sh --sanitize`
the environment (LD_PRELOAD of libasan, PYTHONMALLOC=malloc) is inherited by the fuzzer and its
workers; a sanitizer report in a worker is a finding.  The long run is one command:

    nice -n 15 python scripts/fuzz.py --seed 1 --calls 1000000
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "scripts" / "fuzz.py"
SANITIZED = bool(os.environ.get("VRAMGUARD_SANITIZED")) or "asan" in os.environ.get("LD_PRELOAD", "")


def run_fuzz(*args, timeout=300):
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    r = subprocess.run([sys.executable, str(FUZZ), *args], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=str(ROOT))
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    summary = json.loads(lines[-1]) if lines else None
    return r, summary


def test_fuzz_finds_every_public_entry_point():
    """Discovery is by introspection: every public name of _native and of the Python API."""
    r = subprocess.run([sys.executable, str(FUZZ), "--list"], capture_output=True, text=True,
                       timeout=120, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    names = {ln.split()[1] for ln in r.stdout.splitlines() if ln.strip()}
    from vramguard import _native
    import vramguard
    for n in dir(_native):
        if n.startswith("_") or n == "after_fork_child" or not callable(getattr(_native, n)):
            continue
        assert f"_native.{n}" in names, n
    for n in ("put", "put_band", "finish", "coverage", "weights"):
        assert f"_native.Canvas.{n}" in names
    for n in ("start", "stop", "reset", "begin", "end", "stages", "timeline", "last_error"):
        assert f"_native.Sampler.{n}" in names
    api = [n for n in vramguard.__all__ if callable(getattr(vramguard, n))
           and not (isinstance(getattr(vramguard, n), type) and issubclass(getattr(vramguard, n), BaseException))]
    covered = {n.rsplit(".", 1)[-1] for n in names}
    missing = [n for n in api if n not in covered]
    assert not missing, missing


def test_fuzz_slice_is_clean():
    """3,000 seeded calls over every entry point: no crash, no sanitizer report, no hang, no
    SystemError or exception left set, no broken invariant (budget formula, plan coverage,
    finish() only when every pixel was written)."""
    r, s = run_fuzz("--seed", "1", "--calls", "3000", "--quiet", timeout=600)
    assert s is not None, f"fuzzer produced no summary (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert s["calls"] + s["skipped"] >= 3000, s
    report = "\n".join(f"  {f['kind']} in {f['target']} (seed 1, call {f['call']}: replay with "
                       f"`python scripts/fuzz.py --seed 1 --replay {f['call']}`): {f['detail']}\n"
                       f"      {f['call_repr']}" for f in s["distinct"])
    assert s["findings"] == 0 and r.returncode == 0, (
        f"fuzz slice ({s['seconds']} s, {'sanitized' if s['sanitized'] else 'plain'}): "
        f"{s['findings']} finding(s):\n{report}")


@pytest.mark.parametrize("seed", [2, 3])
def test_fuzz_other_seeds_native_core(seed):
    """Two more seeds over the C core only (where memory errors live): 1,000 calls each."""
    r, s = run_fuzz("--seed", str(seed), "--calls", "1000", "--only", r"^_native\.", "--quiet", timeout=600)
    assert s is not None, r.stderr[-3000:]
    report = "\n".join(f"  {f['kind']} {f['target']} call {f['call']}: {f['detail']}\n      {f['call_repr']}"
                       for f in s["distinct"])
    assert s["findings"] == 0, f"seed {seed}: {s['findings']} finding(s):\n{report}"
