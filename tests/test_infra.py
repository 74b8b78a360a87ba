"""The test infrastructure providers in tests/infra.py work on this machine.

Under ``NIGHTCRIER_REQUIRE_INFRA=1`` (CI) every test here must pass rather than skip: these are
the checks that the rest of the suite is actually exercising PostgreSQL and Docker.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator

import infra
import psycopg2
import pytest


def _scalar(url: str, query: str, params: tuple[object, ...] = ()) -> object:
    conn = psycopg2.connect(url, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            row = cur.fetchone()
            assert row is not None
            return row[0]
    finally:
        conn.close()


def test_unavailable_skips_or_fails_by_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(infra, "REQUIRE_INFRA", False)
    with pytest.raises(pytest.skip.Exception, match="no widget"):
        infra.unavailable("no widget")
    monkeypatch.setattr(infra, "REQUIRE_INFRA", True)
    with pytest.raises(pytest.fail.Exception, match="no widget"):
        infra.unavailable("no widget")


def test_schema_url_adds_search_path_and_keeps_other_parameters() -> None:
    base = "postgresql://u:p%40ss@db.example:5433/app?sslmode=disable&options=-cstatement_timeout%3D5000"
    url = infra.schema_url(base, "t_abc123")
    parts = urllib.parse.urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("postgresql", "u:p%40ss@db.example:5433", "/app")
    query = urllib.parse.parse_qs(parts.query)
    assert query["sslmode"] == ["disable"]
    assert query["options"] == ["-cstatement_timeout=5000 -csearch_path=t_abc123"]
    assert "=" not in parts.query.split("options=", 1)[1], "the option value must be percent-encoded"


@pytest.mark.parametrize("bad", ["", "Upper", "has-dash", "semi;colon", "1starts_with_digit", "x" * 64])
def test_schema_names_are_restricted_to_plain_identifiers(bad: str) -> None:
    with pytest.raises(ValueError):
        infra.schema_url("postgresql://127.0.0.1/db", bad)


@pytest.mark.postgres
def test_postgres_base_url_answers() -> None:
    assert _scalar(infra.postgres_base_url(), "select 1") == 1


@pytest.fixture
def two_schemas() -> Iterator[tuple[str, str, str]]:
    base = infra.postgres_base_url()
    a, b = (f"t_infra_{uuid.uuid4().hex[:10]}" for _ in range(2))
    infra.create_schema(base, a)
    infra.create_schema(base, b)
    try:
        yield base, a, b
    finally:
        infra.drop_schema(base, a)
        infra.drop_schema(base, b)


@pytest.mark.postgres
def test_schema_url_isolates_tables(two_schemas: tuple[str, str, str]) -> None:
    base, a, b = two_schemas
    url_a, url_b = infra.schema_url(base, a), infra.schema_url(base, b)
    conn = psycopg2.connect(url_a)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("create table incidents (id integer primary key)")
            cur.execute("insert into incidents values (7)")
    finally:
        conn.close()

    assert _scalar(url_a, "select id from incidents") == 7
    assert _scalar(url_a, "select current_schema()") == a
    assert _scalar(url_b, "select current_schema()") == b
    assert _scalar(url_b, "select to_regclass('incidents')") is None
    in_a = "select count(*) from pg_tables where tablename = 'incidents' and schemaname = %s"
    assert _scalar(base, in_a, (a,)) == 1

    infra.drop_schema(base, a)
    assert _scalar(base, "select count(*) from pg_namespace where nspname = %s", (a,)) == 0
    infra.drop_schema(base, a)  # dropping a missing schema is not an error


@pytest.mark.postgres
def test_native_route_runs_a_throwaway_server_when_forced() -> None:
    url = infra.postgres_base_url(route="native")
    assert infra.postgres_base_url(route="native") == url, "one server per process"
    data_dir = str(_scalar(url, "show data_directory"))
    assert os.path.basename(os.path.dirname(data_dir)).startswith("nightcrier-pg-")
    assert _scalar(url, "select 1") == 1
    if os.geteuid() == 0:
        # initdb refuses root, so the server must have been started as the postgres user.
        assert os.stat(data_dir).st_uid == pwd.getpwnam("postgres").pw_uid

    schema = f"t_native_{uuid.uuid4().hex[:10]}"
    infra.create_schema(url, schema)
    try:
        scoped = infra.schema_url(url, schema)
        assert _scalar(scoped, "select current_schema()") == schema
    finally:
        infra.drop_schema(url, schema)


@pytest.mark.postgres
@pytest.mark.docker
def test_testcontainers_postgres_url_connects() -> None:
    url = infra.testcontainers_postgres_url()
    assert infra.testcontainers_postgres_url() == url, "one container per process"
    assert str(_scalar(url, "select version()")).startswith("PostgreSQL ")
    assert _scalar(url, "select current_database()") == "nightcrier"


@pytest.mark.docker
def test_docker_runs_test_agent_image_with_bind_mount() -> None:
    image = infra.require_test_agent_image()
    client = infra.docker_client()
    hostdir = tempfile.mkdtemp(prefix="nightcrier-infra-", dir="/tmp")
    container = None
    try:
        assert client.ping()
        container = client.containers.run(
            image,
            ["sh", "-c", "echo hi; mkdir -p /w/output && echo report > /w/output/investigation.md"],
            volumes={hostdir: {"bind": "/w", "mode": "rw"}},
            network_mode="host",
            # Files written into the bind mount then belong to the test process and can be removed.
            user=f"{os.getuid()}:{os.getgid()}",
            labels={"nightcrier.test": "infra"},
            detach=True,
        )
        assert container.wait(timeout=60)["StatusCode"] == 0
        assert container.logs(stdout=True, stderr=False) == b"hi\n"
        with open(os.path.join(hostdir, "output", "investigation.md"), encoding="utf-8") as fh:
            assert fh.read() == "report\n"
    finally:
        if container is not None:
            container.remove(force=True)
        client.close()
        shutil.rmtree(hostdir, ignore_errors=True)


def _start_and_kill(route_call: str) -> str:
    """Run a provider in a child process, SIGKILL it once ready, and return the URL it printed."""
    child = subprocess.Popen(
        [sys.executable, "-c", f"import infra, time; print({route_call}, flush=True); time.sleep(120)"],
        cwd=os.path.dirname(os.path.abspath(__file__)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
    finally:
        child.kill()
        _, err = child.communicate(timeout=30)
    if not line.startswith("postgresql://"):
        pytest.fail(f"child did not report a URL: {err.strip()[-2000:]}")
    return line


@pytest.mark.postgres
def test_native_server_of_a_killed_process_is_reaped() -> None:
    infra.postgres_base_url(route="native")  # skips/fails here if the route cannot work at all
    url = _start_and_kill('infra.postgres_base_url(route="native")')
    data_dir = str(_scalar(url, "show data_directory"))

    bindir = infra._native_bindir()
    assert bindir is not None
    infra._NativeServer.reap_orphans(bindir)

    assert not os.path.exists(os.path.dirname(data_dir))
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(url, connect_timeout=5).close()
    # The live server of this process is not an orphan.
    assert _scalar(infra.postgres_base_url(route="native"), "select 1") == 1


@pytest.mark.postgres
@pytest.mark.docker
def test_container_of_a_killed_process_is_reaped() -> None:
    infra.testcontainers_postgres_url()  # skips/fails here if the route cannot work at all
    url = _start_and_kill("infra.testcontainers_postgres_url()")
    assert _scalar(url, "select 1") == 1

    infra._reap_orphan_containers()

    client = infra.docker_client()
    try:
        owners = [
            c.labels[infra._OWNER_LABEL]
            for c in client.containers.list(all=True, filters={"label": infra._OWNER_LABEL})
        ]
    finally:
        client.close()
    assert owners == [str(os.getpid())] * len(owners)
    assert str(os.getpid()) in owners, "the live container of this process must survive"
