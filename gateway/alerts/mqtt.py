"""The MQTT connection: paho-mqtt 2.x, ``mqtt://`` or ``mqtts://`` URLs, username and password, a CA file for
TLS, a client id derived from the gateway's name (stable across restarts), reconnect with backoff, and a
retained ``offline`` last will on ``iotgw/<gateway>/status`` answered by a retained ``online`` on connect.

Callbacks run on paho's network thread; the owner only records what happened there and does its work
(database, publishing) on its own thread.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import ConfigError, MqttConfig, redact_url

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 60


def topic_id(text: str) -> str:
    """``text`` reduced to the characters Home Assistant allows in ids and that are safe in MQTT topics."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", text) or "_"


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    tls: bool
    username: str
    password: str


def parse_url(url: str, username: str = "", password: str = "") -> Broker:
    """``mqtt://[user:pass@]host[:port]`` or ``mqtts://...``; the config's credentials win.
    ValueError names the URL with its password replaced by ``***``: the message is printed and logged."""
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # "mqtt://[::1" (unclosed bracket), a port out of range or not a number
        raise ValueError(f"MQTT URL {shown!r}: {exc}") from None
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"MQTT URL {shown!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"MQTT URL {shown!r}: no host")
    tls = parts.scheme == "mqtts"
    return Broker(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=username or unquote(parts.username or ""),
        password=password or unquote(parts.password or ""),
    )


class MqttLink:
    """One paho client for one gateway."""

    def __init__(
        self,
        cfg: MqttConfig,
        gateway: str,
        *,
        subscriptions: list[str],
        on_connect: Callable[[], None],
        on_message: Callable[[str, bytes, bool], None],
        on_ack: Callable[[int], None],
        max_inflight: int = 100,
    ) -> None:
        self.broker = parse_url(cfg.url, cfg.username, cfg.password)
        self.gateway = topic_id(gateway)
        self.status_topic = f"iotgw/{self.gateway}/status"
        self.subscriptions = subscriptions
        self._on_connect_cb = on_connect
        self._on_message_cb = on_message
        self._on_ack_cb = on_ack
        self.connected = threading.Event()
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"iotgw-{self.gateway}",
            clean_session=True,  # unacknowledged alerts live in the outbox, not in a broker session
            protocol=paho.MQTTv311,
        )
        if self.broker.username:
            client.username_pw_set(self.broker.username, self.broker.password or None)
        if self.broker.tls:
            # No CA file: the system's trust store. The host name is always checked.
            try:
                client.tls_set(ca_certs=cfg.ca_file or None)
            except (OSError, ValueError) as exc:  # ssl's own message names no file: a missing one said only that
                raise ConfigError(
                    f"mqtt.ca_file {cfg.ca_file!r}: not usable as the broker's CA certificate (PEM): {exc}"
                ) from exc
        client.will_set(self.status_topic, "offline", qos=1, retain=True)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.max_inflight_messages_set(max_inflight)
        client.max_queued_messages_set(0)  # the owner bounds what it hands over; paho must never drop
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self.client = client

    def start(self) -> None:
        """Connect in the background; paho retries (with backoff) until the broker answers."""
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()

    def stop(self, timeout: float = 2.0) -> None:
        """Say ``offline`` ourselves (a clean disconnect does not fire the will) and disconnect."""
        if self.connected.is_set():
            info = self.client.publish(self.status_topic, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass  # the connection went away meanwhile; the broker sends the will instead
        self.connected.clear()
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes | str, *, retain: bool = False) -> int:
        """QoS 1; returns the message id whose acknowledgement ``on_ack`` reports. Kept by paho (and resent
        after a reconnect) until acknowledged."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise RuntimeError(f"MQTT publish to {topic}: {paho.error_string(info.rc)}")
        return info.mid

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001 - paho's
        if reason_code.is_failure:
            log.error(
                "MQTT: %s:%d refused the connection: %s", self.broker.host, self.broker.port, reason_code
            )
            return
        log.info("MQTT: connected to %s:%d", self.broker.host, self.broker.port)
        client.publish(self.status_topic, "online", qos=1, retain=True)
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        self.connected.set()
        self._on_connect_cb()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if self.connected.is_set():
            log.warning("MQTT: disconnected (%s); reconnecting with backoff", reason_code)
        self.connected.clear()

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        self._on_message_cb(message.topic, message.payload, bool(message.retain))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # noqa: ANN001
        self._on_ack_cb(mid)
