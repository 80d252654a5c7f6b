"""The daemon: wires packet sources (DNS server, sniffer, replay, virtual devices) to the device tracker, the
identifier, the policy engine, the query log and the alerts.

The DNS hot path only asks the tracker for a MAC, asks the policy for a verdict and appends an event to a
queue. Everything else (tracking, identification, writes, alerts) runs in the consumer, off the hot path,
on the same event loop; database writes go to threads: the flush's to a worker thread, the alerts' (history,
outbox, presence) to the alert thread, so a locked or slow database never stalls DNS answers.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import queue
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter

from sqlalchemy import and_, func, select
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from gateway import sdnotify
from gateway.alerts import Alerts, PolicyHooks
from gateway.config import Config
from gateway.devices.neighbours import NeighbourTable, read_default_routers
from gateway.devices.service import ROUTER_SETTING, confirmed_types
from gateway.devices.tracker import Change, DeviceTracker, TrackerBatch, owner_touched
from gateway.events import AddressSeen, Alert, Counters, DnsQuery, Event
from gateway.filtering import Filtering
from gateway.observations import to_observation
from gateway.overview import UNTRACKED_SETTING
from gateway.policies import MODES, device_mode, set_device_mode
from gateway.store.db import Store
from gateway.store.querylog import QueryLogWriter
from gateway.store.schema import Device, Identification, ObservationWindow
from identifier.observation import from_json, to_json
from identifier.oui import vendor as oui_vendor

log = logging.getLogger(__name__)

WINDOW_S = 60.0  # how long after a device's first packet its traffic feeds identification
# Events waiting for the consumer. A home sends tens of queries a second; this bound only bites under a flood,
# where it keeps a Pi's memory in check (about 1 kB an event) at the cost of query-log rows, which are counted.
QUEUE_MAX = 50_000
# What a window keeps, and all identification sees of it: far more than a device sends in its first minute,
# and a bound on what a chatty (or flooding) device costs in memory and in model updates.
WINDOW_MAX_OBS = 2000
# The same in JSON characters: a device chooses its mDNS names, and packets of compressed 255-character names made
# a window of 2000 observations about 22 MB, held in memory and rewritten to the store at every flush of its
# minute. A home device's first minute is tens of kB; 2000 DNS queries of long names stay below this.
WINDOW_MAX_CHARS = 1_000_000
LOG_CHUNK = 1024  # queries handed to the query log at once: one lock round each, and its writer woken in time
# Events and alerts waiting for the alert thread (presence, history, outbox). It waits on the database (up to its
# busy timeout when another process holds the write lock); beyond this, events are only counted (presence is
# refreshed by the next packet) while alerts are still queued (a few per device).
ALERT_FEED_MAX = 50_000
# A client first met by its address alone is most often a device whose neighbour entry the kernel had not made yet
# (a new lease, a new IPv6 privacy address): its MAC is known a moment later. Its new-device alert waits this long,
# so the owner hears of the device once, under its MAC, rather than of a stranger that was no stranger.
ANNOUNCE_GRACE_S = 3.0
# How often the gateway looks up its own router (the default route's next hop and its MAC in the neighbour table).
ROUTER_CHECK_S = 30.0
# A new model re-identifies the home's devices from their stored windows this many at a time, each round in a
# worker thread: the windows of one round are in memory together (each up to WINDOW_MAX_CHARS of JSON), and
# between rounds the event loop has the GIL to itself for DNS and capture.
REIDENTIFY_BATCH = 16
# ... and after each round the pass rests as long as the round took: its worker thread holds the GIL for most of
# a round, and every hand-off of a DNS answer's path waits for it (up to the 5 ms switch interval each), so on a
# Pi the pass takes at most half the interpreter's time, in exchange for taking twice as long (a rare event).
REIDENTIFY_REST = 1.0
# ... and devices whose answer was not written when it read them are read again after the next flush, which it
# looks for this often.
REIDENTIFY_FLUSH_POLL_S = 0.25
# A pass that failed (a full disk, an error) is tried again after this long, not only at the next start.
REIDENTIFY_RETRY_S = 600.0
# The model version the home's devices were last re-identified with (a setting): a daemon started on another one
# (installed or rolled back while it was stopped, or stopped part-way through a pass) re-identifies them then.
IDENTIFIED_BY_SETTING = "identified_by_model"
# What presence (online/offline) is timed by: the wall clock live; in a replay the capture's own times, which in
# a replay out of time order cannot tell a device's silence from frames still to come (``Alerts``).
PRESENCE_CLOCKS = {None: "wall", True: "capture", False: "frozen"}


@dataclass(frozen=True)
class Removed:
    """On the alert feed: a device forgotten (deleted by the owner, or merged into its MAC). It travels behind the
    events queued before it, which would otherwise mark the device present again after its removal."""

    key: str


class Gateway:
    def __init__(self, cfg: Config, store: Store, *, firewall: bool = False,
                 replay_in_order: bool | None = None) -> None:
        """``replay_in_order`` is None for live capture, else whether the replay's frames are in time order
        (``gateway.capture.replay.timeline``): then windows and presence follow the capture's clock."""
        self.cfg = cfg
        # Frames in time order (live capture's always are): a device's packet past its window means its window is
        # over. Out of order, an earlier packet may still come, so such a window closes when the replay ends.
        self._in_order = replay_in_order is not False
        self._replay = replay_in_order is not None
        self.store = store
        self.counters = Counters()
        self.neighbours = NeighbourTable()
        self._neighbour_missed = False
        self.tracker = DeviceTracker(store, neighbour_lookup=self._neighbour_mac, counters=self.counters,
                                     max_devices=cfg.devices.max, state_dir=cfg.state_dir)
        self._said_too_many = False
        self._untracked_noted = -1  # devices_untracked as last written to UNTRACKED_SETTING
        self.routers: frozenset[str] = frozenset()  # MACs of the gateway's own router (see _find_routers)
        self._routers_due = 0.0  # monotonic time of the next look
        self._routers_retry = 1.0  # seconds to the next look while a next hop has no neighbour entry (doubling)
        self._said_no_routes = False
        self.querylog = QueryLogWriter(store, flush_interval_s=cfg.store.flush_interval_s,
                                       days=cfg.store.querylog_days, max_rows=cfg.store.querylog_max_rows)
        self.identifier = load_identifier(cfg)
        self._teach_confirmed(self.identifier)
        self._model_stamp = model_stamp(cfg)
        state_dir = cfg.state_dir
        self.alerts = Alerts(store, cfg, policy=PolicyHooks(
            options=lambda: MODES,
            current=lambda mac: device_mode(state_dir, mac),
            apply=lambda mac, mode: set_device_mode(state_dir, mac, mode),  # the daemon reloads it within 0.5 s
        ), presence_clock=PRESENCE_CLOCKS[replay_in_order])
        profiles = self.identifier.profiles() if self.identifier is not None else None
        self.filtering = Filtering(store, cfg.state_dir, profiles=profiles, firewall=firewall, counters=self.counters)
        self.dns = None
        self.sniffer = None
        self._queue: deque[Event] = deque()
        self._tasks: list[asyncio.Task] = []
        self._sessions: dict[str, object] = {}  # device key -> identifier session, during its window
        self._windows: dict[str, list[dict]] = {}  # device key -> observations (JSON) of its first seconds
        self._window_start: dict[str, float] = {}
        self._window_due: dict[str, float] = {}  # device key -> monotonic time its window closes by itself
        self._window_chars: dict[str, int] = {}  # device key -> JSON characters its window holds
        self._pending_identities: list[tuple[str, float, object]] = []  # written by the next flush
        self._merged_since_take: dict[str, str] = {}  # address key -> MAC, merged while a flush is being written
        self._closed_windows: list[tuple[str, float, list[dict]]] = []
        self._changed_windows: set[str] = set()  # open windows with observations the store has not seen
        self._announce_due: dict[str, tuple[float, Alert]] = {}  # address key -> (monotonic due, its new_device)
        self._store_failing = False  # the configuration database refused a write (full disk) and has not since
        # What the alert thread records, in the consumer's order; None ends it.
        self._alert_feed: queue.SimpleQueue[Event | Alert | Removed | None] = queue.SimpleQueue()
        self._alert_thread: threading.Thread | None = None
        self._closing = asyncio.Event()  # stop() asks the flush loop to end after the write under way
        self._flusher: asyncio.Task | None = None
        self._reidentifying: asyncio.Task | None = None  # the pass of the latest model over the stored windows
        self._reidentify_stop = threading.Event()  # asks that pass's worker thread to end after its device
        self._reidentify_retry: float | None = None  # when (monotonic) to try again a pass that failed
        self._writing: frozenset[str] = frozenset()  # devices with answers or windows in the write under way
        self._flushes = 0  # writes ended (stored or not): the pass waits for one to read what it held

    # -- sources ----------------------------------------------------------------------------------------
    def ingest(self, events: list[Event]) -> None:
        """Hand events to the consumer; safe from any thread (sniffer, replay, virtual devices)."""
        if len(self._queue) >= QUEUE_MAX:
            self.counters.add("events_dropped", len(events))
            return
        self._queue.extend(events)

    def emit_query(self, query: DnsQuery) -> None:
        """The DNS server's per-query callback: the cheapest possible hand-off."""
        if len(self._queue) >= QUEUE_MAX:  # a flood outruns the consumer: answer on, log what fits, count the rest
            self.counters.add("events_dropped")
            return
        self._queue.append(query)

    # -- lifecycle --------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.querylog.start()
        self.alerts.start()
        self._alert_thread = threading.Thread(target=self._record_alerts, name="alert-feed", daemon=True)
        self._alert_thread.start()
        self.filtering.open_firewall()
        await asyncio.to_thread(self.filtering.refresh)
        await self._check_routers()
        await asyncio.to_thread(self._keep_owned)
        self._tasks.append(asyncio.create_task(self._consume(), name="consumer"))
        self._tasks.append(asyncio.create_task(self._refresh_loop(), name="refresh"))
        self._flusher = asyncio.create_task(self._flush_loop(), name="flush")
        await self._start_dns()
        self._start_sniffer()
        await self._reidentify_if_new(self.identifier)

    async def stop(self, capture_ended: bool = False) -> None:
        """``capture_ended``: a replay read its files to the end, so every window still open is answered; a replay
        stopped part-way (Ctrl-C) leaves them unanswered rather than store a guess from half a window, which a
        later full replay would find already made."""
        if self.dns is not None:
            await self.dns.stop()
        if self.sniffer is not None:
            self.sniffer.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._end_reidentifying()  # its worker thread writes to the store: done before the store closes
        if self._flusher is not None:
            # Not cancelled: its write goes on in a worker thread, and only the loop takes back (or writes device
            # by device) a batch the store refused. The final write below must also come after it, not race it.
            self._closing.set()
            await asyncio.gather(self._flusher, return_exceptions=True)
        self._drain()
        if self._replay and capture_ended:
            # The capture is over: every window still open is answered, as `iotgw identify` answers a device whose
            # capture ends within its window (a fast replay ends long before the wall clock would close it) and
            # out of order as soon as nothing earlier can come.
            for key in list(self._window_start):
                self._close_window(key)
        for _, alert in self._announce_due.values():  # still in their grace: announced rather than lost
            self.alert(alert)
        self._announce_due.clear()
        if self._alert_thread is not None:  # what the consumer saw is recorded before the alerts stop
            self._alert_feed.put(None)
            await asyncio.to_thread(self._alert_thread.join)
        try:  # the flush loop's own handling: a refused row costs only its device, and never the query log
            if not await self._flush():
                log.error("store: device changes made since the last write are lost (the store cannot be written)")
        finally:
            self.querylog.stop()
            self.alerts.stop()
            self.filtering.close()

    async def _start_dns(self) -> None:
        if not self.cfg.dns.listen:
            return
        from gateway.dns.server import DnsServer

        self.dns = DnsServer(self.cfg.dns, self.counters, mac_for=self.tracker.mac_for, emit=self.emit_query,
                             decide=self.filtering.decide, check_response=self.filtering.check_response,
                             lan_interface=self.cfg.capture.interface)
        await self.dns.start()

    def _start_sniffer(self) -> None:
        if not (self.cfg.capture.sniff and self.cfg.capture.interface):
            return
        from gateway.capture.sniffer import Sniffer

        self.sniffer = Sniffer(self.cfg.capture.interface, self.ingest, counters=self.counters,
                               skip_dns_to_self=self.dns is not None)
        self.sniffer.start()

    # -- the consumer -----------------------------------------------------------------------------------
    async def _consume(self) -> None:
        # A fixed tick rather than a wake-up per event: the DNS hot path and the sniffer thread only append
        # to a deque, and 50 ms is far below what anyone watching a device appear can notice.
        while True:
            await asyncio.sleep(0.05)
            self._drain()

    def _drain(self) -> None:
        queue, handle = self._queue, self._handle
        queries: list[DnsQuery] = []
        while queue:
            event = queue.popleft()
            try:
                handle(event)
            except Exception:  # one bad event must not stop the consumer
                self.counters.add("consumer_errors")
                log.exception("consumer: failed on %r", event)
            if type(event) is DnsQuery:  # logged even when handling it failed: the log loses nothing
                queries.append(event)
                if len(queries) >= LOG_CHUNK:
                    self._log(queries)
                    queries = []
        if queries:
            self._log(queries)

    def _log(self, queries: list[DnsQuery]) -> None:
        self.counters.add("queries", len(queries))
        dropped = self.querylog.add(queries)
        if dropped:
            self.counters.add("querylog_dropped", dropped)

    def _handle(self, event: Event) -> None:
        for change in self.tracker.observe(event):
            self._on_change(change, event)
        key = event.mac
        if key not in self.tracker.devices:  # untracked for want of room: presence would remember every MAC
            return
        if self._alert_feed.qsize() < ALERT_FEED_MAX:
            self._alert_feed.put(event)
        else:
            self.counters.add("alert_feed_dropped")
        if key not in self._window_start:
            return
        if event.ts < self._window_start[key] and not self._in_order:
            self._start_window_earlier(key, event.ts)
        if event.ts - self._window_start[key] > WINDOW_S:  # left out of the window, as `iotgw identify` does
            if self._in_order:
                self._close_window(key)
            return
        window = self._windows[key]
        if len(window) >= WINDOW_MAX_OBS and self._in_order:
            return
        obs = to_observation(event)
        if obs is None:
            return
        item = to_json(obs)
        if not self._in_order:
            if not self._keep_earliest(key, window, item):
                return
        else:
            chars = self._window_chars.get(key, 0) + len(json.dumps(item))
            if chars > WINDOW_MAX_CHARS:  # full: like WINDOW_MAX_OBS, what identification sees of the device ends here
                self.counters.add("window_observations_dropped")
                return
            self._window_chars[key] = chars
            window.append(item)
        self._changed_windows.add(key)
        session = self._sessions.get(key)
        if session is not None and self._in_order:  # out of order, the window is read in time order as it closes
            identity = session.update(obs)
            if identity is not None:
                self._identified(key, identity, event.ts)

    def _start_window_earlier(self, key: str, ts: float) -> None:
        """Out of time order, a window starts at the device's earliest frame, which the first pass (``timeline``)
        knows of every sender but not of a client a relay agent speaks for (it sends no frame of its own): such a
        window moves back to its earlier request and leaves out what that puts past its first minute, as
        ``iotgw identify`` does. Its session, fed only at close out of order, starts over there."""
        self._window_start[key] = ts
        window = self._windows[key] = [item for item in self._windows[key] if item["t"] - ts <= WINDOW_S]
        self._window_chars[key] = sum(len(json.dumps(item)) for item in window)
        self._changed_windows.add(key)
        if key in self._sessions:
            self._sessions[key] = self.identifier.session(key, ts)

    def _keep_earliest(self, key: str, window: list[dict], item: dict) -> bool:
        """Out of time order, a full window must still end up holding the device's earliest observations, the
        ones the same frames in order would have filled it with: the first to arrive may be its latest. So it is
        kept in time order (equal times in arrival order) and, past WINDOW_MAX_OBS or WINDOW_MAX_CHARS, gives up
        its latest. False when ``item`` itself is what was given up."""
        bisect.insort(window, item, key=itemgetter("t"))
        chars = self._window_chars.get(key, 0) + len(json.dumps(item))
        dropped = None
        while len(window) > WINDOW_MAX_OBS or chars > WINDOW_MAX_CHARS:
            if chars > WINDOW_MAX_CHARS:
                self.counters.add("window_observations_dropped")
            dropped = window.pop()
            chars -= len(json.dumps(dropped))
        self._window_chars[key] = chars
        return dropped is not item

    def _on_change(self, change: Change, event: Event) -> None:
        if change.kind == "new_device":
            ts = self.tracker.devices[change.key].first_seen
            self._window_start[change.key] = ts
            if self._in_order:  # out of order, the wall clock says nothing of what the capture has yet to give
                self._window_due[change.key] = time.monotonic() + WINDOW_S
            self._windows[change.key] = []
            self.filtering.seen(change.key)  # quarantine holds from its first packet, DNS or not
            if self.identifier is not None:
                self._sessions[change.key] = self.identifier.session(change.key, ts)
            ip = getattr(event, "client", None) or getattr(event, "ip", None)
            alert = Alert("new_device", ts, change.key, {"vendor": oui_vendor(change.key), "name": None, "ip": ip})
            if change.key.startswith("ip:"):
                self._announce_due[change.key] = (time.monotonic() + ANNOUNCE_GRACE_S, alert)
            else:
                self.alert(alert)
        elif change.kind == "evicted":  # forgotten to make room: in the store at the next flush, here now
            self._forget(change.key)
        elif change.kind == "untracked":
            # Not kept, yet still a new device: quarantine holds for it as for any other (nftables too). The
            # contexts of such devices are dropped past twice the bound, or a flood would grow them forever.
            if len(self.filtering.contexts) >= 2 * self.tracker.max_devices:
                self.filtering.forget_unknown(self.tracker.devices.keys())
            self.filtering.seen(change.key)
            if not self._said_too_many:
                self._said_too_many = True
                self.alert(Alert("too_many_devices", event.ts, None, {
                    "max": self.tracker.max_devices, "message": "too many devices: possible MAC flood"}))
        elif change.kind == "merged" and change.old_key:
            # The address-keyed device was the MAC's device all along. Whatever opened the MAC's window opened it
            # before this merge, so the MAC is either in its own first minute (its window, which saw the MAC and
            # its DHCP request, is the one kept) or was identified long ago (a new address): then the address's
            # window must not reopen identification and call a known device unknown.
            old, new = change.old_key, change.key
            for table in (self._sessions, self._windows, self._window_start, self._window_due, self._window_chars,
                      self._announce_due):
                table.pop(old, None)
            self._changed_windows.discard(old)
            self._closed_windows = [w for w in self._closed_windows if w[0] != old]
            self._pending_identities = self._follow_merge(self._pending_identities, old, new)
            self._merged_since_take[old] = new

    def _follow_merge(self, identities: list[tuple[str, float, object]], old: str,
                      new: str) -> list[tuple[str, float, object]]:
        """An answer decided under the address ``old`` and not written yet (the address-keyed device is gone from
        the next batch) is the device's first if the device is new, and stale if it is not."""
        first_minute = new in self._window_start
        return [(new if k == old else k, ts, identity) for k, ts, identity in identities if k != old or first_minute]

    def _identified(self, key: str, identity, at: float) -> None:  # noqa: ANN001 - identifier.stream.Identity
        """``at``: when the capture decided it. A replay stamps the answer with it, like its new-device and presence
        alerts (an identification of a 2016 capture was stamped today, after its device went offline in 2016);
        live, the wall clock, as always."""
        identity = identity.claimed()  # an unknown device's closest match stays among its alternatives
        ts = at if self._replay else time.time()
        self._pending_identities.append((key, ts, identity))
        self.alert(identity_alert(key, identity, ts))

    def _close_window(self, key: str) -> None:
        """End a device's observation window. A session that never committed concludes with its best guess,
        known or unknown as the open set judged it and ``decided_after_s`` None, exactly what ``iotgw identify``
        answers: every device gets an answer within its window, and a product the model knows but could not yet
        tell from its sibling (or that said nothing but its MAC) is not called unknown for it."""
        session = self._sessions.pop(key, None)
        start = self._window_start.pop(key)
        self._window_due.pop(key, None)
        self._window_chars.pop(key, None)
        self._changed_windows.discard(key)
        window = self._windows.pop(key, [])
        self._closed_windows.append((key, start, window))
        dev = self.tracker.devices.get(key)  # its window ends at its first minute or its last packet
        end = min(start + WINDOW_S, dev.last_seen if dev else start)
        # Another model was loaded during its window (or the first one, when it began without): the pass over the
        # stored windows left it out, so the model now running answers it here.
        replaced = self.identifier is not None and (session is None or session.ident is not self.identifier)
        if replaced and session is not None and session.committed is not None:
            # The old model decided within the window: stored and announced already. The new answer is stored and
            # announced as the pass's are, only where it changed.
            held = session.committed.claimed()
            identity = window_identity(self.identifier, key, start, window)
            if answer(identity) != answer(held):
                ts = end if self._replay else time.time()
                self._pending_identities.append((key, ts, identity))
                if held.device_type != identity.device_type:
                    self.alert(identity_alert(key, identity, ts, replacing=held.device_type))
            return
        if replaced:
            # Nothing was said of the device yet: the model now running reads the whole window as if it had from its
            # start, and its answer is the device's first, announced once. The old model's best guess is neither
            # stored nor announced: the owner heard of one new device twice at once, first from a model no longer
            # running, then as a change of type from that guess.
            session = self.identifier.session(key, start)
        if session is not None and (replaced or not self._in_order):
            # A replay out of time order reads the window (kept in time order, see _keep_earliest) only now, as live
            # capture would have sent it, so it decides where and when `iotgw identify` does on the same frames.
            for obs in map(from_json, window):
                identity = session.update(obs)
                if identity is not None:
                    self._identified(key, identity, obs.ts)
        if session is not None and session.committed is None:
            self._identified(key, session.current(), end)

    def _close_due_windows(self) -> None:
        """Windows of devices that went quiet: the event path only closes a window on the next packet."""
        now = time.monotonic()
        for key in [k for k, due in self._window_due.items() if due <= now]:
            self._close_window(key)

    def _announce_due_devices(self) -> None:
        """New address-keyed devices whose grace is over: merged into their MAC if the kernel's neighbour table
        has it now (as a query carrying it would, so a client that went quiet is merged too), else announced."""
        now = time.monotonic()
        for key in [k for k, (due, _) in self._announce_due.items() if due <= now]:
            _, alert = self._announce_due.pop(key)
            ip = key.removeprefix("ip:")
            mac = self._neighbour_mac(ip)
            if mac is None:  # routed, loopback, or the kernel never learnt it: a device known by its address
                self.alert(alert)
            else:
                self.ingest([AddressSeen(time.time(), mac, ip, "neighbour")])

    def _forget(self, key: str) -> None:
        """A device deleted in the store (web UI, CLI): drop everything held for it, so its next packet
        makes it a new device again, whatever that packet says."""
        self.tracker.forget(key)
        if self.sniffer is not None:
            self.sniffer.senders.forget(key)
        for table in (self._sessions, self._windows, self._window_start, self._window_due, self._window_chars,
                      self._announce_due):
            table.pop(key, None)
        self._changed_windows.discard(key)
        self._pending_identities = [p for p in self._pending_identities if p[0] != key]
        self._closed_windows = [w for w in self._closed_windows if w[0] != key]
        self._device_removed(key)

    def _device_removed(self, key: str) -> None:
        """Tell the alerts ``key`` is gone, after the events the alert thread still has of it (from any thread)."""
        if self._alert_thread is not None and self._alert_thread.is_alive():
            self._alert_feed.put(Removed(key))
        else:  # before start, or after stop ended the thread (the final flush)
            self.alerts.device_removed(key)

    def alert(self, alert: Alert) -> None:
        """Hand ``alert`` to the alert thread: recording it is a database write, never done on the event loop."""
        self._alert_feed.put(alert)

    def _record_alerts(self) -> None:
        """The alert thread: feeds events to presence and the blocked-query summaries, records alerts and tells
        the alerts of removed devices, in the consumer's order, until ``stop`` ends the feed."""
        while (item := self._alert_feed.get()) is not None:
            try:
                if isinstance(item, Alert):
                    self.alerts.send(item)
                elif isinstance(item, Removed):
                    self.alerts.device_removed(item.key)
                else:
                    self.alerts.observe(item)  # may record a device's "online" alert
            except OperationalError as exc:  # nowhere to store it: lost, counted, and said once
                self.counters.add("alert_errors")
                self._store_error(f"alert {getattr(item, 'kind', 'online')}", exc)
            except Exception:  # a full disk or a bad payload must not stop the thread
                self.counters.add("alert_errors")
                log.exception("alert not recorded for %r", item)

    def _neighbour_mac(self, ip: str) -> str | None:
        """The kernel's ARP/NDP entry for ``ip``: how a client's IPv6 address finds its MAC (in the hot path:
        a dict lookup; a miss asks for a re-read of the table off the hot path)."""
        if ip.startswith("127.") or ip == "::1":  # loopback has no neighbours
            return None
        mac = self.neighbours.lookup(ip, refresh_on_miss=False)
        if mac is None:
            self._neighbour_missed = True
        return mac

    async def _refresh_loop(self) -> None:
        """Twice a second: apply policy and device changes made elsewhere (a deleted device is forgotten),
        re-read the neighbour table after a miss, close the windows of quiet devices, raise anomaly alerts."""
        while True:
            await asyncio.sleep(0.5)
            try:
                # The flag stays up until a re-read really happened (refresh() is rate-limited).
                if self._neighbour_missed and await asyncio.to_thread(self.neighbours.refresh):
                    self._neighbour_missed = False
                if await asyncio.to_thread(self.filtering.refresh):
                    self.alerts.sync_devices()
                    await asyncio.to_thread(self._keep_owned)
                    await asyncio.to_thread(self._teach_confirmed, self.identifier)
                    generation, stored = await asyncio.to_thread(self.tracker.stored_keys)
                    for key in self.tracker.forget_missing(generation, stored):
                        self._forget(key)
                if time.monotonic() >= self._routers_due:
                    await self._check_routers()
                self._close_due_windows()
                self._announce_due_devices()
                if (stamp := model_stamp(self.cfg)) != self._model_stamp:
                    self._model_stamp = stamp
                    await self._reload_identifier()
                elif self._reidentify_retry is not None and time.monotonic() >= self._reidentify_retry:
                    self._reidentify_retry = None
                    await self._reidentify_if_new(self.identifier)
                for ts, mac, qname in self.filtering.new_anomalies():
                    self.alert(Alert("anomaly", ts, mac, {"domain": qname, "reason": "outside the learned profile"}))
            except Exception:
                self.counters.add("refresh_errors")
                log.exception("refresh failed")

    async def _reload_identifier(self) -> None:
        """A new bundle (a federated install or rollback): devices met from now on are identified by it, its
        learned profiles drive strict mode, and the devices already known are re-identified by it from their
        stored windows (``_reidentify``); sessions already running finish on the model they began with."""
        identifier = await asyncio.to_thread(load_identifier, self.cfg)
        if identifier is None:
            return  # said why; the current model goes on
        await asyncio.to_thread(self._teach_confirmed, identifier)
        self.identifier = identifier
        self.filtering.set_profiles(identifier.profiles())
        log.info("identification: model %s loaded from %s", identifier.bundle.version,
                 self.cfg.model_dir or "the package")
        await self._reidentify_if_new(identifier)

    # -- re-identification ------------------------------------------------------------------------------
    async def _reidentify_if_new(self, identifier) -> None:  # noqa: ANN001 - identifier.stream.Identifier | None
        """Start re-identifying the home's devices with ``identifier`` unless they last were with its version
        (a restart on the same model, or the same bundle installed again); a pass under way for an older model
        ends first. A replay starts none: it feeds its captures, on their clock, and the store's other devices are
        the daemon's, which re-identifies them at its next start (the setting is left as it was)."""
        if identifier is None or self._replay:
            return
        await self._end_reidentifying()
        done = await asyncio.to_thread(self.store.get_setting, IDENTIFIED_BY_SETTING) == identifier.version
        # Another model was loaded while the setting was read (start's call, and the refresh loop's for a bundle
        # installed as the daemon started): that one's call starts the pass. Started here too, this one's would be
        # out of reach of stop() and of the newer pass, writing the older model's answers.
        if done or identifier is not self.identifier:
            return
        self._reidentify_stop = threading.Event()
        self._reidentifying = asyncio.create_task(self._reidentify(identifier, self._reidentify_stop),
                                                  name="reidentify")

    async def _end_reidentifying(self) -> None:
        if self._reidentifying is not None:
            self._reidentify_stop.set()
            # wait(), not gather(): a caller cancelled here (the refresh loop, by stop()) must not cancel the pass,
            # whose worker thread would go on writing with no one waiting for it; stop() waits for it again.
            await asyncio.wait([self._reidentifying])
            self._reidentifying = None

    async def _reidentify(self, identifier, stop: threading.Event) -> None:  # noqa: ANN001 - stream.Identifier
        """Identify again, with ``identifier``, every device the store holds a window of, as its session would
        have on that window (``window_identity``), REIDENTIFY_BATCH devices a round in a worker thread. An answer
        that changed (labels or known) is stored as a fresh identification is, stamped with the new model's
        version, and applied (type policies, Home Assistant); one whose type changed is also announced. Left
        alone: devices the owner labelled (their label is their identity), devices in their first window (they
        finish on the model they began with, and their window's close identifies them with this one), devices
        without a window. One whose window or answer was not written yet is read again after a flush. The version
        is recorded once every device was seen, so a pass cut short runs again at the next start, and one that
        failed also after REIDENTIFY_RETRY_S."""
        version, after, changed, seen = identifier.version, "", 0, 0
        again: set[str] = set()  # devices to read once more after a flush (see below) ...
        rereading: list[str] = []  # ... and those being read again, a round at a time
        try:
            while (after is not None or again or rereading) and not stop.is_set():
                macs = None
                if after is None:  # the home is done but for ``again``: read it once their answers are written
                    if not rereading:
                        flushes = self._flushes
                        while self._flushes == flushes and not stop.is_set():
                            await asyncio.sleep(REIDENTIFY_FLUSH_POLL_S)
                        rereading, again = sorted(again), set()
                    macs, rereading = rereading[:REIDENTIFY_BATCH], rereading[REIDENTIFY_BATCH:]
                began = time.monotonic()
                busy = self._deciding()
                # An answer not written yet (its window closed just before the swap, on the old model) is the
                # device's after the next flush: read once more then, or the old model's answer stays. A device in
                # its window is not: its window's close identifies it with the model now running.
                again |= busy - self._window_start.keys()
                after, count, found = await asyncio.to_thread(self._reidentify_batch, identifier, after, busy, stop,
                                                              macs)
                # Again now: a window that closed while the round ran may have an answer not written yet. A window
                # cannot open meanwhile on what was read (a device met again has a new window, see _store_answers).
                deciding = self._deciding()
                again |= deciding - self._window_start.keys()
                answers = await asyncio.to_thread(self._store_answers, [f for f in found if f[0] not in deciding])
                seen += count
                changed += len(answers)
                for key, previous, identity in answers:
                    if previous != identity.device_type:
                        self.alert(identity_alert(key, identity, time.time(), replacing=previous))
                if after is not None or rereading:
                    await asyncio.sleep((time.monotonic() - began) * REIDENTIFY_REST)
            if stop.is_set():
                return
            await asyncio.to_thread(self.store.set_setting, IDENTIFIED_BY_SETTING, version)
        except OperationalError as exc:  # a full or read-only disk
            self._store_error("re-identifications", exc)
            self._reidentify_retry = time.monotonic() + REIDENTIFY_RETRY_S
            return
        except Exception:
            self.counters.add("reidentify_errors")
            log.exception("re-identification with model %s failed; tried again in %d min", version,
                          REIDENTIFY_RETRY_S // 60)
            self._reidentify_retry = time.monotonic() + REIDENTIFY_RETRY_S
            return
        log.info("identification: model %s re-identified %d devices from their windows, %d answers changed",
                 version, seen, changed)

    def _deciding(self) -> frozenset[str]:
        """The devices whose identification is not settled in the store: in their first window, or with a window
        or an answer the next flush (or the one under way) writes (on the loop thread)."""
        return frozenset(self._window_start.keys() | self._changed_windows | {p[0] for p in self._pending_identities}
                         | {w[0] for w in self._closed_windows} | self._writing)

    def _reidentify_batch(self, identifier, after: str | None, busy: frozenset[str],  # noqa: ANN001
                          stop: threading.Event, macs: list[str] | None = None) -> tuple[str | None, int, list[tuple]]:
        """One round of ``_reidentify`` (in a worker thread): the next devices after the key ``after`` (or those
        of ``macs``) that have a window, no label of the owner's and a newest identification by another model (or
        none), and are not ``busy``. Returns the key to go on after (None: this was the last round), how many
        devices were identified again, and (key, window start, answer held, identity) of those whose answer
        changed."""
        unlabelled = and_(Device.label_manufacturer.is_(None), Device.label_device_type.is_(None),
                          Device.label_category.is_(None))
        # A device whose newest identification is this model's was re-identified by it already (a pass cut short,
        # then a restart): tested in the query, so its window is never read. Tested after reading, a start read
        # every stored window, a round at a time with a rest after each, to find the few left to do.
        newest = (select(Identification.model_version).where(Identification.mac == Device.mac)
                  .order_by(Identification.id.desc()).limit(1).correlate(Device).scalar_subquery())
        not_yet = func.coalesce(newest, "") != identifier.version
        which = Device.mac.in_(macs) if macs is not None else Device.mac > after
        with self.store.session() as s:
            rows = s.execute(
                select(Device.mac, Device.manufacturer, Device.device_type, Device.category, Device.known,
                       ObservationWindow.started_at, ObservationWindow.observations)
                .join(ObservationWindow, ObservationWindow.mac == Device.mac)
                .where(which, unlabelled, not_yet).order_by(Device.mac).limit(REIDENTIFY_BATCH)).all()
        after = rows[-1].mac if len(rows) == REIDENTIFY_BATCH and macs is None else None
        count, found = 0, []
        for mac, manufacturer, device_type, category, known, started_at, observations in rows:
            if stop.is_set():
                break
            if mac in busy:  # still being decided
                continue
            count += 1
            identity = window_identity(identifier, mac, started_at, observations)
            held = (manufacturer, device_type, category, known)
            if answer(identity) != held:
                found.append((mac, started_at, held, identity))
        return after, count, found

    def _store_answers(self, found: list[tuple]) -> list[tuple[str, str | None, object]]:
        """Store the changed answers of a ``_reidentify_batch`` and apply them (in a worker thread); returns
        (key, previous device type, identity) of those stored."""
        answers: list[tuple[str, str | None, object]] = []
        if not found:
            return answers
        ts = time.time()
        with self.store.transaction() as s:
            for mac, started_at, held, identity in found:
                device, window = s.get(Device, mac), s.get(ObservationWindow, mac)
                # What was read may be gone by now: the device deleted (or deleted and met again, with a new
                # window), labelled by its owner, or given a fresh answer; then this one is stale.
                if (device is None or window is None or window.started_at != started_at
                        or any((device.label_manufacturer, device.label_device_type, device.label_category))
                        or (device.manufacturer, device.device_type, device.category, device.known) != held):
                    continue
                record_identity(s, device, ts, identity)
                answers.append((mac, held[1], identity))
        for mac, _, _ in answers:
            self.alerts.device_changed(mac)
        if answers:
            self.filtering.reload_devices()  # a type's default policy applies from the next query on
        return answers

    async def _check_routers(self) -> None:
        """Look up the gateway's own router; when it changed, exempt it from quarantine as a new device, keep it
        past [devices] max and tell the web UI (``ROUTER_SETTING``)."""
        routers, complete = await asyncio.to_thread(self._find_routers)
        # A next hop the kernel has no neighbour entry for yet mostly gets one with the gateway's first upstream
        # query: looked for again after 1 s, then less often (each look runs `ip` three times).
        self._routers_retry = 1.0 if complete else min(self._routers_retry * 2, ROUTER_CHECK_S)
        self._routers_due = time.monotonic() + (ROUTER_CHECK_S if complete else self._routers_retry / 2)
        if routers is None or routers == self.routers:
            return
        log.info("the gateway's router: %s", ", ".join(sorted(routers)) or "none known")
        self.routers = routers
        await asyncio.to_thread(self.store.set_setting, ROUTER_SETTING, json.dumps(sorted(routers)))
        await asyncio.to_thread(self.filtering.set_routers, routers)
        await asyncio.to_thread(self._keep_owned)
        for mac in routers & self.tracker.devices.keys():  # its row says so in Home Assistant too
            self.alerts.device_changed(mac)

    def _find_routers(self) -> tuple[frozenset[str] | None, bool]:
        """The MACs of the default routes' next hops from the kernel's routing and neighbour tables, never from
        what LAN hosts send (a DHCP or DNS reply proves nothing), and whether every next hop had one; None when
        the tables cannot be read (in a worker thread)."""
        try:
            ips = read_default_routers()
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            if not self._said_no_routes:
                self._said_no_routes = True
                log.warning("cannot read the default routes (%s): the gateway's router is treated as any device", exc)
            return None, True
        self.neighbours.refresh()
        macs = {ip: self.neighbours.lookup(ip, refresh_on_miss=False) for ip in ips}
        return frozenset(filter(None, macs.values())), None not in macs.values()

    def _keep_owned(self) -> None:
        """Tell the tracker which devices the owner touched (store and policy file): never forgotten to make
        room (in a worker thread)."""
        with self.store.session() as s:
            touched = owner_touched(s)
        self.tracker.keep(touched | self.filtering.own_policies | self.routers)

    def _teach_confirmed(self, identifier) -> None:  # noqa: ANN001 - identifier.stream.Identifier | None
        """The owner's confirmed device types name their MACs' production blocks for this home's model
        (``Identifier.set_confirmed``); run again whenever devices change, as a confirmation is such a change."""
        if identifier is not None:
            identifier.set_confirmed(confirmed_types(self.store))

    # -- persistence ------------------------------------------------------------------------------------
    async def _flush_loop(self) -> None:
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.cfg.store.flush_interval_s)
            await self._flush()

    async def _flush(self) -> bool:
        """Write what changed since the last flush; False when the store could not be written (a full or
        read-only disk) and the batch is kept for the next try."""
        batch = self._take()
        self._writing = frozenset(i[0] for i in batch[1]) | frozenset(w[0] for w in batch[2])
        try:
            gone = await asyncio.to_thread(self._write, batch)
        except OperationalError as exc:  # a full or read-only disk: keep the batch for the next try
            self._restore(batch)
            self._store_error("device changes", exc)
            return False
        except SQLAlchemyError:  # a row the database refuses (DataError...): it must not cost the others
            self.counters.add("flush_errors")
            log.exception("flush failed; writing each device's changes on their own")
            gone, refused = await asyncio.to_thread(self._write_apart, batch)
            for part in refused:  # its rows are dropped; its device is written again at the next flush
                self.tracker.restore(TrackerBatch(part.devices, {}, [], [], [], [], part.generation, part.pruned))
        except Exception:
            self.counters.add("flush_errors")
            log.exception("flush failed")
            return True
        finally:
            self._writing = frozenset()
            self._flushes += 1
        for key in gone:
            self._forget(key)
        if (untracked := self.counters.get("devices_untracked")) != self._untracked_noted:
            # for the web UI's dashboard (another process); 0 at the first flush: the count is this run's
            with contextlib.suppress(SQLAlchemyError):  # a full disk was said above; written at a later flush
                await asyncio.to_thread(self.store.set_setting, UNTRACKED_SETTING, str(untracked))
                self._untracked_noted = untracked
        tracked, identities, windows = batch
        if self._store_failing and not (tracked.empty and not identities and not windows):
            log.info("store: writing again")
            self._store_failing = False
        return True

    def _store_error(self, what: str, exc: OperationalError) -> None:
        """Said once until a write succeeds again, not at every flush or alert while the disk stays full."""
        self.counters.add("store_errors")
        if not self._store_failing:
            log.error("store: cannot write %s (%s); DNS keeps answering, retrying every flush", what, exc.orig)
            self._store_failing = True

    def _restore(self, batch: tuple) -> None:
        """Undo ``_take`` for a batch the store refused (on the loop thread, like ``_take``)."""
        tracked, identities, windows = batch
        self.tracker.restore(tracked)
        for old, new in self._merged_since_take.items():  # merged while this batch was out: as if still pending
            identities = self._follow_merge(identities, old, new)
        self._pending_identities[:0] = identities
        for key, start, observations in windows:
            if key in self._windows:  # still open: its newest state is written, not this copy
                self._changed_windows.add(key)
            else:
                self._closed_windows.insert(0, (key, start, observations))

    def _take(self) -> tuple:
        """Detach what the next write stores (on the loop thread, so the consumer never races the writer)."""
        identities, self._pending_identities = self._pending_identities, []
        self._merged_since_take = {}
        windows, self._closed_windows = self._closed_windows, []
        # Open windows that grew are written too, so a confirmation in the web UI finds what the device sent.
        snapshot = [(k, self._window_start[k], list(self._windows[k])) for k in self._changed_windows]
        self._changed_windows.clear()
        snapshot += [(k, start, obs) for k, start, obs in windows]
        return self.tracker.take(), identities, snapshot

    def _write_apart(self, batch: tuple) -> tuple[set[str], list[TrackerBatch]]:
        """Write a batch the store refused as a whole one device at a time (in a worker thread), so a row the
        database rejects loses only its own device's changes. Returns the devices found deleted and the
        tracker parts that were refused."""
        tracked, identities, windows = batch
        gone: set[str] = set()
        refused: list[TrackerBatch] = []
        for key in tracked.keys() | {i[0] for i in identities} | {w[0] for w in windows}:
            part = tracked.part(key)
            try:
                mine = [i for i in identities if i[0] == key], [w for w in windows if w[0] == key]
                gone |= self._write((part, *mine))
            except SQLAlchemyError:
                self.counters.add("flush_errors")
                log.exception("device %s: changes refused by the store, dropped", key)
                refused.append(part)
        return gone, refused

    def _write(self, batch: tuple) -> set[str]:
        """Store one flush's batch (in a worker thread); returns the devices found deleted meanwhile."""
        tracked, identities, windows = batch
        if tracked.merges:  # the merge moves the address's queries in the log: the ones still waiting too
            self.querylog.flush()
        gone = self.tracker.write(tracked)
        for key, *_ in tracked.devices:
            if key not in gone:
                self.alerts.device_changed(key)
        # A merged address-keyed device is gone from the store: without this its Home Assistant device stayed
        # until the next full sync. Said after the merge is written, so an earlier batch cannot republish it.
        for old_key, _ in tracked.merges:
            self._device_removed(old_key)
        if not (identities or windows):
            return gone
        with self.store.transaction() as s:
            for key, ts, identity in identities:
                device = s.get(Device, key)
                if device is None:
                    continue
                record_identity(s, device, ts, identity)
                self.alerts.device_changed(key)
            for key, start, observations in windows:
                if s.get(Device, key) is not None:
                    s.merge(ObservationWindow(mac=key, started_at=start, observations=observations))
        if identities:
            self.filtering.reload_devices()  # a type's default policy applies from the next query on
        return gone


def identity_alert(key: str, identity, ts: float, *,  # noqa: ANN001 - identifier.stream.Identity
                   replacing: str | None = None) -> Alert:
    """What the owner hears of a claimed identity (``Identity.claimed``); ``replacing``: the device type a new
    model's re-identification changed, said with the model's version."""
    data = {"confidence": round(float(identity.confidence), 4), "decided_after_s": identity.decided_after_s}
    if identity.known:
        data.update(manufacturer=identity.manufacturer, device_type=identity.device_type, category=identity.category)
    if replacing is not None:
        data.update(previous_device_type=replacing, model_version=identity.model_version)
    return Alert("device_identified" if identity.known else "unknown_device", ts, key, data)


def answer(identity) -> tuple:  # noqa: ANN001 - identifier.stream.Identity
    """What a re-identification must change to be stored: the labels and the open-set verdict."""
    return identity.manufacturer, identity.device_type, identity.category, identity.known


def record_identity(s: Session, device: Device, ts: float, identity) -> None:  # noqa: ANN001 - stream.Identity
    """Store a claimed identity as ``device``'s newest identification and its current one."""
    s.add(Identification(
        mac=device.mac, ts=ts, manufacturer=identity.manufacturer, device_type=identity.device_type,
        category=identity.category, confidence=float(identity.confidence), known=identity.known,
        decided_after_s=identity.decided_after_s, alternatives=list(identity.alternatives),
        signals=list(identity.signals), model_version=identity.model_version,
    ))
    device.manufacturer, device.device_type = identity.manufacturer, identity.device_type
    device.category, device.confidence = identity.category, float(identity.confidence)
    device.known, device.decided_after_s = identity.known, identity.decided_after_s


def window_identity(identifier, key: str, started_at: float, observations: list[dict]):  # noqa: ANN001, ANN201
    """The claimed identity ``identifier`` gives a device on its stored window: what its session would have
    answered at the window's close (the last decision, else the best guess), as ``iotgw identify`` answers."""
    session = identifier.session(key, started_at)
    for obs in map(from_json, observations):
        session.update(obs)
    return (session.committed or session.current()).claimed()


def model_stamp(cfg: Config) -> tuple[str, float] | None:
    """Which bundle the gateway should run, and when it was written: a change means load it."""
    directory = cfg.model_dir
    if directory is None:
        return None
    try:
        return str(directory), (directory / "bundle.json").stat().st_mtime
    except OSError:
        return str(directory), 0.0


def load_identifier(cfg: Config):  # noqa: ANN201 - identifier.stream.Identifier | None
    """The identification model, or None when it cannot be loaded (the gateway still resolves and filters)."""
    try:
        from identifier.stream import Identifier

        return Identifier.load(cfg.model_dir)
    except Exception as exc:  # a missing or broken bundle must not stop DNS
        log.warning("identification off: %s", exc)
        return None


def run_forever(gateway: Gateway, *, on_started: Callable[[Gateway], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM."""
    import signal

    async def main() -> None:
        await gateway.start()
        if on_started:
            on_started(gateway)
        sdnotify.notify("READY=1")
        interval = sdnotify.watchdog_interval()
        if interval:
            # Pinged from the event loop itself, so a wedged loop stops the pings and systemd restarts us.
            gateway._tasks.append(asyncio.create_task(_watchdog(interval / 2), name="watchdog"))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        sdnotify.notify("STOPPING=1")
        await gateway.stop()

    asyncio.run(main())


async def _watchdog(period: float) -> None:
    while True:
        sdnotify.notify("WATCHDOG=1")
        await asyncio.sleep(period)
