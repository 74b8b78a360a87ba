"""The deployment kit in deploy/: the systemd unit, the Kubernetes manifests and the kubeconfig minter.

The unit is checked by systemd's own ``systemd-analyze verify`` (any warning fails), the manifests
against the Kubernetes API schemas bundled by ``kubernetes-validate`` (offline, strict: unknown
fields fail), and ``mint-kubeconfig.sh`` is run with the real kubectl reading a real kubeconfig; only
``kubectl create token`` -- which needs an API server -- is answered by a stand-in on PATH.
"""

from __future__ import annotations

import configparser
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import infra
import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "nightcrier.service"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
# The oldest Kubernetes still in upstream support when this kit was written, and the newest the
# validator knows: a manifest must be valid on both.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
READ_VERBS = {"get", "list", "watch"}


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_systemd_unit_verifies_without_a_warning() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        infra.unavailable("systemd-analyze is not installed")
    result = subprocess.run([analyze, "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == "", result.stderr + result.stdout


def test_systemd_unit_runs_the_pyz_sandboxed_and_reloads_with_sighup() -> None:
    service = _unit()["Service"]
    assert service["User"] == "nightcrier" and "docker" in service["SupplementaryGroups"].split()
    assert "nightcrier.pyz" in service["ExecStart"] and "--config" in service["ExecStart"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert service["EnvironmentFile"] == "/etc/nightcrier/secrets.env"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "CapabilityBoundingSet": ""}.items():
        assert service[key] == value, key
    assert service["StateDirectory"].split()[0] == "nightcrier"
    # What the Docker engine mounts into agent containers (the egress gate's sockets, made under
    # TMPDIR) must not be in the private /tmp, which only this service sees.
    environment = dict(item.split("=", 1) for item in service["Environment"].split())
    assert environment["TMPDIR"] == "%S/nightcrier/tmp" and "nightcrier/tmp" in service["StateDirectory"]


def test_example_host_config_writes_only_where_the_unit_allows_and_passes_check_config(
        tmp_path: Path) -> None:
    config = yaml.safe_load((DEPLOY / "config.yaml").read_text())
    assert config["workspace_root"].startswith("/var/lib/nightcrier/")
    assert config["shutdown_timeout"] < int(_unit()["Service"]["TimeoutStopSec"])
    # The kubeconfig it names must exist for check-config; the rest of the file is checked as is.
    kubeconfig = tmp_path / "kube.kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    config["clusters"][0]["triage"]["kubeconfig"] = str(kubeconfig)
    config["workspace_root"] = str(tmp_path / "incidents")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, str(DEPLOY.parent / "nightcrier.py"),
                             "check-config", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, env={"PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(manifest: Path, version: str) -> None:
    documents = _documents(manifest)
    assert documents
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)


def _cluster_role(manifest: str, name: str) -> dict:
    (role,) = [d for d in _documents(DEPLOY / "kubernetes" / manifest)
               if d["kind"] == "ClusterRole" and d["metadata"]["name"] == name]
    return role


@pytest.mark.parametrize(("manifest", "name"), [("triage-identity.yaml", "nightcrier-triage"),
                                                ("mcp-server.yaml", "nightcrier-mcp-server-events")])
def test_cluster_roles_only_read_and_never_secrets_or_exec(manifest: str, name: str) -> None:
    for rule in _cluster_role(manifest, name)["rules"]:
        assert set(rule["verbs"]) <= READ_VERBS, rule
        for resource in rule["resources"]:
            assert "*" not in resource
            assert resource not in {"secrets", "configmaps", "pods/exec", "pods/attach", "pods/portforward",
                                    "nodes/proxy", "services/proxy", "serviceaccounts/token"}, resource


def test_triage_role_covers_what_nightcrier_checks_before_triage() -> None:
    import nightcrier
    rules = _cluster_role("triage-identity.yaml", "nightcrier-triage")["rules"]
    readable = {(group, resource) for rule in rules
                for group in rule["apiGroups"] for resource in rule["resources"] if "get" in rule["verbs"]}
    resources = {resource for _, resource in readable}
    for _, resource in nightcrier.PERMISSION_CHECKS:
        assert resource in resources, resource
    assert ("apps", "deployments") in readable and ("batch", "jobs") in readable


def _stand_in_kubectl(bin_dir: Path, real_kubectl: str, calls: Path) -> None:
    """A kubectl that answers ``create token`` as an API server would and hands the rest to the real one."""
    script = bin_dir / "kubectl"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        'for arg in "$@"; do\n'
        '  if [ "$arg" = create ]; then echo "eyJ.minted-token.sig"; exit 0; fi\n'
        "done\n"
        f'exec {real_kubectl} "$@"\n')
    script.chmod(0o755)


def test_mint_kubeconfig_writes_a_private_kubeconfig_with_a_bounded_token(tmp_path: Path) -> None:
    real_kubectl = shutil.which("kubectl")
    if real_kubectl is None:
        infra.unavailable("kubectl is not installed")
    admin = tmp_path / "admin.kubeconfig"
    admin.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "prod",
        "clusters": [{"name": "prod", "cluster": {"server": "https://127.0.0.1:6443",
                                                   "certificate-authority-data": "Q0EtREFUQQ=="}}],
        "users": [{"name": "admin", "user": {"token": "admin-secret"}}],
        "contexts": [{"name": "prod", "context": {"cluster": "prod", "user": "admin"}}]}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    _stand_in_kubectl(bin_dir, real_kubectl, calls)
    output = tmp_path / "triage.kubeconfig"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "KUBECONFIG": str(admin), "HOME": str(tmp_path)}
    result = subprocess.run(["bash", str(DEPLOY / "mint-kubeconfig.sh"), "--output", str(output),
                             "--duration", "2h"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    assert "create token nightcrier-triage --namespace nightcrier --duration 2h" in calls.read_text()

    def view(path: str) -> str:
        return subprocess.run([real_kubectl, "--kubeconfig", str(output), "config", "view", "--raw", "-o",
                               f"jsonpath={path}"], capture_output=True, text=True, check=True).stdout

    assert view("{.clusters[0].cluster.server}") == "https://127.0.0.1:6443"
    assert view("{.clusters[0].cluster.certificate-authority-data}") == "Q0EtREFUQQ=="
    assert view("{.users[0].user.token}") == "eyJ.minted-token.sig"
    assert "admin-secret" not in output.read_text()
    assert view("{.current-context}") == "triage"
    assert "eyJ.minted-token.sig" not in result.stderr + result.stdout


def test_mint_kubeconfig_refuses_without_an_output(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(DEPLOY / "mint-kubeconfig.sh")], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2 and "--output FILE is required" in result.stderr
