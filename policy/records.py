"""The records the policy library takes and returns: who asks (``DeviceContext``) and the ``Verdict``."""

from __future__ import annotations

from dataclasses import dataclass, field

# How a blocked query is answered: Pi-hole's default "null" (0.0.0.0 / ::, TTL 2), NXDOMAIN, NODATA, REFUSED.
ANSWERS = ("null", "nxdomain", "nodata", "refused")


@dataclass(frozen=True, slots=True)
class DeviceContext:
    """The device a query comes from, as the gateway knows it.

    ``status`` is ``new`` (never approved), ``identified`` or ``approved``; with quarantine switched on, a
    device that is not ``approved`` gets only its quarantine allow list. ``quarantined`` forces quarantine
    for one device (the owner's "quarantine this device"). ``cloud_slds`` are the vendor cloud domains the
    identification names; they are allowed in quarantine so the device can still be set up.
    The gateway builds one per device and reuses it: it is hashable and cheap to keep.
    """

    mac: str
    device_type: str | None = None
    category: str | None = None
    status: str = "new"
    quarantined: bool = False
    cloud_slds: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision for one query.

    ``rule`` keys what matched (``device:aa:bb:.. block name=ads.example``, ``global block list=oisd``,
    ``quarantine``, ``type:camera strict`` ...) or is ``None`` when nothing did; ``words`` says the same to the
    owner ("its own rule: block ads.example"). Both go into the query log: the key's owner-given names (a type,
    a tag, a list category) may hold spaces and anything else, so the words cannot be read back out of it.
    ``answer`` says how to answer when blocked. ``anomaly`` is set when the device has a profile and the
    name lies outside it: the gateway raises an event, whatever the action.
    """

    action: str  # "allowed" or "blocked"
    rule: str | None = None
    answer: str = "null"
    anomaly: bool = False
    words: str | None = None

    @property
    def blocked(self) -> bool:
        return self.action == "blocked"


ALLOWED = Verdict("allowed")
ALLOWED_ANOMALY = Verdict("allowed", anomaly=True)
