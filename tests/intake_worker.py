"""A process that stores emissions of the same fault conditions as its peers, for the repeat race.

Usage: python intake_worker.py ENGINE LOCATOR CONDITIONS BARRIER_DIR PROCESSES

Each of CONDITIONS fault conditions (faultId cond-N on cluster race) is emitted
once by this process, one batch per emission, with this process's own
detection time, so that no emission is a copy of a peer's. Every process
starts storing when all are ready, so that they really race.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from claim_worker import wait_for_peers
from conftest import open_test_store
from test_store_contract import make_event

import nightcrier as nc


def main() -> None:
    engine, locator, conditions = sys.argv[1], sys.argv[2], int(sys.argv[3])
    barrier, processes = Path(sys.argv[4]), int(sys.argv[5])
    store = open_test_store(engine, locator)
    store.rules = nc.TriageRules(dedup_window=300)
    detected = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(minutes=os.getpid() % 1000)
    wait_for_peers(barrier, processes)
    for n in range(conditions):
        store.insert_events([make_event("race", fault_id=f"cond-{n}", timestamp=detected.isoformat())])
    store.close()


if __name__ == "__main__":
    main()
