"""The first hour of a newcomer: the README's commands in a clean virtual environment, the demo with its
pages, signed report links, and the help texts and messages that say what to do next.

The README's first-hour block is run as written (in a new venv under a home directory of the test's
own), except that the demo's port is a free one; the demo is then answered over HTTP and stopped with
Ctrl-C (SIGINT).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import requests
import yaml
from conftest import ROOT, wait_for

import nightcrier as nc

FIRST_HOUR_MARKER = "<!-- first-hour -->"


def first_hour_commands() -> list[str]:
    """The lines of the README's first-hour block."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(FIRST_HOUR_MARKER)
    assert lines[start + 1] == "```sh"
    end = lines.index("```", start + 2)
    return lines[start + 2:end]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "nightcrier.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The README's first-hour commands, run in a fresh venv; yields (process, output file, work dir,
    port) with the demo serving its pages after its faults were triaged."""
    home = tmp_path_factory.mktemp("home")
    work = tmp_path_factory.mktemp("checkout")
    commands = first_hour_commands()
    *setup, serve = commands
    assert serve == "python nightcrier.py demo --serve 8080", serve
    port = _free_port()
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8"}
    # The checkout as a newcomer has it: the README's relative paths resolve in the working directory.
    for name in ("nightcrier.py", "requirements.txt", "schema_sqlite.sql", "schema_postgres.sql"):
        (work / name).symlink_to(ROOT / name)
    (work / "templates").symlink_to(ROOT / "templates")
    result = subprocess.run(["bash", "-euc", "\n".join(setup)], cwd=work, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    activate = next(line for line in setup if line.startswith(". "))
    output = work / "demo.out"
    with output.open("w") as out:
        proc = subprocess.Popen(["bash", "-c", f"{activate} && exec {serve.replace('8080', str(port))}"],
                                cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "the pages stay up" in output.read_text() or proc.poll() is not None, timeout=120,
                 what="the demo to triage its faults")
        assert proc.poll() is None, output.read_text()
        yield proc, output, work, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_first_hour_commands_serve_the_pages(demo) -> None:  # type: ignore[no-untyped-def]
    proc, output, work, port = demo
    text = output.read_text()
    assert f"http://127.0.0.1:{port}/incidents" in text
    page = requests.get(f"http://127.0.0.1:{port}/incidents", timeout=10)
    assert page.status_code == 200 and "resolved" in page.text
    config = work / "nightcrier-demo" / "config.yaml"
    listing = run_cli("incidents", "--config", str(config), "--json", cwd=work)
    assert listing.returncode == 0, listing.stderr
    incidents = yaml.safe_load(listing.stdout)
    assert len(incidents) == 5 and {i["status"] for i in incidents} == {"resolved"}


def _demo_incident(work: Path) -> tuple[Path, str]:
    config = work / "nightcrier-demo" / "config.yaml"
    listing = run_cli("incidents", "--config", str(config), "--json", cwd=work)
    return config, yaml.safe_load(listing.stdout)[0]["incident_id"]


def test_link_opens_the_report_until_it_expires_and_not_when_tampered_with(demo) -> None:  # type: ignore[no-untyped-def]
    _, _, work, port = demo
    config, incident_id = _demo_incident(work)
    made = run_cli("link", incident_id[:8], "--ttl", "2h", "--config", str(config), cwd=work)
    assert made.returncode == 0, made.stderr
    url = made.stdout.strip()
    assert url.startswith(f"http://127.0.0.1:{port}/incidents/{incident_id}/report?")
    expires = int(urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["expires"][0])
    assert abs(expires - (nc.utcnow().timestamp() + 7200)) < 120
    opened = requests.get(url, timeout=10)
    assert opened.status_code == 200 and "Root Cause" in opened.text
    tampered = url[:-1] + ("0" if url[-1] != "0" else "1")
    assert requests.get(tampered, timeout=10).status_code == 403
    store = nc.SqliteStore(str(work / "nightcrier-demo" / "nightcrier.db"), read_only=True)
    try:
        key = nc.report_link_key(nc.load_config(str(config), env={})[0], store)
    finally:
        store.close()
    expired = nc.signed_report_url(f"http://127.0.0.1:{port}/", incident_id, key, 60,
                                   now=nc.utcnow() - dt.timedelta(hours=1))
    assert expired is not None and requests.get(expired, timeout=10).status_code == 403


def test_show_names_the_incident_page_and_a_signed_report_link(demo) -> None:  # type: ignore[no-untyped-def]
    _, _, work, port = demo
    config, incident_id = _demo_incident(work)
    shown = run_cli("show", incident_id[:6], "--config", str(config), cwd=work)
    assert shown.returncode == 0, shown.stderr
    assert f"page: http://127.0.0.1:{port}/incidents/{incident_id}\n" in shown.stdout
    link = re.search(r"^report link: (\S+)$", shown.stdout, re.MULTILINE)
    assert link and requests.get(link.group(1), timeout=10).status_code == 200


def test_an_incident_prefix_in_the_address_leads_to_the_incident(demo) -> None:  # type: ignore[no-untyped-def]
    _, _, work, port = demo
    _, incident_id = _demo_incident(work)
    answer = requests.get(f"http://127.0.0.1:{port}/incidents/{incident_id[:8]}", timeout=10)
    assert answer.status_code == 200 and answer.url.endswith(f"/incidents/{incident_id}")
    assert requests.get(f"http://127.0.0.1:{port}/incidents/ffffffffff", timeout=10).status_code == 404


def test_the_demo_stops_on_ctrl_c(demo) -> None:  # type: ignore[no-untyped-def]
    """Last of the tests that use the demo: it ends the demo."""
    proc, output, _, port = demo
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0, output.read_text()[-3000:]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/incidents", timeout=5)


def test_link_without_report_base_url_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"workspace_root": str(tmp_path / "ws"),
                                      "clusters": [{"name": "c1", "mcp": {"endpoint": "http://127.0.0.1:9/"}}]}))
    nc.SqliteStore(str(tmp_path / "ws" / "nightcrier.db")).close()
    result = run_cli("link", "0", "--config", str(config), cwd=tmp_path)
    assert result.returncode != 0
    assert "no incident" in result.stderr or "report_base_url" in result.stderr


# -- help and messages -----------------------------------------------------------------------------

COMMANDS = ("run", "check-config", "tail", "incidents", "show", "link", "simulate", "demo", "agent-check",
            "stub-agent", "version")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_description_and_an_example(command: str, tmp_path: Path) -> None:
    result = run_cli(command, "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "\nexample:\n  " in result.stdout
    usage, _, rest = result.stdout.partition("\n\n")
    assert rest.split("\n", 1)[0].endswith("."), "a description follows the usage"


@pytest.mark.parametrize("command", ("tail", "incidents", "show", "link", "agent-check"))
def test_reading_commands_list_their_own_options_not_every_setting(command: str, tmp_path: Path) -> None:
    result = run_cli(command, "--help", cwd=tmp_path)
    assert "--max-concurrent-agents" not in result.stdout
    assert len(result.stdout.splitlines()) < 40, result.stdout
    if command in ("tail", "show", "link"):
        assert "unambiguous prefix" in result.stdout


def test_run_and_check_config_still_take_every_setting_as_a_flag(tmp_path: Path) -> None:
    for command in ("run", "check-config"):
        assert "--max-concurrent-agents" in run_cli(command, "--help", cwd=tmp_path).stdout


def test_check_config_says_configuration_ok(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"workspace_root": str(tmp_path / "ws"),
                                      "clusters": [{"name": "c1", "mcp": {"endpoint": "http://127.0.0.1:9/"}}]}))
    result = run_cli("check-config", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.rstrip().endswith("# configuration OK")
    yaml.safe_load(result.stdout)  # still one YAML document


def test_the_token_page_says_how_to_get_in(tmp_path: Path) -> None:
    config = nc.Config(workspace_root=str(tmp_path), health_bind="0.0.0.0", web_token="a" * 32)
    store = nc.SqliteStore(str(tmp_path / "nightcrier.db"))
    try:
        pages = nc.WebPages(config, store, dict, "0.0.0.0")
        response = pages.respond("/incidents", {"Host": "nightcrier.example"})
    finally:
        store.close()
    assert response.status == 401
    assert b"web_token" in response.body and b"?token=" in response.body


def test_failed_and_agent_failed_are_styled_apart() -> None:
    css = re.sub(r"/\*.*?\*/", "", (ROOT / "templates" / "base.html").read_text(), flags=re.DOTALL)
    rules = {}
    for selectors, body in re.findall(r"([^{}]+)\{([^}]*)\}", css):
        for selector in selectors.split(","):
            if match := re.fullmatch(r"\s*\.status\.(\w+)\s*", selector):
                rules[match.group(1)] = body
    assert rules["failed"] != rules["agent_failed"]
