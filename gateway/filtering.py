"""Policy at run time: the DNS server's decision hooks, per-device contexts, reloads within a second, anomaly
alerts and the nftables quarantine.

``decide`` runs in the DNS hot path for every query: a dict lookup for the device's context and one
``PolicyEngine.decide``. Rebuilding the engine, reading the store and talking to nftables happen in
``refresh``, which the daemon calls twice a second off the hot path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Collection
from pathlib import Path

from sqlalchemy import select

from gateway.devices.service import DEVICES_REVISION
from gateway.dns.server import Decision
from gateway.dns.wire import dnslib_record
from gateway.events import Counters
from gateway.policyfile import load_policy, policy_path
from gateway.statedir import file_stamp
from gateway.store.db import Store
from gateway.store.schema import Device
from identifier.domains import sld
from policy.answers import MalformedQuery, blocked_reply
from policy.engine import PolicyEngine
from policy.model import PolicySet, is_mac
from policy.nftables import QuarantineFirewall
from policy.records import DeviceContext

log = logging.getLogger(__name__)

_CNAME = 5
# Domains outside its learned profile one device is alerted about (one alert each), per run: a device querying a
# new domain every second (malware's generated names) would otherwise raise an alert a query and grow the set
# that dedupes them forever. Beyond it they are counted (``anomalies_unreported``) and said once in the log.
ANOMALY_DOMAINS_MAX = 100


class Filtering:
    def __init__(self, store: Store, state_dir: Path, *, profiles: dict[str, list[str]] | None = None,
                 firewall: bool = False, counters: Counters | None = None) -> None:
        self.store = store
        self.counters = counters if counters is not None else Counters()
        self.state_dir = state_dir
        self.profiles = profiles or {}
        self.engine = PolicyEngine.build(PolicySet(), self.profiles, base_dir=state_dir)
        self.contexts: dict[str, DeviceContext] = {}  # the hot path adds devices it meets; refresh updates
        self._stored: set[str] = set()  # the devices whose contexts came from the device table
        self.anomalies: deque[tuple[float, str, str]] = deque(maxlen=10_000)  # (ts, mac, qname), drained
        self._policy_stamp: tuple | None = None  # file_stamp of the policy file last loaded; () forces a reload
        self._devices_revision: str | None = None
        self._firewall = QuarantineFirewall() if firewall else None
        self._firewall_macs: set[str] = set()
        # refresh and the flush after an identification both reload (each in a worker thread): one at a time,
        # so the later read of the device table is the one that stays
        self._lock = threading.RLock()
        self._anomalous: dict[str, set[str]] = {}  # mac -> SLDs already reported: one alert each
        self.own_policies: frozenset[str] = frozenset()  # devices with a policy of their own (the owner's)
        self.routers: frozenset[str] = frozenset()  # the gateway's own router: never under quarantine as new
        self._said_unreported = False

    # -- the DNS hot path --------------------------------------------------------------------------------
    def decide(self, client: str, mac: str | None, qname: str, qtype: int, query: bytes) -> Decision | None:
        key = mac or f"ip:{client}"
        ctx = self.contexts.get(key) or self._context_for_unknown(key)  # made once per key, not per query
        now = time.time()
        verdict = self.engine.decide(ctx, qname, now)
        if verdict.anomaly:
            self.anomalies.append((now, ctx.mac, qname))
        if not verdict.blocked:
            return Decision("allowed", verdict.rule, None, verdict.words) if verdict.rule else None
        try:
            reply = blocked_reply(query, verdict.answer)
        except MalformedQuery:
            return Decision("blocked", verdict.rule, None, verdict.words)
        return Decision("blocked", verdict.rule, reply, verdict.words)

    def check_response(self, client: str, mac: str | None, qname: str, response: bytes,
                       query: bytes) -> Decision | None:
        """Block an answer whose CNAME chain leads to a listed name (a tracker hidden behind a first party):
        the client gets the blocked reply to ``query``, never the tracker's address."""
        if len(response) < 12 or int.from_bytes(response[6:8], "big") < 2:
            return None  # a chain needs at least a CNAME and its target's record: skip the parse
        try:
            record = dnslib_record(response)
        except Exception:
            return None
        targets = [str(rr.rdata).rstrip(".").lower() for rr in record.rr if rr.rtype == _CNAME]
        if not targets:
            return None
        key = mac or f"ip:{client}"  # as decide keys it: the same device, the same context
        ctx = self.contexts.get(key) or self._context_for_unknown(key)
        verdict = self.engine.check_cname_chain(ctx, targets, time.time())
        if not verdict.blocked:
            return None
        # No fallback to forwarding: the server parsed this query already, and a leak would defeat the block.
        # "cname <target>: <rule>"
        return Decision("blocked", verdict.rule, blocked_reply(query, verdict.answer), verdict.words)

    def _context_for_unknown(self, key: str) -> DeviceContext:
        # A device the tracker has not written yet: it is new, and so under quarantine if quarantine is on.
        # The next refresh puts its MAC into the nftables set. The gateway's own router is not new to anyone.
        ctx = DeviceContext(key, status="approved") if key in self.routers else DeviceContext(key)
        self.contexts[key] = ctx
        return ctx

    def seen(self, key: str) -> None:
        """A device the tracker met for the first time, maybe through DHCP or the sniffer rather than a DNS
        query: quarantine applies to it from now on, not only once it asks the gateway for a name."""
        if not key.startswith("ip:") and key not in self.contexts:
            self._context_for_unknown(key)

    def forget_unknown(self, tracked: Collection[str]) -> None:
        """Drop the contexts of devices neither ``tracked``, stored nor the router. A flood of spoofed MACs past
        ``[devices] max`` makes one for each (to quarantine it) and they would grow without bound, the nftables
        set with them; each is made again, new, at the device's next packet (on the event loop, as ``seen``)."""
        keep = self._stored | self.routers
        for key in [k for k in list(self.contexts) if k not in keep and k not in tracked]:
            self.contexts.pop(key, None)

    # -- off the hot path --------------------------------------------------------------------------------
    def set_profiles(self, profiles: dict[str, list[str]]) -> None:
        """New learned profiles (a new model): the policy is rebuilt with them at the next ``refresh``."""
        self.profiles = profiles
        self._policy_stamp = ()  # never a real stamp

    def refresh(self) -> bool:
        """Reload the policy file and the device table when either changed; True when anything did."""
        changed = False
        path = policy_path(self.state_dir)
        stamp = file_stamp(path)
        if stamp != self._policy_stamp:
            try:
                data = load_policy(self.state_dir)
                self.engine = PolicyEngine.build(data, self.profiles, base_dir=self.state_dir, previous=self.engine)
                self.own_policies = data.own_devices()
                for err in self.engine.list_errors[:20]:
                    log.warning("policy list: %s", err)
                log.info("policy: revision %s loaded", data.revision)
            except Exception as exc:  # keep the last good policy; say why the new one is refused
                log.error("policy: %s not loaded, keeping revision %s: %s", path, self.engine.revision, exc)
            self._policy_stamp = stamp
            changed = True
        revision = self.store.get_setting(DEVICES_REVISION)
        if changed or revision != self._devices_revision:
            self._devices_revision = revision
            self.reload_devices()
            changed = True
        else:
            self._sync_firewall()  # devices first met since the last reload
        return changed

    def reload_devices(self) -> None:
        with self._lock:
            self._reload_devices()

    def set_routers(self, macs: frozenset[str]) -> None:
        """The gateway's own router (the default route's next hop, as the kernel knows it): exempt from
        quarantine as a new device, since every device's traffic goes through it (not on the hot path)."""
        with self._lock:
            for mac in self.routers - macs - self._stored:  # no longer the router: new again at its next query
                self.contexts.pop(mac, None)
            self.routers = macs
            self._reload_devices()

    def _reload_devices(self) -> None:
        with self.store.session() as s:
            rows = s.execute(select(Device.mac, Device.device_type, Device.category, Device.status,
                                    Device.label_device_type, Device.label_category, Device.manufacturer)).all()
        fresh: dict[str, DeviceContext] = {}
        for mac, device_type, category, status, label_type, label_category, manufacturer in rows:
            device_type = label_type or device_type
            category = label_category or category
            profile = self.engine.profile(device_type) or frozenset()
            fresh[mac] = DeviceContext(
                mac=mac,
                device_type=device_type,
                category=category,
                status="approved" if status == "approved" or mac in self.routers
                else ("identified" if device_type else "new"),
                quarantined=status == "quarantined",
                cloud_slds=frozenset(profile) if manufacturer else frozenset(),
            )
        # Updated in place, not replaced: a device the hot path met meanwhile (and one met but not written yet)
        # keeps its context, so it stays in the nftables set. Forgotten devices and address-keyed contexts go;
        # the hot path makes them again, as new, when they next ask.
        for key in [k for k in list(self.contexts) if k.startswith("ip:")] + list(self._stored - fresh.keys()):
            self.contexts.pop(key, None)
        self.contexts.update(fresh)
        for mac in self.routers - fresh.keys():  # met but not written yet, or not met at all
            self.contexts[mac] = DeviceContext(mac, status="approved")
        self._stored = set(fresh)
        self._sync_firewall()

    def _sync_firewall(self) -> None:
        if self._firewall is None:
            return
        with self._lock:
            # list() copies in one step: the hot path may add a context meanwhile (this runs in a thread).
            # Address-keyed contexts (no MAC known) cannot go into a MAC set; one bad key must not fail every sync.
            macs = {mac for mac, ctx in list(self.contexts.items())
                    if is_mac(mac) and self.engine.is_quarantined(ctx)}
            if macs == self._firewall_macs:
                return
            try:
                self._firewall.sync(macs)
                self._firewall_macs = macs
            except Exception as exc:
                log.error("quarantine: nftables sync failed: %s", exc)

    def open_firewall(self) -> None:
        if self._firewall is not None:
            try:
                self._firewall.open()
            except Exception as exc:
                log.warning("quarantine: no nftables (%s); quarantine is DNS-only", exc)
                self._firewall = None

    def close(self) -> None:
        if self._firewall is not None:
            self._firewall.close()

    def new_anomalies(self) -> list[tuple[float, str, str]]:
        """Anomalies seen since the last call, one per device and second-level domain (profiles are SLDs)."""
        out = []
        while self.anomalies:
            ts, mac, qname = self.anomalies.popleft()
            reported, domain = self._anomalous.setdefault(mac, set()), sld(qname)
            if domain in reported:
                continue
            if len(reported) >= ANOMALY_DOMAINS_MAX:
                self.counters.add("anomalies_unreported")
                if not self._said_unreported:
                    self._said_unreported = True
                    log.warning("device %s queried more than %d domains outside its profile: the rest are counted "
                                "in anomalies_unreported, not alerted (said once)", mac, ANOMALY_DOMAINS_MAX)
                continue
            reported.add(domain)
            out.append((ts, mac, qname))
        return out
