"""Proves that tests/mcp_testserver.py behaves like the Go kubernetes-mcp-server-with-events on the wire.

Driven by `RawMcpClient`, a deliberately small requests + sseclient-py client (threads, no asyncio) that
performs the handshake in the same order as go-sdk v1.1.0, i.e. as nightcrier's upstream client does.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import queue
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import sseclient
from mcp_testserver import (
    FAULTS_LOGGER,
    INVALID_MODE_TEXT,
    SUBSCRIPTION_ERROR_LOGGER,
    ErrorServer,
    HangingServer,
    McpTestServer,
    make_fault,
)
from sse_starlette.sse import EventSourceResponse

pytestmark = pytest.mark.timeout(30)

POST_ACCEPT = "application/json, text/event-stream"
PROTOCOL_VERSION = "2025-06-18"


class RawMcpClient:
    """Streamable HTTP client in the go-sdk order: initialize, GET (synchronously), notifications/initialized,
    logging/setLevel, tools/call events_subscribe. The GET stream is read by a daemon thread into `events`
    as ("message", data) per SSE event, then one ("end", None) or ("error", exception)."""

    def __init__(self, url: str, *, api_key: str | None = None) -> None:
        self.url = url
        self.api_key = api_key
        self.http = requests.Session()
        self.session_id: str | None = None
        self.protocol_version: str | None = None
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._ids = itertools.count(1)
        self._get: requests.Response | None = None

    def headers(self, accept: str) -> dict[str, str]:
        headers = {"Accept": accept}
        if self.session_id:
            headers["Mcp-Session-Id"] = self.session_id
        if self.protocol_version:
            headers["Mcp-Protocol-Version"] = self.protocol_version
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def post(self, payload: dict[str, Any]) -> requests.Response:
        headers = {**self.headers(POST_ACCEPT), "Content-Type": "application/json"}
        return self.http.post(
            self.url, headers=headers, data=json.dumps(payload), stream=True, timeout=(5, 10)
        )

    @staticmethod
    def read_reply(resp: requests.Response, request_id: int) -> dict[str, Any]:
        """The JSON-RPC response with `request_id` from a POST reply, JSON or SSE."""
        if resp.headers.get("Content-Type", "").startswith("application/json"):
            return resp.json()
        for event in sseclient.SSEClient(resp.iter_content(chunk_size=None)).events():
            if not event.data:
                continue
            message = json.loads(event.data)
            if message.get("id") == request_id:
                resp.close()
                return message
        raise AssertionError(f"reply stream ended without a response to id {request_id}")

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        request_id = next(self._ids)
        payload: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            payload["params"] = params
        resp = self.post(payload)
        assert resp.status_code == 200, f"{method}: HTTP {resp.status_code} {resp.text}"
        return self.read_reply(resp, request_id)

    def initialize(self) -> dict[str, Any]:
        request_id = next(self._ids)
        resp = self.post(
            {
                "jsonrpc": "2.0",
                "id": request_id,
                "method": "initialize",
                "params": {
                    "capabilities": {"roots": {"listChanged": True}},
                    "clientInfo": {"name": "nightcrier", "version": "1.0.0"},
                    "protocolVersion": PROTOCOL_VERSION,
                },
            }
        )
        assert resp.status_code == 200, resp.text
        self.session_id = resp.headers["Mcp-Session-Id"]
        result = self.read_reply(resp, request_id)["result"]
        self.protocol_version = result["protocolVersion"]
        return result

    def notify(self, method: str, params: dict[str, Any] | None = None) -> requests.Response:
        resp = self.post({"jsonrpc": "2.0", "method": method, "params": params or {}})
        resp.close()
        return resp

    def open_get(self) -> int:
        """Open the standalone stream; returns its HTTP status (reader thread started only on 200)."""
        # No read timeout: the Go server sends nothing on a quiet stream.
        resp = requests.get(
            self.url, headers=self.headers("text/event-stream"), stream=True, timeout=(5, None)
        )
        if resp.status_code != 200:
            resp.close()
            return resp.status_code
        self._get = resp
        threading.Thread(target=self._read_stream, args=(resp,), daemon=True).start()
        return 200

    def _read_stream(self, resp: requests.Response) -> None:
        try:
            for event in sseclient.SSEClient(resp.iter_content(chunk_size=None)).events():
                if event.data:
                    self.events.put(("message", event.data))
        except Exception as exc:
            self.events.put(("error", exc))
            return
        self.events.put(("end", None))

    def next_event(self, timeout: float = 5.0) -> tuple[str, Any]:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"nothing arrived on the GET stream within {timeout}s") from None

    def next_message(self, timeout: float = 5.0) -> dict[str, Any]:
        kind, data = self.next_event(timeout)
        assert kind == "message", f"expected a message, got {kind}: {data!r}"
        return json.loads(data)

    def set_level(self) -> None:
        assert self.request("logging/setLevel", {"level": "info"})["result"] == {}

    def call_tool(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.request("tools/call", {"name": name, "arguments": arguments or {}})["result"]

    def subscribe(self, mode: str = "faults") -> str:
        result = self.call_tool("events_subscribe", {"mode": mode})
        assert not result.get("isError"), result
        text = result["content"][0]["text"]
        return json.loads(text[text.index("{") : text.rindex("}") + 1])["subscriptionId"]

    def handshake(self, *, open_get: bool = True, set_level: bool = True, mode: str = "faults") -> str:
        """Full go-sdk order; returns the subscription id."""
        self.initialize()
        if open_get:
            assert self.open_get() == 200
        assert self.notify("notifications/initialized").status_code == 202
        if set_level:
            self.set_level()
        return self.subscribe(mode)

    def delete(self) -> requests.Response:
        return self.http.delete(self.url, headers=self.headers("*/*"), timeout=5)

    def close_get(self) -> None:
        """Close the GET stream from this side. Only closing the response would block until the next byte
        arrives, because the reader thread holds the socket's buffered-reader lock inside recv(); shutting
        the socket down first wakes that thread."""
        if self._get is None:
            return
        sock = getattr(getattr(self._get.raw, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._get.close()
        self._get = None

    def close(self) -> None:
        self.close_get()
        self.http.close()


@pytest.fixture
def server() -> Iterator[McpTestServer]:
    with McpTestServer(cluster="kind-test") as srv:
        yield srv


@pytest.fixture
def make_client(server: McpTestServer) -> Iterator[Any]:
    clients: list[RawMcpClient] = []

    def make(url: str | None = None, **kwargs: Any) -> RawMcpClient:
        client = RawMcpClient(url or server.url, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def test_handshake_is_recorded_in_order_with_go_sdk_headers(server: McpTestServer, make_client: Any) -> None:
    client = make_client()
    sub_id = client.handshake()

    assert server.timeline() == [
        "POST initialize",
        "GET opened",
        "POST notifications/initialized",
        "POST logging/setLevel",
        "POST tools/call events_subscribe",
    ]
    init, get, initialized, set_level, subscribe = server.requests
    assert init.body["params"]["clientInfo"] == {"name": "nightcrier", "version": "1.0.0"}
    assert init.headers["accept"] == POST_ACCEPT
    assert "Mcp-Session-Id" not in init.headers and "mcp-protocol-version" not in init.headers
    assert get.headers["Accept"] == "text/event-stream"
    assert get.stream_opened_at is not None and get.stream_opened_at < initialized.time
    for later in (get, initialized, set_level, subscribe):
        assert later.headers["MCP-SESSION-ID"] == client.session_id
        assert later.headers["Mcp-Protocol-Version"] == PROTOCOL_VERSION
        assert "authorization" not in later.headers
    assert (initialized.status, set_level.status, subscribe.status) == (202, 200, 200)
    assert subscribe.body["params"] == {"name": "events_subscribe", "arguments": {"mode": "faults"}}
    assert server.subscriptions() == [
        {"subscription_id": sub_id, "session_id": client.session_id, "mode": "faults"}
    ]


def test_subscribe_reply_uses_the_go_text_format(server: McpTestServer, make_client: Any) -> None:
    client = make_client()
    client.initialize()
    client.notify("notifications/initialized")
    result = client.call_tool("events_subscribe", {"mode": "faults"})

    assert "isError" not in result  # go-sdk leaves out isError when it is false
    text = result["content"][0]["text"]
    header = "# Event Subscription Created\n\n"
    footer = "\n\nYou will receive event notifications via the logging/message protocol."
    assert text.startswith(header) and text.endswith(footer)
    body_text = text[len(header) : -len(footer)]
    body = json.loads(body_text)
    assert body_text == json.dumps(body, indent=2)  # indented like json.MarshalIndent
    assert list(body) == ["subscriptionId", "cluster", "mode", "filters", "createdAt", "status"]
    assert re.fullmatch(r"sub-[0-9a-f]{8}", body["subscriptionId"])
    assert (body["cluster"], body["mode"], body["filters"], body["status"]) == (
        "kind-test",
        "faults",
        {},
        "active",
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d)", body["createdAt"])


def test_no_notification_reaches_a_session_before_set_level(server: McpTestServer, make_client: Any) -> None:
    client = make_client()
    sub_id = client.handshake(set_level=False)

    assert server.emit(make_fault()) == {"delivered": 0, "dropped_no_level": 1, "cancelled_no_stream": 0}
    # The marker goes out after the dropped fault; it arriving first proves the fault never did.
    assert server.emit_raw("marker") == 1
    assert client.next_event() == ("message", "marker")
    assert [s["subscription_id"] for s in server.subscriptions()] == [sub_id]  # dropped, not cancelled

    client.set_level()
    assert server.emit(make_fault())["delivered"] == 1
    assert client.next_message()["params"]["data"]["subscriptionId"] == sub_id


def test_fault_without_open_get_stream_cancels_the_subscription(
    server: McpTestServer, make_client: Any
) -> None:
    client = make_client()
    client.handshake(open_get=False)
    assert len(server.subscriptions()) == 1

    assert server.emit(make_fault()) == {"delivered": 0, "dropped_no_level": 0, "cancelled_no_stream": 1}
    assert server.subscriptions() == []
    listed = client.call_tool("events_list_subscriptions")["content"][0]["text"]
    assert json.loads(listed[listed.index("{") :]) == {"subscriptions": [], "total": 0}

    # Opening the stream afterwards does not bring the subscription back.
    assert client.open_get() == 200
    assert server.emit(make_fault())["delivered"] == 0


def test_fault_arrives_on_get_stream_after_the_tool_call_returned(
    server: McpTestServer, make_client: Any
) -> None:
    client = make_client()
    sub_id = client.handshake()  # the tools/call reply stream is complete at this point
    fault = make_fault("NodeUnhealthy", name="worker-2")

    assert server.emit(fault) == {"delivered": 1, "dropped_no_level": 0, "cancelled_no_stream": 0}
    message = client.next_message()
    assert message["jsonrpc"] == "2.0" and "id" not in message
    assert message["method"] == "notifications/message"
    assert message["params"]["level"] == "warning"
    assert message["params"]["logger"] == FAULTS_LOGGER
    data = message["params"]["data"]
    assert data == {"subscriptionId": sub_id, "cluster": "kind-test", **fault}
    assert list(data)[:3] == ["subscriptionId", "cluster", "faultId"]
    assert "namespace" not in data["resource"] and data["severity"] == "critical"

    get = next(r for r in server.requests if r.method == "GET")
    subscribe = next(r for r in server.requests if r.tool_name == "events_subscribe")
    assert get.stream_opened_at is not None and get.stream_opened_at < subscribe.time


def test_restart_keeps_port_and_forgets_sessions(server: McpTestServer, make_client: Any) -> None:
    old = make_client()
    old.handshake()
    url, port = server.url, server.port

    server.restart()

    assert (server.url, server.port) == (url, port)
    kind, error = old.next_event()
    assert kind == "error", "a restart should cut the stream off like a dying process"
    assert isinstance(error, requests.exceptions.ChunkedEncodingError)
    assert server.subscriptions() == []
    assert old.post({"jsonrpc": "2.0", "id": 99, "method": "ping"}).status_code == 404
    assert old.open_get() == 404

    fresh = make_client()
    sub_id = fresh.handshake()
    assert fresh.session_id != old.session_id
    assert server.wait_for_subscriptions(1, timeout=2) == [
        {"subscription_id": sub_id, "session_id": fresh.session_id, "mode": "faults"}
    ]
    assert server.emit(make_fault())["delivered"] == 1
    assert fresh.next_message()["params"]["data"]["subscriptionId"] == sub_id


def test_invalid_mode_is_an_is_error_tool_result(server: McpTestServer, make_client: Any) -> None:
    client = make_client()
    client.initialize()
    client.notify("notifications/initialized")

    result = client.call_tool("events_subscribe", {"mode": "resource-faults"})

    assert result == {"content": [{"type": "text", "text": INVALID_MODE_TEXT}], "isError": True}
    assert server.subscriptions() == []


def _open_raw_get(server: McpTestServer, session_id: str) -> tuple[socket.socket, bytes]:
    """GET over a bare socket, so that every byte the server sends (keepalive comments included) is seen."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(
        (
            f"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAccept: text/event-stream\r\n"
            f"Mcp-Session-Id: {session_id}\r\nMcp-Protocol-Version: {PROTOCOL_VERSION}\r\n\r\n"
        ).encode()
    )
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(4096)
        assert chunk, "connection closed before the response headers"
        received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock, rest


def _read_for(sock: socket.socket, seconds: float, until: bytes | None = None) -> bytes:
    """Collect whatever arrives within `seconds` (or until `until` shows up)."""
    received = b""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        if until is not None and until in received:
            break
        readable, _, _ = select.select([sock], [], [], remaining)
        if readable:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    return received


def test_idle_get_stream_carries_no_keepalive_comments(server: McpTestServer, make_client: Any) -> None:
    client = make_client()
    client.initialize()
    assert EventSourceResponse.DEFAULT_PING_INTERVAL == 0  # sse-starlette's 15 s pings are off

    sock, early = _open_raw_get(server, client.session_id or "")
    try:
        idle = early + _read_for(sock, 3.0)
        assert idle == b"", f"an idle stream should stay silent, got {idle!r}"
        # The same reader does see bytes when there are some.
        assert server.emit_raw("hello") == 1
        assert b"data: hello\n\n" in _read_for(sock, 3.0, until=b"data: hello\n\n")
    finally:
        sock.close()


def test_keepalive_comments_can_be_switched_on_to_emulate_a_proxy() -> None:
    with McpTestServer(keepalive_interval=0.2) as srv:
        client = RawMcpClient(srv.url)
        client.initialize()
        sock, early = _open_raw_get(srv, client.session_id or "")
        try:
            assert b": keepalive" in early + _read_for(sock, 3.0, until=b": keepalive")
        finally:
            sock.close()
            client.close()


def test_delete_ends_the_session_and_drops_its_subscriptions(server: McpTestServer, make_client: Any) -> None:
    client = make_client()
    client.handshake()
    other = make_client()
    other_sub = other.handshake()
    assert len(server.subscriptions()) == 2

    resp = client.delete()

    assert resp.status_code == 204 and resp.content == b""  # go-sdk's answer, not the Python SDK's 200
    assert [s["subscription_id"] for s in server.subscriptions()] == [other_sub]
    assert client.next_event()[0] == "end"  # the session's GET stream is closed with it
    assert client.post({"jsonrpc": "2.0", "id": 7, "method": "ping"}).status_code == 404
    assert server.wait_for_get_streams(1, timeout=2) == 1


def test_emit_raw_reaches_every_open_stream_verbatim(server: McpTestServer, make_client: Any) -> None:
    first, second = make_client(), make_client()
    first.handshake()
    second.handshake()
    error_object = '{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":"boom"}}'

    assert server.emit_raw("this is not json") == 2
    assert server.emit_raw(error_object) == 2

    for client in (first, second):
        assert client.next_event() == ("message", "this is not json")
        assert client.next_event() == ("message", error_object)


def test_emit_raw_is_ordered_after_a_preceding_emit(server: McpTestServer, make_client: Any) -> None:
    client = make_client()
    client.handshake()
    for i in range(5):
        server.emit(make_fault(fault_id=f"{i:016x}"))
        server.emit_raw(f"raw-{i}")
    for i in range(5):
        assert client.next_message()["params"]["data"]["faultId"] == f"{i:016x}"
        assert client.next_event() == ("message", f"raw-{i}")


def test_ping_unsubscribe_and_list_follow_the_go_server(server: McpTestServer, make_client: Any) -> None:
    client = make_client()
    sub_id = client.handshake()
    assert client.request("ping")["result"] == {}

    listed = client.call_tool("events_list_subscriptions")["content"][0]["text"]
    assert listed.startswith("# Active Subscriptions\n\n")
    body = json.loads(listed[listed.index("{") :])
    assert body["total"] == 1 and body["subscriptions"][0]["subscriptionId"] == sub_id
    assert body["subscriptions"][0]["degraded"] is False

    cancelled = client.call_tool("events_unsubscribe", {"subscriptionId": sub_id})
    text = cancelled["content"][0]["text"]
    assert text.startswith("# Subscription Cancelled\n\n")
    assert json.loads(text[text.index("{") :]) == {
        "subscriptionId": sub_id,
        "cancelled": True,
        "status": "success",
    }
    again = client.call_tool("events_unsubscribe", {"subscriptionId": sub_id})
    assert again["isError"] is True
    assert again["content"][0]["text"] == "failed to cancel subscription: subscription not found"
    assert server.subscriptions() == []


def test_subscription_error_is_sent_and_degrades_the_subscription(
    server: McpTestServer, make_client: Any
) -> None:
    client = make_client()
    sub_id = client.handshake()

    assert server.emit_subscription_error()["delivered"] == 1
    message = client.next_message()
    assert message["params"]["logger"] == SUBSCRIPTION_ERROR_LOGGER
    assert message["params"]["data"] == {
        "subscriptionId": sub_id,
        "cluster": "kind-test",
        "error": "Watch connection failed after maximum retry attempts",
        "degraded": True,
    }
    assert server.subscriptions() == []
    assert server.subscriptions(include_degraded=True)[0]["degraded"] is True
    assert server.emit(make_fault())["delivered"] == 0


def test_dropped_get_stream_leaves_session_usable(server: McpTestServer, make_client: Any) -> None:
    client = make_client()
    sub_id = client.handshake()

    assert server.drop_get_streams() == 1
    assert client.next_event() == ("end", None)
    assert server.open_get_streams() == 0
    assert client.request("ping")["result"] == {}

    assert client.open_get() == 200  # no 409: the old stream is really gone
    assert server.emit(make_fault())["delivered"] == 1
    assert client.next_message()["params"]["data"]["subscriptionId"] == sub_id

    assert server.drop_get_streams(abort=True) == 1
    kind, error = client.next_event()
    assert kind == "error" and isinstance(error, requests.exceptions.ChunkedEncodingError)


def test_go_server_http_gates(server: McpTestServer, make_client: Any) -> None:
    client = make_client()
    client.initialize()
    base = {"Mcp-Session-Id": client.session_id or "", "Mcp-Protocol-Version": PROTOCOL_VERSION}
    ping = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"})
    json_only = {**base, "Accept": "application/json", "Content-Type": "application/json"}

    assert requests.post(server.url, headers=json_only, data=ping, timeout=5).status_code == 400
    assert requests.get(server.url, headers={"Accept": "text/event-stream"}, timeout=5).status_code == 405
    replay = {**base, "Accept": "text/event-stream", "Last-Event-ID": "1"}
    assert requests.get(server.url, headers=replay, timeout=5).status_code == 400
    post_headers = {**base, "Accept": POST_ACCEPT, "Content-Type": "application/json"}
    stateless_era = {**post_headers, "Mcp-Protocol-Version": "2026-07-28"}
    assert requests.post(server.url, headers=stateless_era, data=ping, timeout=5).status_code == 400
    assert client.open_get() == 200
    assert client.open_get() == 409  # one standalone stream per session
    unknown = {**post_headers, "Mcp-Session-Id": "0" * 32}
    assert requests.post(server.url, headers=unknown, data=ping, timeout=5).status_code == 404


def test_stop_is_bounded_with_clients_holding_get_streams(make_client: Any) -> None:
    srv = McpTestServer().start()
    clients = [make_client(srv.url) for _ in range(3)]
    for client in clients:
        client.handshake()
    assert srv.open_get_streams() == 3

    started = time.monotonic()
    srv.stop()

    assert time.monotonic() - started < 3.0
    assert not srv.running
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(srv.url, data="{}", timeout=2)
    for client in clients:
        assert client.next_event()[0] == "error"


def test_wait_for_subscriptions_times_out_with_a_clear_message(
    server: McpTestServer, make_client: Any
) -> None:
    client = make_client()
    client.initialize()
    with pytest.raises(TimeoutError, match=r"at least 1 active subscription.*POST initialize"):
        server.wait_for_subscriptions(1, timeout=0.3)

    waiter_result: list[Any] = []
    waiter = threading.Thread(
        target=lambda: waiter_result.append(server.wait_for_subscriptions(1, timeout=5))
    )
    waiter.start()
    client.notify("notifications/initialized")
    client.subscribe()
    waiter.join(5)
    assert len(waiter_result) == 1 and len(waiter_result[0]) == 1


def test_require_api_key_rejects_requests_without_bearer_token() -> None:
    with McpTestServer(require_api_key="s3cret") as srv:
        anonymous = RawMcpClient(srv.url)
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
        resp = anonymous.post(init)
        assert resp.status_code == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")

        wrong = RawMcpClient(srv.url, api_key="nope")
        assert wrong.post(init).status_code == 401

        authorised = RawMcpClient(srv.url, api_key="s3cret")
        authorised.handshake()
        assert all(r.headers["Authorization"] == "Bearer s3cret" for r in srv.requests if r.status != 401)
        assert [r.status for r in srv.requests].count(401) == 2
        for client in (anonymous, wrong, authorised):
            client.close()


def test_hanging_server_makes_requests_time_out() -> None:
    with HangingServer() as hanging:
        started = time.monotonic()
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(hanging.url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, timeout=(1, 1))
        assert time.monotonic() - started < 3.0
        assert hanging.accepted == 1


def test_error_server_answers_every_request_with_its_status() -> None:
    with ErrorServer(500) as broken:
        assert requests.post(broken.url, json={"jsonrpc": "2.0"}, timeout=5).status_code == 500
        assert requests.get(broken.url, timeout=5).status_code == 500
        assert broken.requests == [("POST", "/mcp"), ("GET", "/mcp")]
    with ErrorServer(503, headers={"Retry-After": "1"}) as busy:
        resp = requests.delete(busy.url, timeout=5)
        assert (resp.status_code, resp.headers["Retry-After"]) == (503, "1")


@pytest.mark.parametrize(
    ("fault_type", "api_version", "kind", "severity", "context_prefix"),
    [
        ("PodCrash", "v1", "Pod", "warning", "Container crashed with exit code "),
        ("CrashLoop", "v1", "Pod", "critical", "Container entered CrashLoopBackOff state, restart count: "),
        ("NodeUnhealthy", "v1", "Node", "critical", "Node became unhealthy: Ready=False"),
        ("DeploymentFailure", "apps/v1", "Deployment", "critical", "Deployment rollout failed: "),
        ("JobFailure", "batch/v1", "Job", "critical", "Job failed, reason: BackoffLimitExceeded"),
    ],
)
def test_make_fault_matches_the_go_payload(
    fault_type: str, api_version: str, kind: str, severity: str, context_prefix: str
) -> None:
    fault = make_fault(fault_type, timestamp="2025-12-19T22:11:10+01:00")

    assert list(fault) == ["faultId", "faultType", "severity", "resource", "context", "timestamp"]
    assert (fault["faultType"], fault["severity"]) == (fault_type, severity)
    resource = fault["resource"]
    assert (resource["apiVersion"], resource["kind"]) == (api_version, kind)
    assert ("namespace" in resource) is (kind != "Node")
    assert fault["context"].startswith(context_prefix)
    container = "app" if kind == "Pod" else ""
    expected_id = hashlib.sha256(
        f"kind-test:{fault_type}:{resource['uid']}:{container}".encode()
    ).hexdigest()[:16]
    assert fault["faultId"] == expected_id
    assert make_fault(fault_type)["faultId"] == expected_id  # stable for the same resource
    assert "context" not in make_fault(fault_type, context=None)
