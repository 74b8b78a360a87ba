"""Incident pages over real HTTP: access rules, signed report links, files from the workspace only."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import http.client
import os
import re
import socket
import threading
import tracemalloc
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_store_contract import make_event

import nightcrier as nc

TOKEN = "w3b-t0ken-for-tests"
REPORT = ("# Investigation\n\n## Root Cause\nThe **api** container ran out of memory.\n"
          "**Confidence:** HIGH\n\n![remote](https://tracker.example.com/pixel.png)\n")


@dataclasses.dataclass
class Site:
    """A health server with pages on 127.0.0.1 over ``store``, and two finished incidents."""

    config: nc.Config
    store: nc.StateStore
    server: nc.HealthServer
    ids: list[str]
    outside: Path          # a secret file outside every workspace

    def get(self, target: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        """GET exactly ``target`` (no client-side normalising of the path)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        try:
            conn.putrequest("GET", target, skip_accept_encoding=True)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            conn.endheaders()
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode()
        finally:
            conn.close()

    def authed(self, target: str) -> tuple[int, dict[str, str], str]:
        return self.get(target, {"Authorization": f"Bearer {TOKEN}"})

    def workspace(self, index: int = 0) -> Path:
        return Path(self.config.workspace_root) / self.ids[index]

    def key(self) -> bytes:
        return nc.report_link_key(self.config, self.store)

    def link(self, incident_id: str, ttl: float = 3600, now: dt.datetime | None = None) -> str:
        url = nc.signed_report_url("http://127.0.0.1", incident_id, self.key(), ttl, now)
        assert url is not None
        return url.removeprefix("http://127.0.0.1")


def raw_request(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``request`` as it is on a new connection to 127.0.0.1:``port``; the status and the body
    of the answer, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def get_with_host(port: int, target: str, host: str | None) -> tuple[int, str]:
    """GET ``target`` with exactly this Host header (none when None)."""
    host_line = b"" if host is None else b"Host: " + host.encode("latin-1") + b"\r\n"
    status, body = raw_request(port, b"GET " + target.encode() + b" HTTP/1.1\r\n" + host_line
                               + b"Connection: close\r\n\r\n")
    return status, body.decode("utf-8", "replace")


def finish_incident(store: nc.StateStore, config: nc.Config, cluster: str, report: str | None,
                    **fields: Any) -> str:
    """An incident run to ``resolved`` by hand: workspace, one execution with logs, the report."""
    (incident_id,) = store.insert_events([make_event(cluster, **fields)])
    incident = store.claim_next("tester")
    assert incident is not None and incident.incident_id == incident_id
    workspace = nc.prepare_workspace(config.workspace_root, incident)
    store.set_workspace(incident_id, workspace)
    logs = nc.agent_log_paths(workspace)
    execution = store.start_execution(incident_id, "process", logs)
    Path(logs["agent-stdout.log"]).write_text("agent says <b>hello</b>\n")
    Path(logs["agent-stderr.log"]).write_text("")
    Path(workspace, "logs", "egress.log").write_text("2026-12-04T16:30:05Z refused example.com:443 "
                                                     "reason='not allowed'\n")
    if report is not None:
        Path(workspace, "output", "investigation.md").write_text(report)
        store.record_report(nc.TriageReport(nc.new_id(), incident_id, execution.execution_id, nc.utcnow(),
                                            report, nc.publish_report(report, incident_id, workspace),
                                            nc.summarize_report(report).text))
    store.finish_execution(execution.execution_id, 0, None, logs)
    assert store.complete(incident_id, "tester", nc.RESOLVED, 0, None)
    return incident_id


def start_site(store: nc.StateStore, tmp_path: Path, **settings: Any) -> tuple[nc.Config, nc.HealthServer]:
    config = nc.Config(**{"workspace_root": str(tmp_path / "ws"), "web_token": TOKEN, **settings})
    clusters = {"clusters": [{"name": "prod-eu", "status": nc.ACTIVE, "event_count": 2,
                              "triage_enabled": True,
                              "rejected_count": 0, "reconnects": 1, "subscription_id": "sub-1", "gaps": [],
                              "owner": "host:1:abc",
                              "permissions": {"can_get_pods": True, "can_get_secrets": False}}],
                "runner": {"name": "process", "available": True, "error": ""},
                "summary": {"total": 1, "active": 1, "standby": 0, "unhealthy": 0, "triage_enabled": 1}}
    pages = nc.WebPages(config, store, lambda: clusters, "127.0.0.1")
    server = nc.HealthServer("127.0.0.1", 0, clusters=lambda: clusters, readiness=lambda: (True, {}),
                             metrics=lambda: b"# metrics\n", pages=pages).start()
    return config, server


@pytest.fixture
def site(store: nc.StateStore, tmp_path: Path) -> Iterator[Site]:
    config, server = start_site(store, tmp_path)
    ids = [finish_incident(store, config, "prod-eu", REPORT),
           finish_incident(store, config, "staging", "## Root Cause\nOther incident's secret cause.\n")]
    outside = tmp_path / "outside-secret.txt"
    outside.write_text("TOP SECRET outside the workspace\n")
    try:
        yield Site(config, store, server, ids, outside)
    finally:
        server.stop()


PAGES = ["/incidents", "/incidents/{id}", "/clusters", "/incidents/{id}/files/incident.json"]


# -- access ------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("credentials", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"},
    {"Cookie": f"{nc.WEB_COOKIE}=0000"}, {"Cookie": f"{nc.WEB_COOKIE}={TOKEN}"}])
def test_pages_need_the_token(site: Site, page: str, credentials: dict[str, str]) -> None:
    status, headers, body = site.get(page.format(id=site.ids[0]), credentials)
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="nightcrier"'
    assert "api-7f8b9c" not in body and site.ids[0] not in body


@pytest.mark.parametrize("page", PAGES)
def test_a_wrong_token_in_the_query_is_401(site: Site, page: str) -> None:
    separator = "&" if "?" in page else "?"
    status, headers, _ = site.get(page.format(id=site.ids[0]) + separator + "token=wrong")
    assert status == 401 and "set-cookie" not in headers


def test_the_bearer_token_opens_every_page(site: Site) -> None:
    for page in PAGES:
        status, headers, _ = site.authed(page.format(id=site.ids[0]))
        assert status == 200, page
        assert "default-src 'none'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["cache-control"] == "no-store"


def test_the_token_once_in_the_address_becomes_a_cookie(site: Site) -> None:
    status, headers, _ = site.get(f"/incidents?status=resolved&token={TOKEN}")
    assert status == 303
    assert headers["location"] == "incidents?status=resolved", "the token leaves the address bar"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert TOKEN not in cookie, "the cookie is derived from the token, not the token"
    value = cookie.split(";")[0]
    status, _, body = site.get("/incidents?status=resolved", {"Cookie": f"other=1; {value}"})
    assert status == 200 and site.ids[0] in body


def test_a_https_base_url_makes_the_cookie_secure(store: nc.StateStore, tmp_path: Path) -> None:
    config = nc.Config(workspace_root=str(tmp_path), web_token=TOKEN, report_base_url="https://nc.example.com")
    pages = nc.WebPages(config, store, dict, "127.0.0.1")
    response = pages.respond(f"/clusters?token={TOKEN}", {})
    assert response.status == 303 and "; Secure" in dict(response.headers)["Set-Cookie"]


def test_health_and_metrics_stay_open(site: Site) -> None:
    for path in ("/healthz", "/readyz", "/health/clusters", "/metrics"):
        status, _, _ = site.get(path)
        assert status == 200, path


@pytest.mark.parametrize("bind, served", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                          ("127.3.2.1", True), ("0.0.0.0", False), ("::", False),
                                          ("10.1.2.3", False), ("nightcrier.example.com", False)])
def test_without_a_token_pages_are_served_only_on_loopback(
        store: nc.StateStore, tmp_path: Path, bind: str, served: bool) -> None:
    config = nc.Config(workspace_root=str(tmp_path))
    pages = nc.WebPages(config, store, dict, bind)
    host = f"[{bind}]:8080" if ":" in bind else f"{bind}:8080"
    assert pages.respond("/incidents", {"Host": host}).status == (200 if served else 403)


def test_without_a_token_on_loopback_over_http(store: nc.StateStore, tmp_path: Path) -> None:
    config, server = start_site(store, tmp_path, web_token="")
    try:
        incident_id = finish_incident(store, config, "prod-eu", REPORT)
        site = Site(config, store, server, [incident_id], tmp_path)
        assert site.get("/incidents")[0] == 200
        assert site.get(f"/incidents/{incident_id}/report")[0] == 200
        assert site.get(site.link(incident_id).replace("sig=", "sig=0"))[0] == 403, \
            "a bad signature is refused even where no token is needed"
    finally:
        server.stop()


# -- the Host header without a token (DNS rebinding) ------------------------------------------------

BASE_URL_HOST = "nightcrier.example.com"


@pytest.fixture
def tokenless(store: nc.StateStore, tmp_path: Path) -> Iterator[Site]:
    """Pages on loopback without a token, behind a proxy at BASE_URL_HOST."""
    config, server = start_site(store, tmp_path, web_token="", report_base_url=f"https://{BASE_URL_HOST}/nc/")
    try:
        incident_id = finish_incident(store, config, "prod-eu", REPORT)
        yield Site(config, store, server, [incident_id], tmp_path)
    finally:
        server.stop()


ALLOWED_HOSTS = ["127.0.0.1", "127.0.0.1:{port}", "localhost", "LocalHost:8080", "[::1]", "[::1]:{port}",
                 BASE_URL_HOST, f"{BASE_URL_HOST}:443"]
_ALLOWED_RE = re.compile(r"(localhost|127\.0\.0\.1|\[::1\]|" + re.escape(BASE_URL_HOST) + r")(:[0-9]{1,5})?",
                         re.IGNORECASE)


def test_this_machines_names_open_the_tokenless_pages(tokenless: Site) -> None:
    port = tokenless.server.port
    for host in ALLOWED_HOSTS:
        for target in (f"/incidents/{tokenless.ids[0]}",
                       f"/incidents/{tokenless.ids[0]}/files/logs/agent-stdout.log"):
            status, body = get_with_host(port, target, host.format(port=port))
            assert status == 200 and "hello" in body, (host, target)


def _hostile_hosts() -> st.SearchStrategy[str]:
    name = st.from_regex(r"[a-z0-9-]{1,12}(\.[a-z0-9-]{1,12}){0,3}", fullmatch=True)
    allowed = st.sampled_from(["localhost", "127.0.0.1", "[::1]", BASE_URL_HOST])
    port = st.integers(0, 65535).map(lambda n: f":{n}")
    rebound = st.one_of(
        st.tuples(name, st.just("."), allowed).map("".join),             # attacker.example.localhost
        st.tuples(allowed, st.just("."), name).map("".join),             # localhost.attacker.example
        st.tuples(allowed, st.sampled_from(["@", ":", ";", ",", " ", "/", "\\"]), name).map("".join),
        st.tuples(name, st.sampled_from(["@", ", "]), allowed).map("".join))
    noise = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                    max_size=60)
    hosts = st.one_of(name, st.tuples(name, port).map("".join), rebound,
                      st.tuples(rebound, port).map("".join), noise)
    return hosts.filter(lambda h: not _ALLOWED_RE.fullmatch(h))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(host=_hostile_hosts())
def test_any_other_host_gets_421_and_nothing_of_the_incidents(tokenless: Site, host: str) -> None:
    port = tokenless.server.port
    for target in ("/incidents", f"/incidents/{tokenless.ids[0]}",
                   f"/incidents/{tokenless.ids[0]}/files/logs/agent-stdout.log", "/clusters"):
        status, body = get_with_host(port, target, host)
        # 400: the server refused the header itself (a control character, say).
        assert status in (421, 400), (host, target, status)
        assert tokenless.ids[0] not in body and "hello" not in body and "prod-eu" not in body
        if status == 421:
            assert "web_token" in body


def test_a_request_without_a_host_gets_421(tokenless: Site) -> None:
    status, body = get_with_host(tokenless.server.port, "/incidents", None)
    assert status == 421 and "localhost" in body and tokenless.ids[0] not in body


def test_probes_and_token_holders_do_not_depend_on_the_host(tokenless: Site, site: Site) -> None:
    assert get_with_host(tokenless.server.port, "/healthz", "attacker.example")[0] == 200
    status, _ = raw_request(site.server.port, f"GET /incidents/{site.ids[0]} HTTP/1.1\r\n"
                            f"Host: attacker.example\r\nAuthorization: Bearer {TOKEN}\r\n"
                            "Connection: close\r\n\r\n".encode())
    assert status == 200, "with web_token set, the token is the guard, not the name"


# -- signed report links ------------------------------------------------------------------------


def test_a_signed_link_opens_its_own_report_without_a_token(site: Site) -> None:
    status, headers, body = site.get(site.link(site.ids[0]))
    assert status == 200
    assert f"<title>Investigation Report - {site.ids[0]}</title>" in body
    assert "<h2>Root Cause</h2>" in body and "Other incident" not in body
    assert "img-src 'self' data:" in headers["content-security-policy"]
    assert "img-src 'self' data:" in body and "https:;" not in body, "no remote images in the page's own CSP"


def test_a_signed_link_opens_nothing_else(site: Site) -> None:
    query = site.link(site.ids[0]).partition("?")[2]
    for target in (f"/incidents/{site.ids[1]}/report?{query}", f"/incidents/{site.ids[0]}?{query}",
                   f"/incidents/{site.ids[0]}/files/incident.json?{query}", f"/incidents?{query}"):
        status, _, body = site.get(target)
        assert status in (401, 403), target
        assert "secret cause" not in body and "api-7f8b9c" not in body


def _flip(text: str) -> str:
    return text[:-1] + ("0" if text[-1] != "0" else "1")


@pytest.mark.parametrize("tamper", [
    lambda q: q.replace("sig=", "sig=" + "0" * 64 + "&x="),
    lambda q: re.sub(r"sig=([0-9a-f]+)", lambda m: "sig=" + _flip(m.group(1)), q),
    lambda q: re.sub(r"expires=(\d+)", lambda m: f"expires={int(m.group(1)) + 86400}", q),
    lambda q: re.sub(r"sig=([0-9a-f]+)", lambda m: "sig=" + m.group(1).upper(), q),
    lambda q: q + "&sig=" + "0" * 64,
    lambda q: re.sub(r"&?sig=[0-9a-f]+", "", q),
    lambda q: re.sub(r"expires=\d+&?", "", q),
    lambda q: "",
], ids=["other-sig-param", "flipped-sig", "extended-expiry", "upper-case", "two-sigs", "no-sig", "no-expires",
        "unsigned"])
def test_tampered_or_unsigned_links_are_403(site: Site, tamper: Callable[[str], str]) -> None:
    path, _, query = site.link(site.ids[0]).partition("?")
    tampered = tamper(query)
    status, _, body = site.get(f"{path}?{tampered}" if tampered else path)
    assert status == 403
    assert "ran out of memory" not in body


def test_an_expired_link_is_403(site: Site) -> None:
    week_ago = nc.utcnow() - dt.timedelta(days=8)
    status, _, _ = site.get(site.link(site.ids[0], ttl=nc.parse_go_duration("168h"), now=week_ago))
    assert status == 403
    assert site.get(site.link(site.ids[0], ttl=nc.parse_go_duration("168h")))[0] == 200


def test_a_link_signed_with_another_key_is_403(site: Site) -> None:
    url = nc.signed_report_url("http://x", site.ids[0], b"another key", 3600)
    assert url is not None
    assert site.get(url.removeprefix("http://x"))[0] == 403


def test_the_link_key_is_made_once_and_shared(store_factory: Callable[[], nc.StateStore]) -> None:
    stores = [store_factory() for _ in range(3)]
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda s=s: keys.append(nc.report_link_key(nc.Config(), s)))
               for s in stores for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 6 and len(set(keys)) == 1 and len(keys[0]) == 32
    assert nc.report_link_key(nc.Config(report_link_secret="configured"), stores[0]) == b"configured"


def test_a_configured_secret_signs_links_any_replica_can_check(store: nc.StateStore, tmp_path: Path) -> None:
    config = nc.Config(workspace_root=str(tmp_path), web_token=TOKEN, report_link_secret="s3cret")
    url = nc.signed_report_url("https://nc.example.com/base/", nc.new_id(), b"s3cret", 60)
    assert url is not None and url.startswith("https://nc.example.com/base/incidents/")
    incident_id = url.split("/")[5]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert nc.verify_report_link(incident_id, query, nc.report_link_key(config, store))


@pytest.mark.parametrize("base", ["", "ftp://x", "/relative", "https://"])
def test_no_link_without_an_http_base_url(base: str) -> None:
    assert nc.signed_report_url(base, nc.new_id(), b"k", 60) is None


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.text(max_size=200))
def test_no_made_up_query_verifies(query: str) -> None:
    parsed = urllib.parse.parse_qs(query, keep_blank_values=True)
    assert not nc.verify_report_link("5bcf930b-32ed-4ba2-a7b0-220a2bd412da", parsed, b"key")


@settings(max_examples=300)
@given(position=st.integers(min_value=0), char=st.characters(codec="ascii"))
def test_any_changed_character_breaks_a_link(position: int, char: str) -> None:
    incident_id = "5bcf930b-32ed-4ba2-a7b0-220a2bd412da"
    url = nc.signed_report_url("http://h", incident_id, b"key", 3600)
    assert url is not None
    query = url.partition("?")[2]
    index = position % len(query)
    changed = query[:index] + char + query[index + 1:]
    verdict = nc.verify_report_link(incident_id, urllib.parse.parse_qs(changed), b"key")
    assert verdict == (changed == query or urllib.parse.parse_qs(changed) == urllib.parse.parse_qs(query))


@pytest.mark.parametrize("text, seconds", [("168h", 604800), ("1h30m", 5400), ("2.5s", 2.5), ("90m", 5400),
                                           ("300ms", 0.3), ("0", 0)])
def test_go_durations(text: str, seconds: float) -> None:
    assert nc.parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "h", "7d", "1h-", "one hour", "1.2.3h"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        nc.parse_go_duration(text)


def test_a_bad_ttl_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text('{"clusters": [{"name": "c1", "mcp": {"endpoint": "http://127.0.0.1:9/mcp"}}]}')
    bad_unit = r'report_link_ttl \(env REPORT_LINK_TTL\): time: unknown unit "d"'
    with pytest.raises(nc.ConfigError, match=bad_unit):
        nc.load_config(str(path), env={"REPORT_LINK_TTL": "7d"})
    with pytest.raises(nc.ConfigError, match="must be positive"):
        nc.load_config(str(path), env={"REPORT_LINK_TTL": "-1h"})
    config, _ = nc.load_config(str(path), env={"REPORT_LINK_TTL": "36h", "WEB_TOKEN": TOKEN})
    assert config.report_link_ttl == "36h" and config.web_token == TOKEN
    assert nc.config_as_dict(config)["web_token"] == nc.SECRET_MASK


# -- files from the workspace only -----------------------------------------------------------------


def test_files_of_nested_directories_are_served(site: Site) -> None:
    nested = site.workspace() / "attempts" / "2" / "logs"
    nested.mkdir(parents=True)
    (nested / "agent-stdout.log").write_text("second attempt\n")
    status, _, body = site.authed(f"/incidents/{site.ids[0]}/files/attempts/2/logs/agent-stdout.log")
    assert status == 200 and body == "second attempt\n"


@pytest.mark.parametrize("target, root", [("/incidents", "./"), ("/incidents/", "../"), ("/clusters", "./"),
                                          ("/incidents/{id}", "../"), ("/incidents/{id}/", "../../")])
def test_links_are_relative_to_the_page(site: Site, target: str, root: str) -> None:
    _, _, body = site.authed(target.format(id=site.ids[0]))
    assert f'href="{root}clusters"' in body and 'href="/' not in body


def test_raw_files_are_served_from_the_workspace(site: Site) -> None:
    status, headers, body = site.authed(f"/incidents/{site.ids[0]}/files/output/investigation.md")
    assert status == 200 and body == REPORT
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert "sandbox" in headers["content-security-policy"]
    status, headers, body = site.authed(f"/incidents/{site.ids[0]}/files/incident.json")
    assert status == 200 and headers["content-type"] == "application/json" and site.ids[0] in body


def write_large_log(site: Site) -> tuple[Path, int]:
    """logs/agent-full.log, 1.2 MiB longer than what the pages serve of a file; its first line differs."""
    path = site.workspace() / "logs" / "agent-full.log"
    line = b"0123456789abcdef" * 4 + b"\n"
    with open(path, "wb") as fh:
        for number in range(nc.RAW_FILE_MAX_BYTES // len(line) + 20000):
            fh.write(line if number else b"X" * (len(line) - 1) + b"\n")
    return path, path.stat().st_size


def test_a_large_file_is_streamed_not_read_whole(site: Site) -> None:
    path, size = write_large_log(site)
    expected = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(size - nc.RAW_FILE_MAX_BYTES)
        while chunk := fh.read(1 << 16):
            expected.update(chunk)
    request = (f"GET /incidents/{site.ids[0]}/files/logs/agent-full.log HTTP/1.1\r\nHost: localhost\r\n"
               f"Authorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n").encode()
    received, head, in_body, length = hashlib.sha256(), b"", False, 0
    tracemalloc.start()
    try:
        with socket.create_connection(("127.0.0.1", site.server.port), timeout=30) as sock:
            sock.sendall(request)
            while chunk := sock.recv(1 << 16):
                if not in_body:
                    head, in_body, chunk = (head + chunk).partition(b"\r\n\r\n")
                received.update(chunk)
                length += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert head.split(b" ", 2)[1] == b"200"
    assert f"x-nightcrier-truncated: last {nc.RAW_FILE_MAX_BYTES} of {size} bytes".encode() in head.lower()
    assert length == nc.RAW_FILE_MAX_BYTES and received.hexdigest() == expected.hexdigest()
    assert peak < 6 * 1024 * 1024, f"serving a 16 MiB tail took {peak / 2**20:.1f} MiB at once"


def test_clients_that_do_not_read_a_large_file_hold_no_thread(site: Site) -> None:
    write_large_log(site)
    request = (f"GET /incidents/{site.ids[0]}/files/logs/agent-full.log HTTP/1.1\r\nHost: localhost\r\n"
               f"Authorization: Bearer {TOKEN}\r\n\r\n").encode()
    stalled = [socket.create_connection(("127.0.0.1", site.server.port), timeout=10)
               for _ in range(3 * nc.HEALTH_THREADS)]
    try:
        for sock in stalled:
            sock.sendall(request)  # and never read the answer
        for sock in stalled:  # each answer has begun: its request has had its thread
            assert sock.recv(12).split(b" ")[1] == b"200"
        status, body = raw_request(site.server.port, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
                                   b"Connection: close\r\n\r\n", timeout=10)
        assert (status, body) == (200, b"ok\n")
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.parametrize("tail", [
    "../../outside-secret.txt", "..%2F..%2Foutside-secret.txt", "%2e%2e/%2e%2e/outside-secret.txt",
    "..%2f..%2foutside-secret.txt", "output/..%2F..%2F..%2Foutside-secret.txt", "%2Fetc%2Fpasswd",
    "..%5C..%5Coutside-secret.txt", "incident.json%00.md", "%c0%ae%c0%ae/outside-secret.txt",
    ".hidden", "output/", "logs", "../{other}/output/investigation.md", "nightcrier.db",
])
def test_path_traversal_gets_nothing(site: Site, tail: str) -> None:
    (site.workspace() / ".hidden").write_text("hidden")
    status, _, body = site.authed(f"/incidents/{site.ids[0]}/files/" + tail.format(other=site.ids[1]))
    assert status in (403, 404)
    assert "TOP SECRET" not in body and "hidden" not in body and "secret cause" not in body


def test_symlinks_in_the_workspace_are_not_followed(site: Site) -> None:
    workspace = site.workspace()
    os.symlink(site.outside, workspace / "output" / "leak.md")
    os.symlink(site.outside.parent, workspace / "up")
    os.symlink(site.workspace(1), workspace / "other")
    os.mkfifo(workspace / "output" / "pipe.log")
    for tail in ("output/leak.md", "up/outside-secret.txt", "other/output/investigation.md",
                 "output/pipe.log"):
        status, _, body = site.authed(f"/incidents/{site.ids[0]}/files/{tail}")
        assert status == 404, tail
        assert "TOP SECRET" not in body and "secret cause" not in body


def test_a_workspace_replaced_by_a_symlink_is_not_followed(site: Site) -> None:
    workspace = site.workspace()
    moved = workspace.with_name("moved")
    workspace.rename(moved)
    os.symlink(moved, workspace)
    assert site.authed(f"/incidents/{site.ids[0]}/files/incident.json")[0] == 404


@pytest.mark.parametrize("target", ["/incidents/not-a-uuid", "/incidents/../clusters", "/incidents/%2E%2E",
                                    "/incidents/{id}/nope", "/incidents/{id}/files", "/clusters/x",
                                    "/incidents/{id}/files/a/b/c/d/e/f"])
def test_unknown_pages_are_404(site: Site, target: str) -> None:
    assert site.authed(target.format(id=site.ids[0]))[0] == 404
    assert site.authed(f"/incidents/{nc.new_id()}")[0] == 404


@settings(max_examples=400)
@given(path=st.text(alphabet=st.sampled_from(list("/.%2eEfFcC5aA0\\x\x00")), max_size=40))
def test_decoded_segments_never_climb(path: str) -> None:
    segments = nc.path_segments("/" + path)
    if segments is not None:
        assert all(s not in ("", ".", "..") and "/" not in s and "\\" not in s and "\0" not in s
                   for s in segments)


# -- what the pages show -----------------------------------------------------------------------------


def test_the_list_shows_rows_counts_and_filters(site: Site) -> None:
    status, _, body = site.authed("/incidents")
    assert status == 200
    assert all(f'data-incident="{i}"' in body for i in site.ids)
    assert re.search(r"resolved</span><b>2</b>", body)
    _, _, body = site.authed("/incidents?cluster=staging")
    assert f'data-incident="{site.ids[1]}"' in body and f'data-incident="{site.ids[0]}"' not in body
    _, _, body = site.authed("/incidents?status=pending")
    assert "No incidents match." in body
    _, _, body = site.authed("/incidents?since=1h")
    assert f'data-incident="{site.ids[0]}"' in body
    for bad in ("status=nope", "since=yesterday", "page=0", "page=x"):
        assert site.authed(f"/incidents?{bad}")[0] == 400, bad


def test_the_pages_show_a_repeat_what_it_repeats_and_how_often_the_first_recurred(site: Site) -> None:
    site.store.rules = nc.TriageRules(dedup_window=300)
    first = site.ids[0]
    repeat, = site.store.insert_events([make_event("prod-eu", received_at=nc.utcnow())])
    _, _, body = site.authed(f"/incidents/{repeat}")
    assert re.search(rf'id="duplicate-of"><a\s+href="[^"]*{first}"', body)
    assert f"duplicate: repeats {first}" in body
    _, _, body = site.authed(f"/incidents/{first}")
    assert re.search(r'id="recurrences">1\s+time, last ', body)
    _, _, body = site.authed("/incidents")
    assert "×2" in body and 'class="muted skip-reason">duplicate: repeats' in body


def test_the_incident_page_shows_each_runs_spend(site: Site) -> None:
    (incident_id,) = site.store.insert_events([make_event("spend", received_at=nc.utcnow())])
    execution = site.store.start_execution(incident_id, "process", {})
    site.store.finish_execution(execution.execution_id, 0, None, {}, nc.RunSpend(1600, 0.75))
    _, _, body = site.authed(f"/incidents/{incident_id}")
    assert '<td class="tokens">1600</td>' in body and '<td class="cost">$0.7500</td>' in body


def test_the_list_pages_through_incidents(site: Site) -> None:
    for n in range(nc.PAGE_SIZE):
        earlier = nc.utcnow() - dt.timedelta(hours=1, seconds=n)
        site.store.insert_events([make_event("bulk", received_at=earlier)])
    _, _, first = site.authed("/incidents")
    assert first.count('class="incident"') == nc.PAGE_SIZE and "older →" in first
    _, _, second = site.authed("/incidents?page=2")
    assert second.count('class="incident"') == 2 and "← newer" in second and "older →" not in second


def test_the_incident_page_shows_fault_runs_report_logs_and_files(site: Site) -> None:
    status, _, body = site.authed(f"/incidents/{site.ids[0]}")
    assert status == 200
    assert "CrashLoop on prod-eu" in body and "payments/api-7f8b9c" in body
    assert "<td>1</td>" in body, "the first attempt"
    assert "The api container ran out of memory. (confidence: HIGH)" in body
    assert "<h2>Root Cause</h2>" in body
    assert "agent says &lt;b&gt;hello&lt;/b&gt;" in body
    assert "refused example.com:443 reason=&#39;not allowed&#39;" in body, "the network gate's audit log"
    for name in ("incident.json", "prompt-sent.md", "output/investigation.md", "logs/agent-stdout.log",
                 "logs/egress.log"):
        assert f'/files/{name}"' in body or name == "prompt-sent.md"


def test_hostile_fields_are_escaped(site: Site) -> None:
    evil = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    (incident_id,) = site.store.insert_events([make_event("prod-eu", resource_name=evil, context=evil,
                                                          fault_type=evil)])
    for target in ("/incidents", f"/incidents/{incident_id}"):
        _, _, body = site.authed(target)
        assert "<script>alert(1)" not in body and "<img src=x" not in body
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body


def test_the_clusters_page(site: Site) -> None:
    status, _, body = site.authed("/clusters")
    assert status == 200
    assert "prod-eu" in body and "host:1:abc" in body and "✔ pods" in body and "✘ secrets" in body


def test_a_database_that_does_not_answer_gives_503(site: Site, tmp_path: Path) -> None:
    store = nc.SqliteStore(str(tmp_path / "gone.db"))
    store.close()
    pages = nc.WebPages(site.config, store, dict, "127.0.0.1")
    response = pages.respond("/incidents", {"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 503 and b"Database unavailable" in response.body
