"""vramguard's settings inside ComfyUI: schema, validation, persistence, live monitor.

ComfyUI saves a setting only when the user changes it (POST /settings/{id} into
user/default/comfy.settings.json) and has no Python settings API.  So:
  * SCHEMA below is the single source of defaults and ranges; web/vramguard.js receives it
    from GET /vramguard/settings/schema, so the dialog and Python cannot disagree;
  * at start-up Python reads the saved file and applies SCHEMA's default for every key
    never changed;
  * the dialog's onChange POSTs to /vramguard/settings, which validates (HTTP 400 with a
    short message, nothing applied: a multi-key POST is all or none) and applies at runtime.
    ComfyUI persists the value itself, even one we rejected: so the web extension puts the
    old value back on a 400, a saved value that fails validation at start-up is replaced by
    the default (one warning), and the dialog is set to what Python uses after start-up.
Nothing is written outside ComfyUI's user directory, and nothing there but a .jsonl/.log
file that is new or that vramguard created (LOG_HEADER), found by its real path.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from typing import Any

import vramguard as vg
from vramguard import _forksafe
from vramguard._units import short_repr

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
                    "tooltip": "Append one JSON line per collection to this .jsonl or .log file, relative to "
                               "ComfyUI's user directory (it must stay inside it). A new file is created with a "
                               "vramguard header line; an existing file must be one vramguard created. "
                               "Empty = off."},
    "MonitorRefresh": {"type": "number", "default": 2.0, "range": (0.0, 60.0), "step": 0.5,
                       "name": "Monitor refresh (s)", "tooltip": "How often the VRAM/RAM bar updates. 0 = off."},
    "MonitorWarn": {"type": "number", "default": 90.0, "range": (1.0, 100.0), "step": 1,
                    "name": "Monitor warning level (%)", "tooltip": "The bar turns red past this VRAM use."},
    # shared ledger / host RAM (issue 13)
    "LearnReserve": {"type": "boolean", "default": False, "name": "Learn the reserve from other apps",
                     "tooltip": "Watch what other applications use on each GPU and keep room for them to come "
                                "back to their peak of the last 10 minutes (+256 MiB). The larger of this and "
                                "the VRAM reserve is used; `python -m vramguard status` shows the figure and why."},
    "PinnedCapGB": {"type": "number", "default": 0.0, "range": (0.0, 1024.0), "step": 0.5,
                    "name": "Pinned host memory cap (GB)",
                    "tooltip": "Above this much pinned (page-locked) RAM, release torch's pinned cache and ask "
                               "ComfyUI to unpin after GC stages (logged in the GC line). 0 = no cap."},
}

_lock = _forksafe.lock()
_values: dict[str, Any] = {k: v["default"] for k, v in SCHEMA.items()}

#: The first line of every JSON log file vramguard creates.  A log path may name only a new
#: file or one that starts with this line: never ComfyUI's settings or any other existing file.
LOG_HEADER = '{"vramguard": "gc-log", "format": 1}'
LOG_SUFFIXES = (".jsonl", ".log")
MAX_BODY = 64 * 1024  # bytes; no setting needs more, and a 10 MB body is never parsed


class SettingError(ValueError):
    pass


def user_dir() -> str:
    # a running ComfyUI has imported folder_paths long before it loads custom nodes; a checkout
    # that is merely importable (tests, scripts) is not the host
    fp = sys.modules.get("folder_paths")
    try:
        return os.path.abspath(fp.get_user_directory())
    except Exception:
        return os.path.abspath(os.environ.get("VRAMGUARD_USER_DIR", os.path.join(os.getcwd(), "user")))


def _key(key: Any) -> str:
    if not isinstance(key, str):
        raise SettingError(f"setting ids are strings, got {type(key).__name__} {short_repr(key)}")
    k = key[len(PREFIX):] if key.startswith(PREFIX) else key
    if k not in SCHEMA:
        raise SettingError(f"unknown setting {short_repr(key)}")
    return k


def validate(key: str, value: Any) -> Any:
    """The value to apply, or SettingError naming what is wrong (the value cut to 80 chars)."""
    key = _key(key)
    spec = SCHEMA[key]
    t = spec["type"]
    if t == "boolean":
        if not isinstance(value, bool):
            raise SettingError(f"{key} must be true or false, got {short_repr(value)}")
        return value
    if t == "number":
        # ints are compared exactly (a 400-digit int must not reach float()/isfinite)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (isinstance(value, float) and not math.isfinite(value)):
            raise SettingError(f"{key} must be a finite number, got {short_repr(value)}")
        lo, hi = spec["range"]
        if not lo <= value <= hi:
            raise SettingError(f"{key} must be {lo:g}..{hi:g}, got {short_repr(value)}")
        return float(value)
    if t == "combo":
        if not isinstance(value, str) or value not in spec["options"]:
            raise SettingError(f"{key} must be one of {spec['options']}, got {short_repr(value)}")
        return value
    if not isinstance(value, str) or len(value) > 1024 or "\x00" in value:
        raise SettingError(f"{key} must be a string of at most 1024 characters, got {short_repr(value)}")
    if key == "JsonLogPath" and value:
        return confine(value)
    return value


def confine(path: str) -> str:
    """The real path of a JSON log file inside ComfyUI's user directory.

    Relative paths are taken from the user directory; symlinks are resolved and the result
    must stay inside it; the name must end in .jsonl or .log; every existing parent must be
    a folder; the file itself must be new or one vramguard created (its first line is
    LOG_HEADER).  Nothing is created here."""
    base = os.path.realpath(user_dir())
    full = os.path.realpath(os.path.join(base, path))
    if full == base or os.path.commonpath([full, base]) != base:
        raise SettingError(f"JsonLogPath must stay inside the user directory {base}, got {short_repr(path)}")
    if not full.lower().endswith(LOG_SUFFIXES):
        raise SettingError(f"JsonLogPath must name a .jsonl or .log file, got {short_repr(path)}")
    parent = os.path.dirname(full)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise SettingError(f"JsonLogPath {short_repr(path)}: {short_repr(parent)} is a file, not a folder")
    if os.path.lexists(full):
        if not os.path.isfile(full):
            raise SettingError(f"JsonLogPath {short_repr(path)} exists and is not a regular file")
        if not _is_our_log(full):
            raise SettingError(f"JsonLogPath {short_repr(path)} is an existing file vramguard did not create; "
                               "choose a new file name")
    return full


def _is_our_log(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            first = f.readline(len(LOG_HEADER) + 2)
    except OSError:
        return False
    return first.rstrip(b"\r\n") == LOG_HEADER.encode()


def _create_log(full: str) -> None:
    """Create the log file with its header (exclusively: never through a link, never over a file)."""
    os.makedirs(os.path.dirname(full), exist_ok=True)
    if os.path.realpath(os.path.dirname(full)) != os.path.dirname(full):
        raise SettingError(f"JsonLogPath {short_repr(full)}: its folder moved while being created")
    try:
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except FileExistsError:
        if not _is_our_log(full) or os.path.islink(full):
            raise SettingError(f"JsonLogPath {short_repr(full)} appeared meanwhile and is not vramguard's") from None
        return
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(LOG_HEADER + "\n")


def _apply_valid(key: str, v: Any) -> None:
    """Apply a value validate() returned."""
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
            _create_log(v)
        vg.set_log_file(v or None)
    elif key == "LearnReserve":
        vg.set_learn_reserve(v)
    elif key == "PinnedCapGB":
        vg.set_pinned_cap(int(v * (1 << 30)))


def apply(key: str, value: Any) -> None:
    """Validate and apply one setting now."""
    key = _key(key)
    v = validate(key, value)
    _apply_valid(key, v)
    with _lock:
        _values[key] = value
    if key in ("MonitorRefresh",):
        monitor.wake()


def apply_many(items: Any) -> dict[str, Any]:
    """All or none: validate every item first, then apply; on a failure while applying, the
    keys already applied are put back.  Raises SettingError."""
    pairs = list(items.items()) if isinstance(items, dict) else list(items)
    checked = [(_key(k), v) for k, v in pairs]
    if len({k for k, _ in checked}) != len(checked):
        raise SettingError("a setting is given twice")
    valid = [(k, validate(k, v), v) for k, v in checked]
    # the one step that can fail (creating the log file) goes first
    valid.sort(key=lambda t: t[0] != "JsonLogPath")
    done: list[tuple[str, Any]] = []
    try:
        for k, v, raw in valid:
            old = get(k)
            _apply_valid(k, v)
            done.append((k, old))
            with _lock:
                _values[k] = raw
    except Exception as e:
        for k, old in reversed(done):
            try:
                _apply_valid(k, validate(k, old))
                with _lock:
                    _values[k] = old
            except Exception as e2:  # pragma: no cover - the old value was valid
                log.warning("vramguard: could not restore setting %s: %s", k, e2)
        raise SettingError(f"could not apply {valid[len(done)][0]}: {short_repr(str(e), 200)}") from None
    if any(k == "MonitorRefresh" for k, _, _ in valid):
        monitor.wake()
    return values()


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
    bad = []
    for key, spec in SCHEMA.items():
        value = saved.get(key, spec["default"])
        try:
            apply(key, value)
        except Exception as e:  # SettingError, OSError, anything: a saved value is never fatal
            bad.append(f"{key} ({short_repr(str(e), 120)})")
            apply(key, spec["default"])
    if bad:
        # ComfyUI stored these although our route rejected them (or the file was edited);
        # the web extension shows what Python uses (GET /vramguard/settings) after start-up
        log.warning("vramguard: saved settings ignored, using defaults: %s", "; ".join(bad))
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


# snapshot fields the monitor shows when this build has them (fragmentation figures are newer
# than the first snapshots): read with getattr so an older or newer core both work
_DEVICE_FIELDS = ("total", "free", "used", "process_used", "framework_reserved", "framework_allocated",
                  "evictable", "reserve", "cap", "budget", "largest_free_block", "inactive_split")


def _optional(fn_name: str, default: Any, *args: Any) -> Any:
    """vramguard.ledger.<fn_name>(*args) if this build has it, else `default`; never raises."""
    fn = getattr(getattr(vg, "ledger", None), fn_name, None)
    if not callable(fn):
        return default
    try:
        return fn(*args)
    except Exception as e:  # a corrupted ledger region must not break the monitor
        log.debug("vramguard: monitor: ledger.%s failed: %s", fn_name, e)
        return default


def _pinned() -> int | None:
    """Pinned + locked host bytes of this process (ledger.host_pinned()), None where unknown."""
    d = _optional("host_pinned", None)
    if not isinstance(d, dict):
        return None
    vals = [v for v in (d.get("pinned"), d.get("locked")) if isinstance(v, int) and v >= 0]
    return max(vals) if vals else None  # VmPin pages are a subset of VmLck when both are counted


def payload() -> dict[str, Any]:
    """What the monitor shows (GET /vramguard/status and the 'vramguard.monitor' event).

    Sizes are bytes; a figure this build or device does not have is null.  Fields: devices
    (one per GPU: index, name, source and _DEVICE_FIELDS), ram (total, used, available,
    process_rss, pinned, cgroup_limit), reserve_setting, last_stage, stages (the last 8 closed
    stages with peaks and seconds), ledger (joined, participants, others_planned per device, rows:
    pid/self/devices{used, planned} per participant) or null, warn, gpu_reason.  Each device also
    has learned: {reserve, reason} when the reserve that learns is on, else null."""
    devs = []
    try:
        for s in vg.snapshots():
            d = {"index": s.index, "name": s.name, "source": getattr(s, "source", None)}
            d.update({k: getattr(s, k, None) for k in _DEVICE_FIELDS})
            # the reserve that learns (a setting, off by default): its figure and why
            lr = _optional("learned_reserve", None, s.index)
            d["learned"] = ({"reserve": lr.get("reserve"), "reason": lr.get("reason")}
                            if isinstance(lr, dict) and lr.get("enabled") else None)
            devs.append(d)
    except Exception as e:
        devs = []
        log.debug("vramguard: monitor snapshot failed: %s", e)
    h = vg.host()
    closed = [rec for rec in vg.stages() if rec["end"] is not None][-8:]
    stages = [{"name": r["name"], "peak_used": r["peak_used"], "peak_process": r.get("peak_process"),
               "peak_rss": r["peak_rss"], "seconds": round(r["end"] - r["start"], 3)} for r in closed]
    last = stages[-1] if stages else None
    led = _optional("summary", None)
    ledger = None
    if isinstance(led, dict) and isinstance(led.get("ledger"), dict) and led["ledger"].get("joined"):
        parts = led.get("participants") or []
        ledger = {"joined": True, "participants": len(parts),
                  "others_planned": {str(d["index"]): sum(
                      int(p.get("devices", {}).get(str(d["index"]), {}).get("outstanding", 0) or 0)
                      for p in parts if not p.get("self")) for d in devs},
                  # who holds what: each participant's used / planned bytes per device
                  "rows": [{"pid": p.get("pid"), "self": bool(p.get("self")),
                            "devices": {k: {"used": v.get("used"), "planned": v.get("planned")}
                                        for k, v in (p.get("devices") or {}).items()}} for p in parts]}
    # the reserve in force per device (in "devices") can differ from the dialog's: a Set Reserve
    # node, or ComfyUI's --reserve-vram / --vram-headroom (the larger one is used)
    return {"devices": devs,
            "ram": {"total": h.total, "used": h.total - h.available, "available": h.available,
                    "process_rss": h.process_rss, "pinned": _pinned(),
                    "cgroup_limit": getattr(h, "cgroup_limit", None)},
            "reserve_setting": int(float(get("ReserveGB")) * (1 << 30)),
            "last_stage": last, "stages": stages, "ledger": ledger, "warn": get("MonitorWarn"),
            "gpu_reason": None if devs else vg.gpu_status()["devices_reason"]}


# ----------------------------------------------------------------------------- HTTP routes
class BadRequest(ValueError):
    """What a route answers with HTTP 400 (a short message)."""


async def read_json(request: Any) -> Any:
    """The request's JSON body: application/json, at most MAX_BODY bytes, no NaN/Infinity,
    nesting and number sizes bounded; BadRequest otherwise."""
    ctype = getattr(request, "content_type", None)
    if ctype != "application/json":
        raise BadRequest(f"Content-Type must be application/json, got {short_repr(ctype)}")
    n = getattr(request, "content_length", None)
    if n is not None and n > MAX_BODY:
        raise BadRequest(f"body too large: {n} bytes (at most {MAX_BODY})")
    try:
        raw = await request.read()
    except Exception as e:  # aiohttp's own size limit, a dropped connection
        raise BadRequest(f"cannot read the body: {short_repr(str(e))}") from None
    if len(raw) > MAX_BODY:
        raise BadRequest(f"body too large: {len(raw)} bytes (at most {MAX_BODY})")

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError, digit limit
        raise BadRequest(f"body must be valid JSON ({short_repr(str(e), 80)})") from None


def settings_items(body: Any) -> list[tuple[Any, Any]]:
    """{"id": "vramguard.X", "value": v} or {"vramguard.X": v, ...} as [(id, value)] (an id
    may be any JSON value here: apply_many rejects what is not a string)."""
    if not isinstance(body, dict):
        raise BadRequest(f"body must be a JSON object, got {type(body).__name__}")
    if "id" in body:
        extra = set(body) - {"id", "value"}
        if extra or "value" not in body:
            raise BadRequest('body must be {"id": ..., "value": ...}, got keys '
                             f"{short_repr(sorted(map(str, body)))}")
        return [(body["id"], body["value"])]
    if not body:
        raise BadRequest("no setting given")
    return list(body.items())


async def handle_post(request: Any, web: Any) -> Any:
    """POST {"id": "vramguard.X", "value": v} or {"vramguard.X": v, ...}: all valid or none
    applied; HTTP 400 with a short message otherwise, never 500."""
    try:
        items = settings_items(await read_json(request))
        return web.json_response(apply_many(items))
    except (BadRequest, SettingError) as e:
        return web.json_response({"error": str(e)}, status=400)


async def handle_monitor(request: Any, web: Any, send: Any) -> Any:
    """POST {"visible": true|false}: the tab asks for (or stops) live monitor events."""
    try:
        body = await read_json(request)
        if not isinstance(body, dict) or set(body) != {"visible"} or not isinstance(body["visible"], bool):
            raise BadRequest(f'body must be {{"visible": true|false}}, got {short_repr(body)}')
    except BadRequest as e:
        return web.json_response({"error": str(e)}, status=400)
    monitor.visible(body["visible"], send)
    return web.json_response({"active": monitor.active(), "refresh": get("MonitorRefresh")})


def add_routes(routes: Any, web: Any, send: Any) -> None:
    """Add the pack's routes to an aiohttp RouteTableDef (ComfyUI's, or a test server's)."""

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
        return await handle_monitor(request, web, send)

    @routes.get("/vramguard/status")
    async def get_status(request):
        return web.json_response(payload())

    @routes.get("/vramguard/hooks")
    async def get_hooks(request):
        from vramguard.adapters import comfyui

        rep = comfyui.hook_report()
        return web.json_response({"installed": [list(p) for p in rep["installed"]], "missing": rep["missing"],
                                  "gc_stats": vg.gc_stats()})


def register_routes() -> bool:
    """Add the pack's routes to ComfyUI's running server (at import time, before it starts).

    False, with a log line where there is no server: `server` does not import, or (ComfyUI
    >= 0.30, where it imports anywhere) PromptServer.instance was not built yet."""
    try:
        from aiohttp import web
        from server import PromptServer
    except Exception:
        return False
    inst = getattr(PromptServer, "instance", None)
    routes = getattr(inst, "routes", None)
    if inst is None or routes is None:
        log.info("vramguard: no running ComfyUI server (PromptServer.instance missing); "
                 "settings routes not registered")
        return False

    def send(event: str, data: Any) -> None:
        inst.send_sync(event, data)

    add_routes(routes, web, send)
    return True
