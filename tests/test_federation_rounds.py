"""Federated rounds with real Flower processes on loopback: a SuperLink and SuperNodes, SecAgg+ end to end.

Slow (minutes): every SecAgg+ stage is a round trip through Flower's 3-second polling and a new ClientApp
process. Stage timeouts are the shortest that stayed safe on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil
import pytest

from identifier.bundle import Bundle
from identifier.dataset import domain_windows
from identifier.federated import homedata, model, updates
from identifier.federated.localfleet import Home, LocalFleet
from tests.reply_cut import ReplyCut
from tests.shared_data import DOMAINS, needs_data
from tests.unprivileged import GID, UID, needs_root, open_scratch, with_python_reachable

if TYPE_CHECKING:
    from gateway.store.db import Store

pytestmark = [
    pytest.mark.slow,
    needs_data,
    pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="flwr is not installed"),
]

FAST = {"epochs": 5, "stage-timeout": 60.0, "nodes-wait": 30.0, "threshold-fraction": 0.6}


@pytest.fixture
def fleet(tmp_path: Path):
    fleet = LocalFleet(tmp_path)
    try:
        fleet.start_superlink()
        yield fleet
    finally:  # also when the SuperLink never came up: it may still be starting
        fleet.stop()


def start_homes(fleet: LocalFleet, n: int, cut: ReplyCut | None = None, victim: int = -1) -> list[Home]:
    """``n`` homes, each with a Dirichlet share of the supply-chain name sets as its confirmed devices; with
    ``cut``, each connects through its own port of that relay, home ``victim`` as the one to cut."""
    homes, _ = homedata.split_homes(domain_windows(DOMAINS, set()), n, seed=1)
    started = [
        fleet.add_home(h, superlink=cut.listen(f"home{i}", victim=i == victim) if cut else "")
        for i, h in enumerate(homes)
    ]
    time.sleep(3)  # let every SuperNode register before the run samples them
    return started


def kill_at(fleet: LocalFleet, home: Home, rnd: str, stage: str, after_reply: bool = False) -> threading.Thread:
    """Kill ``home`` as soon as its ClientApp enters ``stage`` of round ``rnd`` or, with ``after_reply``, once
    its SuperNode has sent its first reply of round ``rnd`` (the setup stage's). A warm ClientApp answers setup
    within milliseconds, so a kill at entry races the reply's upload (that case, deterministically, is
    ``test_a_home_dying_while_it_uploads...``); a home that drops "before key sharing" has sent its setup
    reply."""
    log = home.state_dir / "supernode.log"

    def replied() -> bool:
        text = log.read_text(errors="replace")
        start = text.find(f"ROUND {rnd}]")  # the SuperNode announces the round's first message
        return start >= 0 and "Sent successfully" in text[start:]

    def watch() -> None:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if (rnd, stage) in home.stages() and (not after_reply or replied()):
                fleet.kill_home(home)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def contribution(home: Home, base: model.Params, rnd: int) -> tuple[model.Params, int]:
    path = home.state_dir / "contributions" / f"{updates.digest(base)[:16]}-round{rnd}.npz"
    with np.load(path) as z:
        return [z[k] for k in sorted(z.files) if k != "weight"], int(z["weight"])


def history(out: Path, run_id: int, rnd: int) -> model.Params:
    return updates.from_bytes((out / "history" / str(run_id) / f"round-{rnd}.npz").read_bytes())


def assert_masked_mean(out: Path, run_id: int, rnd: int, contributors: list[Home], report: dict) -> None:
    """The round's aggregate is the weighted mean of exactly ``contributors``' updates, and the strategy
    was only ever handed that aggregate, never one home's update."""
    base, after = history(out, run_id, rnd - 1), history(out, run_id, rnd)
    aggregate = updates.delta(after, base)
    contribs = [contribution(h, base, rnd) for h in contributors]
    total = sum(w for _, w in contribs)
    expected = [sum(w * u[i] for u, w in contribs) / total for i in range(len(base))]
    err = max(float(np.max(np.abs(a - e))) for a, e in zip(aggregate, expected, strict=True))
    assert err < 1e-4, f"aggregate differs from the plain mean by {err}"
    assert updates.l2_norm(aggregate) > 1e-3  # the round did move the model
    singles = {updates.digest(u) for u, _ in contribs}
    assert not singles & set(report["strategy_inputs"])
    assert set(report["strategy_inputs"]) >= {updates.digest(aggregate)} or all(
        # the digest is over float32 bytes; the strategy saw the exact array the history was built from
        s not in singles
        for s in report["strategy_inputs"]
    )


def test_two_secagg_rounds_with_dropouts_aggregate_the_survivors_mean(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    """Round 1 with all five homes; in round 2 one home dies right after setup (before key sharing) and
    another while training: both rounds complete, each aggregate is the mean of the homes that finished,
    and the strategy never holds a single home's update. Homes install the final model."""
    homes = start_homes(fleet, 5)
    out = tmp_path / "out"
    killers = [
        kill_at(fleet, homes[3], "2", "setup", after_reply=True),
        kill_at(fleet, homes[4], "2", "collect_masked_vectors"),
    ]
    result = fleet.run({**FAST, "num-rounds": 2, "min-nodes": 3}, out)
    for k in killers:
        k.join(timeout=1)
    rounds = result.report["rounds"]
    assert [r["status"] for r in rounds] == ["ok", "ok"], result.output[-3000:]
    assert [r["homes"] for r in rounds] == [5, 3]
    assert_masked_mean(out, result.run_id, 1, homes, result.report)
    assert_masked_mean(out, result.run_id, 2, homes[:3], result.report)
    # strategy got one (identical) vector per contributing home per round, all equal to the aggregate
    assert len(result.report["strategy_inputs"]) == 8 and len(set(result.report["strategy_inputs"])) == 2
    published, manifest = updates.read_published(out)
    assert manifest["round"] == 2 and manifest["sha256"] == rounds[1]["sha256"]
    # every survivor decided on the final model: installed it as its bundle, or kept its own as no worse
    installs = result.report["installs"]
    assert len(installs) == 3
    # the survivors' ClientApps (8 SecAgg+ stages and the install) were forked warm, none started cold
    for home in homes[:3]:
        assert len(home.stages()) == 8 and home.warm_clientapps() >= 9
    for home in homes[:3]:
        log = [json.loads(line) for line in (home.state_dir / "rounds.log").read_text().splitlines()]
        (decision,) = [e for e in log if e["event"] == "install"]
        installed = updates.ModelStore(home.state_dir / "model").installed()
        if decision["installed"]:
            assert installed.version == manifest["version"] and decision["accuracy"] >= decision["accuracy_before"]
        else:
            assert installed.version == Bundle.load().version and decision["accuracy"] < decision["accuracy_before"]


def test_a_home_dying_while_it_uploads_its_setup_reply_drops_out_of_the_round(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    """A home loses power between uploading its setup reply's message and its objects (the relay passes the
    message on, holds the objects, and the home is killed), and its reply is the first the ServerApp pulls:
    the round completes with the other homes' masked mean. Flower's grid waited for those objects until the
    SuperLink's object-push session expired (180 s), past the stage's end, and never pulled the replies that
    came meanwhile: the round halted ("Insufficient available nodes")."""
    cut = ReplyCut(fleet.address, group="1")
    try:
        homes = start_homes(fleet, 4, cut, victim=3)

        def kill_mid_upload() -> None:
            if cut.held.wait(600):
                fleet.kill_home(homes[3])
                time.sleep(3)  # the ServerApp, polling every 0.2 s, pulls the half reply before any other
            cut.release()

        killer = threading.Thread(target=kill_mid_upload, daemon=True)
        killer.start()
        out = tmp_path / "out"
        result = fleet.run({**FAST, "num-rounds": 1, "min-nodes": 3}, out)
        killer.join(timeout=1)
    finally:
        cut.close()
    assert cut.held.is_set() and homes[3].proc is not None and homes[3].proc.returncode == -9
    rounds = result.report["rounds"]
    assert [r["status"] for r in rounds] == ["ok"], result.output[-3000:]
    assert rounds[0]["homes"] == 3
    assert_masked_mean(out, result.run_id, 1, homes[:3], result.report)


def test_pitfall1_stock_workflow_halts_when_a_home_drops_before_key_sharing(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    """Reproduces Flower's defect: with the stock workflow the survivors fail in the unmask step
    (KeyError in secaggplus_mod) and the round halts; our guard reports it failed (pitfall 2)."""
    homes = start_homes(fleet, 4)
    app_dir = tmp_path / "stock_app"
    app_dir.mkdir()
    pyproject = (
        Path(__file__).resolve().parents[1] / "identifier/federated/flwr_app/pyproject.toml"
    ).read_text()
    (app_dir / "pyproject.toml").write_text(
        pyproject.replace("identifier.federated.server_app:app", "tests.federation_stock_app:app")
    )
    killer = kill_at(fleet, homes[3], "1", "setup")
    out = tmp_path / "out"
    result = fleet.run(
        {**FAST, "num-rounds": 1, "min-nodes": 3, "threshold-fraction": 0.5}, out, app_dir=app_dir
    )
    killer.join(timeout=1)
    assert [r["status"] for r in result.report["rounds"]] == ["failed"], result.output[-3000:]
    survivors_logs = "".join((h.state_dir / "supernode.log").read_text() for h in homes[:3])
    assert "KeyError" in survivors_logs
    assert not (out / "global.npz").exists()


def test_too_many_dropouts_fail_the_round_and_keep_the_model(fleet: LocalFleet, tmp_path: Path) -> None:
    """Three of five homes die while training: fewer than the threshold remain, the round is reported
    failed, the published model is untouched, the run ends failed."""
    homes = start_homes(fleet, 5)
    out = tmp_path / "out"
    shipped = Bundle.load()
    before = [a * 0.9 for a in model.params_of(shipped)]
    sha_before = updates.publish(before, out, {"round": 0}, shipped)
    killers = [kill_at(fleet, h, "1", "collect_masked_vectors") for h in homes[2:]]
    result = fleet.run({**FAST, "num-rounds": 1, "min-nodes": 3}, out)
    for k in killers:
        k.join(timeout=1)
    assert [r["status"] for r in result.report["rounds"]] == ["failed"], result.output[-3000:]
    assert "federated rounds failed: [1]" in result.output
    params, manifest = updates.read_published(out)
    assert manifest["sha256"] == sha_before == updates.digest(params)
    assert result.report["installs"] == []


def test_pitfall3_bounded_waits_fail_fast(fleet: LocalFleet, tmp_path: Path) -> None:
    """Waiting for more homes than joined gives up after nodes-wait (Flower's default is a day), and a
    stage timeout shorter than local training halts the round: both reported as failed rounds."""
    start_homes(fleet, 3)
    started = time.monotonic()
    waiting = fleet.run({**FAST, "num-rounds": 1, "min-nodes": 4, "nodes-wait": 5.0}, tmp_path / "a")
    assert time.monotonic() - started < 120
    assert [r["status"] for r in waiting.report["rounds"]] == ["failed"], waiting.output[-3000:]
    short = fleet.run({**FAST, "num-rounds": 1, "min-nodes": 3, "stage-timeout": 2.0}, tmp_path / "b")
    assert [r["status"] for r in short.report["rounds"]] == ["failed"], short.output[-3000:]


def confirmed_gateway(gateway: Path) -> tuple[Path, Store]:
    """A gateway state directory filled by replaying a TP-Link plug and a D-Link camera joining, both confirmed
    by the owner (the camera corrected: the model said D-LinkCam); its config file and its open store."""
    from gateway.devices import service
    from gateway.store.db import Store
    from tests.shared_data import CAPTURES

    config = gateway / "iotgw.toml"
    config.write_text(f'[gateway]\nstate_dir = "{gateway}"\n')
    pcaps = [str(CAPTURES / d / "Setup-A-1-STA.pcap") for d in ("TP-LinkPlugHS110", "D-LinkCam")]
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "gateway.cli", "replay", "--config", str(config), *pcaps], cwd=root,
                   check=True, capture_output=True)
    store = Store(f"sqlite:///{gateway / 'iotgw.sqlite'}")
    service.label(store, "50:c7:bf:00:c7:03", manufacturer="TP-Link", device_type="TP-LinkPlugHS110",
                  category="plug")
    service.label(store, "b0:c5:54:25:5b:0e", manufacturer="D-Link", device_type="D-LinkDayCam",
                  category="camera")  # a correction: the model said D-LinkCam
    return config, store


def test_a_gateway_joins_from_its_store_and_reports_the_round(fleet: LocalFleet, tmp_path: Path) -> None:
    """``iotgw federation join`` on a gateway whose store was filled by replaying real captures and whose
    owner confirmed two devices: it exports them, takes part in a SecAgg+ round with two other homes, installs
    the model as a bundle and records ``federated_round`` and ``model_updated`` alerts in its outbox."""
    from gateway.alerts.outbox import recent_alerts
    from identifier.federated import processes

    gateway = tmp_path / "gateway"
    gateway.mkdir()
    config, store = confirmed_gateway(gateway)
    cli = [sys.executable, "-m", "gateway.cli"]
    root = Path(__file__).resolve().parents[1]
    start_homes(fleet, 2)
    node_port = processes.free_port()
    join = subprocess.Popen(
        [*cli, "federation", "join", "--config", str(config), "--superlink", fleet.address, "--insecure",
         "--port", str(node_port), "--window", "600"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        time.sleep(5)
        result = fleet.run({**FAST, "num-rounds": 1, "min-nodes": 3}, tmp_path / "out")
        assert [r["status"] for r in result.report["rounds"]] == ["ok"], result.output[-3000:]
        log = gateway / "federation" / "rounds.log"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and '"install"' not in log.read_text():
            time.sleep(0.5)
        time.sleep(2)  # join's next poll of the round log
    finally:
        join.send_signal(signal.SIGTERM)  # what systemd sends at the end of the window's unit
        output = join.communicate(timeout=60)[0]
    # it ended through its cleanup (130, as for Ctrl-C), which stopped the SuperNode it started
    assert join.returncode == 130, output[-3000:]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", node_port), timeout=2).close()
    assert "training data: 2 confirmed devices" in output
    # what the owner (or the journal of the nightly unit) reads: the round and the install decision, in words
    assert f"joined {fleet.address} for 600 s" in output
    assert "round 1 of run " in output and ": ok, this home's masked update is in the sum" in output, output[-3000:]
    exported = homedata.load(gateway / "federation" / "confirmed.jsonl")
    assert {w.device_type for w in exported} == {"TP-LinkPlugHS110", "D-LinkDayCam"}
    (round_alert,) = recent_alerts(store, kind="federated_round")
    assert (round_alert.data["round"], round_alert.data["status"]) == (1, "ok")
    _, manifest = updates.read_published(tmp_path / "out")
    (decision,) = [json.loads(line) for line in log.read_text().splitlines() if '"install"' in line]
    if decision["installed"]:  # no worse on the two confirmed devices
        (alert,) = recent_alerts(store, kind="model_updated")
        assert alert.data["version"] == manifest["version"] and alert.data["previous_version"] == Bundle.load().version
        assert Bundle.load(gateway / "federation" / "model" / "current").version == manifest["version"]
        assert f"model {manifest['version']} installed (was {Bundle.load().version})" in output
    else:
        assert not recent_alerts(store, kind="model_updated") and "worse" in decision["reason"]
        assert f"model of round 1 not installed: {decision['reason']}" in output
    store.close()


@needs_root
def test_a_join_run_as_root_runs_the_supernode_as_the_state_directorys_owner(fleet: LocalFleet) -> None:
    """An admin's ``sudo iotgw federation join`` on a gateway whose state directory is the service user's: the
    SuperNode and everything it starts run as that user (no other groups), so all that Flower and the ClientApp
    leave in the federation directory (FLWR_HOME, rounds.log, the installed bundles) is that user's and the next
    nightly join, run as that user, can append to it and install over it."""
    from identifier.federated import processes

    with open_scratch() as scratch:  # pytest's tmp_path is under a directory of root's that only root can enter
        gateway = scratch / "gateway"
        gateway.mkdir(mode=0o750)
        os.chown(gateway, UID, GID)
        config, store = confirmed_gateway(gateway)
        start_homes(fleet, 2)
        node_port = processes.free_port()
        cmd = [sys.executable, "-m", "gateway.cli", "federation", "join", "--config", str(config),
               "--superlink", fleet.address, "--insecure", "--port", str(node_port), "--window", "600"]
        join = subprocess.Popen(
            with_python_reachable(cmd, scratch),
            cwd=Path(__file__).resolve().parents[1],
            env={**os.environ, processes.MARK_ENV: fleet.mark},  # so the fleet's teardown ends its SuperNode too
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        fed = gateway / "federation"
        try:
            time.sleep(5)
            result = fleet.run({**FAST, "num-rounds": 1, "min-nodes": 3}, scratch / "out")
            assert [r["status"] for r in result.report["rounds"]] == ["ok"], result.output[-3000:]
            # the join's SuperNode, its SuperExec and warm ClientApp server, while still joined
            started = psutil.Process(join.pid).children(recursive=True)
            credentials = {_credentials(p) for p in started} - {None}
            log = fed / "rounds.log"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and '"install"' not in log.read_text():
                time.sleep(0.5)
        finally:
            join.send_signal(signal.SIGTERM)
            output = join.communicate(timeout=60)[0]
        assert join.returncode == 130, output[-3000:]
        assert started and credentials == {(UID, UID, GID, "")}, (credentials, output[-3000:])
        (decision,) = [json.loads(line) for line in log.read_text().splitlines() if '"install"' in line]
        if decision["installed"]:  # else it was worse on the two confirmed devices, and model/ was not made
            assert (fed / "model" / "current" / "bundle.json").is_file()
        # made by the SuperNode itself: root would have left it root's, it stays with whoever creates it
        assert (fed / "flwr" / "bin" / "flwr-clientapp").stat().st_uid == UID
        owners = {}
        for d, dirs, files in os.walk(fed):
            for path in (Path(d), *(Path(d) / n for n in dirs + files)):
                st = path.lstat()
                owners[str(path.relative_to(gateway))] = (st.st_uid, st.st_gid)
        assert {"federation/flwr/bin/flwr-clientapp", "federation/rounds.log"} <= set(owners)
        assert {path: ids for path, ids in owners.items() if ids != (UID, GID)} == {}
        store.close()


def _credentials(proc: psutil.Process) -> tuple[int, int, int, str] | None:
    """A process's real and effective uid, real gid and supplementary groups (as /proc lists them); None if it
    has ended meanwhile (a ClientApp)."""
    try:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        uids, gids = proc.uids(), proc.gids()
    except (OSError, psutil.NoSuchProcess):
        return None
    groups = next(line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("Groups:"))
    return uids.real, uids.effective, gids.real, groups
