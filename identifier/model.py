"""The torch model and its training loop: a shared trunk, heads for manufacturer, device type and category,
ensembled with a logistic regression on the same hashed tokens.

Layer norm rather than batch norm: each home sees a handful of devices, so batch statistics would be
meaningless there (and federated updates from non-IID homes would fight over them). Training stops early on a
validation split held out by group (capture file), then one temperature per head is fitted on that split so
the softmax confidence means what it says. Torch is needed only here; the daemon runs
``identifier.inference``.

The logistic regression is trained apart from the net (full batch, on sparse inputs) and its logits are added
to the net's: alone it beats the net on rare decisive tokens (an SLD, a DHCP option, a late ARP), the net beats
it on early windows and committed decisions. Being linear in the tokens, it folds into the net's wide path at
export, so the bundle, its size and the daemon's per-observation cost do not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from identifier.inference import HEADS


@dataclass(frozen=True)
class TrainConfig:
    hidden: int = 64
    input_dropout: float = 0.2
    dropout: float = 0.1
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 256
    max_epochs: int = 60
    patience: int = 8
    val_fraction: float = 0.15
    logistic_l2: float | None = 1e-5  # L2 of the ensembled logistic regression (None: the net alone)


class IdentifierNet(nn.Module):
    def __init__(
        self, dim: int, hidden: int, sizes: tuple[int, int, int], input_dropout: float, dropout: float
    ):
        super().__init__()
        self.input_dropout = nn.Dropout(input_dropout)
        self.fc1 = nn.Linear(dim, hidden)
        self.ln1 = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in sizes)
        # a linear path from the tokens to every head ("wide and deep"): a sibling model is often told apart
        # by one rare token (hs110 vs hs100, s150 vs s220), a vendor by one SLD, which the 64-wide trunk
        # tends to wash out
        self.wide = nn.Linear(dim, sum(sizes), bias=False)
        nn.init.zeros_(self.wide.weight)
        self.sizes = list(sizes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.input_dropout(x)
        h = torch.relu(self.ln1(self.fc1(x)))
        h = torch.relu(self.ln2(self.fc2(self.dropout(h))))
        wide = torch.split(self.wide(x), self.sizes, dim=-1)
        return [head(h) + w for head, w in zip(self.heads, wide, strict=True)]


def _split_groups(groups: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean validation mask that keeps every group (capture) wholly on one side."""
    uniq = np.unique(groups)
    val = rng.choice(uniq, size=max(1, int(round(len(uniq) * fraction))), replace=False)
    return np.isin(groups, val)


def _loss(logits: list[torch.Tensor], y: torch.Tensor, w: torch.Tensor, temps: list[float] | None = None):
    total = torch.zeros(())
    for k, out in enumerate(logits):
        mask = y[:, k] >= 0
        if not mask.any():
            continue
        t = temps[k] if temps else 1.0
        ce = nn.functional.cross_entropy(out[mask] / t, y[mask, k], reduction="none")
        total = total + (ce * w[mask, k]).sum() / w[mask, k].sum()
    return total


def fit(
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    groups: np.ndarray,
    sizes: tuple[int, int, int],
    seed: int,
    config: TrainConfig | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Train on ``x`` (n, dim) with labels ``y`` (n, 3; -1 where a head has no label) and per-head weights
    ``w`` (n, 3); returns the exported numpy weights (``identifier.inference`` format) with temperatures.

    The validation split (whole captures and name sets) picks the epoch and fits the temperatures; the
    logistic regression is then refit on every row.
    """
    config = config or TrainConfig()
    torch.set_num_threads(1)  # a small net: more threads only contend (the gateway shares two cores)
    rng = np.random.default_rng(seed)
    val = _split_groups(groups, config.val_fraction, rng)
    xt, yt, wt = (
        torch.as_tensor(a) for a in (x.astype(np.float32), y.astype(np.int64), w.astype(np.float32))
    )
    xv, yv, wv = xt[val], yt[val], wt[val]
    torch.manual_seed(seed)
    net = IdentifierNet(x.shape[1], config.hidden, sizes, config.input_dropout, config.dropout)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best, best_state, stale = float("inf"), None, 0
    epochs = range(config.max_epochs)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="training", unit="epoch")
    for _ in epochs:
        _epoch(net, opt, xt, yt, wt, np.flatnonzero(~val), config.batch_size, rng)
        net.eval()
        with torch.no_grad():
            vlogits = net(xv)
            vloss = float(_loss(vlogits, yv, wv))
            # stop on device-type errors, loss only breaking ties: the loss of inherently ambiguous early
            # windows rises (overconfidence) long before the later windows stop improving
            labelled = yv[:, 1] >= 0
            # a split that drew no row with a device type (a small data set, name sets of type "Unknown") has no
            # error to count: its mean was NaN, no epoch ever scored better, and no state was kept to load
            verr = float((vlogits[1][labelled].argmax(1) != yv[labelled, 1]).float().mean()) if labelled.any() else 0.0
        score = verr + 0.01 * vloss
        if progress:
            epochs.set_postfix(val_loss=f"{vloss:.3f}", val_type_error=f"{verr:.3f}")
        if score < best - 1e-4:
            best, stale = score, 0
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        else:
            stale += 1
            if stale >= config.patience:
                break
    net.load_state_dict(best_state)
    net.eval()
    with torch.no_grad():
        vlogits = net(xv)
    linear = None
    if config.logistic_l2 is not None:
        train_rows = np.flatnonzero(~val)
        linear = fit_logistic(x[train_rows], y[train_rows], w[train_rows], sizes, config.logistic_l2)
        lin_w, lin_b = (torch.as_tensor(a) for a in linear)
        extra = torch.split(xv @ lin_w + lin_b, list(sizes), dim=-1)
        vlogits = [a + b for a, b in zip(vlogits, extra, strict=True)]
    temps = [_temperature(vlogits[k], yv[:, k]) for k in range(len(sizes))]
    if linear is not None:
        # the logistic regression needs no held-out rows (no epochs to pick), so the shipped one learns every
        # row: a vendor known from a single name set is otherwise unlearned whenever the split draws it
        linear = fit_logistic(x, y, w, sizes, config.logistic_l2)
    return export(net, temps, linear)


def fit_logistic(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, sizes: tuple[int, int, int], l2: float, max_iter: int = 150
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression per head (weights ``(dim, sum(sizes))``, biases), the same weighted
    loss as the net plus ``l2`` times the squared weights; L-BFGS on the full batch. A window holds a few dozen
    tokens of 2,048 buckets, so the input is sparse: seconds, where a dense product would take minutes."""
    xs = torch.as_tensor(x.astype(np.float32)).to_sparse()
    yt, wt = torch.as_tensor(y.astype(np.int64)), torch.as_tensor(w.astype(np.float32))
    weight = torch.zeros(x.shape[1], sum(sizes), requires_grad=True)
    bias = torch.zeros(sum(sizes), requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = list(torch.split(xs @ weight + bias, list(sizes), dim=-1))
        loss = _loss(logits, yt, wt) + l2 * (weight**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach().numpy(), bias.detach().numpy()


def _epoch(net, opt, xt, yt, wt, idx: np.ndarray, batch_size: int, rng: np.random.Generator) -> None:
    net.train()
    order = rng.permutation(idx)
    for start in range(0, len(order), batch_size):
        batch = torch.as_tensor(order[start : start + batch_size])
        opt.zero_grad()
        _loss(net(xt[batch]), yt[batch], wt[batch]).backward()
        opt.step()


def _temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The temperature minimising validation NLL (Guo et al. 2017), searched on a log grid: robust, cheap."""
    mask = y >= 0
    if mask.sum() < 5:
        return 1.0
    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 41))
    nll = [float(nn.functional.cross_entropy(logits[mask] / t, y[mask])) for t in grid]
    return float(grid[int(np.argmin(nll))])


def export(
    net: IdentifierNet, temps: list[float], linear: tuple[np.ndarray, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """The net's weights for ``identifier.inference``; ``linear`` (weights, biases of ``fit_logistic``), when
    given, is added to the wide path and the head biases: the same logits, no extra arrays."""
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    out = {
        "w1": sd["fc1.weight"].T.copy(),
        "b1": sd["fc1.bias"],
        "g1": sd["ln1.weight"],
        "be1": sd["ln1.bias"],
        "w2": sd["fc2.weight"].T.copy(),
        "b2": sd["fc2.bias"],
        "g2": sd["ln2.weight"],
        "be2": sd["ln2.bias"],
        "temps": np.asarray(temps, dtype=np.float32),
        "wide": sd["wide.weight"].T.copy(),
    }
    for k, name in enumerate(HEADS):
        out[f"h_{name}_w"] = sd[f"heads.{k}.weight"].T.copy()
        out[f"h_{name}_b"] = sd[f"heads.{k}.bias"].copy()
    if linear is not None:
        lin_w, lin_b = linear
        out["wide"] = out["wide"] + lin_w
        for name, part in zip(HEADS, np.split(lin_b, np.cumsum(net.sizes)[:-1]), strict=True):
            out[f"h_{name}_b"] = out[f"h_{name}_b"] + part
    return out


# --- hooks for federated retraining (identifier.federated.model): start from given weights, train a while ---


def init_weights(dim: int, sizes: tuple[int, int, int], seed: int, config: TrainConfig | None = None):
    """Fresh exported weights (temperatures 1): the common starting point when comparing training regimes."""
    config = config or TrainConfig()
    torch.manual_seed(seed)
    net = IdentifierNet(dim, config.hidden, sizes, config.input_dropout, config.dropout)
    return export(net, [1.0] * len(sizes))


def from_export(weights: dict[str, np.ndarray], config: TrainConfig | None = None) -> IdentifierNet:
    """The net holding exported ``weights`` (the inverse of ``export``; the temperatures are not in the net)."""
    config = config or TrainConfig()
    sizes = tuple(int(weights[f"h_{name}_b"].size) for name in HEADS)
    net = IdentifierNet(weights["w1"].shape[0], weights["w1"].shape[1], sizes, config.input_dropout,
                        config.dropout)
    state = {
        "fc1.weight": weights["w1"].T,
        "fc1.bias": weights["b1"],
        "ln1.weight": weights["g1"],
        "ln1.bias": weights["be1"],
        "fc2.weight": weights["w2"].T,
        "fc2.bias": weights["b2"],
        "ln2.weight": weights["g2"],
        "ln2.bias": weights["be2"],
        "wide.weight": weights["wide"].T,
    }
    for k, name in enumerate(HEADS):
        state[f"heads.{k}.weight"] = weights[f"h_{name}_w"].T
        state[f"heads.{k}.bias"] = weights[f"h_{name}_b"]
    net.load_state_dict({k: torch.as_tensor(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()})
    return net


def train_epochs(
    weights: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    *,
    epochs: int,
    lr: float,
    seed: int,
    config: TrainConfig | None = None,
) -> dict[str, np.ndarray]:
    """``weights`` trained ``epochs`` more epochs on (x, y, w) with ``fit``'s step, no early stopping and no
    validation split (a home has too few devices for one); the temperatures are kept as they were."""
    config = config or TrainConfig()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = from_export(weights, config)
    xt, yt, wt = (
        torch.as_tensor(a) for a in (x.astype(np.float32), y.astype(np.int64), w.astype(np.float32))
    )
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=config.weight_decay)
    for _ in range(epochs):
        _epoch(net, opt, xt, yt, wt, np.arange(len(x)), config.batch_size, rng)
    net.eval()
    return export(net, [float(t) for t in weights["temps"]])
