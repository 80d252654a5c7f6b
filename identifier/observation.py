"""What the identifier is told about a device: small immutable records, one per thing seen on the wire.

The gateway's capture, replay and DNS server turn packets into these; training reads the same records from
captures, so what the model learns from and what it sees at run time cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DnsObservation:
    """A DNS query the device sent."""

    ts: float
    name: str  # lower case, no trailing dot
    qtype: int = 1


@dataclass(frozen=True, slots=True)
class DhcpObservation:
    """A DHCP client message (DISCOVER, REQUEST, INFORM) the device sent."""

    ts: float
    hostname: str | None = None  # option 12
    param_list: tuple[int, ...] = ()  # option 55, in the order the client sent it
    vendor_class: str | None = None  # option 60
    message_type: int | None = None  # option 53


@dataclass(frozen=True, slots=True)
class MdnsObservation:
    """Names and service types the device announced or asked for over mDNS."""

    ts: float
    names: tuple[str, ...] = ()
    services: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PacketObservation:
    """Any other packet: its protocol and destination port, for devices that send no DNS at first."""

    ts: float
    proto: str  # "tcp", "udp", "icmp", "icmpv6", "igmp", "arp", "eapol", "fragment", "other"
    port: int | None = None


Observation = DnsObservation | DhcpObservation | MdnsObservation | PacketObservation


def to_json(obs: Observation) -> dict:
    """A compact JSON form (millisecond times; no per-unit client id): model bundles and stored windows."""
    if isinstance(obs, DnsObservation):
        return {"kind": "dns", "t": round(obs.ts, 3), "name": obs.name, "qtype": obs.qtype}
    if isinstance(obs, DhcpObservation):
        return {
            "kind": "dhcp",
            "t": round(obs.ts, 3),
            "hostname": obs.hostname,
            "param_list": list(obs.param_list),
            "vendor_class": obs.vendor_class,
            "message_type": obs.message_type,
        }
    if isinstance(obs, MdnsObservation):
        return {
            "kind": "mdns",
            "t": round(obs.ts, 3),
            "names": list(obs.names),
            "services": list(obs.services),
        }
    return {"kind": "packet", "t": round(obs.ts, 3), "proto": obs.proto, "port": obs.port}


def from_json(data: dict) -> Observation:
    t = float(data["t"])
    kind = data["kind"]
    if kind == "dns":
        return DnsObservation(t, data["name"], int(data.get("qtype", 1)))
    if kind == "dhcp":
        return DhcpObservation(
            t,
            data.get("hostname"),
            tuple(data.get("param_list", ())),
            data.get("vendor_class"),
            data.get("message_type"),
        )
    if kind == "mdns":
        return MdnsObservation(t, tuple(data.get("names", ())), tuple(data.get("services", ())))
    return PacketObservation(t, data["proto"], data.get("port"))
