"""What crosses the wire and what a gateway installs: clipped deltas, digests, the published global model.

An update is ``local - global``, clipped to an L2 norm (bounds any one home's influence and keeps every value
inside SecAgg+'s quantisation range), with optional Gaussian noise for differential privacy. A global model
is a canonical ``.npz`` whose SHA-256 is its identity, published beside the model bundle it makes; a gateway
installs it (as a bundle) only if the digest checks, its weights stay finite in the bundle's float16, and it does
no worse on the home's own confirmed devices, and keeps the previous bundle for rollback.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import secrets
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from identifier.atomicfile import sync_dir, write_whole
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


def as_stored(params: Params) -> Params:
    """``params`` as a bundle stores and the daemon runs them: rounded to float16 (``Bundle.save``), in float32.
    A value past float16's range becomes inf."""
    with np.errstate(over="ignore"):
        return [np.asarray(p, np.float32).astype(np.float16).astype(np.float32) for p in params]


def digest(params: Params) -> str:
    """SHA-256 of the parameters ``as_stored`` (their numbers as a bundle holds them, in float32 bytes): one digest
    for the float32 model the server keeps and sends, the bundle it publishes and the bundle a home installs."""
    stored = as_stored(params)
    return hashlib.sha256(b"".join(np.ascontiguousarray(a, np.float32).tobytes() for a in stored)).hexdigest()


# A publication: ``global.npz``, ``global.json`` and ``bundle/`` in ``releases/<version>-<random>/``, made
# current by one rename of the ``published`` symlink; the top-level names are links through it.
PUBLISHED = ("global.npz", "global.json", "bundle")


def publish(params: Params, out_dir: Path, info: dict, base: Bundle) -> str:
    """Write the global model, its manifest (digest, schema, version, round, ...) and the bundle it makes
    (``out_dir/bundle``: ``base`` with these weights) to ``out_dir``; returns the digest, which covers the
    bundle's float16 weights as well as ``global.npz``'s float32 ones (``digest``).

    The three change together: they are written and fsynced in a new directory, which one rename(2) of the
    ``published`` link makes current, so a reader (and a resume after a power cut) sees a matched set."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sha = digest(params)
    manifest = {**info, "sha256": sha, "schema": model.schema(base), "version": version_of(info, sha)}
    _collect_releases(out_dir)
    release = out_dir / "releases" / f"{manifest['version']}-{secrets.token_hex(4)}"
    model.with_params(base, params, manifest["version"], manifest).save(release / "bundle")
    write_whole(release / "global.npz", to_bytes(params))
    write_whole(release / "global.json", json.dumps(manifest, indent=2).encode("utf-8"))
    sync_dir(release.parent)  # each file and its directory are synced by write_whole; the release's own name here
    _relink(out_dir / "published", Path("releases") / release.name)
    for name in PUBLISHED:
        if not (out_dir / name).is_symlink():
            _relink(out_dir / name, Path("published") / name)
    _collect_releases(out_dir)
    return sha


def _relink(link: Path, target: Path) -> None:
    """``link`` made a symlink to ``target`` by one rename(2) (over a file or a link, not a directory)."""
    tmp = link.with_name(f".{link.name}-{secrets.token_hex(4)}.tmp")
    os.symlink(target, tmp)
    os.replace(tmp, link)
    sync_dir(link.parent)


def _collect_releases(out_dir: Path) -> None:
    """Remove releases the ``published`` link does not name (written by a publish a power cut stopped, or
    superseded) and links a cut left half made. ``history/`` keeps every round's model."""
    releases = out_dir / "releases"
    named = Path(os.readlink(out_dir / "published")).name if (out_dir / "published").is_symlink() else None
    if releases.is_dir():
        for d in releases.iterdir():
            if d.name != named:
                shutil.rmtree(d, ignore_errors=True)
    for p in out_dir.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_symlink():
            p.unlink()


def version_of(info: dict, sha: str) -> str:
    """A federated bundle's version: run, round and digest prefix (``fed-<run>-r<round>-<sha8>``)."""
    return f"fed-{info.get('run_id', 0)}-r{info.get('round', 0)}-{sha[:8]}"


def read_published(out_dir: Path) -> tuple[Params, dict]:
    """The published model and its manifest; raises ``ValueError`` if the model does not match its digest or
    the manifest is not one (``FileNotFoundError`` if either is missing)."""
    # both files from the one publication the link names now, even if the server publishes meanwhile
    src = (out_dir / "published").resolve()
    params = from_bytes((src / "global.npz").read_bytes())
    try:
        manifest = json.loads((src / "global.json").read_text(encoding="utf-8"))
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
    """A gateway's installed bundle (``current``) and the one before it (``previous``).

    Before any federated install the installed model is ``default`` (the gateway's configured bundle, else
    the shipped one). The gateway's daemon runs ``current/`` once it holds a bundle (``gateway.config``).

    ``current`` and ``previous`` are symlinks to bundle directories beside them (``bundle-*``). A bundle is
    written and fsynced before a link is pointed at it, and a link is replaced by rename(2) of a new one, so a
    power cut leaves every link on a complete bundle, old or new, and never ``previous`` without ``current``.
    Installs and rollbacks take turns (a lock file in ``root``), whichever processes run them.
    """

    def __init__(self, root: Path, default: Path | None = None) -> None:
        self.root = root
        self.default = default
        self.current_dir = root / "current"
        self.previous_dir = root / "previous"

    def installed_dir(self) -> Path | None:
        """``current`` if it holds a bundle; None: the default is installed. Only looks, writes nothing: the
        daemon asks every second."""
        return self.current_dir if _holds_bundle(self.current_dir) else None

    def installed(self) -> Bundle:
        found = self.installed_dir()
        if found is not None:
            return Bundle.load(found)
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
        with self._turn():
            return self._install(params, expected_digest, expected_schema, data, info)

    def _install(
        self, params: Params, expected_digest: str, expected_schema: str, data: Samples, info: dict
    ) -> InstallResult:
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
        # Check the numbers the daemon will run: a bundle stores float16 (``Bundle.save``), where a value past
        # float16's range becomes inf, and one inf in the first layer makes every answer NaN.
        params = as_stored(params)
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
        self._collect()
        fresh = self._write(new)
        if self.installed_dir() is None:
            # The first federated install: ``current`` takes a copy of the default (the model the daemon runs)
            # before ``previous`` is pointed, so no cut leaves ``previous`` set while ``current`` holds nothing.
            self._point(self.current_dir, self._write(current))
        self._point(self.previous_dir, self.root / os.readlink(self.current_dir))
        self._point(self.current_dir, fresh)
        self._collect()
        return InstallResult(True, "installed", acc_new, acc_cur, new.version, current.version)

    def rollback(self) -> tuple[str, str] | None:
        """Put the previous bundle back; returns (restored version, replaced version), None when there is none."""
        if self.installed_dir() is None:
            return None
        with self._turn():
            return self._rollback()

    def _rollback(self) -> tuple[str, str] | None:
        if self.installed_dir() is None or not _holds_bundle(self.previous_dir):
            return None
        if self.previous_dir.resolve() == self.current_dir.resolve():  # an install cut off between its links
            return None
        try:
            replaced = Bundle.load(self.current_dir).version
            restored = Bundle.load(self.previous_dir).version
        except BundleError:
            return None
        self._point(self.current_dir, self.root / os.readlink(self.previous_dir))
        self.previous_dir.unlink()  # a cut before this: both name one bundle, nothing to roll back to
        sync_dir(self.root)
        self._collect()
        return restored, replaced

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """Hold the store's lock: the nightly join's install and the owner's ``iotgw federation rollback`` each
        clean up the bundles no link names, and the other's bundle, written but not linked yet, was one of them."""
        self.root.mkdir(parents=True, exist_ok=True)
        # Read-only is enough for flock: a lock file root made (a rollback run with sudo) still serves the service.
        fd = os.open(self.root / ".lock", os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, bundle: Bundle) -> Path:
        """``bundle`` saved (each file and the directory fsynced by ``Bundle.save``) in a new directory beside the
        links, whose name is fsynced too."""
        d = self.root / f"bundle-{secrets.token_hex(6)}"
        bundle.save(d)
        sync_dir(self.root)
        return d

    def _point(self, link: Path, target: Path) -> None:
        """Make ``link`` a relative symlink to ``target`` (in ``root``) by one rename: readers see the old or
        the new."""
        tmp = self.root / f".{link.name}-{secrets.token_hex(6)}.tmp"
        os.symlink(target.name, tmp)
        os.replace(tmp, link)
        sync_dir(self.root)

    def _collect(self) -> None:
        """Remove what an interrupted install or rollback left: bundles no link names and unused links."""
        if not self.root.is_dir():
            return
        named = {os.readlink(link) for link in (self.current_dir, self.previous_dir) if link.is_symlink()}
        for p in self.root.iterdir():
            if p.name.startswith("bundle-") and p.name not in named:
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(".") and p.name.endswith(".tmp") and p.is_symlink():
                p.unlink()


def _holds_bundle(d: Path) -> bool:
    """Both files of a bundle are there (a link to nothing, or to a directory missing one, holds none)."""
    return (d / "bundle.json").is_file() and (d / "weights.npz").is_file()
