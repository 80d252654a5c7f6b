"""Policies as plain data: what the owner configured, serialisable to and from JSON-ready dicts.

A ``PolicySet`` is the whole configuration (the store keeps it, ``PolicyEngine.build`` compiles it). A policy
applies to a scope: ``device:<mac>``, ``type:<device type>``, ``tag:<device tag>`` (a category, named like
AdGuard Home's device tags) or ``global``; for a query the most specific scope with a matching rule decides.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from policy.lists import normalise_name
from policy.records import ANSWERS
from policy.schedule import Schedule

RULE_ACTIONS = ("block", "allow")
RULE_KINDS = ("name", "list", "category", "all")
# Our device categories onto AdGuard Home's device tags; categories it has no tag for get a tag in the same
# style (device_plug, device_hub, ...), so one category never hides inside device_other.
CATEGORY_TAGS = {
    "camera": "device_camera",
    "doorbell": "device_camera",
    "tv": "device_tv",
    "speaker": "device_audio",
    "audio": "device_audio",
    "alarm": "device_securityalarm",
    "printer": "device_printer",
    "nas": "device_nas",
    "phone": "device_phone",
    "tablet": "device_tablet",
    "laptop": "device_laptop",
    "pc": "device_pc",
    "gameconsole": "device_gameconsole",
    "other": "device_other",
}
DEFAULT_QUARANTINE_ALLOW = (
    "pool.ntp.org",
    "time.google.com",
    "time.cloudflare.com",
    "time.apple.com",
    "time.windows.com",
    "time.nist.gov",
    "ntp.ubuntu.com",
)
# Unicode categories of characters that are no text to show: controls (tab, ESC), format (bidi overrides), separators
CONTROL_CATEGORIES = ("Cc", "Cf", "Zl", "Zp")
# Joiners build emoji sequences and shape scripts (a family emoji, a Persian name); every other format character,
# a bidi override among them, can make a name read as something else.
JOINERS = frozenset("\u200c\u200d")
# As long as the device's type label (Device.label_device_type), the longest a type or tag scope can be named from.
SCOPE_NAME_MAX = 100
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
# The notations a MAC is typed in: 20:f8:5e:ca:91:52 (also 2:f8:..., as some tools print it), 20-F8-5E-CA-91-52,
# 20f85eca9152 and 20f8.5eca.9152.
_MAC_NOTATIONS = (
    re.compile(r"([0-9a-f]{1,2})[:-]([0-9a-f]{1,2})[:-]([0-9a-f]{1,2})[:-]([0-9a-f]{1,2})[:-]([0-9a-f]{1,2})[:-]"
               r"([0-9a-f]{1,2})"),
    re.compile(r"([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})"),
    re.compile(r"([0-9a-f]{2})([0-9a-f]{2})\.([0-9a-f]{2})([0-9a-f]{2})\.([0-9a-f]{2})([0-9a-f]{2})"),
)
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def category_tag(category: str) -> str:
    """The device tag of a category (``camera`` -> ``device_camera``, ``plug`` -> ``device_plug``)."""
    category = category.lower()
    return category if category.startswith("device_") else CATEGORY_TAGS.get(category, f"device_{category}")


def is_mac(key: str) -> bool:
    """True for a MAC as ``normalise_mac`` writes it; a device key is that or ``ip:<address>`` (no MAC known)."""
    return _MAC.fullmatch(key) is not None


def normalise_mac(text: str) -> str:
    """A MAC in any of ``_MAC_NOTATIONS`` (``AA-BB-CC-DD-EE-FF``, ``aabb.ccdd.eeff``...) -> ``aa:bb:cc:dd:ee:ff``,
    the one form the store, the vendor lookup and nftables read: in another the same device would be another.
    ValueError otherwise."""
    lowered = text.strip().lower()
    for notation in _MAC_NOTATIONS:
        found = notation.fullmatch(lowered)
        if found:
            return ":".join(part.zfill(2) for part in found.groups())
    raise ValueError(f"{text!r} is not a MAC address")


def normalise_scope(text: str) -> str:
    """A scope key in canonical form: ``global``, ``device:<mac>``, ``type:<t>``, ``tag:<device_x>``.

    ``category:<c>`` is accepted and becomes the category's tag.
    """
    if text == "global":
        return text
    kind, _, value = text.partition(":")
    if not value:
        raise ValueError(f"{text!r}: a scope is global, device:MAC, type:TYPE, tag:TAG or category:CATEGORY")
    if kind == "device":
        return f"device:{normalise_mac(value)}"
    if kind in ("tag", "category"):
        return f"tag:{category_tag(_scope_name(kind, value))}"
    if kind == "type":
        return f"type:{_scope_name(kind, value)}"
    raise ValueError(f"{text!r}: unknown scope kind {kind!r}")


def scope_words(scope: str) -> str:
    """Whose rule a canonical scope is, as the owner reads it: ``global``, ``its own`` (the asking device's),
    ``type <type>`` or ``category <category>`` (``tag:device_camera`` -> ``category camera``)."""
    if scope == "global":
        return scope
    kind, _, value = scope.partition(":")
    if kind == "tag":
        return f"category {value.removeprefix('device_')}"
    return "its own" if kind == "device" else f"type {value}"


def hidden_character(text: str) -> str | None:
    """The first character of ``text`` that is no text to show (a control or bidi character: a newline, ESC,
    U+202E), joiners (emoji sequences) allowed; None when there is none. Owner-given names and scope names
    refuse such text."""
    return next((c for c in text if unicodedata.category(c) in CONTROL_CATEGORIES and c not in JOINERS), None)


def _scope_name(kind: str, value: str) -> str:
    """``value`` if it can name a type or tag scope: it is shown on pages, in the CLI and in logs, so a control
    or bidi character (a newline, ESC, U+202E) is refused, as in the names the owner gives devices."""
    if not value.strip():
        raise ValueError(f"a {kind} scope needs a name")
    if len(value) > SCOPE_NAME_MAX:
        raise ValueError(f"a {kind} name has at most {SCOPE_NAME_MAX} characters")
    if (bad := hidden_character(value)) is not None:
        raise ValueError(f"a {kind} name may not contain control or bidi characters (found U+{ord(bad):04X})")
    return value


@dataclass
class Rule:
    """Block or allow a name (and its subdomains), a list, a category of lists, or everything.

    With ``schedule`` (a name in ``PolicySet.schedules``) the rule applies only while the schedule is active:
    ``block all`` with a bedtime schedule pauses the internet every night.
    """

    action: str
    kind: str
    value: str = ""
    schedule: str | None = None

    def label(self) -> str:
        target = self.kind if self.kind == "all" else f"{self.kind}={self.value}"
        return f"{self.action} {target}" + (f" schedule={self.schedule}" if self.schedule else "")

    def words(self) -> str:
        """The rule as the owner reads it ("block doubleclick.net during bedtime"); ``label`` is the engine's."""
        what = {"all": "everything", "name": self.value}.get(self.kind, f"{self.kind} {self.value}")
        return f"{self.action} {what}" + (f" during {self.schedule}" if self.schedule else "")


@dataclass
class Policy:
    """The rules of one scope. ``None`` settings inherit from the less specific scopes."""

    rules: list[Rule] = field(default_factory=list)
    strict: bool | None = None  # allow only the device type's profile
    paused: bool | None = None  # "pause internet": block every name
    answer: str | None = None  # how blocked queries are answered (one of ANSWERS)


@dataclass
class ListSpec:
    """A block list: a local file (``path``, relative to the state directory or absolute), fetched
    from ``url`` when the user asked for it."""

    path: str
    url: str = ""
    name: str = ""
    enabled: bool = True


@dataclass
class Profile:
    """An allow profile for a device type: names (and their subdomains) it normally contacts."""

    names: list[str]
    source: str = ""  # e.g. "mud:https://vendor.example/camera.json"


@dataclass
class Quarantine:
    """With ``enabled``, unapproved devices get only ``allow`` plus their type's profile and vendor cloud."""

    enabled: bool = False
    allow: list[str] = field(default_factory=lambda: list(DEFAULT_QUARANTINE_ALLOW))


@dataclass
class PolicySet:
    """Everything the owner configured; ``revision`` goes up by one on every change."""

    revision: int = 0
    answer: str = "null"
    lists: dict[str, ListSpec] = field(default_factory=dict)
    categories: dict[str, list[str]] = field(default_factory=dict)  # name -> list ids
    schedules: dict[str, Schedule] = field(default_factory=dict)
    policies: dict[str, Policy] = field(default_factory=dict)  # scope -> policy
    profiles: dict[str, Profile] = field(default_factory=dict)  # device type -> imported profile
    quarantine: Quarantine = field(default_factory=Quarantine)

    def policy(self, scope: str) -> Policy:
        """The policy of ``scope``, created empty if there is none yet."""
        return self.policies.setdefault(normalise_scope(scope), Policy())

    def own_devices(self) -> frozenset[str]:
        """The devices (keys as the tracker has them) with a policy of their own: the owner touched them."""
        return frozenset(scope.removeprefix("device:") for scope in self.policies if scope.startswith("device:"))

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistency (unknown list, schedule, action ...)."""
        if self.answer not in ANSWERS:
            raise ValueError(f"answer {self.answer!r}: use one of {', '.join(ANSWERS)}")
        for list_id in self.lists:
            if not _ID.fullmatch(list_id):
                raise ValueError(f"list id {list_id!r}: letters, digits, '_', '-', '.' only")
        for category, ids in self.categories.items():
            for list_id in ids:
                if list_id not in self.lists:
                    raise ValueError(f"category {category!r}: unknown list {list_id!r}")
        for scope, pol in self.policies.items():
            if normalise_scope(scope) != scope:
                raise ValueError(f"scope {scope!r} is not in canonical form ({normalise_scope(scope)!r})")
            if pol.answer is not None and pol.answer not in ANSWERS:
                raise ValueError(f"{scope}: answer {pol.answer!r}: use one of {', '.join(ANSWERS)}")
            for rule in pol.rules:
                where = f"{scope}: rule {rule.label()!r}"
                if rule.action not in RULE_ACTIONS:
                    raise ValueError(f"{where}: action must be one of {', '.join(RULE_ACTIONS)}")
                if rule.kind not in RULE_KINDS:
                    raise ValueError(f"{where}: kind must be one of {', '.join(RULE_KINDS)}")
                if rule.kind == "name":
                    normalise_name(rule.value)
                if missing := self.missing_reference(rule):
                    raise ValueError(f"{where}: unknown {missing}")

    def missing_reference(self, rule: Rule) -> str | None:
        """What ``rule`` names that this set does not have (``"list 'x'"``), or None."""
        if rule.kind == "list" and rule.value not in self.lists:
            return f"list {rule.value!r}"
        if rule.kind == "category" and rule.value not in self.categories:
            return f"category {rule.value!r}"
        if rule.schedule is not None and rule.schedule not in self.schedules:
            return f"schedule {rule.schedule!r}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "answer": self.answer,
            "lists": {k: vars(v).copy() for k, v in self.lists.items()},
            "categories": {k: list(v) for k, v in self.categories.items()},
            "schedules": {k: v.to_dict() for k, v in self.schedules.items()},
            "policies": {
                scope: {
                    "rules": [vars(r).copy() for r in pol.rules],
                    "strict": pol.strict,
                    "paused": pol.paused,
                    "answer": pol.answer,
                }
                for scope, pol in self.policies.items()
            },
            "profiles": {k: {"names": list(v.names), "source": v.source} for k, v in self.profiles.items()},
            "quarantine": {"enabled": self.quarantine.enabled, "allow": list(self.quarantine.allow)},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicySet:
        """The inverse of ``to_dict``; raises ValueError naming what is wrong."""
        try:
            out = cls(
                revision=int(data.get("revision", 0)),
                answer=data.get("answer", "null"),
                lists={k: ListSpec(**v) for k, v in data.get("lists", {}).items()},
                categories={k: list(v) for k, v in data.get("categories", {}).items()},
                schedules={k: Schedule.from_dict(v) for k, v in data.get("schedules", {}).items()},
                policies={
                    scope: Policy(
                        rules=[Rule(**r) for r in pol.get("rules", [])],
                        strict=pol.get("strict"),
                        paused=pol.get("paused"),
                        answer=pol.get("answer"),
                    )
                    for scope, pol in data.get("policies", {}).items()
                },
                profiles={k: Profile(**v) for k, v in data.get("profiles", {}).items()},
                quarantine=Quarantine(**data.get("quarantine", {})),
            )
        except (TypeError, AttributeError, KeyError) as exc:
            raise ValueError(f"malformed policy data: {exc}") from exc
        out.validate()
        return out
