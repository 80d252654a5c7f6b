"""The streaming decision the daemon runs: one session per device, updated with each observation.

A session keeps the device's feature counts and the first layer's pre-activation, so an observation costs the
few buckets it changed plus two 64-wide layers (numpy only, no torch). A decision is committed as soon as the
calibrated device-type probability reaches the bundle's ``commit`` threshold, and revised only when another
type reaches ``revise``. A device whose evidence matches no vendor seen in training is "unknown" (open set)
rather than a confident wrong name. The vendors of a device's DNS names in training, counted by device, weigh
the manufacturer head (``NAME_VOTE_FLOOR``); a name training never saw votes as the trained names of its brand
(``domains.brand``: tplinkcloud.com.cn as tplinkcloud.com). A MAC from a production block that holds units
training captured (or the home's owner confirmed) weighs those units' device types (``BLOCK_LIKELIHOOD``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from identifier.bundle import Bundle, Thresholds
from identifier.domains import brand
from identifier.features import FeatureConfig, FeatureState, seen_bit
from identifier.inference import NumpyNet
from identifier.observation import Observation
from identifier.observation import from_json as observation_from_json
from identifier.oui import blocks

UNKNOWN_LABEL = "unknown"
# How much likelier a device type captured in the device's MAC production block is than any other type. Blocks
# are evidence, not proof (a maker may build two models in one run), so they weigh the net's answer rather than
# replace it; a MAC in no known block changes nothing.
BLOCK_LIKELIHOOD = 20.0
# The manufacturer head is weighed by this floor plus the vote of the device's DNS names: each name's training
# devices per vendor (``Bundle.name_vendors``) as shares, summed over its names. The net learns from windows, so
# the vendors captured many times (TP-Link, D-Link) pull the names they share with everyone (NTP pools, clouds)
# their way, and a brand known from one listed device loses to them on its own name; the vote counts devices.
# The floor keeps the net's say: a vendor no name votes for is weighed down, not ruled out.
NAME_VOTE_FLOOR = 0.1
# ... and the net's manufacturer distribution enters the product at this power, a square root: trained on some
# 300 windows of each captured product, it is surer of the captured vendors than one device's names warrant (a
# Sengled bulb querying only sengled.com, all of whose training devices are Sengled's, came out "Meross"). Both
# chosen, with the ``known`` bar, on the leave-one-lab-out split (docs/identification.md).
NAME_VOTE_NET_POWER = 0.5
# Token kinds that can name a vendor; timing and counts tokens say nothing about which vendor it is.
IDENTIFYING_PREFIXES = ("sld:", "dhcp55:", "dhcp60:", "dhcp12:", "mdns:", "mdnssvc:", "oui:", "ouiprefix:")
_SIGNAL_OF = {
    "sld": "dns",
    "host": "dns",
    "qtype": "dns",
    "dhcp": "dhcp",
    "mdns": "mdns",
    "oui": "oui",
    "pkt": "packet",
    "next": "dns",
}


@dataclass
class Identity:
    """What a session says of a device. The labels are always the closest match the model has; ``known`` is
    the open-set verdict (False: the device looks like none the model was trained on), so a consumer can show
    "unknown, closest: ..." rather than lose the guess. ``claimed()`` is what the gateway asserts."""

    manufacturer: str
    device_type: str
    category: str
    confidence: float
    known: bool
    decided_after_s: float | None
    alternatives: list[tuple[str, float]] = field(default_factory=list)
    signals: list[str] = field(default_factory=list)
    model_version: str = ""

    def claimed(self) -> Identity:
        """This identity if known, else the same with every label ``unknown``: what the gateway stores, alerts
        on and applies type policies to, so a guess is never acted on as a name."""
        if self.known:
            return self
        return replace(self, manufacturer=UNKNOWN_LABEL, device_type=UNKNOWN_LABEL, category=UNKNOWN_LABEL)


def is_identifying(token: str) -> bool:
    return token.startswith(IDENTIFYING_PREFIXES)


def signal_of(token: str) -> str:
    """The signal a token came from (``dhcp55:...`` -> ``dhcp``), for ``Identity.signals``."""
    head = token.split(":", 1)[0]
    if head == "first":
        head = token.split(":", 2)[1]
    for prefix, signal in _SIGNAL_OF.items():
        if head.startswith(prefix):
            return signal
    return head


def name_shares(bundle: Bundle, key: Callable[[str], str | None] = lambda name: f"sld:{name}") -> dict[str, np.ndarray]:
    """Per ``key`` of a trained SLD (by default its ``sld:`` token), the share of the training devices of its
    SLDs each manufacturer holds (``NAME_VOTE_FLOOR``); SLDs whose key is None are left out."""
    index = {m: i for i, m in enumerate(bundle.labels["manufacturer"])}
    counts: dict[str, np.ndarray] = {}
    for name, vendors in bundle.name_vendors.items():
        k = key(name)
        if k is None:
            continue
        count = counts.setdefault(k, np.zeros(len(index), dtype=np.float32))
        for maker, devices in vendors.items():
            if maker in index:
                count[index[maker]] += devices
    return {k: count / count.sum() for k, count in counts.items() if count.any()}


class Identifier:
    """A loaded bundle; ``session()`` starts the streaming decision for one device."""

    def __init__(self, bundle: Bundle, signals: tuple[str, ...] | None = None):
        self.bundle = bundle
        self.net = NumpyNet(bundle.weights)
        self.features: FeatureConfig = bundle.features.with_signals(signals) if signals else bundle.features
        self.specific = np.unpackbits(bundle.specific).astype(bool)
        # None for a bundle that did not record it: every token counts and the new-tokens rule never applies
        self.vocabulary = np.unpackbits(bundle.vocabulary).astype(bool) if bundle.vocabulary.size else None
        self.labels = bundle.labels
        self.type_index = {t: i for i, t in enumerate(bundle.labels["device_type"])}
        self.version = bundle.version
        self.mac_blocks = bundle.mac_blocks if "oui" in self.features.signals else {}
        self.name_shares = name_shares(bundle)
        self.name_vote_floor = NAME_VOTE_FLOOR
        self.name_vote_power = NAME_VOTE_NET_POWER
        self.brand_shares = name_shares(bundle, brand)  # for the names training never saw
        makers = [bundle.type_info.get(t, {}).get("manufacturer") for t in bundle.labels["device_type"]]
        self._types_of = {m: np.flatnonzero([n in (None, m) for n in makers]) for m in bundle.labels["manufacturer"]}

    @classmethod
    def load(cls, model_dir: str | None = None, signals: tuple[str, ...] | None = None) -> Identifier:
        """The bundle in ``model_dir`` (None: the shipped default); ``signals`` restricts the inputs used."""
        return cls(Bundle.load(model_dir), signals)

    def name_vote(self, token: str) -> np.ndarray | None:
        """The vendor shares a DNS name's ``sld:`` token votes (``NAME_VOTE_FLOOR``): its own training devices',
        or for a name training never saw, its brand's; None when neither was trained (and for other tokens)."""
        share = self.name_shares.get(token)
        if share is None and token.startswith("sld:"):
            share = self.brand_shares.get(brand(token[4:]))
        return share

    def session(self, mac: str, first_ts: float) -> Session:
        return Session(self, mac.lower(), first_ts)

    def deciding(self, thresholds: Thresholds, name_vote_floor: float, name_vote_power: float) -> Identifier:
        """This identifier with other decision-time values (the bundle's thresholds, the name vote's floor and
        power) and the same trained parts: evaluation replays held-out devices under each without retraining."""
        other = copy.copy(self)
        other.bundle = replace(self.bundle, thresholds=thresholds)
        other.name_vote_floor, other.name_vote_power = name_vote_floor, name_vote_power
        return other

    def set_confirmed(self, units: Iterable[tuple[str, str]]) -> None:
        """Add one home's confirmed devices, (MAC, device type), to the bundle's MAC blocks: a second unit of a
        product the owner confirmed, bought with the first, likely comes from its production run. Replaces the
        previous call's; types the model does not know are left out. It stays in the home, like the MACs."""
        if "oui" not in self.features.signals:
            return
        merged = {block: list(types) for block, types in self.bundle.mac_blocks.items()}
        for mac, device_type in units:
            if device_type in self.type_index:
                for block in blocks(mac):
                    if device_type not in merged.setdefault(block, []):
                        merged[block].append(device_type)
        self.mac_blocks = merged  # one assignment: sessions starting meanwhile see the old table or the new

    def block_prior(self, mac: str) -> np.ndarray | None:
        """Device-type weights from the finest MAC production block of ``mac`` that holds a unit training
        captured or this home confirmed (``BLOCK_LIKELIHOOD`` for its types, 1 for the rest); None when it is in
        no such block."""
        index = self.type_index
        for block in blocks(mac) if self.mac_blocks else []:
            types = [index[t] for t in self.mac_blocks.get(block, ()) if t in index]
            if types:
                prior = np.ones(len(index), dtype=np.float32)
                prior[types] = BLOCK_LIKELIHOOD
                return prior
        return None

    def types_of(self, manufacturer: str) -> np.ndarray:
        """Indices of the device types ``manufacturer`` makes, and of the generic types (any maker's)."""
        return self._types_of[manufacturer]

    def prototypes(self) -> dict[str, list[Observation]]:
        """Per device type, the first seconds of one real capture (timestamps from 0, repeats collapsed) for virtual
        devices."""
        return {t: [observation_from_json(o) for o in seq] for t, seq in self.bundle.prototypes.items()}

    def oui_prefixes(self) -> dict[str, str]:
        """Per captured device type, the registered MAC prefix ("74:da:38") its real captures came from."""
        return dict(self.bundle.oui_prefixes)

    def profiles(self) -> dict[str, list[str]]:
        """Per device type, the SLDs its class normally contacts in the training data."""
        return {t: list(slds) for t, slds in self.bundle.profiles.items()}


class Session:
    """One device's streaming identification."""

    def __init__(self, ident: Identifier, mac: str, first_ts: float):
        self.ident = ident
        self.state = FeatureState(ident.features, mac, first_ts, ident.vocabulary)
        self.x = self.state.vector()
        self.z1 = ident.net.first_layer(self.x)
        self.words = 0  # distinct identifying tokens (IDENTIFYING_PREFIXES: names, DHCP, mDNS, MAC vendor) ...
        self.new_words = 0  # ... of which training never saw (outside ``Bundle.vocabulary``) ...
        self.specific_words = 0  # ... and those that came from at most two vendors in training (Bundle.specific)
        self.own_words = False  # a DNS name, DHCP or mDNS token: something the device said, not its MAC
        self.dns_only = True  # every token so far came from DNS names (see _best_type)
        self.name_votes = np.zeros(len(ident.labels["manufacturer"]), dtype=np.float32)  # NAME_VOTE_FLOOR
        self.committed: Identity | None = None
        self._note_tokens(self.state.tokens)
        self.state.fresh.clear()
        self.block_prior = ident.block_prior(mac)
        self._refresh()

    def _note_tokens(self, tokens) -> None:
        """Book a session's new tokens: vendor-specific ones seen in training, identifying ones training never
        saw, and whether anything but DNS has been seen (the open-set verdict and ``_best_type`` read these);
        each DNS name's vendor vote (``NAME_VOTE_FLOOR``)."""
        for token in tokens:
            self.dns_only &= signal_of(token) == "dns"
            share = self.ident.name_vote(token)
            if share is not None:
                self.name_votes += share
            if is_identifying(token):
                self.own_words |= not token.startswith("oui")
                self.specific_words += bool(self.ident.specific[seen_bit(token)])
                if self.ident.vocabulary is not None:
                    self.words += 1
                    self.new_words += not self.ident.vocabulary[seen_bit(token)]

    def update(self, obs: Observation) -> Identity | None:
        """Fold in one observation; returns an Identity only when a decision is committed or revised."""
        changed = self.state.add(obs)
        fresh = bool(self.state.fresh)  # new tokens, maybe outside the vocabulary: still open-set evidence
        if not changed and not fresh:
            return None
        if fresh:
            self._note_tokens(self.state.fresh)
            self.state.fresh.clear()
        w_in = self.ident.net.w_in
        doubled = False
        for b in set(changed):
            count = self.state.counts[b]
            new = np.log1p(count)
            self.z1 += (new - self.x[b]) * w_in[b]
            self.x[b] = new
            doubled |= (int(count) & (int(count) - 1)) == 0
        # the net re-runs when the evidence moved materially: a new token, or a count reaching a power of two
        # (log1p changes little between); a repeat never overturns a committed decision
        if not fresh and (self.committed is not None or not doubled):
            self._stale = True
            return None
        self._refresh()
        return self._decide(obs.ts)

    def _refresh(self) -> None:
        self._probs = self.ident.net.from_first_layer(self.z1)
        if self.name_votes.any():
            weighted = self._probs[0] ** self.ident.name_vote_power * (self.name_votes + self.ident.name_vote_floor)
            self._probs[0] = weighted / weighted.sum()
        if self.block_prior is not None:
            weighted = self._probs[1] * self.block_prior
            self._probs[1] = weighted / weighted.sum()
        self._stale = False  # counts moved since the net last ran (it re-runs lazily, see update)

    def probabilities(self) -> list[np.ndarray]:
        """Calibrated (manufacturer, device type, category) distributions on everything seen so far."""
        if self._stale:
            self._refresh()
        return self._probs

    def _decide(self, ts: float) -> Identity | None:
        th = self.ident.bundle.thresholds
        p_type = self._probs[1]
        best = self._best_type()
        if self.committed is None:
            # the MAC prefix alone names a vendor, never a product: wait for the device's own words
            if p_type[best] >= th.commit and self._known() and self.own_words:
                self.committed = self._identity(ts - self.state.first_ts)
                return self.committed
            return None
        labels = self.ident.labels["device_type"]
        if labels[best] == self.committed.device_type or p_type[best] < th.revise:
            return None
        held = self.ident.type_index[self.committed.device_type] if self.committed.known else None
        if held is not None and p_type[held] > th.abandon:
            return None  # the committed type is still plausible: not strong contrary evidence
        self.committed = self._identity(ts - self.state.first_ts)
        return self.committed

    def _known(self) -> bool:
        th = self.ident.bundle.thresholds
        if self.words and self.new_words / self.words > th.max_new_words:
            # much that no device in training said: a vendor's own cloud, DHCP client or MAC the model never saw
            return False
        vouched = self.specific_words >= th.min_specific or (self.words > 0 and not self.new_words)
        bar = th.known if self.name_votes.any() else th.known_unvoted  # the head _refresh weighed, or the net's
        return float(self._probs[0].max()) >= (bar if vouched else th.known_without_specific)

    def _best_type(self) -> int:
        """The device type to name: the likeliest, except on DNS names alone, where it is the likeliest of the
        types whose maker the manufacturer head names, or of the generic types. The manufacturer head learned 72
        vendors from the domain list's name sets, the type head mostly the captured products' timed queries: a
        vendor's names spread over seconds drift, in the type head alone, to the nearest captured product."""
        p_man, p_type, _ = self._probs
        if not self.dns_only:
            return int(p_type.argmax())
        fits = self.ident.types_of(self.ident.labels["manufacturer"][int(p_man.argmax())])
        return int(fits[int(p_type[fits].argmax())]) if fits.size else int(p_type.argmax())

    def _identity(self, decided_after_s: float | None) -> Identity:
        labels = self.ident.labels
        p_man, p_type, p_cat = self._probs
        best = self._best_type()
        # the named type first, so "closest: alternatives[0]" is always the type named
        order = [best] + [int(i) for i in np.argsort(-p_type)[:3] if i != best][:2]
        alternatives = [(labels["device_type"][i], round(float(p_type[i]), 4)) for i in order]
        known = self._known()
        dtype = labels["device_type"][best]
        info = self.ident.bundle.type_info.get(dtype, {})
        # a captured type names its own manufacturer and category, a type of the domain list its own category
        # (train.type_info); the heads answer for the rest
        manufacturer = info.get("manufacturer") or labels["manufacturer"][int(p_man.argmax())]
        category = info.get("category") or labels["category"][int(p_cat.argmax())]
        sources = {signal_of(t) for t in self.state.tokens}
        if self.block_prior is not None:
            sources.add("macblock")  # the MAC's production block weighed in (shown as a signal in the web UI)
        return Identity(
            manufacturer,
            dtype,
            category,
            round(float(p_type[best]), 4),
            known,
            decided_after_s,
            alternatives,
            sorted(sources),
            self.ident.version,
        )

    def current(self) -> Identity:
        """The committed decision if any, else the provisional best guess (``decided_after_s`` None)."""
        if self.committed is not None:
            return self.committed
        self.probabilities()
        return self._identity(None)
