"""Seamless tiled VAE decode/encode: the untiled result, to float rounding, at one pass of compute.

    img = vae.decode_tiled(decoder, latent, budget_bytes=2 << 30)
    z = vae.encode_tiled(encoder, image, budget_bytes=2 << 30)

A VAE is not local: every GroupNorm normalises with statistics of the whole feature map and the
mid-block attention is global, so running whole tiles through the network (however wide the
feather) gives a different image. Here the network runs *layer-synchronously*: the module is
compiled into a short program of steps (one per conv between two norms, one per attention, one
per up/down-sample), each step runs tile by tile over full-size feature maps kept in a store,
and each tile reads its input with a halo of the step's own receptive field (1 px for a 3x3 conv).
While a step writes its tiles it sums, per sample and channel, x and x^2 (float64) of its output;
the next GroupNorm uses those sums, i.e. exactly the untiled statistics. Attention is done by
query tiles against K/V of the whole map (row-wise softmax is exact under query tiling). So the
only difference from untiled is summation order; the extra compute is the 1-px halos.

The price is memory traffic: the step outputs live in the store (`store_device`, default: the
compute device when they fit in the budget, else the CPU). The device holds one tile's working
set, plus K/V of the attention map (latent resolution; small).

Supported modules: ComfyUI's `comfy.ldm.modules.diffusionmodules.model.Decoder` / `Encoder`
(2-D; `conv_in`, `mid.block_1/attn_1/block_2`, `up[i].block/attn/upsample` or `down[i]...`,
`norm_out`, `conv_out`) and modules with the same attribute layout (tests/vae_models.py).
A ComfyUI `VAE` object maps on as: decoder = vae.first_stage_model.decoder, with
`post_quant_conv=vae.first_stage_model.post_quant_conv` (a 1x1 conv; None where absent); the
LATENT a graph carries is already in VAE space (the model's latent_format scale/shift is undone by
the sampler), and the decoder output is in [-1, 1]: ComfyUI's `process_output` is
`(x + 1) / 2` clamped to [0, 1], NCHW -> NHWC (`movedim(1, -1)`). For encode:
encoder = first_stage_model.encoder, `quant_conv=first_stage_model.quant_conv`, the image in
`2 * x - 1` NCHW; the result holds mean and logvar (2*z channels); ComfyUI's regulariser keeps
the mean (`z[:, :z_channels]`).

On an out-of-memory error in a tile the finished tiles of the step (and their statistics) are
kept, the rest of the grid is split finer and the run goes on: the result is unchanged.
"""
from __future__ import annotations

import itertools
import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

__all__ = ["decode_tiled", "encode_tiled", "decode_video_tiled", "encode_video_tiled", "plan_wan_encode_grid",
           "check_wan_encoder", "decode_video_halo_tiled", "decode_carried_tiled", "encode_carried_tiled", "decode_mochi_tiled", "plan_mochi_grid", "video_layout",
           "video_program", "receptive_field", "plan_grid", "plan_video_grid", "VaeTilingError", "Step",
           "compile_decoder", "compile_encoder", "run_program"]

log = logging.getLogger("vramguard")


class VaeTilingError(RuntimeError):
    """The tiled VAE gave up: the module is not a supported layout, or nothing fits."""


# ---------------------------------------------------------------------------------- program

@dataclass
class Step:
    """One layer-synchronous step: out = fn(ctx, *inputs) over full maps, run tile by tile.

    res_in/res_out: resolution of the inputs/output relative to the latent grid (integers);
    halo: (before, after) input pixels each tile reads beyond its own area; fn must map an input
    slice starting at input pixel p onto output pixels starting at p * res_out / res_in.
    kind "attn": a global attention block, run by query tiles.
    """
    name: str
    fn: Callable[..., Any] | None
    inputs: tuple[str, ...]
    output: str
    out_channels: int
    res_in: int
    res_out: int
    halo: tuple[int, int] = (1, 1)
    kind: str = "local"
    module: Any = None
    work: float = 3.0          # working-set multiplier over (input slice + output tile), for the plan
    in_channels: int = 0
    normed: tuple[str, ...] = ()   # maps this step GroupNorms (their whole-map statistics are gathered)
    # video (B, C, T, H, W) maps: output frames for t input frames; carry: fn returns (out, carry)
    # and the carry's tiles (the conv input's last frames, for the next time chunk) go to this map
    t_out: Callable[[int], int] | None = None
    carry: str | None = None
    carry_res: int = 0             # the carry's resolution (0: res_out; a strided conv's: res_in)


@dataclass
class Program:
    steps: list[Step]
    input: str
    output: str
    latent_scale: int          # input res relative to latent grid (decoder 1, encoder 8)
    out_channels: int
    needs_stats: set[str] = field(default_factory=set)
    frame_stats: bool = False  # GroupNorm per frame of a video (Mochi), not over the whole map


def _silu(x: Any) -> Any:
    import torch.nn.functional as F
    return F.silu(x)


def _resnet_steps(blk: Any, name: str, x: str, res: int, prog_steps: list[Step]) -> str:
    cin = blk.norm1.num_channels
    cout = blk.conv1.out_channels if hasattr(blk.conv1, "out_channels") else blk.conv1.weight.shape[0]

    def first(ctx: "_Ctx", xs: Any) -> Any:
        return blk.conv1(_silu(ctx.gn(blk.norm1, xs, x)))

    h = name + ".h"

    def second(ctx: "_Ctx", xs: Any, hs: Any) -> Any:
        out = blk.conv2(_silu(ctx.gn(blk.norm2, hs, h)))
        if getattr(blk, "conv_shortcut", None) is not None and getattr(blk, "use_conv_shortcut", False):
            xs = blk.conv_shortcut(xs)
        elif getattr(blk, "nin_shortcut", None) is not None:
            xs = blk.nin_shortcut(xs)
        return xs + out

    prog_steps.append(Step(name + ".a", first, (x,), h, cout, res, res, in_channels=cin,
                           normed=(x,)))
    out = name + ".out"
    prog_steps.append(Step(name + ".b", second, (x, h), out, cout, res, res, in_channels=cin + cout,
                           normed=(h,)))
    return out


def _attn_step(attn: Any, name: str, x: str, res: int, steps: list[Step]) -> str:
    c = attn.norm.num_channels
    out = name + ".out"
    steps.append(Step(name, None, (x,), out, c, res, res, halo=(0, 0), kind="attn", module=attn, in_channels=c,
                      normed=(x,)))
    return out


def _check_layout(m: Any, names: Sequence[str], what: str) -> None:
    import torch
    if not isinstance(m, torch.nn.Module):
        raise TypeError(f"{what} must be a torch.nn.Module, got {type(m).__name__}")
    missing = [n for n in names if not hasattr(m, n)]
    if missing:
        raise VaeTilingError(f"{what} {type(m).__name__} lacks {missing}: not a supported VAE layout "
                             "(ComfyUI Decoder/Encoder attribute names)")
    for sub in m.modules():
        w = getattr(sub, "weight", None)
        if isinstance(sub, (torch.nn.Conv3d,)) or (w is not None and getattr(w, "ndim", 0) == 5):
            raise VaeTilingError(f"{what} has 3-D convolutions (a video VAE): not supported by the 2-D path")


def compile_decoder(decoder: Any, post_quant_conv: Any = None) -> Program:
    """The decoder as a list of layer-synchronous steps (ComfyUI Decoder layout)."""
    _check_layout(decoder, ("conv_in", "mid", "up", "norm_out", "conv_out", "num_resolutions", "num_res_blocks"),
                  "decoder")
    steps: list[Step] = []
    cur = "z"
    if post_quant_conv is not None:
        c = post_quant_conv.weight.shape[0]
        steps.append(Step("post_quant_conv", lambda ctx, xs: post_quant_conv(xs), (cur,), "pq", c, 1, 1,
                          halo=(0, 0), in_channels=post_quant_conv.weight.shape[1]))
        cur = "pq"
    cin = decoder.conv_in.weight.shape[1]
    steps.append(Step("conv_in", lambda ctx, xs: decoder.conv_in(xs), (cur,), "conv_in",
                      decoder.conv_in.weight.shape[0], 1, 1, in_channels=cin))
    cur = "conv_in"
    cur = _resnet_steps(decoder.mid.block_1, "mid.block_1", cur, 1, steps)
    cur = _attn_step(decoder.mid.attn_1, "mid.attn_1", cur, 1, steps)
    cur = _resnet_steps(decoder.mid.block_2, "mid.block_2", cur, 1, steps)
    res = 1
    for i_level in reversed(range(decoder.num_resolutions)):
        up = decoder.up[i_level]
        for i_block in range(decoder.num_res_blocks + 1):
            cur = _resnet_steps(up.block[i_block], f"up{i_level}.block{i_block}", cur, res, steps)
            if len(up.attn) > 0:
                cur = _attn_step(up.attn[i_block], f"up{i_level}.attn{i_block}", cur, res, steps)
        if i_level != 0:
            us = up.upsample
            if getattr(us, "scale_factor", 2.0) not in (2, 2.0) or not getattr(us, "with_conv", True):
                raise VaeTilingError("decoder upsample is not nearest x2 + conv")
            c = us.conv.weight.shape[0]
            steps.append(Step(f"up{i_level}.upsample", lambda ctx, xs, us=us: us(xs), (cur,), f"up{i_level}.us",
                              c, res, res * 2, work=6.0, in_channels=c))
            cur = f"up{i_level}.us"
            res *= 2
    tanh = bool(getattr(decoder, "tanh_out", False))

    def tail(ctx: "_Ctx", xs: Any) -> Any:
        y = decoder.conv_out(_silu(ctx.gn(decoder.norm_out, xs, name_in)))
        return y.tanh() if tanh else y

    name_in = cur
    cout = decoder.conv_out.weight.shape[0]
    steps.append(Step("conv_out", tail, (cur,), "out", cout, res, res, in_channels=decoder.norm_out.num_channels,
                      normed=(cur,)))
    return _finish(Program(steps, "z", "out", 1, cout))


def compile_encoder(encoder: Any, quant_conv: Any = None) -> Program:
    """The encoder as a list of layer-synchronous steps (ComfyUI Encoder layout)."""
    _check_layout(encoder, ("conv_in", "mid", "down", "norm_out", "conv_out", "num_resolutions", "num_res_blocks"),
                  "encoder")
    res = 2 ** (encoder.num_resolutions - 1)
    steps: list[Step] = []
    steps.append(Step("conv_in", lambda ctx, xs: encoder.conv_in(xs), ("x",), "conv_in",
                      encoder.conv_in.weight.shape[0], res, res, in_channels=encoder.conv_in.weight.shape[1]))
    cur = "conv_in"
    for i_level in range(encoder.num_resolutions):
        down = encoder.down[i_level]
        for i_block in range(encoder.num_res_blocks):
            cur = _resnet_steps(down.block[i_block], f"down{i_level}.block{i_block}", cur, res, steps)
            if len(down.attn) > 0:
                cur = _attn_step(down.attn[i_block], f"down{i_level}.attn{i_block}", cur, res, steps)
        if i_level != encoder.num_resolutions - 1:
            ds = down.downsample
            if not getattr(ds, "with_conv", True):
                raise VaeTilingError("encoder downsample without conv is not supported")
            c = ds.conv.weight.shape[0]
            # Downsample pads one zero row/column at the end only: a tile starting at an even
            # pixel needs no halo before and one pixel after.
            steps.append(Step(f"down{i_level}.downsample", lambda ctx, xs, ds=ds: ds(xs), (cur,),
                              f"down{i_level}.ds", c, res, res // 2, halo=(0, 1), in_channels=c))
            cur = f"down{i_level}.ds"
            res //= 2
    cur = _resnet_steps(encoder.mid.block_1, "mid.block_1", cur, res, steps)
    cur = _attn_step(encoder.mid.attn_1, "mid.attn_1", cur, res, steps)
    cur = _resnet_steps(encoder.mid.block_2, "mid.block_2", cur, res, steps)
    name_in = cur

    def tail(ctx: "_Ctx", xs: Any) -> Any:
        return encoder.conv_out(_silu(ctx.gn(encoder.norm_out, xs, name_in)))

    cout = encoder.conv_out.weight.shape[0]
    steps.append(Step("conv_out", tail, (cur,), "conv_out", cout, res, res, in_channels=encoder.norm_out.num_channels,
                      normed=(cur,)))
    cur = "conv_out"
    if quant_conv is not None:
        steps.append(Step("quant_conv", lambda ctx, xs: quant_conv(xs), (cur,), "out", quant_conv.weight.shape[0],
                          res, res, halo=(0, 0), in_channels=cout))
        cout = quant_conv.weight.shape[0]
    else:
        steps[-1].output = "out"
    top = 2 ** (encoder.num_resolutions - 1)
    return _finish(Program(steps, "x", "out", top, cout))


def _finish(p: Program) -> Program:
    for s in p.steps:
        p.needs_stats.update(s.normed)
    return p


# ---------------------------------------------------------------------------------- execution

class _Stats:
    """Per-sample, per-channel count, mean and sum of squared deviations (M2) over everything written
    so far. Each tile gives its own mean/variance in one stable pass (torch.var_mean, the tile's
    dtype); tiles merge in float64 with Chan's parallel formula, so large means do not cancel.
    frames > 0: statistics per frame of a video (Mochi's GroupNormSpatial), shape (b, c, frames)."""

    def __init__(self, b: int, c: int, device: Any, frames: int = 0) -> None:
        import torch
        shape = (b, c, frames) if frames else (b, c)
        self.mean = torch.zeros(shape, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(shape, dtype=torch.float64, device=device)
        self.n = 0
        self.per_frame = bool(frames)

    def add(self, t: Any) -> None:
        import torch
        first = 3 if self.per_frame else 2
        nt = math.prod(t.shape[first:])
        if nt == 0:
            return
        var_t, mean_t = torch.var_mean(t, dim=tuple(range(first, t.ndim)), correction=0)
        mean_t = mean_t.to(self.mean.device, torch.float64)
        m2_t = var_t.to(self.mean.device, torch.float64) * nt
        n = self.n + nt
        delta = mean_t - self.mean
        self.mean += delta * (nt / n)
        self.m2 += m2_t + delta * delta * (self.n * nt / n)
        self.n = n


class _Ctx:
    def __init__(self, stats: dict[str, _Stats]) -> None:
        self.stats = stats
        self.cache: dict[tuple[int, str], tuple[Any, Any]] = {}
        # the halo px the current tile's input slice has (top, bottom, left, right; 0 at the map's
        # border): a step may compute its tile's output only (see run_program) instead of the slice's
        self.sides = (0, 0, 0, 0)

    def gn(self, norm: Any, x: Any, key: str) -> Any:
        """GroupNorm of a tile with the statistics of the whole map `key`."""
        import torch
        ck = (id(norm), key)
        if ck not in self.cache:
            st = self.stats[key]
            g = norm.num_groups
            b, c, *rest = st.mean.shape          # rest: (frames,) for per-frame statistics
            if c % g:
                raise VaeTilingError(f"GroupNorm {c} channels not divisible by {g} groups")
            # group = channels with equal counts: mean of means; variance = mean of the channel
            # variances + variance of the channel means (law of total variance)
            cm = st.mean.view(b, g, c // g, *rest)
            mean = cm.mean(2)
            var = ((st.m2.view(b, g, c // g, *rest) / st.n).mean(2) + ((cm - mean.unsqueeze(2)) ** 2).mean(2))
            rstd = torch.rsqrt(var.clamp_min(0.0) + norm.eps)
            mean_c = mean.repeat_interleave(c // g, dim=1)
            rstd_c = rstd.repeat_interleave(c // g, dim=1)
            if norm.weight is not None:
                w = norm.weight.to(torch.float64).to(mean_c.device).view(c, *(1,) * len(rest))
                bb = norm.bias.to(torch.float64).to(mean_c.device).view(c, *(1,) * len(rest))
                scale = rstd_c * w
                shift = bb - mean_c * scale
            else:
                scale, shift = rstd_c, -mean_c * rstd_c
            self.cache[ck] = (scale, shift)
        scale, shift = self.cache[ck]
        tail = (1,) * (x.ndim - scale.ndim)
        scale = scale.to(device=x.device, dtype=x.dtype).view(*scale.shape, *tail)
        shift = shift.to(device=x.device, dtype=x.dtype).view(*shift.shape, *tail)
        return torch.addcmul(shift, x, scale)


def _is_oom(e: BaseException) -> bool:
    from .tiling import _is_oom as tiling_is_oom
    return tiling_is_oom(e)


def _release() -> None:
    from .tiling import _release as tiling_release
    tiling_release()


Rect = tuple[int, int, int, int]   # y0, y1, x0, x1 on the latent grid


def _refine_after_oom(rects: list[Rect], k: int, what: str) -> list[Rect]:
    """After an OOM at tile k (outside the except block, whose frame held the tile's tensors):
    release the cache and split the unfinished tiles finer; the finished ones are kept."""
    _release()
    finer = [q for r in rects[k:] for q in _split(r)]
    log.warning("vramguard: tiled %s out of memory at tile %s; %d tiles done, re-planned the rest as %d "
                "smaller tiles", what, rects[k], k, len(finer))
    return rects[:k] + finer


def _halves(b: tuple[int, ...]) -> list[tuple[int, ...]]:
    """b = (lo0, hi0, lo1, hi1, ...) halved along each axis longer than 1, first axis outermost;
    [] when every axis is 1 long (a rect (y0, y1, x0, x1) or a box (t0, t1, y0, y1, x0, x1))."""
    cuts = [[a, e] if e - a < 2 else [a, (a + e) // 2, e] for a, e in zip(b[::2], b[1::2])]
    if all(len(c) == 2 for c in cuts):
        return []
    return [tuple(v for c, i in zip(cuts, idx) for v in (c[i], c[i + 1]))
            for idx in itertools.product(*(range(len(c) - 1) for c in cuts))]


def _split(r: Rect) -> list[Rect]:
    out = _halves(r)
    if not out:
        raise VaeTilingError(f"out of memory at the smallest tile (1 latent px at {r})")
    return out


def _unpatchify(y: Any, p: int) -> Any:
    """b (c r q) f h w -> b c f (h q) (w r): the unpatchify of LTX (patch_size_t 1) and of Wan 2.2."""
    if p == 1:
        return y
    b, c, f, h, w = y.shape
    y = y.reshape(b, c // (p * p), p, p, f, h, w).permute(0, 1, 4, 5, 3, 6, 2)   # c r q -> c f h q w r
    return y.reshape(b, c // (p * p), f, h * p, w * p)


def grid_rects(h: int, w: int, rows: int, cols: int) -> list[Rect]:
    """rows x cols near-equal tiles covering an h x w latent grid."""
    ys = [h * i // rows for i in range(rows + 1)]
    xs = [w * j // cols for j in range(cols + 1)]
    return [(ys[i], ys[i + 1], xs[j], xs[j + 1]) for i in range(rows) for j in range(cols)
            if ys[i + 1] > ys[i] and xs[j + 1] > xs[j]]


def _span(lo: int, hi: int, halo: tuple[int, int], n: int) -> tuple[int, int]:
    return max(0, lo - halo[0]), min(n, hi + halo[1])


def _step_bytes(s: Step, th: int, tw: int) -> int:
    """Planned device working set (elements, batch 1) of one step on a th x tw latent-px tile."""
    if s.kind == "attn":
        return 0
    hi = th * s.res_in + s.halo[0] + s.halo[1]
    wi = tw * s.res_in + s.halo[0] + s.halo[1]
    in_b = hi * wi * s.in_channels
    r = s.res_out / s.res_in
    out_b = int(hi * r + 2) * int(wi * r + 2) * s.out_channels
    return int((in_b + out_b) * s.work)


def _tile_bytes(p: Program, th: int, tw: int, batch: int, elem: int) -> int:
    """Planned device working set of one th x tw (latent px) tile: the largest over the steps."""
    return max(_step_bytes(s, th, tw) for s in p.steps) * batch * elem


def _attn_bytes(p: Program, h: int, w: int, th: int, tw: int, batch: int, elem: int) -> int:
    worst = 0
    for s in p.steps:
        if s.kind != "attn":
            continue
        n = h * w * s.res_in * s.res_in
        nq = th * tw * s.res_in * s.res_in
        c = s.in_channels
        # K, V of the whole map + one query tile's q/normed x/out + its score block
        worst = max(worst, 2 * n * c + 4 * nq * c + nq * n)
    return worst * batch * elem


@dataclass
class GridPlan:
    rows: int
    cols: int
    tile_bytes: int          # planned device working set, bytes (largest tile, largest step)
    frames: int = 0          # video: latent frames per time chunk after the first (0: an image)
    chunks: int = 0          # video: time chunks after the first

    @property
    def tiles(self) -> int:
        return self.rows * self.cols * max(1, self.chunks)


def _linear_cost(p: Program, h: int, w: int) -> tuple[float, float, float]:
    """The program's device working set (elements, batch 1) on a th x tw latent-px tile as
    fixed + per_px * th tw + per_edge * (th + tw), bounding every step from above: a step reads
    (th r + halo)(tw r + halo) input px and writes its output over the same slice, so its cost is
    area + perimeter + constant; attention adds K/V of the whole map (fixed) and a score row per
    query px.  The largest coefficient of each kind over the steps: >= every step's own cost."""
    fixed = per_px = per_edge = 0.0
    for s in p.steps:
        r, q = s.res_in, s.res_out
        if s.kind == "attn":
            n = h * w * r * r
            fixed = max(fixed, 2.0 * n * s.in_channels)
            per_px = max(per_px, r * r * (4.0 * s.in_channels + n))
            continue
        hh = s.halo[0] + s.halo[1]
        e_out = hh * q / r + 2
        per_px = max(per_px, s.work * (s.in_channels * r * r + s.out_channels * q * q))
        per_edge = max(per_edge, s.work * (s.in_channels * r * hh + s.out_channels * q * e_out))
        fixed = max(fixed, s.work * (s.in_channels * hh * hh + s.out_channels * e_out * e_out))
    return fixed, per_px, per_edge


def _native_plan(w: int, h: int, *, fixed: float, per_px: float, per_edge: float, budget: int,
                 per_frame: float = 0.0, depth: int | None = None, depth_min: int = 1) -> dict:
    """One call of the C planner (planner.c) for non-overlapping tiles: a layer-synchronous VAE
    reads each step's halo from the full map in the store, so its tiles need no overlap."""
    from . import _native
    kw: dict[str, Any] = dict(overlap=0, align=1, feather=0.0, fixed_bytes=float(fixed), per_px_bytes=float(per_px),
                              per_edge_bytes=float(per_edge), per_frame_bytes=float(per_frame), budget=budget)
    if depth is not None:
        kw.update(depth=depth, depth_min=min(depth_min, depth))
    r = _native.plan(w, h, **kw)
    if not r["fits"]:
        raise VaeTilingError(f"nothing fits in budget_bytes={budget} with at most {MAX_TILES} tiles: {r['why']}")
    return r


def plan_grid(p: Program, h: int, w: int, *, budget_bytes: int, batch: int = 1, elem: int = 4,
              tile: int | tuple[int, int] | None = None) -> GridPlan:
    """The fewest tiles whose working set fits in budget_bytes (latent grid h x w), planned by the
    C planner (vramguard._native.plan) with the program's area + perimeter cost; tile= fixes the
    tile size (latent px) instead."""
    if not isinstance(p, Program):
        raise TypeError(f"p must be a vae.Program (compile_decoder/compile_encoder), got {type(p).__name__}")
    h, w, batch, elem = _check_grid_args(h, w, batch, elem)
    budget_bytes = _check_budget(budget_bytes)
    tile = _check_tile(tile)
    if tile is not None:
        th, tw = (tile, tile) if isinstance(tile, int) else tile
        rows, cols = -(-h // th), -(-w // tw)
        th, tw = -(-h // rows), -(-w // cols)
        need = _tile_bytes(p, th, tw, batch, elem) + _attn_bytes(p, h, w, th, tw, batch, elem)
        return GridPlan(rows, cols, need)
    k = batch * elem
    fixed, per_px, per_edge = _linear_cost(p, h, w)
    r = _native_plan(w, h, fixed=fixed * k, per_px=per_px * k, per_edge=per_edge * k, budget=budget_bytes)
    cols, rows = r["grid"]
    return GridPlan(rows, cols, int(math.ceil(r["predicted_peak_bytes"])))


MAX_TILES = 65536  # as the C planner (planner.c): planning stays bounded for any input
_MAX_SIDE = 1 << 20


def _check_grid_args(h: Any, w: Any, batch: Any, elem: Any) -> tuple[int, int, int, int]:
    out = []
    for name, v, hi in (("h", h, _MAX_SIDE), ("w", w, _MAX_SIDE), ("batch", batch, 1 << 16), ("elem", elem, 16)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if not 1 <= v <= hi:
            raise ValueError(f"{name} must be 1..{hi}, got {v}")
        out.append(v)
    return out[0], out[1], out[2], out[3]


# A test hook: every tile's device work runs inside this context (tests count allocations in it).
def _tile_scope() -> Any:
    import contextlib
    return contextlib.nullcontext()


def _coarsest(p: Program, s: Step, base: list[Rect], grid: tuple[int, int] | None, lh: int, lw: int,
              budget: int | None, batch: int, elem: int) -> list[Rect]:
    """The step's tiles: `base` (the grid at the resolution that needs it), or fewer, larger tiles
    where the step's own working set still fits the budget (low-resolution steps: that saves the
    halo compute of tiny tiles)."""
    if budget is None or grid is None:
        return base
    rows, cols = grid
    for f in range(max(rows, cols), 1, -1):
        r2, c2 = -(-rows // f), -(-cols // f)
        th, tw = -(-lh // r2), -(-lw // c2)
        if s.kind == "attn":
            n, nq = lh * lw * s.res_in ** 2, th * tw * s.res_in ** 2
            need = (2 * n * s.in_channels + 4 * nq * s.in_channels + nq * n) * batch * elem
        else:
            need = _step_bytes(s, th, tw) * batch * elem
        if need <= budget:
            return grid_rects(lh, lw, r2, c2)
    return base


def _video_cap(p: Program, frames: int, lh: int, lw: int, grid: tuple[int, int], batch: int, elem: int,
               budget: int) -> int:
    """The working set (bytes) a 5-D program's grid is planned for: the largest step on a grid
    tile at the step's own frame count (from `frames` input frames), as run_program's _coarsest
    counts a step; capped at the budget.  Steps that fit it over fewer tiles merge them."""
    th, tw = -(-lh // grid[0]), -(-lw // grid[1])
    t = {p.input: frames}
    worst = 0
    for s in p.steps:
        t_in = t.get(s.inputs[0], frames)
        t[s.output] = s.t_out(t_in) if s.t_out is not None else t_in
        if s.kind != "attn":
            worst = max(worst, _step_bytes(s, th, tw) * max(t_in, t[s.output]))
    return min(budget, worst * batch * elem)


def run_program(p: Program, x: Any, *, rects: list[Rect], device: Any = None, store_device: Any = None,
                progress: Callable[[int, int], None] | None = None, budget: int | None = None,
                grid: tuple[int, int] | None = None, carries: dict[str, Any] | None = None) -> Any:
    """Run a compiled program tile by tile; returns the output map on store_device.

    rects: the tiles (latent px) at the step that needs the most memory; with budget and grid
    given, steps that fit in fewer tiles of the same grid (merged f x f) use those.  x is NCHW, or
    (B, C, T, H, W) for a video program (tiles in space, every frame of the chunk); carries: maps
    the steps read by name (the previous time chunk's carries), updated with the ones they write."""
    import torch
    if x.ndim not in (4, 5):
        raise ValueError(f"expected an NCHW or (B, C, T, H, W) tensor, got shape {tuple(x.shape)}")
    b = x.shape[0]
    if x.shape[-2] % p.latent_scale or x.shape[-1] % p.latent_scale:
        raise ValueError(f"input {x.shape[-2]}x{x.shape[-1]} is not a multiple of {p.latent_scale}")
    lh, lw = x.shape[-2] // p.latent_scale, x.shape[-1] // p.latent_scale
    device = torch.device(device) if device is not None else x.device
    store = torch.device(store_device) if store_device is not None else x.device
    carries = {} if carries is None else carries
    maps: dict[str, Any] = {**carries, p.input: x.to(store)}
    stats: dict[str, _Stats] = {}
    last_use: dict[str, int] = {}
    for i, s in enumerate(p.steps):
        for n in s.inputs:
            last_use[n] = i
    if p.input in p.needs_stats:
        st = _Stats(b, x.shape[1], store, x.shape[2] if p.frame_stats else 0)
        st.add(x)
        stats[p.input] = st
    ctx = _Ctx(stats)
    base = list(rects)
    replanned = False
    total = 0
    done_units = 0
    for i, s in enumerate(p.steps):
        H, W = lh * s.res_out, lw * s.res_out
        Hi, Wi = lh * s.res_in, lw * s.res_in
        dtype = maps[s.inputs[0]].dtype
        frames = () if x.ndim == 4 else (maps[s.inputs[0]].shape[2],)
        if frames and s.t_out is not None:
            frames = (s.t_out(frames[0]),)
        out = torch.empty(b, s.out_channels, *frames, H, W, dtype=dtype, device=store)
        st = _Stats(b, s.out_channels, store, out.shape[2] if p.frame_stats else 0) if s.output in p.needs_stats else None
        kv = None
        if s.kind == "attn":
            kv = _attn_kv(ctx, s, maps[s.inputs[0]], device)
        per = maps[p.input].element_size() * max([1, *frames, *maps[s.inputs[0]].shape[2:-2]])
        # a video's attention (no halo: nothing to save) keeps the grid's query tiles
        keep = replanned or (x.ndim == 5 and s.kind == "attn")
        rects = base if keep else _coarsest(p, s, base, grid, lh, lw, budget, b, per)
        total += len(rects)
        k = 0
        while k < len(rects):
            y0, y1, x0, x1 = rects[k]
            oy0, oy1, ox0, ox1 = y0 * s.res_out, y1 * s.res_out, x0 * s.res_out, x1 * s.res_out
            iy0, iy1 = _span(y0 * s.res_in, y1 * s.res_in, s.halo, Hi)
            ix0, ix1 = _span(x0 * s.res_in, x1 * s.res_in, s.halo, Wi)
            oom = False
            try:
                with _tile_scope(), torch.no_grad():
                    # a carry of an upsampling step is at its output resolution: sliced at that scale
                    ins = [maps[n][..., iy0 * (f := maps[n].shape[-2] // Hi):iy1 * f, ix0 * f:ix1 * f].to(device)
                           for n in s.inputs]
                    c = None
                    ctx.sides = (y0 * s.res_in - iy0, iy1 - y1 * s.res_in, x0 * s.res_in - ix0, ix1 - x1 * s.res_in)
                    if s.kind == "attn":
                        y = _attn_tile(ctx, s, ins[0], kv)
                    elif s.carry is not None:
                        y, c = s.fn(ctx, *ins)
                    else:
                        y = s.fn(ctx, *ins)
                    r_num, r_den = s.res_out, s.res_in
                    py, px = iy0 * r_num // r_den, ix0 * r_num // r_den
                    # the output over the whole input slice, cropped -- or exactly the tile's (a step
                    # that skips the halo's outputs; with a halo the two sizes differ)
                    if y.shape[-2] != oy1 - oy0 or y.shape[-1] != ox1 - ox0:
                        y = y[..., oy0 - py:oy1 - py, ox0 - px:ox1 - px]
                    if y.shape[-2] != oy1 - oy0 or y.shape[-1] != ox1 - ox0 or y.shape[2:-2] != out.shape[2:-2]:
                        raise VaeTilingError(f"step {s.name}: tile output {tuple(y.shape)} does not cover "
                                             f"{tuple(out.shape[2:-2])} x {oy1 - oy0}x{ox1 - ox0}")
                    out[..., oy0:oy1, ox0:ox1] = y
                    if c is not None:
                        cr = s.carry_res or s.res_out
                        if s.carry not in maps or maps[s.carry].shape[:3] != c.shape[:3]:
                            maps[s.carry] = torch.empty(*c.shape[:3], lh * cr, lw * cr, dtype=c.dtype, device=store)
                        cy, cx = iy0 * cr // s.res_in, ix0 * cr // s.res_in
                        maps[s.carry][..., y0 * cr:y1 * cr, x0 * cr:x1 * cr] = \
                            c[..., y0 * cr - cy:y1 * cr - cy, x0 * cr - cx:x1 * cr - cx]
                        del c
                    if st is not None:
                        st.add(y)
                    del y, ins
            except Exception as e:   # noqa: BLE001 - only OOM is handled, the rest re-raised
                if not _is_oom(e):
                    raise
                oom = True
            if oom:
                refined = _refine_after_oom(rects, k, f"VAE step {s.name}")
                total += len(refined) - len(rects)
                # later steps: the same (finer) cover; a video's merged step leaves the grid as it was
                if x.ndim == 4 or rects is base:
                    base = refined
                rects = refined
                replanned = True
                continue
            k += 1
            done_units += 1
            if progress is not None:
                progress(done_units, total)
        maps[s.output] = out
        if st is not None:
            stats[s.output] = st
        for n in s.inputs:
            if last_use.get(n) == i and n != p.input and n not in carries:
                del maps[n]
        ctx.cache.clear()
    for s in p.steps:
        if s.carry is not None and s.carry in maps:
            carries[s.carry] = maps[s.carry]
    return maps[p.output]


def _attn_kv(ctx: _Ctx, s: Step, xfull: Any, device: Any) -> tuple[Any, Any]:
    """K and V of the whole map (1x1 convs, so computed in slices) as (B, 1, N, C)."""
    import torch
    a = s.module
    b, c = xfull.shape[:2]
    h, w = xfull.shape[-2:]
    per_row = math.prod(xfull.shape[2:]) // h        # tokens per row (every frame of a video)
    k = torch.empty(b, 1, h * per_row, c, dtype=xfull.dtype, device=device)
    v = torch.empty_like(k)
    rows = max(1, (1 << 20) // max(1, per_row * c))
    with torch.no_grad():
        for r0 in range(0, h, rows):
            # keys in row-slab order, not the map's: attention does not depend on the keys' order
            xs = ctx.gn(a.norm, xfull[..., r0:r0 + rows, :].to(device), s.inputs[0])
            n0, n1 = r0 * per_row, min(h, r0 + rows) * per_row
            k[:, 0, n0:n1] = a.k(xs).flatten(2).transpose(1, 2)
            v[:, 0, n0:n1] = a.v(xs).flatten(2).transpose(1, 2)
    return k, v


def _attn_tile(ctx: _Ctx, s: Step, xs: Any, kv: tuple[Any, Any]) -> Any:
    import torch.nn.functional as F
    a = s.module
    q = a.q(ctx.gn(a.norm, xs, s.inputs[0])).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()
    o = F.scaled_dot_product_attention(q, kv[0], kv[1])
    o = o.squeeze(1).transpose(1, 2).reshape(xs.shape)
    return xs + a.proj_out(o)


# ---------------------------------------------------------------------------------- public API

def _check_budget(budget_bytes: Any) -> int:
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int):
        raise TypeError(f"budget_bytes must be an int, got {type(budget_bytes).__name__}")
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be > 0, got {budget_bytes}")
    return budget_bytes


def _check_tile(tile: Any) -> Any:
    if tile is None:
        return None
    t = (tile, tile) if isinstance(tile, int) and not isinstance(tile, bool) else tile
    if (not isinstance(t, (tuple, list)) or len(t) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in t)):
        raise TypeError(f"tile must be an int or (rows, cols) ints in latent px, got {tile!r}")
    if min(t) < 1:
        raise ValueError(f"tile must be >= 1 latent px, got {tile!r}")
    return tuple(t)


def _check_video_input(x: Any, what: str) -> None:
    import torch
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 5 or min(x.shape) < 1:
        raise ValueError(f"{what} must be a non-empty (B, C, T, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be floating point, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} holds non-finite values")


def _grid_arg(grid: Any, lh: int, lw: int) -> tuple[int, int]:
    """An explicit (rows, cols), checked and capped at the latent size."""
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in grid)):
        raise ValueError(f"grid must be (rows, cols) ints >= 1, got {grid!r}")
    return min(grid[0], lh), min(grid[1], lw)


def _run(p: Program, x: Any, what: str, budget_bytes: Any, tile: Any, grid: Any, device: Any,
         store_device: Any, progress: Any) -> Any:
    import torch
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{what} must be a non-empty NCHW tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be floating point, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} holds non-finite values")
    budget = _check_budget(budget_bytes)
    t = _check_tile(tile)
    lh, lw = x.shape[2] // p.latent_scale, x.shape[3] // p.latent_scale
    if grid is not None:
        rows, cols = _grid_arg(grid, lh, lw)
    else:
        plan = plan_grid(p, lh, lw, budget_bytes=budget, batch=x.shape[0], elem=x.element_size(), tile=t)
        rows, cols = plan.rows, plan.cols
    rects = grid_rects(lh, lw, rows, cols)
    # Steps may merge tiles only up to the working set the grid plans for its largest step: so an
    # explicit grid keeps its meaning (and its peak) however large the budget.
    cap = min(budget, _tile_bytes(p, -(-lh // rows), -(-lw // cols), x.shape[0], x.element_size()))
    log.info("vramguard: tiled VAE %s %dx%d latent as %dx%d tiles", what, lh, lw, rows, cols)
    return run_program(p, x, rects=rects, device=device, store_device=store_device, progress=progress,
                       budget=cap, grid=(rows, cols))


def decode_tiled(decoder: Any, latent: Any, *, budget_bytes: int, tile: int | tuple[int, int] | None = None,
                 grid: tuple[int, int] | None = None, post_quant_conv: Any = None, device: Any = None,
                 store_device: Any = None, progress: Callable[[int, int], None] | None = None) -> Any:
    """Decode an NCHW latent tile by tile; equals decoder(post_quant_conv(latent)) to float rounding.

    budget_bytes: device working memory the tiles may use (the plan picks the fewest tiles that fit);
    tile: tile size in latent px (int or (rows, cols)) instead of the plan; grid: (rows, cols) tiles.
    Returns NCHW in the decoder's output range ([-1, 1] for SD-family VAEs), on store_device.
    """
    import torch
    if isinstance(latent, torch.Tensor) and latent.ndim == 5:
        return decode_carried_tiled(decoder, latent, budget_bytes=budget_bytes, grid=grid, post_quant_conv=post_quant_conv,
                                    device=device, store_device=store_device, progress=progress)
    p = compile_decoder(decoder, post_quant_conv)
    return _run(p, latent, "latent", budget_bytes, tile, grid, device, store_device, progress)


def encode_tiled(encoder: Any, image: Any, *, budget_bytes: int, tile: int | tuple[int, int] | None = None,
                 grid: tuple[int, int] | None = None, quant_conv: Any = None, device: Any = None,
                 store_device: Any = None, progress: Callable[[int, int], None] | None = None) -> Any:
    """Encode an NCHW image (the encoder's input range, [-1, 1] for SD) tile by tile.

    Height and width must be multiples of the encoder's downscale (2**(levels-1)); tile and grid
    are in latent px. Returns the encoder (+quant_conv) output: mean and logvar channels.
    """
    import torch
    if isinstance(image, torch.Tensor) and image.ndim == 5:
        from .vae_wan22 import encode_wan22_tiled, is_wan22
        if is_wan22(encoder):
            return encode_wan22_tiled(encoder, image, budget_bytes=budget_bytes, grid=grid, conv1=quant_conv,
                                      device=device, store_device=store_device, progress=progress)
    if isinstance(image, torch.Tensor) and image.ndim == 5 and not _carried(encoder):
        return encode_video_tiled(encoder, image, budget_bytes=budget_bytes, grid=grid, conv1=quant_conv,
                                  device=device, store_device=store_device, progress=progress)
    if isinstance(image, torch.Tensor) and image.ndim == 5:
        return encode_carried_tiled(encoder, image, budget_bytes=budget_bytes, grid=grid, quant_conv=quant_conv,
                                    device=device, store_device=store_device, progress=progress)
    p = compile_encoder(encoder, quant_conv)
    return _run(p, image, "image", budget_bytes, tile, grid, device, store_device, progress)


# ---------------------------------------------------------------------------------- video (Wan-shaped)
#
# Wan 2.1's decoder (ComfyUI comfy.ldm.wan.vae.Decoder3d) is causal in time and decodes chunk by
# chunk (latent frames 1, then 2, 2, ...) with per-conv caches of the last two input frames. Its
# norms are RMS norms over channels (per pixel, local), so in space only the convs and the
# per-frame mid attention reach beyond a pixel. decode_video_tiled keeps Wan's chunking and its
# caches, and inside each chunk runs every layer over spatial tiles (1-px halos; attention by query
# tiles against K/V of the whole frame), with each cache kept as whole frames in the store and
# sliced with the same halo as the tile. So caches are respected exactly, there is no seam in time
# (chunk boundaries are Wan's own) and none in space.

def _cls(m: Any) -> str:
    return type(m).__name__


def _video_layers(decoder: Any) -> list[Any]:
    _check_video(decoder)
    return [decoder.conv1, *decoder.middle, *decoder.upsamples, decoder.head]


def _check_wan_layout(model: Any, what: str, parts: tuple[str, str], modes: tuple[str, ...]) -> list[Any]:
    """A Wan-shaped Decoder3d / Encoder3d (what: "decoder" / "encoder"): conv1, the two Sequentials
    `parts` of ResidualBlock / AttentionBlock / Resample (a mode in `modes`), head; their layers."""
    import torch
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{what} must be a torch.nn.Module, got {type(model).__name__}")
    missing = [n for n in ("conv1", *parts, "head") if not hasattr(model, n)]
    if missing:
        raise VaeTilingError(f"{what} {type(model).__name__} lacks {missing}: not a Wan-shaped "
                             f"{what.capitalize()}3d")
    layers = [m for n in parts for m in getattr(model, n)]
    for m in layers:
        if _cls(m) not in ("ResidualBlock", "AttentionBlock", "Resample"):
            raise VaeTilingError(f"unsupported layer {_cls(m)} in a Wan-shaped {what}")
        if _cls(m) == "Resample" and m.mode not in modes:
            raise VaeTilingError(f"unsupported Resample mode {m.mode!r} in a {what}")
    return layers


def _check_video(decoder: Any) -> None:
    _check_wan_layout(decoder, "decoder", ("middle", "upsamples"), ("upsample2d", "upsample3d", "none"))


def _grid_cap(fixed: float, per_px: float, per_edge: float, lh: int, lw: int, rows: int, cols: int, mult: int,
              budget: int) -> int:
    """The working set (bytes) one tile of a rows x cols grid on an lh x lw latent was planned for
    (fixed + per_px area + per_edge perimeter, x mult), at most the budget: _VideoRun's cap."""
    th, tw = -(-lh // rows), -(-lw // cols)
    return min(budget, int((fixed + per_px * th * tw + per_edge * (th + tw)) * mult))


class _VideoRun:
    """Runs one Wan decoder chunk layer by layer over spatial tiles; owns the caches (whole frames).

    grid/cap: the planned (rows, cols) and the working set (bytes) its tiles were planned for: a
    step whose own working set fits cap over fewer, larger tiles of the same grid (merged f x f)
    runs on those, as run_program's steps do -- at low resolution a 4-latent-px tile is mostly
    halo, and merging saves that recompute without raising the planned peak."""

    def __init__(self, rects: list[Rect], device: Any, store: Any, progress: Any,
                 grid: tuple[int, int] | None = None, cap: int = 0) -> None:
        self.rects = rects
        self.device = device
        self.store = store
        self.cache: dict[int, Any] = {}       # id(conv) -> last input frames (full size), or "Rep"
        self.progress = progress
        self.done = 0
        self.grid = grid
        self.cap = cap
        self.base = rects
        self.lh = max((r[1] for r in rects), default=0)
        self.lw = max((r[3] for r in rects), default=0)

    def _merged(self, ins: list[Any], res: int, scale: int, den: int, out_c: int, out_frames: int,
                hb: int, ha: int) -> list[Rect]:
        """The step's tiles: the coarsest f x f merge of the grid whose working set (every input
        slice with its halo and the output, x3 for temporaries, as _video_cost counts) fits cap."""
        import torch
        if self.grid is None or self.cap <= 0 or hb + ha == 0 or self.rects is not self.base:
            return self.rects
        rows, cols = self.grid
        x0 = ins[0]
        elem = x0.shape[0] * x0.element_size()
        chans = sum(t.shape[1] * t.shape[2] for t in ins if isinstance(t, torch.Tensor))
        e_out = (hb + ha) * scale / den + 2
        for f in range(max(rows, cols), 1, -1):
            r2, c2 = -(-rows // f), -(-cols // f)
            th, tw = -(-self.lh // r2), -(-self.lw // c2)
            need = 3.0 * (chans * (th * res + hb + ha) * (tw * res + hb + ha)
                          + out_c * out_frames * (th * res * scale / den + e_out) * (tw * res * scale / den + e_out))
            if need * elem <= self.cap:
                return grid_rects(self.lh, self.lw, r2, c2)
        return self.rects

    # one layer-synchronous step over all tiles: out[tile] = fn(slices of the inputs with halo)
    def step(self, fn: Callable[..., Any], ins: list[Any], res: int, scale: int, out_c: int,
             halo: int | tuple[int, int], out_frames: int, den: int = 1) -> Any:
        """scale / den: the output resolution over the input's (a stride-2 conv: 1 / 2, its tiles
        start on even input px, as every tile edge at res >= 2 is); halo: px, or (before, after)."""
        import torch
        x0 = ins[0]
        b, _, _, hi, wi = x0.shape
        hb, ha = (halo, halo) if isinstance(halo, int) else halo
        out = torch.empty(b, out_c, out_frames, hi * scale // den, wi * scale // den, dtype=x0.dtype,
                          device=self.store)
        k = 0
        rects = self._merged(ins, res, scale, den, out_c, out_frames, hb, ha)
        while k < len(rects):
            y0, y1, c0, c1 = rects[k]
            rs = res * scale
            oy0, oy1, ox0, ox1 = y0 * rs // den, y1 * rs // den, c0 * rs // den, c1 * rs // den
            iy0, iy1 = _span(y0 * res, y1 * res, (hb, ha), hi)
            ix0, ix1 = _span(c0 * res, c1 * res, (hb, ha), wi)
            oom = False
            try:
                with _tile_scope(), torch.no_grad():
                    sl = [t[..., iy0:iy1, ix0:ix1].to(self.device) if isinstance(t, torch.Tensor) else t
                          for t in ins]
                    y = fn(*sl)
                    py, px = iy0 * scale // den, ix0 * scale // den
                    y = y[..., oy0 - py:oy1 - py, ox0 - px:ox1 - px]
                    if y.shape[-2] != oy1 - oy0 or y.shape[-1] != ox1 - ox0 or y.shape[2] != out_frames:
                        raise VaeTilingError(f"video step: tile output {tuple(y.shape)} does not cover "
                                             f"{out_frames}x{oy1 - oy0}x{ox1 - ox0}")
                    out[..., oy0:oy1, ox0:ox1] = y
                    del y, sl
            except Exception as e:   # noqa: BLE001 - only OOM is handled
                if not _is_oom(e):
                    raise
                oom = True
            if oom:
                merged = rects is not self.rects
                rects = _refine_after_oom(rects, k, "video VAE")
                if not merged:        # later steps: the same (finer) cover, merged no more
                    self.rects = rects
                self.base = None
                continue
            k += 1
            self.done += 1
            if self.progress is not None:
                self.progress(self.done)
        return out

    def conv(self, conv: Any, x: Any, res: int, pre: Callable[[Any], Any] | None = None) -> Any:
        """A CausalConv3d (optionally after a pointwise pre-op) with Wan's cache of 2 input frames."""
        cache = self.cache.get(id(conv))
        kt = conv.weight.shape[2]
        halo = (conv.weight.shape[3] - 1) // 2
        t = x.shape[2]

        # the cache holds raw input frames; pre is pointwise, so pre(cache) is what Wan cached
        def fn(xs: Any, cs: Any = None) -> Any:
            h = pre(xs) if pre is not None else xs
            if kt == 1:
                return conv(h)
            cpre = pre(cs) if (cs is not None and pre is not None) else cs
            return conv(h, cpre)

        ins = [x] if cache is None or kt == 1 else [x, cache]
        out = self.step(fn, ins, res, 1, conv.weight.shape[0], halo, t)
        if kt > 1:
            self.cache[id(conv)] = x[:, :, -2:].clone()
        return out


def _rms(norm: Any, x: Any) -> Any:
    return norm(x)


def _wan_residual(run: _VideoRun, blk: Any, x: Any, res: int) -> Any:
    import torch.nn.functional as F
    n1, _, c1, n2, _, _, c2 = list(blk.residual)
    # Wan caches the conv's *input* (after norm and SiLU): keep the pre-op output's last frames
    h = run.conv(c1, x, res, pre=lambda t: F.silu(n1(t)))
    sc = blk.shortcut

    def tail(hs: Any, xs: Any, cs: Any = None) -> Any:
        a = F.silu(n2(hs))
        ca = F.silu(n2(cs)) if cs is not None else None
        return (c2(a, ca) if ca is not None else c2(a)) + sc(xs)

    cache = run.cache.get(id(c2))
    ins = [h, x] if cache is None else [h, x, cache]
    halo = (c2.weight.shape[3] - 1) // 2
    out = run.step(tail, ins, res, 1, c2.weight.shape[0], halo, h.shape[2])
    run.cache[id(c2)] = h[:, :, -2:].clone()
    return out


def _wan_attention(run: _VideoRun, blk: Any, x: Any, res: int) -> Any:
    """Wan's per-frame single-head attention: K/V of each whole frame, queries by tile."""
    import torch
    import torch.nn.functional as F
    b, c, t, h, w = x.shape
    kk = torch.empty(b * t, 1, h * w, c, dtype=x.dtype, device=run.device)
    vv = torch.empty_like(kk)
    rows = max(1, (1 << 20) // max(1, w * c * t))
    with torch.no_grad():
        for r0 in range(0, h, rows):
            xs = x[:, :, :, r0:r0 + rows].to(run.device)
            n = xs.shape[3] * w
            f = xs.permute(0, 2, 1, 3, 4).reshape(b * t, c, -1, w)
            _, k, v = blk.to_qkv(blk.norm(f)).chunk(3, dim=1)
            kk[:, 0, r0 * w:r0 * w + n] = k.flatten(2).transpose(1, 2)
            vv[:, 0, r0 * w:r0 * w + n] = v.flatten(2).transpose(1, 2)

    def fn(xs: Any) -> Any:
        tb, tc, tt, th, tw = xs.shape
        f = xs.permute(0, 2, 1, 3, 4).reshape(tb * tt, tc, th, tw)
        q, _, _ = blk.to_qkv(blk.norm(f)).chunk(3, dim=1)
        q = q.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()
        o = F.scaled_dot_product_attention(q, kk, vv).squeeze(1).transpose(1, 2).reshape(tb * tt, tc, th, tw)
        o = blk.proj(o).reshape(tb, tt, tc, th, tw).permute(0, 2, 1, 3, 4)
        return xs + o

    return run.step(fn, [x], res, 1, c, 0, t)


def _wan_resample(run: _VideoRun, blk: Any, x: Any, res: int) -> tuple[Any, int]:
    if blk.mode == "none":
        return x, res
    conv2d = blk.resample[1]
    c_out = conv2d.weight.shape[0]
    t = x.shape[2]
    if blk.mode == "upsample2d":
        return run.step(lambda xs: blk(xs), [x], res, 2, c_out, 1, t), res * 2
    # upsample3d: Wan's state per chunk: None -> "Rep" (no time conv on the first chunk) ->
    # time conv with zero padding -> time conv with the cache of the last 2 input frames
    state = run.cache.get(id(blk))
    t_out = t if state is None else 2 * t

    def fn(xs: Any, cs: Any = None) -> Any:
        fc = [None] if state is None else (["Rep"] if isinstance(state, str) else [cs])
        return blk(xs, feat_cache=fc, feat_idx=[0])

    ins = [x] if not hasattr(state, "shape") else [x, state]
    out = run.step(fn, ins, res, 2, c_out, 1, t_out)
    run.cache[id(blk)] = "Rep" if state is None else x[:, :, -2:].clone()
    return out, res * 2


def _wan_walk(run: _VideoRun, model: Any, layers: list[Any], x: Any, res: int,
              resample: Callable[[_VideoRun, Any, Any, int], tuple[Any, int]]) -> Any:
    """One time chunk through a Wan Decoder3d / Encoder3d: conv1, the layers, head (norm, SiLU,
    conv); resample runs a Resample and gives (output or None: the chunk stops, its resolution)."""
    import torch.nn.functional as F
    h = run.conv(model.conv1, x, res)
    for layer in layers:
        name = _cls(layer)
        if name == "ResidualBlock":
            h = _wan_residual(run, layer, h, res)
        elif name == "AttentionBlock":
            h = _wan_attention(run, layer, h, res)
        else:
            h, res = resample(run, layer, h, res)
            if h is None:
                return None
    n, _, conv = list(model.head)
    return run.conv(conv, h, res, pre=lambda t: F.silu(n(t)))


def _wan_chunk(run: _VideoRun, decoder: Any, x: Any) -> Any:
    return _wan_walk(run, decoder, [*decoder.middle, *decoder.upsamples], x, 1, _wan_resample)


MAX_FRAMES = 1 << 20   # frames of one video: the planner's longest side, beyond any real video


def check_frames(t: Any, what: str = "t") -> int:
    """t as an int 1..MAX_FRAMES, else ValueError naming the value (a chunk list of a hostile
    length would take minutes and gigabytes to build)."""
    if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= MAX_FRAMES:
        raise ValueError(f"{what} must be an int 1..{MAX_FRAMES}, got {t!r}"[:200])
    return t


def video_chunks(t: int, frames: int = 2) -> list[tuple[int, int]]:
    """Latent-frame chunks: [0, 1) alone (Wan's first chunk: no time upsampling), then `frames` at a
    time (WanVAE.decode: 2).  Any frames >= 2 gives the same video: every cache holds the last two
    input frames of a layer, which a chunk of >= 2 frames always has (the last chunk may be 1)."""
    check_frames(t)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise ValueError(f"frames must be an int >= 2, got {frames!r}")
    return [(0, 1)] + [(a, min(t, a + frames)) for a in range(1, t, frames)]


def _video_cost(decoder: Any, h: int, w: int) -> tuple[float, float, float, float]:
    """A Wan-shaped decoder's working set (elements, batch 1) per latent frame of a time chunk, on a
    th x tw latent-px tile: fixed + per_frame + per_px th tw + per_edge (th + tw), each per frame.
    Walks the layers as _wan_chunk runs them: a conv reads its chunk frames plus 2 cached ones
    (<= 3x per frame) with a 1-px halo, writes its output; time upsampling doubles the frames;
    attention holds K/V of whole frames (per frame, any tile)."""
    t_mult, r = 1, 1
    per_px = per_edge = fixed = per_frame = 0.0

    def conv(cin: int, cout: int, r_in: int, r_out: int, t_in: int, t_out: int, halo: int = 1) -> None:
        nonlocal per_px, per_edge, fixed
        work = 3.0
        t_read = 3 * t_in                        # t_in frames per latent frame + 2 cached <= 3 t_in
        e_out = 2 * halo * r_out / r_in + 2
        per_px = max(per_px, work * (cin * t_read * r_in * r_in + cout * t_out * r_out * r_out))
        per_edge = max(per_edge, work * (cin * t_read * r_in * 2 * halo + cout * t_out * r_out * e_out))
        fixed = max(fixed, work * (cin * t_read * 4 * halo * halo + cout * t_out * e_out * e_out))

    def chans(c: Any) -> tuple[int, int]:
        return c.weight.shape[1], c.weight.shape[0]

    conv(*chans(decoder.conv1), 1, 1, 1, 1)
    for m in [*decoder.middle, *decoder.upsamples]:
        name = _cls(m)
        if name == "ResidualBlock":
            convs = [c for c in m.residual if _cls(c) == "CausalConv3d"]
            for c in convs:
                conv(*chans(c), r, r, t_mult, t_mult)
        elif name == "AttentionBlock":
            c = m.proj.weight.shape[0]
            per_frame = max(per_frame, 2.0 * t_mult * c * h * w * r * r)
            per_px = max(per_px, t_mult * r * r * (4.0 * c + h * w * r * r))
        elif m.mode in ("upsample2d", "upsample3d"):
            t2 = t_mult * (2 if m.mode == "upsample3d" else 1)
            conv(m.resample[1].weight.shape[1], m.resample[1].weight.shape[0], r, 2 * r, t2, t2)
            r, t_mult = 2 * r, t2
    conv(*chans(decoder.head[-1]), r, r, t_mult, t_mult)
    return fixed, per_frame, per_px, per_edge


def _check_video_plan(h: Any, w: Any, batch: Any, elem: Any, frames: Any, budget: Any) -> tuple[int, int, int, int]:
    """The checked (h, w, batch * elem, budget) of a video plan; frames: 1.._MAX_SIDE."""
    h, w, batch, elem = _check_grid_args(h, w, batch, elem)
    if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= _MAX_SIDE:
        raise ValueError(f"frames must be an int 1..{_MAX_SIDE}, got {frames!r}")
    return h, w, batch * elem, _check_budget(budget)


def plan_video_grid(decoder: Any, h: int, w: int, *, budget_bytes: int, batch: int = 1, elem: int = 4,
                    frames: int = 1) -> GridPlan:
    """Spatial tiles and time chunks for a Wan-shaped decoder, planned by the C planner in space and
    time (depth = the latent frames after the first, which Wan decodes alone): the fewest tiles
    whose working set fits.  frames: the latent frame count (1: an image-like decode)."""
    h, w, k, budget_bytes = _check_video_plan(h, w, batch, elem, frames, budget_bytes)
    _check_video(decoder)
    fixed, per_frame, per_px, per_edge = _video_cost(decoder, h, w)
    # a time chunk of td latent frames costs td x the per-frame working set; the fixed part of
    # every step is per frame too (halo corners), so it goes with per_frame
    rest = frames - 1
    r = _native_plan(w, h, fixed=0.0, per_px=per_px * k, per_edge=per_edge * k, per_frame=(per_frame + fixed) * k,
                     budget=budget_bytes, depth=rest if rest >= 1 else 1, depth_min=2)
    cols, rows, chunks = r["grid"]
    td = r["tile"][2]
    return GridPlan(rows, cols, int(math.ceil(r["predicted_peak_bytes"])), frames=td if rest >= 1 else 0,
                    chunks=chunks if rest >= 1 else 0)


def decode_video_tiled(decoder: Any, latent: Any, *, budget_bytes: int, grid: tuple[int, int] | None = None,
                       frames: int | None = None, conv2: Any = None, device: Any = None, store_device: Any = None,
                       progress: Callable[[int], None] | None = None) -> Any:
    """Decode a Wan-shaped video latent (B, C, T, H, W) in time chunks and spatial tiles.

    The planner (C, planner.c) picks the spatial grid and the chunk length (latent frames after
    the first) from the budget; grid= fixes the grid (then chunks are Wan's 2 frames unless
    frames= is given), frames= fixes the chunk length (>= 2).

    Equals WanVAE.decode (conv2, then the chunked decoder with caches) to float rounding; returns
    (B, 3, 1 + 4 * (T - 1), 8H, 8W) for Wan 2.1 in [-1, 1]. A ComfyUI Wan VAE maps on as
    decoder = vae.first_stage_model.decoder, conv2 = vae.first_stage_model.conv2.
    """
    import torch
    _check_video_input(latent, "latent")
    budget = _check_budget(budget_bytes)
    _check_video(decoder)
    lh, lw = latent.shape[3], latent.shape[4]
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 2):
        raise ValueError(f"frames must be an int >= 2 (latent frames per chunk), got {frames!r}")
    if grid is not None:
        rows, cols = _grid_arg(grid, lh, lw)
        frames = frames or 2
    else:
        plan = plan_video_grid(decoder, lh, lw, budget_bytes=budget, batch=latent.shape[0],
                               elem=latent.element_size(), frames=latent.shape[2])
        rows, cols = plan.rows, plan.cols
        frames = frames or max(2, plan.frames)
    device = torch.device(device) if device is not None else latent.device
    store = torch.device(store_device) if store_device is not None else latent.device
    # the working set the grid is planned for (the largest chunk, every step; attention's K/V
    # apart): steps that fit it over fewer tiles merge them
    fixed, _, per_px, per_edge = _video_cost(decoder, lh, lw)
    cap = _grid_cap(fixed, per_px, per_edge, lh, lw, rows, cols, frames * latent.shape[0] * latent.element_size(),
                    budget)
    run = _VideoRun(grid_rects(lh, lw, rows, cols), device, store, progress, grid=(rows, cols), cap=cap)
    with torch.no_grad():
        # conv2 (1x1x1) on the compute device, where the weights are: ComfyUI's LATENT stays on the CPU
        x = conv2(latent.to(device)).to(store) if conv2 is not None else latent
        outs = [_wan_chunk(run, decoder, x[:, :, a:b].to(store)) for a, b in video_chunks(x.shape[2], frames)]
    log.info("vramguard: tiled video VAE %dx%dx%d latent, %d chunks (%d latent frames after the first) x %d tiles",
             x.shape[2], lh, lw, len(outs), frames, len(run.rects))
    return torch.cat(outs, 2)


# ---------------------------------------------------------------------------------- Wan encode
#
# Wan 2.1's encoder (comfy.ldm.wan.vae.Encoder3d) as WanVAE.encode runs it: frames past the last
# 4N + 1 dropped, frame 0 alone, then chunks of 2 frames, each conv with its cache of the last 2
# input frames; a downsample3d Resample keeps its (spatially downsampled) input's last frame for
# its stride-2 time conv and defers a lone output frame to the next chunk (the rest of that chunk
# is not run) unless the chunk is the last.  Every layer runs over spatial tiles as the decoder's
# (RMS norms per pixel, per-frame attention by query tiles); a stride-2 spatial conv reads its
# tile plus one px after it (ZeroPad2d((0, 1, 0, 1)) then 3x3 stride 2).

def check_wan_encoder(encoder: Any) -> None:
    """Raises VaeTilingError (TypeError: not a module) unless encoder is a Wan 2.1-shaped Encoder3d."""
    layers = _check_wan_layout(encoder, "encoder", ("downsamples", "middle"), ("downsample2d", "downsample3d", "none"))
    if _cls(encoder.conv1) != "CausalConv3d" or _cls(encoder.head[-1]) != "CausalConv3d":
        raise VaeTilingError(f"encoder {type(encoder).__name__}: conv1/head are not CausalConv3d")
    for m in layers:
        if _cls(m) == "Resample" and m.mode != "none":
            c = m.resample[1]
            if (_cls(m.resample[0]) != "ZeroPad2d" or tuple(m.resample[0].padding) != (0, 1, 0, 1)
                    or tuple(c.stride) != (2, 2) or tuple(c.kernel_size) != (3, 3) or tuple(c.padding) != (0, 0)):
                raise VaeTilingError("a Wan encoder Resample that is not ZeroPad2d((0, 1, 0, 1)) + 3x3 stride 2")


def _wan_downscale(encoder: Any) -> int:
    return 2 ** sum(1 for m in encoder.downsamples if _cls(m) == "Resample" and m.mode != "none")


def _wan_downsample(run: _VideoRun, blk: Any, x: Any, res: int, final: bool) -> Any:
    """Resample downsample2d/3d over tiles; None where Wan defers this chunk's lone frame."""
    import torch
    if blk.mode == "none":
        return x
    conv2d = blk.resample[1]
    b, c, t = x.shape[:3]

    def spatial(xs: Any) -> Any:
        f = xs.permute(0, 2, 1, 3, 4).reshape(b * t, c, *xs.shape[-2:])
        y = blk.resample(f)
        return y.reshape(b, t, y.shape[1], *y.shape[-2:]).permute(0, 2, 1, 3, 4)

    y = run.step(spatial, [x], res, 1, conv2d.weight.shape[0], (0, 1), t, den=2)
    if blk.mode == "downsample2d":
        return y
    key = id(blk)
    last = run.cache.get(key)
    run.cache[key] = y[:, :, -1:].clone()
    if last is None:            # the first chunk: no time conv, its frame passes on
        return y
    tc = blk.time_conv
    t_out = (t + 1 - tc.weight.shape[2]) // tc.stride[0] + 1
    out = run.step(lambda ys, cs: tc(torch.cat([cs, ys], 2)), [y, last], res // 2, 1, tc.weight.shape[0], 0, t_out)
    deferred = run.cache.pop((key, "defer"), None)
    if deferred is not None:
        out = torch.cat([deferred, out], 2)
    if out.shape[2] == 1 and not final:
        run.cache[(key, "defer")] = out
        return None
    return out


def _wan_encode_chunk(run: _VideoRun, encoder: Any, x: Any, final: bool) -> Any:
    def down(run: _VideoRun, layer: Any, h: Any, res: int) -> tuple[Any, int]:
        return _wan_downsample(run, layer, h, res, final), (res if layer.mode == "none" else res // 2)

    return _wan_walk(run, encoder, [*encoder.downsamples, *encoder.middle], x, _wan_downscale(encoder), down)


def wan_encode_chunks(t: int) -> list[tuple[int, int]]:
    """WanVAE.encode's input-frame chunks: frame 0, then 2 frames at a time up to 1 + 4 ((t - 1) // 4)."""
    check_frames(t)
    usable = 1 + ((t - 1) // 4) * 4
    return [(0, 1)] + [(a, a + 2) for a in range(1, usable, 2)]


def _wan_encode_cost(encoder: Any, h: int, w: int) -> tuple[float, float, float, float]:
    """A Wan-shaped encoder's working set (elements, batch 1) per input frame of a time chunk on a
    th x tw latent-px tile, as (fixed, per_frame, per_px, per_edge) like _video_cost: every layer
    reads at most 2 frames per chunk frame (the chunk plus 2 cached) and writes at most 1."""
    per_px = per_edge = fixed = per_frame = 0.0

    def conv(cin: int, cout: int, r_in: int, r_out: int, hb: int, ha: int, work: float = 3.0) -> None:
        nonlocal per_px, per_edge, fixed
        e_in, e_out = hb + ha, (hb + ha) * r_out / r_in + 2
        per_px = max(per_px, work * (cin * 2 * r_in * r_in + cout * r_out * r_out))
        per_edge = max(per_edge, work * (cin * 2 * r_in * e_in + cout * r_out * e_out))
        fixed = max(fixed, work * (cin * 2 * e_in * e_in + cout * e_out * e_out))

    r = _wan_downscale(encoder)
    conv(encoder.conv1.weight.shape[1], encoder.conv1.weight.shape[0], r, r, 1, 1)
    for m in [*encoder.downsamples, *encoder.middle]:
        name = _cls(m)
        if name == "ResidualBlock":
            for c in (c for c in m.residual if _cls(c) == "CausalConv3d"):
                conv(c.weight.shape[1], c.weight.shape[0], r, r, 1, 1)
        elif name == "AttentionBlock":
            c = m.proj.weight.shape[0]
            per_frame = max(per_frame, 2.0 * c * h * w * r * r)
            per_px = max(per_px, r * r * (4.0 * c + h * w * r * r))
        elif m.mode != "none":
            c = m.resample[1]
            conv(c.weight.shape[1], c.weight.shape[0], r, r // 2, 0, 1, work=4.0)   # + the frames' reshape
            r //= 2
    conv(encoder.head[-1].weight.shape[1], encoder.head[-1].weight.shape[0], r, r, 1, 1)
    return fixed, per_frame, per_px, per_edge


def plan_wan_encode_grid(encoder: Any, h: int, w: int, *, budget_bytes: int, batch: int = 1, elem: int = 4,
                         frames: int = 1) -> GridPlan:
    """Spatial tiles for a Wan-shaped encoder (latent grid h x w), planned by the C planner in space
    and time with the time tile pinned at Wan's own chunk (2 input frames; frames: the video's)."""
    h, w, k, budget_bytes = _check_video_plan(h, w, batch, elem, frames, budget_bytes)
    check_wan_encoder(encoder)
    fixed, per_frame, per_px, per_edge = _wan_encode_cost(encoder, h, w)
    rest = max(2, 4 * ((frames - 1) // 4))
    from . import _native
    r = _native.plan(w, h, overlap=0, align=1, feather=0.0, per_px_bytes=per_px * k, per_edge_bytes=per_edge * k,
                     per_frame_bytes=(per_frame + fixed) * k, budget=budget_bytes, depth=rest, depth_min=2,
                     depth_max=2)
    if not r["fits"]:
        raise VaeTilingError(f"nothing fits in budget_bytes={budget_bytes} for the Wan encoder: {r['why']}")
    cols, rows, chunks = r["grid"]
    return GridPlan(rows, cols, int(math.ceil(r["predicted_peak_bytes"])), frames=2, chunks=chunks)


def encode_video_tiled(encoder: Any, video: Any, *, budget_bytes: int, grid: tuple[int, int] | None = None,
                       conv1: Any = None, device: Any = None, store_device: Any = None,
                       progress: Callable[..., None] | None = None) -> Any:
    """Encode a (B, 3, T, H, W) video ([-1, 1]) with a Wan 2.1-shaped encoder as WanVAE.encode does
    (frames past 1 + 4N dropped; frame 0, then 2-frame chunks with the causal caches), each layer
    over spatial tiles: equals conv1(encoder(...)) chunked to float rounding.  Returns
    (B, 2 z, 1 + (T - 1) // 4, H / 8, W / 8) (mean and logvar; ComfyUI keeps the mean).  A ComfyUI
    Wan VAE maps on as encoder = first_stage_model.encoder, conv1 = first_stage_model.conv1.
    progress(done, total): tile steps done (total: an estimate, grows on an OOM re-plan)."""
    import torch
    _check_video_input(video, "video")
    budget = _check_budget(budget_bytes)
    check_wan_encoder(encoder)
    top = _wan_downscale(encoder)
    b, _, t, hh, ww = video.shape
    if hh % top or ww % top:
        raise ValueError(f"video {hh}x{ww} is not a multiple of the encoder's downscale {top}")
    lh, lw = hh // top, ww // top
    if grid is not None:
        rows, cols = _grid_arg(grid, lh, lw)
    else:
        plan = plan_wan_encode_grid(encoder, lh, lw, budget_bytes=budget, batch=b, elem=video.element_size(),
                                    frames=t)
        rows, cols = plan.rows, plan.cols
    device = torch.device(device) if device is not None else video.device
    store = torch.device(store_device) if store_device is not None else video.device
    chunks = wan_encode_chunks(t)
    n_steps = sum(1 for m in encoder.modules() if _cls(m) in ("CausalConv3d", "Resample", "AttentionBlock"))
    total = len(chunks) * n_steps * rows * cols
    tick = (lambda done: progress(done, max(total, done))) if progress is not None else None
    fixed, _, per_px, per_edge = _wan_encode_cost(encoder, lh, lw)
    cap = _grid_cap(fixed, per_px, per_edge, lh, lw, rows, cols, 2 * b * video.element_size(), budget)
    run = _VideoRun(grid_rects(lh, lw, rows, cols), device, store, tick, grid=(rows, cols), cap=cap)
    outs = []
    with torch.no_grad():
        for i, (a, e) in enumerate(chunks):
            o = _wan_encode_chunk(run, encoder, video[:, :, a:e].to(store), final=i == len(chunks) - 1)
            if o is not None:
                outs.append(o)
        out = torch.cat(outs, 2)
        if conv1 is not None:
            out = run.step(lambda xs: conv1(xs), [out], 1, 1, conv1.weight.shape[0], 0, out.shape[2])
    log.info("vramguard: tiled Wan-shaped VAE encode %dx%dx%d video: %d chunks x %d tiles", t, hh, ww, len(chunks),
             len(run.rects))
    return out


# ---------------------------------------------------------------------------------- other video VAEs
#
# A decoder whose every op is local (convs, per-voxel norms such as LTX-Video's PixelNorm,
# depth-to-space) is tiled exactly without running it layer by layer: each spatial tile is decoded
# whole (all frames, so the model's own causal/temporal handling is untouched) with a halo of its
# receptive field, and cropped.  The price is the halo's compute ((t + 2R) / t per side).  A decoder
# with statistics or attention over whole frames (Mochi's per-frame GroupNorm, HunyuanVideo's
# GroupNorm over the video and 3-D attention) is not local: tiles would differ from the untiled
# decode, so it is not tiled here and the caller falls back with video_layout's reason.

_RF_SEEN: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_NONLOCAL = ("GroupNorm", "BatchNorm", "InstanceNorm", "LayerNorm", "Attn", "Attention")


def video_layout(decoder: Any) -> tuple[str, str | None]:
    """("wan", None): the layer-synchronous Wan 2.1 path; ("wan22", None): Wan 2.2's (vae_wan22);
    ("ltx", None): LTX-Video-shaped, layer-synchronous in time and space (vae_ltx.decode_ltx_tiled);
    ("carried", None): HunyuanVideo-shaped
    (ComfyUI's Decoder with conv3d=True), layer-synchronous in its own time chunks; ("local", None):
    every op local, the halo path; ("mochi", None): Mochi-shaped (GroupNorm per frame), layer-
    synchronous; ("nonlocal", why): none of these (why names the modules)."""
    import torch
    if not isinstance(decoder, torch.nn.Module):
        raise TypeError(f"decoder must be a torch.nn.Module, got {type(decoder).__name__}")
    try:
        _check_video(decoder)
        return "wan", None
    except VaeTilingError:
        pass
    from .vae_wan22 import check_wan22_decoder, is_wan22
    if is_wan22(decoder):
        try:
            check_wan22_decoder(decoder)
            return "wan22", None
        except VaeTilingError as e:
            return "nonlocal", f"{type(decoder).__name__}: Wan 2.2-shaped but {e}"
    from .vae_ltx import VaeTilingError as _E, check_ltx, is_ltx
    if is_ltx(decoder):
        try:
            check_ltx(decoder)
            return "ltx", None      # LTX-Video-shaped: layer-synchronous in time and space (vae_ltx)
        except _E:
            pass                    # e.g. GroupNorm: judged below (halo path or ComfyUI's own)
    if _is_mochi(decoder):
        return "mochi", None
    if _carried(decoder):
        try:
            _check_layout_carried(decoder)
            return "carried", None
        except VaeTilingError as e:
            return "nonlocal", f"{type(decoder).__name__}: HunyuanVideo-shaped but {e}"
    found: dict[str, str] = {}
    for name, m in decoder.named_modules():
        cls = _cls(m)
        hit = next((k for k in _NONLOCAL if k.lower() in cls.lower()), None)
        if hit is None and isinstance(m, (torch.nn.GroupNorm, torch.nn.MultiheadAttention)):
            hit = cls
        if hit is not None and cls not in found:
            found[cls] = name or "(root)"
    if found:
        mods = ", ".join(f"{c} at {n}" for c, n in found.items())
        return "nonlocal", (f"{type(decoder).__name__} has statistics or attention over whole frames or the whole video "
                            f"({mods}): spatial tiles would not match the untiled decode, and the layer-synchronous path "
                            "knows only SD's and Wan's layouts")
    return "local", None


def receptive_field(decode: Callable[[Any], Any], channels: int, frames: int, *, dtype: Any = None,
                    device: Any = None, probe: int = 33) -> tuple[int, int]:
    """(R, scale): how far (latent px) a latent pixel reaches in the decoded video, measured by
    decoding a probe latent twice with its centre pixel changed, and the spatial upscale.  Raises
    when the change reaches the probe's border (R unknown).  The probe is two decodes of
    1 x channels x frames x probe x probe latents: channels <= 1024, frames <= 64, probe an odd
    9..129 and at most 2**24 latent values, so a hostile call cannot ask for gigabytes."""
    import torch
    for name, v, lo, hi in (("channels", channels, 1, 1024), ("frames", frames, 1, 64), ("probe", probe, 9, 129)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}"[:200])
        if not lo <= v <= hi:
            raise ValueError(f"{name} must be in {lo}..{hi}, got {v}")
    if probe % 2 == 0:
        raise ValueError(f"probe must be odd (a centre pixel), got {probe}")
    if channels * frames * probe * probe > 1 << 24:
        raise ValueError(f"probe latent of {channels}x{frames}x{probe}x{probe} values is over 2**24; "
                         "use fewer frames or a smaller probe")
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(1, channels, frames, probe, probe, generator=g) * 0.5).to(device=device, dtype=dtype)
    c = probe // 2
    with torch.no_grad():
        y0 = decode(z)
        z[..., c, c] += 1.0
        d = (decode(z) - y0).abs().amax(dim=(0, 1, 2)).float()
    s = y0.shape[-1] // probe
    if s < 1 or y0.shape[-1] != s * probe or y0.shape[-2] != s * probe:
        raise VaeTilingError(f"decoder output {tuple(y0.shape)} is not an integer upscale of the {probe} px probe")
    rows = torch.nonzero(d.amax(1) > 0).flatten()
    cols = torch.nonzero(d.amax(0) > 0).flatten()
    if rows.numel() == 0:
        return 1, s
    reach = max(abs(int(rows[0]) // s - c), abs(int(rows[-1]) // s - c),
                abs(int(cols[0]) // s - c), abs(int(cols[-1]) // s - c))
    if reach >= c:
        raise VaeTilingError(f"receptive field reaches the {probe} px probe's border: not a local decoder")
    return reach + 1, s


def decode_video_halo_tiled(decoder: Any, latent: Any, *, budget_bytes: int, grid: tuple[int, int] | None = None,
                            halo: int | None = None, decode: Callable[[Any], Any] | None = None, device: Any = None,
                            store_device: Any = None, progress: Callable[[int], None] | None = None) -> Any:
    """Decode a (B, C, T, H, W) latent with a local decoder (video_layout "local": LTX-Video-shaped)
    in spatial tiles, each with a halo of the receptive field: equals decode(latent) to float
    rounding.  decode: the callable (default decoder itself); halo: latent px (default measured by
    receptive_field); grid: (rows, cols), else planned by the C planner from the budget."""
    import torch
    _check_video_input(latent, "latent")
    budget = _check_budget(budget_bytes)
    kind, why = video_layout(decoder)
    if kind not in ("local", "ltx"):
        raise VaeTilingError(why or f"{type(decoder).__name__} is Wan-shaped: use decode_video_tiled")
    if halo is not None and (isinstance(halo, bool) or not isinstance(halo, int) or halo < 0):
        raise ValueError(f"halo must be an int >= 0 (latent px), got {halo!r}")
    fn = decode if decode is not None else decoder
    device = torch.device(device) if device is not None else latent.device
    store = torch.device(store_device) if store_device is not None else latent.device
    b, c, t, lh, lw = latent.shape
    key = (c, min(t, 3), str(latent.dtype), str(device), id(getattr(decode, "__func__", decode)) if decode is not None else 0)
    known = _RF_SEEN.setdefault(decoder, {})
    if key not in known:      # a structural property: measured once per decoder (two probe decodes)
        known[key] = receptive_field(fn, c, min(t, 3), dtype=latent.dtype, device=device)
    r, scale = known[key]
    halo = r if halo is None else halo
    if grid is not None:
        rows, cols = _grid_arg(grid, lh, lw)
    else:
        # every layer bounded by the widest conv at the output's voxel count: in + out channels,
        # x3 working copies, per latent px of the tile with its halo (area + perimeter + corners)
        chans = max([m.weight.shape[0] + m.weight.shape[1] for m in decoder.modules()
                     if getattr(getattr(m, "weight", None), "ndim", 0) == 5] or [1])
        t_out = 1 + 8 * t          # >= any temporal upscale up to 8x
        per = 3.0 * chans * t_out * scale * scale * b * latent.element_size()
        plan = _native_plan(lw, lh, fixed=per * 4 * halo * halo, per_px=per, per_edge=per * 2 * halo, budget=budget)
        cols, rows = plan["grid"]
    rects = grid_rects(lh, lw, rows, cols)
    out = None
    with torch.no_grad():
        for k, (y0, y1, x0, x1) in enumerate(rects):
            iy0, iy1 = _span(y0, y1, (halo, halo), lh)
            ix0, ix1 = _span(x0, x1, (halo, halo), lw)
            with _tile_scope():
                y = fn(latent[..., iy0:iy1, ix0:ix1].to(device))
                if out is None:
                    out = torch.empty(b, y.shape[1], y.shape[2], lh * scale, lw * scale, dtype=y.dtype, device=store)
                out[..., y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                    y[..., (y0 - iy0) * scale:(y1 - iy0) * scale, (x0 - ix0) * scale:(x1 - ix0) * scale]
                del y
            if progress is not None:
                progress(k + 1)
    log.info("vramguard: tiled local video VAE %dx%dx%d latent as %dx%d tiles, halo %d latent px", t, lh, lw,
             rows, cols, halo)
    return out


def video_program(first_stage_model: Any) -> tuple[Callable[..., Any], dict]:
    """(function, module kwargs) for a video VAE's first_stage_model: the layer-synchronous Wan
    2.1 / 2.2, LTX, Mochi or HunyuanVideo path, or the halo path for another local decoder;
    VaeTilingError with the reason otherwise."""
    dec = getattr(first_stage_model, "decoder", None)
    if dec is None:
        raise VaeTilingError(f"{type(first_stage_model).__name__} has no decoder")
    kind, why = video_layout(dec)
    if kind == "wan":
        return decode_video_tiled, {"decoder": dec, "conv2": getattr(first_stage_model, "conv2", None)}
    if kind == "wan22":
        from .vae_wan22 import decode_wan22_tiled
        return decode_wan22_tiled, {"decoder": dec, "conv2": getattr(first_stage_model, "conv2", None)}
    if kind == "ltx":
        from .vae_ltx import decode_ltx_tiled
        return decode_ltx_tiled, {"decoder": dec, "vae": first_stage_model}
    if kind == "local":
        fn = getattr(first_stage_model, "decode", None)
        return decode_video_halo_tiled, {"decoder": dec, "decode": fn if callable(fn) else None}
    if kind == "mochi":
        return _decode_counting, {"decoder": dec, "run": decode_mochi_tiled}
    if kind == "carried":
        return _decode_counting, {"decoder": dec, "post_quant_conv": getattr(first_stage_model, "post_quant_conv",
                                                                                     None),
                                  "run": decode_carried_tiled}
    raise VaeTilingError(why or "unsupported video VAE")


def _decode_counting(*, run: Callable[..., Any], progress: Callable[[int], None] | None = None, **kw: Any) -> Any:
    """run (a step-program video path) with a progress callback of one argument (tiles done), as
    the video paths report (the step programs report (done, total) per program)."""
    n = {"done": 0}

    def tick(done: int, total: int) -> None:
        n["done"] += 1
        if progress is not None:
            progress(n["done"])

    return run(progress=tick, **kw)


# ---------------------------------------------------------------------------------- HunyuanVideo-shaped
#
# HunyuanVideo's VAE in ComfyUI is the SD Decoder built with conv3d=True: CarriedConv3d (causal in
# time: the first frame replicated twice; replicate padding in space), GroupNorm over (C/g, T, H, W),
# a 3-D attention over every voxel in the mid block.  Its forward runs conv_in and the mid block on
# the whole video, then the up path on chunks of 2 latent frames, each conv carrying the last 2
# frames of its padded input to the next chunk -- and the up path's GroupNorms see only the chunk.
# So the chunks are part of the model's definition: the time tiles here are exactly those chunks
# (the planner's depth axis pinned to 2), and inside each chunk (and in the mid block, over all
# frames) every layer runs layer-synchronously over spatial tiles with the statistics of the chunk
# (of the video), carries kept as whole frames and sliced with each tile's halo.

def _carried(decoder: Any) -> bool:
    return bool(getattr(decoder, "carried", False)) and _cls(getattr(decoder, "conv_in", None)) == "CarriedConv3d"


def _causal_conv(conv: Any, a: Any, carry: Any, sides: tuple[int, int, int, int] | None = None) -> tuple[Any, Any]:
    """ComfyUI's conv_carry_causal_3d on a tile: a = the conv's input (tile + halo), carry = the
    previous chunk's last 2 padded input frames (same slice) or None (the first chunk: frame 0
    twice).  Returns (output, this chunk's carry (aligned with a)).  sides: a's halo px (top,
    bottom, left, right): the output is then the tile's only (1 px of halo read, the map's border
    replicate-padded), so a small tile costs no recomputed halo outputs."""
    import torch
    padded = torch.cat([carry.to(a), a], 2) if carry is not None else torch.cat([a[:, :, :1], a[:, :, :1], a], 2)
    return conv.conv(_exact_pad(padded, sides, "replicate")), padded[:, :, -2:]


def _exact_pad(a: Any, sides: tuple[int, int, int, int] | None, mode: str) -> Any:
    """A 3x3 (padding 1) conv's input for exactly the tile: 1 px of a's halo kept where a has one,
    1 px of `mode` padding at the map's border (sides None: padding all round, the whole slice)."""
    import torch.nn.functional as F
    if sides is None:
        return F.pad(a, (1, 1, 1, 1, 0, 0), mode=mode)
    t, b, l, r = sides
    h, w = a.shape[-2], a.shape[-1]
    a = a[..., max(0, t - 1):h - max(0, b - 1), max(0, l - 1):w - max(0, r - 1)]
    pad = (0 if l else 1, 0 if r else 1, 0 if t else 1, 0 if b else 1, 0, 0)
    return F.pad(a, pad, mode=mode) if any(pad) else a


def _crop(x: Any, sides: tuple[int, int, int, int]) -> Any:
    """x (aligned with a tile's input slice) on the tile only."""
    t, b, l, r = sides
    return x[..., t:x.shape[-2] - b, l:x.shape[-1] - r]


def _carry_names(name: str, later: bool, keep: bool) -> tuple[tuple[str, ...], str | None]:
    return ((f"carry:{name}",) if later else ()), (f"carry_next:{name}" if keep else None)


def _resnet3d(blk: Any, name: str, x: str, res: int, steps: list[Step], later: bool, keep: bool) -> str:
    if getattr(blk, "use_conv_shortcut", False) and getattr(blk, "conv_shortcut", None) is not None:
        raise VaeTilingError(f"{name}: a 3x3x3 conv shortcut is not supported")
    cin, cout = blk.norm1.num_channels, blk.conv1.conv.weight.shape[0]
    h = name + ".h"
    in1, out1 = _carry_names(name + ".conv1", later, keep)
    in2, out2 = _carry_names(name + ".conv2", later, keep)

    def first(ctx: _Ctx, xs: Any, cs: Any = None) -> Any:
        y, c = _causal_conv(blk.conv1, _silu(ctx.gn(blk.norm1, xs, x)), cs, ctx.sides)
        return (y, c) if keep else y

    def second(ctx: _Ctx, xs: Any, hs: Any, cs: Any = None) -> Any:
        y, c = _causal_conv(blk.conv2, _silu(ctx.gn(blk.norm2, hs, h)), cs, ctx.sides)
        xs = _crop(xs, ctx.sides)
        sc = blk.nin_shortcut(xs) if getattr(blk, "nin_shortcut", None) is not None else xs
        return (sc + y, c) if keep else sc + y

    steps.append(Step(name + ".a", first, (x, *in1), h, cout, res, res, in_channels=cin, normed=(x,), carry=out1))
    out = name + ".out"
    steps.append(Step(name + ".b", second, (x, h, *in2), out, cout, res, res, in_channels=cin + cout, normed=(h,),
                      carry=out2))
    return out


def compile_carried(decoder: Any, post_quant_conv: Any = None, *, part: str, first: bool = True,
                    last: bool = True) -> Program:
    """The HunyuanVideo-shaped decoder as layer-synchronous 5-D programs: part "mid" (conv_in and the
    mid block over the whole video) or "up" (one 2-latent-frame chunk: first / last decide the
    carries read and written and the first frame's spatial-only upsampling)."""
    _check_layout_carried(decoder)
    steps: list[Step] = []
    if part == "mid":
        cur = "z"
        if post_quant_conv is not None:
            steps.append(Step("post_quant_conv", lambda ctx, xs: post_quant_conv(xs), (cur,), "pq",
                              post_quant_conv.weight.shape[0], 1, 1, halo=(0, 0),
                              in_channels=post_quant_conv.weight.shape[1]))
            cur = "pq"
        steps.append(Step("conv_in", lambda ctx, xs: _causal_conv(decoder.conv_in, xs, None, ctx.sides)[0], (cur,), "conv_in",
                          decoder.conv_in.conv.weight.shape[0], 1, 1, in_channels=decoder.conv_in.conv.weight.shape[1]))
        cur = _resnet3d(decoder.mid.block_1, "mid.block_1", "conv_in", 1, steps, False, False)
        cur = _attn_step(decoder.mid.attn_1, "mid.attn_1", cur, 1, steps)
        cur = _resnet3d(decoder.mid.block_2, "mid.block_2", cur, 1, steps, False, False)
        steps[-1].output = "out"
        return _finish(Program(steps, "z", "out", 1, decoder.mid.block_2.conv2.conv.weight.shape[0]))
    if part != "up":
        raise ValueError(f"part must be 'mid' or 'up', got {part!r}")
    later, keep = not first, not last
    cur, res = "z", 1
    for i_level in reversed(range(decoder.num_resolutions)):
        up = decoder.up[i_level]
        for i_block in range(decoder.num_res_blocks + 1):
            cur = _resnet3d(up.block[i_block], f"up{i_level}.block{i_block}", cur, res, steps, later, keep)
        if i_level != 0:
            us = up.upsample
            sf = us.scale_factor if isinstance(us.scale_factor, (tuple, list)) else (us.scale_factor,) * 3
            t_up = sf[0] > 1.0
            cin_, cout_ = _carry_names(f"up{i_level}.upsample", later, keep)

            def upfn(ctx: _Ctx, xs: Any, cs: Any = None, us: Any = us, t_up: bool = t_up) -> Any:
                import torch
                import torch.nn.functional as F
                parts, rest = [], xs
                if t_up and first:
                    parts.append(F.interpolate(xs[:, :, :1], scale_factor=(1.0, 2.0, 2.0), mode="nearest"))
                    rest = xs[:, :, 1:]
                if rest.shape[2] > 0:
                    parts.append(F.interpolate(rest, scale_factor=(2.0 if t_up else 1.0, 2.0, 2.0), mode="nearest"))
                y, c = _causal_conv(us.conv, torch.cat(parts, 2), cs, tuple(2 * v for v in ctx.sides))
                return (y, c) if keep else y

            def t_out(t: int, t_up: bool = t_up) -> int:
                return (2 * t - 1 if first else 2 * t) if t_up else t

            c = us.conv.conv.weight.shape[0]
            steps.append(Step(f"up{i_level}.upsample", upfn, (cur, *cin_), f"up{i_level}.us", c, res, res * 2,
                              work=6.0, in_channels=c, t_out=t_out, carry=cout_))
            cur, res = f"up{i_level}.us", res * 2
    name_in = cur
    cin_, cout_ = _carry_names("conv_out", later, keep)
    tanh = bool(getattr(decoder, "tanh_out", False))

    def tail(ctx: _Ctx, xs: Any, cs: Any = None) -> Any:
        y, c = _causal_conv(decoder.conv_out, _silu(ctx.gn(decoder.norm_out, xs, name_in)), cs, ctx.sides)
        y = y.tanh() if tanh else y
        return (y, c) if keep else y

    cout = decoder.conv_out.conv.weight.shape[0]
    steps.append(Step("conv_out", tail, (cur, *cin_), "out", cout, res, res, in_channels=decoder.norm_out.num_channels,
                      normed=(cur,), carry=cout_))
    return _finish(Program(steps, "z", "out", 1, cout))


def compile_carried_encoder(encoder: Any, quant_conv: Any = None, *, part: str, first: bool = True,
                            last: bool = True) -> Program:
    """The HunyuanVideo-shaped encoder (ComfyUI's Encoder with conv3d=True) as 5-D programs: part
    "down" (one time chunk: frame 0 alone, then 2 tc frames, carried) or "mid" (the mid block,
    norm_out, conv_out (+ quant_conv) over the whole latent video)."""
    import torch
    if not isinstance(encoder, torch.nn.Module):
        raise TypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
    if not _carried(encoder) or not all(hasattr(encoder, n) for n in ("down", "mid", "norm_out", "conv_out")):
        raise VaeTilingError(f"{type(encoder).__name__} is not a carried conv3d Encoder (HunyuanVideo layout)")
    if any(len(d.attn) for d in encoder.down):
        raise VaeTilingError("a carried conv3d Encoder with attention in its down blocks")
    top = 2 ** (encoder.num_resolutions - 1)
    steps: list[Step] = []
    if part == "mid":
        cur = _resnet3d(encoder.mid.block_1, "mid.block_1", "x", 1, steps, False, False)
        cur = _attn_step(encoder.mid.attn_1, "mid.attn_1", cur, 1, steps)
        cur = _resnet3d(encoder.mid.block_2, "mid.block_2", cur, 1, steps, False, False)
        name_in = cur

        def tail(ctx: _Ctx, xs: Any) -> Any:
            y = _causal_conv(encoder.conv_out, _silu(ctx.gn(encoder.norm_out, xs, name_in)), None, ctx.sides)[0]
            return quant_conv(y) if quant_conv is not None else y

        cout = (quant_conv.weight.shape[0] if quant_conv is not None else encoder.conv_out.conv.weight.shape[0])
        steps.append(Step("conv_out", tail, (cur,), "out", cout, 1, 1, in_channels=encoder.norm_out.num_channels,
                          normed=(cur,)))
        return _finish(Program(steps, "x", "out", 1, cout))
    if part != "down":
        raise ValueError(f"part must be 'down' or 'mid', got {part!r}")
    later, keep = not first, not last
    res = top
    cin_, cout_ = _carry_names("conv_in", later, keep)

    def head(ctx: _Ctx, xs: Any, cs: Any = None) -> Any:
        y, c = _causal_conv(encoder.conv_in, xs, cs, ctx.sides)
        return (y, c) if keep else y

    steps.append(Step("conv_in", head, ("x", *cin_), "conv_in", encoder.conv_in.conv.weight.shape[0], res, res,
                      in_channels=encoder.conv_in.conv.weight.shape[1], carry=cout_))
    cur = "conv_in"
    for i_level in range(encoder.num_resolutions):
        down = encoder.down[i_level]
        for i_block in range(encoder.num_res_blocks):
            cur = _resnet3d(down.block[i_block], f"down{i_level}.block{i_block}", cur, res, steps, later, keep)
        if i_level != encoder.num_resolutions - 1:
            conv = down.downsample.conv
            st = conv.conv.stride
            if tuple(st[1:]) != (2, 2) or st[0] not in (1, 2):
                raise VaeTilingError(f"down{i_level}.downsample: stride {tuple(st)} is not (1|2, 2, 2)")
            cin_, cout_ = _carry_names(f"down{i_level}.downsample", later, keep)

            def dfn(ctx: _Ctx, xs: Any, cs: Any = None, conv: Any = conv) -> Any:
                y, c = _causal_conv(conv, xs, cs)
                return (y, c) if keep else y

            def t_out(t: int, s0: int = st[0]) -> int:
                return (t - 1) // 2 + 1 if s0 == 2 else t

            # a stride-2 conv with 1 px of padding: a tile starting at an even pixel p needs pixels
            # from p - 2 (the slice then starts even too, so its outputs land on the grid)
            c = conv.conv.weight.shape[0]
            steps.append(Step(f"down{i_level}.downsample", dfn, (cur, *cin_), f"down{i_level}.ds", c, res, res // 2,
                              halo=(2, 0), in_channels=c, t_out=t_out, carry=cout_, carry_res=res))
            cur, res = f"down{i_level}.ds", res // 2
    steps[-1].output = "out"
    return _finish(Program(steps, "x", "out", top, steps[-1].out_channels))


def encode_carried_tiled(encoder: Any, video: Any, *, budget_bytes: int, grid: tuple[int, int] | None = None,
                         quant_conv: Any = None, device: Any = None, store_device: Any = None,
                         progress: Callable[[int, int], None] | None = None) -> Any:
    """Encode a (B, C, T, H, W) video (the encoder's input range) with a HunyuanVideo-shaped encoder:
    equals quant_conv(encoder(video)) to float rounding.  Time tiles = the model's own chunks
    (frame 0, then 2 time_compress frames; frames past the last whole group dropped, as ComfyUI
    does); spatial tiles from the C planner or grid= (latent px)."""
    import torch
    _check_video_input(video, "video")
    budget = _check_budget(budget_bytes)
    probe = compile_carried_encoder(encoder, part="down", first=False, last=False)
    mid = compile_carried_encoder(encoder, quant_conv, part="mid")
    top = probe.latent_scale
    b, _, t, hh, ww = video.shape
    if hh % top or ww % top:
        raise ValueError(f"video {hh}x{ww} is not a multiple of the encoder's downscale {top}")
    lh, lw = hh // top, ww // top
    tc = int(getattr(encoder, "time_compress", 1))
    chunks = [(0, 1)]
    usable = 1 + ((t - 1) // tc) * tc if t > tc else 1
    chunks += [(a, min(usable, a + 2 * tc)) for a in range(1, usable, 2 * tc)]
    k = b * video.element_size()
    if grid is not None:
        g_down = g_mid = _grid_arg(grid, lh, lw)
    else:
        g_down = _carried_plan(probe, lh, lw, 2 * tc + 2, budget, k, depth=None, what="down path (one chunk)")
        g_mid = _carried_plan(mid, lh, lw, len(chunks) * 2, budget, k, depth=None, what="mid block (whole video)")
    device = torch.device(device) if device is not None else video.device
    store = torch.device(store_device) if store_device is not None else video.device
    with torch.no_grad():
        outs = _run_chunks(lambda first, last: compile_carried_encoder(encoder, part="down", first=first, last=last),
                           video, chunks, g_down, device, store, progress, budget)
        z = torch.cat(outs, 2)
        out = run_program(mid, z, rects=grid_rects(lh, lw, *g_mid), device=device, store_device=store,
                          progress=progress, grid=g_mid, budget=_video_cap(mid, z.shape[2], lh, lw, g_mid, b,
                                                                            video.element_size(), budget))
    log.info("vramguard: tiled HunyuanVideo-shaped VAE encode %dx%dx%d video: %d chunks x %dx%d tiles, mid %dx%d",
             t, hh, ww, len(chunks), g_down[0], g_down[1], g_mid[0], g_mid[1])
    return out


def _run_chunks(compile_chunk: Callable[[bool, bool], Program], x: Any, chunks: list[tuple[int, int]],
                grid: tuple[int, int], device: Any, store: Any, progress: Any, budget: int) -> list[Any]:
    """Each time chunk's program over the spatial tiles (grid, merged at steps that fit in what the
    grid is planned for), the carries one chunk writes read by the next."""
    carries: dict[str, Any] = {}
    outs = []
    for i, (a, e) in enumerate(chunks):
        p = compile_chunk(i == 0, i == len(chunks) - 1)
        lh, lw = x.shape[-2] // p.latent_scale, x.shape[-1] // p.latent_scale
        cap = _video_cap(p, e - a, lh, lw, grid, x.shape[0], x.element_size(), budget)
        outs.append(run_program(p, x[:, :, a:e], rects=grid_rects(lh, lw, *grid), device=device, store_device=store,
                                progress=progress, carries=carries, budget=cap, grid=grid))
        carries = {n.replace("carry_next:", "carry:", 1): v for n, v in carries.items() if n.startswith("carry_next:")}
    return outs


def _check_layout_carried(decoder: Any) -> None:
    import torch
    if not isinstance(decoder, torch.nn.Module):
        raise TypeError(f"decoder must be a torch.nn.Module, got {type(decoder).__name__}")
    if not _carried(decoder):
        raise VaeTilingError(f"{type(decoder).__name__} is not a carried conv3d Decoder (HunyuanVideo layout)")
    missing = [n for n in ("mid", "up", "norm_out", "conv_out", "num_resolutions", "num_res_blocks") if not hasattr(decoder, n)]
    if missing:
        raise VaeTilingError(f"decoder {type(decoder).__name__} lacks {missing}")
    if any(len(decoder.up[i].attn) for i in range(decoder.num_resolutions)):
        raise VaeTilingError("a carried conv3d Decoder with attention in its up blocks (ComfyUI asserts it never is)")


def _carried_plan(p: Program, h: int, w: int, frames: int, budget: int, k: int, *, depth: int | None,
                  what: str) -> tuple[int, int]:
    fixed, per_px, per_edge = _linear_cost(p, h, w)
    if depth is None:         # the whole video at once (the mid block): every frame in every tile
        r = _native_plan(w, h, fixed=fixed * k * frames, per_px=per_px * k * frames, per_edge=per_edge * k * frames,
                         budget=budget)
        cols, rows = r["grid"]
    else:                     # time chunks: the model's own 2 latent frames (depth pinned to 2)
        from . import _native
        r = _native.plan(w, h, overlap=0, align=1, feather=0.0, per_px_bytes=per_px * k * frames,
                         per_edge_bytes=per_edge * k * frames, per_frame_bytes=fixed * k * frames, budget=budget,
                         depth=depth, depth_min=min(2, depth), depth_max=min(2, depth))
        if not r["fits"]:
            raise VaeTilingError(f"nothing fits in budget_bytes={budget} for the {what}: {r['why']}")
        cols, rows, _ = r["grid"]
    return rows, cols


def decode_carried_tiled(decoder: Any, latent: Any, *, budget_bytes: int, grid: tuple[int, int] | None = None,
                         post_quant_conv: Any = None, device: Any = None, store_device: Any = None,
                         progress: Callable[[int, int], None] | None = None) -> Any:
    """Decode a (B, C, T, H, W) latent with a HunyuanVideo-shaped decoder (ComfyUI's Decoder with
    conv3d=True): equals decoder(post_quant_conv(latent)) to float rounding.  Spatial tiles from
    the C planner (or grid=), time tiles = the model's 2-latent-frame chunks."""
    import torch
    _check_video_input(latent, "latent")
    budget = _check_budget(budget_bytes)
    _check_layout_carried(decoder)
    b, _, t, lh, lw = latent.shape
    mid = compile_carried(decoder, post_quant_conv, part="mid")
    probe = compile_carried(decoder, part="up", first=False, last=False)
    tc = 2 ** sum(1 for i in range(1, decoder.num_resolutions)
                  if (decoder.up[i].upsample.scale_factor if isinstance(decoder.up[i].upsample.scale_factor, float)
                      else decoder.up[i].upsample.scale_factor[0]) > 1.0)
    k = b * latent.element_size()
    if grid is not None:
        g_mid = g_up = _grid_arg(grid, lh, lw)
    else:
        g_mid = _carried_plan(mid, lh, lw, t, budget, k, depth=None, what="mid block (whole video)")
        g_up = _carried_plan(probe, lh, lw, tc + 2, budget, k, depth=t, what="up path (2-frame chunks)")
    device = torch.device(device) if device is not None else latent.device
    store = torch.device(store_device) if store_device is not None else latent.device
    with torch.no_grad():
        h = run_program(mid, latent, rects=grid_rects(lh, lw, *g_mid), device=device, store_device=store,
                        progress=progress, grid=g_mid, budget=_video_cap(mid, t, lh, lw, g_mid, b,
                                                                         latent.element_size(), budget))
        chunks = [(a, min(t, a + 2)) for a in range(0, t, 2)]
        outs = _run_chunks(lambda first, last: compile_carried(decoder, part="up", first=first, last=last), h, chunks,
                           g_up, device, store, progress, budget)
    log.info("vramguard: tiled HunyuanVideo-shaped VAE %dx%dx%d latent: mid block %dx%d tiles, %d chunks x %dx%d tiles",
             t, lh, lw, g_mid[0], g_mid[1], len(chunks), g_up[0], g_up[1])
    return torch.cat(outs, 2)


# ---------------------------------------------------------------------------------- Mochi-shaped
#
# Mochi's decoder (comfy.ldm.genmo.vae.model.Decoder) decodes the whole video at once: causal
# PConv3d (first frame replicated in time, replicate padding in space), GroupNormSpatial (a
# GroupNorm per frame over the whole frame), Conv1x1 projections and DepthToSpaceTime (dropping
# the first st - 1 frames of the video).  Every layer runs layer-synchronously over spatial tiles,
# each GroupNorm with per-frame statistics gathered over the whole frame.  Nothing in it looks
# ahead in time and its norms are per frame, so time is tiled too: chunks of latent frames (planned
# with the spatial tiles, the planner's depth axis), each causal conv carrying the last k - 1
# frames of its input to the next chunk (the first chunk replicates frame 0, as PConv3d pads), and
# only the first chunk dropping DepthToSpaceTime's first st - 1 frames.  A Mochi-shaped decoder
# with time attention (ComfyUI's decoder has none) or a non-causal conv runs all frames at once.

def _is_mochi(decoder: Any) -> bool:
    blocks = getattr(decoder, "blocks", None)
    return (blocks is not None and hasattr(decoder, "output_proj") and len(blocks) >= 2
            and any(_cls(m) == "CausalUpsampleBlock" for m in blocks)
            and any(_cls(m) == "GroupNormSpatial" for m in decoder.modules()))


def _mochi_whole_video(decoder: Any) -> str | None:
    """Why the decoder's time cannot be chunked (None: it can)."""
    for name, m in decoder.named_modules():
        if _cls(m) == "AttentionBlock":
            return f"{name}: attention over all frames"
        if _cls(m) == "PConv3d" and not getattr(m, "causal", True):
            return f"{name}: a non-causal time conv"
    return None


def _pconv(conv: Any, a: Any, carry: Any, sides: tuple[int, int, int, int] | None = None) -> tuple[Any, Any]:
    """PConv3d on a tile: a = its input (tile + halo), carry = the previous chunk's last k - 1 input
    frames (same slice) or None (the first chunk: frame 0 replicated, as PConv3d pads).  Returns
    (output, this chunk's carry).  With sides (a's halo px) and plain weights (a's dtype and
    device, no ComfyUI weight casting) the output is the tile's only (_exact_pad: no recomputed
    halo outputs); otherwise the conv's own forward (the module's parent class: ComfyUI's weight
    casting, replicate padding in space) over the whole slice."""
    import torch
    import torch.nn.functional as F
    k = conv.kernel_size[0]          # 3 (_mochi_res checks)
    padded = torch.cat([carry.to(a), a], 2) if carry is not None else F.pad(a, (0, 0, 0, 0, k - 1, 0), mode="replicate")
    w, bias = conv.weight, conv.bias
    plain = (sides is not None and not getattr(conv, "comfy_cast_weights", False)
             and not getattr(conv, "weight_function", None) and w.dtype == a.dtype and w.device == a.device
             and conv.padding_mode == "replicate" and tuple(conv.padding) == (0, 1, 1) and conv.groups == 1
             and tuple(conv.dilation) == (1, 1, 1))
    if plain:
        y = F.conv3d(_exact_pad(padded, sides, "replicate"), w, bias)
    else:
        y = super(type(conv), conv).forward(padded)
    return y, padded[:, :, -(k - 1):]


def _mochi_res(blk: Any, name: str, x: str, res: int, steps: list[Step], later: bool, keep: bool) -> str:
    n1, _, c1, n2, _, c2 = list(blk.stack)
    for c in (c1, c2):
        if _cls(c) != "PConv3d" or tuple(c.kernel_size) != (3, 3, 3) or tuple(c.stride) != (1, 1, 1):
            raise VaeTilingError(f"{name}: not a 3x3x3 stride-1 PConv3d residual stack")
    c = blk.channels
    h, out = name + ".h", name + ".out"
    in1, out1 = _carry_names(name + ".conv1", later, keep)
    in2, out2 = _carry_names(name + ".conv2", later, keep)

    def first(ctx: _Ctx, xs: Any, cs: Any = None) -> Any:
        y, cy = _pconv(c1, _silu(ctx.gn(n1, xs, x)), cs, ctx.sides)
        return (y, cy) if keep else y

    def second(ctx: _Ctx, xs: Any, hs: Any, cs: Any = None) -> Any:
        y, cy = _pconv(c2, _silu(ctx.gn(n2, hs, h)), cs, ctx.sides)
        if y.shape[-1] != xs.shape[-1] or y.shape[-2] != xs.shape[-2]:
            xs = _crop(xs, ctx.sides)
        return (xs + y, cy) if keep else xs + y

    steps.append(Step(name + ".a", first, (x, *in1), h, c1.out_channels, res, res, in_channels=c, normed=(x,),
                      carry=out1))
    steps.append(Step(name + ".b", second, (x, h, *in2), out, c, res, res, in_channels=2 * c, normed=(h,),
                      carry=out2))
    attn = blk.attn_block
    if _cls(attn) == "Identity":
        return out
    if _cls(attn) != "AttentionBlock":
        raise VaeTilingError(f"{name}: unsupported attention block {_cls(attn)}")
    if later or keep:
        raise VaeTilingError(f"{name}: attention over all frames: time cannot be chunked")
    # Mochi's attention is over time, per pixel: local in space (its norm is per frame)
    steps.append(Step(name + ".attn", lambda ctx, xs: xs + attn.attn(ctx.gn(attn.norm, xs, out)), (out,),
                      name + ".att", c, res, res, halo=(0, 0), in_channels=c, normed=(out,)))
    return name + ".att"


def _depth_to_space_time(x: Any, st: int, s: int) -> Any:
    """DepthToSpaceTime's rearrange (B (C st s s) T H W -> B C (T st) (H s) (W s)) without its drop
    of the first st - 1 frames: a later time chunk keeps them (the drop is the video's, not the chunk's)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c // (st * s * s), st, s, s, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // (st * s * s), t * st, h * s, w * s)


def compile_mochi(decoder: Any, *, first: bool = True, last: bool = True) -> Program:
    """Mochi's decoder as a layer-synchronous 5-D program (per-frame GroupNorm statistics) for one
    time chunk: first / last decide the carries read and written and DepthToSpaceTime's drop of the
    first frames (first=last=True: the whole video)."""
    if not _is_mochi(decoder):
        raise VaeTilingError(f"{type(decoder).__name__} is not a Mochi-shaped decoder")
    later, keep = not first, not last
    blocks = list(decoder.blocks)
    head, ups, tail = list(blocks[0]), blocks[1:-1], list(blocks[-1])
    conv_in = head[0]
    steps = [Step("conv_in", lambda ctx, xs: conv_in(xs), ("z",), "conv_in", conv_in.weight.shape[0], 1, 1,
                  halo=(0, 0), in_channels=conv_in.weight.shape[1])]
    cur, res = "conv_in", 1
    for i, blk in enumerate(head[1:]):
        cur = _mochi_res(blk, f"first.{i}", cur, res, steps, later, keep)
    for j, up in enumerate(ups):
        for i, blk in enumerate(up.blocks):
            cur = _mochi_res(blk, f"up{j}.{i}", cur, res, steps, later, keep)
        st, sx = up.d2st.temporal_expansion, up.d2st.spatial_expansion
        cout = up.proj.weight.shape[0] // (st * sx * sx)

        def t_out(t: int, st: int = st) -> int:
            return t * st - (st - 1) if first else t * st

        def d2st(ctx: _Ctx, xs: Any, up: Any = up, st: int = st, sx: int = sx) -> Any:
            return up.d2st(up.proj(xs)) if first else _depth_to_space_time(up.proj(xs), st, sx)

        steps.append(Step(f"up{j}.d2st", d2st, (cur,), f"up{j}.out", cout, res, res * sx, halo=(0, 0),
                          in_channels=up.proj.weight.shape[1], t_out=t_out, work=4.0))
        cur, res = f"up{j}.out", res * sx
    for i, blk in enumerate(tail):
        cur = _mochi_res(blk, f"last.{i}", cur, res, steps, later, keep)
    silu = getattr(decoder, "output_nonlinearity", "silu") == "silu"
    proj = decoder.output_proj
    steps.append(Step("output_proj", lambda ctx, xs: proj(_silu(xs) if silu else xs), (cur,), "out",
                      proj.weight.shape[0], res, res, halo=(0, 0), in_channels=proj.weight.shape[1]))
    p = _finish(Program(steps, "z", "out", 1, proj.weight.shape[0]))
    p.frame_stats = True
    return p


def _mochi_cost(p: Program, h: int, w: int) -> tuple[float, float, float]:
    """(fixed, per_px, per_edge) of a Mochi chunk program's working set per latent frame of the
    chunk (elements, batch 1): each step's _linear_cost at its frames per latent frame (time
    expansions so far) plus the k - 1 = 2 carried frames a chunk of >= 1 latent frame adds."""
    m = {p.input: 1}
    fixed = per_px = per_edge = 0.0
    for s in p.steps:
        m_in = m.get(s.inputs[0], 1)
        m[s.output] = s.t_out(m_in) if s.t_out is not None else m_in
        f, a, e = _linear_cost(Program([s], p.input, s.output, 1, s.out_channels), h, w)
        mult = max(m_in, m[s.output]) + 2
        fixed, per_px, per_edge = max(fixed, f * mult), max(per_px, a * mult), max(per_edge, e * mult)
    return fixed, per_px, per_edge


def plan_mochi_grid(decoder: Any, h: int, w: int, *, budget_bytes: int, batch: int = 1, elem: int = 4,
                    frames: int = 1) -> GridPlan:
    """Spatial tiles and time chunks (latent frames each) for a Mochi-shaped decoder on an
    frames x h x w latent, planned by the C planner in space and time (depth = the latent frames;
    the whole video when the decoder attends over time): the fewest tiles whose working set fits."""
    h, w, k, budget_bytes = _check_video_plan(h, w, batch, elem, frames, budget_bytes)
    whole = _mochi_whole_video(decoder) is not None
    fixed, per_px, per_edge = _mochi_cost(compile_mochi(decoder, first=whole, last=whole), h, w)
    r = _native_plan(w, h, fixed=0.0, per_px=per_px * k, per_edge=per_edge * k, per_frame=fixed * k,
                     budget=budget_bytes, depth=frames, depth_min=frames if whole else 1)
    cols, rows, chunks = r["grid"]
    return GridPlan(rows, cols, int(math.ceil(r["predicted_peak_bytes"])), frames=r["tile"][2], chunks=chunks)


def decode_mochi_tiled(decoder: Any, latent: Any, *, budget_bytes: int, grid: tuple[int, int] | None = None,
                       frames: int | None = None, device: Any = None, store_device: Any = None,
                       progress: Callable[[int, int], None] | None = None) -> Any:
    """Decode a (B, C, T, H, W) latent with a Mochi-shaped decoder: equals decoder(latent) to float
    rounding.  Spatial tiles and time chunks (latent frames each, causal convs carried across
    them) from the C planner; grid= fixes the spatial tiles (then every frame at once unless
    frames= is given), frames= the chunk length."""
    import torch
    _check_video_input(latent, "latent")
    budget = _check_budget(budget_bytes)
    if not _is_mochi(decoder):
        raise VaeTilingError(f"{type(decoder).__name__} is not a Mochi-shaped decoder")
    b, _, t, lh, lw = latent.shape
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise ValueError(f"frames must be an int >= 1 (latent frames per chunk), got {frames!r}")
    whole = _mochi_whole_video(decoder)
    if grid is not None:
        rows, cols = _grid_arg(grid, lh, lw)
        td = frames or t
    else:
        plan = plan_mochi_grid(decoder, lh, lw, budget_bytes=budget, batch=b, elem=latent.element_size(), frames=t)
        rows, cols, td = plan.rows, plan.cols, frames or plan.frames
    if whole is not None and td < t:
        log.info("vramguard: Mochi-shaped VAE decoded with all frames at once (%s)", whole)
        td = t
    chunks = [(a, min(t, a + td)) for a in range(0, t, td)]
    device = torch.device(device) if device is not None else latent.device
    store = torch.device(store_device) if store_device is not None else latent.device
    with torch.no_grad():
        outs = _run_chunks(lambda first, last: compile_mochi(decoder, first=first, last=last), latent, chunks,
                           (rows, cols), device, store, progress, budget)
    log.info("vramguard: tiled Mochi-shaped VAE %dx%dx%d latent as %dx%d tiles, %d time chunks of %d latent frames",
             t, lh, lw, rows, cols, len(chunks), td)
    return torch.cat(outs, 2)
