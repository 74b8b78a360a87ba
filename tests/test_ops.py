"""Operations: health and metrics over HTTP, the incidents/show commands, RBAC checks with kubectl."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, wait_for
from mcp_testserver import McpTestServer, make_fault
from tcp_proxy import TcpProxy
from test_pages import raw_request
from test_store_contract import make_event

import nightcrier as nc

GOOD_AGENT = ("printf '# Investigation\\n\\n## Root Cause\\nThe container ran out of memory because of a "
              "leak in the cache layer.\\n**Confidence:** HIGH\\n' > output/investigation.md")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def pipeline(tmp_path: Path, postgres_schema_url: str
             ) -> Iterator[tuple[nc.Service, McpTestServer, TcpProxy]]:
    """A whole service: a real MCP server, PostgreSQL behind a cuttable proxy, the process runner."""
    server = McpTestServer(cluster="kind-ops").start()
    parts = urllib.parse.urlsplit(postgres_schema_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    netloc = f"{parts.username or 'postgres'}@127.0.0.1:{proxy.port}"
    url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\n")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "workspace_root": str(tmp_path / "ws"), "health_port": free_port(), "agent_runner": "process",
        "agent_command": ["sh", "-c", GOOD_AGENT], "mcp_ping_interval": 1,
        "sse_reconnect_initial_backoff": 0.05, "sse_reconnect_max_backoff": 0.5,
        "state_storage": {"type": "postgres", "postgres_connection_string": url, "postgres_pool_wait": 1,
                          "postgres_statement_timeout": 2},
        "clusters": [{"name": "ops", "labels": {"region": "eu-1"}, "mcp": {"endpoint": server.url},
                      "triage": {"enabled": True, "kubeconfig": str(kubeconfig)}},
                     {"name": "unreachable", "mcp": {"endpoint": "http://127.0.0.1:9/mcp"}}]}))
    config, _ = nc.load_config(str(path), env={})
    service = nc.Service(config).start()
    yield service, server, proxy
    if not _listening(proxy.port):
        proxy.restore()
    service.stop()
    proxy.cut()
    server.stop()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_health_and_metrics_while_the_pipeline_runs(pipeline: tuple[nc.Service, McpTestServer, TcpProxy]
                                                    ) -> None:
    service, server, proxy = pipeline
    base = f"http://127.0.0.1:{service.config.health_port}"
    server.wait_for_subscriptions(1)
    assert get(base + "/healthz") == (200, "ok\n")
    status, body = wait_for(lambda: (r := get(base + "/readyz"))[0] == 200 and r, what="ready")
    assert json.loads(body) == {"ready": True, "database": "ok", "dispatching": "ok", "active_clusters": 1}

    before = get(base + "/metrics")[1]
    for n in range(3):
        server.emit(make_fault(name=f"pod-{n}"))
    wait_for(lambda: service.store.count_by_status()[nc.RESOLVED] == 3, timeout=30, what="three resolved")
    after = get(base + "/metrics")[1]
    assert metric(after, "nightcrier_events_received_total", cluster="ops") == \
        metric(before, "nightcrier_events_received_total", cluster="ops") + 3
    assert metric(after, "nightcrier_incidents", status="resolved") == 3
    assert metric(after, "nightcrier_incident_outcomes_total", status="resolved") == 3
    assert metric(after, "nightcrier_agent_duration_seconds_count") == 3
    assert metric(after, "nightcrier_claim_latency_seconds_count") > 0
    assert metric(after, "nightcrier_listener_errors_total", cluster="unreachable") >= 1
    assert "nightcrier_ingest_queue_depth 0.0" in after and "nightcrier_agents_running 0.0" in after
    # the same condition again, within the default dedup window: stored, skipped, counted by reason
    later = (nc.utcnow() + dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")  # not a copy of the first
    server.emit(make_fault(name="pod-0", timestamp=later))
    wait_for(lambda: service.store.count_by_status()[nc.SKIPPED] == 1, what="the repeat stored")
    again = get(base + "/metrics")[1]
    assert metric(again, "nightcrier_incidents_skipped", reason="duplicate") == 1
    assert metric(again, "nightcrier_incidents_skipped", reason="budget") == 0
    # the runs' spend by cluster (this agent's CLI reports none: tokens and cost are zero)
    assert 'nightcrier_agent_tokens{cluster="ops"} 0.0' in again.splitlines()
    assert 'nightcrier_agent_cost_usd{cluster="ops"} 0.0' in again.splitlines()

    clusters = json.loads(get(base + "/health/clusters")[1])
    by_name = {c["name"]: c for c in clusters["clusters"]}
    assert [c["name"] for c in clusters["clusters"]] == ["ops", "unreachable"]
    assert by_name["ops"]["status"] == "active" and by_name["ops"]["event_count"] == 4
    assert by_name["ops"]["labels"] == {"region": "eu-1"} and by_name["ops"]["triage_enabled"] is True
    assert by_name["ops"]["subscription_id"].startswith("sub-") and "last_event" in by_name["ops"]
    assert by_name["unreachable"]["status"] in ("failed", "connecting") and by_name["unreachable"]["error"]
    assert "unwatched_since" in by_name["unreachable"]
    assert clusters["summary"]["total"] == 2 and clusters["summary"]["active"] == 1
    assert clusters["runner"] == {"name": "process", "available": True, "error": ""}

    proxy.cut()
    status, body = wait_for(lambda: (r := get(base + "/readyz"))[0] == 503 and r, what="not ready")
    assert json.loads(body)["database"].startswith("unavailable")
    proxy.restore()
    wait_for(lambda: get(base + "/readyz")[0] == 200, what="ready again")


def test_statements_the_database_refuses_make_the_service_unready(
        pipeline: tuple[nc.Service, McpTestServer, TcpProxy]) -> None:
    """A refused claim (a damaged schema, SQL this database lacks) is a fault to surface, not an
    outage to wait out while looking healthy."""
    service, server, _ = pipeline
    base = f"http://127.0.0.1:{service.config.health_port}"
    server.wait_for_subscriptions(1)
    wait_for(lambda: get(base + "/readyz")[0] == 200, what="ready")
    service.store._execute("ALTER TABLE cluster_queue RENAME TO cluster_queue_away")  # type: ignore[attr-defined]
    try:
        status, body = wait_for(lambda: (r := get(base + "/readyz"))[0] == 503 and r, what="not ready")
        ready = json.loads(body)
        assert ready["database"] == "ok" and ready["dispatching"].startswith("failing: ")
        assert "cluster_queue" in ready["dispatching"]
    finally:
        service.store._execute("ALTER TABLE cluster_queue_away RENAME TO cluster_queue")  # type: ignore[attr-defined]
    server.emit(make_fault(name="pod-after"))
    wait_for(lambda: service.store.count_by_status()[nc.RESOLVED] == 1, timeout=30, what="dispatching again")
    assert json.loads(get(base + "/readyz")[1])["dispatching"] == "ok"


def test_healthz_turns_503_when_shutting_down() -> None:
    server = nc.HealthServer("127.0.0.1", 0, clusters=dict, readiness=lambda: (True, {}),
                             metrics=lambda: b"").start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert get(base + "/healthz")[0] == 200 and get(base + "/readyz")[0] == 200
        server.shutting_down = True
        assert get(base + "/healthz")[0] == 503 and get(base + "/readyz")[0] == 503
        assert get(base + "/nothing-here")[0] == 404
    finally:
        server.stop()


def _closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_healthz_answers_under_a_connection_flood_with_bounded_threads() -> None:
    server = nc.HealthServer("127.0.0.1", 0, clusters=dict, readiness=lambda: (True, {}),
                             metrics=lambda: b"").start()
    flood: list[socket.socket] = []
    try:
        threads_before = threading.active_count()
        for number in range(320):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            flood.append(sock)
            if number % 16 == 0:  # slowloris: a request that never ends
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        # Every connection is the server's by now: one more request goes through all of them.
        status, body = raw_request(server.port, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
                                   b"Connection: close\r\n\r\n", timeout=10)
        assert (status, body) == (200, b"ok\n")
        assert threading.active_count() <= threads_before + 2, \
            f"{threading.active_count() - threads_before} threads more for {len(flood)} connections"
        assert not any(_closed_by_server(sock) for sock in flood[:20]), "the flood is still connected"
    finally:
        for sock in flood:
            sock.close()
        server.stop()


def test_silent_and_half_sent_connections_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nc, "HEALTH_IDLE_SECONDS", 1)
    monkeypatch.setattr(nc, "HEALTH_SWEEP_SECONDS", 1)
    server = nc.HealthServer("127.0.0.1", 0, clusters=dict, readiness=lambda: (True, {}),
                             metrics=lambda: b"").start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as silent, \
                socket.create_connection(("127.0.0.1", server.port)) as half:
            half.sendall(b"GET /healthz HTTP/1.1\r\nHost: local")
            wait_for(lambda: _closed_by_server(silent) and _closed_by_server(half), timeout=20,
                     what="the server to close idle connections")
        assert get(f"http://127.0.0.1:{server.port}/healthz")[0] == 200
    finally:
        server.stop()


def test_only_get_and_head_are_answered() -> None:
    server = nc.HealthServer("127.0.0.1", 0, clusters=dict, readiness=lambda: (True, {}),
                             metrics=lambda: b"").start()
    try:
        for method in (b"POST", b"PUT", b"DELETE"):
            request = method + b" /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n"
            assert raw_request(server.port, request + b"Connection: close\r\n\r\n")[0] == 405
        status, body = raw_request(server.port, b"HEAD /healthz HTTP/1.1\r\nHost: localhost\r\n"
                                   b"Connection: close\r\n\r\n")
        assert (status, body) == (200, b"")
    finally:
        server.stop()


# -- incidents and show -------------------------------------------------------------------


@pytest.fixture
def populated(engine: str, store_locator: str, store: nc.StateStore, tmp_path: Path) -> Path:
    storage: dict[str, Any] = ({"type": "sqlite", "sqlite_path": store_locator} if engine == "sqlite"
                               else {"type": "postgres", "postgres_connection_string": store_locator})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"workspace_root": str(tmp_path / "ws"), "state_storage": storage,
                                    "clusters": [{"name": "prod", "mcp": {"endpoint": "http://x:1/mcp"}}]}))
    store.insert_events([make_event("prod", resource_name=f"web-{n}", received_at=nc.utcnow())
                         for n in range(3)] + [make_event("lab", received_at=nc.utcnow())],
                        skipped_clusters=["lab"])
    claimed = store.claim_next("w")
    assert claimed is not None
    execution = store.start_execution(claimed.incident_id, "nightcrier-agent:latest", {})
    store.finish_execution(execution.execution_id, 0, None, {})
    store.record_report(nc.TriageReport(nc.new_id(), claimed.incident_id, execution.execution_id, nc.utcnow(),
                                        "# report", summary_text="OOM in the cache (confidence: HIGH)",
                                        raw_report_path="/ws/output/investigation.md"))
    store.complete(claimed.incident_id, "w", nc.RESOLVED, 0, None)
    (path.parent / "resolved-id").write_text(claimed.incident_id)
    return path


def nightcrier_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "nightcrier.py"), *args], capture_output=True,
                          text=True, timeout=60, env={"PATH": os.environ["PATH"]})


def test_incidents_lists_filters_and_prints_json(populated: Path) -> None:
    table = nightcrier_cli("incidents", "--config", str(populated))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["INCIDENT", "CREATED", "(UTC)", "STATUS", "CLUSTER", "FAULT", "SEVERITY",
                                "RESOURCE", "DURATION", "RECURRED", "SKIPPED"]
    assert len(lines) == 5
    assert len({line.index("STATUS") if n == 0 else len(line[:lines[0].index("STATUS")])
                for n, line in enumerate(lines)}) == 1, "columns are aligned"
    resolved = nightcrier_cli("incidents", "--config", str(populated), "--status", "resolved,skipped",
                              "--json")
    assert sorted(i["status"] for i in json.loads(resolved.stdout)) == ["resolved", "skipped"]
    prod = json.loads(nightcrier_cli("incidents", "--config", str(populated), "--cluster", "prod",
                                     "--since", "1h", "--limit", "2", "--json").stdout)
    assert len(prod) == 2 and {i["cluster"] for i in prod} == {"prod"}
    future = nightcrier_cli("incidents", "--config", str(populated), "--since", "2999-01-01T00:00:00Z")
    assert future.stdout.splitlines()[1:] == []
    bad = nightcrier_cli("incidents", "--config", str(populated), "--status", "exploded")
    assert bad.returncode == 2 and "unknown status exploded" in bad.stderr


def test_show_and_incidents_tell_a_repeat_and_how_often_the_first_recurred(populated: Path,
                                                                          store: nc.StateStore) -> None:
    store.rules = nc.TriageRules(dedup_window=300)
    first, repeat = store.insert_events([make_event("prod", fault_id="loop", received_at=nc.utcnow())
                                         for _ in range(2)])
    shown = nightcrier_cli("show", repeat, "--config", str(populated))
    assert shown.returncode == 0, shown.stderr
    lines = {line[:16].strip(): line[16:] for line in shown.stdout.splitlines()}
    assert lines["duplicate of"] == first
    assert lines["skip reason"].startswith(f"duplicate: repeats {first}")
    original = nightcrier_cli("show", first, "--config", str(populated)).stdout
    recurred = [line[16:] for line in original.splitlines() if line.startswith("recurred")]
    assert recurred[0].startswith("1x, last ")
    table = nightcrier_cli("incidents", "--config", str(populated)).stdout.splitlines()
    assert "1x, last" in [line for line in table if line.startswith(first)][0]
    assert [line for line in table if line.startswith(repeat)][0].endswith("duplicate")


def test_show_prints_the_incident_its_runs_and_report(populated: Path) -> None:
    incident_id = (populated.parent / "resolved-id").read_text()
    text = nightcrier_cli("show", incident_id, "--config", str(populated))
    assert text.returncode == 0, text.stderr
    assert f"incident id     {incident_id}" in text.stdout and "status          resolved" in text.stdout
    assert "exit=0  image=nightcrier-agent:latest" in text.stdout
    assert "summary: OOM in the cache (confidence: HIGH)" in text.stdout
    assert f"{incident_id}/logs/agent-stdout.log" in text.stdout
    document = json.loads(nightcrier_cli("show", incident_id, "--config", str(populated), "--json").stdout)
    assert document["executions"][0]["exit_code"] == 0
    assert document["report"]["summary"] == "OOM in the cache (confidence: HIGH)"
    missing = nightcrier_cli("show", nc.new_id(), "--config", str(populated))
    assert missing.returncode == 1 and "no incident" in missing.stderr


# -- permission checks --------------------------------------------------------------------


FAKE_KUBECTL = """#!/bin/sh
# answers like kubectl auth can-i, from the kubeconfig's file name
case "$(basename "$2")" in
  *hanging*) exec sleep 300 ;;
  *broken*) echo "error: You must be logged in to the server (Unauthorized)" >&2; exit 1 ;;
esac
shift 2
[ "$3" = "--list" ] && { echo "Resources  Non-Resource URLs  Resource Names  Verbs"; exit 0; }
case "$4" in
  pods|pods/log|events|deployments) echo yes ;;
  *) echo no; exit 1 ;;
esac
"""


@pytest.fixture
def fake_kubectl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    kubectl = bindir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return kubectl


def permissions_config(tmp_path: Path, names: list[str], **overrides: Any) -> nc.Config:
    clusters = []
    for name in names:
        kubeconfig = tmp_path / f"{name}-kubeconfig"
        kubeconfig.write_text("apiVersion: v1\n")
        clusters.append({"name": name, "mcp": {"endpoint": "http://127.0.0.1:9/mcp"},
                         "triage": {"enabled": True, "kubeconfig": str(kubeconfig),
                                    "allow_secrets_access": name == "secrets"}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"workspace_root": str(tmp_path / "ws"), "clusters": clusters,
                                    **overrides}))
    config, _ = nc.load_config(str(path), env={})
    return config


def test_permission_checks_answer_yes_and_no(tmp_path: Path, fake_kubectl: Path) -> None:
    checker = nc.PermissionChecker(permissions_config(tmp_path, ["good", "secrets", "broken"]))
    checker.check_all()
    results = checker.results()
    good = results["good"]
    assert (good["can_get_pods"], good["can_get_logs"], good["can_get_events"], good["can_get_deployments"],
            good["can_get_services"], good["can_get_nodes"]) == (True, True, True, True, False, False)
    assert good["minimum_permissions_met"] and "error" not in good
    assert good["warnings"] == ["cannot get nodes (cluster-wide visibility limited)",
                                "secrets access disabled by config (set triage.allow_secrets_access=true "
                                "for Helm debugging)"]
    assert results["secrets"]["can_get_secrets"] is False
    assert "secrets access enabled but RBAC denies it (Helm data unavailable)" in \
        results["secrets"]["warnings"]
    assert "Unauthorized" in results["broken"]["error"]


def test_a_hanging_kubectl_is_timed_out_without_blocking_others(tmp_path: Path, fake_kubectl: Path) -> None:
    checker = nc.PermissionChecker(permissions_config(tmp_path, ["hanging", "good"]), timeout=1)
    checker.check_all()
    results = checker.results()
    assert results["hanging"]["error"] == "kubectl did not answer within 1 s"
    assert results["good"]["can_get_pods"] is True


def test_startup_is_not_blocked_and_results_reach_health_and_workspaces(
        tmp_path: Path, fake_kubectl: Path, store: nc.StateStore) -> None:
    config = permissions_config(tmp_path, ["good", "hanging"], agent_runner="process",
                                agent_command=["sh", "-c", GOOD_AGENT], health_port=0)
    service = nc.Service(config, store)
    service.permissions.timeout = 2
    service.start()
    try:
        assert service.permissions.rounds == 0, "start() returned before any kubectl answered"
        wait_for(lambda: service.permissions.rounds == 1, what="the first round of checks")
        clusters = {c["name"]: c for c in service.cluster_health()["clusters"]}
        assert clusters["good"]["degraded"] is False and clusters["good"]["permissions"]["can_get_pods"]
        assert clusters["hanging"]["degraded"] is True
        (incident_id,) = store.insert_events([make_event("good")])
        service.work_available.set()
        incident = wait_for(lambda: (i := store.get_incident(incident_id)) and i.status == nc.RESOLVED and i,
                            timeout=30, what="the incident to finish")
        ws = Path(incident.workspace_path or "")
        written = json.loads((ws / "incident_cluster_permissions.json").read_text())
        assert written["cluster_name"] == "good" and written["can_get_pods"] is True
        assert (ws / "incident_cluster_permissions.json").stat().st_mode & 0o777 == 0o640
        assert '"can_get_pods": true' in (ws / "prompt-sent.md").read_text()
    finally:
        service.stop()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_lines_are_one_per_step_in_the_chosen_format(fmt: str) -> None:
    import io
    stream = io.StringIO()
    saved = (nc.log.handlers[:], nc.log.level, nc.log.propagate)
    nc.configure_logging("info", fmt, stream=stream)
    try:
        nc.log_event(nc.logging.INFO, "incident finished", incident_id="abc", status="resolved",
                     reason="two words")
        nc.log_event(nc.logging.DEBUG, "not shown")
    finally:  # other tests read nightcrier's log through pytest's capture on the root logger
        nc.log.handlers[:], nc.log.level, nc.log.propagate = saved
    (line,) = stream.getvalue().splitlines()
    if fmt == "json":
        entry = json.loads(line)
        assert (entry["msg"], entry["level"], entry["incident_id"], entry["reason"]) == (
            "incident finished", "INFO", "abc", "two words")
    else:
        assert 'level=INFO msg="incident finished" incident_id=abc status=resolved reason="two words"' in line
