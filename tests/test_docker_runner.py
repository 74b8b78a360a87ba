"""The Docker runner against a real engine and the busybox test agent image."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import infra
import pytest
import yaml
from conftest import ROOT, wait_for
from test_store_contract import make_event

import nightcrier as nc

SECRET = "sk-ant-api03-very-secret-value"
REPORT = ("printf '# Investigation\\n\\n## Root Cause\\nThe container ran out of memory because its limit is "
          "too low.\\n**Confidence:** HIGH\\n' > output/investigation.md")

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def docker_client() -> Iterator[Any]:
    client = infra.docker_client()
    infra.require_test_agent_image()
    yield client
    client.close()


def docker_config(tmp_path: Path, agent: str, **overrides: Any) -> nc.Config:
    kubeconfig = tmp_path / "kubeconfig.yaml"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
    data = {"workspace_root": str(tmp_path / "ws"), "health_port": 0, "agent_runner": "docker",
            "agent_image": infra.TEST_AGENT_IMAGE, "agent_command": ["sh", "-c", agent],
            "agent_timeout": 60, "dispatch_poll_interval": 0.2, "anthropic_api_key": SECRET,
            # The test image has no forwarder for the network gate (test_egress.py covers it).
            "stale_after_seconds": 5, "agent_egress": "none", **overrides,
            "clusters": [{"name": f"c{n}", "mcp": {"endpoint": f"http://127.0.0.1:9/{n}"},
                          "triage": {"enabled": True, "kubeconfig": str(kubeconfig)}} for n in range(3)]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    config, _ = nc.load_config(str(path), env={})
    return config


@pytest.fixture
def run_docker(tmp_path: Path, docker_client: Any, caplog: pytest.LogCaptureFixture
               ) -> Iterator[Callable[..., nc.Incident]]:
    dispatchers: list[nc.Dispatcher] = []
    stores: list[nc.StateStore] = []

    def run(agent: str, *, wait: bool = True, **overrides: Any) -> Any:
        config = docker_config(tmp_path, agent, **overrides)
        store = nc.SqliteStore(str(tmp_path / "nc.db"))
        stores.append(store)
        (incident_id,) = store.insert_events([make_event("c1")])
        dispatcher = nc.Dispatcher(config, store, nc.DockerRunner(config, "test-instance", grace=1),
                                   threading.Event(), nc.Metrics(), "test-instance")
        dispatchers.append(dispatcher)
        dispatcher.start()
        dispatcher.wake.set()
        if not wait:
            return store, incident_id, dispatcher
        return wait_for(lambda: (i := store.get_incident(incident_id)) and i.status in nc.TERMINAL_STATUSES
                        and i, timeout=90, what="the incident to finish")

    with caplog.at_level("DEBUG", logger="nightcrier"):
        yield run
    for dispatcher in dispatchers:
        dispatcher.stop()
    for store in stores:
        store.close()
    logged = "\n".join(r.getMessage() + json.dumps(getattr(r, "fields", {}), default=str)
                       for r in caplog.get_records("call"))
    assert "worker started incident" in logged, "the log was captured, so the next check means something"
    assert SECRET not in logged, "an API key reached nightcrier's log"


def running_container(client: Any, incident_id: str) -> Any:
    name = f"nightcrier-agent-{incident_id}"
    return wait_for(lambda: client.containers.list(filters={"name": name}), what="the container")[0]


def test_mounts_working_directory_environment_and_uid(run_docker: Callable[..., Any]) -> None:
    agent = ("pwd > output/pwd; id -u > output/uid; id -g > output/gid; "
             "cat incident.json > output/incident-copy.json; cat .kube/config > output/kubeconfig; "
             "(echo x >> incident.json) 2>/dev/null && echo yes > output/incident-writable; "
             "echo \"$INCIDENT_ID $CLUSTER_NAME $AGENT_MODEL $KUBECONFIG\" > output/env; "
             "[ -n \"$ANTHROPIC_API_KEY\" ] && echo yes > output/key-present; "
             "echo hello-stdout; echo hello-stderr >&2; " + REPORT)
    incident = run_docker(agent)
    assert (incident.status, incident.exit_code) == (nc.RESOLVED, 0), incident.failure_reason
    out = Path(incident.workspace_path or "") / "output"
    assert (out / "pwd").read_text().strip() == "/home/agent"
    assert (out / "uid").read_text().strip() == str(os.getuid())
    assert (out / "gid").read_text().strip() == str(os.getgid())
    assert json.loads((out / "incident-copy.json").read_text())["incidentId"] == incident.incident_id
    assert "kind: Config" in (out / "kubeconfig").read_text()
    assert not (out / "incident-writable").exists(), "incident.json is mounted read-only"
    assert (out / "env").read_text().split() == [incident.incident_id, "c1", "sonnet",
                                                 "/home/agent/.kube/config"]
    assert (out / "key-present").exists()
    logs = Path(incident.workspace_path or "") / "logs"
    assert (logs / "agent-stdout.log").read_text() == "hello-stdout\n"
    assert (logs / "agent-stderr.log").read_text() == "hello-stderr\n"


def test_agent_user_is_honoured(run_docker: Callable[..., Any]) -> None:
    incident = run_docker("id -u; id -g", agent_user="4321:4321")
    log = (Path(incident.workspace_path or "") / "logs" / "agent-stdout.log").read_text()
    assert log.split() == ["4321", "4321"]


@pytest.mark.parametrize("agent, reason", [
    ("exit 7", "agent exited with non-zero code: 7"),
    ("true", "investigation.md file not found"),
    ("echo tiny > output/investigation.md", "investigation.md too small: 5 bytes (expected >= 100)"),
])
def test_failed_runs(run_docker: Callable[..., Any], agent: str, reason: str) -> None:
    incident = run_docker(agent)
    assert (incident.status, incident.failure_reason) == (nc.AGENT_FAILED, reason)


def test_timeout_stops_and_removes_the_container(run_docker: Callable[..., Any], docker_client: Any) -> None:
    incident = run_docker("trap '' TERM; sleep 300", agent_timeout=2)
    assert (incident.status, incident.failure_reason) == (nc.AGENT_FAILED, "agent timed out after 2 s")
    assert incident.exit_code == 137
    name = f"nightcrier-agent-{incident.incident_id}"
    assert not docker_client.containers.list(all=True, filters={"name": name})


def test_secrets_are_only_in_the_container_environment(run_docker: Callable[..., Any],
                                                       docker_client: Any, tmp_path: Path) -> None:
    store, incident_id, _ = run_docker(
        "while [ ! -e /home/agent/output/go ]; do sleep 0.05; done; " + REPORT, wait=False)
    container = running_container(docker_client, incident_id)
    attrs = container.attrs
    assert SECRET not in json.dumps(attrs["Args"]) and SECRET not in json.dumps(attrs["Config"]["Cmd"])
    assert SECRET not in json.dumps(attrs["Config"]["Labels"])
    assert f"ANTHROPIC_API_KEY={SECRET}" in attrs["Config"]["Env"]
    assert attrs["Config"]["Labels"] == {"nightcrier.incident_id": incident_id,
                                         "nightcrier.instance": "test-instance",
                                         "nightcrier.host": socket.gethostname(),
                                         "nightcrier.pid_namespace": os.readlink("/proc/self/ns/pid"),
                                         "nightcrier.pid": str(os.getpid())}
    assert attrs["HostConfig"]["NetworkMode"] == "none"
    ws = tmp_path / "ws" / incident_id
    (ws / "output" / "go").touch()
    wait_for(lambda: (i := store.get_incident(incident_id)) and i.status == nc.RESOLVED, timeout=60,
             what="the run to finish")
    for path in ws.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path


def test_limits_are_applied(run_docker: Callable[..., Any], docker_client: Any) -> None:
    store, incident_id, _ = run_docker("sleep 300", wait=False, agent_memory="256m", agent_cpus=0.5,
                                       agent_pids_limit=64, agent_egress="open", agent_network="none",
                                       agent_timeout=30)
    container = running_container(docker_client, incident_id)
    host = container.attrs["HostConfig"]
    assert (host["Memory"], host["NanoCpus"], host["PidsLimit"], host["NetworkMode"]) == (
        256 * 1024 * 1024, 500_000_000, 64, "none")


def test_missing_image_leaves_the_incident_pending(tmp_path: Path, docker_client: Any) -> None:
    config = docker_config(tmp_path, REPORT, agent_image="nightcrier-no-such-image:1")
    store = nc.SqliteStore(str(tmp_path / "nc.db"))
    (incident_id,) = store.insert_events([make_event("c1")])
    dispatcher = nc.Dispatcher(config, store, nc.DockerRunner(config, "test-instance", grace=1),
                               threading.Event(), nc.Metrics(), "test-instance")
    dispatcher.start()
    try:
        dispatcher.wake.set()
        wait_for(lambda: "not found" in dispatcher.runner_error, what="a refusal")
        incident = store.get_incident(incident_id)
        assert incident is not None and (incident.status, incident.attempts) == (nc.PENDING, 0)
    finally:
        dispatcher.stop()
        store.close()


def test_orphaned_containers_are_removed(tmp_path: Path, docker_client: Any) -> None:
    orphan = docker_client.containers.run(infra.TEST_AGENT_IMAGE, ["sleep", "300"], detach=True,
                                          labels={"nightcrier.incident_id": nc.new_id(),
                                                  "nightcrier.instance": "dead-instance"})
    other = docker_client.containers.run(infra.TEST_AGENT_IMAGE, ["sleep", "300"], detach=True)
    try:
        config = docker_config(tmp_path, "true")
        runner = nc.DockerRunner(config, "me")
        removed = runner.remove_orphans(lambda incident_id: False)
        assert orphan.labels["nightcrier.incident_id"] in removed
        assert not docker_client.containers.list(all=True, filters={"id": orphan.id})
        assert docker_client.containers.list(filters={"id": other.id}), "unlabelled containers are left alone"
    finally:
        other.remove(force=True)


def test_sigkill_with_containers_running_then_restart(tmp_path: Path, docker_client: Any) -> None:
    config = docker_config(tmp_path, "sleep 2; " + REPORT, stale_after_seconds=2, max_concurrent_agents=3)
    data = nc.config_as_dict(config, masked=False)
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump(data))
    store = nc.SqliteStore(str(tmp_path / "ws" / "nightcrier.db"))
    store.insert_events([make_event(f"c{n % 3}", received_at=nc.utcnow()) for n in range(6)])
    command = [sys.executable, str(ROOT / "nightcrier.py"), "--config", str(path)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(docker_client.containers.list(filters={"label": "nightcrier.incident_id"})) == 3,
                 timeout=60, what="three agent containers")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    second = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: store.count_by_status()[nc.RESOLVED] == 6, timeout=120, what="all six resolved")
        labelled = {"label": "nightcrier.incident_id"}
        wait_for(lambda: not docker_client.containers.list(all=True, filters=labelled),
                 timeout=30, what="leftover containers removed")
    finally:
        second.terminate()
        assert second.wait(60) == 0
        store.close()
