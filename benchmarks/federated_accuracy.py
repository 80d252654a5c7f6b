"""Federated against centralized accuracy of the identifier's model on the same held-out devices (one JSON).

Usage: ``python benchmarks/federated_accuracy.py [--data ../shared/data] [--homes 10] [--rounds 30] ...``.
Homes are a Dirichlet split (``identifier.federated.homedata.split_homes``) of the identifier's training data
(IoT-Sentinel captures by device type, the supply-chain name sets by vendor); a fifth of each kind is held
out. Accuracy is per head on the held-out windows' samples (every cut-off from 1 to 60 s, all signals and
DNS alone), and ``accuracy`` their mean over manufacturer, device type and category.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.cli import positive_count  # noqa: E402
from gateway.commands.identify import load_training_data  # noqa: E402
from identifier.bundle import Bundle  # noqa: E402
from identifier.federated import homedata, model, simulate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--homes", type=positive_count, default=10)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller: homes differ more)")
    parser.add_argument("--rounds", type=positive_count, default=simulate.FedConfig.rounds)
    parser.add_argument("--epochs", type=positive_count, default=simulate.FedConfig.epochs)
    parser.add_argument("--lr", type=float, default=simulate.FedConfig.lr)
    parser.add_argument("--clip-norm", type=float, default=simulate.FedConfig.clip_norm)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    captures, names = load_training_data(args.data)
    homes, test_windows = homedata.split_homes(captures + names, args.homes, alpha=args.alpha, seed=args.seed)
    start = simulate.fresh(Bundle.load(), args.seed)
    test = model.samples(start, test_windows, args.seed)
    t0 = time.monotonic()
    central = model.evaluate(start, simulate.centralized(start, homes, args.seed), test)
    t1 = time.monotonic()
    config = simulate.FedConfig(args.rounds, args.epochs, args.lr, args.clip_norm)
    _, curve = simulate.federated(start, homes, test, config, args.seed)
    last = curve[-1]
    result = {
        "homes": args.homes,
        "alpha": args.alpha,
        "train_windows": sum(len(h) for h in homes),
        "test_windows": len(test_windows),
        "test_samples": len(test.y),
        "kinds_per_home": [len({w.device_type or w.manufacturer for w in h}) for h in homes],
        "centralized": {k: round(v, 4) for k, v in central.items()},
        "federated": {k: round(v, 4) for k, v in last.items()},
        "ratio": round(last["accuracy"] / central["accuracy"], 4),
        "ratio_per_head": {
            k: round(last[k] / central[k], 4) for k in central if k.endswith("_accuracy") and central[k]
        },
        "federated_best_accuracy": round(max(c["accuracy"] for c in curve), 4),
        "rounds": args.rounds,
        "local_epochs": args.epochs,
        "lr": args.lr,
        "clip_norm": args.clip_norm,
        "curve": [round(c["accuracy"], 4) for c in curve],
        "centralized_s": round(t1 - t0, 1),
        "federated_s": round(time.monotonic() - t1, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
