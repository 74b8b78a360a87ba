"""The SQLite store's tests again on SQLite 3.34.0, the library of Debian 11 and RHEL 9's Pythons.

``NIGHTCRIER_TEST_OLD_SQLITE`` names a directory holding a ``libsqlite3.so.0`` built from the 3.34.0
amalgamation (``.ci/build-old-sqlite.sh`` builds it; ``.ci/run`` exports the variable). The tests
run in a pytest subprocess that loads that library through ``LD_LIBRARY_PATH``; the subprocess's
conftest refuses to start unless its ``sqlite3`` really is 3.34.0, so a library that is not picked
up fails instead of silently testing the system's SQLite again.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import infra
from conftest import ROOT

OLD_SQLITE_VERSION = "3.34.0"
# The tests that exercise the SQLite store; -k sqlite keeps the SQLite side of each.
SQLITE_TEST_FILES = ("tests/test_store_contract.py", "tests/test_store_engines.py",
                     "tests/test_store_concurrency.py", "tests/test_engine.py", "tests/test_recovery.py",
                     "tests/test_outage.py")


def test_the_sqlite_tests_pass_on_sqlite_3_34(tmp_path: Path) -> None:
    library_dir = os.environ.get("NIGHTCRIER_TEST_OLD_SQLITE", "")
    if not library_dir or not os.path.isfile(os.path.join(library_dir, "libsqlite3.so.0")):
        infra.unavailable("no SQLite 3.34.0 library: run `bash .ci/build-old-sqlite.sh` and set "
                          "NIGHTCRIER_TEST_OLD_SQLITE to the directory it prints")
    inherited = os.environ.get("LD_LIBRARY_PATH", "")
    env = {**os.environ, "LD_LIBRARY_PATH": library_dir + (os.pathsep + inherited if inherited else ""),
           "NIGHTCRIER_EXPECT_SQLITE_VERSION": OLD_SQLITE_VERSION}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "run"),
         "-k", "sqlite", *SQLITE_TEST_FILES],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200)
    # Exit status 0 also means some tests ran (none is 5) and the version check passed (else 4).
    assert result.returncode == 0, f"on SQLite {OLD_SQLITE_VERSION}:\n" + result.stdout[-6000:]
