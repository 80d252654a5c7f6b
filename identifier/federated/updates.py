"""What crosses the wire and what a gateway installs: clipped deltas, digests, the published global model.

An update is ``local - global``, clipped to an L2 norm (bounds any one home's influence and keeps every value
inside SecAgg+'s quantisation range), with optional Gaussian noise for differential privacy. A global model
is a canonical ``.npz`` whose SHA-256 is its identity, published beside the model bundle it makes; a gateway
installs it (as a bundle) only if the digest checks, its weights stay finite in the bundle's float16, and it does
no worse on the home's own confirmed devices, and keeps the previous bundle for rollback.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from identifier.bundle import Bundle, BundleError
from identifier.federated import model
from identifier.federated.model import Params
from identifier.train import Samples


def delta(new: Params, old: Params) -> Params:
    return [np.asarray(n, np.float32) - np.asarray(o, np.float32) for n, o in zip(new, old, strict=True)]


def apply(params: Params, update: Params) -> Params:
    return [
        np.asarray(p, np.float32) + np.asarray(u, np.float32) for p, u in zip(params, update, strict=True)
    ]


def l2_norm(arrays: Params) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)))


def clip(update: Params, max_norm: float) -> Params:
    """``update`` scaled down so its global L2 norm is at most ``max_norm``."""
    norm = l2_norm(update)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return [(a * scale).astype(np.float32) for a in update]


def update_bound(clip_norm: float, noise_std: float, size: int) -> float:
    """The largest L2 norm an honest update (or a mean of them) can have: the clip norm, 1% for SecAgg+'s
    quantisation, and the noise's norm (about ``std * sqrt(size)``) with six standard deviations of room."""
    return clip_norm * 1.01 + noise_std * (float(np.sqrt(size)) + 6.0)


def check_update(update: Params, like: Params, max_norm: float) -> None:
    """Raise ``ValueError`` unless ``update`` fits ``like`` (same number of arrays, same shapes: numpy would
    broadcast a wrong one silently), is finite, and its norm is within ``max_norm``."""
    if len(update) != len(like):
        raise ValueError(f"update has {len(update)} arrays, the model {len(like)}")
    for i, (u, p) in enumerate(zip(update, like, strict=True)):
        u = np.asarray(u)
        if u.shape != np.shape(p):
            raise ValueError(f"update array {i} has shape {u.shape}, the model {np.shape(p)}")
        if u.dtype.kind != "f" or not np.all(np.isfinite(u)):
            raise ValueError(f"update array {i} is not finite floating point")
    norm = l2_norm(update)
    if norm > max_norm:
        raise ValueError(f"update norm {norm:.3g} exceeds the bound {max_norm:.3g}")


def add_noise(update: Params, std: float, rng: np.random.Generator) -> Params:
    """Gaussian noise of ``std`` per coordinate (local DP; ``std`` = noise multiplier x clip norm)."""
    if std <= 0:
        return update
    return [(a + rng.normal(0.0, std, a.shape)).astype(np.float32) for a in update]


def to_bytes(params: Params) -> bytes:
    """Canonical bytes of a parameter list: same arrays, same bytes, same digest."""
    buf = io.BytesIO()
    np.savez(buf, **{f"p{i:03d}": np.ascontiguousarray(a, np.float32) for i, a in enumerate(params)})
    return buf.getvalue()


def from_bytes(data: bytes) -> Params:
    """The arrays of ``to_bytes``; raises ``ValueError`` for anything else (numpy and zipfile raise several
    types on a damaged file)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return [z[k] for k in sorted(z.files)]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"not a parameter file: {exc}") from exc


def digest(params: Params) -> str:
    """SHA-256 of the parameters' canonical bytes (their numbers, not how they were serialised)."""
    return hashlib.sha256(b"".join(np.ascontiguousarray(a, np.float32).tobytes() for a in params)).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def publish(params: Params, out_dir: Path, info: dict, base: Bundle) -> str:
    """Write the global model, its manifest (digest, schema, version, round, ...) and the bundle it makes
    (``out_dir/bundle``: ``base`` with these weights) to ``out_dir``; returns the digest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sha = digest(params)
    manifest = {**info, "sha256": sha, "schema": model.schema(base), "version": version_of(info, sha)}
    model.with_params(base, params, manifest["version"], manifest).save(out_dir / "bundle")
    _write_atomic(out_dir / "global.npz", to_bytes(params))
    _write_atomic(out_dir / "global.json", json.dumps(manifest, indent=2).encode())
    return sha


def version_of(info: dict, sha: str) -> str:
    """A federated bundle's version: run, round and digest prefix (``fed-<run>-r<round>-<sha8>``)."""
    return f"fed-{info.get('run_id', 0)}-r{info.get('round', 0)}-{sha[:8]}"


def read_published(out_dir: Path) -> tuple[Params, dict]:
    """The published model and its manifest; raises ``ValueError`` if the model does not match its digest or
    the manifest is not one (``FileNotFoundError`` if either is missing)."""
    params = from_bytes((out_dir / "global.npz").read_bytes())
    try:
        manifest = json.loads((out_dir / "global.json").read_text(encoding="utf-8"))
    except ValueError as exc:  # bad JSON or UTF-8: their messages name no file
        raise ValueError(f"{out_dir}/global.json: not a manifest: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), str):
        raise ValueError(f"{out_dir}/global.json: not a manifest (no sha256 string)")
    if digest(params) != manifest["sha256"]:
        raise ValueError(f"{out_dir}/global.npz does not match the digest in global.json")
    return params, manifest


@dataclass(frozen=True)
class InstallResult:
    installed: bool
    reason: str
    accuracy_new: float
    accuracy_current: float
    version: str = ""
    previous_version: str | None = None


class ModelStore:
    """A gateway's installed bundle (``current/``) and the one before it (``previous/``).

    Before any federated install the installed model is ``default`` (the gateway's configured bundle, else
    the shipped one). The gateway's daemon runs ``current/`` once it holds a bundle (``gateway.config``).
    """

    def __init__(self, root: Path, default: Path | None = None) -> None:
        self.root = root
        self.default = default
        self.current_dir = root / "current"
        self.previous_dir = root / "previous"

    def installed(self) -> Bundle:
        if (self.current_dir / "bundle.json").exists():
            return Bundle.load(self.current_dir)
        # a gateway configured to run ``current/`` itself runs the shipped bundle until the first install
        default = self.default if self.default and self.default.resolve() != self.current_dir.resolve() else None
        return Bundle.load(default)

    def install(
        self, params: Params, expected_digest: str, expected_schema: str, data: Samples, info: dict
    ) -> InstallResult:
        """Install ``params`` (as the installed bundle with these weights) if their digest is
        ``expected_digest``, they fit this home's bundle (``expected_schema``), they stay finite as the bundle
        stores them (float16) and, so stored, they do no worse on ``data``, this home's confirmed devices (which
        must hold a label the model knows: without one there is nothing to compare on)."""
        current = self.installed()
        if digest(params) != expected_digest:
            return InstallResult(False, "digest mismatch", 0.0, 0.0, previous_version=current.version)
        if model.schema(current) != expected_schema:
            return InstallResult(
                False, "other features or label sets than this home's model", 0.0, 0.0,
                previous_version=current.version,
            )
        if not model.has_labels(data):  # both would score 0: any model, however broken, would be "no worse"
            return InstallResult(
                False, "no confirmed devices with labels the model knows: nothing to check it on", 0.0, 0.0,
                previous_version=current.version,
            )
        # A bundle stores float16 (``Bundle.save``): check the numbers the daemon will run, not the ones sent. A
        # value past float16's range becomes inf there, and one inf in the first layer makes every answer NaN.
        with np.errstate(over="ignore"):
            params = [np.asarray(p, np.float32).astype(np.float16).astype(np.float32) for p in params]
        if not all(np.all(np.isfinite(p)) for p in params):
            return InstallResult(
                False, "weights not finite, or too large for a bundle", 0.0, 0.0, previous_version=current.version
            )
        acc_new = model.evaluate(current, params, data)["accuracy"]
        acc_cur = model.evaluate(current, model.params_of(current), data)["accuracy"]
        if acc_new < acc_cur:
            return InstallResult(
                False, "worse on this home's confirmed devices", acc_new, acc_cur,
                previous_version=current.version,
            )
        new = model.with_params(current, params, version_of(info, expected_digest), info)
        self.root.mkdir(parents=True, exist_ok=True)
        staged = new.save(self.root / "staged")
        shutil.rmtree(self.previous_dir, ignore_errors=True)
        if self.current_dir.exists():
            os.replace(self.current_dir, self.previous_dir)
        else:  # the first federated install: the default bundle becomes the one to roll back to
            current.save(self.previous_dir)
        os.replace(staged, self.current_dir)
        return InstallResult(True, "installed", acc_new, acc_cur, new.version, current.version)

    def rollback(self) -> tuple[str, str] | None:
        """Put the previous bundle back; returns (restored version, replaced version), None when there is none."""
        if not (self.previous_dir / "bundle.json").exists():
            return None
        try:
            replaced = Bundle.load(self.current_dir).version
            restored = Bundle.load(self.previous_dir).version
        except BundleError:
            return None
        shutil.rmtree(self.current_dir)
        os.replace(self.previous_dir, self.current_dir)
        return restored, replaced
