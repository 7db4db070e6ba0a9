"""Draw the sampler's timeline as a picture that answers "where did memory go, per stage, and how
close to the limit was I" (Pillow, imported when used).

What is drawn, all against one time axis in seconds:
- a lane above the plot with one segment per stage, and thin separators at stage boundaries in
  the plot (no shading over the curves);
- the memory the budget is about: device used (all processes) and this process's share on a GPU,
  or host RAM used when there is no GPU; and this process's RSS (host RAM: on a GPU it is not in
  the device budget, which is why it can sit above the budget line);
- the limit lines: total - reserve (above it the reserve is eaten into) and the budget, drawn
  at the level it allowed (usage when it was taken + the budget);
- GC collections (vertical lines, with what they freed) and tile boundaries (ticks);
- a legend, and under the plot one row per stage with its time span and peaks, with units.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

# stage colours: one per stage name (a stage run twice keeps its colour), none close to the
# lines' colours (reserve red, budget green, GC purple, process orange)
_COLORS = [(66, 133, 244), (0, 172, 193), (124, 179, 66), (121, 85, 72), (216, 27, 96),
           (92, 107, 192), (255, 179, 0), (0, 121, 107), (158, 157, 36)]


def _stage_colors(stages: list) -> dict:
    cols: dict = {}
    for s in stages:
        cols.setdefault(s["name"], _COLORS[len(cols) % len(_COLORS)])
    return cols
C_USED, C_PROC, C_RSS = (25, 60, 170), (230, 120, 0), (150, 90, 40)
C_RESERVE, C_BUDGET, C_GC, C_TILE, C_GRID = (200, 30, 30), (0, 150, 90), (150, 60, 190), (120, 120, 120), (225, 225, 225)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def fmt_size(b: float) -> str:
    """Bytes with a unit (binary: GiB = 2**30)."""
    b = float(b)
    for unit, k in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(b) >= k:
            return f"{b / k:.2f} {unit}"
    return f"{b:.0f} B"


def _nice_step(span: float, n: int = 5) -> float:
    raw = max(span / n, 1e-12)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _value_at(t: np.ndarray, v: np.ndarray, when: float) -> float | None:
    ok = v >= 0
    if not ok.any():
        return None
    tt, vv = t[ok], v[ok]
    return float(vv[min(int(np.searchsorted(tt, when)), len(tt) - 1)])


def render_timeline(timeline: dict[str, Any], stages: list[dict], *, width: int = 960, height: int = 440,
                    title: str = "vramguard memory timeline", host: bool | None = None,
                    total: int | None = None, reserve: int | None = None, reserve_line: int | None = None,
                    budget: int | None = None, budget_at: float | None = None,
                    gc_events: Iterable[Sequence[Any]] = (), tiles: Iterable[float] = (),
                    _legend_lines: int = 2) -> Any:
    """A PIL.Image of the timeline (see the module docstring).

    timeline: {'t', 'used', 'process_used', 'rss'} as the sampler gives it (-1 = unknown);
    stages: the sampler's stage records.  host: True when the sampler read host RAM (no GPU),
    None to guess (no 'used' samples).  total/reserve: the device's (or host RAM's) size and
    reserve, for the total - reserve line; budget: a budget in bytes and budget_at the monotonic
    time it was taken (default: the first sample), drawn at usage then + budget.  gc_events:
    (t, saved_bytes[, label]) per collection; tiles: the times tiles finished."""
    from PIL import Image, ImageDraw

    if not isinstance(width, int) or not isinstance(height, int) or not (200 <= width <= 8192 and 120 <= height <= 8192):
        raise ValueError(f"timeline size must be 200..8192 x 120..8192 px, got {width!r}x{height!r}")
    if reserve is None:
        reserve = reserve_line  # the 0.1 keyword
    img = Image.new("RGB", (width, height), (252, 252, 252))
    d = ImageDraw.Draw(img)
    fs = max(10, min(14, width // 70))
    f, fb = _font(fs), _font(fs + 2)
    lh = fs + 4

    t = np.asarray(timeline.get("t", []), dtype=np.float64)
    used = np.asarray(timeline.get("used", []), dtype=np.float64)
    proc = np.asarray(timeline.get("process_used", []), dtype=np.float64)
    rss = np.asarray(timeline.get("rss", []), dtype=np.float64)
    n = len(t)
    used, proc, rss = (a if len(a) == n else np.full(n, -1.0) for a in (used, proc, rss))
    if host is None:
        host = not (used >= 0).any()
    closed = [s for s in stages if s.get("end") is not None]

    main_label = "host RAM used (whole machine)" if host else "device used (all processes)"
    what = ("no GPU: the budget is host RAM, so the lines are host RAM" if host else
            "device memory counts against the budget; RSS is host RAM, outside the device budget")
    d.text((10, 6), title, fill=(20, 20, 20), font=fb)
    d.text((10, 6 + lh + 2), what, fill=(90, 90, 90), font=f)

    gc_events, tiles = list(gc_events), list(tiles)
    n_rows = min(len(closed), max(0, (height - 180 - lh * _legend_lines) // lh))
    left, right = 78, width - 16
    top = 6 + 2 * lh + 8 + lh + 6          # title, subtitle, stage lane
    bottom = height - 8 - lh * (n_rows + _legend_lines) - 26  # x axis, legend, stage rows
    if bottom - top < 40:
        bottom = top + 40
    lane_top = top - lh - 4

    if n == 0 and not closed:
        d.text((left, (top + bottom) // 2), "no samples yet: start the sampler (vg.sampler().start())",
               fill=(120, 120, 120), font=f)
        return img
    starts = [*t[:1], *[s["start"] for s in closed]]
    ends = [*t[-1:], *[s["end"] for s in closed]]
    t0, t1 = min(starts), max(ends)
    span = max(t1 - t0, 1e-6)

    def X(tt: float) -> float:
        return left + (tt - t0) / span * (right - left)

    # the levels the budget is about
    budget_level = None
    if budget is not None:
        # on a GPU the budget is what device use may still grow by; on the host it is what this
        # process may still allocate, so it sits on top of the RSS
        base = _value_at(t, rss if host else used, t0 if budget_at is None else budget_at)
        if base is not None:
            budget_level = base + budget
    limit = (total - reserve) if (total and reserve is not None) else None

    series = [v for v in (used, proc, rss) if len(v) and (v >= 0).any()]
    vmax = max([float(v[v >= 0].max()) for v in series] + [1.0])
    vmax = max(vmax, *(s.get("peak_used", -1) for s in closed), 1.0) if closed else vmax
    if budget_level is not None:
        vmax = max(vmax, budget_level)
    limit_above = False
    if limit is not None:
        if limit <= 1.6 * vmax:
            vmax = max(vmax, limit)
        else:
            limit_above = True
    unit = 2 ** 30 if vmax >= 2 ** 30 else 2 ** 20  # ticks at round GiB / MiB values
    step = _nice_step(vmax * 1.08 / unit) * unit
    vmax = step * math.ceil(vmax * 1.08 / step)

    def Y(v: float) -> float:
        return bottom - v / vmax * (bottom - top)

    # grid and axes
    for k in range(int(round(vmax / step)) + 1):
        v = k * step
        d.line([left, Y(v), right, Y(v)], fill=C_GRID)
        label = f"{v / unit:g} {'GiB' if unit == 2 ** 30 else 'MiB'}" if v else "0"
        d.text((4, Y(v) - fs // 2 - 1), label, fill=(70, 70, 70), font=f)
    tstep = _nice_step(span, 8)
    k = 0
    while k * tstep <= span + 1e-9:
        x = X(t0 + k * tstep)
        d.line([x, bottom, x, bottom + 4], fill=(60, 60, 60))
        lab = f"{k * tstep:g} s"
        d.text((min(x - 8, width - 2 - d.textlength(lab, font=f)), bottom + 5), lab, fill=(70, 70, 70), font=f)
        k += 1
    d.line([left, top, left, bottom, right, bottom], fill=(40, 40, 40))

    # the stage lane and boundaries: the plot stays unshaded
    stage_col = _stage_colors(closed)
    for s in closed:
        col = stage_col[s["name"]]
        x0, x1 = X(s["start"]), max(X(s["end"]), X(s["start"]) + 2)
        d.rectangle([x0, lane_top, x1, lane_top + lh], fill=col)
        label = s["name"]
        if d.textlength(label, font=f) + 6 < x1 - x0:
            d.text((x0 + 3, lane_top + 1), label, fill=(255, 255, 255), font=f)
        for xb in (x0, x1):
            d.line([xb, top, xb, bottom], fill=tuple(min(255, c + 90) for c in col))

    # limit lines
    legend: list[tuple[tuple[int, int, int], str]] = []
    if limit is not None and not limit_above:
        d.line([left, Y(limit), right, Y(limit)], fill=C_RESERVE, width=2)
        legend.append((C_RESERVE, f"total - reserve = {fmt_size(limit)} (reserve {fmt_size(reserve)} kept free)"))
    elif limit is not None:
        legend.append((C_RESERVE, f"total - reserve = {fmt_size(limit)}: far above the plot"))
    if budget_level is not None:
        for x in range(left, right, 12):
            d.line([x, Y(budget_level), min(x + 6, right), Y(budget_level)], fill=C_BUDGET, width=2)
        legend.append((C_BUDGET, f"budget {fmt_size(budget)} on top of " +
                       ("this process's RSS" if host else "device use") + " when it was set"))

    # GC events and tile boundaries
    n_tiles = 0
    for tt in tiles:
        if t0 <= tt <= t1 + 1e-6:
            x = X(float(tt))
            d.line([x, top, x, bottom], fill=(215, 215, 215), width=1)
            d.line([x, bottom - 8, x, bottom], fill=C_TILE, width=2)
            n_tiles += 1
    if n_tiles:
        legend.append((C_TILE, f"tile finished ({n_tiles})"))

    n_gc = 0
    for ev in gc_events:
        tt, saved = float(ev[0]), float(ev[1])
        if not (t0 - 0.5 <= tt <= t1 + 0.5):  # a log stamp a tick after the last sample still counts
            continue
        x = min(max(X(tt), left + 1), right - 1)
        for y in range(int(top), int(bottom), 6):
            d.line([x, y, x, min(y + 3, bottom)], fill=C_GC, width=2)
        label = f"GC freed {fmt_size(saved)}"
        lx = x + 4 if x + 4 + d.textlength(label, font=f) < right else x - 4 - d.textlength(label, font=f)
        d.text((lx, top + 2 + lh * (n_gc % 3)), label, fill=C_GC, font=f)
        n_gc += 1
    if n_gc:
        legend.append((C_GC, "GC collection (what it freed)"))
    # the curves
    def curve(v: np.ndarray, col: tuple[int, int, int], w: int) -> bool:
        ok = v >= 0
        if ok.sum() < 2:
            return False
        d.line([(X(a), Y(b)) for a, b in zip(t[ok], v[ok])], fill=col, width=w)
        return True

    if curve(used, C_USED, 2):
        legend.insert(0, (C_USED, main_label))
    same_as_rss = host or (len(proc) == len(rss) and np.array_equal(proc, rss))
    if not same_as_rss and curve(proc, C_PROC, 2):
        legend.insert(1, (C_PROC, "this process on the device"))
    if curve(rss, C_RSS, 1):
        legend.append((C_RSS, "this process's RSS (host RAM" + (")" if host else ", not in the device budget)")))

    # the legend, below the x axis (drawn again with more room when it needs more lines)
    x, y, lines = left, bottom + 22, 1
    for col, text in legend:
        w = 18 + d.textlength(text, font=f) + 14
        if x + w > right and x > left:
            x, y, lines = left, y + lh, lines + 1
        d.rectangle([x, y + lh // 2 - 2, x + 14, y + lh // 2 + 2], fill=col)
        d.text((x + 18, y), text, fill=(40, 40, 40), font=f)
        x += w
    if lines != _legend_lines and _legend_lines == 2:
        return render_timeline(timeline, stages, width=width, height=height, title=title, host=host, total=total,
                               reserve=reserve, budget=budget, budget_at=budget_at, gc_events=gc_events,
                               tiles=tiles, _legend_lines=lines)
    y += lh + 2

    # one row per stage: span and peaks, with units
    for i, s in enumerate(closed[-n_rows:] if n_rows else []):
        col = stage_col[s["name"]]
        d.rectangle([left, y + 3, left + 10, y + lh - 3], fill=col)
        parts = [f"{s['name']}: {s['start'] - t0:.2f}-{s['end'] - t0:.2f} s"]
        if s.get("peak_used", -1) >= 0:
            parts.append(f"peak {'host RAM used' if host else 'device used'} {fmt_size(s['peak_used'])}")
        if not host and s.get("peak_process", -1) >= 0:
            parts.append(f"this process {fmt_size(s['peak_process'])}")
        if s.get("peak_rss", -1) >= 0:
            parts.append(f"RSS {fmt_size(s['peak_rss'])}")
        d.text((left + 16, y), ", ".join(parts), fill=(40, 40, 40), font=f)
        y += lh
    if len(closed) > n_rows:
        d.text((left + 16, y), f"({len(closed) - n_rows} earlier stages not listed)", fill=(120, 120, 120), font=f)
    return img


def render_sampler(sampler: Any, *, width: int = 960, height: int = 440, title: str = "vramguard memory timeline",
                   budget: int | None = None, budget_at: float | None = None,
                   gc_events: Iterable[Sequence[Any]] | None = None, tiles: Iterable[float] = ()) -> Any:
    """render_timeline for a vramguard Sampler, with its device's total and reserve (a current
    snapshot of the sampled device, or of host RAM when it samples no device).  gc_events None:
    the collections in the GC JSON log, when one is configured (configure_gc(log_file=...))."""
    from . import accounting, gcguard

    if gc_events is None:
        gc_events = gc_events_from_jsonl(getattr(gcguard.guard(), "_jsonl", None) or "")

    dev = getattr(sampler, "device", None)
    host = dev is None
    total = reserve = None
    try:
        snap = accounting.snapshot(None if host else dev)
        total, reserve = snap.total, snap.reserve
    except Exception:  # the device went away: the picture goes without the limit line
        pass
    return render_timeline(sampler.timeline(), sampler.stages(), width=width, height=height, title=title,
                           host=host, total=total, reserve=reserve, budget=budget, budget_at=budget_at,
                           gc_events=gc_events, tiles=tiles)


def gc_events_from_jsonl(path: str) -> list[tuple[float, int, str]]:
    """(monotonic t, saved bytes, stage) per collection in a GC JSON log (configure_gc(log_file=...)),
    its wall-clock stamps mapped onto the sampler's monotonic clock; [] when there is no file."""
    import json
    import os
    import time

    if not path or not os.path.isfile(path):
        return []
    shift = time.time() - time.monotonic()
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
                out.append((float(rec["ts"]) - shift, int(rec.get("saved_bytes", 0)), str(rec.get("fn", ""))))
            except (ValueError, KeyError, TypeError):
                continue  # the header line, or a line another tool wrote
    return out
