"""timeline.png answers "where did memory go, per stage, and how close to the limit was I" (issue
15): curves with a legend, a stage lane instead of bands over the plot, stage rows with peaks in
units, the total - reserve and budget lines, GC events and tile boundaries.  The picture is
checked by its pixels (colours at the places the data puts them) and by the text drawn."""
import numpy as np
import pytest

pytest.importorskip("PIL")
from PIL import ImageDraw  # noqa: E402

from vramguard import timeline_png as tp  # noqa: E402

G = 2 ** 30


@pytest.fixture
def texts(monkeypatch):
    seen = []
    orig = ImageDraw.ImageDraw.text

    def spy(self, xy, text, *a, **k):
        seen.append(str(text))
        return orig(self, xy, text, *a, **k)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", spy)
    return seen


def gpu_run():
    t = np.linspace(100.0, 110.0, 500)
    used = np.where(t < 103, 4 * G, np.where(t < 108, 9 * G, 5 * G)).astype(np.float64)
    proc = used - 2 * G
    rss = np.full_like(t, 3 * G)
    stages = [
        {"name": "text_encode", "start": 100.0, "end": 103.0, "peak_used": 4 * G, "peak_process": 2 * G, "peak_rss": 3 * G},
        {"name": "unet", "start": 103.0, "end": 108.0, "peak_used": 9 * G, "peak_process": 7 * G, "peak_rss": 3 * G},
        {"name": "vae_decode", "start": 108.0, "end": 110.0, "peak_used": 5 * G, "peak_process": 3 * G, "peak_rss": 3 * G},
    ]
    return {"t": t, "used": used, "process_used": proc, "rss": rss}, stages


def _cols(a, color):
    ys, xs = np.where((a == color).all(-1))
    return ys, xs


def test_gpu_picture_has_everything_and_no_band_over_the_plot(texts):
    tl, stages = gpu_run()
    img = tp.render_timeline(tl, stages, width=960, height=440, host=False, total=12 * G, reserve=1 * G,
                             budget=6 * G, budget_at=101.0, gc_events=[(108.05, 3 * G, "unet")],
                             tiles=[104.0, 105.0, 106.0, 107.0])
    a = np.asarray(img)
    assert a.shape == (440, 960, 3)
    joined = "\n".join(texts)
    # legend: what each line is, and why RSS is not held against the device budget
    for want in ("device used (all processes)", "this process on the device", "not in the device budget",
                 "total - reserve = 11.00 GiB (reserve 1.00 GiB kept free)", "budget 6.00 GiB on top of device use",
                 "GC collection", "tile finished (4)", "GC freed 3.00 GiB"):
        assert want in joined, (want, texts)
    # one row per stage, with units
    assert "unet: 3.00-8.00 s, peak device used 9.00 GiB, this process 7.00 GiB, RSS 3.00 GiB" in texts
    assert "text_encode" in joined and "vae_decode" in joined
    # lines at the right heights: total - reserve at 11 GiB and budget at 4 + 6 = 10 GiB, 1 GiB apart
    ry, _ = _cols(a, tp.C_RESERVE)
    by, _ = _cols(a, tp.C_BUDGET)
    plot_r = ry[ry < 380]
    plot_b = by[by < 380]
    assert len(plot_r) > 500 and len(plot_b) > 200
    assert plot_b.mean() > plot_r.mean()  # the budget level (10 GiB) is below total - reserve (11 GiB)
    # GC line at t=8.05 s, tile ticks at 4..7 s
    _, gx = _cols(a, tp.C_GC)
    left, right = 78, 960 - 16
    x_gc = left + 8.05 / 10 * (right - left)
    assert any(abs(x - x_gc) <= 2 for x in gx)
    _, tx = _cols(a, tp.C_TILE)
    for k in (4, 5, 6, 7):
        assert any(abs(x - (left + k / 10 * (right - left))) <= 2 for x in tx), k
    # no band over the plot: a row through the middle of the plot is mostly background/grid
    mid = a[200, left + 5:right - 5]
    bg = ((mid >= 200).all(-1)).mean()
    assert bg > 0.9, bg


def test_host_picture_says_host_and_puts_the_budget_on_the_rss(texts):
    t = np.linspace(0.0, 5.0, 200)
    tl = {"t": t, "used": np.full_like(t, 2 * G), "process_used": np.full_like(t, 300 << 20),
          "rss": np.full_like(t, 300 << 20)}
    st = [{"name": "upscale", "start": 0.0, "end": 5.0, "peak_used": 2 * G, "peak_process": 300 << 20,
           "peak_rss": 300 << 20}]
    img = tp.render_timeline(tl, st, host=True, total=24 * G, reserve=0, budget=192 << 20, budget_at=0.0)
    joined = "\n".join(texts)
    assert "no GPU: the budget is host RAM" in joined and "host RAM used (whole machine)" in joined
    assert "budget 192.00 MiB on top of this process's RSS" in joined
    assert "far above the plot" in joined                       # 24 GiB would squash the curves
    assert "this process on the device" not in joined           # the host sampler's process line is the RSS
    a = np.asarray(img)
    by, _ = _cols(a, tp.C_BUDGET)
    # the budget level (300 + 192 MiB) sits well below the 2 GiB machine line
    uy, _ = _cols(a, tp.C_USED)
    assert by[by < 380].mean() > uy[uy < 380].mean() + 30


@pytest.mark.parametrize("size", [(200, 120), (960, 360), (4096, 2048)])
def test_any_node_size_renders(size):
    tl, stages = gpu_run()
    img = tp.render_timeline(tl, stages * 5, width=size[0], height=size[1], host=False, total=12 * G, reserve=G)
    assert img.size == size


def test_empty_and_bad_sizes(texts):
    tp.render_timeline({}, [], host=True)
    assert any("no samples yet" in x for x in texts)
    with pytest.raises(ValueError, match="timeline size"):
        tp.render_timeline({}, [], width=10)


def test_gc_events_from_jsonl(tmp_path):
    import json
    import time

    p = tmp_path / "gc.jsonl"
    now = time.time()
    p.write_text('{"vramguard": "gc log"}\n' + json.dumps({"ts": now, "saved_bytes": 5, "fn": "unet"}) + "\nnot json\n")
    (ev,) = tp.gc_events_from_jsonl(str(p))
    assert abs(ev[0] - time.monotonic()) < 5 and ev[1:] == (5, "unet")
    assert tp.gc_events_from_jsonl(str(tmp_path / "missing")) == []
