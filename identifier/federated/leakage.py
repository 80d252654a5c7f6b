"""Deep leakage from gradients against one home's update (``python -m identifier.federated.leakage``).

The attack (Zhu et al. 2019, with the cosine objective of Geiping et al. 2020, which ignores the update's
scale, so clipping does not stop it): optimise dummy feature vectors and soft labels (one per head) until the
gradient they produce in the identifier's model matches the observed update; read the recovered feature
buckets (hashed tokens: SLDs, DHCP options, ...) off the dummies. Run against
(a) a home's plain one-step update, and (b) what the server holds of that home under SecAgg+: its masked
vector (quantised update plus Flower's pseudo-random masks, mod 2^32), dequantised as if it were an update.
Scored on the feature buckets the home's devices use: recall and precision, beside random guessing.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from identifier.bundle import Bundle
from identifier.dataset import domain_windows
from identifier.federated import homedata, model, updates
from identifier.federated.simulate import fresh
from identifier.inference import HEADS
from identifier.train import Samples


def _net(start: Bundle):  # noqa: ANN202 - the identifier's torch module, in eval mode (no dropout noise)
    from identifier.model import from_export

    net = from_export(start.weights)
    net.eval()
    return net


def gradient(start: Bundle, home: Samples) -> list[np.ndarray]:
    """The full-batch gradient of the training loss (the net's parameter order): what one local step sends,
    up to its (unknown) scale."""
    import torch

    from identifier.model import _loss

    net = _net(start)
    loss = _loss(net(torch.from_numpy(home.x)), torch.from_numpy(home.y), torch.from_numpy(home.w))
    params = list(net.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)  # a head no sample is labelled for: none
    return [np.zeros(p.shape, np.float32) if g is None else g.detach().numpy().copy() for p, g in zip(params, grads)]


def masked_view(update: list[np.ndarray], clip_range: float, seed: int) -> list[np.ndarray]:
    """What the server receives from this home in SecAgg+'s stage 2, dequantised: Flower's own quantiser
    and mask generator, with a private mask and one pairwise mask from random seeds."""
    import os

    from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_addition, parameters_mod
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    target, modulus = 1 << 22, 1 << 32
    quantised = quantize(update, clip_range, target)
    shapes = [a.shape for a in quantised]
    rng = np.random.default_rng(seed)
    for _ in range(2):  # private mask seed, then a pairwise key
        mask = pseudo_rand_gen(os.urandom(32) if seed < 0 else rng.bytes(32), modulus, shapes)
        quantised = parameters_addition(quantised, mask)
    masked = parameters_mod(quantised, modulus)
    # the attacker's best reading of the masked integers as an update (values beyond the range wrap)
    return [a.astype(np.float32) for a in dequantize([m % target for m in masked], clip_range, target)]


def dlg(start: Bundle, observed: list[np.ndarray], n_dummy: int, steps: int, seed: int) -> np.ndarray:
    """Dummy inputs (n_dummy x dim, in [0, 1]) whose gradient best matches ``observed`` by cosine distance."""
    import torch

    torch.manual_seed(seed)
    net = _net(start)
    target = [torch.from_numpy(np.asarray(o, np.float32)) for o in observed]
    z = torch.full((n_dummy, start.features.dim), -2.0, requires_grad=True)
    labels = [torch.randn(n_dummy, len(start.labels[h]), requires_grad=True) for h in HEADS]
    opt = torch.optim.Adam([z, *labels], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        outs = net(torch.sigmoid(z))
        loss = sum(
            torch.sum(-torch.softmax(lab, 1) * torch.log_softmax(out, 1), 1).mean()
            for lab, out in zip(labels, outs, strict=True)
        )
        grads = torch.autograd.grad(loss, list(net.parameters()), create_graph=True)  # dummies use every head
        dot = sum((g * t).sum() for g, t in zip(grads, target, strict=True))
        norm_g = torch.sqrt(sum((g * g).sum() for g in grads))
        norm_t = torch.sqrt(sum((t * t).sum() for t in target))
        cost = 1 - dot / (norm_g * norm_t + 1e-12)
        cost.backward()
        opt.step()
    return torch.sigmoid(z).detach().numpy()


def score(recovered: set[int], home: Samples) -> dict[str, float]:
    """Recall and precision of the recovered feature buckets against the home's own, beside chance: a guess
    of as many buckets at random has recall |guess|/d and precision |home|/d."""
    true = set(np.flatnonzero(home.x.max(0) > 0).tolist())
    d = home.x.shape[1]
    return {
        "home_features": len(true),
        "recovered": len(recovered),
        "recall": round(len(recovered & true) / max(1, len(true)), 4),
        "precision": round(len(recovered & true) / max(1, len(recovered)), 4),
        "chance_recall": round(len(recovered) / d, 4),
        "chance_precision": round(len(true) / d, 4),
    }


def attack(start: Bundle, observed: list[np.ndarray], home: Samples, args) -> dict:  # noqa: ANN001
    """DLG, and the shortcut the first layer and the wide path allow: input columns whose weights moved."""
    dummies = dlg(start, observed, args.dummies, args.steps, args.seed)
    names = [name for name, _ in _net(start).named_parameters()]
    first = [np.abs(observed[names.index(n)]).sum(0) for n in ("fc1.weight", "wide.weight")]
    support = set(np.flatnonzero(sum(first) > 0).tolist())
    return {
        "dlg": score(set(np.flatnonzero(dummies.max(0) > 0.5).tolist()), home),
        "first_layer_support": score(support, home),
    }


def main(argv: list[str] | None = None) -> int:
    default_csv = Path(__file__).resolve().parents[3] / "shared/data/supplychain-domains/device_domains.csv"
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=default_csv)
    parser.add_argument("--homes", type=int, default=10)
    parser.add_argument("--home", type=int, default=0, help="which home is attacked")
    parser.add_argument("--dummies", type=int, default=16)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--clip-norm", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.data.exists():
        parser.error(f"{args.data}: not found (give --data)")
    homes, _ = homedata.split_homes(domain_windows(args.data, set()), args.homes, seed=args.seed)
    start = fresh(Bundle.load(), args.seed)  # the first round of a federation from fresh weights
    home = model.samples(start, homes[args.home], args.seed)
    plain = updates.clip([-g for g in gradient(start, home)], args.clip_norm)  # one SGD step, clipped
    masked = masked_view(plain, args.clip_norm, args.seed)
    result = {
        "home": args.home,
        "home_windows": len(homes[args.home]),
        "home_samples": len(home.y),
        "plain_update": attack(start, plain, home, args),
        "secagg_masked_view": attack(start, masked, home, args),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
