"""The gateway's own events: what capture, replay, virtual devices and the DNS server report.

Each carries the device's MAC when the packet showed it (capture, replay) or when the device tracker could
map the client address to one (the DNS server). Consumers (store, identifier, alerts) take them off the hot
path from the event bus.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class DnsQuery:
    ts: float
    client: str  # client IP address
    mac: str | None
    qname: str  # lower case, no trailing dot
    qtype: int
    sld: str
    rcode: int | None = None  # None when a passive capture saw no answer
    latency_ms: float | None = None
    verdict: str = "allowed"  # "allowed" | "blocked" | "refused" | "ratelimited"
    rule: str | None = None  # the policy rule that decided, for the query log
    source: str = "server"  # "server" | "capture" | "replay"
    rule_words: str | None = None  # the rule in the owner's words, made by the policy engine beside ``rule``


@dataclass(slots=True)
class DhcpSeen:
    ts: float
    mac: str
    ip: str | None  # the address the client asked for (option 50) or already has (ciaddr)
    hostname: str | None = None
    param_list: tuple[int, ...] = ()
    vendor_class: str | None = None
    client_id: str | None = None
    message_type: int | None = None


@dataclass(slots=True)
class MdnsSeen:
    ts: float
    mac: str
    ip: str | None
    names: tuple[str, ...] = ()
    services: tuple[str, ...] = ()


@dataclass(slots=True)
class PacketSeen:
    """Any other packet from a device (replay only: live capture filters to DNS, DHCP and mDNS)."""

    ts: float
    mac: str
    ip: str | None
    proto: str
    port: int | None = None


@dataclass(slots=True)
class AddressSeen:
    """An IP address observed for a MAC (DHCP, the neighbour table, or the source of a captured packet)."""

    ts: float
    mac: str
    ip: str
    source: str  # "dhcp" | "neighbour" | "packet"


@dataclass(slots=True)
class DeviceSeen:
    """A device sent a frame: the first one a capture or replay saw from this unicast Ethernet source, whatever
    it said (a DNS answer, a DHCP reply, a malformed payload). The device is present from ``ts``, at ``ip``
    when the frame had a source address."""

    ts: float
    mac: str
    ip: str | None


ALERT_KINDS = (
    "new_device",
    "device_identified",
    "unknown_device",
    "device_online",
    "device_offline",
    "blocked_summary",
    "quarantine_entered",
    "quarantine_lifted",
    "anomaly",
    "model_updated",
    "federated_round",
    "alerts_dropped",  # the alert outbox overflowed while the broker was away: how many, from when to when
    "too_many_devices",  # [devices] max reached and none could make room: new devices are not kept (once a run)
)


@dataclass(slots=True)
class Alert:
    """Something the owner should hear about (MQTT, Home Assistant, the web UI's alert list)."""

    kind: str  # one of ALERT_KINDS
    ts: float
    mac: str | None
    data: dict = field(default_factory=dict)


Event = DnsQuery | DhcpSeen | MdnsSeen | PacketSeen | AddressSeen | DeviceSeen


@dataclass(slots=True)
class Counters:
    """Monotonic counters shared by the packet paths; read by `iotgw doctor`, the web UI and benchmarks."""

    values: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, n: int = 1) -> None:
        self.values[name] = self.values.get(name, 0) + n

    def get(self, name: str) -> int:
        return self.values.get(name, 0)
