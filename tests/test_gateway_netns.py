"""``iotgw run`` as a real process in a network namespace; a client behind a veth pair queries it over IPv4
and IPv6 and comes out as one device, keyed by the veth's MAC (found through the kernel neighbour table)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from gateway.devices.service import list_devices
from gateway.store.db import Store
from gateway.store.querylog import recent
from tests.capture_netns import sh, veth_pair
from tests.dns_helpers import needs_dnsmasq

pytestmark = [
    pytest.mark.root,
    needs_dnsmasq,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

QUERY = """
import sys, dns.message, dns.query
server, names = sys.argv[1], sys.argv[2:]
for name in names:
    reply = dns.query.udp(dns.message.make_query(name, "A"), server, port=53, timeout=5)
    print(name, dns.rcode.to_text(reply.rcode()), [rr.to_text() for rrset in reply.answer for rr in rrset])
"""


@pytest.fixture
def veth():
    with veth_pair(f"g{os.getpid()}") as pair:
        yield pair


@contextmanager
def running_daemon(tmp_path, veth, *, sniff: bool = False, lan: tuple[str, ...] = ()) -> Iterator[Store]:
    """``iotgw run`` in the gateway's namespace with a dnsmasq upstream there, answering once it yields its store;
    with ``sniff``, capturing on the gateway's veth too (its LAN interface); ``lan`` adds LAN prefixes."""
    upstream = subprocess.Popen(
        ["ip", "netns", "exec", veth.gw, "dnsmasq", "--no-daemon", "--port=5300", "--listen-address=127.0.0.1",
         "--bind-interfaces", "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--user=root",
         f"--pid-file={tmp_path / 'dnsmasq.pid'}", "--address=/example.test/192.0.2.7"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = f"sqlite:///{tmp_path / 'iotgw.sqlite'}"
    config = tmp_path / "iotgw.toml"  # keeps the policy and other state out of /var/lib/iotgw
    config.write_text(f'[gateway]\nstate_dir = "{tmp_path}"\n')
    daemon = subprocess.Popen(
        ["ip", "netns", "exec", veth.gw, sys.executable, "-m", "gateway.cli", "run", "--db", db,
         *(["--interface", veth.gw_if] if sniff else ["--no-sniff"]),
         "--dns-listen", f"{veth.gw_ip4}:53", "--dns-listen", f"[{veth.gw_ip6}]:53", "--upstream", "127.0.0.1:5300",
         "--lan", "10.213.0.0/24", "--lan", "fd13:213::/64", *(a for p in lan for a in ("--lan", p)),
         "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=os.getcwd())
    try:
        deadline = time.monotonic() + 30
        while True:
            probe = sh("ip", "netns", "exec", veth.client, sys.executable, "-c", QUERY, veth.gw_ip4,
                       "probe.example.test", check=False)
            if "NOERROR" in probe.stdout:
                break
            assert time.monotonic() < deadline, f"daemon never answered: {probe.stderr}"
            time.sleep(0.5)
        yield Store(db, migrate=False)
    finally:
        daemon.terminate()
        out, _ = daemon.communicate(timeout=20)
        upstream.terminate()
        upstream.wait(5)
    assert daemon.returncode == 0, out


def test_ipv4_and_ipv6_of_one_client_are_one_device(tmp_path, veth):
    with running_daemon(tmp_path, veth) as store:
        v4 = veth.client_python(QUERY, veth.gw_ip4, "v4.example.test")
        v6 = veth.client_python(QUERY, veth.gw_ip6, "v6.example.test")
        assert "192.0.2.7" in v4 and "192.0.2.7" in v6
        time.sleep(1.5)  # the neighbour table is re-read after a miss; later queries carry the MAC
        mac = veth.client_mac
        deadline = time.monotonic() + 20
        while True:
            veth.client_python(QUERY, veth.gw_ip4, "v4-again.example.test")
            veth.client_python(QUERY, veth.gw_ip6, "v6-again.example.test")
            time.sleep(1.0)
            keys = {d.mac for d in list_devices(store)}
            names = {q.qname for q in recent(store, mac=mac)}
            if keys == {mac} and {"v4-again.example.test", "v6-again.example.test"} <= names:
                break
            assert time.monotonic() < deadline, f"devices {keys}, queries of {mac}: {names}"
            time.sleep(0.5)
        clients = {q.client for q in recent(store, mac=mac)}
        assert {veth.client_ip4, veth.client_ip6} <= clients


def test_a_client_met_before_the_kernel_knew_its_mac_is_announced_once_under_its_mac(tmp_path, veth):
    """The first query from an address the kernel has no neighbour entry for yet (a new device, a new lease, a
    new IPv6 privacy address) is keyed by that address. Each such address was announced as a new device of its
    own, then merged into the MAC: one phone, three new-device alerts. A client that went quiet stayed a
    stranger until its next query."""
    from gateway.alerts import recent_alerts

    with running_daemon(tmp_path, veth) as store:
        assert "192.0.2.7" in veth.client_python(QUERY, veth.gw_ip6, "v6.example.test")
        mac = veth.client_mac
        deadline = time.monotonic() + 20
        while {d.mac for d in list_devices(store)} != {mac}:  # merged though it asks nothing more
            assert time.monotonic() < deadline, {d.mac for d in list_devices(store)}
            time.sleep(0.3)
        alerts = [(a.kind, a.mac) for a in recent_alerts(store, kind="new_device")]
        assert alerts == [("new_device", mac)]


LINK_LOCAL_QUERY = """
import socket, sys
import dns.message, dns.rcode
server, source, ifname = sys.argv[1:4]
with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
    sock.settimeout(5)
    sock.bind((source, 0, 0, socket.if_nametoindex(ifname)))
    sock.sendto(dns.message.make_query("ll.example.test", "A").to_wire(), (server, 53))
    print(dns.rcode.to_text(dns.message.from_wire(sock.recv(4096)).rcode()))
"""


@pytest.mark.parametrize(("sniff", "expected"), [(True, "NOERROR"), (False, "REFUSED")])
def test_a_link_local_client_is_answered_only_once_the_lan_interface_is_known(tmp_path, veth, sniff, expected):
    """``iotgw run --interface gw0`` hands the DNS server its LAN interface, and a link-local client there is
    answered; with none known (``--no-sniff`` and no ``--interface``) it is refused, as one on the WAN link would
    be (tests/test_dns_link_local.py has both links). Before, fe80::/10 was answered on any interface."""
    sh("ip", "-n", veth.client, "addr", "add", "fe80::2/64", "dev", veth.client_if, "nodad")
    with running_daemon(tmp_path, veth, sniff=sniff, lan=("fe80::/10",)):
        assert veth.client_python(LINK_LOCAL_QUERY, veth.gw_ip6, "fe80::2", veth.client_if).strip() == expected


DHCP_REPLY = """
import sys
from scapy.all import BOOTP, DHCP, IP, UDP, Ether, sendp
iface, mac, ip = sys.argv[1:4]
sendp(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src=ip, dst="255.255.255.255") / UDP(sport=67, dport=68)
      / BOOTP(op=2, chaddr=bytes.fromhex("020000000002"), yiaddr="10.213.0.50")
      / DHCP(options=[("message-type", "offer"), ("server_id", ip), "end"]), iface=iface, verbose=False)
"""


def test_the_gateways_own_router_is_not_quarantined_as_new_but_a_lan_host_sending_dhcp_replies_is(tmp_path, veth):
    """The router sends DHCP replies, so it became a device, new and unapproved: under quarantine its MAC went into
    the nftables set. Now the default route's next hop (its MAC from the kernel's neighbour table) is the gateway's
    router: shown as such, not quarantined as new. A LAN host sending DHCP replies of its own gains nothing."""
    from gateway.devices.service import list_devices, routers
    from gateway.policies import set_quarantine
    from webui import views

    sh("ip", "-n", veth.gw, "route", "add", "default", "via", veth.client_ip4)  # the client namespace routes
    set_quarantine(tmp_path, True)
    router, rogue = veth.client_mac, "02:00:00:00:0e:66"
    with running_daemon(tmp_path, veth, sniff=True) as store:
        for mac, ip in ((router, veth.client_ip4), (rogue, "10.213.0.66")):
            veth.client_python(DHCP_REPLY, veth.client_if, mac, ip)
        deadline = time.monotonic() + 20
        while not ({router, rogue} <= {d.mac for d in list_devices(store)} and routers(store) == {router}):
            assert time.monotonic() < deadline, ({d.mac for d in list_devices(store)}, routers(store))
            time.sleep(0.2)
        shown = {d.mac: views.device(d, routers=routers(store))["router"] for d in list_devices(store)}
        assert shown[router] and not shown[rogue]

        def quarantined() -> set[str]:
            out = sh("ip", "netns", "exec", veth.gw, "nft", "-j", "list", "set", "inet", "iotgw", "quarantined").stdout
            (entry,) = [item["set"] for item in json.loads(out)["nftables"] if "set" in item]
            return {str(e) for e in entry.get("elem", ())}
        while quarantined() != {rogue}:  # the router's own traffic (and what it forwards) is not dropped
            assert time.monotonic() < deadline, quarantined()
            time.sleep(0.2)
        # its DNS is answered under the default policy, not quarantine's (which answers 0.0.0.0)
        assert "192.0.2.7" in veth.client_python(QUERY, veth.gw_ip4, "router.example.test")


ROUTER_ADVERTISEMENT = """
import sys
from scapy.all import Ether, ICMPv6ND_RA, ICMPv6NDOptSrcLLAddr, IPv6, sendp
iface, mac = sys.argv[1:3]
sendp(Ether(src=mac, dst="33:33:00:00:00:01") / IPv6(src="fe80::e66", dst="ff02::1", hlim=255)
      / ICMPv6ND_RA(routerlifetime=1800) / ICMPv6NDOptSrcLLAddr(lladdr=mac), iface=iface, verbose=False)
"""


def test_a_lan_host_sending_router_advertisements_is_not_the_gateways_router(tmp_path, veth):
    """The kernel makes the sender of any IPv6 router advertisement a default route's next hop (proto ra) and
    enters its MAC in the neighbour table: any LAN host, a quarantined one too, could so become the gateway's
    router and be exempt from quarantine. Routes learned from advertisements are no proof and are not read."""
    from gateway.devices.service import routers

    sh("ip", "-n", veth.gw, "route", "add", "default", "via", veth.client_ip4)
    rogue = "02:00:00:00:0e:66"
    veth.client_python(ROUTER_ADVERTISEMENT, veth.client_if, rogue)
    deadline = time.monotonic() + 10
    while "proto ra" not in sh("ip", "-n", veth.gw, "-6", "route", "show", "default").stdout:
        assert time.monotonic() < deadline, "the kernel took no route from the advertisement"
        time.sleep(0.1)
    assert rogue in sh("ip", "-n", veth.gw, "neigh").stdout
    with running_daemon(tmp_path, veth) as store:
        deadline = time.monotonic() + 20
        while not routers(store):  # the first look, made before the daemon answers, found the IPv4 router
            assert time.monotonic() < deadline, "no router found"
            time.sleep(0.2)
        assert routers(store) == {veth.client_mac}
