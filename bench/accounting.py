"""Accounting benchmark: like against like, side by side in one process.

    python bench/accounting.py [--runs 5] [--seconds 3] [--no-callgrind]

Host memory (the figures every consumer reads when there is no GPU):
  cached   vramguard's _native.host() -- /proc/meminfo cached 10 ms, process RSS read fresh --
           against the same thing in Python (the same 10 ms cache, RSS by pread on a kept-open fd);
  fresh    _native.host(fresh=True) against the competent Python twin (kept-open fds, one 512-byte
           pread of /proc/meminfo and of /proc/self/statm, parse the two fields) and a naive one
           (open + read + dict of every line, what most monitors do), and psutil
           (virtual_memory() + Process().memory_info(): psutil re-reads every file on every call).
  Figures: us per call, min/median/max of --runs runs (each the mean of a few thousand calls), and,
  where valgrind is installed, user-space instructions per call under callgrind (load-independent;
  the kernel's side of the reads is not counted there, and it is the same for all).
Device memory through NVML: vramguard's snapshot against pynvml's nvmlDeviceGetMemoryInfo, both
  over the same library: the real libnvidia-ml where one is loadable, else tests/fakelibs/fake_nvml.c
  built here (then only the binding overhead is compared: the fake answers at once); the JSON says
  which.  Our snapshot does more per call (free, used, process used from a cached process list,
  reserve, budget) than pynvml's one query.
Sampler: the C sampler at 100 Hz against a Python thread doing the same reads at 100 Hz.
On a GPU with torch, also: driver snapshot vs torch.cuda.mem_get_info.  The box is shared and
loaded: wall-time figures are noisy; instruction counts carry the claims.  Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import vramguard as vg
from vramguard import _native

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
INTERVAL = 0.010  # the C host cache's interval (csrc/sources.c: host_interval)


# ---------------------------------------------------------------- Python twins
def _cgroup_files() -> tuple[str, str] | None:
    """The tightest memory limit along this process's cgroup path, as csrc/sources.c finds it."""
    best, out = 1 << 60, None
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            rel, root, mx, cur = line[3:], "/sys/fs/cgroup", "memory.max", "memory.current"
        elif len(line.split(":", 2)) == 3 and "memory" in line.split(":", 2)[1]:
            rel, root = line.split(":", 2)[2], "/sys/fs/cgroup/memory"
            mx, cur = "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        d = rel
        while True:
            try:
                v = int(open(f"{root}{d}/{mx}").read().split()[0])
                if 0 < v < best:
                    best, out = v, (f"{root}{d}/{mx}", f"{root}{d}/{cur}")
            except (OSError, ValueError):
                pass
            if not d or "/" not in d:
                break
            d = d.rsplit("/", 1)[0]
    return out


class PyHost:
    """The competent Python twin of _native.host(): kept-open fds, one short pread each, the
    cgroup limit read the same way when there is one."""

    def __init__(self):
        self.fd_mem = os.open("/proc/meminfo", os.O_RDONLY)
        self.fd_statm = os.open("/proc/self/statm", os.O_RDONLY)
        cg = _cgroup_files()
        self.fd_cg = tuple(os.open(f, os.O_RDONLY) for f in cg) if cg else None
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.at = -1.0
        self.cache = (0, 0)

    def rss(self) -> int:
        return int(os.pread(self.fd_statm, 128, 0).split()[1]) * self.page

    def fresh(self) -> tuple[int, int, int]:
        buf = os.pread(self.fd_mem, 512, 0)
        total = avail = -1
        for line in buf.split(b"\n"):
            if line.startswith(b"MemTotal:"):
                total = int(line.split()[1]) * 1024
            elif line.startswith(b"MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
        if self.fd_cg:
            lim = int(os.pread(self.fd_cg[0], 64, 0).split()[0])
            cur = int(os.pread(self.fd_cg[1], 64, 0).split()[0])
            total, avail = min(total, lim), min(avail, max(0, lim - cur))
        self.cache, self.at = (total, avail), time.monotonic()
        return total, avail, self.rss()

    def cached(self) -> tuple[int, int, int]:
        if self.at > 0 and time.monotonic() - self.at < INTERVAL:
            return self.cache[0], self.cache[1], self.rss()
        return self.fresh()


def py_naive() -> tuple[int, int, int]:
    with open("/proc/meminfo") as f:
        d = dict(line.split(":", 1) for line in f)
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return int(d["MemTotal"].split()[0]) * 1024, int(d["MemAvailable"].split()[0]) * 1024, rss


# ---------------------------------------------------------------- timing
def per_call_us(fn, n: int, runs: int) -> tuple[float, float, float]:
    for _ in range(min(n, 500)):
        fn()
    xs = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        xs.append((time.perf_counter_ns() - t0) / n / 1000)
    return min(xs), statistics.median(xs), max(xs)


def r3(t) -> list[float]:
    return [round(x, 3) for x in t]


# Every variant is called through a lambda, and the empty lambda ("noop") is subtracted.  Under
# callgrind a call is ~50x slower, so the cached pair gets a 60 s interval: every call but the
# first is a cache hit on both sides, as in a real run of 10 ms-spaced reads.
CG_SETUP = {
    "c_cached": "from vramguard import _native as n; n.set_host_interval(60); f = lambda: n.host()",
    "py_cached": "import accounting as a; a.INTERVAL = 60; h = a.PyHost(); f = lambda: h.cached()",
    "c_fresh": "from vramguard import _native as n; f = lambda: n.host(fresh=True)",
    "py_fresh": "import accounting as a; h = a.PyHost(); f = lambda: h.fresh()",
    "py_naive": "import accounting as a; f = lambda: a.py_naive()",
    "psutil": "import psutil; p = psutil.Process(); f = lambda: (psutil.virtual_memory(), p.memory_info())",
    "noop": "f = lambda: None",
}


def callgrind_per_call(name: str, n: int) -> float | None:
    """User-space instructions per call: (run with 2n calls - run with n calls) / n, so start-up
    and imports cancel out."""
    counts = []
    for calls in (n, 2 * n):
        code = textwrap.dedent(f"""
            import sys; sys.path.insert(0, {HERE!r})
            import accounting, vramguard
            {CG_SETUP[name]}
            for _ in range({calls}): f()
        """)
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "cg.out")
            r = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c", code],
                               capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED="0"))
            if r.returncode != 0:
                return None
            with open(out) as f:
                tot = [line for line in f if line.startswith("totals:") or line.startswith("summary:")]
            counts.append(int(tot[-1].split()[1]))
    return (counts[1] - counts[0]) / n


# ---------------------------------------------------------------- NVML, ours vs pynvml
NVML_CHILD = """
import json, sys, time, statistics, ctypes
sys.path.insert(0, {here!r})
import accounting as a
from vramguard import _native
out = {{}}
lib = {lib!r}
out["snapshot_nvml_us"] = a.r3(a.per_call_us(lambda: _native.snapshot(0), 5000, {runs}))
out["snapshot_source"] = _native.snapshot(0).source
try:
    import pynvml
    if lib:  # the fake has nvmlInit_v2 but not the nvmlInitWithFlags pynvml.nvmlInit() calls
        pynvml.nvmlLib = ctypes.CDLL(lib)
        assert pynvml.nvmlLib.nvmlInit_v2() == 0
    else:
        pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    out["pynvml_us"] = a.r3(a.per_call_us(lambda: pynvml.nvmlDeviceGetMemoryInfo(h), 5000, {runs}))
except ImportError:
    out["pynvml_us"] = "skipped: pynvml (nvidia-ml-py) not installed"
print(json.dumps(out))
"""


def nvml_compare(runs: int) -> dict:
    env = dict(os.environ)
    lib = None
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        which = "real libnvidia-ml.so.1"
    except OSError:
        cc = shutil.which(os.environ.get("CC", "cc"))
        if cc is None:
            return {"nvml": "skipped: no NVML and no C compiler to build the fake"}
        d = tempfile.mkdtemp(prefix="vg_fakenvml_")
        lib = os.path.join(d, "libnvidia-ml.so.1")
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", lib, os.path.join(REPO, "tests", "fakelibs", "fake_nvml.c")],
                       check=True, capture_output=True)
        env.update(VRAMGUARD_NVML_LIB=lib, FAKE_NVML_DEVICES=f"{24 << 30}:{6 << 30}", FAKE_NVML_PROC_USED=str(2 << 30))
        which = "fake (tests/fakelibs/fake_nvml.c): no real NVML here; compares binding overhead only"
    r = subprocess.run([sys.executable, "-c", NVML_CHILD.format(here=HERE, lib=lib, runs=runs)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"nvml": f"failed: {r.stderr.strip()[-300:]}"}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["nvml"] = which
    return out


def cpu_pct_while(seconds: float, start, stop) -> float:
    """CPU used by the process while the main thread sleeps, as % of one core."""
    start()
    c0, w0 = time.process_time(), time.monotonic()
    time.sleep(seconds)
    c1, w1 = time.process_time(), time.monotonic()
    stop()
    return 100.0 * (c1 - c0) / (w1 - w0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--no-callgrind", action="store_true")
    a = ap.parse_args()
    if a.runs < 3:
        ap.error(f"--runs must be >= 3 for ranges, got {a.runs}")
    res: dict = {}
    ph = PyHost()

    # 1. host memory, like against like
    pairs = {"c_cached": _native.host, "py_cached": ph.cached,
             "c_fresh": lambda: _native.host(fresh=True), "py_fresh": ph.fresh, "py_naive": py_naive}
    try:
        import psutil
        proc = psutil.Process()
        pairs["psutil"] = lambda: (psutil.virtual_memory(), proc.memory_info())
    except ImportError:
        res["psutil"] = "skipped: psutil not installed"
    for k, fn in pairs.items():
        res[f"host_{k}_us"] = r3(per_call_us(fn, 5000, a.runs))
    med = {k: res[f"host_{k}_us"][1] for k in pairs}
    res["cached_py_over_c"] = round(med["py_cached"] / med["c_cached"], 2)
    res["fresh_py_over_c"] = round(med["py_fresh"] / med["c_fresh"], 2)
    res["fresh_naive_over_c"] = round(med["py_naive"] / med["c_fresh"], 2)
    if "psutil" in med:
        res["fresh_psutil_over_c"] = round(med["psutil"] / med["c_fresh"], 2)
    print("host memory, us per call (min/median/max of %d runs):" % a.runs)
    for k in pairs:
        print(f"  {k:10s} {res[f'host_{k}_us']}")
    print(f"  cached: Python twin / ours {res['cached_py_over_c']}x; fresh: Python twin / ours "
          f"{res['fresh_py_over_c']}x, naive {res['fresh_naive_over_c']}x"
          + (f", psutil {res['fresh_psutil_over_c']}x" if "fresh_psutil_over_c" in res else ""))

    if a.no_callgrind or shutil.which("valgrind") is None:
        res["instructions_per_call"] = "skipped: " + ("--no-callgrind" if a.no_callgrind else "valgrind not installed")
    else:
        raw = {k: callgrind_per_call(k, 20000) for k in list(pairs) + ["noop"]}
        noop = raw.pop("noop")
        ins = {k: (v - noop if v is not None and noop is not None else None) for k, v in raw.items()}
        res["instructions_per_call"] = {k: (round(v) if v is not None else None) for k, v in ins.items()}
        print(f"user-space instructions per call (callgrind, the empty call subtracted): {res['instructions_per_call']}")
        if ins.get("c_fresh") and ins.get("py_fresh"):
            res["instructions_fresh_py_over_c"] = round(ins["py_fresh"] / ins["c_fresh"], 2)
        if ins.get("c_cached") and ins.get("py_cached"):
            res["instructions_cached_py_over_c"] = round(ins["py_cached"] / ins["c_cached"], 2)
        for k in ("py_naive", "psutil"):
            if ins.get("c_fresh") and ins.get(k):
                res[f"instructions_{k}_over_c_fresh"] = round(ins[k] / ins["c_fresh"], 2)

    # 2. the simulated device (no Python twin: it is ours), and NVML ours vs pynvml
    vg.simulate("8GB", "3GB")
    res["snapshot_sim_us"] = r3(per_call_us(lambda: _native.snapshot(0), 5000, a.runs))
    res["snapshot_sim_api_us"] = r3(per_call_us(lambda: vg.snapshot(0), 5000, a.runs))
    res.update(nvml_compare(a.runs))
    print(f"NVML ({res.get('nvml')}): snapshot {res.get('snapshot_nvml_us')} us, pynvml {res.get('pynvml_us')} us")

    # 3. sampler CPU at 100 Hz: the C thread vs a Python thread doing the same reads
    base = cpu_pct_while(a.seconds, lambda: None, lambda: None)
    s = vg.Sampler(0, interval=0.01)
    res["sampler_cpu_pct"] = round(max(0.0, cpu_pct_while(a.seconds, s.start, s.stop) - base), 3)
    res["sampler_samples"] = len(s.timeline()["t"])
    halt = threading.Event()

    def py_sampler():
        out = []
        while not halt.wait(0.01):
            snap = _native.snapshot(0)
            out.append((time.monotonic(), snap.used, snap.process_used, ph.rss()))

    th = threading.Thread(target=py_sampler)
    res["python_sampler_cpu_pct"] = round(max(0.0, cpu_pct_while(a.seconds, th.start,
                                                                  lambda: (halt.set(), th.join())) - base), 3)
    vg.simulate_clear()
    print(f"sampler at 100 Hz: C {res['sampler_cpu_pct']} % of a core, Python thread {res['python_sampler_cpu_pct']} %")

    # 4. a real GPU with torch: the driver path vs torch.cuda.mem_get_info
    res["torch_mem_get_info_us"] = "skipped: no torch with CUDA here"
    if vg.device_count() > 0:
        try:
            import torch
            if torch.cuda.is_available():
                torch.zeros(1, device="cuda")  # the host's context exists from here on
                _native.refresh_devices()
                vg.register_probe(None)
                res["snapshot_driver_us"] = r3(per_call_us(lambda: _native.snapshot(0), 2000, a.runs))
                res["snapshot_driver_source"] = _native.snapshot(0).source
                res["torch_mem_get_info_us"] = r3(per_call_us(lambda: torch.cuda.mem_get_info(0), 2000, a.runs))
        except ImportError:
            pass
    print(json.dumps(res))


if __name__ == "__main__":
    main()
