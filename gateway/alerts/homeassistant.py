"""Home Assistant MQTT discovery, device-based: one retained ``<prefix>/device/<id>/config`` per device with
its ``device`` block, ``origin`` and ``components``; the gateway is a device too and every client device
hangs under it (``via_device``). Alerts are device triggers: the gateway's for every alert, each client device's
for its own. Pure functions from store rows to (topic, payload); the publisher sends them.

Ids and topic levels are ``[a-zA-Z0-9_-]`` only, as Home Assistant requires.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.alerts.mqtt import topic_id
from gateway.events import ALERT_KINDS
from gateway.store.schema import Device
from policy.model import is_mac

ORIGIN = {"name": "iotgw", "sw_version": "0.1.0", "support_url": "https://github.com/iotgw/iotgw"}


def gateway_id(gateway: str) -> str:
    return f"iotgw_{topic_id(gateway)}"


def device_id(gateway: str, mac: str) -> str:
    """``iotgw_<gateway>_aabbccddeeff``; an address-only client (``ip:10.0.0.5``) keeps its separators, ``.`` as
    ``-`` and ``:`` as ``_``, so that two addresses never share an id (``::ffff:1.2.3.4`` and ``::ffff:1:2:3:4``)."""
    key = mac.replace(":", "") if is_mac(mac) else topic_id(mac.replace(".", "-"))
    return f"{gateway_id(gateway)}_{key}"


def discovery_topic(prefix: str, node_id: str) -> str:
    return f"{prefix}/device/{node_id}/config"


def state_topic(gateway: str, node_id: str) -> str:
    return f"iotgw/{topic_id(gateway)}/device/{node_id}/state"


def command_topic(gateway: str, node_id: str, what: str) -> str:
    return f"iotgw/{topic_id(gateway)}/device/{node_id}/{what}/set"


def command_subscription(gateway: str) -> str:
    return f"iotgw/{topic_id(gateway)}/device/+/+/set"


def parse_command(gateway: str, topic: str) -> tuple[str, str] | None:
    """``iotgw/<gw>/device/<id>/<what>/set`` -> (id, what); anything else -> None."""
    parts = topic.split("/")
    if len(parts) == 6 and parts[:3] == ["iotgw", topic_id(gateway), "device"] and parts[5] == "set":
        return parts[3], parts[4]
    return None


def event_topic(gateway: str, kind: str) -> str:
    return f"iotgw/{topic_id(gateway)}/event/{kind}"


# The alerts of one device that Home Assistant offers as that device's triggers in the automation editor. A new
# device's alert is not among them: it comes before the device's entities; the gateway offers it.
DEVICE_TRIGGER_KINDS = (
    "device_identified",
    "unknown_device",
    "device_online",
    "device_offline",
    "blocked_summary",
    "anomaly",
    "quarantine_entered",
    "quarantine_lifted",
)


def _triggers(gateway: str, node_id: str, kinds: Sequence[str], mac: str | None) -> dict[str, dict[str, Any]]:
    """Device triggers (``device_automation``) on the alert topics: an automation made in Home Assistant's editor
    from "the device's alerts" needs no topic or payload to know. A client device's triggers fire only on alerts
    whose ``mac`` is its own (the trigger compares the template's value with ``payload``); the gateway's fire on
    every alert of the kind."""
    triggers = {}
    for kind in kinds:
        trigger = {
            "platform": "device_automation",
            "automation_type": "trigger",
            "topic": event_topic(gateway, kind),
            "type": kind,
            "subtype": "alert",
            "qos": 1,
        }
        if mac is not None:
            trigger["value_template"] = "{{ value_json.mac }}"
            trigger["payload"] = mac
        triggers[f"{node_id}_on_{kind}"] = trigger
    return triggers


def gateway_state_topic(gateway: str) -> str:
    return f"iotgw/{topic_id(gateway)}/state"


def status_topic(gateway: str) -> str:
    """Where the gateway says ``online`` or ``offline`` (``MqttLink``'s status and last will)."""
    return f"iotgw/{topic_id(gateway)}/status"


def _availability(gateway: str) -> list[dict[str, str]]:
    return [{"topic": status_topic(gateway)}]


def _counter(uid: str, name: str, topic: str, field: str, icon: str) -> dict[str, Any]:
    return {
        "platform": "sensor",
        "unique_id": uid,
        "name": name,
        "state_topic": topic,
        "value_template": f"{{{{ value_json.{field} }}}}",
        "state_class": "total_increasing",
        "unit_of_measurement": "queries",
        "icon": icon,
    }


def gateway_discovery(gateway: str, prefix: str, name: str) -> tuple[str, dict[str, Any]]:
    """The gateway's own config: ids and topics from ``gateway`` (the sanitised name), the device shown as
    ``name``, ``[gateway] name`` as the owner wrote it ("home gw", not "home_gw")."""
    gid = gateway_id(gateway)
    topic = gateway_state_topic(gateway)
    components = {
        f"{gid}_devices": {
            "platform": "sensor",
            "unique_id": f"{gid}_devices",
            "name": "Devices",
            "state_topic": topic,
            "value_template": "{{ value_json.devices }}",
            "state_class": "measurement",
            "icon": "mdi:devices",
        },
        f"{gid}_online": {
            "platform": "sensor",
            "unique_id": f"{gid}_online",
            "name": "Devices online",
            "state_topic": topic,
            "value_template": "{{ value_json.online }}",
            "state_class": "measurement",
            "icon": "mdi:lan-connect",
        },
        f"{gid}_queries_today": _counter(
            f"{gid}_queries_today", "Queries today", topic, "queries_today", "mdi:dns"
        ),
        f"{gid}_blocked_today": _counter(
            f"{gid}_blocked_today", "Blocked today", topic, "blocked_today", "mdi:shield-check"
        ),
        f"{gid}_outbox": {
            "platform": "sensor",
            "unique_id": f"{gid}_outbox",
            "name": "Alerts waiting",
            "state_topic": topic,
            "value_template": "{{ value_json.outbox }}",
            "state_class": "measurement",
            "entity_category": "diagnostic",
        },
        **_triggers(gateway, gid, ALERT_KINDS, None),
    }
    payload = {
        "device": {
            "identifiers": [gid],
            "name": name,
            "manufacturer": "iotgw",
            "model": "IoT gateway",
            "sw_version": ORIGIN["sw_version"],
        },
        "origin": ORIGIN,
        "availability": _availability(gateway),
        "components": components,
    }
    return discovery_topic(prefix, gid), payload


def device_discovery(
    gateway: str, prefix: str, device: Device, policy_options: Sequence[str] | None
) -> tuple[str, dict[str, Any]]:
    """The config for one client device: tracker, type and manufacturer sensors, today's counters, the
    quarantine switch and (when the policy store offers choices) the policy select."""
    nid = device_id(gateway, device.mac)
    topic = state_topic(gateway, nid)
    block: dict[str, Any] = {
        "identifiers": [nid],
        "name": device.name or device.vendor or device.mac,
        "via_device": gateway_id(gateway),
    }
    # Only what is known: Home Assistant's registry keeps a field a config leaves out, but takes any value sent,
    # also for a device merged with ours by its MAC from another integration, whose real model an "unknown"
    # replaced (and a null fails the whole config: the device schema takes strings only).
    if manufacturer := _manufacturer(device):
        block["manufacturer"] = manufacturer
    if model := _identified(device, "device_type"):
        block["model"] = model
    if is_mac(device.mac):
        block["connections"] = [["mac", device.mac]]
    components: dict[str, dict[str, Any]] = {
        f"{nid}_tracker": {
            "platform": "device_tracker",
            "unique_id": f"{nid}_tracker",
            "name": "Presence",
            "state_topic": topic,
            "value_template": "{{ value_json.presence }}",
            "payload_home": "home",
            "payload_not_home": "not_home",
            "source_type": "router",
        },
        f"{nid}_type": {
            "platform": "sensor",
            "unique_id": f"{nid}_type",
            "name": "Type",
            "state_topic": topic,
            "value_template": "{{ value_json.device_type }}",
            "icon": "mdi:devices",
        },
        f"{nid}_manufacturer": {
            "platform": "sensor",
            "unique_id": f"{nid}_manufacturer",
            "name": "Manufacturer",
            "state_topic": topic,
            "value_template": "{{ value_json.manufacturer }}",
            "icon": "mdi:factory",
        },
        f"{nid}_queries_today": _counter(
            f"{nid}_queries_today", "Queries today", topic, "queries_today", "mdi:dns"
        ),
        f"{nid}_blocked_today": _counter(
            f"{nid}_blocked_today", "Blocked today", topic, "blocked_today", "mdi:shield-check"
        ),
        f"{nid}_quarantine": {
            "platform": "switch",
            "unique_id": f"{nid}_quarantine",
            "name": "Quarantine",
            "state_topic": topic,
            "value_template": "{{ value_json.quarantine }}",
            "command_topic": command_topic(gateway, nid, "quarantine"),
            "payload_on": "ON",
            "payload_off": "OFF",
            "state_on": "ON",
            "state_off": "OFF",
            "icon": "mdi:lock",
            # A config entity: Home Assistant leaves it out of actions aimed at the device or its area, so "turn
            # off the kitchen" (or a plug's own device, merged with this one by its MAC) never lifts a quarantine.
            "entity_category": "config",
        },
    }
    if policy_options:
        components[f"{nid}_policy"] = {
            "platform": "select",
            "unique_id": f"{nid}_policy",
            "name": "Policy",
            "state_topic": topic,
            "value_template": "{{ value_json.policy }}",
            "command_topic": command_topic(gateway, nid, "policy"),
            "options": list(policy_options),
            "icon": "mdi:filter",
            "entity_category": "config",
        }
    components.update(_triggers(gateway, nid, DEVICE_TRIGGER_KINDS, device.mac))
    payload = {
        "device": block,
        "origin": ORIGIN,
        "availability": _availability(gateway),
        "components": components,
    }
    return discovery_topic(prefix, nid), payload


def device_state(
    device: Device, *, online: bool, queries: int, blocked: int, policy: str | None
) -> dict[str, Any]:
    """The retained state every component of a device reads its value from."""
    return {
        "presence": "home" if online else "not_home",
        "device_type": _identified(device, "device_type") or "unknown",
        "manufacturer": _manufacturer(device) or "unknown",
        "category": _identified(device, "category"),
        "queries_today": queries,
        "blocked_today": blocked,
        "quarantine": "ON" if device.status == "quarantined" else "OFF",
        "policy": policy,
    }


def _identified(device: Device, field: str) -> str | None:
    """The device's ``field`` (manufacturer, device_type or category) as the owner labelled it, else as identified,
    unless the identifier found the device like none it knows: it then stores every label as "unknown", a word and
    not a manufacturer or a model."""
    if label := getattr(device, f"label_{field}"):
        return label
    return None if device.known is False else getattr(device, field)


def _manufacturer(device: Device) -> str | None:
    """The labelled or identified manufacturer, else the vendor of the MAC's OUI block; None when none is known."""
    return _identified(device, "manufacturer") or device.vendor
