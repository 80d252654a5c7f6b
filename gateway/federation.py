"""The gateway's side of federated retraining: what the home trains on, and what it tells the owner.

``export_windows`` writes the devices the owner confirmed or corrected in the web UI (``Device.label_*``),
each with its stored observation window, in the ClientApp's input format (``identifier.federated.homedata``).
Unconfirmed identifications are added as pseudo-labels only when asked (``pseudo_labels``), and only those at
least ``PSEUDO_MIN_CONFIDENCE`` sure. ``RoundAlerts`` turns the ClientApp's round log into ``federated_round``
and ``model_updated`` alerts in the durable outbox, as the entries appear; the daemon publishes them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import and_, or_, select

from gateway.alerts.outbox import Outbox
from gateway.alerts.payloads import check
from gateway.config import Config
from gateway.events import Alert
from gateway.overview import FEDERATION_SETTING
from gateway.statedir import create_private, write_private
from gateway.store.db import Store
from gateway.store.schema import Device, ObservationWindow
from identifier.dataset import LabelledWindow
from identifier.federated import homedata
from identifier.observation import from_json

PSEUDO_MIN_CONFIDENCE = 0.95  # calibrated device-type probability; the daemon commits at 0.9


@dataclass(frozen=True)
class Exported:
    owner: int  # devices the owner confirmed or corrected
    pseudo: int  # unconfirmed confident identifications (only with pseudo-labels on)
    without_window: int  # labelled devices with no stored observation window (nothing to learn from)


def export_windows(store: Store, path: Path, *, pseudo_labels: bool = False) -> Exported:
    """Write this home's training windows to ``path`` (JSON lines, replaced atomically)."""
    labelled = or_(
        Device.label_manufacturer.is_not(None),
        Device.label_device_type.is_not(None),
        Device.label_category.is_not(None),
    )
    with_window = select(Device, ObservationWindow).join(ObservationWindow, ObservationWindow.mac == Device.mac)
    lines: list[str] = []
    with store.session() as s:
        n_labelled = len(s.scalars(select(Device.mac).where(labelled)).all())
        for device, window in s.execute(with_window.where(labelled).order_by(Device.mac)):
            labels = (device.label_manufacturer, device.label_device_type, device.label_category)
            lines.append(homedata.to_line(_window(device, window, *labels), "owner"))
        owner = len(lines)
        if pseudo_labels:
            confident = and_(
                ~labelled,
                Device.known.is_(True),
                Device.device_type.is_not(None),
                Device.confidence >= PSEUDO_MIN_CONFIDENCE,
            )
            for device, window in s.execute(with_window.where(confident).order_by(Device.mac)):
                labels = (device.manufacturer, device.device_type, device.category)
                lines.append(homedata.to_line(_window(device, window, *labels), "pseudo"))
    # The household's devices and traffic: private, and the service user's even when root runs the join.
    create_private(path.parent, directory=True)
    write_private(path, "".join(line + "\n" for line in lines).encode("utf-8"))
    return Exported(owner, len(lines) - owner, n_labelled - owner)


def _window(
    device: Device, window: ObservationWindow, manufacturer: str | None, device_type: str | None,
    category: str | None,
) -> LabelledWindow:
    return LabelledWindow(
        [from_json(o) for o in window.observations],
        device.mac,
        window.started_at,
        manufacturer,
        device_type,
        category,
        group=device.mac,
        source="gateway",
        timed=True,
    )


def outbox_sender(store: Store, cfg: Config) -> Callable[[Alert], None]:
    """Record an alert the way the daemon does (checked against its payload contract, history + durable
    outbox); the running daemon's publisher sends it over MQTT when MQTT is configured. A round's outcome is
    also kept as the last round, which the web UI's model page shows."""
    # Never trims: the daemon's publisher may hold the oldest rows with paho, and only it knows which (a few
    # alerts a night; its next alert trims the outbox to the bound).
    outbox = Outbox(store, max_rows=cfg.mqtt.outbox_max, trims=False)

    def send(alert: Alert) -> None:
        check(alert)
        outbox.put(alert, publish=bool(cfg.mqtt.url))
        if alert.kind == "federated_round":
            at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(alert.ts))
            store.set_setting(FEDERATION_SETTING, json.dumps({**alert.data, "at": at}))

    return send


class RoundAlerts:
    """Follows a home's ``rounds.log`` (written by the ClientApp) and raises, as entries appear:

    - ``federated_round`` when a round ends for this home: ``ok`` once it reaches the unmask stage (its masked
      update is in the sum), ``failed`` when a round it began stops short (a later round starts, or the
      window ends), with the last stage it reached;
    - ``model_updated`` when the home installs a new global model.

    Only entries written after it was created count: earlier nights were reported then. ``say``, when given,
    is told each outcome in a line of words, a model the home refused included (no alert: nothing changed),
    for whoever watches the join: its console, or the journal of the nightly unit.
    """

    def __init__(
        self, log_path: Path, send: Callable[[Alert], None], say: Callable[[str], None] | None = None
    ) -> None:
        self.log_path = log_path
        self.send = send
        self.say = say or (lambda line: None)
        self.offset = log_path.stat().st_size if log_path.exists() else 0
        self.open: dict[tuple[int, int], str] = {}  # (run, round) -> last stage reached

    def poll(self) -> None:
        if not self.log_path.exists():
            return
        with self.log_path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(complete)
        for line in complete.decode("utf-8", "replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            self._entry(entry)

    def finish(self) -> None:
        """The window ended: rounds still open did not complete here."""
        self.poll()
        for key in list(self.open):
            self._close(key, "failed")

    def _entry(self, entry: dict) -> None:
        ts = float(entry.get("ts", time.time()))
        if entry.get("event") == "stage":
            key = (int(entry.get("run", 0)), _round_number(entry.get("round")))
            for other in [k for k in self.open if k != key]:
                self._close(other, "failed", ts)
            self.open[key] = str(entry["stage"])
            if entry["stage"] == "unmask":
                self._close(key, "ok", ts)
        elif entry.get("event") == "install" and entry.get("installed"):
            data = {
                "version": str(entry["version"]),
                "previous_version": entry.get("previous_version"),
                "round": entry.get("round"),
                "accuracy": entry.get("accuracy"),
                "accuracy_before": entry.get("accuracy_before"),
            }
            self.send(Alert("model_updated", ts, None, data))
            self.say(
                f"model {data['version']} installed (was {data['previous_version']}){_accuracies(entry)}; "
                "`iotgw federation rollback` puts the one before back"
            )
        elif entry.get("event") == "install":
            self.say(f"model of round {entry.get('round')} not installed: {entry.get('reason')}{_accuracies(entry)}")

    def _close(self, key: tuple[int, int], status: str, ts: float | None = None) -> None:
        stage = self.open.pop(key)
        error = None if status == "ok" else f"stopped after the {stage} stage"
        data = {"round": key[1], "status": status, "error": error, "run_id": key[0]}
        self.send(Alert("federated_round", ts or time.time(), None, data))
        outcome = "ok, this home's masked update is in the sum" if status == "ok" else f"failed, {error}"
        self.say(f"round {key[1]} of run {key[0]}: {outcome}")


def _accuracies(entry: dict) -> str:
    """The install decision's figures, as the round log has them (None when there was nothing to compare)."""
    before, after = entry.get("accuracy_before"), entry.get("accuracy")
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)):
        return ""
    return f" (accuracy on this home's confirmed devices {before:.3f} before, {after:.3f} with it)"


def _round_number(group_id: object) -> int:
    try:
        return int(str(group_id))
    except ValueError:
        return 0
