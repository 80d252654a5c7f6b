"""Alerts: the durable outbox, MQTT publishing, Home Assistant discovery, presence and blocked summaries."""

from gateway.alerts.blocked import BlockedSummariser
from gateway.alerts.outbox import Outbox, recent_alerts
from gateway.alerts.presence import Presence
from gateway.alerts.publisher import Alerts, PolicyHooks

__all__ = ["Alerts", "BlockedSummariser", "Outbox", "PolicyHooks", "Presence", "recent_alerts"]
