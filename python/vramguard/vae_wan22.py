"""Wan 2.2's video VAE (ComfyUI comfy.ldm.wan.vae2_2.WanVAE), tiled layer by layer: the untiled
result to float rounding.

    video = vae_wan22.decode_wan22_tiled(fsm.decoder, latent, budget_bytes=2 << 30, conv2=fsm.conv2)
    mean_logvar = vae_wan22.encode_wan22_tiled(fsm.encoder, video, budget_bytes=2 << 30, conv1=fsm.conv1)

What differs from Wan 2.1 (vae.py's _wan_* walkers, reused here):
- the video is patchified 2x2 into 12 channels before the encoder, and the decoder's 12 output
  channels are unpatchified (both pure rearrangements, done on the store);
- WanVAE.decode runs the decoder on one latent frame at a time (the first with first_chunk=True),
  WanVAE.encode runs frame 0, then chunks of 4 frames (frames past 1 + 4N unused), no deferral;
- every causal conv's cache is the last 2 frames of its input, and when a chunk brings a single
  frame the previous cache's last frame is kept before it (vae2_2.ResidualBlock, Encoder3d /
  Decoder3d conv1 and head, Resample upsample3d): _History does this for the keys it is given;
- the decoder's Up_ResidualBlock adds a DupUp3D shortcut of its input (channel groups repeated
  into 2x2 px and, for time upsampling, 2 frames, the first dropped on the first chunk), the
  encoder's Down_ResidualBlock an AvgDown3D shortcut (the reverse, averaged; frames padded at the
  front of the chunk).  Both are local per px block: one step each over the same tiles, halo 0.
Norms are RMS norms over channels (per pixel) and the mid attention is per frame (queries by tile
against K/V of the whole frame), so each layer over spatial tiles is exact.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

from .vae import (GridPlan, VaeTilingError, _check_budget, _check_video_input, _check_video_plan, _cls, _grid_arg,
                  _grid_cap, _unpatchify, _VideoRun, _wan_downsample, _wan_resample, _wan_residual, _wan_walk,
                  check_frames, grid_rects)

__all__ = ["decode_wan22_tiled", "encode_wan22_tiled", "plan_wan22_grid", "plan_wan22_encode_grid",
           "check_wan22_decoder", "check_wan22_encoder", "is_wan22", "wan22_encode_chunks", "PATCH"]

log = logging.getLogger("vramguard")

PATCH = 2   # WanVAE.encode / decode: patchify(x, patch_size=2), unpatchify(out, patch_size=2)


class _History(dict):
    """vae2_2's cache rule for the keys given (ids of causal convs and upsample3d Resamples): a
    cache set from a single-frame chunk keeps the previous cache's last frame before it."""

    def __init__(self, keys: set[int]) -> None:
        super().__init__()
        self.keys_ = keys

    def __setitem__(self, k: Any, v: Any) -> None:
        old = self.get(k)
        if k in self.keys_ and hasattr(v, "shape") and v.shape[2] < 2 and hasattr(old, "shape"):
            import torch
            v = torch.cat([old[:, :, -1:].to(v.device), v], 2)
        super().__setitem__(k, v)


def _run(rects: list, device: Any, store: Any, progress: Any, model: Any, grid: tuple[int, int] | None = None,
         cap: int = 0) -> _VideoRun:
    run = _VideoRun(rects, device, store, progress, grid=grid, cap=cap)
    keys = {id(m) for m in model.modules()
            if (_cls(m) == "CausalConv3d" and m.weight.shape[2] > 1) or getattr(m, "mode", None) == "upsample3d"}
    run.cache = _History(keys)
    return run


# ---------------------------------------------------------------------------------- layout checks

def _check_model(model: Any, what: str, parts: tuple[str, str]) -> None:
    import torch
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{what} must be a torch.nn.Module, got {type(model).__name__}")
    missing = [n for n in ("conv1", *parts, "head") if not hasattr(model, n)]
    if missing:
        raise VaeTilingError(f"{what} {type(model).__name__} lacks {missing}: not a Wan 2.2-shaped {what}")
    if _cls(model.conv1) != "CausalConv3d":
        raise VaeTilingError(f"{what} {type(model).__name__}: conv1 is {_cls(model.conv1)}, not CausalConv3d")
    head = list(model.head)
    if [_cls(m) for m in head] != ["RMS_norm", "SiLU", "CausalConv3d"]:
        raise VaeTilingError(f"{what} {type(model).__name__}: head is {[_cls(m) for m in head]}, not "
                             "RMS_norm, SiLU, CausalConv3d")
    for m in model.middle:
        if _cls(m) not in ("ResidualBlock", "AttentionBlock"):
            raise VaeTilingError(f"unsupported layer {_cls(m)} in the middle of a Wan 2.2 {what}")


def _check_block(blk: Any, where: str, inner: str, shortcut: str, modes: tuple[str, ...]) -> None:
    """An Up_/Down_ResidualBlock: ResidualBlocks then at most one Resample (a mode in modes); its
    DupUp3D / AvgDown3D shortcut with the Resample's factors (2x2 px; 2 frames for the 3d modes)."""
    layers = list(getattr(blk, inner, []))
    if not layers:
        raise VaeTilingError(f"{where} {_cls(blk)} has no {inner}")
    for i, m in enumerate(layers):
        if _cls(m) == "ResidualBlock" and len(getattr(m, "residual", ())) == 7:
            continue
        if _cls(m) == "Resample" and i == len(layers) - 1 and getattr(m, "mode", None) in modes:
            continue
        raise VaeTilingError(f"unsupported {_cls(m)} {getattr(m, 'mode', '')} at {where}.{inner}.{i}")
    mode = layers[-1].mode if _cls(layers[-1]) == "Resample" else "none"
    sc = getattr(blk, "avg_shortcut", None)
    want_s = 1 if mode == "none" else 2
    want_t = 2 if mode.endswith("3d") else 1
    if sc is None:
        if shortcut == "DupUp3D" and mode == "none":
            return
        raise VaeTilingError(f"{where}: {_cls(blk)} without its {shortcut} shortcut")
    if _cls(sc) != shortcut or (sc.factor_s, sc.factor_t) != (want_s, want_t):
        raise VaeTilingError(f"{where}: shortcut {_cls(sc)} with factors (s {getattr(sc, 'factor_s', '?')}, "
                             f"t {getattr(sc, 'factor_t', '?')}) does not match its Resample {mode!r}")
    if mode.startswith("down"):
        c = layers[-1].resample[1]
        if (_cls(layers[-1].resample[0]) != "ZeroPad2d" or tuple(layers[-1].resample[0].padding) != (0, 1, 0, 1)
                or tuple(c.stride) != (2, 2) or tuple(c.kernel_size) != (3, 3) or tuple(c.padding) != (0, 0)):
            raise VaeTilingError(f"{where}: a Resample that is not ZeroPad2d((0, 1, 0, 1)) + 3x3 stride 2")


def is_wan22(model: Any) -> bool:
    """True for a decoder / encoder shaped as vae2_2's Decoder3d / Encoder3d (an up / down path of
    Up_ / Down_ResidualBlocks), supported or not: check_wan22_decoder / _encoder say which."""
    import torch
    for part, cls in (("upsamples", "Up_ResidualBlock"), ("downsamples", "Down_ResidualBlock")):
        seq = getattr(model, part, None) if isinstance(model, torch.nn.Module) else None
        if isinstance(seq, torch.nn.Module) and any(_cls(m) == cls for m in seq.children()):
            return True
    return False


def check_wan22_decoder(decoder: Any) -> None:
    """VaeTilingError (TypeError: not a module) naming the module unless decoder is a Wan 2.2-shaped
    Decoder3d this path runs exactly."""
    _check_model(decoder, "decoder", ("middle", "upsamples"))
    for i, blk in enumerate(decoder.upsamples):
        if _cls(blk) != "Up_ResidualBlock":
            raise VaeTilingError(f"unsupported layer {_cls(blk)} at decoder.upsamples.{i} (Wan 2.2: Up_ResidualBlock)")
        _check_block(blk, f"decoder.upsamples.{i}", "upsamples", "DupUp3D", ("upsample2d", "upsample3d", "none"))
    if decoder.head[-1].weight.shape[0] % (PATCH * PATCH):
        raise VaeTilingError(f"decoder head has {decoder.head[-1].weight.shape[0]} channels: not {PATCH}x{PATCH} "
                             "patches")


def check_wan22_encoder(encoder: Any) -> None:
    """VaeTilingError (TypeError: not a module) naming the module unless encoder is a Wan 2.2-shaped
    Encoder3d (Down_ResidualBlocks with AvgDown3D shortcuts) this path runs exactly."""
    _check_model(encoder, "encoder", ("downsamples", "middle"))
    for i, blk in enumerate(encoder.downsamples):
        if _cls(blk) != "Down_ResidualBlock":
            raise VaeTilingError(f"unsupported layer {_cls(blk)} at encoder.downsamples.{i} (Wan 2.2: "
                                 "Down_ResidualBlock)")
        _check_block(blk, f"encoder.downsamples.{i}", "downsamples", "AvgDown3D", ("downsample2d", "downsample3d",
                                                                                  "none"))
    if encoder.conv1.weight.shape[1] % (PATCH * PATCH):
        raise VaeTilingError(f"encoder conv1 takes {encoder.conv1.weight.shape[1]} channels: not {PATCH}x{PATCH} "
                             "patches")


def _resample_of(blk: Any, inner: str) -> Any:
    last = list(getattr(blk, inner))[-1]
    return last if _cls(last) == "Resample" else None


def _downscale(encoder: Any) -> int:
    return 2 ** sum(1 for b in encoder.downsamples
                    if _resample_of(b, "downsamples") is not None and _resample_of(b, "downsamples").mode != "none")


def _upscale(decoder: Any) -> int:
    return 2 ** sum(1 for b in decoder.upsamples
                    if _resample_of(b, "upsamples") is not None and _resample_of(b, "upsamples").mode != "none")


# ---------------------------------------------------------------------------------- patches

def _patchify(x: Any) -> Any:
    """vae2_2.patchify: b c f (h q) (w r) -> b (c r q) f h w."""
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * PATCH * PATCH, f, h // PATCH, w // PATCH)


# ---------------------------------------------------------------------------------- the walks

def _add(run: _VideoRun, a: Any, b: Any, res: int) -> Any:
    return run.step(lambda x, y: x + y, [a, b], res, 1, a.shape[1], 0, a.shape[2])


def _up_block(run: _VideoRun, blk: Any, x: Any, res: int, first: bool) -> tuple[Any, int]:
    """Up_ResidualBlock.forward: its ResidualBlocks and Resample (caches), plus DupUp3D(x)."""
    h, r = x, res
    for m in blk.upsamples:
        if _cls(m) == "ResidualBlock":
            h = _wan_residual(run, m, h, r)
        else:
            h, r = _wan_resample(run, m, h, r)
    sc = blk.avg_shortcut
    if sc is None:
        return h, r
    s = run.step(lambda xs: sc(xs, first), [x], res, sc.factor_s, sc.out_channels, 0, h.shape[2])
    return _add(run, h, s, r), r


def _down_block(run: _VideoRun, blk: Any, x: Any, res: int) -> tuple[Any, int]:
    """Down_ResidualBlock.forward: its ResidualBlocks and Resample, plus AvgDown3D(x).  Wan 2.2's
    downsample3d is 2.1's without the deferral (chunks of 4 frames): _wan_downsample, final."""
    h, r = x, res
    for m in blk.downsamples:
        if _cls(m) == "ResidualBlock":
            h = _wan_residual(run, m, h, r)
        else:
            h = _wan_downsample(run, m, h, r, True)
            r = r if m.mode == "none" else r // 2
    sc = blk.avg_shortcut
    s = run.step(sc, [x], res, 1, sc.out_channels, 0, h.shape[2], den=sc.factor_s)
    return _add(run, h, s, r), r


def _decode_chunk(run: _VideoRun, decoder: Any, x: Any, first: bool) -> Any:
    return _wan_walk(run, decoder, [*decoder.middle, *decoder.upsamples], x, 1,
                     lambda run, blk, h, res: _up_block(run, blk, h, res, first))


def _encode_chunk(run: _VideoRun, encoder: Any, x: Any) -> Any:
    return _wan_walk(run, encoder, [*encoder.downsamples, *encoder.middle], x, _downscale(encoder), _down_block)


def wan22_encode_chunks(t: int) -> list[tuple[int, int]]:
    """WanVAE.encode's (vae2_2) input-frame chunks: frame 0, then 4 at a time up to 1 + 4 ((t - 1) // 4)."""
    check_frames(t)
    return [(0, 1)] + [(1 + 4 * (i - 1), 1 + 4 * i) for i in range(1, 1 + (t - 1) // 4)]


# ---------------------------------------------------------------------------------- planning

class _Cost:
    """A working-set model (elements, batch 1) per time chunk on a th x tw latent-px tile:
    fixed + per_frame + per_px th tw + per_edge (th + tw), as vae._video_cost: each step reads its
    chunk frames plus 2 cached ones with its halo and writes its output; attention holds K/V of
    whole frames."""

    def __init__(self, h: int, w: int) -> None:
        self.h, self.w = h, w
        self.per_px = self.per_edge = self.fixed = self.per_frame = 0.0

    def conv(self, cin: int, cout: int, r_in: int, r_out: int, t_in: int, t_out: int, halo: int = 2,
             work: float = 3.0, cached: int = 2) -> None:
        """halo: px before + after at r_in."""
        t_read = t_in + cached
        e_out = halo * r_out / r_in + 2
        self.per_px = max(self.per_px, work * (cin * t_read * r_in * r_in + cout * t_out * r_out * r_out))
        self.per_edge = max(self.per_edge, work * (cin * t_read * r_in * halo + cout * t_out * r_out * e_out))
        self.fixed = max(self.fixed, work * (cin * t_read * halo * halo + cout * t_out * e_out * e_out))

    def block(self, m: Any, r: int, t: int) -> None:
        """A ResidualBlock or AttentionBlock at resolution r, t frames."""
        if _cls(m) == "ResidualBlock":
            for c in (c for c in m.residual if _cls(c) == "CausalConv3d"):
                self.conv(c.weight.shape[1], c.weight.shape[0], r, r, t, t)
        else:
            c = m.proj.weight.shape[0]
            self.per_frame = max(self.per_frame, 2.0 * t * c * self.h * self.w * r * r)
            self.per_px = max(self.per_px, t * r * r * (4.0 * c + self.h * self.w * r * r))


def _decode_cost(decoder: Any, h: int, w: int) -> _Cost:
    """Per latent frame (WanVAE.decode's chunk); a later chunk's frames double at each upsample3d."""
    k = _Cost(h, w)
    r, t = 1, 1
    k.conv(decoder.conv1.weight.shape[1], decoder.conv1.weight.shape[0], 1, 1, 1, 1)
    for m in decoder.middle:
        k.block(m, r, t)
    for blk in decoder.upsamples:
        for m in blk.upsamples:
            if _cls(m) != "Resample":
                k.block(m, r, t)
            elif m.mode != "none":
                c = m.resample[1]
                t2 = 2 * t if m.mode == "upsample3d" else t
                k.conv(c.weight.shape[1], c.weight.shape[0], r, 2 * r, t, t2, work=4.0)   # + time conv, upsample
                r, t = 2 * r, t2
        if blk.avg_shortcut is not None:
            k.conv(blk.avg_shortcut.in_channels, blk.avg_shortcut.out_channels, r // 2, r, t, t, halo=0, work=2.0,
                   cached=0)
    k.conv(decoder.head[-1].weight.shape[1], decoder.head[-1].weight.shape[0], r, r, t, t)
    return k


def _encode_cost(encoder: Any, h: int, w: int) -> _Cost:
    """Per chunk of 4 input frames (WanVAE.encode's); frames halve at each downsample3d."""
    k = _Cost(h, w)
    r, t = _downscale(encoder), 4
    k.conv(encoder.conv1.weight.shape[1], encoder.conv1.weight.shape[0], r, r, t, t)
    for blk in encoder.downsamples:
        r0, t0 = r, t
        for m in blk.downsamples:
            if _cls(m) != "Resample":
                k.block(m, r, t)
            elif m.mode != "none":
                c = m.resample[1]
                t2 = t // 2 if m.mode == "downsample3d" else t
                k.conv(c.weight.shape[1], c.weight.shape[0], r, r // 2, t, t, halo=1, work=4.0, cached=1)
                r, t = r // 2, max(1, t2)
        sc = blk.avg_shortcut
        k.conv(sc.in_channels, sc.out_channels, r0, r, t0, t, halo=0, work=2.0, cached=0)
    for m in encoder.middle:
        k.block(m, r, t)
    k.conv(encoder.head[-1].weight.shape[1], encoder.head[-1].weight.shape[0], r, r, t, t)
    return k


def _plan(k: _Cost, h: int, w: int, chunks: int, mult: int, budget: int, what: str) -> GridPlan:
    from . import _native
    r = _native.plan(w, h, overlap=0, align=1, feather=0.0, per_px_bytes=k.per_px * mult,
                     per_edge_bytes=k.per_edge * mult, per_frame_bytes=(k.per_frame + k.fixed) * mult,
                     budget=budget, depth=chunks, depth_min=1, depth_max=1)
    if not r["fits"]:
        raise VaeTilingError(f"nothing fits in budget_bytes={budget} for the Wan 2.2 {what}: {r['why']}")
    cols, rows, n = r["grid"]
    return GridPlan(rows, cols, int(math.ceil(r["predicted_peak_bytes"])), frames=1, chunks=n)


def plan_wan22_grid(decoder: Any, h: int, w: int, *, budget_bytes: int, batch: int = 1, elem: int = 4,
                    frames: int = 1) -> GridPlan:
    """Spatial tiles for a Wan 2.2 decode of an h x w latent with `frames` latent frames, from the C
    planner in space and time, the time tile pinned at WanVAE.decode's chunk (1 latent frame)."""
    h, w, mult, budget = _check_video_plan(h, w, batch, elem, frames, budget_bytes)
    check_wan22_decoder(decoder)
    return _plan(_decode_cost(decoder, h, w), h, w, frames, mult, budget, "decoder")


def plan_wan22_encode_grid(encoder: Any, h: int, w: int, *, budget_bytes: int, batch: int = 1, elem: int = 4,
                           frames: int = 1) -> GridPlan:
    """Spatial tiles for a Wan 2.2 encode (latent grid h x w; frames: the video's), the time tile
    pinned at WanVAE.encode's chunk (4 input frames; frame 0 alone)."""
    h, w, mult, budget = _check_video_plan(h, w, batch, elem, frames, budget_bytes)
    check_wan22_encoder(encoder)
    return _plan(_encode_cost(encoder, h, w), h, w, len(wan22_encode_chunks(frames)), mult, budget, "encoder")


# ---------------------------------------------------------------------------------- public API

def _grid_or_plan(grid: Any, lh: int, lw: int, plan: Callable[[], GridPlan]) -> tuple[int, int]:
    if grid is not None:
        return _grid_arg(grid, lh, lw)
    p = plan()
    return p.rows, p.cols


def _devices(x: Any, device: Any, store_device: Any) -> tuple[Any, Any]:
    import torch
    return (torch.device(device) if device is not None else x.device,
            torch.device(store_device) if store_device is not None else x.device)


def decode_wan22_tiled(decoder: Any, latent: Any, *, budget_bytes: int, grid: tuple[int, int] | None = None,
                       conv2: Any = None, device: Any = None, store_device: Any = None,
                       progress: Callable[[int], None] | None = None) -> Any:
    """Decode a (B, z, T, H, W) Wan 2.2 latent as WanVAE.decode (vae2_2) does -- conv2, the decoder
    on one latent frame at a time with its causal caches, unpatchify -- with each layer over
    spatial tiles: equals it to float rounding.  Returns (B, 3, 1 + 4 (T - 1), 16 H, 16 W) for
    Wan 2.2's layout, in [-1, 1], on store_device.  grid: (rows, cols) latent tiles, else planned
    by the C planner from budget_bytes.  A ComfyUI VAE maps on as decoder =
    first_stage_model.decoder, conv2 = first_stage_model.conv2.  progress(done): tile steps done.
    On an out-of-memory error in a tile the finished tiles are kept and the rest re-planned finer."""
    import torch
    _check_video_input(latent, "latent")
    budget = _check_budget(budget_bytes)
    check_wan22_decoder(decoder)
    b, _, t, lh, lw = latent.shape
    rows, cols = _grid_or_plan(grid, lh, lw, lambda: plan_wan22_grid(
        decoder, lh, lw, budget_bytes=budget, batch=b, elem=latent.element_size(), frames=t))
    device, store = _devices(latent, device, store_device)
    k = _decode_cost(decoder, lh, lw)
    cap = _grid_cap(k.fixed + k.per_frame, k.per_px, k.per_edge, lh, lw, rows, cols, b * latent.element_size(),
                    budget)
    run = _run(grid_rects(lh, lw, rows, cols), device, store, progress, decoder, (rows, cols), cap)
    with torch.no_grad():
        # conv2 (1x1x1) on the compute device, where the weights are: ComfyUI's LATENT stays on the CPU
        x = conv2(latent.to(device)).to(store) if conv2 is not None else latent
        outs = [_decode_chunk(run, decoder, x[:, :, i:i + 1].to(store), i == 0) for i in range(t)]
        out = _unpatchify(torch.cat(outs, 2), PATCH)
    log.info("vramguard: tiled Wan 2.2 VAE decode %dx%dx%d latent: %d one-frame chunks x %d tiles", t, lh, lw, t,
             len(run.rects))
    return out


def encode_wan22_tiled(encoder: Any, video: Any, *, budget_bytes: int, grid: tuple[int, int] | None = None,
                       conv1: Any = None, device: Any = None, store_device: Any = None,
                       progress: Callable[[int, int], None] | None = None) -> Any:
    """Encode a (B, 3, T, H, W) video ([-1, 1]; H, W multiples of 16 for Wan 2.2) as WanVAE.encode
    (vae2_2) does -- patchify, frame 0 then 4-frame chunks with the causal caches, conv1 -- with
    each layer over spatial tiles: equals it to float rounding.  Returns (B, 2 z, 1 + (T - 1) // 4,
    H / 16, W / 16): mean and logvar (ComfyUI keeps the mean).  A ComfyUI VAE maps on as encoder =
    first_stage_model.encoder, conv1 = first_stage_model.conv1.  progress(done, total): tile steps
    (total an estimate, grows on an OOM re-plan)."""
    import torch
    _check_video_input(video, "video")
    budget = _check_budget(budget_bytes)
    check_wan22_encoder(encoder)
    top = _downscale(encoder) * PATCH
    b, _, t, hh, ww = video.shape
    if hh % top or ww % top:
        raise ValueError(f"video {hh}x{ww} is not a multiple of the encoder's downscale {top} (patches included)")
    lh, lw = hh // top, ww // top
    rows, cols = _grid_or_plan(grid, lh, lw, lambda: plan_wan22_encode_grid(
        encoder, lh, lw, budget_bytes=budget, batch=b, elem=video.element_size(), frames=t))
    device, store = _devices(video, device, store_device)
    chunks = wan22_encode_chunks(t)
    n_steps = sum(1 for m in encoder.modules() if _cls(m) in ("CausalConv3d", "Resample", "AttentionBlock"))
    n_steps += 2 * len(encoder.downsamples)
    total = len(chunks) * n_steps * rows * cols
    tick = (lambda done: progress(done, max(total, done))) if progress is not None else None
    k = _encode_cost(encoder, lh, lw)
    cap = _grid_cap(k.fixed + k.per_frame, k.per_px, k.per_edge, lh, lw, rows, cols, b * video.element_size(),
                    budget)
    run = _run(grid_rects(lh, lw, rows, cols), device, store, tick, encoder, (rows, cols), cap)
    with torch.no_grad():
        x = _patchify(video.to(store))
        out = torch.cat([_encode_chunk(run, encoder, x[:, :, a:e]) for a, e in chunks], 2)
        if conv1 is not None:
            out = run.step(lambda xs: conv1(xs), [out], 1, 1, conv1.weight.shape[0], 0, out.shape[2])
    log.info("vramguard: tiled Wan 2.2 VAE encode %dx%dx%d video: %d chunks x %d tiles", t, hh, ww, len(chunks),
             len(run.rects))
    return out
