"""The StateStore contract: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from collections.abc import Callable

import pytest
from conftest import stored_payload

import nightcrier as nc
from nightcrier import IncidentFilter, StateStore


@pytest.fixture(params=["sqlite", "postgres", "postgres-testcontainers"])
def engine(request: pytest.FixtureRequest) -> str:
    """The contract runs once more against PostgreSQL started through testcontainers."""
    return request.param


_DETECTIONS = itertools.count()


def make_event(cluster: str = "prod", *, received_at: dt.datetime | None = None, **fields: object
               ) -> nc.FaultEvent:
    """A fault event; each one a distinct emission (its timestamp 2 s after the previous one's)
    unless ``timestamp`` is given."""
    detected = dt.datetime(2025, 12, 19, 22, 11, 10, tzinfo=dt.timezone(dt.timedelta(hours=1))) \
        + dt.timedelta(seconds=2 * next(_DETECTIONS))
    payload = {"jsonrpc": "2.0", "method": "notifications/message",
               "params": {"logger": "kubernetes/faults", "level": "warning",
                          "data": {"faultId": "f7a3b2c1d4e5f6a7", "cluster": "kind"}}}
    values: dict[str, object] = {
        "cluster": cluster, "fault_type": "CrashLoop", "severity": "critical",
        "received_at": received_at or nc.utcnow(), "mcp_payload": json.dumps(payload),
        "fault_id": "f7a3b2c1d4e5f6a7", "subscription_id": "sub-0ddc180f", "upstream_cluster": "kind",
        "context": "Container entered CrashLoopBackOff state, restart count: 3",
        "timestamp": detected.isoformat(), "resource_api_version": "v1",
        "resource_kind": "Pod", "resource_name": "api-7f8b9c", "resource_namespace": "payments",
        "resource_uid": "0b0f6c1e-3c7a-4b7e-9d52-8f3c0a1b2c3d"}
    values.update(fields)
    return nc.FaultEvent(**values)  # type: ignore[arg-type]


def at(seconds: float) -> dt.datetime:
    return dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=seconds)


def insert(store: StateStore, *events: nc.FaultEvent) -> list[str]:
    return store.insert_events(list(events))


# -- schema ----------------------------------------------------------------------

def test_schema_is_applied_once_and_reopening_is_a_noop(store_factory: Callable[[], StateStore]
                                                         ) -> None:
    first = store_factory()
    insert(first, make_event())
    second = store_factory()
    third = store_factory()
    assert len(third.list_incidents()) == 1
    assert _migration_versions(second) == list(range(1, nc.latest_schema_version(second.engine) + 1))


def test_database_newer_than_program_is_refused(store: StateStore,
                                                store_factory: Callable[[], StateStore]) -> None:
    _execute(store, "INSERT INTO schema_migrations (version, dirty, applied_at) "
                    "VALUES (999, FALSE, CURRENT_TIMESTAMP)")
    with pytest.raises(nc.SchemaTooNew, match="schema is version 999, newer than this nightcrier"):
        store_factory()


def test_dirty_migration_is_refused(store: StateStore, store_factory: Callable[[], StateStore]) -> None:
    _execute(store, "UPDATE schema_migrations SET dirty = TRUE")
    with pytest.raises(nc.StoreError, match="marked dirty"):
        store_factory()


def test_schema_allows_one_investigating_incident_per_cluster(store: StateStore) -> None:
    a, b = insert(store, make_event("prod"), make_event("prod"))
    _execute(store, f"UPDATE incidents SET status = 'investigating' WHERE incident_id = '{a}'")
    with pytest.raises(Exception, match="(?i)unique"):
        _execute(store, f"UPDATE incidents SET status = 'investigating' WHERE incident_id = '{b}'")


@pytest.mark.parametrize("column, value", [("status", "'exploded'"), ("cluster", "''")])
def test_schema_checks_status_and_cluster(store: StateStore, column: str, value: str) -> None:
    (incident_id,) = insert(store, make_event())
    with pytest.raises(Exception, match="(?i)check"):
        _execute(store, f"UPDATE incidents SET {column} = {value} WHERE incident_id = '{incident_id}'")


# -- insert_events -----------------------------------------------------------------

def test_insert_events_stores_event_and_incident(store: StateStore) -> None:
    received = at(5)
    event = make_event("prod", received_at=received)
    (incident_id,) = store.insert_events([event])
    assert incident_id == event.incident_id
    incident = store.get_incident(incident_id)
    assert incident is not None
    assert incident.status == nc.PENDING
    assert incident.created_at == received, "created_at is the receive time, not the write time"
    assert incident.event_id == event.event_id
    assert (incident.cluster, incident.fault_id, incident.fault_type, incident.severity) == (
        "prod", "f7a3b2c1d4e5f6a7", "CrashLoop", "critical")
    assert (incident.resource_kind, incident.resource_name, incident.resource_namespace) == (
        "Pod", "api-7f8b9c", "payments")
    assert incident.context.startswith("Container entered CrashLoopBackOff")
    assert incident.attempts == 0 and incident.claimed_by is None
    stored = _query(store, "SELECT mcp_payload, upstream_cluster FROM fault_events "
                           f"WHERE event_id = '{event.event_id}'")[0]
    payload = stored[0] if isinstance(stored[0], dict) else json.loads(stored[0])
    assert payload["params"]["data"]["faultId"] == "f7a3b2c1d4e5f6a7"
    assert stored[1] == "kind"


def test_insert_events_returns_ids_in_order_and_marks_skipped_clusters(store: StateStore) -> None:
    events = [make_event("prod"), make_event("lab"), make_event("prod")]
    ids = store.insert_events(events, skipped_clusters=["lab"])
    assert ids == [e.incident_id for e in events]
    assert [store.get_incident(i).status for i in ids] == [  # type: ignore[union-attr]
        nc.PENDING, nc.SKIPPED, nc.PENDING]


def test_insert_events_is_idempotent_per_event_id(store: StateStore) -> None:
    events = [make_event(), make_event()]
    store.insert_events(events)
    store.insert_events(events)
    assert len(store.list_incidents()) == 2
    assert _query(store, "SELECT COUNT(*) FROM fault_events")[0][0] == 2


def test_repeated_fault_ids_are_separate_incidents(store: StateStore) -> None:
    insert(store, make_event(fault_id="same"), make_event(fault_id="same"))
    assert [i.fault_id for i in store.list_incidents()] == ["same", "same"]


def test_insert_events_batch_is_atomic(store: StateStore) -> None:
    good = make_event("prod")
    bad = make_event("")  # violates the non-empty cluster check
    with pytest.raises(nc.StoreError):
        store.insert_events([good, bad])
    assert store.list_incidents() == []
    assert store.get_incident(good.incident_id) is None


def test_insert_events_of_nothing(store: StateStore) -> None:
    assert store.insert_events([]) == []


def test_large_and_unusual_text_round_trips(store: StateStore) -> None:
    context = "ünïcødé ☸ " + "x" * (5 * 1024 * 1024)
    (incident_id,) = insert(store, make_event(context=context))
    assert store.get_incident(incident_id).context == context  # type: ignore[union-attr]


# One policy for what neither engine may hold, on both: a NUL is stored as the six characters
# \u0000 -- in text and inside JSON alike --, and text that already held those six is kept as it is.
NUL_TEXT = "before\x00after, and a literal \\u0000 too"
NUL_STORED = "before\\u0000after, and a literal \\u0000 too"


def test_nul_is_stored_as_its_escape_and_a_literal_escape_as_itself(store: StateStore) -> None:
    event = make_event("nul\x00cluster", context=NUL_TEXT, mcp_payload=json.dumps({"data": NUL_TEXT}))
    (incident_id,) = insert(store, event)
    incident = store.get_incident(incident_id)
    assert incident is not None and (incident.cluster, incident.context) == ("nul\\u0000cluster", NUL_STORED)
    assert stored_payload(store, event.event_id) == {"data": NUL_STORED}
    # A query holding a NUL finds what was stored for it, on both engines alike.
    found = store.list_incidents(IncidentFilter(cluster="nul\x00cluster"))
    assert [i.incident_id for i in found] == [incident_id]

    claimed = store.claim_next("w")
    assert claimed is not None and claimed.incident_id == incident_id
    execution = store.start_execution(incident_id, "agent:1", {"stdout": "/ws/\x00/out.log"})
    store.finish_execution(execution.execution_id, 1, NUL_TEXT, {"stdout": "/ws/\x00/out.log"})
    store.record_report(nc.TriageReport(
        nc.new_id(), incident_id, execution.execution_id, nc.utcnow(), report_markdown=NUL_TEXT,
        structured_data=json.dumps({"root_cause": NUL_TEXT, "confidence": float("nan")})))
    (stored,) = store.list_executions(incident_id)
    assert (stored.error_message, stored.log_paths) == (NUL_STORED, {"stdout": "/ws/\\u0000/out.log"})
    report = store.get_report(incident_id)
    assert report is not None and report.report_markdown == NUL_STORED
    assert json.loads(report.structured_data or "") == {"root_cause": NUL_STORED, "confidence": "NaN"}


# -- claim_next ---------------------------------------------------------------------

def test_claim_takes_oldest_pending_and_marks_it(store: StateStore) -> None:
    newer = make_event("a", received_at=at(20))
    older = make_event("b", received_at=at(10))
    insert(store, newer, older)
    before = nc.utcnow()
    claimed = store.claim_next("worker-1")
    assert claimed is not None and claimed.incident_id == older.incident_id
    assert claimed.status == nc.INVESTIGATING
    assert claimed.claimed_by == "worker-1"
    assert claimed.attempts == 1
    assert claimed.heartbeat_at is not None and claimed.heartbeat_at >= before - dt.timedelta(seconds=1)
    assert claimed.started_at is not None
    assert store.get_incident(older.incident_id).status == nc.INVESTIGATING  # type: ignore[union-attr]


def test_claim_skips_clusters_with_an_investigating_incident(store: StateStore) -> None:
    first = make_event("busy", received_at=at(1))
    second = make_event("busy", received_at=at(2))
    other = make_event("free", received_at=at(3))
    insert(store, first, second, other)
    assert store.claim_next("w").incident_id == first.incident_id  # type: ignore[union-attr]
    assert store.claim_next("w").incident_id == other.incident_id  # type: ignore[union-attr]
    assert store.claim_next("w") is None


def test_claim_honours_excluded_clusters(store: StateStore) -> None:
    insert(store, make_event("a", received_at=at(1)), make_event("b", received_at=at(2)))
    claimed = store.claim_next("w", exclude_clusters=["a"])
    assert claimed is not None and claimed.cluster == "b"
    assert store.claim_next("w", exclude_clusters=["a"]) is None


def test_claim_ignores_skipped_and_finished_incidents(store: StateStore) -> None:
    store.insert_events([make_event("lab")], skipped_clusters=["lab"])
    assert store.claim_next("w") is None


def test_claim_on_empty_queue(store: StateStore) -> None:
    assert store.claim_next("w") is None


def test_claim_is_fifo_within_a_cluster_after_completion(store: StateStore) -> None:
    events = [make_event("c", received_at=at(i)) for i in (3, 1, 2)]
    insert(store, *events)
    order = []
    while (claimed := store.claim_next("w")) is not None:
        order.append(claimed.created_at)
        assert store.complete(claimed.incident_id, "w", nc.RESOLVED, 0, None)
    assert order == [at(1), at(2), at(3)]


# -- heartbeat, complete, release ------------------------------------------------------

def test_heartbeat_refreshes_only_the_owners_incidents(store: StateStore) -> None:
    insert(store, make_event("a"), make_event("b"))
    mine = store.claim_next("mine")
    theirs = store.claim_next("theirs")
    assert mine and theirs
    assert store.heartbeat("mine", [mine.incident_id, theirs.incident_id]) == 1
    assert store.heartbeat("mine", []) == 0
    refreshed = store.get_incident(mine.incident_id)
    assert refreshed and refreshed.heartbeat_at and refreshed.heartbeat_at >= mine.heartbeat_at  # type: ignore[operator]


@pytest.mark.parametrize("status, exit_code, reason", [
    (nc.RESOLVED, 0, None),
    (nc.AGENT_FAILED, 0, "investigation.md too small: 12 bytes (expected >= 100)"),
    (nc.FAILED, None, "image not found"),
])
def test_complete_sets_final_status_and_frees_the_cluster(store: StateStore, status: str,
                                                          exit_code: int | None, reason: str | None
                                                          ) -> None:
    insert(store, make_event("c", received_at=at(1)), make_event("c", received_at=at(2)))
    claimed = store.claim_next("w")
    assert claimed is not None
    assert store.complete(claimed.incident_id, "w", status, exit_code, reason)
    done = store.get_incident(claimed.incident_id)
    assert done is not None
    assert (done.status, done.exit_code, done.failure_reason) == (status, exit_code, reason)
    assert done.completed_at is not None and done.claimed_by is None
    assert store.claim_next("w") is not None, "the cluster is free again"


def test_complete_refuses_a_non_final_status(store: StateStore) -> None:
    insert(store, make_event())
    claimed = store.claim_next("w")
    with pytest.raises(ValueError):
        store.complete(claimed.incident_id, "w", nc.PENDING, None, None)  # type: ignore[union-attr]


def test_complete_requires_ownership(store: StateStore) -> None:
    insert(store, make_event())
    claimed = store.claim_next("w")
    assert claimed is not None
    assert not store.complete(claimed.incident_id, "someone-else", nc.RESOLVED, 0, None)
    assert store.get_incident(claimed.incident_id).status == nc.INVESTIGATING  # type: ignore[union-attr]
    assert store.complete(claimed.incident_id, "w", nc.RESOLVED, 0, None)
    assert not store.complete(claimed.incident_id, "w", nc.FAILED, 1, "late"), "already final"


def test_finish_run_writes_run_and_verdict_only_while_the_claim_holds(store: StateStore) -> None:
    insert(store, make_event("a"), make_event("b"))
    logs = {"agent-stdout.log": "/ws/logs/agent-stdout.log"}
    mine, theirs = store.claim_next("w"), store.claim_next("w")
    assert mine is not None and theirs is not None
    runs = {i.incident_id: store.start_execution(i.incident_id, "img", {}) for i in (mine, theirs)}

    def outcome(incident: nc.Incident, status: str = nc.RESOLVED) -> nc.RunOutcome:
        execution_id = runs[incident.incident_id].execution_id
        report = nc.TriageReport(nc.new_id(), incident.incident_id, execution_id, nc.utcnow(), "# r")
        return nc.RunOutcome(execution_id, 0, None, logs, status, None, report)

    with pytest.raises(ValueError):
        store.finish_run(mine.incident_id, "w", outcome(mine, nc.INVESTIGATING))
    assert store.finish_run(mine.incident_id, "w", outcome(mine))
    (execution,) = store.list_executions(mine.incident_id)
    assert (execution.exit_code, execution.error_message, execution.log_paths) == (0, None, logs)
    assert store.get_incident(mine.incident_id).status == nc.RESOLVED  # type: ignore[union-attr]
    assert store.get_report(mine.incident_id).execution_id == execution.execution_id  # type: ignore[union-attr]

    assert not store.finish_run(theirs.incident_id, "someone-else", outcome(theirs))
    (execution,) = store.list_executions(theirs.incident_id)
    assert execution.completed_at is not None and execution.error_message == nc.CLAIM_LOST_REASON
    assert store.get_incident(theirs.incident_id).status == nc.INVESTIGATING  # type: ignore[union-attr]
    assert store.get_report(theirs.incident_id) is None
    assert store.claim_next("w") is None, "the resolved incident's cluster is free, nothing else pending"


def test_release_returns_to_pending_without_counting_the_attempt(store: StateStore) -> None:
    insert(store, make_event())
    claimed = store.claim_next("w")
    assert claimed is not None
    assert not store.release(claimed.incident_id, "other", "nope")
    assert store.release(claimed.incident_id, "w", "docker engine unreachable")
    released = store.get_incident(claimed.incident_id)
    assert released is not None
    assert (released.status, released.attempts, released.claimed_by) == (nc.PENDING, 0, None)
    assert released.failure_reason == "docker engine unreachable"
    again = store.claim_next("w")
    assert again is not None and again.incident_id == claimed.incident_id and again.attempts == 1


# -- recover_stale ---------------------------------------------------------------------

def test_recover_stale_requeues_then_fails_after_max_attempts(store: StateStore) -> None:
    insert(store, make_event("c"))
    claimed = store.claim_next("dead-worker")
    assert claimed is not None
    execution = store.start_execution(claimed.incident_id, "img", {})
    future = nc.utcnow() + dt.timedelta(seconds=5)
    requeued, failed = store.recover_stale(future, max_attempts=2)
    assert (requeued, failed) == ([claimed.incident_id], [])
    back = store.get_incident(claimed.incident_id)
    assert back is not None and back.status == nc.PENDING and back.claimed_by is None
    assert "dead-worker" in (back.failure_reason or "")
    assert store.list_executions(claimed.incident_id)[0].completed_at is not None
    assert execution.completed_at is None

    again = store.claim_next("dead-worker-2")
    assert again is not None and again.attempts == 2
    requeued, failed = store.recover_stale(nc.utcnow() + dt.timedelta(seconds=5), max_attempts=2)
    assert (requeued, failed) == ([], [claimed.incident_id])
    final = store.get_incident(claimed.incident_id)
    assert final is not None and final.status == nc.FAILED and final.failure_reason == "orphaned"


def test_recover_stale_leaves_live_claims_alone(store: StateStore) -> None:
    insert(store, make_event())
    claimed = store.claim_next("alive")
    assert claimed is not None
    assert store.recover_stale(nc.utcnow() - dt.timedelta(seconds=60), max_attempts=2) == ([], [])
    assert store.get_incident(claimed.incident_id).status == nc.INVESTIGATING  # type: ignore[union-attr]


# -- executions, reports, workspace ---------------------------------------------------

def test_executions_and_reports_round_trip(store: StateStore) -> None:
    insert(store, make_event())
    claimed = store.claim_next("w")
    assert claimed is not None
    logs = {"agent-stdout.log": "/ws/logs/agent-stdout.log"}
    execution = store.start_execution(claimed.incident_id, "nightcrier-agent:latest", logs)
    store.finish_execution(execution.execution_id, 3, "agent exited with code 3", logs)
    store.set_workspace(claimed.incident_id, "/ws")
    report = nc.TriageReport(nc.new_id(), claimed.incident_id, execution.execution_id, nc.utcnow(),
                             "# Report\n\nroot cause", "<h1>Report</h1>", "root cause (HIGH)",
                             "/ws/output/investigation.md", "filesystem")
    store.record_report(report)
    (stored,) = store.list_executions(claimed.incident_id)
    assert (stored.exit_code, stored.error_message, stored.log_paths) == (3, "agent exited with code 3",
                                                                          logs)
    assert stored.agent_image == "nightcrier-agent:latest" and stored.completed_at is not None
    got = store.get_report(claimed.incident_id)
    assert got is not None
    assert (got.report_markdown, got.report_html, got.summary_text, got.raw_report_path,
            got.storage_type) == (report.report_markdown, report.report_html, report.summary_text,
                                  report.raw_report_path, "filesystem")
    assert store.get_incident(claimed.incident_id).workspace_path == "/ws"  # type: ignore[union-attr]


def test_get_report_and_executions_of_unknown_incident(store: StateStore) -> None:
    assert store.get_report(nc.new_id()) is None
    assert store.list_executions(nc.new_id()) == []


# -- reading -------------------------------------------------------------------------

@pytest.mark.parametrize("incident_id", ["", "not-a-uuid", "00000000-0000-0000-0000-000000000000"])
def test_get_incident_of_unknown_id_is_none(store: StateStore, incident_id: str) -> None:
    assert store.get_incident(incident_id) is None


def test_list_incidents_filters_and_pages(store: StateStore) -> None:
    events = [
        make_event("a", received_at=at(1), resource_namespace="ns1", severity="warning",
                   fault_type="PodCrash"),
        make_event("a", received_at=at(2), resource_namespace="ns2"),
        make_event("b", received_at=at(3), resource_namespace="ns1"),
        make_event("lab", received_at=at(4)),
    ]
    store.insert_events(events, skipped_clusters=["lab"])
    ids = [e.incident_id for e in events]

    def listed(**criteria: object) -> list[str]:
        return [i.incident_id for i in store.list_incidents(IncidentFilter(**criteria))]  # type: ignore[arg-type]

    assert listed() == ids[::-1], "newest first"
    assert listed(cluster="a") == [ids[1], ids[0]]
    assert listed(namespace="ns1") == [ids[2], ids[0]]
    assert listed(severity="warning") == [ids[0]]
    assert listed(fault_type="PodCrash") == [ids[0]]
    assert listed(statuses=(nc.SKIPPED,)) == [ids[3]]
    assert listed(statuses=(nc.PENDING, nc.SKIPPED), cluster="lab") == [ids[3]]
    assert listed(since=at(2)) == [ids[3], ids[2], ids[1]]
    assert listed(limit=2) == [ids[3], ids[2]]
    assert listed(limit=2, offset=2) == [ids[1], ids[0]]


def test_timestamps_are_aware_utc(store: StateStore) -> None:
    insert(store, make_event(received_at=dt.datetime(2026, 5, 1, 12, 0,
                                                     tzinfo=dt.timezone(dt.timedelta(hours=2)))))
    (incident,) = store.list_incidents()
    assert incident.created_at == dt.datetime(2026, 5, 1, 10, 0, tzinfo=dt.timezone.utc)
    assert incident.created_at.utcoffset() == dt.timedelta(0)
    assert incident.updated_at.tzinfo is not None


def test_count_by_status_lists_every_status(store: StateStore) -> None:
    store.insert_events([make_event("a"), make_event("a"), make_event("lab")], skipped_clusters=["lab"])
    store.claim_next("w")
    counts = store.count_by_status()
    assert counts == {nc.PENDING: 1, nc.INVESTIGATING: 1, nc.RESOLVED: 0, nc.FAILED: 0,
                      nc.AGENT_FAILED: 0, nc.SKIPPED: 1}


# -- rejected notifications ---------------------------------------------------------------

def test_rejected_notifications_are_kept_with_reason_and_body(store: StateStore) -> None:
    big = "{" + "x" * (5 * 1024 * 1024)
    rejected = [nc.RejectedNotification("prod", "not JSON", "garbage\x00", received_at=at(1)),
                nc.RejectedNotification("prod", "context too large", big, received_at=at(2))]
    store.insert_events([], rejected=rejected)
    store.insert_events([], rejected=rejected)
    newest, oldest = store.list_rejected()
    assert (newest.reason, len(newest.raw_body)) == ("context too large", len(big))
    assert oldest.reason == "not JSON" and oldest.raw_body.startswith("garbage")
    assert oldest.received_at == at(1)


def test_events_rejections_and_gaps_share_one_transaction(store: StateStore) -> None:
    gap = nc.SubscriptionGap("prod", at(1), "server restarted", ended_at=at(3))
    rejected = nc.RejectedNotification("prod", "not JSON", "garbage")
    with pytest.raises(nc.StoreError):
        store.insert_events([make_event(""), make_event()], rejected=[rejected], gaps=[gap])
    assert store.list_rejected() == [] and store.list_gaps() == []
    store.insert_events([make_event()], rejected=[rejected], gaps=[gap])
    store.insert_events([], gaps=[gap, nc.SubscriptionGap("lab", at(5), "subscription_error")])
    assert [g.gap_id for g in store.list_gaps("prod")] == [gap.gap_id]
    (stored,) = store.list_gaps("prod")
    assert (stored.started_at, stored.ended_at, stored.reason) == (at(1), at(3), "server restarted")
    assert [g.cluster for g in store.list_gaps()] == ["lab", "prod"]
    assert store.list_gaps("lab")[0].ended_at is None


# -- health and lifecycle ---------------------------------------------------------------------

def test_ping_answers_and_close_releases(store_factory: Callable[[], StateStore]) -> None:
    store = store_factory()
    store.ping()
    store.close()
    with pytest.raises(nc.StoreError):
        store.ping()


def test_a_second_store_sees_the_first_ones_writes(store_factory: Callable[[], StateStore]) -> None:
    writer, reader = store_factory(), store_factory()
    (incident_id,) = insert(writer, make_event())
    assert reader.get_incident(incident_id) is not None
    claimed = reader.claim_next("reader")
    assert claimed is not None and writer.claim_next("writer") is None


@pytest.mark.parametrize("sql", ["SELEC 1", "SELECT * FROM no_such_table",
                                 "SELECT no_such_column FROM incidents"])
def test_a_wrong_statement_is_a_store_error_not_an_outage(store: StateStore, sql: str) -> None:
    """Retrying a statement the database cannot run never helps: it must not look like an outage."""
    with pytest.raises(nc.StoreError) as raised:
        _query(store, sql)
    assert not isinstance(raised.value, nc.StoreUnavailable)
    with pytest.raises(nc.StoreError) as raised:
        _execute(store, "UPDATE no_such_table SET x = 1")
    assert not isinstance(raised.value, nc.StoreUnavailable)
    store.ping()


# -- helpers ---------------------------------------------------------------------------------

def _migration_versions(store: StateStore) -> list[int]:
    return [row[0] for row in _query(store, "SELECT version FROM schema_migrations ORDER BY version")]


def _query(store: StateStore, sql: str) -> list[tuple]:
    if isinstance(store, nc.SqliteStore):
        return [tuple(r) for r in store._read(sql)]
    return [tuple(r.values()) for r in store._select(sql)]  # type: ignore[attr-defined]


def _execute(store: StateStore, sql: str) -> None:
    if isinstance(store, nc.SqliteStore):
        store._write_fn(lambda conn: conn.execute(sql.replace("TRUE", "1").replace("FALSE", "0")))
    else:
        store._tx(lambda cur: cur.execute(sql))  # type: ignore[attr-defined]
