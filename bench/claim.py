#!/usr/bin/env python3
"""Claim benchmark: how long one claim takes with a deep, adversarial backlog.

Fills a fresh database with --pending incidents over --clusters clusters, with
--blocked-share of the backlog queued behind clusters that already have an
incident investigating (and older than the rest, so that a naive oldest-first
scan walks through all of it), then times --claims claims, each followed by
completing what it claimed so the shape of the queue stays the same.

Usage:  python bench/claim.py [--pending 100000] [--clusters 5000] [--blocked-share 0.9]
                              [--busy-clusters 500] [--claims 1000] [--engines sqlite,postgres]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ingest import engine_arguments, engine_store, print_latencies, quiet_logging  # noqa: E402

import nightcrier as nc  # noqa: E402


def fill(store: nc.StateStore, args: argparse.Namespace) -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    blocked = int(args.pending * args.blocked_share)
    events = []
    for n in range(args.pending):
        if n < blocked:      # the oldest part of the backlog, all behind busy clusters
            cluster = f"busy-{n % args.busy_clusters}"
        else:
            cluster = f"free-{n % (args.clusters - args.busy_clusters)}"
        events.append(nc.FaultEvent(cluster=cluster, fault_type="CrashLoop", mcp_payload="{}",
                                    received_at=start + dt.timedelta(milliseconds=n)))
    for i in range(0, len(events), 5000):
        store.insert_events(events[i:i + 5000])
    # Make every busy cluster busy: claim one incident of each, oldest first, and keep it.
    claimed = 0
    while claimed < args.busy_clusters:
        incident = store.claim_next("holder")
        assert incident is not None and incident.cluster.startswith("busy-")
        claimed += 1


def measure(store: nc.StateStore, claims: int) -> list[float]:
    latencies = []
    for _ in range(claims):
        started = time.perf_counter()
        incident = store.claim_next("bench")
        latencies.append((time.perf_counter() - started) * 1000)
        assert incident is not None and incident.cluster.startswith("free-"), incident
        store.complete(incident.incident_id, "bench", nc.RESOLVED, 0, None)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--clusters", type=int, default=5000)
    parser.add_argument("--busy-clusters", type=int, default=500)
    parser.add_argument("--blocked-share", type=float, default=0.9)
    parser.add_argument("--claims", type=int, default=1000)
    engine_arguments(parser)
    args = parser.parse_args()
    quiet_logging()
    results = {}
    for engine in args.engines.split(","):
        with engine_store(engine, args.postgres_url) as (_, store):
            fill(store, args)
            if engine == "postgres":
                store._execute("ANALYZE incidents")  # type: ignore[attr-defined]
            results[engine] = measure(store, args.claims)
    print(f"claim benchmark: {args.pending} pending over {args.clusters} clusters, "
          f"{args.blocked_share:.0%} behind {args.busy_clusters} busy clusters, {args.claims} claims")
    print_latencies(results, 99)


if __name__ == "__main__":
    main()
