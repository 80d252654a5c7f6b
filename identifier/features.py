"""Observation windows to fixed-size feature vectors through stable token hashing.

Every signal becomes text tokens (``sld:amazonaws.com``, ``dhcp55:1,3,6,12``, ``mdns:dch``); each token is
hashed with blake2b (never Python's ``hash()``, which changes per process) into one of ``dim`` buckets, so no
vocabulary has to be shared between homes and a model trained anywhere reads features computed anywhere.
A bucket's value is ``log1p`` of its token count: repeated DNS queries (the seed paper's query rate) count, but
saturate. Two names of one domain queried in a row also give a ``next:`` token with the pause between them: sibling
products of one vendor often query the same names, in another order or rhythm.

At inference a bundle's vocabulary, the bits (``seen_bit``) of every token it was trained on, keeps the tokens
training never saw out of the vector: some 2,500 trained tokens share 2,048 buckets, so a new token's bucket
usually carries another token's weights.

``FeatureState`` is incremental: the streaming identifier feeds it one observation at a time and learns which
buckets changed, so inference updates only what moved. Training builds vectors through the same class, so the
two paths cannot drift apart.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from hashlib import blake2b

import numpy as np

from identifier.domains import sld
from identifier.observation import (
    DhcpObservation,
    DnsObservation,
    MdnsObservation,
    Observation,
    PacketObservation,
)
from identifier.oui import vendor

SIGNALS = ("dns", "dhcp", "oui", "mdns", "packet")
SEEN_BITS = 1 << 16  # size of the bitmap of tokens seen in training (open-set evidence), 8 KB


@dataclass(frozen=True)
class FeatureConfig:
    """What the bundle records so a model is always fed the features it was trained on."""

    dim: int = 2048
    signals: tuple[str, ...] = SIGNALS
    version: int = 2  # 2 adds the next: tokens (query order and pause); a version 1 bundle is fed without them

    def to_json(self) -> dict:
        return {"dim": self.dim, "signals": list(self.signals), "version": self.version}

    @classmethod
    def from_json(cls, data: dict) -> FeatureConfig:
        return cls(int(data["dim"]), tuple(data["signals"]), int(data["version"]))

    def with_signals(self, signals: tuple[str, ...]) -> FeatureConfig:
        return FeatureConfig(self.dim, signals, self.version)


DEFAULT_FEATURES = FeatureConfig()


@lru_cache(maxsize=1 << 16)
def token_hash(token: str) -> int:
    """A 64-bit hash of ``token`` that is the same in every process, on every machine."""
    return int.from_bytes(blake2b(token.encode("utf-8", "replace"), digest_size=8).digest(), "little")


def bucket(token: str, dim: int) -> int:
    return token_hash(token) % dim


def seen_bit(token: str) -> int:
    """The token's position in the training-vocabulary bitmap: other hash bits than ``bucket`` uses."""
    return (token_hash(token) >> 32) % SEEN_BITS


_CHUNK = re.compile(r"[a-z0-9]+")
_TRAILING_ID = re.compile(r"[0-9a-f]{4,}$")  # MAC or serial suffixes (dch0d60, gainspanca9152)


def name_words(text: str) -> list[str]:
    """Words of a device-chosen name, without the per-unit serial or MAC suffix most firmwares append."""
    words: list[str] = []
    for chunk in _CHUNK.findall(text.lower()):
        stem = _TRAILING_ID.sub("", chunk)
        if len(stem) >= 2 and not stem.isdigit():
            words.append(stem)
    return words


def time_bin(seconds: float) -> int:
    """Half-octave bins of seconds since the device's first packet: fine early, coarse late."""
    return int(2 * math.log2(1.0 + max(seconds, 0.0)))


def gap_bin(seconds: float) -> int:
    """Half-octave bins of the gap between two queries, fine below a second: a firmware's query order and the
    pause it keeps between two names tell sibling products apart when their names are the same."""
    return int(2 * math.log2(1.0 + 4.0 * max(seconds, 0.0)))


def start_tokens(mac: str, signals: tuple[str, ...]) -> list[str]:
    """Tokens known before any packet is decoded: the MAC's registered vendor and prefix. None for a MAC with no
    registered vendor (a phone's private address, the demo's generic devices): it says nothing of the maker, and
    as an identifying token training never saw it would count toward the open set's new vendor."""
    if "oui" not in signals or not mac:
        return []
    org = vendor(mac)
    if org is None:
        return []
    return [f"oui:{org.lower()}", f"ouiprefix:{mac.lower()[:8]}"]


def observation_tokens(
    obs: Observation, since_first: float, signals: tuple[str, ...]
) -> tuple[list[str], list[str]]:
    """(counted tokens, once tokens) of one observation; once tokens count only the first time they appear."""
    if isinstance(obs, DnsObservation):
        if "dns" not in signals or not obs.name:
            return [], []
        domain = sld(obs.name)
        once = [
            f"host:{obs.name}",
            f"qtype:{obs.qtype}",
            f"first:sld:{domain}:{time_bin(since_first)}",
            f"first:dns:{time_bin(since_first)}",
        ]
        return [f"sld:{domain}"], once
    if isinstance(obs, DhcpObservation):
        if "dhcp" not in signals:
            return [], []
        once = [f"first:dhcp:{time_bin(since_first)}", f"dhcpmsg:{obs.message_type}"]
        if obs.param_list:
            once.append("dhcp55:" + ",".join(map(str, obs.param_list)))
            once.extend(f"dhcp55opt:{code}" for code in obs.param_list)
        if obs.vendor_class:
            once.append(f"dhcp60:{obs.vendor_class.lower()}")
            once.extend(f"dhcp60w:{w}" for w in name_words(obs.vendor_class))
        if obs.hostname:
            once.extend(f"dhcp12:{w}" for w in name_words(obs.hostname))
        else:
            once.append("dhcp12:none")
        return ["dhcp"], once
    if isinstance(obs, MdnsObservation):
        if "mdns" not in signals:
            return [], []
        once = [f"first:mdns:{time_bin(since_first)}"]
        once.extend(f"mdnssvc:{s.lower()}" for s in obs.services)
        for name in obs.names:
            once.extend(f"mdns:{w}" for w in name_words(name) if w not in ("local", "tcp", "udp"))
        return ["mdns"], once
    if isinstance(obs, PacketObservation):
        if "packet" not in signals:
            return [], []
        port = obs.port if obs.port is not None and obs.port < 10000 else ("high" if obs.port else "")
        kind = f"pkt:{obs.proto}:{port}"
        return [kind], [f"first:{kind}:{time_bin(since_first)}"]
    return [], []


@dataclass
class FeatureState:
    """One device's feature vector, built observation by observation."""

    config: FeatureConfig
    mac: str = ""
    first_ts: float = 0.0
    # the bits (``seen_bit``) of the tokens the model was trained on; None counts every token (training)
    vocabulary: np.ndarray | None = None
    counts: np.ndarray = field(init=False)
    tokens: dict[str, float] = field(
        default_factory=dict
    )  # every token seen (its count): Identity.signals and the open set read which, not how often
    fresh: list[str] = field(
        default_factory=list
    )  # tokens seen for the first time, until a consumer clears it
    last_query: tuple[str, str, float] | None = None  # (name, its SLD, ts) of the previous DNS query, for next:

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.config.dim, dtype=np.float32)
        for token in start_tokens(self.mac, self.config.signals):
            self._add(token)

    def _add(self, token: str) -> int | None:
        """Count ``token``; returns its bucket, or None when it is outside the vocabulary (then it is only
        recorded): a token training never saw has no weights of its own, and its hash bucket holds the
        evidence of the trained tokens that share it, so counting it would add another vendor's evidence."""
        count = self.tokens.get(token)
        if count is None:
            self.fresh.append(token)
            count = 0.0
        self.tokens[token] = count + 1.0
        if self.vocabulary is not None and not self.vocabulary[seen_bit(token)]:
            return None
        b = bucket(token, self.config.dim)
        self.counts[b] += 1.0
        return b

    def add(self, obs: Observation) -> list[int]:
        """Fold ``obs`` in; returns the buckets whose count changed (none: it said nothing new, or nothing the
        vocabulary holds; its new tokens are still in ``fresh``)."""
        counted, once = observation_tokens(obs, obs.ts - self.first_ts, self.config.signals)
        if isinstance(obs, DnsObservation) and counted and self.config.version >= 2:
            domain = sld(obs.name)
            if self.last_query is not None:
                name, last_domain, ts = self.last_query
                # Names of one registrable domain only: the firmware's own sequence, not the third-party names
                # (NTP pools, ad networks) that vary between homes. Queries at one instant carry no order (a
                # domain list's name set).
                if obs.ts > ts and domain == last_domain:
                    once.append(f"next:{name}>{obs.name}:{gap_bin(obs.ts - ts)}")
            self.last_query = (obs.name, domain, obs.ts)
        added = [self._add(t) for t in counted]
        # counted and once tokens have distinct prefixes, so a once token in ``tokens`` was added by an earlier
        # observation (or earlier in this one)
        for token in once:
            if token not in self.tokens:
                added.append(self._add(token))
        return [b for b in added if b is not None]

    def vector(self) -> np.ndarray:
        return np.log1p(self.counts)


def window_vector(
    observations: list[Observation],
    mac: str,
    first_ts: float,
    config: FeatureConfig,
    until: float | None = None,
) -> np.ndarray:
    """The feature vector of the observations up to ``until`` seconds after ``first_ts`` (all when None)."""
    vectors, _ = window_vectors(observations, mac, first_ts, config, [math.inf if until is None else until])
    return vectors[0]


def window_vectors(
    observations: list[Observation], mac: str, first_ts: float, config: FeatureConfig, cutoffs: list[float]
) -> tuple[np.ndarray, list[set[str]]]:
    """Vectors and token sets at several cut-offs (ascending seconds from first_ts) in one pass."""
    state = FeatureState(config, mac, first_ts)
    rows: list[np.ndarray] = []
    tokens: list[set[str]] = []
    i = 0
    for cut in cutoffs:
        while i < len(observations) and observations[i].ts - first_ts <= cut:
            state.add(observations[i])
            i += 1
        rows.append(state.vector())
        tokens.append(set(state.tokens))
    return np.stack(rows), tokens
