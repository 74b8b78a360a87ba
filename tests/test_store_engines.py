"""What each engine promises beyond the shared contract: SQLite settings, the PostgreSQL pool."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from pathlib import Path

import psycopg2
import pytest
import yaml
from conftest import wait_for
from test_store_contract import make_event

import nightcrier as nc

# -- SQLite -----------------------------------------------------------------------------


def test_sqlite_connection_settings(tmp_path: Path) -> None:
    store = nc.SqliteStore(str(tmp_path / "nc.db"), busy_timeout=12.5)
    conn = store._conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1, "NORMAL"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 12500
    store.close()


def test_sqlite_creates_its_directory_and_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "nc.db"
    nc.SqliteStore(str(path)).close()
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_sqlite_files_are_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """The -wal and -shm files hold what the database holds (the report-link key): never 0644."""
    directory = tmp_path / "state"
    previous = os.umask(umask)
    try:
        store = nc.SqliteStore(str(directory / "nc.db"), owner="instance-1")
        store.insert_events([make_event()])
        store.shared_value("secret", lambda: "key material")
        made = {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}
        store.close()
    finally:
        os.umask(previous)
    assert {"nc.db", "nc.db-wal", "nc.db-shm", "nc.db.lock"} <= set(made)
    assert made == dict.fromkeys(made, 0o600)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_sqlite_has_one_connection_per_thread_closed_when_the_thread_ends(tmp_path: Path) -> None:
    store = nc.SqliteStore(str(tmp_path / "nc.db"))
    store.ping()
    seen: list[object] = []

    def use() -> None:
        store.ping()
        seen.append(store._conn())

    threads = [threading.Thread(target=use) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(c) for c in seen}) == 3 and store._conn() not in seen
    wait_for(lambda: len(store._conns) == 1, what="connections of ended threads to close")
    store.close()


def test_sqlite_foreign_keys_are_enforced(tmp_path: Path) -> None:
    store = nc.SqliteStore(str(tmp_path / "nc.db"))
    with pytest.raises(nc.StoreError, match="FOREIGN KEY"):
        store.start_execution(nc.new_id(), "img", {})
    store.close()


def test_sqlite_unopenable_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(nc.StoreUnavailable):
        nc.SqliteStore(str(tmp_path / "dir.db"))


@pytest.mark.parametrize(("message", "outage"), [
    ("database is locked", True), ("disk I/O error", True), ("unable to open database file", True),
    ("attempt to write a readonly database", True), ("database disk image is malformed", True),
    ('near "RETURNING": syntax error', False), ("no such table: incidents", False),
    ("no such column: x", False)])
def test_sqlite_errors_without_a_code_are_told_apart_by_their_text(message: str, outage: bool) -> None:
    """Python 3.10's sqlite3 exceptions carry no result code, only SQLite's message."""
    assert nc._sqlite_outage(sqlite3.OperationalError(message)) is outage


def test_sqlite_older_than_the_minimum_is_refused_at_open(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 30, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.30.1")
    with pytest.raises(nc.StoreError, match=r"SQLite 3\.30\.1 is too old: nightcrier needs SQLite >= 3\.31"):
        nc.SqliteStore(str(tmp_path / "nc.db"))
    assert not (tmp_path / "nc.db").exists()


def test_sqlite_writers_wait_instead_of_failing(tmp_path: Path) -> None:
    """A writer holding the lock delays, but does not fail, another process's writer."""
    path = str(tmp_path / "nc.db")
    store = nc.SqliteStore(path)
    blocker = nc.SqliteStore(path)
    held = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:
        def txn(conn: object) -> None:
            held.set()
            release.wait(10)
        blocker._write_fn(txn)

    thread = threading.Thread(target=hold_lock)
    thread.start()
    held.wait(10)
    timer = threading.Timer(0.3, release.set)
    timer.start()
    store.insert_events([make_event()])
    thread.join()
    assert release.is_set(), "the insert had to wait for the lock holder"
    assert len(store.list_incidents()) == 1
    store.close()
    blocker.close()


def test_sqlite_log_is_cut_short_while_writes_never_pause(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Under steady writes a passive checkpoint never lets SQLite start the log over, and the log's
    index, mapped by the process, grew its memory without end: the checkpointer truncates a log
    longer than its limit, with a writer and a reader busy all the while."""
    monkeypatch.setattr(nc, "SQLITE_WAL_LIMIT_FRAMES", 16)
    path = tmp_path / "nc.db"
    log = tmp_path / "nc.db-wal"
    store = nc.SqliteStore(str(path))
    stop = threading.Event()

    def write() -> None:
        while not stop.wait(0.005):
            store.insert_events([make_event()])

    def read() -> None:
        while not stop.wait(0.005):
            store.list_incidents(nc.IncidentFilter(limit=10))

    threads = [threading.Thread(target=write), threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    try:
        peak = wait_for(lambda: log.stat().st_size > 1 << 20 and log.stat().st_size, timeout=30,
                        what="the log to grow past 1 MiB")
        wait_for(lambda: log.stat().st_size < peak, timeout=10, what="the log to be truncated")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        store.close()


# -- PostgreSQL -------------------------------------------------------------------------------


@pytest.fixture
def pg_url(postgres_schema_url: str) -> str:
    return postgres_schema_url


def test_pool_waits_for_a_free_connection(pg_url: str) -> None:
    store = nc.PostgresStore(pg_url, max_open=1, wait=10)
    conn = store._pool.acquire()
    finished = threading.Event()

    def ping() -> None:
        store.ping()
        finished.set()

    thread = threading.Thread(target=ping)
    thread.start()
    assert not finished.wait(0.3), "the second user must wait while the only connection is out"
    store._pool.release(conn)
    assert finished.wait(10)
    thread.join()
    store.close()


def test_pool_gives_up_after_its_wait(pg_url: str) -> None:
    store = nc.PostgresStore(pg_url, max_open=1, wait=0.2)
    conn = store._pool.acquire()
    with pytest.raises(nc.StoreUnavailable, match="no free PostgreSQL connection"):
        store.ping()
    store._pool.release(conn)
    store.ping()
    store.close()


def test_pool_keeps_at_most_max_idle_and_replaces_old_connections(pg_url: str) -> None:
    store = nc.PostgresStore(pg_url, max_open=4, max_idle=1, max_lifetime=3600)
    pool = store._pool
    conns = [pool.acquire() for _ in range(3)]
    for conn in conns:
        pool.release(conn)
    assert len(pool._idle) == 1 and pool._open == 1
    assert all(c.closed for c in conns[1:])
    pool.max_lifetime = 0
    old = pool._idle[0][0]
    store.ping()
    assert old.closed, "an expired connection is replaced, not reused"
    store.close()


def test_statement_timeout_applies(pg_url: str) -> None:
    store = nc.PostgresStore(pg_url, statement_timeout=0.2)
    with pytest.raises(nc.StoreUnavailable, match="statement timeout"):
        store._select("SELECT pg_sleep(2)")
    store.ping()
    store.close()


def test_broken_connections_are_discarded_and_the_call_retried(pg_url: str) -> None:
    """What a server restart looks like from the client: every pooled connection dies."""
    store = nc.PostgresStore(pg_url, max_open=4, max_idle=4)
    (incident_id,) = store.insert_events([make_event()])
    pids = []
    conns = [store._pool.acquire() for _ in range(3)]
    for conn in conns:
        pids.append(conn.get_backend_pid())
        store._pool.release(conn)
    admin = psycopg2.connect(pg_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
    admin.close()
    assert store.get_incident(incident_id) is not None
    claimed = store.claim_next("w")
    assert claimed is not None and claimed.incident_id == incident_id
    store.close()


def test_unreachable_server_is_unavailable_not_a_crash() -> None:
    with pytest.raises(nc.StoreUnavailable, match="cannot connect to PostgreSQL"):
        nc.PostgresStore("postgresql://nobody:pw@127.0.0.1:1/db?connect_timeout=2", wait=1)


def test_connection_errors_do_not_show_the_password() -> None:
    with pytest.raises(nc.StoreUnavailable) as info:
        nc.PostgresStore("postgresql://nobody:sup3rsecret@127.0.0.1:1/db", wait=1)
    assert "sup3rsecret" not in str(info.value)


def _server_has_ssl(url: str) -> bool:
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute("SHOW ssl")
        on = cur.fetchone()[0] == "on"
    conn.close()
    return on


def _ssl_in_use(store: nc.PostgresStore) -> bool:
    rows = store._select("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    return bool(rows[0]["ssl"])


@pytest.mark.parametrize("sslmode", ["disable", "require", "verify-ca", "verify-full"])
def test_sslmode_of_the_connection_string_is_honoured(pg_url: str, sslmode: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # With no root certificate to check against, verify-* must refuse, whatever the server offers.
    monkeypatch.setenv("PGSSLROOTCERT", str(tmp_path / "no-such-root.crt"))
    url = f"{pg_url}&sslmode={sslmode}" if "?" in pg_url else f"{pg_url}?sslmode={sslmode}"
    has_ssl = _server_has_ssl(pg_url)
    if sslmode == "disable" or (sslmode == "require" and has_ssl):
        store = nc.PostgresStore(url)
        assert _ssl_in_use(store) == (sslmode == "require")
        store.close()
    else:
        with pytest.raises(nc.StoreUnavailable):
            nc.PostgresStore(url, wait=1)


def test_migration_is_serialised_between_processes_starting_together(pg_url: str) -> None:
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            nc.PostgresStore(pg_url).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    store = nc.PostgresStore(pg_url)
    versions = [r["version"] for r in store._select("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == list(range(1, nc.latest_schema_version("postgres") + 1)), "each applied once"
    store.close()


def test_losing_a_race_for_a_cluster_moves_on_to_another(pg_url: str) -> None:
    """The partial unique index settles a race that row locks alone cannot.

    An open transaction has flipped the oldest incident of cluster "same" but not
    committed; a claim skips that locked row, tries the next incident of "same",
    waits on the index, loses when the transaction commits, and takes "other".
    """
    store = nc.PostgresStore(pg_url)
    oldest, _, other = (make_event("same", received_at=nc.utcnow()),
                        make_event("same", received_at=nc.utcnow()),
                        make_event("other", received_at=nc.utcnow()))
    store.insert_events([oldest, _, other])
    rival = psycopg2.connect(pg_url)
    with rival.cursor() as cur:
        cur.execute("UPDATE incidents SET status = 'investigating', claimed_by = 'rival', "
                    "heartbeat_at = now() WHERE incident_id = %s", (oldest.incident_id,))
    result: list[nc.Incident | None] = []
    claimer = threading.Thread(target=lambda: result.append(store.claim_next("me")))
    claimer.start()
    wait_for(lambda: _waiting_on_a_lock(pg_url), what="the claim to wait on the rival's transaction")
    rival.commit()
    rival.close()
    claimer.join(10)
    assert result and result[0] is not None and result[0].incident_id == other.incident_id
    assert store.claim_next("me") is None
    store.close()


def _waiting_on_a_lock(url: str) -> bool:
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND application_name = 'nightcrier'")
        waiting = cur.fetchone()[0] > 0
    conn.close()
    return waiting


def test_work_announced_by_one_process_wakes_another(pg_url: str) -> None:
    """LISTEN/NOTIFY: ingest or a freed cluster in one process wakes dispatchers in the others."""
    writer, other = nc.PostgresStore(pg_url), nc.PostgresStore(pg_url)
    woken, stop = threading.Event(), threading.Event()
    watcher = threading.Thread(target=other.watch_for_work, args=(woken.set, stop), daemon=True)
    watcher.start()
    try:
        wait_for(woken.is_set, what="the first wake when listening starts")
        woken.clear()
        writer.insert_events([make_event("a")], skipped_clusters=["a"])
        assert not woken.wait(0.5), "skipped incidents are no work"
        writer.insert_events([make_event("a")])
        wait_for(woken.is_set, what="a wake after new pending work")
        claimed = other.claim_next("w")
        assert claimed is not None
        woken.clear()
        other.complete(claimed.incident_id, "w", nc.RESOLVED, 0, None)
        wait_for(woken.is_set, what="a wake after a cluster was freed")
    finally:
        stop.set()
        watcher.join(10)
        writer.close()
        other.close()


def test_every_kind_of_connection_notices_a_lost_peer_as_its_kind_must(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool and LISTEN give a silent server a minute; the sessions whose locks other processes
    wait on (liveness, cluster ownership) give it seconds, and make the server do the same."""
    seen: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
    opening = nc.pg_connect

    def recording(dsn: str, application_name: str, **options: object) -> object:
        conn = opening(dsn, application_name, **options)
        with conn.cursor() as cur:
            cur.execute("SELECT name, setting FROM pg_settings WHERE name IN ('tcp_keepalives_idle', "
                        "'tcp_keepalives_interval', 'tcp_keepalives_count', 'tcp_user_timeout')")
            server = dict(cur.fetchall())
        conn.rollback()
        seen[application_name.split(" ")[0]] = (conn.get_dsn_parameters(), server)
        return conn

    monkeypatch.setattr(nc, "pg_connect", recording)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "failover_seconds": 12, "state_storage": {"type": "postgres", "postgres_connection_string": pg_url},
        "clusters": [{"name": "a", "mcp": {"endpoint": "http://127.0.0.1:9/mcp"}}]}))
    config, _ = nc.load_config(str(tmp_path / "config.yaml"), env={})
    store = nc.PostgresStore(pg_url)
    owner = nc.ClusterOwnership(config, "test:kinds", on_change=lambda: None)
    stop = threading.Event()
    watcher = threading.Thread(target=store.watch_for_work, args=(lambda: None, stop), daemon=True)
    try:
        store.hold_liveness("test:kinds")
        watcher.start()
        owner.start()
        wait_for(lambda: {"nightcrier", "nightcrier-listen", "nightcrier-owner"} <= seen.keys(),
                 what="a connection of each kind")
    finally:
        owner.stop()
        stop.set()
        watcher.join(10)
        owner.join(10)
        store.close()
    client = {"keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout"}
    minute = {"keepalives_idle": "30", "keepalives_interval": "10", "keepalives_count": "3",
              "tcp_user_timeout": "60000"}
    for kind in ("nightcrier", "nightcrier-listen"):
        params, server = seen[kind]
        assert {k: params[k] for k in client} == minute, kind
        assert server["tcp_user_timeout"] == "0", f"{kind}: the server's own default stays"
    seconds = {"nightcrier-live": {**minute, "keepalives_idle": "5", "keepalives_interval": "1",
                                   "tcp_user_timeout": "8000"},
               "nightcrier-owner": {**minute, "keepalives_idle": "1", "keepalives_interval": "1",
                                    "tcp_user_timeout": "4000"}}  # failover_seconds / 3
    for kind, as_set in seconds.items():
        params, server = seen[kind]
        assert {k: params[k] for k in client} == as_set, kind
        assert server == {f"tcp_{k}" if k.startswith("keep") else k: v for k, v in as_set.items()}, kind


def test_no_connection_is_opened_but_by_the_factory() -> None:
    source = Path(nc.__file__).read_text()
    assert source.count("psycopg2.connect(") == 1
    assert source.index("psycopg2.connect(") > source.index("def pg_connect(")


def _plan_nodes(node: dict) -> list[dict]:
    return [node, *(n for child in node.get("Plans", ()) for n in _plan_nodes(child))]


def test_the_repeat_probe_looks_each_new_incident_up_by_its_fault_condition(pg_url: str) -> None:
    """Planned as a join, the probe read the whole repeatable index once per new incident."""
    store = nc.PostgresStore(pg_url)
    store.rules = nc.TriageRules(dedup_window=300)
    store.insert_events([make_event(f"c{n % 10}", fault_id=f"fault-{n}") for n in range(2000)])
    store.close()
    probe = nc.PG_REPEAT_PROBE.replace("%(window)s", "300")
    with psycopg2.connect(pg_url) as conn, conn.cursor() as cur:
        cur.execute("EXPLAIN (FORMAT JSON) WITH inc AS (INSERT INTO incidents SELECT * FROM "
                    "json_populate_recordset(NULL::incidents, '[]') RETURNING fault_id, cluster, created_at, "
                    f"status) SELECT {probe} AS repeats")
        (plan,), = cur.fetchall()
    lookups = [n for n in _plan_nodes(plan[0]["Plan"]) if n.get("Relation Name") == "incidents"
               and n["Node Type"] != "ModifyTable"]
    assert lookups and all("x.fault_id" in n.get("Index Cond", "") for n in lookups), lookups


def test_sqlite_has_no_notifications_and_returns_at_once(tmp_path: Path) -> None:
    store = nc.SqliteStore(str(tmp_path / "nc.db"))
    store.watch_for_work(lambda: None, threading.Event())
    store.close()
