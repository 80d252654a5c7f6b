"""iotgw's Flower ServerApp: FedAvg of clipped deltas under SecAgg+, with Flower's failure modes handled.

The server holds the global model and only ever sees the unmasked *sum* of the homes' updates. Around
Flower's SecAgg+ workflow it adds what deployment needs (see docs/federation.md, "Flower pitfalls"):

1. ``KeySharersOnlyWorkflow``: a home that drops before key sharing no longer halts the round.
2. ``RoundGuard``: a halted round (Flower logs it and carries on, exit 0) is reported as a failed round,
   the model stays unchanged, and the run ends failed.
3. Stage timeouts and a bounded wait for the minimum number of homes (Flower's default wait is a day).

and ``PromptGrid``: replies are collected as they arrive, not on Flower's 3-second beat, and a home dying
while it uploads a reply drops out of the round instead of stalling it past its stage's timeout.

Each successful round publishes the global model with its SHA-256 (``updates.publish``); after the last
round every home is asked to install it (digest and no-regression checks happen on the home).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import (
    EvaluateIns,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.proto.node_pb2 import NodeInfo
from flwr.server import LegacyContext, ServerConfig, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.superlink.grid import http_grid

from identifier.atomicfile import write_whole
from identifier.bundle import Bundle
from identifier.federated import model, updates

log = logging.getLogger(__name__)

# How often the ServerApp asks the SuperLink for replies while a stage is waiting for them (Flower: 3 s).
REPLY_POLL_S = 0.2
# How long a reply's objects are waited for once its message is in, even after its stage's deadline: a live
# home sends them right after the message.
OBJECT_WAIT_MIN_S = 10.0
_FLOWER_PULL_OBJECTS = http_grid.pull_objects


@dataclass(frozen=True)
class RunSettings:
    """The run config (``[tool.flwr.app.config]`` in flwr_app/pyproject.toml, ``flwr run -c`` overrides)."""

    num_rounds: int
    stage_timeout: float  # per SecAgg+ stage; must exceed local training (stage 2 includes it)
    min_nodes: int
    nodes_wait: float  # how long to wait for min_nodes before the round fails
    share_fraction: float  # SecAgg+ neighbours as a share of the sampled homes
    threshold_fraction: float  # shares needed to unmask, as a share of the neighbours
    clip_norm: float
    dp_noise: float  # noise multiplier (std = dp_noise * clip_norm); 0 disables
    epochs: int
    lr: float
    max_weight: int  # a home's weight is its number of confirmed windows, capped here
    out_dir: Path
    bundle: Path | None  # the model bundle the federation starts from (None: the shipped one)

    @classmethod
    def from_context(cls, context: Context) -> RunSettings:
        c = context.run_config
        if not c.get("out-dir"):
            raise ValueError("run config 'out-dir' is required (where the global model is published)")
        return cls(
            num_rounds=int(c["num-rounds"]),
            stage_timeout=float(c["stage-timeout"]),
            min_nodes=int(c["min-nodes"]),
            nodes_wait=float(c["nodes-wait"]),
            share_fraction=float(c["share-fraction"]),
            threshold_fraction=float(c["threshold-fraction"]),
            clip_norm=float(c["clip-norm"]),
            dp_noise=float(c["dp-noise"]),
            epochs=int(c["epochs"]),
            lr=float(c["lr"]),
            max_weight=int(c["max-weight"]),
            out_dir=Path(str(c["out-dir"])),
            bundle=Path(str(c["bundle"])) if c.get("bundle") else None,
        )


class KeySharersOnlyWorkflow(SecAggPlusWorkflow):
    """SecAgg+ restricted, after key sharing, to the homes that did share keys (pitfall 1).

    Flower's workflow keeps every sampled home in the protocol: a home that vanished before sharing keys is
    later listed as "dead", the survivors are asked for its key shares, which they never received, and they
    fail (``KeyError`` in ``secaggplus_mod``'s unmask step): the whole round halts. Homes that never shared
    keys contributed no masks, so dropping them from the protocol is exact. For the same reason the masks
    rebuilt for a home that dropped later are only those it shares with homes whose vectors are in the sum.
    """

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        super().share_keys_stage(grid, context, state)  # its threshold check still counts the non-sharers
        state.sampled_node_ids = set(state.active_node_ids)
        state.nid_to_neighbours = {
            nid: neighbours & state.sampled_node_ids
            for nid, neighbours in state.nid_to_neighbours.items()
            if nid in state.sampled_node_ids
        }
        return self._check_threshold(state)

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        for nid in state.sampled_node_ids - state.active_node_ids:
            state.nid_to_neighbours[nid] = (state.nid_to_neighbours[nid] & state.active_node_ids) | {nid}
        return super().unmask_stage(grid, context, state)


class PromptGrid(Grid):
    """The ServerApp's Grid: replies asked for every ``REPLY_POLL_S`` seconds instead of every 3, and a stage's
    timeout kept also when a home died half way through uploading its reply.

    Flower's HTTP grid sleeps 3 s between pulls in ``send_and_receive``, so every stage of a round ended up
    to 3 s after its last reply arrived: once per plain round, four times per SecAgg+ round. The cost of
    polling faster is one request from the ServerApp (not from every home) per poll, only while a stage
    waits. Everything else is the wrapped grid's.

    A home uploads a reply as its message, then its objects. One that dies in between leaves the SuperLink a
    message whose objects never come, and Flower's ``pull_messages`` retried them until the SuperLink's
    object-push session expired (``OBJECT_PUSH_SESSION_TTL_SECONDS``, 180 s), far past the stage's timeout;
    ``send_and_receive`` then returned without pulling the replies that had arrived meanwhile, and the round
    halted for want of homes. Here those retries end at the stage's deadline (the reply then comes back as
    Flower's error reply for missing objects: that home has dropped out) and the last pull is made after it.
    """

    def __init__(self, grid: Grid, poll_s: float = REPLY_POLL_S) -> None:
        self.grid = grid
        self.poll_s = poll_s

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's semantics (push, then pull until every reply is in or ``timeout`` passed; None: no
        limit), polled every ``poll_s``, with a last pull once ``timeout`` passed."""
        pending = set(self.grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while True:
            last = deadline is not None and time.monotonic() >= deadline
            with reply_objects_awaited_until(deadline, self.poll_s):
                got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or last:
                return replies
            time.sleep(self.poll_s if deadline is None else max(0.0, min(self.poll_s, deadline - time.monotonic())))


@contextmanager
def reply_objects_awaited_until(deadline: float | None, poll_s: float) -> Iterator[None]:
    """Within this block, Flower's HTTP grid waits for a pulled reply's objects until ``deadline`` (and at
    least ``OBJECT_WAIT_MIN_S``), asking every ``poll_s`` to 1 s, instead of up to 180 s (None: unchanged)."""
    if deadline is None:
        yield
        return
    http_grid.pull_objects = partial(
        _FLOWER_PULL_OBJECTS,
        max_time=max(deadline - time.monotonic(), OBJECT_WAIT_MIN_S),
        initial_backoff=poll_s,
        backoff_cap=1.0,
    )
    try:
        yield
    finally:
        http_grid.pull_objects = _FLOWER_PULL_OBJECTS


class BoundedWaitClientManager(SimpleClientManager):
    """Flower's client manager, but waiting ``wait_s`` (not a day) for the homes a round needs (pitfall 3)."""

    def __init__(self, wait_s: float) -> None:
        super().__init__()
        self.wait_s = wait_s

    def wait_for(self, num_clients: int, timeout: int | None = None) -> bool:  # noqa: ARG002
        return super().wait_for(num_clients, timeout=self.wait_s)  # type: ignore[arg-type]


@dataclass
class RoundRecord:
    round: int
    status: str  # "ok" or "failed"
    seconds: float
    homes: int = 0
    sha256: str = ""
    error: str = ""


class MaskedSumFedAvg(FedAvg):
    """FedAvg over deltas, where all it is ever given is SecAgg+'s unmasked weighted mean.

    It keeps the global model; ``aggregate_fit`` adds the mean delta to it. ``seen`` records the digest of
    every parameter vector the strategy was handed, so tests can check that no single home's update is ever
    among them.
    """

    def __init__(self, settings: RunSettings, base: Bundle, initial: model.Params) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=1.0,
            min_fit_clients=settings.min_nodes,
            min_evaluate_clients=1,
            min_available_clients=settings.min_nodes,
            initial_parameters=ndarrays_to_parameters(initial),
        )
        self.settings = settings
        self.base = base
        self.schema = model.schema(base)
        self.global_params = initial
        self.aggregated_rounds: set[int] = set()
        self.homes_in_round: dict[int, int] = {}
        self.seen: list[str] = []

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any):  # noqa: ANN201
        s = self.settings
        config: dict[str, Scalar] = {
            "round": server_round,
            "sha256": updates.digest(self.global_params),
            "schema": self.schema,
            "epochs": s.epochs,
            "lr": s.lr,
            "clip-norm": s.clip_norm,
            "dp-std": s.dp_noise * s.clip_norm,
            "max-weight": s.max_weight,
        }
        fit_ins = FitIns(ndarrays_to_parameters(self.global_params), config)
        clients = client_manager.sample(
            num_clients=max(client_manager.num_available(), s.min_nodes), min_num_clients=s.min_nodes
        )
        return [(client, fit_ins) for client in clients]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[Any],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not results:
            return None, {}
        for _, res in results:
            self.seen.append(updates.digest(parameters_to_ndarrays(res.parameters)))
        # SecAgg+ hands every result the same unmasked mean; anything else means it was bypassed.
        if len(set(self.seen[-len(results) :])) != 1:
            raise RuntimeError("strategy was handed distinct per-home updates: secure aggregation bypassed")
        mean_delta = parameters_to_ndarrays(results[0][1].parameters)
        # A home that skipped clipping or sent garbage shows in the mean: the round fails (RoundGuard) and
        # the model stays as it was.
        s = self.settings
        bound = updates.update_bound(s.clip_norm, s.dp_noise * s.clip_norm, sum(a.size for a in self.global_params))
        updates.check_update(mean_delta, self.global_params, bound)
        new_global = updates.apply(self.global_params, mean_delta)
        # Kept in float32, so that updates smaller than a float16 step still add up over rounds; but homes run it
        # as a bundle stores it, and a value past float16's range would be inf there.
        if not all(np.all(np.isfinite(p)) for p in updates.as_stored(new_global)):
            raise ValueError("the aggregated model does not fit a bundle's float16 weights")
        self.global_params = new_global
        self.aggregated_rounds.add(server_round)
        self.homes_in_round[server_round] = len(results)
        return ndarrays_to_parameters(self.global_params), {"homes": len(results)}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any):  # noqa: ANN201
        return []  # evaluation happens on the homes, at install time (InstallStep)


class RoundGuard:
    """Runs one SecAgg+ fit round and records whether it produced a new model (pitfall 2).

    Flower's workflow returns normally from a halted round; the only trace is a log line. A round counts as
    done only if the strategy aggregated it; otherwise it is recorded as failed and the model is unchanged.
    """

    def __init__(
        self, inner: Callable[[Grid, Context], None], strategy: MaskedSumFedAvg, report: RunReport
    ) -> None:
        self.inner = inner
        self.strategy = strategy
        self.report = report

    def __call__(self, grid: Grid, context: Context) -> None:
        current = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        start = time.monotonic()
        error = ""
        try:
            self.inner(grid, context)
        except Exception as exc:  # a stage that raises halts the round just the same; report, don't crash
            log.exception("round %d raised", current)
            error = f"{type(exc).__name__}: {exc}"
        seconds = round(time.monotonic() - start, 2)
        if current in self.strategy.aggregated_rounds:
            sha = updates.publish(
                self.strategy.global_params,
                self.report.out_dir,
                {"round": current, "run_id": context.run_id, "published_at": time.time()},
                self.strategy.base,
            )
            self.report.keep(current, self.strategy.global_params)
            record = RoundRecord(current, "ok", seconds, self.strategy.homes_in_round[current], sha)
        else:
            log.error("round %d halted: no aggregate, global model unchanged", current)
            record = RoundRecord(current, "failed", seconds, error=error or "secure aggregation halted")
        self.report.add(record)


class InstallStep:
    """After the last round: send the global model and its digest to every home, which installs it or not."""

    def __init__(self, strategy: MaskedSumFedAvg, report: RunReport, num_rounds: int, timeout: float) -> None:
        self.strategy = strategy
        self.report = report
        self.num_rounds = num_rounds
        self.timeout = timeout

    def __call__(self, grid: Grid, context: Context) -> None:
        current = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        if current != self.num_rounds or not self.strategy.aggregated_rounds:
            return
        params = self.strategy.global_params
        config: dict[str, Scalar] = {
            "install": True,
            "sha256": updates.digest(params),
            "schema": self.strategy.schema,
            "round": max(self.strategy.aggregated_rounds),
            "run-id": context.run_id,
        }
        ins = EvaluateIns(ndarrays_to_parameters(params), config)
        assert isinstance(context, LegacyContext)
        messages = [
            Message(
                content=compat.evaluateins_to_recorddict(ins, True),
                dst_node_id=proxy.node_id,
                message_type=MessageType.EVALUATE,
                group_id=f"install-{current}",
            )
            for proxy in context.client_manager.all().values()
        ]
        replies = grid.send_and_receive(messages, timeout=self.timeout)
        installs = []
        for reply in replies:
            if reply.has_error():
                continue
            res = compat.recorddict_to_evaluateres(reply.content)
            installs.append({"node_id": reply.metadata.src_node_id, **res.metrics})
        self.report.installs = installs


@dataclass
class RunReport:
    """``rounds.json`` in the output directory: one record per round, rewritten after each."""

    out_dir: Path
    run_id: int
    rounds: list[RoundRecord] = field(default_factory=list)
    installs: list[dict] = field(default_factory=list)
    strategy_inputs: list[str] = field(default_factory=list)

    def keep(self, rnd: int, params: model.Params) -> None:
        """The global model after round ``rnd`` of this run (0: the one it started from), for audit."""
        history = self.out_dir / "history" / str(self.run_id)
        history.mkdir(parents=True, exist_ok=True)
        write_whole(history / f"round-{rnd}.npz", updates.to_bytes(params))

    def add(self, record: RoundRecord) -> None:
        self.rounds.append(record)
        self.write()

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        body = {
            "run_id": self.run_id,
            "rounds": [r.__dict__ for r in self.rounds],
            "installs": self.installs,
            "strategy_inputs": self.strategy_inputs,
        }
        write_whole(self.out_dir / f"run-{self.run_id}.json", json.dumps(body, indent=2).encode())


def initial_params(settings: RunSettings, base: Bundle) -> model.Params:
    """The last published global model if it fits ``base`` (runs resume from it), else ``base``'s weights."""
    try:
        params, manifest = updates.read_published(settings.out_dir)
    except FileNotFoundError:
        return model.params_of(base)
    if manifest.get("schema") != model.schema(base):
        raise ValueError(
            f"{settings.out_dir}/global.npz was made for other features or label sets than {base.version}"
        )
    # The schema covers features and labels, not the net's size: a base with another hidden size has the same
    # schema, and every home (which runs that base) would refuse every round of the old model.
    published = [tuple(np.shape(a)) for a in params]
    wanted = [tuple(np.shape(a)) for a in model.params_of(base)]
    if published != wanted:
        raise ValueError(
            f"{settings.out_dir}/global.json ({manifest.get('version')}) publishes arrays of shapes {published}, "
            f"the bundle {base.version} has {wanted}: move {settings.out_dir} aside to start from the bundle"
        )
    return params


def run(
    grid: Grid, context: Context, workflow_cls: type[SecAggPlusWorkflow] = KeySharersOnlyWorkflow
) -> None:
    """The whole federated run; raises at the end if any round failed, so the run is marked failed."""
    settings = RunSettings.from_context(context)
    base = Bundle.load(settings.bundle)
    strategy = MaskedSumFedAvg(settings, base, initial_params(settings, base))
    report = RunReport(settings.out_dir, context.run_id)
    report.keep(0, strategy.global_params)
    legacy = LegacyContext(
        context,
        config=ServerConfig(num_rounds=settings.num_rounds, round_timeout=settings.stage_timeout),
        strategy=strategy,
        client_manager=BoundedWaitClientManager(settings.nodes_wait),
    )
    secagg = workflow_cls(
        num_shares=settings.share_fraction,
        reconstruction_threshold=settings.threshold_fraction,
        max_weight=float(settings.max_weight),
        # every coordinate of a delta clipped to norm C is within C; room for DP noise on top
        clipping_range=settings.clip_norm * (1.0 + 6.0 * settings.dp_noise),
        timeout=settings.stage_timeout,
    )
    DefaultWorkflow(
        fit_workflow=RoundGuard(secagg, strategy, report),
        evaluate_workflow=InstallStep(strategy, report, settings.num_rounds, settings.stage_timeout),
    )(PromptGrid(grid), legacy)
    report.strategy_inputs = strategy.seen
    report.write()
    failed = [r.round for r in report.rounds if r.status != "ok"]
    if failed:
        raise RuntimeError(
            f"federated rounds failed: {failed} (see {settings.out_dir}/run-{context.run_id}.json)"
        )


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run(grid, context)
