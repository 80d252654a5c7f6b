"""The hand-written wire reader agrees with dnspython and fails only with ``Malformed`` on hostile input."""

from __future__ import annotations

import struct

import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.dns import wire
from gateway.dns.cache import AnswerCache


def query(name: str | dns.name.Name, rdtype: str = "A", **kw: object) -> bytes:
    return dns.message.make_query(name, rdtype, **kw).to_wire()


def answer(q: bytes, ttls: list[int]) -> bytes:
    msg = dns.message.make_response(dns.message.from_wire(q))
    name = msg.question[0].name
    for i, ttl in enumerate(ttls):
        msg.answer.append(dns.rrset.from_text(name, ttl, "IN", "A", f"192.0.2.{i + 1}"))
    return msg.to_wire()


def test_question_matches_dnspython():
    q = wire.parse_question(query("WWW.Example.CO.UK", "AAAA"))
    assert (q.qname, q.qtype, q.qclass, q.sld) == ("www.example.co.uk", 28, 1, "example.co.uk")
    assert q.length == len(dns.name.from_text("www.example.co.uk").to_wire()) + 4


def test_hostile_names_come_out_as_escaped_text():
    name = dns.name.Name([b"a.b", b"<script>", b"\x00\xff", b"test", b""])
    q = wire.parse_question(query(name))
    assert q.qname == name.to_text(omit_final_dot=True).lower()
    assert "\x00" not in q.qname and "\\" in q.qname


def test_a_dot_inside_a_label_is_escaped_not_taken_as_a_separator():
    name = dns.name.Name([b"www.google", b"com", b""])
    q = wire.parse_question(query(name))
    assert q.qname == "www\\.google.com" == name.to_text(omit_final_dot=True)
    assert q.sld == "www\\.google.com"  # its own registrable domain, not google.com


def test_cache_keys_fold_case_and_keep_flags_apart():
    lower = wire.parse_question(query("www.example.test"))
    upper = wire.parse_question(query("WWW.EXAMPLE.TEST"))
    assert lower.cache_keys == upper.cache_keys
    assert len(set(lower.cache_keys)) == 8
    aaaa = wire.parse_question(query("www.example.test", "AAAA"))
    assert aaaa.cache_keys[0] != lower.cache_keys[0]


def test_opt_flags_and_size():
    q = query("x.test", use_edns=0, payload=1400, want_dnssec=True)
    end = wire.question_end(q)
    assert wire.opt_at(q, end) == (wire.FLAG_EDNS | wire.FLAG_DO, 1400)
    assert wire.opt_at(query("x.test"), end) is None


def test_ttl_positions_point_at_the_ttls():
    q = query("www.example.test", use_edns=0)
    response = answer(q, [300, 60])
    qlen = wire.parse_question(q).length
    offsets, ttls, lifetime = wire.ttl_positions(response, qlen)
    assert ttls == (300, 60) and lifetime == 60
    assert [struct.unpack_from("!I", response, o)[0] for o in offsets] == [300, 60]


def test_cache_serves_aged_ttls_and_expires():
    q = query("www.example.test")
    qlen = wire.parse_question(q).length
    cache = AnswerCache(2)
    cache.put(b"k", answer(q, [300, 10]), qlen, now=100.0)
    aged = dns.message.from_wire(cache.get(b"k", now=103.5))
    assert aged.answer[0].ttl == 7  # dnspython merges the two into one RRset with the smaller TTL
    assert cache.get(b"k", now=110.0) is None
    assert len(cache) == 0


def test_cache_is_bounded_and_skips_uncacheable_answers():
    q = query("www.example.test")
    qlen = wire.parse_question(q).length
    cache = AnswerCache(2)
    for key in (b"a", b"b", b"c"):
        cache.put(key, answer(q, [300]), qlen, now=0.0)
    assert len(cache) == 2 and cache.get(b"a", 1.0) is None
    servfail = bytearray(answer(q, [300]))
    servfail[3] = (servfail[3] & 0xF0) | wire.SERVFAIL
    cache.put(b"s", bytes(servfail), qlen, now=0.0)
    cache.put(b"z", answer(q, [0]), qlen, now=0.0)
    assert cache.get(b"s", 1.0) is None and cache.get(b"z", 0.0) is None


@given(st.binary(max_size=300))
def test_random_bytes_fail_only_as_malformed(data):
    for parse in (wire.parse_question, wire.full_parse):
        try:
            parse(data)
        except wire.Malformed:
            pass
    wire.ttl_positions(data, 5)  # an upstream's garbage must not raise either


@pytest.mark.parametrize("rcode", [wire.REFUSED, wire.SERVFAIL])
def test_error_reply_is_a_reply_to_the_query(rcode):
    q = query("www.example.test", use_edns=0)
    reply = dns.message.from_wire(wire.error_reply(q, wire.parse_question(q).length, rcode, True))
    assert dns.message.from_wire(q).is_response(reply)
    assert reply.rcode() == rcode and reply.edns == 0


def test_negative_answers_live_as_long_as_the_soa_says():
    q = query("nothing.example.test")
    msg = dns.message.make_response(dns.message.from_wire(q))
    msg.set_rcode(dns.rcode.NXDOMAIN)
    msg.authority.append(dns.rrset.from_text("example.test.", 3600, "IN", "SOA",
                                             "ns.example.test. host.example.test. 1 7200 900 1209600 120"))
    qlen = wire.parse_question(q).length
    assert wire.ttl_positions(msg.to_wire(), qlen)[2] == 120  # the SOA minimum caps its TTL (RFC 2308)
    msg.authority.clear()
    assert wire.ttl_positions(msg.to_wire(), qlen) is None  # no SOA: not cached


def test_cache_holds_at_most_32_mib_of_answers_however_big_each_one():
    """Answers fetched over TCP run to 64 KiB; 1,000 of them (a tenth of the default 10,000 entries) held 60 MB."""
    fat = dns.rrset.from_text("x.example.test", 300, "IN", "TXT", *[f'"{n:03}{"a" * 247}"' for n in range(240)])
    cache = AnswerCache(10000)
    held = []
    for i in range(1000):
        q = query(f"n{i}.example.test", "TXT")
        msg = dns.message.make_response(dns.message.from_wire(q))
        msg.answer.append(dns.rrset.from_rdata_list(msg.question[0].name, 300, list(fat)))
        response = msg.to_wire()
        assert len(response) > 60000
        cache.put(b"k%d" % i, response, wire.parse_question(q).length, now=0.0)
        held.append(b"k%d" % i)
    assert sum(len(cache.get(key, 1.0) or b"") for key in held) <= 32 << 20
    assert cache.get(held[-1], 1.0) is not None  # the newest stay, the oldest go
