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

    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return p


_EXTRA_COMMANDS: list = []


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        print(f"vramguard: {e}", file=sys.stderr)
        return 1
