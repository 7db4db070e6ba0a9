"""vramguard's settings inside ComfyUI: schema, validation, persistence, live monitor.

ComfyUI saves a setting only when the user changes it (POST /settings/{id} into
user/default/comfy.settings.json) and has no Python settings API.  So:
  * SCHEMA below is the single source of defaults and ranges; web/vramguard.js receives it
    from GET /vramguard/settings/schema, so the dialog and Python cannot disagree;
  * at start-up Python reads the saved file and applies SCHEMA's default for every key
    never changed;
  * the dialog's onChange POSTs to /vramguard/settings, which validates (HTTP 400 with a
    message, nothing applied) and applies at runtime.  ComfyUI persists the value itself.
Nothing is written outside ComfyUI's user directory (the JSON log path is confined to it).
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from typing import Any

import vramguard as vg

log = logging.getLogger("vramguard")

PREFIX = "vramguard."
# id suffix -> (type, default, (min, max) or choices, name, tooltip)
SCHEMA: dict[str, dict[str, Any]] = {
    "LowVRAM": {"type": "boolean", "default": False, "name": "Low-VRAM mode",
                "tooltip": "GC threshold 0 after every stage, reserve-first tile planning, models unloaded "
                           "before large stages. Applies at once (ComfyUI's own --lowvram is read only at start)."},
    "ReserveGB": {"type": "number", "default": 1.0, "range": (0.0, 64.0), "step": 0.1, "name": "VRAM reserve (GB)",
                  "tooltip": "Keep this much VRAM free for the desktop and other apps. The larger of this and "
                             "ComfyUI's --reserve-vram / --vram-headroom is used."},
    "GCThreshold": {"type": "number", "default": 70.0, "range": (0.0, 100.0), "step": 1, "name": "GC threshold (%)",
                    "tooltip": "Collect after a stage only when VRAM use is at least this (or garbage grew, or the "
                               "allocator reported OOM/retries). 0 = after every stage."},
    "AutoHooks": {"type": "boolean", "default": True, "name": "Automatic stage hooks",
                  "tooltip": "Run the GC policy after text encode, sampling, VAE, ControlNet, LoRA, IPAdapter and "
                             "upscale stages without adding nodes."},
    "LogLevel": {"type": "combo", "default": "INFO", "options": ["DEBUG", "INFO", "WARNING", "ERROR"],
                 "name": "Log level", "tooltip": "DEBUG prints one line per collection (SD.Next's format)."},
    "JsonLogPath": {"type": "text", "default": "", "name": "JSON log path",
                    "tooltip": "Append one JSON line per collection to this file, relative to ComfyUI's user "
                               "directory. Empty = off."},
    "MonitorRefresh": {"type": "number", "default": 2.0, "range": (0.0, 60.0), "step": 0.5,
                       "name": "Monitor refresh (s)", "tooltip": "How often the VRAM/RAM bar updates. 0 = off."},
    "MonitorWarn": {"type": "number", "default": 90.0, "range": (1.0, 100.0), "step": 1,
                    "name": "Monitor warning level (%)", "tooltip": "The bar turns red past this VRAM use."},
}

_lock = threading.Lock()
_values: dict[str, Any] = {k: v["default"] for k, v in SCHEMA.items()}


class SettingError(ValueError):
    pass


def user_dir() -> str:
    try:
        import folder_paths

        return os.path.abspath(folder_paths.get_user_directory())
    except Exception:
        return os.path.abspath(os.environ.get("VRAMGUARD_USER_DIR", os.path.join(os.getcwd(), "user")))


def validate(key: str, value: Any) -> Any:
    """The value to apply, or SettingError naming what is wrong."""
    if key.startswith(PREFIX):
        key = key[len(PREFIX):]
    spec = SCHEMA.get(key)
    if spec is None:
        raise SettingError(f"unknown setting {key!r}")
    t = spec["type"]
    if t == "boolean":
        if not isinstance(value, bool):
            raise SettingError(f"{key} must be true or false, got {value!r}")
        return value
    if t == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SettingError(f"{key} must be a finite number, got {value!r}")
        lo, hi = spec["range"]
        if not lo <= value <= hi:
            raise SettingError(f"{key} must be {lo:g}..{hi:g}, got {value!r}")
        return float(value)
    if t == "combo":
        if value not in spec["options"]:
            raise SettingError(f"{key} must be one of {spec['options']}, got {value!r}")
        return value
    if not isinstance(value, str) or len(value) > 1024 or "\x00" in value:
        raise SettingError(f"{key} must be a string of at most 1024 characters, got {value!r}")
    if key == "JsonLogPath" and value:
        return confine(value)
    return value


def confine(path: str) -> str:
    """A log path inside ComfyUI's user directory (relative paths are taken from there)."""
    base = user_dir()
    full = os.path.abspath(os.path.join(base, path))
    if os.path.commonpath([full, base]) != base:
        raise SettingError(f"JsonLogPath must stay inside the user directory {base}, got {path!r}")
    return full


def apply(key: str, value: Any) -> None:
    """Validate and apply one setting now."""
    if key.startswith(PREFIX):
        key = key[len(PREFIX):]
    v = validate(key, value)
    if key == "LowVRAM":
        vg.configure_gc(low_vram=v)
    elif key == "ReserveGB":
        vg.set_reserve(int(v * (1 << 30)))
    elif key == "GCThreshold":
        vg.configure_gc(threshold=v)
    elif key == "AutoHooks":
        _set_hooks(v)
    elif key == "LogLevel":
        log.setLevel(getattr(logging, v))
    elif key == "JsonLogPath":
        if v:
            os.makedirs(os.path.dirname(v), exist_ok=True)
        vg.set_log_file(v or None)
    with _lock:
        _values[key] = value
    if key in ("MonitorRefresh",):
        monitor.wake()


def _set_hooks(on: bool) -> None:
    try:
        from vramguard.adapters import comfyui
    except Exception as e:  # pragma: no cover
        log.warning("vramguard: ComfyUI adapter unavailable: %s", e)
        return
    if on:
        comfyui.install_hooks()
    else:
        comfyui.uninstall_hooks()


def values() -> dict[str, Any]:
    with _lock:
        return {PREFIX + k: v for k, v in _values.items()}


def get(key: str) -> Any:
    with _lock:
        return _values[key]


def load_saved(path: str | None = None) -> dict[str, Any]:
    """Apply saved values from comfy.settings.json; SCHEMA's defaults for the rest.
    Bad saved values are logged and replaced by the default, never fatal."""
    path = path or os.path.join(user_dir(), "default", "comfy.settings.json")
    saved: dict[str, Any] = {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):
            saved = {k[len(PREFIX):]: v for k, v in data.items() if k.startswith(PREFIX)}
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        log.warning("vramguard: cannot read %s (%s); using defaults", path, e)
    for key, spec in SCHEMA.items():
        value = saved.get(key, spec["default"])
        try:
            apply(key, value)
        except (SettingError, OSError) as e:
            log.warning("vramguard: saved setting %s ignored (%s); using %r", key, e, spec["default"])
            apply(key, spec["default"])
    return values()


def schema_for_web() -> list[dict[str, Any]]:
    out = []
    for key, spec in SCHEMA.items():
        d = {"id": PREFIX + key, "name": spec["name"], "type": spec["type"], "defaultValue": spec["default"],
             "tooltip": spec["tooltip"]}
        if spec["type"] == "number":
            d["attrs"] = {"min": spec["range"][0], "max": spec["range"][1], "step": spec["step"]}
        if spec["type"] == "combo":
            d["options"] = spec["options"]
        out.append(d)
    return out


# ----------------------------------------------------------------------------- live monitor
class Monitor:
    """Pushes 'vramguard.monitor' events while a tab is visible and refresh > 0; idle otherwise."""

    def __init__(self) -> None:
        self._ev = threading.Event()
        self._visible_until = 0.0
        self._thread: threading.Thread | None = None
        self._send = None
        self.sent = 0

    def visible(self, on: bool, send) -> None:
        self._send = send
        self._visible_until = time.monotonic() + 30.0 if on else 0.0
        if on and (self._thread is None or not self._thread.is_alive()):
            self._thread = threading.Thread(target=self._run, name="vramguard-monitor", daemon=True)
            self._thread.start()
        self.wake()

    def wake(self) -> None:
        self._ev.set()

    def active(self) -> bool:
        return get("MonitorRefresh") > 0 and time.monotonic() < self._visible_until

    def _run(self) -> None:
        while True:
            if not self.active():
                self._ev.wait()          # no polling at all while hidden or off
                self._ev.clear()
                continue
            try:
                if self._send is not None:
                    self._send("vramguard.monitor", payload())
                    self.sent += 1
            except Exception as e:  # never take the server down
                log.debug("vramguard: monitor send failed: %s", e)
            self._ev.wait(max(0.2, float(get("MonitorRefresh"))))
            self._ev.clear()


monitor = Monitor()


def payload() -> dict[str, Any]:
    devs = []
    try:
        for s in vg.snapshots():
            devs.append({"index": s.index, "name": s.name, "total": s.total, "used": s.used,
                         "reserve": s.reserve, "budget": s.budget})
    except Exception as e:
        devs = []
        log.debug("vramguard: monitor snapshot failed: %s", e)
    h = vg.host()
    last = None
    for rec in reversed(vg.stages()):
        if rec["end"] is not None:
            last = {"name": rec["name"], "peak_used": rec["peak_used"], "peak_rss": rec["peak_rss"]}
            break
    return {"devices": devs, "ram": {"total": h.total, "used": h.total - h.available},
            "last_stage": last, "warn": get("MonitorWarn"), "gpu_reason": None if devs else vg.gpu_status()["devices_reason"]}


# ----------------------------------------------------------------------------- HTTP routes
def register_routes() -> bool:
    """Add the pack's routes to ComfyUI's server (at import time, before it starts)."""
    try:
        from aiohttp import web
        from server import PromptServer
    except Exception:
        return False
    routes = PromptServer.instance.routes

    @routes.get("/vramguard/settings")
    async def get_settings(request):
        return web.json_response(values())

    @routes.get("/vramguard/settings/schema")
    async def get_schema(request):
        return web.json_response(schema_for_web())

    @routes.post("/vramguard/settings")
    async def post_settings(request):
        return await handle_post(request, web)

    @routes.post("/vramguard/monitor")
    async def post_monitor(request):
        try:
            body = await request.json()
            on = bool(body.get("visible")) if isinstance(body, dict) else False
        except Exception:
            return web.json_response({"error": "body must be JSON {visible: bool}"}, status=400)
        monitor.visible(on, PromptServer.instance.send_sync)
        return web.json_response({"active": monitor.active(), "refresh": get("MonitorRefresh")})

    @routes.get("/vramguard/status")
    async def get_status(request):
        return web.json_response(payload())

    @routes.get("/vramguard/hooks")
    async def get_hooks(request):
        from vramguard.adapters import comfyui

        rep = comfyui.hook_report()
        return web.json_response({"installed": [list(p) for p in rep["installed"]], "missing": rep["missing"],
                                  "gc_stats": vg.gc_stats()})

    return True


async def handle_post(request, web) -> Any:
    """POST {"id": "vramguard.X", "value": v} or {"vramguard.X": v, ...}: all valid or none applied."""
    try:
        body = await request.json()
    except Exception:
        return web.json_response({"error": "body must be JSON"}, status=400)
    if not isinstance(body, dict):
        return web.json_response({"error": "body must be a JSON object"}, status=400)
    items = {body["id"]: body.get("value")} if "id" in body else dict(body)
    if not items:
        return web.json_response({"error": "no setting given"}, status=400)
    try:
        for k, v in items.items():
            if not isinstance(k, str):
                raise SettingError(f"setting ids are strings, got {k!r}")
            validate(k, v)
    except SettingError as e:
        return web.json_response({"error": str(e)}, status=400)
    for k, v in items.items():
        apply(k, v)
    return web.json_response(values())
