"""python -m vramguard: status, watch, plan, demo, install-comfyui.

Every sub-command validates its arguments and exits with status 2 and a one-line message on
bad input (argparse's convention), 1 when the work itself failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from . import accounting as acc
from ._units import fmt_bytes, parse_size

_GB = 1 << 30


def _size_arg(what: str):
    def conv(text: str) -> int:
        try:
            return parse_size(text, what, default_unit=_GB)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return conv


def _pos_float(what: str):
    def conv(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if not (x > 0 and x < float("inf")):
            raise argparse.ArgumentTypeError(f"{what} must be > 0 and finite, got {text!r}")
        return x
    return conv


def _add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--simulate", type=_size_arg("--simulate"), metavar="SIZE",
                   help="use a simulated device of this size instead of real GPUs (e.g. 8GB)")
    p.add_argument("--used", type=_size_arg("--used"), default=0, metavar="SIZE",
                   help="with --simulate: memory already used on it (default 0)")
    p.add_argument("--reserve", type=_size_arg("--reserve"), metavar="SIZE",
                   help="VRAM to keep free for other applications (bare number = GB)")
    p.add_argument("--cap", type=_size_arg("--cap"), metavar="SIZE",
                   help="absolute cap on this process's VRAM (bare number = GB)")


def _apply_device_options(a: argparse.Namespace) -> None:
    if a.simulate is not None:
        if a.used > a.simulate:
            raise SystemExit(f"vramguard: --used {fmt_bytes(a.used)} exceeds --simulate {fmt_bytes(a.simulate)}")
        acc.simulate_clear()
        acc.simulate(a.simulate, a.used)
    if a.reserve is not None:
        acc.set_reserve(a.reserve)
    if a.cap is not None:
        acc.set_cap(a.cap)


def status_data() -> dict:
    """What `status --json` prints: {'devices': [...], 'host': {...}, 'gpu': {...}}."""
    devices = [acc.snapshot_dict(s) for s in acc.snapshots()]
    return {"devices": devices, "host": acc.snapshot_dict(acc.host()), "gpu": acc.gpu_status()}


def status_text(data: dict) -> str:
    lines = []
    if not data["devices"]:
        lines.append(f"no GPU: {data['gpu']['devices_reason']}")
    else:
        cols = ("GPU", "name", "total", "used", "free", "process", "evictable", "reserve", "budget", "source")
        rows = [cols]
        for d in data["devices"]:
            rows.append((str(d["index"]), d["name"][:28], fmt_bytes(d["total"]), fmt_bytes(d["used"]),
                         fmt_bytes(d["free"]), fmt_bytes(d["process_used"]), fmt_bytes(d["evictable"]),
                         fmt_bytes(d["reserve"]), fmt_bytes(d["budget"]), d["source"]))
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        for r in rows:
            lines.append("  ".join(c.ljust(w) if i in (0, 1, 9) else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        for d in data["devices"]:
            if d["cap"]:
                lines.append(f"GPU {d['index']}: cap {fmt_bytes(d['cap'])} on this process")
    h = data["host"]
    cg = f", cgroup limit {fmt_bytes(h['cgroup_limit'])}" if h["cgroup_limit"] else ""
    lines.append(f"host RAM: total {fmt_bytes(h['total'])}, available {fmt_bytes(h['available'])}, "
                 f"this process {fmt_bytes(h['process_rss'])}{cg}")
    return "\n".join(lines)


def cmd_status(a: argparse.Namespace) -> int:
    _apply_device_options(a)
    data = status_data()
    print(json.dumps(data) if a.json else status_text(data))
    return 0


def cmd_watch(a: argparse.Namespace) -> int:
    _apply_device_options(a)
    tty = sys.stdout.isatty()
    n = 0
    try:
        while a.count is None or n < a.count:
            text = status_text(status_data())
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J")
            sys.stdout.write(f"vramguard watch (every {a.interval:g} s, Ctrl-C to stop)\n{text}\n")
            sys.stdout.flush()
            n += 1
            if a.count is None or n < a.count:
                time.sleep(a.interval)
    except KeyboardInterrupt:
        print()
    return 0


def _wxh(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be WIDTHxHEIGHT, got {text!r}") from None
    if w < 1 or h < 1 or w > (1 << 20) or h > (1 << 20):
        raise argparse.ArgumentTypeError(f"--size sides must be 1..{1 << 20}, got {text!r}")
    return w, h


def cmd_plan(a: argparse.Namespace) -> int:
    from . import tiling

    w, h = a.size
    elem = {"float32": 4, "float16": 2, "bfloat16": 2}[a.dtype]
    cost = None
    if a.per_px is not None or a.fixed is not None:
        cost = tiling.CostModel(float(a.fixed or 0), float(a.per_px or 0), "given")
    if a.simulate is not None or a.cap is not None:
        _apply_device_options(a)
    p = tiling.plan_tiles(w, h, scale=a.scale, overlap=a.overlap, align=a.align, channels=a.channels,
                          elem_size=elem, batch=a.batch, cost=cost, model_bytes=a.model_mb << 20,
                          budget=a.budget, card=a.card, reserve=a.reserve, max_tile=a.max_tile)
    d = p.as_dict()
    if a.json:
        print(json.dumps(d))
        return 0 if p.fits else 1
    if not p.fits:
        print(f"does not fit: {p.why}")
        return 1
    ow, oh = int(w * a.scale), int(h * a.scale)
    print(f"{w}x{h} -> {ow}x{oh} (x{a.scale:g}), overlap {a.overlap}, align {a.align}")
    print(f"budget            {fmt_bytes(p.budget_bytes)}")
    print(f"tile              {p.tile[0]}x{p.tile[1]} px (input)")
    print(f"grid              {p.grid[0]}x{p.grid[1]} = {p.tiles} tiles")
    print(f"batch             {p.batch}")
    print(f"predicted peak    {fmt_bytes(int(p.predicted_peak_bytes))}")
    c = p.cost
    if c is not None:
        print(f"cost model        {fmt_bytes(int(c.fixed))} + {c.per_px:.0f} B per input px ({c.source})")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("torch", "PIL") if importlib.util.find_spec(m) is None]
    if missing:
        e = f"missing {', '.join(missing)}"
        print(f"vramguard demo needs torch and Pillow ({e}); `bash scripts/demo.sh` installs them",
              file=sys.stderr)
        return 1
    from .demo import run_demo

    run_demo(a.out, size=a.size, reserve=a.reserve_text, budget=a.budget, device=a.device)
    return 0


def cmd_install_comfyui(a: argparse.Namespace) -> int:
    from .comfy_install import install_loader, uninstall_loader

    if a.uninstall:
        print(uninstall_loader(a.comfyui))
    else:
        print(install_loader(a.comfyui))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vramguard",
                                description="GPU-memory guard: accounting, GC triggers, reserve-aware tiling.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("status", help="devices, host RAM, reserve and budget")
    _add_device_options(s)
    s.add_argument("--json", action="store_true", help="one JSON object: {devices: [...], host: {...}}")
    s.set_defaults(fn=cmd_status)

    w = sub.add_parser("watch", help="refresh the status table until Ctrl-C")
    _add_device_options(w)
    w.add_argument("--interval", type=_pos_float("--interval"), default=1.0, help="seconds (default 1)")
    w.add_argument("--count", type=int, default=None, help="stop after N refreshes")
    w.set_defaults(fn=cmd_watch)

    pl = sub.add_parser("plan", help="the largest tile that fits a budget (real, simulated or a card size)")
    pl.add_argument("--size", type=_wxh, required=True, help="input WIDTHxHEIGHT, e.g. 4096x4096")
    pl.add_argument("--scale", type=_pos_float("--scale"), default=1.0, help="output/input size, e.g. 4 or 0.125")
    pl.add_argument("--overlap", type=int, default=32, help="input px shared by neighbouring tiles (default 32)")
    pl.add_argument("--align", type=int, default=1, help="tile sizes and positions are multiples of this")
    pl.add_argument("--channels", type=int, default=3)
    pl.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    pl.add_argument("--batch", type=int, default=1, help="images in the batch")
    pl.add_argument("--model-mb", type=int, default=0, help="model weights on the device (MiB)")
    pl.add_argument("--per-px", type=float, default=None, help="measured bytes per input pixel (overrides the default model)")
    pl.add_argument("--fixed", type=float, default=None, help="measured fixed bytes per tile")
    pl.add_argument("--card", type=_size_arg("--card"), default=None, help="plan for a card of this size (bare number = GB)")
    pl.add_argument("--budget", type=_size_arg("--budget"), default=None, help="plan for exactly this budget")
    pl.add_argument("--max-tile", type=int, default=None, help="never use tiles larger than this")
    _add_device_options(pl)
    pl.add_argument("--json", action="store_true", help="one JSON object (keys tile, tiles, predicted_peak_bytes, budget_bytes, ...)")
    pl.set_defaults(fn=cmd_plan)

    dm = sub.add_parser("demo", help="tiled x4 upscale of a built-in image under a reserve, GC hooks on")
    dm.add_argument("--out", default="vramguard_out", help="output folder (default ./vramguard_out)")
    dm.add_argument("--size", type=int, default=384, help="built-in image side in px (default 384)")
    dm.add_argument("--reserve", dest="reserve_text", default="1.5GB", help="VRAM (or RAM) to keep free")
    dm.add_argument("--budget", default=None, help="use exactly this budget instead")
    dm.add_argument("--device", default=None, help="cuda or cpu (default: the best present)")
    dm.set_defaults(fn=cmd_demo)

    ic = sub.add_parser("install-comfyui", help="write a loader folder into ComfyUI/custom_nodes")
    ic.add_argument("comfyui", help="path to the ComfyUI folder")
    ic.add_argument("--uninstall", action="store_true", help="remove the loader folder again")
    ic.set_defaults(fn=cmd_install_comfyui)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        print(f"vramguard: {e}", file=sys.stderr)
        return 1
