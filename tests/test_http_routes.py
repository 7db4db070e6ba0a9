"""The settings routes over real HTTP: a real aiohttp server on 127.0.0.1 with the pack's routes,
fed hostile bodies.  Every bad body answers 400 with a short message, nothing is applied, and
no file outside a .jsonl/.log that vramguard created is ever written."""
import asyncio
import json
import logging
import os
import random
import sys
import types

import pytest

import vramguard as vg
from vramguard import sampling
from vramguard_nodes import settings

aiohttp = pytest.importorskip("aiohttp", reason="aiohttp (ComfyUI's server) not installed")
from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

GiB = 1 << 30


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A ComfyUI-like user directory: comfy.settings.json, other files, a symlink out of it."""
    u = tmp_path / "user"
    (u / "default").mkdir(parents=True)
    (u / "default" / "comfy.settings.json").write_text(json.dumps({"Comfy.Theme": "dark"}))
    (u / "notes.txt").write_text("mine\n")
    (u / "old.jsonl").write_text('{"someone": "else"}\n')
    (u / "app.log").write_text("another program's log\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text("")
    os.symlink(outside, u / "escape")
    os.symlink(u / "default" / "comfy.settings.json", u / "link.jsonl")
    monkeypatch.setenv("VRAMGUARD_USER_DIR", str(u))
    monkeypatch.setattr(sampling, "_default", None)  # a sampler made here does not outlive the test
    settings.load_saved(str(tmp_path / "none.json"))
    yield u
    settings.load_saved(str(tmp_path / "none.json"))


def _files(root):
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[p] = (st.st_mtime_ns, st.st_size)
    return out


def _state():
    g = vg.guard()
    return (settings.values(), g.policy.threshold, g.low_vram, vg.limits()["reserve"], g._jsonl,
            logging.getLogger("vramguard").level)


async def _serve(coro_fn):
    routes = web.RouteTableDef()
    sent = []
    settings.add_routes(routes, web, lambda ev, data: sent.append(ev))
    app = web.Application(client_max_size=100 * 1024 * 1024)  # ComfyUI's default upload limit
    app.add_routes(routes)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        return await coro_fn(client)


def _hostile_bodies(user, seed=1234):
    """(content_type, raw bytes) pairs that must all answer 400."""
    J = "application/json"
    cases = [
        (J, b"{not json"), (J, b""), (J, b"\xff\xfe"), (J, b"[1, 2]"), (J, b"null"), (J, b"{}"), (J, b"5"),
        ("text/plain", json.dumps({"vramguard.GCThreshold": 40}).encode()),
        ("application/x-www-form-urlencoded", b"vramguard.GCThreshold=40"),
        (J, b'{"vramguard.GCThreshold": NaN}'), (J, b'{"vramguard.GCThreshold": Infinity}'),
        (J, b'{"vramguard.ReserveGB": -Infinity}'),
        (J, ('{"vramguard.GCThreshold": ' + "9" * 400 + "}").encode()),
        (J, ('{"vramguard.ReserveGB": ' + "9" * 5000 + "}").encode()),
        (J, ('{"vramguard.GCThreshold": -' + "9" * 400 + "}").encode()),
        (J, b'{"id": 5, "value": 1}'), (J, b'{"id": null, "value": 1}'), (J, b'{"id": ["x"], "value": 1}'),
        (J, b'{"id": "vramguard.GCThreshold"}'), (J, b'{"id": "vramguard.GCThreshold", "value": 40, "x": 1}'),
        (J, b'{"vramguard.GCThreshold": 40, "vramguard.Bogus": 1}'),
        (J, b'{"vramguard.GCThreshold": 40, "Comfy.Theme": "light"}'),
        (J, b'{"vramguard.GCThreshold": 40, "vramguard.ReserveGB": "two"}'),
        (J, b'{"vramguard.GCThreshold": 40, "GCThreshold": 41}'),
        (J, b'{"vramguard.LowVRAM": "yes"}'), (J, b'{"vramguard.LowVRAM": 1}'),
        (J, b'{"vramguard.GCThreshold": true}'), (J, b'{"vramguard.GCThreshold": "70"}'),
        (J, b'{"vramguard.GCThreshold": {"a": [1, {"b": 2}]}}'), (J, b'{"vramguard.LogLevel": ["INFO"]}'),
        (J, b'{"vramguard.LogLevel": {"INFO": 1}}'), (J, b'{"vramguard.MonitorRefresh": 1e400}'),
        (J, ("[" * 100000 + "]" * 100000).encode()), (J, ("[" * 30000 + "]" * 30000).encode()),
        (J, ('{"vramguard.GCThreshold": ' + "[" * 20000 + "]" * 20000 + "}").encode()),
        (J, b'{"vramguard.GCThreshold": 40, "vramguard.JsonLogPath": "notes.txt/gc.jsonl"}'),
    ]
    for path in ("default/comfy.settings.json", "../outside/x.jsonl", "/tmp/x.jsonl", "notes.txt",
                 "old.jsonl", "app.log", "escape/secret.jsonl", "escape/new.jsonl", "link.jsonl",
                 "notes.txt/gc.jsonl", "default", "", "gc.json", "gc.jsonl\x00.txt", "x" * 2000 + ".jsonl",
                 "default/comfy.settings.json.jsonl/../comfy.settings.json", "."):
        if path == "":
            continue  # empty = off, a valid value
        cases.append((J, json.dumps({"id": "vramguard.JsonLogPath", "value": path}).encode()))
        cases.append((J, json.dumps({"vramguard.GCThreshold": 10, "vramguard.JsonLogPath": path}).encode()))
    big = "A" * (10 * 1024 * 1024)
    cases.append((J, json.dumps({"id": "vramguard.LogLevel", "value": big}).encode()))
    cases.append((J, json.dumps({"vramguard.GCThreshold": 40, big: 1}).encode()))
    # seeded random junk: random keys, types and nesting
    rnd = random.Random(seed)
    keys = [settings.PREFIX + k for k in settings.SCHEMA] + ["id", "value", "vramguard.", "", "Comfy.X"]
    atoms = [None, True, False, -1, 0, 101, 65.0, 1e308, -0.0, "", "INFO", "x" * 300, [], {}, "../../etc/passwd",
             "gc.txt", 2 ** 64 + 1, -2 ** 63]
    def junk(depth=0):
        r = rnd.random()
        if depth < 4 and r < 0.15:
            return [junk(depth + 1) for _ in range(rnd.randint(0, 3))]
        if depth < 4 and r < 0.3:
            return {rnd.choice(keys): junk(depth + 1) for _ in range(rnd.randint(0, 3))}
        return rnd.choice(atoms)
    n_rand = 0
    while n_rand < 150:
        body = {rnd.choice(keys): junk() for _ in range(rnd.randint(1, 4))}
        # keep only bodies that are certainly invalid: at least one invalid value or key
        try:
            settings.settings_items(body)
            bad = False
            for k, v in settings.settings_items(body):
                try:
                    settings.validate(k, v)
                except settings.SettingError:
                    bad = True
        except (settings.BadRequest, settings.SettingError):
            bad = True
        if bad:
            cases.append((J, json.dumps(body).encode()))
            n_rand += 1
    return cases


def test_hostile_bodies_answer_400_and_change_nothing(user):
    cases = _hostile_bodies(user)
    assert len(cases) > 200

    async def go(client):
        before = await (await client.get("/vramguard/settings")).json()
        state = _state()
        files = _files(user.parent)
        failures = []
        for ctype, raw in cases:
            r = await client.post("/vramguard/settings", data=raw, headers={"Content-Type": ctype})
            text = await r.text()
            if r.status != 400 or len(text) > 400 or "error" not in json.loads(text):
                failures.append((raw[:120], r.status, text[:200]))
        after = await (await client.get("/vramguard/settings")).json()
        return before, after, state, files, failures

    before, after, state, files, failures = asyncio.run(_serve(go))
    assert not failures, failures[:5]
    assert before == after
    assert _state() == state
    assert _files(user.parent) == files  # not one file written, created or touched


def test_monitor_route_accepts_only_booleans(user):
    async def go(client):
        out = []
        for body in ({"visible": "no"}, {"visible": 1}, {"visible": None}, {}, [], {"visible": True, "x": 1}):
            r = await client.post("/vramguard/monitor", json=body)
            out.append((body, r.status, (await r.json()).get("error", "")))
        r = await client.post("/vramguard/monitor", data=b"{", headers={"Content-Type": "application/json"})
        out.append(("{", r.status, ""))
        ok = await client.post("/vramguard/monitor", json={"visible": False})
        return out, ok.status, await ok.json()

    out, ok_status, ok_body = asyncio.run(_serve(go))
    assert all(status == 400 for _, status, _ in out), out
    assert ok_status == 200 and ok_body["active"] is False


def test_valid_log_path_creates_a_marked_file_and_gc_appends(user):
    async def go(client):
        r1 = await client.post("/vramguard/settings", json={"vramguard.JsonLogPath": "logs/gc.jsonl",
                                                           "vramguard.GCThreshold": 0})
        # the same path again: now an existing file vramguard created, so it is accepted
        r2 = await client.post("/vramguard/settings", json={"id": "vramguard.JsonLogPath", "value": "logs/gc.jsonl"})
        return r1.status, r2.status, await r2.json()

    s1, s2, body = asyncio.run(_serve(go))
    assert (s1, s2) == (200, 200)
    f = user / "logs" / "gc.jsonl"
    assert body["vramguard.JsonLogPath"] == "logs/gc.jsonl" and vg.guard()._jsonl == str(f)
    assert f.read_text().splitlines() == [settings.LOG_HEADER]
    vg.gc_check("vae_decode", forced=True)
    lines = f.read_text().splitlines()
    assert lines[0] == settings.LOG_HEADER and len(lines) == 2 and json.loads(lines[1])["fn"] == "vae_decode"


def test_multi_key_post_is_all_or_none(user):
    vg.configure_gc(threshold=70)

    async def go(client):
        r = await client.post("/vramguard/settings", json={"vramguard.GCThreshold": 10, "vramguard.ReserveGB": 2.0,
                                                           "vramguard.JsonLogPath": "notes.txt/x.jsonl"})
        return r.status, await r.json()

    status, body = asyncio.run(_serve(go))
    assert status == 400 and "notes.txt" in body["error"]
    assert vg.guard().policy.threshold == 70 and vg.limits()["reserve"] == GiB


def test_error_messages_are_short(user):
    with pytest.raises(settings.SettingError) as ei:
        settings.validate("vramguard.LogLevel", "B" * 10_000_000)
    assert len(str(ei.value)) < 300
    with pytest.raises(settings.SettingError) as ei:
        settings.validate("vramguard.GCThreshold", 10 ** 400)
    assert len(str(ei.value)) < 300


def test_saved_invalid_values_fall_back_to_defaults(user, caplog):
    """ComfyUI stores a value our route rejected; on the next start Python must not use it."""
    f = user / "default" / "comfy.settings.json"
    f.write_text(json.dumps({"vramguard.JsonLogPath": "default/comfy.settings.json",
                             "vramguard.GCThreshold": 10 ** 400, "vramguard.LowVRAM": "no",
                             "vramguard.LogLevel": {"x": 1}, "vramguard.MonitorWarn": 50}))
    mtime = f.stat().st_mtime_ns
    vals = settings.load_saved(str(f))
    assert vals["vramguard.JsonLogPath"] == "" and vg.guard()._jsonl is None
    assert vals["vramguard.GCThreshold"] == 70.0 and vals["vramguard.LowVRAM"] is False
    assert vals["vramguard.LogLevel"] == "INFO" and vals["vramguard.MonitorWarn"] == 50
    assert f.stat().st_mtime_ns == mtime
    warnings = [r.getMessage() for r in caplog.records if "saved settings ignored" in r.getMessage()]
    assert len(warnings) == 1 and "JsonLogPath" in warnings[0] and "GCThreshold" in warnings[0]


def test_register_routes_without_a_server_instance(monkeypatch, caplog):
    """ComfyUI >= 0.30: `server` imports outside a running server, PromptServer.instance does not exist."""
    fake = types.ModuleType("server")

    class PromptServer:  # no `instance` attribute
        pass

    fake.PromptServer = PromptServer
    monkeypatch.setitem(sys.modules, "server", fake)
    caplog.set_level("INFO", logger="vramguard")
    assert settings.register_routes() is False
    assert any("PromptServer.instance" in r.getMessage() for r in caplog.records)
    # with an instance, the routes are registered on it
    PromptServer.instance = types.SimpleNamespace(routes=web.RouteTableDef(), send_sync=lambda e, d: None)
    assert settings.register_routes() is True
    paths = {r.path for r in PromptServer.instance.routes}
    assert {"/vramguard/settings", "/vramguard/monitor", "/vramguard/settings/schema"} <= paths


def test_importing_the_pack_outside_a_server(monkeypatch):
    """The pack's __init__ imports cleanly with a `server` module whose PromptServer has no instance."""
    import importlib
    fake = types.ModuleType("server")
    fake.PromptServer = type("PromptServer", (), {})
    monkeypatch.setitem(sys.modules, "server", fake)
    import vramguard_nodes
    importlib.reload(vramguard_nodes)
    assert vramguard_nodes.NODE_CLASS_MAPPINGS


def test_status_shows_the_reserve_in_force(user):
    """A Set Reserve node (vg.set_reserve) overrides the dialog's value: /vramguard/status says both."""
    vg.simulate("8GB", "1GB")
    vg.set_reserve("3GB")

    async def go(client):
        r = await client.get("/vramguard/status")
        return r.status, await r.json()

    status, body = asyncio.run(_serve(go))
    assert status == 200
    assert body["reserve_setting"] == GiB and body["devices"][0]["reserve"] == 3 * GiB
