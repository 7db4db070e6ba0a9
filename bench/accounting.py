"""Accounting benchmark: snapshot latency and the sampler's CPU cost, side by side.

    python bench/accounting.py [--seconds 3]

Compares, in one process:
  * vramguard snapshots from the simulated and host sources (C) with the same reading done in
    Python (/proc/meminfo parsed per call — what a pure-Python monitor does);
  * on a GPU: the NVML and driver paths next to torch.cuda.mem_get_info and pynvml;
  * the C sampler at 100 Hz next to a Python thread sampling the same sources at 100 Hz.
Targets (issue 3): <= 2 us per host/simulated snapshot, <= 15 us on a GPU, sampler <= 1 % of a
core at 100 Hz.  Last line: one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time

import vramguard as vg
from vramguard import _native


def per_call_us(fn, n: int) -> float:
    for _ in range(min(n, 1000)):
        fn()
    best = float("inf")
    for _ in range(5):  # best of 5 rounds: the least disturbed by the other core
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / n / 1000)
    return best


def py_meminfo():
    with open("/proc/meminfo") as f:
        d = dict(line.split(":", 1) for line in f)
    return int(d["MemTotal"].split()[0]) * 1024, int(d["MemAvailable"].split()[0]) * 1024


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
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()
    res: dict[str, float | None] = {}

    real = vg.device_count() > 0
    vg.simulate("8GB", "3GB")
    res["snapshot_sim_us"] = per_call_us(lambda: _native.snapshot(0), 20000)
    res["snapshot_sim_api_us"] = per_call_us(lambda: vg.snapshot(0), 20000)
    res["snapshot_host_us"] = per_call_us(_native.host, 20000)
    res["snapshot_host_fresh_us"] = per_call_us(lambda: _native.host(fresh=True), 20000)
    res["python_meminfo_us"] = per_call_us(py_meminfo, 5000)

    # sampler CPU at 100 Hz: C thread vs a Python thread doing the same reads
    base = cpu_pct_while(a.seconds, lambda: None, lambda: None)
    s = vg.Sampler(0, interval=0.01)
    res["sampler_cpu_pct"] = max(0.0, cpu_pct_while(a.seconds, s.start, s.stop) - base)
    res["sampler_samples"] = float(len(s.timeline()["t"]))
    halt = threading.Event()

    def py_sampler():
        out = []
        while not halt.wait(0.01):
            snap = _native.snapshot(0)
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            out.append((time.monotonic(), snap.used, snap.process_used, rss))

    th = threading.Thread(target=py_sampler)
    res["python_sampler_cpu_pct"] = max(0.0, cpu_pct_while(a.seconds, th.start, lambda: (halt.set(), th.join())) - base)
    vg.simulate_clear()

    res["snapshot_nvml_us"] = res["snapshot_driver_us"] = res["torch_mem_get_info_us"] = res["pynvml_us"] = None
    if real:
        res["snapshot_nvml_us"] = per_call_us(lambda: _native.snapshot(0), 2000)
        try:
            import torch
            torch.zeros(1, device="cuda")  # the host's context exists from here on
            _native.refresh_devices()
            vg.register_probe(None)
            res["snapshot_driver_us"] = per_call_us(lambda: _native.snapshot(0), 2000)
            res["snapshot_source"] = _native.snapshot(0).source  # type: ignore[assignment]
            res["torch_mem_get_info_us"] = per_call_us(lambda: torch.cuda.mem_get_info(0), 2000)
            vg.register_probe(__import__("vramguard.adapters.torch_adapter", fromlist=["x"]).probe, origin="torch")
            res["snapshot_driver_torch_probe_us"] = per_call_us(lambda: vg.snapshot(0), 2000)
            s = vg.Sampler(0, interval=0.01)
            res["sampler_gpu_cpu_pct"] = max(0.0, cpu_pct_while(a.seconds, s.start, s.stop) - base)
            res["sampler_gpu_uses_driver"] = float(s.uses_driver)
        except ImportError:
            pass
        try:
            import pynvml
            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            res["pynvml_us"] = per_call_us(lambda: pynvml.nvmlDeviceGetMemoryInfo(h), 2000)
        except Exception:
            pass

    for k, v in res.items():
        print(f"{k:34s} {v if v is None or isinstance(v, str) else round(v, 3)}")
    ratio = res["python_meminfo_us"] / res["snapshot_host_us"]
    print(f"host snapshot vs Python /proc/meminfo parse: {ratio:.1f}x faster")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))


if __name__ == "__main__":
    main()
