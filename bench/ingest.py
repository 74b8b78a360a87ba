#!/usr/bin/env python3
"""Ingest benchmark: simulated MCP servers push faults; how fast do incidents get committed?

The load comes from generator processes (``--generators``, multiprocessing),
each serving some of the simulated clusters with frames rendered before the
clock starts, so that what is measured is nightcrier -- the Service, in this
process -- and not its load generator. Per engine:

* throughput: M faults queued by the generators at once, from the first send
  to the last commit; the generators' own send rate is reported beside it and
  must be well above it for the figure to mean anything;
* latency: receive -> commit per event, p50/p99, at a fixed offered rate;
* the raw ceiling: the same rows inserted straight into an empty database with
  executemany, in batches of the same size as the ingest writer's, in the same
  run;
* the cost of cleaning notifications at the parse boundary: parse of the same
  notifications with cleaning on and off, as a share of the per-event time
  the measured throughput leaves.

Usage:  python bench/ingest.py [--clusters 10] [--generators 2] [--faults 20000] [--rate 1000]
                               [--dedup-window 300] [--engines sqlite,postgres] [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nightcrier as nc  # noqa: E402

BATCH = 500
T = TypeVar("T")


class Recorder:
    """Collects (commit time, latency) of every committed event via the metrics hook."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.samples: list[tuple[float, float]] = []

    def __call__(self, cluster: str, seconds: float) -> None:
        with self.lock:
            self.samples.append((time.monotonic(), seconds))

    def count(self) -> int:
        with self.lock:
            return len(self.samples)

    def take(self) -> list[tuple[float, float]]:
        with self.lock:
            samples, self.samples = self.samples, []
        return samples


def _generator(clusters: list[str], conn: multiprocessing.connection.Connection) -> None:
    """One generator process: serves ``clusters``, emits on command, reports how long sending took."""
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 -- connections reset at the end are expected
    servers = [nc.SimulatedServer(name).start() for name in clusters]
    conn.send([{"cluster": s.cluster, "endpoint": s.url} for s in servers])
    while (command := conn.recv()) is not None:
        per_server, rate = command
        for server in servers:  # render every distinct frame before the clock starts
            for sub in list(server._owners):
                for n in range(512):
                    server._frame(sub, n)
        conn.send("ready")
        conn.recv()
        start = time.monotonic()
        threads = [server.emit_many(per_server, rate) for server in servers]
        for thread in threads:
            thread.join()
        conn.send(time.monotonic() - start)
    for server in servers:
        server.stop()


class Generators:
    """Simulated clusters spread over ``processes`` generator processes."""

    def __init__(self, clusters: int, processes: int):
        names = [f"bench-{n}" for n in range(clusters)]
        self.pipes = []
        self.procs = []
        for i in range(processes):
            parent, child = multiprocessing.Pipe()
            proc = multiprocessing.Process(target=_generator, args=(names[i::processes], child), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)
        self.servers = [server for pipe in self.pipes for server in pipe.recv()]

    def emit(self, total: int, rate: float) -> float:
        """Emit ``total`` faults over every cluster (``rate`` per second overall, 0 = unpaced);
        returns the generators' own send rate (faults per second)."""
        per_server = total // len(self.servers)
        for pipe in self.pipes:
            pipe.send((per_server, rate / len(self.servers)))
        for pipe in self.pipes:
            pipe.recv()
        for pipe in self.pipes:
            pipe.send("go")
        slowest = max(pipe.recv() for pipe in self.pipes)
        return per_server * len(self.servers) / slowest

    def stop(self) -> None:
        for pipe in self.pipes:
            pipe.send(None)
        for proc in self.procs:
            proc.join(10)


def wait_until(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.005)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def print_latencies(results: dict[str, list[float]], q: int) -> None:
    """A table of median, q-th percentile and maximum milliseconds per engine."""
    print(f"{'engine':<10}{'p50 ms':>9}{f'p{q} ms':>9}{'max ms':>9}")
    for engine, latencies in results.items():
        print(f"{engine:<10}{statistics.median(latencies):>9.2f}{percentile(latencies, q):>9.2f}"
              f"{max(latencies):>9.2f}")


def make_config(workdir: str, servers: list[dict[str, str]], storage: dict[str, object],
                dedup_window: float) -> nc.Config:
    import yaml
    path = os.path.join(workdir, "config.yaml")
    kubeconfig = os.path.join(workdir, "kubeconfig")
    with open(kubeconfig, "w") as fh:
        fh.write("apiVersion: v1\n")
    # Triage is on, so that every incident goes through the repeat check, but the agent image
    # does not exist: the dispatcher claims nothing and the measure stays the ingest path's.
    with open(path, "w") as fh:
        yaml.safe_dump({"workspace_root": os.path.join(workdir, "ws"), "health_port": 0, "log_level": "info",
                        "state_storage": storage, "dedup_window_seconds": dedup_window,
                        "agent_image": "nightcrier-bench-absent:none",
                        "clusters": [{"name": s["cluster"], "mcp": {"endpoint": s["endpoint"]},
                                      "triage": {"enabled": True, "kubeconfig": kubeconfig,
                                                 "check_permissions": False}}
                                     for s in servers]}, fh)
    config, _ = nc.load_config(path, env={})
    return config


def run_pipeline(engine: str, storage: dict[str, object], args: argparse.Namespace) -> dict[str, float]:
    generators = Generators(args.clusters, args.generators)
    workdir = tempfile.mkdtemp(prefix=f"nightcrier-bench-{engine}-")
    service = nc.Service(make_config(workdir, generators.servers, storage, args.dedup_window))
    recorder = Recorder()
    service.metrics.observe_ingest = recorder  # type: ignore[method-assign]
    service.start()
    try:
        wait_until(lambda: all(h.status == nc.ACTIVE for h in service.health()), 30, "subscriptions")
        start = time.monotonic()
        send_rate = generators.emit(args.faults, 0)
        wait_until(lambda: recorder.count() >= args.faults, 300, "throughput run to commit")
        samples = recorder.take()
        last_commit = max(t for t, _ in samples)
        throughput = len(samples) / (last_commit - start)
        spooled = sum(service.metrics.value("spooled", s["cluster"]) for s in generators.servers)

        latency_faults = int(args.rate * args.latency_seconds)
        generators.emit(latency_faults, args.rate)
        wait_until(lambda: recorder.count() >= latency_faults, 120, "latency run to commit")
        latencies = [lat * 1000 for _, lat in recorder.take()]
    finally:
        service.stop()
        generators.stop()
    return {"events_per_s": throughput, "generator_send_per_s": send_rate, "spooled": spooled,
            "p50_ms": statistics.median(latencies), "p99_ms": percentile(latencies, 99),
            "latency_samples": len(latencies)}


def notification_bodies(count: int, clusters: int) -> list[tuple[str, str]]:
    """(cluster, raw notification) as the simulated servers send them."""
    bodies = []
    for n in range(count):
        cluster = f"bench-{n % clusters}"
        data = dict(nc.simulated_fault(cluster, n), subscriptionId="sub-1")
        bodies.append((cluster, json.dumps({"jsonrpc": "2.0", "method": "notifications/message",
                                            "params": {"level": "warning", "logger": "kubernetes/faults",
                                                       "data": data}})))
    return bodies


def parse_cost(bodies: list[tuple[str, str]], rounds: int = 15) -> dict[str, float]:
    """Microseconds per parse_notification with cleaning on and off: the best of ``rounds``
    of each, interleaved so that a busy neighbour slows both alike."""
    now = nc.utcnow()
    timings = {"on": float("inf"), "off": float("inf")}
    for _ in range(rounds):
        for sanitize in (False, True):
            nc.SANITIZE = sanitize
            start = time.perf_counter()
            for cluster, raw in bodies:
                nc.parse_notification(raw, cluster, now)
            key = "on" if sanitize else "off"
            timings[key] = min(timings[key], (time.perf_counter() - start) / len(bodies) * 1e6)
    nc.SANITIZE = True
    return {"parse_us": timings["on"], "parse_unsanitized_us": timings["off"],
            "sanitize_us": timings["on"] - timings["off"]}


def raw_rows(bodies: list[tuple[str, str]]) -> list[nc.FaultEvent]:
    events = []
    for cluster, raw in bodies:
        event = nc.parse_notification(raw, cluster, nc.utcnow())
        assert isinstance(event, nc.FaultEvent)
        events.append(event)
    return events


def raw_ceiling_sqlite(events: list[nc.FaultEvent]) -> float:
    import sqlite3
    path = os.path.join(tempfile.mkdtemp(prefix="nightcrier-raw-"), "raw.db")
    nc.SqliteStore(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")  # as the store does: checkpoints run off the write path
    tables = nc.ingest_rows(events, [nc.Verdict(nc.PENDING)] * len(events), (), (), nc._iso)[:2]
    start = time.monotonic()
    for i in range(0, len(events), BATCH):
        conn.execute("BEGIN IMMEDIATE")
        for table, columns, _, rows in tables:
            conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) "
                             f"VALUES ({', '.join('?' * len(columns))})", rows[i:i + BATCH])
        conn.execute("COMMIT")
    return len(events) / (time.monotonic() - start)


def raw_ceiling_postgres(events: list[nc.FaultEvent], url: str) -> float:
    import psycopg2
    import psycopg2.extras
    store = nc.PostgresStore(url)
    store.close()
    conn = psycopg2.connect(url)
    tables = nc.ingest_rows(events, [nc.Verdict(nc.PENDING)] * len(events), (), (), lambda t: t)[:2]
    start = time.monotonic()
    with conn.cursor() as cur:
        for i in range(0, len(events), BATCH):
            for table, columns, _, rows in tables:
                template = "(" + ", ".join("%s::jsonb" if c == "mcp_payload" else "%s" for c in columns) + ")"
                psycopg2.extras.execute_values(cur, f"INSERT INTO {table} ({', '.join(columns)}) VALUES %s",
                                               rows[i:i + BATCH], template=template, page_size=1000)
            conn.commit()
    elapsed = time.monotonic() - start
    conn.close()
    return len(events) / elapsed


def postgres_schema(base_url: str) -> tuple[str, str]:
    import psycopg2
    schema = "bench_" + uuid.uuid4().hex[:8]
    conn = psycopg2.connect(base_url)
    conn.autocommit = True
    conn.cursor().execute(f"CREATE SCHEMA {schema}")
    conn.close()
    sep = "&" if "?" in base_url else "?"
    return schema, f"{base_url}{sep}options=-csearch_path%3D{schema}"


def drop_schema(base_url: str, schema: str) -> None:
    import psycopg2
    conn = psycopg2.connect(base_url)
    conn.autocommit = True
    conn.cursor().execute(f"DROP SCHEMA {schema} CASCADE")
    conn.close()


def engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--engines and --postgres-url, as every benchmark here takes them."""
    parser.add_argument("--engines", default="sqlite,postgres")
    parser.add_argument("--postgres-url", default=os.environ.get(
        "NIGHTCRIER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))


@contextlib.contextmanager
def engine_store(engine: str, postgres_url: str) -> Iterator[tuple[dict[str, object], nc.StateStore]]:
    """A fresh, empty database of ``engine``: its storage settings and an open store on it.

    SQLite gets a new file; PostgreSQL a schema of its own, dropped afterwards.
    """
    if engine == "sqlite":
        directory = tempfile.mkdtemp(prefix="nightcrier-bench-")
        path = os.path.join(directory, "bench.db")
        store: nc.StateStore = nc.SqliteStore(path)
        try:
            yield {"type": "sqlite", "sqlite_path": path}, store
        finally:
            store.close()
            shutil.rmtree(directory)
        return
    schema, url = postgres_schema(postgres_url)
    store = nc.PostgresStore(url)
    try:
        yield {"type": "postgres", "postgres_connection_string": url}, store
    finally:
        store.close()
        drop_schema(postgres_url, schema)


def per_engine(args: argparse.Namespace,
               measure: Callable[[dict[str, object], nc.StateStore, argparse.Namespace], T]) -> dict[str, T]:
    """``measure(storage, store, args)`` on a fresh database of each engine in ``--engines``."""
    results = {}
    for engine in args.engines.split(","):
        with engine_store(engine, args.postgres_url) as (storage, store):
            results[engine] = measure(storage, store, args)
    return results


def quiet_logging() -> None:
    """Log lines are formatted as in production, then thrown away."""
    devnull = open(os.devnull, "w")  # noqa: SIM115 -- lives as long as the process
    nc.configure_logging("info", "text", stream=devnull)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--generators", type=int, default=2, help="load generator processes")
    parser.add_argument("--faults", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=1000.0, help="offered rate of the latency run")
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--dedup-window", type=float, default=300.0,
                        help="dedup_window_seconds; 0 measures without the repeat check")
    engine_arguments(parser)
    args = parser.parse_args()
    quiet_logging()

    results = {}
    bodies = notification_bodies(args.faults, args.clusters)
    events = raw_rows(bodies)
    cost = parse_cost(bodies[:5000])
    for engine in args.engines.split(","):
        if engine == "sqlite":
            storage: dict[str, object] = {"type": "sqlite"}
            result = run_pipeline(engine, storage, args)
            result["raw_ceiling_per_s"] = raw_ceiling_sqlite(events)
        else:
            schema, url = postgres_schema(args.postgres_url)
            raw_schema, raw_url = postgres_schema(args.postgres_url)
            try:
                result = run_pipeline(engine, {"type": "postgres", "postgres_connection_string": url}, args)
                result["raw_ceiling_per_s"] = raw_ceiling_postgres(events, raw_url)
            finally:
                drop_schema(args.postgres_url, schema)
                drop_schema(args.postgres_url, raw_schema)
        result["share_of_ceiling"] = result["events_per_s"] / result["raw_ceiling_per_s"]
        # The share of each event's time, at the measured throughput, spent cleaning.
        result["sanitize_share"] = cost["sanitize_us"] * 1e-6 * result["events_per_s"]
        results[engine] = result

    print(f"ingest benchmark: {args.clusters} clusters in {args.generators} generator processes, "
          f"dedup window {args.dedup_window:g} s, {args.faults} faults unpaced, "
          f"latency at {args.rate:g}/s for {args.latency_seconds:g} s")
    print(f"parse_notification: {cost['parse_us']:.2f} us per event, {cost['parse_unsanitized_us']:.2f} us "
          f"with cleaning switched off")
    print(f"{'engine':<10}{'events/s':>10}{'sent/s':>10}{'spooled':>9}{'raw ceiling/s':>15}{'share':>8}"
          f"{'cleaning':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for engine, r in results.items():
        print(f"{engine:<10}{r['events_per_s']:>10.0f}{r['generator_send_per_s']:>10.0f}{r['spooled']:>9.0f}"
              f"{r['raw_ceiling_per_s']:>15.0f}{r['share_of_ceiling']:>8.0%}{r['sanitize_share']:>10.1%}"
              f"{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}")
    print(json.dumps({"parse": cost, **results}))


if __name__ == "__main__":
    main()
