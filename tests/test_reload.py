"""Reload on SIGHUP: a running nightcrier process against real MCP test servers (official SDK) re-reads
its configuration; untouched clusters keep their subscriptions, added ones are subscribed, removed
ones unsubscribed, changed ones subscribed anew, and an invalid file changes nothing."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import wait_for
from mcp_testserver import McpTestServer, make_fault
from test_engine import exit_status, start_service

import nightcrier as nc

FAST = {"sse_reconnect_initial_backoff": 0.05, "sse_reconnect_max_backoff": 0.5, "mcp_ping_interval": 1,
        "mcp_connect_timeout": 1, "mcp_request_timeout": 2, "health_port": 0, "log_format": "json"}


class Running:
    """``nightcrier run`` as a subprocess whose JSON log lines can be searched."""

    def __init__(self, tmp_path: Path, config: Path):
        self.proc = start_service(config, tmp_path)
        self.log_path = tmp_path / "stderr.log"

    def lines(self, message: str = "") -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if message in entry.get("msg", ""):
                found.append(entry)
        return found

    def reload(self) -> None:
        """SIGHUP, then wait until the process says the reload is over (done or refused)."""
        before = len(self.lines("configuration reloaded")) + len(self.lines("configuration reload refused"))
        self.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(self.lines("configuration reloaded")) + len(
            self.lines("configuration reload refused")) > before, timeout=20, what="the reload to finish")


@pytest.fixture
def mcp_servers() -> Iterator[dict[str, McpTestServer]]:
    started = {name: McpTestServer(cluster=name).start() for name in ("a", "b", "c")}
    yield started
    for server in started.values():
        server.stop()


def write_config(path: Path, kubeconfig: Path, clusters: dict[str, dict[str, Any]], **top: Any) -> None:
    """``clusters``: name -> {"endpoint", "triage" (bool)}. Agents run until ``release`` exists."""
    release = path.parent / "release"
    data = {**FAST, "workspace_root": str(path.parent / "ws"), "agent_runner": "process",
            "agent_command": ["sh", "-c", f"while [ ! -e '{release}' ]; do sleep 0.1; done"],
            "max_concurrent_agents": 1, "shutdown_timeout": 0, **top,
            "clusters": [{"name": name, "mcp": {"endpoint": spec["endpoint"]},
                          "triage": {"enabled": spec.get("triage", False), "kubeconfig": str(kubeconfig),
                                     "check_permissions": False}}
                         for name, spec in clusters.items()]}
    path.write_text(yaml.safe_dump(data))


def subscription_ids(server: McpTestServer) -> list[str]:
    return [s["subscription_id"] for s in server.subscriptions()]


def test_sighup_reloads_clusters_without_touching_the_others(
        tmp_path: Path, mcp_servers: dict[str, McpTestServer]) -> None:
    a, b, c = mcp_servers["a"], mcp_servers["b"], mcp_servers["c"]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    config = tmp_path / "config.yaml"
    write_config(config, kubeconfig, {"a": {"endpoint": a.url}, "b": {"endpoint": b.url, "triage": True}})
    running = Running(tmp_path, config)
    try:
        a.wait_for_subscriptions(1, timeout=20)
        b.wait_for_subscriptions(1, timeout=20)
        (a_subscription,) = subscription_ids(a)
        # Two faults on b: one is being triaged (one agent at a time), the other waits.
        b.emit(make_fault(cluster="b", name="api-1"))
        b.emit(make_fault(cluster="b", name="api-2"))
        store = nc.SqliteStore(str(tmp_path / "ws" / "nightcrier.db"), read_only=True)

        def statuses(cluster: str) -> list[str]:
            return [i.status for i in sorted(store.list_incidents(nc.IncidentFilter(cluster=cluster)),
                                             key=lambda i: i.created_at)]

        wait_for(lambda: statuses("b") == [nc.INVESTIGATING, nc.PENDING], timeout=20,
                 what="one incident running, one pending")

        # a untouched, b removed, c added; a restart-only setting changed.
        write_config(config, kubeconfig, {"a": {"endpoint": a.url}, "c": {"endpoint": c.url, "triage": True}},
                     max_concurrent_agents=2)
        running.reload()
        c.wait_for_subscriptions(1, timeout=20)
        wait_for(lambda: not b.subscriptions(), timeout=10, what="b unsubscribed")
        assert subscription_ids(a) == [a_subscription], "the untouched cluster kept its subscription"
        assert [r.describe() for r in a.requests].count("POST initialize") == 1, "and its session"
        (restart,) = running.lines("take effect only after a restart")
        assert restart["keys"] == "max_concurrent_agents"
        (removed,) = running.lines("cluster removed from the configuration has pending incidents")
        assert removed["cluster"] == "b" and removed["pending"] == 1
        (reloaded,) = running.lines("configuration reloaded")
        assert (reloaded["added"], reloaded["removed"], reloaded["resubscribed"]) == ("c", "b", "")

        # The slot b's agent held goes to c's newer incident: b's waiting one stays pending.
        (tmp_path / "release").touch()
        wait_for(lambda: statuses("b")[0] in nc.TERMINAL_STATUSES, timeout=20, what="b's agent to end")
        c.emit(make_fault(cluster="c"))
        wait_for(lambda: statuses("c") and statuses("c")[0] != nc.PENDING, timeout=20,
                 what="c's incident claimed")
        assert statuses("b")[1] == nc.PENDING
        store.close()

        # An invalid file is refused whole: nothing changes, the problems are logged as check-config says.
        write_config(config, kubeconfig, {"a": {"endpoint": "ftp://nowhere/mcp"}, "d": {"endpoint": c.url}})
        running.reload()
        problems = [e["problem"] for e in running.lines("configuration reload refused")]
        assert problems == ["clusters[0] (a).mcp.endpoint: must start with http:// or https://, "
                            "got 'ftp://nowhere/mcp'"]
        assert subscription_ids(a) == [a_subscription] and len(subscription_ids(c)) == 1
        assert running.proc.poll() is None

        # A cluster whose settings changed is subscribed anew.
        c_subscriptions = subscription_ids(c)
        write_config(config, kubeconfig, {"a": {"endpoint": a.url, "triage": True},
                                          "c": {"endpoint": c.url, "triage": True}}, max_concurrent_agents=2)
        running.reload()
        wait_for(lambda: (ids := subscription_ids(a)) and ids != [a_subscription], timeout=20,
                 what="a subscribed anew")
        assert len(subscription_ids(a)) == 1, "the old subscription went with the old session"
        assert subscription_ids(c) == c_subscriptions
        assert running.lines("configuration reloaded")[-1]["resubscribed"] == "a"
    finally:
        running.proc.send_signal(signal.SIGTERM)
        assert exit_status(running.proc, tmp_path) == 0
    output = running.log_path.read_text()
    assert "Traceback" not in output


def test_restart_only_changes_name_keys_not_values() -> None:
    old = nc.Config(slack_webhook_url="https://hooks.slack.com/services/T/B/old-secret")
    new = nc.Config(slack_webhook_url="https://hooks.slack.com/services/T/B/new-secret", health_port=9090)
    new.state_storage.type = "postgres"
    assert nc.restart_only_changes(old, new) == ["slack_webhook_url", "health_port", "state_storage.type"]
    assert nc.restart_only_changes(old, nc.Config(slack_webhook_url=old.slack_webhook_url)) == []

