#!/usr/bin/env python3
"""Start-up benchmark of nightcrier.pyz: first start (empty cache) and warm start.

Builds the application with build_zipapp.py into a temporary directory (or takes ``--pyz``), then
times whole processes, each started fresh as ``python3 -I nightcrier.pyz ...`` from a directory of
its own, for ``--version`` and for ``check-config --config config.example.yaml``:

* first: every run gets a new empty ``NIGHTCRIER_CACHE_DIR``, so it extracts the dependencies;
* warm: the same cache directory for every run, after one untimed run filled it.

``python3 -I -c pass`` is timed too, as the floor no application start can go below. The figure is the
median wall time of ``--runs`` runs. Goals: warm <= 0.2 s, first <= 1 s, and the archive at most
25 MB; the exit status is 1 when a goal is missed.

One row per command and per CPython: every supported version found on the machine (pyenv or PATH),
or the ``--python`` interpreters given.

Usage:  python bench/startup.py [--pyz dist/nightcrier.pyz] [--runs 5] [--python python3.12 ...]
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import build_zipapp  # noqa: E402

GOALS = {"first": 1.0, "warm": 0.2}
SIZE_GOAL_MB = 25.0
CONFIG = ROOT / "config.example.yaml"


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    """Wall time of one run of ``cmd``; raises if it fails, since a failed start is not a start time."""
    started = time.perf_counter()
    result = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, timeout=120)
    elapsed = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{shlex.join(cmd)} exited {result.returncode}:\n{result.stderr}")
    return elapsed


def measure(python: str, pyz: Path, args: list[str], runs: int, work: Path) -> dict[str, float]:
    """Median first-start and warm-start seconds of ``python -I pyz args``."""
    cmd = [python, "-I", str(pyz), *args]
    first = []
    for n in range(runs):
        cache = work / f"first-{n}"
        first.append(timed(cmd, {"PATH": "/usr/bin:/bin", "NIGHTCRIER_CACHE_DIR": str(cache)}, work))
        shutil.rmtree(cache)
    warm_env = {"PATH": "/usr/bin:/bin", "NIGHTCRIER_CACHE_DIR": str(work / "warm")}
    timed(cmd, warm_env, work)
    warm = [timed(cmd, warm_env, work) for _ in range(runs)]
    return {"first": statistics.median(first), "warm": statistics.median(warm)}


def interpreters(chosen: list[str]) -> list[tuple[str, str]]:
    """(version, path) of each interpreter to measure: those given, else every supported CPython here."""
    if chosen:
        found = []
        for path in chosen:
            version = subprocess.run([path, "-I", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                     capture_output=True, text=True, check=True).stdout.strip()
            found.append((version, path))
        return found
    return [(v, p) for v in build_zipapp.SUPPORTED_PYTHONS
            if (p := build_zipapp.find_interpreter(v, {})) is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pyz", type=Path, help="application to measure (default: build one)")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure; the median is shown")
    parser.add_argument("--python", action="append", default=[],
                        help="interpreter to measure; repeatable (default: every supported CPython found)")
    args = parser.parse_args(argv)
    pythons = interpreters(args.python)
    if not pythons:
        raise SystemExit("no supported CPython found to measure")

    with tempfile.TemporaryDirectory(prefix="nightcrier-startup-") as tmp:
        work = Path(tmp)
        pyz = args.pyz.resolve() if args.pyz else build_zipapp.build(work / "nightcrier.pyz").path
        size = pyz.stat().st_size
        config = work / "config.yaml"
        shutil.copy(CONFIG, config)
        rows = []
        for version, python in pythons:
            floor = statistics.median(timed([python, "-I", "-c", "pass"], {"PATH": "/usr/bin:/bin"}, work)
                                      for _ in range(args.runs))
            for shown, cmd_args in ((["--version"], ["--version"]),
                                    (["check-config", "--config", "config.example.yaml"],
                                     ["check-config", "--config", str(config)])):
                rows.append((version, shlex.join(["python3", "-I", "nightcrier.pyz", *shown]),
                             measure(python, pyz, cmd_args, args.runs, work), floor))

    print(f"# nightcrier.pyz start-up, median of {args.runs} runs "
          f"({build_zipapp.target_tag()}, {size / 1e6:.1f} MB, goal <= {SIZE_GOAL_MB:g} MB)\n")
    print(f"| CPython | command | first start (goal <= {GOALS['first']:g} s) "
          f"| warm start (goal <= {GOALS['warm']:g} s) | `python3 -I -c pass` (floor) |")
    print("|---|---|---|---|---|")
    missed = [f"size {size / 1e6:.1f} MB"] if size / 1e6 > SIZE_GOAL_MB else []
    for version, command, figures, floor in rows:
        cells = []
        for kind in ("first", "warm"):
            ok = figures[kind] <= GOALS[kind]
            cells.append(f"{figures[kind]:.2f} s" + ("" if ok else " (missed)"))
            if not ok:
                missed.append(f"{kind} start of {command} on {version}")
        print(f"| {version} | `{command}` | {cells[0]} | {cells[1]} | {floor:.2f} s |")
    if missed:
        print("\ngoal missed: " + "; ".join(missed))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
