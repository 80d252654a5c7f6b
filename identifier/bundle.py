"""The versioned model bundle: a directory with ``weights.npz`` and ``bundle.json``.

``bundle.json`` holds everything needed to use the weights and to trust them: the bundle format and model
version, the feature config, label sets, decision thresholds, metrics, the SHA-256 of the training data and of
``weights.npz`` (so a pair from two saves is refused), the per-type prototypes (the first 30 s of one real
capture, repeats collapsed, for the demo), the MAC vendor prefix each captured type was seen with (so the demo's
devices carry a real OUI) and profiles (the SLDs each type contacts).
The shipped default lives in ``identifier/bundle/``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from identifier.atomicfile import write_whole
from identifier.features import SEEN_BITS, SIGNALS, FeatureConfig

FORMAT = 1
DEFAULT_DIR = Path(__file__).resolve().parent / "bundle"


class BundleError(Exception):
    """A model directory that is missing, incomplete or of another format; the message names it."""


@dataclass
class Thresholds:
    commit: float = 0.9  # calibrated device-type probability at which a decision is committed
    revise: float = 0.9  # a committed decision changes only for another type at least this sure ...
    abandon: float = 0.1  # ... while the committed type has fallen to at most this
    # below this manufacturer probability the device is judged unknown: the head as its DNS names' votes weigh it,
    # taken at its square root (``stream.NAME_VOTE_NET_POWER``), which flattens it ...
    known: float = 0.2
    # ... and, with no name that votes (no DNS yet, or only names that neither training nor their brand's trained
    # names know), the net's own head: a bar on each scale, as each was chosen (docs/identification.md, Open set)
    known_unvoted: float = 0.4
    min_specific: int = 1  # known at either bar needs this many tokens that were specific to <= 2 vendors in training
    # ... without them, known needs this vendor probability: then only the combination (which names, in which
    # order) is specific, and it has to be nearly certain
    known_without_specific: float = 0.95
    # identifying tokens no device in training showed (its DNS names, DHCP fingerprint and hostname, mDNS
    # names, MAC vendor) are a new vendor's: above this share of a device's ones it is unknown whatever the
    # heads say; with none of them, they vouch for it like a specific token
    # (measured on the leave-one-lab-out split, docs/identification.md)
    max_new_words: float = 0.2


# threshold keys bundles stored under an earlier name: max_new_names counted every identifying token, not names
_RENAMED_THRESHOLDS = {"max_new_names": "max_new_words"}


@dataclass
class Bundle:
    weights: dict[str, np.ndarray]
    features: FeatureConfig
    labels: dict[str, list[str]]  # head -> label values, index = class id
    specific: np.ndarray  # packed bitmap of the training tokens at most 2 vendors showed (features.seen_bit)
    version: str
    thresholds: Thresholds = field(default_factory=Thresholds)
    type_info: dict[str, dict[str, str]] = field(
        default_factory=dict
    )  # device_type -> manufacturer, category
    metrics: dict = field(default_factory=dict)
    training_data_sha256: str = ""
    prototypes: dict[str, list[dict]] = field(default_factory=dict)
    profiles: dict[str, list[str]] = field(default_factory=dict)
    oui_prefixes: dict[str, str] = field(default_factory=dict)  # device_type -> "74:da:38" (captured types)
    mac_blocks: dict[str, list[str]] = field(default_factory=dict)  # oui.blocks() -> types captured in it
    # packed bitmap of every token in training (features.seen_bit); empty: not recorded (older bundles)
    vocabulary: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint8))
    # SLD -> {manufacturer: training devices that queried it} (train.name_vendors); empty in older bundles
    name_vendors: dict[str, dict[str, int]] = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        """Write the bundle into ``directory``. Each file is written whole and fsynced beside its final name and
        only then renamed over it (``atomicfile.write_whole``): a save that fails part-way (a full SD card,
        Ctrl-C, a power cut) leaves the bundle that was there. ``weights_sha256`` in ``bundle.json`` ties the
        pair, so a stop between the two renames is refused at load rather than run as new weights with old
        labels."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        # float16 halves the file (the shipped bundle must stay < 1 MB); the net is computed in float32
        np.savez_compressed(
            buf,
            seen=self.specific,  # the file's key predates the name
            vocabulary=self.vocabulary,
            **{k: v.astype(np.float16) for k, v in self.weights.items()},
        )
        weights = buf.getvalue()
        meta = {
            "format": FORMAT,
            "version": self.version,
            "features": self.features.to_json(),
            "labels": self.labels,
            "thresholds": vars(self.thresholds),
            "type_info": self.type_info,
            "metrics": self.metrics,
            "training_data_sha256": self.training_data_sha256,
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            "prototypes": self.prototypes,
            "profiles": self.profiles,
            "oui_prefixes": self.oui_prefixes,
            "mac_blocks": self.mac_blocks,
            "name_vendors": self.name_vendors,
        }
        write_whole(d / "weights.npz", weights)
        write_whole(d / "bundle.json", (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode("utf-8"))
        return d

    def parameter_count(self) -> int:
        """The model's size in numbers: every weight array, the heads' temperatures included (3 of them;
        federation moves the rest, ``federated.model.keys``). The token bitmaps are lookup tables, not counted."""
        return int(sum(v.size for v in self.weights.values()))

    @classmethod
    def load(cls, directory: str | Path | None = None) -> Bundle:
        d = Path(directory) if directory else DEFAULT_DIR
        try:
            meta = json.loads((d / "bundle.json").read_text(encoding="utf-8"))
            raw = (d / "weights.npz").read_bytes()
            # absent from bundles saved before it was recorded (the shipped one among them)
            recorded = meta.get("weights_sha256") if isinstance(meta, dict) else None
            if recorded is not None and recorded != hashlib.sha256(raw).hexdigest():
                raise BundleError(f"{d}: weights.npz is not the one bundle.json was saved with (a save cut short?)")
            with np.load(io.BytesIO(raw)) as npz:
                arrays = {k: npz[k] for k in npz.files}
        # BadZipFile, zlib.error, EOFError: a weights.npz cut short or damaged (a copy that stopped, a worn SD card)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise BundleError(f"{d}: not a model bundle ({exc.__class__.__name__}: {exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or isinstance(meta.get("format"), bool):
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise BundleError(f"{d}: bundle format {found} is not {FORMAT}")
        try:
            specific = arrays.pop("seen")
            vocabulary = arrays.pop("vocabulary", np.zeros(0, dtype=np.uint8))
            arrays.pop("names", None)  # older bundles' bitmap of the DNS names alone
            bundle = cls(
                weights={k: v.astype(np.float32) for k, v in arrays.items()},
                features=FeatureConfig.from_json(meta["features"]),
                labels=meta["labels"],
                specific=specific,
                version=meta["version"],
                thresholds=_thresholds(d, meta["thresholds"]),
                type_info=meta["type_info"],
                metrics=meta["metrics"],
                training_data_sha256=meta["training_data_sha256"],
                prototypes=meta["prototypes"],
                profiles=meta["profiles"],
                # absent from bundles written before they existed
                oui_prefixes=meta.get("oui_prefixes", {}),
                mac_blocks=meta.get("mac_blocks", {}),
                vocabulary=vocabulary,
                name_vendors=meta.get("name_vendors", {}),
            )
            _check_shapes(bundle)
            _check_contents(bundle)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise BundleError(f"{d}: not a model bundle ({exc.__class__.__name__}: {exc})") from exc
        return bundle


def _check_shapes(bundle: Bundle) -> None:
    """Run the net once on an empty window: weights that do not fit the feature config or the label sets fail
    when the bundle is loaded, not at some device's first observation."""
    from identifier.inference import HEADS, NumpyNet

    for key, array in bundle.weights.items():
        # a NaN or infinite weight answers every device with a NaN confidence, which is not even JSON
        if not np.isfinite(array).all():
            raise ValueError(f"weights.npz {key} holds a value that is not a finite number")
    temps = bundle.weights["temps"]
    # a temperature divides a head's logits: 0 gives NaN, a negative one turns the least likely label into the answer
    if temps.shape != (len(HEADS),) or not (temps > 0).all():
        raise ValueError(f"weights.npz temps is {temps.tolist()!r:.80}, not {len(HEADS)} numbers above 0")
    if bundle.weights["w1"].ndim != 2:
        raise ValueError(f"w1 has shape {bundle.weights['w1'].shape}, not (feature buckets, hidden units)")
    if bundle.weights["w1"].shape[0] != bundle.features.dim:
        raise ValueError(f"w1 has {bundle.weights['w1'].shape[0]} rows for {bundle.features.dim} feature buckets")
    probabilities = NumpyNet(bundle.weights).probabilities(np.zeros(bundle.features.dim, dtype=np.float32))
    for head, p in zip(HEADS, probabilities, strict=True):
        if p.size != len(bundle.labels[head]):
            raise ValueError(f"the {head} head has {p.size} outputs for {len(bundle.labels[head])} labels")


def _check_contents(bundle: Bundle) -> None:
    """The parts the net does not read, checked for the types the identifier reads them as: a wrong one would
    fail at some device's first packet (a short bitmap, a list for a map) or silently change every answer (an
    unknown signal, a string of labels)."""
    unknown = sorted(set(bundle.features.signals) - set(SIGNALS))
    if unknown or not bundle.features.signals:
        raise ValueError(f"features.signals {list(bundle.features.signals)!r} are not among {', '.join(SIGNALS)}")
    for name, bitmap, sizes in (
        ("seen", bundle.specific, (SEEN_BITS // 8,)),
        ("vocabulary", bundle.vocabulary, (0, SEEN_BITS // 8)),  # 0: not recorded (older bundles)
    ):
        if bitmap.dtype != np.uint8 or bitmap.ndim != 1 or bitmap.size not in sizes:
            raise ValueError(f"the {name} bitmap is {bitmap.dtype} of shape {bitmap.shape}, not {SEEN_BITS // 8} bytes")
    newest = FeatureConfig().version
    if not 1 <= bundle.features.version <= newest:  # a newer iotgw's features would be computed as this one's
        raise ValueError(f"features.version {bundle.features.version} is not one this iotgw computes (1 to {newest})")
    for head, values in bundle.labels.items():
        if not _list_of_str(values):
            raise ValueError(f"labels.{head} is not a list of names")
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:  # a class id per name: one named twice leaves a head and the lists built from it out of step
            raise ValueError(f"labels.{head} names {', '.join(map(repr, twice))} more than once")
    _require(bundle.type_info, "type_info", lambda v: _str_map(v, lambda x: isinstance(x, str)))
    # a captured type names its maker and category from here, past the heads: one outside the label set was
    # answered as it stood (an edit naming the Aria scale's maker Philips made every Aria "Philips"). A type of the
    # domain list has a category alone, and may be a kind no capture showed ("speaker")
    _require(
        bundle.type_info,
        "type_info",
        lambda v: "manufacturer" not in v
        or (v["manufacturer"] in bundle.labels["manufacturer"] and v.get("category") in bundle.labels["category"]),
    )
    _require(bundle.mac_blocks, "mac_blocks", _list_of_str)
    _require(bundle.oui_prefixes, "oui_prefixes", lambda v: isinstance(v, str))
    _require(bundle.profiles, "profiles", _list_of_str)
    _require(bundle.prototypes, "prototypes", _observations)
    _require(bundle.name_vendors, "name_vendors", lambda v: _str_map(v, _count))


def _observations(value: object) -> bool:
    """A prototype: a list of observations as ``observation.to_json`` writes them (``iotgw demo`` replays each;
    one it cannot read stopped the demo with a KeyError, long after the bundle loaded)."""
    from identifier.observation import from_json

    try:
        return isinstance(value, list) and all(isinstance(o, dict) and from_json(o) for o in value)
    except (KeyError, TypeError, ValueError):
        return False


def _list_of_str(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _str_map(value: object, fits: Callable[[object], bool]) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and fits(v) for k, v in value.items())


def _require(value: object, name: str, fits: Callable[[object], bool]) -> None:
    """``value`` is a JSON object whose values all satisfy ``fits``; ValueError naming ``name`` otherwise."""
    if not isinstance(value, dict):
        raise ValueError(f"{name} is a {type(value).__name__}, not an object")
    bad = next((k for k, v in value.items() if not fits(v)), None)
    if bad is not None:
        raise ValueError(f"{name}[{bad!r}] is {value[bad]!r:.80}, which this iotgw cannot read")


def _thresholds(directory: Path, stored: dict) -> Thresholds:
    """The stored thresholds, earlier names read as today's; a key this code does not know (a bundle from a
    newer iotgw) is an error naming it, not a decision taken without it."""
    known = set(vars(Thresholds()))
    values = {_RENAMED_THRESHOLDS.get(key, key): value for key, value in stored.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BundleError(f"{directory}: bundle.json has thresholds this iotgw does not know: {', '.join(unknown)}")
    for key, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise BundleError(f"{directory}: threshold {key} is {value!r}, not a number")
        # min_specific counts tokens; every other threshold is a probability or a share, which a value outside
        # 0..1 turns into "always" or "never" without a word (a commit bar of -5 commits on nothing)
        fits = value >= 0 and value == int(value) if key == "min_specific" else 0 <= value <= 1
        if not fits:
            want = "a whole number from 0" if key == "min_specific" else "from 0 to 1"
            raise BundleError(f"{directory}: threshold {key} is {value!r}, not {want}")
    return Thresholds(**values)
