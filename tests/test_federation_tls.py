"""TLS and SuperNode authentication with real Flower processes: an unregistered gateway is refused."""

from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from identifier.dataset import LabelledWindow
from identifier.federated import processes
from identifier.federated.localfleet import LocalFleet
from identifier.observation import DnsObservation

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="flwr is not installed"),
]


def make_tls(directory: Path) -> processes.Tls:
    """A throw-away CA and a SuperLink certificate for 127.0.0.1 and localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key, issuer: str, signer, ca: bool, san: list | None = None):  # noqa: ANN001, ANN202
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("iotgw test CA", ca_key, "iotgw test CA", ca_key, True)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    srv = cert("superlink", srv_key, "iotgw test CA", ca_key, False, san)
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(srv.public_bytes(pem))
    (directory / "server.key").write_bytes(
        srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return processes.Tls(directory / "ca.pem", directory / "server.pem", directory / "server.key")


def test_tls_and_node_auth_refuse_an_unregistered_gateway(tmp_path: Path) -> None:
    fleet = LocalFleet(tmp_path, tls=make_tls(tmp_path), node_auth=True)
    try:
        fleet.start_superlink()
        registered_key, stranger_key = tmp_path / "keys" / "home_a", tmp_path / "keys" / "home_b"
        subprocess.run(
            processes.register_cmd(processes.generate_node_key(registered_key), "iotgw"),
            env=fleet.env,
            cwd=tmp_path,
            check=True,
            capture_output=True,
        )
        processes.generate_node_key(stranger_key)
        data = [LabelledWindow([DnsObservation(1.0, "a.example")], "02:00:00:00:00:01", 1.0, "A", None, None,
                               "a", "owner", True)]
        home_a = fleet.add_home(data, auth_key=registered_key)
        home_b = fleet.add_home(data, auth_key=stranger_key)
        assert home_b.proc is not None and home_b.proc.wait(timeout=120) != 0
        assert home_a.proc is not None and home_a.proc.poll() is None
        listed = subprocess.run(
            ["flwr", "supernode", "list", "iotgw", "--format", "json"],
            env=fleet.env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        nodes = json.loads(listed.stdout)["nodes"]
        assert len(nodes) == 1 and nodes[0]["status"] in ("online", "registered")
        time.sleep(1)
        assert home_a.proc.poll() is None
    finally:
        fleet.stop()
