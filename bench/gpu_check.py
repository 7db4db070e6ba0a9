"""The driver behind scripts/gpu_check.sh: build, GPU tests, the GPU benches, one report.

    bash scripts/gpu_check.sh [--cpu-smoke] [--only a,b] [--skip a,b] [--budget 530] [--no-build]

Steps, in order (each a subprocess with its own time limit; a failure or a timeout is recorded
and the next step runs; the report is rewritten after every step, so a run cut short still
leaves one):
  facts      nvidia-smi, driver, torch / CUDA / nvcc versions, GPU name (always runs)
  build      setup.py build into build/gpu_check/lib (used by every later step through PYTHONPATH);
             falls back to pip install --no-build-isolation --no-deps --target build/gpu_check/site
  tests      pytest -m gpu over tests/ (tests/test_gpu.py and any other test marked gpu)
  snapshot   bench/gpu_snapshot.py     upscale    bench/gpu_upscale.py
  calibrate  bench/gpu_calibrate.py    gc         bench/gpu_gc.py
  vae        bench/vae.py --device cuda at small sizes (figures and checks into the report)
  tiling     bench/tiling.py with --device cuda, when its --help offers it
--cpu-smoke (no GPU needed): every GPU step is reported as skipped with the reason, and what can
run on a CPU runs instead: the build, pytest -m gpu on tests/test_gpu.py (its tests skip, with
their reasons), each GPU bench's --smoke mode (tiny sizes on the CPU, OOMs injected),
bench/vae.py --device cpu at toy sizes, and the --device probe of bench/tiling.py.
Report: $OUT/gpu_report.md and $OUT/gpu_report.json (JSON lines) when OUT is set, else
./gpu_report.md and ./gpu_report.json; step logs in gpu_check_logs.txt beside them.
Exit status: 0 when no step failed or timed out, 1 otherwise, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(REPO, "build", "gpu_check")


@dataclass
class Step:
    name: str
    gpu: bool          # needs a GPU for its real run
    limit: float       # seconds, the real run
    what: str
    status: str = "pending"   # passed / failed / timeout / skipped / pending
    reason: str = ""
    seconds: float = 0.0
    result: Any = None
    smoke: dict = field(default_factory=dict)
    log_tail: str = ""


def make_steps() -> list[Step]:
    return [
        Step("facts", False, 40, "machine facts: nvidia-smi, driver, torch, CUDA, nvcc, GPU"),
        Step("build", False, 180, "build the extension in place (setup.py build; pip --target fallback)"),
        Step("tests", True, 150, "pytest -m gpu over tests/"),
        Step("snapshot", True, 45, "bench/gpu_snapshot.py: ours vs torch.cuda.mem_get_info vs pynvml/NVML"),
        Step("upscale", True, 200, "bench/gpu_upscale.py: x4 of 2048^2, ESRGAN-size, ours vs fixed 512 + halving"),
        Step("calibrate", True, 60, "bench/gpu_calibrate.py: default / calibrated cost model vs measured peak"),
        Step("gc", True, 120, "bench/gpu_gc.py: GC profiles replayed with real CUDA allocations"),
        Step("vae", True, 90, "bench/vae.py --device cuda, small sizes: ours vs ComfyUI's tiled algorithm vs untiled "
                              "(PSNR, FLOPs, wall time, device peak vs the planned budget, host-store traffic)"),
        Step("tiling", True, 90, "bench/tiling.py --device cuda (when offered)"),
    ]


# ---------------------------------------------------------------- running things

def run(cmd: list[str], limit: float, env: dict, log: Any, title: str) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, output, seconds).  The child gets its own session so a
    timeout ends it and every process it started (helpers), by its process-group id."""
    t0 = time.monotonic()
    log.write(f"\n===== {title}: {' '.join(cmd)} (limit {limit:.0f} s)\n")
    log.flush()
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, errors="replace", start_new_session=True)
    try:
        out, _ = p.communicate(timeout=max(1.0, limit))
        rc: int | None = p.returncode
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(5)
                break
            except subprocess.TimeoutExpired:
                continue
        out, _ = p.communicate()
        rc = None
    secs = time.monotonic() - t0
    log.write(out or "")
    log.write(f"\n===== {title}: exit {rc} after {secs:.1f} s\n")
    log.flush()
    return rc, out or "", secs


def last_json(out: str) -> dict | None:
    for line in reversed(out.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def tail(text: str, n: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


# ---------------------------------------------------------------- the steps

FACTS_PY = r"""
import json, os, platform, shutil, sys, sysconfig
d = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
     "cpus": os.cpu_count(),
     "python_h": os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")),
     "cc": shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")}
try:
    import torch
    d["torch"] = torch.__version__
    d["torch_cuda"] = torch.version.cuda
    d["cuda_available"] = torch.cuda.is_available()
    if d["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        d.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_mib=p.total_memory >> 20,
                 multiprocessors=p.multi_processor_count, device_count=torch.cuda.device_count())
    else:
        d["cuda_reason"] = "torch.cuda.is_available() is False"
except Exception as e:
    d["torch"] = None
    d["cuda_available"] = False
    d["cuda_reason"] = f"torch not importable: {type(e).__name__}: {e}"
try:
    import numpy
    d["numpy"] = numpy.__version__
except Exception as e:
    d["numpy"] = f"not importable: {e}"
for mod in ("pynvml", "setuptools", "pytest"):
    try:
        d[mod] = getattr(__import__(mod), "__version__", "present")
    except Exception:
        d[mod] = None
print(json.dumps(d))
"""

VG_PY = r"""
import json, vramguard as vg
from vramguard import _native
print(json.dumps({"vramguard": vg.__file__, "native": _native.__file__, "build_info": _native.build_info(),
                  "gpu_status": vg.gpu_status(), "devices": vg.device_count()}, default=str))
"""


def step_facts(st: Step, ctx: dict) -> None:
    facts: dict[str, Any] = {"started_utc": ctx["started"], "mode": "cpu-smoke" if ctx["smoke"] else "gpu",
                             "argv": ctx["argv"]}
    rc, out, _ = run([ctx["py"], "-c", FACTS_PY], 60, ctx["env"], ctx["log"], "facts/python")
    facts.update(last_json(out) or {"python_facts_error": tail(out, 5)})
    smi = shutil.which("nvidia-smi")
    if smi:
        q = "name,driver_version,memory.total,memory.used,memory.free,compute_cap,pstate,temperature.gpu"
        rc, out, _ = run([smi, f"--query-gpu={q}", "--format=csv,noheader"], 20, ctx["env"], ctx["log"], "facts/smi")
        facts["nvidia_smi_query"] = out.strip() if rc == 0 else f"exit {rc}: {tail(out, 3)}"
        rc, out, _ = run([smi], 20, ctx["env"], ctx["log"], "facts/smi-full")
        facts["nvidia_smi"] = tail(out, 25)
    else:
        facts["nvidia_smi"] = "not found on PATH"
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc:
        rc, out, _ = run([nvcc, "--version"], 20, ctx["env"], ctx["log"], "facts/nvcc")
        facts["nvcc"] = tail(out, 1)
    else:
        facts["nvcc"] = "not found"
    if shutil.which("git"):
        rc, out, _ = run(["git", "rev-parse", "--short", "HEAD"], 10, ctx["env"], ctx["log"], "facts/git")
        facts["commit"] = out.strip() if rc == 0 else "not a git checkout"
    ctx["facts"] = facts
    if facts.get("cuda_available"):
        ctx["gpu_reason"] = None
    else:
        ctx["gpu_reason"] = facts.get("cuda_reason") or "no CUDA device"
    st.status, st.result = "passed", facts


def step_build(st: Step, ctx: dict, limit: float) -> None:
    if ctx["no_build"]:
        st.status, st.reason = "skipped", "--no-build: the vramguard already importable is used"
        verify_import(st, ctx)
        return
    lib = os.path.join(BUILD, "lib")
    shutil.rmtree(lib, ignore_errors=True)
    jobs = str(max(1, min(16, os.cpu_count() or 1)))
    t0 = time.monotonic()
    rc, out, secs = run([ctx["py"], "setup.py", "-q", "build", "--build-base", BUILD, "--build-lib", lib,
                         "-j", jobs], limit, ctx["env"], ctx["log"], "build/setup.py")
    how = "setup.py build"
    if rc != 0:
        site = os.path.join(BUILD, "site")
        shutil.rmtree(site, ignore_errors=True)
        left = limit - (time.monotonic() - t0)
        rc2, out2, _ = run([ctx["py"], "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                            "--no-index", "--target", site, "."], max(10.0, left), ctx["env"], ctx["log"],
                           "build/pip")
        if rc2 != 0:
            st.status = "timeout" if rc is None or rc2 is None else "failed"
            f = ctx.get("facts") or {}
            st.reason = (f"setup.py build exit {rc}; pip --target exit {rc2} (Python.h present: "
                         f"{f.get('python_h')}, C compiler: {f.get('cc')}); with a vramguard built elsewhere "
                         f"on PYTHONPATH, run again with --no-build")
            st.log_tail = tail(out, 15) + "\n---\n" + tail(out2, 15)
            return
        lib, how = site, "pip install --target"
    ctx["env"]["PYTHONPATH"] = lib + (os.pathsep + ctx["pythonpath0"] if ctx["pythonpath0"] else "")
    st.result = {"how": how, "lib": os.path.relpath(lib, REPO), "build_seconds": round(secs, 1)}
    verify_import(st, ctx)
    if st.status != "failed":
        st.status = "passed"


def verify_import(st: Step, ctx: dict) -> None:
    rc, out, _ = run([ctx["py"], "-c", VG_PY], 60, ctx["env"], ctx["log"], "build/import")
    info = last_json(out)
    if rc != 0 or info is None:
        st.status, st.reason = "failed", f"import vramguard failed (exit {rc})"
        st.log_tail = tail(out, 20)
        return
    st.result = {**(st.result or {}), **info}


def junit_cases(path: str) -> list[dict]:
    cases = []
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return cases
    for tc in root.iter("testcase"):
        c = {"test": f"{tc.get('classname', '')}::{tc.get('name', '')}", "seconds": float(tc.get("time", 0) or 0),
             "outcome": "passed"}
        for tag in ("skipped", "failure", "error"):
            el = tc.find(tag)
            if el is not None:
                c["outcome"] = {"skipped": "skipped", "failure": "failed", "error": "error"}[tag]
                c["message"] = (el.get("message") or "")[:300]
        cases.append(c)
    return cases


def pytest_run(ctx: dict, targets: list[str], limit: float, title: str) -> dict:
    xml = os.path.join(ctx["tmp"], f"junit-{title}.xml")
    cmd = [ctx["py"], "-m", "pytest", "-q", "-rA", "-m", "gpu", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={xml}", *targets]
    rc, out, secs = run(cmd, limit, ctx["env"], ctx["log"], title)
    summary = next((ln.strip("= ") for ln in reversed(out.splitlines()) if re.search(r"\d+ (passed|skipped|failed|error|deselected)", ln)), "")
    return {"exit": rc, "summary": summary, "cases": junit_cases(xml), "seconds": round(secs, 1), "out": out}


def step_tests(st: Step, ctx: dict, limit: float) -> None:
    if ctx["smoke"]:
        r = pytest_run(ctx, ["tests/test_gpu.py"], min(limit, 90), "tests-smoke")
        st.smoke = {"status": "ok" if r["exit"] == 0 else f"exit {r['exit']}", "what": "pytest -m gpu tests/test_gpu.py",
                    "summary": r["summary"], "cases": r["cases"], "seconds": r["seconds"]}
        if r["exit"] != 0:
            st.smoke["log_tail"] = tail(r["out"], 20)
        return
    r = pytest_run(ctx, ["tests"], limit, "tests")
    st.result = {"summary": r["summary"], "cases": r["cases"], "exit": r["exit"]}
    if r["exit"] is None:
        st.status, st.reason = "timeout", f"pytest ran past {limit:.0f} s"
    elif r["exit"] == 0:
        st.status = "passed"
        if any(c["outcome"] == "skipped" for c in r["cases"]):
            st.reason = "some GPU tests skipped on a GPU machine: see the table"
    else:
        st.status, st.reason = "failed", f"pytest exit {r['exit']}: {r['summary']}"
        st.log_tail = tail(r["out"], 40)


BENCH = {"snapshot": "bench/gpu_snapshot.py", "upscale": "bench/gpu_upscale.py",
         "calibrate": "bench/gpu_calibrate.py", "gc": "bench/gpu_gc.py"}


def step_bench(st: Step, ctx: dict, limit: float) -> None:
    script = BENCH[st.name]
    extra: list[str] = []
    if st.name in ("upscale", "gc"):  # stop starting runs in time to print partial figures
        extra = ["--deadline", f"{max(10.0, limit - 45):.0f}"]
    if ctx["smoke"]:
        rc, out, secs = run([ctx["py"], script, "--smoke"], min(limit, 60), ctx["env"], ctx["log"], f"{st.name}-smoke")
        st.smoke = {"status": "ok" if rc == 0 else ("timeout" if rc is None else f"exit {rc}"),
                    "what": f"{script} --smoke (tiny sizes on the CPU)", "seconds": round(secs, 1),
                    "result": last_json(out)}
        if rc != 0:
            st.smoke["log_tail"] = tail(out, 20)
        return
    rc, out, secs = run([ctx["py"], script, *extra, *ctx["bench_args"].get(st.name, [])], limit, ctx["env"],
                        ctx["log"], st.name)
    st.result = last_json(out)
    if rc == 0 and st.result is not None:
        st.status = "passed"
    elif rc is None:
        st.status, st.reason = "timeout", f"ran past {limit:.0f} s"
        st.log_tail = tail(out, 30)
    elif rc == 3 and st.result and st.result.get("skipped"):
        st.status, st.reason = "skipped", str(st.result["skipped"])
    else:
        st.status, st.reason = "failed", f"exit {rc}" + ("" if st.result else ", no JSON line")
        st.log_tail = tail(out, 30)


# bench/vae.py at sizes that fit the step's share of the budget: the GPU run, and the CPU smoke
VAE_ARGS = ["--latent", "16x24", "--grids", "1x2,2x3,4x4", "--video-latent", "3x8x12", "--video-grids", "1x2,2x3",
            "--repeat", "3"]
VAE_SMOKE_ARGS = ["--quick", "--no-comfy", "--threads", "1", "--latent", "8x8", "--grids", "1x2", "--video-latent", "3x4x4", "--video-grids", "1x2",
                  "--video-models", "wan", "--repeat", "3"]


def step_vae(st: Step, ctx: dict, limit: float) -> None:
    """bench/vae.py --device cuda (the smoke: --device cpu at toy sizes); its JSON line is the result,
    with checks for the report's table."""
    script = "bench/vae.py"
    smoke = ctx["smoke"]
    dev = "cpu" if smoke else "cuda"
    cmd = [ctx["py"], script, "--device", dev, *(VAE_SMOKE_ARGS if smoke else VAE_ARGS), *ctx["bench_args"].get("vae", [])]
    lim = min(limit, 150) if smoke else limit
    rc, out, secs = run(cmd, lim, ctx["env"], ctx["log"], "vae-smoke" if smoke else "vae")
    res = last_json(out)
    if isinstance(res, dict) and "psnr_min_db" in res:
        res["checks"] = vae_checks(res)
    if smoke:
        st.smoke = {"status": "ok" if rc == 0 and res and res.get("device") == "cpu" else
                    ("timeout" if rc is None else f"exit {rc}" if rc else "no JSON line"),
                    "what": f"{script} --device cpu at toy sizes", "seconds": round(secs, 1), "result": res}
        if st.smoke["status"] != "ok":
            st.smoke["log_tail"] = tail(out, 20)
        return
    st.result = res
    if rc == 0 and res is not None:
        st.status = "passed"
        if not all((res.get("checks") or {}).values()):
            st.reason = "ran; some checks failed: see Targets and checks"
    elif rc is None:
        st.status, st.reason = "timeout", f"ran past {lim:.0f} s"
        st.log_tail = tail(out, 30)
    elif rc == 3 and res and res.get("skipped"):
        st.status, st.reason = "skipped", str(res["skipped"])
    else:
        st.status, st.reason = "failed", f"exit {rc}" + ("" if res else ", no JSON line")
        st.log_tail = tail(out, 30)


def vae_checks(res: dict) -> dict:
    """The issue's targets that a small run can check: PSNR >= 45 dB against untiled (image, video
    decode and encode) and the device peak under the budget the plan was made for."""
    c = {}
    for k in ("psnr_min_db", "video_decode_psnr_min_db", "video_encode_psnr_min_db"):
        if res.get(k) is not None:
            c[f"{k} >= 45"] = res[k] >= 45.0
    if res.get("peak_budget_pass") is not None:
        c["device peak <= planned budget (every row)"] = bool(res["peak_budget_pass"])
    return c


def step_other_bench(st: Step, ctx: dict, limit: float) -> None:
    """bench/tiling.py is another engineer's file: only called, and only with --device cuda when
    its --help offers --device."""
    script = f"bench/{st.name}.py"
    if not os.path.exists(os.path.join(REPO, script)):
        st.status, st.reason = "skipped", f"{script} not in this checkout"
        return
    rc, out, _ = run([ctx["py"], script, "--help"], 60, ctx["env"], ctx["log"], f"{st.name}-help")
    offers = rc == 0 and re.search(r"--device\b", out) is not None
    probe = {"help_exit": rc, "offers_device": bool(offers)}
    if ctx["smoke"]:
        st.smoke = {"status": "ok" if rc == 0 else f"--help exit {rc}", "what": f"{script} --help: --device offered?",
                    **probe}
        return
    if not offers:
        st.status = "skipped"
        st.reason = f"{script} has no --device option (--help exit {rc}); not edited here, so not run"
        st.result = probe
        return
    rc, out, secs = run([ctx["py"], script, "--device", "cuda"], limit, ctx["env"], ctx["log"], st.name)
    lines = [json.loads(ln) for ln in out.splitlines() if ln.strip().startswith("{") and _is_json(ln)]
    st.result = {**probe, "json_lines": lines}
    if rc == 0:
        st.status = "passed"
    else:
        st.status = "timeout" if rc is None else "failed"
        st.reason = f"ran past {limit:.0f} s" if rc is None else f"exit {rc}"
        st.log_tail = tail(out, 30)


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- the report

def checks_of(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every "checks" dict inside a result, flattened to (path.name, value)."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "checks" and isinstance(v, dict):
                out += [(f"{prefix}{n}", x) for n, x in v.items()]
            else:
                out += checks_of(v, f"{prefix}{k}." if k not in ("result",) else prefix)
    return out


def headline(st: Step) -> str:
    r = st.result
    if not isinstance(r, dict):
        return ""
    try:
        if st.name == "snapshot":
            us = r.get("us", {})
            return ", ".join(f"{k} {v['median']} us" for k, v in us.items() if v and k in
                             ("ours_nvml", "ours_driver", "torch_mem_get_info", "pynvml", "ctypes_nvml"))
        if st.name == "upscale":
            parts = []
            for sc in ("roomy", "tight"):
                d = r.get(sc)
                if isinstance(d, dict):
                    parts.append(f"{sc}: x{d.get('speedup_median')} (median), ours OOMs {d['ours'].get('ooms')}, "
                                 f"comfy OOMs {d['comfy'].get('ooms')}, ours peak over limit "
                                 f"{d['ours'].get('peak_over_limit_mib')} MiB")
            return "; ".join(parts)
        if st.name == "gc":
            parts = []
            for name, p in r.get("profiles", {}).items():
                o = p.get("policies", {}).get("ours", {})
                parts.append(f"{name}: ours {o.get('gc_ms_per_prompt', {}).get('median')} ms/prompt, "
                             f"peak_vs_stage_end {o.get('peak_vs_stage_end')}")
            return "; ".join(parts)
        if st.name == "calibrate":
            return ", ".join(f"{k} planned/measured {v.get('min')}..{v.get('max')}"
                             for k, v in r.get("planned_over_measured", {}).items())
        if st.name == "vae":
            return (f"{r.get('device_name')}: PSNR min image {r.get('psnr_min_db')} / video decode "
                    f"{r.get('video_decode_psnr_min_db')} / encode {r.get('video_encode_psnr_min_db')} dB; xFLOP max "
                    f"{r.get('compute_vs_untiled_max')}; wall vs untiled max {r.get('wall_median_vs_untiled_max')}; "
                    f"peak <= budget: {r.get('peak_budget_pass')} ({r.get('peak_budget_rows')} rows, worst "
                    f"{r.get('peak_vs_budget_max')} of the budget)")
        if st.name == "tests":
            return r.get("summary", "")
        if st.name == "build":
            return f"{r.get('how', '')} -> {r.get('native', '')}"
        if st.name == "facts":
            return f"{r.get('gpu', 'no GPU')}; torch {r.get('torch')} (CUDA {r.get('torch_cuda')})"
    except (AttributeError, KeyError, TypeError):
        return ""
    return ""


def short_json(obj: Any, limit: int = 6000) -> str:
    s = json.dumps(obj, indent=1, default=str)
    return s if len(s) <= limit else s[:limit] + f"\n... ({len(s) - limit} more characters in gpu_report.json)"


def write_report(ctx: dict, steps: list[Step], done: bool) -> None:
    out_dir = ctx["out_dir"]
    md = [f"# vramguard GPU check ({'complete' if done else 'in progress / cut short'})", "",
          f"- started {ctx['started']} UTC; mode **{'cpu-smoke' if ctx['smoke'] else 'gpu'}**; "
          f"command `scripts/gpu_check.sh {' '.join(ctx['argv'])}`",
          f"- elapsed {time.monotonic() - ctx['t0']:.1f} s of a {ctx['budget']:.0f} s budget"]
    if ctx["smoke"]:
        md.append("- CPU smoke: the figures under \"CPU smoke run\" come from toy sizes on the CPU with injected "
                  "OOMs; they show the code runs, they are not measurements")
    md.append("")
    f = ctx.get("facts") or {}
    if f:
        md += ["## Machine", "",
               f"- GPU: {f.get('gpu', '-')} (capability {f.get('capability', '-')}, "
               f"{f.get('gpu_memory_mib', '-')} MiB, {f.get('multiprocessors', '-')} SMs)",
               f"- nvidia-smi: `{f.get('nvidia_smi_query', f.get('nvidia_smi', '-'))}`",
               f"- torch {f.get('torch')} (CUDA {f.get('torch_cuda')}), cuda available: {f.get('cuda_available')}"
               + (f" ({f.get('cuda_reason')})" if f.get("cuda_reason") else ""),
               f"- nvcc: {f.get('nvcc')}; python {f.get('python')} ({f.get('executable')}); numpy {f.get('numpy')}; "
               f"pynvml {f.get('pynvml')}; {f.get('cpus')} CPUs; {f.get('platform')}; Python.h "
               f"{'present' if f.get('python_h') else 'MISSING'}; C compiler {f.get('cc')}",
               f"- commit: {f.get('commit', '-')}", ""]
    md += ["## Steps", "", "| step | status | seconds | reason / headline | CPU smoke |", "| --- | --- | --- | --- | --- |"]
    for st in steps:
        why = st.reason or headline(st)
        sm = st.smoke.get("status", "") if st.smoke else ""
        if st.smoke.get("summary"):
            sm += f" ({st.smoke['summary']})"
        md.append(f"| {st.name} | {st.status} | {st.seconds:.1f} | {why.replace('|', '/')} | {sm} |")
    checks = [(f"{st.name}.{n}", v) for st in steps for n, v in checks_of(st.result)]
    if checks:
        md += ["", "## Targets and checks", "", "| check | result |", "| --- | --- |"]
        md += [f"| {n} | {'PASS' if v is True else 'FAIL' if v is False else v} |" for n, v in checks]
    md += ["", "## Details", ""]
    for st in steps:
        md += [f"### {st.name}: {st.status}", "", st.what, ""]
        if st.reason:
            md += [f"Reason: {st.reason}", ""]
        if st.name == "tests" and isinstance(st.result, dict) or st.smoke.get("cases"):
            cases = (st.result or {}).get("cases") if isinstance(st.result, dict) else None
            cases = cases or st.smoke.get("cases") or []
            md += ["| test | outcome | seconds | message |", "| --- | --- | --- | --- |"]
            md += [f"| {c['test']} | {c['outcome']} | {c['seconds']:.2f} | {c.get('message', '').replace('|', '/')} |"
                   for c in cases] + [""]
        if st.result is not None and st.name != "tests":
            md += ["```json", short_json(st.result), "```", ""]
        if st.smoke:
            sm = {k: v for k, v in st.smoke.items() if k not in ("cases", "log_tail")}
            md += ["CPU smoke run:", "", "```json", short_json(sm, 3000), "```", ""]
            if st.smoke.get("log_tail"):
                md += ["```", st.smoke["log_tail"], "```", ""]
        if st.log_tail:
            md += ["Log tail:", "", "```", st.log_tail, "```", ""]
    md += [f"Full step output: {os.path.basename(ctx['log_path'])}.", ""]
    tmp = os.path.join(out_dir, ".gpu_report.md.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("\n".join(md))
    os.replace(tmp, os.path.join(out_dir, "gpu_report.md"))
    lines = [{"kind": "facts", **f}] if f else []
    lines += [{"kind": "step", "step": st.name, "status": st.status, "reason": st.reason,
               "seconds": round(st.seconds, 2), "result": st.result, "smoke": st.smoke or None} for st in steps]
    lines.append({"kind": "summary", "done": done, "elapsed_s": round(time.monotonic() - ctx["t0"], 1),
                  "statuses": {st.name: st.status for st in steps},
                  "checks": {n: v for n, v in checks}})
    tmp = os.path.join(out_dir, ".gpu_report.json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for ln in lines:
            fh.write(json.dumps(ln, default=str) + "\n")
    os.replace(tmp, os.path.join(out_dir, "gpu_report.json"))


# ---------------------------------------------------------------- main

def main(argv: list[str]) -> int:
    names = [s.name for s in make_steps()]
    ap = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--cpu-smoke", action="store_true", help="no GPU: skip GPU steps (with reasons), smoke-run the rest")
    ap.add_argument("--only", default="", help=f"comma-separated steps to run ({','.join(names)}); facts always runs")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out")
    ap.add_argument("--budget", type=float, default=530.0, help="seconds for the whole run (default 530: < 9 min)")
    ap.add_argument("--out", default=None, help="report folder (default: $OUT, else the current folder)")
    ap.add_argument("--python", default=None, help="the Python to build and run with (default: this one)")
    ap.add_argument("--no-build", action="store_true", help="use the vramguard already importable")
    ap.add_argument("--bench-args", action="append", default=[], metavar="STEP=ARGS",
                    help="extra arguments for a bench step, e.g. upscale='--runs 5' (repeatable)")
    a = ap.parse_args(argv)
    only = {x for x in a.only.split(",") if x}
    skip = {x for x in a.skip.split(",") if x}
    bad = (only | skip) - set(names)
    if bad:
        ap.error(f"unknown step(s) {', '.join(sorted(bad))}; steps: {', '.join(names)}")
    bench_args: dict[str, list[str]] = {}
    for spec in a.bench_args:
        k, _, v = spec.partition("=")
        if k not in BENCH and k != "vae":
            ap.error(f"--bench-args: {k!r} is not a bench step ({', '.join([*BENCH, 'vae'])})")
        bench_args.setdefault(k, []).extend(v.split())
    out_dir = a.out or os.environ.get("OUT") or os.getcwd()
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    ctx: dict[str, Any] = {
        "t0": time.monotonic(), "started": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "smoke": a.cpu_smoke, "argv": argv, "py": a.python or sys.executable, "env": env,
        "pythonpath0": env.get("PYTHONPATH", ""), "budget": a.budget, "out_dir": out_dir,
        "no_build": a.no_build, "bench_args": bench_args, "gpu_reason": "not probed",
        "log_path": os.path.join(out_dir, "gpu_check_logs.txt"),
    }
    steps = make_steps()
    deadline = ctx["t0"] + a.budget
    ctx["tmp"] = tempfile.mkdtemp(prefix="gpu_check-")
    with open(ctx["log_path"], "w", encoding="utf-8") as log:
        ctx["log"] = log
        for st in steps:
            if st.name != "facts" and ((only and st.name not in only) or st.name in skip):
                st.status, st.reason = "skipped", "not selected (--only / --skip)"
                if st.name == "build":  # say which vramguard the later steps import instead
                    prev = os.path.join(BUILD, "lib")
                    if os.path.isdir(os.path.join(prev, "vramguard")) and not a.no_build:
                        ctx["env"]["PYTHONPATH"] = prev + (os.pathsep + ctx["pythonpath0"] if ctx["pythonpath0"] else "")
                        when = _dt.datetime.fromtimestamp(os.path.getmtime(prev), _dt.timezone.utc)
                        st.reason += f"; using the previous build in build/gpu_check/lib ({when:%Y-%m-%d %H:%M} UTC)"
                    verify_import(st, ctx)
                    if st.status == "failed":
                        st.status = "skipped"
                        st.reason += "; and no vramguard is importable"
                continue
            left = deadline - time.monotonic() - 5
            if left < 10:
                st.status, st.reason = "skipped", f"no time left in the {a.budget:.0f} s budget"
                continue
            limit = min(st.limit, left)
            t0 = time.monotonic()
            try:
                if st.gpu and (ctx["smoke"] or ctx["gpu_reason"]):
                    why = ctx["gpu_reason"]
                    st.status = "skipped"
                    if ctx["smoke"]:
                        st.reason = ("--cpu-smoke: needs an NVIDIA GPU, " +
                                     (f"none here ({why})" if why else "not used in this mode"))
                    else:
                        st.reason = f"needs an NVIDIA GPU: {why}"
                    if ctx["smoke"]:
                        {"tests": step_tests, "vae": step_vae, "tiling": step_other_bench}.get(
                            st.name, step_bench)(st, ctx, limit)
                elif st.name == "facts":
                    step_facts(st, ctx)
                elif st.name == "build":
                    step_build(st, ctx, limit)
                elif st.name == "tests":
                    step_tests(st, ctx, limit)
                elif st.name in BENCH:
                    step_bench(st, ctx, limit)
                elif st.name == "vae":
                    step_vae(st, ctx, limit)
                else:
                    step_other_bench(st, ctx, limit)
            except Exception as e:  # the driver itself must not stop the run
                st.status, st.reason = "failed", f"driver error: {type(e).__name__}: {e}"
            st.seconds = time.monotonic() - t0
            print(f"gpu_check: {st.name:10s} {st.status:8s} {st.seconds:6.1f} s  "
                  f"{(st.reason or headline(st))[:150]}"
                  + (f"  [smoke: {st.smoke.get('status')}]" if st.smoke else ""), flush=True)
            write_report(ctx, steps, done=False)
        write_report(ctx, steps, done=True)
    shutil.rmtree(ctx["tmp"], ignore_errors=True)
    bad_steps = [s.name for s in steps if s.status in ("failed", "timeout")]
    bad_smoke = [s.name for s in steps if s.smoke and s.smoke.get("status") != "ok"]
    print(f"gpu_check: report {os.path.join(out_dir, 'gpu_report.md')}"
          + (f"; failed: {', '.join(bad_steps)}" if bad_steps else "")
          + (f"; smoke failed: {', '.join(bad_smoke)}" if bad_smoke else ""), flush=True)
    return 1 if bad_steps or bad_smoke else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
