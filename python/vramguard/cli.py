"""python -m vramguard: status, watch, plan, demo, install-comfyui.

Every sub-command validates its arguments and exits with status 2 and a one-line message on
bad input (argparse's convention), 1 when the work itself failed, never with a traceback.
Options that have no effect (--used without --simulate, --reserve/--cap without a GPU) are
named in a warning on stderr.  Output fits an 80-column terminal; a closed pipe
(`... | head`) ends the command quietly.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
import time
from typing import Sequence

from . import accounting as acc
from ._units import fmt_bytes, parse_size

_GB = 1 << 30
_WIDTH = 80
_MAX_SIDE = 1 << 20


class UsageError(Exception):
    """A bad argument found after parsing: `prog sub: error: ...`, exit status 2."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")


def _warn(message: str) -> None:
    print(f"vramguard: warning: {message}", file=sys.stderr)


def _int_range(what: str, lo: int, hi: int):
    def conv(text: str) -> int:
        try:
            v = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a whole number, got {text[:80]!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be {lo}..{hi}, got {text[:80]!r}")
        return v
    return conv


def _float_range(what: str, lo: float, hi: float, lo_open: bool = False):
    def conv(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text[:80]!r}") from None
        if not (x > lo if lo_open else x >= lo) or not x <= hi:
            raise argparse.ArgumentTypeError(
                f"{what} must be {'>' if lo_open else '>='} {lo:g} and <= {hi:g}, got {text[:80]!r}")
        return x
    return conv


def _size_arg(what: str):
    def conv(text: str) -> int:
        try:
            return parse_size(text, what, default_unit=_GB)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return conv


def _size_text(what: str):
    """Checked like a size, kept as the user wrote it (the demo prints it)."""
    def conv(text: str) -> str:
        _size_arg(what)(text)
        return text
    return conv


def _pos_float(what: str):
    def conv(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text[:80]!r}") from None
        if not (x > 0 and x < float("inf")):
            raise argparse.ArgumentTypeError(f"{what} must be > 0 and finite, got {text[:80]!r}")
        return x
    return conv


def _add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--simulate", type=_size_arg("--simulate"), metavar="SIZE",
                   help="use a simulated device of this size instead of real GPUs (e.g. 8GB)")
    p.add_argument("--used", type=_size_arg("--used"), default=None, metavar="SIZE",
                   help="with --simulate: memory already used on it (default 0)")
    p.add_argument("--reserve", type=_size_arg("--reserve"), metavar="SIZE",
                   help="VRAM to keep free for other applications (bare number = GB)")
    p.add_argument("--cap", type=_size_arg("--cap"), metavar="SIZE",
                   help="absolute cap on this process's VRAM (bare number = GB; 0 = no cap)")


def _check_device_options(a: argparse.Namespace) -> None:
    """Usage errors and warnings for --simulate/--used/--reserve/--cap, before any work."""
    if a.simulate is None:
        if a.used is not None:
            _warn("--used ignored: it only applies with --simulate SIZE")
    elif a.simulate <= 0:
        raise UsageError("--simulate", "a simulated device needs a size > 0")
    elif a.used is not None and a.used > a.simulate:
        raise UsageError("--used", f"{fmt_bytes(a.used)} exceeds --simulate {fmt_bytes(a.simulate)}")


def _apply_device_options(a: argparse.Namespace, *, reserve: bool = True) -> None:
    _check_device_options(a)
    if a.simulate is not None:
        acc.simulate_clear()
        acc.simulate(a.simulate, a.used or 0)
    gpu = acc.device_count() > 0
    opts = (("--reserve", a.reserve if reserve else None, acc.set_reserve), ("--cap", a.cap, acc.set_cap))
    for opt, value, setter in opts:
        if value is None:
            continue
        if not gpu:
            _warn(f"{opt} ignored: no GPU (`status` says why); --simulate SIZE adds one")
            continue
        setter(value)


def status_data() -> dict:
    """What `status --json` prints: {'devices': [...], 'host': {...}, 'gpu': {...},
    'ledger': vramguard.ledger.summary(peek=True)}."""
    from . import ledger

    with ledger.peeking():  # the budgets count the participants' plans, as theirs do
        devices = [acc.snapshot_dict(s) for s in acc.snapshots()]
        return {"devices": devices, "host": acc.snapshot_dict(acc.host()),
                "gpu": acc.gpu_status(), "ledger": ledger.summary()}


def _short_bytes(n: int | None) -> str:
    """'7.93G', '512M', '0': at most 6 characters, for the 80-column table."""
    if n is None:
        return "-"
    for unit, size in (("T", 1 << 40), ("G", _GB), ("M", 1 << 20), ("K", 1 << 10)):
        if abs(n) >= size:
            x = n / size
            return f"{x:.2f}{unit}" if abs(x) < 10 else f"{x:.1f}{unit}" if abs(x) < 100 else f"{x:.0f}{unit}"
    return f"{n}B" if n else "0"


def _wrap(text: str, indent: str = "  ") -> list[str]:
    return textwrap.wrap(text, _WIDTH, subsequent_indent=indent, break_on_hyphens=False) or [""]


def _fragmentation_lines(d: dict) -> list[str]:
    """The allocator's fragmentation for one device (issue 16), when the probe knows it."""
    split, largest, exp = d.get("inactive_split"), d.get("largest_free_block"), d.get("expandable_segments")
    if split is None and largest is None and exp is None:
        return []
    parts = []
    if split is not None:
        parts.append(f"{fmt_bytes(split)} in inactive splits")
    if largest is not None:
        parts.append(f"largest free block {fmt_bytes(largest)}")
    if exp is not None:
        parts.append(f"expandable_segments {'on' if exp else 'off'}")
    return _wrap(f"GPU {d['index']}: fragmentation: {', '.join(parts)}")


def status_text(data: dict) -> str:
    """The status table; every line fits 80 columns (G = GiB, M = MiB)."""
    lines = []
    if not data["devices"]:
        lines += _wrap(f"no GPU: {data['gpu']['devices_reason']}")
    else:
        cols = ("GPU", "name", "total", "used", "free", "process", "evict", "reserve", "budget")
        rows = [cols]
        for d in data["devices"]:
            name = d["name"] if len(d["name"]) <= 18 else d["name"][:17] + "~"
            rows.append((str(d["index"]), name) + tuple(_short_bytes(d[k]) for k in (
                "total", "used", "free", "process_used", "evictable", "reserve", "budget")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        for r in rows:
            lines.append(" ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        sources = sorted({d["source"] for d in data["devices"]})
        lines.append(f"(G = GiB, M = MiB; source: {', '.join(sources)})")
        for d in data["devices"]:
            if d["cap"]:
                lines.append(f"GPU {d['index']}: cap {fmt_bytes(d['cap'])} on this process")
        for d in data["devices"]:
            lines += _fragmentation_lines(d)
    h = data["host"]
    lines += _wrap(f"host RAM: total {fmt_bytes(h['total'])}, available {fmt_bytes(h['available'])}, "
                   f"this process {fmt_bytes(h['process_rss'])}")
    if h["cgroup_limit"]:
        lines.append(f"host RAM: cgroup limit {fmt_bytes(h['cgroup_limit'])}")
    if "ledger" in data:  # participants, claims, learned reserve, pinned host memory
        from . import ledger

        for line in ledger.summary_text(data["ledger"]).splitlines():
            lines += _wrap(line, "    ")
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
        raise argparse.ArgumentTypeError(f"--size must be WIDTHxHEIGHT, got {text[:80]!r}") from None
    if w < 1 or h < 1 or w > _MAX_SIDE or h > _MAX_SIDE:
        raise argparse.ArgumentTypeError(f"--size sides must be 1..{_MAX_SIDE}, got {text[:80]!r}")
    return w, h


_BYTES = re.compile(r"\b(\d{4,})(?:\.\d+)? bytes\b|\b(budget is|budget) (\d{4,})\b")


def humanize(why: str) -> str:
    """Byte counts in a planner message as GiB/MiB ('needs 109887488 bytes' -> 'needs 104.80 MiB')."""
    def sub(m: re.Match) -> str:
        if m.group(1):
            return fmt_bytes(int(m.group(1)))
        return f"{m.group(2)} {fmt_bytes(int(m.group(3)))}"
    return _BYTES.sub(sub, why)


def _plan_budget_source(a: argparse.Namespace) -> str:
    if a.budget is not None:
        return f"--budget {fmt_bytes(a.budget)}"
    res = f" minus --reserve {fmt_bytes(a.reserve)}" if a.reserve else ""
    if a.card is not None:
        return f"a {fmt_bytes(a.card)} card{res}"
    if acc.device_count() > 0:
        s = acc.snapshot(0)
        return f"GPU 0 ({s.name}) now{res}"
    return f"free host RAM{res} (no GPU; --card SIZE plans for a card)"


def cmd_plan(a: argparse.Namespace) -> int:
    from . import tiling

    w, h = a.size
    if a.overlap >= min(w, h):
        raise UsageError("--overlap", f"{a.overlap} px must be smaller than the image ({w}x{h})")
    ow, oh = int(w * a.scale), int(h * a.scale)
    if ow < 1 or oh < 1:
        raise UsageError("--scale", f"{a.scale:g} turns {w}x{h} into {ow}x{oh} px; the output needs >= 1 px")
    if ow > _MAX_SIDE * 64 or oh > _MAX_SIDE * 64:
        raise UsageError("--scale", f"{a.scale:g} turns {w}x{h} into {ow}x{oh} px: too large")
    if a.max_tile is not None and a.max_tile <= 2 * a.overlap:
        raise UsageError("--max-tile", f"{a.max_tile} px must be larger than twice --overlap ({2 * a.overlap})")
    elem = {"float32": 4, "float16": 2, "bfloat16": 2}[a.dtype]
    cost = None
    if a.per_px is not None or a.fixed is not None:
        cost = tiling.CostModel(float(a.fixed or 0), float(a.per_px or 0), "given")
    if a.simulate is not None or a.cap is not None or a.used is not None:
        # --reserve is the planner's own argument here, not a device limit
        _apply_device_options(a, reserve=False)
    if a.cap is not None and (a.card is not None or a.budget is not None):
        _warn("--cap ignored: --card/--budget sets the budget")
    if a.budget is not None and (a.card is not None or a.reserve is not None):
        _warn("--card/--reserve ignored: --budget is used as it is")
    source = _plan_budget_source(a)
    try:
        p = tiling.plan_tiles(w, h, scale=a.scale, overlap=a.overlap, align=a.align, channels=a.channels,
                              elem_size=elem, batch=a.batch, cost=cost, model_bytes=a.model_mb << 20,
                              budget=a.budget, card=a.card, reserve=a.reserve, max_tile=a.max_tile)
    except (TypeError, ValueError) as e:  # a combination the planner refuses
        raise UsageError("plan", humanize(str(e))) from None
    d = p.as_dict()
    d["budget_source"] = source
    if a.json:
        print(json.dumps(d))
        return 0 if p.fits else 1
    print(f"budget from       {source}")
    if not p.fits:
        print(f"does not fit: {humanize(p.why)}")
        return 1
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
    if a.device is not None and a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device", f"{a.device}: this torch ({torch.__version__}) has no CUDA device; "
                             "use --device cpu or leave it out")
        idx = int(a.device.partition(":")[2] or 0)
        if idx >= torch.cuda.device_count():
            raise UsageError("--device", f"{a.device}: only {torch.cuda.device_count()} CUDA device(s)")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise UsageError("--out", f"{a.out!r} is a file, not a folder")
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
    from . import __version__

    p = argparse.ArgumentParser(prog="python -m vramguard",
                                description="GPU-memory guard: accounting, GC triggers, reserve-aware tiling. "
                                            "Sizes: 8GB, 512MiB or a bare number of GB (GB = 2**30 bytes). "
                                            "Exit status: 0 done, 1 the work failed (or the plan does not fit), "
                                            "2 bad arguments.")
    p.add_argument("--version", action="version", version=f"vramguard {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("status", help="devices, host RAM, reserve and budget")
    _add_device_options(s)
    s.add_argument("--json", action="store_true", help="one JSON object: {devices: [...], host: {...}}")
    s.set_defaults(fn=cmd_status)

    w = sub.add_parser("watch", help="refresh the status table until Ctrl-C")
    _add_device_options(w)
    w.add_argument("--interval", type=_pos_float("--interval"), default=1.0, help="seconds (default 1)")
    w.add_argument("--count", type=_int_range("--count", 1, 1 << 31), default=None,
                   help="stop after N refreshes (default: until Ctrl-C)")
    w.set_defaults(fn=cmd_watch)

    pl = sub.add_parser("plan", help="the largest tile that fits a budget (real, simulated or a card size)")
    pl.add_argument("--size", type=_wxh, required=True, help="input WIDTHxHEIGHT, e.g. 4096x4096")
    pl.add_argument("--scale", type=_float_range("--scale", 0, 64, lo_open=True), default=1.0,
                    help="output/input size, e.g. 4 or 0.125 (at most 64)")
    pl.add_argument("--overlap", type=_int_range("--overlap", 0, _MAX_SIDE), default=32,
                    help="input px shared by neighbouring tiles (default 32)")
    pl.add_argument("--align", type=_int_range("--align", 1, 4096), default=1,
                    help="tile sizes and positions are multiples of this")
    pl.add_argument("--channels", type=_int_range("--channels", 1, 4096), default=3)
    pl.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    pl.add_argument("--batch", type=_int_range("--batch", 1, _MAX_SIDE), default=1, help="images in the batch")
    pl.add_argument("--model-mb", type=_int_range("--model-mb", 0, 1 << 24), default=0,
                    help="model weights on the device (MiB)")
    pl.add_argument("--per-px", type=_float_range("--per-px", 0, 1e12), default=None,
                    help="measured bytes per input pixel (overrides the default model)")
    pl.add_argument("--fixed", type=_float_range("--fixed", 0, 9e18), default=None,
                    help="measured fixed bytes per tile")
    pl.add_argument("--card", type=_size_arg("--card"), default=None,
                    help="plan for a card of this size (bare number = GB); without --card or --budget the "
                         "budget is the GPU's, or free host RAM when there is no GPU")
    pl.add_argument("--budget", type=_size_arg("--budget"), default=None, help="plan for exactly this budget")
    pl.add_argument("--max-tile", type=_int_range("--max-tile", 1, _MAX_SIDE), default=None,
                    help="never use tiles larger than this")
    _add_device_options(pl)
    pl.add_argument("--json", action="store_true", help="one JSON object (keys tile, tiles, predicted_peak_bytes, budget_bytes, ...)")
    pl.set_defaults(fn=cmd_plan)

    dm = sub.add_parser("demo", help="tiled x4 upscale of a built-in image under a reserve, GC hooks on")
    dm.add_argument("--out", default="vramguard_out", help="output folder (default ./vramguard_out)")
    dm.add_argument("--size", type=_int_range("--size", 16, 2048), default=384,
                    help="built-in image side in px, 16..2048 (default 384; the output is x4)")
    dm.add_argument("--reserve", dest="reserve_text", type=_size_text("--reserve"), default="1.5GB",
                    help="VRAM (or RAM) to keep free")
    dm.add_argument("--budget", type=_size_text("--budget"), default=None, help="use exactly this budget instead")
    dm.add_argument("--device", type=_device_arg, default=None, help="cuda, cuda:N or cpu (default: the best present)")
    dm.set_defaults(fn=cmd_demo)

    ic = sub.add_parser("install-comfyui", help="write a loader folder into ComfyUI/custom_nodes")
    ic.add_argument("comfyui", help="path to the ComfyUI folder")
    ic.add_argument("--uninstall", action="store_true", help="remove the loader folder again")
    ic.set_defaults(fn=cmd_install_comfyui)
    return p


def _device_arg(text: str) -> str:
    if text == "cpu" or re.fullmatch(r"cuda(:[0-9]{1,3})?", text):
        return text
    raise argparse.ArgumentTypeError(f"--device must be cpu, cuda or cuda:N, got {text[:80]!r}")


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)  # bad arguments: one line, exit 2 (argparse)
    try:
        rc = int(args.fn(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return rc
    except UsageError as e:
        sub = next((a for a in parser._subparsers._group_actions if a.choices), None)  # type: ignore[union-attr]
        prog = sub.choices[args.cmd].prog if sub is not None else parser.prog
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `... | head`: the reader has all it wanted.  Point stdout at /dev/null so the
        # interpreter's final flush does not complain, and end quietly.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # the work failed: one line, never a traceback
        msg = str(e) or type(e).__name__
        print(f"vramguard: {type(e).__name__}: {msg[:300]}" if not isinstance(e, (ValueError, OSError))
              else f"vramguard: {msg[:300]}", file=sys.stderr)
        return 1
