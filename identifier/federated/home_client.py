"""One home's side of a round: local training on its owner's confirmed devices, and the model install.

The home trains its installed bundle's model on its confirmed devices (the windows file ``iotgw federation
join`` exports), returns a clipped, optionally noised delta (``client_app``'s ``secaggplus_mod`` masks it),
and at install time checks the model's digest and that it does no worse on its own devices, keeping the
previous model for rollback. torch is imported only inside ``model.local_train`` (a module-level import made
rounds twice as slow).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.client import NumPyClient

from identifier.federated import homedata, model, updates


class HomeClient(NumPyClient):
    """Training and install on one gateway; ``state_dir`` holds its model store and round log, ``default``
    the bundle it runs before any federated install (None: the shipped one)."""

    def __init__(self, data_path: Path, state_dir: Path, default: Path | None = None) -> None:
        self.data_path = data_path
        self.state_dir = state_dir
        self.store = updates.ModelStore(state_dir / "model", default)

    def fit(self, parameters: model.Params, config: dict) -> tuple[model.Params, int, dict]:
        if updates.digest(parameters) != config["sha256"]:
            raise ValueError("global model does not match the digest the server announced")
        bundle = self.store.installed()
        if model.schema(bundle) != config["schema"]:
            raise ValueError("global model has other features or label sets than this home's model")
        data = model.samples(bundle, homedata.load(self.data_path))
        if not model.has_labels(data):
            raise ValueError("no confirmed devices with labels the model knows: nothing to train on")
        rnd = int(config["round"])
        trained = model.local_train(
            bundle, parameters, data, epochs=int(config["epochs"]), lr=float(config["lr"]), seed=rnd
        )
        update = updates.clip(updates.delta(trained, parameters), float(config["clip-norm"]))
        update = updates.add_noise(update, float(config["dp-std"]), np.random.default_rng())
        weight = min(len(data.y), int(config["max-weight"]))
        self._record_contribution(rnd, config["sha256"], update, weight)
        self._log({"event": "fit", "round": rnd, "weight": weight})
        return update, weight, {}

    def evaluate(self, parameters: model.Params, config: dict) -> tuple[float, int, dict]:
        bundle = self.store.installed()
        data = model.samples(bundle, homedata.load(self.data_path))
        info = {"round": int(config["round"]), "run_id": int(config["run-id"]), "sha256": str(config["sha256"])}
        result = self.store.install(parameters, str(config["sha256"]), str(config["schema"]), data, info)
        # The server learns the decision; the accuracies on this home's devices stay in its round log.
        metrics = {"installed": result.installed, "reason": result.reason}
        self._log(
            {
                "event": "install",
                **metrics,
                "accuracy": result.accuracy_new,
                "accuracy_before": result.accuracy_current,
                "round": info["round"],
                "version": result.version,
                "previous_version": result.previous_version,
            }
        )
        return 0.0, 0, metrics

    def _record_contribution(self, rnd: int, base_sha: str, update: model.Params, weight: int) -> None:
        """What this home contributed before masking; it stays here (audit, and the tests' ground truth)."""
        out = self.state_dir / "contributions"
        out.mkdir(parents=True, exist_ok=True)
        arrays = {f"p{i:03d}": a for i, a in enumerate(update)}
        np.savez(out / f"{base_sha[:16]}-round{rnd}.npz", weight=np.int64(weight), **arrays)

    def _log(self, entry: dict) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / "rounds.log").open("a") as fh:
            fh.write(json.dumps({"ts": time.time(), **entry}) + "\n")
