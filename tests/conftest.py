"""Shared fixtures: the store under test on each SQL engine, and helpers to wait on conditions."""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Set by tests/test_zipapp.py to run tests against a built nightcrier.pyz instead of this checkout.
PYZ = os.environ.get("NIGHTCRIER_TEST_PYZ")
# Modules whose origin a run against the pyz reports (to NIGHTCRIER_TEST_PYZ_REPORT) at its end.
PYZ_REPORTED_MODULES = ("nightcrier", "yaml", "requests", "boto3", "botocore", "azure.storage.blob",
                        "cryptography")


def _start_like_the_pyz(pyz: str) -> None:
    """Import nightcrier as ``python nightcrier.pyz`` does: its bootstrap runs here (as for --version),
    leaving the extracted nightcrier in sys.modules and its import hook for optional features in place."""
    argv, sys.argv = sys.argv, [pyz, "--version"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(pyz, run_name="__main__")
    except SystemExit as exc:
        if exc.code:
            raise RuntimeError(f"{pyz} --version exited {exc.code}") from None
    finally:
        sys.argv = argv


if PYZ:
    _start_like_the_pyz(PYZ)

import infra  # noqa: E402

import nightcrier  # noqa: E402

ENGINES = ("sqlite", "postgres")


def pytest_sessionstart(session: pytest.Session) -> None:
    """A run meant for one SQLite library (tests/test_old_sqlite.py) must not test another."""
    expected = os.environ.get("NIGHTCRIER_EXPECT_SQLITE_VERSION")
    if expected and sqlite3.sqlite_version != expected:
        raise pytest.UsageError(f"sqlite3 loads SQLite {sqlite3.sqlite_version}, not {expected} "
                                f"(LD_LIBRARY_PATH={os.environ.get('LD_LIBRARY_PATH', '')})")


def open_test_store(engine: str, locator: str) -> nightcrier.StateStore:
    """A store on ``locator``: a SQLite path, or a PostgreSQL URL confined to one schema."""
    if engine == "sqlite":
        return nightcrier.SqliteStore(locator)
    return nightcrier.PostgresStore(locator, max_open=25, wait=30)


def _schema_for_test(base_url: str) -> Iterator[str]:
    schema = "t_" + uuid.uuid4().hex[:12]
    infra.create_schema(base_url, schema)
    yield infra.schema_url(base_url, schema)
    infra.drop_schema(base_url, schema)


@pytest.fixture(scope="session")
def postgres_base_url() -> Iterator[str]:
    yield infra.postgres_base_url()


@pytest.fixture
def postgres_schema_url(postgres_base_url: str) -> Iterator[str]:
    """A URL whose every table lives in a schema of its own, dropped afterwards."""
    yield from _schema_for_test(postgres_base_url)


@pytest.fixture(scope="session")
def testcontainers_base_url() -> Iterator[str]:
    """PostgreSQL in a container started by testcontainers, as teams run it in their own CI."""
    yield infra.testcontainers_postgres_url()


@pytest.fixture
def testcontainers_schema_url(testcontainers_base_url: str) -> Iterator[str]:
    yield from _schema_for_test(testcontainers_base_url)


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store_locator(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if engine == "sqlite":
        return str(tmp_path / "nightcrier.db")
    if engine == "postgres-testcontainers":
        return request.getfixturevalue("testcontainers_schema_url")
    return request.getfixturevalue("postgres_schema_url")


@pytest.fixture
def store_factory(engine: str, store_locator: str) -> Iterator[Callable[[], nightcrier.StateStore]]:
    """Opens further stores on the same database; all are closed after the test."""
    opened: list[nightcrier.StateStore] = []

    def factory() -> nightcrier.StateStore:
        store = open_test_store(engine, store_locator)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(store_factory: Callable[[], nightcrier.StateStore]) -> nightcrier.StateStore:
    return store_factory()


def stored_payload(store: nightcrier.StateStore, event_id: str) -> Any:
    """The ``mcp_payload`` stored for an event, as JSON, on either engine."""
    if isinstance(store, nightcrier.SqliteStore):
        (row,) = store._read("SELECT mcp_payload FROM fault_events WHERE event_id = ?", (event_id,))
        return json.loads(row[0])
    (row,) = store._select("SELECT mcp_payload FROM fault_events WHERE event_id = %s",  # type: ignore[attr-defined]
                           (event_id,))
    return row["mcp_payload"]


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    infra.shutdown()
    report = os.environ.get("NIGHTCRIER_TEST_PYZ_REPORT")
    if PYZ and report:
        Path(report).write_text(json.dumps({name: getattr(sys.modules.get(name), "__file__", None)
                                            for name in PYZ_REPORTED_MODULES}))


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Configuration tests must not see the developer's own environment variables."""
    for key in nightcrier.SCALAR_KEYS:
        monkeypatch.delenv(key.env, raising=False)
