"""Shared pieces of the GPU benches (bench/gpu_*.py), driven by scripts/gpu_check.sh.

  * ranges(): min / median / max of >= 3 runs, the form every figure is reported in;
  * emit(): the one JSON line a bench prints last;
  * Nvml: NVML through ctypes (libnvidia-ml.so.1), independent of vramguard's own loader, so
    the benches check vramguard against a reading it did not make;
  * rrdbnet(): an ESRGAN-size x4 network (RRDBNet: 23 RRDB blocks, 64 features, growth 32;
    ~16.7 M parameters) built from torch layers with seeded random weights: no download;
  * two helper processes, run as `python bench/gpu_common.py holder|sampler ...`:
      holder   holds a set amount of device memory (a second application on the card);
      sampler  reads NVML device use in a loop (GIL-free: its own process) and reports the
               peak, the sample count and the largest gap of each window it is asked for.

Nothing here needs the network; torch is imported only where a function needs it.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterable

MiB = 1 << 20
GiB = 1 << 30
HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------- figures

def ranges(values: Iterable[float], digits: int = 4) -> dict[str, Any]:
    """min / median / max (and n) of the runs; None entries (failed runs) are left out."""
    v = sorted(float(x) for x in values if x is not None and math.isfinite(float(x)))
    if not v:
        return {"min": None, "median": None, "max": None, "n": 0}
    return {"min": round(v[0], digits), "median": round(statistics.median(v), digits),
            "max": round(v[-1], digits), "n": len(v)}


def per_call_us(fn: Callable[[], Any], n: int, rounds: int = 5, warm: int = 200) -> list[float]:
    """Mean microseconds per call of fn over `rounds` rounds of n calls each (one value per round)."""
    for _ in range(warm):
        fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        out.append((time.perf_counter_ns() - t0) / n / 1000.0)
    return out


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def emit(res: dict) -> None:
    """The bench's last line: one JSON object (NaN/inf become null)."""
    sys.stdout.flush()
    print(json.dumps(_clean(res), sort_keys=False), flush=True)


# ---------------------------------------------------------------- NVML through ctypes

class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class Nvml:
    """The few NVML calls the benches need, loaded by SONAME.  Raises OSError/RuntimeError
    with the reason when NVML is not there."""

    def __init__(self, uuid: str | None = None, index: int = 0):
        path = os.environ.get("VRAMGUARD_NVML_LIB") or "libnvidia-ml.so.1"
        self.lib = ctypes.CDLL(path)
        self._check(self.lib.nvmlInit_v2(), "nvmlInit_v2")
        self.handle = ctypes.c_void_p()
        if uuid:
            self._check(self.lib.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(self.handle)),
                        f"nvmlDeviceGetHandleByUUID({uuid})")
        else:
            self._check(self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.handle)),
                        f"nvmlDeviceGetHandleByIndex_v2({index})")
        self._mem = _NvmlMemory()
        self._get = self.lib.nvmlDeviceGetMemoryInfo
        self._get.argtypes = [ctypes.c_void_p, ctypes.POINTER(_NvmlMemory)]

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            try:
                self.lib.nvmlErrorString.restype = ctypes.c_char_p
                msg = self.lib.nvmlErrorString(rc).decode()
            except Exception:
                msg = "?"
            raise RuntimeError(f"{what} failed: NVML error {rc} ({msg})")

    def memory(self) -> tuple[int, int, int]:
        """(total, free, used) in bytes; used = total - free (what NVML's v1 call reports)."""
        rc = self._get(self.handle, ctypes.byref(self._mem))
        if rc != 0:
            self._check(rc, "nvmlDeviceGetMemoryInfo")
        return self._mem.total, self._mem.free, self._mem.used


def torch_uuid(torch: Any, index: int = 0) -> str | None:
    """The CUDA device's UUID as NVML spells it ("GPU-..."), or None when torch cannot say."""
    try:
        u = str(torch.cuda.get_device_properties(index).uuid)
    except Exception:
        return None
    return u if u.startswith(("GPU-", "MIG-")) else f"GPU-{u}"


# ---------------------------------------------------------------- the ESRGAN-size network

def rrdbnet(torch: Any, nf: int = 64, nb: int = 23, gc: int = 32, scale: int = 4, seed: int = 0) -> Any:
    """ESRGAN's RRDBNet (x4: two nearest x2 + conv stages), seeded Kaiming init scaled by 0.1
    in the dense blocks as in ESRGAN's own init, eval mode, NCHW in and out."""
    from torch import nn

    class RDB(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(nf + i * gc, gc if i < 4 else nf, 3, 1, 1) for i in range(5))

        def forward(self, x: Any) -> Any:
            feats = [x]
            for i, conv in enumerate(self.convs):
                y = conv(torch.cat(feats, 1))
                if i < 4:
                    feats.append(nn.functional.leaky_relu(y, 0.2, inplace=True))
            return y * 0.2 + x

    class RRDB(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rdbs = nn.Sequential(RDB(), RDB(), RDB())

        def forward(self, x: Any) -> Any:
            return self.rdbs(x) * 0.2 + x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_first = nn.Conv2d(3, nf, 3, 1, 1)
            self.body = nn.Sequential(*[RRDB() for _ in range(nb)])
            self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
            self.conv_up1 = nn.Conv2d(nf, nf, 3, 1, 1)
            self.conv_up2 = nn.Conv2d(nf, nf, 3, 1, 1)
            self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
            self.conv_last = nn.Conv2d(nf, 3, 3, 1, 1)
            self.scale = scale

        def forward(self, x: Any) -> Any:
            lrelu = nn.functional.leaky_relu
            feat = self.conv_first(x)
            feat = feat + self.conv_body(self.body(feat))
            feat = lrelu(self.conv_up1(nn.functional.interpolate(feat, scale_factor=2, mode="nearest")), 0.2, True)
            feat = lrelu(self.conv_up2(nn.functional.interpolate(feat, scale_factor=2, mode="nearest")), 0.2, True)
            return self.conv_last(lrelu(self.conv_hr(feat), 0.2, True))

    g = torch.Generator().manual_seed(seed)
    net = Net()
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * 9
                w = torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in)
                m.weight.copy_(w * (0.1 if ".convs." in name else 1.0))
                m.bias.zero_()
    return net.eval()


def param_count(net: Any) -> int:
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------- helper processes

class Helper:
    """A helper process (holder or sampler) spoken to by lines on stdin/stdout."""

    def __init__(self, role: str, *args: str, timeout: float = 60.0):
        self.timeout = timeout
        self.p = subprocess.Popen([sys.executable, os.path.join(HERE, "gpu_common.py"), role, *args],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.ask("ping")

    def ask(self, line: str) -> dict:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        box: list[str] = []
        t = threading.Thread(target=lambda: box.append(self.p.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        t.start()
        t.join(self.timeout)
        if not box or not box[0]:
            raise RuntimeError(f"helper {self.p.args[2]} did not answer {line!r} "
                               f"(exit code {self.p.poll()})")
        r = json.loads(box[0])
        if "error" in r:
            raise RuntimeError(f"helper {self.p.args[2]}: {r['error']}")
        return r

    def close(self) -> None:
        try:
            if self.p.poll() is None:
                self.ask("quit")
        except Exception:
            pass
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def _serve(handle: Callable[[list[str]], dict]) -> None:
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            print(json.dumps({"ok": True}), flush=True)
            return
        try:
            r = {"ok": True} if words[0] == "ping" else handle(words)
        except Exception as e:  # reported to the parent, which decides
            r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps(r), flush=True)


def _holder_main(argv: list[str]) -> None:
    """hold N: free what is held, then hold N bytes of device memory (torch, cudaMalloc)."""
    import torch

    dev = int(argv[0]) if argv else 0
    held: list[Any] = []

    def handle(words: list[str]) -> dict:
        if words[0] != "hold":
            raise ValueError(f"unknown command {words[0]!r}")
        n = int(words[1])
        held.clear()
        torch.cuda.empty_cache()
        if n > 0:
            held.append(torch.empty(n, dtype=torch.uint8, device=f"cuda:{dev}"))
        torch.cuda.synchronize(dev)
        return {"held": n, "reserved": torch.cuda.memory_reserved(dev)}

    torch.zeros(1, device=f"cuda:{dev}")  # the context exists before the first answer
    _serve(handle)


def _sampler_main(argv: list[str]) -> None:
    """start NAME / stop: a window; the loop reads NVML every `interval` seconds meanwhile."""
    uuid = argv[0] if argv and argv[0] != "-" else None
    interval = float(argv[1]) if len(argv) > 1 else 0.002
    fallback = None
    try:
        nv = Nvml(uuid=uuid)
    except RuntimeError as e:  # a UUID spelled differently: the first device, said so in "read"
        nv, fallback = Nvml(index=0), f"{e}; sampling NVML device 0"
    lock = threading.Lock()
    win: dict[str, Any] = {}
    halt = threading.Event()

    def loop() -> None:
        while not halt.is_set():
            t = time.monotonic()
            total, free, used = nv.memory()
            with lock:
                if win:
                    win["n"] += 1
                    win["max_used"] = max(win["max_used"], used)
                    win["min_free"] = min(win["min_free"], free)
                    win["max_gap"] = max(win["max_gap"], t - win["last"])
                    win["last"] = t
                    win["total"] = total
            time.sleep(interval)

    th = threading.Thread(target=loop, daemon=True)
    th.start()

    def handle(words: list[str]) -> dict:
        if words[0] == "start":
            with lock:
                win.clear()
                now = time.monotonic()
                win.update(name=words[1] if len(words) > 1 else "", n=0, max_used=0, min_free=1 << 62, max_gap=0.0,
                           t0=now, last=now, total=0)
            return {"started": win["name"]}
        if words[0] == "stop":
            with lock:
                if not win:
                    raise ValueError("stop without start")
                d = dict(win)
                win.clear()
            secs = time.monotonic() - d["t0"]
            return {"name": d["name"], "samples": d["n"], "seconds": secs, "hz": d["n"] / secs if secs else 0.0,
                    "max_gap_ms": d["max_gap"] * 1e3, "max_used": d["max_used"], "min_free": d["min_free"],
                    "total": d["total"]}
        if words[0] == "read":
            total, free, used = nv.memory()
            r = {"total": total, "free": free, "used": used}
            if fallback:
                r["uuid_fallback"] = fallback
            return r
        raise ValueError(f"unknown command {words[0]!r}")

    try:
        _serve(handle)
    finally:
        halt.set()


if __name__ == "__main__":
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if role == "holder":
        _holder_main(sys.argv[2:])
    elif role == "sampler":
        _sampler_main(sys.argv[2:])
    else:
        sys.exit("usage: gpu_common.py holder [DEVICE] | sampler [UUID|-] [INTERVAL_S]")
