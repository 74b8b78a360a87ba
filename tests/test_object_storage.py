"""Object storage: artifacts to Azure Blob (Azurite) and S3 (moto), signed links, Slack's button, failures.

The emulators run as real servers on 127.0.0.1, started and stopped by the tests: Azurite from the npm
registry (``.ci/run`` installs it; ``NIGHTCRIER_TEST_AZURITE`` names its ``azurite-blob``), moto in server
mode from PyPI, and s3rver from the npm registry (``NIGHTCRIER_TEST_S3RVER``) for the one check moto
cannot make: that a presigned link stops working when it expires. Slack is the local webhook of
test_reporting.
"""

from __future__ import annotations

import datetime as dt
import glob
import html.parser
import logging
import os
import shutil
import socket
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import infra
import pytest
import requests
import yaml
from conftest import wait_for
from hypothesis import given
from hypothesis import strategies as st
from test_reporting import Webhook
from test_store_contract import make_event

import nightcrier as nc

AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's published development key: every copy of the emulator accepts it, it guards nothing.
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
CONTAINER = "incident-reports"
BUCKET = "incident-reports"
REPORT_BASE_URL = "https://reports.example.com/ws/"

REPORT_AGENT = """cat > output/investigation.md <<'EOF'
# Investigation

## Root Cause
The **api** container ran out of memory: its limit of 128Mi was reached under load.
**Confidence:** HIGH

## Evidence
OOMKilled three times in ten minutes.
EOF
echo "agent output line"
echo "agent warning line" >&2
ln -s /etc/hostname logs/agent-full.log
"""

EXPECTED_TYPES = {
    "investigation.html": "text/html; charset=utf-8",
    "investigation.md": "text/markdown; charset=utf-8",
    "incident.json": "application/json; charset=utf-8",
    "prompt-sent.md": "text/markdown; charset=utf-8",
    "logs/agent-stdout.log": "text/plain; charset=utf-8",
    "logs/agent-stderr.log": "text/plain; charset=utf-8",
}


@pytest.fixture(autouse=True)
def _capture_nightcrier_logs(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(nc.log, "propagate", True)
    caplog.set_level(logging.DEBUG)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Emulator:
    """A storage emulator process on 127.0.0.1 that a test can stop and start again on the same port."""

    def __init__(self, argv: Callable[[int], list[str]], log_path: Path):
        self.argv = argv
        self.port = _free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(self.argv(self.port), stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        wait_for(lambda: _answers(self.port) or self.process.poll() is not None, timeout=60,
                 what="the storage emulator to listen")
        if self.process.poll() is not None:
            pytest.fail(f"storage emulator exited: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # Killed, not asked: Azurite waits for idle keep-alive connections to close before exiting,
            # and a store that vanishes is the case under test anyway.
            self.process.kill()
            self.process.wait(10)
        wait_for(lambda: not _answers(self.port), timeout=10, what="the storage emulator to stop listening")


def _node_binary(package: str, command: str) -> str:
    """An npm package's command: $NIGHTCRIER_TEST_<PACKAGE>, PATH, or where .ci/run installs it."""
    cached = sorted(glob.glob(f"/var/cache/nightcrier-ci/{package}-*/node_modules/.bin/{command}"))
    found = (os.environ.get(f"NIGHTCRIER_TEST_{package.upper()}") or shutil.which(command)
             or (cached[-1] if cached else None))
    if not found or not os.access(found, os.X_OK):
        infra.unavailable(f"{command} not found: run `bash .ci/run` (it installs the npm package {package}) "
                          f"or set NIGHTCRIER_TEST_{package.upper()}")
    return found


def _azurite_binary() -> str:
    return _node_binary("azurite", "azurite-blob")


class Backend:
    """One kind of object store under test: its emulator, the config keys that reach it, a raw client."""

    def __init__(self, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: str = "moto"):
        self.kind = kind
        if kind == "azure_blob":
            binary, data = _azurite_binary(), tmp_path / "azurite"
            data.mkdir()
            self.emulator = Emulator(lambda port: [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port),
                                                   "--location", str(data), "--skipApiVersionCheck",
                                                   "--loose", "--silent"], tmp_path / "azurite.log")
        else:
            # Credentials reach boto3 through the standard AWS chain: here, the environment.
            # s3rver knows one key pair, its published default; moto takes any.
            key_id, secret = ("S3RVER", "S3RVER") if server == "s3rver" else ("nc-test", "nc-test-secret")
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
            monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
            monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
                monkeypatch.delenv(name, raising=False)
            if server == "s3rver":
                binary, data = _node_binary("s3rver", "s3rver"), tmp_path / "s3rver"
                data.mkdir()
                self.emulator = Emulator(lambda port: [binary, "-d", str(data), "-a", "127.0.0.1",
                                                       "-p", str(port), "--silent"], tmp_path / "s3rver.log")
            else:
                self.emulator = Emulator(lambda port: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                                       "-p", str(port)], tmp_path / "moto.log")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.emulator.port}"

    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                f"BlobEndpoint={self.endpoint}/{AZURITE_ACCOUNT};")

    def settings(self) -> dict[str, Any]:
        if self.kind == "azure_blob":
            return {"azure_storage_connection_string": self.connection_string(),
                    "azure_storage_container": CONTAINER}
        return {"s3_bucket": BUCKET, "s3_prefix": "nightcrier/", "s3_region": "eu-west-1",
                "s3_endpoint_url": self.endpoint}

    def create_container(self) -> None:
        if self.kind == "azure_blob":
            from azure.core.exceptions import ResourceExistsError
            from azure.storage.blob import BlobServiceClient
            try:
                BlobServiceClient.from_connection_string(self.connection_string()).create_container(CONTAINER)
            except ResourceExistsError:
                pass  # Azurite restarted on the same data
        else:
            import boto3
            # A session of its own: boto3's default session keeps the credentials it first found.
            session = boto3.session.Session()
            session.client("s3", endpoint_url=self.endpoint, region_name="eu-west-1").create_bucket(
                Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})

    def signature_in(self, text: str) -> bool:
        return ("sig=" in text) if self.kind == "azure_blob" else ("X-Amz-Signature" in text)


@pytest.fixture(params=["azure_blob", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[Backend]:
    store = Backend(request.param, tmp_path, monkeypatch)
    store.emulator.start()
    try:
        store.create_container()
        yield store
    finally:
        store.emulator.stop()


@pytest.fixture
def azurite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    store = Backend("azure_blob", tmp_path, monkeypatch)
    store.emulator.start()
    try:
        store.create_container()
        yield store
    finally:
        store.emulator.stop()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    server = Webhook()
    yield server
    server.close()


def service_config(tmp_path: Path, webhook: Webhook, storage: dict[str, Any]) -> nc.Config:
    kubeconfig = tmp_path / "kubeconfig.yaml"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    data = {"workspace_root": str(tmp_path / "ws"), "health_port": 0, "agent_runner": "process",
            "agent_command": ["sh", "-c", REPORT_AGENT], "agent_timeout": 30, "dispatch_poll_interval": 0.2,
            "slack_webhook_url": webhook.url, "report_base_url": REPORT_BASE_URL,
            "storage_timeout_seconds": 5, **storage,
            "clusters": [{"name": "c1", "mcp": {"endpoint": "http://127.0.0.1:9/c1"},
                          "triage": {"enabled": True, "kubeconfig": str(kubeconfig),
                                     "check_permissions": False}}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    config, warnings = nc.load_config(str(path), env={})
    assert warnings == []
    return config


def run_one_incident(config: nc.Config, tmp_path: Path, webhook: Webhook
                     ) -> tuple[nc.Service, nc.Incident, dict[str, Any]]:
    """One fault through the whole service; returns it stopped, the finished incident, the Slack message."""
    service = nc.Service(config, nc.SqliteStore(str(tmp_path / "nightcrier.db"))).start()
    try:
        (incident_id,) = service.store.insert_events([make_event("c1")])
        service.work_available.set()
        (message,) = wait_for(webhook.messages, timeout=60, what="the Slack message")
        incident = service.store.get_incident(incident_id)
    finally:
        service.stop()
    assert incident is not None
    return service, incident, message


def button(message: dict[str, Any]) -> str | None:
    actions = [b for b in message["blocks"] if b["type"] == "actions"]
    return actions[0]["elements"][0]["url"] if actions else None


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self.links.append((data, self._href))
            self._href = None


def index_links(page: str) -> dict[str, str]:
    """Object name (the path after the incident id) -> signed link, from index.html."""
    parser = _Links()
    parser.feed(page)
    found = {}
    for _, href in parser.links:
        path = urllib.parse.unquote(urllib.parse.urlsplit(href).path)
        found[_object_name(path)] = href
    return found


def _object_name(path: str) -> str:
    # .../<incident id>/<name...>: the incident id is the only UUID in the path.
    parts = path.split("/")
    index = next(i for i, part in enumerate(parts) if nc.is_uuid(part))
    return "/".join(parts[index + 1:])


def all_log_text(caplog: pytest.LogCaptureFixture) -> str:
    formatter = nc._TextFormatter()
    return "\n".join(formatter.format(record) for record in caplog.records)


# -- the whole path: run, upload, Slack button, links -------------------------------------------


def test_artifacts_reach_the_store_and_slack_opens_the_report_through_a_signed_link(
        backend: Backend, tmp_path: Path, webhook: Webhook, caplog: pytest.LogCaptureFixture) -> None:
    config = service_config(tmp_path, webhook, backend.settings())
    before = nc.utcnow()
    service, incident, message = run_one_incident(config, tmp_path, webhook)
    after = nc.utcnow()
    logs = all_log_text(caplog)  # every logger's lines while the service ran, before this test's requests
    assert incident.status == nc.RESOLVED

    url = button(message)
    assert url and url.startswith(backend.endpoint) and backend.signature_in(url)
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    assert path.endswith(f"{incident.incident_id}/index.html")
    index = requests.get(url, timeout=10)
    assert index.status_code == 200, index.text
    assert index.headers["Content-Type"] == "text/html; charset=utf-8"
    assert f"<title>Incident Report: {incident.incident_id}</title>" in index.text

    links = index_links(index.text)
    assert set(links) == set(EXPECTED_TYPES), "the planted symlink logs/agent-full.log is not uploaded"
    workspace = Path(incident.workspace_path or "")
    for name, link in links.items():
        got = requests.get(link, timeout=10)
        assert got.status_code == 200, (name, got.text)
        assert got.headers["Content-Type"] == EXPECTED_TYPES[name], name
        source = workspace / ("output/investigation.md" if name == "investigation.md" else name)
        assert got.content == source.read_bytes(), name
    assert "ran out of memory" in requests.get(links["investigation.html"], timeout=10).text

    # The expiry printed on the page is azure_sas_expiry (168h) after the upload.
    printed = index.text.split("These links will expire on ", 1)[1].split(" (UTC)", 1)[0]
    expires = dt.datetime.strptime(printed, "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.timezone.utc)
    week = dt.timedelta(hours=168)
    assert before + week - dt.timedelta(seconds=1) <= expires <= after + week

    report = _report(tmp_path, incident)
    assert report.storage_type == backend.kind
    assert report.raw_report_path and "?" not in report.raw_report_path
    assert report.raw_report_path == links["investigation.md"].split("?", 1)[0]
    assert service.metrics.value("uploads") == 1 and service.metrics.value("upload_failed") == 0

    assert "incident artifacts saved to storage" in logs
    assert not backend.signature_in(logs), "a signed link reached the log"
    assert urllib.parse.urlsplit(url).query not in logs

    if backend.kind == "azure_blob":  # Azurite checks SAS permissions; moto does not check signatures
        assert requests.put(links["incident.json"], data=b"{}", headers={"x-ms-blob-type": "BlockBlob"},
                            timeout=10).status_code == 403, "the links are read-only"
        assert requests.get(url.split("?", 1)[0], timeout=10).status_code in (403, 404)


def _report(tmp_path: Path, incident: nc.Incident) -> nc.TriageReport:
    store = nc.SqliteStore(str(tmp_path / "nightcrier.db"))
    try:
        report = store.get_report(incident.incident_id)
    finally:
        store.close()
    assert report is not None
    return report


# -- expiry -----------------------------------------------------------------------------------------


def test_an_expired_sas_link_stops_working(azurite: Backend, tmp_path: Path, webhook: Webhook) -> None:
    config = service_config(tmp_path, webhook, {**azurite.settings(), "azure_sas_expiry": "8s"})
    _, incident, message = run_one_incident(config, tmp_path, webhook)
    url = button(message)
    assert url is not None
    opened = requests.get(url, timeout=10)
    assert opened.status_code == 200, opened.text
    link = index_links(opened.text)["investigation.md"]
    wait_for(lambda: requests.get(url, timeout=10).status_code == 403, timeout=30,
             what="the index link to expire")
    assert requests.get(link, timeout=10).status_code == 403


def test_an_expired_presigned_link_stops_working(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 webhook: Webhook) -> None:
    """Against s3rver, an S3-compatible server that, unlike moto, enforces a presigned link's expiry."""
    backend = Backend("s3", tmp_path, monkeypatch, server="s3rver")
    backend.emulator.start()
    try:
        backend.create_container()
        config = service_config(tmp_path, webhook, {**backend.settings(), "azure_sas_expiry": "8s"})
        _, _, message = run_one_incident(config, tmp_path, webhook)
        url = button(message)
        assert url is not None and backend.signature_in(url)
        opened = requests.get(url, timeout=10)
        assert opened.status_code == 200, opened.text
        link = index_links(opened.text)["investigation.md"]
        wait_for(lambda: requests.get(url, timeout=10).status_code == 403, timeout=30,
                 what="the index link to expire")
        expired = requests.get(link, timeout=10)
        assert expired.status_code == 403 and "Request has expired" in expired.text
    finally:
        backend.emulator.stop()


def test_presigned_links_carry_the_configured_expiry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     webhook: Webhook) -> None:
    """moto does not enforce presigned expiry, so this checks what a real S3 enforces: the signed window."""
    backend = Backend("s3", tmp_path, monkeypatch)
    backend.emulator.start()
    try:
        backend.create_container()
        config = service_config(tmp_path, webhook, {**backend.settings(), "azure_sas_expiry": "90m"})
        _, _, message = run_one_incident(config, tmp_path, webhook)
    finally:
        backend.emulator.stop()
    url = button(message)
    assert url is not None
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["5400"]
    signed_at = dt.datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    assert abs((nc.utcnow() - signed_at).total_seconds()) < 120


# -- a configuration written for the Go original ----------------------------------------------------


def test_a_go_config_with_azure_keys_loads_and_uploads_without_edits(azurite: Backend, tmp_path: Path
                                                                      ) -> None:
    # Its placeholder api_key over http is refused (the key is only sent over https); not this test's subject.
    text = (Path(__file__).parent / "fixtures" / "go-config.yaml").read_text().replace(
        'api_key: "go-placeholder-key"', "")
    text = text.replace('azure_storage_account: ""\nazure_storage_container: ""\n',
                        f'azure_storage_connection_string: "{azurite.connection_string()}"\n'
                        f'azure_storage_container: "{CONTAINER}"\nazure_sas_expiry: "72h"\n')
    assert "azure_storage_connection_string" in text
    path = tmp_path / "go-config.yaml"
    path.write_text(text)
    config, warnings = nc.load_config(str(path), env={})
    assert not [w for w in warnings if "azure" in w]
    assert nc.object_storage_type(config) == "azure_blob"

    store = nc.SqliteStore(str(tmp_path / "go.db"))
    try:
        (incident_id,) = store.insert_events([make_event("prod-us-east-1")])
        incident = store.get_incident(incident_id)
        assert incident is not None
        workspace = nc.prepare_workspace(str(tmp_path / "ws"), incident)
        (Path(workspace) / "output" / "investigation.md").write_text("## Root Cause\nDisk full.\n")
        incident.status, incident.workspace_path = nc.RESOLVED, workspace
        handed: list[tuple[str, str | None]] = []
        uploader = nc.ReportUploader(config, store, nc.open_object_store(config), nc.Metrics(),
                                     notify=lambda i, link: handed.append((i.incident_id, link)))
        uploader.start()
        uploader.enqueue(incident)
        uploader.stop()
    finally:
        store.close()
    ((handed_id, url),) = handed
    assert handed_id == incident_id and url is not None
    index = requests.get(url, timeout=10)
    assert index.status_code == 200
    assert set(index_links(index.text)) == {"investigation.md", "incident.json"}
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    expires = dt.datetime.strptime(query["se"][0], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    assert abs((expires - nc.utcnow()) - dt.timedelta(hours=72)) < dt.timedelta(minutes=2)


# -- the store is down ------------------------------------------------------------------------------


def test_with_the_store_down_the_incident_finishes_and_slack_gets_the_fallback_link(
        backend: Backend, tmp_path: Path, webhook: Webhook) -> None:
    config = service_config(tmp_path, webhook, {**backend.settings(), "storage_max_attempts": 3,
                                                "storage_timeout_seconds": 2})
    backend.emulator.stop()
    service, incident, message = run_one_incident(config, tmp_path, webhook)
    assert incident.status == nc.RESOLVED
    link = button(message)
    assert link is not None
    assert link.startswith(f"{REPORT_BASE_URL.rstrip('/')}/incidents/{incident.incident_id}/report?")
    assert set(urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)) == {"expires", "sig"}
    # The uploader handed the incident to Slack only after it gave up, so the counts are final here.
    assert service.metrics.value("upload_retries") == 2
    assert service.metrics.value("upload_failed") == 1 and service.metrics.value("uploads") == 0
    metrics = service.metrics_text().decode()
    assert "nightcrier_storage_uploads_failed_total 1.0" in metrics
    report = _report(tmp_path, incident)
    assert report.storage_type == "filesystem"


def test_an_upload_succeeds_when_the_store_comes_back_during_the_retries(
        azurite: Backend, tmp_path: Path, webhook: Webhook) -> None:
    config = service_config(tmp_path, webhook, {**azurite.settings(), "storage_max_attempts": 50,
                                                "storage_timeout_seconds": 2})
    azurite.emulator.stop()
    service = nc.Service(config, nc.SqliteStore(str(tmp_path / "nightcrier.db"))).start()
    try:
        (incident_id,) = service.store.insert_events([make_event("c1")])
        service.work_available.set()
        wait_for(lambda: service.metrics.value("upload_retries") >= 1, timeout=60, what="a failed upload")
        assert webhook.messages() == [], "Slack waits for the upload"
        azurite.emulator.start()
        azurite.create_container()  # a killed Azurite may not have saved it
        (message,) = wait_for(webhook.messages, timeout=60, what="the Slack message")
    finally:
        service.stop()
    url = button(message)
    assert url and url.startswith(azurite.endpoint)
    assert requests.get(url, timeout=10).status_code == 200
    assert service.metrics.value("uploads") == 1 and service.metrics.value("upload_failed") == 0
    assert incident_id in url


# -- where the report went, on both engines ---------------------------------------------------------


def test_set_report_storage_updates_the_newest_report_only(store: nc.StateStore) -> None:
    (incident_id,) = store.insert_events([make_event("c1")])
    (other_id,) = store.insert_events([make_event("c1")])
    execution = store.start_execution(incident_id, "process", {})
    older, newer = nc.utcnow() - dt.timedelta(minutes=5), nc.utcnow()
    for report_id, at in ((nc.new_id(), older), (nc.new_id(), newer)):
        store.record_report(nc.TriageReport(report_id, incident_id, execution.execution_id, at, "# r",
                                            raw_report_path="/ws/output/investigation.md",
                                            storage_type="filesystem"))
    url = f"https://acct.blob.core.windows.net/reports/{incident_id}/investigation.md"
    assert store.set_report_storage(incident_id, "azure_blob", url) is True
    report = store.get_report(incident_id)
    assert report is not None and report.generated_at == newer.replace(microsecond=newer.microsecond)
    assert (report.storage_type, report.raw_report_path) == ("azure_blob", url)
    assert store.set_report_storage(other_id, "s3", "https://x/y") is False, "no report, nothing changed"
    assert store.set_report_storage("not-a-uuid", "s3", "https://x/y") is False
    assert store.get_report(other_id) is None


# -- configuration ------------------------------------------------------------------------------------


def load(tmp_path: Path, **keys: Any) -> tuple[nc.Config, list[str]]:
    data = {"clusters": [{"name": "c1", "mcp": {"endpoint": "http://127.0.0.1:9/c1"}}], **keys}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return nc.load_config(str(path), env={})


def problems(tmp_path: Path, **keys: Any) -> list[str]:
    with pytest.raises(nc.ConfigError) as raised:
        load(tmp_path, **keys)
    return raised.value.problems


CONN = f"DefaultEndpointsProtocol=https;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY}"


@pytest.mark.parametrize(("keys", "message"), [
    ({"azure_storage_account": "acct", "azure_storage_key": "k"},
     "AZURE_STORAGE_CONTAINER is required when Azure storage is enabled"),
    ({"azure_storage_account": "acct", "azure_storage_container": "c"},
     "Azure storage requires either AZURE_STORAGE_CONNECTION_STRING or both AZURE_STORAGE_ACCOUNT and "
     "AZURE_STORAGE_KEY"),
    ({"azure_storage_connection_string": "just-a-token", "azure_storage_container": "c"},
     "invalid AZURE_STORAGE_CONNECTION_STRING: expected at least 2 ';'-separated key=value pairs"),
    ({"azure_storage_connection_string": "AccountKey=abc;BlobEndpoint=https://x",
      "azure_storage_container": "c"},
     "invalid AZURE_STORAGE_CONNECTION_STRING: AccountName is missing"),
    ({"azure_storage_connection_string": "AccountName=a;SharedAccessSignature=sv=1&sig=zzz",
      "azure_storage_container": "c"},
     "invalid AZURE_STORAGE_CONNECTION_STRING: AccountKey is missing (read-only links are signed with the "
     "account key)"),
    ({"azure_storage_connection_string": CONN, "azure_storage_container": "c", "azure_sas_expiry": "7d"},
     "azure_sas_expiry (env AZURE_SAS_EXPIRY): time: unknown unit \"d\" in duration \"7d\""),
    ({"azure_storage_connection_string": CONN, "azure_storage_container": "c", "azure_sas_expiry": "10"},
     "azure_sas_expiry (env AZURE_SAS_EXPIRY): time: missing unit in duration \"10\""),
    ({"s3_bucket": "b", "azure_sas_expiry": "169h"},
     "azure_sas_expiry (env AZURE_SAS_EXPIRY): S3 presigned links last at most 168h, got '169h'"),
    ({"s3_bucket": "b", "azure_sas_expiry": "0s"},
     "azure_sas_expiry (env AZURE_SAS_EXPIRY): must be positive"),
    ({"s3_bucket": "b", "s3_endpoint_url": "minio:9000"},
     "s3_endpoint_url (env S3_ENDPOINT_URL): must be an http(s) URL, got 'minio:9000'"),
    ({"s3_bucket": "b", "azure_storage_connection_string": CONN, "azure_storage_container": "c"},
     "s3_bucket (env S3_BUCKET): configure one object store, Azure Blob or S3, not both"),
])
def test_object_storage_settings_are_checked_with_the_go_messages(tmp_path: Path, keys: dict[str, Any],
                                                                  message: str) -> None:
    found = problems(tmp_path, **keys)
    assert any(problem.startswith(message) for problem in found), found
    assert not [p for p in found if AZURITE_KEY in p or "sig=zzz" in p], "a secret was quoted"


def test_valid_object_storage_settings_load_from_file_and_environment(tmp_path: Path) -> None:
    config, warnings = load(tmp_path, azure_storage_account="acct", azure_storage_key="a2V5",
                            azure_storage_container="reports", azure_sas_expiry="1h30m")
    assert warnings == [] and nc.object_storage_type(config) == "azure_blob"
    assert nc.parse_go_duration(config.azure_sas_expiry) == 5400
    masked = nc.config_as_dict(config)
    assert masked["azure_storage_key"] == nc.SECRET_MASK
    path = tmp_path / "env.yaml"
    path.write_text(yaml.safe_dump({"clusters": [{"name": "c1", "mcp": {"endpoint": "http://127.0.0.1:9/c"}}]}))
    config, _ = nc.load_config(str(path), env={"S3_BUCKET": "reports", "S3_PREFIX": "nc/",
                                               "S3_ENDPOINT_URL": "http://127.0.0.1:9000"})
    assert nc.object_storage_type(config) == "s3" and config.s3_prefix == "nc/"
    assert nc.object_storage_type(load(tmp_path)[0]) == "filesystem"


def test_account_and_key_sign_https_only_links_to_the_public_endpoint(tmp_path: Path) -> None:
    config, _ = load(tmp_path, azure_storage_account="acct", azure_storage_key="a2V5a2V5",
                     azure_storage_container="reports")
    store = nc.open_object_store(config)
    assert isinstance(store, nc.AzureBlobStore)
    name = "0b0f6c1e-3c7a-4b7e-9d52-8f3c0a1b2c3d/logs/agent-stdout.log"
    assert store.object_url(name) == f"https://acct.blob.core.windows.net/reports/{name}"
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(
        store.signed_url(name, nc.utcnow() + dt.timedelta(hours=1))).query)
    assert query["sp"] == ["r"] and query["spr"] == ["https"] and query["sr"] == ["b"]
    assert "a2V5a2V5" in store.secrets()


# Hides a client library from the import system, as on a host where it is not installed.
HIDE_MODULE = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == sys.argv[1]:
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Hide())
sys.path.insert(0, sys.argv[2])
import nightcrier
sys.exit(nightcrier.main(["check-config", "--config", sys.argv[3]]))
"""


@pytest.mark.parametrize(("hidden", "keys", "message"), [
    ("azure", {"azure_storage_connection_string": CONN, "azure_storage_container": "c"},
     "azure_storage_*: Azure Blob storage needs the Python package azure-storage-blob, "
     "which is not installed"),
    ("boto3", {"s3_bucket": "b"},
     "s3_bucket: S3 storage needs the Python package boto3, which is not installed"),
])
def test_check_config_says_when_the_client_library_is_missing(tmp_path: Path, hidden: str,
                                                              keys: dict[str, Any], message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"clusters": [{"name": "c1", "mcp": {"endpoint": "http://127.0.0.1:9/c"}}],
                                    **keys}))

    def check_config(hide: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-c", HIDE_MODULE, hide, str(Path(nc.__file__).parent), str(path)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              env={"PATH": os.environ["PATH"]})

    result = check_config(hidden)
    assert result.returncode == nc.EXIT_CONFIG, result.stdout + result.stderr
    assert message in result.stderr
    assert AZURITE_KEY not in result.stderr + result.stdout
    installed = check_config("nothing-hidden")
    assert installed.returncode == 0, installed.stderr


# -- hostile input ------------------------------------------------------------------------------------


@given(st.text(max_size=40))
def test_any_duration_text_parses_or_raises_value_error(text: str) -> None:
    try:
        seconds = nc.parse_go_duration(text)
    except ValueError as exc:
        assert str(exc).startswith("time: ")
    else:
        assert isinstance(seconds, float)


@given(st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(sorted(nc.GO_DURATION_UNITS))),
                min_size=1, max_size=6))
def test_go_durations_add_up(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{unit}" for n, unit in parts)
    expected = sum(n * nc.GO_DURATION_UNITS[unit] for n, unit in parts)
    assert nc.parse_go_duration(text) == pytest.approx(expected)


CONNECTION_STRING_PROBLEMS = {
    "", "expected at least 2 ';'-separated key=value pairs", "AccountName is missing",
    "AccountKey is missing (read-only links are signed with the account key)"}


@given(st.text(max_size=80))
def test_a_bad_connection_string_is_never_quoted(text: str) -> None:
    """The reasons are fixed sentences, so no part of the (secret) string can leak into them."""
    assert nc._azure_connection_string_problem(text) in CONNECTION_STRING_PROBLEMS


def test_scrub_masks_every_kind_of_signature() -> None:
    text = ("GET https://a.blob.core.windows.net/c/x?se=2026&sp=r&sig=abc%2Fdef and "
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=f00d "
            "AccountKey=Zm9v;SharedAccessSignature=sv=1")
    scrubbed = nc.scrub_signatures(text)
    for secret in ("abc%2Fdef", "AKIA", "f00d", "Zm9v", "sv=1"):
        assert secret not in scrubbed


def test_an_artifact_outside_the_workspace_or_not_a_regular_file_is_not_opened(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    (workspace / "logs").mkdir(parents=True)
    outside = tmp_path / "secret.txt"
    outside.write_text("host secret")
    (workspace / "logs" / "agent-full.log").symlink_to(outside)
    os.mkfifo(workspace / "logs" / "agent-stdout.log")
    (workspace / "logs" / "agent-stderr.log").write_text("")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "prompt-sent.md").write_text("not the workspace's")
    (workspace / "linked").symlink_to(tmp_path / "elsewhere")
    (workspace / "incident.json").write_text("{}")
    for relative in ("logs/agent-full.log", "logs/agent-stdout.log", "logs/agent-stderr.log",
                     "linked/prompt-sent.md", "../secret.txt", "missing.md"):
        assert nc.open_artifact(str(workspace), relative) is None, relative
    opened = nc.open_artifact(str(workspace), "incident.json")
    assert opened is not None
    body, length = opened
    with body:
        assert (body.read(), length) == (b"{}", 2)


# -- the uploader's queue -----------------------------------------------------------------------------


def test_a_full_upload_queue_hands_the_incident_to_slack_at_once(tmp_path: Path) -> None:
    config, _ = load(tmp_path, s3_bucket="b", s3_endpoint_url="http://127.0.0.1:9", s3_region="eu-west-1")
    handed: list[tuple[str, str | None]] = []
    metrics = nc.Metrics()
    store = nc.SqliteStore(str(tmp_path / "q.db"))
    try:
        uploader = nc.ReportUploader(config, store, nc.open_object_store(config), metrics, queue_size=1,
                                     notify=lambda i, link: handed.append((i.incident_id, link)))
        first, second = (nc.Incident(incident_id=nc.new_id(), event_id=nc.new_id(), status=nc.RESOLVED,
                                     cluster="c1", created_at=nc.utcnow(), updated_at=nc.utcnow())
                         for _ in range(2))
        uploader.enqueue(first)   # not started: it stays queued
        uploader.enqueue(second)  # the queue is full: straight to Slack, without a link
    finally:
        store.close()
    assert handed == [(second.incident_id, None)]
    assert metrics.value("upload_failed") == 1
