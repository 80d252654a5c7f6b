"""TLS and SuperNode authentication with real Flower processes: an unregistered gateway is refused."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import subprocess
import sys
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


def make_tls(directory: Path, names: tuple[str, ...] = ("localhost", "127.0.0.1")) -> processes.Tls:
    """A throw-away CA and a SuperLink certificate for ``names`` (DNS names and IP addresses)."""
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
    def san_entry(name: str):  # noqa: ANN202
        try:
            return x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            return x509.DNSName(name)

    san = [san_entry(n) for n in names]
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


ROOT = Path(__file__).resolve().parents[1]


def server(cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    """``iotgw federation server`` as an operator types it, from ``cwd``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    return subprocess.run([sys.executable, "-m", "gateway.cli", "federation", "server", *flags], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_server_whose_certificate_does_not_name_its_own_address_says_so_and_starts_nothing(tmp_path: Path) -> None:
    """A certificate for the name gateways use only (the SuperLink behind a proxy on loopback): the server's own
    SuperExec, ServerApp and flwr run reach it at 127.0.0.1 and would refuse it, so no run could start. Before,
    the SuperLink started and the operator read "Connection to the SuperLink is unavailable"."""
    tls = make_tls(tmp_path, names=("fleet.example.org",))
    done = server(tmp_path, "--state-dir", str(tmp_path / "link"), "--port", str(processes.free_port()),
                  "--tls-ca", str(tls.ca), "--tls-cert", str(tls.cert), "--tls-key", str(tls.key))
    assert done.returncode != 0
    assert "not valid for 127.0.0.1 (its subjectAltName: fleet.example.org)" in done.stderr, done.stderr[-2000:]
    assert "IP:127.0.0.1" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "link").exists()  # no SuperLink was started


def test_the_server_runs_night_after_night_from_its_state_dir_with_its_gateways_keys(tmp_path: Path) -> None:
    """The documented command, run twice from the same --state-dir with the same --authorized-key files, all
    paths relative to where the operator is. Before, the first run failed on the relative CA path (Flower's
    connection file wants an absolute one) and the key paths were read from --state-dir; with absolute paths,
    the second run stopped with a traceback: Flower refuses to register a key its database holds."""
    make_tls(tmp_path)  # ca.pem, server.pem and server.key, for 127.0.0.1
    keys = tmp_path / "homes"
    public = processes.generate_node_key(keys / "alice")
    port = str(processes.free_port())
    flags = ["--state-dir", "fleet", "--port", port, "--tls-ca", "ca.pem", "--tls-cert", "server.pem",
             "--tls-key", "server.key", "--authorized-key", str(public.relative_to(tmp_path)),
             "--rounds", "1", "--min-nodes", "2", "--nodes-wait", "1"]  # no home joins: the round fails fast
    outputs = []
    for night in ("first", "second"):
        done = server(tmp_path, *flags)
        outputs.append(done.stdout)
        # (the ServerApp's own traceback for the failed round is streamed too: that one is expected)
        assert "gateway/cli.py" not in done.stdout + done.stderr, (night, done.stdout[-3000:], done.stderr[-3000:])
        report = json.loads(done.stdout[done.stdout.index("{\n"):])
        assert [r["status"] for r in report["rounds"]] == ["failed"], (night, done.stdout[-3000:])
        assert done.returncode == 1
    assert "homes/alice.pub: registered" in outputs[0]
    assert "homes/alice.pub: already registered" in outputs[1]
