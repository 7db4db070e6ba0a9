"""LTX-Video's VAE decoded layer by layer over boxes of latent frames x rows x cols
(vramguard.vae_ltx) against the untiled decode, on the LTX-shaped stand-in (tests/vae_models.py).
ComfyUI's real VideoVAE classes are tested in tests/test_vae.py (-k comfyui)."""
import logging

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the VAE tiler runs torch modules")

import vae_models as vm  # noqa: E402
from vramguard import vae, vae_ltx  # noqa: E402

torch.set_num_threads(2)
T, LH, LW = 4, 8, 12           # latent -> 13 frames of 32 x 48


def _flops(fn):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        out = fn()
    return fc.get_total_flops(), out


def _rel(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def ltx():
    d = vm.ltx_decoder(seed=8)
    z = vm.video_latent(T, LH, LW, seed=9)
    f, ref = _flops(lambda: d(z))
    assert ref.std() > 0.1 and torch.isfinite(ref).all()
    return d, z, ref, f


# 2, 6, 12 tiles, non-square, 2 x 1-px tiles (tiny: a conv's halo is a whole neighbour); the
# video in one time box, in 1-frame boxes (every box's time halo from its neighbours or the
# replicated first/last frame) and in boxes of 3 + 1 frames
@pytest.mark.parametrize("grid, frames", [((1, 2), None), ((2, 3), None), ((3, 4), None), ((2, 5), None),
                                          ((4, 12), None), ((1, 1), 1), ((2, 3), 1), ((3, 4), 3), ((2, 5), 3)],
                         ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else f"t{v or 'all'}")
def test_layer_sync_boxes_equal_the_untiled_decode(ltx, grid, frames):
    d, z, ref, f_ref = ltx
    f, out = _flops(lambda: vae_ltx.decode_ltx_tiled(d, z, budget_bytes=1 << 30, grid=grid, frames=frames))
    assert out.shape == ref.shape
    assert _rel(out, ref) <= 1e-5 and vm.psnr(out, ref) >= 100.0
    # every output voxel of every conv computed once: the halo is read, never recomputed
    assert f / f_ref <= 1.001, f / f_ref


def test_node_path_costs_one_pass_where_the_halo_path_cost_several_x(ltx):
    """What the node runs for an LTX-shaped VAE (vae.video_program): <= 1.25x the FLOPs of one
    untiled pass.  On the old code video_program gave decode_video_halo_tiled and this fails: the
    halo path costs 4.9-9.3x on a 5x12x20 latent at 2x3-3x4 tiles (more on its first call, which
    measures the receptive field with two probe decodes)."""
    d, z, ref, f_ref = ltx

    class FSM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = d

        def decode(self, x):
            return self.decoder(x)

    run, kw = vae.video_program(FSM())
    ticks = []
    f, out = _flops(lambda: run(**kw, latent=z, budget_bytes=1 << 30, grid=(2, 3), progress=ticks.append))
    assert f / f_ref <= 1.25, f"{run.__name__}: {f / f_ref:.2f}x the FLOPs of one untiled pass"
    assert _rel(out, ref) <= 1e-5
    assert ticks == list(range(1, len(ticks) + 1)) and len(ticks) >= 6
    halo_f, halo = _flops(lambda: vae.decode_video_halo_tiled(d, z, budget_bytes=1 << 30, grid=(2, 3)))
    assert halo_f / f_ref > 1.7          # the old path, still there for local decoders of other layouts


def test_planned_from_the_budget_in_time_and_space(ltx, caplog):
    d, z, ref, f_ref = ltx
    big = vae_ltx.plan_ltx(d, T, LH, LW, budget_bytes=1 << 40)
    assert big.tiles == 1
    small = vae_ltx.plan_ltx(d, T, LH, LW, budget_bytes=big.tile_bytes // 30)
    assert small.tiles > 1 and small.tile_bytes <= big.tile_bytes // 30
    assert small.chunks > 1, small          # time is an axis of the same planner
    peaks = []
    old = vae._tile_scope
    vae._tile_scope = vm.tile_peak_scope(peaks)
    try:
        with caplog.at_level(logging.INFO, logger="vramguard"):
            f, out = _flops(lambda: vae_ltx.decode_ltx_tiled(d, z, budget_bytes=big.tile_bytes // 30))
    finally:
        vae._tile_scope = old
    assert f"{small.chunks} time x {small.rows}x{small.cols} space boxes" in caplog.text
    assert _rel(out, ref) <= 1e-5 and f / f_ref <= 1.25
    # the live bytes of each box (a device-peak proxy on the CPU) stay within the plan
    assert peaks and max(peaks) <= small.tile_bytes, (max(peaks), small.tile_bytes)
    with pytest.raises(vae.VaeTilingError, match="nothing fits"):
        vae_ltx.decode_ltx_tiled(d, z, budget_bytes=1000)


def test_oom_keeps_finished_boxes_and_replans(ltx, caplog):
    """An OOM at the 10th box (a step in the middle of the decode): the finished boxes are kept,
    the rest of the step and the later steps run in finer boxes; the result is unchanged."""
    d, z, ref, _ = ltx
    n = {"k": 0}
    old = vae._tile_scope

    class Scope:
        def __enter__(self):
            n["k"] += 1
            if n["k"] == 10:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")

        def __exit__(self, *e):
            return False

    vae._tile_scope = Scope
    try:
        with caplog.at_level(logging.WARNING, logger="vramguard"):
            out = vae_ltx.decode_ltx_tiled(d, z, budget_bytes=1 << 30, grid=(2, 3), frames=2)
    finally:
        vae._tile_scope = old
    assert "out of memory" in caplog.text and "boxes done" in caplog.text, caplog.text
    assert n["k"] > 10 + 6
    assert _rel(out, ref) <= 1e-5


def test_progress_and_bad_inputs(ltx):
    d, z, _, _ = ltx
    with pytest.raises(ValueError, match="frames"):
        vae_ltx.decode_ltx_tiled(d, z, budget_bytes=1 << 30, frames=0)
    with pytest.raises(ValueError, match="timestep"):
        vae_ltx.decode_ltx_tiled(d, z, budget_bytes=1 << 30, timestep=float("nan"))
    with pytest.raises(ValueError, match="grid"):
        vae_ltx.decode_ltx_tiled(d, z, budget_bytes=1 << 30, grid=(0, 2))
    with pytest.raises(ValueError, match="B, C, T, H, W"):
        vae_ltx.decode_ltx_tiled(d, z[0], budget_bytes=1 << 30)
    with pytest.raises(TypeError, match="budget_bytes"):
        vae_ltx.decode_ltx_tiled(d, z, budget_bytes=1.5)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        vae_ltx.decode_ltx_tiled("decoder", z, budget_bytes=1 << 30)
    with pytest.raises(vae.VaeTilingError, match="not an LTX-Video-shaped"):
        vae_ltx.decode_ltx_tiled(vm.wan_decoder(seed=1), z, budget_bytes=1 << 30)


def test_groupnorm_ltx_is_refused_and_falls_back():
    """An LTX-shaped decoder normalised by GroupNorm (statistics over the whole video): refused
    with the module named; video_layout judges it as before (non-local: ComfyUI's own path)."""
    d = vm.ltx_decoder(seed=3)
    d.up_blocks[2].norm2 = vm.sane_init(torch.nn.GroupNorm(4, 16))
    with pytest.raises(vae.VaeTilingError, match=r"up_blocks.2.norm2 is GroupNorm"):
        vae_ltx.check_ltx(d)
    kind, why = vae.video_layout(d)
    assert kind == "nonlocal" and "GroupNorm" in why
    z = vm.video_latent(2, 4, 4, seed=1)
    with pytest.raises(vae.VaeTilingError, match="GroupNorm"):
        vae_ltx.decode_ltx_tiled(d, z, budget_bytes=1 << 30)


def test_unsupported_conv_is_refused_by_name():
    d = vm.ltx_decoder(seed=3)
    d.up_blocks[0].conv1.conv = torch.nn.Conv3d(32, 32, 3, padding=(0, 1, 1), stride=(1, 2, 2))
    with pytest.raises(vae.VaeTilingError, match=r"up_blocks.0.conv1: unsupported conv"):
        vae_ltx.check_ltx(d)
    assert vae.video_layout(d)[0] == "local"     # still local: the halo path keeps it


# ------------------------------------------------------------------ 0.9.1-style (no ComfyUI needed)

@pytest.fixture(scope="module")
def ltx091():
    m = vm.ltx_vae_091(seed=5)
    z = vm.video_latent(3, 6, 8, seed=6)
    torch.manual_seed(11)                  # decode noise and inject_noise: drawn from torch's generator
    f, ref = _flops(lambda: m.decode(z))
    assert ref.shape == (1, 3, 5, 48, 64) and ref.std() > 0.1
    return m, z, ref, f


@pytest.mark.parametrize("grid, frames", [((1, 2), None), ((2, 3), 1), ((3, 4), 2), ((2, 5), None), ((6, 8), None)],
                         ids=["1x2", "2x3-t1", "3x4-t2", "2x5", "6x8-1px"])
def test_091_style_timestep_noise_residual_equal_the_untiled_decode(ltx091, grid, frames):
    """Timestep-conditioned mid blocks and last scale/shift, decode noise, inject_noise, a residual
    depth-to-space with channel reduction, res_x_y (channel LayerNorm + 1x1x1 shortcut), patch 2:
    the node's path (video_program) equals VideoVAE-style decode under the same seed, 1.0x FLOPs."""
    m, z, ref, f_ref = ltx091
    run, kw = vae.video_program(m)
    torch.manual_seed(11)
    f, out = _flops(lambda: run(**kw, latent=z, budget_bytes=1 << 30, grid=grid, frames=frames))
    assert _rel(out, ref) <= 1e-5 and f / f_ref <= 1.001, (_rel(out, ref), f / f_ref)


def test_091_style_noise_is_drawn_not_skipped(ltx091):
    m, z, ref, _ = ltx091
    torch.manual_seed(12)
    with torch.no_grad():
        other = vae_ltx.decode_ltx_tiled(m.decoder, z, vae=m, budget_bytes=1 << 30, grid=(2, 3))
    assert vm.psnr(other, ref) < 45.0
    # a bare torch LayerNorm over the last axis (W) is not LTX's channel LayerNorm: refused
    import copy
    bad = copy.deepcopy(m.decoder)
    bad.up_blocks[2].norm3 = torch.nn.LayerNorm(8)
    with pytest.raises(vae.VaeTilingError, match="up_blocks.2.norm3 is a LayerNorm"):
        vae_ltx.check_ltx(bad)
