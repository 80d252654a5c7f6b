"""Gateway events to the identifier's observation records."""

from __future__ import annotations

from gateway.events import DhcpSeen, DnsQuery, Event, MdnsSeen, PacketSeen
from identifier.observation import (
    DhcpObservation,
    DnsObservation,
    MdnsObservation,
    Observation,
    PacketObservation,
)


def to_observation(event: Event) -> Observation | None:
    """What the identifier needs of an event; None for events that carry no identity signal."""
    if isinstance(event, DnsQuery):
        return DnsObservation(event.ts, event.qname, event.qtype)
    if isinstance(event, DhcpSeen):
        return DhcpObservation(event.ts, event.hostname, event.param_list, event.vendor_class, event.message_type)
    if isinstance(event, MdnsSeen):
        return MdnsObservation(event.ts, event.names, event.services)
    if isinstance(event, PacketSeen):
        return PacketObservation(event.ts, event.proto, event.port)
    return None
