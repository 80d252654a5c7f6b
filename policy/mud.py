"""RFC 8520 MUD files as allow profiles: the DNS names a device model's manufacturer says it talks to.

Only the ``ietf-acldns`` name matches of accepting ACEs in the device's own policies are read (``dst-dnsname``
in its from-device ACLs, ``src-dnsname`` in its to-device ACLs); addresses, ports and local-network
abstractions are left to the firewall. Names are kept as names and matched at query time, not resolved once
when the file is imported (which breaks when a cloud's addresses change, as osMUD does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from policy.lists import normalise_name
from policy.model import Profile

_NAME_KEYS = {"from": "ietf-acldns:dst-dnsname", "to": "ietf-acldns:src-dnsname"}


class MudError(ValueError):
    """A MUD file that cannot be used; the message names the file and what is wrong."""


def profile_from_mud(data: dict[str, Any], source: str = "mud") -> Profile:
    """The allow profile of a parsed MUD file (raises ``MudError``)."""
    try:
        mud = data["ietf-mud:mud"]
        acls = {acl["name"]: acl for acl in data["ietf-access-control-list:acls"]["acl"]}
    except (KeyError, TypeError) as exc:
        raise MudError(f"{source}: not a MUD file (missing {exc})") from exc
    names: dict[str, None] = {}
    for direction, key in _NAME_KEYS.items():
        policy = mud.get(f"{direction}-device-policy", {})
        for ref in policy.get("access-lists", {}).get("access-list", []):
            acl = acls.get(ref.get("name"))
            if acl is None:
                raise MudError(f"{source}: {direction}-device-policy names unknown ACL {ref.get('name')!r}")
            for ace in acl.get("aces", {}).get("ace", []):
                if ace.get("actions", {}).get("forwarding") != "accept":
                    continue
                for family in ("ipv4", "ipv6"):
                    value = ace.get("matches", {}).get(family, {}).get(key)
                    if value is None:
                        continue
                    try:
                        names[normalise_name(str(value))] = None
                    except ValueError as exc:
                        raise MudError(f"{source}: ACE {ace.get('name')!r}: {value!r}: {exc}") from exc
    if not names:
        raise MudError(f"{source}: no DNS names in its accepting ACEs")
    url = mud.get("mud-url", "")
    return Profile(sorted(names), f"mud:{url or source}")


def load_mud(path: str | Path) -> Profile:
    """Read a MUD JSON file into an allow profile."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MudError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:  # RFC 8520 files are JSON, which is UTF-8; the codec's message names no file
        line = raw.count(b"\n", 0, exc.start) + 1
        raise MudError(f"{path}:{line}: not UTF-8 (byte {exc.start} is {raw[exc.start]:#04x})") from exc
    except json.JSONDecodeError as exc:
        raise MudError(f"{path}:{exc.lineno}: not JSON: {exc.msg}") from exc
    return profile_from_mud(data, str(path))
