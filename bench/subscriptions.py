#!/usr/bin/env python3
"""Subscriptions benchmark: 1,000 clusters in one nightcrier process.

Measures the process's resident memory once every cluster is subscribed, then
restarts every simulated server at once (same ports, every session forgotten)
and measures the time until all 1,000 clusters are subscribed again.

Usage:  python bench/subscriptions.py [--clusters 1000]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet import active_clusters, free_port_range, rss_mib, start_nightcrier, start_simulators, stop, wait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", type=int, default=1000)
    args = parser.parse_args()
    base = free_port_range(args.clusters)
    simulators, servers = start_simulators(args.clusters, port=base)
    path = os.path.join(tempfile.mkdtemp(prefix="nightcrier-subs-"), "subs.db")
    service, health, _ = start_nightcrier(servers, {"type": "sqlite", "sqlite_path": path},
                                          sse_reconnect_initial_backoff=1, sse_reconnect_max_backoff=30)
    try:
        first = wait(lambda: active_clusters(health) == args.clusters, 600, "every cluster subscribed", 0.5)
        rss = rss_mib(service.pid)
        simulators.send_signal(signal.SIGKILL)
        simulators.wait()
        wait(lambda: active_clusters(health) < args.clusters, 120, "the loss to be noticed", 0.1)
        simulators, _ = start_simulators(args.clusters, port=base)
        again = wait(lambda: active_clusters(health) == args.clusters, 600, "every cluster back", 0.5)
        rss_after = rss_mib(service.pid)
    finally:
        stop(service)
        stop(simulators)
    print(f"subscriptions benchmark: {args.clusters} clusters in one process")
    print(f"all subscribed after start: {first:.1f} s")
    print(f"resident memory: {rss:.0f} MiB subscribed, {rss_after:.0f} MiB after the restart storm")
    print(f"all subscribed again after every server restarted: {again:.1f} s")


if __name__ == "__main__":
    main()
