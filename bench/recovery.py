#!/usr/bin/env python3
"""Recovery benchmark: kill -9 with agents running, restart, time until every orphan runs again.

Per round and engine: a fresh database with --agents incidents on as many clusters,
``nightcrier run`` with the process runner and agents that sleep, until all of
them run; then SIGKILL, a new ``nightcrier run`` at once, and the time from the
kill until every incident has an agent of the new process running. The new
process's start-up (interpreter, imports, opening the database) is part of the
figure, as it is for an operator. stale_after_seconds stays at its default: the
dead process is recognised by its free liveness lock, not by its heartbeats.

Usage:  python bench/recovery.py [--rounds 5] [--agents 4] [--engines sqlite,postgres]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import yaml  # noqa: E402
from ingest import engine_arguments, engine_store, quiet_logging  # noqa: E402

import nightcrier as nc  # noqa: E402


def wait(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def agent_pids(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def one_round(engine: str, postgres_url: str, agents: int) -> float:
    workdir = Path(tempfile.mkdtemp(prefix="nightcrier-recovery-"))
    pids = workdir / "pids"
    with engine_store(engine, postgres_url) as (storage, store):
        config = workdir / "config.yaml"
        kubeconfig = workdir / "kubeconfig"
        kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
        config.write_text(yaml.safe_dump({
            "workspace_root": str(workdir / "ws"), "health_port": 0, "agent_runner": "process",
            "agent_command": ["sh", "-c", f"echo $$ >> {pids}; exec sleep 600"],
            "max_concurrent_agents": agents, "state_storage": storage,
            "clusters": [{"name": f"c{n}", "mcp": {"endpoint": f"http://127.0.0.1:9/{n}"},
                          "triage": {"enabled": True, "kubeconfig": str(kubeconfig),
                                                     "check_permissions": False}} for n in range(agents)]}))
        store.insert_events([nc.FaultEvent(cluster=f"c{n}", fault_type="CrashLoop", mcp_payload="{}",
                                           received_at=nc.utcnow()) for n in range(agents)])
        command = [sys.executable, str(ROOT / "nightcrier.py"), "--config", str(config)]
        first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait(lambda: len(agent_pids(pids)) == agents, 60, "the first process's agents")
        first.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        first.wait()
        second = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait(lambda: len(agent_pids(pids)) == 2 * agents, 120, "every orphan running again")
            return time.monotonic() - killed
        finally:
            second.send_signal(signal.SIGKILL)
            second.wait()
            for pid in agent_pids(pids):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--agents", type=int, default=4)
    engine_arguments(parser)
    args = parser.parse_args()
    quiet_logging()
    print(f"recovery benchmark: kill -9 with {args.agents} agents running, restart, until all run again; "
          f"{args.rounds} rounds, stale_after_seconds {nc.Config().stale_after_seconds:g} (default)")
    print(f"{'engine':<10}{'median s':>10}{'min s':>8}{'max s':>8}")
    for engine in args.engines.split(","):
        seconds = [one_round(engine, args.postgres_url, args.agents) for _ in range(args.rounds)]
        print(f"{engine:<10}{statistics.median(seconds):>10.2f}{min(seconds):>8.2f}{max(seconds):>8.2f}")


if __name__ == "__main__":
    main()
