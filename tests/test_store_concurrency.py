"""Many threads in several processes claiming from one database, on each engine."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from test_store_contract import make_event

import nightcrier as nc

WORKER = Path(__file__).with_name("claim_worker.py")
INCIDENTS = 2000
CLUSTERS = 20
PROCESSES = 2
THREADS = 16


def test_claims_are_exclusive_across_threads_and_processes(engine: str, store_locator: str,
                                                            store: nc.StateStore, tmp_path: Path
                                                            ) -> None:
    events = [make_event(f"cluster-{i % CLUSTERS}", received_at=nc.utcnow())
              for i in range(INCIDENTS)]
    for start in range(0, INCIDENTS, 500):
        store.insert_events(events[start:start + 500])

    outputs = [tmp_path / f"worker-{n}.json" for n in range(PROCESSES)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), engine, store_locator, str(THREADS),
                               str(out), str(tmp_path), str(PROCESSES)]) for out in outputs]
    for proc in procs:
        assert proc.wait(timeout=240) == 0

    intervals, errors = [], []
    for out in outputs:
        result = json.loads(out.read_text())
        intervals += result["intervals"]
        errors += result["errors"]

    assert errors == [], f"{len(errors)} errors, e.g. {errors[:3]}"
    assert not any("locked" in e for e in errors)
    claimed_ids = [i[0] for i in intervals]
    assert len(claimed_ids) == INCIDENTS and len(set(claimed_ids)) == INCIDENTS, \
        "every incident claimed exactly once"
    assert store.count_by_status()[nc.RESOLVED] == INCIDENTS
    assert len({i[4].split("-")[0] for i in intervals}) == PROCESSES, "both processes took work"

    by_cluster: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for _, cluster, start, end, _ in intervals:
        by_cluster[cluster].append((start, end))
    for cluster, spans in by_cluster.items():
        spans.sort()
        for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False):
            assert end < next_start, f"two incidents of {cluster} were investigated at once"
