"""Inference with numpy alone, on the weights ``identifier.model.export`` writes.

The daemon must fit a Pi: torch costs ~220 MB resident and 1-1.5 s to import, numpy 25 MB (REFERENCE.md), and
this net is two small matrix products. ``first_layer`` is separate so a streaming session can keep the first
layer's pre-activation and update it by the few buckets an observation changed.
"""

from __future__ import annotations

import numpy as np

HEADS = ("manufacturer", "device_type", "category")


def _layer_norm(z: np.ndarray, gain: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mu = z.mean(axis=-1, keepdims=True)
    var = z.var(axis=-1, keepdims=True)
    return (z - mu) / np.sqrt(var + 1e-5) * gain + bias


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class NumpyNet:
    """The exported net; ``probabilities`` returns one calibrated distribution per head."""

    def __init__(self, weights: dict[str, np.ndarray]):
        self.w = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
        self.temps = [float(t) for t in self.w["temps"]]
        # the three heads as one product, temperatures folded in: fewer numpy calls per observation
        self._heads_w = np.concatenate(
            [self.w[f"h_{n}_w"] / t for n, t in zip(HEADS, self.temps, strict=True)], 1
        )
        self._heads_b = np.concatenate(
            [self.w[f"h_{n}_b"] / t for n, t in zip(HEADS, self.temps, strict=True)]
        )
        self._splits = np.cumsum([self.w[f"h_{n}_b"].size for n in HEADS])[:-1]
        # the first layer and the wide path read the same input: one matrix, so a session updates both at once
        self.hidden = self.w["w1"].shape[1]
        col_temps = np.concatenate(
            [np.full(self.w[f"h_{n}_b"].size, t, np.float32) for n, t in zip(HEADS, self.temps, strict=True)]
        )
        self.w_in = np.concatenate([self.w["w1"], self.w["wide"] / col_temps], 1)
        self.b_in = np.concatenate([self.w["b1"], np.zeros(col_temps.size, np.float32)])

    def first_layer(self, x: np.ndarray) -> np.ndarray:
        """The first layer's pre-activation and the wide path's logits for every head, side by side."""
        return x @ self.w_in + self.b_in

    def from_first_layer(self, z: np.ndarray) -> list[np.ndarray]:
        w = self.w
        h = np.maximum(_layer_norm(z[..., : self.hidden], w["g1"], w["be1"]), 0.0)
        h = np.maximum(_layer_norm(h @ w["w2"] + w["b2"], w["g2"], w["be2"]), 0.0)
        logits = h @ self._heads_w + self._heads_b + z[..., self.hidden :]
        return [_softmax(part) for part in np.split(logits, self._splits, axis=-1)]

    def probabilities(self, x: np.ndarray) -> list[np.ndarray]:
        return self.from_first_layer(self.first_layer(x))
