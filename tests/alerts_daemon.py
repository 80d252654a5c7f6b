"""A stand-in daemon for the kill test: starts ``Alerts`` against a broker, sends N alerts, says so, and waits
to be killed. Run as ``python tests/alerts_daemon.py DB_URL MQTT_URL N``."""

import sys
import time

from gateway.alerts import Alerts
from gateway.config import Config
from gateway.events import Alert
from gateway.store.db import Store


def main() -> None:
    db_url, mqtt_url, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = Config()
    cfg.gateway.name = "killtest"
    cfg.mqtt.url = mqtt_url
    alerts = Alerts(Store(db_url), cfg)
    alerts.start()
    for i in range(n):
        alerts.send(Alert("model_updated", time.time(), None, {"version": f"v{i}", "previous_version": None}))
    print("sent", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    main()
