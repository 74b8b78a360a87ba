"""An operator's first hour: start-up errors as one line, health that tells the truth, id prefixes,
help that lists real commands, attempts that add up, and a demo that can be run twice."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import infra
import pytest
import yaml
from conftest import ROOT, wait_for
from test_ops import free_port, get, metric
from test_store_contract import make_event

import nightcrier as nc

HEAVY_MODULES = ("boto3", "botocore", "azure", "jinja2", "docker", "psycopg2", "requests",
                 "prometheus_client", "markdown_it", "sseclient")


def cli(*args: str, cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "nightcrier.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env={"PATH": os.environ["PATH"]})


def storage_of(engine: str, locator: str) -> dict[str, Any]:
    return ({"type": "sqlite", "sqlite_path": locator} if engine == "sqlite"
            else {"type": "postgres", "postgres_connection_string": locator})


def write_config(tmp_path: Path, **settings: Any) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "workspace_root": str(tmp_path / "ws"), "agent_runner": "process", "agent_command": ["true"],
        "clusters": [{"name": "prod", "mcp": {"endpoint": "http://127.0.0.1:9/mcp"}}], **settings}))
    return path


# -- start-up errors -------------------------------------------------------------------------

def test_a_busy_health_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        path = write_config(tmp_path, health_port=port,
                            state_storage={"type": "sqlite", "sqlite_path": str(tmp_path / "nc.db")})
        result = cli("--config", str(path))
    assert result.returncode == 2
    assert result.stderr == (f"nightcrier: health port {port} is already in use on 127.0.0.1; set "
                             "health_port (env HEALTH_PORT) to a free port, or 0 to disable it\n")


def test_a_second_run_on_one_sqlite_database_names_the_owner_once(tmp_path: Path) -> None:
    """Not the health port the owner holds too: the database's owner is the cause, said once."""
    path = write_config(tmp_path, health_port=free_port(),
                        state_storage={"type": "sqlite", "sqlite_path": str(tmp_path / "nc.db")})
    log = tmp_path / "first.log"
    with log.open("wb") as out:
        first = subprocess.Popen([sys.executable, str(ROOT / "nightcrier.py"), "--config", str(path)],
                                 stdout=out, stderr=out, cwd=tmp_path, env={"PATH": os.environ["PATH"]})
    try:
        wait_for(lambda: "nightcrier started" in log.read_text(), timeout=30, what="the first run")
        second = cli("--config", str(path), cwd=tmp_path)
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(30)
    assert second.returncode == 1
    assert second.stderr.count("\n") == 1, second.stderr
    assert f"is owned by another nightcrier run process (pid {first.pid} on host" in second.stderr
    assert "health port" not in second.stderr


def test_an_address_that_is_not_ours_is_named(tmp_path: Path) -> None:
    path = write_config(tmp_path, health_port=free_port(), health_bind="192.0.2.1",
                        state_storage={"type": "sqlite", "sqlite_path": str(tmp_path / "nc.db")})
    result = cli("--config", str(path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "health_bind '192.0.2.1' is not an address of this host" in result.stderr


def _with_database(base_url: str, *, user: str | None = None, dbname: str | None = None) -> str:
    parts = urllib.parse.urlsplit(base_url)
    netloc = parts.netloc
    if user is not None:
        netloc = f"{user}@{netloc.rsplit('@', 1)[-1]}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, path=f"/{dbname}" if dbname else parts.path,
                                                  query=""))


@pytest.mark.parametrize("what", ["database", "role"])
def test_a_database_that_refuses_us_is_one_line_and_exit_2(tmp_path: Path, postgres_base_url: str,
                                                             what: str) -> None:
    absent = "nc_absent_" + uuid.uuid4().hex[:8]
    url = (_with_database(postgres_base_url, dbname=absent) if what == "database"
           else _with_database(postgres_base_url, user=absent))
    path = write_config(tmp_path, health_port=0,
                        state_storage={"type": "postgres", "postgres_connection_string": url})
    result = cli("--config", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("nightcrier: the database refuses nightcrier: cannot connect to "
                                    "PostgreSQL")
    assert f'{what} "{absent}" does not exist' in result.stderr


@pytest.fixture
def password_postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server that asks for a password over TCP (the machine's own server
    trusts 127.0.0.1); yields its URL with the right password."""
    bindir = infra._native_bindir()
    if bindir is None:
        infra.unavailable("no initdb/pg_ctl for a throwaway PostgreSQL server")
    try:
        server = infra._NativeServer(bindir)
        url = server.start()
    except infra._Unavailable as exc:
        infra.unavailable(str(exc))
    try:
        import psycopg2
        conn = psycopg2.connect(url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("ALTER ROLE postgres PASSWORD 'the-password'")
        conn.close()
        hba = Path(server.data) / "pg_hba.conf"
        hba.write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        reloaded = server._run(os.path.join(bindir, "pg_ctl"), "-D", server.data, "reload")
        assert reloaded.returncode == 0, reloaded.stderr
        yield url.replace("postgres@", "postgres:the-password@", 1)
    finally:
        server.close()


def test_wrong_credentials_are_one_line_and_exit_2(tmp_path: Path, password_postgres: str) -> None:
    import psycopg2
    wait_for(lambda: _refuses(password_postgres.replace(":the-password@", ":nope@")), 10,
             "the server to ask for passwords")
    psycopg2.connect(password_postgres).close()  # the right one still works
    url = password_postgres.replace(":the-password@", ":not-the-password@")
    path = write_config(tmp_path, health_port=0,
                        state_storage={"type": "postgres", "postgres_connection_string": url})
    result = cli("--config", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "the database refuses nightcrier" in result.stderr
    assert "password authentication failed" in result.stderr
    assert "not-the-password" not in result.stderr


def _refuses(url: str) -> bool:
    import psycopg2
    try:
        psycopg2.connect(url).close()
    except psycopg2.OperationalError as exc:
        return "password authentication failed" in str(exc)
    return False


def test_a_database_that_is_down_is_retried_and_reported_in_readyz(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    port = free_port()
    path = write_config(tmp_path, health_port=port, state_storage={
        "type": "postgres", "postgres_connection_string": f"postgresql://postgres@127.0.0.1:{dead}/nc"})
    proc = subprocess.Popen([sys.executable, str(ROOT / "nightcrier.py"), "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"PATH": os.environ["PATH"]})
    try:
        def refused_reported() -> dict[str, Any] | None:
            try:
                status, body = get(f"http://127.0.0.1:{port}/readyz")
            except OSError:
                return None
            document = json.loads(body)
            return document if status == 503 and "Connection refused" in document["database"] else None

        document = wait_for(refused_reported, 30, "/readyz to report the database")
        assert document["ready"] is False and document["database"].startswith("unavailable: ")
        wait_for(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, 10, "/healthz")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "database unavailable, retrying" in stderr


# -- health and metrics -----------------------------------------------------------------------

def test_a_degraded_cluster_counts_as_unhealthy() -> None:
    healths = [nc.ClusterHealth("ok", status=nc.ACTIVE), nc.ClusterHealth("rbac", status=nc.ACTIVE),
               nc.ClusterHealth("stock", status=nc.UNSUPPORTED),
               nc.ClusterHealth("down", status=nc.FAILED_STATE)]
    permissions = {"ok": {"can_get_pods": True}, "rbac": {"error": "kubectl: Unauthorized"}}
    document = nc.cluster_health_document(healths, permissions, {"name": "process", "available": True})
    assert {c["name"]: c.get("degraded") for c in document["clusters"]} == {
        "ok": False, "rbac": True, "stock": None, "down": None}
    assert document["summary"] == {"total": 4, "active": 2, "standby": 0, "unhealthy": 3, "triage_enabled": 0}


def test_per_cluster_series_exist_at_zero_from_the_start(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(tmp_path, health_port=port, sse_reconnect_initial_backoff=30,
                        sse_reconnect_max_backoff=60,
                        state_storage={"type": "sqlite", "sqlite_path": str(tmp_path / "nc.db")},
                        clusters=[{"name": n, "mcp": {"endpoint": "http://127.0.0.1:9/mcp"}}
                                  for n in ("a", "b")])
    config, _ = nc.load_config(str(path), env={})
    service = nc.Service(config).start()
    try:
        status, text = get(f"http://127.0.0.1:{port}/metrics")
    finally:
        service.stop()
    assert status == 200
    for name in ("received", "rejected", "spooled", "dropped", "reconnects"):
        series = nc.Metrics.COUNTERS[name][0]
        for cluster in ("a", "b"):
            assert f'{series}{{cluster="{cluster}"}} 0.0' in text, f"{series} for {cluster} missing"
    assert metric(text, "nightcrier_events_received_total", cluster="a") == 0.0


def test_importing_nightcrier_loads_no_optional_library() -> None:
    """Start-up time: libraries only some features need are imported when those features run."""
    probe = ("import sys, nightcrier; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))")
    result = subprocess.run([sys.executable, "-c", probe, *HEAVY_MODULES], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- ids, help, attempts ------------------------------------------------------------------------

def fill(store: nc.StateStore, count: int) -> list[str]:
    store.insert_events([make_event("prod", resource_name=f"web-{n}", received_at=nc.utcnow())
                         for n in range(count)])
    return [i.incident_id for i in store.list_incidents(nc.IncidentFilter(limit=count))]


def test_incident_ids_are_found_by_prefix(store: nc.StateStore) -> None:
    ids = fill(store, 40)
    target = ids[0]
    assert store.find_incident_ids(target) == [target]
    assert store.find_incident_ids(target[:8]) == [target]
    assert store.find_incident_ids(target[:8].upper() + target[9:11]) == [target]
    assert store.find_incident_ids(target[:11]) == [target]
    # 40 ids over 16 first digits: one digit starts at least three of them.
    digit, count = Counter(i[0] for i in ids).most_common(1)[0]
    assert store.find_incident_ids(digit, limit=100) == sorted(i for i in ids if i[0] == digit)
    assert len(store.find_incident_ids(digit, limit=2)) == 2 and count >= 3
    for hopeless in ("", "xyz", "g", "0" * 33, "'; DROP TABLE incidents; --"):
        assert store.find_incident_ids(hopeless) == []


def test_show_and_tail_take_an_unambiguous_prefix(engine: str, store_locator: str, store: nc.StateStore,
                                                  tmp_path: Path) -> None:
    ids = fill(store, 40)
    claimed = store.claim_next("w")
    assert claimed is not None
    store.complete(claimed.incident_id, "w", nc.RESOLVED, 0, None)
    path = str(write_config(tmp_path, state_storage=storage_of(engine, store_locator)))
    prefix = claimed.incident_id[:8]
    shown = cli("show", prefix, "--config", path)
    assert shown.returncode == 0, shown.stderr
    assert f"incident id     {claimed.incident_id}" in shown.stdout
    tailed = cli("tail", prefix, "--config", path)
    assert tailed.returncode == 0, tailed.stderr
    assert f"incident {claimed.incident_id} resolved" in tailed.stdout

    digit = Counter(i[0] for i in ids).most_common(1)[0][0]
    for command in ("show", "tail"):
        ambiguous = cli(command, digit, "--config", path)
        assert ambiguous.returncode == 1
        candidates = re.findall(r"[0-9a-f]{8}-[0-9a-f-]{27}", ambiguous.stderr)
        assert len(candidates) >= 3 and all(c.startswith(digit) for c in candidates), ambiguous.stderr
        assert "matches several incidents" in ambiguous.stderr and "give more of the id" in ambiguous.stderr
    missing = cli("show", "ffffffffffff", "--config", path)
    assert missing.returncode == 1 and "no incident 'ffffffffffff'" in missing.stderr


def test_help_lists_only_real_commands() -> None:
    result = cli("--help")
    assert result.returncode == 0
    assert "SUPPRESS" not in result.stdout
    listed = re.findall(r"^    ([a-z-]+)", result.stdout, re.MULTILINE)
    assert listed == ["run", "check-config", "tail", "incidents", "show", "link", "prune", "retry",
                      "simulate", "demo", "agent-check", "stub-agent", "version"]
    for command in listed:
        assert cli(command, "--help").returncode == 0


def test_show_reconciles_attempts_with_the_runs_it_lists(engine: str, store_locator: str,
                                                         store: nc.StateStore, tmp_path: Path) -> None:
    fill(store, 1)
    first = store.claim_next("w")
    assert first is not None
    interrupted = store.start_execution(first.incident_id, "process", {})
    store.finish_execution(interrupted.execution_id, None, "stopped for shutdown", {})
    assert store.release(first.incident_id, "w", "nightcrier shut down while the agent ran")
    second = store.claim_next("w")
    assert second is not None and second.attempts == 1
    run = store.start_execution(second.incident_id, "process", {})
    store.finish_execution(run.execution_id, 0, None, {})
    store.complete(second.incident_id, "w", nc.RESOLVED, 0, None)
    path = str(write_config(tmp_path, state_storage=storage_of(engine, store_locator)))

    text = cli("show", second.incident_id, "--config", path)
    assert text.returncode == 0, text.stderr
    assert ("attempts        1 attempt, final (2 runs below; 1 was returned to pending by a shutdown or an "
            "unavailable runner and not counted)") in text.stdout
    assert len(re.findall(r"^  \d{4}-\d\d-\d\d .* -> ", text.stdout, re.MULTILINE)) == 2
    document = json.loads(cli("show", second.incident_id, "--config", path, "--json").stdout)
    assert (document["attempts"], document["runs"], len(document["executions"])) == (1, 2, 2)


def test_a_final_incident_shows_its_attempts_as_final(store: nc.StateStore, engine: str,
                                                      store_locator: str, tmp_path: Path) -> None:
    fill(store, 1)
    claimed = store.claim_next("w")
    assert claimed is not None
    run = store.start_execution(claimed.incident_id, "process", {})
    store.finish_execution(run.execution_id, 1, "agent exited with 1", {})
    store.complete(claimed.incident_id, "w", nc.AGENT_FAILED, 1, "agent exited with 1")
    path = str(write_config(tmp_path, state_storage=storage_of(engine, store_locator)))
    text = cli("show", claimed.incident_id, "--config", path)
    assert text.returncode == 0, text.stderr
    assert "attempts        1 attempt, final\n" in text.stdout


def test_the_demo_names_the_interpreter_it_ran_under(tmp_path: Path) -> None:
    """Its look-around commands work when pasted: the same interpreter, quoted for the shell."""
    interpreter = tmp_path / "my python" / "python"
    interpreter.parent.mkdir()
    interpreter.symlink_to(sys.executable)
    demo = tmp_path / "demo"
    # Called by another name, a virtual environment's interpreter no longer finds its own
    # libraries; this test's import path stands in for them.
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run([str(interpreter), str(ROOT / "nightcrier.py"), "demo", "--dir", str(demo),
                             "--faults", "1", "--rate", "10"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    program = f"'{interpreter}' {ROOT / 'nightcrier.py'}"
    assert f"  {program} incidents --config {demo / 'config.yaml'}\n" in result.stdout


def test_a_missing_library_is_one_line_saying_how_to_install_it(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    # None in sys.modules makes `import yaml` fail as it does where PyYAML is not installed.
    hide_yaml = ("import runpy, sys; sys.modules['yaml'] = None; "
                 f"sys.argv = ['nightcrier.py', 'check-config', '--config', {str(path)!r}]; "
                 f"runpy.run_path({str(ROOT / 'nightcrier.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", hide_yaml], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path, env={"PATH": os.environ["PATH"]})
    assert result.returncode == 1
    assert result.stderr == ("nightcrier: the Python library 'yaml' is not installed: install nightcrier's "
                             "libraries with `pip install -r requirements.txt`, or run nightcrier.pyz, "
                             "which includes them\n")


def test_demo_in_an_existing_directory_counts_only_new_faults(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    first = cli("demo", "--dir", str(demo), "--faults", "2", "--rate", "10", cwd=tmp_path, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "reusing" not in first.stdout
    second = cli("demo", "--dir", str(demo), "--faults", "2", "--rate", "10", cwd=tmp_path, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "reusing this directory: its 2 earlier incidents stay in the database" in second.stdout
    created = re.findall(r" created   ([0-9a-f-]{36}) ", second.stdout)
    resolved = re.findall(r" resolved  ([0-9a-f-]{36})", second.stdout)
    earlier = set(re.findall(r" created   ([0-9a-f-]{36}) ", first.stdout))
    assert len(created) == 2 and sorted(created) == sorted(resolved)
    assert not earlier & set(created)
