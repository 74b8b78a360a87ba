"""Several nightcrier processes on one PostgreSQL: each cluster watched by exactly one, with failover."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, wait_for
from mcp_testserver import McpTestServer, make_fault

import nightcrier as nc

FAILOVER = 1.5
AGENT = ("sleep 0.2; printf '# Investigation\\n\\n## Root Cause\\nA memory leak in the cache layer made "
         "the container exceed its limit.\\n**Confidence:** HIGH\\n' > output/investigation.md")


@pytest.fixture
def servers() -> Iterator[list[McpTestServer]]:
    started = [McpTestServer(cluster=f"kind-{n}").start() for n in range(6)]
    yield started
    for server in started:
        server.stop()


def write_config(tmp_path: Path, name: str, servers: list[McpTestServer], pg_url: str,
                 **overrides: Any) -> Path:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\n")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "workspace_root": str(tmp_path / "ws"), "health_port": 0, "failover_seconds": FAILOVER,
        "sse_reconnect_initial_backoff": 0.05, "sse_reconnect_max_backoff": 0.5, "mcp_ping_interval": 1,
        "agent_runner": "process", "agent_command": ["sh", "-c", AGENT], "max_concurrent_agents": 2,
        "stale_after_seconds": 3, "dispatch_poll_interval": 0.5,
        "state_storage": {"type": "postgres", "postgres_connection_string": pg_url},
        "clusters": [{"name": f"c{n}", "mcp": {"endpoint": s.url},
                      "triage": {"enabled": True, "kubeconfig": str(kubeconfig)}}
                     for n, s in enumerate(servers)], **overrides}))
    return path


class StreamWatch:
    """Samples every server's open GET streams until stopped; remembers the most seen at once."""

    def __init__(self, servers: list[McpTestServer]):
        self.servers = servers
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.most = max([self.most, *(s.open_get_streams() for s in self.servers)])

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.most


def live_subscriptions(server: McpTestServer) -> int:
    """Subscriptions whose session has its GET stream open. A SIGKILLed client leaves a
    subscription without a stream behind, as it would on the Go server until its next fault."""
    with server._cond:
        run = server._run
        if run is None:
            return 0
        return sum(1 for sub in run.subs.values()
                   if not sub.degraded and (stream := run.stream_of(sub.session_id)) and not stream.closed)


def subscribed_everywhere(servers: list[McpTestServer]) -> bool:
    return all(live_subscriptions(s) == 1 and s.open_get_streams() == 1 for s in servers)


def test_two_services_share_the_clusters_and_fail_over(tmp_path: Path, servers: list[McpTestServer],
                                                       postgres_schema_url: str) -> None:
    first_config, _ = nc.load_config(str(write_config(tmp_path, "a", servers[:2], postgres_schema_url)),
                                     env={})
    second_config, _ = nc.load_config(str(write_config(tmp_path, "b", servers[:2], postgres_schema_url)),
                                      env={})
    first = nc.Service(first_config).start()
    wait_for(lambda: subscribed_everywhere(servers[:2]), what="both clusters watched")
    second = nc.Service(second_config).start()
    watch = StreamWatch(servers[:2])
    try:
        wait_for(lambda: all(h.status == nc.STANDBY for h in second.health())
                 and len(second.ownership.owners()) == 2, what="the second to stand by")
        owners = {c["name"]: c["owner"] for c in second.cluster_health()["clusters"]}
        assert owners == {"c0": first.instance, "c1": first.instance}
        assert second.readiness()[0], "a replica standing by is ready"
        first.stop()
        wait_for(lambda: subscribed_everywhere(servers[:2]) and all(
            h.status == nc.ACTIVE for h in second.health()), timeout=FAILOVER + 10,
            what="the second to take both clusters over")
        servers[0].emit(make_fault(name="after-failover"))
        wait_for(lambda: any(i.resource_name == "after-failover" for i in second.store.list_incidents()),
                 what="the fault to land through the new owner")
    finally:
        second.stop()
        first.stop()
    assert watch.stop() == 1, "never two subscriptions to one server"


def test_three_processes_sigkill_one_and_restart_it(tmp_path: Path, servers: list[McpTestServer],
                                                     postgres_schema_url: str) -> None:
    configs = [write_config(tmp_path, f"p{n}", servers, postgres_schema_url) for n in range(3)]
    logs = [tmp_path / f"p{n}.log" for n in range(3)]

    def start(n: int) -> subprocess.Popen[bytes]:
        with open(logs[n], "ab") as log:
            command = [sys.executable, str(ROOT / "nightcrier.py"), "--config", str(configs[n])]
            return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)

    procs = [start(n) for n in range(3)]
    store = nc.PostgresStore(postgres_schema_url)
    watch = StreamWatch(servers)
    try:
        wait_for(lambda: subscribed_everywhere(servers), timeout=30, what="all six clusters watched")
        for n, server in enumerate(servers):
            for k in range(3):
                server.emit(make_fault(name=f"before-{n}-{k}"))
        # Stored first: what a process holds in memory when it is SIGKILLed is gone with it.
        wait_for(lambda: sum(store.count_by_status().values()) == 18, timeout=30, what="18 incidents stored")
        wait_for(lambda: store.count_by_status()[nc.INVESTIGATING] >= 3, timeout=30, what="agents running")
        victim = procs[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        wait_for(lambda: subscribed_everywhere(servers), timeout=FAILOVER + 15,
                 what="the victim's clusters re-subscribed by the others")
        for n, server in enumerate(servers):
            server.emit(make_fault(name=f"after-{n}"))
        wait_for(lambda: store.count_by_status()[nc.RESOLVED] == 24, timeout=90,
                 what="every incident, the victim's running ones included, resolved")
        procs[0] = start(0)
        for n, server in enumerate(servers):
            for k in range(4):
                server.emit(make_fault(name=f"restart-{n}-{k}"))
        wait_for(lambda: store.count_by_status()[nc.RESOLVED] == 48, timeout=90, what="all 48 resolved")
        wait_for(lambda: "worker started incident" in logs[0].read_text().split("nightcrier started")[-1],
                 timeout=30, what="the restarted process to take work again")
    finally:
        stop_all(procs)
        store.close()
    assert watch.stop() == 1, "never two subscriptions to one server"
    assert sum(1 for i in store_incidents(postgres_schema_url) if i.resource_name.startswith("before")) == 18


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process first, then wait: they shut down in parallel."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(60)


def store_incidents(url: str) -> list[nc.Incident]:
    store = nc.PostgresStore(url)
    try:
        return store.list_incidents(nc.IncidentFilter(limit=1000))
    finally:
        store.close()


def test_2000_faults_over_three_processes_each_run_once(tmp_path: Path, servers: list[McpTestServer],
                                                        postgres_schema_url: str) -> None:
    """Every process claims from the shared queue: each incident runs once, never two at a time on
    a cluster, and no process runs more than its own max_concurrent_agents."""
    runs = tmp_path / "runs.log"
    # One short line per run, appended with O_APPEND, so concurrent agents never interleave.
    agent = (f'start=$(date +%s.%N); {AGENT.replace("sleep 0.2; ", "")}; '
             f'echo "$NIGHTCRIER_INSTANCE $CLUSTER_NAME $INCIDENT_ID $start $(date +%s.%N)" >> {runs}')
    caps = (1, 2, 3)
    configs = [write_config(tmp_path, f"q{n}", servers, postgres_schema_url, max_concurrent_agents=cap,
                            agent_command=["sh", "-c", agent], global_queue_size=5000)
               for n, cap in enumerate(caps)]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "nightcrier.py"), "--config", str(c)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in configs]
    store = nc.PostgresStore(postgres_schema_url)
    try:
        wait_for(lambda: subscribed_everywhere(servers), timeout=30, what="all six clusters watched")
        for k in range(2000 // len(servers) + 1):
            for n, server in enumerate(servers):
                if k * len(servers) + n < 2000:
                    server.emit(make_fault(name=f"storm-{n}-{k}"))
        wait_for(lambda: store.count_by_status()[nc.RESOLVED] == 2000, timeout=300, what="2000 resolved")
    finally:
        stop_all(procs)
        store.close()

    lines = [line.split() for line in runs.read_text().splitlines()]
    assert len(lines) == 2000 and len({line[2] for line in lines}) == 2000, "each incident ran exactly once"
    by_cluster: dict[str, list[tuple[float, float]]] = {}
    by_instance: dict[str, list[tuple[float, float]]] = {}
    for instance, cluster, _, start, end in lines:
        by_cluster.setdefault(cluster, []).append((float(start), float(end)))
        by_instance.setdefault(instance, []).append((float(start), float(end)))
    for cluster, spans in by_cluster.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end <= start, f"two agents ran at once on {cluster}"
    assert len(by_instance) == 3, "every process took work"
    cap_of = {proc.pid: cap for proc, cap in zip(procs, caps, strict=True)}
    for instance, spans in by_instance.items():
        cap = cap_of[int(instance.split(":")[1])]
        assert max_overlap(spans) <= cap, f"{instance} ran more than {cap} agents at once"


def max_overlap(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    running = peak = 0
    for _, delta in edges:
        running += delta
        peak = max(peak, running)
    return peak
