"""The agent's network gate (agent_egress) and containers that end without nightcrier.

Three layers: the allow-list's parsing and matching (property tests on what
an agent may send); the gate alone on a real Unix socket in front of real local
HTTP servers; and whole runs of the shipped agent image (``nightcrier-agent:ci``,
or ``NIGHTCRIER_AGENT_CLI_IMAGE``) through the Docker runner, where ``curl`` inside
the container reaches an allowed service, not a canary beside it, and no public
name. The orphan tests kill a nightcrier process with SIGKILL while its agent
runs and watch the container end by itself. All traffic stays on loopback and
Unix sockets.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import infra
import pytest
import yaml
from conftest import ROOT, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nightcrier as nc

CLI_IMAGE = os.environ.get("NIGHTCRIER_AGENT_CLI_IMAGE", "nightcrier-agent:ci")
EXAMPLES = int(os.environ.get("NIGHTCRIER_HYPOTHESIS_EXAMPLES", "30"))


class Recorder:
    """A threaded HTTP server on 127.0.0.1 that answers every GET with ``body`` and records paths."""

    def __init__(self, body: bytes = b"allowed-service-says-hello\n") -> None:
        recorder = self
        self.paths: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                recorder.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def allowed_service() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.close()


@pytest.fixture
def canary() -> Iterator[Recorder]:
    server = Recorder(b"canary\n")
    yield server
    server.close()


# -- the allow-list ----------------------------------------------------------------------------

@settings(max_examples=EXAMPLES * 10, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=300), st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
                 st.from_regex(r"\A(\*\.)?[a-z0-9.-]{0,30}:[0-9]{0,6}\Z")))
def test_any_destination_text_parses_or_is_rejected_with_a_reason(text: str) -> None:
    """Whatever an agent sends as a destination: a rule that reads back as itself, or a ValueError."""
    for wildcard in (False, True):
        try:
            rule = nc.parse_destination(text, wildcard=wildcard)
        except ValueError as exc:
            assert str(exc)
            continue
        assert 1 <= rule.port <= 65535
        assert nc.parse_destination(str(rule), wildcard=wildcard) == rule
        assert rule.wildcard <= wildcard


def test_rules_match_exact_names_ports_and_wildcard_subdomains() -> None:
    policy = nc.EgressPolicy(nc.parse_destination(e, wildcard=True)
                             for e in ("API.Example.com.:443", "*.svc.example.org:443", "127.0.0.1:8080"))
    allows = [text for text in ("api.example.com:443", "a.svc.example.org:443", "a.b.svc.example.org:443",
                                "127.0.0.1:8080", "api.example.com:80", "svc.example.org:443",
                                "xsvc.example.org:443", "127.0.0.2:8080", "169.254.169.254:80",
                                "evil.com:443")
              if policy.allows(nc.parse_destination(text))]
    assert allows == ["api.example.com:443", "a.svc.example.org:443", "a.b.svc.example.org:443",
                      "127.0.0.1:8080"]


def test_wildcards_and_malformed_entries_are_rejected_where_they_cannot_mean_anything() -> None:
    for text, why in (("*.example.com:443", "DNS name"), ("*.com:443", "two labels"),
                      ("example.com", "host:port"), ("example.com:0", "1 to 65535"),
                      ("exa mple.com:443", "DNS name"), ("[::1:443", "DNS name")):
        with pytest.raises(ValueError, match=why):
            nc.parse_destination(text, wildcard=text.startswith("*.") and text != "*.example.com:443")


def write_config(tmp_path: Path, **data: Any) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"clusters": [{"name": "c1", "mcp": {"endpoint": "http://127.0.0.1:9/"}}],
                                    **data}))
    return path


def test_config_names_each_bad_entry_and_refuses_an_allowlist_for_a_local_process(tmp_path: Path) -> None:
    path = write_config(tmp_path, agent_egress_allow=["api.example.com:443", "nope", "*.com:443"])
    with pytest.raises(nc.ConfigError) as bad:
        nc.load_config(str(path), env={})
    assert [p.split(":")[0] for p in bad.value.problems] == ["agent_egress_allow[1] (env AGENT_EGRESS_ALLOW)",
                                                             "agent_egress_allow[2] (env AGENT_EGRESS_ALLOW)"]
    path = write_config(tmp_path, agent_runner="process", agent_command=["true"], agent_egress="allowlist")
    with pytest.raises(nc.ConfigError, match="agent_egress .*cannot be confined"):
        nc.load_config(str(path), env={})
    config, _ = nc.load_config(str(write_config(tmp_path, agent_runner="process", agent_command=["true"])),
                               env={})
    assert config.egress_mode == "open"
    config, _ = nc.load_config(str(write_config(tmp_path)), env={})
    assert config.egress_mode == "allowlist"
    _, warnings = nc.load_config(str(write_config(tmp_path, agent_network="host")), env={})
    assert warnings == ["agent_network: 'host' is not used: with agent_egress 'allowlist' the agent "
                        "container has no network of its own"]


def test_model_endpoint_and_kubeconfig_api_server_are_allowed_without_listing(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({"clusters": [
        {"name": "a", "cluster": {"server": "https://k8s.internal.example:6443"}},
        {"name": "b", "cluster": {"server": "https://10.0.0.1"}}]}))
    config = dataclasses.replace(nc.Config(), agent_cli="codex", agent_egress_allow=["*.corp.example:443"])
    job = nc.AgentJob("i", "c1", str(tmp_path), ["true"], {"OPENAI_BASE_URL": "http://127.0.0.1:4000/v1"},
                      10, str(kubeconfig))
    policy = nc.EgressPolicy.for_job(config, job)
    assert [str(r) for r in policy.rules] == ["*.corp.example:443", "127.0.0.1:4000",
                                              "k8s.internal.example:6443", "10.0.0.1:443"]
    job.env = {}
    assert "api.openai.com:443" in [str(r) for r in nc.EgressPolicy.for_job(config, job).rules]
    hosts, listeners = policy.container_plan()
    # A name gets an address of its own; a loopback literal is listened on as it is; a wildcard
    # and a non-loopback literal are left to the CONNECT proxy.
    assert hosts == {"k8s.internal.example": "127.77.0.2"}
    assert [(lst["addr"], lst["port"], lst["dest"]) for lst in listeners] == [
        ("127.0.0.1", 4000, "127.0.0.1:4000"), ("127.77.0.2", 6443, "k8s.internal.example:6443")]


def test_refusals_are_counted_per_cluster_in_metrics(tmp_path: Path) -> None:
    config = dataclasses.replace(nc.Config(), workspace_root=str(tmp_path))
    metrics = nc.Metrics()
    metrics.declare_clusters(["c1", "c2"])
    runner = nc.DockerRunner(config, "metrics-test")
    store = nc.SqliteStore(str(tmp_path / "nc.db"))
    try:
        nc.Dispatcher(config, store, runner, threading.Event(), metrics, "metrics-test")
        assert runner.on_refused is not None
        runner.on_refused("c1")
        runner.on_refused("c1")
    finally:
        store.close()
    import prometheus_client
    exposition = prometheus_client.generate_latest(metrics.registry).decode()
    assert 'nightcrier_egress_refused_total{cluster="c1"} 2.0' in exposition
    assert 'nightcrier_egress_refused_total{cluster="c2"} 0.0' in exposition


# -- the gate alone ----------------------------------------------------------------------------

@pytest.fixture
def gate(tmp_path: Path, allowed_service: Recorder) -> Iterator[tuple[nc.EgressGate, Path, list[int]]]:
    log = tmp_path / "egress.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    refused: list[int] = []
    gate = nc.EgressGate(nc.EgressPolicy([nc.parse_destination(f"127.0.0.1:{allowed_service.port}")]), fd,
                         lambda: refused.append(1))
    gate.start()
    yield gate, log, refused
    gate.close()
    os.close(fd)


def ask_gate(path: str, request: bytes) -> tuple[bytes, socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    sock.sendall(request)
    answer = b""
    while not answer.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        answer += chunk
    return answer, sock


def test_gate_tunnels_an_allowed_destination_and_logs_bytes_and_duration(
        gate: tuple[nc.EgressGate, Path, list[int]], allowed_service: Recorder) -> None:
    g, log, refused = gate
    answer, sock = ask_gate(g.path, f"127.0.0.1:{allowed_service.port}\n".encode())
    assert answer == b"OK\n"
    request = b"GET /through-the-gate HTTP/1.0\r\n\r\n"
    sock.sendall(request)
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    sock.close()
    assert reply.endswith(b"allowed-service-says-hello\n")
    assert allowed_service.paths == ["/through-the-gate"]
    line = wait_for(lambda: log.read_text(), timeout=10, what="the audit line")
    assert f" allowed 127.0.0.1:{allowed_service.port} sent={len(request)} received={len(reply)} " in line
    assert "duration=" in line and not refused


def test_gate_refuses_and_logs_what_is_not_allowed(gate: tuple[nc.EgressGate, Path, list[int]],
                                                    canary: Recorder) -> None:
    g, log, refused = gate
    for request in (f"127.0.0.1:{canary.port}\n".encode(), b"169.254.169.254:80\n", b"evil.example.com:443\n",
                    b"not a destination\n", b"\xff\xfe:1\n", b"x" * 400):
        answer, sock = ask_gate(g.path, request)
        sock.close()
        assert answer.startswith(b"NO "), (request, answer)
    assert canary.paths == []
    lines = wait_for(lambda: (t := log.read_text().splitlines()) and len(t) == 6 and t, timeout=10,
                     what="six refusals logged")
    assert all(" refused " in line for line in lines)
    assert f"refused 127.0.0.1:{canary.port} reason='not allowed'" in lines[0]
    assert "refused 169.254.169.254:80 " in lines[1] and "refused evil.example.com:443 " in lines[2]
    assert len(refused) == 6


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.binary(min_size=1, max_size=420), min_size=1, max_size=4))
def test_hostile_requests_are_each_refused_and_logged_and_spoil_no_neighbour(
        gate: tuple[nc.EgressGate, Path, list[int]], allowed_service: Recorder,
        requests: list[bytes]) -> None:
    """Whatever bytes reach the socket: one refusal each, named in the log, and the next allowed
    connection still passes."""
    g, log, refused = gate

    def refusals() -> int:  # allowed connections are logged when they end, at any moment
        return sum(" refused " in line for line in log.read_text().splitlines())

    before, logged_before = len(refused), refusals()
    for request in requests:
        whole = request if b"\n" in request or len(request) > 300 else request + b"\n"
        answer, sock = ask_gate(g.path, whole)
        sock.close()
        assert answer.startswith(b"NO "), (request, answer)
    wait_for(lambda: refusals() == logged_before + len(requests), timeout=10,
             what="one audit line per refusal")
    assert len(refused) - before == len(requests)
    answer, sock = ask_gate(g.path, f"127.0.0.1:{allowed_service.port}\n".encode())
    sock.close()
    assert answer == b"OK\n"


# -- whole runs in the shipped image -----------------------------------------------------------

@pytest.fixture(scope="module")
def cli_image() -> str:
    import docker
    client = infra.docker_client()
    try:
        client.images.get(CLI_IMAGE)
    except docker.errors.ImageNotFound:
        infra.unavailable(f"agent image {CLI_IMAGE!r} is not present; run `bash .ci/build-images.sh`")
    finally:
        client.close()
    return CLI_IMAGE


def run_agent(tmp_path: Path, image: str, command: list[str], timeout: int = 60, **settings: Any
              ) -> tuple[nc.AgentOutcome, Path, nc.Metrics]:
    """One run of ``command`` through the Docker runner, as a worker runs it."""
    data = {"workspace_root": str(tmp_path / "ws"), "agent_runner": "docker", "agent_image": image,
            "agent_command": command, "agent_timeout": timeout, "health_port": 0,
            "agent_user": "1000:1000", **settings,
            "clusters": [{"name": "c1", "mcp": {"endpoint": "http://127.0.0.1:9/"}}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    config, _ = nc.load_config(str(path), env={})
    incident = nc.canned_incident("c1")
    job = nc.stage_agent_job(config, incident, nc.prepare_workspace(config.workspace_root, incident),
                             "egress-test", None)
    metrics = nc.Metrics()
    runner = nc.DockerRunner(config, f"egress-test-{os.getpid()}", grace=1)
    runner.on_refused = lambda cluster: metrics.inc("egress_refused", cluster)
    return runner.run(job, threading.Event()), Path(job.workspace), metrics


PROBE = r"""
cd /home/agent/output
probe() {  # name, then curl's arguments: exit code and seconds taken
    start=$(date +%s%N)
    curl -sS -m 10 -o "$1.body" "${@:2}" 2>"$1.err"; echo $? > "$1.code"
    echo $(( ($(date +%s%N) - start) / 1000000 )) > "$1.ms"
}
"""


@pytest.mark.docker
def test_agent_reaches_an_allowed_service_and_nothing_else(
        tmp_path: Path, cli_image: str, allowed_service: Recorder, canary: Recorder) -> None:
    script = PROBE + f"""
probe allowed http://127.0.0.1:{allowed_service.port}/from-the-agent
probe proxied --noproxy '' -p -x http://127.77.255.254:3128 http://127.0.0.1:{allowed_service.port}/via-connect
probe canary http://127.0.0.1:{canary.port}/canary
probe public https://example.com/
probe metadata http://169.254.169.254/latest/meta-data/
probe host http://{socket.gethostname()}:{canary.port}/
# Past the forwarder, straight to the gate: the allow-list holds there too.
node -e 'const s=require("net").connect("/run/nightcrier-gate/gate.sock");
s.write("127.0.0.1:{canary.port}\\n"); s.on("data",d=>process.stdout.write(d));' > direct.answer
echo -n x > /home/agent/logs/egress.log 2> audit-write.err; echo $? > audit-write.code
"""
    outcome, ws, metrics = run_agent(tmp_path, cli_image, ["/bin/bash", "-c", script],
                                     agent_egress_allow=[f"127.0.0.1:{allowed_service.port}"])
    out = ws / "output"
    assert outcome.exit_code == 0, (ws / "logs" / "agent-stderr.log").read_text()
    assert (out / "allowed.code").read_text().strip() == "0", (out / "allowed.err").read_text()
    assert (out / "allowed.body").read_text() == "allowed-service-says-hello\n"
    assert (out / "proxied.code").read_text().strip() == "0", (out / "proxied.err").read_text()
    assert allowed_service.paths == ["/from-the-agent", "/via-connect"]
    for name in ("canary", "public", "metadata", "host"):
        assert (out / f"{name}.code").read_text().strip() != "0", name
        assert int((out / f"{name}.ms").read_text()) < 3000, f"{name} did not fail at once"
    assert canary.paths == [], "the canary was reached"
    assert (out / "direct.answer").read_text().startswith("NO ")
    assert (out / "audit-write.code").read_text().strip() != "0", "the agent could write its audit log"
    audit = (ws / "logs" / "egress.log").read_text().splitlines()
    assert any(f" allowed 127.0.0.1:{allowed_service.port} " in line for line in audit), audit
    refused = [line for line in audit if " refused " in line]
    # The public name went to the CONNECT proxy, the direct request to the gate: both seen, both refused.
    assert any("refused example.com:443" in line for line in refused), audit
    assert any(f"refused 127.0.0.1:{canary.port}" in line for line in refused), audit
    assert metrics.value("egress_refused", "c1") == len(refused)


@pytest.mark.docker
def test_an_allowed_name_is_reached_under_its_own_name_and_port(
        tmp_path: Path, cli_image: str, allowed_service: Recorder) -> None:
    """The name maps to a loopback address of its own in the container; the gate resolves it on
    the host. The host's name stands in for a service's: it must resolve to loopback here."""
    import ipaddress
    name = socket.gethostname().lower()
    if not ipaddress.ip_address(socket.gethostbyname(name)).is_loopback:
        pytest.skip(f"{name} does not resolve to a loopback address; test traffic stays on loopback")
    script = (f"getent hosts {name} > /home/agent/output/hosts; "
              f"curl -sS -m 10 http://{name}:{allowed_service.port}/by-name > /home/agent/output/body")
    outcome, ws, _ = run_agent(tmp_path, cli_image, ["/bin/bash", "-c", script],
                               agent_egress_allow=[f"{name}:{allowed_service.port}"])
    assert outcome.exit_code == 0, (ws / "logs" / "agent-stderr.log").read_text()
    assert (ws / "output" / "hosts").read_text().split()[0].startswith("127.77.")
    assert (ws / "output" / "body").read_text() == "allowed-service-says-hello\n"
    assert allowed_service.paths == ["/by-name"]
    assert f" allowed {name}:{allowed_service.port} " in (ws / "logs" / "egress.log").read_text()


@pytest.mark.docker
def test_an_image_without_the_forwarder_runs_with_no_network_at_all(tmp_path: Path) -> None:
    infra.docker_client().close()
    infra.require_test_agent_image()
    outcome, ws, _ = run_agent(tmp_path, infra.TEST_AGENT_IMAGE,
                               ["sh", "-c", "wget -q -T 3 -O - http://127.0.0.1:9/ ; ip -o link | wc -l "
                                "> /home/agent/output/links"], agent_user="")
    assert outcome.exit_code == 0
    assert (ws / "output" / "links").read_text().strip() == "1", "more than loopback in the container"
    assert "has no nightcrier-egress" in (ws / "logs" / "agent-stderr.log").read_text()


# -- no orphans --------------------------------------------------------------------------------

CHILD = """
import sys, threading
sys.path.insert(0, {root!r})
import nightcrier as nc
config, _ = nc.load_config({config!r}, env={{}})
incident = nc.canned_incident("c1")
workspace = nc.prepare_workspace(config.workspace_root, incident)
job = nc.stage_agent_job(config, incident, workspace, "orphan-test", None)
print(incident.incident_id, flush=True)
nc.DockerRunner(config, nc.new_instance_id()).run(job, threading.Event())
"""


def test_gate_directories_of_killed_processes_are_removed_and_others_kept() -> None:
    import tempfile
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = subprocess.Popen(["sleep", "120"])
    made = {label: tempfile.mkdtemp(prefix=f"{nc.EGRESS_DIRECTORY_PREFIX}{pid}-")
            for label, pid in (("gone", gone.pid), ("alive", alive.pid), ("ours", os.getpid()))}
    try:
        removed = nc.remove_stale_gate_directories()
        assert made["gone"] in removed and not os.path.exists(made["gone"])
        assert os.path.isdir(made["alive"]) and os.path.isdir(made["ours"])
    finally:
        alive.kill()
        alive.wait()
        for path in made.values():
            if os.path.isdir(path):
                os.rmdir(path)


@pytest.mark.docker
def test_a_killed_nightcriers_container_ends_by_itself(tmp_path: Path) -> None:
    """kill -9 while the agent runs and no restart: the container is gone by agent_timeout + 15 s."""
    client = infra.docker_client()
    infra.require_test_agent_image()
    timeout = 5
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "workspace_root": str(tmp_path / "ws"), "agent_runner": "docker",
        "agent_image": infra.TEST_AGENT_IMAGE, "agent_command": ["sh", "-c", "trap '' TERM; sleep 600"],
        "agent_timeout": timeout,
        "agent_egress": "none", "clusters": [{"name": "c1", "mcp": {"endpoint": "http://127.0.0.1:9/"}}]}))
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT), config=str(config))],
                             stdout=subprocess.PIPE, text=True)
    name = ""
    try:
        assert child.stdout is not None
        incident_id = child.stdout.readline().strip()
        name = f"nightcrier-agent-{incident_id}"
        wait_for(lambda: client.containers.list(filters={"name": name, "status": "running"}), timeout=60,
                 what="the agent container to run")
        started = time.monotonic()
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        wait_for(lambda: not client.containers.list(all=True, filters={"name": name}), timeout=timeout + 15,
                 what="the orphaned container to end and go")
        assert time.monotonic() - started <= timeout + 15
    finally:
        child.kill()
        child.wait()
        for container in client.containers.list(all=True, filters={"name": name}) if name else ():
            container.remove(force=True)  # left only when the test failed
        client.close()


@pytest.mark.docker
def test_containers_of_a_dead_process_are_removed_at_once_and_a_live_ones_kept() -> None:
    client = infra.docker_client()
    infra.require_test_agent_image()
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = subprocess.Popen(["sleep", "120"])
    runner = nc.DockerRunner(nc.Config(), nc.new_instance_id())
    made = {}
    try:
        # "elsewhere": a process in another pid namespace (another container) with a pid that is
        # free here, which says nothing about that process.
        ours = os.readlink("/proc/self/ns/pid")
        for label, pid, namespace in (("dead", gone.pid, ours), ("live", alive.pid, ours),
                                      ("elsewhere", gone.pid, "pid:[1]")):
            made[label] = client.containers.run(
                infra.TEST_AGENT_IMAGE, ["sleep", "120"], detach=True, network_mode="none",
                labels={runner.LABEL_INCIDENT: f"orphan-{label}-{os.getpid()}",
                        runner.LABEL_INSTANCE: f"{socket.gethostname()}:{pid}:deadbeef",
                        runner.LABEL_HOST: socket.gethostname(), runner.LABEL_PID: str(pid),
                        runner.LABEL_PID_NAMESPACE: namespace})
        # Every incident counts as live in the database: only the process check can remove one.
        removed = runner.remove_orphans(lambda incident_id: True)
        assert f"orphan-dead-{os.getpid()}" in removed
        assert not {f"orphan-live-{os.getpid()}", f"orphan-elsewhere-{os.getpid()}"} & set(removed)
        for label in ("live", "elsewhere"):
            made[label].reload()
            assert made[label].status == "running"
    finally:
        alive.kill()
        alive.wait()
        for container in made.values():
            try:
                container.remove(force=True)
            except Exception:
                pass
        client.close()


@pytest.mark.docker
def test_agent_check_finds_what_an_image_lacks_for_the_gate(cli_image: str) -> None:
    infra.require_test_agent_image()
    shipped = nc.DockerRunner(dataclasses.replace(nc.Config(), agent_image=cli_image,
                                                  agent_user="1000:1000"), "image-check")
    assert shipped.image_problems() == []
    bare = nc.DockerRunner(dataclasses.replace(nc.Config(), agent_image=infra.TEST_AGENT_IMAGE),
                           "image-check")
    (problem,) = bare.image_problems()
    assert problem.startswith("no working nightcrier-egress")
    assert nc.DockerRunner(dataclasses.replace(nc.Config(), agent_image=infra.TEST_AGENT_IMAGE,
                                               agent_egress="none"), "image-check").image_problems() == []
