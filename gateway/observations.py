"""Gateway events to the identifier's observation records, and observations to and from JSON (the store
keeps each device's first seconds as an observation window)."""

from __future__ import annotations

from typing import Any

from gateway.events import DhcpSeen, DnsQuery, Event, MdnsSeen, PacketSeen
from identifier.observation import (
    DhcpObservation,
    DnsObservation,
    MdnsObservation,
    Observation,
    PacketObservation,
)

_KINDS: dict[str, type] = {
    "dns": DnsObservation,
    "dhcp": DhcpObservation,
    "mdns": MdnsObservation,
    "packet": PacketObservation,
}
_KIND_OF = {cls: kind for kind, cls in _KINDS.items()}


def to_observation(event: Event) -> Observation | None:
    """What the identifier needs of an event; None for events that carry no identity signal."""
    if isinstance(event, DnsQuery):
        return DnsObservation(event.ts, event.qname, event.qtype)
    if isinstance(event, DhcpSeen):
        return DhcpObservation(event.ts, event.hostname, event.param_list, event.vendor_class, event.client_id,
                               event.message_type)
    if isinstance(event, MdnsSeen):
        return MdnsObservation(event.ts, event.names, event.services)
    if isinstance(event, PacketSeen):
        return PacketObservation(event.ts, event.proto, event.port)
    return None


def to_json(obs: Observation) -> dict[str, Any]:
    # Shallow on purpose: called for every packet of a new device, and asdict() deep-copies.
    return {"kind": _KIND_OF[type(obs)], **{name: getattr(obs, name) for name in obs.__slots__}}


def from_json(data: dict[str, Any]) -> Observation:
    data = dict(data)
    cls = _KINDS[data.pop("kind")]
    for key in ("param_list", "names", "services"):
        if key in data:
            data[key] = tuple(data[key])
    return cls(**data)
