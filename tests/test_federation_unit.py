"""The federation library without Flower's processes: clipping, digests, install, home splits, CLI."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from identifier.federated import homedata, model, processes, updates
from tests.shared_data import DOMAINS, needs_data


def test_clip_bounds_the_norm_and_keeps_small_updates() -> None:
    rng = np.random.default_rng(0)
    big = [rng.normal(0, 3, (4, 5)).astype(np.float32), rng.normal(0, 3, 7).astype(np.float32)]
    clipped = updates.clip(big, 1.0)
    assert updates.l2_norm(clipped) == pytest.approx(1.0, rel=1e-5)
    assert np.allclose(clipped[0] / big[0], clipped[1][0] / big[1][0])  # direction kept
    small = [a / 100 for a in clipped]
    assert all(np.array_equal(a, b) for a, b in zip(updates.clip(small, 1.0), small, strict=True))


def test_digest_follows_the_numbers_and_bytes_round_trip() -> None:
    params = model.init_params(16, 3)
    assert updates.digest(updates.from_bytes(updates.to_bytes(params))) == updates.digest(params)
    params[0][0, 0] += 1e-6
    assert updates.digest(params) != updates.digest(model.init_params(16, 3))


def test_published_model_is_checked_against_its_digest(tmp_path: Path) -> None:
    params = model.init_params(16, 3)
    sha = updates.publish(params, tmp_path, {"round": 1})
    again, manifest = updates.read_published(tmp_path)
    assert manifest["sha256"] == sha and updates.digest(again) == sha
    tampered = [a.copy() for a in params]
    tampered[-1][0] = 5.0
    (tmp_path / "global.npz").write_bytes(updates.to_bytes(tampered))
    with pytest.raises(ValueError, match="does not match"):
        updates.read_published(tmp_path)


@needs_data
def test_install_checks_digest_and_regression_and_rolls_back(tmp_path: Path) -> None:
    homes, _ = homedata.split_homes(DOMAINS, 3, seed=2)
    home = homes[0]
    store = updates.ModelStore(tmp_path / "model")
    fresh = model.init_params(homedata.N_FEATURES, len(home.classes))
    good = model.local_train(fresh, home, epochs=30)
    assert not store.install(good, "0" * 64, home).installed  # wrong digest
    assert store.current() is None
    first = store.install(fresh, updates.digest(fresh), home)
    assert first.installed
    second = store.install(good, updates.digest(good), home)
    assert second.installed and second.accuracy_new > second.accuracy_current
    worse = store.install(fresh, updates.digest(fresh), home)  # regression on this home's devices
    assert not worse.installed and "worse" in worse.reason
    assert updates.digest(store.current()) == updates.digest(good)
    assert store.rollback() and updates.digest(store.current()) == updates.digest(fresh)
    assert not store.rollback()


@needs_data
def test_dirichlet_homes_differ_and_hold_out_one_device_per_vendor() -> None:
    homes, test = homedata.split_homes(DOMAINS, 5, alpha=0.3, seed=0)
    assert all(len(h) > 0 for h in homes)
    vendor_sets = [set(h.y.tolist()) for h in homes]
    assert len(set(test.y.tolist())) == len(test.classes)  # every vendor has a held-out device
    assert max(len(v) for v in vendor_sets) < len(test.classes)  # no home sees every vendor
    assert len({frozenset(v) for v in vendor_sets}) == 5
    assert sum(len(h) for h in homes) + len(test) > 0 and test.x.shape[1] == homedata.N_FEATURES


def test_bad_home_dataset_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "confirmed.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="confirmed.npz"):
        homedata.load(bad)


def test_every_flower_process_gets_the_safe_environment(tmp_path: Path) -> None:
    env = processes.flower_env(tmp_path, base={"PATH": "/usr/bin"})
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_HOME"] == str(tmp_path / "flwr")
    assert str(processes.PACKAGE_ROOT) in env["PYTHONPATH"].split(":")
    cmd = processes.superlink_cmd("127.0.0.1", 9092, tmp_path / "db", None, node_auth=False)
    assert "--disable-runtime-dependency-installation" in cmd


def test_node_key_is_an_openssh_p384_pair_with_a_private_file(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    public = processes.generate_node_key(tmp_path / "node_key")
    assert (tmp_path / "node_key").stat().st_mode & 0o777 == 0o600
    key = load_ssh_public_key(public.read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    assert load_ssh_private_key((tmp_path / "node_key").read_bytes(), None).public_key() == key


def test_cli_requires_tls_or_an_explicit_insecure(tmp_path: Path) -> None:
    from gateway.commands import federation

    parser = argparse.ArgumentParser()
    federation.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["federation", "server", "--state-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--tls-ca, --tls-cert, --tls-key or --insecure"):
        args.func(args)
    args = parser.parse_args(
        ["federation", "server", "--state-dir", str(tmp_path), "--insecure", "--authorized-key", "k.pub"]
    )
    with pytest.raises(SystemExit, match="needs TLS"):
        args.func(args)
