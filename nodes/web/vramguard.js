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

// ---------------------------------------------------------------------------- the monitor
// One compact element: a bar per GPU and one for host RAM.  Where the frontend has its top menu
// bar (app.menu, the slot Crystools' monitor uses too) it sits there, before the settings
// buttons; on frontends without one it floats at the bottom right, clear of the sidebar and of
// LiteGraph's info text.  Hovering (or focusing it) shows what each figure is and why (no GPU:
// the reason) in a tooltip of our own: an element, at once, and in a screenshot, which the
// browser's title tooltip is not; its text is also the element's aria-description.  Clicking
// (or Enter) opens the "VRAM" bottom panel tab with the details (frontends with bottom panels).
const GiB = 2 ** 30;
const PANEL_ID = "vramguard-memory";
const HOLD_MS = 10000; // the peak-hold marker keeps the highest reading this long

function fmt(b) {
  if (b === null || b === undefined || !Number.isFinite(Number(b)) || Number(b) < 0) return "n/a";
  b = Number(b);
  if (b >= GiB) return `${(b / GiB).toFixed(b >= 10 * GiB ? 1 : 2)} GB`;
  return `${Math.round(b / 2 ** 20)} MB`;
}
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const pct = (v, total) => (total > 0 ? Math.max(0, Math.min(100, (100 * Number(v || 0)) / total)) : 0);

const monitor = {
  el: null, panel: null, refresh: 2, warn: 90, timer: null, last: null, peaks: {}, placement: null,
  tip: null, tipText: "", hovered: false,
  configure(values) {
    this.refresh = Number(values["vramguard.MonitorRefresh"] ?? this.refresh);
    this.warn = Number(values["vramguard.MonitorWarn"] ?? this.warn);
    // "" would drop place()'s inline-flex: the bars and labels would then run together
    if (this.el) this.el.style.display = this.refresh > 0 ? "inline-flex" : "none";
    if (!(this.refresh > 0)) this.hideTip();
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
  // the highest reading of the last HOLD_MS, per bar
  hold(key, v, now) {
    const p = this.peaks[key];
    if (!p || v >= p.v || now - p.t > HOLD_MS) this.peaks[key] = { v, t: now };
    return this.peaks[key].v;
  },
  color(p, warn) {
    return p >= warn ? "#e04040" : p >= warn * 0.8 ? "#e0a020" : "#3fae6a";
  },
  // A bar: used (coloured), evictable cache (lighter), reserve (hatched, at the end), the
  // budget (green line under the bar, from live bytes up to what may still be allocated) and
  // the peak-hold marker (white tick).
  bar(key, label, g, warn, now) {
    const total = Number(g.total || 0);
    const used = Number(g.used || 0);
    const evict = Math.max(0, Math.min(used, Number(g.evictable || 0)));
    const live = used - evict;
    const peak = this.hold(key, used, now);
    const u = pct(used, total);
    let h = `<span data-vg="bar" data-key="${esc(key)}" style="display:inline-flex;flex-direction:column;gap:1px;min-width:76px">`;
    h += `<span style="display:flex;justify-content:space-between;gap:4px;font-size:10px;line-height:11px">` +
      `<span>${esc(label)}</span><span>${esc(fmt(used).replace(" GB", ""))}/${esc(fmt(total))}</span></span>`;
    h += `<span style="position:relative;display:block;height:7px;background:#3a3a3a;border-radius:2px;overflow:hidden">`;
    h += `<span data-vg="used" style="position:absolute;left:0;top:0;bottom:0;width:${u.toFixed(1)}%;background:${this.color(u, warn)}"></span>`;
    if (evict > 0) {
      h += `<span data-vg="evictable" style="position:absolute;top:0;bottom:0;left:${pct(live, total).toFixed(1)}%;` +
        `width:${pct(evict, total).toFixed(1)}%;background:rgba(255,255,255,.35)"></span>`;
    }
    if (g.pinned > 0) {
      h += `<span data-vg="pinned" style="position:absolute;left:0;top:0;bottom:0;width:${pct(g.pinned, total).toFixed(1)}%;background:#9b59d0"></span>`;
    }
    if (g.reserve > 0) {
      h += `<span data-vg="reserve" style="position:absolute;top:0;bottom:0;right:0;width:${pct(g.reserve, total).toFixed(1)}%;` +
        `background:repeating-linear-gradient(45deg,rgba(224,64,64,.55) 0 2px,transparent 2px 4px)"></span>`;
    }
    h += `<span data-vg="peak" style="position:absolute;top:0;bottom:0;left:calc(${pct(peak, total).toFixed(1)}% - 1px);width:2px;background:#fff"></span>`;
    h += `</span>`;
    if (g.budget !== undefined && g.budget !== null) {
      h += `<span style="position:relative;display:block;height:2px">` +
        `<span data-vg="budget" style="position:absolute;top:0;height:2px;left:${pct(live, total).toFixed(1)}%;` +
        `width:${Math.min(pct(g.budget, total), 100 - pct(live, total)).toFixed(1)}%;background:#5fd08a"></span></span>`;
    }
    return h + `</span>`;
  },
  tooltip(d, now) {
    const lines = [];
    for (const g of d.devices || []) {
      const key = `gpu${g.index}`;
      lines.push(`GPU ${g.index}: ${g.name || "?"}${g.source && g.source !== "nvml" ? ` (${g.source})` : ""}`);
      lines.push(`  used ${fmt(g.used)} of ${fmt(g.total)} (all processes); this process ${fmt(g.process_used)}`);
      if (g.evictable > 0) lines.push(`  evictable cache ${fmt(g.evictable)} (this process can release it; lighter part of the bar)`);
      lines.push(`  reserve ${fmt(g.reserve)}: kept free for the desktop and other apps (hatched)` +
        (d.reserve_setting !== undefined && g.reserve !== d.reserve_setting
          ? `; setting ${fmt(d.reserve_setting)}, a Set Reserve node or ComfyUI's --reserve-vram is in force` : ""));
      lines.push(`  budget ${fmt(g.budget)}: what may still be allocated = free + evictable - reserve` +
        (g.cap > 0 ? `, at most cap ${fmt(g.cap)} - live` : "") + " (green line)");
      lines.push(`  peak of the last ${HOLD_MS / 1000} s ${fmt(this.peaks[key]?.v)} (white tick)`);
      if (g.largest_free_block !== null && g.largest_free_block !== undefined) {
        lines.push(`  largest free block ${fmt(g.largest_free_block)}; inactive split ${fmt(g.inactive_split)} (fragmentation)`);
      }
      if (g.learned) lines.push(`  learned reserve ${fmt(g.learned.reserve)}: ${g.learned.reason}`);
      const other = d.ledger?.others_planned?.[String(g.index)];
      if (other > 0) lines.push(`  other vramguard processes plan ${fmt(other)} more (shared ledger)`);
    }
    if (!(d.devices || []).length) lines.push(`no GPU: ${d.gpu_reason || "none found"}`);
    if (d.ram) {
      lines.push(`RAM: used ${fmt(d.ram.used)} of ${fmt(d.ram.total)} (whole machine${d.ram.cgroup_limit ? ", container limit " + fmt(d.ram.cgroup_limit) : ""})`);
      lines.push(`  ComfyUI process ${fmt(d.ram.process_rss)}; pinned/locked ${fmt(d.ram.pinned)} (purple)`);
    }
    const s = d.last_stage;
    if (s) {
      const onGpu = s.peak_used !== null && s.peak_used >= 0 && (d.devices || []).length;
      lines.push(`last stage: ${s.name}, peak ${onGpu ? fmt(s.peak_used) + " device" : fmt(s.peak_rss) + " RAM (process)"}` +
        (s.seconds !== undefined ? `, ${s.seconds} s` : ""));
    }
    if (d.ledger?.joined) lines.push(`shared ledger: ${d.ledger.participants} process(es)`);
    lines.push(this.placement === "topbar" || this.panel ? "click: details in the bottom panel (VRAM tab)" : "");
    return lines.filter(Boolean).join("\n");
  },
  render(d) {
    if (!d || typeof d !== "object") return;
    this.last = d;
    const now = Date.now();
    const warn = Number(d.warn ?? this.warn);
    let html = "";
    for (const g of d.devices || []) html += this.bar(`gpu${g.index}`, `GPU${g.index}`, g, warn, now);
    if (!(d.devices || []).length) html += `<span data-vg="nogpu" style="opacity:.75;font-size:10px">no GPU</span>`;
    if (d.ram) html += this.bar("ram", "RAM", { ...d.ram, reserve: 0, budget: null }, warn, now);
    if (this.el && this.refresh > 0) {
      this.el.innerHTML = html;
      this.setTip(this.tooltip(d, now));
    }
    if (this.panel) this.renderPanel(this.panel);
  },
  renderPanel(el) {
    const d = this.last;
    if (!d) { el.innerHTML = `<div style="padding:8px;opacity:.7">waiting for the first reading…</div>`; return; }
    const row = (cells) => `<tr>${cells.map((c) => `<td style="padding:2px 10px 2px 0">${c}</td>`).join("")}</tr>`;
    let h = `<div style="padding:6px 10px;font:12px sans-serif"><table data-vg="devices">`;
    h += row(["device", "used", "this process", "evictable", "reserve", "cap", "budget", "largest free block", "inactive split"].map((x) => `<b>${x}</b>`));
    for (const g of d.devices || []) {
      h += row([esc(`${g.index}: ${g.name}`), fmt(g.used) + " / " + fmt(g.total), fmt(g.process_used), fmt(g.evictable),
        fmt(g.reserve), g.cap > 0 ? fmt(g.cap) : "none", fmt(g.budget), fmt(g.largest_free_block), fmt(g.inactive_split)]);
    }
    if (!(d.devices || []).length) h += row([`no GPU: ${esc(d.gpu_reason || "none found")}`]);
    if (d.ram) h += row(["host RAM", fmt(d.ram.used) + " / " + fmt(d.ram.total), fmt(d.ram.process_rss), "", "", "", "", "pinned " + fmt(d.ram.pinned), ""]);
    h += `</table><table data-vg="stages" style="margin-top:6px">` + row(["<b>stage</b>", "<b>device peak</b>", "<b>RAM peak (process)</b>", "<b>seconds</b>"]);
    for (const s of (d.stages || []).slice().reverse()) {
      h += row([esc(s.name), s.peak_used >= 0 ? fmt(s.peak_used) : "n/a", fmt(s.peak_rss), esc(s.seconds)]);
    }
    h += `</table>`;
    if (d.ledger?.joined) {
      h += `<div>shared ledger: ${esc(d.ledger.participants)} process(es)</div>`;
      h += `<table data-vg="ledger">` + row(["<b>process</b>", "<b>device: used / planned</b>"]);
      for (const p of d.ledger.rows || []) {
        const claims = Object.entries(p.devices || {}).map(([k, v]) => `${esc(k)}: ${fmt(v.used)} / ${fmt(v.planned)}`);
        h += row([`pid ${esc(p.pid)}${p.self ? " (this one)" : ""}`, claims.join(", ") || "no claims"]);
      }
      h += `</table>`;
    }
    for (const g of d.devices || []) {
      if (g.learned) h += `<div>GPU ${esc(g.index)}: learned reserve ${fmt(g.learned.reserve)}: ${esc(g.learned.reason)}</div>`;
    }
    el.innerHTML = h + `</div>`;
  },
  setTip(text) {
    this.tipText = text;
    this.el?.setAttribute?.("aria-description", text);
    if (this.hovered) this.showTip();
  },
  // below the monitor, right-aligned with it, kept inside the window
  showTip() {
    this.hovered = true;
    if (!this.el?.getBoundingClientRect || !(this.refresh > 0)) return;
    if (!this.tip) {
      this.tip = document.createElement("div");
      this.tip.id = "vramguard-monitor-tip";
      this.tip.setAttribute("role", "tooltip");
      this.tip.style.cssText = "position:fixed;z-index:10000;max-width:min(620px,calc(100vw - 16px));" +
        "white-space:pre-wrap;font:11px/1.45 ui-monospace,Menlo,Consolas,monospace;color:#e8e8e8;" +
        "background:rgba(24,24,24,.97);border:1px solid #555;border-radius:6px;padding:6px 9px;" +
        "box-shadow:0 4px 14px rgba(0,0,0,.5)";
      document.body.appendChild(this.tip);
    }
    this.tip.textContent = this.tipText;
    this.tip.style.display = "block";
    const r = this.el.getBoundingClientRect();
    const w = this.tip.offsetWidth, h = this.tip.offsetHeight;
    const left = Math.max(8, Math.min(r.right - w, window.innerWidth - w - 8));
    const top = r.bottom + 6 + h <= window.innerHeight ? r.bottom + 6 : Math.max(8, r.top - 6 - h);
    this.tip.style.left = `${left}px`;
    this.tip.style.top = `${top}px`;
  },
  hideTip() {
    this.hovered = false;
    if (this.tip) this.tip.style.display = "none";
  },
  openPanel() {
    const cmd = app.extensionManager?.command;
    if (cmd?.execute) return cmd.execute(`Workspace.ToggleBottomPanelTab.${PANEL_ID}`);
  },
  place(el) {
    // the top menu bar's slot for extension buttons (app.menu: its element is the legacy-menu
    // container the frontend mounts in the top bar, possibly after setup() runs; inserting
    // beside the settings group needs only its parent, which exists from the start)
    const group = app.menu?.settingsGroup?.element;
    if (group && typeof group.before === "function" && group.parentNode) {
      group.before(el);
      el.style.cssText = "display:inline-flex;align-items:center;gap:6px;padding:0 6px;height:100%;" +
        "font:10px sans-serif;color:var(--fg-color,#ddd);cursor:pointer;user-select:none";
      return "topbar";
    }
    // older frontends: a floating box at the bottom right (the sidebar and LiteGraph's info text
    // are at the left)
    document.body.appendChild(el);
    el.style.cssText = "position:fixed;right:12px;bottom:12px;z-index:1000;display:inline-flex;gap:6px;" +
      "padding:4px 8px;font:10px sans-serif;color:#ddd;background:rgba(20,20,20,.85);border-radius:6px;cursor:default";
    return "floating";
  },
  mount() {
    const el = document.createElement("div");
    el.id = "vramguard-monitor";
    el.setAttribute?.("role", "status");
    el.setAttribute?.("aria-label", "vramguard memory monitor");
    // not empty before the first reading: the frontend shows its legacy-menu slot only with content
    el.innerHTML = `<span style="opacity:.7;font-size:10px">VRAM…</span>`;
    el.tabIndex = 0;
    this.el = el;
    this.setTip("vramguard: waiting for the first reading");
    this.placement = this.place(el);
    el.addEventListener?.("click", () => this.openPanel());
    el.addEventListener?.("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") this.openPanel(); });
    // focus by keyboard only: a clicked monitor would get the focus back (and show its tooltip)
    // whenever a dialog opened after the click closes
    el.addEventListener?.("mousedown", (ev) => ev.preventDefault());
    for (const on of ["mouseenter", "focus"]) el.addEventListener?.(on, () => this.showTip());
    for (const off of ["mouseleave", "blur"]) el.addEventListener?.(off, () => this.hideTip());
    el.addEventListener?.("keydown", (ev) => { if (ev.key === "Escape") this.hideTip(); });
    api.addEventListener("vramguard.monitor", (ev) => this.render(ev.detail));
    document.addEventListener("visibilitychange", () => this.tell());
  },
};

app.registerExtension({
  name: "vramguard",
  // the details, in the bottom panel (frontends that have one; others ignore these keys)
  bottomPanelTabs: [{
    id: PANEL_ID,
    title: "VRAM",
    type: "custom",
    render: (el) => { monitor.panel = el; monitor.renderPanel(el); },
    destroy: () => { monitor.panel = null; },
  }],
  commands: [{
    id: "vramguard.ShowMemoryPanel",
    label: "vramguard: memory details",
    icon: "pi pi-chart-bar",
    function: () => monitor.openPanel(),
  }],
  menuCommands: [{ path: ["View"], commands: ["vramguard.ShowMemoryPanel"] }],
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
