"""Tiling benchmark: the stitch (blending tile results into the output) against the rivals a
strong engineer would write, side by side in one process on the same grid; the planner's worst
cases; and, on a GPU, auto tiles vs fixed 512 + halving.

    python bench/tiling.py [--threads 2] [--repeat 5] [--comfyui PATH] [--handoff ready,node,node-fp16]
    python bench/tiling.py --plan-only

Stitchers (fn returns a ready result, so only the stitch is measured; every one writes a new
NHWC float32 output of the same grid, that of vramguard's planner):
  * ours          vramguard.tiled (C canvas, smoothstep ramps that sum to one, no weight buffer)
                  with band=True as the upscale node runs it: a row of tiles blended row by row
                  (the output written in address order) into a fresh output, each 2 MiB of
                  it faulted in at its end just before the stitch writes there (the canvas's
                  prefault thread waits for a 5 ms pause between tiles, which never comes here)
  * ours_reused   the same into a caller's pre-faulted output (out=)
  * ours_tile_order  tile by tile (band=False, tiled()'s default for results fn may overwrite)
  * torch         competent torch: precomputed 1-D ramps, one outer product per tile, addcmul_
                  into the output and add_ into a weight plane, one in-place division
  * torch_norm    torch with ramps that sum to one: addcmul_ only, no weights, no division
  * numpy         competent NumPy: ramps that sum to one, multiply into a reused scratch tile,
                  add in place
  * comfy         ComfyUI's comfy.utils.tiled_scale (its own grid: fixed steps), when --comfyui
                  PATH (or VRAMGUARD_COMFYUI) names a checkout; a venv beside it (PATH/../venv)
                  supplies modules ours lacks
  * memcpy        one copy of the output's size into a pre-faulted buffer (`vs_memcpy_reused`),
                  and into a fresh one (`vs_memcpy_fresh`: what any stitcher returning a new
                  output pays too, the kernel zeroing each page on first touch)
Tile handoffs (--handoff): `ready` contiguous NHWC float32 tiles; `node` what the upscale node
hands over, y.movedim(-3, -1) of an NCHW float32 network output (a view, channels a plane
apart); `node-fp16` the same from a half-precision network (float16 -> float32 in the stitch).
Runs are interleaved round by round (so load drift hits every stitcher alike); each figure is
min/median/max over --repeat rounds (>= 3), wall and process CPU time; ratios are per round.
The box these figures come from is shared and loaded, so wall times are noisy: the
load-independent figure is `instructions_per_value`, the instructions executed in the canvas's
stitch functions (stitch_rows, tile_weights and what they call, less a thread's waits for
pages in await_region) under
`valgrind --tool=callgrind --toggle-collect`, over the output's values, for the first shape
(a child process; skipped with the reason when valgrind is missing).  Valgrind emulates no
AVX-512, so that count is of the AVX2 kernels.
Targets (issue 14): <= 2 instructions per value; >= 0.6 of memcpy (reused output), >= 0.85
(fresh); >= 3x less CPU than the competent torch stitch; 2 threads.
Planner: best-of-N time of plan() on worst cases (target: <= 1 ms each, issue 10).
GPU (torch with CUDA): an ESRGAN-size network x4 on 2048^2 at a reserve, auto tiles vs fixed
512 with halving; time, OOMs and peak device use vs total - reserve.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import vramguard as vg
from vramguard import _native
from vramguard import tiling as vg_tiling

SHAPES = [  # name, H, W, scale, tile, overlap, dtype of tiles and output
    ("1024x1024x4", 1024, 1024, 4, 512, 32, np.float32),
    ("1536x1024x2-fp16", 1024, 1536, 2, 384, 16, np.float16),
]
HANDOFFS = ("ready", "node", "node-fp16")


def spread(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def rnd(v):
    if isinstance(v, float):
        return float(f"{v:.4g}")
    if isinstance(v, dict):
        return {k: rnd(x) for k, x in v.items()}
    return v


def axis_ramps(pos: list[int], t: int, scale: int, n_out: int) -> list[np.ndarray]:
    """Linear 1-D ramps (float32, output px) for tiles at `pos` (input px) of size t: over each
    overlap band the left tile falls as 1 - r, the right one rises as r, so they sum to one."""
    out = []
    T = t * scale
    for i, p in enumerate(pos):
        w = np.ones(T, np.float64)
        k = np.arange(T) + 0.5
        if i > 0:
            a, b = pos[i] * scale, (pos[i - 1] + t) * scale
            w *= np.clip((k + pos[i] * scale - a) / (b - a), 0, 1)
        if i < len(pos) - 1:
            a, b = pos[i + 1] * scale, (pos[i] + t) * scale
            w *= 1 - np.clip((k + pos[i] * scale - a) / (b - a), 0, 1)
        out.append(w[: min(T, n_out - p * scale)].astype(np.float32))
    return out


class Source:
    """The tile results fn hands back: views into one ready buffer of the largest tile, in the
    chosen handoff's layout and dtype.  NumPy and torch views share the memory."""

    def __init__(self, torch, handoff: str, th: int, tw: int, C: int, dtype, seed: int = 0):
        rng = np.random.default_rng(seed)
        v = rng.random((1, th, tw, C), dtype=np.float32)
        self.handoff = handoff
        if handoff == "ready":
            self.nhwc = v.astype(dtype)
            self.nchw = None
        else:
            self.nchw = np.ascontiguousarray(v.transpose(0, 3, 1, 2)).astype(
                np.float16 if handoff == "node-fp16" else dtype)
            self.nhwc = self.nchw.transpose(0, 2, 3, 1)  # the node's movedim view
        self.t_nhwc = torch.from_numpy(self.nhwc) if torch is not None else None
        self.t_nchw = torch.from_numpy(self.nchw) if torch is not None and self.nchw is not None else None

    def np_tile(self, h: int, w: int) -> np.ndarray:
        return self.nhwc[:, :h, :w]

    def torch_tile(self, h: int, w: int):
        if self.t_nchw is not None:
            return self.t_nchw[:, :, :h, :w].movedim(1, -1)
        return self.t_nhwc[:, :h, :w]

    def torch_tile_nchw(self, h: int, w: int):  # what comfy's function returns
        if self.t_nchw is not None:
            return self.t_nchw[:, :, :h, :w]
        return self.t_nhwc[:, :h, :w].movedim(-1, 1)


def make_grid(H: int, W: int, scale: int, tile: int, overlap: int):
    xs, tw = vg_tiling._axis(W, tile, overlap, 1, 0.5)
    ys, th = vg_tiling._axis(H, tile, overlap, 1, 0.5)
    rx, ry = axis_ramps(xs, tw, scale, W * scale), axis_ramps(ys, th, scale, H * scale)
    tiles = [(x * scale, y * scale, len(ry[j]), len(rx[i]), rx[i], ry[j])
             for j, y in enumerate(ys) for i, x in enumerate(xs)]
    return tiles, tw, th


def torch_stitch(torch, src: Source, tiles, shape, normalised: bool, dtype):
    """Competent torch: 1-D ramps precomputed, per tile one outer product and one addcmul_;
    without normalised ramps, a weight plane and one in-place division at the end.  In the
    layout the tiles come in: NCHW for the node's (the network's own layout: the mask
    broadcasts over channels, rows stay contiguous; the NHWC result is a view, as ComfyUI's
    tiled_scale returns it), NHWC for ready tiles, rows seen as w*C values with the x ramp
    repeated per channel (so no broadcast over a 3-long inner axis)."""
    B, Ho, Wo, C = shape
    nchw = src.nchw is not None
    out = torch.zeros((B, C, Ho, Wo) if nchw else (B, Ho, Wo * C), dtype=dtype)
    wsum = None if normalised else torch.zeros((Ho, Wo), dtype=dtype)
    for X, Y, h, w, rx, ry, rxc in tiles:
        if nchw:
            out[:, :, Y:Y + h, X:X + w].addcmul_(src.torch_tile_nchw(h, w), torch.outer(ry, rx))
        else:
            r = src.torch_tile(h, w).reshape(B, h, w * C)
            out[:, Y:Y + h, X * C:(X + w) * C].addcmul_(r, torch.outer(ry, rxc))
        if wsum is not None:
            wsum[Y:Y + h, X:X + w].add_(torch.outer(ry, rx))
    if nchw:
        if wsum is not None:
            out.div_(wsum)
        return out.movedim(1, -1)
    out = out.view(B, Ho, Wo, C)
    if wsum is not None:
        out.div_(wsum.unsqueeze(-1))
    return out


def numpy_stitch(src: Source, tiles, shape, scratch, dtype):
    """Competent NumPy: normalised ramps, multiply into a reused scratch tile, add in place;
    layouts chosen as for torch_stitch."""
    B, Ho, Wo, C = shape
    nchw = src.nchw is not None
    out = np.zeros((B, C, Ho, Wo) if nchw else (B, Ho, Wo * C), dtype)
    for X, Y, h, w, rx, ry, rxc in tiles:
        if nchw:
            tmp = scratch[:, :, :h, :w]
            np.multiply(src.nchw[:, :, :h, :w], ry[:, None] * rx[None, :], out=tmp)
            o = out[:, :, Y:Y + h, X:X + w]
        else:
            tmp = scratch[:, :h, :w * C]
            np.multiply(src.np_tile(h, w).reshape(B, h, w * C), ry[:, None] * rxc[None, :], out=tmp)
            o = out[:, Y:Y + h, X * C:(X + w) * C]
        np.add(o, tmp, out=o)
    return out.transpose(0, 2, 3, 1) if nchw else out.reshape(B, Ho, Wo, C)


def measure(fn) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def stitch_bench(torch, comfy_utils, name, H, W, scale, tile, overlap, dtype, handoff, repeat, res) -> None:
    C, B = 3, 1
    tiles, tw, th = make_grid(H, W, scale, tile, overlap)
    out_dtype = np.float32 if handoff == "node-fp16" else dtype
    shape = (B, H * scale, W * scale, C)
    src = Source(torch, handoff, th * scale, tw * scale, C, dtype)
    img = np.zeros((B, H, W, C), np.float32)
    out_bytes = int(np.prod(shape)) * np.dtype(out_dtype).itemsize

    def fn(t):  # stitching alone: a ready result of the tile's size, as the handoff gives it
        return src.np_tile(t.shape[1] * scale, t.shape[2] * scale)

    kw = dict(scale=scale, overlap=overlap, tile=tile, min_tile=2 * overlap)
    reused = np.zeros(shape, out_dtype)
    mem_src = np.ones(out_bytes, np.uint8)
    mem_dst = np.zeros(out_bytes, np.uint8)
    runs = {
        # band=True as the upscale node passes it (its model returns a new tensor per tile;
        # here fn returns views of one constant buffer, which banding reads correctly too)
        "ours": lambda: vg.tiled(fn, img, out=np.empty(shape, out_dtype), band=True, **kw),
        "ours_reused": lambda: vg.tiled(fn, img, out=reused, band=True, **kw),
        # tile by tile (tiled()'s default for results fn might overwrite)
        "ours_tile_order": lambda: vg.tiled(fn, img, out=np.empty(shape, out_dtype), band=False, **kw),
        "memcpy_reused": lambda: np.copyto(mem_dst, mem_src),
        "memcpy_fresh": lambda: np.copyto(np.empty_like(mem_src), mem_src),
        "numpy": lambda: numpy_stitch(src, ntiles, shape, scratch, out_dtype),
    }
    ntiles = [(X, Y, h, w, rx.astype(out_dtype), ry.astype(out_dtype), np.repeat(rx, C).astype(out_dtype))
              for X, Y, h, w, rx, ry in tiles]
    scratch = np.empty((B, C, th * scale, tw * scale) if src.nchw is not None else (B, th * scale, tw * scale * C),
                       out_dtype)
    if torch is not None:
        tdt = torch.float16 if out_dtype == np.float16 else torch.float32
        ttiles = [tuple(torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in t) for t in ntiles]
        runs["torch"] = lambda: torch_stitch(torch, src, ttiles, shape, False, tdt)
        runs["torch_norm"] = lambda: torch_stitch(torch, src, ttiles, shape, True, tdt)
        if comfy_utils is not None:
            timg = torch.zeros((B, C, H, W))

            def cfn(t):
                return src.torch_tile_nchw(t.shape[2] * scale, t.shape[3] * scale)

            runs["comfy"] = lambda: comfy_utils.tiled_scale(timg, cfn, tile_x=tile, tile_y=tile, overlap=overlap,
                                                            upscale_amount=scale, out_channels=C)
    # results agree before anything is timed (the rivals' linear ramps differ from our
    # smoothstep only inside overlaps, so compare away from them: the first tile's interior)
    X, Y, h, w, _, _ = tiles[0]
    ref = np.asarray(vg.tiled(fn, img, out=np.empty(shape, out_dtype), **kw), np.float32)
    inner = (slice(None), slice(0, h // 2), slice(0, w // 2))
    for k in ("numpy", "torch", "torch_norm"):
        if k in runs:
            got = runs[k]()
            got = got.float().numpy() if hasattr(got, "numpy") else got.astype(np.float32)
            np.testing.assert_allclose(got[inner], ref[inner], rtol=2e-3, atol=2e-3)
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeat):
        for k, f in runs.items():
            # Every run starts from the same state of the kernel's free pages: an output-sized
            # buffer just written and freed.  Without it a fresh output's page faults cost what
            # the previous run left behind (after torch freed its buffers, NumPy's huge-page
            # faults went into direct compaction: 10x the CPU), not what the stitcher does.
            np.ones(out_bytes, np.uint8)
            w_, c_ = measure(f)
            wall[k].append(w_)
            cpu[k].append(c_)
    key = f"{name}/{handoff}"
    res["stitch"][key] = {
        "tiles": len(tiles), "output_values": int(np.prod(shape)), "out_dtype": np.dtype(out_dtype).name,
        "wall_s": {k: rnd(spread(v)) for k, v in wall.items()},
        "cpu_s": {k: rnd(spread(v)) for k, v in cpu.items()},
        "vs_memcpy_reused": rnd(spread([m / o for m, o in zip(wall["memcpy_reused"], wall["ours_reused"])])),
        "vs_memcpy_fresh": rnd(spread([m / o for m, o in zip(wall["memcpy_fresh"], wall["ours"])])),
        "vs_memcpy_fresh_tile_order": rnd(spread([m / o for m, o in zip(wall["memcpy_fresh"],
                                                                         wall["ours_tile_order"])])),
        # the same in CPU seconds (memcpy runs on one thread, the canvas on all): less noisy
        "vs_memcpy_reused_cpu": rnd(spread([m / o for m, o in zip(cpu["memcpy_reused"], cpu["ours_reused"])])),
        "vs_memcpy_fresh_cpu": rnd(spread([m / o for m, o in zip(cpu["memcpy_fresh"], cpu["ours"])])),
    }
    r = res["stitch"][key]
    for k in ("torch", "torch_norm", "numpy", "comfy"):
        if k in runs:
            r[f"vs_{k}_cpu"] = rnd(spread([t / o for t, o in zip(cpu[k], cpu["ours"])]))
            r[f"vs_{k}_wall"] = rnd(spread([t / o for t, o in zip(wall[k], wall["ours"])]))


def callgrind_child(handoff: str) -> None:
    """Run one stitch of the first shape (under callgrind, started by callgrind_bench)."""
    name, H, W, scale, tile, overlap, dtype = SHAPES[0]
    _, tw, th = make_grid(H, W, scale, tile, overlap)
    src = Source(None, handoff, th * scale, tw * scale, 3, dtype)
    img = np.zeros((1, H, W, 3), np.float32)
    out = vg.tiled(lambda t: src.np_tile(t.shape[1] * scale, t.shape[2] * scale), img, scale=scale,
                   overlap=overlap, tile=tile, min_tile=2 * overlap, band=True,
                   out=np.empty((1, H * scale, W * scale, 3), np.float32 if handoff == "node-fp16" else dtype))
    print(json.dumps({"values": int(out.size), "isa": _native.Canvas(np.zeros((1, 1, 1, 3), np.float32)).isa}))


def callgrind_bench(handoffs, res) -> None:
    vgbin = shutil.which("valgrind")
    if vgbin is None:
        res["instructions_per_value"] = None
        res["instructions_per_value_skipped"] = "valgrind not found on PATH"
        return
    per = {}
    for h in handoffs:
        with tempfile.TemporaryDirectory() as d:
            outf = os.path.join(d, "cg.out")
            # await_region toggles collection off again: a thread waiting for pages is not stitching
            cmd = [vgbin, "--tool=callgrind", "--collect-atstart=no", "--toggle-collect=stitch_rows",
                   "--toggle-collect=tile_weights", "--toggle-collect=await_region",
                   f"--callgrind-out-file={outf}", sys.executable,
                   os.path.abspath(__file__), "--callgrind-child", h]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if p.returncode != 0 or not os.path.exists(outf):
                per[h] = f"callgrind failed ({p.returncode}): {p.stderr[-300:]}"
                continue
            info = json.loads(p.stdout.strip().splitlines()[-1])
            m = re.search(r"^summary:\s+(\d+)", open(outf).read(), re.M)
            ir = int(m.group(1))
            per[h] = {"instructions": ir, "values": info["values"], "isa": info["isa"],
                      "per_value": rnd(ir / info["values"])}
    res["callgrind"] = {"shape": SHAPES[0][0], **per}
    first = per.get(handoffs[0])
    res["instructions_per_value"] = first["per_value"] if isinstance(first, dict) else None


def import_comfy(root: str | None):
    if not root:
        return None
    sys.path.insert(0, root)
    venv = os.path.join(os.path.dirname(os.path.abspath(root)), "venv", "lib")
    if os.path.isdir(venv):  # modules ComfyUI needs and this venv lacks, after our own
        for d in sorted(os.listdir(venv)):
            sp = os.path.join(venv, d, "site-packages")
            if d.startswith("python") and os.path.isdir(sp):
                sys.path.append(sp)
    saved = sys.argv
    sys.argv = [saved[0]]  # comfy.cli_args parses the command line at import
    try:
        import comfy.utils as comfy_utils  # type: ignore
        return comfy_utils
    except Exception as e:  # noqa: BLE001 -- report and go on without the rival
        print(f"comfy.utils not importable from {root}: {type(e).__name__}: {e}")
        return None
    finally:
        sys.argv = saved


def gpu_bench(torch, res) -> None:
    if torch is None or not torch.cuda.is_available():
        return
    from vramguard.demo import make_net

    dev = "cuda"
    net = make_net(dev, channels=64, blocks=16).half()
    img = torch.rand(1, 2048, 2048, 3, device=dev, dtype=torch.float16)
    reserve = 1.5 * (1 << 30)
    total = torch.cuda.mem_get_info()[1]
    vg.set_reserve(int(reserve))

    def fn(t):
        with torch.no_grad():
            return net(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    sampler = vg.Sampler(0, interval=0.002)
    sampler.start()
    cost = vg.calibrate(fn, img, key="bench-esrgan", sizes=(64, 128))
    torch.cuda.synchronize()
    g = sampler.begin("auto")
    t0 = time.perf_counter()
    st: dict = {}
    vg.tiled(fn, img, scale=4, overlap=32, cost=cost, reserve=int(reserve), stats=st)
    torch.cuda.synchronize()
    t_auto = time.perf_counter() - t0
    rec_auto = sampler.end(g)
    torch.cuda.empty_cache()

    # ComfyUI's approach: fixed 512 tiles; on OOM halve and restart the whole image
    g = sampler.begin("fixed")
    t0 = time.perf_counter()
    tile, ooms = 512, 0
    while True:
        try:
            vg.tiled(fn, img, scale=4, overlap=32, tile=tile, min_tile=64)
            break
        except vg.TilingError:
            raise
        except torch.cuda.OutOfMemoryError:
            ooms += 1
            torch.cuda.empty_cache()
            tile //= 2
    torch.cuda.synchronize()
    t_fixed = time.perf_counter() - t0
    rec_fixed = sampler.end(g)
    res["gpu_peak_fixed_bytes"] = rec_fixed["peak_used"]
    sampler.stop()
    res["gpu_auto_vs_fixed_speed"] = t_fixed / t_auto
    res["gpu_auto_ooms"] = st["retries"]
    res["gpu_fixed_ooms"] = ooms
    res["gpu_peak_auto_bytes"] = rec_auto["peak_used"]
    res["gpu_limit_bytes"] = int(total - reserve)
    res["gpu_peak_within_reserve"] = bool(rec_auto["peak_used"] <= total - reserve)
    res["gpu_auto_tile"] = st["tile_sizes"][-1]


# Planner worst cases (issue 10: <= 1 ms for any accepted input, "no tile fits" included).
# Before the bounded planner: "1024^2, tiles of 1-2 px" took 3.2 s, 2048^2 23.8 s, and the
# max-side cases ran for hours.
PLAN_SIDE = 1 << 20
PLAN_CASES = {
    "1024^2, 1 MiB, 1000 B/px": dict(width=1024, height=1024, budget=1 << 20, per_px_bytes=1000.0),
    "1024^2, tiles of 1-2 px": dict(width=1024, height=1024, budget=2000, per_px_bytes=1000.0),
    "1024^2, nothing fits": dict(width=1024, height=1024, budget=1 << 20, fixed_bytes=64 << 20,
                                 per_px_bytes=1000.0),
    "max side^2, nothing fits": dict(width=PLAN_SIDE, height=PLAN_SIDE, budget=1 << 20, fixed_bytes=64 << 20,
                                     per_px_bytes=1000.0),
    "max side^2, 1 MiB": dict(width=PLAN_SIDE, height=PLAN_SIDE, budget=1 << 20, per_px_bytes=1.0),
    "max side^2, 8x8 tiles": dict(width=PLAN_SIDE, height=PLAN_SIDE, budget=1 << 40, per_px_bytes=64.0),
    "max side^2, overlap 32, feather 1, min_tile 4096": dict(width=PLAN_SIDE, height=PLAN_SIDE, budget=1 << 40,
                                                            per_px_bytes=64.0, overlap=32, feather=1.0,
                                                            min_tile=4096),
    "max side x 1, tiny budget": dict(width=PLAN_SIDE, height=1, budget=2000, per_px_bytes=1000.0),
    "video max side^3, nothing fits": dict(width=PLAN_SIDE, height=PLAN_SIDE, depth=PLAN_SIDE, budget=1 << 20,
                                           fixed_bytes=64 << 20, per_px_bytes=1.0),
    "video max side^3, 32768 tiles": dict(width=PLAN_SIDE, height=PLAN_SIDE, depth=PLAN_SIDE, budget=1 << 45,
                                          per_px_bytes=1.0),
    "video 720p x 121 frames, 6 GiB": dict(width=1280, height=720, depth=121, depth_overlap=4, overlap=32,
                                           budget=6 << 30, per_px_bytes=3000.0),
}


def plan_bench(repeat: int, res: dict) -> None:
    """Best-of-`repeat` wall time of vramguard._native.plan on each worst case, in microseconds."""
    from vramguard import _native
    worst = 0.0
    for name, kw in PLAN_CASES.items():
        kw = dict(kw)
        w, h = kw.pop("width"), kw.pop("height")
        best = float("inf")
        for _ in range(max(repeat, 5)):
            t0 = time.perf_counter()
            r = _native.plan(w, h, **kw)
            best = min(best, time.perf_counter() - t0)
        res[f"plan_us[{name}]"] = round(best * 1e6, 1)
        res[f"plan_result[{name}]"] = f"{r['tiles']} tiles of {r['tile']}" if r["fits"] else "no fit"
        worst = max(worst, best)
    res["plan_worst_us"] = round(worst * 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5, help="rounds per figure (>= 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for the rivals")
    ap.add_argument("--handoff", default=",".join(HANDOFFS), help="comma-separated: " + ", ".join(HANDOFFS))
    ap.add_argument("--comfyui", default=os.environ.get("VRAMGUARD_COMFYUI"), help="a ComfyUI checkout")
    ap.add_argument("--no-callgrind", action="store_true", help="skip the callgrind count")
    ap.add_argument("--plan-only", action="store_true", help="only the planner's worst-case timings")
    ap.add_argument("--callgrind-child", choices=HANDOFFS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.callgrind_child:
        callgrind_child(a.callgrind_child)
        return
    if a.plan_only:
        res: dict = {}
        plan_bench(a.repeat, res)
        for key, v in res.items():
            print(f"{key:60s} {v}")
        print(json.dumps({"plan_worst_us": res["plan_worst_us"]}))
        return
    if a.repeat < 3:
        ap.error("--repeat must be >= 3 (ranges need three runs)")
    handoffs = [h.strip() for h in a.handoff.split(",") if h.strip()]
    for h in handoffs:
        if h not in HANDOFFS:
            ap.error(f"--handoff: unknown {h!r}; choose from {', '.join(HANDOFFS)}")
    try:
        import torch
        torch.set_num_threads(a.threads)
    except ImportError:
        torch = None
    comfy_utils = import_comfy(a.comfyui) if torch is not None else None
    res: dict = {"threads_torch": a.threads, "threads_ours": os.cpu_count(), "isa": _native.Canvas(
        np.zeros((1, 1, 1, 3), np.float32)).isa, "repeat": a.repeat, "stitch": {}}
    if os.cpu_count() != a.threads:
        print(f"note: the canvas uses all {os.cpu_count()} CPUs; torch was given {a.threads}")
    plan_bench(a.repeat, res)
    for name, H, W, scale, tile, overlap, dtype in SHAPES:
        for h in (handoffs if name == SHAPES[0][0] else handoffs[:1]):
            stitch_bench(torch, comfy_utils, name, H, W, scale, tile, overlap, dtype, h, a.repeat, res)
    if a.no_callgrind:
        res["instructions_per_value"] = None
        res["instructions_per_value_skipped"] = "--no-callgrind"
    else:
        callgrind_bench(handoffs, res)
    gpu_bench(torch, res)
    for key, v in res.items():
        if key == "stitch":
            for sk, sv in v.items():
                print(f"stitch {sk}: tiles {sv['tiles']}, {sv['output_values']} values, {sv['out_dtype']}")
                for k2 in sv["wall_s"]:
                    w_, c_ = sv["wall_s"][k2], sv["cpu_s"][k2]
                    print(f"  {k2:14s} wall {w_['min']:.4f} / {w_['median']:.4f} / {w_['max']:.4f} s   "
                          f"cpu {c_['min']:.4f} / {c_['median']:.4f} / {c_['max']:.4f} s")
                for k2, r in sv.items():
                    if k2.startswith("vs_"):
                        print(f"  {k2:22s} {r['min']:.3g} / {r['median']:.3g} / {r['max']:.3g}  (min/median/max)")
        elif not key.startswith("plan_"):
            print(f"{key:42s} {v}")
    main_key = f"{SHAPES[0][0]}/{handoffs[0]}"
    m = res["stitch"][main_key]
    med = lambda k: m[k]["median"] if k in m else None  # noqa: E731
    summary = {
        "shape": main_key,
        "instructions_per_value": res.get("instructions_per_value"),
        "vs_competent_torch_cpu": med("vs_torch_cpu"),
        "vs_memcpy_reused": med("vs_memcpy_reused"),
        "vs_memcpy_fresh": med("vs_memcpy_fresh"),
        "vs_memcpy_reused_cpu": med("vs_memcpy_reused_cpu"),
        "vs_memcpy_fresh_cpu": med("vs_memcpy_fresh_cpu"),
        "vs_torch_norm_cpu": med("vs_torch_norm_cpu"),
        "vs_numpy_cpu": med("vs_numpy_cpu"),
        "vs_comfy_cpu": med("vs_comfy_cpu"),
        "plan_worst_us": res["plan_worst_us"],
        **{k: v for k, v in res.items() if k not in ("instructions_per_value",)},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
