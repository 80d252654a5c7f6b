"""MAC vendor prefixes, from the IEEE registry that ships with ``netaddr`` (no download at run time)."""

from __future__ import annotations

from functools import lru_cache

from netaddr import EUI, NotRegisteredError
from netaddr.core import AddrFormatError


@lru_cache(maxsize=4096)
def vendor(mac: str) -> str | None:
    """The organisation registered for the MAC's prefix, or None (unregistered, or a randomised local MAC)."""
    try:
        eui = EUI(mac)
    except (AddrFormatError, TypeError, ValueError):
        return None
    if int(eui) & (0x02 << 40):  # locally administered bit: phones' private addresses carry no vendor
        return None
    try:
        return str(eui.oui.registration().org).strip() or None
    except (NotRegisteredError, IndexError):
        return None
