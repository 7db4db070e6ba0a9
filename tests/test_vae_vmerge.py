"""Video VAE paths at small tiles: compute close to one untiled pass (tiles merged at low-resolution
steps) and Mochi's time chunks (causal convs carried across chunks, peak with the chunk).

    .venv/bin/python tests/test_vae_vmerge.py      # prints the FLOPs table (ratio to one untiled pass)
"""
from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch") if __name__ != "__main__" else __import__("torch")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vae_models as vm  # noqa: E402
from vramguard import vae  # noqa: E402

# latent 16x24: grids down to 4x6 tiles of 4x4 latent px (the smallest the issue names)
LT, LH, LW = 3, 16, 24
GRIDS = [(1, 2), (2, 3), (3, 4), (4, 6)]


def counted(fn):
    """(fn's result, its FLOPs by torch's counter: convolutions, matmuls, attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        out = fn()
    return out, fc.get_total_flops()


def flops(fn) -> int:
    return counted(fn)[1]


def mochi_8x(seed: int = 21):
    """Mochi's real shape scaled down: 3 up blocks (time x3, x2, x1; space x2 each: 8x), channels
    1:2:4:6 as ComfyUI's VideoVAE decoder (base 128 there, 8 here)."""
    return vm.mochi_decoder(seed=seed, c=8, mults=(1, 2, 4, 6), texp=(1, 2, 3), sexp=(2, 2, 2), nres=(1, 1, 1, 1, 1))


def cases():
    """(label, untiled(), tiled(grid)) per model, as bench/vae.py calls them."""
    wan = vm.wan_decoder(seed=5)
    zw = vm.video_latent(LT, LH, LW, seed=6)
    enc = vm.wan_encoder(seed=7)
    v = vm.video_frames(5, LH * 8, LW * 8, seed=9)
    hy = vm.hunyuan_decoder(seed=14, ch=8, ch_mult=(1, 2, 4, 4))
    zh = vm.video_latent(5, LH, LW, seed=15)
    mo = mochi_8x()
    zm = vm.video_latent(LT, LH, LW, seed=22)
    return [
        ("Wan 2.1 decode", lambda: vm.wan_decode(wan, zw),
         lambda g: vae.decode_video_tiled(wan, zw, budget_bytes=1 << 40, grid=g)),
        ("Wan 2.1 encode", lambda: vm.wan_encode(enc, v),
         lambda g: vae.encode_video_tiled(enc, v, budget_bytes=1 << 40, grid=g)),
        ("Hunyuan-shaped decode", lambda: hy(zh),
         lambda g: vae.decode_tiled(hy, zh, budget_bytes=1 << 40, grid=g)),
        ("Mochi-shaped decode (8x)", lambda: mo(zm),
         lambda g: vae.decode_mochi_tiled(mo, zm, budget_bytes=1 << 40, grid=g)),
    ]


_CASES: dict = {}


def _case(label):
    """(untiled result, its FLOPs, tiled(grid)) per model, built once."""
    if not _CASES:
        for name, untiled, tiled in cases():
            _CASES[name] = (untiled, tiled)
    c = _CASES[label]
    if len(c) == 2:
        _CASES[label] = c = (*counted(c[0]), c[1])
    return c


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("label", ["Wan 2.1 decode", "Wan 2.1 encode", "Hunyuan-shaped decode",
                                   "Mochi-shaped decode (8x)"])
def test_video_compute_close_to_one_pass(label, grid):
    """FLOPs (torch's counter) of the tiled video decode/encode within 1.25x of one untiled pass,
    down to 4x4-latent-px tiles, and the result unchanged."""
    ref, base, tiled = _case(label)
    out, n = counted(lambda: tiled(grid))
    assert out.shape == ref.shape
    span = (ref.max() - ref.min()).item()
    assert vm.psnr(out, ref, peak_to_peak=span) >= 100.0, vm.psnr(out, ref, peak_to_peak=span)
    assert base > 0 and n / base <= 1.25, n / base


@pytest.mark.parametrize("which", [0, 1, 2], ids=["wan", "hunyuan4x", "mochi2x"])
def test_bench_shapes_compute_close_to_one_pass(which):
    """bench/vae.py's stand-ins at its latent and finest grid (3x4 on 8x12: 2-3 latent px tiles,
    8-12 output px at 4x, 4-6 at 2x): merging cannot help the full-resolution steps there, only
    computing each tile's own outputs does (Hunyuan/Mochi)."""
    label, untiled, tiled = bench_cases()[which]
    ref, base = counted(untiled)
    out, n = counted(lambda: tiled((3, 4)))
    assert (out - ref).abs().max() < 1e-4
    assert n / base <= 1.25, (label, n / base)


def test_merged_steps_stay_in_the_planned_working_set(monkeypatch):
    """Wan decode planned from a short budget: steps merge tiles (fewer tile runs than the grid's)
    and every tile's measured working set stays under the plan's."""
    d = vm.wan_decoder(seed=5)
    z = vm.video_latent(4, LH, LW, seed=6)
    ref = vm.wan_decode(d, z)
    whole = vae.plan_video_grid(d, LH, LW, budget_bytes=1 << 40, frames=4)
    budget = whole.tile_bytes // 20
    plan = vae.plan_video_grid(d, LH, LW, budget_bytes=budget, frames=4)
    assert plan.rows * plan.cols >= 12
    runs = {}
    for merge in (True, False):
        got: list = []
        monkeypatch.setattr(vae, "_tile_scope", vm.tile_peak_scope(got))
        if not merge:
            monkeypatch.setattr(vae._VideoRun, "_merged", lambda self, *a: self.rects)
        out = vae.decode_video_tiled(d, z, budget_bytes=budget)
        assert (out - ref).abs().max() < 1e-4
        assert max(got) <= plan.tile_bytes, (max(got), plan.tile_bytes)
        runs[merge] = len(got)
    assert runs[True] * 2 < runs[False], runs


def test_oom_in_a_merged_step_keeps_finished_tiles(caplog, monkeypatch):
    """An OOM in a merged low-resolution step (run_program's 5-D path): the step's finished tiles
    are kept, the rest split, later steps keep the planned grid; the video is unchanged."""
    d = mochi_8x()
    z = vm.video_latent(2, LH, LW, seed=22)
    with torch.no_grad():
        ref = d(z)
    real_pconv, real_coarsest, n = vae._pconv, vae._coarsest, {"k": 0}
    counts: list = []

    def coarsest(p, s, base, *a):          # every merged step: 2x3 tiles (of the 4x6 grid)
        rects = real_coarsest(p, s, base, *a)
        out = rects if rects is base else vae.grid_rects(LH, LW, 2, 3)
        counts.append(len(out))
        return out

    def flaky(conv, a, carry, *rest):
        n["k"] += 1          # the 3rd call: the first res block's first conv (latent res: merged)
        if n["k"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_pconv(conv, a, carry, *rest)

    monkeypatch.setattr(vae, "_pconv", flaky)
    monkeypatch.setattr(vae, "_coarsest", coarsest)
    with caplog.at_level("WARNING", logger="vramguard"):
        out = vae.decode_mochi_tiled(d, z, budget_bytes=1 << 40, grid=(4, 6))
    assert "step first.0.a out of memory" in caplog.text and "2 tiles done, re-planned" in caplog.text, caplog.text
    assert (out - ref).abs().max() < 1e-4
    assert len(counts) == 2 and counts[1] == 6      # later steps: the planned grid, merged no more


# ------------------------------------------------------------------ Mochi: time chunks

MT, MH, MW = 5, 6, 8        # stand-in: time x2, space x2 -> 9 x 12 x 16


@pytest.fixture(scope="module")
def mochi():
    d, z = vm.mochi_decoder(seed=21), vm.video_latent(MT, MH, MW, seed=22)
    with torch.no_grad():
        ref = d(z)
    return d, z, ref


def time_seam(v, bounds):
    """Frame-difference energy across the given output-frame boundaries over the mean elsewhere."""
    d = (v[:, :, 1:] - v[:, :, :-1]).double() ** 2
    m = torch.zeros(d.shape[2], dtype=torch.bool)
    m[[f - 1 for f in bounds]] = True
    return float(d[:, :, m].mean() / d[:, :, ~m].mean())


def mochi_bounds(t: int, td: int, expand: int) -> list[int]:
    """Output frames where each time chunk after the first starts (latent a -> expand (a - 1) + 1)."""
    return [expand * (a - 1) + 1 for a in range(td, t, td)]


@pytest.mark.parametrize("frames", [1, 2, 3])
def test_mochi_time_chunks_equal_the_untiled_decode(mochi, frames):
    """Chunks of 1-3 latent frames (causal convs carried, the first frames dropped once): the
    untiled video to float rounding, no seam across the chunks in time or the tiles in space."""
    d, z, ref = mochi
    out = vae.decode_mochi_tiled(d, z, budget_bytes=1 << 30, grid=(2, 3), frames=frames)
    assert out.shape == ref.shape == (1, 3, 2 * MT - 1, 2 * MH, 2 * MW)
    assert (out - ref).abs().max() < 1e-4 and vm.psnr(out, ref) >= 100.0
    bounds = mochi_bounds(MT, frames, 2)
    assert bounds and abs(time_seam(out, bounds) / time_seam(ref, bounds) - 1) < 1e-3
    ys, xs = [MH // 2 * 2], [MW // 3 * 2, 2 * MW // 3 * 2]
    assert abs(vm.seam_ratio(out.flatten(1, 2), ys, xs) / vm.seam_ratio(ref.flatten(1, 2), ys, xs) - 1) < 1e-3


def test_mochi_time_chunks_without_carries_show(mochi, monkeypatch):
    """The carried frames are what make chunks exact: each chunk padded as if it began the video
    (frame replicated) differs, and the time-seam metric sees it at the chunk starts."""
    d, z, ref = mochi
    real = vae._pconv
    monkeypatch.setattr(vae, "_pconv", lambda conv, a, carry, *rest: real(conv, a, None, *rest))
    out = vae.decode_mochi_tiled(d, z, budget_bytes=1 << 30, grid=(1, 2), frames=2)
    assert vm.psnr(out, ref) < 45.0
    assert abs(time_seam(out, mochi_bounds(MT, 2, 2)) / time_seam(ref, mochi_bounds(MT, 2, 2)) - 1) > 0.01


def test_mochi_planned_in_time_and_peak_scales_with_the_chunk(monkeypatch, caplog):
    """The C planner splits time (its depth axis) when the budget is short; each tile's measured
    working set stays under the plan, and shrinks with the chunk length."""
    d = vm.mochi_decoder(seed=21)
    z = vm.video_latent(12, MH, MW, seed=23)
    with torch.no_grad():
        ref = d(z)
    whole = vae.plan_mochi_grid(d, MH, MW, budget_bytes=1 << 40, frames=12)
    assert whole.tiles == 1 and whole.frames == 12
    plan = vae.plan_mochi_grid(d, MH, MW, budget_bytes=whole.tile_bytes // 4, frames=12)
    assert plan.chunks > 1 and plan.frames < 12 and plan.tile_bytes <= whole.tile_bytes // 4
    peaks: dict = {}
    for key, kw in (("planned", dict(budget_bytes=whole.tile_bytes // 4)), ("1", dict(grid=(1, 1), frames=1)),
                    ("all", dict(grid=(1, 1)))):
        got: list = []
        monkeypatch.setattr(vae, "_tile_scope", vm.tile_peak_scope(got))
        with caplog.at_level("INFO", logger="vramguard"):
            out = vae.decode_mochi_tiled(d, z, **{"budget_bytes": 1 << 30, **kw})
        assert (out - ref).abs().max() < 1e-4
        peaks[key] = max(got)
    assert f"{plan.chunks} time chunks of {plan.frames} latent frames" in caplog.text
    assert peaks["planned"] <= plan.tile_bytes, (peaks, plan)
    assert peaks["1"] * 3 < peaks["all"], peaks
    with pytest.raises(ValueError, match="frames"):
        vae.decode_mochi_tiled(d, z, budget_bytes=1 << 30, frames=0)


def bench_cases():
    """bench/vae.py's video stand-ins at its default latent (5x8x12) and grids: 4x (Hunyuan) and 2x
    (Mochi) spatial upscale, so tiles of 2-4 latent px are 4-16 output px at full resolution."""
    z = vm.video_latent(5, 8, 12, seed=6)
    wan, hy, mo = vm.wan_decoder(seed=5), vm.hunyuan_decoder(seed=14), vm.mochi_decoder(seed=21)
    return [
        ("bench Wan-shaped", lambda: vm.wan_decode(wan, z),
         lambda g: vae.decode_video_tiled(wan, z, budget_bytes=1 << 40, grid=g)),
        ("bench Hunyuan-shaped (4x)", lambda: hy(z), lambda g: vae.decode_tiled(hy, z, budget_bytes=1 << 40, grid=g)),
        ("bench Mochi-shaped (2x)", lambda: mo(z),
         lambda g: vae.decode_mochi_tiled(mo, z, budget_bytes=1 << 40, grid=g)),
    ]


if __name__ == "__main__":
    which = sys.argv[1:] or ["models", "bench"]
    for label, untiled, tiled in (cases() if "models" in which else []) + (bench_cases() if "bench" in which else []):
        grids = GRIDS if not label.startswith("bench") else [(1, 2), (2, 3), (3, 4)]
        base = flops(untiled)
        ratios = [flops(lambda: tiled(g)) / base for g in grids]
        print(f"{label:28s} {base / 1e9:7.3f} GFLOP  " +
              "  ".join(f"{g[0]}x{g[1]} {r:.3f}" for g, r in zip(grids, ratios)), flush=True)
