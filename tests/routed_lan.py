"""A small routed LAN in network namespaces for the enforcement tests, and ``iotgw run`` as a real process on it.

Topology (all removed on exit, whatever happened)::

    client ns 0: 10.215.0.2, MAC 02:15:00:00:00:02 --veth--+
                                                           +-- br0 10.215.0.1 [gateway ns]
    client ns 1: 10.215.0.3, MAC 02:15:00:00:00:03 --veth--+   routes, forwards
                                                               up0 10.216.0.1 --veth-- server ns 10.216.0.2 (TCP 8080)

Each client namespace runs one long-lived ``Agent`` process that answers DNS and TCP probes over a pipe, so a
test can poll every 0.1 s without starting an interpreter per probe. The gateway namespace runs dnsmasq on
127.0.0.1:5300 as the upstream (it answers every name with 192.0.2.7) and the daemon under test.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.capture_netns import sh

ROOT = Path(__file__).resolve().parents[1]
GW_IP = "10.215.0.1"
SERVER_IP = "10.216.0.2"
SERVER_PORT = 8080
UPSTREAM_ANSWER = "192.0.2.7"

AGENT = r"""
import json, socket, sys
import dns.exception, dns.message, dns.query, dns.rcode
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "dns":
        try:
            reply = dns.query.udp(dns.message.make_query(req["name"], "A"), req["server"], port=53, timeout=1.0)
            out = {"rcode": dns.rcode.to_text(reply.rcode()),
                   "answers": [rr.to_text() for rrset in reply.answer for rr in rrset]}
        except dns.exception.Timeout:
            out = {"rcode": "TIMEOUT", "answers": []}
    elif req["op"] == "frame":
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
            raw.bind((req["ifname"], 0))
            raw.send(bytes.fromhex(req["hex"]))
        out = {"ok": True}
    else:
        try:
            socket.create_connection((req["host"], req["port"]), timeout=0.5).close()
            out = {"ok": True}
        except OSError as exc:
            out = {"ok": False, "error": str(exc)}
    print(json.dumps(out), flush=True)
"""


class Agent:
    """A process inside one namespace that runs DNS and TCP probes on request (one JSON line each way)."""

    def __init__(self, netns: str) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", AGENT],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _ask(self, **req: object) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"probe agent died (exit {self.proc.poll()})")
        return json.loads(line)

    def resolve(self, name: str, server: str = GW_IP) -> tuple[str, list[str]]:
        """(rcode, A records) from the gateway's DNS server; rcode ``TIMEOUT`` when nothing came back."""
        out = self._ask(op="dns", name=name, server=server)
        return out["rcode"], out["answers"]

    def connects(self, host: str = SERVER_IP, port: int = SERVER_PORT) -> bool:
        """Whether a TCP connection through the gateway to the server opens within half a second (a LAN)."""
        return self._ask(op="tcp", host=host, port=port)["ok"]

    def send_frame(self, frame: bytes, ifname: str = "eth0") -> None:
        """Put an Ethernet frame on the wire as it is (a DHCP request built by ``gateway.demo.build_frame``)."""
        self._ask(op="frame", hex=frame.hex(), ifname=ifname)


@dataclass
class Client:
    netns: str
    ip: str
    mac: str
    agent: Agent | None = None


@dataclass
class Lan:
    gw: str
    server: str
    clients: list[Client] = field(default_factory=list)
    gw_agent: Agent | None = None

    def nft_tables(self) -> str:
        return sh("ip", "netns", "exec", self.gw, "nft", "list", "tables").stdout

    def nft_quarantined(self) -> str:
        """The quarantine set as nft prints it ('' when the table does not exist)."""
        return sh("ip", "netns", "exec", self.gw, "nft", "list", "set", "inet", "iotgw", "quarantined",
                  check=False).stdout


@contextlib.contextmanager
def routed_lan(tag: str, clients: int = 2) -> Iterator[Lan]:
    """Create the namespaces, links, addresses, routes, the TCP server and the probe agents."""
    lan = Lan(gw=f"ie{tag}g", server=f"ie{tag}s")
    names = [lan.gw, lan.server] + [f"ie{tag}c{i}" for i in range(clients)]
    procs: list[subprocess.Popen] = []
    try:
        for ns in names:
            sh("ip", "netns", "add", ns)
        gw = ["ip", "-n", lan.gw]
        sh(*gw, "link", "add", "br0", "type", "bridge")
        sh(*gw, "addr", "add", f"{GW_IP}/24", "dev", "br0")
        sh(*gw, "link", "set", "br0", "up")
        sh(*gw, "link", "set", "lo", "up")
        sh(*gw, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", lan.server)
        sh(*gw, "addr", "add", "10.216.0.1/24", "dev", "up0")
        sh(*gw, "link", "set", "up0", "up")
        sh("ip", "netns", "exec", lan.gw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        srv = ["ip", "-n", lan.server]
        sh(*srv, "addr", "add", f"{SERVER_IP}/24", "dev", "eth0")
        sh(*srv, "link", "set", "eth0", "up")
        sh(*srv, "route", "add", "default", "via", "10.216.0.1")
        for i, ns in enumerate(names[2:]):
            client = Client(ns, f"10.215.0.{i + 2}", f"02:15:00:00:00:{i + 2:02x}")
            port = f"p{i}"
            sh(*gw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh(*gw, "link", "set", port, "master", "br0")
            sh(*gw, "link", "set", port, "up")
            cl = ["ip", "-n", ns]
            sh(*cl, "link", "set", "eth0", "address", client.mac)
            sh(*cl, "addr", "add", f"{client.ip}/24", "dev", "eth0")
            sh(*cl, "link", "set", "eth0", "up")
            sh(*cl, "link", "set", "lo", "up")
            sh(*cl, "route", "add", "default", "via", GW_IP)
            lan.clients.append(client)
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", lan.server, sys.executable, "-m", "http.server", str(SERVER_PORT),
             "--bind", SERVER_IP], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for client in lan.clients:
            client.agent = Agent(client.netns)
        lan.gw_agent = Agent(lan.gw)
        poll(lambda: all(c.agent.connects() for c in lan.clients), 15, "the test server is not reachable")
        yield lan
    finally:
        for agent in [c.agent for c in lan.clients] + [lan.gw_agent]:
            if agent is not None:
                agent.proc.kill()
                agent.proc.wait(5)
        for p in procs:
            p.terminate()
            p.wait(5)
        for ns in names:
            sh("ip", "netns", "del", ns, check=False)  # takes its veths (and the bridge) with it


def poll(check: Callable[[], object], seconds: float, message: str | Callable[[], str]) -> float:
    """Call ``check`` every 0.1 s until it returns something true; how long that took. Fails after ``seconds``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > seconds:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(0.1)
    return time.monotonic() - start


class Daemon:
    """``iotgw run`` in the gateway namespace with its own state directory, and the CLI pointed at it."""

    def __init__(self, lan: Lan, state_dir: Path, *, sniff: bool = False) -> None:
        """``sniff``: also capture passively on the LAN bridge (DHCP and mDNS reach the daemon that way)."""
        self.lan = lan
        self.state_dir = state_dir
        self.config = state_dir / "iotgw.toml"
        self.db_url = f"sqlite:///{state_dir / 'iotgw.sqlite'}"
        state_dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f'[gateway]\nstate_dir = "{state_dir}"\n'
            f'[store]\nflush_interval_s = 0.5\n'
            f'[dns]\nlisten = ["{GW_IP}:53"]\nupstreams = ["127.0.0.1:5300"]\nlan = ["10.215.0.0/24"]\n'
            + ('[capture]\ninterface = "br0"\nsniff = true\n' if sniff else '[capture]\nsniff = false\n')
        )
        self.upstream: subprocess.Popen | None = None
        self.proc: subprocess.Popen | None = None
        self.output = ""

    def start(self) -> None:
        self.upstream = subprocess.Popen(
            ["ip", "netns", "exec", self.lan.gw, "dnsmasq", "--no-daemon", "--port=5300",
             "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
             "--conf-file=/dev/null", "--user=root", f"--pid-file={self.state_dir / 'dnsmasq.pid'}",
             f"--address=/#/{UPSTREAM_ANSWER}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.lan.gw, sys.executable, "-m", "gateway.cli", "run",
             "--config", str(self.config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        # Probed from the gateway's own namespace, so no client becomes a device before its test wants it.
        poll(lambda: self.proc.poll() is not None or self.lan.gw_agent.resolve("ready.example.test")[0] != "TIMEOUT",
             30, "the daemon never answered DNS")
        assert self.proc.poll() is None, self.proc.communicate()[0][-3000:]

    def stop(self) -> str:
        """SIGTERM and wait (once; later calls return the same); the daemon's output."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.output, _ = self.proc.communicate(timeout=30)
        if self.upstream is not None and self.upstream.poll() is None:
            self.upstream.terminate()
            self.upstream.wait(5)
        return self.output

    def policy(self, *args: str) -> str:
        """``iotgw policy ARGS`` as its own process, as a user would run it; its stdout."""
        proc = subprocess.run([sys.executable, "-m", "gateway.cli", "policy", "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout


@contextlib.contextmanager
def running_daemon(lan: Lan, state_dir: Path, *, sniff: bool = False) -> Iterator[Daemon]:
    daemon = Daemon(lan, state_dir, sniff=sniff)
    try:
        daemon.start()
        yield daemon
        out = daemon.stop()
        assert daemon.proc.returncode == 0, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
    finally:
        daemon.stop()


def ns_tag() -> str:
    """A short tag for namespace names, unique per test process (interface names are at most 15 bytes)."""
    return f"{os.getpid() % 100000}"
