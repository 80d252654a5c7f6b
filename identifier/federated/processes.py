"""Command lines and environment for Flower's processes (SuperLink, SuperNode, ``flwr run``).

One place for what every Flower process must get (pitfall 5): telemetry and update checks off, ``FLWR_HOME``
under our state directory, no runtime dependency installation, and ``identifier`` importable by the
ServerApp/ClientApp processes Flower spawns. Used by ``iotgw federation``, the tests and the benchmark.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

import identifier
from identifier import atomicfile
from identifier.atomicfile import write_whole
from identifier.federated.supernode import POLL_ENV

APP_DIR = Path(__file__).resolve().parent / "flwr_app"
PACKAGE_ROOT = Path(identifier.__file__).resolve().parents[1]
# Polling, Flower's round-trip tax: a SuperNode waits up to 3 s before it sees a message (each SecAgg+ stage
# is one), its SuperExec up to 1 s before it starts the ClientApp. Shorter polls cost SuperLink requests
# (one per home per poll, only while a gateway is joined); see docs/federation.md, "Round cost".
POLL_S = 1.0
TASK_POLL_S = 0.2


@dataclass(frozen=True)
class Tls:
    """PEM files: the CA that signed the SuperLink's certificate, and the server's certificate and key."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None


def flower_env(state_dir: Path, base: dict[str, str] | None = None, poll_s: float = POLL_S) -> dict[str, str]:
    """The environment for any Flower process run for iotgw, with ``FLWR_HOME`` under ``state_dir``."""
    env = dict(os.environ if base is None else base)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_HOME=str(state_dir / "flwr"),
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(TASK_POLL_S),
        **{POLL_ENV: str(poll_s)},
        PYTHONPATH=os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p),
    )
    return env


# Flower starts processes that leave their parent's session (the SuperLink's SuperExec) and outlive it (a
# ServerApp whose SuperLink died stays idle forever), so neither process groups nor parentage find them all.
# Every process inherits its environment, though: a fleet's processes carry this variable with a token of its
# own, and ``stop_marked`` ends every process that carries it.
MARK_ENV = "IOTGW_FLOWER_FLEET"


def marked(token: str) -> list[psutil.Process]:
    """The live processes whose environment carries ``MARK_ENV=token`` (readable ones: ours, or all as root)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(MARK_ENV) == token:
                found.append(proc)
        except psutil.Error:  # gone, a zombie, or another user's
            pass
    return found


def stop_marked(token: str, grace: float = 5.0) -> None:
    """SIGTERM every process marked with ``token``, SIGKILL those still alive after ``grace`` seconds, and
    repeat until none is left (a process may start a child between one scan and the next)."""
    sig = signal.SIGTERM
    for _ in range(20):
        procs = marked(token)
        if not procs:
            return
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        lingering = _wait_gone(procs, grace)
        for proc in lingering:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        _wait_gone(lingering, grace)
        sig = signal.SIGKILL  # whatever appeared since the first scan is being torn down with the rest
    raise RuntimeError(f"processes marked {MARK_ENV}={token} keep appearing: {[p.pid for p in marked(token)]}")


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until ``procs`` have exited; the ones still running after ``timeout``. A zombie counts as gone:
    an orphan's zombie stays until init reaps it, and some inits (containers, VMs) never do."""
    deadline = time.monotonic() + timeout
    while True:
        running = []
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    running.append(proc)
            except psutil.NoSuchProcess:
                pass
        if not running or time.monotonic() > deadline:
            return running
        procs = running
        time.sleep(0.05)


# flwr 1.41's name for state kept in the SuperLink's memory (``flwr.supercore.constant.FLWR_IN_MEMORY_DB_NAME``)
IN_MEMORY = ":flwr-in-memory:"


def superlink_cmd(host: str, port: int, database: Path | str, tls: Tls | None, node_auth: bool) -> list[str]:
    """``flower-superlink`` serving fleet, control and runtime APIs on ``host:port``, keeping its state in
    ``database`` (an SQLite file, or ``IN_MEMORY``)."""
    cmd = [
        "flower-superlink",
        "--host", host,
        "--port", str(port),
        "--database", str(database),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += [
            "--ssl-ca-certfile",
            str(tls.ca),
            "--ssl-certfile",
            str(tls.cert),
            "--ssl-keyfile",
            str(tls.key),
        ]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def supernode_cmd(
    superlink: str,
    port: int,
    data: Path,
    state_dir: Path,
    root_cert: Path | None,
    auth_key: Path | None,
    max_wait: float | None = None,
    bundle: Path | None = None,
) -> list[str]:
    """``flower-supernode`` (with our idle poll, ``identifier.federated.supernode``) for one home; its
    ClientApp reads ``data``, keeps state in ``state_dir`` and starts from ``bundle`` (None: the shipped one)
    until a federated model is installed."""
    node_config = (
        f"data={json.dumps(str(data))} state-dir={json.dumps(str(state_dir))} "
        f"bundle={json.dumps(str(bundle or ''))}"
    )
    cmd = [
        sys.executable, "-m", "identifier.federated.supernode",
        "--superlink", superlink,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--node-config", node_config,
    ]  # fmt: skip
    cmd += ["--insecure"] if root_cert is None else ["--root-certificates", str(root_cert)]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    if max_wait is not None:
        cmd += ["--max-wait-time", str(max_wait)]
    return cmd


def write_connection(state_dir: Path, name: str, address: str, root_cert: Path | None) -> None:
    """The ``flwr`` CLI's connection to our SuperLink, in ``$FLWR_HOME/config.toml``."""
    home = state_dir / "flwr"
    home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{name}"',
        "",
        f"[superlink.{name}]",
        f"address = {json.dumps(address)}",
    ]
    lines.append(
        "insecure = true" if root_cert is None else f"root-certificates = {json.dumps(str(root_cert))}"
    )
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def write_run_config(path: Path, values: dict[str, object]) -> Path:
    """A TOML file of run-config overrides for ``flwr run --run-config``."""
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = json.dumps(str(value))
        lines.append(f"{json.dumps(key)} = {text}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cmd(connection: str, run_config: Path, app_dir: Path = APP_DIR) -> list[str]:
    """``flwr run``, streaming logs until the run ends."""
    return ["flwr", "run", str(app_dir), connection, "--run-config", str(run_config), "--stream"]


def wait_for_port(host: str, port: int, timeout: float = 30.0) -> None:
    """Block until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f} s") from None
            time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def generate_node_key(private_path: Path, open_new: Callable[[Path], int] | None = None) -> Path:
    """A SuperNode authentication key pair (EC P-384, OpenSSH format, as Flower expects).

    The private key stays on the gateway (mode 0600); the ``.pub`` beside it is what the fleet operator
    registers with ``flwr supernode register``. Each file is written whole and renamed over any old one
    (``atomicfile.write_whole``). ``open_new`` creates the file beside it (exclusive) and returns its descriptor:
    the gateway passes one that gives the file to the state directory's owner. Returns the public key's path.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public_path = private_path.with_name(private_path.name + ".pub")
    public_bytes = (
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    for path, data, mode in ((private_path, private_bytes, 0o600), (public_path, public_bytes, 0o644)):
        write_whole(path, data, opener=open_new or atomicfile.open_new, mode=mode)
    return public_path


def register_cmd(public_key: Path, connection: str) -> list[str]:
    """``flwr supernode register``: allow the SuperNode holding the matching private key to join."""
    return ["flwr", "supernode", "register", str(public_key), connection]
