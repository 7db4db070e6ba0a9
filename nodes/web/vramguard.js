// vramguard: a "vramguard" section in ComfyUI's settings dialog, and a live VRAM/RAM monitor.
// The settings' ids, defaults and ranges come from Python (GET /vramguard/settings/schema), so
// the dialog and the Python defaults cannot disagree.  Changes go to POST /vramguard/settings,
// which validates them and applies them at once; ComfyUI stores the value itself.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

let schema = [];
try {
  const r = await api.fetchApi("/vramguard/settings/schema");
  if (r.ok) schema = await r.json();
} catch (e) {
  console.warn("vramguard: cannot read the settings schema", e);
}

function toast(detail, severity = "error") {
  const t = app.extensionManager?.toast;
  if (t?.add) t.add({ severity, summary: "vramguard", detail, life: 6000 });
  else console[severity === "error" ? "error" : "log"]("vramguard:", detail);
}

// ComfyUI stores a setting's value itself (POST /settings/{id}) even when our route rejects it.
// So on a 400 the dialog is set back to the old value (ComfyUI then stores that one), and at
// start-up the dialog is set to what Python uses (it replaced invalid saved values by defaults).
let reverting = false;

function getSetting(id) {
  const s = app.extensionManager?.setting;
  if (s?.get) return s.get(id);
  return app.ui?.settings?.getSettingValue?.(id);
}

async function setSetting(id, value) {
  reverting = true;
  try {
    const s = app.extensionManager?.setting;
    if (s?.set) await s.set(id, value);
    else if (app.ui?.settings?.setSettingValueAsync) await app.ui.settings.setSettingValueAsync(id, value);
    else app.ui?.settings?.setSettingValue?.(id, value);
  } catch (e) {
    console.warn("vramguard: cannot set", id, e);
  } finally {
    reverting = false;
  }
}

async function push(id, value, old) {
  try {
    const r = await api.fetchApi("/vramguard/settings", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ id, value }),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      toast(body.error || `setting ${id} rejected (${r.status})`);
      if (r.status === 400) {
        // what Python uses now: the old value, or the default when there was none
        const cur = await api.fetchApi("/vramguard/settings").then((x) => (x.ok ? x.json() : {})).catch(() => ({}));
        const back = id in cur ? cur[id] : old;
        if (back !== undefined) await setSetting(id, back);
      }
      return false;
    }
    const values = await r.json();
    if (id === "vramguard.MonitorRefresh" || id === "vramguard.MonitorWarn") monitor.configure(values);
    return true;
  } catch (e) {
    toast(`cannot reach the server: ${e}`);
    return false;
  }
}

const monitor = {
  el: null, refresh: 2, warn: 90, timer: null,
  configure(values) {
    this.refresh = Number(values["vramguard.MonitorRefresh"] ?? this.refresh);
    this.warn = Number(values["vramguard.MonitorWarn"] ?? this.warn);
    if (this.el) this.el.style.display = this.refresh > 0 ? "block" : "none";
    this.tell();
  },
  // The server sends nothing unless a visible tab asked for it within 30 s.
  async tell() {
    const visible = document.visibilityState === "visible" && this.refresh > 0;
    try {
      await api.fetchApi("/vramguard/monitor", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ visible }),
      });
    } catch (e) { /* server restarting */ }
    clearTimeout(this.timer);
    if (visible) this.timer = setTimeout(() => this.tell(), 10000);
  },
  bar(label, used, total, reserve, warnPct) {
    const pct = total > 0 ? (100 * used) / total : 0;
    const res = total > 0 && reserve ? (100 * (total - reserve)) / total : null;
    const color = pct >= warnPct ? "#d33" : pct >= warnPct * 0.8 ? "#d90" : "#3a7";
    const gb = (b) => (b / 2 ** 30).toFixed(1);
    return `<div style="margin:2px 0"><div style="display:flex;justify-content:space-between;gap:8px">
      <span>${label}</span><span>${gb(used)}/${gb(total)} GB</span></div>
      <div style="position:relative;height:6px;background:#444;border-radius:3px">
      <div style="width:${Math.min(100, pct).toFixed(1)}%;height:100%;background:${color};border-radius:3px"></div>
      ${res !== null ? `<div title="reserve" style="position:absolute;left:${res.toFixed(1)}%;top:-2px;width:2px;height:10px;background:#fff"></div>` : ""}
      </div></div>`;
  },
  render(d) {
    if (!this.el || this.refresh <= 0) return;
    let html = "";
    for (const g of d.devices || []) {
      html += this.bar(`GPU${g.index}`, g.used, g.total, g.reserve, d.warn ?? this.warn);
      if (d.reserve_setting !== undefined && g.reserve !== d.reserve_setting) {
        // a Set Reserve node or ComfyUI's own --reserve-vram is in force, not the dialog's value
        html += `<div style="opacity:.8">reserve in force ${(g.reserve / 2 ** 30).toFixed(2)} GB ` +
          `(setting ${(d.reserve_setting / 2 ** 30).toFixed(2)} GB)</div>`;
      }
    }
    if (!(d.devices || []).length) {
      const why = String(d.gpu_reason || "").replace(/"/g, "&quot;");
      html += `<div style="opacity:.7" title="${why}">no GPU (hover for why)</div>`;
    }
    if (d.ram) html += this.bar("RAM", d.ram.used, d.ram.total, 0, d.warn ?? this.warn);
    const s = d.last_stage;
    if (s) {
      const peak = s.peak_used >= 0 ? s.peak_used : s.peak_rss;
      html += `<div style="opacity:.8">last: ${s.name} peak ${(peak / 2 ** 30).toFixed(2)} GB</div>`;
    }
    this.el.innerHTML = html;
  },
  mount() {
    const el = document.createElement("div");
    el.id = "vramguard-monitor";
    el.style.cssText = "position:fixed;left:8px;bottom:8px;z-index:1000;width:190px;padding:6px 8px;" +
      "font:11px sans-serif;color:#ddd;background:rgba(20,20,20,.85);border-radius:6px;pointer-events:none";
    document.body.appendChild(el);
    this.el = el;
    api.addEventListener("vramguard.monitor", (ev) => this.render(ev.detail));
    document.addEventListener("visibilitychange", () => this.tell());
  },
};

app.registerExtension({
  name: "vramguard",
  // the frontend lists a category's settings last-registered first: register in reverse
  settings: schema.slice().reverse().map((s) => ({
    id: s.id,
    name: s.name,
    category: ["vramguard", "Memory", s.name],
    type: s.type,
    defaultValue: s.defaultValue,
    tooltip: s.tooltip,
    attrs: s.attrs,
    options: s.options,
    onChange: (value, old) => {
      if (reverting) return; // our own revert or sync: Python already holds this value
      if (old === undefined && value === s.defaultValue) return; // start-up: Python applied defaults
      push(s.id, value, old);
    },
  })),
  async setup() {
    monitor.mount();
    let values = {};
    try {
      const r = await api.fetchApi("/vramguard/settings");
      if (r.ok) values = await r.json();
    } catch (e) { /* server restarting */ }
    // make the dialog agree with Python: a saved value Python rejected shows the value in force
    for (const s of schema) {
      if (!(s.id in values)) continue;
      const ui = getSetting(s.id);
      if (ui !== undefined && ui !== null && ui !== values[s.id]) await setSetting(s.id, values[s.id]);
    }
    monitor.configure(values);
  },
});
