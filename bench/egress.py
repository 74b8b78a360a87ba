#!/usr/bin/env python3
"""Throughput of the agent network gate: one large download from a local server, through the gate.

An HTTP server on 127.0.0.1 serves ``--megabytes`` (200 by default) of bytes. ``curl`` in the
shipped agent image downloads them once per run to /dev/null, run by the Docker runner as an agent:

* ``gate``: ``agent_egress: allowlist`` with the server allowed -- curl -> the image's forwarder on
  the container's loopback -> the Unix socket -> nightcrier's gate -> the server;
* ``host network``: ``agent_egress: open`` with ``agent_network: host`` -- curl straight to the
  server, the ceiling of this machine.

Prints curl's own average download speed for each run and the median per path, in MB/s
(10^6 bytes); goal: the gate's median >= 100 MB/s (exit status 1 when missed).

Usage:  python bench/egress.py [--runs 3] [--megabytes 200] [--image nightcrier-agent:ci]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from container import make_config  # noqa: E402
from ingest import quiet_logging  # noqa: E402

import nightcrier as nc  # noqa: E402

GOAL_MB_PER_SECOND = 100.0
CHUNK = b"\x5a" * (1024 * 1024)


def serve(megabytes: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(megabytes * len(CHUNK)))
            self.end_headers()
            for _ in range(megabytes):
                self.wfile.write(CHUNK)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def download(config: nc.Config) -> float:
    """MB/s of one download, as curl measured it inside the container."""
    incident = nc.canned_incident("bench")
    job = nc.stage_agent_job(config, incident, nc.prepare_workspace(config.workspace_root, incident),
                             "bench", None)
    outcome = nc.DockerRunner(config, "bench").run(job, threading.Event())
    speed = Path(job.workspace, "output", "speed")
    if outcome.exit_code != 0 or not speed.exists():
        log = Path(job.workspace, "logs", "agent-stderr.log").read_text(errors="replace")
        raise SystemExit(f"the download failed: {outcome}\n{log[-2000:]}")
    return float(speed.read_text()) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--image", default=os.environ.get("NIGHTCRIER_AGENT_CLI_IMAGE",
                                                          "nightcrier-agent:ci"))
    args = parser.parse_args()
    quiet_logging()
    server = serve(args.megabytes)
    port = server.server_address[1]
    command = ["/bin/bash", "-c", f"curl -sS -o /dev/null -w '%{{speed_download}}' "
                                  f"http://127.0.0.1:{port}/ > /home/agent/output/speed"]
    paths = {"gate": {"agent_egress": "allowlist", "agent_egress_allow": [f"127.0.0.1:{port}"]},
             "host network": {"agent_egress": "open", "agent_network": "host"}}
    results: dict[str, list[float]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="nc-bench-egress-") as workdir:
            for name, settings in paths.items():
                config = make_config(workdir, args.image, agent_command=command, agent_timeout=120,
                                     **settings)
                results[name] = [download(config) for _ in range(args.runs)]
    finally:
        server.shutdown()
    print(f"one {args.megabytes} MB download per run, {args.runs} runs, MB/s as curl measured it")
    print(f"{'path':<14}{'median':>10}  runs")
    for name, speeds in results.items():
        print(f"{name:<14}{statistics.median(speeds):>10.0f}  " + ", ".join(f"{s:.0f}" for s in speeds))
    gate = statistics.median(results["gate"])
    verdict = "met" if gate >= GOAL_MB_PER_SECOND else "MISSED"
    print(f"goal: gate median >= {GOAL_MB_PER_SECOND:.0f} MB/s: {verdict}")
    return 0 if gate >= GOAL_MB_PER_SECOND else 1


if __name__ == "__main__":
    sys.exit(main())
