"""Link-local IPv6 clients of the web UI, on real links: the DNS server's test's namespaces (a gateway with a LAN
veth and a WAN veth, the same link-local address at the far end of each) with waitress serving the app in the
gateway's namespace. fe80::/10 is in the default LAN, and an address of it means nothing without its interface:
only the LAN link's client may reach the login page, and the password-less setup page before it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from gateway import accounts
from gateway.store.db import Store
from tests.capture_netns import CLIENT_LL, GW_LL, WAN_PEER_IF, VethPair, lan_and_wan, sh
from tests.webui_seed import config
from webui.server import serve_in_thread

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and veth pairs need root"),
]

@pytest.fixture
def links() -> Iterator[tuple[VethPair, str]]:
    with lan_and_wan(f"wl{os.getpid()}") as made:
        yield made


# Run in a client namespace: GET /login from (source address, interface) to the gateway's link-local address on
# that interface; prints the status code. The Host header is the gateway's address, as a browser would send it.
CLIENT = """
import socket, sys
server, source, ifname, port = sys.argv[1:5]
scope = socket.if_nametoindex(ifname)
with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
    s.settimeout(5)
    s.bind((source, 0, 0, scope))
    s.connect((server, int(port), 0, scope))
    s.sendall(f"GET /login HTTP/1.0\\r\\nHost: [{server}]:{port}\\r\\n\\r\\n".encode())
    head = b""
    while b"\\r\\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
print(head.split(b" ", 2)[1].decode())
"""


@contextmanager
def web_in(pair: VethPair, tmp_path, lan_interface: str | None = None,  # noqa: ANN001 - a pytest tmp_path
           listen: dict[str, str] | None = None) -> Iterator[int]:
    """The web UI on [::] in the gateway's namespace (its sockets are made there), with ``[capture] interface``
    ``lan_interface`` and ``listen`` ({"web": ..., "dns": ...}) as its listen addresses; yields its port."""
    cfg = config(tmp_path)
    cfg.capture.interface = lan_interface
    for section, address in (listen or {}).items():
        if section == "web":
            cfg.web.listen = address
        else:
            cfg.dns.listen = ["[::]:53", address]
    store = Store(cfg.db_url)
    accounts.set_password(store, "correct horse battery")
    with pair.enter():
        server = serve_in_thread(store, cfg, "::", 0)
    try:
        yield server.port
    finally:
        server.stop()
        store.close()


def get_login(ns: str, ifname: str, port: int) -> str:
    proc = sh("ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, GW_LL, CLIENT_LL, ifname, str(port),
              check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_a_link_local_client_reaches_the_web_ui_on_the_lan_link_only(links, tmp_path):
    pair, wan = links
    with web_in(pair, tmp_path, lan_interface=pair.gw_if) as port:
        assert get_login(pair.client, pair.client_if, port) == "200"
        # The WAN neighbour, with the very address the LAN client has: an outsider, as a global address would be.
        assert get_login(wan, WAN_PEER_IF, port) == "403"


def test_with_no_lan_interface_known_no_link_local_client_reaches_the_web_ui(links, tmp_path):
    pair, wan = links
    with web_in(pair, tmp_path) as port:
        assert get_login(pair.client, pair.client_if, port) == "403"
        assert get_login(wan, WAN_PEER_IF, port) == "403"


@pytest.mark.parametrize("section", ["web", "dns"])
def test_a_zone_in_the_web_or_dns_listen_address_names_a_lan_link(links, tmp_path, section):
    """``[fe80::1%gw0]:8080`` in [web] listen says gw0 is served, as it does in [dns] listen for the DNS server:
    its link-local clients reach the web UI on every listener, [::] too."""
    pair, wan = links
    with web_in(pair, tmp_path, listen={section: f"[{GW_LL}%{pair.gw_if}]:8080"}) as port:
        assert get_login(pair.client, pair.client_if, port) == "200"
        assert get_login(wan, WAN_PEER_IF, port) == "403"
