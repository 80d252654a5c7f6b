"""Federated against centralized training on the same held-out devices.

Run ``python -m identifier.federated.simulate --data .../device_domains.csv``.

Homes are a Dirichlet split of the shared domain sets (``homedata.split_homes``). The federated side runs the
exact client computation of ``client_app`` (local training, clipped delta, weighted mean) in one process:
SecAgg+ returns that mean to within quantisation error (checked end to end in
tests/test_federation_rounds.py),
so leaving Flower's processes out changes the figures by nothing but time. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from identifier.federated import homedata, model, updates


def federated(
    homes: list[model.Dataset], test: model.Dataset, rounds: int, epochs: int, lr: float, clip_norm: float
) -> tuple[model.Params, list[float]]:
    params = model.init_params(homedata.N_FEATURES, len(test.classes))
    curve = []
    for rnd in range(rounds):
        contributions = []
        for i, home in enumerate(homes):
            trained = model.local_train(params, home, epochs=epochs, lr=lr, seed=rnd * 1000 + i)
            contributions.append((updates.clip(updates.delta(trained, params), clip_norm), len(home)))
        total = sum(w for _, w in contributions)
        mean = [sum(w * u[k] for u, w in contributions) / total for k in range(len(params))]
        params = updates.apply(params, mean)
        curve.append(model.evaluate(params, test)["accuracy"])
    return params, curve


def main(argv: list[str] | None = None) -> int:
    default_csv = Path(__file__).resolve().parents[3] / "shared/data/supplychain-domains/device_domains.csv"
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=default_csv)
    parser.add_argument("--homes", type=int, default=10)
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller: homes differ more)"
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--central-epochs", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.data.exists():
        parser.error(f"{args.data}: not found (give --data)")
    homes, test = homedata.split_homes(args.data, args.homes, alpha=args.alpha, seed=args.seed)
    start = time.monotonic()
    central = model.local_train(
        model.init_params(homedata.N_FEATURES, len(test.classes)),
        homedata.merge(homes),
        epochs=args.central_epochs,
    )
    central_acc = model.evaluate(central, test)["accuracy"]
    _, curve = federated(homes, test, args.rounds, args.epochs, args.lr, args.clip_norm)
    result = {
        "homes": args.homes,
        "alpha": args.alpha,
        "classes": len(test.classes),
        "train_windows": sum(len(h) for h in homes),
        "test_windows": len(test),
        "vendors_per_home": [len(set(h.y.tolist())) for h in homes],
        "centralized_accuracy": round(central_acc, 4),
        "federated_accuracy": round(curve[-1], 4),
        "federated_best_accuracy": round(max(curve), 4),
        "ratio": round(curve[-1] / central_acc, 4) if central_acc else None,
        "rounds": args.rounds,
        "local_epochs": args.epochs,
        "curve": [round(a, 4) for a in curve],
        "seconds": round(time.monotonic() - start, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
