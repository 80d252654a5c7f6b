"""Link-local IPv6 clients of the DNS server, on real links: a gateway namespace with a LAN veth and a WAN veth,
the same link-local address at the far end of each. fe80::/10 is in the default LAN, and an address of it means
nothing without its interface: only the LAN link's client may be answered."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from gateway.config import DnsConfig
from gateway.dns import DnsServer
from tests.capture_netns import CLIENT_LL, GW_LL, WAN_PEER_IF, VethPair, lan_and_wan, sh
from tests.dns_helpers import needs_dnsmasq, running

pytestmark = [
    pytest.mark.root,
    needs_dnsmasq,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and veth pairs need root"),
]

# Run in the client's namespace: one A query from (source address, interface) to the gateway's link-local
# address on that interface, over UDP or TCP; prints the answer's RCODE, or CLOSED when a TCP connection is
# closed (or reset) unanswered.
CLIENT = """
import socket, struct, sys
import dns.message, dns.rcode
server, source, ifname, port, transport = sys.argv[1:6]
scope = socket.if_nametoindex(ifname)
query = dns.message.make_query("www.example.test", "A").to_wire()
kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
with socket.socket(socket.AF_INET6, kind) as sock:
    sock.settimeout(5)
    sock.bind((source, 0, 0, scope))
    if transport == "udp":
        sock.sendto(query, (server, int(port), 0, scope))
        reply = sock.recv(4096)
    else:
        sock.connect((server, int(port), 0, scope))
        try:
            sock.sendall(len(query).to_bytes(2, "big") + query)
            head = sock.recv(2)
        except ConnectionResetError:  # closed with the query unread
            head = b""
        if not head:
            print("CLOSED")
            sys.exit()
        reply = b""
        while len(reply) < int.from_bytes(head, "big"):
            reply += sock.recv(4096)
print(dns.rcode.to_text(dns.message.from_wire(reply).rcode()))
"""


@pytest.fixture
def links() -> Iterator[tuple[VethPair, str]]:
    with lan_and_wan(f"ll{os.getpid()}") as made:
        yield made


@contextmanager
def server_in(pair: VethPair, listen: tuple[str, ...] = ("[::]:0",), **kw: object) -> Iterator[DnsServer]:
    """A DnsServer (on [::] unless told) in the gateway's namespace (its loop thread lives there, so its sockets
    do), forwarding to dnsmasq there; the default LAN prefixes, fe80::/10 among them."""
    upstream = subprocess.Popen(
        ["ip", "netns", "exec", pair.gw, "dnsmasq", "--no-daemon", "--port=5300", "--listen-address=127.0.0.1",
         "--bind-interfaces", "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--user=root",
         "--pid-file=", "--address=/example.test/192.0.2.7"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        config = DnsConfig(listen=list(listen), upstreams=["127.0.0.1:5300"])
        with running(config, within=pair.enter, **kw) as run:
            yield run.server
    finally:
        upstream.terminate()
        upstream.wait(5)


def ask(ns: str, ifname: str, port: int, transport: str = "udp") -> str:
    proc = sh("ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, GW_LL, CLIENT_LL, ifname, str(port), transport,
              check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def wait_answered(ns: str, ifname: str, port: int) -> str:
    """The first query's RCODE once dnsmasq (started beside the server) answers: SERVFAIL until it listens."""
    for _ in range(20):
        code = ask(ns, ifname, port)
        if code != "SERVFAIL":
            return code
    return code


def test_a_link_local_client_is_answered_on_the_lan_link_and_refused_on_another(links):
    pair, wan = links
    with server_in(pair, lan_interface=pair.gw_if) as server:
        port = server.bound[0][1]
        assert wait_answered(pair.client, pair.client_if, port) == "NOERROR"
        assert ask(pair.client, pair.client_if, port, "tcp") == "NOERROR"
        refused = server.counters.get("dns_refused")
        # The WAN neighbour, with the very address the LAN client has: an outsider, as a global address would be.
        assert ask(wan, WAN_PEER_IF, port) == "REFUSED"
        assert ask(wan, WAN_PEER_IF, port, "tcp") == "CLOSED"
        assert server.counters.get("dns_refused") == refused + 1
        assert server.counters.get("dns_tcp_refused") == 1
        assert ask(pair.client, pair.client_if, port) == "NOERROR"  # the outsider's verdict is not the LAN client's


def test_with_no_lan_interface_known_no_link_local_client_is_answered(links):
    pair, wan = links
    with server_in(pair) as server:
        port = server.bound[0][1]
        assert ask(pair.client, pair.client_if, port) == "REFUSED"
        assert ask(wan, WAN_PEER_IF, port) == "REFUSED"
        assert ask(pair.client, pair.client_if, port, "tcp") == "CLOSED"
        assert server.counters.get("dns_refused") == 2


def test_a_listen_address_with_a_zone_names_a_lan_link(links):
    """[fe80::1%gw0]:53 says gw0 is served: its link-local clients are answered on every listener, [::] too."""
    pair, wan = links
    with server_in(pair, ("[::]:0", f"[{GW_LL}%{pair.gw_if}]:0")) as server:
        port = server.bound[0][1]
        assert wait_answered(pair.client, pair.client_if, port) == "NOERROR"
        assert ask(wan, WAN_PEER_IF, port) == "REFUSED"
