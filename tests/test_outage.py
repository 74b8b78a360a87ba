"""Watching survives a PostgreSQL outage, and one fault emission is stored once across processes.

The outage tests stop and start a throwaway PostgreSQL server of their own (initdb/pg_ctl) while a
real MCP test server emits faults at 50 per second to nightcrier processes run as users run them.
The outage lasts four times ``failover_seconds``: longer than any process may wait before giving up
a cluster or taking one over. ``NIGHTCRIER_OUTAGE_FAILOVER`` scales it down for quick local runs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import infra
import pytest
import yaml
from conftest import ROOT, wait_for
from mcp_testserver import McpTestServer, make_fault
from tcp_proxy import TcpProxy
from test_engine import GOOD_AGENT, engine_config
from test_store_contract import make_event

import nightcrier as nc

FAILOVER = float(os.environ.get("NIGHTCRIER_OUTAGE_FAILOVER", "15"))
OUTAGE = 4 * FAILOVER
RATE = 50.0  # faults per second, over all clusters


# -- the same emission, twice ------------------------------------------------------------------------

def notification(fault_id: str = "f7a3b2c1d4e5f6a7", timestamp: str = "2025-12-19T22:11:10+01:00",
                 subscription: str = "sub-0ddc180f", name: str = "api-7f8b9c") -> str:
    """A fault notification as the server sends it (the fields of its ResourceFaultNotification)."""
    data = {"subscriptionId": subscription, "cluster": "kind", "faultId": fault_id, "faultType": "CrashLoop",
            "severity": "critical", "resource": {"apiVersion": "v1", "kind": "Pod", "name": name,
                                                 "namespace": "payments", "uid": str(uuid.uuid4())},
            "context": "Container entered CrashLoopBackOff state", "timestamp": timestamp}
    return json.dumps({"jsonrpc": "2.0", "method": "notifications/message",
                       "params": {"level": "warning", "logger": "kubernetes/faults", "data": data}})


def received(raw: str) -> nc.FaultEvent:
    event = nc.parse_notification(raw, "prod", nc.utcnow())
    assert isinstance(event, nc.FaultEvent)
    return event


def test_one_emission_received_by_two_processes_is_one_incident(
        store_factory: Callable[[], nc.StateStore]) -> None:
    first, second = store_factory(), store_factory()
    raw = notification()
    (kept,) = first.insert_events([received(raw)])
    assert second.insert_events([received(raw)]) == [kept], "the copy names the stored incident"
    # The same detection as a second subscription delivers it: its own subscription id, and the
    # watcher behind it may stamp it up to a second later.
    assert second.insert_events([received(notification(subscription="sub-99999999"))]) == [kept]
    assert first.insert_events([received(notification(timestamp="2025-12-19T22:11:11+01:00",
                                                      subscription="sub-99999999"))]) == [kept]
    assert second.insert_events([received(notification(timestamp="2025-12-19T21:11:09Z"))]) == [kept]
    incidents = first.list_incidents()
    assert [i.incident_id for i in incidents] == [kept]
    assert first.get_incident(kept) is not None


def test_two_emissions_of_one_fault_id_are_two_incidents(store_factory: Callable[[], nc.StateStore]) -> None:
    first, second = store_factory(), store_factory()
    # Re-emitted after the server's deduplication window, and (closer than the server ever sends
    # one id twice) two seconds apart: distinct emissions, whatever process receives them.
    ids = [*first.insert_events([received(notification(timestamp="2025-12-19T22:11:10+01:00"))]),
           *second.insert_events([received(notification(timestamp="2025-12-19T22:26:10+01:00"))]),
           *second.insert_events([received(notification(timestamp="2025-12-19T22:26:12+01:00"))])]
    assert len(set(ids)) == 3
    assert len(first.list_incidents()) == 3
    # Without a faultId or a readable timestamp nothing identifies an emission: nothing is merged.
    for raw in (notification(fault_id=""), notification(fault_id=""), notification(timestamp="soon"),
                notification(timestamp="soon")):
        first.insert_events([received(raw)])
    assert len(second.list_incidents()) == 7


def test_copies_inside_one_batch_and_a_batch_written_twice(store: nc.StateStore) -> None:
    original, copy, other = (received(notification()), received(notification(subscription="sub-2")),
                             received(notification(fault_id="0000000000000001")))
    ids = store.insert_events([original, copy, other], skipped_clusters=["prod"])
    assert ids[0] == ids[1] != ids[2]
    assert store.insert_events([original, copy, other]) == ids, "a retried batch changes nothing"
    assert sorted(i.incident_id for i in store.list_incidents()) == sorted({*ids})
    assert store.count_by_status()[nc.SKIPPED] == 2


def test_emission_keys_match_within_a_second_only() -> None:
    def keys(timestamp: str, fault_id: str = "ab") -> tuple[str | None, str | None]:
        return nc.emission_keys(received(notification(fault_id=fault_id, timestamp=timestamp)))

    def copies(a: tuple[str | None, str | None], b: tuple[str | None, str | None]) -> bool:
        """As the unique indexes see it: even key against even key, odd against odd."""
        return any(x is not None and x == y for x, y in zip(a, b, strict=True))

    base = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
    for offset in range(4):
        t = base + dt.timedelta(seconds=offset)
        stamp = t.isoformat().replace("+00:00", "Z")
        assert copies(keys(stamp), keys((t + dt.timedelta(seconds=1)).isoformat())), "a second apart: a copy"
        assert keys(stamp) == keys(t.astimezone(dt.timezone(dt.timedelta(hours=-5))).isoformat())
        assert keys(stamp) == keys(stamp.replace("Z", ".999999999Z"))
        for later in (2, 3, 900):
            assert not copies(keys(stamp), keys((t + dt.timedelta(seconds=later)).isoformat()))
        assert not copies(keys(stamp), keys(stamp, fault_id="cd"))
    for unreadable in ("", "2026-13-01T00:00:00Z", "yesterday", "2026-03-01T12:00:00"):
        assert keys(unreadable) == (None, None)
    assert keys("2026-03-01T12:00:00Z", fault_id="") == (None, None)
    assert keys("2026-03-01T12:00:00Z", fault_id="f" * (nc.MAX_FAULT_ID_KEY_CHARS + 1)) == (None, None)


def test_an_overlong_fault_id_is_stored_not_refused(store_factory: Callable[[], nc.StateStore]) -> None:
    huge = "f" * 1000
    store = store_factory()
    ids = store.insert_events([received(notification(fault_id=huge)), received(notification(fault_id=huge))])
    assert len(set(ids)) == 2, "without a usable identity nothing is taken for a copy"
    assert {i.fault_id for i in store.list_incidents()} == {huge}


# -- ownership re-asserted after a lost connection ------------------------------------------------

def ownership(tmp_path: Path, url: str, clusters: list[str], instance: str = "") -> nc.ClusterOwnership:
    path = tmp_path / "ownership.yaml"
    path.write_text(yaml.safe_dump({
        "workspace_root": str(tmp_path / "ws"), "failover_seconds": 3,
        "state_storage": {"type": "postgres", "postgres_connection_string": url},
        "clusters": [{"name": c, "mcp": {"endpoint": "http://127.0.0.1:9/mcp"}} for c in clusters]}))
    config, _ = nc.load_config(str(path), env={})
    return nc.ClusterOwnership(config, instance or f"test:{uuid.uuid4().hex[:8]}", on_change=lambda: None)


def hold_lock(url: str, cluster: str, application_name: str) -> Any:
    """A session of its own holding ``cluster``'s ownership lock, as a process would."""
    import psycopg2
    conn = psycopg2.connect(url, application_name=application_name)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                    (nc.ClusterOwnership.KEY_PREFIX + cluster,))
        assert cur.fetchone()[0]
    return conn


@pytest.mark.postgres
def test_a_lock_lost_with_the_connection_is_taken_again(tmp_path: Path, postgres_schema_url: str) -> None:
    mine, other = f"keep-{uuid.uuid4().hex[:8]}", f"lose-{uuid.uuid4().hex[:8]}"
    owner = ownership(tmp_path, postgres_schema_url, [mine, other])
    conn = owner._connect()
    stale = hold_lock(postgres_schema_url, mine, owner.app_name)  # our session the server still keeps
    rival = hold_lock(postgres_schema_url, other, "nightcrier-owner rival:1:abcd")
    try:
        # As after a lost connection: both clusters still held, neither lock confirmed.
        owner._owned, owner._unconfirmed = {mine, other}, {mine, other}
        assert owner._reassert(conn), "a cluster another process holds is given up"
        assert owner.owns(mine) and not owner.owns(other)
        wait_for(lambda: stale.closed or not _answers(stale), what="our stale session ended")
        wait_for(lambda: not owner._reassert(conn) and not owner.unconfirmed(), what="the lock taken again")
        assert owner.owns(mine)
        owner._take_free_clusters(conn, True)
        assert owner.owners() == {mine: owner.instance, other: "rival:1:abcd"}
    finally:
        for c in (conn, stale, rival):
            c.close()


@pytest.mark.postgres
def test_two_processes_on_a_host_with_a_long_name_never_end_each_others_sessions(
        tmp_path: Path, postgres_schema_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL keeps 63 bytes of an application_name: the part that tells processes apart
    must survive the cut, or after an outage each would end the other's lock session as its own."""
    monkeypatch.setattr(nc.socket, "gethostname", lambda: "nöde-" + "x" * 195)  # non-ASCII too
    first_cluster, second_cluster = f"one-{uuid.uuid4().hex[:8]}", f"two-{uuid.uuid4().hex[:8]}"
    both = [first_cluster, second_cluster]
    first = ownership(tmp_path, postgres_schema_url, both, nc.new_instance_id())
    second = ownership(tmp_path, postgres_schema_url, both, nc.new_instance_id())
    assert first.app_name != second.app_name
    assert len(first.app_name.encode()) == len(second.app_name.encode()) == nc.PG_NAME_BYTES
    first_conn, second_conn = first._connect(), second._connect()
    try:
        for conn, cluster in ((first_conn, first_cluster), (second_conn, second_cluster)):
            assert nc.ClusterOwnership._try_lock(conn.cursor(), cluster)
        names = {app for _, app in (first._holder(first_conn.cursor(), c) or (0, "") for c in both)}
        assert names == {first.app_name, second.app_name}, "the server keeps the names as built"
        # After an outage each believes it still holds both clusters.
        for owner in (first, second):
            owner._owned, owner._unconfirmed = set(both), set(both)
        assert first._reassert(first_conn) and second._reassert(second_conn)
        assert _answers(first_conn) and _answers(second_conn), "a session of the other process was ended"
        assert [c for c in both if first.owns(c)] == [first_cluster]
        assert [c for c in both if second.owns(c)] == [second_cluster]
    finally:
        first_conn.close()
        second_conn.close()


def _answers(conn: Any) -> bool:
    import psycopg2
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        return True
    except psycopg2.Error:
        return False


def test_held_clusters_are_kept_while_the_database_is_unreachable(tmp_path: Path) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{infra._free_port()}/postgres?connect_timeout=1"
    changes: list[int] = []
    owner = ownership(tmp_path, dead, ["c0"])
    owner.on_change = lambda: changes.append(1)
    owner._owned = {"c0"}
    owner.start()
    try:
        wait_for(lambda: owner.unconfirmed() == {"c0"}, what="the lock marked unconfirmed")
        assert owner.owns("c0") and not changes
    finally:
        owner.stop()
        owner.join(10)


# -- a PostgreSQL server the tests may stop ------------------------------------------------------------

class StoppablePostgres(infra._NativeServer):
    """A throwaway initdb/pg_ctl server that can be stopped and started again on the same port."""

    def halt(self) -> None:
        result = self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "fast", "-w", "stop")
        assert result.returncode == 0, result.stderr or result.stdout

    def resume(self) -> None:
        options = (f"-k {self.dir} -h 127.0.0.1 -p {self.port} -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=200")
        result = self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-l", self.log, "-w",
                           "-t", "30", "-o", options, "start")
        assert result.returncode == 0, self._log_tail() or result.stderr

    def answers(self) -> bool:
        return infra._pg_error(self.url) is None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[StoppablePostgres]:
    bindir = infra._native_bindir()
    if bindir is None:
        infra.unavailable("no initdb/pg_ctl under /usr/lib/postgresql/*/bin (install postgresql)")
    StoppablePostgres.reap_orphans(bindir)
    try:
        server = StoppablePostgres(bindir)
        server.start()
    except infra._Unavailable as exc:
        infra.unavailable(str(exc))
    yield server
    server.close()


@pytest.fixture
def database(postgres_server: StoppablePostgres) -> Iterator[str]:
    """A schema of the stoppable server, for one test."""
    if not postgres_server.answers():
        postgres_server.resume()
    schema = "o_" + uuid.uuid4().hex[:12]
    infra.create_schema(postgres_server.url, schema)
    yield infra.schema_url(postgres_server.url, schema)
    if not postgres_server.answers():
        postgres_server.resume()
    infra.drop_schema(postgres_server.url, schema)


# -- nightcrier processes and a fault stream ---------------------------------------------------------

class Fleet:
    """nightcrier processes started from the command line, one workspace (and spool) each."""

    def __init__(self, tmp_path: Path, servers: list[McpTestServer], database: str):
        self.tmp_path = tmp_path
        self.servers = servers
        self.database = database
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def config(self, name: str, database: str) -> Path:
        path = self.tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "workspace_root": str(self.tmp_path / f"ws-{name}"), "health_port": 0,
            "failover_seconds": FAILOVER, "sse_reconnect_initial_backoff": 0.05,
            "sse_reconnect_max_backoff": 0.5, "mcp_ping_interval": 1, "global_queue_size": 10000,
            "state_storage": {"type": "postgres", "postgres_connection_string": database,
                              "postgres_pool_wait": 2, "postgres_statement_timeout": 5},
            "clusters": [{"name": f"c{n}", "mcp": {"endpoint": s.url}, "triage": {"enabled": False}}
                         for n, s in enumerate(self.servers)]}))
        return path

    def start(self, name: str, database: str | None = None) -> subprocess.Popen[bytes]:
        with open(self.tmp_path / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, str(ROOT / "nightcrier.py"), "--config",
                 str(self.config(name, database or self.database))],
                stdout=subprocess.DEVNULL, stderr=log)
        return self.procs[name]

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    def spooled(self, name: str) -> str:
        """Everything in the process's spool files (a segment sealed meanwhile is read next time)."""
        text = []
        for path in (self.tmp_path / f"ws-{name}" / "spool").glob("*"):
            try:
                text.append(path.read_text(errors="replace"))
            except OSError:
                pass
        return "".join(text)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class FaultStream:
    """Emits faults at ``RATE`` per second, round robin over the servers, each with a marker of its
    own in the resource name; remembers how many subscriptions each one reached."""

    def __init__(self, servers: list[McpTestServer]):
        self.servers = servers
        self.delivered: dict[str, int] = {}
        self._sent = 0
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> FaultStream:
        self._running.set()
        self._thread.start()
        return self

    def pause(self) -> None:
        """Stop emitting; returns once no emit is under way."""
        with self._lock:
            self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def stop(self) -> None:
        self.pause()
        self._stop.set()
        self._running.set()
        self._thread.join()

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            self._running.wait()
            with self._lock:
                if not self._running.is_set() or self._stop.is_set():
                    continue
                n = self._sent
                self._sent += 1
                server = self.servers[n % len(self.servers)]
                marker = f"f-{n:06d}"
                result = server.emit(make_fault("PodCrash", name=marker, cluster=server.cluster))
                self.delivered[marker] = result["delivered"]
            # Pacing of the generator itself, not a wait for a condition.
            delay = start + (n + 1) / RATE - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                start -= delay  # after a pause, keep the rate instead of catching up

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.delivered)


def stored_markers(database: str) -> Counter[str]:
    """How many incidents each marker has, read straight from the database."""
    import psycopg2
    conn = psycopg2.connect(database)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT resource_name, COUNT(*) FROM incidents GROUP BY resource_name")
            return Counter(dict(cur.fetchall()))
    finally:
        conn.close()


def owner_sessions(url: str) -> int:
    import psycopg2
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM pg_stat_activity "
                        "WHERE application_name LIKE 'nightcrier-owner %'")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def live_subscriptions(server: McpTestServer) -> int:
    """Subscriptions whose session has its GET stream open."""
    with server._cond:
        run = server._run
        if run is None:
            return 0
        return sum(1 for sub in run.subs.values()
                   if not sub.degraded and (stream := run.stream_of(sub.session_id)) and not stream.closed)


class SubscriptionWatch:
    """Samples the servers' live subscriptions until stopped: the fewest and the most seen at once."""

    def __init__(self, servers: list[McpTestServer]):
        self.servers = servers
        self.fewest = 1_000
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            counts = [live_subscriptions(s) for s in self.servers]
            self.fewest = min([self.fewest, *counts])
            self.most = max([self.most, *counts])

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._thread.join()
        return self.fewest, self.most


@pytest.fixture
def mcp_servers() -> Iterator[list[McpTestServer]]:
    started = [McpTestServer(cluster=f"kind-{n}").start() for n in range(2)]
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def fleet(tmp_path: Path, mcp_servers: list[McpTestServer], database: str) -> Iterator[Fleet]:
    running = Fleet(tmp_path, mcp_servers, database)
    yield running
    running.stop()


def subscribed(servers: list[McpTestServer]) -> bool:
    return all(live_subscriptions(s) == 1 for s in servers)


def flow_until_stored(stream: FaultStream, database: str, count: int) -> None:
    """Let faults flow until ``count`` more than now are stored."""
    base = sum(stored_markers(database).values())
    wait_for(lambda: sum(stored_markers(database).values()) >= base + count, timeout=30,
             what=f"{count} more incidents stored", interval=0.2)


def assert_each_stored_once(stream: FaultStream, database: str) -> dict[str, int]:
    """Every fault that reached a subscription is stored exactly once; returns what was sent."""
    sent = stream.snapshot()
    expected = {m for m, n in sent.items() if n}

    deadline = time.monotonic() + 60
    while (missing := expected - set(stored_markers(database))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not missing, f"{len(missing)} of {len(expected)} delivered faults never stored: {sorted(missing)}"
    stored = stored_markers(database)
    doubled = {m: n for m, n in stored.items() if n != 1}
    assert not doubled, f"faults stored more than once: {sorted(doubled)[:10]}"
    assert set(stored) == expected, f"stored but never delivered: {sorted(set(stored) - expected)[:10]}"
    return sent


def run_outage(postgres: StoppablePostgres, stream: FaultStream, during: Callable[[], None] = lambda: None
               ) -> None:
    """Stop PostgreSQL for OUTAGE seconds, calling ``during`` once it is down."""
    postgres.halt()
    down_since = time.monotonic()
    during()
    remaining = OUTAGE - (time.monotonic() - down_since)
    # The outage is the scenario under test: its length is fixed, not waited on.
    threading.Event().wait(max(0.0, remaining))
    postgres.resume()


# -- outages --------------------------------------------------------------------------------------

@pytest.mark.postgres
@pytest.mark.outage
def test_one_process_keeps_watching_through_an_outage(fleet: Fleet, mcp_servers: list[McpTestServer],
                                                      postgres_server: StoppablePostgres,
                                                      database: str) -> None:
    fleet.start("solo")
    wait_for(lambda: subscribed(mcp_servers), timeout=30, what="both clusters watched")
    stream = FaultStream(mcp_servers).start()
    watch = SubscriptionWatch(mcp_servers)
    try:
        flow_until_stored(stream, database, 50)
        run_outage(postgres_server, stream, during=lambda: wait_for(
            lambda: "spooling events" in fleet.log("solo"), timeout=30, what="the events to be spooled"))
        flow_until_stored(stream, database, 50)
    finally:
        stream.stop()
    sent = assert_each_stored_once(stream, database)
    assert watch.stop() == (1, 1), "the subscriptions were kept, never doubled"
    assert all(sent.values()), "every fault reached a subscription"
    assert len(sent) >= RATE * OUTAGE
    assert "unsubscribing" not in fleet.log("solo")
    assert fleet.procs["solo"].poll() is None


@pytest.mark.postgres
@pytest.mark.outage
def test_two_replicas_through_an_outage(fleet: Fleet, mcp_servers: list[McpTestServer],
                                        postgres_server: StoppablePostgres, database: str) -> None:
    fleet.start("a")
    wait_for(lambda: subscribed(mcp_servers), timeout=30, what="both clusters watched")
    fleet.start("b")
    wait_for(lambda: owner_sessions(postgres_server.url) == 2, timeout=30, what="the replica standing by")
    stream = FaultStream(mcp_servers).start()
    watch = SubscriptionWatch(mcp_servers)
    try:
        flow_until_stored(stream, database, 50)
        run_outage(postgres_server, stream)
        wait_for(lambda: owner_sessions(postgres_server.url) == 2, timeout=30, what="both back")
        wait_for(lambda: "cluster ownership re-asserted" in fleet.log("a"), timeout=30,
                 what="the holder to re-assert its clusters")
        flow_until_stored(stream, database, 50)
    finally:
        stream.stop()
    sent = assert_each_stored_once(stream, database)
    assert watch.stop() == (1, 1), "the holder kept both clusters; the standby never subscribed"
    assert all(sent.values()), "every fault reached a subscription"
    assert "cluster taken" not in fleet.log("b")


@pytest.mark.postgres
@pytest.mark.outage
def test_kill_9_during_an_outage_and_restart(fleet: Fleet, mcp_servers: list[McpTestServer],
                                            postgres_server: StoppablePostgres, database: str) -> None:
    victim = fleet.start("a")
    wait_for(lambda: subscribed(mcp_servers), timeout=30, what="both clusters watched")
    fleet.start("b")
    wait_for(lambda: owner_sessions(postgres_server.url) == 2, timeout=30, what="the replica standing by")
    stream = FaultStream(mcp_servers).start()

    def kill_once_spooled() -> None:
        # Counted once the database is down: what was delivered before may have been stored.
        delivered_before_down = len(stream.snapshot())
        wait_for(lambda: "spooling events" in fleet.log("a"), timeout=30, what="the events to be spooled")
        # Bytes a process has received but not yet written anywhere die with it; kill it once
        # everything delivered to it is on disk, then let faults flow to nobody.
        threading.Event().wait(OUTAGE / 3)
        stream.pause()
        since_down = [m for m, n in stream.snapshot().items() if n and int(m[2:]) >= delivered_before_down]
        def all_spooled() -> bool:
            spool = fleet.spooled("a")
            return all(m in spool for m in since_down)

        wait_for(all_spooled, timeout=20, interval=0.2,
                 what="every fault received during the outage spooled")
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        # Until the server notices, a write to the dead process's stream still "succeeds".
        wait_for(lambda: not any(s.open_get_streams() for s in mcp_servers), timeout=10,
                 what="the server to see the killed process's streams closed")
        stream.resume()

    try:
        flow_until_stored(stream, database, 50)
        run_outage(postgres_server, stream, during=kill_once_spooled)
        # The holder died during the outage: the standby takes its clusters once it has given the
        # holder failover_seconds to come back; the restarted one stores what the dead one spooled.
        wait_for(lambda: subscribed(mcp_servers), timeout=FAILOVER + 30, what="both clusters watched again")
        assert "cluster taken" in fleet.log("b")
        fleet.start("a")
        wait_for(lambda: "spool replayed" in fleet.log("a"), timeout=30, what="the spool replayed")
        flow_until_stored(stream, database, 50)
    finally:
        stream.stop()
    sent = assert_each_stored_once(stream, database)
    lost = [m for m, n in sent.items() if not n]
    assert lost, "faults sent while no process watched reach nobody (the server replays nothing)"


def set_login(url: str, role: str, allowed: bool) -> None:
    """Let ``role`` log in, or not; when not, end its sessions too: to the server, and to the
    process using the role, the database is gone while it stays up for everyone else."""
    import psycopg2
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f"ALTER ROLE {role} {'LOGIN' if allowed else 'NOLOGIN'}")
            if not allowed:
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                            (role,))
    finally:
        conn.close()


@pytest.mark.postgres
@pytest.mark.outage
def test_a_replica_that_alone_lost_the_database_overlaps_without_doubles(
        fleet: Fleet, mcp_servers: list[McpTestServer], postgres_server: StoppablePostgres,
        database: str) -> None:
    role = "replica_" + uuid.uuid4().hex[:8]
    infra._execute(postgres_server.url, f"CREATE ROLE {role} SUPERUSER LOGIN")
    fleet.start("a", database.replace("://postgres@", f"://{role}@"))
    wait_for(lambda: subscribed(mcp_servers), timeout=30, what="both clusters watched")
    fleet.start("b")
    wait_for(lambda: owner_sessions(postgres_server.url) == 2, timeout=30, what="the replica standing by")
    stream = FaultStream(mcp_servers).start()
    try:
        flow_until_stored(stream, database, 50)
        set_login(postgres_server.url, role, False)
        # The server ends the first process's sessions and frees its locks; the second takes over
        # while the first, which cannot tell the difference from an outage, keeps watching and spools.
        wait_for(lambda: "cluster taken" in fleet.log("b"), timeout=FAILOVER + 10, what="the take-over")
        wait_for(lambda: all(live_subscriptions(s) == 2 for s in mcp_servers), timeout=30,
                 what="both processes subscribed")
        overlap_from = len(stream.snapshot())
        wait_for(lambda: len(stream.snapshot()) >= overlap_from + RATE, timeout=10, what="faults in overlap")
        set_login(postgres_server.url, role, True)
        wait_for(lambda: "giving it up" in fleet.log("a"), timeout=FAILOVER + 10,
                 what="the first process to give the clusters up")
        wait_for(lambda: subscribed(mcp_servers), timeout=30, what="one subscription per cluster again")
        flow_until_stored(stream, database, 50)
    finally:
        stream.stop()
    sent = assert_each_stored_once(stream, database)
    assert sum(1 for n in sent.values() if n == 2) >= RATE, "faults delivered to both were stored once"
    assert all(sent.values()), "every fault reached a subscription"
    assert "spool replayed" in fleet.log("a")


# -- the finish of a run: an outage as the agent ends, a COMMIT whose reply is lost ------------------

class _WriteLock:
    """An outage of a SQLite database: another connection holding its write lock."""

    def __init__(self, path: str):
        import sqlite3
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def end(self) -> None:
        self.conn.execute("ROLLBACK")


@pytest.fixture
def fragile_store(engine: str, tmp_path: Path, request: pytest.FixtureRequest
                  ) -> Iterator[tuple[nc.StateStore, Any]]:
    """A store that gives up on a busy or unreachable database within a second, and an object whose
    begin()/end() start and end an outage of it."""
    if engine == "sqlite":
        path = str(tmp_path / "nightcrier.db")
        store: nc.StateStore = nc.SqliteStore(path, busy_timeout=0.2)
        outage: Any = _WriteLock(path)
    else:
        proxy = TcpProxy(*_host_port(request.getfixturevalue("postgres_schema_url"))).start()
        store = nc.PostgresStore(proxy.url_for(request.getfixturevalue("postgres_schema_url")),
                                 wait=1, statement_timeout=2, connect_timeout=1)
        outage = proxy
        outage.begin, outage.end = proxy.cut, proxy.restore
    yield store, outage
    store.close()


def _host_port(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5432


def test_an_outage_as_each_run_ends_still_records_its_verdict_report_and_execution(
        tmp_path: Path, fragile_store: tuple[nc.StateStore, Any]) -> None:
    store, outage = fragile_store
    flags = tmp_path / "flags"
    flags.mkdir()
    agent = (f"{GOOD_AGENT}; touch {flags}/done-$INCIDENT_ID; "
             f"while [ ! -e {flags}/go-$INCIDENT_ID ]; do sleep 0.05; done")
    refused: list[str] = []
    finish_run = store.finish_run

    def watched_finish_run(incident_id: str, worker_id: str, outcome: nc.RunOutcome) -> bool:
        try:
            return finish_run(incident_id, worker_id, outcome)
        except nc.StoreUnavailable:
            refused.append(incident_id)
            raise

    store.finish_run = watched_finish_run  # type: ignore[method-assign]
    metrics = nc.Metrics()
    dispatcher = nc.Dispatcher(engine_config(tmp_path, agent, max_concurrent_agents=1), store,
                               nc.ProcessRunner(grace=1), threading.Event(), metrics, "test-instance")
    dispatcher.start()
    try:
        incident_ids = store.insert_events([make_event("c1"), make_event("c2")])
        dispatcher.wake.set()
        for incident_id in incident_ids:
            wait_for((flags / f"done-{incident_id}").exists, timeout=30, what="the agent to reach its end")
            outage.begin()
            try:
                (flags / f"go-{incident_id}").touch()
                wait_for(lambda i=incident_id: i in refused, timeout=30, what="recording to meet the outage")
            finally:
                outage.end()
            incident = wait_for(lambda i=incident_id: (found := store.get_incident(i))
                                and found.status != nc.INVESTIGATING and found, timeout=30,
                                what="the verdict")
            assert (incident.status, incident.attempts) == (nc.RESOLVED, 1)
            report = store.get_report(incident_id)
            assert report is not None and incident_id in report.report_markdown
            (execution,) = store.list_executions(incident_id)
            assert (execution.exit_code, execution.error_message) == (0, None)
            assert execution.completed_at is not None and report.execution_id == execution.execution_id
    finally:
        dispatcher.stop()
    assert metrics.value("worker_errors") == 0 and metrics.value("claims_lost") == 0


@pytest.mark.postgres
def test_a_commit_whose_reply_is_lost_is_neither_replayed_nor_misreported(postgres_schema_url: str) -> None:
    proxy = TcpProxy(*_host_port(postgres_schema_url)).start()
    store = nc.PostgresStore(proxy.url_for(postgres_schema_url))
    try:
        first, second = store.insert_events([make_event("c1"), make_event("c2")])

        def lost_reply(operation: Callable[[], Any], *, delivered: bool = True) -> Any:
            lost = proxy.commits_lost
            (proxy.lose_next_commit_reply if delivered else proxy.lose_next_commit)()
            result = operation()
            assert proxy.commits_lost == lost + 1, "the reply to the COMMIT was lost"
            return result

        claimed = lost_reply(lambda: store.claim_next("w"))
        assert claimed is not None and claimed.incident_id == first
        assert store.get_incident(second).status == nc.PENDING, "no ghost claim"  # type: ignore[union-attr]
        assert store.get_incident(first).attempts == 1  # type: ignore[union-attr]

        execution = lost_reply(lambda: store.start_execution(first, "image", {}))
        assert [e.execution_id for e in store.list_executions(first)] == [execution.execution_id]

        report = nc.TriageReport(nc.new_id(), first, execution.execution_id, nc.utcnow(), "# found it")
        outcome = nc.RunOutcome(execution.execution_id, 0, None, {}, nc.RESOLVED, None, report)
        assert lost_reply(lambda: store.finish_run(first, "w", outcome)) is True
        incident = store.get_incident(first)
        assert incident is not None and incident.status == nc.RESOLVED
        (finished,) = store.list_executions(first)
        assert (finished.exit_code, finished.error_message) == (0, None), "not closed as a lost claim"
        assert store.get_report(first).report_id == report.report_id  # type: ignore[union-attr]

        # A COMMIT that never reached the server: nothing was written, so the write is made again.
        assert lost_reply(lambda: store.claim_next("w"), delivered=False).incident_id == second
        assert store.get_incident(second).attempts == 1  # type: ignore[union-attr]
        assert lost_reply(lambda: store.complete(second, "w", nc.AGENT_FAILED, 1, "bad")) is True
        assert store.get_incident(second).status == nc.AGENT_FAILED  # type: ignore[union-attr]
    finally:
        store.close()
        proxy.cut()
