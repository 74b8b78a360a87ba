"""The worker engine with the process runner: workspaces, outcomes, dispatch, crashes, shutdown, tail."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, wait_for
from test_store_contract import make_event

import nightcrier as nc

GOOD_AGENT = ("printf '# Investigation\\n\\n## Root Cause\\nThe container ran out of memory.\\n"
              "**Confidence:** HIGH\\n\\n%s\\n' \"$INCIDENT_ID\" > output/investigation.md")


def engine_config(tmp_path: Path, agent: str | list[str], **overrides: Any) -> nc.Config:
    kubeconfig = tmp_path / "kubeconfig.yaml"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    data = {"workspace_root": str(tmp_path / "ws"), "health_port": 0, "agent_runner": "process",
            "agent_command": agent if isinstance(agent, list) else ["sh", "-c", agent],
            "agent_timeout": 30, "dispatch_poll_interval": 0.2, "anthropic_api_key": "sk-ant-secret-value",
            **overrides,
            "clusters": [{"name": f"c{n}", "mcp": {"endpoint": f"http://127.0.0.1:9/{n}"},
                          "triage": {"enabled": True, "kubeconfig": str(kubeconfig)}} for n in range(10)]
            + [{"name": "big", "mcp": {"endpoint": "http://127.0.0.1:9/big"},
                "triage": {"enabled": True, "kubeconfig": str(kubeconfig)}}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    config, _ = nc.load_config(str(path), env={})
    return config


@pytest.fixture
def dispatch(store: nc.StateStore) -> Iterator[Callable[..., nc.Dispatcher]]:
    """Starts a real dispatcher with the process runner on the test store."""
    started: list[nc.Dispatcher] = []

    def start(config: nc.Config, **kwargs: Any) -> nc.Dispatcher:
        dispatcher = nc.Dispatcher(config, store, nc.ProcessRunner(grace=1), threading.Event(), nc.Metrics(),
                                   "test-instance", **kwargs)
        dispatcher.start()
        started.append(dispatcher)
        return dispatcher

    yield start
    for dispatcher in started:
        dispatcher.stop()


def run_one(store: nc.StateStore, dispatch: Callable[..., nc.Dispatcher], config: nc.Config,
            cluster: str = "c1") -> nc.Incident:
    (incident_id,) = store.insert_events([make_event(cluster)])
    dispatcher = dispatch(config)
    dispatcher.wake.set()
    return wait_for(lambda: (i := store.get_incident(incident_id)) and i.status in nc.TERMINAL_STATUSES and i,
                    timeout=30, what="the incident to finish")


# -- outcomes --------------------------------------------------------------------------


def test_a_good_report_resolves_and_the_workspace_is_complete(
        tmp_path: Path, store: nc.StateStore, dispatch: Callable[..., nc.Dispatcher]) -> None:
    agent = ("env > env.txt; pwd > pwd.txt; echo to-stdout; echo to-stderr >&2; " + GOOD_AGENT)
    incident = run_one(store, dispatch, engine_config(tmp_path, agent, agent_model="opus"))
    assert (incident.status, incident.exit_code, incident.failure_reason) == (nc.RESOLVED, 0, None)
    ws = Path(incident.workspace_path or "")
    assert ws == tmp_path / "ws" / incident.incident_id
    assert (ws / "pwd.txt").read_text().strip() == str(ws), "the agent runs in its workspace"
    env = dict(line.split("=", 1) for line in (ws / "env.txt").read_text().splitlines() if "=" in line)
    assert env["INCIDENT_ID"] == incident.incident_id
    assert env["WORKSPACE_DIR"] == str(ws)
    assert env["CLUSTER_NAME"] == "c1"
    assert env["KUBECONFIG"] == str(tmp_path / "kubeconfig.yaml")
    assert env["AGENT_MODEL"] == "opus"
    assert env["ANTHROPIC_API_KEY"] == "sk-ant-secret-value"
    assert (ws / "logs" / "agent-stdout.log").read_text() == "to-stdout\n"
    assert (ws / "logs" / "agent-stderr.log").read_text() == "to-stderr\n"
    # Closed to other users; nightcrier's group (which an agent_user gets) reads inputs, writes output.
    assert ws.stat().st_mode & 0o7777 == 0o700
    for directory in (ws / "output", ws / "logs"):
        assert directory.stat().st_mode & 0o7777 == 0o2770
    for name in ("incident.json", "prompt-sent.md"):
        assert (ws / name).stat().st_mode & 0o777 == 0o640, name
    assert (ws / "logs/agent-stdout.log").stat().st_mode & 0o777 == 0o660
    # incident.json is rewritten just after the database records the final status.
    document = wait_for(lambda: (d := json.loads((ws / "incident.json").read_text()))["status"] == "resolved"
                        and d, what="incident.json to show the final status")
    assert document["incidentId"] == incident.incident_id and document["status"] == "resolved"
    assert document["cluster"] == "c1" and document["faultType"] == "CrashLoop"
    assert document["resource"] == {"apiVersion": "v1", "kind": "Pod", "name": "api-7f8b9c",
                                    "namespace": "payments",
                                    "uid": "0b0f6c1e-3c7a-4b7e-9d52-8f3c0a1b2c3d"}
    assert document["exitCode"] == 0 and "completedAt" in document and "failureReason" not in document
    prompt = (ws / "prompt-sent.md").read_text()
    assert prompt.startswith("# Prompt Sent to Agent\n\n## Metadata")
    assert f"- Incident ID: {incident.incident_id}" in prompt and "- Cluster: c1" in prompt
    assert "output/investigation.md" in prompt and "<incident>" in prompt
    report = store.get_report(incident.incident_id)
    assert report is not None and "ran out of memory" in report.report_markdown
    (execution,) = store.list_executions(incident.incident_id)
    assert execution.exit_code == 0 and execution.completed_at is not None


@pytest.mark.parametrize("agent, reason", [
    ("echo broken >&2; exit 3", "agent exited with non-zero code: 3"),
    ("true", "investigation.md file not found"),
    ("echo short > output/investigation.md", "investigation.md too small: 6 bytes (expected >= 100)"),
])
def test_failed_runs_are_agent_failed_with_the_originals_reasons(
        tmp_path: Path, store: nc.StateStore, dispatch: Callable[..., nc.Dispatcher], agent: str,
        reason: str) -> None:
    incident = run_one(store, dispatch, engine_config(tmp_path, agent))
    assert (incident.status, incident.failure_reason) == (nc.AGENT_FAILED, reason)


def test_an_unstartable_command_is_agent_failed(tmp_path: Path, store: nc.StateStore,
                                                dispatch: Callable[..., nc.Dispatcher]) -> None:
    incident = run_one(store, dispatch, engine_config(tmp_path, ["/nonexistent/agent"]))
    assert incident.status == nc.AGENT_FAILED
    assert "cannot start agent command" in (incident.failure_reason or "")


def test_timeout_kills_the_whole_process_group(tmp_path: Path, store: nc.StateStore,
                                               dispatch: Callable[..., nc.Dispatcher]) -> None:
    pids = tmp_path / "pids"
    agent = (f"sh -c 'echo $$ >> {pids}; trap \"\" TERM; sleep 300' & "
             f"echo $$ >> {pids}; trap '' TERM; sleep 300")
    incident = run_one(store, dispatch, engine_config(tmp_path, agent, agent_timeout=1))
    assert (incident.status, incident.failure_reason) == (nc.AGENT_FAILED, "agent timed out after 1 s")
    for pid in map(int, pids.read_text().split()):
        wait_for(lambda pid=pid: not _alive(pid), what=f"process {pid} to be gone")


def test_any_exception_in_a_worker_fails_the_incident(tmp_path: Path, store: nc.StateStore,
                                                      dispatch: Callable[..., nc.Dispatcher]) -> None:
    config = engine_config(tmp_path, GOOD_AGENT)
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws").chmod(0o500)
    if os.geteuid() == 0:
        config.workspace_root = "/proc/nightcrier-cannot-write-here"
    try:
        incident = run_one(store, dispatch, config)
    finally:
        (tmp_path / "ws").chmod(0o700)
    assert incident.status == nc.FAILED
    assert incident.failure_reason and incident.failure_reason.startswith("nightcrier error:")


# -- dispatch ---------------------------------------------------------------------------


def test_dispatch_caps_concurrency_keeps_clusters_exclusive_and_does_not_starve(
        tmp_path: Path, store: nc.StateStore, dispatch: Callable[..., nc.Dispatcher]) -> None:
    """200 incidents: 150 queued on one cluster, 50 over nine others; four slots."""
    agent = "sleep $(awk \"BEGIN{srand($$); print 0.01 + rand() * 0.19}\"); " + GOOD_AGENT
    events = [make_event("big", received_at=nc.utcnow()) for _ in range(150)]
    events += [make_event(f"c{n % 9}", received_at=nc.utcnow()) for n in range(50)]
    store.insert_events(events)
    dispatch(engine_config(tmp_path, agent, max_concurrent_agents=4)).wake.set()
    wait_for(lambda: store.count_by_status()[nc.RESOLVED] == 200, timeout=120, what="200 resolved")

    runs = [(e.started_at, e.completed_at, i.cluster) for i in store.list_incidents(
        nc.IncidentFilter(limit=1000)) for e in store.list_executions(i.incident_id)]
    assert len(runs) == 200, "each incident ran exactly once"
    by_cluster: dict[str, list[tuple[Any, Any]]] = defaultdict(list)
    for start, end, cluster in runs:
        by_cluster[cluster].append((start, end))
    for cluster, spans in by_cluster.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end <= start, f"two agents ran at once on {cluster}"
    edges = sorted([(s, 1) for s, _, _ in runs] + [(e, -1) for _, e, _ in runs], key=lambda x: (x[0], x[1]))
    running = peak = 0
    for _, delta in edges:
        running += delta
        peak = max(peak, running)
    assert peak <= 4
    small_done = max(e for _, e, c in runs if c != "big")
    big_done = sorted(e for _, e, c in runs if c == "big")
    assert small_done < big_done[len(big_done) // 2], "the long backlog did not hold the others back"


def test_a_claimed_incident_gets_heartbeats(tmp_path: Path, store: nc.StateStore,
                                            dispatch: Callable[..., nc.Dispatcher]) -> None:
    (incident_id,) = store.insert_events([make_event("c1")])
    dispatch(engine_config(tmp_path, "sleep 3; " + GOOD_AGENT, stale_after_seconds=1)).wake.set()
    first = wait_for(lambda: (i := store.get_incident(incident_id)) and i.heartbeat_at and i,
                     what="a claim")
    wait_for(lambda: (i := store.get_incident(incident_id)) and i.heartbeat_at
             and i.heartbeat_at > first.heartbeat_at, what="a refreshed heartbeat")
    wait_for(lambda: store.get_incident(incident_id).status == nc.RESOLVED,  # type: ignore[union-attr]
             what="the incident to finish despite the short stale limit")


def test_runner_unavailable_returns_the_incident_to_pending(tmp_path: Path, store: nc.StateStore,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    config = engine_config(tmp_path, GOOD_AGENT, agent_runner="docker")
    (incident_id,) = store.insert_events([make_event("c1")])
    dispatcher = nc.Dispatcher(config, store, nc.DockerRunner(config, "t"), threading.Event(), nc.Metrics(),
                               "t")
    dispatcher.start()
    try:
        dispatcher.wake.set()
        wait_for(lambda: dispatcher.runner_error, what="the runner to be reported unavailable")
        incident = wait_for(lambda: (i := store.get_incident(incident_id)) and i.status == nc.PENDING and i,
                            what="the incident back to pending")
        assert incident.attempts == 0 and "docker engine unreachable" in dispatcher.runner_error
    finally:
        dispatcher.stop()


# -- crash, shutdown, tail ------------------------------------------------------------------


def _service_config(tmp_path: Path, agent: str, **overrides: Any) -> Path:
    config = engine_config(tmp_path, agent, **overrides)
    data = nc.config_as_dict(config, masked=False)
    data["clusters"] = [c for c in data["clusters"] if c["name"] in ("c0", "c1", "c2")]
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start_service(config: Path, tmp_path: Path) -> subprocess.Popen[bytes]:
    """nightcrier as a subprocess, its log in tmp_path/stderr.log (a pipe nobody reads could fill)."""
    with open(tmp_path / "stderr.log", "ab") as log:
        return subprocess.Popen([sys.executable, str(ROOT / "nightcrier.py"), "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=log)


def exit_status(proc: subprocess.Popen[bytes], tmp_path: Path, timeout: float = 30) -> int:
    """Wait for the process; if it hangs, have it dump its threads (SIGUSR1) and fail with its log."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "Thread" in (tmp_path / "stderr.log").read_text(), what="a thread dump")
        proc.kill()
        pytest.fail("nightcrier did not exit:\n" + (tmp_path / "stderr.log").read_text()[-20000:])


def test_sigkill_while_agents_run_then_restart(tmp_path: Path) -> None:
    agent = "echo $$ >> \"$WORKSPACE_DIR/../pids\"; sleep 2; " + GOOD_AGENT
    config = _service_config(tmp_path, agent, stale_after_seconds=2, max_concurrent_agents=3)
    store = nc.SqliteStore(str(tmp_path / "ws" / "nightcrier.db"))
    store.insert_events([make_event(f"c{n % 3}", received_at=nc.utcnow()) for n in range(9)])
    first = start_service(config, tmp_path)
    try:
        pid_file = tmp_path / "ws" / "pids"
        wait_for(lambda: pid_file.exists() and len(pid_file.read_text().split()) == 3, timeout=30,
                 what="three agents running")
    finally:
        first.kill()
        first.wait()
    pids = [int(p) for p in pid_file.read_text().split()]
    for pid in pids:
        wait_for(lambda pid=pid: not _alive(pid), what="agents to die with nightcrier")
    second = start_service(config, tmp_path)
    try:
        wait_for(lambda: store.count_by_status()[nc.RESOLVED] == 9, timeout=90, what="all incidents resolved")
    finally:
        second.terminate()
        assert exit_status(second, tmp_path) == 0
    by_cluster: dict[str, list[tuple[Any, Any]]] = defaultdict(list)
    for incident in store.list_incidents():
        for execution in store.list_executions(incident.incident_id):
            by_cluster[incident.cluster].append((execution.started_at, execution.completed_at))
    for cluster, spans in by_cluster.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end is not None and end <= start, f"{cluster} ran two agents at once"
    store.close()


def test_sigterm_drains_running_agents_and_exits_0(tmp_path: Path) -> None:
    agent = "sleep 1; " + GOOD_AGENT
    config = _service_config(tmp_path, agent, shutdown_timeout=20)
    store = nc.SqliteStore(str(tmp_path / "ws" / "nightcrier.db"))
    store.insert_events([make_event(f"c{n}", received_at=nc.utcnow()) for n in range(3)])
    proc = start_service(config, tmp_path)
    wait_for(lambda: store.count_by_status()[nc.INVESTIGATING] == 3, timeout=30, what="agents running")
    proc.send_signal(signal.SIGTERM)
    assert exit_status(proc, tmp_path) == 0
    assert store.count_by_status()[nc.RESOLVED] == 3, "running agents were allowed to finish"
    log = (tmp_path / "stderr.log").read_text()
    assert "waiting up to 20 s for 3 agents; signal again to stop now" in log
    store.close()


def test_sigterm_past_the_shutdown_timeout_returns_incidents_to_pending(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    agent = f"echo $$ >> {pids}; sleep 300"
    config = _service_config(tmp_path, agent, shutdown_timeout=1)
    store = nc.SqliteStore(str(tmp_path / "ws" / "nightcrier.db"))
    store.insert_events([make_event("c0")])
    proc = start_service(config, tmp_path)
    wait_for(lambda: pids.exists(), timeout=30, what="the agent to start")
    proc.send_signal(signal.SIGTERM)
    assert exit_status(proc, tmp_path) == 0
    (incident,) = store.list_incidents()
    assert incident.status == nc.PENDING and incident.attempts == 0
    assert not _alive(int(pids.read_text().split()[0]))
    store.close()


def test_a_missing_runner_is_no_error_while_no_cluster_triages(tmp_path: Path) -> None:
    config = _service_config(tmp_path, GOOD_AGENT, agent_runner="docker", health_port=0)
    data = yaml.safe_load(config.read_text())
    for cluster in data["clusters"]:
        cluster["triage"]["enabled"] = False
    config.write_text(yaml.safe_dump(data))
    with open(tmp_path / "stderr.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "nightcrier.py"), "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=log,
                                env={**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"})
    try:
        line = wait_for(lambda: next((x for x in (tmp_path / "stderr.log").read_text().splitlines()
                                      if "agent runner unavailable" in x), None), timeout=30,
                        what="the runner check")
    finally:
        proc.terminate()
        assert exit_status(proc, tmp_path) == 0
    assert "level=INFO" in line and "no cluster has triage enabled" in line, line


def test_tail_follows_a_running_incident_to_its_end(tmp_path: Path, store: nc.StateStore,
                                                    dispatch: Callable[..., nc.Dispatcher]) -> None:
    gate = tmp_path / "gate"
    agent = f"echo first line; while [ ! -e {gate} ]; do sleep 0.05; done; echo second line; " + GOOD_AGENT
    config = engine_config(tmp_path, agent)
    (incident_id,) = store.insert_events([make_event("c1")])
    dispatch(config).wake.set()
    out = io.BytesIO()
    result: list[int] = []
    follower = threading.Thread(target=lambda: result.append(
        nc._tail(store, config, incident_id, "agent-stdout.log", out, poll=0.02)))
    follower.start()
    wait_for(lambda: b"first line" in out.getvalue(), what="the first line while the agent runs")
    assert follower.is_alive()
    gate.touch()
    follower.join(30)
    assert result == [0]
    assert out.getvalue() == b"first line\nsecond line\n"


def test_tail_of_an_unknown_incident_exits_1(tmp_path: Path) -> None:
    config = _service_config(tmp_path, GOOD_AGENT)
    result = subprocess.run([sys.executable, str(ROOT / "nightcrier.py"), "tail", nc.new_id(),
                             "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "no incident" in result.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False
