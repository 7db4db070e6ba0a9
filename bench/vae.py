"""Tiled VAE benchmark: vramguard.vae vs ComfyUI's tiled decode vs untiled, side by side in one process.

    python bench/vae.py [--threads 2] [--repeat 3] [--latent 16x24] [--png docs/images/vae_tiled.png]
    # with ComfyUI's classes and its tiled algorithms (the checkout + its venv, our build first on the path):
    PYTHONPATH=/tmp/vg:tests VRAMGUARD_COMFYUI=~/.cache/vramguard-comfyui/ComfyUI \
        ~/.cache/vramguard-comfyui/venv/bin/python bench/vae.py     # /tmp/vg/vramguard -> our build

Models (tests/vae_models.py, sanely initialised random weights): our SD-shaped Decoder/Encoder
(ch 32, mult 1,2,2,4, 8 groups) and, when a checkout imports, ComfyUI's real Decoder class
(32 groups, its own attention). Latent: a synthetic "test card" (gradients + blobs + noise).
Per tile grid (2, 4, 6, 9, 16 tiles and a non-square 3x5):
  * ours: vae.decode_tiled(grid=...), layer-synchronous, whole-map GroupNorm statistics
  * comfy: ComfyUI's VAE.decode_tiled_ algorithm (comfy.utils.tiled_scale three times, tile
    shapes (tx/2, 2ty), (2tx, ty/2), (tx, ty), averaged) with the decoder as decode_fn, at the
    same tile size (latent tile = the grid's tile) and overlap min(8, tile/4) latent px
    (VAEDecodeTiled's default 64 px at 8x)
Video: Wan 2.1-shaped (layer-synchronous in Wan's chunks), HunyuanVideo-shaped (ComfyUI's Decoder
with conv3d=True: layer-synchronous in its own 2-frame chunks), Mochi-shaped (layer-synchronous,
per-frame GroupNorm) and LTX-Video-shaped (every op local: halo tiles), ours and ComfyUI's real
classes where they import (--video-models picks), against ComfyUI's
decode_tiled_3d algorithm (comfy.utils.tiled_scale_multidim, overlap 1 frame / min(8, tile/4) px).
Columns: PSNR (dB, [-1, 1] signal) and max |error| against untiled; seam: gradient energy on the
grid's tile borders / elsewhere, divided by the same ratio of the untiled image (1.00 = no seam;
video: also across time-chunk starts); wall time min/median/max of --repeat runs (the box is shared
with other engineers: noisy) and process CPU time; xFLOP: FLOPs (torch.utils.flop_counter,
load-independent, repeatable) over one untiled pass -- the figure the compute claims rest on.
Peak: live bytes of the tensors torch ops create (a TorchDispatchMode count, tests/vae_models.py
LiveBytes -- not RSS, not an allocator's reserve), for the whole call and, for ours, the most one
tile's work held (what the device holds when the store is the host), against the planner's plan.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import vae_models as vm  # noqa: E402
from vramguard import vae  # noqa: E402

GRIDS = [(1, 2), (2, 2), (2, 3), (3, 3), (4, 4), (3, 5)]


def timed(fn, repeat):
    """(result, min, max) of the process CPU time of `repeat` runs, and the wall times (min, median,
    max) in WALL[-1]: on a shared machine wall time also measures the neighbours."""
    ts, ws = [], []
    out = None
    for _ in range(repeat):
        t, w = time.process_time(), time.perf_counter()
        with torch.no_grad():
            out = fn()
        ts.append(time.process_time() - t)
        ws.append(time.perf_counter() - w)
    ws.sort()
    WALL.append((ws[0], ws[len(ws) // 2], ws[-1]))
    return out, min(ts), max(ts)


WALL: list = []


def wall():
    a, m, b = WALL[-1]
    return f"{a:5.2f}/{m:5.2f}/{b:5.2f}"


def flops(fn):
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return fc.get_total_flops()


def peak(fn):
    with vm.LiveBytes() as lb, torch.no_grad():
        fn()
    return lb.peak, lb.largest


def ours_tile_peak(fn):
    peaks = []
    Scope = vm.tile_peak_scope(peaks)

    old = vae._tile_scope
    vae._tile_scope = Scope
    try:
        fn()
    finally:
        vae._tile_scope = old
    return max(peaks)


def comfy_tiled(dec, z, tx, ty, overlap):
    import comfy.utils
    fn = lambda a: dec(a)  # noqa: E731
    kw = dict(upscale_amount=8, out_channels=3, output_device="cpu")
    return (comfy.utils.tiled_scale(z, fn, tx // 2, ty * 2, overlap, **kw)
            + comfy.utils.tiled_scale(z, fn, tx * 2, ty // 2, overlap, **kw)
            + comfy.utils.tiled_scale(z, fn, tx, ty, overlap, **kw)) / 3.0


def comfy_tile(lh, lw, rows, cols):
    """ComfyUI's tile at the grid's tile size (latent px) and its overlap: min(8, tile / 4) latent px
    (VAEDecodeTiled's default 64 px at 8x)."""
    ty, tx = math.ceil(lh / rows), math.ceil(lw / cols)
    return tx, ty, max(1, min(8, min(tx, ty) // 4))


def borders(rows, cols, h, w):
    return [h * i // rows * 8 for i in range(1, rows)], [w * j // cols * 8 for j in range(1, cols)]


def mb(n):
    return f"{n / 2**20:7.1f}"


def row(model, grid, tiles, path, out, ref, ys, xs, seam_ref, a, b, w_ref, xflop, t_ref):
    return dict(model=model, grid=grid, tiles=tiles, path=path, psnr=vm.psnr(out, ref),
                maxerr=(out - ref).abs().max().item(), seam=vm.seam_ratio(out.flatten(1, -3), ys, xs) / seam_ref,
                t_min=a, t_max=b, wall=WALL[-1], xflop=xflop, xtime=a / t_ref, xwall=WALL[-1][1] / w_ref[1])


def bench_model(label, dec, z, args, has_comfy, rows_out):
    lh, lw = z.shape[2], z.shape[3]
    ref, t0, t1 = timed(lambda: dec(z), args.repeat)
    w0 = WALL[-1]
    f_ref = flops(lambda: dec(z))
    p_ref, big_ref = peak(lambda: dec(z))
    print(f"\n{label}: latent {lh}x{lw} -> {ref.shape[2]}x{ref.shape[3]}, untiled cpu {t0:.2f}-{t1:.2f} s, wall "
          f"{wall()} s, {f_ref / 1e9:.2f} GFLOP, peak {mb(p_ref)} MiB, largest tensor {mb(big_ref)} MiB")
    print(f"{'grid':>5} {'path':>6} {'PSNR dB':>8} {'max err':>9} {'seam':>6} {'cpu s':>11} {'wall min/med/max':>17} "
          f"{'xFLOP':>6} {'xcpu':>5} {'xwall':>5} {'peak MiB':>8} {'tile MiB':>8} {'largest':>8}")
    for rows, cols in GRIDS:
        ys, xs = borders(rows, cols, lh, lw)
        seam_ref = vm.seam_ratio(ref, ys, xs)
        run = lambda: vae.decode_tiled(dec, z, budget_bytes=1 << 40, grid=(rows, cols))  # noqa: E731
        out, a, b = timed(run, args.repeat)
        r = row(label, f"{rows}x{cols}", rows * cols, "ours", out, ref, ys, xs, seam_ref, a, b, w0, flops(run) / f_ref, t0)
        r["peak"], r["largest"] = peak(run)
        r["tile_peak"] = ours_tile_peak(run)
        rows_out.append(r)
        line(r)
        if has_comfy:
            tx, ty, ov = comfy_tile(lh, lw, rows, cols)
            runc = lambda: comfy_tiled(dec, z, tx, ty, ov)  # noqa: E731
            out, a, b = timed(runc, args.repeat)
            r = row(label, f"{rows}x{cols}", rows * cols, "comfy", out, ref, ys, xs, seam_ref, a, b, w0,
                    flops(runc) / f_ref, t0)
            r["tile_peak"] = None
            r["peak"], r["largest"] = peak(runc)
            rows_out.append(r)
            line(r)
    return ref


def line(r):
    tp = mb(r["tile_peak"]) if r.get("tile_peak") else "       -"
    pk = mb(r["peak"]) if r.get("peak") is not None else "       -"
    lg = mb(r["largest"]) if r.get("largest") is not None else "       -"
    w = r["wall"]
    print(f"{r['grid']:>5} {r['path']:>6} {r['psnr']:8.1f} {r['maxerr']:9.2e} {r['seam']:6.3f} "
          f"{r['t_min']:5.2f}-{r['t_max']:5.2f} {w[0]:5.2f}/{w[1]:5.2f}/{w[2]:5.2f} {r['xflop']:6.3f} {r['xtime']:5.2f} "
          f"{r['xwall']:5.2f} {pk} {tp} {lg}")


def bench_peak(dec, z):
    """The planner's planned working set vs the measured per-tile peak (LiveBytes) at budgets that
    force 1..many tiles: the plan must bound the measurement."""
    p = vae.compile_decoder(dec)
    lh, lw = z.shape[2], z.shape[3]
    full = vae.plan_grid(p, lh, lw, budget_bytes=1 << 40).tile_bytes
    print(f"\nplanned vs measured device peak (SD-shaped decode, latent {lh}x{lw}; measured = most live tensor "
          "bytes one tile's work held, TorchDispatchMode count)")
    print(f"{'budget MiB':>10} {'tiles':>5} {'planned MiB':>11} {'measured MiB':>12} {'measured/planned':>16} {'PSNR':>6}")
    out_rows = []
    with torch.no_grad():
        ref = dec(z)
    for div in (1, 3, 10, 30):
        budget = full // div
        g = vae.plan_grid(p, lh, lw, budget_bytes=budget)
        run = lambda: vae.decode_tiled(dec, z, budget_bytes=budget)  # noqa: E731
        measured = ours_tile_peak(run)
        out = run()
        r = dict(budget=budget, tiles=g.tiles, planned=g.tile_bytes, measured=measured, psnr=vm.psnr(out, ref))
        out_rows.append(r)
        print(f"{mb(budget):>10} {g.tiles:5d} {mb(g.tile_bytes):>11} {mb(measured):>12} {measured / g.tile_bytes:16.3f} "
              f"{r['psnr']:6.1f}")
    return out_rows


def bench_transfer(dec, z, grids, elem=2):
    """With the step store on the host (store_device="cpu": the default when the maps do not fit
    the budget), every step copies its tiles' inputs (with halos) host -> device and its output
    back: bytes per layer, computed from the program and the tiles (no GPU here to time it).
    elem=2: fp16/bf16, as ComfyUI runs VAEs on a GPU."""
    p = vae.compile_decoder(dec)
    lh, lw = z.shape[2], z.shape[3]
    b = z.shape[0]
    print(f"\nhost-store traffic (SD-shaped decode, latent {lh}x{lw} -> {lh * 8}x{lw * 8}, {elem} B/element)")
    totals = {}
    for rows, cols in grids:
        rects = vae.grid_rects(lh, lw, rows, cols)
        per_step = []
        for s in p.steps:
            Hi, Wi = lh * s.res_in, lw * s.res_in
            h2d = d2h = 0
            for y0, y1, x0, x1 in rects:
                iy0, iy1 = vae._span(y0 * s.res_in, y1 * s.res_in, s.halo, Hi)
                ix0, ix1 = vae._span(x0 * s.res_in, x1 * s.res_in, s.halo, Wi)
                h2d += (iy1 - iy0) * (ix1 - ix0) * s.in_channels
                d2h += (y1 - y0) * (x1 - x0) * s.res_out ** 2 * s.out_channels
            if s.kind == "attn":          # K/V of the whole map are built from it once more
                h2d += Hi * Wi * s.in_channels
            per_step.append((s.name, h2d * b * elem, d2h * b * elem))
        tot = sum(h + d for _, h, d in per_step)
        totals[f"{rows}x{cols}"] = tot
        if (rows, cols) == grids[-1]:
            for name, h, d in per_step:
                print(f"  {name:>18}: H2D {mb(h)} MiB  D2H {mb(d)} MiB")
        print(f"  {rows}x{cols}: {len(p.steps)} steps, {mb(tot)} MiB moved in all = {tot / 25e9 * 1e3:.2f} ms at "
              f"25 GB/s (PCIe 4 x16, one direction at a time), {tot / (b * 3 * lh * lw * 64 * elem):.0f}x the output image")
    return totals


def bench_encode(enc, img, args):
    ref, t0, _ = timed(lambda: enc(img), args.repeat)
    f_ref = flops(lambda: enc(img))
    span = (ref.max() - ref.min()).item()
    worst = math.inf
    print(f"\nencode: image {img.shape[2]}x{img.shape[3]}, untiled {t0:.2f} s")
    for rows, cols in GRIDS:
        run = lambda: vae.encode_tiled(enc, img, budget_bytes=1 << 40, grid=(rows, cols))  # noqa: E731
        out, a, b = timed(run, args.repeat)
        p = vm.psnr(out, ref, peak_to_peak=span)
        worst = min(worst, p)
        print(f"{rows}x{cols} ours PSNR {p:6.1f} dB  max err {(out - ref).abs().max().item():.2e}  "
              f"time {a:.2f}-{b:.2f} s  xFLOP {flops(run) / f_ref:.3f}")
    return worst


def write_png(path, dec, has_comfy, lh, lw):
    from PIL import Image, ImageDraw
    rows, cols = 3, 3
    tx, ty, ov = comfy_tile(lh, lw, rows, cols)
    tiles = []
    for lat in (vm.gradient_latent(lh, lw), vm.test_card_latent(lh, lw, seed=21)):
        with torch.no_grad():
            ref = dec(lat)
        ours = vae.decode_tiled(dec, lat, budget_bytes=1 << 40, grid=(rows, cols))
        comfy = comfy_tiled(dec, lat, tx, ty, ov) if has_comfy else torch.zeros_like(ref)
        row = [ref, ours, comfy, (ours - ref).abs() * 1e4 - 1, (comfy - ref).abs() * 10 - 1]
        tiles.append(row)
    h, w = tiles[0][0].shape[2], tiles[0][0].shape[3]
    pad, head = 6, 18
    canvas = Image.new("RGB", (5 * (w + pad) + pad, 2 * (h + pad) + pad + head), (40, 40, 40))
    d = ImageDraw.Draw(canvas)
    names = ["untiled", "ours 3x3", "ComfyUI tiled 3x3" if has_comfy else "(no ComfyUI)",
             "|ours-untiled| x1e4", "|comfy-untiled| x10"]
    for j, n in enumerate(names):
        d.text((pad + j * (w + pad), 3), n, fill=(230, 230, 230))
    for i, row in enumerate(tiles):
        for j, t in enumerate(row):
            a = ((t[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(a), (pad + j * (w + pad), head + pad + i * (h + pad)))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.save(path)
    print(f"\nwrote {path} ({canvas.size[0]}x{canvas.size[1]})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--latent", default="16x24")
    ap.add_argument("--png", default=None)
    ap.add_argument("--video-latent", default="5x8x12", help="T x H x W latent frames/px")
    ap.add_argument("--no-video", action="store_true")
    ap.add_argument("--no-image", action="store_true", help="video rows only (the JSON then has no image keys)")
    ap.add_argument("--video-grids", default="1x2,2x3,3x4")
    ap.add_argument("--video-models", default="wan,hunyuan,ltx,mochi")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lh, lw = (int(v) for v in args.latent.split("x"))
    why = vm.comfy_available()
    has_comfy = why is None
    if not has_comfy:
        print(f"ComfyUI: skipped ({why})")
    z = vm.test_card_latent(lh, lw, seed=3)
    rows = []
    dec = vm.sd_decoder(seed=1)
    enc_psnr, peaks, traffic = None, [], {}
    if not args.no_image:
        ref = bench_model("ours-SD-shaped", dec, z, args, has_comfy, rows)
        if has_comfy:
            bench_model("ComfyUI Decoder", vm.comfy_decoder(seed=11), z, args, True, rows)
        enc_psnr = bench_encode(vm.sd_encoder(seed=2), ref.clamp(-1, 1), args)
        peaks = bench_peak(dec, z)
        traffic = bench_transfer(dec, z, [(1, 2), (3, 3), (4, 4)])
    vrows = []
    if not args.no_video:
        bench_video(args, has_comfy, vrows)
    if args.png:
        write_png(args.png, vm.comfy_decoder(seed=11) if has_comfy else dec, has_comfy, lh, lw)
    ours = [r for r in rows if r["path"] == "ours"]
    comfy = [r for r in rows if r["path"] == "comfy"]
    vours = [r for r in vrows if r["path"] == "ours"]
    vcomfy = [r for r in vrows if r["path"] == "comfy"]
    sync = ours + [r for r in vours if "LTX" not in r["model"]]
    halo = [r for r in vours if "LTX" in r["model"]]
    def worst(f, rs, key):
        return f(r[key] for r in rs) if rs else None

    summary = {
        "psnr_min_db": worst(min, ours, "psnr"),
        "psnr_min_db_comfy_tiled": worst(min, comfy, "psnr"),
        "video_psnr_min_db": min(r["psnr"] for r in vours) if vours else None,
        "video_psnr_min_db_comfy_tiled": min(r["psnr"] for r in vcomfy) if vcomfy else None,
        "compute_vs_untiled_max": worst(max, ours + vours, "xflop"),
        "compute_vs_untiled_max_layer_sync": worst(max, sync, "xflop"),
        "compute_vs_untiled_max_halo": worst(max, halo, "xflop"),
        "compute_vs_untiled_max_comfy": worst(max, comfy + vcomfy, "xflop"),
        "cpu_time_vs_untiled_max": worst(max, ours + vours, "xtime"),
        "wall_median_vs_untiled_max": worst(max, ours + vours, "xwall"),
        "seam_max": worst(max, ours + vours, "seam"),
        "seam_max_comfy": worst(max, comfy + vcomfy, "seam"),
        "seam_t_max": worst(max, [r for r in vours if r["seam_t"] == r["seam_t"]], "seam_t"),
        "seam_t_max_comfy": worst(max, [r for r in vcomfy if r["seam_t"] == r["seam_t"]], "seam_t"),
        "encode_psnr_min_db": enc_psnr,
        "peak_measured_over_planned_max": max(r["measured"] / r["planned"] for r in peaks) if peaks else None,
        "host_store_mib_16_tiles": round(traffic["4x4"] / 2**20, 1) if traffic else None,
        "tiles": sorted({r["tiles"] for r in ours}),
        "comfyui": has_comfy,
    }
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}))


def time_seam(v, bounds):
    """Frame-difference energy across the given frame boundaries over the mean elsewhere."""
    if not bounds:
        return float("nan")
    d = (v[:, :, 1:] - v[:, :, :-1]).double() ** 2
    m = torch.zeros(d.shape[2], dtype=torch.bool)
    for f in bounds:
        if 0 < f < v.shape[2]:
            m[f - 1] = True
    return float(d[:, :, m].mean() / d[:, :, ~m].mean())


def comfy_tiled_3d(fn, z, tx, ty, ov, t_scale, s):
    """ComfyUI's VAE.decode_tiled_3d algorithm (comfy.utils.tiled_scale_multidim, tile_t 999 as its
    default, overlap 1 frame / ov px) with the decode callable."""
    import comfy.utils
    return comfy.utils.tiled_scale_multidim(
        z, fn, tile=(999, ty, tx), overlap=(1, ov, ov),
        upscale_amount=(lambda a: max(0, a * t_scale - (t_scale - 1)), s, s), out_channels=3,
        index_formulas=(t_scale, s, s), output_device="cpu")


def bench_video_model(label, path, untiled, ours, z, bounds, args, has_comfy, rows_out, grids):
    """ours(grid) -> video; untiled() -> the model's own decode (the reference)."""
    lt, lh, lw = z.shape[2:]
    ref, t0, _ = timed(untiled, args.repeat)
    w0 = WALL[-1]
    f_ref = flops(untiled)
    t_scale = (ref.shape[2] - 1) // max(1, lt - 1) if lt > 1 else 1
    s = ref.shape[-1] // lw
    tref = time_seam(ref, bounds)
    print(f"\nvideo {label}: latent {lt}x{lh}x{lw} -> {tuple(ref.shape[2:])}, untiled cpu {t0:.2f} s wall {wall()} s, "
          f"{f_ref / 1e9:.2f} GFLOP; ours: {path}; time-chunk starts at output frames {bounds}")
    print(f"{'grid':>5} {'path':>6} {'PSNR dB':>8} {'max err':>9} {'seam xy':>7} {'seam t':>7} {'cpu s':>11} "
          f"{'wall min/med/max':>17} {'xFLOP':>6} {'xcpu':>5} {'xwall':>5}")
    for rows, cols in grids:
        ys, xs = borders(rows, cols, lh, lw)
        ys, xs = [y // 8 * s for y in ys], [x // 8 * s for x in xs]
        sref = vm.seam_ratio(ref.flatten(1, 2), ys, xs)
        cands = [("ours", lambda: ours((rows, cols)))]
        if has_comfy:
            tx, ty, ov = comfy_tile(lh, lw, rows, cols)
            cands.append(("comfy", lambda: comfy_tiled_3d(untiled_fn[0], z, tx, ty, ov, t_scale, s)))
        for name, run in cands:
            out, a, b = timed(run, args.repeat)
            r = row(label, f"{rows}x{cols}", rows * cols, name, out, ref, ys, xs, sref, a, b, w0, flops(run) / f_ref, t0)
            r["seam_t"] = time_seam(out, bounds) / tref if bounds else float("nan")
            r["video"] = True
            rows_out.append(r)
            w = r["wall"]
            print(f"{rows}x{cols:<3} {name:>6} {r['psnr']:8.1f} {r['maxerr']:9.2e} {r['seam']:7.3f} {r['seam_t']:7.3f} "
                  f"{a:5.2f}-{b:5.2f} {w[0]:5.2f}/{w[1]:5.2f}/{w[2]:5.2f} {r['xflop']:6.3f} {r['xtime']:5.2f} "
                  f"{r['xwall']:5.2f}")


untiled_fn = [None]     # the per-latent decode callable ComfyUI's tiled algorithm wraps


def bench_video(args, has_comfy, rows_out):
    lt, lh, lw = (int(v) for v in args.video_latent.split("x"))
    z4 = vm.video_latent(lt, lh, lw, seed=6)
    grids = [tuple(int(v) for v in g.split("x")) for g in args.video_grids.split(",")]
    which = set(args.video_models.split(","))
    models = [("ours-Wan-shaped", vm.wan_decoder(seed=5))] if "wan" in which else []
    if has_comfy and "wan" in which:
        models.append(("ComfyUI Wan Decoder3d", vm.comfy_wan_decoder(seed=5)))
    for label, dec in models:
        # output frame where each of Wan's time chunks starts: latent 0 -> 1 frame, later ones 4 each
        bounds = [1 + 4 * (a - 1) for a, _ in vae.video_chunks(lt)[1:]]
        untiled_fn[0] = lambda a, dec=dec: vm.wan_decode(dec, a)
        bench_video_model(label, "layer-synchronous, Wan's chunks", lambda: vm.wan_decode(dec, z4),
                          lambda g, dec=dec: vae.decode_video_tiled(dec, z4, budget_bytes=1 << 40, grid=g), z4, bounds,
                          args, has_comfy, rows_out, grids)
    hy = [("ours-Hunyuan-shaped", vm.hunyuan_decoder(seed=14))] if "hunyuan" in which else []
    if has_comfy and "hunyuan" in which:
        hy.append(("ComfyUI Decoder(conv3d)", vm.comfy_video_decoders(seed=16)["hunyuan"]))
    for label, dec in hy:
        bounds = [2 * a - 1 for a in range(2, lt, 2)]
        untiled_fn[0] = dec
        bench_video_model(label, "layer-synchronous, the model's 2-frame chunks", lambda dec=dec: dec(z4),
                          lambda g, dec=dec: vae.decode_tiled(dec, z4, budget_bytes=1 << 40, grid=g), z4, bounds,
                          args, has_comfy, rows_out, grids)
    # LTX's receptive field is ~8 latent px: a latent twice as large in space, so tiles are not all halo
    ltx = [("ours-LTX-shaped", vm.ltx_decoder(seed=8), vm.video_latent(lt, 2 * lh, 2 * lw, seed=9))] if "ltx" in which else []
    if has_comfy and "ltx" in which:
        m = vm.comfy_ltx_vae(seed=18)
        zl = torch.randn(1, 128, lt, lh, lw, generator=torch.Generator().manual_seed(19))
        ltx.append(("ComfyUI LTX VideoVAE", m, zl))
    for label, mod, z in ltx:
        fn = mod.decode if hasattr(mod, "per_channel_statistics") else mod
        dec = mod.decoder if hasattr(mod, "per_channel_statistics") else mod
        untiled_fn[0] = fn
        bench_video_model(label, "halo tiles (every op local)", lambda fn=fn, z=z: fn(z),
                          lambda g, fn=fn, dec=dec, z=z: vae.decode_video_halo_tiled(dec, z, budget_bytes=1 << 40,
                                                                                     grid=g, decode=fn),
                          z, [], args, has_comfy, rows_out, grids)
    mochi = [("ours-Mochi-shaped", vm.mochi_decoder(seed=21))] if "mochi" in which else []
    if has_comfy and "mochi" in which:
        mochi.append(("ComfyUI Mochi Decoder", vm.comfy_video_decoders(seed=1)["mochi"]))
    for label, dec in mochi:
        untiled_fn[0] = dec
        bench_video_model(label, "layer-synchronous, per-frame GroupNorm statistics, all frames per tile",
                          lambda dec=dec: dec(z4),
                          lambda g, dec=dec: vae.decode_mochi_tiled(dec, z4, budget_bytes=1 << 40, grid=g), z4, [],
                          args, has_comfy, rows_out, grids)


if __name__ == "__main__":
    main()
