"""``Alerts``: what the daemon holds. It records every alert (history + durable outbox), publishes the outbox
over MQTT in order with QoS 1, deleting each row when the broker acknowledges it, keeps Home Assistant's
discovery and state topics current, obeys the quarantine switch and policy select, and turns the event stream
into presence and blocked-query summary alerts.

One thread of its own does the database and publishing work; paho's network thread only records acks,
connects and commands and wakes it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from gateway.alerts import homeassistant as ha
from gateway.alerts.blocked import BlockedSummariser
from gateway.alerts.mqtt import MqttLink, topic_id
from gateway.alerts.outbox import Outbox
from gateway.alerts.payloads import check, envelope
from gateway.alerts.presence import IDLE_TIMEOUT_S, CapturePresence, Presence
from gateway.config import Config
from gateway.devices import service as devices
from gateway.events import Alert, DnsQuery, Event
from gateway.store.db import Store
from gateway.store.querylog import counts_since
from gateway.store.schema import Device

log = logging.getLogger(__name__)

# Wall time and monotonic time between two ticks disagreeing by more than this is a clock jump, not scheduling.
CLOCK_JUMP_S = 10.0
# Alerts raised as a device is met, before the device tracker's next flush has stored it: their "device" block
# (its name, vendor, status for a Home Assistant automation's message) is read from the store when published.
AT_FIRST_SIGHT = frozenset({"new_device", "device_identified", "unknown_device"})
DEVICE_WAIT_MAX_S = 10.0
# The gateway ids (``[gateway] name`` as in topics) this store announced to Home Assistant, the current one last:
# after a rename, the retained configs and states under the earlier ones are cleared at every connection (a broker
# that was away at the first one still holds them). Bounded: a name dropped from it is left to clear by hand.
ANNOUNCED_SETTING = "ha_gateways"
ANNOUNCED_MAX = 10


@dataclass
class PolicyHooks:
    """What the policy store offers Home Assistant's policy select: the choices, a device's current one, and
    how to apply a choice. Supplied by the daemon so that this package needs no policy import."""

    options: Callable[[], Sequence[str]]
    current: Callable[[str], str | None]
    apply: Callable[[str, str], None]


class Alerts:
    def __init__(
        self,
        store: Store,
        cfg: Config,
        *,
        policy: PolicyHooks | None = None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        blocked_interval_s: float = 300.0,
        state_interval_s: float = 60.0,
        max_inflight: int = 100,
        presence_clock: str = "wall",
        device_wait_s: float | None = None,
    ) -> None:
        """``presence_clock``: "wall" (live), "capture" (a replay in time order: presence on the frames' times,
        ``CapturePresence``) or "frozen" (a replay out of time order: nobody goes offline).
        ``device_wait_s``: how long an alert of a device just met waits for the store to have the device (default
        two of the store's flushes and a second, at most ``DEVICE_WAIT_MAX_S``); the alerts after it wait too."""
        if presence_clock not in ("wall", "capture", "frozen"):
            raise ValueError(f"presence_clock {presence_clock!r}: expected 'wall', 'capture' or 'frozen'")
        self.store = store
        self.gateway = topic_id(cfg.gateway.name)
        self.gateway_name = cfg.gateway.name.strip() or self.gateway  # what Home Assistant shows
        self.prefix = cfg.mqtt.discovery_prefix
        self.ha_devices_max = cfg.mqtt.ha_devices_max
        self._left_out = 0  # devices beyond ha_devices_max at the last read; said once while there are any
        self.policy = policy
        self.state_interval_s = state_interval_s
        self.max_inflight = max_inflight
        self.device_wait_s = (min(2 * cfg.store.flush_interval_s + 1.0, DEVICE_WAIT_MAX_S)
                              if device_wait_s is None else device_wait_s)
        self._waiting: tuple[int, float] | None = None  # (outbox row, monotonic since) waiting for its device
        self.outbox = Outbox(store, max_rows=cfg.mqtt.outbox_max)
        self._wall = presence_clock == "wall"
        self.presence = (Presence(idle_timeout_s) if self._wall
                         else CapturePresence(idle_timeout_s, expiring=presence_clock == "capture"))
        self.blocked = BlockedSummariser(blocked_interval_s)
        self._feed_lock = (
            threading.Lock()
        )  # presence and summariser: fed by the daemon, expired by our thread
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Filled on paho's thread, emptied on ours (deque appends and pops are atomic).
        self._acks: deque[int] = deque()
        self._messages: deque[tuple[str, bytes]] = deque()
        self._todo_lock = threading.Lock()
        self._rediscover = False
        self._states_due = True
        self._changed: set[str] = set()
        self._removed: set[str] = set()
        self._inflight: dict[int, int] = {}  # paho message id -> outbox row id
        self._cursor = 0  # the newest outbox row handed to paho
        self._node_macs: dict[str, str] = {}
        self._retired: dict[str, str] = {}  # gateway id of an earlier [gateway] name -> that name as in topics
        self._online_elsewhere: set[str] = set()  # of those, the ids a gateway said online under (this connection)
        self._published: dict[str, str] = {}  # node id -> the discovery config this connection last sent
        self._states: dict[str, str] = {}  # node id -> the state this connection last sent
        self._counts: dict[str, tuple[int, int]] = {}  # MAC -> (queries, blocked) today at the last full read
        self._sync = False
        self._next_states = 0.0
        self._policy_failing = False  # logged once, not once per device and minute
        self._clock: tuple[float, float] | None = None  # (wall, monotonic) when the clock was last looked at
        self.link: MqttLink | None = None
        if cfg.mqtt.url:
            self.link = MqttLink(
                cfg.mqtt,
                cfg.gateway.name,
                subscriptions=[
                    ha.command_subscription(self.gateway),
                    f"{self.prefix}/status",
                    # Retained configs of ours for devices forgotten while the daemon was down: removed.
                    ha.discovery_topic(self.prefix, "+"),
                ],
                on_connect=self._link_connected,
                on_message=self._message,
                on_ack=self._ack,
                max_inflight=max_inflight,
            )

    # --- the daemon's side

    def start(self) -> None:
        # A replay's clock is not known yet: a stored device is offline since its last frame, for the capture to
        # tell whether it came back (CapturePresence.seen).
        now = time.time() if self._wall else math.inf
        for device in devices.list_devices(self.store):
            self.presence.seed(device.mac, device.last_seen, now)
        if self.link:
            self._retired = {ha.gateway_id(old): old for old in self._take_over_announcements()}
            # Subscribed first: the broker hands over an earlier name's status before its devices' configs.
            self.link.subscriptions[0:0] = [ha.status_topic(old) for old in self._retired.values()]
            self.link.start()
        self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)
        self._thread.start()

    def stop(self, drain_s: float = 3.0) -> None:
        """Summarise what is pending, give the broker ``drain_s`` to take the outbox, then disconnect.
        Whatever it did not acknowledge stays in the outbox for the next start."""
        with self._feed_lock:
            pending = self.blocked.flush(time.time(), all_windows=True)
        for alert in pending:
            self.send(alert)
        deadline = time.monotonic() + drain_s
        while self.link and self.link.connected.is_set() and time.monotonic() < deadline:
            if not self._inflight and self.outbox.count() == 0:
                break
            self._wake.set()
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)
        if self.link:
            self.link.stop()

    def _take_over_announcements(self) -> list[str]:
        """Record this gateway id as the one Home Assistant is told about; the earlier ones it was told about."""
        try:
            announced = [g for g in json.loads(self.store.get_setting(ANNOUNCED_SETTING) or "[]") if isinstance(g, str)]
        except (ValueError, TypeError):
            announced = []
        earlier = [g for g in announced if g != self.gateway][-(ANNOUNCED_MAX - 1):]
        if announced != [*earlier, self.gateway]:
            self.store.set_setting(ANNOUNCED_SETTING, json.dumps([*earlier, self.gateway]))
        if earlier:
            log.info("Home Assistant: clearing what was announced under the earlier gateway names %s",
                     ", ".join(earlier))
        return earlier

    def send(self, alert: Alert) -> None:
        """Record ``alert`` durably and wake the publisher. Thread-safe; one small transaction.

        Raises ValueError for an alert that breaks its kind's payload contract (``payloads.ALERT_FIELDS``).
        """
        check(alert)
        if self.outbox.put(alert, publish=self.link is not None):
            log.warning(
                "alert outbox full: dropped the oldest alerts (%d in all)", self.outbox.dropped_total()
            )
        self._wake.set()

    def observe(self, event: Event) -> None:
        """Feed every gateway event: presence from any packet, blocked-query summaries from DNS queries."""
        mac = getattr(event, "mac", None)
        if not mac:
            return
        with self._feed_lock:
            if self._wall:
                self._follow_clock(time.time())
                due = []
            else:
                due = self.presence.advance(event.ts)
            online = self.presence.seen(mac, event.ts)
            if isinstance(event, DnsQuery):
                self.blocked.add(event)
        if online is not None:
            due.append(online)
        for alert in due:
            self.send(alert)

    def device_changed(self, mac: str) -> None:
        """A device was added, renamed, identified or changed status: republish its discovery and state."""
        with self._todo_lock:
            self._changed.add(mac.lower())
        self._wake.set()

    def device_removed(self, mac: str) -> None:
        """A device was forgotten: remove its Home Assistant entities (empty retained config)."""
        with self._feed_lock:
            self.presence.forget(mac.lower())
        with self._todo_lock:
            self._removed.add(mac.lower())
            self._changed.discard(mac.lower())
        self._wake.set()

    def sync_devices(self) -> None:
        """Devices changed outside the daemon (web UI, CLI): republish what differs, remove what went."""
        with self._todo_lock:
            self._sync = True
        self._wake.set()

    def _follow_clock(self, now: float) -> None:
        """Under the feed lock: if the wall clock ``now`` jumped since the last call, move presence and summary
        windows with it. They are kept in wall time (packets carry it); a jump would otherwise read as every
        device idle (offline alerts for all, then online ones) or, backwards, as none for the jump's length.
        Also called for each observed event, so that packets stamped after a jump meet shifted times."""
        mono = time.monotonic()
        if self._clock is not None:
            jump = (now - self._clock[0]) - (mono - self._clock[1])
            if abs(jump) > CLOCK_JUMP_S:
                log.warning("alerts: the clock jumped %+.0f s; presence and summaries follow it", jump)
                self.presence.shift(jump)
                self.blocked.shift(jump)
        self._clock = (now, mono)

    # --- paho's thread: record and wake

    def _link_connected(self) -> None:
        self._online_elsewhere.clear()  # the broker hands the retained statuses over again
        self._connected()

    def _connected(self) -> None:
        with self._todo_lock:
            self._rediscover = True
            self._states_due = True
        self._wake.set()

    def _message(self, topic: str, payload: bytes, retained: bool) -> None:
        # A discovery config that is not retained is the echo of one we (or another client) just sent, not
        # one left on the broker: checked against the device table it would unpublish a device deleted since.
        if retained or not topic.startswith(f"{self.prefix}/device/"):
            self._messages.append((topic, payload))
        self._wake.set()

    def _ack(self, mid: int) -> None:
        self._acks.append(mid)
        self._wake.set()

    # --- our thread

    def _run(self) -> None:
        last_tick = 0.0
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            try:
                if time.monotonic() - last_tick >= 1.0:
                    last_tick = time.monotonic()
                    self._tick(time.time())
                self._take_acks()
                if self.link and self.link.connected.is_set():
                    self._handle_messages()
                    self._discovery()
                    self._pump()
            except Exception:  # a locked database or a broken hook must not end alerting
                log.exception("alerts: publisher step failed; retrying")
                self._stop.wait(1.0)

    def _tick(self, now: float) -> None:
        with self._feed_lock:
            if self._wall:  # a replay's presence moves with its frames (observe), never with the wall clock
                self._follow_clock(now)
                due = self.presence.expire(now) + self.blocked.flush(now)
            else:
                due = self.blocked.flush(now)
        for alert in due:
            self.send(alert)

    def _take_acks(self) -> None:
        done = []
        while self._acks:
            row = self._inflight.pop(self._acks.popleft(), None)
            if row is not None:
                done.append(row)
        self.outbox.remove(done)

    def _pump(self) -> None:
        room = self.max_inflight - len(self._inflight)
        if room <= 0:
            return
        rows = self.outbox.pending(self._cursor, room)
        if not rows:
            return
        known = self._device_blocks({r.mac for r in rows if r.mac})
        for row in rows:
            device = known.get(row.mac or "")
            if device is None and row.kind in AT_FIRST_SIGHT and row.mac and not self._waited(row.id):
                break  # and the alerts after it, to keep the order; the next pass (within a second) looks again
            alert = Alert(row.kind, row.ts, row.mac, row.data)
            payload = envelope(alert, self.gateway, device)
            mid = self.link.publish(ha.event_topic(self.gateway, row.kind), payload)
            self._inflight[mid] = row.id
            self._cursor = self.outbox.handed_over = row.id

    def _waited(self, row_id: int) -> bool:
        """Whether the alert ``row_id``, whose device the store does not have, has waited ``device_wait_s`` for it:
        then it goes without (the device was forgotten, or made no room) rather than hold every alert after it."""
        now = time.monotonic()
        if self._waiting is None or self._waiting[0] != row_id:
            self._waiting = (row_id, now)
        return now - self._waiting[1] >= self.device_wait_s

    def _device_blocks(self, macs: set[str]) -> dict[str, dict[str, Any]]:
        if not macs:
            return {}
        with self.store.session() as s:
            rows = s.scalars(select(Device).where(Device.mac.in_(macs)))
            return {
                d.mac: {
                    "name": d.name,
                    "vendor": d.vendor,
                    "manufacturer": d.manufacturer,
                    "device_type": d.device_type,
                    "category": d.category,
                    "status": d.status,
                }
                for d in rows
            }

    def _handle_messages(self) -> None:
        nodes_read = False
        while self._messages:
            topic, payload = self._messages.popleft()
            if topic == f"{self.prefix}/status":
                if payload.strip() == b"online":  # Home Assistant (re)started: it forgot non-retained state
                    self._connected()
                continue
            if retired := self._retired_status(topic):
                self._retire(retired, payload)
                continue
            if topic.startswith(f"{self.prefix}/device/"):
                if payload and not nodes_read:
                    # The cached map may predate a deletion (retained configs met before the reconnect's
                    # rediscovery) and would keep a ghost: read once per batch, not once per config.
                    self._read_nodes()
                    nodes_read = True
                self._check_retained_config(topic, payload)
                continue
            parsed = ha.parse_command(self.gateway, topic)
            if parsed is None:
                continue
            mac = self._mac_of(parsed[0])
            if mac is None:
                log.warning("MQTT command for unknown device %r ignored", parsed[0])
                continue
            try:
                self._command(mac, parsed[1], payload.decode("utf-8", "replace").strip())
            except Exception:
                log.exception("MQTT command %s on %s failed", parsed[1], mac)

    def _retired_status(self, topic: str) -> str | None:
        """The earlier gateway name whose status ``topic`` is, if it is one."""
        return next((old for old in self._retired.values() if topic == ha.status_topic(old)), None)

    def _retire(self, old: str, status: bytes) -> None:
        """The broker's retained status of the earlier gateway name ``old``: unless a gateway is online under it
        (another home's on the same broker, named as this one was), clear what was announced under it. Its
        devices' configs are cleared as the broker hands them over (``_check_retained_config``)."""
        if not status:
            return
        if status.strip() == b"online":
            log.warning("Home Assistant: a gateway is online under the earlier name %r; what it announced is "
                        "left alone", old)
            self._online_elsewhere.add(ha.gateway_id(old))
            return
        self._online_elsewhere.discard(ha.gateway_id(old))
        self.link.publish(ha.discovery_topic(self.prefix, ha.gateway_id(old)), b"", retain=True)
        self.link.publish(ha.gateway_state_topic(old), b"", retain=True)
        self.link.publish(ha.status_topic(old), b"", retain=True)

    def _command(self, mac: str, what: str, value: str) -> None:
        if what == "quarantine":
            if value not in ("ON", "OFF"):
                log.warning("quarantine command %r for %s ignored: ON or OFF", value, mac)
                return
            device = devices.get_device(self.store, mac).device
            if (device.status == "quarantined") == (value == "ON"):
                self.device_changed(mac)  # Home Assistant's view may be stale: tell it again
                return
            # set_status raises the alert, as for a change from the web UI or the API.
            devices.set_status(self.store, mac, "quarantined" if value == "ON" else "approved",
                               by="home_assistant", publish=True)
            self.device_changed(mac)
        elif what == "policy" and self.policy is not None:
            if value not in self.policy.options():
                log.warning("policy command %r for %s ignored: not one of the options", value, mac)
                return
            self.policy.apply(mac, value)
            self.device_changed(mac)
        else:
            log.warning("MQTT command %r for %s ignored", what, mac)

    def _check_retained_config(self, topic: str, payload: bytes) -> None:
        """A discovery config on the broker: if it is one of ours (hangs under this gateway) for a device the
        store no longer has, remove it."""
        if not payload:
            return
        node_id = topic.split("/")[-2]
        try:
            via = json.loads(payload).get("device", {}).get("via_device")
        except (ValueError, AttributeError):
            return
        # The map was read for this batch of messages: a miss is a ghost (or beyond ha_devices_max), and reading
        # the device table again for each of thousands of retained configs would stall the publisher.
        if via == ha.gateway_id(self.gateway) and node_id not in self._node_macs:
            log.info("removing Home Assistant entities of forgotten device %s", node_id)
            self.link.publish(topic, b"", retain=True)
            self.link.publish(ha.state_topic(self.gateway, node_id), b"", retain=True)
            self._published.pop(node_id, None)
            self._states.pop(node_id, None)
        elif via in self._retired and via not in self._online_elsewhere:
            # announced under an earlier [gateway] name, and announced again under this one
            self.link.publish(topic, b"", retain=True)
            self.link.publish(ha.state_topic(self._retired[via], node_id), b"", retain=True)

    def _mac_of(self, node_id: str) -> str | None:
        if node_id not in self._node_macs:
            self._read_nodes()
        return self._node_macs.get(node_id)

    def _read_nodes(self) -> list[Device]:
        """The devices announced to Home Assistant now, their node id -> MAC map kept."""
        return self._announced(devices.list_devices(self.store))

    def _announced(self, listed: list[Device]) -> list[Device]:
        """Of every device in the store, those Home Assistant gets (at most ``ha_devices_max``: approved ones
        first, then the oldest, so a later flood of spoofed MACs never pushes a known device out); keeps their
        node id -> MAC map and says once when some are left out."""
        chosen = sorted(listed, key=lambda d: (d.status != "approved", d.first_seen, d.mac))[: self.ha_devices_max]
        self._node_macs = {ha.device_id(self.gateway, d.mac): d.mac for d in chosen}
        self._note_left_out(len(listed) - len(chosen))
        return chosen

    def _note_left_out(self, count: int) -> None:
        if count and not self._left_out:
            log.warning("Home Assistant: [mqtt] ha_devices_max = %d reached; %d more devices are not announced "
                        "(they are in the web UI)", self.ha_devices_max, count)
        self._left_out = count

    def _discovery(self) -> None:
        with self._todo_lock:
            everything, self._rediscover = self._rediscover, False
            full, self._sync = everything or self._sync, False
            changed, self._changed = self._changed, set()
            removed, self._removed = self._removed, set()
            states_due = self._states_due or time.monotonic() >= self._next_states
            self._states_due = False
        try:
            self._publish_todo(everything, full, changed, removed, states_due)
        except BaseException:
            # A pass that fails (the database is locked or unreadable) is retried whole by the next one: taken
            # and lost, a deleted device's removal would leave it in Home Assistant until the next full resync.
            with self._todo_lock:
                self._rediscover |= everything
                self._sync |= full
                self._changed |= changed
                self._removed |= removed
                self._states_due |= states_due
            raise

    def _publish_todo(self, everything: bool, full: bool, changed: set[str], removed: set[str],
                      states_due: bool) -> None:
        options = list(self.policy.options()) if self.policy else None
        if everything:  # a new connection or a restarted Home Assistant: send it all again
            self._published.clear()
            self._states.clear()
            self._publish_json(*ha.gateway_discovery(self.gateway, self.prefix, self.gateway_name))
        if full:
            for device in self._read_nodes():
                self._publish_config(device, options)
                if not states_due:  # a label, a name or a quarantine set in the web UI shows at once, not in a minute
                    self._publish_device_state(device, self._counts.get(device.mac, (0, 0)))
        gone = {ha.device_id(self.gateway, mac) for mac in removed}
        if full:
            gone |= set(self._published) - set(self._node_macs)
        for nid in gone:
            self.link.publish(ha.discovery_topic(self.prefix, nid), b"", retain=True)
            self.link.publish(ha.state_topic(self.gateway, nid), b"", retain=True)
            self._node_macs.pop(nid, None)
            self._published.pop(nid, None)
            self._states.pop(nid, None)
        for mac in changed - removed:
            try:
                device = devices.get_device(self.store, mac).device
            except devices.NotFound:
                continue
            nid = ha.device_id(self.gateway, device.mac)
            if nid not in self._node_macs:
                if len(self._node_macs) >= self.ha_devices_max:
                    self._note_left_out(max(self._left_out, 1))  # the next full pass counts them all
                    continue
                self._node_macs[nid] = device.mac  # announced now: counts against the bound until the next read
            self._publish_config(device, options)
            if not states_due:
                # A device changes at every flush of its packets (its last_seen). Its counters, one read of the
                # whole day's query log (0.5 to 0.9 s at 200,000 queries on this project's 2-core test machine),
                # were read again for each changed device, pass after pass, and sent each time: a state every 2 s
                # per active device, each a row in Home Assistant's recorder. They follow once a minute instead.
                self._publish_device_state(device, self._counts.get(device.mac, (0, 0)))
        if states_due:
            self._publish_states()

    def _publish_config(self, device: Device, options: list[str] | None) -> None:
        """A device's discovery config, unless this connection already sent exactly this one."""
        topic, payload = ha.device_discovery(self.gateway, self.prefix, device, options)
        nid = ha.device_id(self.gateway, device.mac)
        text = json.dumps(payload, separators=(",", ":"))
        self._node_macs[nid] = device.mac
        if self._published.get(nid) != text:
            self.link.publish(topic, text, retain=True)
            self._published[nid] = text

    def _publish_states(self) -> None:
        self._next_states = time.monotonic() + self.state_interval_s
        listed = devices.list_devices(self.store)
        counts = self._counts = counts_since(self.store, _midnight())
        for device in self._announced(listed):
            self._publish_device_state(device, counts.get(device.mac, (0, 0)))
        self._publish_json(
            ha.gateway_state_topic(self.gateway),
            {
                "devices": len(listed),
                "online": sum(self.presence.is_online(d.mac) for d in listed),
                "queries_today": sum(q for q, _ in counts.values()),
                "blocked_today": sum(b for _, b in counts.values()),
                "outbox": self.outbox.count(),
                "alerts_dropped": self.outbox.dropped_total(),
            },
        )

    def _publish_device_state(self, device: Device, counts: tuple[int, int]) -> None:
        state = ha.device_state(
            device,
            online=self.presence.is_online(device.mac),
            queries=counts[0],
            blocked=counts[1],
            policy=self._current_policy(device.mac),
        )
        nid = ha.device_id(self.gateway, device.mac)
        text = json.dumps(state, separators=(",", ":"))
        if self._states.get(nid) != text:  # what it shows changed (or this connection has not sent it yet)
            self.link.publish(ha.state_topic(self.gateway, nid), text, retain=True)
            self._states[nid] = text

    def _current_policy(self, mac: str) -> str | None:
        """The device's policy for its state, or None while the hook fails (a policy file being edited by
        hand): one unreadable policy must not keep presence and counters of every device from Home Assistant."""
        if self.policy is None:
            return None
        try:
            policy = self.policy.current(mac)
        except Exception as exc:
            if not self._policy_failing:
                log.warning("alerts: the device policy cannot be read (%s); states go out without it", exc)
            self._policy_failing = True
            return None
        self._policy_failing = False
        return policy

    def _publish_json(self, topic: str, payload: dict[str, Any]) -> None:
        self.link.publish(topic, json.dumps(payload, separators=(",", ":")), retain=True)


def _midnight() -> float:
    """The start of today, local time: what "today" means on the owner's dashboard."""
    return datetime.now().replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
