"""The spool: replay stores what it can, quarantines what it cannot, and never stops the service."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import wait_for
from mcp_testserver import McpTestServer, make_fault

import nightcrier as nc


@pytest.fixture
def server() -> Iterator[McpTestServer]:
    started = McpTestServer().start()
    yield started
    started.stop()


def _event(name: str, **fields: Any) -> nc.FaultEvent:
    return nc.FaultEvent(cluster="prod", fault_type="CrashLoop", received_at=nc.utcnow(),
                         mcp_payload=json.dumps({"name": name}), resource_name=name, **fields)


def _line(item: nc.FaultEvent) -> bytes:
    return (json.dumps(nc._spool_record(item)) + "\n").encode()


def test_replay_quarantines_bad_lines_stores_the_rest_and_the_service_stays_healthy(
        engine: str, tmp_path: Path, server: McpTestServer, request: pytest.FixtureRequest) -> None:
    spool_dir = tmp_path / "ws" / "spool"
    spool_dir.mkdir(parents=True, mode=0o700)
    good = [_event(f"spooled-{n}") for n in range(30)]
    # Stored by nobody: both engines refuse an empty fault type (the surrogate they would store cleaned).
    poisoned = dataclasses.replace(_event("poisoned-\ud800"), fault_type="")
    (spool_dir / "00000000000000000001.sealed").write_bytes(
        b"".join(_line(e) for e in good[:10])
        + b'{"kind": "event", "cluster": "pr\xff\xfe torn and corrupt\n'
        + b"".join(_line(e) for e in good[10:20])
        + _line(poisoned)
        + b'{"kind": "bogus", "cluster": "prod"}\n')
    (spool_dir / "current.jsonl").write_bytes(b"".join(_line(e) for e in good[20:]))

    if engine == "sqlite":
        storage: dict[str, Any] = {"type": "sqlite", "sqlite_path": str(tmp_path / "db" / "nightcrier.db")}
    else:
        storage = {"type": "postgres", "postgres_connection_string":
                   request.getfixturevalue("postgres_schema_url")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "workspace_root": str(tmp_path / "ws"), "health_port": 0, "mcp_ping_interval": 1,
        "state_storage": storage,
        "clusters": [{"name": "prod", "mcp": {"endpoint": server.url}, "triage": {"enabled": False}}]}))
    config, _ = nc.load_config(str(path), env={})
    service = nc.Service(config).start()
    try:
        wait_for(lambda: not service.sink.spool.has_items(), timeout=30, what="the spool replayed")
        stored = {i.resource_name for i in service.store.list_incidents(nc.IncidentFilter(limit=1000))}
        assert stored == {e.resource_name for e in good}
        rejected = service.store.list_rejected()
        assert len(rejected) == 3
        assert all(r.reason.startswith("spool record quarantined") for r in rejected)
        assert any("poisoned-\\ud800" in r.raw_body for r in rejected), "kept, escaped"

        quarantined = sorted((json.loads(line) for line in
                              (spool_dir / nc.Spool.QUARANTINE).read_text().splitlines()),
                             key=lambda q: q["line"])
        assert [(q["segment"], q["line"]) for q in quarantined] == [
            ("00000000000000000001.sealed", 11), ("00000000000000000001.sealed", 22),
            ("00000000000000000001.sealed", 23)]
        assert "unreadable spool record" in quarantined[0]["reason"]
        assert "\\xff\\xfe" in quarantined[0]["text"]
        refusal = quarantined[1]["reason"]
        assert refusal.startswith("RecordRefused") and "fault_type" in refusal
        assert json.loads(quarantined[1]["text"])["resource_name"] == "poisoned-\ud800"
        assert "bogus" in quarantined[2]["text"]
        assert (os.stat(spool_dir / nc.Spool.QUARANTINE).st_mode & 0o777) == 0o600

        server.wait_for_subscriptions(1, timeout=20)
        server.emit(make_fault(name="after-replay"))
        wait_for(lambda: any(i.resource_name == "after-replay" for i in
                             service.store.list_incidents(nc.IncidentFilter(limit=1000))),
                 what="a new fault stored after the replay")
        assert service.readiness()[0]
        assert service.writer.is_alive()
        assert service.metrics.value("dropped", "prod") == 0
    finally:
        service.stop()


def test_replaying_a_segment_twice_records_each_bad_line_once(tmp_path: Path, store: nc.StateStore) -> None:
    """A replay cut short by an outage replays the segment again: rejections keep their ids."""
    import threading
    spool = nc.Spool(str(tmp_path / "spool"))
    segment = tmp_path / "spool" / "00000000000000000001.sealed"
    segment.write_bytes(_line(_event("ok")) + b"not json\n")
    metrics = nc.Metrics()
    writer = nc.IngestWriter(store, nc.IngestSink(10, spool, metrics), [], threading.Event(), metrics)
    for _ in range(2):
        saved = segment.read_bytes()
        assert writer._replay_segment(str(segment))
        segment.write_bytes(saved)
    assert len(store.list_rejected()) == 1
    assert len(store.list_incidents()) == 1
