"""MCP intake against real MCP servers built with the official SDK and behaving like the Go server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, stored_payload, wait_for
from mcp_testserver import ErrorServer, HangingServer, McpTestServer, make_fault
from tcp_proxy import TcpProxy

import nightcrier as nc

FAST = {"sse_reconnect_initial_backoff": 0.05, "sse_reconnect_max_backoff": 0.5, "mcp_ping_interval": 1,
        "mcp_connect_timeout": 1, "mcp_request_timeout": 2, "health_port": 0}


@pytest.fixture(name="servers")
def servers_fixture() -> Iterator[Callable[..., McpTestServer]]:
    started: list[Any] = []

    def start(kind: type = McpTestServer, **kwargs: Any) -> Any:
        server = kind(**kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def config_for(tmp_path: Path, endpoints: dict[str, str], *, triage: bool = True,
               **overrides: Any) -> nc.Config:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    data = {"workspace_root": str(tmp_path / "ws"), **FAST, **overrides,
            "clusters": [{"name": name, "mcp": {"endpoint": url},
                          "triage": {"enabled": triage, "kubeconfig": str(kubeconfig)}}
                         for name, url in endpoints.items()]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    config, _ = nc.load_config(str(path), env={})
    return config


@pytest.fixture(name="run_service")
def run_service_fixture() -> Iterator[Callable[..., nc.Service]]:
    running: list[nc.Service] = []

    def start(config: nc.Config, store: nc.StateStore | None = None) -> nc.Service:
        service = nc.Service(config, store).start()
        running.append(service)
        return service

    yield start
    for service in running:
        service.stop()


def incidents(store: nc.StateStore, cluster: str = "") -> list[nc.Incident]:
    return store.list_incidents(nc.IncidentFilter(cluster=cluster, limit=100000))


def wait_for_incidents(store: nc.StateStore, n: int, timeout: float = 20.0) -> list[nc.Incident]:
    return wait_for(lambda: (found := incidents(store)) and len(found) >= n and found, timeout,
                    what=f"{n} incidents")


# -- the handshake --------------------------------------------------------------------------


def test_handshake_order_and_headers(tmp_path: Path, servers: Callable[..., McpTestServer],
                                     run_service: Callable[..., nc.Service]) -> None:
    server = servers(require_api_key="cluster-api-key")
    config = config_for(tmp_path, {"prod": server.url})
    config.clusters[0].mcp.api_key = "cluster-api-key"
    run_service(config)
    server.wait_for_subscriptions(1)
    requests = server.requests
    assert [r.describe() for r in requests[:5]] == [
        "POST initialize", "GET", "POST notifications/initialized", "POST logging/setLevel",
        "POST tools/call events_subscribe"]
    initialize, get, initialized, set_level, subscribe = requests[:5]
    assert initialize.body["params"]["protocolVersion"] == "2025-06-18"
    assert initialize.body["params"]["clientInfo"] == {"name": "nightcrier", "version": nc.__version__}
    assert "Mcp-Session-Id" not in initialize.headers
    session = get.headers["Mcp-Session-Id"]
    assert session and all(r.headers["Mcp-Session-Id"] == session for r in requests[1:5])
    for request in requests[:5]:
        assert request.headers["Authorization"] == "Bearer cluster-api-key"
    for request in (initialize, initialized, set_level, subscribe):
        accept = request.headers["Accept"]
        assert "application/json" in accept and "text/event-stream" in accept
        assert request.headers["Content-Type"].startswith("application/json")
    assert get.headers["Accept"] == "text/event-stream"
    assert all(r.headers["Mcp-Protocol-Version"] == "2025-06-18" for r in requests[1:5])
    assert set_level.body["params"] == {"level": "info"}
    assert subscribe.body["params"] == {"name": "events_subscribe", "arguments": {"mode": "faults"}}


def test_shutdown_deletes_the_session(tmp_path: Path, servers: Callable[..., McpTestServer]) -> None:
    server = servers()
    service = nc.Service(config_for(tmp_path, {"prod": server.url})).start()
    server.wait_for_subscriptions(1)
    service.stop()
    delete = server.wait_for_request(lambda r: r.method == "DELETE", what="DELETE")
    assert delete.headers["Mcp-Session-Id"]
    assert server.subscriptions() == []


# -- delivery ------------------------------------------------------------------------------------


def test_three_servers_300_faults_become_300_incidents(tmp_path: Path,
                                                       servers: Callable[..., McpTestServer],
                                                       run_service: Callable[..., nc.Service]) -> None:
    fleet = {f"cluster-{n}": servers(cluster=f"upstream-{n}") for n in range(3)}
    service = run_service(config_for(tmp_path, {name: s.url for name, s in fleet.items()}))
    for server in fleet.values():
        server.wait_for_subscriptions(1)
    sent: dict[str, tuple[str, dict[str, Any]]] = {}
    for i in range(300):
        name = f"cluster-{i % 3}"
        fault = make_fault(("PodCrash", "CrashLoop", "NodeUnhealthy", "DeploymentFailure",
                            "JobFailure")[i % 5], name=f"res-{i}")
        assert fleet[name].emit(fault)["delivered"] == 1
        sent[f"res-{i}"] = (name, fault)
    found = wait_for_incidents(service.store, 300)
    assert len(found) == 300
    for incident in found:
        cluster, fault = sent[incident.resource_name]
        assert incident.cluster == cluster
        assert incident.status == nc.PENDING
        assert (incident.fault_id, incident.fault_type, incident.severity, incident.context,
                incident.timestamp) == (fault["faultId"], fault["faultType"], fault["severity"],
                                        fault.get("context", ""), fault["timestamp"])
        assert (incident.resource_kind, incident.resource_api_version, incident.resource_uid,
                incident.resource_namespace) == (fault["resource"]["kind"], fault["resource"]["apiVersion"],
                                                 fault["resource"]["uid"],
                                                 fault["resource"].get("namespace", ""))
    (sample,) = [i for i in found if i.resource_name == "res-7"]
    payload = stored_payload(service.store, sample.event_id)
    assert payload["method"] == "notifications/message"
    assert payload["params"]["logger"] == "kubernetes/faults"
    assert payload["params"]["data"]["resource"]["name"] == "res-7"
    assert payload["params"]["data"]["cluster"] == "upstream-1"


def test_triage_disabled_clusters_record_skipped_incidents(tmp_path: Path,
                                                           servers: Callable[..., McpTestServer],
                                                           run_service: Callable[..., nc.Service]) -> None:
    server = servers()
    service = run_service(config_for(tmp_path, {"lab": server.url}, triage=False))
    server.wait_for_subscriptions(1)
    server.emit(make_fault())
    (incident,) = wait_for_incidents(service.store, 1)
    assert incident.status == nc.SKIPPED


def test_created_at_is_the_receive_time(tmp_path: Path, servers: Callable[..., McpTestServer],
                                        run_service: Callable[..., nc.Service]) -> None:
    server = servers()
    service = run_service(config_for(tmp_path, {"prod": server.url}))
    server.wait_for_subscriptions(1)
    before = nc.utcnow()
    server.emit(make_fault())
    (incident,) = wait_for_incidents(service.store, 1)
    assert before <= incident.created_at <= incident.updated_at


# -- reconnecting ---------------------------------------------------------------------------------


def test_server_restart_means_a_new_session_and_a_recorded_gap(
        tmp_path: Path, servers: Callable[..., McpTestServer],
        run_service: Callable[..., nc.Service]) -> None:
    server = servers()
    service = run_service(config_for(tmp_path, {"prod": server.url}))
    (first,) = server.wait_for_subscriptions(1)
    server.emit(make_fault(name="before"))
    wait_for_incidents(service.store, 1)
    old_session = first["session_id"]

    server.restart()
    server.wait_for_request(lambda r: r.session_id == old_session and r.status == 404,
                            what="a request with the old session answered 404")
    (second,) = server.wait_for_subscriptions(1)
    assert second["session_id"] != old_session
    server.emit(make_fault(name="after"))
    found = wait_for_incidents(service.store, 2)
    assert {i.resource_name for i in found} == {"before", "after"}

    gap = wait_for(lambda: service.store.list_gaps("prod"), what="the gap to be stored")[0]
    assert gap.ended_at is not None and gap.started_at <= gap.ended_at
    assert gap.reason
    health = service.health()[0]
    assert health.status == nc.ACTIVE and health.subscription_id == second["subscription_id"]
    assert health.gaps and health.gaps[-1].gap_id == gap.gap_id


def test_stream_ending_reopens_it_and_subscribes_again(tmp_path: Path,
                                                        servers: Callable[..., McpTestServer],
                                                        run_service: Callable[..., nc.Service]) -> None:
    server = servers()
    service = run_service(config_for(tmp_path, {"prod": server.url}))
    (first,) = server.wait_for_subscriptions(1)
    assert server.drop_get_streams() == 1
    wait_for(lambda: [s["subscription_id"] for s in server.subscriptions()] not in (
        [], [first["subscription_id"]]) and len(server.subscriptions()) == 1,
        what="the old subscription replaced by a new one on the reopened stream")
    server.wait_for_get_streams(1)
    server.emit(make_fault(name="after-reopen"))
    (incident,) = wait_for_incidents(service.store, 1)
    assert incident.resource_name == "after-reopen"
    assert wait_for(lambda: service.store.list_gaps("prod"), what="gap")[0].reason.startswith(
        "notification stream ended")


def test_subscription_error_means_subscribe_again(tmp_path: Path, servers: Callable[..., McpTestServer],
                                                  run_service: Callable[..., nc.Service]) -> None:
    server = servers()
    service = run_service(config_for(tmp_path, {"prod": server.url}))
    (first,) = server.wait_for_subscriptions(1)
    assert server.emit_subscription_error()["delivered"] == 1
    (second,) = wait_for(lambda: [s for s in server.subscriptions(include_degraded=True)
                                  if s["subscription_id"] != first["subscription_id"]]
                         and len(server.subscriptions(include_degraded=True)) == 1
                         and server.subscriptions(), what="the degraded subscription replaced")
    server.emit(make_fault(name="after-error"))
    (incident,) = wait_for_incidents(service.store, 1)
    assert incident.resource_name == "after-error"
    assert incident.subscription_id == second["subscription_id"]
    gap = wait_for(lambda: service.store.list_gaps("prod"), what="gap")[0]
    assert "subscription_error" in gap.reason


@pytest.mark.parametrize("bad", ["hanging", "http-500", "down"])
def test_a_bad_server_backs_off_while_healthy_ones_keep_delivering(
        tmp_path: Path, bad: str, servers: Callable[..., McpTestServer],
        run_service: Callable[..., nc.Service]) -> None:
    healthy = servers()
    if bad == "hanging":
        bad_url = servers(HangingServer).url
    elif bad == "http-500":
        bad_url = servers(ErrorServer, status=500).url
    else:
        down = McpTestServer().start()
        bad_url = down.url
        down.stop()
    service = run_service(config_for(tmp_path, {"good": healthy.url, "bad": bad_url}))
    healthy.wait_for_subscriptions(1)
    for i in range(20):
        healthy.emit(make_fault(name=f"good-{i}"))
    wait_for_incidents(service.store, 20)
    bad_health = wait_for(lambda: (h := service.health()[1]).reconnects >= 2 and h, timeout=20,
                          what="the bad cluster to retry")
    assert bad_health.status in (nc.FAILED_STATE, nc.CONNECTING)
    assert bad_health.last_error
    assert service.health()[0].status == nc.ACTIVE
    assert service.metrics.value("listener_errors", "bad") >= 2


def test_down_at_startup_then_up_subscribes(tmp_path: Path, run_service: Callable[..., nc.Service]) -> None:
    server = McpTestServer().start()
    port = server.port
    server.stop()
    service = run_service(config_for(tmp_path, {"late": server.url}))
    wait_for(lambda: service.health()[0].reconnects >= 1, what="a failed first attempt")
    late = McpTestServer(port=port).start()
    try:
        late.wait_for_subscriptions(1, timeout=20)
        late.emit(make_fault(name="late"))
        wait_for_incidents(service.store, 1)
        gap = wait_for(lambda: service.store.list_gaps("late"), what="the startup gap")[0]
        assert "Connection" in gap.reason or "connect" in gap.reason.lower()
    finally:
        late.stop()


# -- malformed input --------------------------------------------------------------------------------


def _notification(data: Any, logger: str = "kubernetes/faults") -> str:
    return json.dumps({"jsonrpc": "2.0", "method": "notifications/message",
                       "params": {"level": "warning", "logger": logger, "data": data}})


def test_malformed_notifications_are_rejected_or_ignored_and_the_listener_lives(
        tmp_path: Path, servers: Callable[..., McpTestServer],
        run_service: Callable[..., nc.Service]) -> None:
    server = servers()
    service = run_service(config_for(tmp_path, {"prod": server.url}))
    server.wait_for_subscriptions(1)
    good = make_fault(name="good")
    no_id = {k: v for k, v in make_fault(name="no-fault-id").items() if k != "faultId"}
    huge = make_fault(name="huge", context="x" * (5 * 1024 * 1024))
    bad = {
        "not json {": "not JSON",
        json.dumps({"jsonrpc": "2.0", "id": 9, "error": {"code": -32603, "message": "boom"}}):
            "JSON-RPC error on the notification stream",
        _notification({**good, "faultType": 42}): "params.data.faultType",
        _notification({**good, "resource": "pod/x"}): "params.data.resource: expected an object",
        _notification({**good, "severity": ["critical"]}): "params.data.severity: expected a string",
        _notification("just a string"): "params.data: expected an object, got string",
        json.dumps([1, 2, 3]): "top level is array",
    }
    for raw in bad:
        assert server.emit_raw(raw) == 1
    server.emit_raw(_notification(good, logger="kubernetes/unknown"))
    server.emit_raw(json.dumps({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}))
    server.emit_raw(_notification(no_id))
    server.emit_raw(_notification(huge))
    server.emit(good)

    found = wait_for_incidents(service.store, 3)
    by_name = {i.resource_name: i for i in found}
    assert set(by_name) == {"good", "no-fault-id", "huge"}, "unknown loggers are ignored"
    assert by_name["no-fault-id"].fault_id == ""
    assert len(by_name["huge"].context) < 100_000 and "more characters in the raw payload" in \
        by_name["huge"].context
    assert len(json.dumps(stored_payload(service.store, by_name["huge"].event_id))) > 5 * 1024 * 1024
    rejected = wait_for(lambda: len(found := service.store.list_rejected()) >= len(bad) and found,
                        what="rejections to be stored")
    reasons = [r.reason for r in rejected]
    for raw, reason in bad.items():
        assert any(reason in r for r in reasons), (reason, reasons)
        assert any(r.raw_body == raw for r in rejected)
    assert service.metrics.value("rejected", "prod") == len(bad)
    assert service.health()[0].status == nc.ACTIVE


@pytest.mark.parametrize("raw, expected", [
    ('{"jsonrpc":"2.0","method":"notifications/message","params":{"logger":"kubernetes/resource-faults",'
     '"level":"warning","data":{"faultType":"CrashLoop","resource":{"kind":"Pod","name":"p"}}}}',
     nc.FaultEvent),
    ('{"jsonrpc":"2.0","method":"notifications/message","params":{"logger":"kubernetes/faults",'
     '"data":"{\\"faultType\\":\\"PodCrash\\"}"}}', nc.FaultEvent),
    ('{"jsonrpc":"2.0","method":"notifications/message","params":{"logger":"kubernetes/faults",'
     '"data":{"faultType":"PodCrash","context":{"container":"app"}}}}', nc.FaultEvent),
    ('{"jsonrpc":"2.0","method":"notifications/message","params":{"logger":"kubernetes/faults",'
     '"data":{"faultType":""}}}', nc.RejectedNotification),
    ('{"jsonrpc":"2.0","method":"notifications/message","params":"x"}', nc.RejectedNotification),
    ('{"jsonrpc":"2.0","id":1,"result":{}}', nc.RejectedNotification),
    ('{"jsonrpc":"2.0","method":"notifications/message","params":{"logger":"kubernetes/events",'
     '"data":{}}}', type(None)),
    ('{"jsonrpc":"2.0","method":"notifications/message","params":{"logger":'
     '"kubernetes/subscription_error","data":{"subscriptionId":"sub-1","error":"watch failed"}}}',
     nc.SubscriptionErrorNotice),
])
def test_parse_notification(raw: str, expected: type) -> None:
    assert type(nc.parse_notification(raw, "prod", nc.utcnow())) is expected


def test_json_context_is_kept_as_text() -> None:
    raw = _notification({"faultType": "CrashLoop", "context": [{"container": "app", "sample": "panic"}]})
    event = nc.parse_notification(raw, "prod", nc.utcnow())
    assert isinstance(event, nc.FaultEvent)
    assert json.loads(event.context) == [{"container": "app", "sample": "panic"}]


# -- the spool -----------------------------------------------------------------------------------------


def test_spool_appends_seals_replays_and_skips_a_torn_line(tmp_path: Path) -> None:
    spool = nc.Spool(str(tmp_path / "spool"))
    event = nc.FaultEvent(cluster="c", fault_type="PodCrash", received_at=nc.utcnow(), mcp_payload="{}")
    gap = nc.SubscriptionGap("c", nc.utcnow(), "restart", ended_at=nc.utcnow())
    spool.append([event, gap])
    (first,) = spool.take_segments()
    spool.append([nc.RejectedNotification("c", "bad", "raw")])
    with open(tmp_path / "spool" / "current.jsonl", "a") as fh:
        fh.write('{"kind": "event", "cluster": "c", "tor')
    segments = spool.take_segments()
    assert segments[0] == first and len(segments) == 2
    assert spool.read(first) == [event, gap]
    (rejected,) = spool.read(segments[1])
    assert rejected.reason == "bad"
    for segment in segments:
        spool.remove(segment)
    assert not spool.has_items()
    assert (os.stat(first.rsplit("/", 1)[0]).st_mode & 0o777) == 0o700


def test_sink_spools_when_the_queue_is_full_and_counts_drops(tmp_path: Path) -> None:
    metrics = nc.Metrics()
    spool_dir = tmp_path / "spool"
    sink = nc.IngestSink(1, nc.Spool(str(spool_dir)), metrics)
    event = lambda: nc.FaultEvent(cluster="c", fault_type="X", received_at=nc.utcnow(),  # noqa: E731
                                  mcp_payload="{}")
    assert [sink.put(event()) for _ in range(3)] == ["queued", "spooled", "spooled"]
    assert metrics.value("spooled", "c") == 2
    spool_dir.chmod(0o500)
    (spool_dir / "current.jsonl").chmod(0o400)
    if os.geteuid() == 0:  # root writes through permissions; make the file really unwritable
        subprocess.run(["chattr", "+i", str(spool_dir / "current.jsonl")], check=True)
    try:
        assert sink.put(event()) == "dropped"
        assert metrics.value("dropped", "c") == 1
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(spool_dir / "current.jsonl")], check=True)
        spool_dir.chmod(0o700)


# -- the database goes away ----------------------------------------------------------------------------


class _SqliteOutage:
    """The SQLite file and its write-ahead log made unwritable.

    Immutable rather than read-only, so that root cannot write them either;
    the shared-memory index is left alone because it is mapped into memory.
    """

    def __init__(self, path: str):
        self.files = [path, path + "-wal"]

    def begin(self) -> None:
        subprocess.run(["chattr", "+i", *[f for f in self.files if os.path.exists(f)]], check=True)

    def end(self) -> None:
        subprocess.run(["chattr", "-i", *[f for f in self.files if os.path.exists(f)]], check=True)


@pytest.fixture
def outage_target(engine: str, tmp_path: Path, request: pytest.FixtureRequest
                  ) -> Iterator[tuple[dict[str, Any], Any]]:
    """Storage settings for a config plus an object whose begin()/end() make the database unavailable."""
    if engine == "sqlite":
        path = str(tmp_path / "db" / "nightcrier.db")
        nc.SqliteStore(path).close()
        outage = _SqliteOutage(path)
        yield {"type": "sqlite", "sqlite_path": path, "sqlite_busy_timeout": 0.2}, outage
        outage.end()
        return
    url = request.getfixturevalue("postgres_schema_url")
    parts = urllib.parse.urlsplit(url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    proxied = parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{proxy.port}")
    proxy_url = urllib.parse.urlunsplit(proxied)
    nc.PostgresStore(proxy_url).close()
    proxy.begin, proxy.end = proxy.cut, proxy.restore  # type: ignore[attr-defined]
    yield {"type": "postgres", "postgres_connection_string": proxy_url, "postgres_pool_wait": 1,
           "postgres_statement_timeout": 2}, proxy
    proxy.cut()


def test_database_outage_loses_nothing(tmp_path: Path, servers: Callable[..., McpTestServer],
                                       outage_target: tuple[dict[str, Any], Any]) -> None:
    storage, outage = outage_target
    server = servers()
    config = config_for(tmp_path, {"prod": server.url}, state_storage=storage, global_queue_size=200)
    service = nc.Service(config).start()
    try:
        server.wait_for_subscriptions(1)
        outage.begin()
        sent_before = nc.utcnow()
        for i in range(1000):
            server.emit(make_fault(name=f"r-{i}"))
        wait_for(lambda: service.metrics.value("spooled", "prod") > 0, what="events to be spooled")
        assert service.health()[0].status == nc.ACTIVE, "the listener never waits on the database"
        outage.end()
        found = wait_for_incidents(service.store, 1000, timeout=60)
    finally:
        service.stop()
    assert len(found) == 1000
    assert len({i.resource_name for i in found}) == 1000, "no duplicates"
    earliest = min(i.created_at for i in found)
    assert earliest >= sent_before and earliest < max(i.updated_at for i in found)


def test_sigkill_with_events_in_the_spool_loses_nothing(tmp_path: Path,
                                                        servers: Callable[..., McpTestServer]) -> None:
    server = servers()
    db = tmp_path / "db" / "nightcrier.db"
    nc.SqliteStore(str(db)).close()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "workspace_root": str(tmp_path / "ws"), **FAST,
        "state_storage": {"sqlite_path": str(db), "sqlite_busy_timeout": 0.2},
        "clusters": [{"name": "prod", "mcp": {"endpoint": server.url}}]}))
    spool_dir = tmp_path / "ws" / "spool"

    def spooled_lines() -> int:
        return sum(len(p.read_text().splitlines()) for p in spool_dir.glob("*")) if spool_dir.exists() else 0

    command = [sys.executable, str(ROOT / "nightcrier.py"), "--config", str(config)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        server.wait_for_subscriptions(1, timeout=30)
        outage = _SqliteOutage(str(db))
        outage.begin()
        for i in range(100):
            server.emit(make_fault(name=f"r-{i}"))
        wait_for(lambda: spooled_lines() >= 100, timeout=30, what="100 spooled events")
    finally:
        first.kill()
        first.wait()
        outage.end()
    second = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store = nc.SqliteStore(str(db))
    try:
        found = wait_for_incidents(store, 100, timeout=30)
        wait_for(lambda: spooled_lines() == 0, what="the spool to be emptied")
    finally:
        second.terminate()
        assert second.wait(30) == 0
        store.close()
    assert sorted(i.resource_name for i in found) == sorted(f"r-{i}" for i in range(100))
