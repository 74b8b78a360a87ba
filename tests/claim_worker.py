"""A process that claims and completes incidents with many threads, for the concurrency tests.

Usage: python claim_worker.py ENGINE LOCATOR THREADS OUTPUT_JSON BARRIER_DIR PROCESSES

Each thread claims, holds the incident for a moment, and completes it,
recording the interval it held it. The claim loop ends when nothing is pending
or investigating any more.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import open_test_store

import nightcrier as nc


def work(store: nc.StateStore, worker_id: str, intervals: list, errors: list) -> None:
    while True:
        try:
            claimed = store.claim_next(worker_id)
            if claimed is None:
                counts = store.count_by_status()
                if counts[nc.PENDING] == 0 and counts[nc.INVESTIGATING] == 0:
                    return
                time.sleep(0.001)  # another thread holds the last free cluster
                continue
            start = time.monotonic_ns()
            time.sleep(0.0005)
            end = time.monotonic_ns()
            intervals.append([claimed.incident_id, claimed.cluster, start, end, worker_id])
            if not store.complete(claimed.incident_id, worker_id, nc.RESOLVED, 0, None):
                errors.append(f"complete refused for {claimed.incident_id}")
        except Exception as exc:  # every error is a finding of the test
            errors.append(f"{type(exc).__name__}: {exc}")
            if len(errors) > 50:
                return


def wait_for_peers(barrier: Path, processes: int, timeout: float = 60.0) -> None:
    """Start claiming only when every process is ready, so that they really compete."""
    (barrier / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + timeout
    while len(list(barrier.glob("ready-*"))) < processes:
        if time.monotonic() > deadline:
            raise SystemExit("peers did not start")
        time.sleep(0.01)


def main() -> None:
    engine, locator, threads, output = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    barrier, processes = Path(sys.argv[5]), int(sys.argv[6])
    store = open_test_store(engine, locator)
    wait_for_peers(barrier, processes)
    intervals: list = []
    errors: list = []
    workers = [threading.Thread(target=work, args=(store, f"{os.getpid()}-{n}", intervals, errors))
               for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    store.close()
    Path(output).write_text(json.dumps({"intervals": intervals, "errors": errors}))


if __name__ == "__main__":
    main()
