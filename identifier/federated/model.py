"""The seam between federation and the identification model: a bundle's weights as a list of numpy arrays.

Federation moves ``Params``: the identifier's exported weights (``identifier.model.export``, the arrays of a
bundle's ``weights.npz``) in sorted name order, without the temperatures, which stay the base bundle's (they
are calibration, fitted on a validation split no home has). A home's examples are its confirmed observation
windows, turned into samples by the identifier's own ``build_samples`` with the bundle's feature config and
label sets, so a federated model reads exactly the features the daemon computes. Training is
``identifier.model.train_epochs``; evaluation runs the numpy net the daemon uses. torch is imported only
inside ``local_train`` (through ``identifier.model``): the ClientApp's processes must not pay for it at import.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np

from identifier.bundle import Bundle
from identifier.dataset import LabelledWindow
from identifier.inference import HEADS, NumpyNet
from identifier.train import Samples, build_samples

Params = list[np.ndarray]

CALIBRATION = ("temps",)  # bundle weights that are not trained by federation


def keys(bundle: Bundle) -> list[str]:
    """The names of the federated arrays, in ``Params`` order."""
    return sorted(k for k in bundle.weights if k not in CALIBRATION)


def params_of(bundle: Bundle) -> Params:
    return [np.asarray(bundle.weights[k], np.float32) for k in keys(bundle)]


def weights_of(bundle: Bundle, params: Params) -> dict[str, np.ndarray]:
    """The full weight dict of ``bundle`` with ``params`` in place of its trained arrays."""
    names = keys(bundle)
    if len(names) != len(params) or any(
        bundle.weights[k].shape != p.shape for k, p in zip(names, params, strict=False)
    ):
        raise ValueError("parameters do not fit the bundle's model (other feature size or label sets)")
    weights = dict(zip(names, (np.asarray(p, np.float32) for p in params), strict=True))
    weights.update({k: bundle.weights[k] for k in CALIBRATION})
    return weights


def with_params(bundle: Bundle, params: Params, version: str, info: dict) -> Bundle:
    """``bundle`` with federated ``params``: same features, labels, thresholds, calibration; ``info``
    (round, run, digest) recorded under ``metrics["federated"]``."""
    return replace(
        bundle,
        weights=weights_of(bundle, params),
        version=version,
        metrics={**bundle.metrics, "federated": info},
    )


def schema(bundle: Bundle) -> str:
    """SHA-256 of what a model must share with a home's bundle to be usable there: features and labels."""
    body = json.dumps({"features": bundle.features.to_json(), "labels": bundle.labels}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def samples(bundle: Bundle, windows: list[LabelledWindow], seed: int = 0) -> Samples:
    """A home's windows as the identifier's training samples; labels outside the bundle's sets are ignored."""
    return build_samples(windows, bundle.labels, bundle.features, seed)


def has_labels(data: Samples) -> bool:
    return bool(len(data.y)) and bool((data.y >= 0).any())


def local_train(
    bundle: Bundle, params: Params, data: Samples, *, epochs: int, lr: float, seed: int = 0
) -> Params:
    """``params`` trained ``epochs`` epochs on ``data`` with the identifier's training step."""
    from identifier.model import train_epochs

    trained = train_epochs(
        weights_of(bundle, params), data.x, data.y, data.w, epochs=epochs, lr=lr, seed=seed
    )
    return [trained[k].astype(np.float32) for k in keys(bundle)]


def evaluate(bundle: Bundle, params: Params, data: Samples) -> dict[str, float]:
    """Accuracy per head on the samples labelled for it, and ``accuracy``: their mean over labelled heads
    (what install-if-no-worse compares). Empty data scores 0."""
    probs = NumpyNet(weights_of(bundle, params)).probabilities(data.x) if len(data.y) else None
    out: dict[str, float] = {}
    for k, head in enumerate(HEADS):
        labelled = data.y[:, k] >= 0 if probs is not None else np.zeros(0, bool)
        if labelled.any():
            out[f"{head}_accuracy"] = float((probs[k][labelled].argmax(1) == data.y[labelled, k]).mean())
    heads = [v for v in out.values()]
    out["accuracy"] = float(np.mean(heads)) if heads else 0.0
    out["samples"] = float(len(data.y))
    return out
