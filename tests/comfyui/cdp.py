"""A headless Chromium driven over the Chrome DevTools Protocol, standard library only.

Chromium is started with --remote-debugging-pipe: it reads protocol messages from fd 3 and
writes them to fd 4, each a JSON object ended by a NUL byte.  No chromedriver, no websocket and
no PyPI package are needed, only Debian's `chromium`.  One page (a flat-mode session) per
Browser; everything the page logs is kept: console calls, uncaught exceptions and the browser's
own log entries (failed loads, CSP, ...), with the script URLs of the stack each came from.
"""
import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class CDPError(RuntimeError):
    pass


class Browser:
    def __init__(self, chromium: str, width: int = 1400, height: int = 900, timeout: float = 60):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="vg_chromium_")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        self.proc = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--mute-audio", "--hide-scrollbars",
             f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=lambda: _dup_pipes(to_child_r, from_child_w))
        os.close(to_child_r)
        os.close(from_child_w)
        self._next_id = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._replies: dict = {}
        self.events: list = []          # (method, params) of every event of the page's session
        self.log: list = []             # {"level", "text", "url"}: console, exceptions, browser log
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session = None
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")
        self.resize(width, height)

    # ------------------------------------------------------------------ transport
    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_child, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                self._dispatch(json.loads(raw))
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _dispatch(self, msg: dict) -> None:
        if "id" in msg:
            with self._cond:
                self._replies[msg["id"]] = msg
                self._cond.notify_all()
            return
        method, params = msg.get("method", ""), msg.get("params", {})
        if msg.get("sessionId") != self.session:
            return
        self.events.append((method, params))
        if method == "Runtime.consoleAPICalled":
            frames = (params.get("stackTrace") or {}).get("callFrames") or [{}]
            text = " ".join(_remote_text(a) for a in params.get("args", []))
            self.log.append({"level": params.get("type", "log"), "text": text, "url": frames[0].get("url", ""),
                             "stack": list(dict.fromkeys(f.get("url", "") for f in frames))})
        elif method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            exc = d.get("exception") or {}
            frames = (d.get("stackTrace") or {}).get("callFrames") or [{}]
            self.log.append({"level": "exception", "text": f"{d.get('text', '')} {exc.get('description', '')}".strip(),
                             "url": d.get("url") or frames[0].get("url", ""),
                             "stack": list(dict.fromkeys(f.get("url", "") for f in frames))})
        elif method == "Log.entryAdded":
            e = params.get("entry", {})
            frames = (e.get("stackTrace") or {}).get("callFrames") or []
            self.log.append({"level": e.get("level", ""), "text": e.get("text", ""), "url": e.get("url", ""),
                             "stack": list(dict.fromkeys(f.get("url", "") for f in frames))})

    def call(self, method: str, params: dict | None = None, timeout: float | None = None) -> dict:
        with self._lock:
            self._next_id += 1
            mid = self._next_id
        msg = {"id": mid, "method": method, "params": params or {}}
        if self.session:
            msg["sessionId"] = self.session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._to_child, data):]
        deadline = time.time() + (timeout or self.timeout)
        with self._cond:
            while mid not in self._replies:
                left = deadline - time.time()
                if self._closed or left <= 0:
                    raise CDPError(f"{method}: {'chromium exited' if self._closed else 'no reply'}")
                self._cond.wait(left)
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    # ------------------------------------------------------------------ page
    def resize(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})

    def eval(self, expr: str, timeout: float | None = None):
        """The value of a JS expression (awaited when it is a promise); JS exceptions raise."""
        r = self.call("Runtime.evaluate", {"expression": expr, "awaitPromise": True, "returnByValue": True,
                                           "userGesture": True}, timeout)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise CDPError(f"JS: {(d.get('exception') or {}).get('description') or d.get('text')}\n  in: {expr[:300]}")
        return r.get("result", {}).get("value")

    def wait_for(self, expr: str, timeout: float = 60, every: float = 0.25):
        """Poll a JS expression until it is truthy; its value.  Raises on timeout with the last value."""
        deadline, last = time.time() + timeout, None
        while time.time() < deadline:
            try:
                last = self.eval(expr)
            except CDPError as e:
                last = str(e)
            else:
                if last not in (None, False, 0, ""):  # JS truthy ({} and [] are, 0 and "" are not)
                    return last
            time.sleep(every)
        raise CDPError(f"timed out after {timeout} s waiting for: {expr[:300]} (last: {str(last)[:300]})")

    def mouse(self, x: float, y: float, kind: str = "mouseMoved", button: str = "none") -> None:
        self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": button,
                                               "clickCount": 1 if kind != "mouseMoved" else 0})

    def click(self, x: float, y: float) -> None:
        self.mouse(x, y)
        self.mouse(x, y, "mousePressed", "left")
        self.mouse(x, y, "mouseReleased", "left")

    def key_text(self, text: str) -> None:
        """Insert text at the caret (one input event, no key events)."""
        self.call("Input.insertText", {"text": text})

    def press(self, key: str, vk: int, modifiers: int = 0, text: str | None = None) -> None:
        """One key, down and up, as a keyboard sends it (modifiers: 2 = Ctrl)."""
        down = {"type": "keyDown" if text else "rawKeyDown", "key": key, "windowsVirtualKeyCode": vk,
                "modifiers": modifiers}
        if text:
            down["text"] = text
        self.call("Input.dispatchKeyEvent", down)
        self.call("Input.dispatchKeyEvent", {"type": "keyUp", "key": key, "windowsVirtualKeyCode": vk,
                                             "modifiers": modifiers})

    def type(self, text: str) -> None:
        """Type printable ASCII key by key."""
        for ch in text:
            self.press(ch, ord(ch.upper()), text=ch)

    def screenshot(self, path: str, clip: dict | None = None, scale: float = 1, fmt: str = "png",
                   quality: int = 85) -> None:
        """A PNG (or JPEG) of the viewport, or of clip {x, y, width, height} (CSS pixels) times scale."""
        params = {"format": fmt}
        if fmt == "jpeg":
            params["quality"] = quality
        if clip:
            params["clip"] = {**clip, "scale": scale}
        data = self.call("Page.captureScreenshot", params)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.session = None
            self.call("Browser.close", timeout=10)
        except (CDPError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


def _dup_pipes(read_fd: int, write_fd: int) -> None:
    """In the child: the protocol's read end on fd 3 and its write end on fd 4."""
    r, w = os.dup(read_fd), os.dup(write_fd)  # never clobbered by the dup2 calls below
    os.dup2(r, 3)  # inheritable; everything else Python opened is not (PEP 446), so closes at exec
    os.dup2(w, 4)


def _remote_text(obj: dict) -> str:
    if "value" in obj:
        return str(obj["value"])
    return obj.get("description") or obj.get("unserializableValue") or obj.get("type", "")
