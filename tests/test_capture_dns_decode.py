"""The parser's fast DNS question decoder agrees with dnslib, which it stands in for on plain queries."""

from __future__ import annotations

import dnslib
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.capture.frames import _plain_questions

labels = st.lists(st.binary(min_size=1, max_size=70), min_size=0, max_size=5)
names = st.one_of(
    labels,
    st.lists(st.from_regex(r"[A-Za-z0-9_.-]{1,20}", fullmatch=True).map(str.encode), min_size=1, max_size=4),
)


def _encode(parts: list[bytes]) -> bytes:
    return b"".join(bytes([len(p) & 0xFF]) + p for p in parts) + b"\x00"


def _dnslib(payload: bytes) -> list[tuple[str, int]] | None:
    try:
        msg = dnslib.DNSRecord.parse(payload)
    except Exception:
        return None
    return [(str(q.qname).rstrip(".").lower(), q.qtype) for q in msg.questions]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(names, st.integers(0, 65535)), min_size=0, max_size=3), st.integers(0, 3),
       st.integers(0, 0xFFFF), st.binary(max_size=8), st.integers(0, 40))
def test_fast_decoder_matches_dnslib(questions, count_delta, flags, tail, cut):
    body = b"".join(_encode(name) + qtype.to_bytes(2, "big") + b"\x00\x01" for name, qtype in questions)
    count = len(questions) + count_delta
    header = b"\x12\x34" + (flags & 0x7FFF).to_bytes(2, "big") + count.to_bytes(2, "big")
    payload = (header + b"\x00" * 6 + body + tail)[: max(0, len(header) + 6 + len(body) + len(tail) - cut)]
    fast = _plain_questions(payload)
    if fast is not None:  # whatever the fast path accepts, dnslib reads the same questions from
        assert fast == _dnslib(payload)
    elif count_delta == 0 and cut == 0 and all(
        all(33 <= c < 127 for c in label) and 0 < len(label) < 64 for name, _ in questions for label in name
    ):
        raise AssertionError("a plain query fell back to dnslib")


def test_responses_and_compressed_names_go_to_dnslib():
    response = dnslib.DNSRecord.question("a.example.com").reply().pack()
    assert _plain_questions(response) is None
    compressed = bytes.fromhex("123401000001000000000000") + b"\xc0\x0c\x00\x01\x00\x01"
    assert _plain_questions(compressed) is None
