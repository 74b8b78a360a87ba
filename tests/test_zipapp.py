"""Tests of nightcrier.pyz as built by build_zipapp.py: self-contained, one zip for every supported
CPython, cached extraction per build and interpreter, pruning.

The application is built once per session and every test runs it in fresh subprocesses with
``python3 -I`` and an environment holding little more than PATH, so nothing of the developer's
environment (HOME, PYTHONPATH, the config variables) can make a test pass.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT

import build_zipapp
import nightcrier

# The first test also pays for the session's build: pip installs for four interpreters, which on a
# loaded machine takes longer than the suite's default per-test timeout.
pytestmark = pytest.mark.timeout(900)

PYTHON = [sys.executable, "-I"]
CLEAN_PATH = "/usr/bin:/bin"
RUN_TIMEOUT = 60
ABI = f"cp{sys.version_info[0]}{sys.version_info[1]}"
TARGET = build_zipapp.target_tag()
# Every supported CPython this machine has, by version; the zip must run on each.
INTERPRETERS = {v: p for v in build_zipapp.SUPPORTED_PYTHONS
                if (p := build_zipapp.find_interpreter(v, {})) is not None}

# Runs the application in-process so the test can see which files its modules came from.
PROBE = """
import json, runpy, sys
pyz, out, *argv = sys.argv[1:]
sys.argv = [pyz, *argv]
code = 0
try:
    runpy.run_path(pyz, run_name="__main__")
except SystemExit as exc:
    code = exc.code
mods = ("nightcrier", "psycopg2", "psycopg2._psycopg", "yaml", "yaml._yaml")
with open(out, "w") as fh:
    json.dump({"exit": code, "libyaml": sys.modules["yaml"].__with_libyaml__,
               "build_id": sys.modules["nightcrier"].BUILD_ID,
               "files": {m: getattr(sys.modules.get(m), "__file__", None) for m in mods}}, fh)
"""


@dataclass(frozen=True)
class App:
    path: Path
    build_id: str

    @property
    def key(self) -> str:
        """The name of its extraction for the interpreter running the tests."""
        return f"{self.build_id}-{ABI}"


@pytest.fixture(scope="session")
def app(tmp_path_factory: pytest.TempPathFactory) -> App:
    """nightcrier.pyz built from this checkout by ``build_zipapp.py --output``."""
    path = tmp_path_factory.mktemp("pyz") / "nightcrier.pyz"
    result = subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "--output", str(path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"build failed:\n{result.stdout}\n{result.stderr}"
    with zipfile.ZipFile(path) as zf:
        match = re.fullmatch(rb"nightcrier build ([0-9a-f]{16})", zf.comment)
    assert match, f"zip comment {zf.comment!r} names no build id"
    build_id = match.group(1).decode()
    assert f"build {build_id}" in result.stdout
    return App(path, build_id)


def clean_env(cache: Path | None, **extra: str) -> dict[str, str]:
    env = {"PATH": CLEAN_PATH, **extra}
    if cache is not None:
        env["NIGHTCRIER_CACHE_DIR"] = str(cache)
    return env


def run(app: App, *args: str, env: dict[str, str], cwd: Path, python: list[str] = PYTHON,
        **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*python, str(app.path), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, **kwargs)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a run that must have succeeded."""
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result.stdout


def version_line(app: App) -> str:
    return f"nightcrier {nightcrier.__version__} (build {app.build_id})\n"


def build_dirs(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if re.fullmatch(r"[0-9a-f]{16}-cp\d+", p.name))


def write_config(path: Path, state_storage: dict[str, str]) -> Path:
    path.write_text(json.dumps({  # JSON is YAML
        "clusters": [{"name": "c1", "mcp": {"endpoint": "http://127.0.0.1:9/mcp"}}],
        "workspace_root": str(path.parent / "workspaces"),
        "state_storage": state_storage}))
    return path


def test_archive_holds_nightcrier_its_schemas_and_every_dependency(app: App) -> None:
    assert app.path.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert os.access(app.path, os.X_OK)
    with zipfile.ZipFile(app.path) as zf:
        names = set(zf.namelist())
        main = zf.read("__main__.py").decode()
    assert f'BUILD_ID = "{app.build_id}"' in main
    for name in ("nightcrier.py", "schema_sqlite.sql", "schema_postgres.sql", "triage.schema.json"):
        assert f"site-packages/common/{name}" in names

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "_", name).lower()

    wanted = [re.split(r"[=<>!~\[; ]", line, maxsplit=1)[0]
              for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert wanted
    for version in build_zipapp.SUPPORTED_PYTHONS:
        abi = build_zipapp.abi_tag(version)
        # Each interpreter's view: the common part plus its own, and nothing of another's; an optional
        # feature's libraries apart from the rest, under features/<feature>/.
        parts = (f"site-packages/{abi}/", "site-packages/common/")
        own = {n.split("/", 2)[2] for n in names if n.startswith(parts)}
        postgres = {n.split("/", 3)[3] for n in names
                    if n.startswith(("features/postgres/common/", f"features/postgres/{abi}/"))}
        features = {n.split("/", 3)[3] for n in names if n.startswith("features/")
                    and n.split("/")[2] in ("common", abi)}
        assert f"__pycache__/nightcrier.cpython-{abi[2:]}.pyc" in own or version not in INTERPRETERS
        so = rf"\.cpython-{abi[2:]}-x86_64-linux-gnu\.so"
        assert any(re.fullmatch(r"psycopg2/_psycopg" + so, n) for n in postgres)
        assert any(n.startswith("psycopg2_binary.libs/libpq") for n in postgres)
        assert not any(n.startswith(("psycopg2", "boto", "azure", "cryptography")) for n in own)
        assert any(re.fullmatch(r"yaml/_yaml" + so, n) for n in own)
        installed = {norm(n.split("/")[0].split("-")[0]) for n in own | features if ".dist-info/" in n}
        assert not [w for w in wanted if norm(w) not in installed], (version, wanted, installed)
    # The AWS models are those of the services the S3 support calls, not botocore's hundreds.
    models = {n.split("/")[5] for n in names if n.startswith("features/s3/common/botocore/data/")
              and n.count("/") > 5}
    assert models == set(build_zipapp.BOTOCORE_SERVICES)
    # One stable-ABI build of a library serves every interpreter.
    assert len([n for n in names if n.endswith("cryptography/hazmat/bindings/_rust.abi3.so")]) == 1


def test_a_start_extracts_no_optional_feature_until_it_is_used(app: App, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ok(run(app, "--version", env=clean_env(cache), cwd=tmp_path))
    extraction = cache / app.key
    assert not (extraction / "features").exists()
    assert not list((extraction / "site-packages").glob("psycopg2*"))
    assert not list((extraction / "site-packages").glob("boto*"))


def test_object_storage_tests_pass_from_the_pyz(app: App, tmp_path: Path) -> None:
    """The S3 and Azure tests, with nightcrier and every library imported from the archive's cache."""
    cache, report = tmp_path / "cache", tmp_path / "modules.json"
    env = dict(os.environ, NIGHTCRIER_TEST_PYZ=str(app.path), NIGHTCRIER_TEST_PYZ_REPORT=str(report),
               NIGHTCRIER_CACHE_DIR=str(cache))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(ROOT / "tests" / "test_object_storage.py"), "-k",
                             "artifacts_reach_the_store or presigned_links_carry"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"\b3 passed\b", result.stdout), result.stdout[-2000:]
    extraction = cache / app.key
    files = json.loads(report.read_text())
    assert files["nightcrier"] == str(extraction / "site-packages" / "nightcrier.py")
    for module, feature in (("boto3", "s3"), ("botocore", "s3"), ("azure.storage.blob", "azure"),
                            ("cryptography", "azure")):
        assert files[module] and Path(files[module]).is_relative_to(extraction / "features" / feature), \
            f"{module} came from {files[module]}"


def test_runs_from_an_empty_directory_with_a_clean_environment(app: App, tmp_path: Path) -> None:
    cwd, cache = tmp_path / "empty", tmp_path / "cache"
    cwd.mkdir()
    env = clean_env(cache)
    assert ok(run(app, "--version", env=env, cwd=cwd)) == version_line(app)
    assert ok(run(app, "version", env=env, cwd=cwd)) == version_line(app)

    config = tmp_path / "config.yaml"
    shutil.copy(ROOT / "config.example.yaml", config)
    out = ok(run(app, "check-config", "--config", str(config), env=env, cwd=cwd))
    assert out.startswith(f"# effective configuration of nightcrier {nightcrier.__version__}")
    # The SQLite schema is read from beside the extracted nightcrier.py.
    sqlite_config = write_config(tmp_path / "sqlite.yaml", {"type": "sqlite",
                                                            "sqlite_path": str(tmp_path / "nc.db")})
    assert json.loads(ok(run(app, "incidents", "--config", str(sqlite_config), "--json",
                             env=env, cwd=cwd))) == []

    assert build_dirs(cache) == [app.key]
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert (cache / app.key / "site-packages" / "nightcrier.py").is_file()
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
    assert list(cwd.iterdir()) == []


def test_demo_resolves_every_incident(app: App, tmp_path: Path) -> None:
    env, demo = clean_env(tmp_path / "cache"), tmp_path / "demo"
    ok(run(app, "demo", "--dir", str(demo), "--faults", "3", env=env, cwd=tmp_path))
    incidents = json.loads(ok(run(app, "incidents", "--config", str(demo / "config.yaml"), "--json",
                                  env=env, cwd=tmp_path)))
    assert len(incidents) >= 3
    assert [i["status"] for i in incidents] == ["resolved"] * len(incidents)


def test_serves_its_pages_from_the_bundled_templates(app: App, tmp_path: Path) -> None:
    import socket
    import urllib.request

    from conftest import wait_for
    with zipfile.ZipFile(app.path) as zf:
        assert "site-packages/common/templates/incidents.html" in zf.namelist()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = write_config(tmp_path / "config.yaml",
                          {"type": "sqlite", "sqlite_path": str(tmp_path / "nc.db")})
    data = json.loads(config.read_text())
    data.update(health_port=port, agent_runner="process", agent_command=["true"])
    config.write_text(json.dumps(data))
    process = subprocess.Popen([*PYTHON, str(app.path), "run", "--config", str(config)],
                               env=clean_env(tmp_path / "cache"), cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)

    def page() -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/incidents", timeout=2) as response:
                return response.read().decode()
        except OSError:
            assert process.poll() is None, "nightcrier exited"
            return None

    try:
        assert "<h1>Incidents</h1>" in wait_for(page, timeout=RUN_TIMEOUT, what="the incidents page")
    finally:
        process.terminate()
        process.wait(RUN_TIMEOUT)


@pytest.mark.postgres
def test_postgres_driver_loads_from_the_cache(app: App, tmp_path: Path, postgres_schema_url: str) -> None:
    cache = tmp_path / "cache"
    env = clean_env(cache)
    config = write_config(tmp_path / "pg.yaml", {"type": "postgres",
                                                 "postgres_connection_string": postgres_schema_url})
    args = ("incidents", "--config", str(config), "--json")
    assert json.loads(ok(run(app, *args, env=env, cwd=tmp_path))) == []
    # Without any site-packages the only psycopg2 there is is the bundled one.
    assert json.loads(ok(run(app, *args, env=env, cwd=tmp_path, python=[*PYTHON, "-S"]))) == []

    report = tmp_path / "probe.json"
    ok(subprocess.run([*PYTHON, "-c", PROBE, str(app.path), str(report), *args], env=env, cwd=tmp_path,
                      capture_output=True, text=True, timeout=RUN_TIMEOUT))
    probe = json.loads(report.read_text())
    assert probe["exit"] == 0
    assert probe["build_id"] == app.build_id
    assert probe["libyaml"] is True
    site = cache / app.key / "site-packages"
    for module, file in probe["files"].items():
        where = cache / app.key / "features" / "postgres" if module.startswith("psycopg2") else site
        assert file and Path(file).is_relative_to(where), f"{module} loaded from {file}, not from {where}"
    assert probe["files"]["nightcrier"] == str(site / "nightcrier.py")
    assert re.fullmatch(r"_psycopg\..*so", Path(probe["files"]["psycopg2._psycopg"]).name)


def test_concurrent_first_starts_extract_once(app: App, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = clean_env(cache)
    # Started back to back: each takes far longer to extract than the next one takes to start.
    procs = [subprocess.Popen([*PYTHON, str(app.path), "--version"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(p.wait(RUN_TIMEOUT), *p.communicate()) for p in procs]
    assert [r[0] for r in results] == [0] * 4, results
    assert {r[1] for r in results} == {version_line(app)}, results
    assert build_dirs(cache) == [app.key]
    assert sorted(p.name for p in cache.iterdir()) == [".lock", app.key, f"{app.key}.lock"]
    assert ok(run(app, "--version", env=env, cwd=tmp_path)) == version_line(app)


def fake_build(cache: Path, build_id: str, age: float) -> Path:
    """A build directory as the application leaves it, extracted ``age`` seconds ago."""
    path = cache / build_id
    (path / "site-packages").mkdir(parents=True)
    (path / "site-packages" / "nightcrier.py").write_text("")
    (cache / f"{build_id}.lock").touch()
    when = time.time() - age
    os.utime(path, (when, when))
    return path


@pytest.fixture
def held_lock() -> Iterator[list[int]]:
    """Lock files the test holds shared, as a running process of that build does."""
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def hold(path: Path, fds: list[int]) -> None:
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    fds.append(fd)


def test_older_builds_are_pruned_unless_in_use(app: App, tmp_path: Path, held_lock: list[int]) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    env = clean_env(cache)
    old = fake_build(cache, "0000000000000001-cp311", 3600)
    in_use = fake_build(cache, "0000000000000002-cp311", 3600)
    hold(cache / "0000000000000002-cp311.lock", held_lock)
    newer = fake_build(cache, "0000000000000003-cp311", -3600)
    (cache / "0000000000000004-cp311.lock").touch()  # lock of a build that was never extracted
    # A killed extraction:
    (cache / ".0000000000000005-cp311.999999.tmp" / "site-packages").mkdir(parents=True)
    for name in ("notes", ".notes.tmp", ".0000000000000007-cp311.tmp"):
        (cache / name).mkdir()
    (cache / "notes.txt").write_text("not ours")

    ok(run(app, "--version", env=env, cwd=tmp_path))  # first start: extracts, then prunes
    assert not old.exists() and not (cache / "0000000000000001-cp311.lock").exists()
    assert in_use.exists() and newer.exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted([
        ".lock", "0000000000000002-cp311", "0000000000000002-cp311.lock", "0000000000000003-cp311",
        "0000000000000003-cp311.lock",
        app.key, f"{app.key}.lock", "notes", ".notes.tmp", ".0000000000000007-cp311.tmp", "notes.txt"])

    # Later starts prune too: a build in use stays until no process uses it.
    also_old = fake_build(cache, "0000000000000006-cp311", 3600)
    ok(run(app, "--version", env=env, cwd=tmp_path))
    assert not also_old.exists() and in_use.exists()
    os.close(held_lock.pop())
    ok(run(app, "--version", env=env, cwd=tmp_path))
    assert build_dirs(cache) == sorted(["0000000000000003-cp311", app.key])


def test_damaged_extraction_is_replaced(app: App, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = clean_env(cache)
    ok(run(app, "--version", env=env, cwd=tmp_path))
    site = cache / app.key / "site-packages"
    (site / "nightcrier.py").unlink()  # as a tmp cleaner does to files nobody reads
    assert ok(run(app, "--version", env=env, cwd=tmp_path)) == version_line(app)
    assert (site / "nightcrier.py").is_file()
    assert build_dirs(cache) == [app.key]


def test_cache_dir_that_cannot_be_used_is_an_error(app: App, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run(app, "--version", env=clean_env(blocker / "cache"), cwd=tmp_path)
    assert result.returncode == 2
    assert "NIGHTCRIER_CACHE_DIR" in result.stderr


@pytest.mark.parametrize("target", ["cp39,cp314-linux-x86_64", f"{ABI}-linux-aarch64"])
def test_refuses_an_interpreter_it_was_not_built_for(app: App, tmp_path: Path, target: str) -> None:
    # The check comes before extraction, so the start-up code alone shows it.
    with zipfile.ZipFile(app.path) as zf:
        main = zf.read("__main__.py").decode()
    assert f'TARGET = "{TARGET}"' in main
    other = tmp_path / "other.pyz"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("__main__.py", main.replace(f'TARGET = "{TARGET}"', f'TARGET = "{target}"'))
    result = run(App(other, app.build_id), "--version", env=clean_env(tmp_path / "cache"), cwd=tmp_path)
    assert result.returncode == 2
    abis, _, machine = target.rsplit("-", 2)
    versions = ", ".join(f"{a[2]}.{a[3:]}" for a in abis.split(","))
    here = f"cpython {sys.version_info[0]}.{sys.version_info[1]} on linux {os.uname().machine}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert f"runs on CPython {versions} on linux {machine} (glibc) and this is {here}" in lines[0]
    assert not (tmp_path / "cache").exists()


def private_tmp(uid: int) -> Path:
    return Path(f"/tmp/nightcrier-{uid}")


def test_starts_without_home_in_the_private_tmp_dir(app: App, tmp_path: Path) -> None:
    """No HOME, XDG_CACHE_HOME or NIGHTCRIER_CACHE_DIR: the cache goes to /tmp/nightcrier-<uid>."""
    cache = private_tmp(os.getuid())
    existed = cache.exists()
    ours = [cache / app.key, cache / f"{app.key}.lock"]
    pre_existing = [p for p in ours if p.exists()]
    try:
        assert ok(run(app, "--version", env=clean_env(None), cwd=tmp_path)) == version_line(app)
        assert (cache / app.key / "site-packages" / "nightcrier.py").is_file()
        assert cache.stat().st_uid == os.getuid()
    finally:
        if not existed:
            shutil.rmtree(cache, ignore_errors=True)
        else:
            for path in ours:
                if path not in pre_existing:
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _unused_uid() -> int:
    for uid in range(61000, 61500):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            if not private_tmp(uid).exists():
                return uid
    pytest.fail("no free uid between 61000 and 61500")


def _interpreter_for(as_user: dict[str, object], cwd: Path) -> list[str] | None:
    """An interpreter the build is for that the other user may run (``/root`` is often 0700)."""
    probe = "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')"
    for exe in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
        try:
            result = subprocess.run([exe, "-I", "-c", probe], capture_output=True, text=True, cwd=cwd,
                                    timeout=RUN_TIMEOUT, **as_user)
        except OSError:
            continue
        if result.stdout.strip() == ABI:
            return [exe, "-I"]
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_service_user_without_a_home_directory(app: App) -> None:
    """A uid with no passwd entry, so no home at all; and a squatted /tmp directory is refused."""
    uid = _unused_uid()
    cache = private_tmp(uid)
    shared = Path(tempfile.mkdtemp(prefix="nightcrier-pyz-"))
    try:
        shared.chmod(0o755)
        pyz = App(Path(shutil.copy(app.path, shared / "nightcrier.pyz")), app.build_id)
        as_user: dict[str, object] = {"user": uid, "group": uid, "extra_groups": []}
        # The interpreter must be one that uid may run and that the build is for.
        python = _interpreter_for(as_user, shared)
        assert python, f"no interpreter for {TARGET} that uid {uid} can run"

        out = ok(run(pyz, "--version", env=clean_env(None), cwd=shared, python=python, **as_user))
        assert out == version_line(app)
        st = cache.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, 0o700)
        assert (cache / app.key / "site-packages" / "nightcrier.py").is_file()
        # A home directory that does not exist, as for Debian's system users, changes nothing.
        ok(run(pyz, "--version", env=clean_env(None, HOME="/nonexistent"), cwd=shared, python=python,
               **as_user))

        shutil.rmtree(cache)
        # Someone else's directory in its place, writable by all: whoever owns it could plant code.
        cache.mkdir()
        cache.chmod(0o777)
        result = run(pyz, "--version", env=clean_env(None), cwd=shared, python=python, **as_user)
        assert result.returncode == 2, result
        assert f"{cache} is not a directory owned by uid {uid}" in result.stderr
        assert "NIGHTCRIER_CACHE_DIR" in result.stderr
        assert os.listdir(cache) == []
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.parametrize("version", build_zipapp.SUPPORTED_PYTHONS)
def test_every_supported_cpython_runs_the_same_zip(app: App, tmp_path: Path, version: str) -> None:
    """``python3 -I nightcrier.pyz`` from an empty directory with an empty environment, on each CPython
    this machine has: --version, check-config and the demo end to end."""
    if version not in INTERPRETERS:
        pytest.skip(f"no CPython {version} on this machine")
    python = [INTERPRETERS[version], "-I"]
    cwd = tmp_path / "empty"
    cwd.mkdir()
    key = f"{app.build_id}-{build_zipapp.abi_tag(version)}"
    cache = private_tmp(os.getuid())  # no HOME: where an empty environment puts the cache
    existed = [p for p in (cache / key, cache / f"{key}.lock") if p.exists()]
    try:
        assert ok(run(app, "--version", env={}, cwd=cwd, python=python)) == version_line(app)
        assert (cache / key / "site-packages" / "nightcrier.py").is_file()
        config = tmp_path / "config.yaml"
        shutil.copy(ROOT / "config.example.yaml", config)
        out = ok(run(app, "check-config", "--config", str(config), env={}, cwd=cwd, python=python))
        assert out.startswith(f"# effective configuration of nightcrier {nightcrier.__version__}")

        demo = tmp_path / "demo"
        out = ok(run(app, "demo", "--dir", str(demo), "--faults", "2", "--rate", "5", env={}, cwd=cwd,
                     python=python))
        assert out.count(" resolved ") >= 2, out
        incidents = json.loads(ok(run(app, "incidents", "--config", str(demo / "config.yaml"), "--json",
                                      env={}, cwd=cwd, python=python)))
        assert len(incidents) >= 2 and {i["status"] for i in incidents} == {"resolved"}
        assert list(cwd.iterdir()) == []
    finally:
        for path in (cache / key, cache / f"{key}.lock"):
            if path not in existed:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
