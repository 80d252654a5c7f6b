"""What crosses the wire and what a gateway installs: clipped deltas, digests, the published global model.

An update is ``local - global``, clipped to an L2 norm (bounds any one home's influence and keeps every value
inside SecAgg+'s quantisation range), with optional Gaussian noise for differential privacy. A global model
is a canonical ``.npz`` whose SHA-256 is its identity; a gateway installs one only if the digest checks and
it does no worse on the home's own confirmed devices, and keeps the previous one for rollback.
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

from identifier.federated.model import Dataset, Params, evaluate


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


def publish(params: Params, out_dir: Path, info: dict) -> str:
    """Write the global model and its manifest (digest, round, ...) to ``out_dir``; returns the digest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sha = digest(params)
    _write_atomic(out_dir / "global.npz", to_bytes(params))
    _write_atomic(out_dir / "global.json", json.dumps({**info, "sha256": sha}, indent=2).encode())
    return sha


def read_published(out_dir: Path) -> tuple[Params, dict]:
    """The published model and its manifest; raises ``ValueError`` if the model does not match its digest."""
    params = from_bytes((out_dir / "global.npz").read_bytes())
    manifest = json.loads((out_dir / "global.json").read_text())
    if digest(params) != manifest["sha256"]:
        raise ValueError(f"{out_dir}/global.npz does not match the digest in global.json")
    return params, manifest


@dataclass(frozen=True)
class InstallResult:
    installed: bool
    reason: str
    accuracy_new: float
    accuracy_current: float


class ModelStore:
    """A gateway's installed model (``current.npz``) and the one before it (``previous.npz``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.current_path = root / "current.npz"
        self.previous_path = root / "previous.npz"

    def current(self) -> Params | None:
        return from_bytes(self.current_path.read_bytes()) if self.current_path.exists() else None

    def install(self, params: Params, expected_digest: str, dataset: Dataset) -> InstallResult:
        """Install ``params`` if their digest is ``expected_digest`` and they do no worse on ``dataset``."""
        if digest(params) != expected_digest:
            return InstallResult(False, "digest mismatch", 0.0, 0.0)
        current = self.current()
        acc_new = evaluate(params, dataset)["accuracy"]
        acc_cur = evaluate(current, dataset)["accuracy"] if current is not None else 0.0
        if current is not None and acc_new < acc_cur:
            return InstallResult(False, "worse on this home's confirmed devices", acc_new, acc_cur)
        self.root.mkdir(parents=True, exist_ok=True)
        if self.current_path.exists():
            shutil.copyfile(self.current_path, self.previous_path)
        _write_atomic(self.current_path, to_bytes(params))
        return InstallResult(True, "installed", acc_new, acc_cur)

    def rollback(self) -> bool:
        """Put the previous model back; False when there is none."""
        if not self.previous_path.exists():
            return False
        os.replace(self.previous_path, self.current_path)
        return True
