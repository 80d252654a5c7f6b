"""The Flower processes a local fleet runs, and that a failed one leaves none behind (real processes).

Flower's SuperLink starts its SuperExec in a session of its own, and that SuperExec starts the
``flwr-serverapp`` process: killing the SuperLink's process group left ServerApps running idle after failed
benchmark runs. Here the SuperLink dies abruptly in the middle of a round, and closing the fleet must end
every process the fleet started, directly or not.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from identifier.dataset import domain_windows
from identifier.federated import homedata
from identifier.federated.localfleet import LocalFleet
from tests.shared_data import DOMAINS, needs_data

pytestmark = [
    needs_data,
    pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="flwr is not installed"),
]


def collect(seen: dict[psutil.Process, list[str]]) -> None:
    """Add every live process below this test's process (psutil.Process compares pid and start time) to
    ``seen``, with its command line."""
    for p in psutil.Process().children(recursive=True):
        seen[p] = cmdline(p) or seen.get(p, [])


def running(seen: dict[psutil.Process, list[str]], command: str) -> bool:
    return any(command in part for cmd in seen.values() for part in cmd)


def alive(procs: set[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return out


def cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def test_closing_a_fleet_whose_superlink_died_mid_round_ends_every_flower_process(tmp_path: Path) -> None:
    homes, _ = homedata.split_homes(domain_windows(DOMAINS, set()), 2, seed=1)
    seen: dict[psutil.Process, list[str]] = {}
    with LocalFleet(tmp_path) as fleet:
        fleet.start_superlink()
        started = [fleet.add_home(h) for h in homes]
        run_config = {"num-rounds": 1, "min-nodes": 2, "nodes-wait": 30.0, "stage-timeout": 60.0}
        runner = threading.Thread(
            target=fleet.run, args=(run_config, tmp_path / "out"), kwargs={"timeout": 120}, daemon=True
        )
        runner.start()
        # Mid-round: the ServerApp runs and at least one home's ClientApp has entered a SecAgg+ stage.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            collect(seen)
            if running(seen, "flwr-serverapp") and any(h.stages() for h in started):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the round never reached a SecAgg+ stage")
        collect(seen)
        os.kill(fleet.superlink.pid, signal.SIGKILL)
    assert len(seen) >= 7, seen  # SuperLink, its SuperExec, ServerApp, `flwr run`, two SuperNodes + SuperExecs
    # Every ClientApp ran through the home's light launcher (supernode.install_launcher), not Flower's script.
    clientapps = [cmd for cmd in seen.values() if any(part.endswith("flwr-clientapp") for part in cmd)]
    assert clientapps
    homes_bin = {str(h.state_dir / "flwr" / "bin" / "flwr-clientapp") for h in started}
    assert all(set(c) & homes_bin for c in clientapps), clientapps
    # ...and each ran in a child forked by the home's warm server (warm_clientapp), not started cold: every
    # stage a home's ClientApp logged came from a fork (a silent fallback to cold starts fails here)
    assert all(h.warm_clientapps() >= len(h.stages()) for h in started)
    assert sum(h.warm_clientapps() for h in started) > 0
    assert alive(set(seen)) == []
    runner.join(timeout=10)
    assert not runner.is_alive()  # `flwr run` was ended with the rest
