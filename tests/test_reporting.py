"""Reports and Slack: summary extraction, the HTML page, the notifier against a local webhook, end to end."""

from __future__ import annotations

import dataclasses
import datetime as dt
import html.parser
import http.server
import json
import logging
import socket
import stat
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import wait_for
from test_store_contract import make_event

import nightcrier as nc

SECRET_TOKEN = "s3cr3tW3bh00kT0k3n"
SECRET_PATH = f"/services/T0000AAAA/B0000BBBB/{SECRET_TOKEN}"
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)


# -- a local stand-in for Slack's incoming webhook ---------------------------------------


@dataclasses.dataclass
class Reply:
    status: int = 200
    body: str = "ok"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    delay: float = 0.0


@dataclasses.dataclass
class Received:
    at: float                 # time.monotonic() on arrival
    path: str
    message: dict[str, Any]
    body: bytes = b""         # exactly as it arrived, for signature checks
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out closed its socket; writing the late reply fails, as intended."""


class Webhook:
    """An HTTP server on 127.0.0.1 that records every POST and answers as scripted (default 200 ok)."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.replies: deque[Reply] = deque()
        self.released = threading.Event()
        self._lock = threading.Lock()
        self.httpd = _QuietServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{SECRET_PATH}"

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def messages(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.message for r in self.received]

    def close(self) -> None:
        self.released.set()  # delayed replies end now
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        webhook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with webhook._lock:
                    webhook.received.append(Received(time.monotonic(), self.path, json.loads(body), body,
                                                     dict(self.headers.items())))
                    reply = webhook.replies.popleft() if webhook.replies else Reply()
                if reply.delay:
                    webhook.released.wait(reply.delay)
                payload = reply.body.encode()
                self.send_response(reply.status)
                for name, value in {"Content-Type": "text/plain", **reply.headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture(name="webhook")
def webhook_fixture() -> Iterator[Webhook]:
    server = Webhook()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _capture_nightcrier_logs(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Another test may have configured logging (which stops propagation); caplog must see our lines."""
    monkeypatch.setattr(nc.log, "propagate", True)
    caplog.set_level(logging.DEBUG, logger="nightcrier")


def log_output(caplog: pytest.LogCaptureFixture) -> str:
    """The log lines as nightcrier writes them, structured fields included."""
    formatter = nc._TextFormatter()
    return "\n".join(formatter.format(record) for record in caplog.records)


@pytest.fixture(name="notifiers_for")
def notifiers_for_fixture(tmp_path: Path) -> Iterator[Callable[..., list[nc.Notifier]]]:
    """Starts a Notifier (fast retries) for every channel a configuration turns on; each is stopped
    (drained) afterwards."""
    started: list[nc.Notifier] = []
    store = nc.SqliteStore(str(tmp_path / "notifier.db"))

    def start(**settings: Any) -> list[nc.Notifier]:
        config = nc.Config(**{"notify_timeout_seconds": 2.0, "notify_max_attempts": 3, **settings})
        metrics = nc.Metrics()
        notifiers = [nc.Notifier(channel, config, store, metrics, retry_initial=0.05, retry_max=0.2)
                     for channel in nc.notification_channels(config)]
        for notifier in notifiers:
            notifier.start()
        started.extend(notifiers)
        return notifiers

    yield start
    for notifier in started:
        notifier.stop()
    store.close()


@pytest.fixture
def notifier_for(webhook: Webhook, notifiers_for: Callable[..., list[nc.Notifier]]
                 ) -> Callable[..., nc.Notifier]:
    """Starts Slack notifiers posting to the local webhook."""
    def start(url: str | None = None, **settings: Any) -> nc.Notifier:
        (notifier,) = notifiers_for(**{"slack_webhook_url": url or webhook.url, "slack_timeout_seconds": 2.0,
                                       "slack_max_attempts": 3, **settings})
        return notifier

    return start


def slack_channel(config: nc.Config) -> nc.Channel:
    (channel,) = nc.notification_channels(config)
    assert isinstance(channel, nc.SlackChannel)
    return channel


def finished(status: str, at: dt.datetime = T0, reason: str | None = None, **fields: Any) -> nc.Incident:
    """A finished incident: a Pod/api-7f8b9c CrashLoop in payments on prod-eu, run for 4m12s until ``at``."""
    values: dict[str, Any] = {
        "incident_id": nc.new_id(), "event_id": nc.new_id(), "status": status, "cluster": "prod-eu",
        "created_at": at - dt.timedelta(minutes=10), "updated_at": at, "fault_type": "CrashLoop",
        "resource_kind": "Pod", "resource_name": "api-7f8b9c", "resource_namespace": "payments",
        "started_at": at - dt.timedelta(seconds=252), "completed_at": at, "failure_reason": reason,
        "workspace_path": "/var/lib/nightcrier/incidents/x"}
    values.update(fields)
    return nc.Incident(**values)


def deliver(notifier: nc.Notifier, *items: nc.Incident | tuple[nc.Incident, nc.ReportSummary]) -> None:
    """Queue the incidents and wait until the notifier has handled all of them (stop drains the queue)."""
    for item in items:
        if isinstance(item, tuple):
            notifier.enqueue(*item)
        else:
            notifier.enqueue(item)
    notifier.stop()
    assert not notifier.is_alive()


def counts(notifier: nc.Notifier) -> tuple[float, float]:
    """Messages sent and given up on by the notifier's channel."""
    channel = notifier.channel.name
    assert notifier.metrics is not None
    return (notifier.metrics.value("notifications_sent", channel),
            notifier.metrics.value("notifications_failed", channel))


def texts(message: dict[str, Any]) -> list[str]:
    """Every mrkdwn/plain text of a message's blocks, in order."""
    found = []
    for block in message["blocks"]:
        for part in [block.get("text"), *block.get("fields", []), *block.get("elements", [])]:
            if isinstance(part, dict) and "text" in part:
                found.append(part["text"] if isinstance(part["text"], str) else part["text"]["text"])
    return found


# -- Slack: the incident notification ---------------------------------------------------------


def test_incident_notification_has_the_originals_layout(
        webhook: Webhook, notifier_for: Callable[..., nc.Notifier]) -> None:
    resolved = finished(nc.RESOLVED)
    failed = finished(nc.FAILED, resource_namespace="")
    summary = nc.ReportSummary("The container <!channel> ran out of memory & died", "HIGH")
    deliver(notifier_for(), (resolved, summary), (failed, summary))

    first, second = webhook.messages()
    assert first["blocks"] == [
        {"type": "header",
         "text": {"type": "plain_text", "text": "Kubernetes Incident Triage :white_check_mark:"}},
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": "*Cluster:*\nprod-eu"},
            {"type": "mrkdwn", "text": "*Namespace:*\npayments"},
            {"type": "mrkdwn", "text": "*Resource:*\nPod/api-7f8b9c"},
            {"type": "mrkdwn", "text": "*Reason:*\nCrashLoop"}]},
        {"type": "section", "text": {"type": "mrkdwn", "text": "*Root Cause (HIGH confidence):*\n"
                                     "The container &lt;!channel&gt; ran out of memory &amp; died"}},
        {"type": "context", "elements": [
            {"type": "mrkdwn", "text": f"Incident ID: `{resolved.incident_id}` | Duration: 4m12s"}]},
    ]
    assert first["attachments"] == [{"color": "good",
                                     "footer": f"Report: stored with incident {resolved.incident_id}"}]
    assert second["blocks"][0]["text"]["text"] == "Kubernetes Incident Triage :x:"
    assert second["blocks"][1]["fields"][1]["text"] == "*Namespace:*\nN/A"
    assert second["attachments"][0]["color"] == "danger"
    for message in (first, second):
        assert "/var/lib/nightcrier" not in json.dumps(message), "a local path reached Slack"
        assert all(block["type"] != "actions" for block in message["blocks"])
    assert {r.path for r in webhook.received} == {SECRET_PATH}


def test_a_huge_root_cause_is_cut_to_slacks_limits(
        webhook: Webhook, notifier_for: Callable[..., nc.Notifier]) -> None:
    incident = finished(nc.RESOLVED, resource_name="n" * 5000, fault_type="F" * 5000)
    deliver(notifier_for(), (incident, nc.ReportSummary("x" * 10_000, "LOW")))
    (message,) = webhook.messages()
    assert len(message["blocks"]) <= 50
    root_cause = message["blocks"][2]["text"]["text"]
    assert root_cause.startswith("*Root Cause (LOW confidence):*\nxxx") and root_cause.endswith("…")
    assert len(root_cause) == 3000
    for block in message["blocks"]:
        if "text" in block:
            assert len(block["text"]["text"]) <= 3000
        for item in block.get("fields", []) + block.get("elements", []):
            assert len(item["text"]) <= 2000 if "fields" in block else len(item["text"]) <= 3000


def test_the_block_count_is_capped_whatever_a_message_holds() -> None:
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": str(n)}} for n in range(80)]
    message = nc._slack_message("title", blocks, "good", "footer")
    assert len(message["blocks"]) == 50 and message["blocks"][0]["type"] == "header"


@pytest.mark.parametrize("base, expected", [
    ("", None),
    ("file:///srv/reports", None),
    ("/srv/reports", None),
    ("https://reports.example.com/nightcrier/", "https://reports.example.com/nightcrier/incidents/{id}/report"),
    ("http://10.0.0.5:8000", "http://10.0.0.5:8000/incidents/{id}/report"),
])
def test_the_view_report_button_needs_an_http_report_base_url(
        webhook: Webhook, notifier_for: Callable[..., nc.Notifier], base: str, expected: str | None
) -> None:
    incident = finished(nc.RESOLVED)
    notifier = notifier_for(report_base_url=base)
    deliver(notifier, (incident, nc.ReportSummary("OOM", "HIGH")))
    (message,) = webhook.messages()
    actions = [b for b in message["blocks"] if b["type"] == "actions"]
    if expected is None:
        assert actions == []
        assert message["attachments"][0]["footer"] == f"Report: stored with incident {incident.incident_id}"
    else:
        url = actions[0]["elements"][0].pop("url")
        assert actions == [{"type": "actions", "elements": [
            {"type": "button", "text": {"type": "plain_text", "text": "View Report"}}]}]
        link, _, query = url.partition("?")
        assert link == expected.format(id=incident.incident_id)
        assert nc.verify_report_link(incident.incident_id, urllib.parse.parse_qs(query),
                                     nc.report_link_key(notifier.config, notifier.store))
        assert message["attachments"][0]["footer"] == "Report: see button above"


def test_go_duration_notation() -> None:
    assert [nc.go_duration(s) for s in (0, 0.4, 45, 252, 3600, 3725.6)] == [
        "0s", "0s", "45s", "4m12s", "1h0m0s", "1h2m6s"]


# -- Slack: delivery -------------------------------------------------------------------------


def test_a_server_error_is_retried(webhook: Webhook, notifier_for: Callable[..., nc.Notifier]) -> None:
    webhook.script(Reply(500, "internal_error"), Reply(200))
    notifier = notifier_for()
    deliver(notifier, (finished(nc.RESOLVED), nc.ReportSummary()))
    first, second = webhook.messages()
    assert first == second
    assert counts(notifier) == (1, 0)


def test_429_waits_for_retry_after(webhook: Webhook, notifier_for: Callable[..., nc.Notifier],
                                   caplog: pytest.LogCaptureFixture) -> None:
    webhook.script(Reply(429, "rate_limited", {"Retry-After": "1"}), Reply(200))
    notifier = notifier_for()  # its own backoff would retry after at most 0.05 s
    deliver(notifier, (finished(nc.RESOLVED), nc.ReportSummary()))
    first, second = webhook.received
    assert second.at - first.at >= 0.95, "the retry did not wait for Retry-After"
    assert notifier.metrics.value("notifications_sent", "slack") == 1
    assert "retry_in=1" in log_output(caplog)


def test_a_timeout_is_retried(webhook: Webhook, notifier_for: Callable[..., nc.Notifier],
                              caplog: pytest.LogCaptureFixture) -> None:
    webhook.script(Reply(200, delay=5.0), Reply(200))
    notifier = notifier_for(slack_timeout_seconds=0.3)
    deliver(notifier, (finished(nc.RESOLVED), nc.ReportSummary()))
    assert len(webhook.received) == 2
    assert notifier.metrics.value("notifications_sent", "slack") == 1
    assert "timed out after 0.3 s" in log_output(caplog)


def test_delivery_gives_up_after_the_attempt_limit(
        webhook: Webhook, notifier_for: Callable[..., nc.Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    webhook.script(*[Reply(503, "unavailable")] * 10)
    notifier = notifier_for(slack_max_attempts=4)
    deliver(notifier, (finished(nc.RESOLVED), nc.ReportSummary()))
    assert len(webhook.received) == 4
    assert counts(notifier) == (0, 1)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == ["failed to send notification"]
    assert errors[0].fields["attempts"] == 4  # type: ignore[attr-defined]
    assert "status 503: unavailable" in errors[0].fields["error"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("status", [400, 403, 404])
def test_client_errors_are_not_retried(webhook: Webhook, notifier_for: Callable[..., nc.Notifier],
                                       status: int) -> None:
    webhook.script(Reply(status, "invalid_blocks"))
    notifier = notifier_for()
    deliver(notifier, (finished(nc.RESOLVED), nc.ReportSummary()))
    assert len(webhook.received) == 1
    assert notifier.metrics.value("notifications_failed", "slack") == 1


def test_the_webhook_url_never_reaches_the_log(
        webhook: Webhook, notifier_for: Callable[..., nc.Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as probe:  # a port nobody listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    webhook.script(Reply(500, f"echo {webhook.url}"), Reply(200, delay=5.0), *[Reply(502)] * 5)
    deliver(notifier_for(slack_timeout_seconds=0.3), (finished(nc.RESOLVED), nc.ReportSummary()))
    deliver(notifier_for(f"http://127.0.0.1:{closed_port}{SECRET_PATH}"),
            (finished(nc.RESOLVED), nc.ReportSummary()))
    deliver(notifier_for(f"http://[::1{SECRET_PATH}"), (finished(nc.RESOLVED), nc.ReportSummary()))
    output = log_output(caplog)
    assert output.count("failed to send notification") == 3, output
    assert "timed out" in output and "status 500" in output
    assert SECRET_TOKEN not in output


def test_a_bad_message_does_not_stop_the_notifier(
        webhook: Webhook, notifier_for: Callable[..., nc.Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    notifier = notifier_for()
    notifier.enqueue(finished(nc.RESOLVED, started_at="not a time"))  # type: ignore[arg-type]
    deliver(notifier, (finished(nc.RESOLVED), nc.ReportSummary("after the bad one")))
    (message,) = webhook.messages()
    assert "after the bad one" in message["blocks"][2]["text"]["text"]
    assert "notifier error" in caplog.text


# -- Slack: agent failures and the circuit breaker -----------------------------------------------


def test_agent_failed_and_skipped_incidents_send_no_notification(
        webhook: Webhook, notifier_for: Callable[..., nc.Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    deliver(notifier_for(), finished(nc.AGENT_FAILED, reason="agent exited with non-zero code: 1"),
            finished(nc.SKIPPED))
    assert webhook.received == []
    assert "no notification for an agent failure" in caplog.text


def test_the_budget_alert_is_posted_with_spend_and_budget(
        webhook: Webhook, notifier_for: Callable[..., nc.SlackNotifier]) -> None:
    notifier = notifier_for()
    notifier.alert_budget(1.2, 1.0)
    notifier.stop()
    message, = webhook.messages()
    text = json.dumps(message)
    assert "Daily agent budget spent" in text and "$1.20" in text and "agent_daily_budget_usd" in text


def test_degraded_alert_at_the_threshold_and_recovered_alert_after_a_success(
        webhook: Webhook, notifier_for: Callable[..., nc.Notifier]) -> None:
    minute = dt.timedelta(minutes=1)
    deliver(notifier_for(failure_threshold_for_alert=2),
            finished(nc.AGENT_FAILED, T0, "reason <1>"),
            finished(nc.AGENT_FAILED, T0 + minute, "reason 2"),
            finished(nc.AGENT_FAILED, T0 + 2 * minute, "reason 3"),   # same episode: no second alert
            (finished(nc.RESOLVED, T0 + 10 * minute), nc.ReportSummary("fixed", "HIGH")))
    degraded, notification, recovered = webhook.messages()

    local = T0.astimezone()
    assert degraded["blocks"] == [
        {"type": "header", "text": {"type": "plain_text", "text": "AI Agent System Degraded"}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": "*Failure Count:*\n2"},
                                       {"type": "mrkdwn", "text": "*Time Window:*\n1m0s"}]},
        {"type": "section", "text": {"type": "mrkdwn", "text": "*Sample Failure Reasons (last 3):*\n"
                                     "• reason &lt;1&gt;\n• reason 2"}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": (
            f"First failure: {local:%H:%M:%S} | Last failure: {(local + minute):%H:%M:%S}")}]},
    ]
    assert degraded["attachments"] == [{"color": "warning", "footer": (
        "System degradation threshold reached. AI agent may be experiencing issues.")}]
    assert notification["blocks"][0]["text"]["text"] == "Kubernetes Incident Triage :white_check_mark:"
    assert recovered["blocks"] == [
        {"type": "header", "text": {"type": "plain_text", "text": "AI Agent System Recovered"}},
        # Downtime runs from the first failure to the recovery, not to the last failure (2m0s).
        {"type": "section", "fields": [{"type": "mrkdwn", "text": "*Total Downtime:*\n10m0s"},
                                       {"type": "mrkdwn", "text": "*Total Failures:*\n3"}]},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": (
            "System has returned to healthy state. All agents operating normally.")}]},
    ]
    assert recovered["attachments"] == [{"color": "good", "footer": (
        "System recovery detected. AI agent system is now healthy.")}]


def test_alerts_can_be_turned_off(webhook: Webhook, notifier_for: Callable[..., nc.Notifier]) -> None:
    deliver(notifier_for(failure_threshold_for_alert=1, notify_on_agent_failure=False),
            finished(nc.AGENT_FAILED, reason="boom"), (finished(nc.RESOLVED), nc.ReportSummary()))
    (only,) = webhook.messages()
    assert only["blocks"][0]["text"]["text"] == "Kubernetes Incident Triage :white_check_mark:"


def test_only_agent_runs_move_the_breaker(webhook: Webhook, notifier_for: Callable[..., nc.Notifier]
                                         ) -> None:
    summary = nc.ReportSummary()
    deliver(notifier_for(failure_threshold_for_alert=2),
            finished(nc.AGENT_FAILED, reason="a"), (finished(nc.FAILED), summary), finished(nc.SKIPPED),
            finished(nc.AGENT_FAILED, reason="b"),        # failed/skipped did not reset: alert now
            finished(nc.AGENT_FAILED, reason="c"), (finished(nc.RESOLVED), summary),
            finished(nc.AGENT_FAILED, reason="d"), (finished(nc.RESOLVED), summary),
            finished(nc.AGENT_FAILED, reason="e"))        # resolved reset the count: no alert
    headers = [m["blocks"][0]["text"]["text"] for m in webhook.messages()]
    assert headers == ["Kubernetes Incident Triage :x:", "AI Agent System Degraded",
                       "Kubernetes Incident Triage :white_check_mark:", "AI Agent System Recovered",
                       "Kubernetes Incident Triage :white_check_mark:"]


def test_the_breaker_keeps_five_reasons_and_the_alert_shows_three() -> None:
    breaker = nc.CircuitBreaker(threshold=7)
    alerts = [breaker.record_failure(f"reason {n}", T0 + dt.timedelta(seconds=n)) for n in range(1, 8)]
    assert alerts[:6] == [None] * 6 and alerts[6] is not None
    stats = alerts[6]
    assert stats.reasons == ("reason 3", "reason 4", "reason 5", "reason 6", "reason 7")
    assert stats.count == 7 and stats.window == 6
    assert texts(nc.degraded_alert(stats))[3] == (
        "*Sample Failure Reasons (last 3):*\n• reason 5\n• reason 6\n• reason 7")
    assert breaker.record_failure("again") is None, "one degraded alert per episode"
    recovery = breaker.record_success(T0 + dt.timedelta(minutes=30))
    assert recovery is not None and recovery.downtime == 30 * 60 - 1
    assert breaker.count == 0 and not breaker.is_open
    assert breaker.record_success() is None, "no recovery alert without a degraded alert"
    assert nc.CircuitBreaker(threshold=0).threshold == 3


# -- stopping within the documented bound ------------------------------------------------------


class HungServer:
    """A TCP server on 127.0.0.1 that accepts connections, reads what they send and never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.listener.close()
        for conn in self.accepted:
            conn.close()


def test_the_uploader_stops_within_its_bound_with_a_full_queue_and_a_hung_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("AWS_ACCESS_KEY_ID", "nc-test"), ("AWS_SECRET_ACCESS_KEY", "nc-test-secret"),
                        ("AWS_CONFIG_FILE", str(tmp_path / "none")),
                        ("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))):
        monkeypatch.setenv(name, value)
    hung = HungServer()
    config = nc.Config(s3_bucket="b", s3_region="eu-west-1", s3_endpoint_url=hung.url,
                       storage_timeout_seconds=0.5, storage_max_attempts=10)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "incident.json").write_text("{}")
    handed: list[tuple[str, str | None]] = []
    store = nc.SqliteStore(str(tmp_path / "upload.db"))
    # Backoff between failed requests makes one incident's upload take tens of seconds.
    uploader = nc.ReportUploader(config, store, nc.open_object_store(config), nc.Metrics(),
                                 notify=lambda i, link: handed.append((i.incident_id, link)),
                                 retry_initial=2.0, retry_max=5.0, queue_size=2)
    incidents = [finished(nc.RESOLVED, workspace_path=str(workspace)) for _ in range(3)]
    try:
        uploader.start()
        uploader.enqueue(incidents[0])
        wait_for(lambda: hung.accepted, timeout=30, what="the first upload to reach the store")
        uploader.enqueue(incidents[1])
        uploader.enqueue(incidents[2])
        assert uploader._queue.full()
        drain = 1.0
        bound = drain + config.storage_timeout_seconds + 5  # as _DrainingThread.stop documents
        started = time.monotonic()
        uploader.stop(drain)
        took = time.monotonic() - started
    finally:
        store.close()
        hung.close()
    assert took < bound + 2.0, f"stop took {took:.1f} s, documented bound {bound} s"
    assert not uploader.is_alive()
    # Nothing is lost: every incident still reached Slack, without a link.
    assert handed == [(i.incident_id, None) for i in incidents]


def test_a_notifier_out_of_time_makes_no_request_after_the_one_in_hand(
        webhook: Webhook, notifier_for: Callable[..., nc.SlackNotifier]) -> None:
    notifier = notifier_for(failure_threshold_for_alert=1, slack_timeout_seconds=0.5)
    notifier.enqueue(finished(nc.AGENT_FAILED, reason="boom"))  # opens the breaker: a recovery follows
    wait_for(lambda: len(webhook.received) == 1, timeout=30, what="the degraded alert")
    webhook.script(*[Reply(200, delay=30.0)] * 5)
    notifier.enqueue(finished(nc.RESOLVED), nc.ReportSummary("fixed", "HIGH"))
    wait_for(lambda: len(webhook.received) == 2, timeout=30, what="the hung notification")
    notifier.stop(0.1)
    assert not notifier.is_alive()
    # The notification in hand timed out; the recovery alert of the same item was not attempted.
    assert len(webhook.received) == 2
    assert notifier.metrics.value("notifications_failed", "slack") == 2


# -- HTML --------------------------------------------------------------------------------------


class _Elements(html.parser.HTMLParser):
    """Collects every start tag with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def elements(page: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Elements()
    parser.feed(page)
    return parser.tags


def assert_inert(page: str) -> None:
    """No script element, no event-handler attribute, no link or image outside http(s)/relative URLs."""
    for tag, attrs in elements(page):
        assert tag != "script", "a live <script> element"
        for name, value in attrs.items():
            assert not name.startswith("on"), f"a live {name}= attribute on <{tag}>"
            if name in ("href", "src"):
                scheme = urllib.parse.urlsplit(value or "").scheme.lower()
                assert scheme in ("", "http", "https", "mailto"), f"<{tag} {name}={value!r}>"


UNTRUSTED_REPORT = """\
# Investigation

<script>alert("raw")</script>

<img src=x onerror=alert(1)>

<a href="javascript:alert(2)">raw anchor</a> <div onmouseover="alert(3)">hover</div>

[click](javascript:alert(4)) [mixed](JaVaScRiPt:alert(5)) [vb](vbscript:msgbox(6))
[data](data:text/html;base64,PHNjcmlwdD5hbGVydCg3KTwvc2NyaXB0Pg==) [file](file:///etc/passwd)
<javascript:alert(8)> ![img](javascript:alert(9))
[escaped](java&#115;cript:alert(10))

[a safe link](https://kubernetes.io/docs/)
"""


def test_untrusted_markdown_comes_out_inert() -> None:
    page = nc.render_report_html(UNTRUSTED_REPORT, "9f0c1d2e-0000-4000-8000-000000000000")
    assert_inert(page)
    assert "&lt;script&gt;alert(&quot;raw&quot;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "javascript:" not in "".join(str(v) for _, attrs in elements(page) for v in attrs.values())
    links = [attrs for tag, attrs in elements(page) if tag == "a"]
    assert links == [{"href": "https://kubernetes.io/docs/", "target": "_blank",
                      "rel": "noopener noreferrer"}]
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


def test_the_incident_id_is_escaped_in_the_page() -> None:
    page = nc.render_report_html("# r", '"><script>alert(1)</script>')
    assert_inert(page)
    assert "<title>Investigation Report - &#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;</title>" in page


def test_tables_code_and_strikethrough_render() -> None:
    report = ("| Field | Value |\n|---|---|\n| **Severity** | P2 |\n\n"
              "```bash\nkubectl get pods -o wide | grep '<none>'\n```\n\n~~wrong~~ right\n"
              "**Cluster:** prod\n**Namespace:** payments\n")
    page = nc.render_report_html(report, "id-1")
    assert "<table>" in page and "<th>Field</th>" in page and "<td><strong>Severity</strong></td>" in page
    assert ('<pre><code class="language-bash">kubectl get pods -o wide | grep \'&lt;none&gt;\'\n'
            "</code></pre>") in page
    assert "<s>wrong</s>" in page
    assert "<strong>Cluster:</strong> prod<br />" in page, "metadata lines must not run together"


def test_the_page_has_the_originals_frame() -> None:
    page = nc.render_report_html("## Summary\nAll good.", "1234-abcd")
    assert page.startswith("<!DOCTYPE html>\n<html")
    assert "<title>Investigation Report - 1234-abcd</title>" in page
    assert '<span class="badge">Incident ID: 1234-abcd</span>' in page
    assert "<h1>🔍 Kubernetes Incident Investigation</h1>" in page
    assert "<h2>Summary</h2>" in page and "max-width: 900px" in page
    assert '<footer class="footer">Generated by Nightcrier</footer>' in page
    assert page.rstrip().endswith("</html>")


# -- summary extraction ------------------------------------------------------------------------

SEVEN_SECTIONS = """\
# Kubernetes Incident Triage Report

## 0. Executive Triage Card

| Field | Value |
|-------|-------|
| **Status** | 🔴 Active Incident |
| **Severity** | P2 |
| **Impact** | Single Pod |

### Primary Hypothesis
The api container hits its memory limit — Confidence: Medium

### Alternative Hypotheses Considered
1. Memory leak — Confidence: 20%, Why deprioritized: flat heap

## 2. Assessment & Findings

- **[INF-1]** Traffic is below normal — Confidence: Low

## 3. Root Cause Analysis

### H1: Memory limit too low — Confidence: High

**Statement**: The `api` container's *memory limit* (256Mi) is __below__ its working set of ~300Mi.

**Evidence For**:
- OOMKilled 5 times in 10 minutes (FACT-1)

---

### H2: Memory leak — Confidence: Low

**Statement**: The application leaks memory.

## 4. Remediation Plan
"""

SUMMARY_CASES = {
    "simple format of the built-in prompt": (
        "# Investigation\n\n## Summary\nThe pod crashes.\n\n## Root Cause\nThe container ran out of memory.\n"
        "**Confidence:** HIGH\n\n## Evidence\n- kubectl describe\n",
        "The container ran out of memory.", "HIGH"),
    "7-section template: H1 statement under ## 3. Root Cause Analysis": (
        SEVEN_SECTIONS,
        "The api container's memory limit (256Mi) is below its working set of ~300Mi.", "HIGH"),
    "7-section template: H1 without a statement gives its name": (
        "## 3. Root Cause Analysis\n\n### H1: ConfigMap key missing — Confidence: Medium\n\n"
        "**Evidence For**:\n- env var empty\n",
        "ConfigMap key missing", "MEDIUM"),
    "Executive Triage Card table with root cause and confidence rows": (
        "## 0. Executive Triage Card\n\n| Field | Value |\n|---|---|\n| **Status** | 🟡 Degraded |\n"
        "| **Root Cause** | Image tag `v2.3` does not exist in the registry |\n| **Confidence** | MEDIUM |\n",
        "Image tag v2.3 does not exist in the registry", "MEDIUM"),
    "confidence in a table cell under its column": (
        "# Report\n\n| Root Cause | Confidence |\n|---|---|\n| DNS lookups to kube-dns time out | low |\n",
        "DNS lookups to kube-dns time out", "LOW"),
    "primary hypothesis only": (
        "## 0. Executive Triage Card\n\n### Primary Hypothesis\n"
        "**The liveness probe kills a slow-starting JVM** — Confidence: High\n",
        "The liveness probe kills a slow-starting JVM", "HIGH"),
    "lower-case headings and keys": (
        "## summary\nbad.\n\n## root cause\n\nnode disk pressure evicted the pod\n\n"
        "confidence level: medium\n",
        "node disk pressure evicted the pod", "MEDIUM"),
    "confidence before the word, in the heading": (
        "## Root Cause (HIGH confidence)\n\n"
        "- The Secret `db-creds` was rotated without a restart.\n- Other.\n",
        "The Secret db-creds was rotated without a restart.", "HIGH"),
    "inline root cause line": (
        "# Findings\n\n**Root cause:** The PVC is bound to a zone the node is not in. Confidence: low\n",
        "The PVC is bound to a zone the node is not in.", "LOW"),
    "FLOW and BELOW are not LOW": (
        "## Root Cause\nThe network policy blocks the FLOW of traffic BELOW port 1024.\n"
        "**Confidence:** see the evidence BELOW\n\nFLOW logs confirm it (confidence FLOW).\n",
        "The network policy blocks the FLOW of traffic BELOW port 1024.", "UNKNOWN"),
    "FLOW and BELOW beside a real level": (
        "## Root Cause\nTraffic FLOW dropped BELOW the readiness threshold.\n**Confidence:** Medium\n",
        "Traffic FLOW dropped BELOW the readiness threshold.", "MEDIUM"),
    "no root cause at all": (
        "# Investigation\n\nThe agent looked around and found nothing conclusive.\n\n"
        "```\n## Root Cause\nnot a heading: inside a code block\n**Confidence:** HIGH\n```\n",
        "See investigation report", "UNKNOWN"),
    "confidence missing": (
        "## Root Cause\n\nThe readiness probe points at port 8080; the app listens on 9090.\n",
        "The readiness probe points at port 8080; the app listens on 9090.", "UNKNOWN"),
    "empty report": ("", "See investigation report", "UNKNOWN"),
}


@pytest.mark.parametrize("name", list(SUMMARY_CASES))
def test_summary_extraction(name: str) -> None:
    markdown, root_cause, confidence = SUMMARY_CASES[name]
    summary = nc.summarize_report(markdown)
    assert (summary.root_cause, summary.confidence) == (root_cause, confidence)
    assert summary.text == f"{root_cause} (confidence: {confidence})"


def test_a_long_root_cause_is_kept_to_a_readable_length() -> None:
    summary = nc.summarize_report("## Root Cause\n" + "word " * 2000 + "\n**Confidence:** LOW\n")
    assert len(summary.root_cause) <= nc.ROOT_CAUSE_MAX_CHARS and summary.root_cause.endswith("word…")
    assert summary.confidence == "LOW"


# -- end to end ------------------------------------------------------------------------------

REPORT_AGENT = """cat > output/investigation.md <<'EOF'
# Investigation

<script>alert("from the cluster")</script>

## Root Cause
The **api** container ran out of memory.
**Confidence:** HIGH

## Evidence
<img src=x onerror=alert(1)> and [details](javascript:alert(2))
EOF
"""


def reporting_config(tmp_path: Path, webhook: Webhook) -> nc.Config:
    kubeconfig = tmp_path / "kubeconfig.yaml"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    data = {"workspace_root": str(tmp_path / "ws"), "health_port": 0, "agent_runner": "process",
            "agent_command": ["sh", "-c", REPORT_AGENT], "agent_timeout": 30, "dispatch_poll_interval": 0.2,
            "slack_webhook_url": webhook.url, "report_base_url": "https://reports.example.com/ws/",
            "clusters": [{"name": "c1", "mcp": {"endpoint": "http://127.0.0.1:9/c1"},
                          "triage": {"enabled": True, "kubeconfig": str(kubeconfig)}}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    config, _ = nc.load_config(str(path), env={})
    return config


def test_a_finished_incident_gets_a_page_a_stored_summary_and_a_slack_message(
        tmp_path: Path, store: nc.StateStore, webhook: Webhook) -> None:
    config = reporting_config(tmp_path, webhook)
    metrics = nc.Metrics()
    notifier = nc.Notifier(slack_channel(config), config, store, metrics)
    dispatcher = nc.Dispatcher(config, store, nc.ProcessRunner(grace=1), threading.Event(), metrics,
                               "test-instance", on_finished=notifier.enqueue)
    notifier.start()
    dispatcher.start()
    try:
        (incident_id,) = store.insert_events([make_event("c1")])
        dispatcher.wake.set()
        incident = wait_for(
            lambda: (i := store.get_incident(incident_id)) and i.status in nc.TERMINAL_STATUSES and i,
            timeout=30, what="the incident to finish")
        (message,) = wait_for(webhook.messages, timeout=15, what="the Slack message")
    finally:
        dispatcher.stop()
        notifier.stop()
    assert incident.status == nc.RESOLVED

    page_path = Path(incident.workspace_path or "") / "investigation.html"
    assert stat.S_IMODE(page_path.stat().st_mode) == 0o600
    page = page_path.read_text()
    assert_inert(page)
    assert "&lt;script&gt;alert(&quot;from the cluster&quot;)&lt;/script&gt;" in page
    assert f"<title>Investigation Report - {incident_id}</title>" in page

    report = store.get_report(incident_id)
    assert report is not None and report.report_html == page
    assert report.summary_text == "The api container ran out of memory. (confidence: HIGH)"
    assert "<script>" in report.report_markdown, "the markdown is stored as the agent wrote it"

    assert texts(message)[5] == "*Root Cause (HIGH confidence):*\nThe api container ran out of memory."
    link, _, query = message["blocks"][-1]["elements"][0]["url"].partition("?")
    assert link == f"https://reports.example.com/ws/incidents/{incident_id}/report"
    assert nc.verify_report_link(incident_id, urllib.parse.parse_qs(query), nc.report_link_key(config, store))
    assert metrics.value("notifications_sent", "slack") == 1


@pytest.mark.parametrize("with_slack", [True, False])
def test_the_service_wires_the_notifier_only_with_a_webhook(
        tmp_path: Path, webhook: Webhook, with_slack: bool) -> None:
    config = nc.Config(workspace_root=str(tmp_path / "ws"), agent_runner="process", agent_command=["true"],
                       health_port=0, slack_webhook_url=webhook.url if with_slack else "")
    service = nc.Service(config, nc.SqliteStore(str(tmp_path / "service.db"))).start()
    try:
        if not with_slack:
            assert not service.notifiers and service.dispatcher.on_finished is None
            return
        (notifier,) = service.notifiers.each
        assert notifier.channel.name == "slack" and notifier.is_alive()
        assert service.dispatcher.on_finished == service.notifiers.enqueue
        service.dispatcher.on_finished(finished(nc.RESOLVED))
    finally:
        service.stop()
    # stop() drained the queue: the message went out before it returned.
    (message,) = webhook.messages()
    assert message["blocks"][0]["text"]["text"] == "Kubernetes Incident Triage :white_check_mark:"
    assert not notifier.is_alive()
