"""The real ComfyUI frontend in a headless Chromium, with this checkout's node pack.

Shared by tests/test_frontend_browser.py and scripts/screenshots.py.  The server is
tests/test_comfyui_real.py's (ComfyUI with --cpu in a temporary --base-directory); the pack is
a copy of this checkout in custom_nodes/vramguard (the git-clone route, so the JS served is
this tree's nodes/web/vramguard.js; the compiled core is the one VRAMGUARD_COMFYUI_PYTHON
imports).  NVML is tests/fakelibs/fake_nvml.c (VRAMGUARD_NVML_LIB), so the monitor has GPUs to
show on a machine without one: its figures are the FAKE_NVML_* values below, not a card's.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(REPO / "tests"), str(HERE)]

from cdp import Browser, CDPError, find_chromium  # noqa: E402

GiB = 1 << 30
# two stand-in GPUs: (total, used by all processes) bytes; this process uses PROC_USED on each
FAKE_GPUS = ((24 * GiB, 11 * GiB), (12 * GiB, 3 * GiB))
PROC_USED = 2 * GiB
CLONE_IGNORE = shutil.ignore_patterns(".git", ".venv*", "build", "*.so", "__pycache__", ".pytest_cache",
                                      "*.egg-info", "docs")


def host_module():
    """tests/test_comfyui_real.py (its Comfy server class and base-folder builder); import it only
    once VRAMGUARD_COMFYUI is known to be usable, or it skips the caller's module."""
    import test_comfyui_real

    return test_comfyui_real


def build_fake_nvml(out_dir: Path) -> Path:
    out = out_dir / "libfake-nvml.so"
    subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-O1", "-o", str(out),
                    str(REPO / "tests" / "fakelibs" / "fake_nvml.c")], check=True, capture_output=True)
    return out


def placeholder_models(base: Path) -> None:
    """Empty files named as the example workflows' loaders name them, and their input image, so
    that the frontend lists them (nothing is run: the files are never loaded)."""
    from PIL import Image

    folders = {"CheckpointLoaderSimple": "checkpoints", "UpscaleModelLoader": "upscale_models",
               "VAELoader": "vae"}
    for path in sorted((REPO / "example_workflows").glob("*.json")):
        for node in json.loads(path.read_text())["nodes"]:
            values = node.get("widgets_values") or [None]
            if node["type"] in folders and isinstance(values[0], str):
                d = base / "models" / folders[node["type"]]
                d.mkdir(parents=True, exist_ok=True)
                (d / values[0]).touch()
            elif node["type"] == "LoadImage" and isinstance(values[0], str):
                (base / "input").mkdir(exist_ok=True)
                Image.new("RGB", (96, 64), (200, 120, 40)).save(base / "input" / values[0])


def pack_base(path: Path, models: Path | None = None) -> Path:
    """A ComfyUI --base-directory with the test pack and this checkout as custom_nodes/vramguard."""
    if models is None:
        models = path.parent / "no_models"
        models.mkdir(parents=True, exist_ok=True)
    base = host_module()._make_base(path, models)
    shutil.copytree(REPO, base / "custom_nodes" / "vramguard", ignore=CLONE_IGNORE)
    return base


class Frontend:
    """ComfyUI with the pack, and a Chromium page on its frontend (ready when __init__ returns)."""

    def __init__(self, work: Path, width: int = 1400, height: int = 900, models: Path | None = None,
                 placeholders: bool = False, settings: dict | None = None):
        R = host_module()
        self.R, self.work = R, work
        base = pack_base(work / "comfy_base", models)
        if placeholders:
            placeholder_models(base)
        # no first-run templates dialog over the page
        (base / "user" / "default" / "comfy.settings.json").write_text(
            json.dumps({"Comfy.TutorialCompleted": True, **(settings or {})}))
        env = {"VRAMGUARD_NVML_LIB": str(build_fake_nvml(work)),
               "FAKE_NVML_DEVICES": ",".join(f"{t}:{u}" for t, u in FAKE_GPUS),
               "FAKE_NVML_PROC_USED": str(PROC_USED)}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the server inherits them
        try:
            self.comfy = R.Comfy(base)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.url = self.comfy.url
        try:
            self.page = Browser(find_chromium(), width, height)
            self.page.goto(self.url)
            self.page.wait_for("!!(window.app && app.graph && app.extensionManager && app.vueAppReady)", 120)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if getattr(self, "page", None):
            self.page.close()
        self.comfy.stop()

    # ------------------------------------------------------------------ helpers
    def escape(self, tries: int = 4) -> None:
        """Close dialogs as a user would (Escape, focus out of any field first); raises if one stays."""
        for _ in range(tries):
            self.page.eval("document.activeElement?.blur?.()")
            self.page.press("Escape", 27)
            time.sleep(0.3)
            if not self.page.eval("!!document.querySelector('[role=dialog]')"):
                return
        raise CDPError("a dialog stays open after Escape")

    def center(self, js_element: str) -> tuple:
        """The centre (CSS px) of the element a JS expression names, scrolled into view."""
        r = self.page.eval(f"(() => {{ const e = {js_element}; if (!e) return null; e.scrollIntoView({{block: 'nearest'}});"
                           "const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        if not r:
            raise CDPError(f"no element: {js_element}")
        return tuple(r)

    def stable_center(self, js_element: str, timeout: float = 10) -> tuple:
        """center(), once the element has stopped moving (dialogs animate in, and their lists grow
        as they load: a click on a moving target can land on the backdrop and close the dialog)."""
        deadline, last = time.time() + timeout, None
        while True:
            now = self.center(js_element)
            if now == last or time.time() > deadline:
                return now
            last = now
            time.sleep(0.3)

    def click_text(self, scope: str, text: str, timeout: float = 15) -> None:
        """Click the innermost element under `scope` (a CSS selector) whose text is exactly `text`."""
        js = (f"[...document.querySelectorAll({json.dumps(scope + ' *')})]"
              f".find((e) => e.children.length === 0 && e.textContent.trim() === {json.dumps(text)})")
        deadline = time.time() + timeout
        while True:  # the element can be re-rendered (detached) while the dialog loads: find it again
            try:
                self.page.wait_for(f"!!({js})", max(1.0, deadline - time.time()))
                self.page.click(*self.stable_center(js))
                return
            except CDPError:
                if time.time() > deadline:
                    raise

    def rect(self, selector: str) -> dict | None:
        return self.page.eval(f"document.querySelector({json.dumps(selector)})?.getBoundingClientRect().toJSON()")

    def open_settings(self, category: str = "vramguard") -> None:
        self.page.eval("app.extensionManager.command.execute('Comfy.ShowSettingsDialog')")
        self.click_text("[role=dialog]", category)
        self.page.wait_for("!!document.querySelector('[role=dialog] [id=\"vramguard.LowVRAM\"]')", 15)

    def open_templates(self, module: str = "vramguard", card: str | None = None) -> None:
        """The templates browser at `module`'s section (until `card`'s card shows, if given)."""
        js = "!!document.querySelector(" + json.dumps(f'[data-testid="template-workflow-{card or ""}"]'
                                                      if card else '[data-testid^="template-workflow-"]') + ")"
        for attempt in range(4):
            try:
                if not self.page.eval("!!document.querySelector('[role=dialog]')"):
                    self.page.eval("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
                    self.page.wait_for("!!document.querySelector('[role=dialog]')", 5)
                self.click_text("[role=dialog]", module, timeout=15)
                self.page.wait_for(js, 5)
                return
            except CDPError:  # the command came while the last dialog was closing, or the click missed
                if attempt == 3:  # (the list was still moving): again
                    raise

    def load_template(self, name: str) -> None:
        """Open the templates browser and click a template's card (the frontend fetches and loads it)."""
        self.open_templates(card=name)
        sel = f'[data-testid="template-workflow-{name}"]'
        self.page.click(*self.stable_center(f"document.querySelector({json.dumps(sel)})"))
        self.page.wait_for("!document.querySelector('[role=dialog]')", 30)

    def graph_rect(self, pad: float = 16) -> dict:
        """The open graph's nodes' bounding box on the screen (CSS px), padded, inside the window."""
        return self.page.eval(f"""(() => {{
          const ds = app.canvas.ds, c = app.canvas.canvas.getBoundingClientRect();
          let x0 = 1e9, y0 = 1e9, x1 = -1e9, y1 = -1e9;
          for (const n of app.graph.nodes) {{
            const b = n.boundingRect;  // [x, y, w, h] in graph units, the title included
            x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
            x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
          }}
          const sx = (x) => c.left + (x + ds.offset[0]) * ds.scale, sy = (y) => c.top + (y + ds.offset[1]) * ds.scale;
          const l = Math.max(c.left, sx(x0) - {pad}), t = Math.max(c.top, sy(y0) - {pad});
          const r = Math.min(c.right, sx(x1) + {pad}), b = Math.min(c.bottom, sy(y1) + {pad});
          return {{ x: l, y: t, width: r - l, height: b - t }};
        }})()""")

    def graph_nodes(self) -> list:
        """[type, registered?, class name] of every node in the open graph."""
        return self.page.eval("app.graph.nodes.map((n) => [n.type, !!LiteGraph.registered_node_types[n.type], "
                              "n.constructor?.name || ''])")

    def errors(self, needle: str = "vramguard") -> list:
        """Console errors, uncaught exceptions and failed loads that mention `needle` (URL, text or stack)."""
        return [e for e in self.page.log if e["level"] in ("error", "exception", "assert")
                and needle in (e["url"] + " " + e["text"] + " " + " ".join(e.get("stack", [])))]
