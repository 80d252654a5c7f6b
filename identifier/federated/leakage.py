"""Deep leakage from gradients against one home's update (``python -m identifier.federated.leakage``).

The attack (Zhu et al. 2019, with the cosine objective of Geiping et al. 2020, which ignores the update's
scale, so clipping does not stop it): optimise dummy feature vectors and soft labels until the gradient
they produce matches the observed update; read the recovered SLD buckets off the dummies. Run against
(a) a home's plain one-step update, and (b) what the server holds of that home under SecAgg+: its masked
vector (quantised update plus Flower's pseudo-random masks, mod 2^32), dequantised as if it were an update.
Scored on the hashed SLD features the home's devices use: recall and precision, beside random guessing.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from identifier.federated import homedata, model, updates


def gradient(params: model.Params, dataset: model.Dataset) -> model.Params:
    """The full-batch gradient of the loss: what one local SGD step sends, up to its (unknown) scale."""
    import torch

    net = model._module(params)  # noqa: SLF001 - same module the home trains
    loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(dataset.x)), torch.from_numpy(dataset.y))
    return [g.detach().numpy().copy() for g in torch.autograd.grad(loss, list(net.parameters()))]


def masked_view(update: model.Params, clip_range: float, seed: int) -> model.Params:
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


def dlg(
    params: model.Params, observed: model.Params, n_classes: int, n_dummy: int, steps: int, seed: int
) -> np.ndarray:
    """Dummy inputs (n_dummy x d, in [0, 1]) whose gradient best matches ``observed`` by cosine distance."""
    import torch

    torch.manual_seed(seed)
    net = model._module(params)  # noqa: SLF001
    target = [torch.from_numpy(np.asarray(o, np.float32)) for o in observed]
    z = torch.full((n_dummy, params[0].shape[1]), -2.0, requires_grad=True)
    label_logits = torch.randn(n_dummy, n_classes, requires_grad=True)
    opt = torch.optim.Adam([z, label_logits], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.sigmoid(z)
        out = net(x)
        loss = torch.sum(-torch.softmax(label_logits, 1) * torch.log_softmax(out, 1), 1).mean()
        grads = torch.autograd.grad(loss, list(net.parameters()), create_graph=True)
        dot = sum((g * t).sum() for g, t in zip(grads, target, strict=True))
        norm_g = torch.sqrt(sum((g * g).sum() for g in grads))
        norm_t = torch.sqrt(sum((t * t).sum() for t in target))
        cost = 1 - dot / (norm_g * norm_t + 1e-12)
        cost.backward()
        opt.step()
    return torch.sigmoid(z).detach().numpy()


def score(recovered: set[int], home: model.Dataset) -> dict[str, float]:
    """Recall and precision of the recovered SLD features against the home's own, beside chance: a guess of
    as many features at random has recall |guess|/d and precision |home|/d."""
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


def attack(params: model.Params, observed: model.Params, home: model.Dataset, n_classes: int, args) -> dict:  # noqa: ANN001
    """DLG, and the shortcut a first linear layer allows: features whose weight column moved at all."""
    dummies = dlg(params, observed, n_classes, args.dummies, args.steps, args.seed)
    support = set(np.flatnonzero(np.abs(observed[0]).sum(0) > 0).tolist())
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
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.data.exists():
        parser.error(f"{args.data}: not found (give --data)")
    homes, test = homedata.split_homes(args.data, args.homes, seed=args.seed)
    home = homes[args.home]
    params = model.init_params(homedata.N_FEATURES, len(test.classes), seed=args.seed)
    plain = updates.clip([-g for g in gradient(params, home)], args.clip_norm)  # one SGD step, clipped
    masked = masked_view(plain, args.clip_norm, args.seed)
    n_classes = len(test.classes)
    result = {
        "home": args.home,
        "home_windows": len(home),
        "plain_update": attack(params, plain, home, n_classes, args),
        "secagg_masked_view": attack(params, masked, home, n_classes, args),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
