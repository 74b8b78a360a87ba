"""Which incidents get an agent: repeats, severity, staleness, backlog -- on both engines."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from test_store_contract import make_event

import nightcrier as nc

WORKER = Path(__file__).with_name("intake_worker.py")


def _rules(store: nc.StateStore, **rules: object) -> nc.StateStore:
    store.rules = nc.TriageRules(**rules)  # type: ignore[arg-type]
    return store


def _later(seconds: float) -> dt.datetime:
    return nc.utcnow() + dt.timedelta(seconds=seconds)


# -- repeats -----------------------------------------------------------------------

def test_repeat_of_a_pending_incident_is_skipped_and_counted_on_the_first(store: nc.StateStore) -> None:
    _rules(store, dedup_window=300)
    first, = store.insert_events([make_event(fault_id="f1", received_at=_later(0))])
    # a repeat in a later batch, and two in one batch
    second, = store.insert_events([make_event(fault_id="f1", received_at=_later(60))])
    third, fourth = store.insert_events([make_event(fault_id="f1", received_at=_later(120)),
                                         make_event(fault_id="f1", received_at=_later(180))])
    for repeat in (second, third, fourth):
        incident = store.get_incident(repeat)
        assert incident is not None and incident.status == nc.SKIPPED
        assert incident.duplicate_of == first
        assert (incident.skip_reason or "").startswith(f"duplicate: repeats {first}")
    original = store.get_incident(first)
    assert original is not None and original.status == nc.PENDING
    assert original.recurrences == 3
    assert original.last_recurred_at == store.get_incident(fourth).created_at  # type: ignore[union-attr]


def test_repeats_in_one_batch_count_on_the_first_of_the_batch(store: nc.StateStore) -> None:
    _rules(store, dedup_window=300)
    ids = store.insert_events([make_event(fault_id="f1", received_at=_later(n)) for n in range(3)])
    incidents = [store.get_incident(i) for i in ids]
    assert [i.status for i in incidents] == [nc.PENDING, nc.SKIPPED, nc.SKIPPED]  # type: ignore[union-attr]
    assert incidents[0].recurrences == 2  # type: ignore[union-attr]
    assert {i.duplicate_of for i in incidents[1:]} == {ids[0]}  # type: ignore[union-attr]


def test_other_clusters_empty_fault_ids_and_a_zero_window_are_never_repeats(store: nc.StateStore) -> None:
    _rules(store, dedup_window=300)
    ids = store.insert_events([make_event("a", fault_id="f1"), make_event("b", fault_id="f1"),
                               make_event("a", fault_id=""), make_event("a", fault_id="")])
    _rules(store, dedup_window=0)
    ids += store.insert_events([make_event("a", fault_id="f1")])
    assert [store.get_incident(i).status for i in ids] == [nc.PENDING] * 5  # type: ignore[union-attr]


def test_a_repeat_within_the_window_after_completion_is_skipped_and_one_after_it_is_triaged(
        store: nc.StateStore) -> None:
    _rules(store, dedup_window=300)
    first, = store.insert_events([make_event(fault_id="f1")])
    claimed = store.claim_next("w")
    assert claimed is not None and claimed.incident_id == first
    assert store.complete(first, "w", nc.RESOLVED, 0, None)
    # re-emitted every minute for ten minutes: each is within the window of the last recurrence
    repeats = [store.insert_events([make_event(fault_id="f1", received_at=_later(60 * n))])[0]
               for n in range(1, 11)]
    assert {store.get_incident(i).duplicate_of for i in repeats} == {first}  # type: ignore[union-attr]
    # quiet for longer than the window: a new condition, triaged
    fresh, = store.insert_events([make_event(fault_id="f1", received_at=_later(600 + 301))])
    incident = store.get_incident(fresh)
    assert incident is not None and incident.status == nc.PENDING and incident.duplicate_of is None
    assert store.get_incident(first).recurrences == 10  # type: ignore[union-attr]


def test_two_replicas_racing_on_one_fault_triage_it_once(engine: str, store_locator: str,
                                                         store: nc.StateStore, tmp_path: Path) -> None:
    conditions, processes = 150, 2
    store.insert_events([])  # schema in place before the processes race
    procs = [subprocess.Popen([sys.executable, str(WORKER), engine, store_locator, str(conditions),
                               str(tmp_path), str(processes)]) for _ in range(processes)]
    for proc in procs:
        assert proc.wait(timeout=240) == 0
    incidents = store.list_incidents(nc.IncidentFilter(limit=10 * conditions))
    assert len(incidents) == conditions * processes
    triaged = Counter(i.fault_id for i in incidents if i.status == nc.PENDING)
    assert triaged == Counter({f"cond-{n}": 1 for n in range(conditions)}), \
        "each fault condition has exactly one incident to triage"
    assert all(i.duplicate_of for i in incidents if i.status == nc.SKIPPED)


# -- severity ------------------------------------------------------------------------

def test_faults_below_the_severity_threshold_are_skipped_with_their_severity(store: nc.StateStore) -> None:
    _rules(store, severity_threshold="warning")
    ids = store.insert_events([make_event(severity=s, fault_id="")
                               for s in ("info", "DEBUG", "warning", "Critical", "error", "", "odd")])
    incidents = [store.get_incident(i) for i in ids]
    assert [i.status for i in incidents] == [nc.SKIPPED] * 2 + [nc.PENDING] * 5  # type: ignore[union-attr]
    assert incidents[0].skip_reason == "severity: info is below the threshold WARNING"  # type: ignore[union-attr]


# -- staleness, backlog, triage off -----------------------------------------------------

def test_an_incident_pending_past_the_ttl_is_skipped_as_stale_when_its_turn_comes(
        store: nc.StateStore) -> None:
    _rules(store, event_ttl=60)
    old, = store.insert_events([make_event(fault_id="", received_at=_later(-120))])
    new, = store.insert_events([make_event(fault_id="", received_at=_later(-1))])
    claimed = store.claim_next("w")
    assert claimed is not None and claimed.incident_id == new
    stale = store.get_incident(old)
    assert stale is not None and stale.status == nc.SKIPPED and stale.completed_at is not None
    assert stale.skip_reason == "stale: pending longer than event_ttl_seconds 60"


def test_a_full_cluster_backlog_skips_the_next_incident(store: nc.StateStore) -> None:
    _rules(store, cluster_queue_size=2)
    ids = store.insert_events([make_event("a", fault_id="") for _ in range(3)]
                              + [make_event("b", fault_id="")])
    ids += store.insert_events([make_event("a", fault_id="")])
    statuses = [store.get_incident(i).status for i in ids]  # type: ignore[union-attr]
    assert statuses == [nc.PENDING, nc.PENDING, nc.SKIPPED, nc.PENDING, nc.SKIPPED]
    assert store.get_incident(ids[2]).skip_reason.startswith("backlog: 2 incidents of cluster a")  # type: ignore


def test_incidents_of_a_cluster_with_triage_off_say_so(store: nc.StateStore) -> None:
    incident_id, = store.insert_events([make_event("quiet")], skipped_clusters=["quiet"])
    incident = store.get_incident(incident_id)
    assert incident is not None and incident.status == nc.SKIPPED
    assert incident.skip_reason == "disabled: triage is off for cluster quiet"


def test_skipped_incidents_are_never_claimed(store: nc.StateStore,
                                             store_factory: Callable[[], nc.StateStore]) -> None:
    _rules(store, dedup_window=300, severity_threshold="error")
    store.insert_events([make_event(severity="info", fault_id="x"), make_event(fault_id="f1"),
                         make_event(fault_id="f1")])
    assert store.claim_next("w") is not None
    assert store.claim_next("w2", exclude_clusters=()) is None


def test_skipped_incidents_are_counted_by_the_cause_their_reason_begins_with(store: nc.StateStore) -> None:
    _rules(store, dedup_window=300, severity_threshold="error")
    store.insert_events([make_event(severity="info", fault_id="a"), make_event(fault_id="f1"),
                         make_event(fault_id="f1"), make_event(fault_id="f1"), make_event("quiet")],
                        skipped_clusters=["quiet"])
    assert store.count_skipped_by_cause() == {"duplicate": 2, "severity": 1, "stale": 0, "backlog": 0,
                                              "budget": 0, "disabled": 1}


# -- schema -----------------------------------------------------------------------------

def test_a_database_of_version_4_gains_the_columns_and_its_skipped_incidents_a_reason(
        store_factory: Callable[[], nc.StateStore], monkeypatch: pytest.MonkeyPatch) -> None:
    every_version = nc.read_schema
    monkeypatch.setattr(nc, "read_schema", lambda engine: [m for m in every_version(engine) if m[0] <= 4])
    old = store_factory()
    event = make_event("quiet")
    old._execute("INSERT INTO fault_events (event_id, cluster, received_at, fault_type, mcp_payload) "  # type: ignore
                 "VALUES (?, 'quiet', ?, 'CrashLoop', '{}')", (event.event_id, nc.utcnow()))
    old._execute("INSERT INTO incidents (incident_id, event_id, status, cluster, created_at, updated_at, "  # type: ignore
                 "fault_type) VALUES (?, ?, 'skipped', 'quiet', ?, ?, 'CrashLoop')",
                 (event.incident_id, event.event_id, nc.utcnow(), nc.utcnow()))
    monkeypatch.undo()
    incident = store_factory().get_incident(event.incident_id)
    assert incident is not None and incident.skip_reason == "disabled: triage is off for the cluster"
    assert (incident.duplicate_of, incident.recurrences, incident.last_recurred_at) == (None, 0, None)
