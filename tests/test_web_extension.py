"""nodes/web/vramguard.js under node with a fake ComfyUI frontend: a value our route rejects
(HTTP 400) is reverted in the dialog (so ComfyUI stores the old value again), without a loop;
at start-up the dialog is set to what Python uses."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parent.parent / "nodes" / "web" / "vramguard.js"

APP = r"""
export const calls = [];
const store = globalThis.__store;
export const app = {
  registerExtension(ext) { globalThis.__ext = ext; },
  extensionManager: {
    toast: { add(t) { calls.push(["toast", t.detail]); } },
    setting: {
      get(id) { return store[id]; },
      // like the frontend: store (ComfyUI POSTs /settings/{id}), then call onChange(new, old)
      async set(id, value) {
        const old = store[id];
        store[id] = value;
        calls.push(["store", id, value]);
        const s = globalThis.__ext.settings.find((x) => x.id === id);
        if (s && s.onChange) await s.onChange(value, old);
      },
    },
  },
};
"""

API = r"""
import { calls } from "./app.js";
const py = globalThis.__python;
const json = (status, body) => ({ ok: status < 300, status, json: async () => body });
export const api = {
  addEventListener() {},
  async fetchApi(path, opts = {}) {
    if (path === "/vramguard/settings/schema")
      return json(200, Object.keys(py).map((id) => ({ id, name: id, type: "number", defaultValue: py[id] })));
    if (path === "/vramguard/settings" && opts.method === "POST") {
      const b = JSON.parse(opts.body);
      calls.push(["post", b.id, b.value]);
      if (b.value > 100) return json(400, { error: `${b.id} must be 0..100, got ${b.value}` });
      py[b.id] = b.value;
      return json(200, { ...py });
    }
    if (path === "/vramguard/settings") return json(200, { ...py });
    return json(200, {});
  },
};
"""

DRIVER = r"""
globalThis.document = { visibilityState: "hidden", body: { appendChild() {} }, addEventListener() {},
  createElement: () => ({ style: {} }) };
globalThis.__python = { "vramguard.GCThreshold": 70, "vramguard.MonitorRefresh": 2 };
// ComfyUI's file holds a value Python rejected at load (it used the default 70 instead)
globalThis.__store = { "vramguard.GCThreshold": 500 };
const { calls, app } = await import("./scripts/app.js");
await import("./extensions/vramguard/vramguard.js");
await globalThis.__ext.setup();
const afterSetup = globalThis.__store["vramguard.GCThreshold"];
const postsAtSetup = calls.filter((c) => c[0] === "post").length;
// the user types 150: ComfyUI stores it, our route says 400, the dialog goes back to 70
await app.extensionManager.setting.set("vramguard.GCThreshold", 150);
await new Promise((r) => setTimeout(r, 50));
const afterReject = globalThis.__store["vramguard.GCThreshold"];
// a valid change goes through
await app.extensionManager.setting.set("vramguard.GCThreshold", 40);
await new Promise((r) => setTimeout(r, 50));
console.log(JSON.stringify({ afterSetup, postsAtSetup, afterReject, final: globalThis.__store["vramguard.GCThreshold"],
  python: globalThis.__python["vramguard.GCThreshold"], calls }));
"""


def run_extension(tmp_path, app_js: str, api_js: str, driver: str, *args: str) -> dict:
    """vramguard.js under node beside stand-ins of the frontend's scripts/app.js and api.js; the
    driver's last stdout line, as JSON."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node (JavaScript) not installed")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "extensions" / "vramguard").mkdir(parents=True)
    (tmp_path / "scripts" / "app.js").write_text(app_js)
    (tmp_path / "scripts" / "api.js").write_text(api_js)
    shutil.copy(JS, tmp_path / "extensions" / "vramguard" / "vramguard.js")
    (tmp_path / "driver.mjs").write_text(driver)
    (tmp_path / "package.json").write_text('{"type": "module"}')
    r = subprocess.run([node, "driver.mjs", *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_rejected_value_is_reverted_and_startup_syncs(tmp_path):
    d = run_extension(tmp_path, APP, API, DRIVER)
    assert d["afterSetup"] == 70 and d["postsAtSetup"] == 0      # the dialog shows what Python uses
    assert d["afterReject"] == 70                                 # reverted after the 400
    posts = [c for c in d["calls"] if c[0] == "post"]
    assert posts == [["post", "vramguard.GCThreshold", 150], ["post", "vramguard.GCThreshold", 40]]  # no loop
    assert d["final"] == 40 and d["python"] == 40
    assert any(c[0] == "toast" and "0..100" in c[1] for c in d["calls"])


# ----------------------------------------------------------------------------- the monitor
MON_APP = r"""
export const app = {
  registerExtension(ext) { globalThis.__ext = ext; },
  menu: globalThis.__menu,
  extensionManager: {
    setting: { get() { return undefined; }, async set() {} },
    command: { execute(id) { globalThis.__executed.push(id); } },
  },
};
"""

MON_API = r"""
const listeners = {};
export const api = {
  addEventListener(name, fn) { listeners[name] = fn; },
  emit(name, detail) { listeners[name]({ detail }); },
  async fetchApi(path, opts = {}) {
    globalThis.__fetched.push([path, opts.body]);
    const body = path === "/vramguard/settings" ? { "vramguard.MonitorRefresh": 2, "vramguard.MonitorWarn": 90 } : [];
    return { ok: true, status: 200, json: async () => body };
  },
};
"""

# a minimal DOM: what the monitor touches
MON_DRIVER = r"""
class El {
  constructor(tag) { this.tag = tag; this.style = {}; this.attrs = {}; this.innerHTML = ""; this.title = "";
    this.children = []; this.handlers = {}; this.isConnected = true; }
  setAttribute(k, v) { this.attrs[k] = v; }
  addEventListener(k, fn) { this.handlers[k] = fn; }
  appendChild(c) { this.children.push(c); c.parent = this; }
  before(c) { globalThis.__before.push(c); c.parent = "topbar"; }
}
globalThis.__before = []; globalThis.__fetched = []; globalThis.__executed = [];
globalThis.document = { visibilityState: "visible", body: new El("body"), addEventListener() {},
  createElement: (t) => new El(t) };
const MODE = process.argv[2];
// app.menu as the frontend builds it: the settings group's element sits in the menu's element
// (which the frontend mounts in the top bar later)
const group = new El("div"); group.parentNode = new El("div"); group.isConnected = false;
globalThis.__menu = MODE === "topbar" ? { settingsGroup: { element: group } } : undefined;
const { app } = await import("./scripts/app.js");
const { api } = await import("./scripts/api.js");
await import("./extensions/vramguard/vramguard.js");
const ext = globalThis.__ext;
await ext.setup();
const el = MODE === "topbar" ? globalThis.__before[0] : document.body.children[0];
const G = 2 ** 30;
const full = {
  devices: [
    { index: 0, name: "RTX A", source: "nvml", total: 24 * G, used: 10 * G, process_used: 8 * G, evictable: 2 * G,
      reserve: 1.5 * G, cap: 0, budget: 10.5 * G, largest_free_block: 3 * G, inactive_split: 0.25 * G,
      learned: { reserve: 1.5 * G, reason: "other apps peaked at 1.50 GB in the last 600 s" } },
    { index: 1, name: "RTX B", source: "nvml", total: 12 * G, used: 11.5 * G, process_used: 11 * G, evictable: 0,
      reserve: 1 * G, cap: 0, budget: 0 },
  ],
  ram: { total: 64 * G, used: 20 * G, available: 44 * G, process_rss: 6 * G, pinned: 2 * G, cgroup_limit: null },
  reserve_setting: 1 * G, last_stage: { name: "vae_decode", peak_used: 11 * G, peak_rss: 5 * G, seconds: 1.5 },
  stages: [{ name: "unet", peak_used: 12 * G, peak_rss: 5 * G, seconds: 3 }, { name: "vae_decode", peak_used: 11 * G, peak_rss: 5 * G, seconds: 1.5 }],
  ledger: { joined: true, participants: 2, others_planned: { "0": 3 * G, "1": 0 },
            rows: [{ pid: 4242, self: true, devices: { "0": { used: 8 * G, planned: 0 } } },
                   { pid: 4343, self: false, devices: { "0": { used: 1 * G, planned: 4 * G } } }] },
  warn: 90, gpu_reason: null,
};
api.emit("vramguard.monitor", full);
const first = { html: el.innerHTML, title: el.attrs["aria-description"] };  // the tooltip's text
// a lower reading: the peak-hold marker stays at the earlier peak
api.emit("vramguard.monitor", { ...full, devices: [{ ...full.devices[0], used: 4 * G }, full.devices[1]] });
const held = el.innerHTML;
// an old server (0.1 payload: fewer fields) and no GPU
api.emit("vramguard.monitor", { devices: [], ram: { total: 8 * G, used: 2 * G }, warn: 90,
  gpu_reason: "unavailable: cannot load libnvidia-ml.so.1", last_stage: null });
const nogpu = { html: el.innerHTML, title: el.attrs["aria-description"] };
// the bottom panel tab renders the details
const tab = ext.bottomPanelTabs.find((t) => t.type === "custom");
api.emit("vramguard.monitor", full);
const panel = new El("div");
tab.render(panel);
el.handlers.click && el.handlers.click();
console.log(JSON.stringify({ placement: el.parent === "topbar" ? "topbar" : "floating", style: el.style.cssText,
  first, held, nogpu, panel: panel.innerHTML, tab: { id: tab.id, title: tab.title }, executed: globalThis.__executed,
  menuCommands: ext.menuCommands, commands: (ext.commands || []).map((c) => c.id) }));
process.exit(0);  // the monitor's keep-alive timer would keep node running
"""


def _run_monitor(tmp_path, mode):
    return run_extension(tmp_path, MON_APP, MON_API, MON_DRIVER, mode)


def _attr_pct(html, vg, key=None):
    """left/width % of the first data-vg=<vg> span (inside bar <key> when given)."""
    import re

    if key is not None:
        html = html[html.index(f'data-key="{key}"'):]
    m = re.search(rf'data-vg="{vg}" style="([^"]*)"', html)
    assert m, f"no {vg} in {html[:300]}"
    return m.group(1)


def test_monitor_in_the_top_menu_bar_is_a_real_element(tmp_path):
    """Fails on 0.1.x: a fixed box at the bottom left (over the sidebar) with pointer-events: none,
    no per-bar reserve/budget/peak/pinned, no bottom panel."""
    d = _run_monitor(tmp_path, "topbar")
    assert d["placement"] == "topbar"                       # before the settings buttons, like Crystools
    assert "pointer-events:none" not in d["style"].replace(" ", "")
    assert "position:fixed" not in d["style"]
    html, title = d["first"]["html"], d["first"]["title"]
    assert html.count('data-vg="bar"') == 3                 # one bar per device + RAM
    assert 'data-key="gpu0"' in html and 'data-key="gpu1"' in html and 'data-key="ram"' in html
    assert html.count('data-vg="reserve"') == 2 and html.count('data-vg="budget"') == 2
    assert html.count('data-vg="peak"') == 3 and 'data-vg="pinned"' in html and 'data-vg="evictable"' in html
    # reserve hatched at the end: 1.5 of 24 GB = 6.25 %
    assert "width:6.3%" in _attr_pct(html, "reserve", "gpu0")
    # the budget line starts at live bytes (used - evictable = 8 of 24 GB) and is 10.5 GB long
    b = _attr_pct(html, "budget", "gpu0")
    assert "left:33.3%" in b and "width:43.8%" in b
    for word in ("reserve", "budget", "free + evictable - reserve", "peak", "largest free block",
                 "pinned", "Set Reserve", "vae_decode", "shared ledger", "other vramguard processes plan 3.00 GB",
                 "learned reserve 1.50 GB: other apps peaked"):
        assert word in title, (word, title)
    # peak hold: used fell from 10 to 4 GB, the marker stays at 10 GB (41.7 %) while the fill is at 16.7 %
    assert "left:calc(41.7% - 1px)" in _attr_pct(d["held"], "peak", "gpu0")
    assert "width:16.7%" in _attr_pct(d["held"], "used", "gpu0")
    # no GPU, an older payload: still renders, and the hover says why
    assert 'data-vg="nogpu"' in d["nogpu"]["html"] and "cannot load libnvidia-ml.so.1" in d["nogpu"]["title"]
    assert d["nogpu"]["html"].count('data-vg="bar"') == 1
    # the details tab and the click that opens it
    assert d["tab"]["title"] == "VRAM" and 'data-vg="devices"' in d["panel"] and "RTX B" in d["panel"]
    assert "unet" in d["panel"] and "pinned 2.00 GB" in d["panel"]
    # who holds what (issue 13): one row per ledger participant, and the learned reserve with its reason
    assert 'data-vg="ledger"' in d["panel"] and "pid 4242 (this one)" in d["panel"]
    assert "pid 4343" in d["panel"] and "1.00 GB / 4.00 GB" in d["panel"]
    assert "learned reserve 1.50 GB: other apps peaked" in d["panel"]
    assert d["executed"] == [f"Workspace.ToggleBottomPanelTab.{d['tab']['id']}"]
    assert d["menuCommands"][0]["commands"] == d["commands"]


def test_monitor_floats_clear_of_the_sidebar_on_old_frontends(tmp_path):
    d = _run_monitor(tmp_path, "floating")
    assert d["placement"] == "floating"
    style = d["style"].replace(" ", "")
    assert "position:fixed" in style and "right:" in style and "left:" not in style
    assert "pointer-events:none" not in style
    assert d["first"]["html"].count('data-vg="bar"') == 3 and "budget" in d["first"]["title"]


def test_js_never_disables_pointer_events():
    assert "pointer-events:none" not in JS.read_text().replace(" ", "")


# ----------------------------------------------------------------------------- payload
def test_payload_shape_with_and_without_newer_fields(monkeypatch):
    import vramguard as vg
    from vramguard_nodes import settings

    vg.simulate_clear()
    vg.simulate("8GB", used="3GB")
    try:
        with vg.stage("vae_decode"):
            pass
        d = settings.payload()
        json.dumps(d)  # JSON-ready
        (g,) = d["devices"]
        for k in ("index", "name", "source", "total", "free", "used", "process_used", "evictable", "reserve", "cap",
                  "budget", "largest_free_block", "inactive_split"):
            assert k in g, k
        assert g["total"] == 8 << 30 and g["used"] == 3 << 30
        assert set(d["ram"]) >= {"total", "used", "available", "process_rss", "pinned"}
        assert d["stages"][-1]["name"] == "vae_decode" and d["last_stage"] == d["stages"][-1]
        assert d["gpu_reason"] is None
        assert g["learned"] is None  # the reserve that learns is off by default
        vg.set_learn_reserve(True)
        try:
            lr = settings.payload()["devices"][0]["learned"]
            want = vg.learned_reserve(0)
            assert lr == {"reserve": want["reserve"], "reason": want["reason"]} and lr["reason"]
        finally:
            vg.set_learn_reserve(False)
        # a build without the ledger's summary/host_pinned (or whose calls raise): still a payload
        monkeypatch.delattr(vg.ledger, "summary", raising=False)
        monkeypatch.setattr(vg.ledger, "host_pinned", lambda: 1 / 0, raising=False)
        d2 = settings.payload()
        assert d2["ledger"] is None and d2["ram"]["pinned"] is None and d2["devices"]
        # fields the snapshot gains later are passed through when present
        snap = vg.snapshots()[0]

        class S:
            def __getattr__(self, k):
                extra = {"largest_free_block": 123, "inactive_split": 45}
                return extra[k] if k in extra else getattr(snap, k)

        monkeypatch.setattr(vg, "snapshots", lambda: [S()])
        g3 = settings.payload()["devices"][0]
        assert g3["largest_free_block"] == 123 and g3["inactive_split"] == 45
    finally:
        vg.simulate_clear()
