"""Answer cache: upstream answers kept as bytes, served with the client's ID and question and aged TTLs.

Keyed by the case-folded question plus the EDNS/DO/CD bits (``wire.Question.cache_keys``). A hit rewrites
the TTLs only when the answer's age in whole seconds changes, so most hits cost two slices and a concat.
Eviction is in insertion order (a dict keeps it for free); an LRU would need a reorder on every hit.
"""

from __future__ import annotations

import struct

from gateway.dns import wire

MAX_TTL = 86400  # cap what an upstream can make us keep
# And how much: answers fetched over TCP run to 64 KiB, so 10,000 entries of a domain whose owner serves fat
# records (a client asking its names, an IoT device told to) held 640 MB, beyond a Pi's memory. Typical
# answers are 100-200 bytes: the entry count binds first in ordinary use.
MAX_BYTES = 32 << 20


class _Entry:
    __slots__ = ("expires", "stored", "offsets", "ttls", "age", "answer")

    def __init__(self, answer: bytes, offsets: tuple[int, ...], ttls: tuple[int, ...], stored: float,
                 ttl: int) -> None:
        self.answer = answer  # with TTLs aged by ``age`` seconds
        self.offsets = offsets
        self.ttls = ttls
        self.stored = stored
        self.expires = stored + ttl
        self.age = 0


class AnswerCache:
    """A map from cache key to answer bytes bounded by ``size`` entries and ``max_bytes`` of answers, the oldest
    going first; ``size`` 0 disables it."""

    def __init__(self, size: int, max_bytes: int = MAX_BYTES) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0  # of the answers held
        self._entries: dict[bytes, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> bytes | None:
        """The cached answer with TTLs aged to ``now`` (ID and question still the first asker's), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.expires:
            del self._entries[key]
            self.bytes -= len(entry.answer)
            return None
        age = int(now - entry.stored)
        if age != entry.age:
            patched = bytearray(entry.answer)
            for offset, ttl in zip(entry.offsets, entry.ttls, strict=True):
                struct.pack_into("!I", patched, offset, ttl - age)
            entry.answer = bytes(patched)
            entry.age = age
        return entry.answer

    def put(self, key: bytes, response: bytes, question_len: int, now: float) -> None:
        """Keep a NOERROR/NXDOMAIN, untruncated ``response`` for its TTL (see ``wire.ttl_positions``)."""
        if not self.size or response[2] & 0x02 or response[3] & 0x0F not in (wire.NOERROR, wire.NXDOMAIN):
            return
        found = wire.ttl_positions(response, question_len)
        if found is None:
            return
        offsets, ttls, ttl = found
        ttl = min(ttl, MAX_TTL)
        if ttl <= 0:
            return
        if len(response) > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old.answer)
        self.bytes += len(response)
        while len(self._entries) >= self.size or self.bytes > self.max_bytes:
            self.bytes -= len(self._entries.pop(next(iter(self._entries))).answer)
        self._entries[key] = _Entry(response, offsets, ttls, now, ttl)
