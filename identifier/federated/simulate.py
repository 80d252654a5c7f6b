"""Federated against centralized training of the identifier's model on the same held-out devices.

The federated side runs the exact client computation of ``client_app`` (local training, clipped delta,
weighted mean) in one process: SecAgg+ returns that mean to within quantisation error (checked end to end in
tests/test_federation_rounds.py), so leaving Flower's processes out changes the figures by nothing but time.
Both sides start from the same fresh weights; the centralized side is ``identifier.model.fit`` (early stopping
on a validation split of whole captures), as ``iotgw train`` runs it. The command line is
``benchmarks/federated_accuracy.py`` (it reads the captures through the gateway's pcap reader).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from identifier.bundle import Bundle
from identifier.dataset import LabelledWindow
from identifier.federated import model, updates
from identifier.inference import HEADS


@dataclass(frozen=True)
class FedConfig:
    rounds: int = 30
    epochs: int = 5
    lr: float = 0.01
    clip_norm: float = 5.0
    max_weight: int = 1000


def fresh(template: Bundle, seed: int) -> Bundle:
    """``template`` (features, label sets) with freshly initialised weights."""
    from identifier.model import init_weights

    sizes = tuple(len(template.labels[h]) for h in HEADS)
    return replace(template, weights=init_weights(template.features.dim, sizes, seed), metrics={})


def centralized(start: Bundle, homes: list[list[LabelledWindow]], seed: int) -> model.Params:
    """What ``iotgw train`` would make of all homes' windows pooled (same label sets as ``start``)."""
    from identifier.model import fit

    pooled = [w for home in homes for w in home]
    data = model.samples(start, pooled, seed)
    sizes = tuple(len(start.labels[h]) for h in HEADS)
    weights = fit(data.x, data.y, data.w, data.groups, sizes, seed)
    return [weights[k] for k in model.keys(start)]


def federated(
    start: Bundle, homes: list[list[LabelledWindow]], test: model.Samples, config: FedConfig, seed: int = 0
) -> tuple[model.Params, list[dict[str, float]]]:
    """``config.rounds`` rounds of clipped-delta FedAvg from ``start``; returns the model and the test
    metrics after each round."""
    data = [model.samples(start, home, seed + i) for i, home in enumerate(homes)]
    params = model.params_of(start)
    curve = []
    for rnd in range(1, config.rounds + 1):
        contributions = []
        for i, home in enumerate(data):
            if not model.has_labels(home):
                continue
            trained = model.local_train(
                start, params, home, epochs=config.epochs, lr=config.lr, seed=rnd * 1000 + i
            )
            update = updates.clip(updates.delta(trained, params), config.clip_norm)
            contributions.append((update, min(len(home.y), config.max_weight)))
        total = sum(w for _, w in contributions)
        mean = [sum(w * u[k] for u, w in contributions) / total for k in range(len(params))]
        params = updates.apply(params, mean)
        curve.append(model.evaluate(start, params, test))
    return params, curve
