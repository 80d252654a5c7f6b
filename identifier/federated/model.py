"""The seam between federation and the identification model: parameters as a list of numpy arrays.

Federation needs three things from a model, all here: ``init_params``, ``local_train``, ``evaluate``.
The bodies below use a stand-in MLP over fixed-size hashed feature vectors; to federate the identifier's own
model, make these three functions load/save its weights as a list of arrays (the order of its state dict) and
call its training step. Nothing else in ``identifier.federated`` knows what the arrays mean.
torch is imported inside the functions: the ClientApp's processes must not pay for it at import time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Params = list[np.ndarray]

HIDDEN = 64


@dataclass(frozen=True)
class Dataset:
    """Feature vectors ``x`` (float32, n x d) with class indices ``y`` (int64, n) into ``classes``."""

    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.y.shape[0])


def init_params(n_features: int, n_classes: int, seed: int = 0) -> Params:
    """Fresh weights of the stand-in MLP (d -> HIDDEN -> LayerNorm -> classes), float32."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0.0, 1.0 / np.sqrt(n_features), (HIDDEN, n_features)).astype(np.float32)
    w2 = rng.normal(0.0, 1.0 / np.sqrt(HIDDEN), (n_classes, HIDDEN)).astype(np.float32)
    return [
        w1,
        np.zeros(HIDDEN, np.float32),
        np.ones(HIDDEN, np.float32),  # LayerNorm gain
        np.zeros(HIDDEN, np.float32),  # LayerNorm bias
        w2,
        np.zeros(n_classes, np.float32),
    ]


def _module(params: Params):  # noqa: ANN202 - torch types stay out of the module's import-time surface
    import torch

    n_features, n_classes = params[0].shape[1], params[4].shape[0]
    net = torch.nn.Sequential(
        torch.nn.Linear(n_features, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.LayerNorm(HIDDEN),
        torch.nn.Linear(HIDDEN, n_classes),
    )
    with torch.no_grad():
        for tensor, array in zip(net.parameters(), params, strict=True):
            tensor.copy_(torch.from_numpy(np.asarray(array, np.float32)))
    return net


def _params(net) -> Params:  # noqa: ANN001
    return [t.detach().cpu().numpy().astype(np.float32).copy() for t in net.parameters()]


def local_train(
    params: Params, dataset: Dataset, *, epochs: int = 20, lr: float = 0.05, seed: int = 0
) -> Params:
    """``params`` trained on ``dataset`` with full-batch Adam; returns new arrays, ``params`` is untouched."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # a gateway is small and homes share CPUs in tests: one thread trains fastest
    net = _module(params)
    if len(dataset) == 0:
        return _params(net)
    x, y = torch.from_numpy(dataset.x), torch.from_numpy(dataset.y)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return _params(net)


def evaluate(params: Params, dataset: Dataset) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``params`` on ``dataset`` (0 and inf when it is empty)."""
    import torch

    if len(dataset) == 0:
        return {"accuracy": 0.0, "loss": float("inf")}
    net = _module(params)
    with torch.no_grad():
        logits = net(torch.from_numpy(dataset.x))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(dataset.y)).item()
        accuracy = (logits.argmax(1).numpy() == dataset.y).mean().item()
    return {"accuracy": float(accuracy), "loss": float(loss)}
