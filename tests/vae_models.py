"""Small SD-shaped VAEs from plain torch layers, sanely initialised (never torch.empty).

Same attribute layout as ComfyUI's comfy.ldm.modules.diffusionmodules.model Decoder/Encoder
(conv_in, mid.block_1/attn_1/block_2, up[i].block/attn/upsample, down[i]..., norm_out, conv_out),
so vramguard.vae runs both. `comfy_decoder()` builds ComfyUI's real classes when a checkout is
at $VRAMGUARD_COMFYUI or /work/comfy/ComfyUI (None otherwise), with the same init.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

COMFY = os.environ.get("VRAMGUARD_COMFYUI", "/work/comfy/ComfyUI")


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.use_conv_shortcut = False
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, temb=None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, c: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (self.q(n), self.k(n), self.v(n)))
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(o)


class Upsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.with_conv, self.scale_factor = True, 2.0
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.with_conv = True
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Decoder(nn.Module):
    def __init__(self, ch: int = 32, ch_mult=(1, 2, 2, 4), num_res_blocks: int = 1, z_channels: int = 4,
                 out_ch: int = 3, groups: int = 8, attn_up: bool = False) -> None:
        super().__init__()
        self.num_resolutions, self.num_res_blocks, self.tanh_out = len(ch_mult), num_res_blocks, False
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, groups)
        self.mid.attn_1 = AttnBlock(block_in, groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, groups)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, groups))
                block_in = block_out
                if attn_up and i_level == self.num_resolutions - 1:
                    up.attn.append(AttnBlock(block_in, groups))
            if i_level != 0:
                up.upsample = Upsample(block_in)
            self.up.insert(0, up)
        self.norm_out = nn.GroupNorm(groups, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i_level in reversed(range(self.num_resolutions)):
            for i_block in range(self.num_res_blocks + 1):
                h = self.up[i_level].block[i_block](h)
                if len(self.up[i_level].attn) > 0:
                    h = self.up[i_level].attn[i_block](h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Encoder(nn.Module):
    def __init__(self, ch: int = 32, ch_mult=(1, 2, 2, 4), num_res_blocks: int = 1, z_channels: int = 4,
                 in_ch: int = 3, groups: int = 8) -> None:
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, groups))
                block_in = block_out
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, groups)
        self.mid.attn_1 = AttnBlock(block_in, groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, groups)
        self.norm_out = nn.GroupNorm(groups, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level in range(self.num_resolutions):
            for i_block in range(self.num_res_blocks):
                h = self.down[i_level].block[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = self.down[i_level].downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


def sane_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter drawn afresh (seeded): convs and linears Kaiming-uniform (torch's default rule), norms
    with weight ~ 1 +- 0.2 and bias +- 0.2 so statistics matter, biases small. Nothing left from
    uninitialised memory: a VAE built on torch.empty decoded to all black (the old fixture bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)) or type(m).__name__ in ("Conv2d", "Conv3d", "Linear",
                                                                                           "Conv1x1"):
                fan_in = m.weight[0].numel()
                bound = (6.0 / fan_in) ** 0.5 / 2 ** 0.5
                m.weight.copy_((torch.rand(m.weight.shape, generator=g) * 2 - 1) * bound)
                if m.bias is not None:
                    m.bias.copy_((torch.rand(m.bias.shape, generator=g) * 2 - 1) * 0.05)
            elif isinstance(m, nn.GroupNorm) or type(m).__name__ == "GroupNorm":
                m.weight.copy_(1 + (torch.rand(m.weight.shape, generator=g) * 2 - 1) * 0.2)
                m.bias.copy_((torch.rand(m.bias.shape, generator=g) * 2 - 1) * 0.2)
    return model.eval()


def sd_decoder(seed: int = 0, **kw) -> Decoder:
    return sane_init(Decoder(**kw), seed)


def sd_encoder(seed: int = 0, **kw) -> Encoder:
    return sane_init(Encoder(**kw), seed)


def comfy_available() -> str | None:
    """None when ComfyUI's VAE classes import, else why not."""
    if not os.path.isfile(os.path.join(COMFY, "comfy", "ldm", "modules", "diffusionmodules", "model.py")):
        return f"no ComfyUI checkout at {COMFY} (set VRAMGUARD_COMFYUI)"
    try:
        _comfy_model()
    except Exception as e:  # missing requirements (psutil, einops, safetensors, comfy_aimdo...)
        return f"ComfyUI at {COMFY} does not import here: {type(e).__name__}: {e}"
    return None


def _comfy_model():
    if COMFY not in sys.path:
        sys.path.insert(0, COMFY)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True        # no CUDA here; must be set before model_management imports
    import comfy.ldm.modules.diffusionmodules.model as m
    return m


def comfy_decoder(seed: int = 0, ch: int = 32, ch_mult=(1, 2, 2, 4), num_res_blocks: int = 1):
    """ComfyUI's real Decoder class (32-group GroupNorm, its attention), sanely initialised."""
    m = _comfy_model()
    d = m.Decoder(ch=ch, out_ch=3, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks, attn_resolutions=[],
                  in_channels=3, resolution=256, z_channels=4)
    return sane_init(d, seed)


def comfy_encoder(seed: int = 0, ch: int = 32, ch_mult=(1, 2, 2, 4), num_res_blocks: int = 1):
    m = _comfy_model()
    e = m.Encoder(ch=ch, out_ch=3, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks, attn_resolutions=[],
                  in_channels=3, resolution=256, z_channels=4, double_z=True)
    return sane_init(e, seed)


def test_card_latent(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A latent with structure at every scale: smooth gradients + blobs + fine noise (SD-like std ~1)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    chans = []
    for c in range(4):
        f = 1.5 + c
        base = torch.sin(f * xx * 3.1 + c) * torch.cos(f * yy * 2.3 - c) + 0.6 * (xx * (c - 1.5) / 1.5 + yy)
        chans.append(base)
    z = torch.stack(chans)[None]
    return z + 0.3 * torch.randn(z.shape, generator=g)


def gradient_latent(h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack([xx, yy, 0.5 * (xx + yy), -xx])[None] * 1.5


class LiveBytes:
    """Peak bytes of live tensors created by torch ops while active (a device-peak proxy on CPU),
    and the largest single tensor. Views count with their base (first storage seen)."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.largest = 0
        self._seen: set[int] = set()

    def __enter__(self) -> "LiveBytes":
        import weakref
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                given = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                         if isinstance(a, torch.Tensor)}
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        st = t.untyped_storage()
                        key = st.data_ptr()
                        if key in outer._seen or key in given or st.nbytes() == 0:
                            continue   # a view of (or in-place on) memory that already existed
                        outer._seen.add(key)
                        n = st.nbytes()
                        outer.live += n
                        outer.peak = max(outer.peak, outer.live)
                        outer.largest = max(outer.largest, n)
                        weakref.finalize(t, outer._free, key, n)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def _free(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self.live -= n

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def tile_peak_scope(peaks: list):
    """A stand-in for vramguard.vae._tile_scope that appends each tile's live-byte peak to `peaks`."""
    class Scope:
        def __enter__(self):
            self.lb = LiveBytes().__enter__()

        def __exit__(self, *e):
            self.lb.__exit__(*e)
            peaks.append(self.lb.peak)
    return Scope


@contextlib.contextmanager
def oom_on_call(module: nn.Module, k: int):
    """Inside the block, module's k-th forward call raises torch.OutOfMemoryError (an injected
    CUDA OOM); the other calls run as usual.  The module's own forward is back afterwards."""
    real, n = module.forward, {"k": 0}

    def flaky(*a, **kw):
        n["k"] += 1
        if n["k"] == k:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*a, **kw)

    module.forward = flaky
    try:
        yield n
    finally:
        del module.forward


def psnr(a: torch.Tensor, b: torch.Tensor, peak_to_peak: float = 2.0) -> float:
    """PSNR in dB of a against b for signals spanning peak_to_peak (2 for [-1, 1])."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak_to_peak ** 2 / mse)).item()


def seam_ratio(img: torch.Tensor, ys: list[int], xs: list[int]) -> float:
    """Gradient energy across tile borders (rows ys, columns xs, in pixels) over the mean elsewhere."""
    dy = (img[:, :, 1:, :] - img[:, :, :-1, :]).double() ** 2   # dy[i] is between rows i and i+1
    dx = (img[:, :, :, 1:] - img[:, :, :, :-1]).double() ** 2
    my = torch.zeros(dy.shape[2], dtype=torch.bool)
    mx = torch.zeros(dx.shape[3], dtype=torch.bool)
    for y in ys:
        if 0 < y < img.shape[2]:
            my[y - 1] = True
    for x in xs:
        if 0 < x < img.shape[3]:
            mx[x - 1] = True
    e_border, n_border = dy[:, :, my].sum() + dx[..., mx].sum(), dy[:, :, my].numel() + dx[..., mx].numel()
    e_rest, n_rest = dy[:, :, ~my].sum() + dx[..., ~mx].sum(), dy[:, :, ~my].numel() + dx[..., ~mx].numel()
    if n_border == 0:
        return 1.0
    return float((e_border / n_border) / (e_rest / n_rest))


# ------------------------------------------------------------------ a Wan 2.1-shaped video VAE decoder
# Same class names, attributes and cache protocol as ComfyUI's comfy.ldm.wan.vae (CausalConv3d with
# a cache of the last 2 input frames, RMS_norm, per-frame AttentionBlock, Resample upsample2d /
# upsample3d with the "Rep" first-chunk rule), written with plain torch layers.

CACHE_T = 2


class CausalConv3d(nn.Conv3d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._padding = 2 * self.padding[0]
        self.padding = (0, self.padding[1], self.padding[2])

    def forward(self, x, cache_x=None, cache_list=None, cache_idx=None):
        if cache_list is not None:
            cache_x = cache_list[cache_idx]
            cache_list[cache_idx] = None
        if self._padding > 0:
            need = self._padding
            parts = []
            if cache_x is not None:
                need = max(0, need - cache_x.shape[2])
            if need:
                shape = list(x.shape)
                shape[2] = need
                parts.append(torch.zeros(shape, dtype=x.dtype, device=x.device))
            if cache_x is not None:
                parts.append(cache_x.to(x.device))
            x = torch.cat(parts + [x], 2)
        return super().forward(x)


class RMS_norm(nn.Module):
    def __init__(self, dim, images=True):
        super().__init__()
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(shape))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.scale * self.gamma


def _frames(x):          # b c t h w -> (b t) c h w
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def _unframes(x, b, t):  # (b t) c h w -> b c t h w
    bt, c, h, w = x.shape
    return x.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


class Resample(nn.Module):
    def __init__(self, dim, mode):
        super().__init__()
        self.dim, self.mode = dim, mode
        if mode.startswith("down"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))
            return
        self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                      nn.Conv2d(dim, dim // 2, 3, padding=1))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x, feat_cache=None, feat_idx=[0], final=False):
        if self.mode.startswith("down"):
            return self._down(x, feat_cache, feat_idx, final)
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d" and feat_cache is not None:
            idx = feat_idx[0]
            if feat_cache[idx] is None:
                feat_cache[idx] = "Rep"
            else:
                cache_x = x[:, :, -CACHE_T:]
                x = self.time_conv(x) if isinstance(feat_cache[idx], str) else self.time_conv(x, feat_cache[idx])
                feat_cache[idx] = cache_x
                x = x.reshape(b, 2, c, t, h, w)
                x = torch.stack((x[:, 0], x[:, 1]), 3).reshape(b, c, t * 2, h, w)
            feat_idx[0] += 1
        t = x.shape[2]
        return _unframes(self.resample(_frames(x)), b, t)

    def _down(self, x, feat_cache, feat_idx, final):
        """Wan 2.1's (ComfyUI 0.30) downsample: spatial stride 2 per frame, then for downsample3d a
        stride-2 time conv over [the last frame kept, x]; the first chunk keeps x and passes it on;
        a lone output frame is deferred to the next chunk (None: the encoder stops) unless final."""
        b, c, t, h, w = x.shape
        x = _unframes(self.resample(_frames(x)), b, t)
        if self.mode == "downsample3d" and feat_cache is not None:
            idx = feat_idx[0]
            if feat_cache[idx] is None:
                feat_cache[idx] = x
            else:
                cache_x = x[:, :, -1:]
                x = self.time_conv(torch.cat([feat_cache[idx][:, :, -1:], x], 2))
                feat_cache[idx] = cache_x
                if feat_cache[idx + 1] is not None:
                    x = torch.cat([feat_cache[idx + 1], x], 2)
                    feat_cache[idx + 1] = None
                if x.shape[2] == 1 and not final:
                    feat_cache[idx + 1] = x
                    x = None
            feat_idx[0] += 2
        return x


class ResidualBlock(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.residual = nn.Sequential(RMS_norm(in_dim, images=False), nn.SiLU(),
                                      CausalConv3d(in_dim, out_dim, 3, padding=1),
                                      RMS_norm(out_dim, images=False), nn.SiLU(), nn.Dropout(0.0),
                                      CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x, feat_cache=None, feat_idx=[0], final=False):
        old_x = x
        for layer in self.residual:
            if isinstance(layer, CausalConv3d) and feat_cache is not None:
                idx = feat_idx[0]
                cache_x = x[:, :, -CACHE_T:]
                x = layer(x, cache_list=feat_cache, cache_idx=idx)
                feat_cache[idx] = cache_x
                feat_idx[0] += 1
            else:
                x = layer(x)
        return x + self.shortcut(old_x)


class AttentionBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x, feat_cache=None, feat_idx=[0], final=False):
        b, c, t, h, w = x.shape
        f = self.norm(_frames(x))
        q, k, v = (u.flatten(2).transpose(1, 2).unsqueeze(1) for u in self.to_qkv(f).chunk(3, dim=1))
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        return _unframes(self.proj(o), b, t) + x


class Decoder3d(nn.Module):
    """Wan 2.1's decoder layout (dims = dim * [mult[-1]] + mult[::-1], up 2d/3d), small."""

    def __init__(self, dim=16, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                 temperal_upsample=(False, True, True)):
        super().__init__()
        dims = [dim * u for u in [dim_mult[-1]] + list(dim_mult[::-1])]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        ups = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i in (1, 2, 3):
                in_dim = in_dim // 2
            for _ in range(num_res_blocks + 1):
                ups.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                ups.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*ups)
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(),
                                  CausalConv3d(out_dim, 3, 3, padding=1))

    def forward(self, x, feat_cache=None, feat_idx=[0]):
        idx = feat_idx[0]
        cache_x = x[:, :, -CACHE_T:]
        x = self.conv1(x, feat_cache[idx])
        feat_cache[idx] = cache_x
        feat_idx[0] += 1
        for layer in [*self.middle, *self.upsamples]:
            x = layer(x, feat_cache, feat_idx)
        for layer in self.head:
            if isinstance(layer, CausalConv3d):
                cache_x = x[:, :, -CACHE_T:]
                x = layer(x, feat_cache[feat_idx[0]])
                feat_cache[feat_idx[0]] = cache_x
                feat_idx[0] += 1
            else:
                x = layer(x)
        return x


class Encoder3d(nn.Module):
    """Wan 2.1's encoder layout (ComfyUI's Encoder3d): conv1, residual blocks with downsample2d/3d
    Resamples (temperal_downsample), middle (res, attention, res), head; small."""

    def __init__(self, dim=16, z_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1, attn_scales=(),
                 temperal_downsample=(False, True, True)):     # what ComfyUI's sd.py builds for Wan 2.1
        super().__init__()
        dims = [dim * u for u in [1] + list(dim_mult)]
        scale = 1.0
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        downs = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                downs.append(ResidualBlock(in_dim, out_dim))
                if scale in attn_scales:
                    downs.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                downs.append(Resample(out_dim, "downsample3d" if temperal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*downs)
        self.middle = nn.Sequential(ResidualBlock(out_dim, out_dim), AttentionBlock(out_dim),
                                    ResidualBlock(out_dim, out_dim))
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(),
                                  CausalConv3d(out_dim, z_dim, 3, padding=1))

    def forward(self, x, feat_cache=None, feat_idx=[0], final=False):
        if feat_cache is not None:
            idx = feat_idx[0]
            cache_x = x[:, :, -CACHE_T:]
            x = self.conv1(x, feat_cache[idx])
            feat_cache[idx] = cache_x
            feat_idx[0] += 1
        else:
            x = self.conv1(x)
        for layer in [*self.downsamples, *self.middle]:
            x = layer(x, feat_cache, feat_idx, final=final) if feat_cache is not None else layer(x)
            if x is None:
                return None
        for layer in self.head:
            if isinstance(layer, CausalConv3d) and feat_cache is not None:
                cache_x = x[:, :, -CACHE_T:]
                x = layer(x, feat_cache[feat_idx[0]])
                feat_cache[feat_idx[0]] = cache_x
                feat_idx[0] += 1
            else:
                x = layer(x)
        return x


def wan_encode(encoder, x, conv1=None):
    """WanVAE.encode's loop (ComfyUI 0.30): frames cut to 1 + 4N, frame 0, then 2 frames at a time
    with one cache slot per CausalConv3d and per downsample3d Resample (two: kept frame, deferred
    output); returns conv1's output (mean and logvar) or the encoder's.  Works on ComfyUI's too."""
    n = sum(1 for m in encoder.modules()
            if type(m).__name__ == "CausalConv3d" or (type(m).__name__ == "Resample" and m.mode == "downsample3d"))
    t = 1 + ((x.shape[2] - 1) // 4) * 4
    iters = 1 + (t - 1) // 2
    feat = [None] * n if iters > 1 else None
    outs = []
    with torch.no_grad():
        for i in range(iters):
            a, b = (0, 1) if i == 0 else (1 + 2 * (i - 1), 1 + 2 * i)
            o = encoder(x[:, :, a:b], feat_cache=feat, feat_idx=[0], final=i == iters - 1)
            if o is not None:
                outs.append(o)
        out = torch.cat(outs, 2)
        return conv1(out) if conv1 is not None else out


def _rms_gammas(m, seed):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1000)
        for mod in m.modules():
            if type(mod).__name__ == "RMS_norm":
                mod.gamma.copy_(1 + (torch.rand(mod.gamma.shape, generator=g) * 2 - 1) * 0.2)
    return m


def wan_encoder(seed: int = 0, **kw) -> Encoder3d:
    m = Encoder3d(**kw)
    sane_init(m, seed)
    return _rms_gammas(m, seed).eval()


def comfy_wan_vae(seed: int = 0, dim: int = 16, dim_mult=(1, 2, 2, 2), num_res_blocks: int = 1,
                  temperal_downsample=(False, True, True)):
    """ComfyUI's own WanVAE (z_dim 4: encoder out 8 channels, conv1 8 -> 8), sanely initialised."""
    _comfy_model()
    import comfy.ldm.wan.vae as w
    m = w.WanVAE(dim=dim, z_dim=4, dim_mult=list(dim_mult), num_res_blocks=num_res_blocks,
                 temperal_downsample=list(temperal_downsample))
    sane_init(m, seed)
    return _rms_gammas(m, seed).eval()


def video_frames(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A moving, textured video in [-1, 1] (B=1, 3, t, h, w): a drifting test card plus noise."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, h).view(h, 1)
    xs = torch.linspace(0, 1, w).view(1, w)
    frames = []
    for i in range(t):
        s = i * 0.15
        r = torch.sin(6.0 * (xs + s)) * torch.cos(4.0 * ys)
        gch = ((xs * 5 + ys * 3 + s) % 1.0) * 2 - 1
        bch = torch.sign(torch.sin(9.0 * (xs - s)) * torch.sin(7.0 * ys)) * 0.6
        frames.append(torch.stack([r, gch, bch]))
    v = torch.stack(frames, 1).unsqueeze(0)
    return (v + 0.15 * torch.randn(v.shape, generator=g)).clamp(-1, 1)


def wan_decode(decoder, z, conv2=None):
    """WanVAE.decode's loop (ComfyUI 0.30): conv2, then latent frames [0], [1, 2], [3, 4], ... with
    one cache slot per CausalConv3d / Resample; works on our Decoder3d and on ComfyUI's."""
    n = sum(1 for m in decoder.modules() if type(m).__name__ == "CausalConv3d")
    feat = [None] * n
    x = conv2(z) if conv2 is not None else z
    out = []
    with torch.no_grad():
        for i in range(1 + x.shape[2] // 2):
            a, b = (0, 1) if i == 0 else (1 + 2 * (i - 1), 1 + 2 * i)
            if a >= x.shape[2]:
                break
            o = decoder(x[:, :, a:b], feat_cache=feat, feat_idx=[0])
            out.extend(o if isinstance(o, list) else [o])
    return torch.cat(out, 2)


def wan_decoder(seed: int = 0, **kw) -> Decoder3d:
    m = Decoder3d(**kw)
    sane_init(m, seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1000)
        for mod in m.modules():
            if isinstance(mod, RMS_norm):
                mod.gamma.copy_(1 + (torch.rand(mod.gamma.shape, generator=g) * 2 - 1) * 0.2)
    return m


def comfy_wan_decoder(seed: int = 0, dim: int = 16, dim_mult=(1, 2, 2, 2), num_res_blocks: int = 1):
    _comfy_model()
    import comfy.ldm.wan.vae as w
    d = w.Decoder3d(dim=dim, z_dim=4, dim_mult=list(dim_mult), num_res_blocks=num_res_blocks,
                    temperal_upsample=[False, True, True])
    sane_init(d, seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1000)
        for mod in d.modules():
            if type(mod).__name__ == "RMS_norm":
                mod.gamma.copy_(1 + (torch.rand(mod.gamma.shape, generator=g) * 2 - 1) * 0.2)
    return d.eval()


def video_latent(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A moving test card: the image latent drifting right and pulsing over time, plus noise."""
    g = torch.Generator().manual_seed(seed)
    frames = []
    for i in range(t):
        base = test_card_latent(h, w + t, seed=seed)[..., i:i + w]
        frames.append(base * (1 + 0.2 * torch.sin(torch.tensor(i * 0.7))))
    z = torch.stack(frames, 2)
    return z + 0.1 * torch.randn(z.shape, generator=g)


# ------------------------------------------------------------------ LTX-, Mochi-, HunyuanVideo-shaped
# Small stand-ins with the structure that decides how each can be tiled (ComfyUI 0.3x classes named):
#   LTX-Video (comfy.ldm.lightricks.vae.causal_video_autoencoder): CausalConv3d (first/last frame
#     replicated in time, zeros in space), PixelNorm (per voxel), DepthToSpaceUpsample (conv,
#     (c p1 p2 p3) -> (t p1)(h p2)(w p3), first frame dropped).  Every op is local.
#   Mochi (comfy.ldm.genmo.vae.model): causal PConv3d (replicate padding), GroupNormSpatial (a
#     GroupNorm per frame over the whole frame: not local in space), DepthToSpaceTime.
#   HunyuanVideo (comfy.ldm.modules.diffusionmodules.model.Decoder with conv3d=True): GroupNorm
#     over (C/g, T, H, W) of the whole video in the mid block, 3-D attention over every voxel,
#     then 2-latent-frame chunks with carried causal convs whose GroupNorms see only the chunk.

class PixelNorm(nn.Module):
    def __init__(self, dim=1, eps=1e-8):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x):
        return x / torch.sqrt(torch.mean(x ** 2, dim=self.dim, keepdim=True) + self.eps)


class LtxCausalConv3d(nn.Module):
    """LTX's CausalConv3d, non-causal as the decoder uses it: k//2 first/last frames replicated."""

    def __init__(self, cin, cout, k=3):
        super().__init__()
        self.time_kernel_size = k
        self.conv = nn.Conv3d(cin, cout, k, padding=(0, k // 2, k // 2))

    def forward(self, x, causal=False):
        p = (self.time_kernel_size - 1) // 2
        if p:
            x = torch.cat([x[:, :, :1].repeat(1, 1, p, 1, 1), x, x[:, :, -1:].repeat(1, 1, p, 1, 1)], 2)
        return self.conv(x)


class LtxResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm1, self.conv1 = PixelNorm(), LtxCausalConv3d(c, c)
        self.norm2, self.conv2 = PixelNorm(), LtxCausalConv3d(c, c)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class DepthToSpaceUpsample(nn.Module):
    def __init__(self, c, stride=(2, 2, 2)):
        super().__init__()
        self.stride = stride
        self.conv = LtxCausalConv3d(c, c * stride[0] * stride[1] * stride[2] // 2)

    def forward(self, x):
        y = self.conv(x)
        b, c, t, h, w = y.shape
        p1, p2, p3 = self.stride
        y = y.reshape(b, c // (p1 * p2 * p3), p1, p2, p3, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        y = y.reshape(b, c // (p1 * p2 * p3), t * p1, h * p2, w * p3)
        return y[:, :, 1:] if p1 == 2 else y


class LtxDecoder(nn.Module):
    """conv_in, up_blocks (res blocks and depth-to-space x2 in time and space), norm, conv_out;
    out: (B, 3, 1 + 4 (T - 1), 4 H, 4 W)."""

    def __init__(self, z=4, c=32):
        super().__init__()
        self.conv_in = LtxCausalConv3d(z, c)
        self.up_blocks = nn.ModuleList([LtxResBlock(c), DepthToSpaceUpsample(c), LtxResBlock(c // 2),
                                        DepthToSpaceUpsample(c // 2), LtxResBlock(c // 4)])
        self.conv_norm_out = PixelNorm()
        self.conv_out = LtxCausalConv3d(c // 4, 3)

    def forward(self, x):
        x = self.conv_in(x)
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class GroupNormSpatial(nn.GroupNorm):
    def forward(self, x):
        b, c, t, h, w = x.shape
        y = super().forward(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


class PConv3d(nn.Conv3d):
    """Mochi's causal conv: k-1 first frames replicated in time (replicate padding in space is the
    conv's own padding_mode)."""

    def forward(self, x):
        k = self.kernel_size[0]
        x = F.pad(x, (0, 0, 0, 0, k - 1, 0), mode="replicate")
        return super().forward(x)


class MochiResBlock(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.channels = c
        self.stack = nn.Sequential(GroupNormSpatial(groups, c), nn.SiLU(), PConv3d(c, c, 3, padding=(0, 1, 1),
                                                                                     padding_mode="replicate"),
                                   GroupNormSpatial(groups, c), nn.SiLU(), PConv3d(c, c, 3, padding=(0, 1, 1),
                                                                                     padding_mode="replicate"))
        self.attn_block = nn.Identity()

    def forward(self, x):
        return self.attn_block(x + self.stack(x))


class Conv1x1(nn.Linear):
    def forward(self, x):
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class DepthToSpaceTime(nn.Module):
    def __init__(self, temporal_expansion, spatial_expansion):
        super().__init__()
        self.temporal_expansion, self.spatial_expansion = temporal_expansion, spatial_expansion

    def forward(self, x):
        b, c, t, h, w = x.shape
        st, s = self.temporal_expansion, self.spatial_expansion
        x = x.reshape(b, c // (st * s * s), st, s, s, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, c // (st * s * s), t * st, h * s, w * s)
        return x[:, :, st - 1:] if st > 1 else x


class CausalUpsampleBlock(nn.Module):
    def __init__(self, cin, cout, n, groups, temporal_expansion=2, spatial_expansion=2):
        super().__init__()
        self.blocks = nn.Sequential(*[MochiResBlock(cin, groups) for _ in range(n)])
        self.proj = Conv1x1(cin, cout * temporal_expansion * spatial_expansion ** 2)
        self.d2st = DepthToSpaceTime(temporal_expansion, spatial_expansion)

    def forward(self, x):
        return self.d2st(self.proj(self.blocks(x)))


class MochiDecoder(nn.Module):
    """comfy.ldm.genmo.vae.model.Decoder's layout: blocks = [Sequential(Conv3d 1x1, ResBlocks),
    CausalUpsampleBlock (ResBlocks, Conv1x1, DepthToSpaceTime dropping the first st - 1 frames) ...,
    Sequential(ResBlocks)], SiLU, output_proj; GroupNormSpatial = a GroupNorm per frame."""

    def __init__(self, z=4, c=16, mults=(1, 2), texp=(2,), sexp=(2,), nres=(1, 1, 1), groups=8):
        super().__init__()
        ch = [m * c for m in mults]
        self.output_nonlinearity = "silu"
        blocks = [nn.Sequential(nn.Conv3d(z, ch[-1], 1), *[MochiResBlock(ch[-1], groups) for _ in range(nres[-1])])]
        for i in range(len(ch) - 1):
            blocks.append(CausalUpsampleBlock(ch[-i - 1], ch[-i - 2], nres[-i - 2], groups, texp[-i - 1], sexp[-i - 1]))
        blocks.append(nn.Sequential(*[MochiResBlock(ch[0], groups) for _ in range(nres[0])]))
        self.blocks = nn.ModuleList(blocks)
        self.output_proj = Conv1x1(ch[0], 3)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.output_proj(F.silu(x))


class CarriedConv3d(nn.Module):
    """ComfyUI's CarriedConv3d: a plain Conv3d whose padding conv_carry_causal_3d does."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel_size, stride=stride)

    def forward(self, x):
        return self.conv(x)


def conv_carry_causal_3d(x, op, carry_in=None, carry_out=None):
    """ComfyUI's rule: frame 0 replicated twice in time (first chunk) or the carried 2 frames,
    replicate padding in space; the last 2 padded input frames pushed for the next chunk."""
    if isinstance(op, CarriedConv3d):
        if carry_in is None:
            x = F.pad(x, (1, 1, 1, 1, 2, 0), mode="replicate")
        else:
            x = F.pad(x, (1, 1, 1, 1, 2 - carry_in[0].shape[2], 0), mode="replicate")
            x = torch.cat([carry_in.pop(0), x], dim=2)
        if carry_out is not None:
            carry_out.append(x[:, :, -2:].clone())
    return op(x)


class HyResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.in_channels, self.out_channels, self.use_conv_shortcut = cin, cout, False
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps=1e-6), CarriedConv3d(cin, cout, 3)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps=1e-6), CarriedConv3d(cout, cout, 3)
        if cin != cout:
            self.nin_shortcut = CarriedConv3d(cin, cout, 1)

    def forward(self, x, carry_in=None, carry_out=None):
        h = conv_carry_causal_3d(F.silu(self.norm1(x)), self.conv1, carry_in, carry_out)
        h = conv_carry_causal_3d(F.silu(self.norm2(h)), self.conv2, carry_in, carry_out)
        return (self.nin_shortcut(x) if self.in_channels != self.out_channels else x) + h


class HyAttnBlock(nn.Module):
    """Attention over every voxel of the video (GroupNorm over all of it)."""

    def __init__(self, c, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv3d(c, c, 1) for _ in range(4))

    def forward(self, x):
        n = self.norm(x)
        q, k, v = (t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (self.q(n), self.k(n), self.v(n)))
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(x.shape)
        return x + self.proj_out(o)


class HyUpsample(nn.Module):
    def __init__(self, c, scale_factor):
        super().__init__()
        self.with_conv, self.scale_factor = True, scale_factor
        self.conv = CarriedConv3d(c, c, 3)

    def forward(self, x, carry_in=None, carry_out=None):
        parts = []
        if self.scale_factor[0] > 1.0:
            if carry_in is None:        # the first chunk: frame 0 is upsampled in space only
                parts.append(F.interpolate(x[:, :, :1], scale_factor=(1.0, 2.0, 2.0), mode="nearest"))
                x = x[:, :, 1:]
            if x.shape[2] > 0:
                parts.append(F.interpolate(x, scale_factor=self.scale_factor, mode="nearest"))
            x = torch.cat(parts, 2)
        else:
            x = F.interpolate(x, scale_factor=self.scale_factor, mode="nearest")
        return conv_carry_causal_3d(x, self.conv, carry_in, carry_out)


class HunyuanDecoder(nn.Module):
    """ComfyUI's Decoder(conv3d=True, time_compress=tc) (HunyuanVideo's VAE) with plain torch layers:
    conv_in and the mid block (GroupNorm + attention over the whole video) at once, then the up
    path in chunks of 2 latent frames with carried causal convs (GroupNorm per chunk)."""

    def __init__(self, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, out_ch=3, groups=8,
                 time_compress=2):
        super().__init__()
        self.num_resolutions, self.num_res_blocks, self.tanh_out, self.carried = len(ch_mult), num_res_blocks, False, True
        block_in = ch * ch_mult[-1]
        self.conv_in = CarriedConv3d(z_channels, block_in, 3)
        self.mid = nn.Module()
        self.mid.block_1 = HyResnetBlock(block_in, block_in, groups)
        self.mid.attn_1 = HyAttnBlock(block_in, groups)
        self.mid.block_2 = HyResnetBlock(block_in, block_in, groups)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                up.block.append(HyResnetBlock(block_in, block_out, groups))
                block_in = block_out
            if i_level != 0:
                t = 2.0 if i_level <= math.log2(time_compress) else 1.0
                up.upsample = HyUpsample(block_in, (t, 2.0, 2.0))
            self.up.insert(0, up)
        self.norm_out = nn.GroupNorm(groups, block_in, eps=1e-6)
        self.conv_out = CarriedConv3d(block_in, out_ch, 3)

    def forward(self, z):
        h = conv_carry_causal_3d(z, self.conv_in)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        out, carry_in = [], None
        chunks = torch.split(h, 2, dim=2)
        for i, h1 in enumerate(chunks):
            carry_out = [] if i < len(chunks) - 1 else None
            for i_level in reversed(range(self.num_resolutions)):
                for blk in self.up[i_level].block:
                    h1 = blk(h1, carry_in, carry_out)
                if i_level != 0:
                    h1 = self.up[i_level].upsample(h1, carry_in, carry_out)
            out.append(conv_carry_causal_3d(F.silu(self.norm_out(h1)), self.conv_out, carry_in, carry_out))
            carry_in = carry_out
        return torch.cat(out, 2)


class HyDownsample(nn.Module):
    def __init__(self, c, stride):
        super().__init__()
        self.with_conv = True
        self.conv = CarriedConv3d(c, c, 3, stride=stride)

    def forward(self, x, carry_in=None, carry_out=None):
        return conv_carry_causal_3d(x, self.conv, carry_in, carry_out)


class HunyuanEncoder(nn.Module):
    """ComfyUI's Encoder(conv3d=True, time_compress=tc) with plain torch layers: frame 0 alone, then
    chunks of 2 tc frames down the carried causal path (GroupNorm per chunk), then the mid block,
    norm_out and conv_out over the whole latent video."""

    def __init__(self, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, in_ch=3, groups=8,
                 time_compress=2):
        super().__init__()
        self.num_resolutions, self.num_res_blocks, self.carried = len(ch_mult), num_res_blocks, True
        self.conv_in = CarriedConv3d(in_ch, ch, 3)
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            for _ in range(num_res_blocks):
                down.block.append(HyResnetBlock(block_in, ch * ch_mult[i_level], groups))
                block_in = ch * ch_mult[i_level]
            if i_level != self.num_resolutions - 1:
                stride = (1, 2, 2) if (self.num_resolutions - 1 - i_level) > math.log2(time_compress) else 2
                down.downsample = HyDownsample(block_in, stride)
            self.down.append(down)
        self.time_compress = time_compress
        self.mid = nn.Module()
        self.mid.block_1 = HyResnetBlock(block_in, block_in, groups)
        self.mid.attn_1 = HyAttnBlock(block_in, groups)
        self.mid.block_2 = HyResnetBlock(block_in, block_in, groups)
        self.norm_out = nn.GroupNorm(groups, block_in, eps=1e-6)
        self.conv_out = CarriedConv3d(block_in, 2 * z_channels, 3)

    def forward(self, x):
        tc = self.time_compress
        xl = [x[:, :, :1]]
        if x.shape[2] > tc:
            xl += torch.split(x[:, :, 1:1 + ((x.shape[2] - 1) // tc) * tc], tc * 2, dim=2)
        out, carry_in = [], None
        for i, h in enumerate(xl):
            carry_out = [] if i < len(xl) - 1 else None
            h = conv_carry_causal_3d(h, self.conv_in, carry_in, carry_out)
            for i_level in range(self.num_resolutions):
                for blk in self.down[i_level].block:
                    h = blk(h, carry_in, carry_out)
                if i_level != self.num_resolutions - 1:
                    h = self.down[i_level].downsample(h, carry_in, carry_out)
            out.append(h)
            carry_in = carry_out
        h = torch.cat(out, 2)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return conv_carry_causal_3d(F.silu(self.norm_out(h)), self.conv_out)


def hunyuan_encoder(seed: int = 0, **kw) -> HunyuanEncoder:
    return _video_init(HunyuanEncoder(**kw), seed)


def _video_init(m, seed):
    sane_init(m, seed)
    return m.eval()


def ltx_decoder(seed: int = 0, **kw) -> LtxDecoder:
    return _video_init(LtxDecoder(**kw), seed)


def mochi_decoder(seed: int = 0, **kw) -> MochiDecoder:
    return _video_init(MochiDecoder(**kw), seed)


def hunyuan_decoder(seed: int = 0, **kw) -> HunyuanDecoder:
    return _video_init(HunyuanDecoder(**kw), seed)


def comfy_ltx_vae(seed: int = 0):
    """ComfyUI's real LTX-Video VideoVAE (causal_video_autoencoder) at a small config: version-0
    layout (PixelNorm, non-causal decoder, patch 4, one compress_all), 16 base channels.  Its
    per-channel latent statistics are buffers (torch.empty in the class): set to identity here."""
    _comfy_model()
    import comfy.ldm.lightricks.vae.causal_video_autoencoder as ltx
    cfg = {"dims": 3, "in_channels": 3, "out_channels": 3, "latent_channels": 128,
           "decoder_blocks": [["res_x", {"num_layers": 1}], ["compress_all", {"residual": True, "multiplier": 2}],
                              ["res_x", {"num_layers": 1}]],
           "encoder_blocks": [["res_x", {"num_layers": 1}], ["compress_all", {}], ["res_x", {"num_layers": 1}]],
           "decoder_base_channels": 16, "encoder_base_channels": 16, "scaling_factor": 1.0,
           "norm_layer": "pixel_norm", "patch_size": 4, "latent_log_var": "uniform", "use_quant_conv": False,
           "causal_decoder": False}
    m = sane_init(ltx.VideoVAE(config=cfg), seed)
    with torch.no_grad():
        for n, b in m.per_channel_statistics.named_buffers():
            b.fill_(1.0 if "std" in n else 0.0)
    return m


def comfy_video_decoders(seed: int = 0) -> dict:
    """ComfyUI's real Mochi decoder and HunyuanVideo decoder/encoder classes, small."""
    m = _comfy_model()
    import comfy.ldm.genmo.vae.model as genmo
    hy = m.Decoder(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], in_channels=3,
                   resolution=64, z_channels=4, conv3d=True, time_compress=2)
    mochi = genmo.Decoder(out_channels=3, base_channels=32, channel_multipliers=[1, 2], temporal_expansions=[2],
                          spatial_expansions=[2], num_res_blocks=[1, 1, 1], latent_dim=4, has_attention=[False] * 3,
                          output_norm=False, nonlinearity="silu", output_nonlinearity="silu", causal=True,
                          padding_mode="replicate", affine=True, bias=True)
    hy_enc = m.Encoder(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], in_channels=3,
                       resolution=64, z_channels=4, double_z=True, conv3d=True, time_compress=2)
    return {"hunyuan": sane_init(hy, seed), "mochi": sane_init(mochi, seed), "hunyuan_encoder": sane_init(hy_enc, seed)}


def comfy_ltx_vae_091(seed: int = 0, causal: bool = False):
    """ComfyUI's real LTX-Video VideoVAE in a 0.9.1-style layout, small: timestep conditioning
    (decode noise, time embedders, per-block and last scale/shift tables), inject_noise res
    blocks, a residual compress_all with multiplier 2, compress_time, compress_space and a res_x_y
    (channel LayerNorm + 1x1x1 shortcut), PixelNorm, reflect padding, patch 4.  Decoder order:
    res_x(2, noise) 32ch, compress_space, res_x_y 32->16, compress_time, res_x(1, noise),
    compress_all (residual) 16->8, res_x(1); (T - 1) x 4 + 1 frames, 16 x the latent's size.
    What ComfyUI leaves to the checkpoint (torch.empty or zeros) is drawn here, seeded: channel
    LayerNorms, last_scale_shift_table, the noise scales and the latent statistics."""
    _comfy_model()
    import comfy.ldm.lightricks.vae.causal_video_autoencoder as ltx
    cfg = {"dims": 3, "in_channels": 3, "out_channels": 3, "latent_channels": 128,
           "decoder_blocks": [["res_x", {"num_layers": 1, "inject_noise": False}],
                              ["compress_all", {"residual": True, "multiplier": 2}],
                              ["res_x", {"num_layers": 1, "inject_noise": True}],
                              ["compress_time", {"multiplier": 1}],
                              ["res_x_y", {"multiplier": 2}],
                              ["compress_space", {"multiplier": 1}],
                              ["res_x", {"num_layers": 2, "inject_noise": True}]],
           "encoder_blocks": [["res_x", {"num_layers": 1}], ["compress_all", {}], ["res_x", {"num_layers": 1}]],
           "decoder_base_channels": 8, "encoder_base_channels": 8, "scaling_factor": 1.0,
           "norm_layer": "pixel_norm", "patch_size": 4, "latent_log_var": "uniform", "use_quant_conv": False,
           "causal_decoder": causal, "timestep_conditioning": True}
    m = sane_init(ltx.VideoVAE(config=cfg), seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if ".norm3." in name or name.endswith("norm.weight") or name.endswith("norm.bias"):
                p.copy_((1.0 if leaf == "weight" else 0.0) + (torch.rand(p.shape, generator=g) * 2 - 1) * 0.2)
            elif leaf in ("last_scale_shift_table", "scale_shift_table"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif leaf.startswith("per_channel_scale"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
        for n, b in m.per_channel_statistics.named_buffers():
            b.copy_(0.5 + torch.rand(b.shape, generator=g) if "std" in n else (torch.rand(b.shape, generator=g) - 0.5) * 0.4)
    return m


# LTX-Video 0.9.1-style stand-in (no ComfyUI needed): the math of ComfyUI's causal_video_autoencoder
# with timestep conditioning (a time embedder per mid block and a last one, scale/shift tables),
# decode noise, inject_noise (one whole-frame noise per conv), a residual depth-to-space block
# with a channel reduction, a res_x_y block (channel LayerNorm + 1x1x1 shortcut) and patch 2.

class LtxTimeEmbedder(nn.Module):
    """Sinusoidal timestep features -> MLP; called as PixArtAlphaCombinedTimestepSizeEmbeddings is."""

    def __init__(self, dim, feat=32):
        super().__init__()
        self.feat = feat
        self.linear_1, self.linear_2 = nn.Linear(feat, dim), nn.Linear(dim, dim)

    def forward(self, timestep, resolution=None, aspect_ratio=None, batch_size=1, hidden_dtype=None):
        half = self.feat // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
        a = timestep.float()[:, None] * freqs[None]
        e = torch.cat([torch.cos(a), torch.sin(a)], -1).to(hidden_dtype).expand(batch_size, -1)
        return self.linear_2(F.silu(self.linear_1(e)))


class LayerNorm(nn.Module):
    """LTX's channel LayerNorm (per voxel over C), named as ComfyUI's class is."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c, eps=1e-6)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class ResnetBlock3D(nn.Module):
    def __init__(self, cin, cout=None, timestep_conditioning=False, inject_noise=False):
        super().__init__()
        cout = cout or cin
        self.norm1, self.conv1 = PixelNorm(), LtxCausalConv3d(cin, cout)
        self.norm2, self.conv2 = PixelNorm(), LtxCausalConv3d(cout, cout)
        self.conv_shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()
        self.norm3 = LayerNorm(cin) if cin != cout else nn.Identity()
        self.timestep_conditioning, self.inject_noise = timestep_conditioning, inject_noise
        self.scale_shift_table = nn.Parameter(torch.randn(4, cin) / cin ** 0.5)
        self.per_channel_scale1 = nn.Parameter(torch.zeros(cin, 1, 1))
        self.per_channel_scale2 = nn.Parameter(torch.zeros(cin, 1, 1))

    def _noise(self, h, scale):
        n = torch.randn(h.shape[-2:], device=h.device, dtype=h.dtype)[None]
        return h + (n * scale)[None, :, None]

    def forward(self, x, timestep=None):
        h = self.norm1(x)
        if self.timestep_conditioning:
            ada = self.scale_shift_table[None, ..., None, None, None] + timestep.reshape(x.shape[0], 4, -1, 1, 1, 1)
            shift1, scale1, shift2, scale2 = ada.unbind(dim=1)
            h = h * (1 + scale1) + shift1
        h = self.conv1(F.silu(h))
        if self.inject_noise:
            h = self._noise(h, self.per_channel_scale1)
        h = self.norm2(h)
        if self.timestep_conditioning:
            h = h * (1 + scale2) + shift2
        h = self.conv2(F.silu(h))
        if self.inject_noise:
            h = self._noise(h, self.per_channel_scale2)
        return self.conv_shortcut(self.norm3(x)) + h


class UNetMidBlock3D(nn.Module):
    def __init__(self, c, n, inject_noise=False):
        super().__init__()
        self.timestep_conditioning = True
        self.time_embedder = LtxTimeEmbedder(4 * c)
        self.res_blocks = nn.ModuleList([ResnetBlock3D(c, None, True, inject_noise) for _ in range(n)])

    def forward(self, x, timestep):
        e = self.time_embedder(timestep=timestep.flatten(), batch_size=x.shape[0], hidden_dtype=x.dtype)
        e = e.view(x.shape[0], -1, 1, 1, 1)
        for r in self.res_blocks:
            x = r(x, e)
        return x


class LtxResidualDepthToSpace(DepthToSpaceUpsample):
    """compress_all with residual=True, multiplier 2: conv to 8C/2 channels, depth-to-space, plus
    the input itself rearranged and repeated (8 / 2 times), first frame dropped from both."""

    def __init__(self, c):
        nn.Module.__init__(self)
        self.stride, self.residual, self.out_channels_reduction_factor = (2, 2, 2), True, 2
        self.conv = LtxCausalConv3d(c, 8 * c // 2)

    def forward(self, x):
        y = DepthToSpaceUpsample.forward(self, x)
        b, c, t, h, w = x.shape
        xi = x.reshape(b, c // 8, 2, 2, 2, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c // 8, 2 * t, 2 * h, 2 * w)
        return y + xi.repeat(1, 4, 1, 1, 1)[:, :, 1:]


class LtxDecoder091(nn.Module):
    """conv_in z -> c, mid(2 res blocks, inject_noise) c, residual compress_all c -> c/2, res_x_y
    c/2 -> c/4, compress_space c/4 -> c/8, mid(1) c/8, PixelNorm + last scale/shift, conv_out,
    unpatchify 2; out (B, 3, 1 + 2 (T - 1), 8 H, 8 W)."""

    def __init__(self, z=4, c=32, patch=2):
        super().__init__()
        self.patch_size, self.causal, self.timestep_conditioning = patch, False, True
        self.conv_in = LtxCausalConv3d(z, c)
        self.up_blocks = nn.ModuleList([UNetMidBlock3D(c, 2, inject_noise=True), LtxResidualDepthToSpace(c),
                                        ResnetBlock3D(c // 2, c // 4), DepthToSpaceUpsample(c // 4, (1, 2, 2)),
                                        UNetMidBlock3D(c // 8, 1)])
        self.conv_norm_out, self.conv_act = PixelNorm(), nn.SiLU()
        self.conv_out = LtxCausalConv3d(c // 8, 3 * patch * patch)
        self.timestep_scale_multiplier = nn.Parameter(torch.tensor(1000.0))
        self.last_time_embedder = LtxTimeEmbedder(2 * (c // 8))
        self.last_scale_shift_table = nn.Parameter(torch.randn(2, c // 8) * 0.1)

    def forward(self, x, timestep=0.05):
        st = timestep * self.timestep_scale_multiplier
        x = self.conv_in(x)
        for blk in self.up_blocks:
            x = blk(x, st) if isinstance(blk, UNetMidBlock3D) else blk(x)
        x = self.conv_norm_out(x)
        e = self.last_time_embedder(timestep=st.flatten(), batch_size=x.shape[0], hidden_dtype=x.dtype)
        shift, scale = (self.last_scale_shift_table[None, ..., None, None, None]
                        + e.reshape(x.shape[0], 2, -1, 1, 1, 1)).unbind(dim=1)
        y = self.conv_out(self.conv_act(x * (1 + scale) + shift))
        b, c, f, h, w = y.shape
        p = self.patch_size
        return y.reshape(b, c // (p * p), p, p, f, h, w).permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c // (p * p), f, h * p,
                                                                                             w * p)


class LtxStatistics(nn.Module):
    def __init__(self, z):
        super().__init__()
        self.register_buffer("std-of-means", torch.ones(z))
        self.register_buffer("mean-of-means", torch.zeros(z))

    def un_normalize(self, x):
        return x * self.get_buffer("std-of-means").view(1, -1, 1, 1, 1) + self.get_buffer("mean-of-means").view(1, -1, 1, 1, 1)


class LtxVae091(nn.Module):
    """VideoVAE's decode around LtxDecoder091: decode noise mixed in, latent un-normalised."""

    def __init__(self, z=4, c=32):
        super().__init__()
        self.decoder = LtxDecoder091(z, c)
        self.per_channel_statistics = LtxStatistics(z)
        self.timestep_conditioning, self.decode_noise_scale, self.decode_timestep = True, 0.025, 0.05

    def decode(self, x):
        x = torch.randn_like(x) * self.decode_noise_scale + (1.0 - self.decode_noise_scale) * x
        return self.decoder(self.per_channel_statistics.un_normalize(x), timestep=self.decode_timestep)


def ltx_vae_091(seed: int = 0, **kw) -> LtxVae091:
    m = _video_init(LtxVae091(**kw), seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("per_channel_scale"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
            elif name.endswith("scale_shift_table"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        st = m.per_channel_statistics
        st.get_buffer("std-of-means").copy_(0.5 + torch.rand(st.get_buffer("std-of-means").shape, generator=g))
        st.get_buffer("mean-of-means").uniform_(-0.2, 0.2, generator=g)
    return m

# ------------------------------------------------------------------ a Wan 2.2-shaped video VAE
# ComfyUI's comfy.ldm.wan.vae2_2 (0.30.0; 0.33.0 and 0.8.0 alike), written with plain torch layers and the
# stand-ins above: the same class names (nested here so they do not shadow Wan 2.1's), attributes and
# cache protocol -- 2x2 patches, Up_/Down_ResidualBlock with DupUp3D / AvgDown3D shortcuts, and a cache
# that, for a one-frame chunk, keeps the previous cache's last frame before it.

def _keep22(x, old):
    """vae2_2's cache of a layer's input x: its last 2 frames; a lone frame after the previous cache's
    last one (zeros after "Rep")."""
    cache_x = x[:, :, -CACHE_T:].clone()
    if cache_x.shape[2] < 2 and old is not None:
        first = torch.zeros_like(cache_x) if isinstance(old, str) else old[:, :, -1:].to(cache_x.device)
        cache_x = torch.cat([first, cache_x], 2)
    return cache_x


def _cached22(conv, x, feat_cache, feat_idx):
    idx = feat_idx[0]
    cache_x = _keep22(x, feat_cache[idx])
    x = conv(x, feat_cache[idx])
    feat_cache[idx] = cache_x
    feat_idx[0] += 1
    return x


class Wan22:
    """Namespace of the Wan 2.2 stand-in classes."""

    class Resample(nn.Module):
        def __init__(self, dim, mode):
            super().__init__()
            self.dim, self.mode = dim, mode
            if mode.startswith("down"):
                self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
                if mode == "downsample3d":
                    self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))
            elif mode.startswith("up"):
                self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                              nn.Conv2d(dim, dim, 3, padding=1))
                if mode == "upsample3d":
                    self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
            else:
                self.resample = nn.Identity()

        def forward(self, x, feat_cache=None, feat_idx=[0]):
            b, c, t, h, w = x.shape
            if self.mode == "upsample3d" and feat_cache is not None:
                idx = feat_idx[0]
                if feat_cache[idx] is None:
                    feat_cache[idx] = "Rep"
                else:
                    cache_x = _keep22(x, feat_cache[idx])
                    x = self.time_conv(x) if isinstance(feat_cache[idx], str) else self.time_conv(x, feat_cache[idx])
                    feat_cache[idx] = cache_x
                    x = x.reshape(b, 2, c, t, h, w)
                    x = torch.stack((x[:, 0], x[:, 1]), 3).reshape(b, c, t * 2, h, w)
                feat_idx[0] += 1
            t = x.shape[2]
            x = _unframes(self.resample(_frames(x)), b, t)
            if self.mode == "downsample3d" and feat_cache is not None:
                idx = feat_idx[0]
                if feat_cache[idx] is None:
                    feat_cache[idx] = x.clone()
                else:
                    cache_x = x[:, :, -1:].clone()
                    x = self.time_conv(torch.cat([feat_cache[idx][:, :, -1:], x], 2))
                    feat_cache[idx] = cache_x
                feat_idx[0] += 1
            return x

    class ResidualBlock(nn.Module):
        def __init__(self, in_dim, out_dim):
            super().__init__()
            self.residual = nn.Sequential(RMS_norm(in_dim, images=False), nn.SiLU(),
                                          CausalConv3d(in_dim, out_dim, 3, padding=1),
                                          RMS_norm(out_dim, images=False), nn.SiLU(), nn.Dropout(0.0),
                                          CausalConv3d(out_dim, out_dim, 3, padding=1))
            self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

        def forward(self, x, feat_cache=None, feat_idx=[0]):
            old_x = x
            for layer in self.residual:
                if isinstance(layer, CausalConv3d) and feat_cache is not None:
                    x = _cached22(layer, x, feat_cache, feat_idx)
                else:
                    x = layer(x)
            return x + self.shortcut(old_x)

    class AvgDown3D(nn.Module):
        def __init__(self, in_channels, out_channels, factor_t, factor_s=1):
            super().__init__()
            self.in_channels, self.out_channels, self.factor_t, self.factor_s = in_channels, out_channels, factor_t, factor_s
            self.factor = factor_t * factor_s * factor_s
            self.group_size = in_channels * self.factor // out_channels

        def forward(self, x):
            x = F.pad(x, (0, 0, 0, 0, (self.factor_t - x.shape[2] % self.factor_t) % self.factor_t, 0))
            b, c, t, h, w = x.shape
            ft, fs = self.factor_t, self.factor_s
            x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
            x = x.reshape(b, self.out_channels, self.group_size, t // ft, h // fs, w // fs)
            return x.mean(dim=2)

    class DupUp3D(nn.Module):
        def __init__(self, in_channels, out_channels, factor_t, factor_s=1):
            super().__init__()
            self.in_channels, self.out_channels, self.factor_t, self.factor_s = in_channels, out_channels, factor_t, factor_s
            self.repeats = out_channels * factor_t * factor_s * factor_s // in_channels

        def forward(self, x, first_chunk=False):
            b, _, t, h, w = x.shape
            ft, fs = self.factor_t, self.factor_s
            x = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_channels, ft, fs, fs, t, h, w)
            x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_channels, t * ft, h * fs, w * fs)
            return x[:, :, ft - 1:] if first_chunk else x

    class Down_ResidualBlock(nn.Module):
        def __init__(self, in_dim, out_dim, mult, temperal_downsample=False, down_flag=False):
            super().__init__()
            self.avg_shortcut = Wan22.AvgDown3D(in_dim, out_dim, 2 if temperal_downsample else 1, 2 if down_flag else 1)
            layers = []
            for _ in range(mult):
                layers.append(Wan22.ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if down_flag:
                layers.append(Wan22.Resample(out_dim, "downsample3d" if temperal_downsample else "downsample2d"))
            self.downsamples = nn.Sequential(*layers)

        def forward(self, x, feat_cache=None, feat_idx=[0]):
            x_copy = x
            for m in self.downsamples:
                x = m(x, feat_cache, feat_idx)
            return x + self.avg_shortcut(x_copy)

    class Up_ResidualBlock(nn.Module):
        def __init__(self, in_dim, out_dim, mult, temperal_upsample=False, up_flag=False):
            super().__init__()
            self.avg_shortcut = (Wan22.DupUp3D(in_dim, out_dim, 2 if temperal_upsample else 1, 2) if up_flag else None)
            layers = []
            for _ in range(mult):
                layers.append(Wan22.ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if up_flag:
                layers.append(Wan22.Resample(out_dim, "upsample3d" if temperal_upsample else "upsample2d"))
            self.upsamples = nn.Sequential(*layers)

        def forward(self, x, feat_cache=None, feat_idx=[0], first_chunk=False):
            x_main = x
            for m in self.upsamples:
                x_main = m(x_main, feat_cache, feat_idx)
            return x_main if self.avg_shortcut is None else x_main + self.avg_shortcut(x, first_chunk)

    class Encoder3d(nn.Module):
        def __init__(self, dim=16, z_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                     temperal_downsample=(False, True, True)):
            super().__init__()
            dims = [dim * u for u in [1, *dim_mult]]
            self.conv1 = CausalConv3d(12, dims[0], 3, padding=1)
            self.downsamples = nn.Sequential(*[
                Wan22.Down_ResidualBlock(a, b, num_res_blocks, i < len(temperal_downsample) and temperal_downsample[i],
                                         i != len(dim_mult) - 1) for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))])
            out = dims[-1]
            self.middle = nn.Sequential(Wan22.ResidualBlock(out, out), AttentionBlock(out), Wan22.ResidualBlock(out, out))
            self.head = nn.Sequential(RMS_norm(out, images=False), nn.SiLU(), CausalConv3d(out, z_dim, 3, padding=1))

        def forward(self, x, feat_cache=None, feat_idx=[0]):
            x = _cached22(self.conv1, x, feat_cache, feat_idx)
            for m in self.downsamples:
                x = m(x, feat_cache, feat_idx)
            for m in self.middle:
                x = m(x, feat_cache, feat_idx) if isinstance(m, Wan22.ResidualBlock) else m(x)
            x = self.head[1](self.head[0](x))
            return _cached22(self.head[2], x, feat_cache, feat_idx)

    class Decoder3d(nn.Module):
        def __init__(self, dim=16, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                     temperal_upsample=(True, True, False)):
            super().__init__()
            dims = [dim * u for u in [dim_mult[-1], *dim_mult[::-1]]]
            self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
            self.middle = nn.Sequential(Wan22.ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                        Wan22.ResidualBlock(dims[0], dims[0]))
            self.upsamples = nn.Sequential(*[
                Wan22.Up_ResidualBlock(a, b, num_res_blocks + 1, i < len(temperal_upsample) and temperal_upsample[i],
                                       i != len(dim_mult) - 1) for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))])
            out = dims[-1]
            self.head = nn.Sequential(RMS_norm(out, images=False), nn.SiLU(), CausalConv3d(out, 12, 3, padding=1))

        def forward(self, x, feat_cache=None, feat_idx=[0], first_chunk=False):
            x = _cached22(self.conv1, x, feat_cache, feat_idx)
            for m in self.middle:
                x = m(x, feat_cache, feat_idx) if isinstance(m, Wan22.ResidualBlock) else m(x)
            for m in self.upsamples:
                x = m(x, feat_cache, feat_idx, first_chunk)
            x = self.head[1](self.head[0](x))
            return _cached22(self.head[2], x, feat_cache, feat_idx)


def patchify22(x):
    """b c f (h q) (w r) -> b (c r q) f h w, written as strided slices (not the tiler's reshape)."""
    b, c, f, h, w = x.shape
    parts = [x[:, :, :, q::2, r::2] for r in range(2) for q in range(2)]
    return torch.stack(parts, 2).reshape(b, c * 4, f, h // 2, w // 2)


def unpatchify22(x):
    b, c4, f, h, w = x.shape
    x = x.reshape(b, c4 // 4, 4, f, h, w)
    out = x.new_empty(b, c4 // 4, f, h * 2, w * 2)
    for i, (r, q) in enumerate((r, q) for r in range(2) for q in range(2)):
        out[:, :, :, q::2, r::2] = x[:, :, i]
    return out


def _n_conv3d(m):
    return sum(1 for mod in m.modules() if type(mod).__name__ == "CausalConv3d")


def wan22_decode(decoder, z, conv2=None):
    """WanVAE.decode's loop (vae2_2): conv2, the decoder on each latent frame alone (the first with
    first_chunk=True) with the caches, unpatchify; works on our Decoder3d and on ComfyUI's."""
    feat = [None] * _n_conv3d(decoder)
    with torch.no_grad():
        x = conv2(z) if conv2 is not None else z
        out = [decoder(x[:, :, i:i + 1], feat_cache=feat, feat_idx=[0], first_chunk=i == 0) for i in range(x.shape[2])]
        return unpatchify22(torch.cat(out, 2))


def wan22_encode(encoder, x, conv1=None):
    """WanVAE.encode's loop (vae2_2): patchify, frame 0, then 4-frame chunks with the caches, conv1."""
    feat = [None] * _n_conv3d(encoder)
    with torch.no_grad():
        x = patchify22(x)
        chunks = [(0, 1)] + [(1 + 4 * (i - 1), 1 + 4 * i) for i in range(1, 1 + (x.shape[2] - 1) // 4)]
        out = torch.cat([encoder(x[:, :, a:b], feat_cache=feat, feat_idx=[0]) for a, b in chunks], 2)
        return conv1(out) if conv1 is not None else out


def wan22_vae(seed: int = 0, dim: int = 16, z_dim: int = 48, dim_mult=(1, 2, 2, 2), num_res_blocks: int = 1):
    """(encoder, conv1, decoder, conv2) of our Wan 2.2 stand-in, in ComfyUI's sd.py order of time
    down/upsampling (temperal_downsample [False, True, True]), sanely initialised."""
    enc = Wan22.Encoder3d(dim, 2 * z_dim, dim_mult, num_res_blocks, (False, True, True))
    dec = Wan22.Decoder3d(dim, z_dim, dim_mult, num_res_blocks, (True, True, False))
    conv1, conv2 = CausalConv3d(2 * z_dim, 2 * z_dim, 1), CausalConv3d(z_dim, z_dim, 1)
    parts = nn.ModuleList([enc, conv1, dec, conv2])
    sane_init(parts, seed)
    _rms_gammas(parts, seed)
    return enc.eval(), conv1.eval(), dec.eval(), conv2.eval()


def comfy_wan22_vae(seed: int = 0, dim: int = 16, z_dim: int = 48, dim_mult=(1, 2, 2, 2), num_res_blocks: int = 1):
    """ComfyUI's own vae2_2.WanVAE at small width (dec_dim = dim), its sd.py time order, sanely initialised."""
    _comfy_model()
    import comfy.ldm.wan.vae2_2 as w
    m = w.WanVAE(dim=dim, dec_dim=dim, z_dim=z_dim, dim_mult=list(dim_mult), num_res_blocks=num_res_blocks,
                 attn_scales=[], temperal_downsample=[False, True, True])
    sane_init(m, seed)
    return _rms_gammas(m, seed).eval()
