"""A real browser for the tests: Debian's chromium, headless, driven over the
DevTools protocol with websocket-client (no Selenium, no driver binary).

`open_page(path)` loads a local HTML file and reports what a person's browser
would have done with it: console errors, uncaught exceptions, every network
request other than the file itself (data: URLs aside), and lets a test
evaluate JavaScript in the page and take a screenshot.

Chromium comes from `make chromium` (the Debian package); without it the
tests that use this fail, saying so, rather than skip.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websocket

CHROMIUM = os.environ.get("AUTODIDACT_CHROMIUM", "/usr/bin/chromium")
START_SECONDS = 30
CALL_SECONDS = 30
_DEVTOOLS_URL = re.compile(r"DevTools listening on (ws://\S+)")


class ChromiumMissing(RuntimeError):
    pass


def chromium_path() -> str:
    """The chromium binary; raises (the test fails, not skips) when there is none."""
    path = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if not path:
        raise ChromiumMissing(f"no chromium at {CHROMIUM} nor on PATH: the browser tests need it; run `make chromium` (Debian's package)")
    return path


@dataclass
class Page:
    """One tab on a loaded file, with what happened while it loaded (and since)."""

    _socket: websocket.WebSocket
    _session: str
    url: str
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL the page asked for, its own included
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = CALL_SECONDS) -> dict[str, Any]:
        """Sends one command to the page's session and returns its result, recording the events that arrive meanwhile."""
        call_id = next(self._ids)
        self._socket.send(json.dumps({"id": call_id, "method": method, "params": params or {}, "sessionId": self._session}))
        deadline = time.monotonic() + timeout
        while True:
            message = self._receive(deadline, method)
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def wait_for(self, event: str, timeout: float = CALL_SECONDS) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            message = self._receive(deadline, event)
            if message.get("method") == event:
                return message.get("params", {})

    def settle(self, seconds: float = 0.5) -> None:
        """Reads the events of the next `seconds` (a late script error, a late request)."""
        deadline = time.monotonic() + seconds
        with contextlib.suppress(TimeoutError):
            while True:
                self._receive(deadline, "")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    @property
    def external_requests(self) -> list[str]:
        """Requests for anything but the page's own file (data: URLs are inline, not fetched)."""
        return [url for url in self.requests if url != self.url and not url.startswith("data:")]

    def _receive(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"chromium did not answer {waiting_for or 'in time'}")
        self._socket.settimeout(remaining)
        try:
            message = json.loads(self._socket.recv())
        except websocket.WebSocketTimeoutException:
            raise TimeoutError(f"chromium did not answer {waiting_for or 'in time'}") from None
        self._record(message)
        return message

    def _record(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.console_errors.append("console.error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.console_errors.append("uncaught: " + str(details.get("exception", {}).get("description", details.get("text", ""))))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.console_errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())
        elif method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])


@contextlib.contextmanager
def open_page(path: Path, width: int = 1200, height: int = 1600) -> Iterator[Page]:
    """Starts a headless chromium, loads `path` (a local file) in a `width`×`height` viewport and yields the page."""
    binary = chromium_path()
    profile = tempfile.mkdtemp(prefix="autodidact-chromium-")
    command = [
        binary,
        "--headless=new",
        "--no-sandbox",  # containers and CI run as root, where chromium's sandbox refuses to start
        "--disable-gpu",
        "--remote-debugging-port=0",  # chromium picks a free port and prints it
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--hide-scrollbars",
        "about:blank",
    ]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    socket = None
    try:
        socket = websocket.create_connection(_devtools_url(process), timeout=CALL_SECONDS, suppress_origin=True)
        url = path.resolve().as_uri()
        page = _attach(socket)
        page.url = url
        for domain in ("Runtime", "Log", "Network", "Page"):
            page.call(f"{domain}.enable")
        page.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        page.call("Page.navigate", {"url": url})
        page.wait_for("Page.loadEventFired")
        page.settle()
        yield page
    finally:
        if socket is not None:
            socket.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_url(process: subprocess.Popen[str]) -> str:
    """The browser's DevTools websocket, from the line chromium prints on stderr once it listens.
    A thread reads stderr to its end: chromium keeps writing there, and a full pipe would stall it."""
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, name="chromium-stderr", daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + START_SECONDS
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if line is None:  # chromium exited
            break
        seen.append(line.rstrip())
        if match := _DEVTOOLS_URL.search(line):
            return match.group(1)
    raise RuntimeError(f"chromium printed no DevTools URL within {START_SECONDS} s (exit {process.poll()}):\n" + "\n".join(seen[-20:]))


def _attach(socket: websocket.WebSocket) -> Page:
    """A fresh tab and a flat session on it, over the browser's own socket."""
    ids = itertools.count(1)

    def browser_call(method: str, params: dict[str, Any]) -> dict[str, Any]:
        call_id = next(ids)
        socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(socket.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    target = browser_call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser_call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    return Page(socket, session, url="", _ids=itertools.count(1000))
