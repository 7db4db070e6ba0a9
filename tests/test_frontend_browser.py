"""The pack in ComfyUI 0.30.0's real frontend (comfyui-frontend-package 1.47.12), in a headless
Chromium driven over the DevTools protocol (tests/comfyui/cdp.py: no chromedriver, no PyPI
package, only Debian's `chromium`).

Checks: vramguard.js loads with no console error, exception or failed load that names it; the
monitor sits in the top menu bar, one bar per GPU plus RAM, takes the pointer, shows a tooltip
on hover and opens the VRAM bottom panel on click; the settings dialog's "vramguard" section
lists every setting of the schema with the values Python uses, and a toggle clicked and a number
typed there reach Python and ComfyUI's store; every example_workflows/*.json is
listed in the templates browser and loads from it with every node type registered; the node
library's search finds every vramguard node.  The GPUs are tests/fakelibs/fake_nvml.c's.

Runs when VRAMGUARD_BROWSER=1 (CI; then a missing Chromium or ComfyUI fails it) or when a
Chromium is on PATH and VRAMGUARD_COMFYUI names a ComfyUI (`eval "$(bash scripts/comfyui_env.sh)"`);
skipped with the reason otherwise.
"""
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "comfyui"))
from cdp import find_chromium  # noqa: E402

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
REQUIRED = os.environ.get("VRAMGUARD_BROWSER") == "1"
FRONTEND_VERSION = "1.47.12"  # what ComfyUI 0.30.0's requirements.txt installs


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"VRAMGUARD_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


if not find_chromium():
    _unavailable("no chromium on PATH (Debian: apt-get install chromium)")
if not os.environ.get("VRAMGUARD_COMFYUI") or not Path(os.environ["VRAMGUARD_COMFYUI"], "main.py").is_file():
    _unavailable("VRAMGUARD_COMFYUI does not name a ComfyUI checkout (eval \"$(bash scripts/comfyui_env.sh)\")")

from frontend import FAKE_GPUS, Frontend  # noqa: E402


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    f = Frontend(tmp_path_factory.mktemp("browser"))
    yield f
    f.close()


def _json(ui, path):
    with urllib.request.urlopen(ui.url + path, timeout=30) as r:
        return json.loads(r.read())


def test_frontend_version_and_extension_loaded(ui):
    assert ui.page.eval("window.__COMFYUI_FRONTEND_VERSION__") == FRONTEND_VERSION
    assert "/extensions/vramguard/vramguard.js" in _json(ui, "/extensions")
    # registered: its command and bottom panel tab are in the frontend's stores
    ui.page.wait_for("app.extensionManager.command.commands.some((c) => c.id === 'vramguard.ShowMemoryPanel')", 30)
    time.sleep(3)  # a few monitor readings
    assert not ui.errors(), json.dumps(ui.errors(), indent=1)[:4000]


def test_monitor_in_the_top_bar(ui):
    page = ui.page
    n_bars = len(FAKE_GPUS) + 1
    page.wait_for(f"document.querySelectorAll('#vramguard-monitor [data-vg=bar]').length === {n_bars}", 30)
    info = page.eval("""(() => {
      const el = document.getElementById('vramguard-monitor'), cs = getComputedStyle(el);
      const slot = app.menu?.settingsGroup?.element?.parentElement;
      return { inSlot: !!slot && slot.contains(el), position: cs.position, display: cs.display,
               pointer: cs.pointerEvents, rect: el.getBoundingClientRect().toJSON(), vw: innerWidth,
               bars: [...el.querySelectorAll(':scope > [data-vg=bar]')].map((b) => ({ key: b.dataset.key,
                 text: b.textContent, rect: b.getBoundingClientRect().toJSON(),
                 parts: [...b.querySelectorAll('[data-vg]')].map((p) => p.dataset.vg) })) };
    })()""")
    assert info["inSlot"], "the monitor is not in the top menu bar's extension slot"
    # (inline-flex computes to flex inside the bar's flex container)
    assert info["position"] != "fixed" and info["display"].endswith("flex") and info["pointer"] != "none", info
    r = info["rect"]
    assert r["top"] >= 0 and r["bottom"] <= 120 and r["right"] <= info["vw"] and r["width"] > 100, r
    bars = info["bars"]
    assert [b["key"] for b in bars] == ["gpu0", "gpu1", "ram"], bars
    assert bars[0]["text"].startswith("GPU0") and bars[2]["text"].startswith("RAM"), bars
    for b in bars[:2]:
        assert {"used", "reserve", "peak", "budget"} <= set(b["parts"]), b
    # side by side, apart (an element whose inline-flex was lost runs its labels together)
    for a, b in zip(bars, bars[1:]):
        assert b["rect"]["left"] >= a["rect"]["right"] + 3, (a, b)
        assert abs(b["rect"]["top"] - a["rect"]["top"]) < 2, (a, b)

    # hover: our tooltip, below the monitor, inside the window, says what and why
    page.mouse(r["x"] + r["width"] / 2, r["y"] + r["height"] / 2)
    tip = page.wait_for("(() => { const t = document.getElementById('vramguard-monitor-tip');"
                        "return t && getComputedStyle(t).display !== 'none' &&"
                        "{ text: t.textContent, rect: t.getBoundingClientRect().toJSON(), vw: innerWidth, vh: innerHeight }; })()",
                        10)
    for word in ("GPU 0", "GPU 1", "this process", "reserve", "budget", "peak", "RAM:", "pinned", "click"):
        assert word in tip["text"], (word, tip["text"])
    t = tip["rect"]
    assert t["top"] >= r["bottom"] and t["left"] >= 0 and t["right"] <= tip["vw"] and t["bottom"] <= tip["vh"], t
    page.mouse(5, 500)
    page.wait_for("getComputedStyle(document.getElementById('vramguard-monitor-tip')).display === 'none'", 10)

    # click: the VRAM bottom panel tab with the per-device table
    page.click(r["x"] + r["width"] / 2, r["y"] + r["height"] / 2)
    rows = page.wait_for("(() => { const t = document.querySelector('table[data-vg=devices]');"
                         "return t && t.offsetParent !== null && t.rows.length; })()", 15)
    assert rows == 1 + len(FAKE_GPUS) + 1, rows  # header, GPUs, host RAM
    # a click does not take the focus (a dialog closing would give it back, tooltip and all)
    assert page.eval("document.activeElement?.id") != "vramguard-monitor"
    page.eval("app.extensionManager.command.execute('Workspace.ToggleBottomPanelTab.vramguard-memory')")
    # keyboard: focus shows the tooltip, blur hides it
    page.eval("document.getElementById('vramguard-monitor').focus()")
    page.wait_for("getComputedStyle(document.getElementById('vramguard-monitor-tip')).display === 'block'", 10)
    page.eval("document.getElementById('vramguard-monitor').blur()")
    page.wait_for("getComputedStyle(document.getElementById('vramguard-monitor-tip')).display === 'none'", 10)
    assert not ui.errors(), ui.errors()


def test_settings_section(ui):
    schema = _json(ui, "/vramguard/settings/schema")
    values = _json(ui, "/vramguard/settings")
    ui.open_settings()
    try:
        shown = ui.page.eval("""(() => {
          const d = document.querySelector('[role=dialog]');
          return [...d.querySelectorAll('[id^="vramguard."]')].filter((e) => !e.id.endsWith('-label'))
            .map((e) => ({ id: e.id, visible: e.offsetParent !== null,
                           label: document.getElementById(e.id + '-label')?.textContent.trim() }));
        })()""")
        ids = list(dict.fromkeys(s["id"] for s in shown))
        assert ids == [s["id"] for s in schema], ids  # every setting, in the schema's order
        labels = {s["id"]: s["label"] for s in shown if s["label"]}
        for s in schema:
            assert labels.get(s["id"]) == s["name"], (s["id"], labels.get(s["id"]))
        ui_values = ui.page.eval(f"Object.fromEntries({json.dumps([s['id'] for s in schema])}"
                                 ".map((id) => [id, app.extensionManager.setting.get(id)]))")
        assert ui_values == {s["id"]: values[s["id"]] for s in schema}
    finally:
        ui.escape()


def test_settings_changed_in_the_dialog_reach_python(ui):
    """A toggle clicked and a number typed in the dialog: Python applies them at once (the pack's
    route) and ComfyUI stores them (its own /settings)."""
    before = _json(ui, "/vramguard/settings")
    low, gc = before["vramguard.LowVRAM"], before["vramguard.GCThreshold"]
    new_gc = 65 if gc != 65 else 60
    field = "document.querySelector('[id=\"vramguard.GCThreshold\"] input')"

    def set_gc(value):
        ui.page.click(*ui.center(field))
        ui.page.press("a", 65, modifiers=2)  # Ctrl+A
        ui.page.type(str(value))
        ui.page.press("Enter", 13)

    ui.open_settings()
    try:
        ui.page.click(*ui.center("document.getElementById('vramguard.LowVRAM')"))
        set_gc(new_gc)
        deadline = time.time() + 10
        while time.time() < deadline:
            now = _json(ui, "/vramguard/settings")
            if now["vramguard.LowVRAM"] == (not low) and now["vramguard.GCThreshold"] == new_gc:
                break
            time.sleep(0.25)
        assert (now["vramguard.LowVRAM"], now["vramguard.GCThreshold"]) == (not low, new_gc), now
        assert _json(ui, "/settings/vramguard.GCThreshold") == new_gc
        assert _json(ui, "/settings/vramguard.LowVRAM") is (not low)
        # and back, the same way
        ui.page.click(*ui.center("document.getElementById('vramguard.LowVRAM')"))
        set_gc(int(gc))
        time.sleep(1)
        now = _json(ui, "/vramguard/settings")
        assert (now["vramguard.LowVRAM"], now["vramguard.GCThreshold"]) == (low, gc), now
    finally:
        ui.escape()
    assert not ui.errors(), ui.errors()


def _overlaps(rects: list) -> list:
    """Pairs of [title, x, y, w, h] boxes (title bar included) that overlap."""
    out = []
    for i, (na, xa, ya, wa, ha) in enumerate(rects):
        for nb, xb, yb, wb, hb in rects[i + 1:]:
            if xa < xb + wb and xb < xa + wa and ya < yb + hb and yb < ya + ha:
                out.append((na, nb, [round(v) for v in (xa, ya, wa, ha)], [round(v) for v in (xb, yb, wb, hb)]))
    return out


def test_example_workflows_load_from_the_templates_browser(ui):
    paths = sorted((REPO / "example_workflows").glob("*.json"))
    assert len(paths) >= 4
    for path in paths:
        ui.load_template(path.stem)
        want = sorted(n["type"] for n in json.loads(path.read_text())["nodes"])
        ui.page.wait_for(f"app.graph.nodes.length === {len(want)}", 15)
        nodes = ui.graph_nodes()
        assert sorted(t for t, _, _ in nodes) == want, (path.name, nodes)
        missing = [t for t, registered, cls in nodes if not registered or cls == "LGraphNode"]
        assert not missing, f"{path.name}: node types the frontend does not know: {missing}"
        overlaps = _overlaps(ui.page.eval("app.graph.nodes.map((n) => [n.title, ...n.boundingRect])"))
        assert not overlaps, f"{path.name}: nodes drawn over each other (as the frontend sizes them): {overlaps}"
    # the check above sees a missing type: the frontend keeps an unknown node as a bare LGraphNode
    wf = json.loads(paths[0].read_text())
    wf["nodes"][0]["type"] = "VramguardNoSuchNode"
    ui.page.eval(f"app.loadGraphData({json.dumps(wf)})")
    ui.page.wait_for("app.graph.nodes.some((n) => n.type === 'VramguardNoSuchNode')", 15)
    assert ["VramguardNoSuchNode", False, "LGraphNode"] in ui.graph_nodes()
    ui.escape()
    assert not ui.errors(), ui.errors()


def test_nodes_in_the_node_library_search(ui):
    info = _json(ui, "/object_info")
    names = sorted(v["display_name"] for v in info.values() if v.get("category") == "vramguard")
    assert len(names) >= 10
    ui.page.eval("app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library')")
    search = "document.querySelector('.side-bar-panel input[placeholder^=\"Search\"], input[placeholder=\"Search...\"]')"
    ui.page.wait_for(f"!!{search}", 15)
    ui.page.eval(f"{search}.focus()")
    ui.page.key_text("vramguard")
    listed = ui.page.wait_for(f"""(() => {{
      const texts = [...document.querySelectorAll('.side-bar-panel *, [class*=sidebar] *')]
        .filter((e) => e.children.length === 0).map((e) => e.textContent.trim());
      const want = {json.dumps(names)};
      return want.every((n) => texts.includes(n)) && texts;
    }})()""", 20)
    assert "vramguard" in listed  # the category folder
    ui.page.eval("app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library')")
