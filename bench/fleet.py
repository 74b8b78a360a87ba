"""Shared pieces of the fleet benchmarks: simulated clusters and nightcrier in processes of their own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_range(count: int) -> int:
    """The first port of ``count`` consecutive free ports below the ephemeral range, so that a
    restarted simulator can take the same ports again."""
    import socket
    for base in range(20000, 32000 - count, count):
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise SystemExit(f"no {count} consecutive free ports")


def start_simulators(count: int, port: int = 0) -> tuple[subprocess.Popen[str], list[dict[str, str]]]:
    command = [sys.executable, str(ROOT / "nightcrier.py"), "simulate", "--servers", str(count),
               "--cluster", "fleet"] + (["--port", str(port)] if port else [])
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    return proc, [json.loads(proc.stdout.readline()) for _ in range(count)]


def start_nightcrier(servers: list[dict[str, str]], storage: dict[str, Any], triage: int = 0,
                     **settings: Any) -> tuple[subprocess.Popen[bytes], int, str]:
    """nightcrier watching ``servers``; the first ``triage`` of them have triage on (give
    ``agent_runner``/``agent_command`` in ``settings`` then)."""
    workdir = tempfile.mkdtemp(prefix="nightcrier-fleet-")
    health = free_port()
    path = os.path.join(workdir, "config.yaml")
    kubeconfig = os.path.join(workdir, "kubeconfig")
    with open(kubeconfig, "w") as fh:
        fh.write("apiVersion: v1\nkind: Config\n# simulated clusters have no API server\n")
    clusters = [{"name": s["cluster"], "mcp": {"endpoint": s["endpoint"]}} for s in servers]
    for cluster in clusters[:triage]:
        cluster["triage"] = {"enabled": True, "kubeconfig": kubeconfig, "check_permissions": False}
    with open(path, "w") as fh:
        yaml.safe_dump({"workspace_root": os.path.join(workdir, "ws"), "health_port": health,
                        "log_level": "warning", "state_storage": storage, **settings,
                        "clusters": clusters}, fh)
    proc = subprocess.Popen([sys.executable, str(ROOT / "nightcrier.py"), "--config", path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, health, path


def get_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return json.loads(response.read())


def active_clusters(port: int) -> int:
    try:
        return int(get_json(port, "/health/clusters")["summary"]["active"])
    except OSError:
        return 0


def wait(condition: Any, timeout: float, what: str, interval: float = 0.1) -> float:
    """Seconds until ``condition()`` held; exits the benchmark if it never does."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def emit(servers: list[dict[str, str]], count: int, rate: float) -> None:
    """Tell every simulated server to send ``count`` faults at ``rate`` per second."""
    body = json.dumps({"count": count, "rate": rate}).encode()
    for server in servers:
        urllib.request.urlopen(urllib.request.Request(
            server["endpoint"].replace("/mcp", "/_simulate/emit"), data=body, method="POST"), timeout=10)


def _proc_mib(path: str, field: str) -> float:
    """A ``field:  N kB`` line of a /proc file, in MiB."""
    with open(path) as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mib(pid: int) -> float:
    return _proc_mib(f"/proc/{pid}/status", "VmRSS")


def anonymous_mib(pid: int) -> float:
    """Memory of ``pid`` backed by no file: its heaps, malloc arenas and stacks."""
    return _proc_mib(f"/proc/{pid}/smaps_rollup", "Anonymous")
