"""Tiled VAE benchmark: vramguard.vae vs ComfyUI's tiled decode/encode vs untiled, side by side in one process.

    python bench/vae.py [--device cuda|cpu] [--threads 2] [--repeat 3] [--latent 16x24] [--png out.png]
                        [--video-png frames.png]
    python bench/vae.py --device cuda --latent 16x24 --video-latent 3x8x12 --video-grids 1x2,2x3  # gpu_check
    # with ComfyUI's classes and its tiled algorithms (the checkout + its requirements in this venv):
    VRAMGUARD_COMFYUI=~/.cache/vramguard-comfyui/ComfyUI .venv/bin/python bench/vae.py

--device (default cuda when torch.cuda.is_available(), else cpu): models and latents live there and
every path runs there (ours with its step store on that device unless said otherwise).
Models (tests/vae_models.py, sanely initialised random weights): our SD-shaped Decoder/Encoder
(ch 32, mult 1,2,2,4, 8 groups) and, when a checkout imports, ComfyUI's real Decoder class
(32 groups, its own attention). Latent: a synthetic "test card" (gradients + blobs + noise).
Per tile grid (2, 4, 6, 9, 16 tiles and a non-square 3x5):
  * ours: vae.decode_tiled(grid=...), layer-synchronous, whole-map GroupNorm statistics
  * comfy: ComfyUI's VAE.decode_tiled_ algorithm (comfy.utils.tiled_scale three times, tile
    shapes (tx/2, 2ty), (2tx, ty/2), (tx, ty), averaged) with the decoder as decode_fn, at the
    same tile size (latent tile = the grid's tile) and overlap min(8, tile/4) latent px
    (VAEDecodeTiled's default 64 px at 8x)
Video (--video-models): each model is a first_stage_model (ComfyUI's real one, or a stand-in with
the same attributes) and ours is what the node runs: vramguard.vae.video_program(fsm) for decode,
the adapter's _vae_program("encode", ...) for encode -- so paths added there (LTX layer-synchronous,
Wan 2.2) show up here once merged; a model the dispatch refuses is skipped with its reason. Wan 2.1
also encodes (ours vs WanVAE.encode's loop vs ComfyUI's encode_tiled_3d algorithm). Rival: ComfyUI's
decode_tiled_3d / encode_tiled_3d algorithm (comfy.utils.tiled_scale_multidim, overlap 1 frame /
min(8, tile/4) latent px).
Columns: PSNR (dB, [-1, 1] signal; encode: the latent mean's range) and max |error| against
untiled; seam: gradient energy on the grid's tile borders / elsewhere, divided by the same ratio of
the untiled image (1.00 = no seam; video: also across time-chunk starts); wall time min/median/max
of --repeat runs, the paths of one model interleaved run by run (CUDA: torch.cuda.synchronize
around each; on a shared machine wall time also measures the neighbours) and process CPU time;
xFLOP: FLOPs (torch.utils.flop_counter, load-independent, repeatable) over one untiled pass -- the
figure the compute claims rest on. Peak: CUDA: torch.cuda.max_memory_allocated over the call above
what was allocated before it; CPU: live bytes of the tensors torch ops create (a TorchDispatchMode
count, tests/vae_models.py LiveBytes -- not RSS, not an allocator's reserve). Peak vs budget: our
paths planned from a budget (no grid given) with the store on the host, as the node runs them: the
device peak (CUDA) / the most one tile's work held (CPU) must stay under the budget (PASS/FAIL).
Store traffic (CUDA): bytes copied host<->device (counted per copy op) and wall time with
store_device="cpu" against the store on the device.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import vae_models as vm  # noqa: E402
from vramguard import vae  # noqa: E402

GRIDS = [(1, 2), (2, 2), (2, 3), (3, 3), (4, 4), (3, 5)]      # --grids
BIG = 1 << 40       # "no budget": an explicit grid decides the tiles
DEV = torch.device("cpu")
QUICK = False       # --quick: the CPU smoke (per-row LiveBytes peaks left out, fewer budgets)


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize(DEV)


def cpu(t):
    return t.detach().to("cpu", torch.float32)


def measure(cands, repeat):
    """cands: [(key, fn)].  repeat rounds, each running every candidate once (interleaved, so
    load changes hit every path alike).  {key: {"out": last output, "cpu": (min, max) process
    CPU s, "wall": (min, median, max) s}}"""
    res = {k: {"cpu": [], "wall": []} for k, _ in cands}
    for _ in range(repeat):
        for k, fn in cands:
            sync()
            t, w = time.process_time(), time.perf_counter()
            with torch.no_grad():
                out = fn()
            sync()
            res[k]["cpu"].append(time.process_time() - t)
            res[k]["wall"].append(time.perf_counter() - w)
            res[k]["out"] = out
    for r in res.values():
        ws = sorted(r["wall"])
        r["wall"] = (ws[0], ws[len(ws) // 2], ws[-1])
        r["cpu"] = (min(r["cpu"]), max(r["cpu"]))
    return res


def flops(fn):
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return fc.get_total_flops()


def device_peak(fn, row=True):
    """(peak bytes, largest tensor or None): CUDA: max_memory_allocated over the call above the
    bytes allocated before it; CPU: LiveBytes (live tensor bytes torch ops created); (None, None)
    for a table row under --quick on a CPU (LiveBytes sees every op: the slow part of a CPU run)."""
    if QUICK and row and DEV.type == "cpu":
        return None, None
    if DEV.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(DEV)
        base = torch.cuda.memory_allocated(DEV)
        with torch.no_grad():
            out = fn()
        sync()
        pk = torch.cuda.max_memory_allocated(DEV) - base
        del out
        return pk, None
    with vm.LiveBytes() as lb, torch.no_grad():
        fn()
    return lb.peak, lb.largest


def ours_tile_peak(fn):
    """The most live bytes one tile's work held (vae._tile_scope swapped for a LiveBytes scope)."""
    peaks = []
    old = vae._tile_scope
    vae._tile_scope = vm.tile_peak_scope(peaks)
    try:
        fn()
    finally:
        vae._tile_scope = old
    return max(peaks) if peaks else 0


class Transfers(TorchDispatchMode):
    """Bytes copied between devices by torch ops (_to_copy and copy_ whose source and destination
    devices differ): h2d = host -> another device, d2h = back, counted at the source's size."""

    def __init__(self):
        super().__init__()
        self.h2d = self.d2h = self.other = 0
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and isinstance(out, torch.Tensor):
            self._count(args[0], out)
        elif func is torch.ops.aten.copy_.default and isinstance(args[1], torch.Tensor):
            self._count(args[1], args[0])
        return out

    def _count(self, src, dst):
        if src.device == dst.device:
            return
        n = src.numel() * src.element_size()
        self.copies += 1
        if src.device.type == "cpu":
            self.h2d += n
        elif dst.device.type == "cpu":
            self.d2h += n
        else:
            self.other += n


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


def comfy_fits(tx, ty, ov, what):
    """ComfyUI's tiler steps tile - overlap (and its image decode also tiles at half the tile): a
    tile that small is a ValueError there, so that row is left out (tiny --latent only)."""
    if min(tx, ty) // 2 > ov:
        return True
    print(f"  ComfyUI {what} at tile {tx}x{ty} latent px, overlap {ov}: too small for its tiler, row left out")
    return False


def borders(rows, cols, h, w):
    return [h * i // rows * 8 for i in range(1, rows)], [w * j // cols * 8 for j in range(1, cols)]


def mb(n):
    return f"{n / 2**20:7.1f}" if n is not None else "      -"


def row(model, grid, tiles, path, out, ref, ys, xs, seam_ref, m, m_ref, xflop, peak_to_peak=2.0):
    out, ref = cpu(out), cpu(ref)
    return dict(model=model, grid=grid, tiles=tiles, path=path, psnr=vm.psnr(out, ref, peak_to_peak=peak_to_peak),
                maxerr=(out - ref).abs().max().item(), seam=vm.seam_ratio(out.flatten(1, -3), ys, xs) / seam_ref,
                t_min=m["cpu"][0], t_max=m["cpu"][1], wall=m["wall"], xflop=xflop, xtime=m["cpu"][0] / m_ref["cpu"][0],
                xwall=m["wall"][1] / m_ref["wall"][1])


def line(r):
    w = r["wall"]
    print(f"{r['grid']:>5} {r['path']:>7} {r['psnr']:8.1f} {r['maxerr']:9.2e} {r['seam']:6.3f} "
          f"{r['t_min']:5.2f}-{r['t_max']:5.2f} {w[0]:6.3f}/{w[1]:6.3f}/{w[2]:6.3f} {r['xflop']:6.3f} "
          f"{r['xtime']:5.2f} {r['xwall']:5.2f} {mb(r.get('peak'))} {mb(r.get('tile_peak'))} {mb(r.get('largest'))}")


def bench_model(label, dec, z, args, has_comfy, rows_out):
    lh, lw = z.shape[2], z.shape[3]
    cands = [("untiled", lambda: dec(z))]
    for rows, cols in GRIDS:
        cands.append((("ours", rows, cols),
                      lambda g=(rows, cols): vae.decode_tiled(dec, z, budget_bytes=BIG, grid=g)))
        tx, ty, ov = comfy_tile(lh, lw, rows, cols)
        if has_comfy and comfy_fits(tx, ty, ov, "tiled decode"):
            cands.append((("comfy", rows, cols), lambda tx=tx, ty=ty, ov=ov: comfy_tiled(dec, z, tx, ty, ov)))
    m = measure(cands, args.repeat)
    fns = dict(cands)
    ref, m0 = m["untiled"]["out"], m["untiled"]
    f_ref = flops(fns["untiled"])
    p_ref, big_ref = device_peak(fns["untiled"], row=False)
    print(f"\n{label}: latent {lh}x{lw} -> {ref.shape[2]}x{ref.shape[3]} on {DEV}, untiled cpu {m0['cpu'][0]:.2f}-"
          f"{m0['cpu'][1]:.2f} s, wall {m0['wall'][0]:.3f}/{m0['wall'][1]:.3f}/{m0['wall'][2]:.3f} s, "
          f"{f_ref / 1e9:.2f} GFLOP, peak {mb(p_ref)} MiB, largest tensor {mb(big_ref)} MiB")
    print(f"{'grid':>5} {'path':>7} {'PSNR dB':>8} {'max err':>9} {'seam':>6} {'cpu s':>11} {'wall s min/med/max':>20} "
          f"{'xFLOP':>6} {'xcpu':>5} {'xwall':>5} {'peak MiB':>7} {'tile MiB':>7} {'largest':>7}")
    for key, fn in cands[1:]:
        path, rows, cols = key
        ys, xs = borders(rows, cols, lh, lw)
        r = row(label, f"{rows}x{cols}", rows * cols, path, m[key]["out"], ref, ys, xs,
                vm.seam_ratio(cpu(ref), ys, xs), m[key], m0, flops(fn) / f_ref)
        r["peak"], r["largest"] = device_peak(fn)
        r["peak_vs_untiled"] = r["peak"] / p_ref if r["peak"] is not None else None
        r["tile_peak"] = ours_tile_peak(fn) if path == "ours" and DEV.type == "cpu" and not QUICK else None
        rows_out.append(r)
        line(r)
    return ref


def peak_table(title, rows_spec, peak_of, head=True):
    """rows_spec: [(budget, planned or None, run)]: measured device peak of run() against the
    budget it was planned from.  peak_of(run) -> bytes."""
    if head:
        print(f"\n{title}")
        print(f"{'budget MiB':>10} {'planned MiB':>11} {'measured MiB':>12} {'meas/budget':>11} {'meas/planned':>12}  check")
    out = []
    for budget, planned, run in rows_spec:
        try:
            measured, err = peak_of(run), None
        except vae.VaeTilingError as e:      # the planner refuses a budget below its smallest tile: not a row
            print(f"{mb(budget):>10} {mb(planned):>11}  refused by the planner: {str(e)[:150]}")
            continue
        except Exception as e:  # noqa: BLE001 - any other failure is a FAIL row, not the end of the bench
            measured, err = float("nan"), f"{type(e).__name__}: {e}"[:200]
        ok = err is None and measured <= budget
        r = dict(table=title.split(":")[0], budget=budget, planned=planned, measured=measured, ok=ok, error=err)
        out.append(r)
        if err:
            print(f"{mb(budget):>10} {mb(planned):>11}  FAIL: {err}")
            continue
        print(f"{mb(budget):>10} {mb(planned):>11} {mb(measured):>12} {measured / budget:11.3f} "
              f"{(f'{measured / planned:12.3f}' if planned else '           -')}  {'PASS' if ok else 'FAIL'}")
    return out


def run_peak(run):
    """The figure that must stay under the budget: CUDA: max_memory_allocated above the bytes held
    before the call (store on the host); CPU: the most one tile's work held (LiveBytes)."""
    return device_peak(run)[0] if DEV.type == "cuda" else ours_tile_peak(run)


def bench_peak(dec, z):
    """The planner's plan vs the measured peak at budgets that force 1..many tiles, the step store
    on the host (as the node runs it): the plan must bound the measurement."""
    p = vae.compile_decoder(dec)
    lh, lw = z.shape[2], z.shape[3]
    full = vae.plan_grid(p, lh, lw, budget_bytes=BIG).tile_bytes
    zc = z.cpu()
    spec = []
    for div in (1, 10) if QUICK else (1, 3, 10, 30):
        budget = full // div
        try:
            g = vae.plan_grid(p, lh, lw, budget_bytes=budget)
        except vae.VaeTilingError as e:
            print(f"  budget {mb(budget)} MiB: refused by the planner ({str(e)[:120]})")
            continue
        spec.append((budget, g.tile_bytes,
                     lambda b=budget: vae.decode_tiled(dec, zc, budget_bytes=b, device=DEV, store_device="cpu")))
    what = ("cuda.max_memory_allocated over the call" if DEV.type == "cuda"
            else "most live tensor bytes one tile's work held, TorchDispatchMode count")
    return peak_table(f"SD decode: planned vs measured device peak (latent {lh}x{lw}, store on the host; "
                      f"measured = {what})", spec, run_peak)


def bench_transfer(dec, z, grids, elem=2):
    """With the step store on the host (store_device="cpu": the default when the maps do not fit
    the budget), every step copies its tiles' inputs (with halos) host -> device and its output
    back: bytes per layer, computed from the program and the tiles.
    elem=2: fp16/bf16, as ComfyUI runs VAEs on a GPU."""
    p = vae.compile_decoder(dec)
    lh, lw = z.shape[2], z.shape[3]
    b = z.shape[0]
    print(f"\nhost-store traffic, computed (SD-shaped decode, latent {lh}x{lw} -> {lh * 8}x{lw * 8}, {elem} B/element)")
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


def store_traffic(label, run, repeat):
    """run(store_device) on DEV: counted host<->device bytes with the store on the host, and wall
    time host store vs device store (interleaved).  CUDA only: on a CPU both are the same memory."""
    if DEV.type != "cuda":
        return None
    with Transfers() as tr, torch.no_grad():
        run("cpu")
    m = measure([("host", lambda: run("cpu")), ("device", lambda: run(DEV))], repeat)
    h, d = m["host"]["wall"][1], m["device"]["wall"][1]
    moved = tr.h2d + tr.d2h
    r = dict(model=label, h2d=tr.h2d, d2h=tr.d2h, copies=tr.copies, wall_host=m["host"]["wall"],
             wall_device=m["device"]["wall"], extra_ms=(h - d) * 1e3,
             gbps=moved / (h - d) / 1e9 if h > d else None)
    print(f"  store traffic {label}: H2D {mb(tr.h2d)} MiB, D2H {mb(tr.d2h)} MiB in {tr.copies} copies; wall median "
          f"host store {h * 1e3:.2f} ms vs device store {d * 1e3:.2f} ms (+{(h - d) * 1e3:.2f} ms"
          + (f", {r['gbps']:.1f} GB/s effective)" if r["gbps"] else ")"))
    return r


def bench_encode(enc, img, args, rows_out):
    cands = [("untiled", lambda: enc(img))]
    cands += [((r, c), lambda g=(r, c): vae.encode_tiled(enc, img, budget_bytes=BIG, grid=g)) for r, c in GRIDS]
    m = measure(cands, args.repeat)
    fns = dict(cands)
    ref = m["untiled"]["out"]
    f_ref = flops(fns["untiled"])
    span = (ref.max() - ref.min()).item()
    print(f"\nencode: image {img.shape[2]}x{img.shape[3]}, untiled wall median {m['untiled']['wall'][1]:.3f} s")
    for (rows, cols), fn in cands[1:]:
        lh, lw = ref.shape[2], ref.shape[3]
        ys, xs = [lh * i // rows for i in range(1, rows)], [lw * j // cols for j in range(1, cols)]
        r = row("ours-SD-shaped encode", f"{rows}x{cols}", rows * cols, "ours", m[(rows, cols)]["out"], ref, ys, xs,
                vm.seam_ratio(cpu(ref), ys, xs), m[(rows, cols)], m["untiled"], flops(fn) / f_ref, span)
        rows_out.append(r)
        print(f"{rows}x{cols} ours PSNR {r['psnr']:6.1f} dB  max err {r['maxerr']:.2e}  wall median "
              f"{r['wall'][1]:.3f} s (x{r['xwall']:.2f})  xFLOP {r['xflop']:.3f}")
    return min(r["psnr"] for r in rows_out)


def _png_grid(path, names, rows):
    """Save rows of (C, H, W) images in [-1, 1] side by side, a column name above each."""
    from PIL import Image, ImageDraw
    h, w = rows[0][0].shape[-2], rows[0][0].shape[-1]
    pad, head = 6, 18
    canvas = Image.new("RGB", (len(names) * (w + pad) + pad, len(rows) * (h + pad) + pad + head), (40, 40, 40))
    d = ImageDraw.Draw(canvas)
    for j, n in enumerate(names):
        d.text((pad + j * (w + pad), 3), n, fill=(230, 230, 230))
    for i, trow in enumerate(rows):
        for j, t in enumerate(trow):
            a = ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(a), (pad + j * (w + pad), head + pad + i * (h + pad)))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.save(path)
    print(f"\nwrote {path} ({canvas.size[0]}x{canvas.size[1]})")


def write_png(path, dec, has_comfy, lh, lw):
    rows, cols = 3, 3
    tx, ty, ov = comfy_tile(lh, lw, rows, cols)
    tiles = []
    for lat in (vm.gradient_latent(lh, lw), vm.test_card_latent(lh, lw, seed=21)):
        lat = lat.to(DEV)
        with torch.no_grad():
            ref = cpu(dec(lat))
        ours = cpu(vae.decode_tiled(dec, lat, budget_bytes=BIG, grid=(rows, cols)))
        comfy = cpu(comfy_tiled(dec, lat, tx, ty, ov)) if has_comfy else torch.zeros_like(ref)
        tiles.append([t[0] for t in (ref, ours, comfy, (ours - ref).abs() * 1e4 - 1, (comfy - ref).abs() * 10 - 1)])
    _png_grid(path, ["untiled", "ours 3x3", "ComfyUI tiled 3x3" if has_comfy else "(no ComfyUI)",
                     "|ours-untiled| x1e4", "|comfy-untiled| x10"], tiles)


def write_video_png(path, has_comfy, lt=5, lh=12, lw=18, grid=(2, 3)):
    """A Wan 2.1 video (ComfyUI's own WanVAE when a checkout imports, else the stand-in) decoded
    untiled, by ours (the node's dispatch) and by ComfyUI's decode_tiled_3d algorithm on the same
    grid: the frames on both sides of each time-chunk boundary, one row each, and the differences."""
    m = _dev(vm.comfy_wan_vae(seed=5)) if has_comfy else None
    if m is None:
        dec, conv2 = _dev(vm.wan_decoder(seed=5)), _dev(vm.sane_init(vm.CausalConv3d(4, 4, 1), seed=10))
        m = Fsm(lambda a: vm.wan_decode(dec, a, conv2), decoder=dec, conv2=conv2)
    z = vm.video_latent(lt, lh, lw, seed=6)
    c = latent_channels(m)
    z = z.repeat(1, -(-c // z.shape[1]), 1, 1, 1)[:, :c].to(DEV)
    fn, kw, _ = video_dispatch(m)
    with torch.no_grad():
        ref = cpu(m.decode(z))
        ours = cpu(fn(**kw, latent=z, budget_bytes=BIG, grid=grid))
        s, t_scale = ref.shape[-1] // lw, (ref.shape[2] - 1) // max(1, lt - 1)
        tx, ty, ov = comfy_tile(lh, lw, *grid)
        comfy = cpu(comfy_tiled_3d(m.decode, z, tx, ty, ov, t_scale, s)) if has_comfy else torch.zeros_like(ref)
    bounds = [1 + 4 * (a - 1) for a, _ in vae.video_chunks(lt)[1:]]
    frames = sorted({f for b in bounds for f in (b - 1, b) if 0 <= f < ref.shape[2]})
    cdiff = (comfy - ref).abs() * 10 - 1 if has_comfy else torch.full_like(ref, -1.0)
    rows = [[t[0, :, f] for t in (ref, ours, comfy, (ours - ref).abs() * 1e4 - 1, cdiff)] for f in frames]
    g = f"{grid[0]}x{grid[1]}"
    _png_grid(path, ["untiled", f"ours {g}", f"ComfyUI 3-D tiled {g}" if has_comfy else "(no ComfyUI)",
                     "|ours-untiled| x1e4", "|comfy-untiled| x10"], rows)
    print(f"video frames {frames} (time-chunk starts {bounds}): max |ours-untiled| "
          f"{float((ours - ref).abs().max()):.2e}"
          + (f", max |comfy-untiled| {float((comfy - ref).abs().max()):.2e}" if has_comfy else ""))


# ---------------------------------------------------------------------------------- video

class Fsm:
    """A first_stage_model stand-in: the modules the node's dispatch reads (decoder, encoder,
    conv1/conv2, post_quant_conv...) and decode/encode, the model's own untiled calls."""

    def __init__(self, decode, encode=None, **modules):
        self.__dict__.update(modules)
        self.decode = decode
        if encode is not None:
            self.encode = encode


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


def step_ratio(out, ref):
    """The largest ratio (or inverse) of mean squared frame-to-frame change, out over ref, over the
    frame boundaries: 1.00 when every step in time is as in the reference; nan for one frame."""
    if out.shape[2] < 2:
        return float("nan")
    so = ((out[:, :, 1:] - out[:, :, :-1]).double() ** 2).mean(dim=(0, 1, 3, 4))
    sr = ((ref[:, :, 1:] - ref[:, :, :-1]).double() ** 2).mean(dim=(0, 1, 3, 4))
    q = so / sr
    return float(torch.maximum(q, 1 / q).max())


def comfy_tiled_3d(fn, z, tx, ty, ov, t_scale, s):
    """ComfyUI's VAE.decode_tiled_3d algorithm (comfy.utils.tiled_scale_multidim, tile_t 999 as its
    default, overlap 1 frame / ov px) with the decode callable."""
    import comfy.utils
    return comfy.utils.tiled_scale_multidim(
        z, fn, tile=(999, ty, tx), overlap=(1, ov, ov),
        upscale_amount=(lambda a: max(0, a * t_scale - (t_scale - 1)), s, s), out_channels=3,
        index_formulas=(t_scale, s, s), output_device="cpu")


def comfy_encode_3d(fn, v, tx, ty, ov, s, zc):
    """ComfyUI's VAE.encode_tiled_3d algorithm for Wan 2.1 (tiled_scale_multidim with downscale=True,
    downscale_ratio (floor((t + 3) / 4), s, s), index formulas (4, s, s), tile_t 9999, overlap
    1 frame / ov px, all in pixels) with the model's encode (the latent mean) as encode_fn."""
    import comfy.utils
    return comfy.utils.tiled_scale_multidim(
        v, fn, tile=(9999, ty * s, tx * s), overlap=(1, ov * s, ov * s),
        upscale_amount=(lambda a: max(0, math.floor((a + 3) / 4)), s, s), out_channels=zc, downscale=True,
        index_formulas=(4, s, s), output_device="cpu")


def _path_name(fn, kw):
    run = kw.get("run")
    return getattr(run, "__name__", None) or getattr(fn, "__name__", str(fn))


def video_dispatch(fsm):
    """(fn, kwargs, path name) from the node's decode dispatch, or the reason it refuses."""
    try:
        fn, kw = vae.video_program(fsm)
    except (vae.VaeTilingError, AttributeError, TypeError) as e:
        return None, None, f"video_program: {type(e).__name__}: {e}"
    return fn, kw, _path_name(fn, kw)


def encode_dispatch(fsm):
    """The node's encode dispatch for a 5-D input (adapters.comfyui._vae_program), or the reason
    it refuses (the adapter logs it; caught here)."""
    from vramguard.adapters import comfyui as adapter

    seen = []

    class H(logging.Handler):
        def emit(self, rec):
            seen.append(rec.getMessage())

    lg = logging.getLogger("vramguard")
    h, old = H(), lg.level
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    try:
        found = adapter._vae_program("encode", Fsm(None, first_stage_model=fsm), 5)
    finally:
        lg.removeHandler(h)
        lg.setLevel(old)
    if found is None:
        return None, None, "encode dispatch: " + (seen[-1] if seen else "refused")
    fn, kw = found
    return fn, kw, _path_name(fn, kw) + " (5-D)"


def vrow(label, grid, path, out, ref, ys, xs, sref, m, m0, xflop, bounds, tref, peak, span=2.0, direction="decode"):
    r = row(label, grid, math.prod(int(v) for v in grid.split("x")), path, out, ref, ys, xs, sref, m, m0, xflop, span)
    r["peak"] = peak
    if direction == "encode":
        r["seam_t"] = step_ratio(cpu(out), cpu(ref))
    else:
        r["seam_t"] = time_seam(cpu(out), bounds) / tref if bounds else float("nan")
    r["video"] = True
    r["direction"] = direction
    w = r["wall"]
    print(f"{grid:<5} {path:>7} {r['psnr']:8.1f} {r['maxerr']:9.2e} {r['seam']:7.3f} {r['seam_t']:7.3f} "
          f"{r['t_min']:5.2f}-{r['t_max']:5.2f} {w[0]:6.3f}/{w[1]:6.3f}/{w[2]:6.3f} {r['xflop']:6.3f} {r['xtime']:5.2f} "
          f"{r['xwall']:5.2f} {mb(r.get('peak'))}")
    return r


VHEAD = (f"{'grid':<5} {'path':>7} {'PSNR dB':>8} {'max err':>9} {'seam xy':>7} {'seam t':>7} {'cpu s':>11} "
         f"{'wall s min/med/max':>20} {'xFLOP':>6} {'xcpu':>5} {'xwall':>5} {'peak MiB':>7}")


def video_measure(untiled, ours, comfy, what, grids, lh, lw, has_comfy, repeat):
    """Candidates untiled / ours(grid) / comfy(tx, ty, ov) per grid, measured interleaved:
    (cands, measurements, reference output, its measurement, its FLOPs)."""
    cands = [("untiled", untiled)] + [(("ours", g), lambda g=g: ours(g)) for g in grids]
    for g in grids if has_comfy else ():
        tx, ty, ov = comfy_tile(lh, lw, *g)
        if comfy_fits(tx, ty, ov, what):
            cands.append((("comfy", g), lambda tx=tx, ty=ty, ov=ov: comfy(tx, ty, ov)))
    m = measure(cands, repeat)
    return cands, m, m["untiled"]["out"], m["untiled"], flops(untiled)


def video_rows(label, cands, m, ref, m0, f_ref, yx, bounds, tref, span, direction, path, out, p_ref=None):
    """One printed row per tiled candidate (ours and ComfyUI's) against the untiled reference;
    yx(rows, cols) -> the tile borders (rows, columns) in the output's px."""
    for key, f in cands[1:]:
        name, (rows, cols) = key
        ys, xs = yx(rows, cols)
        sref = vm.seam_ratio(cpu(ref).flatten(1, 2), ys, xs)
        pk = device_peak(f)[0]
        r = vrow(label, f"{rows}x{cols}", name, m[key]["out"], ref, ys, xs, sref, m[key], m0, flops(f) / f_ref,
                 bounds, tref, pk, span, direction)
        r["fn"] = path
        r["peak_vs_untiled"] = pk / p_ref if pk is not None and p_ref else None
        out["rows"].append(r)


def bench_video_model(label, fsm, z, bounds, args, has_comfy, out, grids):
    """Decode rows of one video first_stage_model: ours through video_program, its own decode
    (untiled, the reference), ComfyUI's decode_tiled_3d algorithm."""
    fn, kw, path = video_dispatch(fsm)
    if fn is None:
        print(f"\nvideo {label}: skipped ({path})")
        out["skipped"][label] = path
        return None
    lt, lh, lw = z.shape[2:]
    with torch.no_grad():
        probe = fsm.decode(z)
    t_scale = (probe.shape[2] - 1) // max(1, lt - 1) if lt > 1 else 1
    s = probe.shape[-1] // lw
    del probe
    cands, m, ref, m0, f_ref = video_measure(
        lambda: fsm.decode(z), lambda g: fn(**kw, latent=z, budget_bytes=BIG, grid=g),
        lambda tx, ty, ov: comfy_tiled_3d(fsm.decode, z, tx, ty, ov, t_scale, s), "decode_tiled_3d",
        grids, lh, lw, has_comfy, args.repeat)
    fns = dict(cands)
    p_ref = device_peak(fns["untiled"], row=False)[0]
    tref = time_seam(cpu(ref), bounds)
    out["paths"][label] = path
    print(f"\nvideo {label}: latent {lt}x{lh}x{lw} -> {tuple(ref.shape[2:])} on {DEV}, untiled wall "
          f"{m0['wall'][0]:.3f}/{m0['wall'][1]:.3f}/{m0['wall'][2]:.3f} s, {f_ref / 1e9:.2f} GFLOP, peak {mb(p_ref)} MiB; "
          f"ours: {path} (video_program); time-chunk starts at output frames {bounds}")
    print(VHEAD)
    def yx(rows, cols):
        ys, xs = borders(rows, cols, lh, lw)
        return [y // 8 * s for y in ys], [x // 8 * s for x in xs]

    video_rows(label, cands, m, ref, m0, f_ref, yx, bounds, tref, 2.0, "decode", path, out, p_ref)
    # the budget table: planned from the budget (no grid), store on the host, as the node runs it
    zc = z.cpu()

    def at(b):
        return lambda: fn(**kw, latent=zc, budget_bytes=b, device=DEV, store_device="cpu")

    title = (f"{label}: measured device peak vs the budget it was planned from (budgets: the untiled peak x 4, "
             f"x 1, / 4, then x 32, x 256 ... while the planner refuses all; store on the host)")
    got = peak_table(title, [(max(1, int(p_ref * f)), None, at(max(1, int(p_ref * f))))
                             for f in ((1,) if QUICK else (4, 1, 0.25))], run_peak)
    f = 32
    while not got and f <= 32 * 8 ** 4:     # the planner's estimate is above every budget so far
        got = peak_table(title, [(int(p_ref * f), None, at(int(p_ref * f)))], run_peak, head=False)
        f *= 8
    out["peaks"] += got
    g = grids[-1]
    tr = store_traffic(label, lambda st: fn(**kw, latent=z, budget_bytes=BIG, grid=g, store_device=st), args.repeat)
    if tr is not None:
        out["traffic"].append(tr)
    return ref


def bench_video_encode(label, fsm, video, args, has_comfy, out, grids):
    """Encode rows: ours through the node's encode dispatch vs the model's own encode (the latent
    mean; ComfyUI's regulariser keeps it) vs ComfyUI's encode_tiled_3d algorithm."""
    fn, kw, path = encode_dispatch(fsm)
    if fn is None:
        print(f"\nvideo encode {label}: skipped ({path})")
        out["skipped"][label + " encode"] = path
        return
    with torch.no_grad():
        probe = fsm.encode(video)
    zc = probe.shape[1]
    s = video.shape[-1] // probe.shape[-1]
    lh, lw = probe.shape[-2:]
    del probe
    cands, m, ref, m0, f_ref = video_measure(
        lambda: fsm.encode(video), lambda g: fn(**kw, image=video, budget_bytes=BIG, grid=g)[:, :zc],
        lambda tx, ty, ov: comfy_encode_3d(fsm.encode, video, tx, ty, ov, s, zc), "encode_tiled_3d",
        grids, lh, lw, has_comfy, args.repeat)
    span = (ref.max() - ref.min()).item()
    # every latent frame starts a time chunk (Wan: frame 0, then 4 frames each): "seam t" is the worst
    # frame-to-frame change over the untiled one's, per latent frame boundary (1.00 = no seam in time)
    bounds, tref = [], None
    print(f"\nvideo encode {label}: video {tuple(video.shape[2:])} -> latent mean {tuple(ref.shape[1:])} on {DEV}, "
          f"untiled wall {m0['wall'][1]:.3f} s, {f_ref / 1e9:.2f} GFLOP; ours: {path} (the node's encode dispatch); "
          f"PSNR over the mean's range {span:.2f}")
    print(VHEAD)
    video_rows(label + " encode", cands, m, ref, m0, f_ref,
               lambda rows, cols: ([lh * i // rows for i in range(1, rows)], [lw * j // cols for j in range(1, cols)]),
               bounds, tref, span, "encode", path, out)
    tr = store_traffic(label + " encode", lambda st: fn(**kw, image=video, budget_bytes=BIG, grid=grids[-1],
                                                        store_device=st), args.repeat)
    if tr is not None:
        out["traffic"].append(tr)


def _dev(m):
    return m.to(DEV) if m is not None else None


def wan22_fsm(has_comfy):
    """[(label, fsm)] for Wan 2.2 from tests/vae_models.py builders (a stand-in named wan22_* that
    returns a first_stage_model with decode, and ComfyUI's comfy_wan22_vae), and [(label, reason)]
    for what is missing."""
    found, missing = [], []
    ours = [n for n in ("wan22_vae", "wan22_model", "wan22_first_stage") if callable(getattr(vm, n, None))]
    if ours:
        m = getattr(vm, ours[0])(seed=31)
        if isinstance(m, tuple) and len(m) == 4:    # wan22_vae: (encoder, conv1, decoder, conv2), as WanVAE holds them
            enc, conv1, dec, conv2 = (_dev(x) for x in m)
            m = Fsm(lambda a, d=dec, c=conv2: vm.wan22_decode(d, a, c), lambda x, e=enc, c=conv1: vm.wan22_encode(e, x, c),
                    decoder=dec, encoder=enc, conv1=conv1, conv2=conv2)
        elif isinstance(m, torch.nn.Module):
            m = _dev(m)
        if callable(getattr(m, "decode", None)) and hasattr(m, "decoder"):
            found.append(("ours-Wan2.2-shaped", m))
        else:
            missing.append(("ours-Wan2.2-shaped", f"tests/vae_models.{ours[0]} returned {type(m).__name__}, not a "
                                                  "first_stage_model with decoder and decode"))
    else:
        missing.append(("ours-Wan2.2-shaped", "tests/vae_models.py has no Wan 2.2 stand-in builder (wan22_vae) yet"))
    if has_comfy:
        if callable(getattr(vm, "comfy_wan22_vae", None)):
            found.append(("ComfyUI Wan 2.2 WanVAE", _dev(vm.comfy_wan22_vae(seed=32))))
        else:
            missing.append(("ComfyUI Wan 2.2 WanVAE", "tests/vae_models.py has no comfy_wan22_vae builder yet"))
    return found, missing


def latent_channels(fsm):
    conv2 = getattr(fsm, "conv2", None)
    if conv2 is not None:
        return conv2.weight.shape[1]
    w = next(m.weight for m in fsm.decoder.modules() if getattr(getattr(m, "weight", None), "ndim", 0) == 5)
    return w.shape[1]


def bench_video(args, has_comfy, out):
    lt, lh, lw = (int(v) for v in args.video_latent.split("x"))
    z4 = vm.video_latent(lt, lh, lw, seed=6).to(DEV)
    grids = parse_grids(args.video_grids)
    which = set(args.video_models.split(","))
    unknown = which - {"wan", "wan22", "hunyuan", "ltx", "mochi"}
    if unknown:
        raise SystemExit(f"--video-models: unknown {sorted(unknown)}; known: wan,wan22,hunyuan,ltx,mochi")
    wan_bounds = [1 + 4 * (a - 1) for a, _ in vae.video_chunks(lt)[1:]]
    models = []     # (label, fsm, latent, time-chunk starts (output frames), encode too)
    if "wan" in which:
        dec, enc = _dev(vm.wan_decoder(seed=5)), _dev(vm.wan_encoder(seed=7))
        # WanVAE's 1x1x1 convs around the latent: conv1 after the encoder, conv2 before the decoder
        conv1 = _dev(vm.sane_init(vm.CausalConv3d(8, 8, 1), seed=8))
        conv2 = _dev(vm.sane_init(vm.CausalConv3d(4, 4, 1), seed=10))
        fsm = Fsm(lambda a, d=dec, c=conv2: vm.wan_decode(d, a, c), lambda x, e=enc, c=conv1: vm.wan_encode(e, x, c)[:, :4],
                  decoder=dec, encoder=enc, conv1=conv1, conv2=conv2)
        models.append(("ours-Wan2.1-shaped", fsm, z4, wan_bounds, True))
        if has_comfy:
            models.append(("ComfyUI Wan2.1 WanVAE", _dev(vm.comfy_wan_vae(seed=5)), z4, wan_bounds, True))
    if "wan22" in which:
        found, missing = wan22_fsm(has_comfy)
        for label, why in missing:
            print(f"\nvideo {label}: skipped ({why})")
            out["skipped"][label] = why
        for label, fsm in found:
            z22 = vm.video_latent(lt, lh, lw, seed=33)
            c = latent_channels(fsm)
            z22 = z22.repeat(1, -(-c // z22.shape[1]), 1, 1, 1)[:, :c].to(DEV)
            models.append((label, fsm, z22, wan_bounds, callable(getattr(fsm, "encode", None))))
    if "hunyuan" in which:
        hy = [("ours-Hunyuan-shaped", _dev(vm.hunyuan_decoder(seed=14)))]
        if has_comfy:
            hy.append(("ComfyUI Decoder(conv3d)", _dev(vm.comfy_video_decoders(seed=16)["hunyuan"])))
        for label, dec in hy:
            models.append((label, Fsm(dec, decoder=dec, post_quant_conv=None), z4,
                           [2 * a - 1 for a in range(2, lt, 2)], False))
    if "ltx" in which:
        # LTX's receptive field is ~8 latent px: a latent twice as large in space, so tiles are not all halo
        dec = _dev(vm.ltx_decoder(seed=8))
        models.append(("ours-LTX-shaped", Fsm(dec, decoder=dec), vm.video_latent(lt, 2 * lh, 2 * lw, seed=9).to(DEV),
                       [], False))
        if has_comfy:
            m = _dev(vm.comfy_ltx_vae(seed=18))
            zl = torch.randn(1, 128, lt, lh, lw, generator=torch.Generator().manual_seed(19)).to(DEV)
            models.append(("ComfyUI LTX VideoVAE", m, zl, [], False))
    if "mochi" in which:
        mo = [("ours-Mochi-shaped", _dev(vm.mochi_decoder(seed=21)))]
        if has_comfy:
            mo.append(("ComfyUI Mochi Decoder", _dev(vm.comfy_video_decoders(seed=1)["mochi"])))
        for label, dec in mo:
            models.append((label, Fsm(dec, decoder=dec), z4, [], False))
    for label, fsm, z, bounds, enc in models:
        ref = bench_video_model(label, fsm, z, bounds, args, has_comfy, out, grids)
        if enc and ref is not None and not args.no_encode:
            t = 1 + 4 * ((ref.shape[2] - 1) // 4)
            v = vm.video_frames(t, ref.shape[3], ref.shape[4], seed=9).to(DEV)
            bench_video_encode(label, fsm, v, args, has_comfy, out, grids)


# ---------------------------------------------------------------------------------- main

def parse_grids(text):
    """"1x2,2x3" -> [(1, 2), (2, 3)]; ValueError naming the bad entry."""
    out = []
    for g in text.split(","):
        parts = g.split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise ValueError(f"grid {g!r} is not ROWSxCOLS")
        out.append((int(parts[0]), int(parts[1])))
    return out


def worst(f, rs, key):
    vals = [r[key] for r in rs if r.get(key) is not None and r[key] == r[key]]
    return f(vals) if vals else None


def summarize(args, has_comfy, rows, enc_rows, peaks, traffic, video):
    ours = [r for r in rows if r["path"] == "ours"]
    comfy = [r for r in rows if r["path"] == "comfy"]
    vrows = video["rows"]
    vours = [r for r in vrows if r["path"] == "ours"]
    vcomfy = [r for r in vrows if r["path"] == "comfy"]
    vdec = [r for r in vours if r["direction"] == "decode"]
    venc = [r for r in vours if r["direction"] == "encode"]
    halo = [r for r in vours if r["fn"] == "decode_video_halo_tiled"]
    sync_rows = ours + enc_rows + [r for r in vours if r["fn"] != "decode_video_halo_tiled"]
    all_ours = ours + enc_rows + vours
    all_peaks = peaks + video["peaks"]
    vt = video["traffic"]
    summary = {
        "device": str(DEV),
        "device_name": torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else "cpu",
        "repeat": args.repeat,
        "psnr_min_db": worst(min, ours, "psnr"),
        "psnr_min_db_comfy_tiled": worst(min, comfy, "psnr"),
        "video_psnr_min_db": worst(min, vours, "psnr"),
        "video_decode_psnr_min_db": worst(min, vdec, "psnr"),
        "video_encode_psnr_min_db": worst(min, venc, "psnr"),
        "video_psnr_min_db_comfy_tiled": worst(min, [r for r in vcomfy if r["direction"] == "decode"], "psnr"),
        "video_encode_psnr_min_db_comfy_tiled": worst(min, [r for r in vcomfy if r["direction"] == "encode"], "psnr"),
        "compute_vs_untiled_max": worst(max, all_ours, "xflop"),
        "compute_vs_untiled_max_layer_sync": worst(max, sync_rows, "xflop"),
        "compute_vs_untiled_max_halo": worst(max, halo, "xflop"),
        "compute_vs_untiled_max_video_encode": worst(max, venc, "xflop"),
        "compute_vs_untiled_max_comfy": worst(max, comfy + vcomfy, "xflop"),
        "cpu_time_vs_untiled_max": worst(max, all_ours, "xtime"),
        "wall_median_vs_untiled_max": worst(max, all_ours, "xwall"),
        "wall_median_vs_untiled_min": worst(min, all_ours, "xwall"),
        "wall_median_vs_untiled_max_image": worst(max, ours, "xwall"),
        "wall_median_vs_untiled_max_video": worst(max, vours, "xwall"),
        "wall_median_vs_untiled_max_comfy": worst(max, comfy + vcomfy, "xwall"),
        "seam_max": worst(max, all_ours, "seam"),
        "seam_max_comfy": worst(max, comfy + vcomfy, "seam"),
        "seam_t_max": worst(max, [r for r in vours if r["direction"] == "decode"], "seam_t"),
        "seam_t_max_comfy": worst(max, [r for r in vcomfy if r["direction"] == "decode"], "seam_t"),
        "encode_psnr_min_db": worst(min, enc_rows, "psnr"),
        "peak_kind": "cuda.max_memory_allocated" if DEV.type == "cuda" else "LiveBytes (live tensor bytes)",
        "peak_vs_untiled_max": worst(max, ours + vours, "peak_vs_untiled"),
        "peak_measured_over_planned_max": worst(max, [dict(x=p["measured"] / p["planned"]) for p in peaks
                                                      if p["planned"]], "x"),
        "peak_vs_budget_max": worst(max, [dict(x=p["measured"] / p["budget"]) for p in all_peaks], "x"),
        "peak_budget_pass": all(p["ok"] for p in all_peaks) if all_peaks else None,
        "peak_budget_rows": len(all_peaks),
        "host_store_mib_16_tiles": round(traffic["4x4"] / 2**20, 1) if traffic else None,
        "store_h2d_d2h_mib_max": round(max((t["h2d"] + t["d2h"]) / 2**20 for t in vt), 2) if vt else None,
        "store_host_vs_device_wall_max": worst(max, [dict(x=t["wall_host"][1] / t["wall_device"][1]) for t in vt], "x"),
        "store_extra_ms_max": worst(max, [dict(x=t["extra_ms"]) for t in vt], "x"),
        "video_paths": video["paths"],
        "video_skipped": video["skipped"],
        "tiles": sorted({r["tiles"] for r in ours}),
        "comfyui": has_comfy,
    }
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}


def main(argv=None):
    global DEV, QUICK
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when torch.cuda.is_available())")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per path, interleaved (>= 3)")
    ap.add_argument("--latent", default="16x24")
    ap.add_argument("--png", default=None)
    ap.add_argument("--video-png", default=None, help="write Wan video frames at time-chunk boundaries: untiled, "
                    "ours, ComfyUI's 3-D tiled, differences")
    ap.add_argument("--no-comfy", action="store_true", help="leave ComfyUI's classes and tiled algorithms out")
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke: no per-row LiveBytes peaks, fewer budgets in the peak tables")
    ap.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 in convs/matmuls (default off: fp32 exact)")
    ap.add_argument("--video-latent", default="5x8x12", help="T x H x W latent frames/px")
    ap.add_argument("--no-video", action="store_true")
    ap.add_argument("--no-image", action="store_true", help="video rows only (the JSON then has no image keys)")
    ap.add_argument("--no-encode", action="store_true", help="no video encode rows")
    ap.add_argument("--grids", default=",".join(f"{r}x{c}" for r, c in GRIDS), help="image tile grids")
    ap.add_argument("--video-grids", default="1x2,2x3,3x4")
    ap.add_argument("--video-models", default="wan,wan22,hunyuan,ltx,mochi")
    args = ap.parse_args(argv)
    try:
        GRIDS[:] = parse_grids(args.grids)
        parse_grids(args.video_grids)
        dims = [int(v) for v in args.latent.split("x")] + [int(v) for v in args.video_latent.split("x")]
    except ValueError as e:
        ap.error(f"--grids / --video-grids / --latent / --video-latent: {e}")
    if len(dims) != 5 or min(dims) < 1:
        ap.error(f"--latent is HxW and --video-latent TxHxW, positive ints; got {args.latent!r}, {args.video_latent!r}")
    if args.repeat < 3:
        ap.error(f"--repeat must be >= 3 (min/median/max), got {args.repeat}")
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev not in ("cuda", "cpu") and not dev.startswith("cuda:"):
        ap.error(f"--device must be cuda, cuda:N or cpu, got {dev!r}")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"skipped": f"--device {dev}: torch.cuda.is_available() is False (torch {torch.__version__}, "
                                     f"CUDA {torch.version.cuda})"}))
        return 3
    DEV = torch.device(dev)
    QUICK = args.quick
    if DEV.type == "cuda":
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        print(f"device {DEV}: {torch.cuda.get_device_name(DEV)}, TF32 {'on' if args.tf32 else 'off'}")
    torch.set_num_threads(args.threads)
    lh, lw = (int(v) for v in args.latent.split("x"))
    why = "--no-comfy" if args.no_comfy else vm.comfy_available()
    has_comfy = why is None
    if not has_comfy:
        print(f"ComfyUI: skipped ({why})")
    z = vm.test_card_latent(lh, lw, seed=3).to(DEV)
    rows, enc_rows = [], []
    dec = _dev(vm.sd_decoder(seed=1))
    peaks, traffic = [], {}
    video = {"rows": [], "peaks": [], "traffic": [], "paths": {}, "skipped": {}}
    if not args.no_image:
        ref = bench_model("ours-SD-shaped", dec, z, args, has_comfy, rows)
        if has_comfy:
            bench_model("ComfyUI Decoder", _dev(vm.comfy_decoder(seed=11)), z, args, True, rows)
        bench_encode(_dev(vm.sd_encoder(seed=2)), ref.clamp(-1, 1), args, enc_rows)
        peaks = bench_peak(dec, z)
        traffic = bench_transfer(dec, z, [(1, 2), (3, 3), (4, 4)])
        tr = store_traffic("ours-SD-shaped 4x4", lambda st: vae.decode_tiled(dec, z, budget_bytes=BIG, grid=(4, 4),
                                                                             store_device=st), args.repeat)
        if tr is not None:
            video["traffic"].append(tr)
    if not args.no_video:
        bench_video(args, has_comfy, video)
    if args.png:
        write_png(args.png, _dev(vm.comfy_decoder(seed=11)) if has_comfy else dec, has_comfy, lh, lw)
    if args.video_png:
        write_video_png(args.video_png, has_comfy)
    print(json.dumps(summarize(args, has_comfy, rows, enc_rows, peaks, traffic, video)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
