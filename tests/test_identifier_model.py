"""The ensembled model: the logistic regression folds into the exported wide path without changing a logit."""

from __future__ import annotations

import numpy as np
import pytest

from identifier.features import DEFAULT_FEATURES, window_vector
from identifier.inference import NumpyNet
from tests.shared_data import DATA, needs_data

torch = pytest.importorskip("torch")


@needs_data
def test_logistic_head_learns_real_windows_and_folds_into_the_wide_path():
    from gateway.capture.windows import labelled_captures
    from identifier.model import IdentifierNet, export, fit_logistic

    captures = labelled_captures(DATA / "iot-sentinel", 30.0)
    types = sorted({w.device_type for w in captures})
    x = np.stack([window_vector(w.observations, w.mac, w.first_ts, DEFAULT_FEATURES) for w in captures])
    y = np.array([[0, types.index(w.device_type), 0] for w in captures])
    sizes = (1, len(types), 1)
    lin_w, lin_b = fit_logistic(x, y, np.ones(y.shape, np.float32), sizes, l2=1e-4)
    # trained and read on the same windows, a linear model separates every type but the kettle twins
    logits = x @ lin_w + lin_b
    guess = logits[:, 1 : 1 + len(types)].argmax(1)
    assert np.mean(guess == y[:, 1]) >= 0.9

    torch.manual_seed(0)
    net = IdentifierNet(x.shape[1], 8, sizes, 0.0, 0.0).eval()
    temps = [1.0, 2.0, 1.0]
    plain, folded = NumpyNet(export(net, temps)), NumpyNet(export(net, temps, (lin_w, lin_b)))
    for p_plain, p_folded, part, t in zip(
        plain.probabilities(x[:5]), folded.probabilities(x[:5]), np.split(logits[:5], [1, 1 + len(types)], 1),
        temps, strict=True,
    ):
        # softmax(a + b) is softmax(a) * exp(b), renormalised: check the folded model is exactly that
        expected = p_plain * np.exp((part - part.max(1, keepdims=True)) / t)
        np.testing.assert_allclose(p_folded, expected / expected.sum(1, keepdims=True), rtol=2e-3, atol=1e-6)


def test_a_vendor_known_from_rows_the_validation_split_draws_is_still_learned():
    # 30 vendors, each known from one name set (one row, one group) with its own name: the split that picks the
    # epoch and the temperatures draws some of them. The shipped weights must still name every one.
    from identifier.model import TrainConfig, fit

    n = 30
    x = np.zeros((n, 64), np.float32)
    x[np.arange(n), np.arange(n)] = np.log1p(1.0)
    y = np.repeat(np.arange(n)[:, None], 3, axis=1)
    weights = fit(x, y, np.ones(y.shape, np.float32), np.arange(n).astype(str), (n, n, n), seed=0,
                  config=TrainConfig(hidden=8, max_epochs=5, patience=2))
    for head in NumpyNet(weights).probabilities(x):
        assert list(head.argmax(1)) == list(range(n))
