"""A real mosquitto for the tests: a free loopback port, a temporary config (plain or TLS with a test CA made
by openssl), persistence so a restart keeps subscribers' queued messages, and a recording subscriber."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.ports import free_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def make_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost signed by it."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    ca_key, ca, key, csr, cert = (
        directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )
    ext = directory / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
        "-days",
        "2",
        "-subj",
        "/CN=iotgw test CA",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=localhost",
    )
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "2",
        "-extfile",
        str(ext),
    )
    return ca, cert, key


class Mosquitto:
    def __init__(self, directory: Path, *, tls: tuple[Path, Path, Path] | None = None) -> None:
        if not Path(MOSQUITTO).exists():
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        self.directory = directory
        self.port = free_port()
        self.tls = tls
        self.proc: subprocess.Popen | None = None
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {directory}/",
            "max_queued_messages 100000",  # the default 1000 silently drops bursts
            "user root",  # tests run as root; without this mosquitto drops to a user who cannot write here
            f"log_dest file {directory}/mosquitto.log",
        ]
        if tls:
            ca, cert, key = tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    log = (self.directory / "mosquitto.log").read_text()
                    raise RuntimeError(f"mosquitto exited: {log}") from None
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not open its port")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # a clean stop saves the persistent sessions
            self.proc.wait(timeout=10)
        self.proc = None


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> dict:
        return json.loads(self.payload)


class Recorder:
    """A subscriber with a persistent session (QoS 1), so a broker restart loses none of its messages."""

    def __init__(
        self,
        broker: Mosquitto,
        topics: list[str],
        *,
        client_id: str = "test-recorder",
        ca: Path | None = None,
    ) -> None:
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        if ca:
            self.client.tls_set(ca_certs=str(ca))
        self.client.reconnect_delay_set(0.2, 1)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: [c.subscribe(t, qos=1) for t in topics]
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert subscribed.wait(10), "the recorder could not subscribe"

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        with self._lock:
            self.messages.append(Received(message.topic, bytes(message.payload), bool(message.retain)))

    def on(self, predicate: Callable[[Received], bool]) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if predicate(m)]

    def wait(
        self, predicate: Callable[[Received], bool], count: int = 1, timeout: float = 20
    ) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.on(predicate)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"waited {timeout}s for {count} messages, got {len(self.on(predicate))}")

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()

    def publish(self, topic: str, payload: str | bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout}s")
