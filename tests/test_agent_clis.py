"""The real agent CLIs in the shipped agent image, against scripted model endpoints.

The image is the one built from agent/Dockerfile (``.ci/build-images.sh`` builds
it as ``nightcrier-agent:ci``; ``NIGHTCRIER_AGENT_CLI_IMAGE`` names another). Each
CLI talks to :class:`model_endpoints.ScriptedModel` on 127.0.0.1, reached with
host networking, through the base-URL variable its vendor documents:
``ANTHROPIC_BASE_URL`` (claude), ``OPENAI_BASE_URL`` (codex, via the image's
entrypoint), ``GOOGLE_GEMINI_BASE_URL`` (gemini). The scripted model makes the CLI
run ``env | sort`` through its shell tool, so the container's environment comes
back to the endpoint as a tool result, then write the report.

Two layers: the image alone under ``docker run`` as uid 1000:1000 with a
read-only root filesystem; and whole incidents through nightcrier's Dispatcher
and Docker runner, configured as an operator would (``agent_env``,
``agent_user``, ``agent_network``).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import infra
import pytest
import yaml
from conftest import wait_for
from model_endpoints import FINAL_TEXT, REPORT, ROOT_CAUSE, ScriptedModel
from test_store_contract import make_event

import nightcrier as nc

pytestmark = pytest.mark.docker

CLI_IMAGE = os.environ.get("NIGHTCRIER_AGENT_CLI_IMAGE", "nightcrier-agent:ci")
KEYS = {"ANTHROPIC_API_KEY": "sk-ant-scripted-claude-key", "OPENAI_API_KEY": "sk-scripted-openai-key",
        "GEMINI_API_KEY": "scripted-gemini-key"}


@dataclasses.dataclass(frozen=True)
class Cli:
    """How one CLI is configured and how its endpoint sees the key."""

    name: str
    model: str
    key_env: str
    base_url_env: str
    key_header: str
    base_path: str = ""

    def key_seen(self, request: Any) -> str | None:
        value = request.header(self.key_header)
        return value.removeprefix("Bearer ") if value else None


CLIS = [
    Cli("claude", "sonnet", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "x-api-key"),
    Cli("codex", "gpt-5.2", "OPENAI_API_KEY", "OPENAI_BASE_URL", "authorization", "/v1"),
    Cli("gemini", "gemini-2.5-pro", "GEMINI_API_KEY", "GOOGLE_GEMINI_BASE_URL", "x-goog-api-key"),
]
CLI_IDS = [cli.name for cli in CLIS]
# Names that would carry another vendor's credentials into the container.
VENDOR_KEY_NAMES = ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY")


@pytest.fixture(scope="module")
def docker_client() -> Iterator[Any]:
    import docker
    client = infra.docker_client()
    try:
        client.images.get(CLI_IMAGE)
    except docker.errors.ImageNotFound:
        infra.unavailable(f"agent image {CLI_IMAGE!r} is not present; run `bash .ci/build-images.sh`")
    yield client
    client.close()


@pytest.fixture
def model() -> Iterator[ScriptedModel]:
    server = ScriptedModel().start()
    yield server
    server.stop()


def agent_environment(model: ScriptedModel) -> dict[str, str] | None:
    """The environment the agent reported through its shell tool (``env | sort``)."""
    for request in model.agent_requests():
        text = request.text
        marker = "PATH=/"
        if marker in text and "HOME=" in text:
            return _parse_env_dump(text)
    return None


def _parse_env_dump(text: str) -> dict[str, str]:
    # The dump sits JSON-escaped inside the request; the lines of interest are NAME=value.
    env: dict[str, str] = {}
    for line in text.replace("\\n", "\n").splitlines():
        name, sep, value = line.partition("=")
        name = name.rsplit('"', 1)[-1].strip()
        if sep and name.replace("_", "").isalnum() and name.upper() == name:
            env.setdefault(name, value)
    return env


def assert_conversation(model: ScriptedModel, cli: Cli, prompt_marker: str) -> dict[str, str]:
    """The scripted investigation ran to its end, with the prompt, the key and no other key."""
    assert model.steps[-3:] == ["shell", "write", "final"], model.steps
    agent = model.agent_requests()
    assert agent, "the CLI never called the model with its tools"
    assert prompt_marker in agent[0].text, "the prompt did not reach the model"
    keys_seen = {cli.key_seen(r) for r in model.requests}
    assert keys_seen == {KEYS[cli.key_env]}, "the endpoint did not get the key"
    env = agent_environment(model)
    assert env is not None, "the shell tool's output (env) never came back to the model"
    assert env.get(cli.key_env) == KEYS[cli.key_env]
    own = ("GEMINI_API_KEY", "GOOGLE_API_KEY") if cli.name == "gemini" else (cli.key_env,)
    others = [name for name in VENDOR_KEY_NAMES if name not in own and env.get(name)]
    assert not others, f"other vendors' keys reached the {cli.name} container: {others}"
    return env


# -- the image alone ---------------------------------------------------------------------------

@pytest.mark.parametrize("cli", CLIS, ids=CLI_IDS)
def test_image_runs_the_cli_as_uid_1000_on_a_read_only_root(
        cli: Cli, docker_client: Any, model: ScriptedModel, tmp_path: Path) -> None:
    """``docker run`` of the image as an operator would lock it down, the CLI's command from nightcrier."""
    output, logs_dir = tmp_path / "output", tmp_path / "logs"
    for directory in (output, logs_dir):
        directory.mkdir()
        os.chmod(directory, 0o777)
    prompt = tmp_path / "prompt-sent.md"
    prompt.write_text("Investigate incident image-direct-7f3a: pod payments/api-7f8b9c is crash looping.\n")
    os.chmod(prompt, 0o644)
    config = dataclasses.replace(nc.Config(), agent_cli=cli.name, agent_model=cli.model)
    container = docker_client.containers.run(
        CLI_IMAGE, nc.agent_cli_command(config), detach=True, user="1000:1000", network_mode="host",
        read_only=True, tmpfs={"/tmp": "rw,exec,size=256m"}, cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        environment={cli.key_env: KEYS[cli.key_env], cli.base_url_env: model.url + cli.base_path},
        volumes=[f"{prompt}:/home/agent/prompt-sent.md:ro", f"{output}:/home/agent/output:rw",
                 f"{logs_dir}:/home/agent/logs:rw"])
    try:
        status = container.wait(timeout=240)
        logs = container.logs().decode("utf-8", "replace")
    finally:
        container.remove(force=True)
    assert status["StatusCode"] == 0, logs[-3000:]
    # the CLI's machine-readable result, which nightcrier reads the spend and the answer from
    assert nc.read_run_spend(str(tmp_path)).text.strip() == FINAL_TEXT
    assert (output / "investigation.md").read_text() == REPORT
    env = assert_conversation(model, cli, "image-direct-7f3a")
    # /home/agent is not writable on a read-only root: the entrypoint gave the CLI a HOME in /tmp.
    assert env["HOME"].startswith("/tmp/home."), env.get("HOME")


def test_home_is_usable_by_any_uid(docker_client: Any, model: ScriptedModel, tmp_path: Path) -> None:
    """A uid the image does not know keeps /home/agent as HOME and can write its settings there."""
    cli = CLIS[0]
    output, logs_dir = tmp_path / "output", tmp_path / "logs"
    for directory in (output, logs_dir):
        directory.mkdir()
        os.chmod(directory, 0o777)
    prompt = tmp_path / "prompt-sent.md"
    prompt.write_text("Investigate incident any-uid-51c2.\n")
    os.chmod(prompt, 0o644)
    config = dataclasses.replace(nc.Config(), agent_cli=cli.name, agent_model=cli.model)
    command = nc.agent_cli_command(config)
    command[-1] += " && ls -A ~/.claude > ~/output/home-listing"
    container = docker_client.containers.run(
        CLI_IMAGE, command, detach=True, user="4321:4321", network_mode="host",
        environment={cli.key_env: KEYS[cli.key_env], cli.base_url_env: model.url},
        volumes=[f"{prompt}:/home/agent/prompt-sent.md:ro", f"{output}:/home/agent/output:rw",
                 f"{logs_dir}:/home/agent/logs:rw"])
    try:
        status = container.wait(timeout=240)
        logs = container.logs().decode("utf-8", "replace")
    finally:
        container.remove(force=True)
    assert status["StatusCode"] == 0, logs[-3000:]
    env = assert_conversation(model, cli, "any-uid-51c2")
    assert env["HOME"] == "/home/agent"
    assert (output / "home-listing").read_text().strip(), "claude kept no state in its HOME"


# -- whole incidents through nightcrier ---------------------------------------------------------

def cli_config(tmp_path: Path, cli: Cli, model: ScriptedModel, monkeypatch: pytest.MonkeyPatch,
               **settings: Any) -> nc.Config:
    kubeconfig = tmp_path / "kubeconfig.yaml"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
    # All three vendors' keys are configured, as on a machine that runs several CLIs over time;
    # only the selected CLI's may reach its container.
    data = {"workspace_root": str(tmp_path / "ws"), "health_port": 0, "agent_runner": "docker",
            "agent_image": CLI_IMAGE, "agent_cli": cli.name, "agent_model": cli.model,
            "agent_timeout": 240, "dispatch_poll_interval": 0.2, "stale_after_seconds": 30,
            "anthropic_api_key": KEYS["ANTHROPIC_API_KEY"], "openai_api_key": KEYS["OPENAI_API_KEY"],
            "gemini_api_key": KEYS["GEMINI_API_KEY"],
            "agent_user": "1000:1000", "agent_egress": "open", "agent_network": "host",
            "agent_env": {cli.base_url_env: "${NIGHTCRIER_TEST_MODEL_URL}" + cli.base_path},
            "clusters": [{"name": "c1", "mcp": {"endpoint": "http://127.0.0.1:9/mcp"},
                          "triage": {"enabled": True, "kubeconfig": str(kubeconfig)}}], **settings}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    # agent_env references are checked when the file loads and resolved when an agent starts.
    monkeypatch.setenv("NIGHTCRIER_TEST_MODEL_URL", model.url)
    config, _ = nc.load_config(str(path), env={"NIGHTCRIER_TEST_MODEL_URL": model.url})
    return config


@pytest.fixture
def run_incident(tmp_path: Path, docker_client: Any) -> Iterator[Callable[[nc.Config], tuple[nc.StateStore,
                                                                                             nc.Incident]]]:
    dispatchers: list[nc.Dispatcher] = []
    stores: list[nc.StateStore] = []

    def run(config: nc.Config) -> tuple[nc.StateStore, nc.Incident]:
        store = nc.SqliteStore(str(tmp_path / "nc.db"))
        stores.append(store)
        (incident_id,) = store.insert_events([make_event("c1")])
        # An instance name of its own: sweeps by other nightcrier processes on a shared engine
        # remove the containers of their own instance name.
        instance = f"agent-clis-{uuid.uuid4().hex[:8]}"
        dispatcher = nc.Dispatcher(config, store, nc.DockerRunner(config, instance, grace=1),
                                   threading.Event(), nc.Metrics(), instance)
        dispatchers.append(dispatcher)
        dispatcher.start()
        dispatcher.wake.set()
        incident = wait_for(lambda: (i := store.get_incident(incident_id))
                            and i.status in nc.TERMINAL_STATUSES and i,
                            timeout=300, what="the incident to finish")
        return store, incident

    yield run
    for dispatcher in dispatchers:
        dispatcher.stop()
    for store in stores:
        store.close()


@pytest.mark.parametrize("cli", CLIS, ids=CLI_IDS)
def test_real_cli_resolves_an_incident_through_the_docker_runner(
        cli: Cli, tmp_path: Path, model: ScriptedModel, monkeypatch: pytest.MonkeyPatch,
        run_incident: Callable[[nc.Config], tuple[nc.StateStore, nc.Incident]]) -> None:
    config = cli_config(tmp_path, cli, model, monkeypatch)
    store, incident = run_incident(config)
    assert (incident.status, incident.exit_code) == (nc.RESOLVED, 0), incident.failure_reason
    report = store.get_report(incident.incident_id)
    assert report is not None and report.report_markdown == REPORT
    assert report.summary_text is not None and ROOT_CAUSE in report.summary_text
    assert report.summary_text.endswith("(confidence: HIGH)")
    # The prompt holds the incident (its id and the fault's resource), so both reached the model.
    env = assert_conversation(model, cli, incident.incident_id)
    assert "api-7f8b9c" in model.agent_requests()[0].text
    assert env.get("INCIDENT_ID") == incident.incident_id
    # The run's spend, from the CLI's own result: tokens from every CLI, a cost from claude's
    # (computed by the CLI from the usage in the scripted model's message events).
    execution, = store.list_executions(incident.incident_id)
    assert execution.tokens_used is not None and execution.tokens_used > 0
    assert (execution.cost_usd is not None and execution.cost_usd > 0) == (cli.name == "claude")
    stdout_log = Path(incident.workspace_path or "", "logs", "agent-stdout.log").read_text()
    assert FINAL_TEXT in stdout_log and "total_cost_usd" not in stdout_log, "the stdout log reads as text"


# -- behind the network gate ------------------------------------------------------------------

def probes(targets: dict[str, str]) -> str:
    """A shell line, run in the agent's container before the CLI, that leaves each target's curl
    exit code and seconds taken in output/."""
    return "cd /home/agent/output; " + " ".join(
        f"curl -sS -m 10 -o {name}.body -w '%{{time_total}}' {url} > {name}.time 2> {name}.err; "
        f"echo $? > {name}.code;" for name, url in targets.items())


@pytest.mark.parametrize("cli", CLIS, ids=CLI_IDS)
def test_real_cli_resolves_an_incident_behind_the_egress_gate(
        cli: Cli, tmp_path: Path, model: ScriptedModel, monkeypatch: pytest.MonkeyPatch,
        run_incident: Callable[[nc.Config], tuple[nc.StateStore, nc.Incident]]) -> None:
    """agent_egress: allowlist. The model endpoint is allowed through agent_env, one service through
    agent_egress_allow; a canary beside it and a public name get nothing."""
    from test_egress import Recorder
    allowed, canary = Recorder(), Recorder(b"canary\n")
    try:
        config = cli_config(tmp_path, cli, model, monkeypatch, agent_egress="allowlist",
                            agent_network="bridge", agent_egress_allow=[f"127.0.0.1:{allowed.port}"])
        line = probes({"allowed": f"http://127.0.0.1:{allowed.port}/from-{cli.name}",
                       "canary": f"http://127.0.0.1:{canary.port}/", "public": "https://example.com/"})
        config = dataclasses.replace(config, agent_command=[
            "/bin/bash", "-c", f"({line}); {nc.agent_cli_command(config)[-1]}"])
        store, incident = run_incident(config)
        assert (incident.status, incident.exit_code) == (nc.RESOLVED, 0), incident.failure_reason
        report = store.get_report(incident.incident_id)
        assert report is not None and report.report_markdown == REPORT
        env = assert_conversation(model, cli, incident.incident_id)
        assert env.get("HTTPS_PROXY") == "http://127.77.255.254:3128"
        out = Path(incident.workspace_path or "") / "output"
        assert (out / "allowed.code").read_text().strip() == "0", (out / "allowed.err").read_text()
        assert allowed.paths == [f"/from-{cli.name}"]
        for name in ("canary", "public"):
            assert (out / f"{name}.code").read_text().strip() != "0", name
            assert float((out / f"{name}.time").read_text()) < 3, f"{name} did not fail at once"
        assert canary.paths == []
        audit = (Path(incident.workspace_path or "") / "logs" / "egress.log").read_text()
        assert f" allowed 127.0.0.1:{model.port} " in audit, "the model calls did not pass the gate"
        assert f" allowed 127.0.0.1:{allowed.port} " in audit
        assert " refused example.com:443 " in audit
    finally:
        allowed.close()
        canary.close()
