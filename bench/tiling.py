"""Tiling benchmark: stitch + blend side by side, and (on a GPU) auto tiles vs fixed 512 + halving.

    python bench/tiling.py [--threads 2] [--repeat 3]
    VRAMGUARD_COMFYUI=/path/to/ComfyUI python bench/tiling.py    # adds comfy.utils.tiled_scale

Stitching alone (fn returns a ready result, as in DESIGN.md's measurement):
  * ours: vramguard.tiled (C canvas, partition-of-unity feathers, no weight buffer)
  * torch: a straightforward feathered weighted average — full-size output + weight buffer,
    a feather mask per tile, a final division (what most tilers do)
  * comfy: ComfyUI's tiled_scale, when a checkout is given
  * memcpy: one copy of the output's size into a pre-faulted buffer (pure bandwidth), and
    into a freshly allocated one (what any tiler returning a new output also pays: the
    kernel zeroes every page on first touch)
Shapes: 2048x2048 -> x4 (tile 512, overlap 32, float32) and 1024x1536 -> x2 (tile 384,
overlap 16, float16).  Extra host memory is the sampled peak RSS above the baseline, over
the output's size.
GPU (torch with CUDA): an ESRGAN-size network x4 on 2048^2 at a reserve, auto tiles vs fixed
512 with halving; time, OOMs and peak device use vs total - reserve.
Targets (issue 5): >= 3x faster than the torch average on CPU; >= 60 % of memcpy bandwidth;
extra host memory <= output + 2 tiles; GPU >= 1.25x faster, zero OOM, peak <= total - reserve.
Planner: best-of-N time of plan() on worst cases (tiny tiles, nothing fits, the maximum side);
`--plan-only` runs just that (target: <= 1 ms each, issue 10).
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import vramguard as vg


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def torch_feather_average(torch, img_nchw, fn, scale: int, tile: int, overlap: int):
    """The usual tiler: output + weight buffers, per-tile linear feather mask, final divide."""
    b, c, h, w = img_nchw.shape
    out = torch.zeros((b, c, h * scale, w * scale))
    wsum = torch.zeros((b, 1, h * scale, w * scale))
    step = tile - overlap
    ys = list(range(0, max(h - overlap, 1), step))
    xs = list(range(0, max(w - overlap, 1), step))
    f = overlap * scale
    for y in ys:
        for x in xs:
            t = img_nchw[:, :, y:y + tile, x:x + tile]
            r = fn(t)
            th, tw = r.shape[2], r.shape[3]
            mask = torch.ones((1, 1, th, tw))
            for i in range(f):
                v = (i + 1) / f
                mask[:, :, i, :] *= v
                mask[:, :, th - 1 - i, :] *= v
                mask[:, :, :, i] *= v
                mask[:, :, :, tw - 1 - i] *= v
            out[:, :, y * scale:y * scale + th, x * scale:x * scale + tw] += r * mask
            wsum[:, :, y * scale:y * scale + th, x * scale:x * scale + tw] += mask
    return out / wsum


def peak_rss_during(fn) -> tuple[int, int]:
    """(baseline RSS, peak RSS) while fn runs, sampled every 1 ms by vramguard's C sampler."""
    s = vg.Sampler(None, interval=0.001)
    base = vg.host(fresh=True).process_rss
    s.start()
    g = s.begin("stitch")
    fn()
    rec = s.end(g)
    s.stop()
    return base, rec["peak_rss"]


def cpu_shape(torch, comfy_utils, H, W, scale, tile, overlap, dtype, repeat, res):
    rng = np.random.default_rng(0)
    img = rng.random((1, H, W, 3), dtype=np.float32).astype(dtype)
    ready = rng.random((1, tile * scale, tile * scale, 3), dtype=np.float32).astype(dtype)
    out_bytes = H * scale * W * scale * 3 * np.dtype(dtype).itemsize
    tile_bytes = ready.nbytes

    def fn(t):  # stitching alone: a ready result of the right size
        return ready[:, :t.shape[1] * scale, :t.shape[2] * scale]

    t_ours = best_of(lambda: vg.tiled(fn, img, scale=scale, overlap=overlap, tile=tile, min_tile=2 * overlap), repeat)
    reuse = np.zeros((1, H * scale, W * scale, 3), dtype)   # a caller's reused output buffer
    t_ours_reuse = best_of(lambda: vg.tiled(fn, img, scale=scale, overlap=overlap, tile=tile,
                                            min_tile=2 * overlap, out=reuse), repeat)
    reuse = None  # give the 800 MB back before the next measurement
    src = np.empty(out_bytes, np.uint8)
    src.fill(1)
    dst = np.empty_like(src)
    dst.fill(0)
    t_memcpy = best_of(lambda: np.copyto(dst, src), repeat)              # pure bandwidth
    t_memcpy_fresh = best_of(lambda: np.copyto(np.empty_like(src), src), repeat)  # + a new output's page faults
    src = dst = None
    key = f"{W}x{H}x{scale}"
    res[f"ours_s_{key}"] = t_ours
    res[f"memcpy_s_{key}"] = t_memcpy
    res[f"memcpy_fresh_s_{key}"] = t_memcpy_fresh
    res[f"stitch_vs_memcpy_{key}"] = t_memcpy / t_ours
    res[f"stitch_vs_memcpy_fresh_{key}"] = t_memcpy_fresh / t_ours
    res[f"ours_reused_out_s_{key}"] = t_ours_reuse
    res[f"stitch_reused_out_vs_memcpy_{key}"] = t_memcpy / t_ours_reuse
    base, peak = peak_rss_during(lambda: vg.tiled(fn, img, scale=scale, overlap=overlap, tile=tile, min_tile=2 * overlap))
    res[f"extra_host_bytes_vs_output_{key}"] = (peak - base) / out_bytes
    res[f"allowed_extra_vs_output_{key}"] = (out_bytes + 2 * tile_bytes) / out_bytes
    if torch is not None:
        timg = torch.from_numpy(img.astype(np.float32)).permute(0, 3, 1, 2).contiguous()
        tready = torch.from_numpy(ready.astype(np.float32)).permute(0, 3, 1, 2).contiguous()

        def tfn(t):
            return tready[:, :, :t.shape[2] * scale, :t.shape[3] * scale]

        t_torch = best_of(lambda: torch_feather_average(torch, timg, tfn, scale, tile, overlap), repeat)
        res[f"torch_s_{key}"] = t_torch
        res[f"stitch_vs_torch_{key}"] = t_torch / t_ours
        if comfy_utils is not None:
            t_comfy = best_of(lambda: comfy_utils.tiled_scale(timg, tfn, tile_x=tile, tile_y=tile, overlap=overlap,
                                                              upscale_amount=scale, out_channels=3), repeat)
            res[f"comfy_s_{key}"] = t_comfy
            res[f"stitch_vs_comfy_{key}"] = t_comfy / t_ours


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
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for the baselines")
    ap.add_argument("--plan-only", action="store_true", help="only the planner's worst-case timings")
    a = ap.parse_args()
    if a.plan_only:
        res: dict = {}
        plan_bench(a.repeat, res)
        for key, v in res.items():
            print(f"{key:60s} {v}")
        print(json.dumps({"plan_worst_us": res["plan_worst_us"]}))
        return
    try:
        import torch
        torch.set_num_threads(a.threads)
    except ImportError:
        torch = None
    comfy_utils = None
    root = os.environ.get("VRAMGUARD_COMFYUI")
    if root and torch is not None:
        sys.path.insert(0, root)
        try:
            import comfy.utils as comfy_utils  # type: ignore
        except Exception as e:
            print(f"comfy.utils not importable from {root}: {e}")
    res = {}
    plan_bench(a.repeat, res)
    cpu_shape(torch, comfy_utils, 2048, 2048, 4, 512, 32, np.float32, a.repeat, res)
    cpu_shape(torch, comfy_utils, 1024, 1536, 2, 384, 16, np.float16, a.repeat, res)
    gpu_bench(torch, res)
    k = "2048x2048x4"
    summary = {"stitch_vs_torch": res.get(f"stitch_vs_torch_{k}"), "stitch_vs_comfy": res.get(f"stitch_vs_comfy_{k}"),
               "stitch_vs_memcpy": res[f"stitch_vs_memcpy_{k}"],
               "stitch_vs_memcpy_fresh": res[f"stitch_vs_memcpy_fresh_{k}"],
               "stitch_reused_out_vs_memcpy": res[f"stitch_reused_out_vs_memcpy_{k}"],
               "extra_host_bytes_vs_output": res[f"extra_host_bytes_vs_output_{k}"],
               "plan_worst_us": res["plan_worst_us"], **res}
    for key, v in res.items():
        print(f"{key:42s} {round(v, 4) if isinstance(v, float) else v}")
    print(json.dumps({key: (round(v, 4) if isinstance(v, float) else v) for key, v in summary.items()}))


if __name__ == "__main__":
    main()
