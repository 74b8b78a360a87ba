"""Infrastructure providers for the test suite: PostgreSQL servers and a Docker engine.

Each provider either hands back something that works or calls :func:`unavailable`, which skips the
test on a developer machine and fails it when ``NIGHTCRIER_REQUIRE_INFRA=1`` (set by ``.ci/run``),
so CI can never go green by skipping everything.

PostgreSQL comes from the first route that applies (see :class:`PostgresProvider`):

1. ``NIGHTCRIER_TEST_POSTGRES_URL``: an existing database (``.ci/run`` creates one per run);
2. testcontainers with ``NIGHTCRIER_TEST_POSTGRES_IMAGE`` when a Docker engine answers;
3. a throwaway server made with ``initdb``/``pg_ctl`` from ``/usr/lib/postgresql/*/bin``.

Tests share one server per process and isolate themselves in schemas (:func:`schema_url`).
Servers and containers started here are stopped by :func:`shutdown` (also run at exit); those of a
test process that was killed are removed by the next process that starts the same kind.

Environment variables read here:

* ``NIGHTCRIER_REQUIRE_INFRA`` -- ``1`` turns skips into failures.
* ``NIGHTCRIER_TEST_POSTGRES_URL`` -- libpq URL of a database tests may create schemas in.
* ``NIGHTCRIER_TEST_POSTGRES_IMAGE`` -- PostgreSQL image for testcontainers (``.ci/build-images.sh``
  builds ``nightcrier-test-postgres:15`` because Docker Hub is not reachable).
* ``NIGHTCRIER_TEST_AGENT_IMAGE`` -- image the agent tests run (default
  ``nightcrier-test-agent:latest``, also built by ``.ci/build-images.sh``).
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import pytest

if TYPE_CHECKING:
    import docker

REQUIRE_INFRA: bool = os.environ.get("NIGHTCRIER_REQUIRE_INFRA") == "1"

TEST_AGENT_IMAGE: str = os.environ.get("NIGHTCRIER_TEST_AGENT_IMAGE", "nightcrier-test-agent:latest")
DEFAULT_TEST_POSTGRES_IMAGE = "nightcrier-test-postgres:15"

PostgresRoute = Literal["env", "testcontainers", "native"]

# Processes killed by a signal skip atexit, so what they started outlives them; these markers let
# the next test process find and remove it without touching resources of live concurrent runs.
_OWNER_LABEL = "nightcrier.test.owner-pid"
_OWNER_FILE = "owner.pid"
_NATIVE_PREFIX = "nightcrier-pg-"

_BUILD_HINT = "run `bash .ci/build-images.sh` (needs a running Docker engine; `bash .ci/run` starts one)"
_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class _Unavailable(Exception):
    """Raised inside the providers; turned into :func:`unavailable` at the public boundary."""


def unavailable(reason: str) -> NoReturn:
    """Stop the current test because infrastructure is missing.

    Fails the test when ``NIGHTCRIER_REQUIRE_INFRA=1`` and skips it otherwise. Never returns.
    """
    if REQUIRE_INFRA:
        pytest.fail(f"required test infrastructure unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def _pg_error(url: str) -> str | None:
    """Return why ``url`` does not accept ``select 1``, or None when it does."""
    try:
        import psycopg2
    except ImportError as exc:
        return f"psycopg2 is not installed ({exc})"
    try:
        conn = psycopg2.connect(url, connect_timeout=5)
    except psycopg2.Error as exc:
        return f"cannot connect to {_redact(url)}: {str(exc).strip()}"
    try:
        with conn.cursor() as cur:
            cur.execute("select 1")
            cur.fetchone()
    except psycopg2.Error as exc:
        return f"{_redact(url)} does not answer queries: {str(exc).strip()}"
    finally:
        conn.close()
    return None


def _redact(url: str) -> str:
    """Hide the password of a libpq URL for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _docker_error() -> str | None:
    """Return why no Docker engine answers, or None when one does."""
    try:
        import docker
    except ImportError as exc:
        return f"the docker package is not installed ({exc})"
    try:
        client = docker.from_env(timeout=30)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # the SDK raises DockerException, requests errors and OSError alike
        return f"no Docker engine answers ({type(exc).__name__}: {exc})"
    return None


def _configure_testcontainers() -> None:
    """Make testcontainers usable on machines without Docker Hub, unless the user chose otherwise.

    Ryuk (testcontainers' reaper) is an image from Docker Hub, so it is disabled; containers are
    stopped by :meth:`PostgresProvider.shutdown` instead, or reaped by the next test process.
    ``/.dockerenv`` exists on the project machines, which makes testcontainers assume it runs
    inside a container and connect through the bridge gateway; the engine is local, so localhost
    plus the mapped port is used instead.
    """
    from testcontainers.core.config import ConnectionMode, testcontainers_config

    if "TESTCONTAINERS_RYUK_DISABLED" not in os.environ:
        testcontainers_config.ryuk_disabled = True
    if "TESTCONTAINERS_CONNECTION_MODE" not in os.environ:
        testcontainers_config.connection_mode_override = ConnectionMode.docker_host


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _native_bindir() -> str | None:
    """Return the newest ``/usr/lib/postgresql/<version>/bin`` holding initdb and pg_ctl, if any."""
    candidates = [
        d
        for d in glob.glob("/usr/lib/postgresql/*/bin")
        if os.access(os.path.join(d, "initdb"), os.X_OK) and os.access(os.path.join(d, "pg_ctl"), os.X_OK)
    ]

    def version(path: str) -> tuple[int, ...]:
        name = os.path.basename(os.path.dirname(path))
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    return max(candidates, key=version) if candidates else None


def _pid_alive(pid: int) -> bool:
    """Return whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_dead(owner: str) -> bool:
    """Return whether ``owner`` (a recorded pid) names a process that has gone."""
    owner = owner.strip()
    return owner.isdigit() and not _pid_alive(int(owner))


def _reap_orphan_containers() -> None:
    """Remove PostgreSQL test containers whose owning test process died without stopping them."""
    import docker

    client = docker.from_env(timeout=30)
    try:
        for container in client.containers.list(all=True, filters={"label": _OWNER_LABEL}):
            if _owner_dead(container.labels.get(_OWNER_LABEL, "")):
                try:
                    container.remove(force=True)
                except docker.errors.APIError:
                    pass
    finally:
        client.close()


def _native_parent_dir() -> str:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class _NativeServer:
    """A PostgreSQL server in a temporary directory, run by initdb/pg_ctl.

    initdb refuses to run as root, so when the tests run as root the server runs as the
    ``postgres`` system user; its directory is then made with mkdtemp under /dev/shm (or /tmp) and
    chowned, because pytest's tmp_path is mode 0700 and out of that user's reach.
    """

    def __init__(self, bindir: str, directory: str | None = None) -> None:
        """Prepare a new server directory, or adopt ``directory`` left by an earlier process."""
        self.bindir = bindir
        if directory is None:
            directory = self._make_dir()
        self.dir = directory
        self.data = os.path.join(directory, "data")
        self.log = os.path.join(directory, "server.log")
        # Commands run as whoever owns the directory: initdb and pg_ctl refuse root.
        st = os.stat(directory)
        self.run_as: dict[str, Any] = (
            {"user": st.st_uid, "group": st.st_gid, "extra_groups": []} if os.geteuid() == 0 else {}
        )
        self.port = 0
        self.started = False

    @staticmethod
    def _make_dir() -> str:
        owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise _Unavailable(
                    "running as root and there is no `postgres` user to run initdb as"
                ) from None
        directory = tempfile.mkdtemp(prefix=_NATIVE_PREFIX, dir=_native_parent_dir())
        with open(os.path.join(directory, _OWNER_FILE), "w", encoding="ascii") as fh:
            fh.write(f"{os.getpid()}\n")
        if owner is not None:
            os.chown(directory, owner.pw_uid, owner.pw_gid)
        return directory

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.dir,
            env={**os.environ, "LC_ALL": "C.UTF-8"},
            **self.run_as,
        )

    def start(self) -> str:
        """Create and start the server and return its URL; raise _Unavailable if it cannot."""
        res = self._run(
            os.path.join(self.bindir, "initdb"),
            "-D", self.data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8",
        )  # fmt: skip
        if res.returncode != 0:
            self.close()
            raise _Unavailable(f"initdb failed: {res.stderr.strip() or res.stdout.strip()}")
        # The port is free when chosen but could be taken before postgres binds it; retry.
        last = ""
        for _ in range(3):
            self.port = _free_port()
            options = (
                f"-k {self.dir} -h 127.0.0.1 -p {self.port} -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=200"
            )
            res = self._run(
                os.path.join(self.bindir, "pg_ctl"),
                "-D", self.data, "-l", self.log, "-w", "-t", "30", "-o", options, "start",
            )  # fmt: skip
            if res.returncode == 0:
                self.started = True
                return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
            last = self._log_tail() or res.stderr.strip() or res.stdout.strip()
        self.close()
        raise _Unavailable(f"pg_ctl start failed: {last}")

    def _log_tail(self) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as fh:
                return "".join(fh.readlines()[-5:]).strip()
        except OSError:
            return ""

    def close(self) -> None:
        """Stop the server (immediate mode: its data is thrown away) and delete its directory."""
        if self.started or os.path.exists(os.path.join(self.data, "postmaster.pid")):
            self.started = False
            try:
                self._run(
                    os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop"
                )
            except (OSError, subprocess.SubprocessError):
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    @classmethod
    def reap_orphans(cls, bindir: str) -> None:
        """Stop and delete servers left behind by test processes that no longer exist."""
        for path in glob.glob(os.path.join(_native_parent_dir(), _NATIVE_PREFIX + "*")):
            try:
                with open(os.path.join(path, _OWNER_FILE), encoding="ascii") as fh:
                    owner = fh.read()
            except OSError:
                continue
            if _owner_dead(owner):
                try:
                    cls(bindir, path).close()
                except OSError:  # another process reaped it first
                    pass


class PostgresProvider:
    """Hands out PostgreSQL base URLs, starting each kind of server at most once per process.

    A base URL names a database in which the tests may create and drop schemas; it always answered
    ``select 1`` when it was handed out. Servers this provider started are stopped by
    :meth:`shutdown`, which also runs at interpreter exit.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._urls: dict[PostgresRoute, str] = {}
        # A route that failed once fails the same way again; remembering it avoids paying for a
        # slow failure (a container start timing out, say) in every test.
        self._failures: dict[PostgresRoute, str] = {}
        self._default: str | None = None
        self._closers: list[Callable[[], None]] = []
        atexit.register(self.shutdown)

    def base_url(self, route: PostgresRoute | None = None) -> str:
        """Return a base URL, from ``route`` if given, else from the first route that applies.

        Routes: ``"env"`` (``NIGHTCRIER_TEST_POSTGRES_URL``), ``"testcontainers"``
        (``NIGHTCRIER_TEST_POSTGRES_IMAGE``, or the locally built default image when that
        variable is unset and the route is asked for explicitly) and ``"native"`` (initdb/pg_ctl).
        A variable that is set but does not work is reported through :func:`unavailable` rather
        than silently replaced by another route. Calls :func:`unavailable` when nothing applies.
        """
        with self._lock:
            try:
                if route is not None:
                    return self._route(route)
                if self._default is None:
                    self._default = self._route(self._choose_route())
                return self._default
            except _Unavailable as exc:
                unavailable(str(exc))

    def _choose_route(self) -> PostgresRoute:
        if os.environ.get("NIGHTCRIER_TEST_POSTGRES_URL"):
            return "env"
        if os.environ.get("NIGHTCRIER_TEST_POSTGRES_IMAGE") and _docker_error() is None:
            return "testcontainers"
        if _native_bindir() is not None:
            return "native"
        raise _Unavailable(
            "no PostgreSQL for tests: set NIGHTCRIER_TEST_POSTGRES_URL, or NIGHTCRIER_TEST_POSTGRES_IMAGE "
            "with a running Docker engine, or install postgresql (initdb/pg_ctl under /usr/lib/postgresql)"
        )

    def _route(self, route: PostgresRoute) -> str:
        if route in self._failures:
            raise _Unavailable(self._failures[route])
        if route not in self._urls:
            starter = {
                "env": self._from_env,
                "testcontainers": self._from_testcontainers,
                "native": self._native,
            }
            try:
                self._urls[route] = starter[route]()
            except _Unavailable as exc:
                self._failures[route] = str(exc)
                raise
        return self._urls[route]

    def _from_env(self) -> str:
        url = os.environ.get("NIGHTCRIER_TEST_POSTGRES_URL", "")
        if not url:
            raise _Unavailable("NIGHTCRIER_TEST_POSTGRES_URL is not set")
        err = _pg_error(url)
        if err is not None:
            raise _Unavailable(f"NIGHTCRIER_TEST_POSTGRES_URL: {err}")
        return url

    def _from_testcontainers(self) -> str:
        image = os.environ.get("NIGHTCRIER_TEST_POSTGRES_IMAGE") or DEFAULT_TEST_POSTGRES_IMAGE
        err = _docker_error()
        if err is not None:
            raise _Unavailable(f"testcontainers PostgreSQL: {err}")
        if not _image_exists(image):
            raise _Unavailable(
                f"PostgreSQL image {image!r} is not present (Docker Hub is unreachable); {_BUILD_HINT}"
            )
        try:
            _configure_testcontainers()
            from testcontainers.community.postgres import PostgresContainer
        except ImportError as exc:
            raise _Unavailable(f"testcontainers[postgres] is not installed ({exc})") from exc
        _reap_orphan_containers()
        container = PostgresContainer(
            image,
            username="nightcrier",
            password="nightcrier",
            dbname="nightcrier",
            driver=None,
            labels={_OWNER_LABEL: str(os.getpid())},
        )
        try:
            container.start()
        except Exception as exc:  # start() surfaces Docker, timeout and connection errors alike
            _stop_container(container)
            raise _Unavailable(
                f"testcontainers could not start {image!r}: {type(exc).__name__}: {exc}"
            ) from exc
        self._closers.append(lambda: _stop_container(container))
        url = container.get_connection_url()
        err = _pg_error(url)
        if err is not None:
            raise _Unavailable(f"testcontainers PostgreSQL from {image!r} started but {err}")
        return url

    def _native(self) -> str:
        bindir = _native_bindir()
        if bindir is None:
            raise _Unavailable("no initdb/pg_ctl under /usr/lib/postgresql/*/bin (install postgresql)")
        _NativeServer.reap_orphans(bindir)
        server = _NativeServer(bindir)
        self._closers.append(server.close)
        url = server.start()
        err = _pg_error(url)
        if err is not None:
            raise _Unavailable(f"native PostgreSQL started but {err}")
        return url

    def shutdown(self) -> None:
        """Stop every server this provider started and forget all URLs. Safe to call repeatedly."""
        with self._lock:
            closers, self._closers = self._closers, []
            self._urls.clear()
            self._failures.clear()
            self._default = None
        for close in reversed(closers):
            try:
                close()
            except Exception:  # shutdown runs at exit; one failed stop must not hide the others
                pass


def _stop_container(container: Any) -> None:
    """Remove a testcontainers container, ignoring one that never started or is already gone."""
    try:
        container.stop()
    except Exception:  # best effort: the container may not exist any more
        pass


def _image_exists(image: str) -> bool:
    """Return whether the Docker engine has ``image`` locally (caller ensured the engine answers)."""
    import docker

    client = docker.from_env(timeout=30)
    try:
        client.images.get(image)
        return True
    except docker.errors.ImageNotFound:
        return False
    finally:
        client.close()


_provider = PostgresProvider()


def postgres_base_url(route: PostgresRoute | None = None) -> str:
    """Return the libpq URL of a database the tests may create and drop schemas in.

    Cached per process (and per route when ``route`` forces one); the URL answered ``select 1``
    when first handed out. Calls :func:`unavailable` when no route works. See
    :meth:`PostgresProvider.base_url` for the routes.
    """
    return _provider.base_url(route)


def testcontainers_postgres_url() -> str:
    """Return a base URL served by a testcontainers PostgreSQL container, whatever else is configured.

    Uses ``NIGHTCRIER_TEST_POSTGRES_IMAGE``, or ``nightcrier-test-postgres:15`` when that is unset.
    One container per process; calls :func:`unavailable` when Docker or the image is missing.
    """
    return _provider.base_url("testcontainers")


def shutdown() -> None:
    """Stop every PostgreSQL server started by this module; for the session fixture's teardown."""
    _provider.shutdown()


def schema_url(base_url: str, schema: str) -> str:
    """Return ``base_url`` with ``options=-csearch_path=<schema>`` added as a URI query parameter.

    Unqualified names opened through the result resolve in ``schema`` only, so a store opened
    with it creates its tables there. Existing ``options`` are kept. ``schema`` must be a lowercase
    SQL identifier, which keeps the URL, ``search_path`` and :func:`create_schema` in agreement.
    """
    if not _SCHEMA_RE.fullmatch(schema):
        raise ValueError(f"schema must match {_SCHEMA_RE.pattern}: {schema!r}")
    parts = urllib.parse.urlsplit(base_url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    option = f"-csearch_path={schema}"
    existing = [v for k, v in query if k == "options"]
    query = [(k, v) for k, v in query if k != "options"]
    query.append(("options", " ".join([*existing, option])))
    encoded = urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
    return urllib.parse.urlunsplit(parts._replace(query=encoded))


def _execute(base_url: str, statement: Any) -> None:
    import psycopg2

    conn = psycopg2.connect(base_url, connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def create_schema(base_url: str, schema: str) -> None:
    """Create the empty schema ``schema``; raises psycopg2 errors if it already exists."""
    from psycopg2 import sql

    if not _SCHEMA_RE.fullmatch(schema):
        raise ValueError(f"schema must match {_SCHEMA_RE.pattern}: {schema!r}")
    _execute(base_url, sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))


def drop_schema(base_url: str, schema: str) -> None:
    """Drop ``schema`` and everything in it; a missing schema is not an error."""
    from psycopg2 import sql

    if not _SCHEMA_RE.fullmatch(schema):
        raise ValueError(f"schema must match {_SCHEMA_RE.pattern}: {schema!r}")
    _execute(base_url, sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def docker_client() -> docker.DockerClient:
    """Return a new ``docker.from_env(timeout=30)`` client whose engine answered a ping.

    The caller owns the client (close it when done). Calls :func:`unavailable` when no engine
    answers.
    """
    try:
        import docker
    except ImportError as exc:
        unavailable(f"the docker package is not installed ({exc})")
    try:
        client = docker.from_env(timeout=30)
    except Exception as exc:  # the SDK raises DockerException, requests errors and OSError alike
        unavailable(f"no Docker engine answers ({type(exc).__name__}: {exc})")
    try:
        client.ping()
    except Exception as exc:
        client.close()
        unavailable(f"no Docker engine answers ({type(exc).__name__}: {exc})")
    return client


def require_test_agent_image() -> str:
    """Return :data:`TEST_AGENT_IMAGE` after checking the engine has it; else :func:`unavailable`."""
    import docker

    client = docker_client()
    try:
        client.images.get(TEST_AGENT_IMAGE)
    except docker.errors.ImageNotFound:
        unavailable(f"test agent image {TEST_AGENT_IMAGE!r} is not present; {_BUILD_HINT}")
    finally:
        client.close()
    return TEST_AGENT_IMAGE
