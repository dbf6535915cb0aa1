"""The web page at ``/`` in a real headless Chromium (Debian's ``chromium``, driven over the DevTools protocol):
generate a spoken digit and a molecule and check that the clip (audio player + spectrogram) and the molecule
picture with its SDF download appear. ``MULTIDIFF_SCREENSHOT=path.png`` saves a screenshot of the page."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
websockets_sync = pytest.importorskip("websockets.sync.client")

from serve_util import ROOT, Server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's chromium)"),
    pytest.mark.skipif(not (ROOT / "data" / "checkpoints" / "audio.safetensors").is_file(), reason="shipped checkpoints not present"),
]


class Page:
    """A minimal DevTools-protocol client for one page target."""

    def __init__(self, ws: object) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    def call(self, method: str, **params: object) -> dict:
        """Send a command and wait for its answer (events in between are ignored)."""
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str) -> object:
        """Evaluate JavaScript in the page and return its (JSON) value."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 180.0) -> object:
        """Poll ``expression`` until it is truthy."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        status = self.js("document.getElementById('status').textContent")
        raise TimeoutError(f"page: {expression} still false after {timeout} s; status: {status}")


@pytest.fixture(scope="module")
def server():
    srv = Server("--max-batch", "4", "--max-wait-ms", "50")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(server):
    profile = tempfile.mkdtemp(prefix="multidiff-chromium-")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1280,900", server.url + "/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        targets = []
        while not targets and time.monotonic() < deadline:
            targets = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json() if t["type"] == "page"]
            time.sleep(0.2)
        with websockets_sync.connect(targets[0]["webSocketDebuggerUrl"], max_size=2**26, open_timeout=30) as ws:
            p = Page(ws)
            p.wait("document.body && document.body.dataset.state === 'ready'", timeout=60)
            yield p
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def _generate(page: Page, domain: str, steps: int, num: int, extra: str = "") -> None:
    page.js(f"""(() => {{ const d = document.getElementById('domain'); d.value = '{domain}'; d.dispatchEvent(new Event('change'));
        document.getElementById('steps').value = '{steps}'; document.getElementById('num').value = '{num}';
        document.getElementById('seed').value = '1'; {extra} document.getElementById('go').click(); return true; }})()""")
    page.wait("document.body.dataset.state === 'done' || document.body.dataset.state === 'error'")
    assert page.js("document.body.dataset.state") == "done", page.js("document.getElementById('status').textContent")


def test_page_generates_a_clip_and_a_molecule(page) -> None:
    _generate(page, "audio", steps=3, num=2, extra="document.querySelector('#digits button[data-label=\"3\"]').click();")
    clips = page.wait("document.querySelectorAll('#results audio.clip').length === 2 && "
                      "[...document.querySelectorAll('#results img.spectrogram')].every(i => i.complete && i.naturalWidth > 0)")
    assert clips
    assert "three" in page.js("document.querySelector('#results .card .meta').textContent")
    assert page.js("document.getElementById('bar').value") == 1
    # the player can load the WAV: its duration is the clip's second
    duration = page.wait("(() => { const a = document.querySelector('#results audio.clip'); return a.readyState >= 1 ? a.duration : 0; })()",
                         timeout=30)
    assert abs(float(duration) - 1.0) < 0.05  # type: ignore[arg-type]
    shot = os.environ.get("MULTIDIFF_SCREENSHOT")
    audio_png = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"]) if shot else b""

    _generate(page, "molecules", steps=4, num=2, extra="document.getElementById('atoms').value = '12';")
    assert page.wait("[...document.querySelectorAll('#results img.molecule')].length === 2 && "
                     "[...document.querySelectorAll('#results img.molecule')].every(i => i.complete && i.naturalWidth > 0)")
    assert page.js("document.querySelectorAll('#results a.sdf[download]').length") == 2
    sdf = page.js("fetch(document.querySelector('#results a.sdf').href).then(r => r.text())")
    assert "V2000" in str(sdf) and "M  END" in str(sdf)
    if shot:
        Path(shot).write_bytes(audio_png)
        Path(shot).with_name(Path(shot).stem + "_molecules.png").write_bytes(
            base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"]))
