"""What every view needs: the store, the configuration and the sources the lead wires in (alerts)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flask import current_app

from gateway.config import Config
from gateway.events import Alert
from gateway.store.db import Store

AlertSource = Callable[[Store, int], list[Alert]]  # (store, limit) -> newest first


@dataclass
class WebContext:
    store: Store
    cfg: Config
    alerts: AlertSource


def ctx() -> WebContext:
    return current_app.extensions["iotgw"]
