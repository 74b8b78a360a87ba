#!/usr/bin/env python3
"""Repeat benchmark: what a fault condition re-emitted every minute for an hour costs in agent runs.

One crash-looping pod: the events server re-emits its fault (same faultId, a new
detection time) once a minute for ``--minutes``. The receive times are
simulated, an hour passing in a moment; after each emission every claimable
incident is claimed and finished at once, as if its agent ran, so the count of
claims is the count of agent runs. Per engine and per ``dedup_window_seconds``
(0 = the repeat check off).

Usage:  python bench/repeats.py [--minutes 60] [--windows 0,300] [--engines sqlite,postgres]
                                [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ingest import drop_schema, engine_arguments, postgres_schema  # noqa: E402

import nightcrier as nc  # noqa: E402


def emission(minute: int, start: dt.datetime) -> nc.FaultEvent:
    at = start + dt.timedelta(minutes=minute)
    return nc.FaultEvent(cluster="prod", fault_type="CrashLoop", received_at=at, mcp_payload="{}",
                         fault_id="5f3c0a1b2c3d4e6f", severity="critical", timestamp=at.isoformat(),
                         resource_kind="Pod", resource_namespace="payments", resource_name="api-7f8b9c")


def agent_runs(store: nc.StateStore, minutes: int, window: float) -> tuple[int, int]:
    """(agent runs, incidents stored) for one condition re-emitted every minute."""
    store.rules = nc.TriageRules(dedup_window=window)
    start = nc.utcnow()
    runs = 0
    for minute in range(minutes):
        store.insert_events([emission(minute, start)])
        while (claimed := store.claim_next("bench")) is not None:
            runs += 1
            store.complete(claimed.incident_id, "bench", nc.RESOLVED, 0, None)
    return runs, sum(store.count_by_status().values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=int, default=60)
    parser.add_argument("--windows", default="0,300")
    engine_arguments(parser)
    args = parser.parse_args()
    print(f"one fault condition re-emitted every minute for {args.minutes} minutes (simulated time)")
    print(f"{'engine':<10}{'window s':>9}{'incidents':>11}{'agent runs':>12}")
    for engine in args.engines.split(","):
        for window in (float(w) for w in args.windows.split(",")):
            if engine == "sqlite":
                store: nc.StateStore = nc.SqliteStore(tempfile.mkdtemp(prefix="nightcrier-bench-") + "/nc.db")
                runs, stored = agent_runs(store, args.minutes, window)
                store.close()
            else:
                schema, url = postgres_schema(args.postgres_url)
                try:
                    store = nc.PostgresStore(url)
                    runs, stored = agent_runs(store, args.minutes, window)
                    store.close()
                finally:
                    drop_schema(args.postgres_url, schema)
            print(f"{engine:<10}{window:>9g}{stored:>11}{runs:>12}")


if __name__ == "__main__":
    main()
