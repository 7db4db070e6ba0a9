"""The main job on an embedded default: a tiled x4 upscale under a reserve, GC hooks on.

    python -m vramguard demo [--out DIR]

A built-in image (drawn by code, deterministic) is upscaled x4 by a small real
convolutional network with fixed weights (an ESRGAN-shaped body over a bicubic base) on
the best device present, in the largest tiles that fit the budget; the GC stage hooks
run after each stage.  Written to DIR: the output PNG, the per-stage memory timeline PNG,
the GC log (text) and its JSON lines, and plan.json.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np

from . import gcguard, sampling, tiling
from ._units import fmt_bytes, parse_size

log = logging.getLogger("vramguard")


def builtin_image(size: int = 384) -> np.ndarray:
    """A deterministic test card, [H, W, 3] float32 in 0..1: gradients, rings, fine stripes
    and sharp edges — features whose seams and aliasing are easy to see."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    r = np.sqrt((x - 0.5) ** 2 + (y - 0.5) ** 2)
    img = np.stack([x, y, 0.5 + 0.5 * np.sin(40 * r)], axis=-1)
    img[(x * 16).astype(int) % 2 == (y * 16).astype(int) % 2] *= 0.85          # checkerboard
    stripes = (np.sin(np.pi * size / 6 * x) > 0) & (y > 0.8)
    img[stripes] = 1.0                                                          # fine stripes
    img[(np.abs(x - y) < 0.01)] = [1.0, 0.2, 0.2]                               # a diagonal edge
    return np.clip(img, 0, 1).astype(np.float32)


def make_net(device: str = "cpu", channels: int = 32, blocks: int = 4) -> Any:
    """x4 upscaler: bicubic base + residual conv body, weights from a fixed seed."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(1234)
            self.head = nn.Conv2d(3, channels, 3, padding=1)
            self.body = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(2 * blocks))
            self.up1 = nn.Conv2d(channels, channels, 3, padding=1)
            self.up2 = nn.Conv2d(channels, channels, 3, padding=1)
            self.tail = nn.Conv2d(channels, 3, 3, padding=1)
            with torch.no_grad():
                for m in self.modules():
                    if isinstance(m, nn.Conv2d):
                        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (0.5 / (m.in_channels * 9) ** 0.5))
                        m.bias.zero_()
                self.tail.weight.mul_(0.2)  # the body adds detail; the bicubic base carries the image
            self.scale = 4

        def forward(self, x: Any) -> Any:  # NCHW
            act = nn.functional.leaky_relu
            base = nn.functional.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)
            f = act(self.head(x), 0.2)
            for i in range(0, len(self.body), 2):
                f = f + self.body[i + 1](act(self.body[i](f), 0.2))
            f = act(self.up1(nn.functional.interpolate(f, scale_factor=2, mode="nearest")), 0.2)
            f = act(self.up2(nn.functional.interpolate(f, scale_factor=2, mode="nearest")), 0.2)
            return (base + self.tail(f)).clamp(0, 1)

    return Net().to(device).eval()


def receptive_radius(blocks: int = 4) -> int:
    """Input-pixel radius of make_net's receptive field (3x3 convs; the x2 stages count half)."""
    return 1 + 2 * blocks + 1 + 1  # head + body + (up1 + up2 + tail at >= x2 resolution, rounded up)


def run_demo(out_dir: str = "vramguard_out", *, size: int = 384, reserve: Any = "1.5GB",
             budget: Any = None, cpu_budget: Any = "192MB", overlap: int = 24, device: str | None = None,
             quiet: bool = False) -> dict:
    import torch
    from PIL import Image

    from .timeline_png import gc_events_from_jsonl, render_sampler

    os.makedirs(out_dir, exist_ok=True)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    paths = {k: os.path.join(out_dir, v) for k, v in (
        ("image", "upscaled.png"), ("input", "input.png"), ("timeline", "timeline.png"),
        ("gc_log", "gc.log"), ("gc_jsonl", "gc.jsonl"), ("plan", "plan.json"))}
    for k in ("gc_log", "gc_jsonl"):
        if os.path.exists(paths[k]):
            os.remove(paths[k])
    fh = logging.FileHandler(paths["gc_log"], encoding="utf-8")
    fh.setLevel(logging.DEBUG)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    prev_level, prev_prop = log.level, log.propagate
    log.addHandler(fh)
    log.setLevel(logging.DEBUG)
    log.propagate = False  # the debug lines go to gc.log, not the console
    try:
        gcguard.set_log_file(paths["gc_jsonl"])
        s = sampling.reset_sampler(interval=0.005)
        s.start()
        img = builtin_image(size)
        Image.fromarray((img * 255).round().astype(np.uint8)).save(paths["input"])

        # the budget: a real GPU's snapshot minus the reserve, or on the CPU host RAM minus the
        # reserve capped at cpu_budget (the CPU has no small card to fill; the cap keeps the
        # demo's working set bounded so tiling actually happens)
        if budget is not None:
            b = parse_size(budget, "budget")
        elif dev == "cuda":
            b = tiling.resolve_budget(reserve=reserve, device=torch.cuda.current_device())
        else:
            b = min(tiling.resolve_budget(reserve=reserve, device="host"), parse_size(cpu_budget, "cpu_budget"))

        with gcguard.stage("model_load", gc=False):
            net = make_net(dev)
            model_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
        x = torch.from_numpy(img)[None].to(dev)  # [1, H, W, 3]: ComfyUI's IMAGE layout
        cost = tiling.calibrate(lambda t: net(t.permute(0, 3, 1, 2)), x, key=("demo-net", dev)) \
            if dev == "cuda" else tiling.default_cost(3, 3, 4, 4, model_bytes)
        plan = tiling.plan_tiles(size, size, scale=4, overlap=overlap, cost=cost, budget=b)
        with open(paths["plan"], "w") as f:
            json.dump(plan.as_dict(), f, indent=1)
        if not plan.fits:
            raise tiling.TilingError(plan.why)

        def fn(t: Any) -> Any:
            with torch.no_grad():
                return net(t.to(dev).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

        st: dict = {}
        tile_times: list[float] = []  # tile boundaries for the timeline (monotonic, the sampler's clock)
        t0 = time.perf_counter()
        budget_at = time.monotonic()
        with gcguard.run("demo") as g:
            with gcguard.stage("upscale"):
                out = tiling.tiled(fn, x, scale=4, overlap=overlap, cost=cost, budget=b, stats=st,
                                   progress=lambda done, total: tile_times.append(time.monotonic()))
            seconds = time.perf_counter() - t0
            # one forced collection, so the log shows its shape; inside the run, so the run's
            # summary (written when the run ends) comes after it and counts it
            g.check("upscale", forced=True)
        s.stop()
        out_np = out[0].numpy() if hasattr(out, "numpy") else out[0]
        Image.fromarray((np.clip(out_np, 0, 1) * 255).round().astype(np.uint8)).save(paths["image"])
        where = "GPU" if dev == "cuda" else "CPU, no GPU"
        render_sampler(s, title=f"vramguard demo: x4 tiled upscale on {where}, tile budget {fmt_bytes(b)}",
                       budget=b, budget_at=budget_at, gc_events=gc_events_from_jsonl(paths["gc_jsonl"]),
                       tiles=tile_times).save(paths["timeline"])
        summary = {
            "device": dev, "input": [size, size], "output": list(out_np.shape[:2]),
            "budget_bytes": b, "tile": list(plan.tile), "tiles": st["tiles"], "grid": list(plan.grid),
            "predicted_peak_bytes": plan.predicted_peak_bytes, "cost_source": cost.source,
            "seconds": round(seconds, 3), "retries": st["retries"], "gc": gcguard.gc_stats(),
            "files": paths,
        }
        with open(paths["plan"], "w") as f:
            json.dump({**plan.as_dict(), "run": {k: v for k, v in summary.items() if k != "files"}}, f, indent=1)
        if not quiet:
            print(f"vramguard demo on {dev}: {size}x{size} -> {out_np.shape[1]}x{out_np.shape[0]} (x4)")
            print(f"  budget {fmt_bytes(b)} (reserve {reserve}); plan: tile {plan.tile[0]}x{plan.tile[1]}, "
                  f"{plan.grid[0]}x{plan.grid[1]} = {plan.tiles} tiles, predicted peak "
                  f"{fmt_bytes(int(plan.predicted_peak_bytes))} ({cost.source} cost model)")
            print(f"  {st['tiles']} tiles in {seconds:.2f} s, {st['retries']} OOM retries")
            for k, v in paths.items():
                print(f"  {k:9s} {os.path.abspath(v)}")
        return summary
    finally:
        gcguard.set_log_file(None)
        log.removeHandler(fh)
        log.setLevel(prev_level)
        log.propagate = prev_prop
        fh.close()
