"""Per-home datasets: confirmed devices as hashed second-level-domain vectors, and how homes are simulated.

A home's dataset is what its owner confirmed in the web UI; it is written to one ``.npz`` on the gateway and
never leaves the home. For tests and the simulation, homes are cut from the shared supply-chain domain sets
(``device_domains.csv``): labels are vendors, a Dirichlet split gives each home a few vendors the way real
homes differ, and one device of every vendor is held out for evaluation.
"""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np

from identifier.domains import sld
from identifier.federated.model import Dataset

N_FEATURES = 512


def bucket(name: str, n_features: int = N_FEATURES) -> int:
    """The feature index of a DNS name: its SLD hashed (stable across processes, unlike ``hash()``)."""
    digest = hashlib.blake2b(sld(name).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n_features


def vectorize(names: set[str] | list[str], n_features: int = N_FEATURES) -> np.ndarray:
    """A binary bag of hashed SLDs."""
    vec = np.zeros(n_features, np.float32)
    for name in names:
        vec[bucket(name, n_features)] = 1.0
    return vec


def read_devices(csv_path: Path) -> dict[str, tuple[str, set[str]]]:
    """device -> (vendor, its DNS names), from ``device_domains.csv``."""
    devices: dict[str, tuple[str, set[str]]] = {}
    with csv_path.open(newline="") as fh:
        for line_no, row in enumerate(csv.DictReader(fh), start=2):
            try:
                device, vendor, domain = row["device_folder"], row["vendor"], row["domain"]
            except KeyError as exc:
                raise ValueError(f"{csv_path}:{line_no}: missing column {exc}") from exc
            devices.setdefault(device, (vendor, set()))[1].add(domain)
    return devices


def _windows(names: set[str], n: int, keep: float, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` partial observation windows of one device: each keeps a random share of its names."""
    ordered = sorted(names)
    out = []
    for _ in range(n):
        kept = [d for d in ordered if rng.random() < keep] or [ordered[int(rng.integers(len(ordered)))]]
        out.append(vectorize(kept))
    return out


def split_homes(
    csv_path: Path,
    n_homes: int,
    *,
    alpha: float = 0.5,
    windows_per_device: int = 8,
    keep: float = 0.6,
    seed: int = 0,
) -> tuple[list[Dataset], Dataset]:
    """``n_homes`` home datasets and one held-out test set over the same vendor classes.

    Vendors with at least two devices (not "Unknown") are the classes; one device per vendor is held out.
    Each remaining device goes to a home drawn from that vendor's Dirichlet(alpha) distribution over homes,
    so a home sees a few vendors, unevenly, and every home gets at least one device.
    """
    rng = np.random.default_rng(seed)
    by_vendor: dict[str, list[str]] = defaultdict(list)
    devices = read_devices(csv_path)
    for device, (vendor, _) in sorted(devices.items()):
        if vendor != "Unknown":
            by_vendor[vendor].append(device)
    classes = tuple(sorted(v for v, devs in by_vendor.items() if len(devs) >= 2))
    home_of: dict[str, int] = {}
    test_devices: list[str] = []
    for label in classes:
        devs = list(by_vendor[label])
        rng.shuffle(devs)
        test_devices.append(devs[0])
        weights = rng.dirichlet([alpha] * n_homes)
        for device in devs[1:]:
            home_of[device] = int(rng.choice(n_homes, p=weights))
    for home in range(n_homes):  # no empty homes: move a device from the fullest home
        if home not in home_of.values():
            fullest = max(range(n_homes), key=lambda h: sum(1 for v in home_of.values() if v == h))
            home_of[next(d for d, h in home_of.items() if h == fullest)] = home

    def build(device_list: list[str]) -> Dataset:
        xs, ys = [], []
        for device in device_list:
            vendor, names = devices[device]
            for vec in _windows(names, windows_per_device, keep, rng):
                xs.append(vec)
                ys.append(classes.index(vendor))
        x = np.stack(xs) if xs else np.zeros((0, N_FEATURES), np.float32)
        return Dataset(x=x, y=np.asarray(ys, np.int64), classes=classes)

    homes = [build(sorted(d for d, h in home_of.items() if h == home)) for home in range(n_homes)]
    return homes, build(test_devices)


def merge(datasets: list[Dataset]) -> Dataset:
    """All datasets as one (centralized training on the union of the homes)."""
    return Dataset(
        x=np.concatenate([d.x for d in datasets]),
        y=np.concatenate([d.y for d in datasets]),
        classes=datasets[0].classes,
    )


def save(dataset: Dataset, path: Path) -> None:
    np.savez(path, x=dataset.x, y=dataset.y, classes=np.asarray(dataset.classes))


def load(path: Path) -> Dataset:
    """A home's confirmed devices; a clear error names the file when it is not a dataset."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return Dataset(
                x=z["x"].astype(np.float32), y=z["y"].astype(np.int64), classes=tuple(z["classes"])
            )
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a home dataset (.npz with x, y, classes): {exc}") from exc
