"""Screenshots of the pack in ComfyUI 0.30.0's real frontend (comfyui-frontend-package 1.47.12),
taken in a headless Chromium by the machinery of tests/test_frontend_browser.py
(tests/comfyui/frontend.py), so that the README's pictures stay true:

    eval "$(bash scripts/comfyui_env.sh)"
    .venv/bin/python scripts/screenshots.py [--out docs/images] [--no-thumbnails] [--no-timeline]

docs/images/nodes.png      the "tiled upscale vs core" example workflow, loaded from the templates browser
docs/images/settings.png   the settings dialog's vramguard section
docs/images/monitor.png    the monitor in the top menu bar, its tooltip shown (hover)
docs/images/templates.png  the templates browser's "vramguard" section: the example workflows
docs/images/memory_timeline_node.png   the Memory Timeline node's output, from the "GC checkpoints +
                           memory timeline" example run on the real-host suite's tiny models (CPU)
example_workflows/NAME.jpg the templates browser's thumbnail of each example (a picture of its graph)

The GPUs in the monitor are tests/fakelibs/fake_nvml.c's two stand-ins (24 and 12 GB; this
machine has none): the figures are FAKE_NVML_* values, RAM is the machine's.  ComfyUI runs with
--cpu.  Needs Debian's `chromium`, and VRAMGUARD_COMFYUI / VRAMGUARD_COMFYUI_PYTHON.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "comfyui"))

from cdp import find_chromium  # noqa: E402

MAX_BYTES = 300_000
# a clean canvas: no minimap over the nodes, no LiteGraph info text, text at every zoom
SETTINGS = {"Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False, "LiteGraph.Canvas.MinFontSizeForLOD": 0}


def _check_size(path: Path) -> None:
    n = path.stat().st_size
    if n > MAX_BYTES:
        raise SystemExit(f"{path}: {n} bytes, over {MAX_BYTES}: make the clip smaller")
    print(f"wrote {path} ({n // 1024} KB)")


def _union(a: dict, b: dict, pad: float, vw: float, vh: float) -> dict:
    x0, y0 = max(0, min(a["x"], b["x"]) - pad), max(0, min(a["y"], b["y"]) - pad)
    x1 = min(vw, max(a["x"] + a["width"], b["x"] + b["width"]) + pad)
    y1 = min(vh, max(a["y"] + a["height"], b["y"] + b["height"]) + pad)
    return {"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0}


def monitor(f, out: Path) -> None:
    page = f.page
    page.wait_for("document.querySelectorAll('#vramguard-monitor [data-vg=bar]').length === 3", 30)
    time.sleep(2.5)  # a second reading: the peak-hold ticks
    # the start-up workflow's missing-model toast would sit beside the tooltip
    page.eval("document.querySelectorAll('.p-toast-close-button, [data-pc-section=closebutton]')"
              ".forEach((b) => b.closest('.p-toast') && b.click())")
    time.sleep(0.5)
    r = f.rect("#vramguard-monitor")
    page.mouse(r["x"] + r["width"] / 2, r["y"] + r["height"] / 2)
    page.wait_for("getComputedStyle(document.getElementById('vramguard-monitor-tip')).display !== 'none'", 10)
    time.sleep(0.3)
    bar = page.eval("document.getElementById('vramguard-monitor').parentElement.closest('.actionbar, [class*=actionbar]')"
                    "?.getBoundingClientRect().toJSON() || null") or r
    clip = _union(bar, f.rect("#vramguard-monitor-tip"), 10, *page.eval("[innerWidth, innerHeight]"))
    page.screenshot(str(out), clip, scale=1.5)  # the bars' 10 px labels, legible
    page.mouse(5, 500)
    _check_size(out)


def settings(f, out: Path) -> None:
    f.open_settings()
    time.sleep(0.8)
    f.page.screenshot(str(out), f.rect("[role=dialog]"))
    f.escape()
    _check_size(out)


def templates(f, out: Path) -> None:
    """The templates browser's vramguard section (thumbnails as committed when this run started)."""
    f.open_templates()
    f.page.wait_for("(() => { const im = [...document.querySelectorAll('[data-testid^=template-workflow-] img')];"
                    "return im.length >= 4 && im.every((i) => i.complete && i.naturalWidth > 0); })()", 20)
    time.sleep(1)
    f.page.screenshot(str(out), f.rect("[role=dialog]"), scale=0.8)
    f.escape()
    _check_size(out)


def load(f, name: str) -> None:
    f.load_template(name)
    f.page.eval("app.canvas.setDirty(true, true)")
    time.sleep(1.5)  # headless Chromium draws the canvas at a few frames per second


def nodes(f, out: Path) -> None:
    load(f, "tiled_upscale_vs_core")
    f.page.screenshot(str(out), f.graph_rect())
    _check_size(out)


def thumbnails(f, folder: Path) -> None:
    """640x480 JPEGs: the graph, fitted and centred on the canvas colour (the cards are about 4:3)."""
    from PIL import Image

    for path in sorted(folder.glob("*.json")):
        load(f, path.stem)
        png = folder / f"{path.stem}.tmp.png"
        f.page.screenshot(str(png), f.graph_rect(8))
        with Image.open(png) as im:
            im = im.convert("RGB")
            k = min(640 / im.width, 480 / im.height, 1.0)
            im = im.resize((max(1, round(im.width * k)), max(1, round(im.height * k))), Image.LANCZOS)
            card = Image.new("RGB", (640, 480), im.getpixel((1, 1)))
            card.paste(im, ((640 - im.width) // 2, (480 - im.height) // 2))
            out = folder / f"{path.stem}.jpg"
            card.save(out, quality=82, optimize=True)
        png.unlink()
        _check_size(out)


def timeline(work: Path, out: Path) -> None:
    """The Memory Timeline node's output from a real run of the example on tiny models."""
    from frontend import host_module, pack_base
    from workflow_api import load as load_wf, to_prompt

    R = host_module()
    models = work / "models"
    r = subprocess.run([R.PY, str(R.HELPERS / "make_models.py"), R.ROOT, str(models)], capture_output=True,
                       text=True, cwd=R.ROOT)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    c = R.Comfy(pack_base(work / "run_base", models))  # no fake NVML here: a plain CPU run
    try:
        wf = load_wf(REPO / "example_workflows" / "gc_checkpoints_memory_timeline.json")
        prompt = R._tiny_models(to_prompt(wf, c.get("/object_info")))
        entry = c.run(prompt)
        tl = next(nid for nid, n in prompt.items() if n["class_type"] == "VramguardMemoryTimeline")
        viewer = next(nid for nid, n in prompt.items()
                      if n["class_type"] in ("PreviewImage", "SaveImage") and n["inputs"]["images"][0] == tl)
        im = entry["outputs"][viewer]["images"][0]
        with urllib.request.urlopen(f"{c.url}/view?filename={im['filename']}&subfolder={im['subfolder']}"
                                    f"&type={im['type']}", timeout=30) as resp:
            out.write_bytes(resp.read())
    finally:
        c.stop()
    _check_size(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    ap.add_argument("--no-thumbnails", action="store_true", help="leave example_workflows/*.jpg alone")
    ap.add_argument("--no-timeline", action="store_true", help="skip the Memory Timeline run")
    args = ap.parse_args()
    if not find_chromium():
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    if not Path(os.environ.get("VRAMGUARD_COMFYUI", "/nonexistent"), "main.py").is_file():
        raise SystemExit('VRAMGUARD_COMFYUI is not a ComfyUI checkout: eval "$(bash scripts/comfyui_env.sh)"')
    from frontend import Frontend

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vg_shots_"))
    try:
        f = Frontend(work / "ui", 1400, 900, placeholders=True, settings=SETTINGS)
        try:
            nodes(f, args.out / "nodes.png")
            monitor(f, args.out / "monitor.png")
            settings(f, args.out / "settings.png")
            templates(f, args.out / "templates.png")
            if not args.no_thumbnails:
                thumbnails(f, REPO / "example_workflows")
            # the clone ComfyUI serves was copied before this run wrote the thumbnails
            errors = [e for e in f.errors() if not ("/api/workflow_templates/" in e["url"] and e["url"].endswith(".jpg"))]
            if errors:
                raise SystemExit("errors in the browser console:\n" + json.dumps(errors, indent=1)[:4000])
        finally:
            f.close()
        if not args.no_timeline:
            timeline(work, args.out / "memory_timeline_node.png")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
