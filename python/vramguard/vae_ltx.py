"""Layer-synchronous tiled decode for LTX-Video's VAE: the untiled decode, to float rounding,
at about one pass of compute.

    video = vae_ltx.decode_ltx_tiled(vae.first_stage_model.decoder, latent, budget_bytes=2 << 30,
                                     vae=vae.first_stage_model)

LTX-Video's decoder (ComfyUI's comfy.ldm.lightricks.vae.causal_video_autoencoder.Decoder) is local
in space and time: 3x3x3 convs (CausalConv3d: the first/last frames replicated in time, the
decoder non-causal by default), PixelNorm or a channel LayerNorm (per voxel), depth-to-space
upsampling (time x2 drops the first frame; optionally with a residual), timestep-conditioned
scale/shift per channel and whole-frame spatial noise.  So every layer runs here over boxes of
(latent frames x rows x cols) with a one-layer halo (1 px, 1 frame each side; 2 frames before
for a causal conv), reading its input from whole intermediate tensors kept on a store device:
only the halo is computed twice.  The replicated first/last frames come from gathering the
box's frames with clamped indices, so a box in the middle of the video and one at its ends run
the same code.  Boxes are planned by the C planner in space and time (the depth axis: latent
frames) from the budget; steps whose working set fits in fewer, larger boxes use those.

Random draws: VideoVAE.decode mixes noise into the latent (timestep-conditioned models) and
inject_noise blocks add one whole-frame noise per conv.  They are drawn here from torch's
generator at whole size in the untiled order, so with the same seed the result equals an
untiled decode that ran in one piece (ComfyUI 0.30 splits large videos in time chunks and then
draws that noise per chunk: equally distributed, not the same numbers).

GroupNorm-normalised LTX decoders are refused (VaeTilingError): vae.video_layout then keeps the
halo path's judgement for them (non-local: ComfyUI's own path).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

from .vae import (VaeTilingError, _check_budget, _check_video_input, _cls, _grid_arg, _halves, _is_oom, _native_plan,
                  _release, _unpatchify)

__all__ = ["decode_ltx_tiled", "plan_ltx", "check_ltx", "is_ltx"]

log = logging.getLogger("vramguard")

_BLOCKS = ("UNetMidBlock3D", "ResnetBlock3D", "DepthToSpaceUpsample", "LtxResBlock")
_LOCAL_NORMS = ("PixelNorm", "LayerNorm", "Identity")

Box = tuple[int, int, int, int, int, int]     # t0, t1, y0, y1, x0, x1 on the latent grid


def is_ltx(decoder: Any) -> bool:
    """LTX-Video-shaped: conv_in, up_blocks of LTX's block classes, conv_norm_out, conv_out."""
    ups = getattr(decoder, "up_blocks", None)
    return (ups is not None and all(hasattr(decoder, n) for n in ("conv_in", "conv_norm_out", "conv_out"))
            and hasattr(getattr(decoder, "conv_in", None), "time_kernel_size")
            and len(ups) > 0 and all(_kind(b) is not None for b in ups))


def _kind(m: Any) -> str | None:
    """The LTX block class m is (or derives from), by name: None if none."""
    return next((k.__name__ for k in type(m).__mro__ if k.__name__ in _BLOCKS), None)


def _check_conv(cc: Any, where: str) -> None:
    conv = getattr(cc, "conv", None)
    w = getattr(conv, "weight", None)
    if w is None or getattr(w, "ndim", 0) != 5:
        raise VaeTilingError(f"{where}: {_cls(cc)} has no 3-D .conv")
    k = tuple(w.shape[2:])
    if (tuple(conv.stride) != (1, 1, 1) or tuple(conv.dilation) != (1, 1, 1) or getattr(conv, "groups", 1) != 1
            or conv.padding[0] != 0 or k[1] != k[2] or k[1] % 2 == 0 or tuple(conv.padding[1:]) != (k[1] // 2,) * 2
            or getattr(cc, "time_kernel_size", k[0]) != k[0] or k[0] % 2 == 0 or k[1] != 3):
        raise VaeTilingError(f"{where}: unsupported conv (kernel {k}, stride {tuple(conv.stride)}, padding "
                             f"{tuple(conv.padding)}): only 3x3 in space (odd in time), stride 1, 'same' "
                             "spatial padding")


def _check_norm(m: Any, where: str) -> None:
    import torch
    # LTX's LayerNorm wraps a LayerNorm over channels (per voxel); a bare torch LayerNorm on a
    # (B, C, T, H, W) map would normalise over W: not local
    if _cls(m) == "LayerNorm" and (isinstance(m, torch.nn.LayerNorm)
                                   or len(getattr(getattr(m, "norm", None), "normalized_shape", ())) != 1):
        raise VaeTilingError(f"{where} is a LayerNorm that is not LTX's channel LayerNorm (a .norm over C)")
    if m is not None and _cls(m) not in _LOCAL_NORMS:
        raise VaeTilingError(f"{where} is {_cls(m)}: statistics over the whole video (only PixelNorm / channel "
                             "LayerNorm are per voxel); not tiled layer-synchronously")


def check_ltx(decoder: Any) -> None:
    """Raises VaeTilingError naming the module unless decoder is an LTX-Video-shaped decoder this
    path covers (TypeError: not a torch module)."""
    import torch
    if not isinstance(decoder, torch.nn.Module):
        raise TypeError(f"decoder must be a torch.nn.Module, got {type(decoder).__name__}")
    if not is_ltx(decoder):
        raise VaeTilingError(f"{type(decoder).__name__} is not an LTX-Video-shaped decoder (conv_in, up_blocks of "
                             f"{'/'.join(_BLOCKS)}, conv_norm_out, conv_out)")
    _check_conv(decoder.conv_in, "conv_in")
    _check_conv(decoder.conv_out, "conv_out")
    _check_norm(decoder.conv_norm_out, "conv_norm_out")
    for i, blk in enumerate(decoder.up_blocks):
        name = f"up_blocks.{i}"
        if _kind(blk) == "DepthToSpaceUpsample":
            _check_conv(blk.conv, name + ".conv")
            st = tuple(blk.stride)
            if len(st) != 3 or st[1] != st[2] or min(st) < 1 or st[0] > 2:
                raise VaeTilingError(f"{name}: unsupported depth-to-space stride {st}")
            continue
        for j, r in enumerate(getattr(blk, "res_blocks", [blk])):
            where = f"{name}.res_blocks.{j}" if hasattr(blk, "res_blocks") else name
            _check_conv(r.conv1, where + ".conv1")
            _check_conv(r.conv2, where + ".conv2")
            for n in ("norm1", "norm2", "norm3"):
                _check_norm(getattr(r, n, None), f"{where}.{n}")
            sc = getattr(r, "conv_shortcut", None)
            if sc is not None and _cls(sc) != "Identity" and tuple(getattr(sc, "kernel_size", ())) != (1, 1, 1):
                raise VaeTilingError(f"{where}.conv_shortcut: {_cls(sc)} is not a 1x1x1 conv")
    p = getattr(decoder, "patch_size", 1)
    if not isinstance(p, int) or p < 1:
        raise VaeTilingError(f"decoder patch_size {p!r} is not an int >= 1")


# ---------------------------------------------------------------------------------- steps

@dataclass
class _Step:
    """One layer over boxes: out[box] = fn(input slices with halo, crop).  ts/r: the input's time
    factor (frames (T - 1) ts + 1) and spatial scale over the latent grid; up_t/up: the output's
    over the input's; halo_t: frames (before, after); halo: px."""
    name: str
    fn: Callable[..., Any]
    inputs: tuple[str, ...]
    output: str
    out_channels: int
    in_channels: int
    ts: int
    r: int
    up_t: int = 1
    up: int = 1
    halo_t: tuple[int, int] = (1, 1)
    halo: int = 1
    pre: Callable[[Any, Any], None] | None = None    # (device, dtype) once before the boxes: noise draws
    work: float = 3.0


@dataclass
class _Crop:
    """Where the box lies in its gathered input slice (input resolution)."""
    t: int       # frames gathered before the box (its time halo)
    nt: int
    y: int
    ny: int
    x: int
    nx: int
    first: bool  # the box holds latent frame 0
    gy: int = 0  # the box's first row / column in the whole frame
    gx: int = 0

    def sp(self, a: Any, up: int = 1) -> Any:
        return a[..., self.y * up:(self.y + self.ny) * up, self.x * up:(self.x + self.nx) * up]

    def tm(self, a: Any) -> Any:
        return a[:, :, self.t:self.t + self.nt]


def _comfy_cast(conv: Any, x: Any) -> tuple[Any, Any] | None:
    """(weight, bias) of a ComfyUI ops conv as its forward would use them (cast to x's device and
    dtype, weight patches applied): comfy.ops.cast_bias_weight's legacy form, the same call in
    0.3.64 .. 0.33.  None where ComfyUI is not loaded or the call does not fit."""
    import sys
    ops = sys.modules.get("comfy.ops")
    fn = getattr(ops, "cast_bias_weight", None)
    if fn is None or not hasattr(conv, "forward_comfy_cast_weights"):
        return None
    try:
        r = fn(conv, x)
    except TypeError:
        return None
    return (r[0], r[1]) if isinstance(r, tuple) and len(r) >= 2 else None


def _halo_t(cc: Any, causal: bool) -> tuple[int, int]:
    k = cc.conv.weight.shape[2]
    return (k - 1, 0) if causal else ((k - 1) // 2, (k - 1) // 2)


def _d2s(y: Any, st: tuple[int, int, int]) -> Any:
    """b (c p1 p2 p3) d h w -> b c (d p1) (h p2) (w p3), as LTX's einops rearrange."""
    b, c, d, h, w = y.shape
    p1, p2, p3 = st
    y = y.reshape(b, c // (p1 * p2 * p3), p1, p2, p3, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return y.reshape(b, c // (p1 * p2 * p3), d * p1, h * p2, w * p3)


class _Compiler:
    def __init__(self, decoder: Any, timestep: Any, batch: int) -> None:
        self.d = decoder
        self.causal = bool(getattr(decoder, "causal", False))
        self.tc = bool(getattr(decoder, "timestep_conditioning", False))
        self.timestep = timestep
        self.batch = batch
        self.steps: list[_Step] = []
        self.noise: dict[str, Any] = {}
        self.ts, self.r = 1, 1
        self.hw = (0, 0)           # the current step's frame size (its whole-frame noise)

    def scaled_timestep(self, device: Any, dtype: Any) -> Any:
        import torch
        t = self.timestep.to(device) if isinstance(self.timestep, torch.Tensor) else self.timestep
        return t * self.d.timestep_scale_multiplier.to(dtype=dtype, device=device)   # as Decoder.forward

    def embed(self, embedder: Any, device: Any, dtype: Any) -> Any:
        e = embedder(timestep=self.scaled_timestep(device, dtype).flatten(), resolution=None, aspect_ratio=None,
                     batch_size=self.batch, hidden_dtype=dtype)
        return e.view(self.batch, e.shape[-1], 1, 1, 1)

    def conv(self, cc: Any, x: Any, c: _Crop) -> Any:
        """The conv over the gathered slice (its time halo already there), for the box's voxels only:
        the slice's 1-px halo where it has one, the conv's own padding (zeros / reflect / replicate)
        at the frame's borders, then a 'valid' conv: no output is computed twice.  Weights that
        ComfyUI casts or patches on the fly (Dynamic VRAM, lowvram, LoRA) come from its own
        comfy.ops.cast_bias_weight; where that is not at hand the conv runs as its module on the
        whole slice and is cropped (the halo ring computed and dropped)."""
        import torch.nn.functional as F
        conv = cc.conv
        w, bias = conv.weight, conv.bias
        mode = getattr(conv, "padding_mode", "zeros")
        if mode not in ("zeros", "reflect", "replicate"):
            return c.sp(conv(x))
        if (getattr(conv, "comfy_cast_weights", False) or getattr(conv, "weight_function", None)
                or getattr(conv, "bias_function", None)):
            cast = _comfy_cast(conv, x)
            if cast is None:
                return c.sp(conv(x))
            w, bias = cast
        elif w.device != x.device or w.dtype != x.dtype:
            return c.sp(conv(x))
        p = w.shape[-1] // 2
        pads = (p - c.x, p - (x.shape[-1] - c.x - c.nx), p - c.y, p - (x.shape[-2] - c.y - c.ny), 0, 0)
        if any(pads):
            x = F.pad(x, pads, mode="constant" if mode == "zeros" else mode)
        return F.conv3d(x, w, bias)

    def add(self, **kw: Any) -> str:
        s = _Step(ts=self.ts, r=self.r, **kw)
        self.steps.append(s)
        return s.output

    def resnet(self, res: Any, name: str, x: str, temb: Callable[[Any, Any], Any] | None) -> str:
        import torch.nn.functional as F
        cin, cout = res.conv1.conv.weight.shape[1], res.conv2.conv.weight.shape[0]
        ada: dict[str, Any] = {}

        def mods(device: Any, dtype: Any) -> Any:
            if temb is None:
                return None
            if "v" not in ada:
                v = res.scale_shift_table[None, ..., None, None, None].to(device=device, dtype=dtype) + \
                    temb(device, dtype).reshape(self.batch, 4, -1, 1, 1, 1)
                ada["v"] = v.unbind(dim=1)          # shift1, scale1, shift2, scale2
            return ada["v"]

        def noise(key: str) -> Callable[[Any, Any], None] | None:
            if not getattr(res, "inject_noise", False):
                return None

            def draw(device: Any, dtype: Any) -> None:
                import torch
                self.noise[key] = torch.randn(self.hw, device=device, dtype=dtype)

            return draw

        def add_noise(y: Any, key: str, scale_name: str, c: _Crop) -> Any:
            if not getattr(res, "inject_noise", False):
                return y
            n = self.noise[key][c.gy:c.gy + c.ny, c.gx:c.gx + c.nx][None]   # the box's window
            sc = getattr(res, scale_name).to(device=y.device, dtype=y.dtype)
            return y + (n * sc)[None, :, None]

        h = name + ".h"

        def first(c: _Crop, xs: Any) -> Any:
            a = res.norm1(xs)
            m = mods(xs.device, xs.dtype)
            if m is not None:
                a = a * (1 + m[1]) + m[0]
            return add_noise(self.conv(res.conv1, F.silu(a), c), name + ".n1", "per_channel_scale1", c)

        def second(c: _Crop, hs: Any, xs: Any) -> Any:
            a = res.norm2(hs)
            m = mods(hs.device, hs.dtype)
            if m is not None:
                a = a * (1 + m[3]) + m[2]
            y = add_noise(self.conv(res.conv2, F.silu(a), c), name + ".n2", "per_channel_scale2", c)
            sc = c.sp(c.tm(xs))
            n3 = getattr(res, "norm3", None)
            if n3 is not None:
                sc = n3(sc)
            short = getattr(res, "conv_shortcut", None)
            if short is not None:
                sc = short(sc)
            return sc + y

        self.add(name=name + ".a", fn=first, inputs=(x,), output=h, out_channels=cout, in_channels=cin,
                 halo_t=_halo_t(res.conv1, self.causal), pre=noise(name + ".n1"))
        return self.add(name=name + ".b", fn=second, inputs=(h, x), output=name + ".out", out_channels=cout,
                        in_channels=cin + cout, halo_t=_halo_t(res.conv2, self.causal),
                        pre=noise(name + ".n2"))

    def d2s(self, blk: Any, name: str, x: str) -> str:
        st = tuple(int(v) for v in blk.stride)
        w = blk.conv.conv.weight
        cout = w.shape[0] // math.prod(st)
        residual = bool(getattr(blk, "residual", False))
        red = getattr(blk, "out_channels_reduction_factor", 1)

        def fn(c: _Crop, xs: Any) -> Any:
            y = _d2s(self.conv(blk.conv, xs, c), st)
            if st[0] == 2 and c.first:
                y = y[:, :, 1:]
            if residual:
                xi = _d2s(c.sp(c.tm(xs)), st).repeat(1, math.prod(st) // red, 1, 1, 1)
                if st[0] == 2 and c.first:
                    xi = xi[:, :, 1:]
                y = y + xi
            return y

        out = self.add(name=name, fn=fn, inputs=(x,), output=name + ".out", out_channels=cout, in_channels=w.shape[1],
                       up_t=st[0], up=st[1], halo_t=_halo_t(blk.conv, self.causal), work=4.0)
        self.ts, self.r = self.ts * st[0], self.r * st[1]
        return out

    def mid_embed(self, blk: Any) -> Callable[[Any, Any], Any] | None:
        """A timestep-conditioned mid block's embedding (computed once, on first use), or None."""
        if not (self.tc and _kind(blk) == "UNetMidBlock3D" and getattr(blk, "timestep_conditioning", False)):
            return None
        cache: dict[str, Any] = {}

        def temb(device: Any, dtype: Any) -> Any:
            if "e" not in cache:
                cache["e"] = self.embed(blk.time_embedder, device, dtype)
            return cache["e"]

        return temb

    def compile(self) -> tuple[list[_Step], str]:
        import torch.nn.functional as F
        d = self.d
        cur = self.add(name="conv_in", fn=lambda c, xs: self.conv(d.conv_in, xs, c), inputs=("z",), output="conv_in",
                       out_channels=d.conv_in.conv.weight.shape[0], in_channels=d.conv_in.conv.weight.shape[1],
                       halo_t=_halo_t(d.conv_in, self.causal))
        for i, blk in enumerate(d.up_blocks):
            name = f"up_blocks.{i}"
            if _kind(blk) == "DepthToSpaceUpsample":
                cur = self.d2s(blk, name, cur)
                continue
            temb = self.mid_embed(blk)
            for j, res in enumerate(getattr(blk, "res_blocks", [blk])):
                cur = self.resnet(res, f"{name}.{j}", cur, temb)
        last: dict[str, Any] = {}

        def out(c: _Crop, xs: Any) -> Any:
            a = d.conv_norm_out(xs)
            if self.tc:
                if "v" not in last:
                    e = self.embed(d.last_time_embedder, xs.device, xs.dtype)
                    v = d.last_scale_shift_table[None, ..., None, None, None].to(device=xs.device, dtype=xs.dtype) + \
                        e.reshape(self.batch, 2, -1, 1, 1, 1)
                    last["v"] = v.unbind(dim=1)
                shift, scale = last["v"]
                a = a * (1 + scale) + shift
            act = getattr(d, "conv_act", None)
            a = act(a) if act is not None else F.silu(a)
            return _unpatchify(self.conv(d.conv_out, a, c), self.patch)

        self.patch = int(getattr(d, "patch_size", 1))
        cw = d.conv_out.conv.weight
        final = self.add(name="conv_out", fn=out, inputs=(cur,), output="out",
                         out_channels=cw.shape[0] // self.patch ** 2, in_channels=cw.shape[1], up=self.patch,
                         halo_t=_halo_t(d.conv_out, self.causal))
        return self.steps, final


# ---------------------------------------------------------------------------------- plan and run

def _frames(t: int, ts: int) -> int:
    """Frame index at time factor ts of latent frame t (also: frame count of t latent frames)."""
    return 0 if t == 0 else (t - 1) * ts + 1


def _step_elems(s: _Step, td: int, th: int, tw: int) -> float:
    """Planned device working set (elements, batch 1) of a step on a td x th x tw latent box."""
    ti = td * s.ts + s.halo_t[0] + s.halo_t[1]
    to = td * s.ts * s.up_t
    hi, wi = th * s.r + 2 * s.halo, tw * s.r + 2 * s.halo
    u = s.up
    return s.work * (ti * hi * wi * s.in_channels + to * (hi * u) * (wi * u) * s.out_channels)


def _cost(steps: list[_Step]) -> tuple[float, float, float]:
    """(per_px, per_edge, per_frame) elements per latent frame of a box, bounding every step from
    above for the planner's td (per_px tw th + per_edge (tw + th) + per_frame): a step reads
    (td ts + halo_t) <= td (ts + halo_t) frames of (th r + 2h)(tw r + 2h) px and writes td ts up_t
    frames of its output at up x the resolution."""
    per_px = per_edge = per_frame = 0.0
    for s in steps:
        fi = s.ts + s.halo_t[0] + s.halo_t[1]
        fo = s.ts * s.up_t
        ci, co, r, h, u = s.in_channels, s.out_channels, s.r, s.halo, s.up
        per_px = max(per_px, s.work * (fi * ci + fo * co * u * u) * r * r)
        per_edge = max(per_edge, s.work * (fi * ci + fo * co * u * u) * 2 * h * r)
        per_frame = max(per_frame, s.work * (fi * ci + fo * co * u * u) * 4 * h * h)
    return per_px, per_edge, per_frame


@dataclass
class LtxPlan:
    rows: int
    cols: int
    chunks: int            # time boxes (latent frames)
    tile_bytes: int        # planned device working set of the largest box at the largest step

    @property
    def tiles(self) -> int:
        return self.rows * self.cols * self.chunks


def _compile(decoder: Any, batch: int, timestep: Any = 0.05) -> tuple[list[_Step], str, _Compiler]:
    comp = _Compiler(decoder, timestep, batch)
    steps, final = comp.compile()
    return steps, final, comp


def plan_ltx(decoder: Any, t: int, h: int, w: int, *, budget_bytes: int, batch: int = 1, elem: int = 4) -> LtxPlan:
    """Boxes in time and space for an LTX-shaped decoder on a t x h x w latent: the fewest whose
    working set fits budget_bytes, from the C planner (time on its depth axis)."""
    from .vae import _check_video_plan
    h, w, k, budget = _check_video_plan(h, w, batch, elem, t, budget_bytes)
    check_ltx(decoder)
    steps, _, _ = _compile(decoder, batch)
    per_px, per_edge, per_frame = _cost(steps)
    r = _native_plan(w, h, fixed=0.0, per_px=per_px * k, per_edge=per_edge * k, per_frame=per_frame * k,
                     budget=budget, depth=t)
    cols, rows, chunks = r["grid"]
    return LtxPlan(rows, cols, chunks, int(math.ceil(r["predicted_peak_bytes"])))


def _boxes(t: int, h: int, w: int, nt: int, ny: int, nx: int) -> list[Box]:
    ts = [t * i // nt for i in range(nt + 1)]
    ys = [h * i // ny for i in range(ny + 1)]
    xs = [w * i // nx for i in range(nx + 1)]
    return [(ts[a], ts[a + 1], ys[i], ys[i + 1], xs[j], xs[j + 1]) for a in range(nt) for i in range(ny)
            for j in range(nx) if ts[a + 1] > ts[a] and ys[i + 1] > ys[i] and xs[j + 1] > xs[j]]


def _split(b: Box) -> list[Box]:
    """A box halved along each axis longer than 1 (OOM: the rest of the step goes finer)."""
    out = _halves(b)
    if not out:
        raise VaeTilingError(f"out of memory at the smallest box (1 latent frame x 1 px at {b})")
    return out


def _step_boxes(s: _Step, grid: tuple[int, int, int], t: int, lh: int, lw: int, cap: int | None, k: int) -> list[Box]:
    """The step's boxes: the planned grid, or fewer, larger ones (merged f x f x f) where the
    step's own working set still fits in cap bytes (cheap low-resolution steps: less halo)."""
    nt, ny, nx = grid
    if cap is not None:
        for f in range(max(grid), 1, -1):
            a, b, c = -(-nt // f), -(-ny // f), -(-nx // f)
            if _step_elems(s, -(-t // a), -(-lh // b), -(-lw // c)) * k <= cap:
                return _boxes(t, lh, lw, a, b, c)
    return _boxes(t, lh, lw, nt, ny, nx)


def _run_steps(steps: list[_Step], comp: _Compiler, z: Any, final: str, grid: tuple[int, int, int], *,
               device: Any, store: Any, cap: int | None, progress: Callable[[int], None] | None) -> Any:
    import torch
    from . import vae as vae_mod
    b, _, t, lh, lw = z.shape
    maps: dict[str, Any] = {"z": z.to(store)}
    last_use = {n: i for i, s in enumerate(steps) for n in s.inputs}
    k = b * z.element_size()
    done = 0
    refined = False
    base: list[Box] = []
    for i, s in enumerate(steps):
        T_in, H_in, W_in = _frames(t, s.ts), lh * s.r, lw * s.r
        tso, ro = s.ts * s.up_t, s.r * s.up
        comp.hw = (lh * s.r, lw * s.r)     # noise is drawn at the conv output = the step's input resolution
        out = torch.empty(b, s.out_channels, _frames(t, tso), lh * ro, lw * ro, dtype=z.dtype, device=store)
        if s.pre is not None:
            s.pre(device, z.dtype)
        boxes = base if refined else _step_boxes(s, grid, t, lh, lw, cap, k)
        j = 0
        while j < len(boxes):
            t0, t1, y0, y1, x0, x1 = boxes[j]
            a, e = _frames(t0, s.ts), _frames(t1, s.ts)
            hb, ha = s.halo_t
            iy0, iy1 = max(0, y0 * s.r - s.halo), min(H_in, y1 * s.r + s.halo)
            ix0, ix1 = max(0, x0 * s.r - s.halo), min(W_in, x1 * s.r + s.halo)
            crop = _Crop(hb, e - a, y0 * s.r - iy0, (y1 - y0) * s.r, x0 * s.r - ix0, (x1 - x0) * s.r, t0 == 0,
                         y0 * s.r, x0 * s.r)
            oom = False
            try:
                with vae_mod._tile_scope(), torch.no_grad():
                    # replicate padding in time = clamped frame indices (the box's halo inside the video)
                    idx = torch.arange(a - hb, e + ha).clamp_(0, T_in - 1).to(store)
                    ins = [maps[n][..., iy0:iy1, ix0:ix1].index_select(2, idx).to(device) for n in s.inputs]
                    y = s.fn(crop, *ins)
                    oa, oe = _frames(t0, tso), _frames(t1, tso)
                    want = (oe - oa, (y1 - y0) * ro, (x1 - x0) * ro)
                    if tuple(y.shape[2:]) != want:
                        raise VaeTilingError(f"step {s.name}: box output {tuple(y.shape)} is not {want}")
                    out[:, :, oa:oe, y0 * ro:y1 * ro, x0 * ro:x1 * ro] = y
                    del y, ins
            except Exception as ex:   # noqa: BLE001 - only OOM is handled, the rest re-raised
                if not _is_oom(ex):
                    raise
                oom = True
            if oom:
                _release()
                finer = [q for bx in boxes[j:] for q in _split(bx)]
                log.warning("vramguard: tiled LTX VAE out of memory at step %s box %s; %d boxes done, re-planned "
                            "the rest as %d smaller boxes", s.name, boxes[j], j, len(finer))
                boxes = base = boxes[:j] + finer
                refined = True
                continue
            j += 1
            done += 1
            if progress is not None:
                progress(done)
        maps[s.output] = out
        for n in s.inputs:
            if last_use.get(n) == i:
                del maps[n]
        comp.noise.clear()
    return maps[final]


def decode_ltx_tiled(decoder: Any, latent: Any, *, budget_bytes: int, grid: tuple[int, int] | None = None,
                     frames: int | None = None, vae: Any = None, timestep: float | None = None,
                     device: Any = None, store_device: Any = None,
                     progress: Callable[[int], None] | None = None) -> Any:
    """Decode a (B, C, T, H, W) LTX-Video latent layer by layer over boxes of latent frames x
    rows x cols: equals the untiled decode to float rounding.

    vae: ComfyUI's VideoVAE (first_stage_model) owning decoder: its per_channel_statistics
    un-normalise the latent and, for timestep-conditioned models, its decode noise is mixed in
    and its decode_timestep conditions the decoder, as VideoVAE.decode does; without vae the
    latent goes to the decoder as is (timestep=: the decoder's timestep, default 0.05).
    grid=(rows, cols) fixes the spatial tiles, frames= the latent frames per time box; otherwise
    both come from the C planner and budget_bytes.  progress(boxes done) after every box."""
    import torch
    _check_video_input(latent, "latent")
    budget = _check_budget(budget_bytes)
    check_ltx(decoder)
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise ValueError(f"frames must be an int >= 1 (latent frames per time box), got {frames!r}")
    if timestep is not None and (isinstance(timestep, bool) or not isinstance(timestep, (int, float))
                                 or not math.isfinite(timestep)):
        raise ValueError(f"timestep must be a finite number, got {timestep!r}")
    b, _, t, lh, lw = latent.shape
    tc = bool(getattr(decoder, "timestep_conditioning", False))
    if timestep is None:
        timestep = getattr(vae, "decode_timestep", 0.05) if vae is not None else 0.05
    steps, final, comp = _compile(decoder, b, timestep)
    k = b * latent.element_size()
    if grid is not None or frames is not None:
        if grid is not None:
            rows, cols = _grid_arg(grid, lh, lw)
        else:
            p = plan_ltx(decoder, t, lh, lw, budget_bytes=budget, batch=b, elem=latent.element_size())
            rows, cols = p.rows, p.cols
        nt = -(-t // frames) if frames is not None else 1
    else:
        p = plan_ltx(decoder, t, lh, lw, budget_bytes=budget, batch=b, elem=latent.element_size())
        rows, cols, nt = p.rows, p.cols, p.chunks
    # steps may merge boxes only up to the working set of the planned box at its costliest step
    td, th, tw = -(-t // nt), -(-lh // rows), -(-lw // cols)
    cap = min(budget, int(max(_step_elems(s, td, th, tw) for s in steps) * k))
    device = torch.device(device) if device is not None else latent.device
    store = torch.device(store_device) if store_device is not None else latent.device
    with torch.no_grad():
        z = latent
        if vae is not None:
            if tc and getattr(vae, "timestep_conditioning", tc):
                ns = getattr(vae, "decode_noise_scale", 0.025)
                z = torch.randn_like(z) * ns + (1.0 - ns) * z
            stats = getattr(vae, "per_channel_statistics", None)
            if stats is not None:
                z = stats.un_normalize(z)
        out = _run_steps(steps, comp, z, final, (nt, rows, cols), device=device, store=store, cap=cap,
                         progress=progress)
    log.info("vramguard: tiled LTX VAE %dx%dx%d latent layer by layer as %d time x %dx%d space boxes", t, lh, lw, nt,
             rows, cols)
    return out
