"""A compact set of domain names for block lists with a million entries.

Each name is kept as a 64-bit hash in one sorted byte string (8 bytes a name instead of ~100 for a Python
string in a set), with a small bitmask per name saying which lists ("slots") hold it. A lookup hashes the
name and every parent suffix (``a.b.example.com``, ``b.example.com``, ``example.com``, ``com``), so a listed
name blocks all its subdomains. Buckets on the top bits of the hash keep each search to a few bytes.

The hash is Python's own string hash (SipHash, keyed per process): the index is built in the process that
uses it, and the key keeps anyone from crafting names that collide on purpose.
"""

from __future__ import annotations

import array
from collections.abc import Sequence

import numpy as np

_MASK64 = (1 << 64) - 1


def name_hash(name: str) -> int:
    """The unsigned 64-bit hash of a normalised name (lower case, no trailing dot)."""
    return hash(name) & _MASK64


def suffixes(name: str) -> list[str]:
    """``name`` and each parent suffix, longest first: ``a.b.c`` -> ``[a.b.c, b.c, c]``."""
    out = [name]
    i = name.find(".")
    while i >= 0:
        out.append(name[i + 1 :])
        i = name.find(".", i + 1)
    return out


def hash_names(names) -> np.ndarray:
    """Hashes of an iterable of normalised names, as ``uint64`` (streamed: the names are not kept)."""
    return np.fromiter((hash(n) & _MASK64 for n in names), dtype=np.uint64)


class DomainIndex:
    """Hashed names of up to 64 slots (a slot is one list's block or allow entries) with their slot masks."""

    MAX_SLOTS = 64

    def __init__(self, slots: Sequence[np.ndarray]) -> None:
        """``slots[i]`` holds the ``uint64`` hashes (from ``name_hash``/``hash_names``) of slot ``i``."""
        if len(slots) > self.MAX_SLOTS:
            raise ValueError(f"at most {self.MAX_SLOTS} list slots in one index, got {len(slots)}")
        typecode = "B" if len(slots) <= 8 else "H" if len(slots) <= 16 else "I" if len(slots) <= 32 else "Q"
        dtype = {"B": np.uint8, "H": np.uint16, "I": np.uint32, "Q": np.uint64}[typecode]
        sizes = [len(s) for s in slots]
        total = sum(sizes)
        if total:
            hashes = np.concatenate([np.asarray(s, dtype=np.uint64) for s in slots])
            bits = np.repeat(
                np.left_shift(np.ones(len(slots), dtype=np.uint64), np.arange(len(slots), dtype=np.uint64)),
                sizes,
            ).astype(dtype)
            order = np.argsort(hashes, kind="stable")
            hashes = hashes[order]
            bits = bits[order]
            del order
            first = np.flatnonzero(np.concatenate(([True], hashes[1:] != hashes[:-1])))
            masks = np.bitwise_or.reduceat(bits, first) if len(first) else bits
            hashes = hashes[first]
        else:
            hashes = np.zeros(0, dtype=np.uint64)
            masks = np.zeros(0, dtype=dtype)
        self._count = len(hashes)
        # About 8 names a bucket: a search scans at most a few dozen bytes.
        self._shift = 64 - max(4, min(20, (self._count // 8).bit_length()))
        buckets = np.right_shift(hashes, np.uint64(self._shift)).astype(np.int64)
        starts = np.searchsorted(buckets, np.arange((1 << (64 - self._shift)) + 1, dtype=np.int64))
        self._starts = array.array("I", (starts * 8).astype(np.uint32).tobytes())
        self._data = hashes.astype("<u8").tobytes()
        self._masks = array.array(typecode, masks.astype(dtype).tobytes())

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return (
            len(self._data)
            + self._starts.itemsize * len(self._starts)
            + self._masks.itemsize * len(self._masks)
        )

    def mask_of_hash(self, h: int) -> int:
        """The slot mask of one hashed name (0 when absent)."""
        bucket = h >> self._shift
        start, end = self._starts[bucket], self._starts[bucket + 1]
        if start == end:
            return 0
        needle = h.to_bytes(8, "little")
        data = self._data
        k = data.find(needle, start, end)
        while k >= 0 and k & 7:  # a match straddling two entries: keep looking
            k = data.find(needle, k + 1, end)
        return 0 if k < 0 else self._masks[k >> 3]

    def mask(self, names: Sequence[str]) -> int:
        """The union of the slot masks of ``names`` (pass ``suffixes(qname)``)."""
        m = 0
        for n in names:
            m |= self.mask_of_hash(hash(n) & _MASK64)
        return m

    def __contains__(self, name: str) -> bool:
        """Whether ``name`` or any parent suffix is in any slot."""
        return bool(self.mask(suffixes(name)))
