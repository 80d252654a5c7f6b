"""What every view needs: the store and the configuration."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from gateway.config import Config
from gateway.store.db import Store


@dataclass
class WebContext:
    store: Store
    cfg: Config


def ctx() -> WebContext:
    return current_app.extensions["iotgw"]
