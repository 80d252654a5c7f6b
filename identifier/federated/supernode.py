"""``flower-supernode`` with a configurable idle poll: run as ``python -m identifier.federated.supernode ARGS``.

A SuperNode with no message pending sleeps a hard-coded 3 seconds before asking the SuperLink again
(``flwr/supernode/start_client_internal.py``, flwr 1.41). SecAgg+ is four message round trips per round
where plain FedAvg is one, so that sleep alone made a SecAgg+ round seconds slower per stage. Here every sleep
in that module is capped at ``IOTGW_SUPERNODE_POLL_S`` (``processes.POLL_S``); everything else is Flower's
own ``flower-supernode``. A shorter poll means more requests to the SuperLink while a gateway is joined (one
per poll per home), which is why it is a setting and only applies during the nightly window.
"""

from __future__ import annotations

import os
import sys
import time
from types import ModuleType

POLL_ENV = "IOTGW_SUPERNODE_POLL_S"


class _CappedSleep(ModuleType):
    """The ``time`` module as seen by Flower's SuperNode loop, with ``sleep`` capped."""

    def __init__(self, cap: float) -> None:
        super().__init__("time")
        self.cap = cap

    def __getattr__(self, name: str):  # noqa: ANN204 - whatever ``time`` has
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


def main() -> None:
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli import flower_supernode

    cap = float(os.environ.get(POLL_ENV, "3"))
    if cap <= 0:
        raise SystemExit(f"{POLL_ENV} must be a positive number of seconds, not {cap}")
    loop.time = _CappedSleep(cap)  # type: ignore[assignment]
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
