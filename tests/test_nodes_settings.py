"""The pack's settings (validation, the route, saved values, the monitor) and the pip route's
loader writer: no torch needed."""
import asyncio
import json

import pytest

import vramguard as vg
from vramguard import comfy_install
from vramguard_nodes import settings

GiB = 1 << 30


@pytest.fixture(autouse=True)
def own_sampler(monkeypatch):
    """A process-wide sampler made here (monitor payloads) does not outlive the test."""
    from vramguard import sampling
    monkeypatch.setattr(sampling, "_default", None)


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize("key,value", [("LowVRAM", "yes"), ("ReserveGB", -1), ("ReserveGB", float("nan")),
                                       ("ReserveGB", 1000), ("GCThreshold", 101), ("GCThreshold", "70"),
                                       ("LogLevel", "LOUD"), ("MonitorRefresh", -0.5), ("Nope", 1),
                                       ("JsonLogPath", "../../etc/passwd"), ("JsonLogPath", "/tmp/x.jsonl"),
                                       ("MonitorWarn", True), ("GCThreshold", 10 ** 400),
                                       ("JsonLogPath", "default/comfy.settings.json"), ("JsonLogPath", "gc.txt"),
                                       (5, 1), (None, 1), ("LogLevel", ["INFO"])])
def test_setting_validation_rejects(key, value, tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMGUARD_USER_DIR", str(tmp_path))
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "comfy.settings.json").write_text("{}")
    with pytest.raises(settings.SettingError):
        settings.validate(key, value)


class FakeRequest:
    """What handle_post reads of an aiohttp request: content_type, content_length, read()."""
    content_type = "application/json"

    def __init__(self, body):
        self.raw = b"{not json" if isinstance(body, Exception) else json.dumps(body).encode()
        self.content_length = len(self.raw)

    async def read(self):
        return self.raw


def _post(body):
    web = pytest.importorskip("aiohttp.web", reason="aiohttp (ComfyUI's server) not installed")
    resp = asyncio.run(settings.handle_post(FakeRequest(body), web))
    return resp.status, json.loads(resp.body)


def test_settings_route_validates_and_applies(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMGUARD_USER_DIR", str(tmp_path))
    vg.configure_gc(threshold=70)
    status, body = _post({"id": "vramguard.GCThreshold", "value": 150})
    assert status == 400 and "GCThreshold must be 0..100" in body["error"]
    assert vg.guard().policy.threshold == 70
    status, body = _post({"vramguard.GCThreshold": 40, "vramguard.ReserveGB": "two"})  # all or nothing
    assert status == 400 and vg.guard().policy.threshold == 70
    status, body = _post({"id": "vramguard.GCThreshold", "value": 40})
    assert status == 200 and body["vramguard.GCThreshold"] == 40 and vg.guard().policy.threshold == 40
    status, _ = _post({"vramguard.ReserveGB": 2.5, "vramguard.LowVRAM": True})
    assert status == 200 and vg.limits()["reserve"] == int(2.5 * GiB) and vg.guard().low_vram
    status, _ = _post({"id": "vramguard.JsonLogPath", "value": "logs/gc.jsonl"})
    assert status == 200 and vg.guard()._jsonl == str((tmp_path / "logs" / "gc.jsonl").resolve())
    for bad in (ValueError("not json"), [1, 2], {}, {"id": 5, "value": 1}):
        assert _post(bad)[0] == 400
    settings.load_saved(str(tmp_path / "missing.json"))  # back to defaults for other tests


def test_saved_settings_and_defaults(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VRAMGUARD_USER_DIR", str(tmp_path))
    f = tmp_path / "comfy.settings.json"
    f.write_text(json.dumps({"vramguard.GCThreshold": 55, "vramguard.ReserveGB": -3,
                             "Comfy.SomethingElse": 1}))
    vals = settings.load_saved(str(f))
    assert vals["vramguard.GCThreshold"] == 55 and vg.guard().policy.threshold == 55
    assert vals["vramguard.ReserveGB"] == 1.0 and vg.limits()["reserve"] == GiB  # bad saved -> default
    assert vals["vramguard.LowVRAM"] is False and vals["vramguard.MonitorRefresh"] == 2.0
    assert any("saved settings ignored" in r.getMessage() and "ReserveGB" in r.getMessage() for r in caplog.records)
    f.write_text("{not json")
    vals = settings.load_saved(str(f))
    assert vals["vramguard.GCThreshold"] == 70.0
    schema = settings.schema_for_web()
    assert {s["id"] for s in schema} == set(vals) and all(s["tooltip"] for s in schema)


def test_monitor_idles_when_hidden_or_off():
    sent = []
    settings.apply("MonitorRefresh", 0.2)
    settings.monitor.visible(True, lambda ev, data: sent.append((ev, data)))
    import time
    time.sleep(0.6)
    assert sent and sent[0][0] == "vramguard.monitor" and "ram" in sent[0][1]
    settings.monitor.visible(False, None)
    n = len(sent)
    time.sleep(0.5)
    assert len(sent) <= n + 1
    settings.apply("MonitorRefresh", 2.0)


# ------------------------------------------------------------------ the pip route's loader
def _fake_comfyui(root):
    (root / "comfy").mkdir(parents=True)
    (root / "custom_nodes").mkdir()
    (root / "main.py").write_text("# fake\n")
    return root


def test_loader_writer_install_idempotent_uninstall(tmp_path):
    root = _fake_comfyui(tmp_path / "ComfyUI")
    msg = comfy_install.install_loader(str(root))
    init = root / "custom_nodes" / "vramguard_loader" / "__init__.py"
    assert msg.startswith("installed") and init.read_text().startswith(comfy_install.MARKER)
    assert "from vramguard_nodes import NODE_CLASS_MAPPINGS" in init.read_text()
    assert comfy_install.install_loader(str(root)).startswith("already installed")
    assert comfy_install.uninstall_loader(str(root)).startswith("removed")
    assert not init.parent.exists()
    assert comfy_install.uninstall_loader(str(root)).startswith("not installed")


def test_loader_writer_refuses_foreign_folders_and_bad_paths(tmp_path):
    root = _fake_comfyui(tmp_path / "ComfyUI")
    foreign = root / "custom_nodes" / "vramguard_loader"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("# someone else's\n")
    with pytest.raises(ValueError, match="not written by vramguard"):
        comfy_install.install_loader(str(root))
    with pytest.raises(ValueError, match="not written by vramguard"):
        comfy_install.uninstall_loader(str(root))
    assert (foreign / "__init__.py").read_text() == "# someone else's\n"
    with pytest.raises(ValueError, match="does not look like ComfyUI"):
        comfy_install.install_loader(str(tmp_path))
    with pytest.raises(ValueError, match="not a folder"):
        comfy_install.install_loader(str(tmp_path / "nope"))


def test_install_comfyui_cli(tmp_path):
    import subprocess
    import sys
    root = _fake_comfyui(tmp_path / "ComfyUI")
    r = subprocess.run([sys.executable, "-m", "vramguard", "install-comfyui", str(root)], capture_output=True, text=True)
    assert r.returncode == 0 and "installed" in r.stdout
    r = subprocess.run([sys.executable, "-m", "vramguard", "install-comfyui", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "not a folder" in r.stderr
