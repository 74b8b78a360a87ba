#!/usr/bin/env python3
"""Soak benchmark: does nightcrier's resident memory level off under steady load?

nightcrier runs as its own process against simulated clusters (another
process) that emit faults at a steady total --rate for --seconds; triage is on
for the first --triage clusters (the demo's stub agent, process runner) and off
for the rest. Every --interval seconds the benchmark prints the process's
resident size, its anonymous memory (/proc/<pid>/smaps_rollup), its threads,
its open SQLite connections (descriptors on the database file) and the faults
committed so far; at the end, the achieved rate and the slope of the resident
size over the last half of the run, where a bounded process is flat.

Usage:  python bench/soak.py [--seconds 300] [--interval 30] [--rate 500] [--clusters 10]
                             [--triage 1] [--engines sqlite] [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet import (
    ROOT,
    active_clusters,
    anonymous_mib,
    emit,
    rss_mib,
    start_nightcrier,
    start_simulators,
    stop,
    wait,
)
from ingest import engine_arguments, per_engine

import nightcrier as nc


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def open_count(pid: int, path: str) -> int:
    """Descriptors of ``pid`` open on ``path``: one per SQLite connection to it."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == path
        except OSError:
            pass  # closed while we looked
    return count


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) samples, in MiB per minute."""
    if len(samples) < 2:
        return 0.0
    mean_t = sum(t for t, _ in samples) / len(samples)
    mean_v = sum(v for _, v in samples) / len(samples)
    spread = sum((t - mean_t) ** 2 for t, _ in samples)
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in samples) / spread if spread else 0.0


def soak(storage: dict[str, object], store: nc.StateStore, args: argparse.Namespace) -> dict[str, float]:
    simulators, servers = start_simulators(args.clusters)
    service, health, config = start_nightcrier(
        servers, storage, triage=args.triage, agent_runner="process",
        agent_command=[sys.executable, str(ROOT / "nightcrier.py"), "stub-agent"])
    database = os.path.realpath(str(storage.get("sqlite_path", "")))
    print(f"{storage['type']}:", flush=True)
    try:
        wait(lambda: active_clusters(health) == args.clusters, 120, "every cluster subscribed")
        per_cluster = args.rate / args.clusters
        count = int(per_cluster * args.seconds)
        emit(servers, count, per_cluster)
        start = time.monotonic()
        print(f"{'s':>5}{'RSS MiB':>9}{'anon MiB':>10}{'threads':>9}{'sqlite conns':>14}{'committed':>11}",
              flush=True)
        samples: list[tuple[float, float]] = []
        committed = 0
        while True:
            elapsed = time.monotonic() - start
            committed = sum(store.count_by_status().values())
            rss = rss_mib(service.pid)
            samples.append((elapsed, rss))
            print(f"{elapsed:>5.0f}{rss:>9.1f}{anonymous_mib(service.pid):>10.1f}{thread_count(service.pid):>9}"
                  f"{open_count(service.pid, database) if storage['type'] == 'sqlite' else 0:>14}"
                  f"{committed:>11}", flush=True)
            if elapsed >= args.seconds:
                break
            time.sleep(min(args.interval, max(0.0, start + len(samples) * args.interval - time.monotonic())))
        last_half = [s for s in samples if s[0] >= args.seconds / 2]
        return {"sent": count * args.clusters, "committed": committed, "rate": committed / samples[-1][0],
                "rss_start": samples[0][1], "rss_end": samples[-1][1], "slope": slope_per_minute(last_half)}
    finally:
        stop(service)
        stop(simulators)
        shutil.rmtree(os.path.dirname(config))  # a soak's workspaces add up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300.0, help="how long the load lasts")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--rate", type=float, default=500.0, help="faults per second, all clusters together")
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--triage", type=int, default=1, help="clusters with triage on (stub agent)")
    engine_arguments(parser)
    parser.set_defaults(engines="sqlite")
    args = parser.parse_args()
    results = per_engine(args, soak)
    print(f"soak benchmark: {args.rate:g} faults/s offered for {args.seconds:g} s over "
          f"{args.clusters} clusters, triage on {args.triage}")
    print(f"{'engine':<10}{'sent':>8}{'committed':>11}{'rate/s':>8}{'RSS start':>11}{'RSS end':>9}"
          f"{'last-half slope':>17}")
    for engine, r in results.items():
        print(f"{engine:<10}{r['sent']:>8.0f}{r['committed']:>11.0f}{r['rate']:>8.0f}"
              f"{r['rss_start']:>7.1f} MiB{r['rss_end']:>5.1f} MiB{r['slope']:>9.2f} MiB/min")


if __name__ == "__main__":
    main()
