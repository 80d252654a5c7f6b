"""Hostile federation input, on the real code paths without Flower's processes: a malformed or oversized update
fails the round and leaves the global model as it was; a global model that does not match its digest, or is not
a model file at all, is refused. (Digest checks on install and publish are in test_federation_unit.py.)"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, ConfigRecord, Context, FitRes, RecordDict, Status, ndarrays_to_parameters
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key

from identifier.bundle import Bundle, BundleError
from identifier.dataset import domain_windows
from identifier.federated import homedata, model, updates
from identifier.federated.home_client import HomeClient
from identifier.federated.server_app import MaskedSumFedAvg, RoundGuard, RunReport, RunSettings, initial_params
from identifier.inference import NumpyNet
from tests.shared_data import DOMAINS, needs_data

CLIP = 1.0
BASE = Bundle.load()  # the shipped bundle: its weights are what homes and server exchange


def settings(tmp_path: Path, dp_noise: float = 0.0) -> RunSettings:
    return RunSettings(num_rounds=1, stage_timeout=10, min_nodes=2, nodes_wait=1, share_fraction=1.0,
                       threshold_fraction=0.5, clip_norm=CLIP, dp_noise=dp_noise, epochs=1, lr=0.1, max_weight=100,
                       out_dir=tmp_path / "out", bundle=None)


def honest(params: model.Params, seed: int, noise_std: float = 0.0) -> model.Params:
    rng = np.random.default_rng(seed)
    delta = updates.clip([rng.normal(0, 1, a.shape).astype(np.float32) for a in params], CLIP)
    return updates.add_noise(delta, noise_std, rng)


def bad_updates(params: model.Params) -> dict[str, model.Params]:
    good = honest(params, 0)
    nan = [a.copy() for a in good]
    nan[0].flat[0] = np.nan
    return {
        "one array missing": good[:-1],
        "broadcastable wrong shape": [good[0][:1], *good[1:]],  # numpy would add it to every row silently
        "not finite": nan,
        "integers": [a.astype(np.int64) for a in good],
        "oversized (clipping skipped)": [a * 50 for a in good],
    }


def aggregate(strategy: MaskedSumFedAvg, mean_delta: model.Params) -> object:
    """What SecAgg+ hands the strategy: every home's result carries the same unmasked mean."""
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(mean_delta), 10, {})
    return strategy.aggregate_fit(1, [(None, res), (None, res)], [])


def test_honest_updates_pass_with_and_without_noise() -> None:
    params = model.params_of(BASE)
    size = sum(a.size for a in params)
    for seed in range(20):
        updates.check_update(honest(params, seed), params, updates.update_bound(CLIP, 0.0, size))
        noisy = honest(params, seed, noise_std=0.5 * CLIP)
        updates.check_update(noisy, params, updates.update_bound(CLIP, 0.5 * CLIP, size))


@pytest.mark.parametrize("kind", list(bad_updates(model.params_of(BASE))))
def test_a_bad_update_is_rejected_with_its_reason(kind: str) -> None:
    params = model.params_of(BASE)
    bound = updates.update_bound(CLIP, 0.0, sum(a.size for a in params))
    with pytest.raises(ValueError, match="arrays|shape|finite|exceeds"):
        updates.check_update(bad_updates(params)[kind], params, bound)


def test_a_bad_aggregate_fails_the_round_and_keeps_the_model(tmp_path: Path) -> None:
    initial = model.params_of(BASE)
    s = settings(tmp_path)
    for kind, mean in bad_updates(initial).items():
        strategy = MaskedSumFedAvg(s, BASE, initial)
        report = RunReport(s.out_dir, run_id=1)
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 1})
        RoundGuard(lambda grid, ctx, m=mean, st=strategy: aggregate(st, m), strategy, report)(None, context)
        assert [r.status for r in report.rounds] == ["failed"], kind
        assert "ValueError" in report.rounds[0].error, kind
        assert updates.digest(strategy.global_params) == updates.digest(initial), kind
        assert not (s.out_dir / "global.npz").exists(), kind  # nothing published
    # The same path with an honest mean aggregates and publishes.
    strategy = MaskedSumFedAvg(s, BASE, initial)
    report = RunReport(s.out_dir, run_id=2)
    context = Context(run_id=2, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 1})
    mean = honest(initial, 1)
    RoundGuard(lambda grid, ctx: aggregate(strategy, mean), strategy, report)(None, context)
    assert [r.status for r in report.rounds] == ["ok"]
    published, _ = updates.read_published(s.out_dir)
    assert updates.digest(published) == updates.digest(updates.apply(initial, mean))


def test_a_global_model_with_a_bad_digest_is_refused_before_training_or_install(tmp_path: Path) -> None:
    params = model.params_of(BASE)
    announced = updates.digest(params)
    tampered = [a.copy() for a in params]
    tampered[0].flat[0] += 0.5
    client = HomeClient(tmp_path / "no-data-needed.jsonl", tmp_path / "state")
    with pytest.raises(ValueError, match="does not match the digest"):
        client.fit(tampered, {"sha256": announced, "schema": model.schema(BASE), "round": 1})
    store = updates.ModelStore(tmp_path / "model")
    # Refused before the home's data is looked at (there is none here).
    result = store.install(tampered, announced, model.schema(BASE), data=None, info={"round": 1})
    assert (result.installed, result.reason) == (False, "digest mismatch")
    assert not store.current_dir.exists() and not (tmp_path / "state" / "contributions").exists()


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04" + b"\x00" * 40,
                                     b"\x93NUMPY\x01\x00" + b"\xff" * 20])
def test_a_damaged_published_model_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    updates.publish(model.params_of(BASE), tmp_path, {"round": 1}, BASE)
    (tmp_path / "global.npz").write_bytes(content)
    with pytest.raises(ValueError, match="not a parameter file"):
        updates.read_published(tmp_path)


@pytest.mark.parametrize("manifest", [b"{}", b"[1]", b'{"sha256": 5}', b"{not json", b"\xff\xfe"])
def test_a_damaged_published_manifest_is_a_clear_error(tmp_path: Path, manifest: bytes) -> None:
    """The ServerApp resumes from the published model: a damaged global.json must name itself, not crash the
    run with a bare KeyError or TypeError."""
    updates.publish(model.params_of(BASE), tmp_path, {"round": 1}, BASE)
    (tmp_path / "global.json").write_bytes(manifest)
    with pytest.raises(ValueError, match="global.json: not a manifest"):
        updates.read_published(tmp_path)
    s = replace(settings(tmp_path), out_dir=tmp_path)
    with pytest.raises(ValueError, match="global.json: not a manifest"):
        initial_params(s, BASE)


def test_a_published_model_of_another_hidden_size_stops_the_resume_naming_global_json_and_the_shapes(
    tmp_path: Path,
) -> None:
    """A base bundle with a new hidden size but the same features and labels has the same schema: resuming from
    the old published model would send every home arrays its model does not have, and every round would fail."""
    from identifier.inference import HEADS
    from identifier.model import TrainConfig, init_weights

    updates.publish(model.params_of(BASE), tmp_path, {"round": 1, "run_id": 1}, BASE)
    sizes = tuple(len(BASE.labels[h]) for h in HEADS)
    wider = replace(BASE, version="wider", weights=init_weights(BASE.features.dim, sizes, 0, TrainConfig(hidden=96)))
    assert model.schema(wider) == model.schema(BASE)
    s = replace(settings(tmp_path), out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"global.json .*shapes .*\(2048, 64\).*wider has .*\(2048, 96\)"):
        initial_params(s, wider)
    assert updates.digest(initial_params(s, BASE)) == updates.digest(model.params_of(BASE))  # same shapes resume


def home_samples() -> object:
    """One home's confirmed devices (vendor name sets cut from the shared data) as the shipped model's samples."""
    homes, _ = homedata.split_homes(domain_windows(DOMAINS, {"camera", "plug", "hub", "sensor"}), 3, seed=2)
    return model.samples(BASE, homes[0])


@needs_data
def test_a_model_whose_weights_overflow_the_stored_bundle_is_refused(tmp_path: Path) -> None:
    """A weight past float16's range, in a feature bucket this home's devices never use, scores exactly as the
    current model here; but the bundle stores float16, so the installed net would hold inf and answer NaN."""
    data = home_samples()
    params = [a.copy() for a in model.params_of(BASE)]
    unused = int(np.flatnonzero(data.x.max(0) == 0)[0])
    params[model.keys(BASE).index("w1")][unused, 0] = 1e6
    assert model.evaluate(BASE, params, data)["accuracy"] == model.evaluate(BASE, model.params_of(BASE), data)[
        "accuracy"
    ]
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow is the point
        stored = model.with_params(BASE, params, "overflow", {}).save(tmp_path / "as-stored")
        as_stored = {k: v.astype(np.float16).astype(np.float32) for k, v in zip(model.keys(BASE), params, strict=True)}
        # what it would do, were it loaded
        assert np.isnan(NumpyNet({**BASE.weights, **as_stored}).probabilities(data.x[:1])[0]).all()
    with pytest.raises(BundleError, match="not a finite number"):  # and a bundle so saved no longer loads at all
        Bundle.load(stored)
    store = updates.ModelStore(tmp_path / "model")
    result = store.install(params, updates.digest(params), model.schema(BASE), data, {"round": 1, "run_id": 1})
    assert (result.installed, result.reason) == (False, "weights not finite, or too large for a bundle")
    assert not store.current_dir.exists() and store.installed().version == BASE.version


@needs_data
def test_a_home_whose_confirmed_devices_have_no_known_labels_installs_nothing(tmp_path: Path) -> None:
    """Owner labels outside the model's label sets leave no device to compare on: both models would score 0 and
    a model that knows nothing would pass as "no worse"."""
    homes, _ = homedata.split_homes(domain_windows(DOMAINS, {"camera", "plug", "hub", "sensor"}), 3, seed=2)
    unknown = [replace(w, manufacturer="NoSuchVendor", device_type="NoSuchType", category="nosuch") for w in homes[0]]
    data = model.samples(BASE, unknown)
    assert len(data.y) and not model.has_labels(data)
    blank = [np.zeros_like(a) for a in model.params_of(BASE)]
    store = updates.ModelStore(tmp_path / "model")
    result = store.install(blank, updates.digest(blank), model.schema(BASE), data, {"round": 1, "run_id": 1})
    assert not result.installed and "nothing to check it on" in result.reason
    assert not store.current_dir.exists() and store.installed().version == BASE.version


@needs_data
def test_the_digest_a_home_checks_covers_the_weights_it_installs_and_the_published_bundle(tmp_path: Path) -> None:
    """The server's aggregate is the model; a bundle stores float16. The digest a round announces, publishes and
    a home records must be the one of the weights the published bundle ships and the home installs."""
    homes, _ = homedata.split_homes(domain_windows(DOMAINS, {"camera", "plug", "hub", "sensor"}), 3, seed=2)
    homedata.save(homes[0], tmp_path / "confirmed.jsonl")
    data = model.samples(BASE, homes[0])
    initial = model.params_of(BASE)
    # a mean delta in a feature bucket these devices never use (so the home's check finds it no worse), with
    # digits float16 does not hold
    mean = [np.zeros_like(a) for a in initial]
    unused = int(np.flatnonzero(data.x.max(0) == 0)[0])
    w1 = mean[model.keys(BASE).index("w1")]
    w1[unused] = np.linspace(0.01, 0.02, w1.shape[1])
    s = settings(tmp_path)
    strategy = MaskedSumFedAvg(s, BASE, initial)
    report = RunReport(s.out_dir, run_id=3)
    context = Context(run_id=3, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 1})
    RoundGuard(lambda grid, ctx: aggregate(strategy, mean), strategy, report)(None, context)
    assert [r.status for r in report.rounds] == ["ok"]
    sent, manifest = updates.read_published(s.out_dir)
    # the server keeps the float32 sum, so updates finer than a float16 step still add up over rounds
    exact = updates.apply(initial, mean)
    assert all(np.array_equal(a, b) for a, b in zip(strategy.global_params, exact, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(sent, exact, strict=True))
    sha = manifest["sha256"]
    assert updates.digest(strategy.global_params) == sha  # what InstallStep sends with the model
    assert updates.digest(model.params_of(Bundle.load(s.out_dir / "bundle"))) == sha  # the published bundle
    # the home's own install path, as Flower's evaluate message reaches it
    home = HomeClient(tmp_path / "confirmed.jsonl", tmp_path / "state")
    _, _, result = home.evaluate(sent, {"round": 1, "run-id": 3, "sha256": sha, "schema": manifest["schema"]})
    assert result == {"installed": True, "reason": "installed"}
    installed = home.store.installed()
    assert installed.metrics["federated"]["sha256"] == sha == updates.digest(model.params_of(installed))
