"""`nightcrier simulate` speaks the protocol like the Go server: the protocol checks the test MCP
server passes, run against the built-in simulator with the same raw client."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import yaml
from conftest import ROOT, wait_for
from test_mcp_testserver import POST_ACCEPT, PROTOCOL_VERSION, RawMcpClient

import nightcrier as nc


@pytest.fixture
def simulator() -> Iterator[nc.SimulatedServer]:
    server = nc.SimulatedServer("sim-test").start()
    yield server
    server.stop()


@pytest.fixture
def client(simulator: nc.SimulatedServer) -> Iterator[Callable[[], RawMcpClient]]:
    clients: list[RawMcpClient] = []

    def make() -> RawMcpClient:
        clients.append(RawMcpClient(simulator.url))
        return clients[-1]

    yield make
    for made in clients:
        made.close()


def test_handshake_and_delivery_after_the_tool_call(simulator: nc.SimulatedServer,
                                                    client: Callable[[], RawMcpClient]) -> None:
    raw = client()
    result = raw.initialize()
    assert result["protocolVersion"] == PROTOCOL_VERSION and "logging" in result["capabilities"]
    assert re.fullmatch(r"[A-Z2-7]{26}", raw.session_id or ""), "a Go-style session id"
    assert raw.open_get() == 200
    assert raw.notify("notifications/initialized").status_code == 202
    raw.set_level()
    subscription = raw.subscribe()
    assert re.fullmatch(r"sub-[0-9a-f]{8}", subscription)
    assert simulator.emit() == 1
    message = raw.next_message()
    assert message["method"] == "notifications/message" and "id" not in message
    assert (message["params"]["level"], message["params"]["logger"]) == ("warning", "kubernetes/faults")
    data = message["params"]["data"]
    assert data["subscriptionId"] == subscription and data["cluster"] == "sim-test"
    assert data["faultType"] in nc.SIMULATED_FAULTS and re.fullmatch(r"[0-9a-f]{16}", data["faultId"])
    assert isinstance(nc.parse_notification(json.dumps(message), "c", nc.utcnow()), nc.FaultEvent)


def test_subscribe_reply_has_the_go_text_format(client: Callable[[], RawMcpClient]) -> None:
    raw = client()
    raw.initialize()
    text = raw.call_tool("events_subscribe", {"mode": "faults"})["content"][0]["text"]
    assert text.startswith("# Event Subscription Created\n\n")
    assert text.endswith("\n\nYou will receive event notifications via the logging/message protocol.")
    body = json.loads(text[text.index("{"):text.rindex("}") + 1])
    assert list(body) == ["subscriptionId", "cluster", "mode", "filters", "createdAt", "status"]
    invalid = raw.call_tool("events_subscribe", {"mode": "resource-faults"})
    assert invalid["isError"] is True and "invalid mode" in invalid["content"][0]["text"]


def test_nothing_before_set_level_and_no_stream_cancels(simulator: nc.SimulatedServer,
                                                        client: Callable[[], RawMcpClient]) -> None:
    quiet = client()
    quiet.handshake(set_level=False)
    assert simulator.emit() == 0, "dropped before logging/setLevel"
    assert simulator.subscription_count() == 1
    streamless = client()
    streamless.handshake(open_get=False)
    assert simulator.subscription_count() == 2
    simulator.emit()
    assert simulator.subscription_count() == 1, "a fault with no GET stream open cancels the subscription"


def test_unsubscribe_delete_and_unknown_sessions(simulator: nc.SimulatedServer,
                                                 client: Callable[[], RawMcpClient]) -> None:
    raw = client()
    subscription = raw.handshake()
    assert "isError" not in raw.call_tool("events_unsubscribe", {"subscriptionId": subscription})
    assert raw.call_tool("events_unsubscribe", {"subscriptionId": subscription})["isError"] is True
    raw.subscribe()
    assert simulator.subscription_count() == 1
    assert raw.delete().status_code == 204
    assert simulator.subscription_count() == 0
    assert raw.post({"jsonrpc": "2.0", "id": 99, "method": "ping"}).status_code == 404


def test_http_gates_like_the_go_server(simulator: nc.SimulatedServer,
                                       client: Callable[[], RawMcpClient]) -> None:
    raw = client()
    raw.initialize()
    base = {"Mcp-Session-Id": raw.session_id or "", "Mcp-Protocol-Version": PROTOCOL_VERSION}
    ping = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"})
    json_only = {**base, "Accept": "application/json", "Content-Type": "application/json"}
    assert requests.post(simulator.url, headers=json_only, data=ping, timeout=5).status_code == 400
    assert requests.get(simulator.url, headers={"Accept": "text/event-stream"}, timeout=5).status_code == 405
    assert raw.open_get() == 200
    assert raw.open_get() == 409
    unknown = {**base, "Mcp-Session-Id": "X" * 26, "Accept": POST_ACCEPT, "Content-Type": "application/json"}
    assert requests.post(simulator.url, headers=unknown, data=ping, timeout=5).status_code == 404


def test_no_keepalive_on_a_quiet_stream(simulator: nc.SimulatedServer,
                                        client: Callable[[], RawMcpClient]) -> None:
    raw = client()
    raw.handshake()
    with pytest.raises(AssertionError, match="nothing arrived"):
        raw.next_event(timeout=2)


def test_simulate_command_serves_and_emits_on_request(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(ROOT / "nightcrier.py"), "simulate", "--servers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        servers = [json.loads(proc.stdout.readline()) for _ in range(2)]
        assert [s["cluster"] for s in servers] == ["simulated-0", "simulated-1"]
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({
            "workspace_root": str(tmp_path / "ws"), "health_port": 0,
            "clusters": [{"name": s["cluster"], "mcp": {"endpoint": s["endpoint"]}} for s in servers]}))
        config, _ = nc.load_config(str(path), env={})
        service = nc.Service(config).start()
        try:
            wait_for(lambda: all(h.status == nc.ACTIVE for h in service.health()), what="both subscribed")
            for server in servers:
                reply = requests.post(server["endpoint"].replace("/mcp", "/_simulate/emit"),
                                      json={"count": 5, "rate": 0}, timeout=5)
                assert reply.status_code == 202
            found = wait_for(lambda: len(i := service.store.list_incidents()) == 10 and i,
                             what="10 incidents")
            assert {i.cluster for i in found} == {"simulated-0", "simulated-1"}
            assert {i.status for i in found} == {nc.SKIPPED}
        finally:
            service.stop()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
