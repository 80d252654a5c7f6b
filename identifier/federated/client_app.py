"""iotgw's Flower ClientApp: one home's side of a round, always behind ``secaggplus_mod``.

An update never leaves unmasked: the mod masks what ``home_client.HomeClient`` returns, and a server without
SecAgg+ gets an error instead of an update. Nor do the home's counts: ``counts_stay_home_mod`` blanks the
example count Flower sends beside every reply. Flower runs a new process for every message (four per SecAgg+
round; ``warm_clientapp`` forks them from a server that has this module loaded, else each loads it), and
three of those are SecAgg+ stages that never reach the client: so at module level it imports flwr and
nothing else, and the model code (``home_client``: numpy, the identifier's features, torch inside training)
only when a home trains or installs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key


def stage_log_mod(msg: Message, context: Context, call_next):  # noqa: ANN201, ANN001
    """Log each SecAgg+ stage this home enters to ``rounds.log`` (which nights it took part, and how far)."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is not None and Key.STAGE in configs:
        state_dir = Path(str(context.node_config["state-dir"]))
        state_dir.mkdir(parents=True, exist_ok=True)
        with (state_dir / "rounds.log").open("a") as fh:
            entry = {
                "ts": time.time(),
                "event": "stage",
                "stage": configs[Key.STAGE],
                "round": msg.metadata.group_id,
                "run": msg.metadata.run_id,
            }
            fh.write(json.dumps(entry) + "\n")
    return call_next(msg, context)


def counts_stay_home_mod(msg: Message, context: Context, call_next):  # noqa: ANN201, ANN001
    """Send every reply with its example count blanked: the count is how much confirmed data this home has.
    ``secaggplus_mod`` masks the training weight inside the vector, but Flower's reply carries it in the clear
    too (``fitres.num_examples``); the strategy only uses the unmasked mean, so 0 loses nothing."""
    reply = call_next(msg, context)
    if not reply.has_error():
        for name, record in reply.content.metric_records.items():
            if name.endswith(".num_examples"):
                record["num_examples"] = 0
    return reply


def client_fn(context: Context):  # noqa: ANN201
    from identifier.federated.home_client import HomeClient

    cfg = context.node_config
    default = str(cfg.get("bundle", ""))
    return HomeClient(
        Path(str(cfg["data"])), Path(str(cfg["state-dir"])), Path(default) if default else None
    ).to_client()


app = ClientApp(client_fn=client_fn, mods=[stage_log_mod, counts_stay_home_mod, secaggplus_mod])
