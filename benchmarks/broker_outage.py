"""Broker outage at scale: alerts flow at a steady rate through the real durable outbox (``gateway.alerts``)
into a real mosquitto; the broker is stopped for ``--down-s`` seconds while alerts keep coming, then started
again. A subscriber with a persistent QoS 1 session counts what arrives. Prints one JSON object: sent,
received (distinct), lost (must be 0), duplicates (QoS 1 is at least once), whether the order was kept, the
outbox's peak and how long the backlog (every alert sent before the restart) took to arrive after the restart.

Usage: python benchmarks/broker_outage.py [--down-s 600] [--rate 10] [--before-s 10] [--after-s 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.alerts import Alerts  # noqa: E402
from gateway.cli import interrupt_on_stop_signals  # noqa: E402
from gateway.config import Config  # noqa: E402
from gateway.events import Alert  # noqa: E402
from gateway.store.db import Store  # noqa: E402


class Broker:
    """mosquitto with persistence, so the subscriber's session and its queued messages survive the restart."""

    def __init__(self, directory: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text("\n".join([
            f"listener {self.port} 127.0.0.1", "allow_anonymous true", "persistence true",
            f"persistence_location {directory}/", "max_queued_messages 1000000",  # the default 1000 drops
            "user root", f"log_dest file {directory}/mosquitto.log",
        ]) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit("mosquitto did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)


class Subscriber:
    """Records the sequence number of every alert delivered, in arrival order, and when each first arrived."""

    def __init__(self, port: int) -> None:
        self.seen: list[int] = []
        self.arrived: dict[int, float] = {}  # sequence number -> monotonic time of its first delivery
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="outage-counter", clean_session=False)
        self.client.reconnect_delay_set(0.2, 1)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("iotgw/+/event/federated_round", qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise SystemExit("the subscriber could not subscribe")

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001 - paho's callback signature
        with self._lock:
            number = json.loads(message.payload)["data"]["round"]
            self.seen.append(number)
            self.arrived.setdefault(number, time.monotonic())

    def distinct(self) -> list[int]:
        with self._lock:
            return list(dict.fromkeys(self.seen))

    def last_arrival(self, count: int) -> float | None:
        """When the last of alerts ``0 .. count - 1`` arrived; None while one of them is missing."""
        with self._lock:
            times = [self.arrived.get(i) for i in range(count)]
        return None if None in times else max(times, default=None)

    def deliveries(self) -> int:
        with self._lock:
            return len(self.seen)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run(down_s: float, rate: float, before_s: float, after_s: float, drain_timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="iotgw-outage-") as tmp:
        broker = Broker(Path(tmp))
        try:  # the broker is stopped however the run ends (an error, Ctrl-C, SIGTERM), even while starting
            broker.start()
            return measure(broker, Path(tmp), down_s, rate, before_s, after_s, drain_timeout_s)
        finally:
            broker.stop()


def measure(broker: Broker, tmp: Path, down_s: float, rate: float, before_s: float, after_s: float,
            drain_timeout_s: float) -> dict:
    """Send through the outbox across the outage; the figures the module docstring lists."""
    sub = Subscriber(broker.port)
    cfg = Config()
    cfg.gateway.name = "outage"
    cfg.mqtt.url = f"mqtt://127.0.0.1:{broker.port}"
    store = Store(f"sqlite:///{tmp}/iotgw.sqlite")
    alerts = Alerts(store, cfg)
    alerts.start()
    sent = 0
    peak = 0
    restarted_at = None
    backlog = 0  # alerts sent before the restart
    sampled = 0.0
    t0 = time.monotonic()
    stop_at, start_at, end_at = before_s, before_s + down_s, before_s + down_s + after_s
    try:
        while (elapsed := time.monotonic() - t0) < end_at:
            if broker.proc is not None and stop_at <= elapsed < start_at:
                broker.stop()
                broker.proc = None
            elif broker.proc is None and elapsed >= start_at:
                broker.start()
                restarted_at = time.monotonic()
                backlog = sent
            while sent < rate * elapsed:
                alerts.send(Alert("federated_round", time.time(), None,
                                  {"round": sent, "status": "finished", "error": None}))
                sent += 1
            if elapsed - sampled >= 1.0:
                sampled = elapsed
                peak = max(peak, alerts.outbox.count())
            time.sleep(0.01)
        deadline = time.monotonic() + drain_timeout_s
        while len(sub.distinct()) < sent and time.monotonic() < deadline:
            time.sleep(0.1)
        # The last acknowledgements reach the outbox a moment after the subscriber has the alerts.
        while alerts.outbox.count() and time.monotonic() < deadline:
            time.sleep(0.1)
        got = sub.distinct()
        return {
            "down_s": down_s,
            "rate_per_s": rate,
            "sent": sent,
            "received": len(got),
            "lost": sent - len(set(got) & set(range(sent))),
            "duplicates": sub.deliveries() - len(got),
            "order_kept": got == sorted(got),
            "outbox_peak": peak,
            "outbox_max": cfg.mqtt.outbox_max,
            "backlog": backlog,
            # From the restart to the arrival of the backlog's last alert. Not the end of the run: the sending
            # goes on for --after-s after the restart, and the backlog may arrive long before that.
            "backlog_delivered_s": round(max(0.0, last - restarted_at), 1)
            if restarted_at and (last := sub.last_arrival(backlog)) is not None else None,
            "outbox_left": alerts.outbox.count(),
            "note": "shared 2-core machine (other helpers' work ran alongside)",
        }
    finally:
        alerts.stop(drain_s=0)
        sub.close()
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--down-s", type=float, default=600, help="how long the broker stays down")
    parser.add_argument("--rate", type=float, default=10, help="alerts a second, before, during and after")
    parser.add_argument("--before-s", type=float, default=10)
    parser.add_argument("--after-s", type=float, default=10)
    parser.add_argument("--drain-timeout-s", type=float, default=300)
    args = parser.parse_args()
    interrupt_on_stop_signals()  # SIGTERM, too, stops mosquitto and removes the temporary directory
    print(json.dumps(run(args.down_s, args.rate, args.before_s, args.after_s, args.drain_timeout_s)))


if __name__ == "__main__":
    main()
