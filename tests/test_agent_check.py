"""`nightcrier agent-check`: a canned incident through the configured agent setup, as an operator runs it."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import infra
import pytest
import yaml
from conftest import ROOT

import nightcrier as nc

KEY = "sk-ant-agent-check-key"

# A stand-in for an agent CLI: asks the model endpoint named by ANTHROPIC_BASE_URL (with the key in
# x-api-key, as the real CLI sends it) and writes what it answers as the report.
STUB_AGENT = r'''
import json, os, sys, urllib.error, urllib.request
prompt = open(os.environ["PROMPT_FILE"], encoding="utf-8").read()
request = urllib.request.Request(
    os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages", data=json.dumps({"prompt": prompt}).encode(),
    headers={"x-api-key": os.environ.get("ANTHROPIC_API_KEY", ""), "content-type": "application/json"})
print("stub agent: asking the model", flush=True)
try:
    with urllib.request.urlopen(request, timeout=10) as response:
        text = json.load(response)["text"]
except urllib.error.HTTPError as exc:
    print(f"API error: HTTP {exc.code}: {exc.read().decode()}", file=sys.stderr)
    sys.exit(1)
except OSError as exc:
    print(f"API error: model endpoint unreachable: {exc}", file=sys.stderr)
    sys.exit(1)
with open("output/investigation.md", "w", encoding="utf-8") as fh:
    fh.write(text)
print("stub agent: report written", flush=True)
'''

REPORT_TEXT = ("# Investigation\n\n## Root Cause\nThe pod's container exits at start because a setting is "
               "missing.\n\n**Confidence:** MEDIUM\n")


class ModelEndpoint:
    """A local HTTP server standing in for the model API: 401 unless the key is right."""

    def __init__(self) -> None:
        endpoint = self
        self.prompts: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.headers.get("x-api-key") != KEY:
                    self._answer(401, {"error": {"type": "authentication_error",
                                                 "message": "invalid x-api-key"}})
                    return
                endpoint.prompts.append(body["prompt"])
                self._answer(200, {"text": REPORT_TEXT})

            def _answer(self, status: int, data: dict[str, Any]) -> None:
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def model() -> Iterator[ModelEndpoint]:
    endpoint = ModelEndpoint()
    yield endpoint
    endpoint.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(tmp_path: Path, **settings: Any) -> Path:
    data = {"workspace_root": str(tmp_path / "ws"), "agent_timeout": 60,
            "clusters": [{"name": "prod", "mcp": {"endpoint": "http://127.0.0.1:9/"}}], **settings}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def agent_check(config: Path, *extra: str, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in {key.env for key in nc.SCALAR_KEYS}}
    return subprocess.run([sys.executable, str(ROOT / "nightcrier.py"), "agent-check", "--config",
                           str(config), *extra], capture_output=True, text=True, env={**base, **(env or {})},
                          timeout=120)


def process_setup(tmp_path: Path, model_url: str) -> tuple[Path, dict[str, str]]:
    script = tmp_path / "stub_agent.py"
    script.write_text(STUB_AGENT)
    config = write_config(tmp_path, agent_runner="process", agent_command=[sys.executable, str(script)],
                          agent_env={"ANTHROPIC_BASE_URL": "${MODEL_URL}"})
    return config, {"MODEL_URL": model_url}


def test_passes_with_a_working_setup(tmp_path: Path, model: ModelEndpoint) -> None:
    config, env = process_setup(tmp_path, model.url)
    result = agent_check(config, "--cluster", "prod", env={**env, "ANTHROPIC_API_KEY": KEY})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("agent-check: process runner, cli claude, cluster prod")
    assert lines[1].startswith(f"PASS: report of {len(REPORT_TEXT)} bytes (at least 100) in ")
    assert "  stub agent: report written" in lines
    (prompt,) = model.prompts
    assert "agent-check" in prompt and "CrashLoop" in prompt, "the canned incident reached the model"
    assert KEY not in result.stdout + result.stderr
    assert not [p for p in (tmp_path / "ws").iterdir() if p.name.startswith(".agent-check-")], \
        "the temporary workspace is removed"


def test_fails_with_a_wrong_key(tmp_path: Path, model: ModelEndpoint) -> None:
    config, env = process_setup(tmp_path, model.url)
    result = agent_check(config, env={**env, "ANTHROPIC_API_KEY": "sk-ant-wrong"})
    assert result.returncode == 1
    assert "FAIL: agent exited with non-zero code: 1" in result.stdout
    assert "invalid x-api-key" in result.stdout and "HTTP 401" in result.stdout


def test_fails_with_an_unreachable_model_endpoint(tmp_path: Path) -> None:
    config, env = process_setup(tmp_path, f"http://127.0.0.1:{closed_port()}")
    result = agent_check(config, env={**env, "ANTHROPIC_API_KEY": KEY})
    assert result.returncode == 1
    assert "FAIL: agent exited with non-zero code: 1" in result.stdout
    assert "model endpoint unreachable" in result.stdout and "Connection refused" in result.stdout


def test_fails_for_an_unknown_cluster(tmp_path: Path, model: ModelEndpoint) -> None:
    config, env = process_setup(tmp_path, model.url)
    result = agent_check(config, "--cluster", "nope", env=env)
    assert result.returncode == 2
    assert "no cluster 'nope' in the configuration (clusters: prod)" in result.stderr


@pytest.fixture
def docker_ready() -> None:
    infra.docker_client().close()
    infra.require_test_agent_image()


@pytest.mark.docker
def test_docker_passes_with_the_configured_image(tmp_path: Path, docker_ready: None) -> None:
    agent = ("[ \"$ANTHROPIC_API_KEY\" = \"$EXPECTED\" ] || { echo 'API error: 401' >&2; exit 1; }; "
             "echo checked; printf '# Investigation\\n\\n## Root Cause\\n%s\\n**Confidence:** LOW\\n' "
             "\"$(cat incident.json)\" > output/investigation.md")
    config = write_config(tmp_path, agent_runner="docker", agent_image=infra.TEST_AGENT_IMAGE,
                          agent_command=["sh", "-c", agent], agent_env={"EXPECTED": "${MODEL_KEY}"},
                          agent_egress="none")
    result = agent_check(config, env={"ANTHROPIC_API_KEY": KEY, "MODEL_KEY": KEY})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"docker runner, image {infra.TEST_AGENT_IMAGE}" in result.stdout
    assert "PASS: report of" in result.stdout and "  checked" in result.stdout
    wrong = agent_check(config, env={"ANTHROPIC_API_KEY": "sk-wrong", "MODEL_KEY": KEY})
    assert wrong.returncode == 1 and "FAIL: agent exited with non-zero code: 1" in wrong.stdout
    assert "API error: 401" in wrong.stdout


@pytest.mark.docker
def test_docker_fails_for_an_image_without_the_gate_forwarder(tmp_path: Path, docker_ready: None) -> None:
    """agent_egress allowlist (the default) needs nightcrier-egress in the image; the test image has none."""
    agent = "printf '# Investigation\\n\\n## Root Cause\\n%0200d\\n' 0 > output/investigation.md"
    config = write_config(tmp_path, agent_runner="docker", agent_image=infra.TEST_AGENT_IMAGE,
                          agent_command=["sh", "-c", agent], agent_egress_allow=["grafana.example.com:443"])
    result = agent_check(config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "agent_egress allowlist, allowed: grafana.example.com:443, api.anthropic.com:443" in result.stdout
    assert "FAIL: the image lacks what nightcrier needs: no working nightcrier-egress" in result.stdout


@pytest.mark.docker
def test_docker_fails_for_a_missing_image(tmp_path: Path, docker_ready: None) -> None:
    config = write_config(tmp_path, agent_runner="docker", agent_image="nightcrier-no-such-image:3",
                          agent_command=["sh", "-c", "true"])
    result = agent_check(config)
    assert result.returncode == 1
    assert "FAIL: runner unavailable: agent image nightcrier-no-such-image:3 not found" in result.stdout


@pytest.mark.docker
def test_docker_fails_for_a_network_the_engine_does_not_have(tmp_path: Path, docker_ready: None) -> None:
    """A user-defined agent_network passes check-config by its name; its existence is checked here."""
    network = f"nightcrier-no-such-net-{os.getpid()}"
    config = write_config(tmp_path, agent_runner="docker", agent_image=infra.TEST_AGENT_IMAGE,
                          agent_network=network, agent_command=["sh", "-c", "true"])
    result = agent_check(config)
    assert result.returncode == 1
    assert (f"FAIL: runner unavailable: agent_network '{network}' is not a network of this Docker engine: "
            "create it (docker network create) or set agent_network to bridge, host, none or "
            "container:<name>") in result.stdout
