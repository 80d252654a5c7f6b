"""Alert outbox costs: ``Alerts.send`` (one SQLite transaction) and the drain rate through a real mosquitto
(published with QoS 1, acknowledged, deleted). Prints one JSON object.

Usage: python benchmarks/alerts_outbox.py [N]   (N alerts, default 2000)
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.alerts import Alerts  # noqa: E402
from gateway.cli import interrupt_on_stop_signals, positive_count  # noqa: E402
from gateway.config import Config  # noqa: E402
from gateway.events import Alert  # noqa: E402
from gateway.store.db import Store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=positive_count, default=2000, metavar="N",
                        help="alerts to send (default 2000)")
    n = parser.parse_args().n
    interrupt_on_stop_signals()  # SIGTERM, too, stops mosquitto and removes the temporary directory
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        conf = Path(tmp) / "m.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n")
        cfg = Config()
        cfg.mqtt.url = f"mqtt://127.0.0.1:{port}"
        store = Store(f"sqlite:///{tmp}/iotgw.sqlite")
        alerts = Alerts(store, cfg)
        broker = None
        try:
            alerts.start()  # the broker is not up yet: everything waits in the outbox
            costs = []
            for i in range(n):
                t = time.perf_counter()
                data = {"version": str(i), "previous_version": None}
                alerts.send(Alert("model_updated", time.time(), None, data))
                costs.append(time.perf_counter() - t)
            broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
            alerts.link.connected.wait(120)  # paho's reconnect backoff is not what this measures
            t0 = time.perf_counter()
            while alerts.outbox.count():
                time.sleep(0.01)
            drain = time.perf_counter() - t0
        finally:
            alerts.stop(drain_s=0)
            if broker is not None:
                broker.terminate()
                broker.wait()
            store.close()
    costs.sort()
    print(json.dumps({
        "alerts": n,
        "send_mean_us": round(statistics.mean(costs) * 1e6, 1),
        "send_p99_us": round(costs[int(len(costs) * 0.99)] * 1e6, 1),
        "drain_s": round(drain, 2),
        "drain_alerts_per_s": round(n / drain, 1),
        "note": "shared, heavily loaded 2-core machine: compare runs side by side",
    }))


if __name__ == "__main__":
    main()
