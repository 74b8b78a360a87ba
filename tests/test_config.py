"""Configuration: sources and precedence, validation that names every problem, secret masking."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nightcrier as nc

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).with_name("fixtures")
MINIMAL = {"clusters": [{"name": "prod", "mcp": {"endpoint": "http://127.0.0.1:8080/mcp"}}]}


def write(tmp_path: Path, data: Any) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def problems_of(tmp_path: Path, data: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(nc.ConfigError) as info:
        nc.load_config(write(tmp_path, data), env=env or {})
    return info.value.problems


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "nightcrier.py"), *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=60)


# -- defaults and precedence ---------------------------------------------------------

def test_only_clusters_are_required(tmp_path: Path) -> None:
    config, warnings = nc.load_config(write(tmp_path, MINIMAL), env={})
    assert warnings == []
    assert config.max_concurrent_agents == 5 and config.agent_runner == "docker"
    assert config.state_storage.type == "sqlite"
    assert config.sqlite_path == "./incidents/nightcrier.db"
    assert config.health_port == 8080 and config.health_bind == "127.0.0.1"
    assert config.clusters[0].triage.enabled is False


def test_environment_beats_file_and_flags_beat_environment(tmp_path: Path) -> None:
    data = {**MINIMAL, "agent_timeout": 100, "max_concurrent_agents": 3,
            "state_storage": {"type": "sqlite", "sqlite_path": "/from/file.db"}}
    env = {"AGENT_TIMEOUT": "200", "MAX_CONCURRENT_AGENTS": "4", "STATE_STORAGE_SQLITE_PATH": "/env.db"}
    config, _ = nc.load_config(write(tmp_path, data), env=env, flags={"agent_timeout": "300"})
    assert config.agent_timeout == 300
    assert config.max_concurrent_agents == 4
    assert config.sqlite_path == "/env.db"


def test_cli_flags_override_everything(tmp_path: Path) -> None:
    path = write(tmp_path, {**MINIMAL, "max_concurrent_agents": 3})
    result = run_cli("check-config", "--config", path, "--max-concurrent-agents", "9",
                     "--state-storage-type", "sqlite", env={"MAX_CONCURRENT_AGENTS": "4", "PATH": ""})
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["max_concurrent_agents"] == 9


def test_agent_command_is_a_list_or_a_shell_like_string(tmp_path: Path) -> None:
    config, _ = nc.load_config(write(tmp_path, {**MINIMAL, "agent_runner": "process",
                                                "agent_command": "sh -c 'echo hi > out'"}), env={})
    assert config.agent_command == ["sh", "-c", "echo hi > out"]
    config, _ = nc.load_config(write(tmp_path, {**MINIMAL, "agent_runner": "process",
                                                "agent_command": ["/bin/agent", "--fast"]}), env={})
    assert config.agent_command == ["/bin/agent", "--fast"]


def test_config_file_is_found_on_the_search_path(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "config.yaml").write_text(yaml.safe_dump(MINIMAL))
    result = run_cli("check-config", cwd=tmp_path, env={"PATH": ""})
    assert result.returncode == 0, result.stderr
    assert "file: ./configs/config.yaml" in result.stdout


# -- the Go original's files ---------------------------------------------------------

def test_go_original_config_loads_with_warnings(tmp_path: Path) -> None:
    with pytest.raises(nc.ConfigError) as caught:  # the Go original ignored the key; here it is sent
        nc.load_config(str(FIXTURES / "go-config.yaml"), env={})
    assert caught.value.problems == [
        "clusters[0] (prod-us-east-1).mcp.api_key: is only sent over https; mcp.endpoint must start with "
        "https:// when api_key is set, got 'http://kubernetes-mcp-server.prod-us-east-1:8080/mcp'"]
    without_key = tmp_path / "go-config.yaml"
    without_key.write_text((FIXTURES / "go-config.yaml").read_text().replace(
        'api_key: "go-placeholder-key"', ""))
    config, warnings = nc.load_config(str(without_key), env={})
    assert [c.name for c in config.clusters] == ["prod-us-east-1", "staging_eu"]
    assert config.clusters[0].labels == {"region": "us-east-1", "tier": "critical"}
    assert config.state_storage.type == "sqlite"
    assert config.sqlite_path == "./data/nightcrier.db"
    assert config.global_queue_size == 100 and config.anthropic_api_key == "sk-ant-go-config-secret"
    text = "\n".join(warnings)
    for obsolete in ("agent_script_path", "queue_overflow_policy", "sse_read_timeout",
                     "upload_failed_investigations", "state_storage.migrations_path"):
        assert f"{obsolete}: no longer used" in text
    # the Go keys that choose which faults get an agent mean what they meant there
    assert (config.severity_threshold, config.cluster_queue_size, config.dedup_window_seconds) == \
        ("error", 10, 300)
    assert nc.triage_rules(config) == nc.TriageRules(dedup_window=300, severity_threshold="error",
                                                     cluster_queue_size=10)
    assert "azure_storage" not in text and nc.object_storage_type(config) == "filesystem"
    assert "state_storage.type: 'filesystem' is read as 'sqlite'" in text


def test_unknown_keys_warn_but_load(tmp_path: Path) -> None:
    _, warnings = nc.load_config(write(tmp_path, {**MINIMAL, "xyzzy": True}), env={})
    assert warnings == ["xyzzy: unknown key; ignored"]


# -- validation ------------------------------------------------------------------------

def cluster(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "prod", "mcp": {"endpoint": "http://127.0.0.1:8080/mcp"}}
    base.update(overrides)
    return base


BAD_CONFIGS = [
    ("missing clusters", {}, {}, "clusters: at least one cluster must be configured"),
    ("clusters not a list", {"clusters": "prod"}, {}, "clusters: must be a list"),
    ("cluster without name", {"clusters": [cluster(name=None)]}, {}, "clusters[0].name: is required"),
    ("bad cluster name", {"clusters": [cluster(name="prod/../etc")]}, {},
     "clusters[0].name: 'prod/../etc' is invalid"),
    ("duplicate names", {"clusters": [cluster(), cluster()]}, {},
     "clusters[1].name: duplicate cluster name 'prod'"),
    ("missing endpoint", {"clusters": [cluster(mcp={})]}, {}, "clusters[0] (prod).mcp.endpoint: is required"),
    ("bad endpoint scheme", {"clusters": [cluster(mcp={"endpoint": "ftp://x/mcp"})]}, {},
     "mcp.endpoint: must start with http:// or https://, got 'ftp://x/mcp'"),
    ("endpoint without host", {"clusters": [cluster(mcp={"endpoint": "http:///mcp"})]}, {},
     "mcp.endpoint: has no host"),
    ("endpoint bad port", {"clusters": [cluster(mcp={"endpoint": "http://h:99999/mcp"})]}, {},
     "mcp.endpoint: has an invalid port"),
    ("triage without kubeconfig", {"clusters": [cluster(triage={"enabled": True})]}, {},
     "triage.kubeconfig: is required when triage.enabled is true"),
    ("unreadable kubeconfig", {"clusters": [cluster(triage={"enabled": True,
                                                            "kubeconfig": "/nonexistent/kubeconfig"})]},
     {}, "triage.kubeconfig: '/nonexistent/kubeconfig' is not a readable file"),
    ("kubeconfig is a directory", {"clusters": [cluster(triage={"enabled": True, "kubeconfig": "/tmp"})]},
     {}, "triage.kubeconfig: '/tmp' is not a readable file"),
    ("triage.enabled not bool", {"clusters": [cluster(triage={"enabled": "yes"})]}, {},
     "triage.enabled: must be true or false, got 'yes'"),
    ("bad label", {"clusters": [cluster(labels={"ok": "has space"})]}, {},
     "labels.ok: invalid label value 'has space'"),
    ("bad storage type", {**MINIMAL, "state_storage": {"type": "mysql"}}, {},
     "state_storage.type (env STATE_STORAGE_TYPE): must be one of sqlite, postgres, got 'mysql'"),
    ("bad storage type from env", MINIMAL, {"STATE_STORAGE_TYPE": "oracle"},
     "state_storage.type (env STATE_STORAGE_TYPE): must be one of sqlite, postgres, got 'oracle'"),
    ("negative number", {**MINIMAL, "max_concurrent_agents": -1}, {},
     "max_concurrent_agents (env MAX_CONCURRENT_AGENTS): must be >= 1, got -1"),
    ("zero timeout", {**MINIMAL, "agent_timeout": 0}, {},
     "agent_timeout (env AGENT_TIMEOUT): must be >= 1, got 0"),
    ("not a number", {**MINIMAL, "agent_timeout": "five minutes"}, {},
     "agent_timeout (env AGENT_TIMEOUT): must be a whole number, got 'five minutes'"),
    ("not a number from env", MINIMAL, {"GLOBAL_QUEUE_SIZE": "lots"},
     "global_queue_size (env GLOBAL_QUEUE_SIZE): must be a whole number, got 'lots'"),
    ("unknown runner", {**MINIMAL, "agent_runner": "kubernetes"}, {},
     "agent_runner (env AGENT_RUNNER): must be one of docker, process, got 'kubernetes'"),
    ("process runner without command", {**MINIMAL, "agent_runner": "process"}, {},
     "agent_command (env AGENT_COMMAND): is required when agent_runner is 'process'"),
    ("unknown agent cli", {**MINIMAL, "agent_cli": "cursor"}, {},
     "agent_cli (env AGENT_CLI): must be one of claude, codex, gemini, goose, got 'cursor'"),
    ("events mode", {**MINIMAL, "subscribe_mode": "events"}, {},
     "subscribe_mode (env SUBSCRIBE_MODE): must be one of faults, resource-faults, got 'events'"),
    ("bool from env", MINIMAL, {"NOTIFY_ON_AGENT_FAILURE": "maybe"},
     "notify_on_agent_failure (env NOTIFY_ON_AGENT_FAILURE): must be true or false, got 'maybe'"),
    ("backoff order", {**MINIMAL, "sse_reconnect_initial_backoff": 10, "sse_reconnect_max_backoff": 5},
     {}, "sse_reconnect_max_backoff (env SSE_RECONNECT_MAX_BACKOFF): must be >= "
         "sse_reconnect_initial_backoff (10), got 5"),
    ("postgres without connection", {**MINIMAL, "state_storage": {"type": "postgres"}}, {},
     "state_storage.postgres_connection_string (env STATE_STORAGE_POSTGRES_CONNECTION_STRING): is "
     "required"),
    ("bad postgres sslmode", {**MINIMAL, "state_storage": {
        "type": "postgres", "postgres_connection_string": "postgresql://u:pw@h/db?sslmode=sometimes"}},
     {}, "sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full"),
    ("bad report url", {**MINIMAL, "report_base_url": "/var/www"}, {},
     "report_base_url (env REPORT_BASE_URL): must be an http(s) URL, got '/var/www'"),
    ("missing system prompt", {**MINIMAL, "agent_system_prompt_file": "/nonexistent.md"}, {},
     "agent_system_prompt_file (env AGENT_SYSTEM_PROMPT_FILE): '/nonexistent.md' is not a readable file"),
    ("file is not a mapping", "- just\n- a list\n", {}, "must be a mapping of keys, got list"),
    ("file is not YAML", "clusters: [unclosed\n", {}, "not valid YAML"),
]


@pytest.mark.parametrize("data, env, message", [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_named(tmp_path: Path, data: Any, env: dict[str, str], message: str) -> None:
    problems = problems_of(tmp_path, data, env)
    assert any(message in p for p in problems), problems


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    data = {"clusters": [cluster(name="a b"), cluster(mcp={"endpoint": "nope"})],
            "max_concurrent_agents": 0, "agent_runner": "k8s", "health_port": -1}
    problems = problems_of(tmp_path, data)
    assert len(problems) == 5, problems


def test_missing_explicit_file_is_a_problem(tmp_path: Path) -> None:
    with pytest.raises(nc.ConfigError, match="cannot be read"):
        nc.load_config(str(tmp_path / "absent.yaml"), env={})


def test_broken_config_exits_2_listing_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, {"clusters": [cluster(name="x/y")], "agent_timeout": -5,
                            "state_storage": {"type": "mysql"}})
    for args in (["check-config", "--config", path], ["--config", path]):
        result = run_cli(*args, env={"PATH": ""})
        assert result.returncode == 2
        for fragment in ("clusters[0].name", "agent_timeout (env AGENT_TIMEOUT): must be >= 1, got -5",
                         "state_storage.type (env STATE_STORAGE_TYPE)"):
            assert fragment in result.stderr


def test_example_config_is_valid_and_complete() -> None:
    result = run_cli("check-config", "--config", str(ROOT / "config.example.yaml"), env={"PATH": ""})
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    text = (ROOT / "config.example.yaml").read_text()
    for key in nc.SCALAR_KEYS:
        assert f"{key.name}:" in text and key.env in text, f"{key.path} missing from config.example.yaml"


# -- values whose form only an agent's start used to check --------------------------------

# (id, config file keys, environment, the key the problem must name, what it must say)
BAD_VALUES = [
    ("memory not a size", {"agent_memory": "lots"}, {}, "agent_memory (env AGENT_MEMORY)",
     "must be a size such as 512m or 2g"),
    ("memory below Docker's minimum", {"agent_memory": "1m"}, {}, "agent_memory (env AGENT_MEMORY)",
     "must be at least 6m"),
    ("memory with spaces", {}, {"AGENT_MEMORY": "2 g"}, "agent_memory (env AGENT_MEMORY)", "must be a size"),
    ("tmpfs options smuggled in", {"agent_tmp_size": "512m,suid,exec"}, {},
     "agent_tmp_size (env AGENT_TMP_SIZE)", "must be a tmpfs size such as 512m"),
    ("tmpfs fraction", {"agent_tmp_size": "1.5g"}, {}, "agent_tmp_size (env AGENT_TMP_SIZE)",
     "must be a tmpfs size"),
    ("unknown capability", {"agent_cap_add": ["NOT_A_CAP"]}, {}, "agent_cap_add (env AGENT_CAP_ADD)",
     "'NOT_A_CAP' is not a Linux capability"),
    ("unknown capability from env", {}, {"AGENT_CAP_ADD": "NET_RAW,FOO"},
     "agent_cap_add (env AGENT_CAP_ADD)", "'FOO' is not a Linux capability"),
    ("capabilities split by spaces", {"agent_cap_add": "NET_RAW SYS_PTRACE"}, {},
     "agent_cap_add (env AGENT_CAP_ADD)", "'NET_RAW SYS_PTRACE' is not a Linux capability"),
    ("network not a name", {"agent_network": "bridge mode"}, {}, "agent_network (env AGENT_NETWORK)",
     "must be bridge, host, none, container:<name> or the name of a Docker network"),
    ("container network without a name", {"agent_network": "container:"}, {},
     "agent_network (env AGENT_NETWORK)", "container:<name> needs a container name"),
    ("user with two colons", {"agent_user": "root:x:y"}, {}, "agent_user (env AGENT_USER)",
     "must be user, uid, user:group or uid:gid"),
    ("user with a space", {"agent_user": "1000: 1000"}, {}, "agent_user (env AGENT_USER)",
     "must be user, uid, user:group or uid:gid"),
    ("one-character web token", {"web_token": "x"}, {}, "web_token (env WEB_TOKEN)",
     "must be at least 16 characters"),
    ("short web token from env", {}, {"WEB_TOKEN": "hunter2"}, "web_token (env WEB_TOKEN)",
     "must be at least 16 characters"),
    ("duration with spaces", {"report_link_ttl": " 1h "}, {}, "report_link_ttl (env REPORT_LINK_TTL)",
     'time: invalid duration " 1h "'),
    ("duration without unit", {}, {"REPORT_LINK_TTL": "3600"}, "report_link_ttl (env REPORT_LINK_TTL)",
     'time: missing unit in duration "3600"'),
    ("SAS expiry without an object store", {"azure_sas_expiry": "5x"}, {},
     "azure_sas_expiry (env AZURE_SAS_EXPIRY)", 'time: unknown unit "x" in duration "5x"'),
    ("zero SAS expiry", {"azure_sas_expiry": "0s"}, {}, "azure_sas_expiry (env AZURE_SAS_EXPIRY)",
     "must be positive"),
]


@pytest.mark.parametrize("keys, env, key, message", [c[1:] for c in BAD_VALUES],
                         ids=[c[0] for c in BAD_VALUES])
def test_check_config_rejects_what_an_agent_start_would(tmp_path: Path, keys: dict[str, Any],
                                                       env: dict[str, str], key: str, message: str) -> None:
    path = write(tmp_path, {**MINIMAL, **keys})
    result = run_cli("check-config", "--config", path, env={**env, "PATH": ""})
    assert result.returncode == 2, result.stdout
    named = [line for line in result.stderr.splitlines() if key in line]
    assert named and message in named[0], result.stderr
    assert "hunter2" not in result.stderr


@pytest.mark.parametrize("keys, env, expected", [
    ({"agent_memory": "512M", "agent_tmp_size": "50%", "agent_cap_add": ["net_raw", "CAP_SYS_PTRACE"],
      "agent_egress": "open", "agent_network": "nightcrier-agents_1.0", "agent_user": "agent:1000",
      "web_token": "x" * 16,
      "report_link_ttl": "1h30m", "azure_sas_expiry": "90m"}, {}, {}),
    ({}, {"AGENT_CAP_ADD": "NET_RAW, SYS_PTRACE", "AGENT_MEMORY": "2gb", "AGENT_USER": "1000",
          "AGENT_NETWORK": "container:sidecar", "AGENT_EGRESS": "open"},
     {"agent_cap_add": ["NET_RAW", "SYS_PTRACE"], "agent_memory": "2gb",
      "agent_network": "container:sidecar"}),
    ({"agent_network": "none", "agent_memory": "", "agent_cap_add": []}, {}, {"agent_memory": ""}),
])
def test_values_docker_accepts_load(tmp_path: Path, keys: dict[str, Any], env: dict[str, str],
                                    expected: dict[str, Any]) -> None:
    config, warnings = nc.load_config(write(tmp_path, {**MINIMAL, **keys}), env=env)
    assert warnings == []
    for name, value in expected.items():
        assert getattr(config, name) == value


def test_a_network_a_typo_away_from_a_mode_loads_with_a_warning(tmp_path: Path) -> None:
    """A user-defined network may be called anything Docker allows, bridg included; whether it
    exists is the engine's to say when agents start. A near miss of a mode is worth a word."""
    config, warnings = nc.load_config(write(tmp_path, {**MINIMAL, "agent_network": "bridg",
                                                       "agent_egress": "open"}), env={})
    assert config.agent_network == "bridg"
    assert warnings == ["agent_network: 'bridg' is not one of Docker's modes, so it must be a network "
                        "created with docker network create; agents wait until it exists (did you mean "
                        "`bridge`?)"]


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("0123456789.kmgKMGbB %,-x")), max_size=8))
def test_a_memory_size_that_loads_is_one_docker_reads_the_same(text: str) -> None:
    """The check agrees with docker-py, which turns agent_memory into the engine's byte count."""
    from docker.utils import parse_bytes
    if nc._docker_memory_problem(text) == "":
        assert parse_bytes(text) >= nc.DOCKER_MIN_MEMORY


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("0123456789.hms \t+-µx")), max_size=8))
def test_a_duration_that_loads_is_positive_and_bare(text: str) -> None:
    if nc._duration_problem(text) == "":
        assert nc.parse_go_duration(text) > 0 and text == text.strip()


# -- secrets -----------------------------------------------------------------------------

SECRETS = {
    "ANTHROPIC_API_KEY": "sk-ant-api03-verysecret",
    "OPENAI_API_KEY": "sk-openai-verysecret",
    "GEMINI_API_KEY": "gemini-verysecret",
    "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T01/B02/webhooksecretpath",
    "STATE_STORAGE_POSTGRES_CONNECTION_STRING": "postgresql://nightcrier:dbpassw0rdsecret@db:5432/nc",
}


def test_check_config_masks_every_secret(tmp_path: Path) -> None:
    data = {"clusters": [cluster(mcp={"endpoint": "https://mcp:8443/mcp", "api_key": "mcp-key-secret"})],
            "state_storage": {"type": "postgres"}}
    result = run_cli("check-config", "--config", write(tmp_path, data), env={**SECRETS, "PATH": ""})
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    for secret in ("verysecret", "webhooksecretpath", "dbpassw0rdsecret", "mcp-key-secret"):
        assert secret not in output
    shown = yaml.safe_load(result.stdout)
    assert shown["anthropic_api_key"] == nc.SECRET_MASK
    assert shown["slack_webhook_url"] == f"https://hooks.slack.com/{nc.SECRET_MASK}"
    assert shown["state_storage"]["postgres_connection_string"] == \
        f"postgresql://nightcrier:{nc.SECRET_MASK}@db:5432/nc"
    assert shown["clusters"][0]["mcp"]["api_key"] == nc.SECRET_MASK


def test_secrets_are_masked_in_validation_errors(tmp_path: Path) -> None:
    data = {**MINIMAL, "state_storage": {"type": "postgres", "postgres_connection_string":
                                         "postgresql://u:hunter2secret@h/db?sslmode=bogus"}}
    problems = "\n".join(problems_of(tmp_path, data, {"SLACK_WEBHOOK_URL": "ftp://hooksecret"}))
    assert "hunter2secret" not in problems and "hooksecret" not in problems
    assert "slack_webhook_url (env SLACK_WEBHOOK_URL): must be an http(s) URL" in problems


@pytest.mark.parametrize("dsn, masked", [
    ("postgresql://u:pw@h:5432/db?sslmode=require", f"postgresql://u:{nc.SECRET_MASK}@h:5432/db?sslmode=require"),
    ("postgres://u@h/db", "postgres://u@h/db"),
    ("postgresql://h/db?user=u&password=pw", f"postgresql://h/db?user=u&password={nc.SECRET_MASK}"),
    ("host=h user=u password='p w' dbname=d", f"host=h user=u password={nc.SECRET_MASK} dbname=d"),
])
def test_mask_dsn(dsn: str, masked: str) -> None:
    assert nc.mask_dsn(dsn) == masked


def test_secret_flags_do_not_exist() -> None:
    """Secrets on the command line would be visible to every user through ps."""
    result = run_cli("check-config", "--anthropic-api-key", "x", env={"PATH": ""})
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr


def test_postgres_settings_build_a_connection_string(tmp_path: Path) -> None:
    data = {**MINIMAL, "state_storage": {"type": "postgres", "postgres_host": "db.internal",
                                         "postgres_database": "nc", "postgres_user": "night",
                                         "postgres_password": "it's secret", "postgres_sslmode": "require"}}
    config, _ = nc.load_config(write(tmp_path, data), env={})
    params = nc._parse_dsn(nc.postgres_dsn(config.state_storage))
    assert params == {"host": "db.internal", "port": "5432", "dbname": "nc", "user": "night",
                      "password": "it's secret", "sslmode": "require"}


# -- unknown keys, sources, ports, syntax errors -------------------------------------------

@pytest.mark.parametrize("item, message", [
    (cluster(triag={"enabled": True}), "clusters[0] (prod).triag: unknown key (did you mean `triage`?)"),
    (cluster(mcp={"endpoint": "http://h/mcp", "api_kee": "k"}),
     "clusters[0] (prod).mcp.api_kee: unknown key (did you mean `api_key`?)"),
    (cluster(triage={"kubeconfg": "/k"}),
     "clusters[0] (prod).triage.kubeconfg: unknown key (did you mean `kubeconfig`?)"),
    (cluster(labelz={}), "clusters[0] (prod).labelz: unknown key (did you mean `labels`?)"),
    (cluster(kubeconfig="/k"),
     "clusters[0] (prod).kubeconfig: unknown key (did you mean `triage.kubeconfig`?)"),
    (cluster(endpoint="http://h/mcp"),
     "clusters[0] (prod).endpoint: unknown key (did you mean `mcp.endpoint`?)"),
])
def test_unknown_keys_in_a_cluster_are_errors_with_the_closest_key(tmp_path: Path, item: dict[str, Any],
                                                                    message: str) -> None:
    assert message in problems_of(tmp_path, {"clusters": [item]})


def test_unknown_top_level_keys_name_the_closest_key(tmp_path: Path) -> None:
    data = {**MINIMAL, "agent_timout": 5, "postgres_host": "db"}
    _, warnings = nc.load_config(write(tmp_path, data), env={})
    assert "agent_timout: unknown key; ignored (did you mean `agent_timeout`?)" in warnings
    assert "postgres_host: unknown key; ignored (did you mean `state_storage.postgres_host`?)" in warnings


@pytest.mark.parametrize("section, key, closest", [
    ("state_storage", "tpye", "state_storage.type"),
    ("state_storage", "postgres_connection", "state_storage.postgres_connection_string"),
    ("skills", "cache_directory", "skills.cache_dir"),
])
def test_unknown_keys_in_a_known_section_are_errors(tmp_path: Path, section: str, key: str,
                                                    closest: str) -> None:
    """A typo inside a section changes what runs (state_storage.tpye: postgres keeps SQLite)."""
    problems = problems_of(tmp_path, {**MINIMAL, section: {key: "postgres"}})
    assert problems == [f"{section}.{key}: unknown key (did you mean `{closest}`?)"]


def test_known_keys_come_from_the_config_dataclasses(tmp_path: Path) -> None:
    """Every key a Config field defines loads without a warning, so new keys need no list of names;
    a Go key that is a field again is simply known."""
    data: dict[str, Any] = {**MINIMAL}
    for key in nc.SCALAR_KEYS:
        holder = data
        for part in filter(None, key.owner.split(".")):
            holder = holder.setdefault(part, {})
        holder[key.name] = key.default
    _, warnings = nc.load_config(write(tmp_path, data), env={})
    assert warnings == []


def test_warnings_are_shown_next_to_errors(tmp_path: Path) -> None:
    path = write(tmp_path, {**MINIMAL, "max_concurent_agents": 3, "agent_timeout": 0})
    result = run_cli("check-config", "--config", path, env={"PATH": ""})
    assert result.returncode == 2
    assert ("max_concurent_agents: unknown key; ignored (did you mean `max_concurrent_agents`?)"
            in result.stderr)
    assert "agent_timeout (env AGENT_TIMEOUT): must be >= 1, got 0" in result.stderr


def test_each_problem_names_its_source(tmp_path: Path) -> None:
    path = write(tmp_path, {**MINIMAL, "agent_timeout": "soon"})
    problems = problems_of(tmp_path, {**MINIMAL, "agent_timeout": "soon"})
    assert problems == [f"agent_timeout (env AGENT_TIMEOUT): must be a whole number, got 'soon' "
                        f"[config file {path}]"]
    problems = problems_of(tmp_path, MINIMAL, {"AGENT_TIMEOUT": "later"})
    assert problems == ["agent_timeout (env AGENT_TIMEOUT): must be a whole number, got 'later' "
                        "[environment variable AGENT_TIMEOUT]"]
    result = run_cli("check-config", "--config", write(tmp_path, MINIMAL), "--agent-timeout", "x",
                     env={"PATH": ""})
    assert result.returncode == 2
    assert "agent_timeout (flag --agent-timeout): must be a whole number, got 'x'" in result.stderr
    assert "AGENT_TIMEOUT" not in result.stderr


def test_secret_values_are_masked_whatever_their_source(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, {**MINIMAL, "anthropic_api_key": ["sk-ant-listsecret"]},
                           {"SLACK_WEBHOOK_URL": "http://[::1/hooksecret"})
    text = "\n".join(problems)
    assert "listsecret" not in text and "hooksecret" not in text
    assert f"anthropic_api_key (env ANTHROPIC_API_KEY): must be a string, got {nc.SECRET_MASK}" in text


@pytest.mark.parametrize("data, message", [
    ({**MINIMAL, "health_port": 99999}, "health_port (env HEALTH_PORT): must be <= 65535, got 99999"),
    ({**MINIMAL, "health_port": -1}, "health_port (env HEALTH_PORT): must be >= 0, got -1"),
    ({**MINIMAL, "state_storage": {"postgres_port": 70000}},
     "state_storage.postgres_port (env STATE_STORAGE_POSTGRES_PORT): must be <= 65535, got 70000"),
    ({**MINIMAL, "agent_timeout": 1e400}, "agent_timeout (env AGENT_TIMEOUT): must be a whole number"),
    ({**MINIMAL, "mcp_ping_interval": float("nan")},
     "mcp_ping_interval (env MCP_PING_INTERVAL): must be a finite"),
    ({**MINIMAL, "mcp_ping_interval": "inf"}, "mcp_ping_interval (env MCP_PING_INTERVAL): must be a finite"),
    ({"clusters": [cluster(mcp={"endpoint": "http://[::1/mcp"})]},
     "clusters[0] (prod).mcp.endpoint: is not a valid URL (Invalid IPv6 URL), got 'http://[::1/mcp'"),
    ({"clusters": [cluster(environment={"a": 1})]}, "clusters[0] (prod).environment: must be a string"),
    ({**MINIMAL, "report_base_url": "http://[bad"}, "report_base_url (env REPORT_BASE_URL): must be an"),
    ({**MINIMAL, "state_storage": "postgres"}, "state_storage: must be a mapping of keys, got str"),
    ({**MINIMAL, "skills": ["a"]}, "skills: must be a mapping of keys, got list"),
    ({**MINIMAL, "state_storage": {"type": "postgres", "postgres_connection_string": "postgresql://[::1"}},
     "state_storage.postgres_connection_string"),
])
def test_malformed_values_are_named_problems(tmp_path: Path, data: dict[str, Any], message: str) -> None:
    assert any(message in p for p in problems_of(tmp_path, data)), problems_of(tmp_path, data)


@pytest.mark.parametrize("text, where", [
    ("clusters: [unclosed\n  - x\n", "line 3, column 1"),
    ("a: b\n\tc: d\n", "line 2, column 1"),
    ("workspace_root: 2024-13-45\nclusters: []\n", ""),
])
def test_a_yaml_syntax_error_is_reported_alone(tmp_path: Path, text: str, where: str) -> None:
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1, problems
    assert "not valid YAML" in problems[0] and where in problems[0]


def test_no_config_file_is_one_line_listing_the_paths_looked_at(tmp_path: Path) -> None:
    for args in (["check-config"], [], ["incidents"]):
        result = run_cli(*args, cwd=tmp_path, env={"PATH": ""})
        assert result.returncode == 2
        assert result.stderr == ("nightcrier: no config file found (looked at ./config.yaml, "
                                 "./configs/config.yaml, /etc/nightcrier/config.yaml); pass --config FILE\n")


# -- hostile input: loading never fails other than with ConfigError -----------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30),
                    st.sampled_from(["http://[::1/mcp", "http://h:99999/x", "https://h/mcp", "-1", "1e999",
                                     "nan", "postgresql://[::1", "0x10", " 5 ", "sqlite", "postgres"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=6)
STORAGE_KEYS = [k.name for k in nc.SCALAR_KEYS if k.owner == "state_storage"]
ENV_NAMES = [k.env for k in nc.SCALAR_KEYS]
top_keys = st.sampled_from([k.path.split(".")[0] for k in nc.SCALAR_KEYS] + ["clusters", "bogus"])
cluster_items = st.fixed_dictionaries({}, optional={
    "name": values, "mcp": st.one_of(values, st.fixed_dictionaries({}, optional={
        "endpoint": values, "api_key": values, "ca_bundle": values, "api_kee": values})),
    "triage": st.one_of(values, st.fixed_dictionaries({}, optional={
        "enabled": values, "kubeconfig": values, "allow_secrets_access": values,
        "check_permissions": values})),
    "labels": values, "environment": values, "triag": values})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(top=st.dictionaries(top_keys, values, max_size=6),
       clusters=st.one_of(values, st.lists(cluster_items, max_size=3)),
       storage=st.dictionaries(st.sampled_from(STORAGE_KEYS), values, max_size=4),
       env=st.dictionaries(st.sampled_from(ENV_NAMES), st.text(max_size=20), max_size=4))
def test_any_config_values_load_or_are_named_problems(tmp_path: Path, top: dict[str, Any], clusters: Any,
                                                      storage: dict[str, Any], env: dict[str, str]) -> None:
    data = {**top, "clusters": clusters, "state_storage": storage}
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in env.items() if "\x00" not in v}
    try:
        nc.load_config(str(path), env=env)
    except nc.ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list("ab:-[]{}'\"\t\n #&*!|>%@`,?2024-13.")), max_size=60))
def test_any_file_text_loads_or_is_a_named_problem(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        nc.load_config(str(path), env={})
    except nc.ConfigError as exc:
        assert exc.problems
