"""Plain FedAvg apps for benchmarks/federated_round.py: iotgw's round without SecAgg+, to price it.

Not for deployment: iotgw's own ClientApp always carries ``secaggplus_mod`` and refuses plain rounds.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy.aggregate import aggregate
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid, ServerApp

from identifier.bundle import Bundle
from identifier.federated import server_app, updates
from identifier.federated.client_app import client_fn


class PlainFedAvg(server_app.MaskedSumFedAvg):
    """The same strategy, but handed every home's update in the clear (what SecAgg+ prevents)."""

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN201
        if not results:
            return None, {}
        mean = aggregate([(parameters_to_ndarrays(r.parameters), r.num_examples) for _, r in results])
        self.global_params = updates.apply(self.global_params, mean)
        self.aggregated_rounds.add(server_round)
        self.homes_in_round[server_round] = len(results)
        return ndarrays_to_parameters(self.global_params), {}


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    settings = server_app.RunSettings.from_context(context)
    base = Bundle.load(settings.bundle)
    strategy = PlainFedAvg(settings, base, server_app.initial_params(settings, base))
    report = server_app.RunReport(settings.out_dir, context.run_id)
    legacy = LegacyContext(
        context,
        config=ServerConfig(num_rounds=settings.num_rounds, round_timeout=settings.stage_timeout),
        strategy=strategy,
        client_manager=server_app.BoundedWaitClientManager(settings.nodes_wait),
    )
    DefaultWorkflow(
        fit_workflow=server_app.RoundGuard(default_fit_workflow, strategy, report),
        evaluate_workflow=lambda grid, context: None,
    )(server_app.PromptGrid(grid), legacy)  # the same reply polling as iotgw's ServerApp


client = ClientApp(client_fn=client_fn)
