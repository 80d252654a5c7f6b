"""The federation library without Flower's processes: clipping, digests, the model seam, install, homes, CLI."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from gateway.cli import Parser
from identifier.bundle import Bundle
from identifier.dataset import domain_windows
from identifier.federated import homedata, model, processes, updates
from tests.shared_data import DOMAINS, needs_data


@pytest.fixture(scope="module")
def shipped() -> Bundle:
    return Bundle.load()


@pytest.fixture(scope="module")
def name_sets() -> list:
    return domain_windows(DOMAINS, {"camera", "plug", "hub", "sensor"})


def test_clip_bounds_the_norm_and_keeps_small_updates() -> None:
    rng = np.random.default_rng(0)
    big = [rng.normal(0, 3, (4, 5)).astype(np.float32), rng.normal(0, 3, 7).astype(np.float32)]
    clipped = updates.clip(big, 1.0)
    assert updates.l2_norm(clipped) == pytest.approx(1.0, rel=1e-5)
    assert np.allclose(clipped[0] / big[0], clipped[1][0] / big[1][0])  # direction kept
    small = [a / 100 for a in clipped]
    assert all(np.array_equal(a, b) for a, b in zip(updates.clip(small, 1.0), small, strict=True))


def test_digest_follows_the_numbers_and_bytes_round_trip(shipped: Bundle) -> None:
    params = model.params_of(shipped)
    assert updates.digest(updates.from_bytes(updates.to_bytes(params))) == updates.digest(params)
    changed = [a.copy() for a in params]
    changed[0].flat[0] += 1e-3
    assert updates.digest(changed) != updates.digest(params)


def test_the_seam_is_the_bundle_s_weights_and_the_model_hook_inverts_export(shipped: Bundle) -> None:
    from identifier.model import export, from_export

    params = model.params_of(shipped)
    assert len(params) == len(shipped.weights) - 1  # every trained array, not the temperatures
    again = model.weights_of(shipped, params)
    assert all(np.array_equal(again[k], shipped.weights[k]) for k in shipped.weights)
    exported = export(from_export(shipped.weights), list(shipped.weights["temps"]))
    assert all(np.array_equal(exported[k], shipped.weights[k]) for k in shipped.weights)
    with pytest.raises(ValueError, match="do not fit"):
        model.weights_of(shipped, params[:-1])


def completes_when_cut_at(monkeypatch: pytest.MonkeyPatch, n: int, action: Callable[[], object]) -> bool:
    """Run ``action`` with its n-th rename, link or symlink raising, as if the power went there (a cut cannot be
    caused for real: nothing after it runs); True if it completed before step n came."""
    calls = iter(range(1, 1000))

    def cut(call: Callable) -> Callable:
        def step(*args: object, **kwargs: object) -> object:
            if next(calls) == n:
                raise OSError("power cut")
            return call(*args, **kwargs)

        return step

    for name in ("replace", "rename", "link", "symlink"):
        monkeypatch.setattr(os, name, cut(getattr(os, name)))
    try:
        action()
        return True
    except OSError as exc:
        assert str(exc) == "power cut"
        return False
    finally:
        monkeypatch.undo()


def test_published_model_is_a_bundle_checked_against_its_digest(tmp_path: Path, shipped: Bundle) -> None:
    params = [a * 0.5 for a in model.params_of(shipped)]
    sha = updates.publish(params, tmp_path, {"round": 1, "run_id": 7}, shipped)
    again, manifest = updates.read_published(tmp_path)
    assert manifest["sha256"] == sha and updates.digest(again) == sha
    assert manifest["schema"] == model.schema(shipped) and manifest["version"] == f"fed-7-r1-{sha[:8]}"
    written = Bundle.load(tmp_path / "bundle")  # the global model as the daemon loads it
    assert written.version == manifest["version"] and written.labels == shipped.labels
    assert written.features == shipped.features
    assert np.allclose(written.weights["w1"], params[model.keys(shipped).index("w1")], atol=1e-3)
    tampered = [a.copy() for a in params]
    tampered[-1].flat[0] = 5.0
    (tmp_path / "global.npz").write_bytes(updates.to_bytes(tampered))
    with pytest.raises(ValueError, match="does not match"):
        updates.read_published(tmp_path)


def _resume(out_dir: Path, base: Bundle) -> list:
    """What the ServerApp starts its next run from (``server_app.initial_params``)."""
    from identifier.federated.server_app import RunSettings, initial_params

    s = RunSettings(num_rounds=1, stage_timeout=10, min_nodes=2, nodes_wait=1, share_fraction=1.0,
                    threshold_fraction=0.5, clip_norm=1.0, dp_noise=0.0, epochs=1, lr=0.1, max_weight=100,
                    out_dir=out_dir, bundle=None)
    return initial_params(s, base)


def test_a_publication_cut_off_at_any_step_leaves_a_matched_model_manifest_and_bundle(
    tmp_path: Path, shipped: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 2's publication is cut at each rename or link in turn (the power going there): the directory holds
    round 1's or round 2's model with its own manifest and bundle, the next run resumes from it, and the next
    publication works."""
    rounds = [[a * f for a in model.params_of(shipped)] for f in (0.5, 0.25, 0.125)]
    shas = [updates.digest(p) for p in rounds]
    for n in range(1, 30):
        out = tmp_path / f"cut-{n}"
        updates.publish(rounds[0], out, {"round": 1, "run_id": 1}, shipped)
        done = completes_when_cut_at(monkeypatch, n, partial(updates.publish, rounds[1], out, {"round": 2, "run_id": 1},
                                                             shipped))
        params, manifest = updates.read_published(out)
        assert manifest["sha256"] in shas[:2] and updates.digest(params) == manifest["sha256"], n
        assert Bundle.load(out / "bundle").version == manifest["version"], n
        assert updates.digest(_resume(out, shipped)) == manifest["sha256"], n
        updates.publish(rounds[2], out, {"round": 3, "run_id": 1}, shipped)
        assert updates.read_published(out)[1]["sha256"] == shas[2]
        assert Bundle.load(out / "bundle").version == updates.version_of({"round": 3, "run_id": 1}, shas[2])
        assert [d.name for d in (out / "releases").iterdir()] == [os.readlink(out / "published").split("/")[-1]]
        if done:
            assert manifest["sha256"] == shas[1]
            break
    else:
        raise AssertionError("the publication never completed")


@needs_data
def test_install_checks_digest_schema_and_regression_and_rolls_back(
    tmp_path: Path, shipped: Bundle, name_sets: list
) -> None:
    homes, _ = homedata.split_homes(name_sets, 3, seed=2)
    data = model.samples(shipped, homes[0])
    store = updates.ModelStore(tmp_path / "model")
    assert store.installed().version == shipped.version  # before any federated install: the shipped one
    base = model.params_of(shipped)
    good = model.local_train(shipped, base, data, epochs=3, lr=0.01)
    bad = [np.zeros_like(a) for a in base]  # a model that knows nothing
    info = {"round": 1, "run_id": 1}
    schema = model.schema(shipped)
    assert store.install(good, "0" * 64, schema, data, info).reason == "digest mismatch"
    assert "label sets" in store.install(good, updates.digest(good), "f" * 64, data, info).reason
    worse = store.install(bad, updates.digest(bad), schema, data, info)
    assert not worse.installed and "worse" in worse.reason and worse.accuracy_new < worse.accuracy_current
    assert not (tmp_path / "model" / "current").exists()
    first = store.install(good, updates.digest(good), schema, data, info)
    assert first.installed and first.accuracy_new >= first.accuracy_current
    assert first.previous_version == shipped.version
    installed = store.installed()
    assert installed.version == first.version == f"fed-1-r1-{updates.digest(good)[:8]}"
    assert installed.labels == shipped.labels and installed.metrics["federated"]["round"] == 1
    assert store.rollback() == (shipped.version, first.version)
    assert store.installed().version == shipped.version
    assert store.rollback() is None


def _daemon_model(state: Path) -> str | None:
    """The version of the bundle the gateway's daemon loads with its state directory at ``state``."""
    from gateway.config import Config
    from gateway.daemon import load_identifier

    cfg = Config()
    cfg.gateway.state_dir = str(state)
    return load_identifier(cfg).bundle.version


@needs_data
def test_an_install_or_rollback_cut_off_at_any_step_leaves_the_old_or_the_new_model_installed(
    tmp_path: Path, shipped: Bundle, name_sets: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut cannot be caused here: the n-th rename or link the store makes raises instead, for every n,
    and nothing after it runs. Every cut leaves a complete bundle installed, the one before or the new one, the
    daemon runs that same one, ``previous`` is never set without ``current``, and the next install and rollback
    work from there."""
    homes, _ = homedata.split_homes(name_sets, 3, seed=2)
    data = model.samples(shipped, homes[0])
    params = model.params_of(shipped)
    schema, sha = model.schema(shipped), updates.digest(params)
    first = tmp_path / "first" / "federation" / "model"
    v1 = updates.ModelStore(first).install(params, sha, schema, data, {"round": 1, "run_id": 1}).version
    new = f"fed-1-r2-{sha[:8]}"
    outcomes = {"first install": (shipped.version, new), "install": (v1, new), "rollback": (v1, shipped.version)}

    for operation, (before, after) in outcomes.items():
        for n in range(1, 20):
            state = tmp_path / f"{operation}-{n}".replace(" ", "-")
            if operation != "first install":  # the others start from v1 installed over the shipped model
                shutil.copytree(tmp_path / "first", state, symlinks=True)
            store = updates.ModelStore(state / "federation" / "model")
            step = (store.rollback if operation == "rollback"
                    else partial(store.install, params, sha, schema, data, {"round": 2, "run_id": 1}))
            done = completes_when_cut_at(monkeypatch, n, step)
            version = store.installed().version
            assert version in {before, after}, (operation, n)
            assert _daemon_model(state) == version, (operation, n)
            assert store.current_dir.exists() or not store.previous_dir.exists(), (operation, n)
            if done:
                assert version == after, operation
                break
            if operation != "rollback":
                again = store.install(params, sha, schema, data, {"round": 3, "run_id": 1})
                assert again.installed and store.rollback() == (again.previous_version, again.version), n
            else:
                assert store.rollback() in {None, (shipped.version, v1)}, n
        else:
            raise AssertionError(f"{operation} never completed")


@needs_data
def test_local_training_learns_the_home_s_devices(shipped: Bundle, name_sets: list) -> None:
    """From fresh weights, a few epochs on a home's windows beat chance by far on those windows."""
    from identifier.federated.simulate import fresh

    start = fresh(shipped, seed=0)
    homes, _ = homedata.split_homes(name_sets, 3, seed=2)
    data = model.samples(start, homes[0])
    before = model.evaluate(start, model.params_of(start), data)
    trained = model.local_train(start, model.params_of(start), data, epochs=20, lr=0.01)
    after = model.evaluate(start, trained, data)
    assert after["manufacturer_accuracy"] > 0.8 > before["manufacturer_accuracy"]


@needs_data
def test_dirichlet_homes_differ_and_hold_out_some_of_every_kind(name_sets: list) -> None:
    homes, test = homedata.split_homes(name_sets, 5, alpha=0.3, seed=0)
    assert all(homes)
    kinds = [{w.manufacturer for w in h} for h in homes]
    multi = {w.manufacturer for w in name_sets if sum(x.manufacturer == w.manufacturer for x in name_sets) > 1}
    assert {w.manufacturer for w in test} == multi - {None}  # every vendor with two devices has one held out
    assert max(len(k) for k in kinds) < len(multi)  # no home sees every vendor
    assert len({frozenset(k) for k in kinds}) == 5
    held = {id(w) for w in test}
    assert not any(id(w) in held for h in homes for w in h)


def test_home_windows_round_trip_and_a_bad_line_names_file_and_line(tmp_path: Path, name_sets: list) -> None:
    path = tmp_path / "confirmed.jsonl"
    homedata.save(name_sets[:3], path)
    again = homedata.load(path)
    assert [(w.manufacturer, w.device_type, w.observations) for w in again] == [
        (w.manufacturer, w.device_type, w.observations) for w in name_sets[:3]
    ]
    path.write_text(path.read_text() + '{"mac": "aa", "observations": [{"kind": "dns"}]}\n')
    with pytest.raises(ValueError, match="confirmed.jsonl:4"):
        homedata.load(path)
    with pytest.raises(ValueError, match="missing.jsonl"):
        homedata.load(tmp_path / "missing.jsonl")


@needs_data
def test_what_a_home_sends_back_carries_no_count_of_its_devices_nor_its_accuracy(
    tmp_path: Path, shipped: Bundle, name_sets: list
) -> None:
    """The real ClientApp (its mods, SecAgg+ and HomeClient) through a one-home SecAgg+ round and an install:
    the masked-vector reply holds only masked numbers (the weight, its count of samples, used to ride beside
    them in the clear), and the install reply says what was decided, not how this home's devices scored."""
    import time

    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.app.metadata import Metadata
    from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    from identifier.federated.client_app import app

    homes, _ = homedata.split_homes(name_sets, 3, seed=2)
    homedata.save(homes[0], tmp_path / "confirmed.jsonl")
    nid = 7
    node_config = {"data": str(tmp_path / "confirmed.jsonl"), "state-dir": str(tmp_path / "state")}
    context = Context(run_id=1, node_id=nid, node_config=node_config, state=RecordDict(), run_config={})

    def send(kind: str, content: RecordDict, stage: str = "", **configs: object) -> Message:
        if stage:
            content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({Key.STAGE: stage, **configs})
        meta = Metadata(run_id=1, message_id=f"{kind}-{stage}", src_node_id=1, dst_node_id=nid,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600.0, message_type=kind)
        reply = app(Message(content, metadata=meta), context)
        assert not reply.has_error(), reply.error
        return reply

    keys = send(MessageType.TRAIN, RecordDict(), Stage.SETUP, **{
        Key.SAMPLE_NUMBER: 1, Key.SHARE_NUMBER: 1, Key.THRESHOLD: 1, Key.CLIPPING_RANGE: 1.0,
        Key.TARGET_RANGE: 1 << 22, Key.MOD_RANGE: 1 << 32, Key.MAX_WEIGHT: 10000.0,
    }).content.config_records[RECORD_KEY_CONFIGS]
    own_keys = [keys[Key.PUBLIC_KEY_1], keys[Key.PUBLIC_KEY_2]]
    send(MessageType.TRAIN, RecordDict(), Stage.SHARE_KEYS, **{str(nid): own_keys})
    params = model.params_of(shipped)
    config = {"round": 1, "sha256": updates.digest(params), "schema": model.schema(shipped), "epochs": 1,
              "lr": 0.01, "clip-norm": 1.0, "dp-std": 0.0, "max-weight": 10000}
    fit = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(params), config), True)
    reply = send(MessageType.TRAIN, fit, Stage.COLLECT_MASKED_VECTORS, **{Key.CIPHERTEXT_LIST: [], Key.SOURCE_LIST: []})
    (weight,) = np.load(next((tmp_path / "state" / "contributions").glob("*.npz")))["weight"].reshape(1)
    assert weight > 0  # what this home trained on, and must keep to itself
    assert all(len(arrays) == 0 for arrays in reply.content.array_records.values())
    assert [dict(r) for r in reply.content.metric_records.values()] == [{"num_examples": 0}]
    assert Key.MASKED_PARAMETERS in reply.content.config_records[RECORD_KEY_CONFIGS]

    install = compat.evaluateins_to_recorddict(
        EvaluateIns(ndarrays_to_parameters(params), {**config, "install": True, "run-id": 1}), True
    )
    res = compat.recorddict_to_evaluateres(send(MessageType.EVALUATE, install).content)
    assert (res.num_examples, res.loss) == (0, 0.0) and set(res.metrics) == {"installed", "reason"}
    logged = [json.loads(line) for line in (tmp_path / "state" / "rounds.log").read_text().splitlines()]
    (decision,) = [e for e in logged if e.get("event") == "install"]
    assert {"accuracy", "accuracy_before"} <= set(decision)  # kept at home, for the owner's alert


def test_every_flower_process_gets_the_safe_environment(tmp_path: Path) -> None:
    env = processes.flower_env(tmp_path, base={"PATH": "/usr/bin"})
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_HOME"] == str(tmp_path / "flwr")
    assert str(processes.PACKAGE_ROOT) in env["PYTHONPATH"].split(":")
    assert env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == str(processes.TASK_POLL_S)
    cmd = processes.superlink_cmd("127.0.0.1", 9092, tmp_path / "db", None, node_auth=False)
    assert "--disable-runtime-dependency-installation" in cmd
    node = processes.supernode_cmd("127.0.0.1:9092", 9094, tmp_path / "d.jsonl", tmp_path, None, None)
    assert node[1:3] == ["-m", "identifier.federated.supernode"]  # Flower's SuperNode with our idle poll


def test_the_clientapp_launcher_runs_flower_s_clientapp_without_the_supernode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the SuperExec finds as ``flwr-clientapp`` first on PATH: Flower's own command line, with the
    SuperNode's packages (FastAPI app, SQL stores) not imported, nor the model code by our ClientApp module."""
    import os
    import shutil
    import subprocess

    from identifier.federated.supernode import install_launcher

    monkeypatch.setenv("PATH", os.environ["PATH"])  # restored after the test
    assert install_launcher(tmp_path / "bin")
    assert shutil.which("flwr-clientapp") == str(tmp_path / "bin" / "flwr-clientapp")
    usage = subprocess.run(
        ["flwr-clientapp", "--help"], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout
    assert "--runtime-api-address" in usage  # Flower's parser
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: print(sorted(m for m in sys.modules if m.startswith(('flwr.supernode.cli.', "
        "'sqlalchemy', 'identifier.federated.home_client', 'torch')))))\n"
        "import identifier.federated.client_app\n"  # what every ClientApp process loads, SecAgg+ stage or not
        "from identifier.federated.clientapp_process import main\n"
        "sys.argv = ['flwr-clientapp', '--help']\n"
        "main()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=processes.PACKAGE_ROOT
    ).stdout
    assert out.strip().splitlines()[-1] == "['flwr.supernode.cli.flwr_clientapp']"


def test_node_key_is_an_openssh_p384_pair_with_a_private_file(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    public = processes.generate_node_key(tmp_path / "node_key")
    assert (tmp_path / "node_key").stat().st_mode & 0o777 == 0o600
    key = load_ssh_public_key(public.read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    assert load_ssh_private_key((tmp_path / "node_key").read_bytes(), None).public_key() == key


def _federation_parser() -> argparse.ArgumentParser:
    from gateway.commands import federation

    parser = Parser()
    federation.add_commands(parser.add_subparsers(dest="command"))
    return parser


def test_keygen_keeps_an_existing_key_unless_forced_and_names_the_file(tmp_path: Path) -> None:
    parser = _federation_parser()
    key = tmp_path / "node_key"
    args = parser.parse_args(["federation", "keygen", "--out", str(key)])
    assert args.func(args) == 0
    registered = key.read_bytes(), (tmp_path / "node_key.pub").read_bytes()
    with pytest.raises(SystemExit, match=f"{key} already exists; give --force"):
        args.func(args)
    assert (key.read_bytes(), (tmp_path / "node_key.pub").read_bytes()) == registered
    forced = parser.parse_args(["federation", "keygen", "--out", str(key), "--force"])
    assert forced.func(forced) == 0
    assert key.read_bytes() != registered[0] and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node_key", "node_key.pub"]  # no temporary file left


def test_keygen_into_a_directory_or_an_unwritable_place_is_a_clear_error(tmp_path: Path) -> None:
    parser = _federation_parser()
    args = parser.parse_args(["federation", "keygen", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=f"{tmp_path} is a directory; --out names the private key file"):
        args.func(args)
    (tmp_path / "file").write_text("")
    args = parser.parse_args(["federation", "keygen", "--out", str(tmp_path / "file" / "node_key")])
    with pytest.raises(SystemExit, match="cannot write .*file.*: Not a directory"):
        args.func(args)


def test_keygen_on_a_build_without_federation_says_so_in_one_line(tmp_path: Path) -> None:
    # A package built without the federation extra has no cryptography: stand in for it by making the import
    # fail the way a missing package does, in a process of its own.
    code = (
        "import sys; sys.modules['cryptography'] = None; from gateway.cli import main; "
        f"sys.exit(main(['federation', 'keygen', '--out', {str(tmp_path / 'node_key')!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert (done.returncode, done.stderr) == (
        1, "iotgw federation: this iotgw was built without federation support (no cryptography package)\n")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("port", ["0", "99999", "-1", "http"])
@pytest.mark.parametrize("action", ["server", "join"])
def test_a_port_out_of_range_is_refused_by_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, action: str, port: str
) -> None:
    extra = ["--state-dir", str(tmp_path)] if action == "server" else ["--superlink", "127.0.0.1:9092"]
    with pytest.raises(SystemExit) as refused:
        _federation_parser().parse_args(["federation", action, *extra, "--insecure", "--port", port])
    assert refused.value.code == 2
    assert "argument --port:" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--rounds", "0"), ("--rounds", "-1"), ("--min-nodes", "1"), ("--min-nodes", "0"), ("--nodes-wait", "-5"),
     ("--nodes-wait", "nan"), ("--stage-timeout", "0"), ("--clip-norm", "inf"), ("--clip-norm", "0"),
     ("--dp-noise", "-1"), ("--dp-noise", "nan"), ("--epochs", "0"), ("--lr", "-0.01"), ("--lr", "nan")],
)
def test_a_server_setting_out_of_range_is_a_usage_error_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture, flag: str, value: str
) -> None:
    # these went into the run config as given: a run of 0 rounds, a NaN clip norm or a negative noise multiplier
    # failed (or did nothing) only after the SuperLink had started
    with pytest.raises(SystemExit) as refused:
        _federation_parser().parse_args(["federation", "server", "--state-dir", str(tmp_path), "--insecure",
                                         f"{flag}={value}"])
    assert refused.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("poll", ["0", "-1", "nan"])
def test_a_join_poll_that_is_not_a_finite_number_of_seconds_above_0_is_a_usage_error(poll: str, capsys) -> None:
    with pytest.raises(SystemExit) as refused:
        _federation_parser().parse_args(["federation", "join", "--superlink", "127.0.0.1:9092", "--insecure",
                                         f"--poll={poll}"])
    assert refused.value.code == 2 and "argument --poll:" in capsys.readouterr().err


def test_cli_requires_tls_or_an_explicit_insecure(tmp_path: Path) -> None:
    parser = _federation_parser()
    args = parser.parse_args(["federation", "server", "--state-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--tls-ca, --tls-cert, --tls-key or --insecure"):
        args.func(args)
    args = parser.parse_args(
        ["federation", "server", "--state-dir", str(tmp_path), "--insecure", "--authorized-key", "k.pub"]
    )
    with pytest.raises(SystemExit, match="needs TLS"):
        args.func(args)


@pytest.mark.parametrize("window", ["-5", "0", "nan", "inf"])
def test_a_join_window_that_is_not_a_finite_number_of_seconds_above_0_is_a_usage_error(window: str, capsys) -> None:
    # a NaN window ended the join at once with exit 0, an infinite one never
    from gateway import cli

    with pytest.raises(SystemExit) as usage:
        cli.main(["federation", "join", "--superlink", "127.0.0.1:9092", "--insecure", f"--window={window}"])
    assert usage.value.code == 2 and "argument --window: " in capsys.readouterr().err


@needs_data
def test_a_rollback_run_while_an_install_writes_its_bundle_loses_neither(
    tmp_path: Path, shipped: Bundle, name_sets: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``iotgw federation rollback`` in a shell while the nightly join installs a model: the rollback's clean-up
    deleted the bundle the install had just written and not yet linked, and the install then pointed ``current``
    at nothing, so the gateway fell back to the shipped model while the join reported the new one installed."""
    homes, _ = homedata.split_homes(name_sets, 3, seed=2)
    data = model.samples(shipped, homes[0])
    params = model.params_of(shipped)
    schema, sha = model.schema(shipped), updates.digest(params)
    state = tmp_path / "state"
    store = updates.ModelStore(state / "federation" / "model")
    v1 = store.install(params, sha, schema, data, {"round": 1, "run_id": 1}).version
    config = tmp_path / "iotgw.toml"
    config.write_text(f'[gateway]\nstate_dir = "{state}"\n')
    write = updates.ModelStore._write
    rollbacks = []

    def write_then_roll_back(self: updates.ModelStore, bundle: Bundle) -> Path:
        written = write(self, bundle)
        # the install is paused here, its bundle written and not linked yet; the owner's rollback runs now
        rollbacks.append(subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "federation", "rollback", "--config", str(config)],
            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
        # it runs to its end, or until it waits for a lock (a "->" line of /proc/locks): then the install goes on
        deadline = time.monotonic() + 60
        while rollbacks[-1].poll() is None and not _waits_for_a_lock(rollbacks[-1].pid):
            assert time.monotonic() < deadline, "the rollback neither ended nor waited"
            time.sleep(0.05)
        return written

    monkeypatch.setattr(updates.ModelStore, "_write", write_then_roll_back)
    result = store.install(params, sha, schema, data, {"round": 2, "run_id": 1})
    (rollback,) = rollbacks
    out, err = rollback.communicate(timeout=60)
    assert rollback.returncode == 0, err
    assert result.installed and result.version != v1
    # one after the other: the rollback to the shipped model, then the install over it; or the install, then the
    # rollback to v1. Never a link to a deleted bundle.
    installed = store.installed().version
    previous = Bundle.load(store.previous_dir).version if store.previous_dir.exists() else None
    assert _daemon_model(state) == installed
    assert (installed, previous) in {(result.version, shipped.version), (v1, None)}
    assert "reinstalled" in out


def _waits_for_a_lock(pid: int) -> bool:
    """``pid`` is blocked on a file lock another process holds (a "->" entry of /proc/locks)."""
    return any(line.split()[1] == "->" and line.split()[5] == str(pid)
               for line in Path("/proc/locks").read_text().splitlines())


def _installed_twice(state: Path, shipped: Bundle) -> Path:
    """A gateway state directory whose federation installed two models (the layout ModelStore.install writes),
    and a config naming it."""
    for link, version in (("previous", "fed-1-r3-00000001"), ("current", "fed-2-r3-00000002")):
        replace(shipped, version=version).save(state / "federation" / "model" / f"bundle-{version}")
        os.symlink(f"bundle-{version}", state / "federation" / "model" / link)
    config = state.parent / f"{state.name}.toml"
    config.write_text(f'[gateway]\nstate_dir = "{state}"\n')
    return config


def _current(state: Path) -> str:
    return Bundle.load(state / "federation" / "model" / "current").version


def test_rollback_takes_config_and_db_before_or_after_the_action_alike(tmp_path: Path, shipped: Bundle) -> None:
    # They went after the ACTION only (before it: "unrecognized arguments") while `iotgw policy` took them
    # before: a user had to know which.
    from gateway.alerts.outbox import recent_alerts
    from gateway.store.db import Store

    parser = _federation_parser()
    before, after = _installed_twice(tmp_path / "before", shipped), _installed_twice(tmp_path / "after", shipped)
    url = f"sqlite:///{tmp_path / 'alerts.sqlite'}"
    for argv in (["federation", "--config", str(before), "--db", url, "rollback"],
                 ["federation", "rollback", "--config", str(after), "--db", url]):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
    assert _current(tmp_path / "before") == _current(tmp_path / "after") == "fed-1-r3-00000001"
    store = Store(url)
    try:  # both rollbacks said so in the database given, not in the state directories' default one
        assert [a.data["version"] for a in recent_alerts(store)] == ["fed-1-r3-00000001"] * 2
    finally:
        store.close()
    assert not list(tmp_path.glob("*/iotgw.sqlite"))


def test_rollback_config_given_before_and_after_the_action_the_later_one_wins(
    tmp_path: Path, shipped: Bundle
) -> None:
    # as a flag given twice on one level does; and the ACTION's own parser must not put back the default
    first, later = _installed_twice(tmp_path / "first", shipped), _installed_twice(tmp_path / "later", shipped)
    args = _federation_parser().parse_args(["federation", "--config", str(first), "rollback", "--config", str(later)])
    assert args.func(args) == 0
    assert (_current(tmp_path / "first"), _current(tmp_path / "later")) == ("fed-2-r3-00000002", "fed-1-r3-00000001")


@pytest.mark.parametrize("flag", ["--config", "--db"])
def test_server_and_keygen_refuse_config_and_db_they_would_not_read(
    tmp_path: Path, capsys: pytest.CaptureFixture, flag: str
) -> None:
    # taken before the ACTION for join and rollback, so `federation --db URL keygen` parses; run anyway, the
    # flag would look used
    parser = _federation_parser()
    value = str(tmp_path / "iotgw.toml") if flag == "--config" else f"sqlite:///{tmp_path / 'x.sqlite'}"
    for argv in (["keygen", "--out", str(tmp_path / "node_key")],
                 ["server", "--state-dir", str(tmp_path / "fleet"), "--insecure"]):
        args = parser.parse_args(["federation", flag, value, *argv])
        assert args.func(args) == 2
        assert capsys.readouterr().err == (
            f"iotgw federation {argv[0]} reads no gateway state: {flag} is for join and rollback\n")
    assert not list(tmp_path.iterdir())
