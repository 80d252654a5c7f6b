"""``flower-supernode`` with shorter waits and lighter ClientApps: ``python -m identifier.federated.supernode ARGS``.

Everything is Flower's own ``flower-supernode``, with two changes to what a round costs in waiting:

- A SuperNode with no message pending sleeps a hard-coded 3 seconds before asking the SuperLink again, and
  0.5 s at a time while it waits for its own ClientApp's reply (``flwr/supernode/start_client_internal.py``,
  flwr 1.41). SecAgg+ is four message round trips per round where plain FedAvg is one, so these sleeps
  cost a SecAgg+ round seconds. Here the idle poll is capped at ``IOTGW_SUPERNODE_POLL_S``
  (``processes.POLL_S``) and the local waits at ``LOCAL_WAIT_S``. A shorter idle poll means more requests to
  the SuperLink while a gateway is joined (one per poll per home), which is why it is a setting and only
  applies during the nightly window; the local waits only look at this node's own state.
- The SuperExec starts ``flwr-clientapp`` (found on PATH) for every message; ``install_launcher`` puts our
  launcher first on PATH under that name, and ``main`` starts the home's warm ClientApp server
  (``warm_clientapp``): the launcher has the server fork a ClientApp that has flwr imported already, or
  runs ``clientapp_process`` (which skips the SuperNode imports Flower's console script makes) without it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import ModuleType

from identifier.atomicfile import write_whole

POLL_ENV = "IOTGW_SUPERNODE_POLL_S"
LOCAL_WAIT_S = 0.05
IDLE_POLL_S = 3.0  # Flower's idle poll; its other sleeps in that module are local waits


class _CappedSleep(ModuleType):
    """The ``time`` module as seen by Flower's SuperNode loop, with ``sleep`` capped."""

    def __init__(self, cap: float) -> None:
        super().__init__("time")
        self.cap = cap

    def __getattr__(self, name: str):  # noqa: ANN204 - whatever ``time`` has
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap if seconds >= IDLE_POLL_S else LOCAL_WAIT_S))


def install_launcher(bin_dir: Path) -> bool:
    """Write ``bin_dir/flwr-clientapp`` running ``warm_clientapp.main`` with this interpreter and this copy of
    ``identifier``, and put ``bin_dir`` first on PATH for the processes this one starts. False (and PATH
    untouched) if it cannot be run from there (a noexec mount): Flower's own console script is used then."""
    import identifier

    bin_dir.mkdir(parents=True, exist_ok=True)
    launcher = bin_dir / "flwr-clientapp"
    package_root = Path(identifier.__file__).resolve().parents[1]
    script = (
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(package_root)!r})\n"
        "from identifier.federated.warm_clientapp import main\n"
        "main()\n"
    )
    # run by this user only, like the rest of the state directory
    write_whole(launcher, script.encode("utf-8"), mode=0o700)
    if not os.access(launcher, os.X_OK):
        return False
    # This interpreter's own scripts next: Flower starts ``flower-superexec`` by name too, and a version
    # manager's shim for it (pyenv) would put its own bin directory, and Flower's flwr-clientapp, first.
    path = [str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    os.environ["PATH"] = os.pathsep.join(p for p in path if p)
    return True


def main() -> None:
    import flwr.supernode.start_client_internal as loop
    from flwr.supercore.utils import get_flwr_home
    from flwr.supernode.cli import flower_supernode

    cap = float(os.environ.get(POLL_ENV, "3"))
    if cap <= 0:
        raise SystemExit(f"{POLL_ENV} must be a positive number of seconds, not {cap}")
    loop.time = _CappedSleep(cap)  # type: ignore[assignment]
    if install_launcher(get_flwr_home() / "bin"):
        from identifier.federated import warm_clientapp

        warm_clientapp.start(get_flwr_home() / "warm")
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
