"""Retention, prune and retry: on both engines, by the service and by hand beside a running one."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import wait_for
from test_engine import GOOD_AGENT
from test_store_contract import make_event

import nightcrier as nc

ROOT = Path(__file__).resolve().parent.parent


def _finish(store: nc.StateStore, cluster: str, status: str = nc.RESOLVED) -> str:
    """One incident run to ``status`` by hand, with an execution and a report."""
    (incident_id,) = store.insert_events([make_event(cluster, fault_id="")])
    claimed = store.claim_next("w", exclude_clusters=())
    assert claimed is not None and claimed.incident_id == incident_id
    execution = store.start_execution(incident_id, "process", {})
    store.finish_execution(execution.execution_id, 0, None, {}, nc.RunSpend(10, 0.01))
    store.record_report(nc.TriageReport(nc.new_id(), incident_id, execution.execution_id, nc.utcnow(), "# r"))
    assert store.complete(incident_id, "w", status, 0, None)
    return incident_id


def _rows(store: nc.StateStore, incident_id: str) -> dict[str, int]:
    return {table: store._query(f"SELECT COUNT(*) AS n FROM {table} WHERE incident_id = ?",  # type: ignore
                                (incident_id,))[0]["n"]
            for table in ("incidents", "agent_executions", "triage_reports")}


def test_prune_removes_finished_incidents_from_every_table_in_batches_and_never_open_ones(
        store: nc.StateStore) -> None:
    finished = [_finish(store, f"c{n}") for n in range(5)]
    skipped, = store.insert_events([make_event("quiet")], skipped_clusters=["quiet"])
    pending, = store.insert_events([make_event("p", fault_id="")])
    investigating, = store.insert_events([make_event("i", fault_id="")])
    assert store.claim_next("w", exclude_clusters=["p"]) is not None
    store.insert_events([], rejected=[nc.RejectedNotification("c0", "bad", "{}")])
    later = nc.utcnow() + dt.timedelta(seconds=5)

    assert sorted(store.prune(later, 100, dry_run=True)) == sorted([*finished, skipped])
    assert _rows(store, finished[0]) == {"incidents": 1, "agent_executions": 1, "triage_reports": 1}
    assert len(store.prune(later, 2)) == 2, "at most one batch per call"
    removed = nc.prune_incidents(store, "/nonexistent", later)
    assert len(removed) == 4
    for incident_id in [*finished, skipped]:
        assert _rows(store, incident_id) == {"incidents": 0, "agent_executions": 0, "triage_reports": 0}
    assert {i.incident_id for i in store.list_incidents()} == {pending, investigating}
    assert store.list_rejected() == []
    assert store._query("SELECT COUNT(*) AS n FROM fault_events")[0]["n"] == 2  # type: ignore


def test_prune_keeps_what_finished_after_the_cutoff(store: nc.StateStore) -> None:
    incident_id = _finish(store, "c1")
    assert store.prune(nc.utcnow() - dt.timedelta(days=1), 100) == []
    assert store.get_incident(incident_id) is not None


def test_retry_puts_a_finished_or_skipped_incident_back_and_refuses_an_open_one(store: nc.StateStore) -> None:
    store.rules = nc.TriageRules(dedup_window=300)
    first = _finish(store, "c1", nc.AGENT_FAILED)
    repeat, = store.insert_events([make_event("c2", fault_id="f1"), make_event("c2", fault_id="f1")])[1:]
    again = store.retry(first)
    assert again is not None and again.status == nc.PENDING and again.attempts == 0
    assert (again.failure_reason, again.completed_at, again.exit_code) == (None, None, None)
    assert store.retry(first) is None, "a pending incident is not retried"
    claimed = store.claim_next("w", exclude_clusters=["c2"])
    assert claimed is not None and claimed.incident_id == first
    retried_repeat = store.retry(repeat)
    assert retried_repeat is not None
    assert (retried_repeat.skip_reason, retried_repeat.duplicate_of) == (None, None)
    assert store.retry(nc.new_id()) is None


# -- beside a running service ----------------------------------------------------------------------

@pytest.fixture
def running(engine: str, store_locator: str, tmp_path: Path) -> Iterator[tuple[nc.Service, Path]]:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\n")
    storage: dict[str, Any] = ({"type": "sqlite", "sqlite_path": store_locator} if engine == "sqlite"
                               else {"type": "postgres", "postgres_connection_string": store_locator})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "workspace_root": str(tmp_path / "ws"), "health_port": 0, "agent_runner": "process",
        "agent_command": ["sh", "-c", GOOD_AGENT], "dispatch_poll_interval": 0.2, "state_storage": storage,
        "clusters": [{"name": "c1", "mcp": {"endpoint": "http://127.0.0.1:9/mcp"},
                      "triage": {"enabled": True, "kubeconfig": str(kubeconfig),
                                 "check_permissions": False}}]}))
    config, _ = nc.load_config(str(path), env={})
    service = nc.Service(config).start()
    yield service, path
    service.stop()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "nightcrier.py"), *args], capture_output=True,
                          text=True, timeout=60, env={"PATH": os.environ["PATH"]})


def test_retry_and_prune_work_while_run_runs(running: tuple[nc.Service, Path]) -> None:
    service, config_path = running
    store = service.store
    (incident_id,) = store.insert_events([make_event("c1")])
    service.dispatcher.wake.set()
    wait_for(lambda: (i := store.get_incident(incident_id)) and i.status == nc.RESOLVED, timeout=30,
             what="the first run")

    retried = cli("retry", incident_id[:8], "--config", str(config_path))
    assert retried.returncode == 0, retried.stderr
    assert f"incident {incident_id} is pending again" in retried.stdout
    wait_for(lambda: len(store.list_executions(incident_id)) == 2
             and store.get_incident(incident_id).status == nc.RESOLVED,  # type: ignore[union-attr]
             timeout=30, what="the running service to run it again")
    refused = cli("retry", "zzzz", "--config", str(config_path))
    assert refused.returncode == 1 and "no incident 'zzzz'" in refused.stderr

    workspace = Path(store.get_incident(incident_id).workspace_path or "")  # type: ignore[union-attr]
    assert workspace.is_dir()
    dry = cli("prune", "--older-than", "0s", "--dry-run", "--config", str(config_path))
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.split() == [incident_id] and "would remove 1 incident(s)" in dry.stderr
    assert store.get_incident(incident_id) is not None and workspace.is_dir()
    pruned = cli("prune", "--older-than", "0s", "--config", str(config_path))
    assert pruned.stdout.split() == [incident_id] and "removed 1 incident(s)" in pruned.stderr
    assert store.get_incident(incident_id) is None and not workspace.exists()
    bad = cli("prune", "--older-than", "soon", "--config", str(config_path))
    assert bad.returncode == 2 and "--older-than" in bad.stderr


def test_the_service_removes_incidents_older_than_retention_days(engine: str, store: nc.StateStore,
                                                                 tmp_path: Path) -> None:
    old = _finish(store, "c1")
    recent = _finish(store, "c2")
    store._execute("UPDATE incidents SET completed_at = ? WHERE incident_id = ?",  # type: ignore
                   (nc.utcnow() - dt.timedelta(days=31), old))
    workspace = tmp_path / "ws" / old
    (workspace / "output").mkdir(parents=True)
    (workspace / "output" / "investigation.md").write_text("# r")
    os.symlink("/etc", workspace / "output" / "link")  # removed, never followed
    config = nc.Config(workspace_root=str(tmp_path / "ws"))
    sweeper = nc.RetentionSweeper(config, store, nc.Metrics())
    sweeper.start()
    try:
        wait_for(lambda: store.get_incident(old) is None, what="the old incident removed")
    finally:
        sweeper.stop()
        sweeper.join(10)
    assert not workspace.exists() and os.path.isdir("/etc")
    assert store.get_incident(recent) is not None
