"""GPU upscale benchmark: x4 of 2048^2 with an ESRGAN-size network at a reserve, vramguard.tiled
vs ComfyUI's fixed 512 tiles with halving, while a second process holds device memory.

    python bench/gpu_upscale.py [--size 2048] [--runs 3] [--scenarios roomy,tight]
    python bench/gpu_upscale.py --smoke      # no GPU: tiny net on the CPU, OOMs injected

Both sides start from a CPU NHWC float32 image, as ComfyUI's IMAGE, and end with a clamped
NHWC float32 CPU tensor:
  * ours: what the "Upscale Image (tiled, auto)" node does (adapters/comfyui.upscale_tiled):
    vramguard.calibrate once per model (timed apart), then vramguard.tiled with the reserve,
    min_tile 64, max_batch 1; tiles moved to the device inside fn; clamp;
  * comfy: ImageUpscaleWithModel as ComfyUI 0.33 writes it: the image moved to the device,
    tile = 512, overlap = 32, comfy.utils.tiled_scale (output + 1-channel weight buffer on the
    CPU, a feather mask per tile, one division); on OOM tile //= 2 and the whole image restarts;
    below 128 it gives up.  tiled_scale is written out below (2-D case of ComfyUI's
    tiled_scale_multidim, same positions, masks and passes); VRAMGUARD_COMFYUI=<checkout> uses
    the checkout's own comfy.utils.tiled_scale instead.
Scenarios (a helper process holds memory so that the device has a set amount free):
  roomy  16 GiB free (or all but 1 GiB), reserve 2 GiB: 512 tiles fit; ours may plan larger ones;
  tight  free = 0.8 x the measured peak of one 512 tile, reserve = 1/4 of that: 512 does not fit.
A separate process samples NVML device use every 2 ms (>= 100 Hz required; achieved rate and the
largest gap are reported) in a window around each run; limit = total - reserve.
Targets (issue 14): ours >= 1.25x faster than comfy, 0 OOM, peak device use <= total - reserve.
Wall times on the GPU are not load-dependent the way the shared CPU box is, but the CPU stitching
part of both sides is.  Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_common import GiB, MiB, Helper, emit, param_count, ranges, rrdbnet, torch_uuid  # noqa: E402


# ---------------------------------------------------------------- ComfyUI's approach

def comfy_tiled_scale(torch, samples, function, tile_x=64, tile_y=64, overlap=8, upscale_amount=4,
                      out_channels=3, output_device="cpu"):
    """comfy.utils.tiled_scale (ComfyUI 0.33), 2-D: NCHW in, NCHW out on output_device."""
    tile = (tile_y, tile_x)
    ov = (overlap, overlap)
    up = upscale_amount
    H, W = samples.shape[2], samples.shape[3]
    output = torch.empty([samples.shape[0], out_channels, round(H * up), round(W * up)], device=output_device)
    with torch.inference_mode():
        for b in range(samples.shape[0]):
            s = samples[b:b + 1]
            if H <= tile[0] and W <= tile[1]:
                output[b:b + 1] = function(s).to(output_device)
                continue
            out = output[b:b + 1].zero_()
            out_div = torch.zeros([s.shape[0], 1, round(H * up), round(W * up)], device=output_device)
            positions = [range(0, s.shape[d + 2] - ov[d], tile[d] - ov[d]) if s.shape[d + 2] > tile[d] else [0]
                         for d in range(2)]
            for it in itertools.product(*positions):
                s_in = s
                upscaled = []
                for d in range(2):
                    pos = max(0, min(s.shape[d + 2] - ov[d], it[d]))
                    ln = min(tile[d], s.shape[d + 2] - pos)
                    s_in = s_in.narrow(d + 2, pos, ln)
                    upscaled.append(round(up * pos))
                ps = function(s_in).to(output_device)
                mask = torch.ones([1, 1] + list(ps.shape[2:]), device=output_device)
                for d in range(2, 4):
                    feather = round(up * ov[d - 2])
                    if feather >= mask.shape[d]:
                        continue
                    for t in range(feather):
                        a = (t + 1) / feather
                        mask.narrow(d, t, 1).mul_(a)
                        mask.narrow(d, mask.shape[d] - 1 - t, 1).mul_(a)
                o, o_d, ps_v, mask_v = out, out_div, ps, mask
                for d in range(2):
                    ln = min(ps_v.shape[d + 2], o.shape[d + 2] - upscaled[d])
                    o = o.narrow(d + 2, upscaled[d], ln)
                    o_d = o_d.narrow(d + 2, upscaled[d], ln)
                    if ln < ps_v.shape[d + 2]:
                        ps_v = ps_v.narrow(d + 2, 0, ln)
                        mask_v = mask_v.narrow(d + 2, 0, ln)
                o.add_(ps_v * mask_v)
                o_d.add_(mask_v)
            out.div_(out_div)
    return output


def comfy_upscale(torch, model, image, dev, is_oom, tiled_scale, tile=512, overlap=32, min_tile=128):
    """ImageUpscaleWithModel.execute's loop: fixed tile, halve and restart on OOM."""
    in_img = image.movedim(-1, -3).to(dev)
    tried, ooms = [], 0
    while True:
        tried.append(tile)
        failed = None
        try:
            s = tiled_scale(torch, in_img, lambda a: model(a.float()), tile_x=tile, tile_y=tile, overlap=overlap,
                            upscale_amount=4, output_device="cpu")
        except Exception as e:
            if not is_oom(e):
                raise
            failed = f"{type(e).__name__}: {str(e)[:120]}"
        if failed is None:
            break
        ooms += 1  # outside the except block: its frame (and the tensors it holds) is gone
        tile //= 2
        if tile < min_tile:
            raise RuntimeError(f"comfy approach gave up below {min_tile} px: {failed}")
    return torch.clamp(s.movedim(-3, -1), min=0, max=1.0), {"ooms": ooms, "tiles_tried": tried}


def real_comfy_tiled_scale(root: str):
    """comfy.utils.tiled_scale from a ComfyUI checkout, adapted to comfy_tiled_scale's signature."""
    sys.path.insert(0, root)
    import comfy.utils as cu  # type: ignore

    def ts(torch, samples, function, **kw):
        return cu.tiled_scale(samples, function, **kw)

    return ts


# ---------------------------------------------------------------- ours

def ours_upscale(torch, vg, model, image, dev, reserve, cost, min_tile=64, overlap=32):
    st: dict = {}

    def fn(t):
        with torch.no_grad():
            y = model(t.movedim(-1, -3).to(dev).float())
        return y.movedim(-3, -1)

    kw = {} if reserve is None else {"reserve": int(reserve)}
    out = vg.tiled(fn, image, scale=4, overlap=overlap, cost=cost, min_tile=min_tile, max_batch=1, stats=st, **kw)
    out = torch.clamp(out, 0.0, 1.0)
    return out, {"ooms": st.get("retries", 0), "tiles": st.get("tiles"), "tile_sizes": st.get("tile_sizes")}


# ---------------------------------------------------------------- the runs

class FakeOom:
    """Smoke mode: a model that raises torch's OOM error for tiles above `max_px` input pixels,
    so both sides' back-off paths run without a GPU."""

    def __init__(self, torch, net, max_px):
        self.torch, self.net, self.max_px = torch, net, max_px

    def __call__(self, x):
        if x.shape[-1] * x.shape[-2] > self.max_px:
            raise self.torch.cuda.OutOfMemoryError(f"fake OOM: tile {x.shape[-1]}x{x.shape[-2]} > {self.max_px} px")
        return self.net(x)


def one_run(torch, name, call, sampler, dev_is_cuda):
    if dev_is_cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if sampler is not None:
        sampler.ask(f"start {name}")
    t0 = time.perf_counter()
    err = None
    out, st = None, {}
    try:
        out, st = call()
    except Exception as e:
        err = f"{type(e).__name__}: {str(e)[:300]}"
    if dev_is_cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    rec = {"seconds": secs, "error": err, **st}
    if sampler is not None:
        w = sampler.ask("stop")
        rec.update(peak_used=w["max_used"], min_free=w["min_free"], total=w["total"], hz=w["hz"],
                   max_gap_ms=w["max_gap_ms"], samples=w["samples"])
    if dev_is_cuda:
        rec["torch_max_reserved"] = torch.cuda.max_memory_reserved()
    return out, rec


def summarise(runs: list[dict], limit: int | None, reserve: int | None = None) -> dict:
    ok = [r for r in runs if r["error"] is None]
    d = {"seconds": ranges([r["seconds"] for r in ok]), "failed_runs": len(runs) - len(ok),
         "errors": sorted({r["error"] for r in runs if r["error"]}),
         "ooms": [r.get("ooms") for r in runs]}
    if runs and "peak_used" in runs[0]:
        d["peak_used_mib"] = round(max(r["peak_used"] for r in runs) / MiB, 1)
        d["min_hz"] = round(min(r["hz"] for r in runs), 1)
        d["max_gap_ms"] = round(max(r["max_gap_ms"] for r in runs), 2)
        if limit is not None:
            d["peak_over_limit_mib"] = round((max(r["peak_used"] for r in runs) - limit) / MiB, 1)
        if reserve is not None:  # the same invariant read as free memory: never below the reserve
            d["min_free_minus_reserve_mib"] = round((min(r["min_free"] for r in runs) - reserve) / MiB, 1)
    for k in ("tile_sizes", "tiles_tried", "tiles"):
        if runs and k in runs[-1]:
            d[k] = runs[-1][k]
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3, help="runs per side and scenario (>= 3 for ranges)")
    ap.add_argument("--scenarios", default="roomy,tight")
    ap.add_argument("--blocks", type=int, default=23)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16"),
                    help="model weights (ComfyUI feeds a.float(); float16 weights need half input)")
    ap.add_argument("--interval", type=float, default=0.002, help="NVML sampling interval, s")
    ap.add_argument("--deadline", type=float, default=240.0, help="stop starting runs after this many s")
    ap.add_argument("--smoke", action="store_true", help="no GPU: tiny net on the CPU, OOMs injected")
    a = ap.parse_args()
    t_start = time.perf_counter()
    res: dict = {"bench": "gpu_upscale", "smoke": a.smoke}
    import torch

    import vramguard as vg
    from vramguard.adapters import torch_adapter

    tiled_scale = comfy_tiled_scale
    root = os.environ.get("VRAMGUARD_COMFYUI")
    res["comfy_impl"] = "bench copy of tiled_scale (ComfyUI 0.33)"
    if root:
        try:
            tiled_scale = real_comfy_tiled_scale(root)
            res["comfy_impl"] = f"comfy.utils.tiled_scale from {root}"
        except Exception as e:
            res["comfy_impl_error"] = f"{type(e).__name__}: {e}"

    if a.smoke:
        dev, size, tile, overlap, comfy_min, ours_min = "cpu", 48, 32, 4, 8, 8
        torch.set_num_threads(1)
        net = rrdbnet(torch, nf=8, nb=1, gc=4)
        model = FakeOom(torch, net, max_px=24 * 24)
        scen = {"smoke": (None, None)}
    else:
        if not torch.cuda.is_available():
            res["skipped"] = "torch.cuda.is_available() is False"
            emit(res)
            sys.exit(3)
        dev, size, tile, overlap, comfy_min, ours_min = "cuda", a.size, 512, 32, 128, 64
        net = rrdbnet(torch, nf=a.features, nb=a.blocks)
        model = net.to(dev, dtype=getattr(torch, a.dtype))
        if a.dtype == "float16":
            inner = model
            model = lambda x: inner(x.half()).float()  # noqa: E731
        scen = {}
    res.update(size=size, params=param_count(net), device=dev, dtype=a.dtype, tile=tile, overlap=overlap)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, size, size, 3, generator=g)

    def fn(t):
        with torch.no_grad():
            return model(t.movedim(-1, -3).to(dev).float()).movedim(-3, -1)

    sampler = holder = None
    cuda = dev == "cuda"
    with torch.no_grad():  # warm-up: cuDNN / oneDNN handles, kernels
        net(image[:, :16, :16].movedim(-1, -3).to(dev).to(next(net.parameters()).dtype))
    try:
        if cuda:
            res["gpu"] = torch.cuda.get_device_name(0)
            with torch.no_grad():
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                y = model(image[:, :tile, :tile].movedim(-1, -3).to(dev))
                torch.cuda.synchronize()
                res["tile512_seconds"] = time.perf_counter() - t0
                need512 = torch.cuda.max_memory_allocated() - base
                del y
            res["tile512_peak_mib"] = round(need512 / MiB, 1)
            torch.cuda.empty_cache()
            try:
                sampler = Helper("sampler", torch_uuid(torch, 0) or "-", str(a.interval))
            except Exception as e:
                res["sampler_error"] = str(e)
            holder = Helper("holder", "0")
            first = sampler.ask("read") if sampler else None
            if first and first.get("uuid_fallback"):
                res["sampler_note"] = first["uuid_fallback"]
            free_now = first["free"] if first else torch.cuda.mem_get_info()[0]
            roomy_free = min(16 * GiB, free_now - GiB)
            tight_free = min(int(0.8 * need512), free_now - GiB)
            want = {"roomy": (roomy_free, 2 * GiB), "tight": (tight_free, tight_free // 4)}
            for name in a.scenarios.split(","):
                if name not in want:
                    raise SystemExit(f"unknown scenario {name!r}; known: {', '.join(want)}")
                scen[name] = want[name]
        t0 = time.perf_counter()
        cost = vg.calibrate(fn, image[:1].to(dev), key="gpu_upscale-esrgan")
        res["calibrate_seconds"] = time.perf_counter() - t0
        res["cost_model"] = {"fixed_mib": round(cost.fixed / MiB, 1), "per_px": round(cost.per_px, 1),
                             "source": cost.source}

        def is_oom(e):
            return torch_adapter.is_oom(e)

        out_last: dict = {}
        for sname, (free_target, reserve) in scen.items():
            sres: dict = {}
            limit = None
            if holder is not None:
                torch.cuda.empty_cache()
                holder.ask("hold 0")
                cur = sampler.ask("read") if sampler else {"free": torch.cuda.mem_get_info()[0]}
                holder.ask(f"hold {max(0, cur['free'] - free_target)}")
                after = sampler.ask("read") if sampler else {"free": torch.cuda.mem_get_info()[0],
                                                             "total": torch.cuda.mem_get_info()[1]}
                limit = after["total"] - reserve
                sres.update(free_mib=round(after["free"] / MiB, 1), reserve_mib=round(reserve / MiB, 1),
                            limit_mib=round(limit / MiB, 1), total_mib=round(after["total"] / MiB, 1),
                            held_by_other_mib=round(max(0, cur["free"] - free_target) / MiB, 1),
                            budget_mib=round(vg.snapshot(0, reserve=reserve).budget / MiB, 1))
            runs: dict[str, list] = {"ours": [], "comfy": []}
            outs = {}
            for r in range(max(1, a.runs)):
                if time.perf_counter() - t_start > a.deadline:
                    sres["truncated"] = f"deadline {a.deadline:.0f} s reached after {r} run(s)"
                    break
                order = ("ours", "comfy") if r % 2 == 0 else ("comfy", "ours")
                for side in order:
                    if side == "ours":
                        call = lambda: ours_upscale(torch, vg, model, image, dev, reserve, cost,  # noqa: E731
                                                    min_tile=ours_min, overlap=overlap)
                    else:
                        call = lambda: comfy_upscale(torch, model, image, dev, is_oom, tiled_scale,  # noqa: E731
                                                     tile=tile, overlap=overlap, min_tile=comfy_min)
                    out, rec = one_run(torch, f"{sname}-{side}-{r}", call, sampler, cuda)
                    runs[side].append(rec)
                    outs[side] = out
                    print(f"{sname:6s} {side:6s} run {r}: {rec['seconds']:.3f} s  ooms {rec.get('ooms')}  "
                          f"peak {rec.get('peak_used', 0) / MiB:.0f} MiB  err {rec['error']}", flush=True)
            for side in runs:
                sres[side] = summarise(runs[side], limit, reserve if limit is not None else None)
            o, c = sres["ours"]["seconds"]["median"], sres["comfy"]["seconds"]["median"]
            sres["speedup_median"] = round(c / o, 3) if o and c else None
            if sres["ours"]["seconds"]["n"] and sres["comfy"]["seconds"]["n"]:
                # the least favourable pairing too: comfy's fastest run over ours' slowest
                sres["speedup_worst"] = round(sres["comfy"]["seconds"]["min"] / sres["ours"]["seconds"]["max"], 3)
            if outs.get("ours") is not None and outs.get("comfy") is not None:
                d = (outs["ours"].float() - outs["comfy"].float()).abs()
                sres["mean_abs_diff_ours_vs_comfy"] = float(d.mean())
                sres["shape_ok"] = list(outs["ours"].shape) == [1, size * 4, size * 4, 3] == list(outs["comfy"].shape)
            sres["checks"] = {
                "ours_no_oom": all(x == 0 for x in sres["ours"]["ooms"]) and sres["ours"]["failed_runs"] == 0,
                "speedup_ge_1_25": bool(sres["speedup_median"] and sres["speedup_median"] >= 1.25),
            }
            if limit is not None:
                sres["checks"]["ours_peak_le_limit"] = sres["ours"].get("peak_over_limit_mib", 1) <= 0
                sres["checks"]["ours_free_never_below_reserve"] = sres["ours"].get("min_free_minus_reserve_mib", -1) >= 0
                sres["checks"]["sampled_ge_100hz"] = min(sres["ours"].get("min_hz", 0), sres["comfy"].get("min_hz", 0)) >= 100
            res[sname] = sres
            out_last = outs
        del out_last
    finally:
        for h in (holder, sampler):
            if h is not None:
                h.close()
    res["seconds_total"] = time.perf_counter() - t_start
    emit(res)


if __name__ == "__main__":
    main()
