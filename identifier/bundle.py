"""The versioned model bundle: a directory with ``weights.npz`` and ``bundle.json``.

``bundle.json`` holds everything needed to use the weights and to trust them: the bundle format and model
version, the feature config, label sets, decision thresholds, metrics, the SHA-256 of the training data, the
per-type prototypes (synthetic observation sequences for the demo) and profiles (the SLDs each type contacts).
The shipped default lives in ``identifier/bundle/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from identifier.features import FeatureConfig
from identifier.observation import (
    DhcpObservation,
    DnsObservation,
    MdnsObservation,
    Observation,
    PacketObservation,
)

FORMAT = 1
DEFAULT_DIR = Path(__file__).resolve().parent / "bundle"


class BundleError(Exception):
    """A model directory that is missing, incomplete or of another format; the message names it."""


@dataclass
class Thresholds:
    commit: float = 0.9  # calibrated device-type probability at which a decision is committed
    revise: float = 0.9  # a committed decision changes only for another type at least this sure ...
    abandon: float = 0.1  # ... while the committed type has fallen to at most this
    known: float = 0.5  # below this manufacturer probability the device is judged unknown
    min_specific: int = 1  # known needs this many tokens that were specific to <= 2 vendors in training


@dataclass
class Bundle:
    weights: dict[str, np.ndarray]
    features: FeatureConfig
    labels: dict[str, list[str]]  # head -> label values, index = class id
    seen: np.ndarray  # packed bitmap of vendor-specific training tokens (features.seen_bit)
    version: str
    thresholds: Thresholds = field(default_factory=Thresholds)
    type_info: dict[str, dict[str, str]] = field(
        default_factory=dict
    )  # device_type -> manufacturer, category
    metrics: dict = field(default_factory=dict)
    training_data_sha256: str = ""
    prototypes: dict[str, list[dict]] = field(default_factory=dict)
    profiles: dict[str, list[str]] = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        # float16 halves the file (the shipped bundle must stay < 1 MB); the net is computed in float32
        np.savez_compressed(
            d / "weights.npz", seen=self.seen, **{k: v.astype(np.float16) for k, v in self.weights.items()}
        )
        meta = {
            "format": FORMAT,
            "version": self.version,
            "features": self.features.to_json(),
            "labels": self.labels,
            "thresholds": vars(self.thresholds),
            "type_info": self.type_info,
            "metrics": self.metrics,
            "training_data_sha256": self.training_data_sha256,
            "prototypes": self.prototypes,
            "profiles": self.profiles,
        }
        (d / "bundle.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return d

    @classmethod
    def load(cls, directory: str | Path | None = None) -> Bundle:
        d = Path(directory) if directory else DEFAULT_DIR
        try:
            meta = json.loads((d / "bundle.json").read_text(encoding="utf-8"))
            with np.load(d / "weights.npz") as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, KeyError) as exc:
            raise BundleError(f"{d}: not a model bundle ({exc})") from exc
        if meta.get("format") != FORMAT:
            raise BundleError(f"{d}: bundle format {meta.get('format')} is not {FORMAT}")
        seen = arrays.pop("seen")
        return cls(
            weights={k: v.astype(np.float32) for k, v in arrays.items()},
            features=FeatureConfig.from_json(meta["features"]),
            labels=meta["labels"],
            seen=seen,
            version=meta["version"],
            thresholds=Thresholds(**meta["thresholds"]),
            type_info=meta["type_info"],
            metrics=meta["metrics"],
            training_data_sha256=meta["training_data_sha256"],
            prototypes=meta["prototypes"],
            profiles=meta["profiles"],
        )


def observation_to_json(obs: Observation) -> dict:
    if isinstance(obs, DnsObservation):
        return {"kind": "dns", "t": round(obs.ts, 3), "name": obs.name, "qtype": obs.qtype}
    if isinstance(obs, DhcpObservation):
        return {
            "kind": "dhcp",
            "t": round(obs.ts, 3),
            "hostname": obs.hostname,
            "param_list": list(obs.param_list),
            "vendor_class": obs.vendor_class,
            "message_type": obs.message_type,
        }
    if isinstance(obs, MdnsObservation):
        return {
            "kind": "mdns",
            "t": round(obs.ts, 3),
            "names": list(obs.names),
            "services": list(obs.services),
        }
    return {"kind": "packet", "t": round(obs.ts, 3), "proto": obs.proto, "port": obs.port}


def observation_from_json(data: dict) -> Observation:
    t = float(data["t"])
    kind = data["kind"]
    if kind == "dns":
        return DnsObservation(t, data["name"], int(data.get("qtype", 1)))
    if kind == "dhcp":
        return DhcpObservation(
            t,
            data.get("hostname"),
            tuple(data.get("param_list", ())),
            data.get("vendor_class"),
            None,
            data.get("message_type"),
        )
    if kind == "mdns":
        return MdnsObservation(t, tuple(data.get("names", ())), tuple(data.get("services", ())))
    return PacketObservation(t, data["proto"], data.get("port"))
