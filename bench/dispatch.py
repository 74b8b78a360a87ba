#!/usr/bin/env python3
"""Dispatch benchmark: from an incident's commit to its agent process starting, with a free slot.

Inserts incidents one at a time, as the ingest writer does (commit, then wake
the dispatcher), into a store served by a real Dispatcher with the process
runner. The agent is a shell command whose first act is to record the time;
the latency is that time minus the moment the commit returned. Reports p50
and p95 per engine.

Usage:  python bench/dispatch.py [--incidents 200] [--engines sqlite,postgres] [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ingest import engine_arguments, engine_store, print_latencies, quiet_logging  # noqa: E402

import nightcrier as nc  # noqa: E402


def measure(store: nc.StateStore, incidents: int, workdir: str) -> list[float]:
    import yaml
    config_path = os.path.join(workdir, "config.yaml")
    with open(config_path, "w") as fh:
        yaml.safe_dump({"workspace_root": os.path.join(workdir, "ws"), "agent_runner": "process",
                        "agent_command": ["sh", "-c", "date +%s.%N > started"],
                        "max_concurrent_agents": 4, "investigation_min_size_bytes": 0,
                        "clusters": [{"name": f"c{n}", "mcp": {"endpoint": "http://127.0.0.1:9/mcp"}}
                                     for n in range(4)]}, fh)
    config, _ = nc.load_config(config_path, env={})
    wake = threading.Event()
    dispatcher = nc.Dispatcher(config, store, nc.ProcessRunner(), wake, nc.Metrics(), "bench")
    dispatcher.start()
    latencies = []
    try:
        for n in range(incidents):
            event = nc.FaultEvent(cluster=f"c{n % 4}", fault_type="CrashLoop", received_at=nc.utcnow(),
                                  mcp_payload="{}")
            store.insert_events([event])
            committed = time.time()
            wake.set()
            started = os.path.join(workdir, "ws", event.incident_id, "started")
            deadline = time.monotonic() + 30
            while not (os.path.exists(started) and os.path.getsize(started) > 0):
                if time.monotonic() > deadline:
                    raise SystemExit(f"agent for incident {n} never started")
                time.sleep(0.0005)
            with open(started) as fh:
                latencies.append((float(fh.read()) - committed) * 1000)
            while dispatcher.running():
                time.sleep(0.001)  # one at a time: every measurement starts with free slots
    finally:
        dispatcher.stop()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--incidents", type=int, default=200)
    engine_arguments(parser)
    args = parser.parse_args()
    quiet_logging()

    results = {}
    for engine in args.engines.split(","):
        with engine_store(engine, args.postgres_url) as (_, store):
            results[engine] = measure(store, args.incidents,
                                      tempfile.mkdtemp(prefix=f"nightcrier-dispatch-{engine}-"))

    print(f"dispatch benchmark: commit -> agent process start, {args.incidents} incidents, free slots")
    print_latencies(results, 95)


if __name__ == "__main__":
    main()
