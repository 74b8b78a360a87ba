"""Hostile notifications: whatever a server sends, each one becomes exactly one incident or one
rejected row, on both engines, and neither the listener nor the writer can be wedged by it.

The property tests run a small example budget by default; ``HYPOTHESIS_PROFILE=long`` runs a long one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, stored_payload, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp_testserver import McpTestServer, make_fault

import nightcrier as nc

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=False,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("long", max_examples=2000, deadline=None,
                          suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HOSTILE_PIECES = ["\ud800", "\udfff", "\ud83d", "\x00", "\x01\x1f\x7f", "\u2028\u2029", "\ufeff",
                  "NaN", "Infinity", "\\u0000", "\\", '"', "\U0001F600"]

hostile_text = st.one_of(
    st.text(max_size=30),
    st.lists(st.one_of(st.text(max_size=8), st.sampled_from(HOSTILE_PIECES)), max_size=6).map("".join),
    st.integers(0, 1 << 20).map(lambda n: "m" * n),  # up to 1 MiB
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | hostile_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text, inner, max_size=4),
    max_leaves=12)
DEEP = "__deep__"


def _body(data: Any, **params: Any) -> str:
    return json.dumps({"jsonrpc": "2.0", "method": "notifications/message",
                       "params": {"level": "warning", "logger": "kubernetes/faults", "data": data, **params}})


@st.composite
def good_faults(draw: st.DrawFn) -> dict[str, Any]:
    printable = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=40)
    fault = make_fault(draw(st.sampled_from(["CrashLoop", "PodCrash", "NodeUnhealthy", "JobFailure"])),
                       name=draw(printable), namespace=draw(printable))
    # Each drawn notification is a distinct emission: one faultId and second would be one fault,
    # stored once (copies of an emission are not two incidents).
    fault["faultId"] = uuid.uuid4().hex[:16]
    fault["context"] = draw(st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=300))
    return fault


@st.composite
def notifications(draw: st.DrawFn) -> tuple[str, str, dict[str, Any] | None]:
    """(kind, raw body, the fault when the body must become an intact incident)."""
    kind = draw(st.sampled_from(["good", "hostile", "nonfinite", "wrong_type", "deep", "invalid"]))
    fault = draw(good_faults())
    if kind == "good":
        return kind, _body(fault), fault
    if kind == "hostile":
        for key in draw(st.lists(st.sampled_from(["faultType", "severity", "context", "timestamp",
                                                  "faultId"]), min_size=1, max_size=3)):
            # A suffix keeps a hostile faultId distinct, so no two notifications are one emission.
            fault[key] = draw(hostile_text) + (uuid.uuid4().hex if key == "faultId" else "")
        fault["resource"]["name"] = draw(hostile_text)
        fault[draw(hostile_text)] = draw(json_values)
        return kind, _body(fault), None
    if kind == "nonfinite":
        fault["context"] = {"restarts": draw(st.sampled_from([float("nan"), float("inf"), float("-inf")])),
                            "other": draw(json_values)}
        return kind, _body(fault), None
    if kind == "wrong_type":
        target = draw(st.sampled_from(["data", "params", "faultType", "resource", "severity", "name",
                                       "message", "logger"]))
        value = draw(json_values)
        if target == "data":
            return kind, _body(value), None
        if target == "params":
            message = {"jsonrpc": "2.0", "method": "notifications/message", "params": value}
            return kind, json.dumps(message), None
        if target == "message":
            return kind, json.dumps(value), None
        if target == "logger":
            return kind, _body(fault, logger=value), None
        if target == "name":
            fault["resource"]["name"] = value
        else:
            fault[target] = value
        return kind, _body(fault), None
    if kind == "deep":
        depth = draw(st.integers(1, 5000))
        fault["context"] = DEEP
        return kind, _body(fault).replace(json.dumps(DEEP), "[" * depth + "]" * depth), None
    raw = _body(fault)
    return kind, draw(st.one_of(st.text(max_size=200),
                                st.integers(0, len(raw) - 1).map(lambda n: raw[:n]),
                                st.sampled_from(HOSTILE_PIECES).map(lambda p: raw[:20] + p + raw[20:]))), None


def _writer(store: nc.StateStore, tmp_path: Path) -> nc.IngestWriter:
    """A writer that is not started: tests call its storing path directly, synchronously."""
    metrics = nc.Metrics()
    sink = nc.IngestSink(10, nc.Spool(str(tmp_path / f"spool-{uuid.uuid4().hex[:6]}")), metrics)
    return nc.IngestWriter(store, sink, [], threading.Event(), metrics)


def _rejected_ids(store: nc.StateStore) -> set[str]:
    # Ids only: the bodies may be megabytes each, and the table grows with every example.
    return {str(r["rejected_id"]) for r in store._query("SELECT rejected_id FROM rejected_events")}


def _refused_id(item_id: str) -> str:
    return str(uuid.uuid5(nc._REFUSED_NAMESPACE, item_id))


def test_each_notification_becomes_one_incident_or_one_rejected_row(store: nc.StateStore,
                                                                    tmp_path: Path) -> None:
    writer = _writer(store, tmp_path)
    seen: list[int] = []

    @given(st.lists(notifications(), min_size=1, max_size=6))
    def check(bodies: list[tuple[str, str, dict[str, Any] | None]]) -> None:
        seen.append(len(bodies))
        parsed = [(kind, raw, fault, nc.parse_notification(raw, "prod", nc.utcnow()))
                  for kind, raw, fault in bodies]
        items = [p for *_, p in parsed if isinstance(p, (nc.FaultEvent, nc.RejectedNotification))]
        writer._store_with_retry(items)
        rejected = _rejected_ids(store)
        for kind, raw, fault, item in parsed:
            if item is None:
                assert kind in ("wrong_type", "invalid"), f"only messages not for nightcrier: {raw[:200]!r}"
                continue
            assert not isinstance(item, nc.SubscriptionErrorNotice)
            if isinstance(item, nc.RejectedNotification):
                assert kind != "good"
                assert (item.rejected_id in rejected) != (_refused_id(item.rejected_id) in rejected)
                continue
            incident = store.get_incident(item.incident_id)
            assert (incident is not None) != (_refused_id(item.event_id) in rejected), raw[:300]
            if fault is not None:  # a good fault: stored intact
                assert incident is not None
                assert (incident.fault_type, incident.resource_name, incident.resource_namespace,
                        incident.context, incident.fault_id, incident.timestamp) == (
                    fault["faultType"], fault["resource"]["name"], fault["resource"].get("namespace", ""),
                    fault["context"], fault["faultId"], fault["timestamp"])
                assert stored_payload(store, item.event_id) == json.loads(raw)
        assert writer.metrics.value("dropped", "prod") == 0

    check()
    print(f"{store.engine}: {len(seen)} examples, {sum(seen)} notifications")


def test_the_notorious_five_are_stored_clean(store: nc.StateStore, tmp_path: Path) -> None:
    """The values PostgreSQL or SQLite refuse, each in a fault that must still become an incident."""
    def raw_with(**fields: str) -> str:
        fault = make_fault(name="placeholder", context="ctx", fault_id=uuid.uuid4().hex[:16])
        text = _body(fault)
        for key, value in fields.items():
            original = fault["resource"]["name"] if key == "name" else fault[key]
            assert f'"{key}": {json.dumps(original)}' in text
            text = text.replace(f'"{key}": {json.dumps(original)}', f'"{key}": {value}')
        return text

    bodies = {
        "surrogate-name": raw_with(name='"pod-\\ud800"'),
        "surrogate-context": raw_with(context='"panic \\udfff here"'),
        "nan": raw_with(severity="NaN"),
        "minus-infinity": raw_with(context="{\"restarts\": -Infinity}"),
        "nul": raw_with(context='"before\\u0000after"'),
    }
    events = {}
    for key, raw in bodies.items():
        event = nc.parse_notification(raw, "prod", nc.utcnow())
        assert isinstance(event, nc.FaultEvent), (key, event)
        events[key] = event
    _writer(store, tmp_path)._store_with_retry(list(events.values()))
    stored = {key: store.get_incident(e.incident_id) for key, e in events.items()}
    assert stored["surrogate-name"].resource_name == "pod-\ufffd"  # type: ignore[union-attr]
    assert stored["surrogate-context"].context == "panic \ufffd here"  # type: ignore[union-attr]
    assert stored["nan"].severity == "NaN"  # type: ignore[union-attr]
    assert json.loads(stored["minus-infinity"].context) == {"restarts": "-Infinity"}  # type: ignore[union-attr]
    assert stored["nul"].context == "before\\u0000after"  # type: ignore[union-attr]
    for event in events.values():
        json.dumps(stored_payload(store, event.event_id), allow_nan=False)  # valid, finite JSON


def test_a_refused_item_costs_only_itself(store: nc.StateStore, tmp_path: Path) -> None:
    """Items built without the parse boundary (a bug, a poisoned spool): the batch is retried one by one."""
    writer = _writer(store, tmp_path)
    good = [nc.FaultEvent(cluster="prod", fault_type="CrashLoop", received_at=nc.utcnow(),
                          mcp_payload=json.dumps({"n": n}), resource_name=f"good-{n}") for n in range(20)]
    # Text the store cleans (the surrogate, NaN) does not make it refuse an item; a broken rule does.
    poison = nc.FaultEvent(cluster="prod", fault_type="", received_at=nc.utcnow(),
                           mcp_payload='{"n": NaN}', resource_name="bad-\ud800")
    writer._store_with_retry([*good[:10], poison, *good[10:]])
    assert all(store.get_incident(e.incident_id) for e in good)
    assert store.get_incident(poison.incident_id) is None
    (row,) = [r for r in store.list_rejected() if r.rejected_id == _refused_id(poison.event_id)]
    assert row.reason.startswith("refused by the database") and row.raw_body == '{"n": NaN}'
    assert writer.metrics.value("refused", "prod") == 1
    assert writer.metrics.value("dropped", "prod") == 0


# -- the SSE reader ----------------------------------------------------------------------------------------


@given(st.lists(st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=50)
                .filter(lambda t: t.strip("\r\n") == t and "\r" not in t and "\n" not in t), max_size=8),
       st.sampled_from(["\n", "\r\n", "\r"]), st.data())
def test_sse_events_survive_any_cut(messages: list[str], newline: str, data: st.DataObject) -> None:
    stream = "".join(f": comment{newline}event: message{newline}data: {m}{newline}{newline}"
                     for m in messages).encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert list(nc.sse_events(chunks)) == messages


def test_sse_size_guard_holds_across_chunks() -> None:
    event = b"data: " + b"x" * 5000 + b"\n\n"
    small_events = [event[i:i + 7] for i in range(0, len(event), 7)] * 10  # 50 kB in 7-byte chunks
    assert len(list(nc.sse_events(small_events, limit=6000))) == 10, "many small events are fine"
    big = b"data: " + b"y" * 7000
    with pytest.raises(nc.McpError, match="exceeds 6000 bytes"):
        list(nc.sse_events([big[i:i + 3] for i in range(0, len(big), 3)], limit=6000))
    with pytest.raises(nc.McpError, match="exceeds"):
        list(nc.sse_events([big + b"\n\n"], limit=6000))
    assert list(nc.sse_events([b"data: caf\xc3", b"\xa9 \xff\n\n"])) == ["caf\u00e9 \ufffd"]


# -- a hostile burst through a real server, the service run as users run it ------------------------------


def _storage(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    if engine == "sqlite":
        return {"type": "sqlite", "sqlite_path": str(tmp_path / "db" / "nightcrier.db")}
    return {"type": "postgres", "postgres_connection_string": request.getfixturevalue("postgres_schema_url")}


@pytest.fixture
def server() -> Iterator[McpTestServer]:
    started = McpTestServer().start()
    yield started
    started.stop()


HOSTILE_BURST = [
    '{"faultId":"h1","faultType":"CrashLoop","resource":{"kind":"Pod","name":"hostile-\\ud800"}}',
    '{"faultId":"h2","faultType":"CrashLoop","resource":{"kind":"Pod","name":"hostile-2"},'
    '"context":"x\\udc00y"}',
    '{"faultId":"h3","faultType":"CrashLoop","resource":{"kind":"Pod","name":"hostile-3"},"context":NaN}',
    '{"faultId":"h4","faultType":"CrashLoop","resource":{"kind":"Pod","name":"hostile-4"},'
    '"context":{"v":-Infinity}}',
    '{"faultId":"h5","faultType":"CrashLoop","resource":{"kind":"Pod","name":"hostile-5"},'
    '"context":"a\\u0000b"}',
]
BROKEN_BURST = ['{"jsonrpc":"2.0","method":"notifications/message","params":{"logger":"kubernetes/faults",'
                '"data":{"faultType":"CrashLoop","context":"\\ud800' + "[" * 3000,
                '{"jsonrpc":"2.0","method":"notifications/message","params":{"logger":"kubernetes/faults",'
                '"data":{"faultType":["\\u0000"]}}}']


def test_hostile_burst_larger_than_the_queue_then_sigterm(engine: str, tmp_path: Path, server: McpTestServer,
                                                          request: pytest.FixtureRequest) -> None:
    storage = _storage(engine, tmp_path, request)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "workspace_root": str(tmp_path / "ws"), "health_port": 0, "global_queue_size": 50,
        "shutdown_timeout": 5, "mcp_ping_interval": 1, "mcp_connect_timeout": 1, "mcp_request_timeout": 2,
        "state_storage": storage, "clusters": [{"name": "prod", "mcp": {"endpoint": server.url},
                                                "triage": {"enabled": False}}]}))
    log = (tmp_path / "nightcrier.log").open("w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "nightcrier.py"), "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=log)
    store: nc.StateStore | None = None
    try:
        server.wait_for_subscriptions(1, timeout=30)
        hostile = iter(HOSTILE_BURST)
        for i in range(205):
            if i % 41 == 40:
                server.emit_raw(_body_raw(next(hostile)))
            else:
                server.emit(make_fault(name=f"good-{i}"))
        for raw in BROKEN_BURST:
            server.emit_raw(raw)
        store = (nc.SqliteStore(storage["sqlite_path"]) if engine == "sqlite"
                 else nc.PostgresStore(storage["postgres_connection_string"]))
        found = wait_for(lambda: len(i := store.list_incidents(nc.IncidentFilter(limit=1000))) >= 205 and i,
                         timeout=60, what="205 incidents")
        rejected = wait_for(lambda: len(r := store.list_rejected()) >= 2 and r, what="2 rejections")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5 + 10) == 0, "exits within shutdown_timeout and a few seconds"
        stopped_in = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        if store is not None:
            store.close()
    names = sorted(i.resource_name for i in found)
    assert len(found) == 205 and len(set(names)) == 205
    assert {n for n in names if n.startswith("good-")} == {f"good-{i}" for i in range(205) if i % 41 != 40}
    assert {n for n in names if n.startswith("hostile")} == {"hostile-\ufffd", "hostile-2", "hostile-3",
                                                            "hostile-4", "hostile-5"}
    assert len(rejected) == 2 and all("\x00" not in r.raw_body for r in rejected)
    assert "ingest writer error" not in (tmp_path / "nightcrier.log").read_text()
    print(f"{engine}: stopped {stopped_in:.2f} s after SIGTERM")


def _body_raw(data: str) -> str:
    return ('{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"warning",'
            '"logger":"kubernetes/faults","data":' + data + "}}")


# -- stop has a deadline ----------------------------------------------------------------------------------


def test_writer_stop_has_a_deadline_and_loses_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "nightcrier.db")
    store = nc.SqliteStore(path, busy_timeout=30)
    metrics = nc.Metrics()
    sink = nc.IngestSink(1000, nc.Spool(str(tmp_path / "spool")), metrics)
    writer = nc.IngestWriter(store, sink, [], threading.Event(), metrics)
    events = [nc.FaultEvent(cluster="prod", fault_type="CrashLoop", received_at=nc.utcnow(),
                            mcp_payload="{}", resource_name=f"r-{n}") for n in range(50)]
    import sqlite3
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the writer now waits on the busy timeout, 30 s
    try:
        writer.start()
        for event in events:
            sink.put(event)
        wait_for(lambda: writer._inflight, what="the writer to be stuck in the database")
        started = time.monotonic()
        writer.stop(timeout=1.0)
        assert time.monotonic() - started < 5
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert metrics.value("spooled", "prod") == 50
    assert metrics.value("dropped", "prod") == 0
    again = nc.IngestWriter(store, nc.IngestSink(1000, nc.Spool(str(tmp_path / "spool")), metrics), [],
                            threading.Event(), metrics)
    again.start()
    try:
        wait_for(lambda: not again.spool.has_items(), timeout=30, what="the spool replayed")
    finally:
        again.stop(5)
    wait_for(lambda: len(store.list_incidents(nc.IncidentFilter(limit=100))) == 50, what="50 incidents")
    store.close()



def test_sigterm_exits_promptly_while_the_database_is_locked(tmp_path: Path, server: McpTestServer) -> None:
    """Every thread that might be waiting on SQLite's busy timeout (30 s) -- the writer, the
    dispatcher -- must not hold shutdown past shutdown_timeout and a few seconds."""
    import sqlite3
    db = tmp_path / "db" / "nightcrier.db"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "workspace_root": str(tmp_path / "ws"), "health_port": 0, "shutdown_timeout": 2,
        "mcp_ping_interval": 1, "mcp_connect_timeout": 1, "mcp_request_timeout": 2,
        "dispatch_poll_interval": 0.1, "agent_runner": "process", "agent_command": ["true"],
        "state_storage": {"type": "sqlite", "sqlite_path": str(db)},
        "clusters": [{"name": "prod", "mcp": {"endpoint": server.url},
                      "triage": {"enabled": True, "kubeconfig": str(kubeconfig),
                                 "check_permissions": False}}]}))
    log = (tmp_path / "nightcrier.log").open("w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "nightcrier.py"), "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=log)
    blocker = None
    try:
        server.wait_for_subscriptions(1, timeout=30)
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # readers and writers of nightcrier now wait on the lock
        for i in range(20):
            server.emit(make_fault(name=f"locked-{i}"))
        wait_for(lambda: "spool" in (tmp_path / "nightcrier.log").read_text()
                 or (tmp_path / "ws" / "spool").exists() and any((tmp_path / "ws" / "spool").iterdir()),
                 timeout=60, what="the writer to spool while the database is locked")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(2 + 15) == 0, "exits within shutdown_timeout and a few seconds"
        assert time.monotonic() - started < 2 + 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        if blocker is not None:
            blocker.execute("ROLLBACK")
            blocker.close()
    # Nothing received is lost: what could not be stored is in the spool, replayed by the next start.
    store = nc.SqliteStore(str(db))
    try:
        stored = len(store.list_incidents(nc.IncidentFilter(limit=100)))
    finally:
        store.close()
    spooled = sum(len(f.read_bytes().splitlines()) for f in (tmp_path / "ws" / "spool").glob("*")
                  if f.is_file() and f.name != "quarantine.log")
    assert stored + spooled >= 20
    quarantine = tmp_path / "ws" / "spool" / "quarantine.log"
    assert not quarantine.exists() or not quarantine.read_text(), "a closed store is no verdict on a record"


def test_a_value_too_large_for_an_index_is_refused_not_unavailable(store: nc.StateStore,
                                                                   tmp_path: Path) -> None:
    """PostgreSQL reports an oversized index row as an OperationalError; it must not read as an outage."""
    huge = nc.FaultEvent(cluster="prod", fault_type="m" * 1_000_000, received_at=nc.utcnow(),
                         mcp_payload="{}")
    fine = nc.FaultEvent(cluster="prod", fault_type="CrashLoop", received_at=nc.utcnow(), mcp_payload="{}")
    writer = _writer(store, tmp_path)
    writer._store_with_retry([huge, fine])
    assert store.get_incident(fine.incident_id) is not None
    assert (store.get_incident(huge.incident_id) is not None) != (
        _refused_id(huge.event_id) in _rejected_ids(store))
    assert writer.metrics.value("spooled", "prod") == 0


def test_statements_the_database_refuses_whatever_the_record_keep_the_events(store: nc.StateStore,
                                                                             tmp_path: Path) -> None:
    """A table another program renamed (or any bug in a statement) is no verdict on the records: they
    are kept in the spool, not rejected or dropped, and stored once the database takes them again."""
    metrics = nc.Metrics()
    spool = str(tmp_path / "spool")
    def new_writer() -> nc.IngestWriter:
        return nc.IngestWriter(store, nc.IngestSink(10, nc.Spool(spool), metrics), [], threading.Event(),
                               metrics)

    writer = new_writer()
    events = [nc.FaultEvent(cluster="prod", fault_type="CrashLoop", received_at=nc.utcnow(),
                            mcp_payload=json.dumps({"n": n}), resource_name=f"r-{n}") for n in range(5)]
    store._transaction(lambda run: run("ALTER TABLE fault_events RENAME TO fault_events_away"))
    writer._stopping.set()  # give up waiting at once: what cannot be stored goes to the spool
    writer._store_with_retry(events)
    assert metrics.value("spooled", "prod") == 5
    assert metrics.value("dropped", "prod") == 0 and metrics.value("refused", "prod") == 0
    store._transaction(lambda run: run("ALTER TABLE fault_events_away RENAME TO fault_events"))
    assert not _rejected_ids(store)
    again = new_writer()
    again.start()
    try:
        wait_for(lambda: not again.spool.has_items(), timeout=30, what="the spool replayed")
    finally:
        again.stop(5)
    assert all(store.get_incident(e.incident_id) for e in events)
