"""MCP over TLS: ``mcp.ca_bundle`` against a real HTTPS MCP server on 127.0.0.1 with a certificate made
here, a wrong CA, and the rule that ``mcp.api_key`` is only ever sent over https."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mcp_testserver import McpTestServer, make_fault
from test_intake import config_for, incidents, run_service_fixture, servers_fixture  # noqa: F401
from test_reporting import _capture_nightcrier_logs, log_output  # noqa: F401 -- fixture

import nightcrier as nc

TLS_LOG = "cannot reach the cluster's MCP server over TLS, retrying with backoff"


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def make_ca(directory: Path, name: str) -> tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate (PEM at ``directory/name.pem``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def make_server_cert(directory: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
                     ) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by ``ca``: (certificate, key) PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return cert_path, key_path


@pytest.fixture
def tls(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate it signed, and an unrelated CA."""
    directory = tmp_path / "tls"
    directory.mkdir()
    ca_path, ca, ca_key = make_ca(directory, "test-ca")
    wrong_path, _, _ = make_ca(directory, "other-ca")
    cert, key = make_server_cert(directory, ca, ca_key)
    return {"ca": ca_path, "wrong_ca": wrong_path, "cert": cert, "key": key}


def tls_config(tmp_path: Path, server: McpTestServer, ca_bundle: Path, names: tuple[str, ...] = ("secure",),
               **mcp: Any) -> nc.Config:
    config = config_for(tmp_path, {name: server.url for name in names})
    for cluster in config.clusters:
        cluster.mcp.ca_bundle = str(ca_bundle)
        for key, value in mcp.items():
            setattr(cluster.mcp, key, value)
    return config


def test_ca_bundle_trusts_a_server_certificate_made_here(
        tmp_path: Path, tls: dict[str, Path], servers: Callable[..., McpTestServer],
        run_service: Callable[..., nc.Service]) -> None:
    server = servers(require_api_key="tls-api-key", ssl_certfile=str(tls["cert"]),
                     ssl_keyfile=str(tls["key"]))
    assert server.url.startswith("https://127.0.0.1:")
    service = run_service(tls_config(tmp_path, server, tls["ca"], api_key="tls-api-key"))
    server.wait_for_subscriptions(1)
    server.emit(make_fault(cluster="secure"))
    wait_for(lambda: incidents(service.store, "secure"), timeout=10, what="the fault over TLS")
    assert all(r.headers["Authorization"] == "Bearer tls-api-key" for r in server.requests)


def test_a_wrong_ca_is_one_clear_line_per_cluster_and_backoff(
        tmp_path: Path, tls: dict[str, Path], servers: Callable[..., McpTestServer],
        run_service: Callable[..., nc.Service], caplog: pytest.LogCaptureFixture) -> None:
    server = servers(ssl_certfile=str(tls["cert"]), ssl_keyfile=str(tls["key"]))
    service = run_service(tls_config(tmp_path, server, tls["wrong_ca"], names=("secure", "other")))
    for name in ("secure", "other"):
        wait_for(lambda name=name: service.metrics.value("listener_errors", name) >= 4, timeout=15,
                 what="several failed attempts")
    for health in service.health():
        assert health.status == nc.FAILED_STATE and health.reconnects >= 3, "retried, with backoff"
    told = [r for r in caplog.records if r.getMessage() == TLS_LOG]
    clusters = sorted(r.fields["cluster"] for r in told)  # type: ignore[attr-defined]
    assert clusters == ["other", "secure"], "one line per cluster"
    assert all(r.levelno == logging.ERROR for r in told)
    error = told[0].fields["error"]  # type: ignore[attr-defined]
    assert error.startswith("initialize: TLS with 127.0.0.1:")
    assert "certificate verify failed" in error and f"trusted: mcp.ca_bundle {tls['wrong_ca']}" in error
    output = log_output(caplog)
    assert "Traceback" not in output and "cluster connection failed" not in output
    assert server.requests == [], "nothing was sent over an untrusted connection"


@pytest.mark.parametrize(("endpoint", "accepted"), [("https://mcp.example.com:8443/mcp", True),
                                                    ("HTTPS://mcp.example.com/mcp", True),
                                                    ("http://mcp.example.com:8080/mcp", False)])
def test_an_api_key_needs_an_https_endpoint(tmp_path: Path, endpoint: str, accepted: bool) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"clusters:\n- name: prod\n  mcp:\n    endpoint: {endpoint}\n    api_key: k3y-s3cr3t\n")
    if accepted:
        nc.load_config(str(path), env={})
        return
    with pytest.raises(nc.ConfigError) as caught:
        nc.load_config(str(path), env={})
    assert caught.value.problems == [
        "clusters[0] (prod).mcp.api_key: is only sent over https; mcp.endpoint must start with https:// "
        "when api_key is set, got 'http://mcp.example.com:8080/mcp'"]
    assert "k3y-s3cr3t" not in str(caught.value)
