"""Cost-model calibration on a GPU: the default model's and vramguard.calibrate's planned peaks
next to what torch measures, on the ESRGAN-size network.

    python bench/gpu_calibrate.py [--budgets 2,4,8] [--repeat 3]
    python bench/gpu_calibrate.py --smoke        # no GPU: tiny net on the CPU (nothing measurable)

For each budget (GiB), plan_tiles(2048, 2048, scale=4) picks a tile with each cost model:
  default     vramguard.default_cost(3, 3, 4, 4)  (what tiled() uses when nothing was measured)
  calibrated  vramguard.calibrate(fn, image)       (two small tiles, 64 and 128 px, + 15 %)
then one tile of the planned size runs and torch.cuda.max_memory_allocated (above what was
allocated before) is the measured peak.  Reported: planned / measured per model and tile (> 1:
the model over-estimates, i.e. safe but smaller tiles than needed; < 1: it under-estimates and
a tile planned to fit could OOM), repeat ranges of the measured peak, and the tile each model picks.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_common import GiB, MiB, emit, param_count, ranges, rrdbnet  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="2,4,8", help="GiB, comma-separated (2-3 sizes)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    import torch

    import vramguard as vg

    res: dict = {"bench": "gpu_calibrate", "smoke": a.smoke, "rows": []}
    if a.smoke:
        # sizes where the default model's 64 MiB fixed cost leaves room for a few tile sizes
        dev, size, budgets, overlap, min_tile = "cpu", 96, [0.066, 0.07, 0.09], 4, 16
        net = rrdbnet(torch, nf=8, nb=1, gc=4)
    else:
        if not torch.cuda.is_available():
            res["skipped"] = "torch.cuda.is_available() is False"
            emit(res)
            sys.exit(3)
        dev, size, budgets, overlap, min_tile = "cuda", a.size, [float(b) for b in a.budgets.split(",")], 32, 64
        net = rrdbnet(torch).to(dev)
    res["params"] = param_count(net)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, size, size, 3, generator=g)

    def fn(t):
        with torch.no_grad():
            return net(t.movedim(-1, -3).to(dev).float()).movedim(-3, -1)

    t0 = time.perf_counter()
    cal = vg.calibrate(fn, image[:1].to(dev), key=None)
    res["calibrate_seconds"] = time.perf_counter() - t0
    default = vg.default_cost(3, 3, 4.0, 4)
    models = {"default": default, "calibrated": cal}
    res["models"] = {k: {"fixed_mib": round(m.fixed / MiB, 2), "per_px": round(m.per_px, 1), "source": m.source}
                     for k, m in models.items()}
    measured: dict[tuple[int, int], list[int]] = {}

    def measure(tile: tuple[int, int]) -> list[int] | None:
        if dev != "cuda":
            return None
        if tile not in measured:
            peaks = []
            x = image[:, :tile[1], :tile[0]].to(dev)
            for _ in range(max(3, a.repeat)):
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                y = fn(x)
                torch.cuda.synchronize()
                peaks.append(torch.cuda.max_memory_allocated() - base)
                del y
            measured[tile] = peaks
        return measured[tile]

    for b in budgets:
        for name, m in models.items():
            p = vg.plan_tiles(size, size, scale=4, overlap=overlap, cost=m, budget=int(b * GiB),
                             min_tile=min_tile)
            row = {"budget_gib": b, "model": name, "fits": p.fits}
            if p.fits:
                t = (int(p.tile[0]), int(p.tile[1]))
                planned = m.bytes_for(p.tile[0], p.tile[1])
                row.update(tile=list(p.tile), tiles=p.tiles, planned_mib=round(planned / MiB, 1),
                           predicted_peak_mib=round(p.predicted_peak_bytes / MiB, 1))
                try:
                    peaks = measure(t)
                except Exception as e:  # an OOM here is a finding, not a crash
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    peaks = None
                    torch.cuda.empty_cache()
                if peaks:
                    row["measured_mib"] = ranges([x / MiB for x in peaks], 1)
                    row["planned_over_measured"] = round(planned / max(peaks), 3)
                    row["fits_budget_measured"] = max(peaks) <= b * GiB
            else:
                row["why"] = p.why
            res["rows"].append(row)
            print(row, flush=True)
    ratios = {k: [r["planned_over_measured"] for r in res["rows"] if r["model"] == k and "planned_over_measured" in r]
              for k in models}
    res["planned_over_measured"] = {k: ranges(v, 3) for k, v in ratios.items()}
    emit(res)


if __name__ == "__main__":
    main()
