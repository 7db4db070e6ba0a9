"""Tiled VAE benchmark: vramguard.vae vs ComfyUI's VAEDecodeTiled algorithm vs untiled, side by side.

    python bench/vae.py [--threads 2] [--repeat 3] [--latent 24x32] [--png docs/images/vae_tiled.png]
    VRAMGUARD_COMFYUI=/path/to/ComfyUI python bench/vae.py   # default /work/comfy/ComfyUI when present

Models (tests/vae_models.py, sanely initialised random weights): our SD-shaped Decoder/Encoder
(ch 32, mult 1,2,2,4, 8 groups) and, when a checkout imports, ComfyUI's real Decoder class
(32 groups, its own attention). Latent: a synthetic "test card" (gradients + blobs + noise).
Per tile grid (2, 4, 6, 9, 16 tiles and a non-square 3x5):
  * ours: vae.decode_tiled(grid=...), layer-synchronous, whole-map GroupNorm statistics
  * comfy: ComfyUI's VAE.decode_tiled_ algorithm (comfy.utils.tiled_scale three times, tile
    shapes (tx/2, 2ty), (2tx, ty/2), (tx, ty), averaged) with the decoder as decode_fn, at the
    same tile size (latent tile = the grid's tile) and overlap min(8, tile/4) latent px
    (VAEDecodeTiled's default 64 px at 8x)
Columns: PSNR (dB, [-1, 1] signal) and max |error| against untiled; seam: gradient energy on the
grid's tile borders / elsewhere, divided by the same ratio of the untiled image (1.00 = no seam);
process CPU time (s) min-max of --repeat runs (wall time on a shared machine
measures the neighbours); FLOPs (torch.utils.flop_counter, repeatable) over one untiled
pass; peak: live bytes of tensors torch ops created during the call (a device-peak proxy on
CPU: ours keeps its full-size step outputs in the store, which is the device here) and, for
ours, the largest one tile's work held (what the device holds when the store is the host).
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
    """(result, min, max) of the process CPU time of `repeat` runs: on a shared machine wall time
    mostly measures the neighbours; CPU time of this process is what the work cost."""
    ts = []
    out = None
    for _ in range(repeat):
        t = time.process_time()
        with torch.no_grad():
            out = fn()
        ts.append(time.process_time() - t)
    return out, min(ts), max(ts)


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


def borders(rows, cols, h, w):
    return [h * i // rows * 8 for i in range(1, rows)], [w * j // cols * 8 for j in range(1, cols)]


def mb(n):
    return f"{n / 2**20:7.1f}"


def bench_model(label, dec, z, args, has_comfy, rows_out):
    lh, lw = z.shape[2], z.shape[3]
    ref, t0, t1 = timed(lambda: dec(z), args.repeat)
    f_ref = flops(lambda: dec(z))
    p_ref, big_ref = peak(lambda: dec(z))
    print(f"\n{label}: latent {lh}x{lw} -> {ref.shape[2]}x{ref.shape[3]}, untiled {t0:.2f}-{t1:.2f} s, "
          f"{f_ref / 1e9:.1f} GFLOP, peak {mb(p_ref)} MiB, largest tensor {mb(big_ref)} MiB")
    print(f"{'grid':>5} {'path':>6} {'PSNR dB':>8} {'max err':>9} {'seam':>6} {'time s':>11} {'xFLOP':>6} "
          f"{'xtime':>6} {'peak MiB':>8} {'tile MiB':>8} {'largest':>8}")
    for rows, cols in GRIDS:
        ys, xs = borders(rows, cols, lh, lw)
        seam_ref = vm.seam_ratio(ref, ys, xs)
        run = lambda: vae.decode_tiled(dec, z, budget_bytes=1 << 40, grid=(rows, cols))  # noqa: E731
        out, a, b = timed(run, args.repeat)
        r = dict(model=label, grid=f"{rows}x{cols}", tiles=rows * cols, path="ours",
                 psnr=vm.psnr(out, ref), maxerr=(out - ref).abs().max().item(),
                 seam=vm.seam_ratio(out, ys, xs) / seam_ref, t_min=a, t_max=b,
                 xflop=flops(run) / f_ref, xtime=a / t0)
        r["peak"], r["largest"] = peak(run)
        r["tile_peak"] = ours_tile_peak(run)
        rows_out.append(r)
        line(r)
        if has_comfy:
            ty, tx = math.ceil(lh / rows), math.ceil(lw / cols)
            ov = max(1, min(8, min(tx, ty) // 4))
            runc = lambda: comfy_tiled(dec, z, tx, ty, ov)  # noqa: E731
            out, a, b = timed(runc, args.repeat)
            r = dict(model=label, grid=f"{rows}x{cols}", tiles=rows * cols, path="comfy",
                     psnr=vm.psnr(out, ref), maxerr=(out - ref).abs().max().item(),
                     seam=vm.seam_ratio(out, ys, xs) / seam_ref, t_min=a, t_max=b,
                     xflop=flops(runc) / f_ref, xtime=a / t0, tile_peak=None)
            r["peak"], r["largest"] = peak(runc)
            rows_out.append(r)
            line(r)
    return ref


def line(r):
    tp = mb(r["tile_peak"]) if r.get("tile_peak") else "       -"
    print(f"{r['grid']:>5} {r['path']:>6} {r['psnr']:8.1f} {r['maxerr']:9.2e} {r['seam']:6.3f} "
          f"{r['t_min']:5.2f}-{r['t_max']:5.2f} {r['xflop']:6.3f} {r['xtime']:6.2f} {mb(r['peak'])} {tp} "
          f"{mb(r['largest'])}")


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
    ty, tx = math.ceil(lh / rows), math.ceil(lw / cols)
    ov = max(1, min(8, min(tx, ty) // 4))
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
    ap.add_argument("--video-latent", default="3x6x8", help="T x H x W latent frames/px")
    ap.add_argument("--no-video", action="store_true")
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
    ref = bench_model("ours-SD-shaped", dec, z, args, has_comfy, rows)
    if has_comfy:
        bench_model("ComfyUI Decoder", vm.comfy_decoder(seed=11), z, args, True, rows)
    enc_psnr = bench_encode(vm.sd_encoder(seed=2), ref.clamp(-1, 1), args)
    video = video_c = None
    if not args.no_video:
        video, video_c = bench_video(args, has_comfy)
    if args.png:
        write_png(args.png, vm.comfy_decoder(seed=11) if has_comfy else dec, has_comfy, lh, lw)
    ours = [r for r in rows if r["path"] == "ours"]
    comfy = [r for r in rows if r["path"] == "comfy"]
    summary = {
        "psnr_min_db": min(r["psnr"] for r in ours),
        "psnr_min_db_comfy_tiled": min(r["psnr"] for r in comfy) if comfy else None,
        "video_psnr_min_db": video,
        "video_psnr_min_db_comfy_tiled": video_c,
        "compute_vs_untiled_max": max(r["xflop"] for r in ours),
        "compute_vs_untiled_max_comfy": max(r["xflop"] for r in comfy) if comfy else None,
        "time_vs_untiled_max": max(r["xtime"] for r in ours),
        "seam_max": max(r["seam"] for r in ours),
        "seam_max_comfy": max(r["seam"] for r in comfy) if comfy else None,
        "encode_psnr_min_db": enc_psnr,
        "tiles": sorted({r["tiles"] for r in ours}),
    }
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}))


def time_seam(v, bounds):
    """Frame-difference energy across the given frame boundaries over the mean elsewhere."""
    d = (v[:, :, 1:] - v[:, :, :-1]).double() ** 2
    m = torch.zeros(d.shape[2], dtype=torch.bool)
    for f in bounds:
        if 0 < f < v.shape[2]:
            m[f - 1] = True
    return float(d[:, :, m].mean() / d[:, :, ~m].mean())


def comfy_tiled_3d(dec, z, tx, ty, ov):
    import comfy.utils
    return comfy.utils.tiled_scale_multidim(
        z, lambda a: vm.wan_decode(dec, a), tile=(999, ty, tx), overlap=(1, ov, ov),
        upscale_amount=(lambda a: max(0, a * 4 - 3), 8, 8), out_channels=3, index_formulas=(4, 8, 8),
        output_device="cpu")


def bench_video(args, has_comfy):
    lt, lh, lw = (int(v) for v in args.video_latent.split("x"))
    z = vm.video_latent(lt, lh, lw, seed=6)
    models = [("ours-Wan-shaped", vm.wan_decoder(seed=5))]
    if has_comfy:
        models.append(("ComfyUI Wan Decoder3d", vm.comfy_wan_decoder(seed=5)))
    # output frame where each of Wan's time chunks starts: latent 0 -> 1 frame, later ones 4 each
    bounds = [1 + 4 * (a - 1) for a, _ in vae.video_chunks(lt)[1:]]
    worst, worst_c = math.inf, math.inf
    for label, dec in models:
        ref, t0, t1 = timed(lambda: vm.wan_decode(dec, z), 1)
        f_ref = flops(lambda: vm.wan_decode(dec, z))
        tref = time_seam(ref, bounds)
        print(f"\nvideo {label}: latent {lt}x{lh}x{lw} -> {tuple(ref.shape[2:])}, untiled (Wan's chunked "
              f"decode) {t0:.2f} s, {f_ref / 1e9:.1f} GFLOP; chunk starts at frames {bounds}")
        print(f"{'grid':>5} {'path':>6} {'PSNR dB':>8} {'max err':>9} {'seam xy':>7} {'seam t':>7} {'time s':>7} "
              f"{'xFLOP':>6}")
        for rows, cols in [(1, 2), (2, 3)]:
            ys, xs = borders(rows, cols, lh, lw)
            sref = vm.seam_ratio(ref.flatten(1, 2), ys, xs)
            run = lambda: vae.decode_video_tiled(dec, z, budget_bytes=1 << 40, grid=(rows, cols))  # noqa: E731
            out, a, _ = timed(run, 1)
            p = vm.psnr(out, ref)
            worst = min(worst, p)
            print(f"{rows}x{cols:<3} {'ours':>6} {p:8.1f} {(out - ref).abs().max().item():9.2e} "
                  f"{vm.seam_ratio(out.flatten(1, 2), ys, xs) / sref:7.3f} {time_seam(out, bounds) / tref:7.3f} "
                  f"{a:7.2f} {flops(run) / f_ref:6.3f}")
            if has_comfy:
                ty, tx = math.ceil(lh / rows), math.ceil(lw / cols)
                ov = max(1, min(8, min(tx, ty) // 4))
                runc = lambda: comfy_tiled_3d(dec, z, tx, ty, ov)  # noqa: E731
                out, a, _ = timed(runc, 1)
                p = vm.psnr(out, ref)
                worst_c = min(worst_c, p)
                print(f"{rows}x{cols:<3} {'comfy':>6} {p:8.1f} {(out - ref).abs().max().item():9.2e} "
                      f"{vm.seam_ratio(out.flatten(1, 2), ys, xs) / sref:7.3f} "
                      f"{time_seam(out, bounds) / tref:7.3f} {a:7.2f} {flops(runc) / f_ref:6.3f}")
    return worst, (worst_c if worst_c < math.inf else None)


if __name__ == "__main__":
    main()
