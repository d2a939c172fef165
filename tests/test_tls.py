"""Dask TLS end to end: a hand-started ``--protocol tls`` scheduler and workers, and the
LocalCluster that ``serif-dask run`` starts, with certificates this test makes."""

from __future__ import annotations

import datetime
import ipaddress
import json
from pathlib import Path

import pytest

from serif_dask.cluster import tls_security
from tests.conftest import HOSPITAL, run_cli
from tests.test_deploy import hand_started

x509 = pytest.importorskip("cryptography.x509")


def _make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 that is also its own CA, and its key."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "serif-dask test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture
def tls_deployment(tmp_path: Path):
    """The README's recipe with ``--protocol tls`` and certificates on every process."""
    cert, key = _make_certificate(tmp_path)
    tls = ["--tls-ca-file", str(cert), "--tls-cert", str(cert), "--tls-key", str(key)]
    with hand_started(tmp_path, tuple(tls)) as address:
        yield address, tls, tmp_path


def test_run_and_submit_on_a_tls_cluster(tls_deployment) -> None:
    address, tls, tmp_path = tls_deployment
    assert address.startswith("tls://")
    from distributed import Client

    from serif_dask import Serif, load_config

    security = tls_security(tls[1], tls[3], tls[5])
    with Client(address, security=security, timeout=60) as client:
        client.wait_for_workers(5, timeout=90)
        config = load_config([HOSPITAL])
        with Serif(client, config, policy="fastest", seed=1) as serif:  # a TLS client
            summary = serif.run(duration=3)
        assert summary["completed"] > 0.9 * summary["requests"] > 0

    out = tmp_path / "s.json"
    proc = run_cli("run", str(HOSPITAL), "--scheduler-address", address, "--duration", "3",
                   "--policy", "fastest", "--json", str(out), *tls)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["completed"] > 0.9 * summary["requests"] > 0

    # Without certificates the scheduler is out of reach: one line, exit 1.
    proc = run_cli("run", str(HOSPITAL), "--scheduler-address", address, "--duration", "3")
    assert proc.returncode == 1
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "cannot reach scheduler" in lines[0], proc.stderr[-2000:]


def test_local_cluster_with_tls(tmp_path: Path) -> None:
    from distributed import Client

    from serif_dask import Serif, load_config, local_cluster

    cert, key = _make_certificate(tmp_path)
    security = tls_security(str(cert), str(cert), str(key))
    config = load_config([HOSPITAL])
    with local_cluster(config, security=security) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        with Client(cluster, security=security) as client:
            assert all(a.startswith("tls://") for a in client.scheduler_info()["workers"])
            with Serif(client, config, policy="fastest", seed=1) as serif:
                assert serif.run(duration=2)["completed"] > 0

    out = tmp_path / "s.json"  # the same through the command line
    proc = run_cli("run", str(HOSPITAL), "--duration", "2", "--policy", "fastest",
                   "--json", str(out), "--tls-ca-file", str(cert), "--tls-cert", str(cert),
                   "--tls-key", str(key))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["completed"] > 0


def test_tls_needs_its_certificate(tmp_path: Path) -> None:
    cert, _ = _make_certificate(tmp_path)
    proc = run_cli("run", str(HOSPITAL), "--duration", "1", "--tls-ca-file", str(cert))
    assert proc.returncode == 2
    assert "--tls-cert" in proc.stderr
