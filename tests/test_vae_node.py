"""The VAE Decode/Encode (tiled, auto) nodes take the seamless path (vramguard.vae) for an
SD-layout VAE: a ComfyUI-shaped VAE object (first_stage_model with decoder/encoder and
post_quant_conv/quant_conv, process_input/output, device, vae_dtype) decoded through the adapter
equals the untiled decode to float rounding, even when the budget forces many tiles."""
import os
import sys

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.dirname(__file__))
import vae_models as vm  # noqa: E402

from vramguard.adapters import comfyui  # noqa: E402


class _FSM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = vm.sd_decoder(seed=3)
        self.encoder = vm.sd_encoder(seed=4)
        self.post_quant_conv = torch.nn.Conv2d(4, 4, 1)
        self.quant_conv = torch.nn.Conv2d(8, 8, 1)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def encode(self, x):
        return self.quant_conv(self.encoder(x))[:, :4]


class _VAE:
    """The attributes of comfy.sd.VAE the adapter reads."""

    def __init__(self):
        self.first_stage_model = _FSM().eval()
        self.device = torch.device("cpu")
        self.vae_dtype = torch.float32
        self.patcher = None

    def process_output(self, x):
        return ((x + 1) / 2).clamp(0, 1)

    def process_input(self, x):
        return x * 2 - 1


@pytest.fixture
def small_host_budget(monkeypatch):
    # a host "card" so small that the decode needs many tiles
    monkeypatch.setattr(comfyui, "_budget", lambda dev, reserve_gb: 24 << 20)


def test_decode_node_is_seamless(small_host_budget, caplog):
    v = _VAE()
    z = vm.test_card_latent(24, 32, seed=5)
    with torch.no_grad():
        ref = v.process_output(v.first_stage_model.decode(z)).movedim(1, -1)
    with caplog.at_level("INFO", logger="vramguard"):
        img = comfyui.vae_tiled("decode", v, {"samples": z}, overlap=8)
    assert "tiled VAE" in caplog.text and "as 1x1 tiles" not in caplog.text, caplog.text
    assert img.shape == ref.shape
    assert vm.psnr(img * 2 - 1, ref * 2 - 1) >= 45.0


def test_encode_node_is_seamless_and_keeps_the_mean(small_host_budget):
    v = _VAE()
    x = torch.rand(1, 96, 128, 3)
    with torch.no_grad():
        ref = v.first_stage_model.encode(v.process_input(x.movedim(-1, 1)))
    out = comfyui.vae_tiled("encode", v, x, overlap=64)["samples"]
    assert out.shape == ref.shape
    assert vm.psnr(out, ref, peak_to_peak=float(ref.max() - ref.min())) >= 45.0


def test_unknown_layout_falls_back_to_overlap_tiling():
    v = _VAE()
    v.first_stage_model.decoder = torch.nn.Identity()
    assert comfyui._vae_program("decode", v, 4) is None


def test_video_vaes_take_their_path_or_log_why_not(caplog):
    """Wan-, HunyuanVideo- and Mochi-shaped: layer-synchronous; LTX-shaped (every op local): halo
    tiles; each equals the untiled decode; an unknown layout with a GroupNorm: ComfyUI's own path,
    the reason logged."""
    from vramguard import vae as vae_mod, vae_ltx

    class _VFSM(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.decoder = d

        def decode(self, z):
            return self.decoder(z)

    v = _VAE()
    v.first_stage_model = _VFSM(vm.wan_decoder(seed=1))
    assert comfyui._vae_program("decode", v, 5)[0] is vae_mod.decode_video_tiled
    v.first_stage_model = _VFSM(vm.ltx_decoder(seed=2))
    run, mods = comfyui._vae_program("decode", v, 5)
    assert run is vae_ltx.decode_ltx_tiled      # layer-synchronous (was: the halo path)
    z = vm.video_latent(3, 8, 12, seed=3)
    with torch.no_grad():
        ref = v.first_stage_model.decode(z)
    out = run(**mods, latent=z, budget_bytes=1 << 30, grid=(2, 3))
    assert vm.psnr(out, ref) >= 45.0
    v.first_stage_model = _VFSM(vm.hunyuan_decoder(seed=5))
    run, mods = comfyui._vae_program("decode", v, 5)
    z = vm.video_latent(3, 4, 6, seed=6)
    with torch.no_grad():
        ref = v.first_stage_model.decode(z)
    ticks = []
    out = run(**mods, latent=z, budget_bytes=1 << 30, grid=(2, 2), progress=ticks.append)
    assert vm.psnr(out, ref) >= 45.0 and ticks[-1] == len(ticks)
    v.first_stage_model = _VFSM(vm.mochi_decoder(seed=4))
    assert comfyui._vae_program("decode", v, 5)[1]["run"] is vae_mod.decode_mochi_tiled
    v.first_stage_model = _VFSM(vm.sane_init(torch.nn.Sequential(torch.nn.Conv3d(4, 8, 3, padding=1),
                                                                 torch.nn.GroupNorm(4, 8))))
    caplog.clear()
    with caplog.at_level("INFO", logger="vramguard"):
        assert comfyui._vae_program("decode", v, 5) is None
    assert "GroupNorm at 1" in caplog.text, caplog.text


def test_video_encode_node_hunyuan_shaped(small_host_budget):
    """IMAGE frames -> one (1, C, T, H, W) video -> the carried encoder, tiled; the LATENT is the mean."""
    class _VFSM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = vm.hunyuan_encoder(seed=7)

        def encode(self, x):
            return self.encoder(x)[:, :4]

    v = _VAE()
    v.first_stage_model = _VFSM()
    v.latent_dim = 3
    frames = torch.rand(5, 32, 48, 3, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = v.first_stage_model.encode(v.process_input(frames.movedim(-1, 1)).movedim(1, 0).unsqueeze(0))
    out = comfyui.vae_tiled("encode", v, frames, overlap=8)["samples"]
    assert out.shape == ref.shape == (1, 4, 3, 8, 12)
    assert vm.psnr(out, ref, peak_to_peak=float(ref.max() - ref.min())) >= 45.0


def test_video_encode_node_wan_shaped(monkeypatch, caplog):
    """A Wan-shaped VAE (video_layout of its decoder: "wan"): IMAGE frames -> (1, 3, T, H, W) ->
    WanVAE.encode's chunks over spatial tiles, then conv1; the LATENT is the mean."""
    from vramguard import vae as vae_mod

    monkeypatch.setattr(comfyui, "_budget", lambda dev, reserve_gb: 512 << 10)   # this small video in tiles

    class _WanFSM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = vm.wan_encoder(seed=9)
            self.decoder = vm.wan_decoder(seed=10)
            self.conv1 = vm.sane_init(vm.CausalConv3d(8, 8, 1), seed=11)

        def encode(self, x):
            return vm.wan_encode(self.encoder, x, self.conv1)[:, :4]

    v = _VAE()
    v.first_stage_model = _WanFSM()
    v.latent_dim = 3
    run, mods = comfyui._vae_program("encode", v, 5)      # encode_tiled: 5-D, not carried -> encode_video_tiled
    assert run is vae_mod.encode_tiled and mods["quant_conv"] is v.first_stage_model.conv1
    frames = torch.rand(7, 32, 48, 3, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        ref = v.first_stage_model.encode(v.process_input(frames.movedim(-1, 1)).movedim(1, 0).unsqueeze(0))
    with caplog.at_level("INFO", logger="vramguard"):
        out = comfyui.vae_tiled("encode", v, frames, overlap=8)["samples"]
    assert "tiled Wan-shaped VAE encode" in caplog.text and "x 1 tiles" not in caplog.text, caplog.text
    assert out.shape == ref.shape == (1, 4, 2, 4, 6)
    assert vm.psnr(out, ref, peak_to_peak=float(ref.max() - ref.min())) >= 100.0
    v.first_stage_model.encoder.downsamples.append(torch.nn.GroupNorm(2, 32))    # not Wan's layout: ComfyUI's path
    caplog.clear()
    with caplog.at_level("INFO", logger="vramguard"):
        assert comfyui._vae_program("encode", v, 5) is None
    assert "unsupported layer GroupNorm" in caplog.text, caplog.text
