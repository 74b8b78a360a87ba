#!/usr/bin/env python3
"""Storm benchmark: 10,000 faults in 5 s across 100 clusters. Is anything lost, and how long until
everything is committed?

nightcrier runs as its own process against 100 simulated clusters (another
process). Every cluster is told to emit --faults/--clusters faults at a rate
that spreads them over --seconds; the benchmark then counts incidents in the
database until all are there, and reads nightcrier's own dropped counter.

Usage:  python bench/storm.py [--clusters 100] [--faults 10000] [--seconds 5] [--engines sqlite,postgres]
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet import active_clusters, emit, start_nightcrier, start_simulators, stop, wait
from ingest import engine_arguments, per_engine

import nightcrier as nc


def storm(storage: dict[str, object], store: nc.StateStore, args: argparse.Namespace) -> dict[str, float]:
    simulators, servers = start_simulators(args.clusters)
    service, health, _ = start_nightcrier(servers, storage)
    try:
        wait(lambda: active_clusters(health) == args.clusters, 120, "every cluster subscribed")
        per_cluster = args.faults // args.clusters
        start = time.monotonic()
        emit(servers, per_cluster, per_cluster / args.seconds)
        total = per_cluster * args.clusters
        wait(lambda: store.count_by_status()[nc.SKIPPED] >= total, 300, "every fault committed", 0.05)
        elapsed = time.monotonic() - start
        with urllib.request.urlopen(f"http://127.0.0.1:{health}/metrics", timeout=30) as response:
            metrics = response.read().decode()
        dropped = sum(float(line.split()[-1]) for line in metrics.splitlines()
                      if line.startswith("nightcrier_events_dropped_total{"))
        spooled = sum(float(line.split()[-1]) for line in metrics.splitlines()
                      if line.startswith("nightcrier_events_spooled_total{"))
        return {"sent": total, "committed": store.count_by_status()[nc.SKIPPED], "dropped": dropped,
                "spooled": spooled, "seconds_to_all_committed": elapsed}
    finally:
        stop(service)
        stop(simulators)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--faults", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    engine_arguments(parser)
    args = parser.parse_args()
    results = per_engine(args, storm)
    print(f"storm benchmark: {args.faults} faults in {args.seconds:g} s across {args.clusters} clusters")
    print(f"{'engine':<10}{'sent':>7}{'committed':>11}{'dropped':>9}{'spooled':>9}"
          f"{'all committed after':>21}")
    for engine, r in results.items():
        print(f"{engine:<10}{r['sent']:>7.0f}{r['committed']:>11.0f}{r['dropped']:>9.0f}{r['spooled']:>9.0f}"
              f"{r['seconds_to_all_committed']:>19.2f} s")


if __name__ == "__main__":
    main()
