"""A ServerApp identical to iotgw's but with Flower's stock SecAgg+ workflow: reproduces pitfall 1."""

from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import ServerApp

from identifier.federated.server_app import run

app = ServerApp()


@app.main()
def main(grid, context) -> None:  # noqa: ANN001
    run(grid, context, workflow_cls=SecAggPlusWorkflow)
