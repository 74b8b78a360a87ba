"""In-process MCP servers for nightcrier's integration tests.

`McpTestServer` is a real MCP server built on the official `mcp` SDK (low-level `Server`, Streamable HTTP,
uvicorn on 127.0.0.1). It reproduces the wire behaviour of the Go server nightcrier talks to in production,
`randybias/kubernetes-mcp-server-with-events`, including the two gates that decide whether a client ever sees
a fault:

* notifications to a session are dropped until that session has called `logging/setLevel`;
* a fault that fires while the session has no standalone GET stream open cancels the subscription, silently.

Faults are pushed by test code through a thread-safe Python API (`emit`, `emit_raw`, ...), never by a
background task, so every test decides exactly when something reaches the client.

`HangingServer` and `ErrorServer` are deliberately broken peers for failure-path tests.

All servers bind to 127.0.0.1 only and expose the same `start()/stop()/url/port` surface and context-manager
protocol.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import hashlib
import http.server
import json
import logging
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from datetime import datetime, timedelta
from types import EllipsisType
from typing import Any, TypeVar

import anyio
import mcp_types as types
import uvicorn
from mcp.server.lowlevel import Server
from mcp.server.session import ServerSession
from mcp.shared.exceptions import MCPError
from sse_starlette.sse import EventSourceResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "FAULTS_LOGGER",
    "EVENTS_LOGGER",
    "SUBSCRIPTION_ERROR_LOGGER",
    "INVALID_MODE_TEXT",
    "ErrorServer",
    "HangingServer",
    "McpTestServer",
    "RecordedHeaders",
    "RecordedRequest",
    "make_fault",
]

MCP_PATH = "/mcp"
FAULTS_LOGGER = "kubernetes/faults"
EVENTS_LOGGER = "kubernetes/events"
SUBSCRIPTION_ERROR_LOGGER = "kubernetes/subscription_error"

# Versions go-sdk v1.2.0 (the Go server's SDK) accepts in Mcp-Protocol-Version.
SUPPORTED_PROTOCOL_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")

SUBSCRIBE_SUCCESS_HEADER = "# Event Subscription Created\n\n"
SUBSCRIBE_SUCCESS_FOOTER = "\n\nYou will receive event notifications via the logging/message protocol."
INVALID_MODE_TEXT = "failed to create subscription: invalid mode: must be 'events' or 'faults'"
UNSUBSCRIBE_NOT_FOUND_TEXT = "failed to cancel subscription: subscription not found"
WATCH_FAILED_TEXT = "Watch connection failed after maximum retry attempts"
MAX_SUBSCRIPTIONS_PER_SESSION = 10
MAX_SUBSCRIPTIONS_TOTAL = 100

_SUBSCRIPTION_FILTER_KEYS = (
    "namespaces",
    "labelSelector",
    "involvedKind",
    "involvedName",
    "involvedNamespace",
    "type",
    "reason",
)

_T = TypeVar("_T")


def _rfc3339_now() -> str:
    """Current time the way Go's time.RFC3339 prints a local time: second precision, 'Z' for UTC."""
    now = datetime.now().astimezone().replace(microsecond=0)
    if now.utcoffset() == timedelta(0):
        return now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return now.isoformat()


# ---------------------------------------------------------------------------------------------------------
# Fault payloads
# ---------------------------------------------------------------------------------------------------------

_FAULT_KINDS: dict[str, tuple[str, str, str, str]] = {
    # faultType: (apiVersion, kind, default severity, default resource name)
    "PodCrash": ("v1", "Pod", "warning", "crash-test-pod"),
    "CrashLoop": ("v1", "Pod", "critical", "crash-test-pod"),
    "NodeUnhealthy": ("v1", "Node", "critical", "kind-worker"),
    "DeploymentFailure": ("apps/v1", "Deployment", "critical", "web"),
    "JobFailure": ("batch/v1", "Job", "critical", "batch-job"),
}


def _default_fault_context(fault_type: str, name: str, namespace: str, uid: str, container: str) -> str:
    if fault_type == "PodCrash":
        return (
            "Container crashed with exit code 1, reason: Error, "
            "message: panic: runtime error: invalid memory address or nil pointer dereference"
        )
    if fault_type == "CrashLoop":
        return (
            "Container entered CrashLoopBackOff state, restart count: 3, waiting message: back-off 40s "
            f"restarting failed container={container} pod={name}_{namespace}({uid}), "
            "last exit code: 1, last reason: Error"
        )
    if fault_type == "NodeUnhealthy":
        return (
            "Node became unhealthy: Ready=False, reason: KubeletNotReady, "
            "message: container runtime network not ready: NetworkReady=false"
        )
    if fault_type == "DeploymentFailure":
        return (
            "Deployment rollout failed: ProgressDeadlineExceeded, "
            f'message: ReplicaSet "{name}-7f8b9c6d5" has timed out progressing.'
        )
    return "Job failed, reason: BackoffLimitExceeded, message: Job has reached the specified backoff limit"


def make_fault(
    fault_type: str = "CrashLoop",
    *,
    name: str | None = None,
    namespace: str = "default",
    context: str | None | EllipsisType = ...,
    fault_id: str | None = None,
    timestamp: str | None = None,
    cluster: str = "kind-test",
    uid: str | None = None,
    container: str = "app",
    severity: str | None = None,
) -> dict[str, Any]:
    """Build a flat fault payload shaped like the Go server's `ResourceFaultNotification`.

    `subscriptionId` and `cluster` are left out: `McpTestServer.emit` fills them in per subscription, as the
    server does. Keys follow the Go struct order. `context=...` (the default) writes the type's usual text;
    `context=None` omits the key (Go `omitempty`). Node faults carry no namespace. Without `uid` a stable
    UUID is derived from cluster/kind/namespace/name, so the same resource always gets the same `faultId`,
    which is hex(sha256("<cluster>:<faultType>:<uid>:<container>"))[:16] like the real server (containers
    only count for Pod faults). `cluster` should match the server's cluster name for realistic ids.
    """
    try:
        api_version, kind, default_severity, default_name = _FAULT_KINDS[fault_type]
    except KeyError:
        raise ValueError(
            f"unknown fault type {fault_type!r}; expected one of {sorted(_FAULT_KINDS)}"
        ) from None
    name = name if name is not None else default_name
    namespaced = kind != "Node"
    resource_ns = namespace if namespaced else ""
    if uid is None:
        uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"k8s://{cluster}/{kind}/{resource_ns}/{name}"))
    container_name = container if kind == "Pod" else ""
    if fault_id is None:
        digest = hashlib.sha256(f"{cluster}:{fault_type}:{uid}:{container_name}".encode()).hexdigest()
        fault_id = digest[:16]

    resource: dict[str, Any] = {"apiVersion": api_version, "kind": kind, "name": name}
    if resource_ns:
        resource["namespace"] = resource_ns
    resource["uid"] = uid

    fault: dict[str, Any] = {
        "faultId": fault_id,
        "faultType": fault_type,
        "severity": severity if severity is not None else default_severity,
        "resource": resource,
    }
    if context is ...:
        context = _default_fault_context(fault_type, name, resource_ns, uid, container)
    if context is not None:
        fault["context"] = context
    fault["timestamp"] = timestamp if timestamp is not None else _rfc3339_now()
    return fault


# ---------------------------------------------------------------------------------------------------------
# Request recording
# ---------------------------------------------------------------------------------------------------------


class RecordedHeaders(dict[str, str]):
    """Request headers with case-insensitive lookup. Keys are stored lower-case; repeated headers are joined
    with ", " as HTTP allows."""

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__()
        for key, value in items:
            key = key.lower()
            super().__setitem__(key, f"{super().__getitem__(key)}, {value}" if key in self else value)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)


@dataclasses.dataclass
class RecordedRequest:
    """One HTTP request as the server received it.

    `time` is `time.monotonic()` when the request arrived. `body` is the parsed JSON body, or None when the
    body was empty or not JSON (`raw_body` keeps the bytes). `status` is the status the client saw (None
    while no response has started). For a GET that became a standalone SSE stream, `stream_opened_at` is when
    its 200 headers were written and `stream_closed_at` when it ended.
    """

    method: str
    path: str
    headers: RecordedHeaders
    body: Any
    raw_body: bytes
    time: float
    status: int | None = None
    stream_opened_at: float | None = None
    stream_closed_at: float | None = None

    @property
    def session_id(self) -> str | None:
        return self.headers.get("mcp-session-id")

    @property
    def rpc_method(self) -> str | None:
        """The JSON-RPC method of a POSTed request or notification, if any."""
        if isinstance(self.body, dict) and isinstance(self.body.get("method"), str):
            return self.body["method"]
        return None

    @property
    def tool_name(self) -> str | None:
        if self.rpc_method != "tools/call":
            return None
        params = self.body.get("params")
        name = params.get("name") if isinstance(params, dict) else None
        return name if isinstance(name, str) else None

    def describe(self) -> str:
        """Short label such as "POST tools/call events_subscribe", "GET" or "DELETE -> 404" (status only when
        it is an error)."""
        parts = [self.method]
        if self.method == "POST":
            parts.append(self.rpc_method or "<no method>")
            if self.tool_name:
                parts.append(self.tool_name)
        label = " ".join(parts)
        if self.status is not None and self.status >= 400:
            label += f" -> {self.status}"
        return label


# ---------------------------------------------------------------------------------------------------------
# Internal state
# ---------------------------------------------------------------------------------------------------------

# True in a request task whose SSE response was cut off on purpose; uvicorn then logs an error we hide.
_ABORTING: contextvars.ContextVar[bool] = contextvars.ContextVar("mcp_testserver_aborting", default=False)


class _AbortedStreamLogFilter(logging.Filter):
    """Hide uvicorn's "returned without completing response" error for streams cut off to emulate a dying
    server; that unterminated response is the point, not a bug."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_ABORTING.get() and "without completing response" in record.getMessage())


_log_filter_installed = False
_log_filter_lock = threading.Lock()


def _install_log_filter() -> None:
    global _log_filter_installed
    with _log_filter_lock:
        if not _log_filter_installed:
            logging.getLogger("uvicorn.error").addFilter(_AbortedStreamLogFilter())
            _log_filter_installed = True


@dataclasses.dataclass
class _Subscription:
    subscription_id: str
    session_id: str
    mode: str
    filters: dict[str, Any]
    created_at: str
    degraded: bool = False


class _GetStream:
    """One open standalone GET SSE response. Every write to it, from the SDK or injected by test code, goes
    through `send` under one lock so SSE frames never interleave."""

    def __init__(self, session_id: str | None, record: RecordedRequest, send: Send) -> None:
        self.session_id = session_id
        self.record = record
        self._send = send
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self.written = 0  # event chunks handed to uvicorn; sse-starlette sends one SSE event per chunk
        self.completed = False  # the terminating empty chunk went out
        self.closed = False  # the wrapped app returned; nothing may be written any more
        self.cancel_scope: anyio.CancelScope | None = None
        self.dropped = False
        self.abort = False
        self.done = asyncio.Event()
        self.keepalive_task: asyncio.Task[None] | None = None

    async def send(self, message: Message, *, counted: bool = True) -> None:
        async with self._lock:
            if message["type"] == "http.response.body" and (self.completed or self.closed):
                raise RuntimeError("SSE stream already ended")
            await self._send(message)
            if message["type"] == "http.response.body":
                if message.get("body") and counted:
                    self.written += 1
                if not message.get("more_body", False):
                    self.completed = True
                self._changed.set()

    async def write(self, data: bytes, *, counted: bool = True) -> bool:
        """Write one pre-framed SSE chunk; False if the stream is gone. Uncounted chunks (keepalives) do not
        satisfy `wait_written`."""
        try:
            await self.send({"type": "http.response.body", "body": data, "more_body": True}, counted=counted)
        except Exception:
            return False
        return True

    def mark_closed(self) -> None:
        self.closed = True
        self._changed.set()

    async def wait_written(self, target: int, timeout: float) -> None:
        """Wait until `target` chunks were written or the stream ended (bounded)."""
        with anyio.move_on_after(timeout):
            while self.written < target and not self.closed and not self.completed:
                self._changed.clear()
                await self._changed.wait()


class _Run:
    """Everything one serving period knows. `restart()` discards it, which is what makes old session ids,
    levels and subscriptions unknown to the next period, as after a real process restart."""

    def __init__(self) -> None:
        self.levels: dict[str, str] = {}
        self.sessions: dict[str, ServerSession] = {}
        self.subs: dict[str, _Subscription] = {}
        self.streams: list[_GetStream] = []
        self.closing = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def stream_of(self, session_id: str) -> _GetStream | None:
        for stream in self.streams:
            if stream.session_id == session_id and not stream.closed:
                return stream
        return None


def _accepts(headers: RecordedHeaders) -> tuple[bool, bool]:
    """(accepts JSON, accepts SSE) with the wildcards go-sdk honours."""
    kinds = {part.split(";")[0].strip().lower() for part in headers.get("accept", "").split(",")}
    wildcard = "*/*" in kinds
    return (
        wildcard or "application/json" in kinds or "application/*" in kinds,
        wildcard or "text/event-stream" in kinds or "text/*" in kinds,
    )


def _text_result(text: str, *, is_error: bool = False) -> dict[str, Any]:
    # A plain dict rather than CallToolResult: the model would serialize "isError": false, which go-sdk
    # leaves out.
    result: dict[str, Any] = {"content": [{"type": "text", "text": text}]}
    if is_error:
        result["isError"] = True
    return result


def _tool(
    name: str, description: str, properties: dict[str, Any], required: list[str] | None = None
) -> types.Tool:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return types.Tool(name=name, description=description, input_schema=schema)


_TOOLS = [
    _tool(
        "events_subscribe",
        "Subscribe to Kubernetes events or resource faults; notifications arrive via logging/message.",
        {
            "mode": {"type": "string", "enum": ["events", "faults"]},
            "namespaces": {"type": "array", "items": {"type": "string"}},
            "labelSelector": {"type": "string"},
            "involvedKind": {"type": "string"},
            "involvedName": {"type": "string"},
            "involvedNamespace": {"type": "string"},
            "type": {"type": "string", "enum": ["Normal", "Warning"]},
            "reason": {"type": "string"},
        },
    ),
    _tool(
        "events_unsubscribe",
        "Cancel an event subscription of this session.",
        {"subscriptionId": {"type": "string"}},
        ["subscriptionId"],
    ),
    _tool("events_list_subscriptions", "List this session's event subscriptions.", {}),
]


# ---------------------------------------------------------------------------------------------------------
# McpTestServer
# ---------------------------------------------------------------------------------------------------------


class McpTestServer:
    """A real MCP Streamable HTTP server on `http://127.0.0.1:<port>/mcp` that behaves like the Go
    kubernetes-mcp-server-with-events, for integration tests.

    Contract:

    * Protocol: handled by the official `mcp` SDK. `initialize` answers with an `Mcp-Session-Id` header;
      POSTed requests are answered as SSE; client notifications get 202; unknown session ids get 404;
      `ping` works. Sessions never expire on their own.
    * Go-server emulation layered in front of the SDK: POST needs an Accept listing both JSON and SSE and
      GET needs SSE (else 400); a GET without session id gets 405; a GET with `Last-Event-ID` gets 400;
      an unsupported `Mcp-Protocol-Version` gets 400; DELETE ends the session with 204 and drops its
      subscriptions; no keepalive comments on SSE streams (unless `keepalive_interval` asks for them).
    * Tools: `events_subscribe`, `events_unsubscribe`, `events_list_subscriptions`, with the Go texts.
    * Delivery gates, as in the Go server: a session gets no notification before it has called
      `logging/setLevel`; a fault aimed at a session with no open GET stream cancels that subscription.
      Faults travel only on the standalone GET stream, as `notifications/message` with level "warning" and
      logger "kubernetes/faults".
    * Every HTTP request is recorded (see `requests`, `timeline`).
    * `restart()` keeps the port and forgets every session, level and subscription; `stop()` cuts open SSE
      streams off without a terminating chunk, as a dying process would, and returns within seconds.

    All public methods are thread-safe and meant to be called from test threads, never from the server's own
    event loop. `require_api_key` makes requests without `Authorization: Bearer <key>` fail with 401.
    `keepalive_interval` > 0 makes every GET stream carry `: keepalive` comments at that period, to emulate a
    proxy that sends them (the Go server does not). With `ssl_certfile` and `ssl_keyfile` it serves HTTPS
    (uvicorn's own TLS) and `url` starts with `https://`.
    """

    def __init__(
        self,
        cluster: str = "kind-test",
        port: int = 0,
        require_api_key: str | None = None,
        *,
        keepalive_interval: float = 0.0,
        path: str = MCP_PATH,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
    ) -> None:
        self.cluster = cluster
        self.port = port
        self.require_api_key = require_api_key
        self.keepalive_interval = keepalive_interval
        self.path = path
        self.ssl_certfile = ssl_certfile
        self.ssl_keyfile = ssl_keyfile
        self._cond = threading.Condition(threading.RLock())
        self._requests: list[RecordedRequest] = []
        self._run: _Run | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_certfile else "http"
        return f"{scheme}://127.0.0.1:{self.port}{self.path}"

    @property
    def running(self) -> bool:
        with self._cond:
            return self._run is not None

    def start(self, timeout: float = 10.0) -> McpTestServer:
        """Start serving; returns once requests are being answered. A no-op when already running."""
        with self._cond:
            if self._run is not None:
                return self
        # The SDK builds its EventSourceResponses without `ping`, so only the class default reaches them;
        # sse-starlette's default of 15 s would add keepalive comments the Go server never sends.
        EventSourceResponse.DEFAULT_PING_INTERVAL = 0
        _install_log_filter()

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # restart() rebinds the same port while old connections may still sit in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            # Listening before uvicorn takes over means early connects queue up instead of being refused.
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]

        run = _Run()
        config = uvicorn.Config(
            self._build_app(run),
            lifespan="on",
            log_config=None,
            log_level="warning",
            access_log=False,
            http="h11",
            ws="none",
            # Backstop only: stop() ends SSE streams itself; unbounded, uvicorn would wait for them forever.
            timeout_graceful_shutdown=1,
            ssl_certfile=self.ssl_certfile,
            ssl_keyfile=self.ssl_keyfile,
        )
        run.server = uvicorn.Server(config)
        run.thread = threading.Thread(
            target=self._thread_main, args=(run, sock), name=f"mcp-testserver-{self.port}", daemon=True
        )
        run.thread.start()
        if not run.ready.wait(timeout) or run.error is not None or not run.thread.is_alive():
            run.server.should_exit = True
            run.thread.join(5)
            sock.close()
            raise RuntimeError(f"McpTestServer failed to start on port {self.port}: {run.error!r}")
        with self._cond:
            self._run = run
            self._cond.notify_all()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, like a process that dies: open SSE streams end without their terminating chunk and
        new connections are refused. Returns within about `timeout` seconds even with clients attached."""
        with self._cond:
            run = self._run
        if run is None:
            return
        assert run.server is not None and run.thread is not None
        if run.loop is not None and run.thread.is_alive():
            try:
                self._run_on_loop(run, self._begin_shutdown(run), timeout=min(timeout, 3.0))
            except Exception:
                pass  # shutting down anyway; uvicorn's own graceful-shutdown bound takes over
        run.server.should_exit = True
        run.thread.join(timeout)
        if run.thread.is_alive():
            run.server.force_exit = True
            run.thread.join(2.0)
        with self._cond:
            if self._run is run:
                self._run = None
            self._cond.notify_all()

    def restart(self) -> None:
        """stop(), then start() on the same port with every session and subscription forgotten."""
        self.stop()
        self.start()

    def __enter__(self) -> McpTestServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _thread_main(self, run: _Run, sock: socket.socket) -> None:
        async def serve() -> None:
            run.loop = asyncio.get_running_loop()
            assert run.server is not None
            await run.server.serve(sockets=[sock])

        try:
            asyncio.run(serve())
        except BaseException as exc:  # uvicorn reports startup failure with SystemExit
            run.error = exc
        finally:
            run.ready.set()
            sock.close()

    async def _begin_shutdown(self, run: _Run) -> None:
        run.closing = True
        assert run.server is not None
        for listener in getattr(run.server, "servers", []):
            listener.close()  # refuse new connections now rather than at uvicorn's next 0.1 s tick
        await self._drop_streams(run, abort=True)

    def _run_on_loop(self, run: _Run, coro: Coroutine[Any, Any, _T], timeout: float) -> _T:
        if run.loop is None:
            coro.close()
            raise RuntimeError("McpTestServer event loop is not running")
        if threading.current_thread() is run.thread:
            coro.close()
            raise RuntimeError("McpTestServer API called from the server's own event loop thread")
        future = asyncio.run_coroutine_threadsafe(coro, run.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"McpTestServer operation did not finish within {timeout}s") from None

    def _call(self, make: Callable[[_Run], Coroutine[Any, Any, _T]], timeout: float = 5.0) -> _T:
        with self._cond:
            run = self._run
        if run is None:
            raise RuntimeError("McpTestServer is not running; call start() first")
        return self._run_on_loop(run, make(run), timeout)

    # -- inspection --------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot (copies) of every request received so far, in arrival order, across restarts."""
        with self._cond:
            return [dataclasses.replace(r) for r in self._requests]

    def clear_requests(self) -> None:
        with self._cond:
            self._requests.clear()

    def timeline(self) -> list[str]:
        """Requests as labels in time order; a GET that became a stream appears as "GET opened" at the
        moment its headers went out: ["POST initialize", "GET opened", "POST notifications/initialized", ...].
        """
        entries: list[tuple[float, str]] = []
        for r in self.requests:
            if r.method == "GET" and r.stream_opened_at is not None:
                entries.append((r.stream_opened_at, "GET opened"))
            else:
                entries.append((r.time, r.describe()))
        return [label for _, label in sorted(entries, key=lambda e: e[0])]

    def subscriptions(self, *, include_degraded: bool = False) -> list[dict[str, Any]]:
        """Active subscriptions as [{"subscription_id", "session_id", "mode"}]. Degraded ones (after
        `emit_subscription_error`) receive nothing and are left out, unless `include_degraded`, which also
        adds a "degraded" key to every entry."""
        with self._cond:
            run = self._run
            if run is None:
                return []
            result = []
            for sub in run.subs.values():
                if sub.degraded and not include_degraded:
                    continue
                entry: dict[str, Any] = {
                    "subscription_id": sub.subscription_id,
                    "session_id": sub.session_id,
                    "mode": sub.mode,
                }
                if include_degraded:
                    entry["degraded"] = sub.degraded
                result.append(entry)
            return result

    def open_get_streams(self) -> int:
        """Number of standalone GET SSE streams currently open, over all sessions."""
        with self._cond:
            run = self._run
            return 0 if run is None else sum(1 for s in run.streams if not s.closed)

    def session_ids(self) -> list[str]:
        """Sessions that have called logging/setLevel or a tool in the current serving period."""
        with self._cond:
            run = self._run
            return [] if run is None else sorted(set(run.levels) | set(run.sessions))

    def _wait(self, check: Callable[[], _T | None], timeout: float, describe: Callable[[], str]) -> _T:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = check()
                if result is not None:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    recent = ", ".join(self.timeline()[-12:]) or "none"
                    raise TimeoutError(f"{describe()} after {timeout}s; recent requests: [{recent}]")
                self._cond.wait(remaining)

    def wait_for_subscriptions(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until at least `n` active (non-degraded) subscriptions exist; returns them."""

        def check() -> list[dict[str, Any]] | None:
            subs = self.subscriptions()
            return subs if len(subs) >= n else None

        return self._wait(
            check,
            timeout,
            lambda: f"expected at least {n} active subscription(s), have {self.subscriptions()}",
        )

    def wait_for_get_streams(self, n: int, timeout: float = 10.0) -> int:
        """Wait until exactly `n` GET streams are open, e.g. after a client reconnected (n=1) or after every
        stream was closed (n=0); returns `n`."""

        def check() -> int | None:
            return n if self.open_get_streams() == n else None

        return self._wait(
            check, timeout, lambda: f"expected {n} open GET stream(s), have {self.open_get_streams()}"
        )

    def wait_for_request(
        self, predicate: Callable[[RecordedRequest], bool], timeout: float = 10.0, what: str = "request"
    ) -> RecordedRequest:
        """Wait until a recorded request satisfies `predicate`; returns the first that does."""

        def check() -> RecordedRequest | None:
            return next((r for r in self.requests if predicate(r)), None)

        return self._wait(check, timeout, lambda: f"no matching {what} arrived")

    # -- pushing -----------------------------------------------------------------------------------------

    def emit(self, fault: dict[str, Any], logger: str | None = None, timeout: float = 5.0) -> dict[str, int]:
        """Deliver `fault` to every active faults-mode subscription, gated like the Go server.

        Each subscription gets a copy with `subscriptionId` set (and `cluster` set to the server's cluster
        unless the fault carries one), as `notifications/message` {level "warning", logger `logger` or
        "kubernetes/faults"} on its session's GET stream. The copies keep the fault's `faultId` and
        `timestamp`: in the Go server every subscription has a watcher of its own, and each stamps the
        same detection with the same id and (to the second) the same time; nothing in the payload is
        unique per delivery. Like the Go server, send one `faultId` again only as a new detection, with a
        `timestamp` at least two seconds later: nightcrier stores copies of one detection once. A session
        that never called logging/setLevel gets nothing; a session without an open GET stream loses the
        subscription. Returns
        {"delivered": n, "dropped_no_level": n, "cancelled_no_stream": n}; returns after the notifications
        were written to the sockets, so a later `emit_raw` cannot overtake them.
        """
        return self._call(
            lambda run: self._notify_subscriptions(
                run,
                lambda sub: sub.mode == "faults",
                lambda sub: self._fault_data(sub, fault),
                logger or FAULTS_LOGGER,
                degrade=False,
            ),
            timeout,
        )

    def emit_subscription_error(
        self, subscription_id: str | None = None, timeout: float = 5.0
    ) -> dict[str, int]:
        """Send logger "kubernetes/subscription_error" {subscriptionId, cluster, error, degraded: true} to the
        given subscription (default: every active one) and mark it degraded: it stays listed by
        events_list_subscriptions with "degraded": true but receives nothing more. Same gates and return
        value as `emit`."""

        return self._call(
            lambda run: self._notify_subscriptions(
                run,
                lambda sub: subscription_id is None or sub.subscription_id == subscription_id,
                lambda sub: {
                    "subscriptionId": sub.subscription_id,
                    "cluster": self.cluster,
                    "error": WATCH_FAILED_TEXT,
                    "degraded": True,
                },
                SUBSCRIPTION_ERROR_LOGGER,
                degrade=True,
            ),
            timeout,
        )

    def emit_raw(self, data: str, timeout: float = 5.0) -> int:
        """Write `event: message\\ndata: <data>\\n\\n` (LF framing, like the Go server; one `data:` line per
        line of `data`) to every open GET stream, bypassing MCP entirely and ignoring the delivery gates.
        For malformed-input tests. Returns the number of streams written."""
        lines = "".join(f"data: {line}\n" for line in data.split("\n"))
        chunk = f"event: message\n{lines}\n".encode()

        async def write_all(run: _Run) -> int:
            with self._cond:
                streams = [s for s in run.streams if not s.closed]
            written = 0
            for stream in streams:
                written += await stream.write(chunk)
            return written

        return self._call(write_all, timeout)

    def drop_get_streams(self, abort: bool = False, timeout: float = 5.0) -> int:
        """Close every open GET stream from the server side; sessions and subscriptions stay valid and a new
        GET on the same session is accepted. abort=False ends each response cleanly (terminating chunk);
        abort=True cuts the connection mid-response, as a crash or proxy reset would. Returns the number of
        streams closed."""
        return self._call(lambda run: self._drop_streams(run, abort=abort), timeout)

    def _fault_data(self, sub: _Subscription, fault: dict[str, Any]) -> dict[str, Any]:
        data: dict[str, Any] = {
            "subscriptionId": sub.subscription_id,
            "cluster": fault.get("cluster", self.cluster),
        }
        data.update({k: v for k, v in fault.items() if k not in data})
        return data

    async def _notify_subscriptions(
        self,
        run: _Run,
        wanted: Callable[[_Subscription], bool],
        payload: Callable[[_Subscription], dict[str, Any]],
        logger: str,
        *,
        degrade: bool,
    ) -> dict[str, int]:
        """Runs on the server loop. Applies the Go server's two delivery gates to every active subscription
        `wanted` accepts, then sends through the SDK and waits until the bytes were written."""
        result = {"delivered": 0, "dropped_no_level": 0, "cancelled_no_stream": 0}
        sends: list[tuple[_Subscription, ServerSession, _GetStream]] = []
        with self._cond:
            for sub in [s for s in run.subs.values() if not s.degraded and wanted(s)]:
                session = run.sessions.get(sub.session_id)
                if sub.session_id not in run.levels or session is None:
                    # go-sdk's ServerSession.Log drops everything until the client set a level.
                    result["dropped_no_level"] += 1
                    continue
                stream = run.stream_of(sub.session_id)
                if stream is None:
                    # go-sdk fails the send without a GET attached and the fork then cancels the subscription.
                    del run.subs[sub.subscription_id]
                    result["cancelled_no_stream"] += 1
                    continue
                sends.append((sub, session, stream))
            self._cond.notify_all()

        expected: dict[_GetStream, int] = {}
        for sub, session, stream in sends:
            expected.setdefault(stream, stream.written)
            notification = types.LoggingMessageNotification(
                params=types.LoggingMessageNotificationParams(
                    level="warning", logger=logger, data=payload(sub)
                )
            )
            # No related_request_id: the SDK then routes to the session's standalone (GET) stream, exactly
            # where the Go server's background-context sends land.
            await session.send_notification(notification)
            expected[stream] += 1
            result["delivered"] += 1
            if degrade:
                with self._cond:
                    sub.degraded = True
                    self._cond.notify_all()
        for stream, target in expected.items():
            await stream.wait_written(target, timeout=2.0)
        return result

    async def _drop_streams(self, run: _Run, *, abort: bool) -> int:
        with self._cond:
            streams = [s for s in run.streams if not s.closed and s.cancel_scope is not None]
        for stream in streams:
            stream.dropped = True
            stream.abort = abort
            assert stream.cancel_scope is not None
            stream.cancel_scope.cancel()
        with anyio.move_on_after(3.0):
            for stream in streams:
                await stream.done.wait()
        return len(streams)

    # -- the ASGI layer ----------------------------------------------------------------------------------

    def _record(self, record: RecordedRequest) -> None:
        with self._cond:
            self._requests.append(record)
            self._cond.notify_all()

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _build_app(self, run: _Run) -> ASGIApp:
        server: Server[Any] = Server(
            "kubernetes-mcp-server",
            version="test",
            on_list_tools=self._make_list_tools(),
            on_call_tool=self._make_call_tool(run),
        )
        # Registered by hand: the constructor's on_set_logging_level emits an MCPDeprecationWarning.
        server.add_request_handler("logging/setLevel", types.SetLevelRequestParams, self._make_set_level(run))
        inner = server.streamable_http_app(
            streamable_http_path=self.path, host="127.0.0.1", session_idle_timeout=None
        )

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await self._asgi(run, inner, scope, receive, send)

        return app

    async def _asgi(self, run: _Run, inner: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":

            async def lifespan_send(message: Message) -> None:
                await send(message)
                if message["type"] == "lifespan.startup.complete":
                    run.ready.set()

            await inner(scope, receive, lifespan_send)
            return
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return

        arrived = time.monotonic()
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body arrived
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        record = RecordedRequest(
            method=scope["method"],
            path=scope["path"],
            headers=RecordedHeaders((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]),
            body=body,
            raw_body=raw,
            time=arrived,
        )
        self._record(record)

        # The body was consumed above; the SDK reads it again from this replay.
        pending: list[Message] = [{"type": "http.request", "body": raw, "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        rejection = self._gate(run, record)
        if rejection is not None:
            status, text, extra = rejection
            await self._plain_response(send, record, status, text, extra)
            return
        if record.method == "GET" and record.path == self.path:
            await self._serve_get_stream(run, inner, scope, replay, send, record)
            return

        rewrite_delete = record.method == "DELETE" and record.path == self.path

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                if rewrite_delete and message["status"] == 200:
                    # go-sdk answers a successful DELETE with 204 and no body; the Python SDK with 200.
                    headers = [
                        (k, v) for k, v in message.get("headers", []) if k.lower() not in _BODY_HEADERS
                    ]
                    message = {**message, "status": 204, "headers": headers}
                    if record.session_id:
                        # Before the reply goes out: whoever saw the 204 must find the subscriptions gone.
                        self._forget_session(run, record.session_id)
                record.status = message["status"]
            elif message["type"] == "http.response.body" and record.status == 204:
                message = {**message, "body": b""}
            await send(message)

        await inner(scope, replay, tracking_send)
        self._notify()

    def _gate(self, run: _Run, record: RecordedRequest) -> tuple[int, str, dict[str, str]] | None:
        """Checks the Go server makes before its MCP handler; returns (status, text, headers) to reject."""
        headers = record.headers
        if run.closing:
            return 503, "server shutting down", {"connection": "close"}
        if (
            self.require_api_key is not None
            and headers.get("authorization") != f"Bearer {self.require_api_key}"
        ):
            return 401, "Unauthorized", {"www-authenticate": 'Bearer realm="kubernetes-mcp-server"'}
        if record.path != self.path:
            return None
        version = headers.get("mcp-protocol-version")
        if version is not None and version not in SUPPORTED_PROTOCOL_VERSIONS:
            return (
                400,
                f"Bad Request: Unsupported protocol version (supported: {SUPPORTED_PROTOCOL_VERSIONS})",
                {},
            )
        accepts_json, accepts_sse = _accepts(headers)
        if record.method == "POST" and not (accepts_json and accepts_sse):
            return 400, "Accept must contain both 'application/json' and 'text/event-stream'", {}
        if record.method == "GET":
            if not accepts_sse:
                return 400, "Accept must contain 'text/event-stream' for GET requests", {}
            if not record.session_id:
                return 405, "GET requires an Mcp-Session-Id header", {"allow": "POST, DELETE"}
            if "last-event-id" in headers:
                return 400, "stream replay unsupported", {}
        return None

    async def _plain_response(
        self, send: Send, record: RecordedRequest, status: int, text: str, extra: dict[str, str]
    ) -> None:
        body = (text + "\n").encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ]
        headers += [(k.encode(), v.encode()) for k, v in extra.items()]
        record.status = status
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        self._notify()

    async def _serve_get_stream(
        self, run: _Run, inner: ASGIApp, scope: Scope, receive: Receive, send: Send, record: RecordedRequest
    ) -> None:
        stream = _GetStream(record.session_id, record, send)

        async def stream_send(message: Message) -> None:
            await stream.send(message)
            if message["type"] != "http.response.start":
                return
            record.status = message["status"]
            if message["status"] == 200:
                record.stream_opened_at = time.monotonic()
                with self._cond:
                    run.streams.append(stream)
                    self._cond.notify_all()
                if self.keepalive_interval > 0:
                    stream.keepalive_task = asyncio.get_running_loop().create_task(self._keepalive(stream))
            else:
                self._notify()

        try:
            with anyio.CancelScope() as cancel_scope:
                stream.cancel_scope = cancel_scope
                await inner(scope, receive, stream_send)
        finally:
            stream.mark_closed()
            if stream.keepalive_task is not None:
                stream.keepalive_task.cancel()
            if record.stream_opened_at is not None:
                record.stream_closed_at = time.monotonic()
            with self._cond:
                if stream in run.streams:
                    run.streams.remove(stream)
                self._cond.notify_all()
            stream.done.set()
        if stream.dropped and record.stream_opened_at is not None and not stream.completed:
            if stream.abort:
                # Returning with the chunked body unterminated makes uvicorn close the socket: the client sees
                # the stream end prematurely, as when the Go process dies.
                _ABORTING.set(True)
            else:
                try:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except Exception:
                    pass  # the client left first

    async def _keepalive(self, stream: _GetStream) -> None:
        while True:
            await asyncio.sleep(self.keepalive_interval)
            if not await stream.write(f": keepalive {_rfc3339_now()}\n\n".encode(), counted=False):
                return

    def _forget_session(self, run: _Run, session_id: str) -> None:
        with self._cond:
            run.levels.pop(session_id, None)
            run.sessions.pop(session_id, None)
            for sub_id in [k for k, s in run.subs.items() if s.session_id == session_id]:
                del run.subs[sub_id]
            self._cond.notify_all()

    # -- MCP handlers ------------------------------------------------------------------------------------

    @staticmethod
    def _session_id_of(ctx: Any) -> str | None:
        # On Streamable HTTP `ctx.request` is the Starlette Request that carried the message.
        request = getattr(ctx, "request", None)
        return request.headers.get("mcp-session-id") if request is not None else None

    def _make_list_tools(self) -> Callable[..., Coroutine[Any, Any, types.ListToolsResult]]:
        async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
            return types.ListToolsResult(tools=list(_TOOLS))

        return list_tools

    def _make_set_level(self, run: _Run) -> Callable[..., Coroutine[Any, Any, types.EmptyResult]]:
        async def set_level(ctx: Any, params: types.SetLevelRequestParams) -> types.EmptyResult:
            session_id = self._session_id_of(ctx)
            if session_id:
                with self._cond:
                    run.levels[session_id] = params.level
                    # Any request's session proxy reaches the connection's standalone channel; keep one.
                    run.sessions.setdefault(session_id, ctx.session)
                    self._cond.notify_all()
            return types.EmptyResult()

        return set_level

    def _make_call_tool(self, run: _Run) -> Callable[..., Coroutine[Any, Any, dict[str, Any]]]:
        async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> dict[str, Any]:
            session_id = self._session_id_of(ctx)
            args = params.arguments or {}
            if params.name not in ("events_subscribe", "events_unsubscribe", "events_list_subscriptions"):
                raise MCPError(code=types.INVALID_PARAMS, message=f'unknown tool "{params.name}"')
            if not session_id:
                return _text_result(
                    "event subscriptions require an HTTP/SSE transport with session management", is_error=True
                )
            with self._cond:
                run.sessions.setdefault(session_id, ctx.session)
                try:
                    if params.name == "events_subscribe":
                        return self._subscribe(run, session_id, args)
                    if params.name == "events_unsubscribe":
                        return self._unsubscribe(run, session_id, args)
                    return self._list_subscriptions(run, session_id)
                finally:
                    self._cond.notify_all()

        return call_tool

    def _subscribe(self, run: _Run, session_id: str, args: dict[str, Any]) -> dict[str, Any]:
        mode = args.get("mode") or "events"
        if mode not in ("events", "faults"):
            return _text_result(INVALID_MODE_TEXT, is_error=True)
        filters = {k: args[k] for k in _SUBSCRIPTION_FILTER_KEYS if args.get(k) not in (None, "", [])}
        if mode == "faults" and filters.get("type") == "Normal":
            return _text_result(
                "failed to create subscription: faults mode requires Warning events (type=Normal given)",
                is_error=True,
            )
        own = sum(1 for s in run.subs.values() if s.session_id == session_id)
        if own >= MAX_SUBSCRIPTIONS_PER_SESSION:
            return _text_result(
                "failed to create subscription: maximum subscriptions per session "
                f"({MAX_SUBSCRIPTIONS_PER_SESSION}) reached",
                is_error=True,
            )
        if len(run.subs) >= MAX_SUBSCRIPTIONS_TOTAL:
            return _text_result(
                "failed to create subscription: maximum total subscriptions "
                f"({MAX_SUBSCRIPTIONS_TOTAL}) reached",
                is_error=True,
            )
        sub = _Subscription(
            subscription_id="sub-" + str(uuid.uuid4())[:8],
            session_id=session_id,
            mode=mode,
            filters=filters,
            created_at=_rfc3339_now(),
        )
        run.subs[sub.subscription_id] = sub
        created = {
            "subscriptionId": sub.subscription_id,
            "cluster": self.cluster,
            "mode": mode,
            "filters": filters,
            "createdAt": sub.created_at,
            "status": "active",
        }
        return _text_result(
            SUBSCRIBE_SUCCESS_HEADER + json.dumps(created, indent=2) + SUBSCRIBE_SUCCESS_FOOTER
        )

    def _unsubscribe(self, run: _Run, session_id: str, args: dict[str, Any]) -> dict[str, Any]:
        sub_id = args.get("subscriptionId")
        sub = run.subs.get(sub_id) if isinstance(sub_id, str) else None
        if sub is None or sub.session_id != session_id:
            return _text_result(UNSUBSCRIBE_NOT_FOUND_TEXT, is_error=True)
        del run.subs[sub.subscription_id]
        body = {"subscriptionId": sub.subscription_id, "cancelled": True, "status": "success"}
        return _text_result("# Subscription Cancelled\n\n" + json.dumps(body, indent=2))

    def _list_subscriptions(self, run: _Run, session_id: str) -> dict[str, Any]:
        own = [
            {
                "subscriptionId": s.subscription_id,
                "cluster": self.cluster,
                "mode": s.mode,
                "filters": s.filters,
                "createdAt": s.created_at,
                "degraded": s.degraded,
            }
            for s in run.subs.values()
            if s.session_id == session_id
        ]
        body = {"subscriptions": own, "total": len(own)}
        return _text_result("# Active Subscriptions\n\n" + json.dumps(body, indent=2))


_BODY_HEADERS = (b"content-type", b"content-length")


# ---------------------------------------------------------------------------------------------------------
# Hostile servers
# ---------------------------------------------------------------------------------------------------------


class HangingServer:
    """Accepts TCP connections on 127.0.0.1 and never sends a single byte, not even a status line, until
    stopped. Models a peer that is reachable but stuck (half-open connection, wedged process). Same
    `start()/stop()/url/port` surface as `McpTestServer`; `accepted` counts connections taken."""

    def __init__(self, port: int = 0, *, path: str = MCP_PATH) -> None:
        self.port = port
        self.path = path
        self.accepted = 0
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def start(self) -> HangingServer:
        if self._thread is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        # A socketpair wakes the accept loop on stop(), so it needs no polling timeout.
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"hanging-server-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wake_r is not None
        while True:
            readable, _, _ = select.select([self._listener, self._wake_r], [], [])
            if self._wake_r in readable:
                return
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
                self.accepted += 1

    def stop(self) -> None:
        if self._thread is None:
            return
        assert self._wake_w is not None
        self._wake_w.send(b"x")
        self._thread.join(5)
        self._thread = None
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in [*conns, self._listener, self._wake_r, self._wake_w]:
            if sock is not None:
                sock.close()

    def __enter__(self) -> HangingServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ErrorServer:
    """Answers every HTTP request (any method, any path) on 127.0.0.1 with `status`, a short text/plain
    `body` and any extra `headers` (e.g. {"Retry-After": "1"}), then closes the connection. Models a broken
    proxy or a crashing backend. Same `start()/stop()/url/port` surface as `McpTestServer`; `requests`
    lists (method, path) of everything answered."""

    def __init__(
        self,
        status: int = 500,
        *,
        port: int = 0,
        body: bytes = b"injected failure\n",
        headers: dict[str, str] | None = None,
        path: str = MCP_PATH,
    ) -> None:
        self.status = status
        self.port = port
        self.body = body
        self.extra_headers = dict(headers or {})
        self.path = path
        self.requests: list[tuple[str, str]] = []
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def start(self) -> ErrorServer:
        if self._httpd is not None:
            return self
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                owner.requests.append((self.command, self.path))
                self.send_response(owner.status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(owner.body)))
                for key, value in owner.extra_headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(owner.body)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = do_HEAD = do_OPTIONS = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        httpd.daemon_threads = True
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"error-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> ErrorServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
