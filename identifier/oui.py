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


# Hex digits of the MAC blocks under the registered prefix (36 and 32 bits), finest first: makers number a
# production run consecutively, so units of one model tend to share a block that a sibling model lacks.
BLOCK_DIGITS = (9, 8)


def blocks(mac: str) -> list[str]:
    """The MAC's production blocks (``"908d78a8e"``, ``"908d78a8"``), finest first; none for an unregistered
    or randomised MAC, whose lower bits say nothing about a product."""
    if not mac or vendor(mac) is None:
        return []
    digits = mac.lower().replace(":", "").replace("-", "")
    return [digits[:n] for n in BLOCK_DIGITS]
