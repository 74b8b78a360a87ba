"""nightcrier against the stock kubernetes-mcp-server: the real Go server and go-sdk transport, without
the events fork's ``events_subscribe`` tool.

The server is the npm package ``kubernetes-mcp-server`` (pinned in ``.ci/install-stock-mcp.sh``, which
``.ci/run`` calls), started with a kubeconfig that points at nothing: it serves MCP anyway. What the
server did is read from its own log (the go-sdk logs session connect, initialize, log level and
disconnect); what it answered is seen by the client.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import infra
import pytest
import requests
from conftest import wait_for

import nightcrier as nc

STOCK_VERSION = "0.0.67"
DEFAULT_BINARY = (f"/var/cache/nightcrier-tools/kubernetes-mcp-server-{STOCK_VERSION}"
                  "/node_modules/.bin/kubernetes-mcp-server")
KUBECONFIG = """apiVersion: v1
kind: Config
clusters:
- name: nowhere
  cluster: {server: "https://127.0.0.1:1"}
contexts:
- name: nowhere
  context: {cluster: nowhere, user: nobody}
current-context: nowhere
users:
- name: nobody
  user: {token: not-a-real-token}
"""


def stock_binary() -> str:
    for candidate in (os.environ.get("NIGHTCRIER_STOCK_MCP_SERVER", ""), DEFAULT_BINARY,
                      shutil.which("kubernetes-mcp-server") or ""):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    infra.unavailable("the stock kubernetes-mcp-server is not installed (bash .ci/install-stock-mcp.sh)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class StockServer:
    """One kubernetes-mcp-server process on a fixed port; :meth:`restart` keeps the port."""

    def __init__(self, binary: str, workdir: Path):
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.kubeconfig = workdir / "kubeconfig"
        self.kubeconfig.write_text(KUBECONFIG)
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self) -> StockServer:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind-address", "127.0.0.1",
             "--kubeconfig", str(self.kubeconfig), "--cluster-provider", "kubeconfig"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
            env={"PATH": "/usr/bin:/bin", "HOME": str(self.workdir)})
        log.close()
        wait_for(lambda: answers(f"http://127.0.0.1:{self.port}/healthz"), 30, "the stock server to serve")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self, session_id: str) -> list[str]:
        return [line for line in self.log().splitlines() if session_id in line]


@pytest.fixture
def stock(tmp_path: Path) -> Iterator[StockServer]:
    server = StockServer(stock_binary(), tmp_path).start()
    yield server
    server.stop()


def raw_post(url: str, session_id: str, message: dict[str, object]) -> requests.Response:
    return requests.post(url, json=message, timeout=10, headers={
        "Mcp-Session-Id": session_id, "Accept": "application/json, text/event-stream",
        "Mcp-Protocol-Version": nc.MCP_PROTOCOL_VERSION})


def test_handshake_ping_and_delete_with_the_go_server(stock: StockServer) -> None:
    received: list[str] = []
    session = nc.McpSession(stock.url, lambda raw, _at: received.append(raw), name="stock")
    session.open()
    try:
        assert session.session_id and session.protocol_version in nc.MCP_KNOWN_VERSIONS
        # The GET stream was answered with an event stream (open raises otherwise) and stays open.
        assert session._stream is not None and not session.stream_ended.is_set()
        wait_for(lambda: "client log level set" in stock.log(), 10, "the server to log the handshake")
        log = stock.log()
        assert f'"server session connected" session_id="{session.session_id}"' in log
        # notifications/initialized and logging/setLevel reached the server, in that order.
        assert log.index('"session initialized"') < log.index('"client log level set" level="info"')
        session.ping()
        assert session.request("logging/setLevel", {"level": "warning"}) == {}
        assert not session.stream_ended.is_set()
    finally:
        session_id = session.session_id
        session.close()
    # close() sent DELETE: the server ended the session and no longer knows its id.
    wait_for(lambda: any("server session disconnected" in line for line in stock.log_lines(session_id)), 10,
             "the server to log the DELETE")
    reply = raw_post(stock.url, session_id, {"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert reply.status_code == 404


def test_a_restarted_go_server_answers_404_and_a_new_session_works(stock: StockServer) -> None:
    session = nc.McpSession(stock.url, lambda _raw, _at: None, name="stock")
    session.open()
    old_id = session.session_id
    try:
        stock.restart()
        with pytest.raises(nc.SessionLost):
            session.ping()
    finally:
        session.close()
    fresh = nc.McpSession(stock.url, lambda _raw, _at: None, name="stock")
    try:
        fresh.open()
        assert fresh.session_id and fresh.session_id != old_id
        fresh.ping()
    finally:
        fresh.close()


def test_subscribing_to_the_go_server_says_it_has_no_event_subscriptions(stock: StockServer) -> None:
    session = nc.McpSession(stock.url, lambda _raw, _at: None, name="stock")
    session.open()
    try:
        with pytest.raises(nc.NoEventSubscriptions) as info:
            session.subscribe("faults")
        assert str(info.value).startswith(nc.NoEventSubscriptions.HINT)
        assert 'unknown tool "events_subscribe"' in str(info.value)
        session.ping()  # the session survives the failed call
    finally:
        session.close()


@pytest.fixture
def log_text() -> Iterator[io.StringIO]:
    """Everything nightcrier logs during the test, as JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(nc._JsonFormatter())
    logger = logging.getLogger("nightcrier")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def get_json(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_service_marks_a_stock_server_cluster_unsupported(stock: StockServer, tmp_path: Path,
                                                          log_text: io.StringIO) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({  # JSON is YAML
        "workspace_root": str(tmp_path / "ws"), "agent_runner": "process", "agent_command": ["true"],
        "health_port": free_port(), "sse_reconnect_initial_backoff": 0.01, "sse_reconnect_max_backoff": 0.3,
        "clusters": [{"name": "stock", "mcp": {"endpoint": stock.url}}]}))
    config, _ = nc.load_config(str(path), env={})
    service = nc.Service(config).start()
    try:
        base = f"http://127.0.0.1:{config.health_port}"
        # Retried at the maximum backoff, and said once rather than at every retry.
        wait_for(lambda: service.health()[0].reconnects >= 3, 20, "three retries")
        status, document = get_json(base + "/health/clusters")
        assert status == 200
        entry = document["clusters"][0]  # type: ignore[index]
        assert entry["status"] == "unsupported"
        assert entry["error"] == nc.NoEventSubscriptions.HINT
        assert document["summary"]["unhealthy"] == 1  # type: ignore[index]
        status, ready = get_json(base + "/readyz")
        assert status == 503 and ready["active_clusters"] == 0
        said = [json.loads(line) for line in log_text.getvalue().splitlines()
                if nc.NoEventSubscriptions.HINT in line]
        assert len(said) == 1, said
        assert said[0]["level"] == "ERROR" and said[0]["cluster"] == "stock"
        assert said[0]["retry_every"] == 0.3
        assert "failed" not in [h.status for h in service.health()]
    finally:
        service.stop()
