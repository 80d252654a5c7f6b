"""``iotgw demo``: the whole gateway on loopback, no root, no LAN, no config.

An embedded upstream answers every name (there is no Internet to forward to), and virtual devices join one
after another: each sends a real DHCP request and mDNS announcement through the frame parser (the path
capture and replay use) and real DNS queries over UDP from its own loopback address (127.0.0.N) to the
gateway's DNS server, so the tracker maps that address to the device's MAC exactly as on a LAN.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import socket
import threading
import time
from dataclasses import dataclass

import dnslib

from gateway.capture.frames import parse_frame
from gateway.daemon import Gateway
from identifier.observation import DhcpObservation, DnsObservation, MdnsObservation, Observation

log = logging.getLogger(__name__)


class EmbeddedUpstream(asyncio.DatagramProtocol):
    """Answers A/AAAA for any name with a stable documentation address; the demo's stand-in for the Internet."""

    def connection_made(self, transport) -> None:  # noqa: ANN001
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # noqa: ANN001
        try:
            query = dnslib.DNSRecord.parse(data)
        except Exception:
            return
        reply = query.reply()
        q = query.q
        digest = hashlib.blake2b(str(q.qname).encode(), digest_size=2).digest()
        if q.qtype == dnslib.QTYPE.A:
            reply.add_answer(dnslib.RR(q.qname, q.qtype, ttl=300, rdata=dnslib.A(f"198.51.100.{digest[0]}")))
        elif q.qtype == dnslib.QTYPE.AAAA:
            reply.add_answer(dnslib.RR(q.qname, q.qtype, ttl=300, rdata=dnslib.AAAA(f"2001:db8::{digest.hex()}")))
        self.transport.sendto(reply.pack(), addr)


async def start_upstream(host: str = "127.0.0.1") -> tuple[asyncio.DatagramTransport, int]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(EmbeddedUpstream, local_addr=(host, 0))
    return transport, transport.get_extra_info("sockname")[1]


@dataclass
class VirtualDevice:
    name: str
    mac: str
    ip: str
    script: list[Observation]  # relative timestamps from the device's join
    unit: int = 1  # its number among the demo's devices of its type


FIRST_HOST = 10
# Each device has a loopback address of its own, 127.0.0.10 to .254, and that number as its MAC's last byte.
MAX_DEVICES = 255 - FIRST_HOST


def virtual_devices(gateway: Gateway, count: int = 6, seed: int = 7) -> list[VirtualDevice]:
    """Devices built from the model bundle's per-type prototypes, so what joins is what the model knows: one of
    each type drawn at random, and past one of every type, second (third...) units of the same types in the same
    order, each with a MAC and address of its own, as a home with two of the same plug. Asking for more devices
    than there are types once gave one of each type and no word of the rest."""
    if not 0 < count <= MAX_DEVICES:
        raise ValueError(f"the demo has room for 1 to {MAX_DEVICES} devices, not {count}")
    rng = random.Random(seed)
    prototypes = gateway.identifier.prototypes() if gateway.identifier is not None else {}
    if not prototypes:
        raise RuntimeError("the demo needs the identification model bundle (its prototypes drive the devices)")
    ouis = gateway.identifier.oui_prefixes()
    types = rng.sample(sorted(prototypes), min(count, len(prototypes)))
    devices = []
    for i in range(count):
        device_type, unit, n = types[i % len(types)], i // len(types) + 1, FIRST_HOST + i
        # A unit's own name: it is the instance name of its mDNS announcements, which two devices do not share.
        devices.append(VirtualDevice(device_type if unit == 1 else f"{device_type}-{unit}",
                                     demo_mac(ouis.get(device_type), n), f"127.0.0.{n}",
                                     list(prototypes[device_type]), unit))
    return devices


def demo_mac(oui: str | None, n: int) -> str:
    """A demo device's MAC: its prototype vendor's real prefix (so the demo shows the OUI signal) with the
    device part de:40:NN, which marks it as a demo address; without a known prefix, a locally administered
    02:00:00:de:40:NN. The demo runs on loopback only, so no real device can see these addresses."""
    return f"{oui or '02:00:00'}:de:40:{n:02x}"


class DeviceRunner(threading.Thread):
    """Plays one virtual device's script in real time, then keeps it chatting every ``period_s``."""

    def __init__(self, gateway: Gateway, device: VirtualDevice, dns_port: int, *, delay_s: float,
                 period_s: float = 20.0) -> None:
        super().__init__(name=f"virtual-{device.name}", daemon=True)
        self.gateway, self.device, self.dns_port = gateway, device, dns_port
        self.delay_s, self.period_s = delay_s, period_s
        self.stopping = threading.Event()

    def run(self) -> None:
        if self.stopping.wait(self.delay_s):
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((self.device.ip, 0))
        sock.settimeout(1.0)
        try:
            script = self.device.script
            if not any(isinstance(o, DhcpObservation) for o in script):
                # Every real device asks for an address before it speaks; that is how its MAC is learnt.
                script = [DhcpObservation(0.0, message_type=3), *script]
            self._play(sock, script)
            later = [o for o in self.device.script if isinstance(o, DnsObservation)]
            while later and not self.stopping.wait(self.period_s):
                self._play(sock, [DnsObservation(0.0, o.name, o.qtype) for o in later[:3]])
        finally:
            sock.close()

    def _play(self, sock: socket.socket, script: list[Observation]) -> None:
        start = time.time()
        for obs in sorted(script, key=lambda o: o.ts):
            if self.stopping.wait(max(0.0, start + obs.ts - time.time())):
                return
            if isinstance(obs, DnsObservation):
                query = dnslib.DNSRecord.question(obs.name, dnslib.QTYPE.get(obs.qtype, "A"))
                sock.sendto(query.pack(), ("127.0.0.1", self.dns_port))
                try:
                    sock.recv(4096)
                except OSError:
                    pass
            else:
                frame = build_frame(self.device, obs)
                if frame is not None:
                    self.gateway.ingest(parse_frame(frame, time.time(), source="virtual"))


def build_frame(device: VirtualDevice, obs: Observation) -> bytes | None:
    """The Ethernet frame a real device would send for a DHCP or mDNS observation."""
    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.layers.dns import DNS, DNSRR
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    mac_raw = bytes.fromhex(device.mac.replace(":", ""))
    if isinstance(obs, DhcpObservation):
        options: list = [("message-type", obs.message_type or 3), ("requested_addr", device.ip)]
        if obs.hostname:
            options.append(("hostname", obs.hostname.encode()))
        if obs.param_list:
            options.append(("param_req_list", list(obs.param_list)))
        if obs.vendor_class:
            options.append(("vendor_class_id", obs.vendor_class.encode()))
        options.append("end")
        pkt = (Ether(src=device.mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
               / UDP(sport=68, dport=67) / BOOTP(chaddr=mac_raw + b"\x00" * 10, xid=random.getrandbits(32))
               / DHCP(options=options))
        return bytes(pkt)
    if isinstance(obs, MdnsObservation):
        # What the prototype's device announced, record for record as the capture parser reads them back: its host
        # names, its service instances (the real device's own words, "D-Link DCH-S150 Configuration Utility", which
        # tell a sensor from a siren), and the other services it named. Announcing the type's name as the instance
        # instead made the D-Link sensor a siren, and not a known one.
        records = [DNSRR(rrname=f"{_host_name(name, device.unit)}.", type="A", rdata=device.ip, ttl=120)
                   for name in obs.names if name.endswith(".local") and "._" not in name]
        instances = [name for name in obs.names if "._" in name]
        records += [DNSRR(rrname=f"_{name.split('._', 1)[1]}.", type="PTR",
                          rdata=f"{_instance_name(name, device.unit)}.", ttl=4500) for name in instances]
        offered = {f"_{name.split('._', 1)[1]}" for name in instances}
        records += [DNSRR(rrname=f"{service}.", type="PTR", rdata=f"{service}.", ttl=4500)
                    for service in obs.services if service not in offered]
        if not records:
            return None
        dns = DNS(qr=1, aa=1, an=records)
        pkt = (Ether(src=device.mac, dst="01:00:5e:00:00:fb") / IP(src=device.ip, dst="224.0.0.251")
               / UDP(sport=5353, dport=5353) / dns)
        return bytes(pkt)
    return None


def _instance_name(name: str, unit: int) -> str:
    """A service instance a demo device of that ``unit`` announces: a second unit's is "Name (2)", as Bonjour and
    Avahi rename an instance whose name is taken."""
    instance, service = name.split("._", 1)
    return name if unit == 1 else f"{instance} ({unit})._{service}"


def _host_name(name: str, unit: int) -> str:
    """The .local host name a demo device of that ``unit`` announces: a second unit finds the first's taken and, as
    a real responder resolves the conflict (RFC 6762, 9), names itself "name-2". Its DHCP host name stays the
    prototype's, as two units of one product often send the same."""
    return name if unit == 1 else f"{name.removesuffix('.local')}-{unit}.local"
