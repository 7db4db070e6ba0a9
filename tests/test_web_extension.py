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


def test_rejected_value_is_reverted_and_startup_syncs(tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node (JavaScript) not installed")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "extensions" / "vramguard").mkdir(parents=True)
    (tmp_path / "scripts" / "app.js").write_text(APP)
    (tmp_path / "scripts" / "api.js").write_text(API)
    shutil.copy(JS, tmp_path / "extensions" / "vramguard" / "vramguard.js")
    (tmp_path / "driver.mjs").write_text(DRIVER)
    (tmp_path / "package.json").write_text('{"type": "module"}')
    r = subprocess.run([node, "driver.mjs"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["afterSetup"] == 70 and d["postsAtSetup"] == 0      # the dialog shows what Python uses
    assert d["afterReject"] == 70                                 # reverted after the 400
    posts = [c for c in d["calls"] if c[0] == "post"]
    assert posts == [["post", "vramguard.GCThreshold", 150], ["post", "vramguard.GCThreshold", 40]]  # no loop
    assert d["final"] == 40 and d["python"] == 40
    assert any(c[0] == "toast" and "0..100" in c[1] for c in d["calls"])
