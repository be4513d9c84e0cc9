"""A real ``ddim serve`` process and a headless Chromium driven over the DevTools protocol, for the tests
and scripts/serve_bench.py (not a test module)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server(*args: str, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """``python -m ddim serve --port 0 ...`` in a subprocess; returns it and its URL once it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddim", "serve", "--port", "0", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"ddim serve did not start: {''.join(lines)}")


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """Ctrl-C (SIGINT) the server; returns its remaining stderr. Fails unless it exits 0 in time."""
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    assert proc.returncode == 0, err
    return err


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    given = os.environ.get("DDIM_CHROMIUM")
    if given:
        return given
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


class Browser:
    """Headless Chromium and one page, over the DevTools protocol (CDP) on a websocket."""

    def __init__(self, binary: str, profile: str) -> None:
        self.proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",  # tests run as root in CI containers
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "--window-size=1400,1200",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        ws_url, seen = None, []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and ws_url is None:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            seen.append(line)
            if "DevTools listening on " in line:
                ws_url = line.split("DevTools listening on ", 1)[1].strip()
        if ws_url is None:
            self.proc.kill()
            raise RuntimeError(f"chromium did not start: {''.join(seen)[-2000:]}")
        port = ws_url.split("//", 1)[1].split("/", 1)[0]
        with urllib.request.urlopen(f"http://{port}/json/list", timeout=30) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        import websocket  # websocket-client (the test extra)

        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=120, suppress_origin=True)
        self.next_id = 0

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        """Evaluate in the page (promises awaited); returns the value."""
        r = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page error: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expression: str, timeout: float = 60.0, what: str = ""):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.js(expression)
            if v:
                return v
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what or expression}; page status: {self.status()}")

    def status(self) -> str:
        return self.js("[...document.querySelectorAll('.status')].map(e => e.id + ': ' + e.textContent).join(' | ')")

    def center(self, selector: str, fx: float = 0.5, fy: float = 0.5) -> tuple[float, float]:
        r = self.js(f"(() => {{ const r = document.querySelector('{selector}').getBoundingClientRect();"
                    f" return [r.left, r.top, r.width, r.height]; }})()")  # fmt: skip
        return r[0] + fx * r[2], r[1] + fy * r[3]

    def drag(self, points: list[tuple[float, float]], pause: float = 0.03) -> None:
        """Press at the first point, move through the others, release at the last (a real mouse drag)."""
        x, y = points[0]
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        self.send("Input.dispatchMouseEvent", type="mousePressed", x=x, y=y, button="left", clickCount=1)
        for x, y in points[1:]:
            self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, button="left", buttons=1)
            time.sleep(pause)
        self.send("Input.dispatchMouseEvent", type="mouseReleased", x=x, y=y, button="left", clickCount=1)

    def image_bytes(self, img_id: str) -> bytes:
        b64 = self.js(
            f"(async () => {{ const b = new Uint8Array(await (await fetch(document.getElementById('{img_id}').src))"
            f".arrayBuffer()); let s = ''; for (const c of b) s += String.fromCharCode(c); return btoa(s); }})()"
        )
        return base64.b64decode(b64)

    def loads(self, img_id: str) -> int:
        return int(self.js(f"document.getElementById('{img_id}').dataset.loads") or 0)

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
