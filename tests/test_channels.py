"""The notification channels besides Slack -- the signed webhook, PagerDuty Events v2 and Microsoft
Teams -- each against a local HTTP server that records what a vendor would receive."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from test_reporting import (  # noqa: F401 -- shared fixtures
    SECRET_PATH,
    SECRET_TOKEN,
    Reply,
    Webhook,
    _capture_nightcrier_logs,
    finished,
    log_output,
    notifiers_for_fixture,
    webhook_fixture,
)

import nightcrier as nc

WEBHOOK_SECRET = "wh-s1gn1ng-k3y-do-not-log"
ROUTING_KEY = "R0UT1NGK3Y0000000000000000000000"
PD_ACCEPTED = Reply(202, json.dumps({"status": "success", "message": "Event processed",
                                     "dedup_key": "from-pagerduty"}), {"Content-Type": "application/json"})


def deliver_all(notifiers: list[nc.Notifier], *items: nc.Incident | tuple[nc.Incident, nc.ReportSummary]
                ) -> None:
    """Queue every item on every notifier, then wait for each to drain (stop drains)."""
    for notifier in notifiers:
        for item in items:
            notifier.enqueue(*item) if isinstance(item, tuple) else notifier.enqueue(item)
        notifier.stop()
        assert not notifier.is_alive()


def sent(notifier: nc.Notifier, outcome: str = "sent") -> float:
    assert notifier.metrics is not None
    return notifier.metrics.value(f"notifications_{outcome}", notifier.channel.name)


def receiver_accepts(body: bytes, header: str, secret: str) -> bool:
    """What a receiver does: HMAC the raw body and compare in constant time."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header)


# -- generic webhook ------------------------------------------------------------------------------


def test_the_webhook_document_is_signed_over_its_raw_body(
        webhook: Webhook, notifiers_for: Callable[..., list[nc.Notifier]]) -> None:
    (notifier,) = notifiers_for(webhook_url=webhook.url + "/hook", webhook_secret=WEBHOOK_SECRET)
    incident = finished(nc.RESOLVED, fault_id="f7a3b2c1d4e5f6a7", severity="critical",
                        timestamp="2026-03-01T12:50:00+01:00")
    before = nc.utcnow()
    deliver_all([notifier], (incident, nc.ReportSummary("The api container ran out of memory.", "HIGH")))
    (received,) = webhook.received
    signature = received.headers["X-Nightcrier-Signature"]
    assert receiver_accepts(received.body, signature, WEBHOOK_SECRET)
    assert not receiver_accepts(received.body, signature, WEBHOOK_SECRET + "x")
    assert not receiver_accepts(received.body.replace(b"HIGH", b"LOW!"), signature, WEBHOOK_SECRET)
    document = json.loads(received.body)
    assert document["version"] == 1 and document["type"] == "incident.finished"
    sent_at = dt.datetime.fromisoformat(document["sent_at"].replace("Z", "+00:00"))
    assert before <= sent_at <= nc.utcnow(), "sent_at lets receivers refuse replays"
    assert document["incident"] == {
        "id": incident.incident_id, "cluster": "prod-eu", "status": "resolved",
        "fault_id": "f7a3b2c1d4e5f6a7", "fault_type": "CrashLoop", "severity": "critical", "context": "",
        "resource": {"api_version": "", "kind": "Pod", "namespace": "payments", "name": "api-7f8b9c",
                     "uid": ""},
        "fault_time": "2026-03-01T12:50:00+01:00", "created_at": "2026-03-01T11:50:00Z",
        "started_at": "2026-03-01T11:55:48Z", "completed_at": "2026-03-01T12:00:00Z", "failure_reason": None}
    assert document["report"] == {"triaged": True, "summary": "The api container ran out of memory. "
                                  "(confidence: HIGH)", "root_cause": "The api container ran out of memory.",
                                  "confidence": "HIGH", "url": None}
    assert sent(notifier) == 1


def test_each_retry_is_signed_afresh_with_its_own_send_time(
        webhook: Webhook, notifiers_for: Callable[..., list[nc.Notifier]]) -> None:
    webhook.script(Reply(503), Reply(429), Reply(200))
    (notifier,) = notifiers_for(webhook_url=webhook.url, webhook_secret=WEBHOOK_SECRET)
    deliver_all([notifier], (finished(nc.FAILED), nc.ReportSummary()))
    bodies = [r for r in webhook.received]
    assert len(bodies) == 3 and sent(notifier) == 1
    assert len({json.loads(r.body)["sent_at"] for r in bodies}) == 3
    assert all(receiver_accepts(r.body, r.headers["X-Nightcrier-Signature"], WEBHOOK_SECRET) for r in bodies)


# -- PagerDuty Events API v2 ---------------------------------------------------------------------


def test_pagerduty_gets_a_trigger_per_fault_condition(
        webhook: Webhook, notifiers_for: Callable[..., list[nc.Notifier]]) -> None:
    webhook.script(*[PD_ACCEPTED] * 4)
    (notifier,) = notifiers_for(pagerduty_routing_key=ROUTING_KEY, pagerduty_events_url=webhook.url + "/v2",
                                pagerduty_min_severity="info", report_base_url="https://nc.example.com")
    condition = {"fault_id": "f7a3b2c1d4e5f6a7", "severity": "critical"}
    first, repeat = finished(nc.RESOLVED, **condition), finished(nc.FAILED, **condition)
    elsewhere = finished(nc.RESOLVED, cluster="prod-us", **condition)
    long_cause = nc.ReportSummary("x" * 5000, "LOW")
    deliver_all([notifier], (first, nc.ReportSummary("OOMKilled: limit 128Mi", "HIGH")),
                (repeat, nc.ReportSummary()), (elsewhere, long_cause),
                (finished(nc.RESOLVED, severity="warning", resource_namespace=""), nc.ReportSummary()))
    events = webhook.messages()
    assert len(events) == 4 and sent(notifier) == 4
    for event in events:
        assert event["routing_key"] == ROUTING_KEY and event["event_action"] == "trigger"
        assert event["client"] == "nightcrier" and event["client_url"] == "https://nc.example.com"
        assert set(event["payload"]) == {"summary", "source", "severity", "timestamp", "component", "group",
                                         "class", "custom_details"}
        assert 0 < len(event["payload"]["summary"]) <= 1024
        assert event["payload"]["severity"] in ("critical", "error", "warning", "info")
        dt.datetime.fromisoformat(event["payload"]["timestamp"].replace("Z", "+00:00"))
    assert events[0]["dedup_key"] == events[1]["dedup_key"], "repeats of one condition fold into one alert"
    assert events[2]["dedup_key"] != events[0]["dedup_key"], "the same faultId on another cluster is another"
    assert events[0]["payload"] | {"custom_details": None} == {
        "summary": "CrashLoop on prod-eu/payments/Pod/api-7f8b9c: OOMKilled: limit 128Mi",
        "source": "prod-eu/payments/Pod/api-7f8b9c", "severity": "critical",
        "timestamp": "2026-03-01T12:00:00Z", "component": "Pod/api-7f8b9c", "group": "payments",
        "class": "CrashLoop", "custom_details": None}
    assert events[0]["payload"]["custom_details"]["incident_id"] == first.incident_id
    assert events[3]["payload"]["severity"] == "warning" and events[3]["payload"]["group"] == "prod-eu"
    link = events[0]["links"][0]
    assert link["text"] == "Triage report"
    assert link["href"].startswith(f"https://nc.example.com/incidents/{first.incident_id}/report?expires=")


@pytest.mark.parametrize(("fault", "expected"), [("critical", "critical"), ("error", "error"),
                                                  ("warning", "warning"), ("info", "info"),
                                                  ("CRITICAL ", "critical"), ("", "warning"),
                                                  ("bogus", "warning")])
def test_fault_severities_map_to_pagerdutys(fault: str, expected: str) -> None:
    assert nc.pagerduty_severity(fault) == expected


def test_pagerduty_min_severity_filters_and_links_point_at_the_report(
        webhook: Webhook, notifiers_for: Callable[..., list[nc.Notifier]]) -> None:
    (notifier,) = notifiers_for(pagerduty_routing_key=ROUTING_KEY, pagerduty_events_url=webhook.url,
                                pagerduty_min_severity="critical")
    report = "https://store.example.com/abc/index.html?sig=x"
    notifier.enqueue(finished(nc.RESOLVED, severity="warning"), nc.ReportSummary())
    notifier.enqueue(finished(nc.RESOLVED, severity="critical"), nc.ReportSummary(), report)
    deliver_all([notifier])
    (event,) = webhook.messages()
    assert event["payload"]["severity"] == "critical"
    assert event["links"] == [{"href": report, "text": "Triage report"}]


def test_pagerduty_400_is_permanent_and_429_is_retried(
        webhook: Webhook, notifiers_for: Callable[..., list[nc.Notifier]], caplog: pytest.LogCaptureFixture
) -> None:
    invalid = Reply(400, json.dumps({"status": "invalid event", "message": "Event object is invalid",
                                     "errors": ["Length of 'routing_key' is incorrect"]}))
    webhook.script(invalid, Reply(429, '{"status":"throttle event"}'), PD_ACCEPTED)
    (notifier,) = notifiers_for(pagerduty_routing_key=ROUTING_KEY, pagerduty_events_url=webhook.url,
                                notify_max_attempts=5)
    deliver_all([notifier], (finished(nc.RESOLVED, severity="critical"), nc.ReportSummary()),
                (finished(nc.RESOLVED, severity="critical"), nc.ReportSummary()))
    assert len(webhook.received) == 3, "the 400 was not retried, the 429 was"
    assert sent(notifier) == 1 and sent(notifier, "failed") == 1
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.getMessage() == "failed to send notification"
    assert error.fields["permanent"] is True and "status 400" in error.fields["error"]  # type: ignore[attr-defined]
    assert "Event object is invalid" in error.fields["error"]  # type: ignore[attr-defined]
    (accepted,) = [r for r in caplog.records if r.getMessage() == "notification sent"]
    assert accepted.fields["dedup_key"] == "from-pagerduty"  # type: ignore[attr-defined]


# -- Microsoft Teams (Workflows) -----------------------------------------------------------------

# Required properties of the Adaptive Card schema (adaptive-card.json, 1.4) for what a card may hold.
CARD_REQUIRED = {"AdaptiveCard": {"type", "version"}, "TextBlock": {"type", "text"},
                 "FactSet": {"type", "facts"}, "Action.OpenUrl": {"type", "url"}}


def assert_valid_workflows_message(message: dict[str, Any]) -> dict[str, Any]:
    """The Workflows webhook's message shape with one Adaptive Card that has every required field."""
    assert message["type"] == "message"
    (attachment,) = message["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert card["type"] == "AdaptiveCard" and card["version"] in ("1.4", "1.5")
    assert CARD_REQUIRED["AdaptiveCard"] <= set(card)
    for element in [*card["body"], *card.get("actions", [])]:
        assert element["type"] in CARD_REQUIRED, element
        assert CARD_REQUIRED[element["type"]] <= set(element), element
        for fact in element.get("facts", []):
            assert set(fact) == {"title", "value"} and all(isinstance(v, str) for v in fact.values())
    return card


def test_teams_gets_an_adaptive_card_with_a_report_button(
        webhook: Webhook, notifiers_for: Callable[..., list[nc.Notifier]]) -> None:
    (notifier,) = notifiers_for(teams_webhook_url=webhook.url)
    report = "https://store.example.com/abc/index.html?sig=x"
    hostile = nc.ReportSummary("see [the fix](https://evil.example.com) now", "MEDIUM")
    notifier.enqueue(finished(nc.RESOLVED), hostile, report)
    notifier.enqueue(finished(nc.FAILED), nc.ReportSummary())
    deliver_all([notifier])
    resolved, failed = (assert_valid_workflows_message(m) for m in webhook.messages())
    facts = {f["title"]: f["value"] for f in resolved["body"][1]["facts"]}
    assert facts | {"Incident ID": "", "Duration": ""} == {
        "Status": "resolved", "Cluster": "prod-eu", "Namespace": "payments", "Resource": "Pod/api-7f8b9c",
        "Reason": "CrashLoop", "Incident ID": "", "Duration": ""}
    assert facts["Duration"] == "4m12s"
    assert resolved["body"][0]["color"] == "good" and failed["body"][0]["color"] == "attention"
    assert "](https://evil" not in resolved["body"][2]["text"], "no disguised Markdown link"
    assert "MEDIUM confidence" in resolved["body"][2]["text"]
    assert resolved["actions"] == [{"type": "Action.OpenUrl", "title": "View Report", "url": report}]
    assert "actions" not in failed
    assert sent(notifier) == 2


# -- one mechanism for every channel ---------------------------------------------------------------


def every_channel(webhook: Webhook) -> dict[str, Any]:
    return {"slack_webhook_url": webhook.url + "/slack", "webhook_url": webhook.url + "/hook",
            "webhook_secret": WEBHOOK_SECRET, "pagerduty_routing_key": ROUTING_KEY,
            "pagerduty_events_url": webhook.url.replace(SECRET_PATH, "/pd"),
            "teams_webhook_url": webhook.url + "/teams"}


def test_the_failure_threshold_applies_to_every_channel_alike(
        webhook: Webhook, notifiers_for: Callable[..., list[nc.Notifier]]) -> None:
    notifiers = notifiers_for(failure_threshold_for_alert=2, **every_channel(webhook))
    assert [n.channel.name for n in notifiers] == ["slack", "webhook", "pagerduty", "teams"]
    deliver_all(notifiers, finished(nc.AGENT_FAILED, reason="a"), finished(nc.AGENT_FAILED, reason="b"),
                finished(nc.AGENT_FAILED, reason="c"),
                (finished(nc.RESOLVED, severity="critical"), nc.ReportSummary()))
    by_channel: dict[str, list[dict[str, Any]]] = {}
    for received in webhook.received:
        by_channel.setdefault(received.path.rsplit("/", 1)[-1], []).append(received.message)
    assert {name: len(messages) for name, messages in by_channel.items()} == {
        "slack": 3, "hook": 3, "pd": 3, "teams": 3}, "degraded, incident, recovered each"
    assert [m["type"] for m in by_channel["hook"]] == ["agents.degraded", "incident.finished",
                                                      "agents.recovered"]
    assert by_channel["hook"][0]["agents"]["failures"] == 2
    pd = by_channel["pd"]
    assert [m["event_action"] for m in pd] == ["trigger", "trigger", "resolve"]
    assert pd[0]["dedup_key"] == pd[2]["dedup_key"] != pd[1]["dedup_key"], "recovery resolves the alert"
    assert [assert_valid_workflows_message(m)["body"][0]["text"] for m in by_channel["teams"]] == [
        "AI Agent System Degraded", "Kubernetes Incident Triage: resolved", "AI Agent System Recovered"]
    assert all(sent(n) == 3 for n in notifiers), "counted per channel"


def test_no_channel_secret_reaches_the_log_or_check_config(
        webhook: Webhook, notifiers_for: Callable[..., list[nc.Notifier]], caplog: pytest.LogCaptureFixture,
        tmp_path: Path) -> None:
    secrets = (SECRET_TOKEN, WEBHOOK_SECRET, ROUTING_KEY)
    settings = every_channel(webhook)
    webhook.script(*[Reply(500, f"echo {' '.join(settings.values())}")] * 20)
    deliver_all(notifiers_for(**settings), (finished(nc.RESOLVED, severity="critical"), nc.ReportSummary()))
    output = log_output(caplog)
    assert output.count("failed to send notification") == 4
    assert not [s for s in secrets if s in output]

    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({**settings, "clusters": [
        {"name": "c1", "mcp": {"endpoint": "http://127.0.0.1:9/mcp"}}]}))
    config, _ = nc.load_config(str(config_path), env={})
    shown = yaml.safe_dump(nc.config_as_dict(config))
    assert not [s for s in secrets if s in shown]
    assert "teams_webhook_url: http://127.0.0.1/********" in shown


@pytest.mark.parametrize(("settings", "problem"), [
    ({"webhook_url": "https://hooks.example.com/x"},
     "webhook_secret (env WEBHOOK_SECRET): is required when webhook_url is set"),
    ({"teams_webhook_url": "ftp://x/" + SECRET_TOKEN},
     "teams_webhook_url (env TEAMS_WEBHOOK_URL): must be an http(s) URL, got ********"),
    ({"pagerduty_events_url": "events.pagerduty.com"},
     "pagerduty_events_url (env PAGERDUTY_EVENTS_URL): must be an http(s) URL, got 'events.pagerduty.com'"),
    ({"pagerduty_min_severity": "page-me"},
     "pagerduty_min_severity (env PAGERDUTY_MIN_SEVERITY): must be one of critical, error, warning, info"),
])
def test_channel_settings_are_validated(tmp_path: Path, settings: dict[str, str], problem: str) -> None:
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({**settings, "clusters": [
        {"name": "c1", "mcp": {"endpoint": "http://127.0.0.1:9/mcp"}}]}))
    with pytest.raises(nc.ConfigError) as caught:
        nc.load_config(str(config_path), env={})
    assert [p for p in caught.value.problems if p.startswith(problem)], caught.value.problems
    assert SECRET_TOKEN not in str(caught.value)


# -- hostile text from the cluster and the agent ---------------------------------------------------

texts_from_outside = st.text(alphabet=st.characters(codec="utf-8"), max_size=3000)


@settings(max_examples=150, deadline=None)
@given(fields=st.fixed_dictionaries({
    "cluster": texts_from_outside, "fault_type": texts_from_outside, "severity": texts_from_outside,
    "resource_kind": texts_from_outside, "resource_name": texts_from_outside,
    "resource_namespace": texts_from_outside, "context": texts_from_outside, "fault_id": texts_from_outside}),
       root_cause=texts_from_outside, url=st.one_of(st.none(), texts_from_outside))
def test_every_channel_formats_any_incident_within_its_limits(fields: dict[str, str], root_cause: str,
                                                             url: str | None) -> None:
    config = nc.Config(slack_webhook_url="https://hooks.example.com/s", webhook_url="https://hooks.example.com/w",
                       webhook_secret=WEBHOOK_SECRET, pagerduty_routing_key=ROUTING_KEY,
                       teams_webhook_url="https://hooks.example.com/t")
    notice = nc.Notice(nc.NOTICE_INCIDENT, finished(nc.FAILED, **fields), nc.ReportSummary(root_cause, "LOW"),
                       True, url)
    for channel in nc.notification_channels(config):
        message = channel.message(notice)
        assert message is not None
        body, headers = channel.request(message)
        decoded = {key: value for key, value in json.loads(body).items() if key != "sent_at"}
        assert decoded == json.loads(json.dumps(message)), "the body is the message"
        if channel.name == "webhook":
            assert receiver_accepts(body, headers["X-Nightcrier-Signature"], WEBHOOK_SECRET)
        if channel.name == "pagerduty":
            assert len(message["payload"]["summary"]) <= 1024
            assert message["payload"]["severity"] in nc.PAGERDUTY_SEVERITIES
            assert len(message["dedup_key"]) == 64
        if channel.name == "teams":
            card = assert_valid_workflows_message(message)
            shown = [card["body"][0]["text"], card["body"][2]["text"],
                     *(f["value"] for f in card["body"][1]["facts"])]
            assert not [t for t in shown if "](" in t], "no Markdown link can be formed"
