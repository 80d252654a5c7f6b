"""The DNS forwarder the LAN's devices use: see ``server.DnsServer``."""

from gateway.dns.server import Decision, DnsServer

__all__ = ["Decision", "DnsServer"]
