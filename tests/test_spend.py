"""What agent runs cost: read from the CLI's own result, stored, bounded by a daily budget."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from conftest import wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine import GOOD_AGENT, engine_config
from test_store_contract import make_event

import nightcrier as nc

CLAUDE_RESULT = {"type": "result", "subtype": "success", "is_error": False, "result": "Report written.",
                 "total_cost_usd": 0.75, "usage": {"input_tokens": 1200, "output_tokens": 300,
                                                   "cache_creation_input_tokens": 40,
                                                   "cache_read_input_tokens": 60}}


def workspace_with(directory: Path, relpath: str, content: bytes | None) -> str:
    """A workspace in ``directory`` holding ``content`` (unless None) at ``relpath``, as an agent left it."""
    (directory / relpath).parent.mkdir(parents=True, exist_ok=True)
    if content is not None:
        (directory / relpath).write_bytes(content)
    return str(directory)


def _workspace(tmp_path: Path, result: bytes | None) -> str:
    return workspace_with(tmp_path, "logs/agent-result.json", result)


def run_to_resolved(tmp_path: Path, store: nc.StateStore, agent: str, cluster: str
                    ) -> tuple[nc.Incident, nc.Config]:
    """One incident of ``cluster`` run by ``agent`` (process runner) until resolved."""
    (incident_id,) = store.insert_events([make_event(cluster, fault_id="")])
    config = engine_config(tmp_path, agent)
    dispatcher = nc.Dispatcher(config, store, nc.ProcessRunner(grace=1), threading.Event(), nc.Metrics(),
                               "test-instance")
    dispatcher.start()
    try:
        dispatcher.wake.set()
        incident = wait_for(lambda: (i := store.get_incident(incident_id)) and i.status == nc.RESOLVED and i,
                            timeout=30, what="the run")
    finally:
        dispatcher.stop()
    return incident, config


# -- reading the CLI's result ---------------------------------------------------------------

def test_claude_json_and_stream_json_give_tokens_cost_and_the_answer(tmp_path: Path) -> None:
    expected = nc.RunSpend(1600, 0.75, "Report written.")
    assert nc.read_run_spend(_workspace(tmp_path, json.dumps(CLAUDE_RESULT).encode())) == expected
    stream = [{"type": "system", "subtype": "init"}, {"type": "assistant", "message": {"usage": {}}},
              CLAUDE_RESULT]
    text = "\n".join(json.dumps(line) for line in stream).encode()
    assert nc.read_run_spend(_workspace(tmp_path, text)) == expected


def test_codex_and_gemini_report_tokens_without_cost(tmp_path: Path) -> None:
    codex = [{"type": "thread.started"}, {"type": "item.completed", "item": {"type": "agent_message",
                                                                           "text": "Done."}},
             {"type": "turn.completed", "usage": {"input_tokens": 900, "cached_input_tokens": 100,
                                                  "output_tokens": 50}}]
    text = "\n".join(json.dumps(line) for line in codex).encode()
    assert nc.read_run_spend(_workspace(tmp_path, text)) == nc.RunSpend(950, None, "Done.")
    gemini = {"response": "Finished.", "stats": {"models": {"gemini-2.5-pro": {"tokens": {
        "prompt": 700, "candidates": 80, "total": 780}}}}}
    assert nc.read_run_spend(_workspace(tmp_path, json.dumps(gemini, indent=2).encode())) == \
        nc.RunSpend(780, None, "Finished.")


def test_no_result_or_a_foreign_one_records_nothing(tmp_path: Path) -> None:
    assert nc.read_run_spend(_workspace(tmp_path, None)) == nc.RunSpend()
    assert nc.read_run_spend(_workspace(tmp_path, b"plain text output\n")) == nc.RunSpend()
    hostile = {"type": "result", "total_cost_usd": "lots",
               "usage": {"input_tokens": -5, "output_tokens": True}}
    assert nc.read_run_spend(_workspace(tmp_path, json.dumps(hostile).encode())) == nc.RunSpend(0, None, "")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000) | st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "usage", "total_cost_usd", "result", "item", "stats", "models", "tokens",
                         "total", "input_tokens", "text", "response"]), inner, max_size=5)).map(
    lambda doc: json.dumps(doc).encode()))
def test_any_result_file_reads_as_a_spend_or_none(data: bytes) -> None:
    import tempfile
    with tempfile.TemporaryDirectory() as directory:
        spend = nc.read_run_spend(_workspace(Path(directory), data))
    assert spend.tokens_used is None or spend.tokens_used >= 0
    assert spend.cost_usd is None or spend.cost_usd >= 0


# -- through a run ----------------------------------------------------------------------------

CLAUDE_AGENT = GOOD_AGENT + f"; printf '%s' '{json.dumps(CLAUDE_RESULT)}' > logs/agent-result.json"


def test_a_runs_cost_and_tokens_land_in_the_database_and_its_answer_in_the_stdout_log(
        tmp_path: Path, store: nc.StateStore) -> None:
    incident, _ = run_to_resolved(tmp_path, store, CLAUDE_AGENT, "c1")
    incident_id = incident.incident_id
    execution, = store.list_executions(incident_id)
    assert (execution.tokens_used, execution.cost_usd) == (1600, 0.75)
    assert Path(incident.workspace_path or "", "logs", "agent-stdout.log").read_text() == "Report written.\n"
    assert store.spend_by_cluster() == {"c1": (1600, 0.75)}
    assert store.spent_today() == 0.75


# -- the daily budget ---------------------------------------------------------------------------

RECORD_SPEND = """
import sys
sys.path[:0] = [{tests!r}, {root!r}]
from conftest import open_test_store
from test_store_contract import make_event
import nightcrier as nc
store = open_test_store({engine!r}, {locator!r})
incident_id, = store.insert_events([make_event("other-process", fault_id="")])
execution = store.start_execution(incident_id, "process", {{}})
store.finish_execution(execution.execution_id, 0, None, {{}}, nc.RunSpend(1000, 0.6))
store.close()
"""


def test_a_budget_spent_by_two_processes_skips_incidents_and_is_told_once(
        engine: str, store_locator: str, store: nc.StateStore, store_factory: Callable[[], nc.StateStore],
        tmp_path: Path) -> None:
    tests = Path(__file__).resolve().parent
    for _ in range(2):  # two other processes each record a run costing $0.60
        subprocess.run([sys.executable, "-c", RECORD_SPEND.format(tests=str(tests), root=str(tests.parent),
                                                                  engine=engine, locator=store_locator)],
                       check=True, timeout=60)
    store.rules = nc.TriageRules(daily_budget_usd=1.0)
    (incident_id,) = store.insert_events([make_event("c1", fault_id="")])
    assert store.claim_next("w") is None
    incident = store.get_incident(incident_id)
    assert incident is not None and incident.status == nc.SKIPPED
    assert (incident.skip_reason or "").startswith("budget: runs started today (UTC) cost $1.20")
    # two replicas check the budget; Slack is told once
    told: list[tuple[float, float]] = []
    config = engine_config(tmp_path, GOOD_AGENT)
    replicas = [store, store_factory()]
    for replica in replicas:
        replica.rules = nc.TriageRules(daily_budget_usd=1.0)
        nc.Dispatcher(config, replica, nc.ProcessRunner(grace=1), threading.Event(), nc.Metrics(),
                      "test-instance", on_budget_spent=lambda spent, budget: told.append((spent, budget))
                      )._check_budget()
    assert told == [(1.2, 1.0)]


def test_under_the_budget_incidents_are_claimed(store: nc.StateStore) -> None:
    store.rules = nc.TriageRules(daily_budget_usd=1.0)
    (first,) = store.insert_events([make_event("c1", fault_id="")])
    execution = store.start_execution(first, "process", {})
    store.finish_execution(execution.execution_id, 0, None, {}, nc.RunSpend(10, 0.99))
    claimed = store.claim_next("w")
    assert claimed is not None and claimed.incident_id == first

