"""Recovery: attempt-scoped output, claims enforced while agents run, liveness locks, kill -9 and
restart, a second signal, one owner per SQLite database, and the bounds on Slack and reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, open_test_store, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_engine import GOOD_AGENT, _alive, engine_config
from test_store_contract import make_event

import nightcrier as nc

# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def dispatchers(store: nc.StateStore) -> Iterator[Callable[..., nc.Dispatcher]]:
    """Starts real dispatchers with the process runner on the test store; stops them afterwards."""
    started: list[nc.Dispatcher] = []

    def start(config: nc.Config, instance: str = "test-instance", **kwargs: Any) -> nc.Dispatcher:
        dispatcher = nc.Dispatcher(config, store, nc.ProcessRunner(grace=1), threading.Event(),
                                   kwargs.pop("metrics", None) or nc.Metrics(), instance, **kwargs)
        dispatcher.start()
        dispatcher.wake.set()
        started.append(dispatcher)
        return dispatcher

    yield start
    for dispatcher in started:
        dispatcher.stop()


def terminal(store: nc.StateStore, incident_id: str, timeout: float = 30) -> nc.Incident:
    return wait_for(lambda: (i := store.get_incident(incident_id)) and i.status in nc.TERMINAL_STATUSES and i,
                    timeout=timeout, what="the incident to finish")


def service_config(tmp_path: Path, engine: str, locator: str, agent: str, clusters: int = 3,
                   **overrides: Any) -> Path:
    """A configuration file for a nightcrier subprocess on the test's database."""
    storage = ({"type": "sqlite", "sqlite_path": locator} if engine == "sqlite"
               else {"type": "postgres", "postgres_connection_string": locator})
    data = nc.config_as_dict(engine_config(tmp_path, agent, **overrides), masked=False)
    data["clusters"] = [c for c in data["clusters"] if c["name"] in {f"c{n}" for n in range(clusters)}]
    data["state_storage"] = {**data["state_storage"], **storage}
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Nightcrier:
    """``nightcrier run`` as a subprocess; its stderr goes to a file (a pipe nobody reads could fill)."""

    def __init__(self, config: Path, log: Path, *args: str):
        self.log = log
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "nightcrier.py"), *args,
                                          "--config", str(config)], stdout=subprocess.DEVNULL, stderr=fh)

    def logged(self, text: str) -> bool:
        return text in self.log.read_text(errors="replace")

    def exit_status(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)
            wait_for(lambda: self.logged("Thread"), what="a thread dump")
            self.proc.kill()
            pytest.fail("nightcrier did not exit:\n" + self.log.read_text()[-20000:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def processes() -> Iterator[Callable[..., Nightcrier]]:
    started: list[Nightcrier] = []

    def start(config: Path, log: Path, *args: str) -> Nightcrier:
        process = Nightcrier(config, log, *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "nightcrier.py"), *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


def pids_in(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()] if path.exists() else []


# -- verdicts about the run they name ---------------------------------------------------------


def test_a_retry_is_judged_on_its_own_output_not_an_earlier_attempts(
        tmp_path: Path, store: nc.StateStore, dispatchers: Callable[..., nc.Dispatcher]) -> None:
    started = tmp_path / "started"
    (incident_id,) = store.insert_events([make_event("c1")])
    first = dispatchers(engine_config(tmp_path, f"{GOOD_AGENT}; echo first > logs/mark; echo attempt-one; "
                                      f"touch {started}; sleep 300", shutdown_timeout=0))
    wait_for(started.exists, what="attempt 1 to write its report")
    first.stop()  # a shutdown cancels attempt 1 after its report was written
    assert store.get_incident(incident_id).status == nc.PENDING  # type: ignore[union-attr]

    config = engine_config(tmp_path, "echo attempt-two")
    dispatchers(config)
    incident = terminal(store, incident_id)
    assert (incident.status, incident.failure_reason) == (nc.AGENT_FAILED, "investigation.md file not found")
    assert store.get_report(incident_id) is None, "no report of attempt 1 was stored for attempt 2"
    ws = Path(incident.workspace_path or "")
    kept = ws / "attempts" / "1"
    assert incident_id in (kept / "output" / "investigation.md").read_text()
    assert (kept / "logs" / "mark").read_text() == "first\n"
    assert sorted(p.name for p in (ws / "output").iterdir()) == [], "attempt 2 started with an empty output/"
    assert not (ws / "logs" / "mark").exists()
    # Each run's record points at its own attempt's logs, and the incident's page shows both.
    first_run, second_run = store.list_executions(incident_id)
    assert first_run.log_paths == nc.agent_log_paths(str(kept))
    assert second_run.log_paths == nc.agent_log_paths(str(ws))
    assert Path(first_run.log_paths["agent-stdout.log"]).read_text() == "attempt-one\n"
    assert Path(second_run.log_paths["agent-stdout.log"]).read_text() == "attempt-two\n"
    page = nc.WebPages(config, store, dict, "127.0.0.1").incident(incident_id, "/").body.decode()
    for name, text in (("attempts/1/logs/agent-stdout.log", "attempt-one"), ("logs/agent-stdout.log",
                                                                             "attempt-two")):
        assert f'files/{name}">{name}</a>' in page, f"a run links {name}"
        assert f"<h2>{name}</h2>\n<pre>{text}\n</pre>" in page


def test_rotation_moves_symlinks_without_following_them(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("do not move me")
    ws.mkdir()
    (ws / "output").symlink_to(outside)           # an agent replaced output/ with a link
    (ws / "attempts").symlink_to(outside)         # and planted attempts/ as one
    (ws / "logs").mkdir()
    kept = nc.rotate_attempt(str(ws))
    assert kept == str(ws / "attempts" / "1")
    assert (ws / "attempts").is_dir() and not (ws / "attempts").is_symlink()
    assert (ws / "attempts" / "1" / "output").is_symlink(), "the link itself moved"
    assert (outside / "secret").read_text() == "do not move me" and sorted(os.listdir(outside)) == ["secret"]
    assert [p.name for p in ws.iterdir() if p.name.startswith("attempts.invalid-")], "old attempts kept aside"
    assert not (ws / "output").exists()
    # Empty output/ and logs/ (an attempt that never started) are left alone.
    (ws / "output").mkdir()
    (ws / "logs").mkdir()
    assert nc.rotate_attempt(str(ws)) is None
    (ws / "output" / "investigation.md").write_text("x")
    assert nc.rotate_attempt(str(ws)) == str(ws / "attempts" / "2")


def test_a_run_whose_claim_is_stolen_is_cancelled_and_its_verdict_not_written(
        tmp_path: Path, store: nc.StateStore, dispatchers: Callable[..., nc.Dispatcher]) -> None:
    pids = tmp_path / "pids"
    agent = f"{GOOD_AGENT}; echo $$ >> {pids}; sleep 300"
    metrics = nc.Metrics()
    (incident_id,) = store.insert_events([make_event("c1")])
    dispatchers(engine_config(tmp_path, agent, stale_after_seconds=2), metrics=metrics)
    wait_for(lambda: pids_in(pids), what="the agent to run")
    store._execute("UPDATE incidents SET claimed_by = 'another-process' "  # type: ignore[attr-defined]
                   "WHERE incident_id = ?", (incident_id,))
    (execution,) = wait_for(lambda: (e := store.list_executions(incident_id)) and e[0].completed_at and e,
                            timeout=15, what="the run to be cancelled")
    assert execution.error_message == nc.CLAIM_LOST_REASON
    wait_for(lambda: not _alive(pids_in(pids)[0]), what="the agent to be killed")
    incident = store.get_incident(incident_id)
    assert incident is not None
    assert (incident.status, incident.claimed_by) == (nc.INVESTIGATING, "another-process"), "verdict written"
    assert store.get_report(incident_id) is None, "a report of a run that lost its claim was stored"
    assert metrics.value("claims_lost") == 1


def test_a_heartbeat_right_after_its_own_run_finished_is_no_lost_claim(
        tmp_path: Path, store: nc.StateStore, dispatchers: Callable[..., nc.Dispatcher],
        caplog: pytest.LogCaptureFixture) -> None:
    metrics = nc.Metrics()
    dispatcher = dispatchers(engine_config(tmp_path, GOOD_AGENT), metrics=metrics)
    heartbeats: list[set[str]] = []
    finish_run = store.finish_run

    def finish_then_heartbeat(incident_id: str, worker_id: str, outcome: nc.RunOutcome) -> bool:
        recorded = finish_run(incident_id, worker_id, outcome)
        # The heartbeat check, between the verdict's commit and the worker letting go of the run.
        heartbeats.append(set(dispatcher.running()))
        dispatcher._maintain()
        return recorded

    store.finish_run = finish_then_heartbeat  # type: ignore[method-assign]
    (incident_id,) = store.insert_events([make_event("c1")])
    with caplog.at_level("WARNING", logger="nightcrier"):
        dispatcher.wake.set()
        assert terminal(store, incident_id).status == nc.RESOLVED
        wait_for(lambda: not dispatcher.running(), what="the worker to let go of the run")
    assert heartbeats == [{incident_id}], "the check ran while the run was still this process's"
    assert metrics.value("claims_lost") == 0
    assert not [r for r in caplog.records if "claim lost" in r.getMessage()]


def test_a_runner_failure_after_the_agent_started_counts_as_an_attempt(store: nc.StateStore) -> None:
    (incident_id,) = store.insert_events([make_event("c1")])
    for attempt in (1, 2):
        claimed = store.claim_next("me")
        assert claimed is not None and claimed.attempts == attempt
        expected = nc.PENDING if attempt == 1 else nc.FAILED
        assert store.requeue(incident_id, "me", "runner failed: engine died", max_attempts=2) == expected
    incident = store.get_incident(incident_id)
    assert incident is not None and incident.status == nc.FAILED and incident.completed_at is not None
    assert store.requeue(incident_id, "me", "x", max_attempts=2) is None, "not claimed: nothing changes"


# -- the database's clock -------------------------------------------------------------------


def test_claims_and_heartbeats_use_the_database_clock(store: nc.StateStore) -> None:
    (incident_id,) = store.insert_events([make_event("c1")])
    before = store.now()
    claimed = store.claim_next("me")
    after = store.now()
    assert claimed is not None and claimed.heartbeat_at is not None
    assert before <= claimed.heartbeat_at <= after
    assert store.refresh_claims("me", [incident_id]) == {incident_id}
    assert store.refresh_claims("someone-else", [incident_id]) == set()
    # Staleness measured on the database clock, in seconds: a fresh heartbeat is not stale...
    assert store.recover_stale(30.0, max_attempts=2) == ([], [])
    # ...and one older than the limit is, whatever the local clock says.
    store._execute("UPDATE incidents SET heartbeat_at = ? WHERE incident_id = ?",  # type: ignore[attr-defined]
                   (store.now() - nc.dt.timedelta(seconds=40), incident_id))
    assert store.recover_stale(30.0, max_attempts=2) == ([incident_id], [])


def test_a_replica_whose_clock_is_off_neither_keeps_a_dead_claim_alive_nor_orphans_a_live_one(
        store: nc.StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    (incident_id,) = store.insert_events([make_event("c1")])
    real = nc.utcnow
    # This process's clock runs an hour ahead of the database's.
    monkeypatch.setattr(nc, "utcnow", lambda: real() + nc.dt.timedelta(hours=1))
    claimed = store.claim_next("skewed")
    assert claimed is not None and claimed.heartbeat_at is not None
    assert abs((claimed.heartbeat_at - store.now()).total_seconds()) < 5, "claimed on the local clock"
    # Sixty seconds later, by the database, its heartbeat is stale -- not an hour later.
    store._execute("UPDATE incidents SET heartbeat_at = ? WHERE incident_id = ?",  # type: ignore[attr-defined]
                   (store.now() - nc.dt.timedelta(seconds=61), incident_id))
    assert store.recover_stale(60.0, max_attempts=2) == ([incident_id], [])
    # And a replica an hour behind does not find a fresh heartbeat stale.
    monkeypatch.setattr(nc, "utcnow", lambda: real() - nc.dt.timedelta(hours=1))
    assert store.claim_next("behind") is not None
    assert store.recover_stale(60.0, max_attempts=2) == ([], [])


# -- liveness -------------------------------------------------------------------------------


def test_claims_of_a_process_whose_liveness_lock_is_free_are_orphans(
        engine: str, store_factory: Callable[[], nc.StateStore], store_locator: str) -> None:
    if engine == "sqlite":
        dead = nc.SqliteStore(store_locator, owner="dead-instance")
    else:
        dead = open_test_store(engine, store_locator)
        dead.hold_liveness("dead-instance")
    incident_ids = dead.insert_events([make_event(f"c{n}") for n in range(3)])
    for _ in incident_ids:
        assert dead.claim_next("dead-instance") is not None
    if engine == "postgres":
        # While it lives, a second process leaves its claims alone.
        live = store_factory()
        live.hold_liveness("live-instance")
        assert live.recover_orphans("live-instance", max_attempts=2) == ([], [])
        dead.close()
    else:
        dead.close()
        live = nc.SqliteStore(store_locator, owner="live-instance")
    try:
        assert store_factory().recover_orphans("bystander", max_attempts=2) == ([], []), \
            "a store without a liveness lock of its own judges nobody"
        requeued, failed = live.recover_orphans("live-instance", max_attempts=2)
        assert sorted(requeued) == sorted(incident_ids) and failed == []
        for incident_id in incident_ids:
            incident = live.get_incident(incident_id)
            assert incident is not None and incident.status == nc.PENDING and incident.claimed_by is None
    finally:
        live.close()


def test_one_run_process_owns_a_sqlite_database_and_readers_work_beside_it(
        tmp_path: Path, processes: Callable[..., Nightcrier]) -> None:
    db = tmp_path / "nightcrier.db"
    config = service_config(tmp_path, "sqlite", str(db), GOOD_AGENT)
    store = nc.SqliteStore(str(db))
    (incident_id,) = store.insert_events([make_event("c1")])
    first = processes(config, tmp_path / "first.log")
    wait_for(lambda: first.logged("nightcrier started"), timeout=30, what="the first process")
    wait_for(lambda: store.get_incident(incident_id).status == nc.RESOLVED,  # type: ignore[union-attr]
             what="the first process to work")
    second = processes(config, tmp_path / "second.log")
    assert second.exit_status() == 1
    refusal = second.log.read_text()
    assert f"pid {first.proc.pid} on host" in refusal and "owned by another nightcrier run process" in refusal
    assert first.proc.poll() is None

    listed = cli(config, "incidents", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [i["incident_id"] for i in json.loads(listed.stdout)] == [incident_id]
    shown = cli(config, "show", incident_id)
    assert shown.returncode == 0 and "resolved" in shown.stdout, shown.stderr
    first.proc.send_signal(signal.SIGTERM)
    assert first.exit_status() == 0
    # Once the owner is gone, another may own it.
    third = processes(config, tmp_path / "third.log")
    wait_for(lambda: third.logged("nightcrier started"), timeout=30, what="a new owner")
    store.close()


def test_readers_never_create_or_migrate_a_database(tmp_path: Path, engine: str, store_locator: str) -> None:
    config = service_config(tmp_path, engine, store_locator, GOOD_AGENT)
    listed = cli(config, "incidents", "--json")
    assert (listed.returncode, json.loads(listed.stdout or "null")) == (0, []), listed.stderr
    shown = cli(config, "show", nc.new_id())
    assert shown.returncode == 1 and "no incident" in shown.stderr
    if engine == "sqlite":
        assert not list(tmp_path.glob(Path(store_locator).name + "*")), "the readers created a file"
    else:
        import psycopg2
        with psycopg2.connect(store_locator) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()")
            assert cur.fetchone()[0] == 0, "the readers created tables"
        conn.close()


# -- crash, restart, second signal -------------------------------------------------------------


def test_kill_9_with_agents_running_then_restart_recovers_within_seconds(
        tmp_path: Path, engine: str, store_locator: str, processes: Callable[..., Nightcrier]) -> None:
    pids = tmp_path / "pids"
    agent = f"echo $$ >> {pids}; sleep 1; {GOOD_AGENT}"
    config = service_config(tmp_path, engine, store_locator, agent, max_concurrent_agents=3,
                            dispatch_poll_interval=1.0)
    assert nc.Config().stale_after_seconds == 60, "the test means the default"
    store = open_test_store(engine, store_locator)
    store.insert_events([make_event(f"c{n % 3}", received_at=nc.utcnow()) for n in range(9)])
    first = processes(config, tmp_path / "first.log")
    wait_for(lambda: len(pids_in(pids)) >= 3, timeout=30, what="three agents running")
    first.kill()
    for pid in pids_in(pids)[:3]:
        wait_for(lambda pid=pid: not _alive(pid), what="agents to die with nightcrier")
    assert store.count_by_status()[nc.INVESTIGATING] >= 1
    second = processes(config, tmp_path / "second.log")
    wait_for(lambda: store.count_by_status()[nc.RESOLVED] == 9, timeout=15,
             what="every incident resolved, well before stale_after_seconds")
    second.proc.send_signal(signal.SIGTERM)
    assert second.exit_status() == 0
    assert "orphaned incident returned to pending" in second.log.read_text()
    store.close()


def _second_sigterm(tmp_path: Path, engine: str, locator: str, processes: Callable[..., Nightcrier],
                    agent: str, count: int, **overrides: Any) -> tuple[nc.StateStore, list[str], Nightcrier]:
    """nightcrier with ``count`` agents running, a long shutdown_timeout, on the test database."""
    config = service_config(tmp_path, engine, locator, agent, shutdown_timeout=120,
                            max_concurrent_agents=count, **overrides)
    store = open_test_store(engine, locator)
    incident_ids = store.insert_events([make_event(f"c{n}", received_at=nc.utcnow()) for n in range(count)])
    process = processes(config, tmp_path / "service.log")
    wait_for(lambda: store.count_by_status()[nc.INVESTIGATING] == count, timeout=60, what="agents running")
    return store, incident_ids, process


def _interrupt_twice(process: Nightcrier) -> None:
    process.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: process.logged("shutdown requested"), what="the first signal to be handled")
    process.proc.send_signal(signal.SIGTERM)


def test_a_second_sigterm_kills_agents_and_returns_incidents_to_pending(
        tmp_path: Path, engine: str, store_locator: str, processes: Callable[..., Nightcrier]) -> None:
    pids = tmp_path / "pids"
    agent = f"sh -c 'echo $$ >> {pids}; trap \"\" TERM; sleep 300' & echo $$ >> {pids}; trap '' TERM; wait"
    store, incident_ids, process = _second_sigterm(tmp_path, engine, store_locator, processes, agent, 3)
    wait_for(lambda: len(pids_in(pids)) == 6, what="every agent process")
    _interrupt_twice(process)
    assert process.exit_status(timeout=5) == 1
    # SIGKILL is sent before nightcrier exits; on a loaded machine a process may take a moment to die.
    wait_for(lambda: not [pid for pid in pids_in(pids) if _alive(pid)], timeout=5,
             what="no agent process to outlive nightcrier")
    counts = store.count_by_status()
    assert (counts[nc.INVESTIGATING], counts[nc.PENDING]) == (0, 3)
    for incident_id in incident_ids:
        incident = store.get_incident(incident_id)
        assert incident is not None and incident.attempts == 0 and incident.claimed_by is None
        (execution,) = store.list_executions(incident_id)
        assert execution.completed_at is not None and execution.error_message == "stopped by a second signal"
    store.close()


@pytest.mark.docker
def test_a_second_sigterm_removes_agent_containers(tmp_path: Path, processes: Callable[..., Nightcrier]
                                                   ) -> None:
    import infra
    client = infra.docker_client()
    infra.require_test_agent_image()
    locator = str(tmp_path / "nightcrier.db")
    store, incident_ids, process = _second_sigterm(tmp_path, "sqlite", locator, processes,
                                          "trap '' TERM; sleep 300", 2, agent_runner="docker",
                                          agent_image=infra.TEST_AGENT_IMAGE)
    try:
        mine = [{"label": f"nightcrier.incident_id={i}"} for i in incident_ids]
        wait_for(lambda: all(client.containers.list(filters=f) for f in mine), timeout=60,
                 what="both containers running")
        _interrupt_twice(process)
        assert process.exit_status(timeout=5) == 1
        assert not [c for f in mine for c in client.containers.list(all=True, filters=f)], \
            "an agent container outlived nightcrier"
        counts = store.count_by_status()
        assert (counts[nc.INVESTIGATING], counts[nc.PENDING]) == (0, 2)
    finally:
        for incident_id in incident_ids:
            for container in client.containers.list(all=True, filters={
                    "label": f"nightcrier.incident_id={incident_id}"}):
                container.remove(force=True)
        client.close()
        store.close()


# -- errors are counted, never lost ------------------------------------------------------------


def test_an_exception_escaping_a_worker_is_logged_and_counted(
        tmp_path: Path, store: nc.StateStore, dispatchers: Callable[..., nc.Dispatcher],
        caplog: pytest.LogCaptureFixture) -> None:
    def broken_callback(_incident: nc.Incident) -> None:
        raise RuntimeError("the notifier callback broke")

    config = engine_config(tmp_path, GOOD_AGENT)
    config.workspace_root = "/proc/nightcrier-cannot-write-here"  # the run fails, then finishing fails
    metrics = nc.Metrics()
    (incident_id,) = store.insert_events([make_event("c1")])
    with caplog.at_level("ERROR", logger="nightcrier"):
        dispatchers(config, metrics=metrics, on_finished=broken_callback)
        wait_for(lambda: metrics.value("worker_errors") == 1, what="the escaped exception to be counted")
    assert store.get_incident(incident_id).status == nc.FAILED  # type: ignore[union-attr]
    assert any(r.getMessage() == "worker error escaped"
               and "notifier callback broke" in r.fields["error"]  # type: ignore[attr-defined]
               for r in caplog.records)


def test_the_permission_checker_survives_a_broken_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "kubectl").write_text("#!/bin/sh\necho yes\n")
    (bindir / "kubectl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    config = engine_config(tmp_path, GOOD_AGENT, permission_check_interval=1)
    broken = config.clusters[0]
    broken.triage.kubeconfig = None  # type: ignore[assignment]  # makes the kubectl argv invalid
    metrics = nc.Metrics()
    checker = nc.PermissionChecker(config, timeout=5, metrics=metrics)
    checker.start()
    try:
        wait_for(lambda: checker.rounds >= 1, timeout=30, what="a round of checks")
        results = checker.results()
        assert results[broken.name]["error"].startswith("permission check failed")
        assert results["c1"].get("can_get_pods") is True, "the other clusters were still checked"
        assert checker.is_alive()
    finally:
        checker.stop()


# -- bounded memory ---------------------------------------------------------------------------


def test_the_slack_queue_drops_the_oldest_beyond_its_bound(tmp_path: Path, store: nc.StateStore,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    config = engine_config(tmp_path, GOOD_AGENT, slack_webhook_url="http://127.0.0.1:9/hook")
    metrics = nc.Metrics()
    (slack,) = nc.notification_channels(config)
    notifier = nc.Notifier(slack, config, store, metrics, queue_limit=3)  # not started: nothing drains
    incidents = [nc.Incident(nc.new_id(), nc.new_id(), nc.RESOLVED, "c1", nc.utcnow(), nc.utcnow())
                 for _ in range(5)]
    with caplog.at_level("WARNING", logger="nightcrier"):
        for incident in incidents:
            notifier.enqueue(incident)
    assert metrics.value("notifications_dropped", "slack") == 2
    queued = [notifier._queue.get_nowait()[0].incident_id for _ in range(notifier._queue.qsize())]
    assert queued == [i.incident_id for i in incidents[2:]], "the newest are kept"
    dropped = "notification queue full, oldest message dropped"
    assert sum(r.getMessage() == dropped for r in caplog.records) == 2


def test_a_report_beyond_report_max_bytes_is_stored_truncated_and_the_file_kept(
        tmp_path: Path, store: nc.StateStore, dispatchers: Callable[..., nc.Dispatcher]) -> None:
    agent = ("{ printf '# Investigation\\n\\n## Root Cause\\nThe disk is full.\\n"
             "**Confidence:** HIGH\\n\\n'; "
             "i=0; while [ $i -lt 400 ]; do printf 'evidence line %03d\\n' $i; i=$((i+1)); done; "
             "} > output/investigation.md")
    (incident_id,) = store.insert_events([make_event("c1")])
    dispatchers(engine_config(tmp_path, agent, report_max_bytes=300))
    incident = terminal(store, incident_id)
    assert incident.status == nc.RESOLVED
    report = store.get_report(incident_id)
    assert report is not None
    path = Path(incident.workspace_path or "") / "output" / "investigation.md"
    full = path.read_text()
    assert len(full.encode()) > 6000, "the file stays whole"
    head, note = report.report_markdown.split("\n\n---\n", 1)
    assert head == full[:300] and "Report truncated" in note and f"{len(full.encode())} bytes" in note
    assert report.summary_text and "The disk is full." in report.summary_text


@pytest.mark.parametrize("data, limit, expected, truncated", [
    (b"short", 100, "short", False),
    ("h\u00e9llo".encode(), 2, "h", True),                # a character cut in half is held back
    (b"\xff\xfeok", 100, "\ufffd\ufffdok", False),        # invalid UTF-8 is replaced, not fatal
    (b"x" * 10, 10, "x" * 10, False),
])
def test_read_report(tmp_path: Path, data: bytes, limit: int, expected: str, truncated: bool) -> None:
    (tmp_path / "output").mkdir(exist_ok=True)
    (tmp_path / "output" / "investigation.md").write_bytes(data)
    text, cut = nc.read_report(str(tmp_path), limit)
    assert cut is truncated
    assert text.split("\n\n---\n", 1)[0] == expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=3000), limit=st.integers(min_value=1, max_value=4000))
def test_read_report_never_exceeds_its_limit_and_keeps_what_it_shows(tmp_path: Path, data: bytes,
                                                                     limit: int) -> None:
    """An agent's report is hostile input: any bytes, any limit."""
    (tmp_path / "output").mkdir(exist_ok=True)
    (tmp_path / "output" / "investigation.md").write_bytes(data)
    text, cut = nc.read_report(str(tmp_path), limit)
    assert cut is (len(data) > limit)
    if not cut:
        assert text == data.decode("utf-8", "replace")
        return
    head, note = text.split("\n\n---\n*Report truncated", 1)
    shown = data[:limit].decode("utf-8", "replace")
    assert shown.startswith(head) and len(shown) - len(head) <= 1, "only a cut character is held back"
    assert f"of {len(data)} bytes" in note


@pytest.fixture
def throwaway_postgres() -> Iterator[Any]:
    """A PostgreSQL server of this test's own, which the test may restart."""
    import infra
    bindir = infra._native_bindir()
    if bindir is None:
        infra.unavailable("no initdb/pg_ctl under /usr/lib/postgresql")
    server = infra._NativeServer(bindir)
    try:
        server.url = server.start()
    except infra._Unavailable as exc:
        infra.unavailable(str(exc))
    yield server
    server.close()


def test_a_database_restart_does_not_make_live_processes_orphans(throwaway_postgres: Any) -> None:
    server = throwaway_postgres
    alive = nc.PostgresStore(server.url, max_open=5, wait=30)
    other = nc.PostgresStore(server.url, max_open=5, wait=30)
    try:
        alive.hold_liveness("alive-instance")
        other.hold_liveness("other-instance")
        (incident_id,) = alive.insert_events([make_event("c1")])
        assert alive.claim_next("alive-instance") is not None
        restarted = server._run(os.path.join(server.bindir, "pg_ctl"), "-D", server.data, "-w", "-t", "30",
                                "-l", server.log, "-m", "fast", "restart")
        assert restarted.returncode == 0, restarted.stderr
        # Every lock died with the server. At once, nobody judges...
        assert other.recover_orphans("other-instance", max_attempts=2) == ([], [])
        # ...and once the server has settled, the live process holds its lock again.
        nc.PostgresStore.LIVENESS_SETTLE_SECONDS, settle = 3.0, nc.PostgresStore.LIVENESS_SETTLE_SECONDS
        try:
            wait_for(lambda: other._may_judge(), timeout=30,  # type: ignore[attr-defined]
                     what="the server to settle")
            assert other.recover_orphans("other-instance", max_attempts=2) == ([], [])
        finally:
            nc.PostgresStore.LIVENESS_SETTLE_SECONDS = settle
        incident = other.get_incident(incident_id)
        assert incident is not None and (incident.status, incident.claimed_by) == (
            nc.INVESTIGATING, "alive-instance")
        assert other._is_alive("alive-instance")  # type: ignore[attr-defined]
    finally:
        alive.close()
        other.close()
