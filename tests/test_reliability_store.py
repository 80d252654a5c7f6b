"""The store under faults, with ``iotgw run`` as a real process and a real dnsmasq upstream: ``kill -9`` during
sustained DNS load, and a full disk under the state directory (a small tmpfs, root only)."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from gateway.devices.service import get_device, rename
from gateway.policyfile import load_policy, save_policy
from gateway.store.db import Store
from policy.model import Policy, PolicySet, Rule
from tests.dns_helpers import needs_dnsmasq
from tests.ports import free_port

pytestmark = needs_dnsmasq

ROOT = Path(__file__).resolve().parents[1]
FLUSH_S = 1.0  # the query log writer's interval in these tests
# Rows a kill may cost beyond one flush interval's worth: the consumer's 50 ms tick, the batch being committed
# when the kill lands, and scheduling on a shared 2-core machine. One more interval covers all three.
SLACK_S = 1.0
PLUG = "02:aa:bb:cc:dd:01"
NEWCOMER = "127.0.0.99"


def write_config(path: Path, state: Path, port: int, upstream: str, flush_s: float) -> Path:
    path.write_text(f"""
[gateway]
state_dir = "{state}"
[dns]
listen = ["127.0.0.1:{port}"]
upstreams = ["{upstream}"]
lan = ["127.0.0.0/8"]
rate_limit_per_minute = 0
[capture]
sniff = false
[store]
flush_interval_s = {flush_s}
""")
    return path


class Daemon:
    """``iotgw run`` in its own process; its log goes to a file the test reads."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        # As root the daemon would install its nftables table in the host's namespace; without CAP_NET_ADMIN
        # it stays DNS-only (least privilege: this test needs none of it).
        prefix = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"] if os.geteuid() == 0 else []
        with self.log.open("a") as out:
            self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "gateway.cli", "run", "--config",
                                          str(self.config)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 30
        while ask(self.port, "ready.example.test", "127.0.0.1", timeout=0.5) is None:
            assert self.proc.poll() is None, f"the daemon exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"the daemon never answered:\n{self.log.read_text()}"

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no handler runs, nothing is flushed
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


def ask(port: int, name: str, source: str, *, timeout: float = 2.0) -> dns.message.Message | None:
    query = dns.message.make_query(name, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.sendto(query.to_wire(), ("127.0.0.1", port))
        try:
            return dns.message.from_wire(sock.recv(4096))
        except TimeoutError:
            return None


class Load:
    """Clients on distinct loopback addresses, each asking unique names back to back; every answered name is
    kept with the time its answer arrived, so the test can say which queries the log must hold."""

    def __init__(self, port: int, clients: int = 4, tag: str = "load") -> None:
        self.port = port
        self.sources = [f"127.0.0.{20 + i}" for i in range(clients)]
        self.tag = tag
        self.answered: dict[str, float] = {}
        self.unanswered = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((self.sources[i], 0))
            sock.settimeout(1.0)
            n = 0
            while not self._stop.is_set():
                name = f"{self.tag}-{i}-{n}.example.test"
                n += 1
                sock.sendto(dns.message.make_query(name, "A").to_wire(), ("127.0.0.1", self.port))
                try:
                    reply = dns.message.from_wire(sock.recv(4096))
                except (TimeoutError, ConnectionRefusedError):  # the daemon is gone (killed) or slow
                    with self._lock:
                        self.unanswered += 1
                    continue
                with self._lock:
                    self.answered[str(reply.question[0].name).rstrip(".")] = time.time()

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.answered)


def logged_names(querylog: Path, like: str) -> set[str]:
    with sqlite3.connect(querylog) as db:
        return {name for (name,) in db.execute("SELECT qname FROM queries WHERE qname LIKE ?", (like,))}


def integrity(path: Path) -> str:
    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


@pytest.fixture
def gateway_files(tmp_path, upstream):
    """A config, its state directory and the daemon, stopped (gracefully) at the end if still running."""
    state = tmp_path / "state"
    port = free_port()
    config = write_config(tmp_path / "iotgw.toml", state, port, upstream.address, FLUSH_S)
    daemon = Daemon(config, port, tmp_path / "daemon.log")
    yield state, daemon
    daemon.stop()


def test_kill_9_under_load_keeps_the_databases_whole_and_loses_at_most_one_flush(gateway_files):
    state, daemon = gateway_files
    db, querylog = state / "iotgw.sqlite", state / "iotgw-querylog.sqlite"
    daemon.start()
    # What the owner set before the crash: a renamed device and a policy for it.
    mac = "ip:127.0.0.20"
    assert ask(daemon.port, "hello.example.test", "127.0.0.20") is not None
    store = Store(f"sqlite:///{db}", migrate=False)
    deadline = time.monotonic() + 10
    while True:
        try:
            rename(store, mac, "Kitchen plug")
            break
        except LookupError:  # the daemon has not written the device yet
            assert time.monotonic() < deadline
            time.sleep(0.2)
    policy = load_policy(state)
    policy.policies[f"device:{PLUG}"] = Policy(rules=[Rule("block", "name", "ads.example.test")])
    save_policy(state, policy)
    policy_bytes = (state / "policy.json").read_bytes()

    with Load(daemon.port) as load:
        time.sleep(6)  # several flushes: the log is being written while the kill lands
        killed_at = time.time()
        daemon.kill()
        time.sleep(1.5)  # let the clients notice
    answered = {n: t for n, t in load.snapshot().items() if n.startswith("load-")}
    rate = len(answered) / 6
    assert rate > 50, f"the load never got going: {len(answered)} answers"

    assert integrity(db) == "ok"
    assert integrity(querylog) == "ok"
    assert (state / "policy.json").read_bytes() == policy_bytes
    assert load_policy(state).policies[f"device:{PLUG}"].rules[0].value == "ads.example.test"
    detail = get_device(store, mac)
    assert (detail.device.name, detail.device.name_source) == ("Kitchen plug", "user")
    assert {f"ip:{ip}" for ip in load.sources} <= {d for (d,) in sqlite3.connect(db).execute(
        "SELECT mac FROM devices")}

    logged = logged_names(querylog, "load-%")
    assert logged <= set(answered), "the log holds a query nobody got an answer to"
    lost = {n: t for n, t in answered.items() if n not in logged}
    # Only the last interval may be missing: every answer older than that is in the log.
    assert all(t > killed_at - FLUSH_S - SLACK_S for t in lost.values()), (
        f"{len(lost)} lost, oldest {killed_at - min(lost.values()):.2f} s before the kill")
    print(f"rate {rate:.0f}/s answered {len(answered)} logged {len(logged)} lost {len(lost)}")
    assert len(lost) <= rate * (FLUSH_S + SLACK_S)

    # The same state serves again and logs again.
    daemon.start()
    assert dns.rcode.to_text(ask(daemon.port, "after.example.test", "127.0.0.21").rcode()) == "NXDOMAIN"
    deadline = time.monotonic() + 10
    while "after.example.test" not in logged_names(querylog, "after.%"):
        assert time.monotonic() < deadline, "no rows after the restart"
        time.sleep(0.2)
    assert logged <= logged_names(querylog, "load-%")
    store.close()


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "iotgw-test", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write zeros until the filesystem says it is full."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as fh:
        for size in (65536, 4096, 1):  # smaller writes take the last free pages too
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError:
                pass
    return filler


def wait_logged(querylog: Path, names: set[str], like: str, timeout: float = 20) -> set[str]:
    deadline = time.monotonic() + timeout
    while not names <= (logged := logged_names(querylog, like)):
        assert time.monotonic() < deadline, f"{len(names - logged)} of {len(names)} never logged"
        time.sleep(0.3)
    return logged


def wait_device(db: Path, key: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(db) as conn:
            if conn.execute("SELECT 1 FROM devices WHERE mac = ?", (key,)).fetchone():
                return
        assert time.monotonic() < deadline, f"{key} never stored"
        time.sleep(0.3)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_keeps_dns_answering_logs_once_and_resumes_writing(tmp_path, gateway_files):
    state, daemon = gateway_files
    querylog = state / "iotgw-querylog.sqlite"
    with small_tmpfs(state, "16m"):
        daemon.start()
        with Load(daemon.port, tag="before") as load:
            time.sleep(2)
        wait_logged(querylog, set(load.snapshot()), "before-%")

        save_policy(state, PolicySet())
        before = (state / "policy.json").read_bytes()
        filler = fill(state)
        mark = len(daemon.log.read_text())
        with pytest.raises(OSError):  # a policy change on a full disk fails cleanly
            save_policy(state, PolicySet())
        assert (state / "policy.json").read_bytes() == before
        assert not list(state.glob(".policy-*")), "a temporary policy file was left behind"
        with Load(daemon.port, tag="full") as load:
            # A device that first appears while the disk is full: kept, and stored once there is room.
            assert ask(daemon.port, "newcomer.example.test", NEWCOMER) is not None
            time.sleep(6)  # six flush intervals with nowhere to write
        full = load.snapshot()
        assert len(full) > 300, "the load never got going"
        assert load.unanswered <= len(full) // 100, f"{load.unanswered} queries unanswered on a full disk"
        assert not logged_names(querylog, "full-%"), "rows written to a full disk?"

        filler.unlink()
        with Load(daemon.port, tag="after") as load:
            time.sleep(2)
        # The rows kept in memory while the disk was full are written too: nothing lost.
        wait_logged(querylog, set(full), "full-%")
        wait_logged(querylog, set(load.snapshot()), "after-%")
        wait_device(state / "iotgw.sqlite", f"ip:{NEWCOMER}")
        log = daemon.log.read_text()[mark:]
        assert integrity(querylog) == "ok" and integrity(state / "iotgw.sqlite") == "ok"
    # Said once for each database (the query log and the device changes), not at every query or flush.
    errors = [line for line in log.splitlines() if " ERROR " in line or " WARNING " in line]
    assert len(errors) == 2, "\n".join(errors)
    assert "query log: cannot write" in errors[0] + errors[1] and "store: cannot write" in errors[0] + errors[1]
    assert "Traceback" not in log, log
    assert "query log: writing again" in log and "store: writing again" in log
