"""The incident pages in a real headless Chromium, driven over the DevTools protocol, from a live pipeline:
simulated MCP server -> listener -> dispatcher -> agent -> report -> Slack button -> browser.

Screenshots are kept under ``$NIGHTCRIER_TEST_ARTIFACTS/pages`` (default ``test-artifacts/pages`` in the
checkout); the test prints where.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import infra
import pytest
import yaml
from conftest import ROOT, wait_for
from test_reporting import Webhook

import nightcrier as nc

TOKEN = "br0wser-t0ken-for-tests"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
                  "--window-size=1280,1100", "--remote-debugging-address=127.0.0.1",
                  "--remote-debugging-port=0")
AGENT = """cat > output/investigation.md <<'EOF'
# Investigation

<script>alert("from the cluster")</script>

## Summary
The api pod restarts every few minutes.

## Root Cause
The **api** container ran out of memory: its limit is `256Mi`, its working set ~300Mi.
**Confidence:** HIGH

## Evidence
| Signal | Value |
|---|---|
| Restarts | 5 in 10 minutes |
| Last state | OOMKilled |

## Remediation
1. Raise the memory limit to 512Mi.
2. Watch the working set for a day.
EOF
echo "agent finished"
"""


def artifacts_dir() -> Path:
    base = Path(os.environ.get("NIGHTCRIER_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    path = base / "pages"
    path.mkdir(parents=True, exist_ok=True)
    return path


class Chromium:
    """One headless Chromium with a fresh profile, and a DevTools session on its first page.

    Records every request the page makes, console errors and uncaught exceptions.
    """

    def __init__(self, binary: str, profile: Path):
        import websocket

        self.log = (profile.parent / "chromium.log").open("wb")
        command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        wait_for(lambda: port_file.exists() and len(port_file.read_text().splitlines()) >= 2, timeout=30,
                 what="chromium's DevTools port")
        port = int(port_file.read_text().splitlines()[0])
        targets = wait_for(lambda: [t for t in self._json(f"http://127.0.0.1:{port}/json/list")
                                    if t.get("type") == "page"], timeout=15, what="a page target")
        self.ws = websocket.create_connection(targets[0]["webSocketDebuggerUrl"], suppress_origin=True,
                                              timeout=30)
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    @staticmethod
    def _json(url: str) -> Any:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        number = self._next_id
        self.ws.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == number:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def _wait_event(self, method: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.ws.settimeout(timeout)
        try:
            while time.monotonic() < deadline:
                message = json.loads(self.ws.recv())
                if "method" in message:
                    self.events.append(message)
                    if message["method"] == method:
                        return
        finally:
            self.ws.settimeout(30)
        raise AssertionError(f"no {method} within {timeout} s")

    def open(self, url: str) -> None:
        """Navigate and wait for the load event (after redirects)."""
        self.events.clear()
        result = self.call("Page.navigate", url=url)
        assert not result.get("errorText"), f"{url}: {result.get('errorText')}"
        self._wait_event("Page.loadEventFired", 30)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        """The whole page, not only the window."""
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 6000), "scale": 1}
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)
        path.write_bytes(base64.b64decode(shot["data"]))

    def requested_urls(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events
                if e["method"] == "Network.requestWillBeSent"]

    def statuses(self) -> list[tuple[str, int]]:
        return [(e["params"]["response"]["url"], e["params"]["response"]["status"])
                for e in self.events if e["method"] == "Network.responseReceived"]

    def errors(self) -> list[str]:
        found = []
        for event in self.events:
            params = event["params"]
            if event["method"] == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"])[:300])
            elif event["method"] == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(json.dumps(params["args"])[:300])
            elif event["method"] == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"]["text"])
        return found

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except Exception:
            pass
        self.ws.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Chromium]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        infra.unavailable("chromium is not installed (apt-get install chromium; .ci/run does it)")
    try:
        import websocket  # noqa: F401
    except ImportError:
        infra.unavailable("websocket-client is not installed (pip install -r requirements-dev.txt)")
    browser = Chromium(binary, tmp_path / "profile")
    yield browser
    browser.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[tuple[nc.Service, Webhook, nc.SimulatedServer]]:
    """A running nightcrier on SQLite watching a simulated cluster, its pages on 127.0.0.1."""
    simulator = nc.SimulatedServer("browser-sim").start()
    webhook = Webhook()
    kubeconfig = tmp_path / "kubeconfig.yaml"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    port = free_port()
    data = {"workspace_root": str(tmp_path / "ws"), "health_port": port, "health_bind": "127.0.0.1",
            "agent_runner": "process", "agent_command": ["sh", "-c", AGENT], "agent_timeout": 30,
            "dispatch_poll_interval": 0.2, "slack_webhook_url": webhook.url,
            "report_base_url": f"http://127.0.0.1:{port}", "web_token": TOKEN, "report_link_ttl": "168h",
            "clusters": [{"name": "prod-eu", "mcp": {"endpoint": simulator.url},
                          "triage": {"enabled": True, "kubeconfig": str(kubeconfig),
                                     "check_permissions": False}}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    config, _ = nc.load_config(str(path), env={})
    service = nc.Service(config).start()
    try:
        yield service, webhook, simulator
    finally:
        service.stop()
        webhook.close()
        simulator.stop()


def test_pages_in_a_real_browser(pipeline: tuple[nc.Service, Webhook, nc.SimulatedServer],
                                 chromium: Chromium) -> None:
    service, webhook, simulator = pipeline
    wait_for(lambda: service.health()[0].status == nc.ACTIVE, timeout=30, what="the subscription")
    wait_for(lambda: simulator.emit() == 1, timeout=15, what="a delivered fault")
    (message,) = wait_for(webhook.messages, timeout=60, what="the Slack message")
    button = message["blocks"][-1]["elements"][0]["url"]
    incident_id = urllib.parse.urlsplit(button).path.split("/")[2]
    incident = service.store.get_incident(incident_id)
    assert incident is not None and incident.status == nc.RESOLVED
    base = f"http://127.0.0.1:{service.health_server.port}"  # type: ignore[union-attr]
    shots = artifacts_dir()
    print(f"\nscreenshots of the incident pages: {shots}")

    # Without the token the pages stay shut, in the browser too.
    chromium.open(f"{base}/incidents")
    assert (f"{base}/incidents", 401) in chromium.statuses()

    # The token once in the address: a cookie, and the address loses the token.
    chromium.open(f"{base}/incidents?token={TOKEN}")
    assert chromium.evaluate("location.href") == f"{base}/incidents"
    row = chromium.evaluate(f"""(() => {{
        const row = document.querySelector('tr.incident[data-incident="{incident_id}"]');
        return row && {{text: row.innerText, link: row.querySelector('a').href}};
    }})()""")
    assert row, "the incident's row"
    assert "resolved" in row["text"] and "prod-eu" in row["text"]
    assert row["link"] == f"{base}/incidents/{incident_id}"
    assert chromium.evaluate("document.cookie") == "", "the cookie is HttpOnly"
    check_clean(chromium, "/incidents")
    chromium.screenshot(shots / "incidents.png")

    chromium.open(row["link"])
    page = chromium.evaluate("""(() => ({
        headings: [...document.querySelectorAll('#report h2')].map(h => h.textContent),
        scripts: document.querySelectorAll('script').length,
        escaped: document.querySelector('#report').textContent.includes('<script>alert'),
        runs: document.querySelectorAll('#runs tbody tr').length,
        files: [...document.querySelectorAll('ul.files a')].map(a => a.textContent),
        logs: [...document.querySelectorAll('pre')].map(p => p.textContent).join('\\n'),
    }))()""")
    assert "Root Cause" in page["headings"]
    assert page["scripts"] == 0 and page["escaped"], "the agent's <script> is text, not code"
    assert page["runs"] == 1
    assert {"incident.json", "prompt-sent.md", "output/investigation.md"} <= set(page["files"])
    assert "agent finished" in page["logs"]
    check_clean(chromium, f"/incidents/{incident_id}")
    chromium.screenshot(shots / "incident.png")

    chromium.open(f"{base}/clusters")
    assert chromium.evaluate("document.querySelector('#clusters tbody').innerText").startswith("prod-eu")
    check_clean(chromium, "/clusters")
    chromium.screenshot(shots / "clusters.png")

    # The Slack button opens the report with no token at all.
    chromium.call("Network.clearBrowserCookies")
    chromium.open(button)
    report = chromium.evaluate("""(() => ({
        title: document.title,
        headings: [...document.querySelectorAll('.content h2')].map(h => h.textContent),
        scripts: document.querySelectorAll('script').length,
    }))()""")
    assert report["title"] == f"Investigation Report - {incident_id}"
    assert "Root Cause" in report["headings"] and report["scripts"] == 0
    check_clean(chromium, "the signed report link")
    chromium.screenshot(shots / "report.png")

    # The same link for another path is refused.
    chromium.open(button.replace("/report?", "?"))
    assert (button.replace("/report?", "?"), 401) in chromium.statuses()
    for name in ("incidents.png", "incident.png", "clusters.png", "report.png"):
        assert (shots / name).stat().st_size > 10_000, f"{name} looks empty"


def check_clean(chromium: Chromium, what: str) -> None:
    """No console errors, and every request stayed on 127.0.0.1."""
    assert chromium.errors() == [], f"{what}: console errors"
    for url in chromium.requested_urls():
        parts = urllib.parse.urlsplit(url)
        assert parts.scheme == "data" or parts.hostname == "127.0.0.1", f"{what}: request to {url}"


def test_a_report_cannot_make_the_browser_fetch_from_elsewhere(tmp_path: Path, chromium: Chromium) -> None:
    """An image in the report pointing at another origin (here another port of 127.0.0.1, standing in
    for a tracker) is refused by the page's CSP: the other server never hears of the reader."""
    import http.server

    from test_pages import finish_incident, start_site

    hits: list[str] = []

    class Pixel(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/gif")
            self.end_headers()
            self.wfile.write(base64.b64decode("R0lGODlhAQABAAAAACw="))

        def log_message(self, format: str, *args: Any) -> None:
            pass

    tracker = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pixel)
    threading.Thread(target=tracker.serve_forever, daemon=True).start()
    pixel = f"http://127.0.0.1:{tracker.server_address[1]}/pixel.gif"
    store = nc.SqliteStore(str(tmp_path / "pages.db"))
    config, server = start_site(store, tmp_path, web_token="")
    try:
        report = f"## Root Cause\nA tracker.\n\n![tracker]({pixel})\n"
        incident_id = finish_incident(store, config, "prod-eu", report)
        base = f"http://127.0.0.1:{server.port}"
        for page in (f"/incidents/{incident_id}", f"/incidents/{incident_id}/report"):
            chromium.open(base + page)
            images = chromium.evaluate("[...document.images].map(i => [i.src, i.naturalWidth])")
            assert [pixel, 0] in images, "the image is in the page but not loaded"
            refused = [e for e in chromium.errors() if "Content Security Policy" in e]
            assert refused, f"{page}: the browser says why it did not load the image"
        assert hits == [], "the other origin was contacted"
        chromium.screenshot(artifacts_dir() / "report-with-remote-image.png")
    finally:
        server.stop()
        tracker.shutdown()
        tracker.server_close()
        store.close()
