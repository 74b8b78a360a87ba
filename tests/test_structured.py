"""The agent's structured result: output/triage.json, validated against the shipped schema."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine import GOOD_AGENT
from test_spend import run_to_resolved, workspace_with

import nightcrier as nc

RESULT = {"summary": "The api pod is crash looping after an OOM kill.",
          "root_cause": "The cache layer leaks memory until the 512Mi limit is hit.",
          "confidence": "HIGH", "severity": "ERROR",
          "affected_resources": [{"kind": "Pod", "namespace": "payments", "name": "api-7f8b9c"}],
          "recommendations": ["Raise the memory limit to 1Gi", "Fix the cache eviction"]}


def _workspace(directory: Path, content: bytes | None) -> str:
    return workspace_with(directory, "output/triage.json", content)


def test_a_result_following_the_schema_is_read(tmp_path: Path) -> None:
    assert nc.read_triage_result(_workspace(tmp_path, json.dumps(RESULT).encode())) == (RESULT, "")


def test_a_missing_or_invalid_result_says_why(tmp_path: Path) -> None:
    assert nc.read_triage_result(_workspace(tmp_path, None)) == (None, "no output/triage.json")
    assert nc.read_triage_result(_workspace(tmp_path, b"{not json"))[1].startswith(
        "output/triage.json is not JSON")
    wrong = {**RESULT, "confidence": "certain"}
    data, why = nc.read_triage_result(_workspace(tmp_path, json.dumps(wrong).encode()))
    assert data is None and why.startswith("output/triage.json does not follow the schema at confidence")
    missing = {k: v for k, v in RESULT.items() if k != "root_cause"}
    assert "'root_cause' is a required property" in nc.read_triage_result(
        _workspace(tmp_path, json.dumps(missing).encode()))[1]


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=3000) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(sorted(RESULT)), inner, max_size=6)).map(
        lambda document: json.dumps(document).encode()))
def test_any_file_is_a_result_or_a_reason(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        data, why = nc.read_triage_result(_workspace(Path(directory), content))
    assert (data is None) == bool(why)


def test_the_stored_summary_prefers_the_structured_root_cause() -> None:
    report = nc.TriageReport("r", "i", "e", nc.utcnow(), "## Root Cause\nSomething else.\n",
                             structured_data=json.dumps(RESULT))
    assert nc.stored_summary(report) == nc.ReportSummary(RESULT["root_cause"], "HIGH")
    fallback = nc.TriageReport("r", "i", "e", nc.utcnow(), "## Root Cause\nSomething else.\n")
    assert nc.stored_summary(fallback).root_cause == "Something else."


# -- through a run, onto the pages ------------------------------------------------------------------

WITH_RESULT = GOOD_AGENT + f"; printf '%s' '{json.dumps(RESULT)}' > output/triage.json"


def _run(tmp_path: Path, store: nc.StateStore, agent: str, cluster: str) -> tuple[nc.Incident, Any]:
    incident, config = run_to_resolved(tmp_path, store, agent, cluster)
    return incident, nc.WebPages(config, store, lambda: {"clusters": []}, "127.0.0.1")


def test_a_valid_result_is_stored_and_its_root_cause_shown(tmp_path: Path, store: nc.StateStore) -> None:
    incident, pages = _run(tmp_path, store, WITH_RESULT, "c1")
    report = store.get_report(incident.incident_id)
    assert report is not None and json.loads(report.structured_data or "") == RESULT
    assert report.summary_text == f"{RESULT['root_cause']} (confidence: HIGH)"
    page = pages.incident(incident.incident_id, "../").body.decode()
    assert RESULT["root_cause"] in page and 'id="structured-note"' not in page
    listing = pages.incident_list({}, "").body.decode()
    assert f'<div class="root-cause">{RESULT["root_cause"]}' in listing


def test_without_a_result_the_markdown_summary_is_used_and_the_page_says_so(tmp_path: Path,
                                                                            store: nc.StateStore) -> None:
    incident, pages = _run(tmp_path, store, GOOD_AGENT, "c2")
    report = store.get_report(incident.incident_id)
    assert report is not None and report.structured_data is None
    assert report.summary_text == "The container ran out of memory. (confidence: HIGH)"
    page = pages.incident(incident.incident_id, "../").body.decode()
    assert 'id="structured-note"' in page and "The container ran out of memory." in page
