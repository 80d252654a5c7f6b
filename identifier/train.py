"""Training: labelled observation windows in, a model bundle out.

Each timed window (a capture) becomes several samples: its prefixes at ``CUTOFFS`` seconds, each with all
signals and with DNS alone, so one model serves early decisions and DNS-only gateways. Each whole-capture name
set (the domains list) becomes its full set plus random halves, standing in for the partial view of a device's
first minute.
"""

from __future__ import annotations

import hashlib
import json
import time
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

import numpy as np

from identifier.bundle import Bundle, Thresholds
from identifier.dataset import LabelledWindow, listed_category
from identifier.features import DEFAULT_FEATURES, SEEN_BITS, FeatureConfig, seen_bit, window_vectors
from identifier.inference import HEADS
from identifier.observation import Observation, PacketObservation
from identifier.observation import to_json as observation_to_json
from identifier.oui import blocks, vendor
from identifier.stream import is_identifying

CUTOFFS = (1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
DNS_ONLY = ("dns",)
SUBSETS = 4  # random halves per whole-capture name set
NAME_SET_WEIGHT = (4.0, 1.0, 1.0)  # per head: name sets are what teaches most vendors, captures the types


@dataclass
class Samples:
    x: np.ndarray
    y: np.ndarray  # (n, 3) class ids, -1 where unlabelled
    w: np.ndarray  # (n, 3) per-head weights
    groups: np.ndarray
    tokens: list[set[str]]


def label_space(windows: list[LabelledWindow]) -> dict[str, list[str]]:
    """Sorted label values per head, from the windows' own labels."""
    space = {}
    for head in HEADS:
        space[head] = sorted({getattr(w, head) for w in windows if getattr(w, head)})
    return space


_VECTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _timed_vectors(win: LabelledWindow, config: FeatureConfig) -> tuple[np.ndarray, list[set[str]]]:
    """A capture's prefix vectors, cached per window: cross-validation trains on each capture many times."""
    per_window = _VECTORS.setdefault(win, {})
    if config not in per_window:
        per_window[config] = window_vectors(win.observations, win.mac, win.first_ts, config, list(CUTOFFS))
    return per_window[config]


def build_samples(
    windows: list[LabelledWindow], space: dict[str, list[str]], config: FeatureConfig, seed: int = 0
) -> Samples:
    rng = np.random.default_rng(seed)
    index = {head: {v: i for i, v in enumerate(values)} for head, values in space.items()}
    xs, ys, ws, groups, tokens = [], [], [], [], []

    def add(vec: np.ndarray, toks: set[str], win: LabelledWindow, weight: tuple[float, float, float]) -> None:
        if not vec.any():
            return  # nothing seen yet: teaches only the prior
        xs.append(vec)
        ys.append([index[h].get(getattr(win, h) or "", -1) for h in HEADS])
        ws.append(weight)
        groups.append(win.group)
        tokens.append(toks)

    for win in windows:
        if win.timed:
            for signals in (config.signals, DNS_ONLY):
                vecs, toks = _timed_vectors(win, config.with_signals(signals))
                for v, t in zip(vecs, toks, strict=False):
                    add(v, t, win, (1.0, 1.0, 1.0))
        else:
            dns_config = config.with_signals(DNS_ONLY)
            subsets = [win.observations]
            n = len(win.observations)
            for _ in range(SUBSETS if n > 1 else 0):
                keep = np.sort(rng.choice(n, size=max(1, n // 2), replace=False))
                subsets.append([win.observations[i] for i in keep])
            for obs in subsets:
                vecs, toks = window_vectors(obs, "", 0.0, dns_config, [0.0])
                add(vecs[0], toks[0], win, NAME_SET_WEIGHT)
    return Samples(
        np.stack(xs).astype(np.float32),
        np.asarray(ys, dtype=np.int64),
        np.asarray(ws, dtype=np.float32),
        np.asarray(groups),
        tokens,
    )


def specific_bitmap(samples: Samples, space: dict[str, list[str]], max_vendors: int = 2) -> np.ndarray:
    """Bits of the tokens that, in training, came from at most ``max_vendors`` manufacturers: the open-set
    evidence (a device showing none of them is from a vendor the model never saw)."""
    vendors: dict[str, set[int]] = defaultdict(set)
    for toks, y in zip(samples.tokens, samples.y, strict=False):
        if y[0] < 0:
            continue
        for t in toks:
            if is_identifying(t):
                vendors[t].add(int(y[0]))
    bits = np.zeros(SEEN_BITS, dtype=bool)
    for t, vs in vendors.items():
        if len(vs) <= max_vendors:
            bits[seen_bit(t)] = True
    return np.packbits(bits)


def vocabulary_bitmap(samples: Samples) -> np.ndarray:
    """Bits of every token in training: inference counts only these (``features.FeatureState``), and a device's
    identifying tokens outside it are a new vendor's (the open set's ``Thresholds.max_new_words``)."""
    bits = np.zeros(SEEN_BITS, dtype=bool)
    for toks in samples.tokens:
        for t in toks:
            bits[seen_bit(t)] = True
    return np.packbits(bits)


def data_hash(windows: list[LabelledWindow]) -> str:
    """SHA-256 over the training windows' labels and observations, in a canonical order."""
    h = hashlib.sha256()
    for w in sorted(windows, key=lambda w: w.group):
        h.update(repr((w.group, w.manufacturer, w.device_type, w.category, w.mac, w.first_ts)).encode())
        for o in w.observations:
            h.update(repr(o).encode())
    return h.hexdigest()


def answers_hash(bundle: Bundle) -> str:
    """SHA-256 over what decides a bundle's answers (weights, bitmaps, thresholds, labels, type makers, MAC
    blocks, name votes), for its version: retrained on the same data the same day under other rules, it still
    gets a new one. The weights are hashed as saved (float16), so a loaded bundle hashes as it did when trained."""
    h = hashlib.sha256()
    for key in sorted(bundle.weights):
        h.update(key.encode())
        h.update(np.ascontiguousarray(bundle.weights[key], dtype=np.float16).tobytes())
    h.update(bundle.specific.tobytes() + bundle.vocabulary.tobytes())
    rules = [bundle.features.to_json(), bundle.labels, vars(bundle.thresholds), bundle.type_info]
    rules += [bundle.mac_blocks, bundle.name_vendors]
    h.update(json.dumps(rules, sort_keys=True).encode())
    return h.hexdigest()


def prototypes(
    windows: list[LabelledWindow], max_obs: int = 40, horizon: float = 30.0
) -> dict[str, list[dict]]:
    """Per device type, the first ``horizon`` seconds of its first capture, relative timestamps, with runs of
    identical packets collapsed so a prototype stays a few dozen records."""
    out: dict[str, list[dict]] = {}
    for w in sorted(windows, key=lambda w: (not w.timed, w.group)):
        if not w.device_type or w.device_type in out:
            continue
        seq: list[Observation] = []
        packets: Counter = Counter()
        for o in w.observations:
            rel = o.ts - w.first_ts
            if rel > horizon or len(seq) >= max_obs:
                break
            if isinstance(o, PacketObservation):
                packets[(o.proto, o.port)] += 1
                if packets[(o.proto, o.port)] > 2:
                    continue
            seq.append(replace(o, ts=rel if w.timed else float(len(seq))))
        if seq:
            out[w.device_type] = [observation_to_json(o) for o in seq]
    return out


def oui_prefixes(windows: list[LabelledWindow]) -> dict[str, str]:
    """Per captured device type, the registered MAC vendor prefix of its capture (the demo's devices use it)."""
    out: dict[str, str] = {}
    for w in sorted(windows, key=lambda w: w.group):
        if w.timed and w.device_type and w.mac and w.device_type not in out and vendor(w.mac):
            out[w.device_type] = w.mac.lower()[:8]
    return out


def mac_blocks(windows: list[LabelledWindow]) -> dict[str, list[str]]:
    """Per MAC production block (``oui.blocks``) of a captured unit, the device types captured in it."""
    out: dict[str, set[str]] = defaultdict(set)
    for w in windows:
        if w.timed and w.device_type:
            for block in blocks(w.mac):
                out[block].add(w.device_type)
    return {b: sorted(types) for b, types in sorted(out.items())}


def profiles(windows: list[LabelledWindow], min_share: float = 0.25) -> dict[str, list[str]]:
    """Per device type, the SLDs at least ``min_share`` of its windows queried."""
    counts: dict[str, Counter] = defaultdict(Counter)
    totals: Counter = Counter()
    for w in windows:
        if not w.device_type:
            continue
        totals[w.device_type] += 1
        counts[w.device_type].update(w.slds())
    return {t: sorted(s for s, n in c.items() if n >= min_share * totals[t]) for t, c in counts.items()}


def name_vendors(windows: list[LabelledWindow]) -> dict[str, dict[str, int]]:
    """Per SLD, how many training devices of each manufacturer queried it: a captured product once however many
    captures it has (its first ``CUTOFFS[-1]`` seconds, what training reads), each listed device once. The votes
    that weigh the manufacturer head (``stream.NAME_VOTE_FLOOR`` says why devices, not windows)."""
    devices: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for w in windows:
        if not w.manufacturer:
            continue
        device = w.device_type if w.timed and w.device_type else w.group
        for name in w.slds(CUTOFFS[-1] if w.timed else float("inf")):
            devices[name][w.manufacturer].add(device)
    return {name: {v: len(d) for v, d in sorted(per.items())} for name, per in sorted(devices.items()) if name}


def type_info(windows: list[LabelledWindow]) -> dict[str, dict[str, str]]:
    """The manufacturer and category of each device type that belongs to a single one of each (the captured
    products), and the category alone of each of the domain list's types (``listed_category``): a type is shown
    with its own category, never the category head's guess, which for a speaker or a TV is a kind it never learned
    (an Amazon "Speaker" came out "camera")."""
    seen: dict[str, set[tuple[str | None, str | None]]] = defaultdict(set)
    listed: dict[str, dict[str, str]] = {}
    for w in windows:
        if w.device_type and w.timed:
            seen[w.device_type].add((w.manufacturer, w.category))
        elif w.device_type and (category := listed_category(w.device_type)):
            listed[w.device_type] = {"category": category}
    captured = {
        t: {"manufacturer": m, "category": c}
        for t, pairs in seen.items()
        if len(pairs) == 1
        for (m, c) in pairs
        if m and c
    }
    return listed | captured


def train(windows: list[LabelledWindow], seed: int = 0, progress: bool = False) -> Bundle:
    """Train a bundle on ``windows``; torch is imported here, never by the daemon."""
    from identifier.model import TrainConfig, fit

    space = label_space(windows)
    samples = build_samples(windows, space, DEFAULT_FEATURES, seed)
    weights = fit(
        samples.x,
        samples.y,
        samples.w,
        samples.groups,
        tuple(len(space[h]) for h in HEADS),
        seed,
        TrainConfig(),
        progress,
    )
    digest = data_hash(windows)
    bundle = Bundle(
        weights=weights,
        features=DEFAULT_FEATURES,
        labels=space,
        specific=specific_bitmap(samples, space),
        version="",
        thresholds=Thresholds(),
        type_info=type_info(windows),
        training_data_sha256=digest,
        prototypes=prototypes(windows),
        profiles=profiles(windows),
        oui_prefixes=oui_prefixes(windows),
        mac_blocks=mac_blocks(windows),
        vocabulary=vocabulary_bitmap(samples),
        name_vendors=name_vendors(windows),
    )
    bundle.version = f"{time.strftime('%Y%m%d')}-{digest[:8]}-s{seed}-{answers_hash(bundle)[:6]}"
    return bundle
