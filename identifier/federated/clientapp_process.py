"""``flwr-clientapp`` without importing the SuperNode: the process Flower starts for every message to a home.

Flower's SuperExec starts a fresh ``flwr-clientapp`` process for each message (a SecAgg+ round is four per
home, plain FedAvg one). Its console script imports ``flwr.supernode.cli``, whose ``__init__`` imports the
whole SuperNode (FastAPI routes, pydantic models, SQLAlchemy stores) that a ClientApp never uses: 0.55 s
of the 1.4 s each such process spent importing on the 2-core test machine (docs/federation.md, "Round
cost"). This runs Flower's own ``flwr_clientapp()`` unchanged, with that package registered as an empty
namespace so only the module it needs is loaded. ``supernode.install_launcher`` puts a launcher on the
SuperExec's PATH under Flower's command name: it runs this when the home's warm server (``warm_clientapp``,
which loads flwr the same way) does not answer.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path


def register_light_cli() -> None:
    """Make ``flwr.supernode.cli`` an empty namespace, so importing one of its modules skips the rest."""
    import flwr.supernode

    cli = types.ModuleType("flwr.supernode.cli")
    cli.__path__ = [str(Path(flwr.supernode.__file__).parent / "cli")]
    sys.modules.setdefault("flwr.supernode.cli", cli)


def main() -> None:
    register_light_cli()
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    sys.argv[0] = "flwr-clientapp"  # Flower names its exit events after argv[0]
    sys.exit(flwr_clientapp())


if __name__ == "__main__":
    main()
