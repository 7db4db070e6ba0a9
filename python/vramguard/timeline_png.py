"""Draw the sampler's timeline with its stages as a picture (Pillow, imported when used)."""
from __future__ import annotations

from typing import Any

import numpy as np

_COLORS = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188),
           (0, 172, 193), (255, 112, 67), (158, 157, 36), (92, 107, 192)]


def render_timeline(timeline: dict[str, Any], stages: list[dict], *, width: int = 960, height: int = 360,
                    title: str = "vramguard memory timeline", reserve_line: int | None = None,
                    total: int | None = None) -> Any:
    """A PIL.Image: device used (or host RSS when no device was sampled) over time, each
    stage shaded and labelled with its peak."""
    from PIL import Image, ImageDraw

    if not isinstance(width, int) or not isinstance(height, int) or not (200 <= width <= 8192 and 120 <= height <= 8192):
        raise ValueError(f"timeline size must be 200..8192 x 120..8192 px, got {width!r}x{height!r}")
    img = Image.new("RGB", (width, height), (250, 250, 250))
    d = ImageDraw.Draw(img)
    t = np.asarray(timeline.get("t", []), dtype=np.float64)
    used = np.asarray(timeline.get("used", []), dtype=np.float64)
    series, label = used, "device used"
    if len(used) == 0 or np.all(used < 0):
        series, label = np.asarray(timeline.get("rss", []), dtype=np.float64), "host RSS"
    left, right, top, bottom = 70, width - 20, 30, height - 40
    d.text((10, 8), f"{title} ({label})", fill=(20, 20, 20))
    closed = [s for s in stages if s.get("end") is not None]
    if len(t) == 0 and not closed:
        d.text((left, (top + bottom) // 2), "no samples", fill=(120, 120, 120))
        return img
    t0 = min([*t[:1], *[s["start"] for s in closed]]) if len(t) else min(s["start"] for s in closed)
    t1 = max([*t[-1:], *[s["end"] for s in closed]]) if len(t) else max(s["end"] for s in closed)
    span = max(t1 - t0, 1e-6)
    peaks = [s["peak_used"] if label == "device used" else s["peak_rss"] for s in closed]
    vmax = max([*(series[series >= 0] if len(series) else []), *peaks, total or 0, 1.0])

    def X(tt: float) -> float:
        return left + (tt - t0) / span * (right - left)

    def Y(v: float) -> float:
        return bottom - v / vmax * (bottom - top)

    for i, s in enumerate(closed):
        col = _COLORS[i % len(_COLORS)]
        x0, x1 = X(s["start"]), max(X(s["end"]), X(s["start"]) + 1)
        d.rectangle([x0, top, x1, bottom], fill=tuple(200 + (c - 200) // 4 for c in col))
        pk = s["peak_used"] if label == "device used" else s["peak_rss"]
        d.text((x0 + 2, top + 2 + 12 * (i % 4)), f"{s['name']} {pk / 2**30:.2f}G", fill=col)
    d.line([left, top, left, bottom, right, bottom], fill=(40, 40, 40))
    for frac in (0, 0.5, 1):
        v = vmax * frac
        d.text((4, Y(v) - 6), f"{v / 2**30:.2f} GiB", fill=(60, 60, 60))
    d.text((left, bottom + 8), "0 s", fill=(60, 60, 60))
    d.text((right - 40, bottom + 8), f"{span:.2f} s", fill=(60, 60, 60))
    if reserve_line is not None and total:
        yr = Y(total - reserve_line)
        d.line([left, yr, right, yr], fill=(200, 0, 0))
        d.text((right - 120, yr - 12), "total - reserve", fill=(200, 0, 0))
    ok = series >= 0
    if ok.sum() >= 2:
        pts = [(X(a), Y(b)) for a, b in zip(t[ok], series[ok])]
        d.line(pts, fill=(20, 20, 120), width=2)
    return img
