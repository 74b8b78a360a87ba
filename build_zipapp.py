#!/usr/bin/env python3
"""Build ``dist/nightcrier.pyz``: nightcrier, its schema files and every runtime dependency in one file.

Usage::

    python3 build_zipapp.py [--output dist/nightcrier.pyz] [--requirements requirements.txt]
    python3 -I dist/nightcrier.pyz --version

    python3 build_zipapp.py --platform manylinux2014_aarch64 --machine aarch64   # another platform

Needs only the standard library and pip (PyPI or a configured index must be reachable). One zip runs
on every CPython in ``SUPPORTED_PYTHONS`` on one platform (default Linux x86_64 with glibc >= 2.17).
Whatever requirements.txt lists is installed once per supported CPython with ``pip install --target
--only-binary=:all: --platform <tag> --python-version 3.X``, so compiled dependencies (psycopg2-binary,
PyYAML, ...) come as the wheel for each interpreter, or as their abi3 / pure-Python wheel where that is
all there is. Each install runs under that CPython itself when one is found (``--python 3.X=PATH``,
``python3.X`` under pyenv or on PATH), so environment markers are evaluated for it and its bytecode is
compiled at build time; without one, this interpreter's pip installs for it and the bytecode is left
to the first start. The application refuses to start on any other interpreter, OS or machine type with
one line saying what it supports, rather than fail on a missing compiled module later.

What is in the zip:

* ``__main__.py`` -- the start-up code below (``BOOTSTRAP``), with the build id filled in;
* ``site-packages/common/`` -- every file that is the same for all supported interpreters: in practice
  ``nightcrier.py``, ``schema_sqlite.sql``, ``schema_postgres.sql``, ``triage.schema.json``, the page
  templates under ``templates/`` and the pure-Python dependencies;
* ``site-packages/cp3XX/`` -- the rest, per interpreter: compiled modules, unchecked-hash ``.pyc``
  files, and any package whose chosen version differs between interpreters.

The build id is the first 16 hex digits of a SHA-256 over the name and contents of every entry
(``__main__.py`` with the id left out). It is also the zip comment, and the application sets
``nightcrier.BUILD_ID`` to it, which ``--version`` prints.

At start (contract of ``BOOTSTRAP``)
------------------------------------
Compiled modules cannot be imported from a zip, so the first start of a build under one interpreter
extracts ``common/`` and that interpreter's ``cp3XX/`` into ``<cache>/<build id>-cp3XX/site-packages``
(the *key* of the extraction) and later starts import from there; nightcrier itself is imported from
that directory too, so ``nightcrier.__file__`` is a real ``.../nightcrier.py`` with the schema files and
templates beside it. Extractions of the same build under different interpreters live side by side.

* ``<cache>`` is ``$NIGHTCRIER_CACHE_DIR`` if set (it must be usable: no fallback), else
  ``$XDG_CACHE_HOME/nightcrier``, else ``$HOME/.cache/nightcrier`` when ``$HOME`` is a writable
  directory, else ``/tmp/nightcrier-<uid>``. A directory that fails is skipped for the next one.
  A cache directory that does not exist is created mode 0700. The one under /tmp is refused when it
  is not a real directory owned by the user or is writable by others (they could plant code there).
* Extraction writes to ``<cache>/.<key>.<pid>.tmp`` under an exclusive ``flock`` on
  ``<cache>/.lock`` and renames the result into place, so concurrent first starts extract once and
  never see a partial tree. An extraction whose ``nightcrier.py`` has gone missing (tmp cleaners) is
  extracted again.
* Every process holds a shared ``flock`` on ``<cache>/<key>.lock`` for its lifetime: that is
  what "in use" means. On each start, extractions of other builds made before the current one and not
  in use are deleted, with their lock files and any temporary directories a killed extraction left
  behind. Newer builds are kept, so starting an old build does not delete the one that replaced it,
  and so are the current build's extractions for other interpreters. Nothing else in the directory is
  touched.
* A cache that is read-only but already holds the build (e.g. baked into an image) is used as is.
* When no cache directory can be used, or the interpreter or platform is not one built for, it says
  why on stderr in one line and exits 2 (nightcrier's status for configuration errors).

Why a bootstrap of our own rather than shiv
-------------------------------------------
shiv 1.0.8 (well kept, and it measured fine here) would give extraction under a lock with an atomic
rename. It does not give the rest, and each missing part needs code around it that ends up as long as
this bootstrap:

* its cache root is ``~/.shiv`` or one fixed path or ``$VAR`` chosen at build time; there is no
  fallback for a service user whose home does not exist, so a wrapper ``__main__`` would have to set
  ``SHIV_ROOT`` before shiv's own bootstrap runs -- that is, replacing shiv's entry point;
* it never deletes old extractions and does not know which ones are in use; its preamble hook runs
  after extraction, so pruning safely would still need the in-use locks above;
* it compiles bytecode at first start (``--compile-pyc``: 0.7 s for this tree here, on top of an
  extraction that already takes 0.6 to 1.2 s on this machine's disk) or leaves it to the imports,
  which write none under ``PYTHONDONTWRITEBYTECODE`` (set in our environments), so every start
  compiles again; here the bytecode is compiled once at build time as unchecked-hash ``.pyc`` files,
  which stay valid although extraction does not keep file times;
* the build id would need another wrapper module to reach ``nightcrier.BUILD_ID``; and the build
  would need shiv installed, where this script needs pip only.

pex was not a candidate: its ``--venv`` mode measured 0.55 s warm here, above the 0.5 s goal.

The warm path here imports nothing beyond ``os``, ``sys``, ``errno`` and ``fcntl`` before nightcrier:
no zipfile, no reading the archive. Libraries that only some features need are imported by nightcrier
when that feature is configured, not at start.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_OUTPUT = ROOT / "dist" / "nightcrier.pyz"
DEFAULT_REQUIREMENTS = ROOT / "requirements.txt"
APP_FILES = ("nightcrier.py", "schema_sqlite.sql", "schema_postgres.sql", "triage.schema.json")
APP_DIRS = ("templates",)  # copied whole; nightcrier reads them beside itself
PAYLOAD_DIR = "site-packages"
SHEBANG = b"#!/usr/bin/env python3\n"
BUILD_ID_LENGTH = 16
# The CPython minor versions one zip runs on, and the platform it is built for by default.
SUPPORTED_PYTHONS = ("3.10", "3.11", "3.12", "3.13")
DEFAULT_PLATFORM = "manylinux2014_x86_64"
DEFAULT_MACHINE = "x86_64"
COMMON_DIR = "common"
FEATURES_DIR = "features"
# Features: the requirements only some commands or settings need, in the order a shared dependency is
# assigned (to the first feature that needs it). Their libraries are extracted only when nightcrier
# first imports one of their modules (the bootstrap's import hook; an import from one feature's library
# of another's extracts that one too), and carry no bytecode: the first import compiles what it needs
# into the extraction. So `--version` extracts nightcrier alone, `check-config` adds PyYAML, and a
# SQLite deployment without object storage never unpacks PostgreSQL's, AWS's or Azure's libraries.
FEATURES = {"http": ("requests", "sseclient-py"), "docker": ("docker",),
            "pages": ("Jinja2", "markdown-it-py", "waitress"), "metrics": ("prometheus-client",),
            "postgres": ("psycopg2-binary",), "s3": ("boto3",), "azure": ("azure-storage-blob",),
            "triage-result": ("jsonschema",)}
# The AWS service models the S3 support reads (S3 itself; STS for role and web-identity credentials);
# botocore ships one for every AWS service, which would be most of the archive.
BOTOCORE_SERVICES = ("s3", "sts")
# Fixed entry times make the zip a function of its contents.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


def abi_tag(version: str) -> str:
    """"3.12" -> "cp312", the name of that interpreter's part of the payload."""
    return "cp" + version.replace(".", "")


def target_tag(versions: tuple[str, ...] = SUPPORTED_PYTHONS, machine: str = DEFAULT_MACHINE) -> str:
    """What the zip is built for, as its start-up code checks it: ABI tags, OS and machine type."""
    return f"{','.join(abi_tag(v) for v in versions)}-linux-{machine}"


# The generated __main__.py. @BUILD_ID@, @TARGET@ and @FEATURE_MODULES@ are filled in by
# render_bootstrap(). Only os, sys, errno and fcntl are imported on the warm path: every millisecond here
# is paid on every start.
BOOTSTRAP = r'''# Start-up code of nightcrier.pyz, made by build_zipapp.py (its docstring is the contract).
"""Run nightcrier from this zip: extract its site-packages once per build into a cache, then import."""

import errno
import fcntl
import os
import sys

BUILD_ID = "@BUILD_ID@"
TARGET = "@TARGET@"  # "<abi>,<abi>,...-<os>-<machine>"
FEATURE_MODULES = @FEATURE_MODULES@  # top-level module -> the optional feature that holds it
PAYLOAD = "site-packages/"
EXIT_SETUP = 2
# A free-threaded CPython ("t") cannot load the regular builds' compiled modules: its tag differs.
ABI = f"cp{sys.version_info[0]}{sys.version_info[1]}{'t' if 't' in getattr(sys, 'abiflags', '') else ''}"
KEY = f"{BUILD_ID}-{ABI}"  # one extraction per build and interpreter

# Lock files stay open (and locked) for the life of the process; see _hold_in_use.
_held_fds = []


class SetupError(Exception):
    """The cache cannot be used; the message says why and what to do."""


def _is_key(name):
    """Names of extractions: "<build id>-cp3XX"."""
    build, _, abi = name.partition("-")
    return (len(build) == len(BUILD_ID) and all(c in "0123456789abcdef" for c in build)
            and abi.startswith("cp") and abi[2:].isdigit())


def _is_temp(name):
    """Names of extraction directories: ".<key>.<pid>.tmp" and ".<key>.<pid>.broken.tmp"."""
    parts = name.split(".")
    return (len(parts) in (4, 5) and parts[0] == "" and _is_key(parts[1]) and parts[2].isdigit()
            and parts[-1] == "tmp")


def _fail(message):
    print(f"nightcrier: {message}", file=sys.stderr)
    raise SystemExit(EXIT_SETUP)


def _check_interpreter():
    abis, system, machine = TARGET.rsplit("-", 2)
    abis = abis.split(",")
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        libc = ""
    glibc = libc.startswith("glibc") or sys.platform != "linux"
    system_here = sys.platform + ("" if glibc else " (no glibc)")
    version_here = f"{sys.version_info[0]}.{sys.version_info[1]}{'t' if ABI.endswith('t') else ''}"
    here = f"{sys.implementation.name} {version_here} on {system_here} {os.uname().machine}"
    if (sys.implementation.name != "cpython" or ABI not in abis or sys.platform != system
            or not libc.startswith("glibc") or os.uname().machine != machine):
        versions = ", ".join(f"{a[2]}.{a[3:]}" for a in abis)
        _fail(f"this nightcrier.pyz runs on CPython {versions} on {system} {machine} (glibc) and this is "
              f"{here}; run it with one of those or build one for this platform with build_zipapp.py")


def _candidates():
    """(directory, explicit) pairs to try in order; an explicit one that fails is an error."""
    explicit = os.environ.get("NIGHTCRIER_CACHE_DIR")
    if explicit:
        return [(os.path.abspath(explicit), True)]
    found = []
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says relative values are invalid
        found.append((os.path.join(xdg, "nightcrier"), False))
    home = os.environ.get("HOME")
    if home and os.path.isabs(home) and os.path.isdir(home) and os.access(home, os.W_OK):
        found.append((os.path.join(home, ".cache", "nightcrier"), False))
    found.append((None, False))  # the private directory under /tmp
    return found


def _private_tmp_dir():
    """/tmp/nightcrier-<uid>, created 0700; refused unless it is ours alone."""
    path = f"/tmp/nightcrier-{os.getuid()}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not (st.st_mode & 0o170000 == 0o040000 and st.st_uid == os.getuid() and not st.st_mode & 0o022):
        raise SetupError(f"{path} is not a directory owned by uid {os.getuid()} and writable only by it; "
                         "remove it or set NIGHTCRIER_CACHE_DIR")
    return path


def _make_dirs(path):
    if not os.path.isdir(path):
        os.makedirs(path, mode=0o700, exist_ok=True)


def _open_lock(path):
    return os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)  # flock needs no write access


def _hold_in_use(cache):
    """Take a shared lock on this build's lock file and keep it until the process ends.

    Returns False when the cache is read-only and has no lock file. A pruner may delete the lock file
    while we wait for it, so the lock only counts if the path still names the inode we locked.
    """
    path = os.path.join(cache, KEY + ".lock")
    while True:
        try:
            fd = _open_lock(path)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return False
            raise
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            _held_fds.append(fd)
            return True
        os.close(fd)


class _CacheLock:
    """Exclusive lock on <cache>/.lock, held while extracting or pruning."""

    def __init__(self, cache, wait=True):
        self.fd = _open_lock(os.path.join(cache, ".lock"))
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(self.fd)
            raise

    def release(self):
        os.close(self.fd)


def _remove_tree(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _unpack(tmp, part, subdir):
    """Unpack the common and this interpreter's files of payload ``part`` into ``tmp``/``subdir``."""
    import zipfile

    archive = getattr(globals().get("__loader__"), "archive", None) or os.path.dirname(__file__)
    wanted = (part + "common/", part + ABI + "/")
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = info.filename
            prefix = next((w for w in wanted if name.startswith(w)), None)
            if prefix is None or ".." in name.split("/"):
                continue
            rel = name[len(prefix):]
            if not rel:
                continue
            dest = os.path.join(tmp, subdir, *rel.split("/"))
            if name.endswith("/"):
                os.makedirs(dest, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(dest, mode)


def _extract(cache, build_dir):
    """Extract the payload into build_dir. Caller holds the cache lock."""
    # Only an extraction that died leaves a temporary directory: a live one would hold our lock.
    for name in os.listdir(cache):
        if _is_temp(name):
            _remove_tree(os.path.join(cache, name))
    tmp = os.path.join(cache, f".{KEY}.{os.getpid()}.tmp")
    os.mkdir(tmp, 0o755)
    # Only this interpreter's part and the common part; both land in one site-packages.
    _unpack(tmp, PAYLOAD, "site-packages")
    # A damaged tree is renamed before it is deleted, so no start sees it half gone under its name.
    if os.path.lexists(build_dir):
        broken = os.path.join(cache, f".{KEY}.{os.getpid()}.broken.tmp")
        os.rename(build_dir, broken)
        _remove_tree(broken)
    os.utime(tmp)  # the extraction time orders builds for pruning
    os.rename(tmp, build_dir)


def _prune(cache, current_dir, lock=None):
    """Delete extractions of other builds, made before the current one, that no process uses. Best
    effort: errors are ignored.

    Without ``lock`` the cache lock is only tried, so a start never waits for another one's extraction.
    """
    try:
        names = os.listdir(cache)
        own_mtime = os.stat(current_dir).st_mtime
    except OSError:
        return

    def other_build(name):
        return _is_key(name) and not name.startswith(BUILD_ID + "-")

    builds = {n for n in names if other_build(n)}
    locks = {n[:-5] for n in names if n.endswith(".lock") and other_build(n[:-5])}
    temps = [n for n in names if _is_temp(n)]
    victims = locks - builds
    for name in builds:
        try:
            if os.stat(os.path.join(cache, name)).st_mtime <= own_mtime:
                victims.add(name)
        except OSError:
            pass
    if not victims and not temps:
        return
    try:
        held = lock or _CacheLock(cache, wait=False)
    except OSError:
        return
    try:
        for name in temps:
            _remove_tree(os.path.join(cache, name))
        for name in victims:
            lock_path = os.path.join(cache, name + ".lock")
            try:
                fd = _open_lock(lock_path)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # in use
                continue
            _remove_tree(os.path.join(cache, name))
            try:
                os.unlink(lock_path)  # still holding it: see _hold_in_use
            except OSError:
                pass
            os.close(fd)
    finally:
        if lock is None:
            held.release()


def _prepare(cache):
    """Make sure this build is extracted under cache for this interpreter; return its site-packages."""
    _make_dirs(cache)
    build_dir = os.path.join(cache, KEY)
    site = os.path.join(build_dir, "site-packages")
    locked = _hold_in_use(cache)
    if os.path.exists(os.path.join(site, "nightcrier.py")):
        if locked:
            _prune(cache, build_dir)
        return site
    if not locked:
        raise PermissionError(f"{cache} is not writable")
    lock = _CacheLock(cache)
    try:
        if not os.path.exists(os.path.join(site, "nightcrier.py")):
            _extract(cache, build_dir)
        _prune(cache, build_dir, lock)
    finally:
        lock.release()
    return site


class _FeatureFinder:
    """Import hook: the first import of a module of an optional feature puts that feature's libraries
    on sys.path (see load_feature) and leaves the finding to the regular path finder."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        feature = FEATURE_MODULES.get(fullname) if path is None else None
        if feature is not None:
            load_feature(feature)
        return None


def load_feature(name):
    """Put optional feature ``name``'s libraries on sys.path, extracting them on its first use.

    They land inside this build's extraction, so pruning the build removes them too. Raises
    ImportError when they are missing and the cache cannot be written.
    """
    site = os.path.join(_extraction[0], "features", name)
    if not os.path.isdir(site):
        cache = os.path.dirname(_extraction[0])
        try:
            lock = _CacheLock(cache)
        except OSError as exc:
            raise ImportError(f"cannot extract the libraries of {name} into {cache}: {exc}") from None
        try:
            if not os.path.isdir(site):
                tmp = os.path.join(cache, f".{KEY}.{os.getpid()}.tmp")
                os.mkdir(tmp, 0o755)
                _unpack(tmp, f"features/{name}/", "")
                os.makedirs(os.path.dirname(site), exist_ok=True)
                os.rename(tmp, site)
        finally:
            lock.release()
    if site not in sys.path:
        # Right after the bundled site-packages: the bundled version wins over one installed on the host.
        sys.path.insert(sys.path.index(os.path.join(_extraction[0], "site-packages")) + 1, site)


# The directory of this build's extraction, once _prepare found or made it.
_extraction = []


def _site_packages():
    problems = []
    for path, explicit in _candidates():
        try:
            site = _prepare(path or _private_tmp_dir())
            _extraction.append(os.path.dirname(site))
            return site
        except (OSError, SetupError) as exc:
            where = path or f"/tmp/nightcrier-{os.getuid()}"
            if explicit:
                _fail(f"cannot use NIGHTCRIER_CACHE_DIR={where}: {exc}")
            problems.append(str(exc) if isinstance(exc, SetupError) else f"{where}: {exc}")
    _fail("no usable cache directory for the bundled dependencies (" + "; ".join(problems)
          + "); set NIGHTCRIER_CACHE_DIR to a writable directory")


def main():
    _check_interpreter()
    sys.path.insert(0, _site_packages())
    sys.meta_path.insert(0, _FeatureFinder)
    import nightcrier

    nightcrier.BUILD_ID = BUILD_ID
    sys.exit(nightcrier.main())


if __name__ == "__main__":
    main()
'''


@dataclass(frozen=True)
class Build:
    """A finished build: where it is, its id, the target it runs on, its size in bytes, and the
    supported versions whose bytecode had to be left to the first start (no such interpreter found)."""

    path: Path
    build_id: str
    target: str
    size: int
    without_bytecode: tuple[str, ...] = ()


@dataclass(frozen=True)
class Target:
    """What to build for: CPython minor versions, pip's platform tag and the machine type."""

    versions: tuple[str, ...] = SUPPORTED_PYTHONS
    platform: str = DEFAULT_PLATFORM
    machine: str = DEFAULT_MACHINE

    @property
    def tag(self) -> str:
        return target_tag(self.versions, self.machine)

    @property
    def native(self) -> bool:
        """Whether interpreters found here can compile bytecode for it (same machine type)."""
        return os.uname().machine == self.machine and sys.platform == "linux"


def render_bootstrap(build_id: str, target: Target = Target(), feature_modules: dict[str, str] | None = None
                     ) -> str:
    return (BOOTSTRAP.replace("@TARGET@", target.tag).replace("@BUILD_ID@", build_id)
            .replace("@FEATURE_MODULES@", repr(dict(sorted((feature_modules or {}).items())))))


def find_interpreter(version: str, explicit: dict[str, str]) -> str | None:
    """A CPython ``version`` ("3.12") on this machine: given, this one, pyenv's, or on PATH."""
    if version in explicit:
        return explicit[version]
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == version and sys.implementation.name == "cpython":
        return sys.executable
    roots = [os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv")]
    for root in filter(None, roots):
        found = sorted(Path(root, "versions").glob(f"{version}.*/bin/python{version}"),
                       key=lambda p: [int(x) for x in p.parts[-3].split(".") if x.isdigit()])
        if found:
            return str(found[-1])
    on_path = shutil.which(f"python{version}")
    if on_path and subprocess.run([on_path, "-c", ""], capture_output=True).returncode == 0:
        return on_path  # a pyenv shim for a version not selected fails here
    return None


def install_dependencies(requirements: Path, target_dir: Path, version: str, platform: str,
                         python: str | None) -> None:
    """``pip install --target`` the requirements as wheels for CPython ``version`` on ``platform``.

    Run by that interpreter when given, so environment markers are evaluated for it; raises on failure.
    """
    env = dict(os.environ, PIP_ROOT_USER_ACTION="ignore", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # --no-warn-conflicts: the target is a directory of its own; what the build machine has installed
    # elsewhere (and its conflicts) is none of the build's business.
    cmd = [python or sys.executable, "-m", "pip", "install", "--quiet", "--no-input", "--no-compile",
           "--no-warn-script-location", "--no-warn-conflicts", "--only-binary=:all:",
           "--implementation", "cp", "--python-version", version, "--platform", platform,
           "--target", str(target_dir), "-r", str(requirements)]
    result = subprocess.run(cmd, env=env)
    if result.returncode:
        raise SystemExit(f"build_zipapp: pip failed ({result.returncode}) for CPython {version}: "
                         f"{' '.join(cmd)}")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(text: str) -> str:
    """The normalised distribution name a requirement ("boto3==1.2; python_version<'4'") names."""
    return _normalise(re.split(r"[\s;\[(<>=!~]", text.strip(), maxsplit=1)[0])


@dataclass(frozen=True)
class Dist:
    """One installed distribution of a staged tree: its name, its files (relative paths as RECORD
    lists them) and the names of the distributions it requires."""

    name: str
    info: Path
    files: frozenset[str]
    requires: frozenset[str]


def installed_dists(tree: Path) -> dict[str, Dist]:
    """The distributions ``pip install --target`` put into ``tree``, by normalised name."""
    found = {}
    for info in tree.glob("*.dist-info"):
        meta = (info / "METADATA").read_text(errors="replace").splitlines()
        name = _normalise(next(line[5:].strip() for line in meta if line.startswith("Name:")))
        requires = {_requirement_name(line[len("Requires-Dist:"):])
                    for line in meta if line.startswith("Requires-Dist:") and "extra ==" not in line}
        with (info / "RECORD").open(newline="") as fh:
            files = {Path(os.path.normpath(row[0])).as_posix() for row in csv.reader(fh) if row}
        found[name] = Dist(name, info, frozenset(f for f in files if not f.startswith("..")),
                           frozenset(requires))
    return found


def _closure(roots: set[str], dists: dict[str, Dist]) -> set[str]:
    seen: set[str] = set()
    todo = [r for r in roots if r in dists]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += [r for r in dists[name].requires if r in dists]
    return seen


def requirement_names(requirements: Path) -> set[str]:
    """The distributions ``requirements`` names directly (a plain "name==version" per line)."""
    return {_requirement_name(line) for line in requirements.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith(("#", "-"))}


def feature_of(dists: dict[str, Dist], requirements: set[str]) -> dict[str, str]:
    """Which feature each distribution belongs to: "" (always extracted) for what nightcrier needs
    whatever it does, else the first feature (in ``FEATURES`` order) that needs it."""
    roots = {feature: {_normalise(n) for n in names} for feature, names in FEATURES.items()}
    needed_by = {feature: _closure(names, dists) for feature, names in roots.items()}
    # requirements.txt pins some dependencies of features too (MarkupSafe for Jinja2): those are not
    # what nightcrier needs whatever it does.
    core = _closure(requirements - set().union(*needed_by.values()), dists)
    return {name: "" if name in core else next((f for f, needed in needed_by.items() if name in needed), "")
            for name in dists}


def _wheel_tags(info: Path) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in (info / "WHEEL").read_text().splitlines()
            if line.startswith("Tag:")]


def share_abi3_wheels(trees: dict[str, Path]) -> None:
    """Give every interpreter the stable-ABI (abi3) wheel chosen for the oldest one.

    pip picks the newest abi3 build an interpreter accepts (cryptography: cp39-abi3 for 3.10,
    cp311-abi3 for 3.11 and later), so the same library would be in the zip twice; the oldest
    interpreter's build runs on every newer one, which is what abi3 promises.
    """
    oldest, *newer = trees.values()
    for name, dist in installed_dists(oldest).items():
        if not all(tag.split("-")[1] == "abi3" for tag in _wheel_tags(dist.info) or ["-"]):
            continue
        for tree in newer:
            other = installed_dists(tree).get(name)
            if other is None:
                continue
            for rel in other.files:
                (tree / rel).unlink(missing_ok=True)
            shutil.rmtree(other.info, ignore_errors=True)
            for rel in dist.files:
                if (oldest / rel).is_file():
                    (tree / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(oldest / rel, tree / rel)


def trim_aws_models(tree: Path) -> None:
    """Keep only the service models the S3 support reads (``BOTOCORE_SERVICES``)."""
    for data in (tree / "botocore" / "data", tree / "boto3" / "data"):
        if data.is_dir():
            for child in data.iterdir():
                if child.is_dir() and child.name not in BOTOCORE_SERVICES:
                    shutil.rmtree(child)


def finish_stage(target_dir: Path, python: str | None) -> None:
    """Add nightcrier and its schema files to a staged tree and byte-compile it with ``python``."""
    trim_aws_models(target_dir)
    # Console scripts name the build interpreter's path and are not reachable from the zip anyway.
    shutil.rmtree(target_dir / "bin", ignore_errors=True)
    pth = sorted(p.name for p in target_dir.glob("*.pth"))
    if pth:
        # The bootstrap only prepends the directory to sys.path, which does not run .pth files.
        raise SystemExit(f"build_zipapp: dependencies install .pth files, which are not supported: {pth}")
    for name in APP_FILES:
        if (target_dir / name).exists():
            raise SystemExit(f"build_zipapp: a dependency installs {name}, which clashes with nightcrier")
        shutil.copy2(ROOT / name, target_dir / name)
    for name in APP_DIRS:
        if (target_dir / name).exists():
            raise SystemExit(f"build_zipapp: a dependency installs {name}/, which clashes with nightcrier")
        shutil.copytree(ROOT / name, target_dir / name)
    if python is None:
        return
    # Unchecked-hash pycs stay valid whatever times extraction gives the sources, and compiling here
    # keeps it out of the first start.
    result = subprocess.run([python, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode",
                             "unchecked-hash", str(target_dir)])
    if result.returncode:
        raise SystemExit(f"build_zipapp: byte-compiling the staged files with {python} failed")


def _digest(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def _source_of(rel: str) -> str:
    """"pkg/__pycache__/mod.cpython-312.pyc" -> "pkg/mod.py": bytecode belongs where its source does."""
    parts = rel.split("/")
    if len(parts) > 1 and parts[-2] == "__pycache__":
        return "/".join([*parts[:-2], parts[-1].split(".", 1)[0] + ".py"])
    return rel


def tree_files(tree: Path, requirements: set[str]) -> dict[str, tuple[str, Path]]:
    """Every staged file of ``tree``: relative path -> (feature, file). A feature's files carry no
    bytecode (see ``FEATURES``); nightcrier's own files are part of no feature."""
    dists = installed_dists(tree)
    features = feature_of(dists, requirements)
    owner = {rel: features[dist.name] for dist in dists.values() for rel in dist.files}
    for dist in dists.values():
        owner.update({p.relative_to(tree).as_posix(): features[dist.name] for p in dist.info.rglob("*")})
    files = {}
    for path in tree.rglob("*"):
        rel = path.relative_to(tree).as_posix()
        feature = owner.get(_source_of(rel), "")
        if path.is_file() and not (feature and rel != _source_of(rel)):
            files[rel] = (feature, path)
    return files


def _part(feature: str) -> str:
    return f"{FEATURES_DIR}/{feature}" if feature else PAYLOAD_DIR


def payload_entries(trees: dict[str, Path], requirements: set[str]) -> list[tuple[str, Path]]:
    """(name in the zip, file) for every staged file, sorted by name: a file the same in every tree
    once under ``common/``, the others under their tree's ABI tag; a feature's files under
    ``features/<feature>/`` instead of ``site-packages/``."""
    files = {abi: tree_files(tree, requirements) for abi, tree in trees.items()}
    first = next(iter(files.values()))
    common = {rel for rel, (feature, _) in first.items()
              if all(other.get(rel, ("?",))[0] == feature for other in files.values())
              and len({_digest(other[rel][1]) for other in files.values()}) == 1}
    entries = [(f"{_part(first[rel][0])}/{COMMON_DIR}/{rel}", first[rel][1]) for rel in common]
    for abi, found in files.items():
        entries += [(f"{_part(feature)}/{abi}/{rel}", path) for rel, (feature, path) in found.items()
                    if rel not in common]
    return sorted(entries)


def feature_modules(entries: list[tuple[str, Path]]) -> dict[str, str]:
    """Top-level module name -> feature, for every module an optional feature's part holds."""
    found = {}
    for name, _ in entries:
        parts = name.split("/")
        if parts[0] != FEATURES_DIR or len(parts) < 4:
            continue
        top = parts[3]
        if len(parts) == 4:  # a module file: "six.py", "_cffi_backend.cpython-312-x86_64-linux-gnu.so"
            if not top.endswith((".py", ".so")):
                continue
            top = top.split(".", 1)[0]
        elif top.endswith((".dist-info", ".libs", ".data")) or top == "__pycache__":
            continue
        found[top] = parts[1]
    return found


def compute_build_id(entries: list[tuple[str, Path]], target: Target = Target()) -> str:
    digest = hashlib.sha256()
    digest.update(render_bootstrap("", target, feature_modules(entries)).encode())
    for name, path in entries:
        data = path.read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:BUILD_ID_LENGTH]


def write_zip(output: Path, entries: list[tuple[str, Path]], build_id: str, target: Target = Target()
              ) -> None:
    """Write the application atomically: a reader never sees a half-written file at ``output``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(SHEBANG)
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                zf.comment = f"nightcrier build {build_id}".encode()
                main = zipfile.ZipInfo("__main__.py", ZIP_DATE_TIME)
                main.external_attr = 0o644 << 16
                zf.writestr(main, render_bootstrap(build_id, target, feature_modules(entries)),
                            compress_type=zipfile.ZIP_DEFLATED)
                for name, path in entries:
                    info = zipfile.ZipInfo(name, ZIP_DATE_TIME)
                    info.external_attr = (0o755 if os.access(path, os.X_OK) else 0o644) << 16
                    info.compress_type = zipfile.ZIP_DEFLATED
                    with path.open("rb") as src, zf.open(info, "w") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        os.chmod(tmp_name, 0o755)
        os.replace(tmp_name, output)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def build(output: Path = DEFAULT_OUTPUT, requirements: Path = DEFAULT_REQUIREMENTS,
          target: Target = Target(), pythons: dict[str, str] | None = None) -> Build:
    """Build the application at ``output`` (replacing any file there) and describe it."""
    pythons = pythons or {}
    with tempfile.TemporaryDirectory(prefix="nightcrier-build-") as tmp:
        trees = {abi_tag(v): Path(tmp) / abi_tag(v) for v in target.versions}
        found = {v: find_interpreter(v, pythons) if target.native else None for v in target.versions}
        for version, python in found.items():
            install_dependencies(requirements, trees[abi_tag(version)], version, target.platform, python)
        share_abi3_wheels(trees)
        for version, python in found.items():
            finish_stage(trees[abi_tag(version)], python)
        entries = payload_entries(trees, requirement_names(requirements))
        build_id = compute_build_id(entries, target)
        write_zip(output, entries, build_id, target)
    missing = tuple(v for v, python in found.items() if python is None)
    return Build(output, build_id, target.tag, output.stat().st_size, missing)


def _python_option(text: str) -> tuple[str, str]:
    version, sep, path = text.partition("=")
    if not sep or version not in SUPPORTED_PYTHONS:
        raise argparse.ArgumentTypeError(f"expected 3.X=PATH with 3.X one of {', '.join(SUPPORTED_PYTHONS)}")
    return version, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build nightcrier.pyz for every supported CPython on one "
                                     "platform.")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"where to write the application (default {DEFAULT_OUTPUT.relative_to(ROOT)})")
    parser.add_argument("--requirements", type=Path, default=DEFAULT_REQUIREMENTS,
                        help="runtime requirements to bundle (default requirements.txt)")
    parser.add_argument("--platform", default=DEFAULT_PLATFORM,
                        help=f"pip platform tag of the wheels to bundle (default {DEFAULT_PLATFORM})")
    parser.add_argument("--machine", default=DEFAULT_MACHINE,
                        help=f"machine type (uname -m) the platform tag is for (default {DEFAULT_MACHINE})")
    parser.add_argument("--python", action="append", type=_python_option, default=[], metavar="3.X=PATH",
                        help="the interpreter to install and byte-compile for 3.X (default: found "
                        "under pyenv or on PATH)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    target = Target(SUPPORTED_PYTHONS, args.platform, args.machine)
    result = build(args.output.resolve(), args.requirements.resolve(), target, dict(args.python))
    for version in result.without_bytecode:
        print(f"build_zipapp: warning: no CPython {version} found here; its part has no bytecode, which "
              "is then compiled at its first start", file=sys.stderr)
    print(f"built {args.output} (build {result.build_id}, {result.target}, "
          f"{result.size / 1e6:.1f} MB) in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
