"""Blocked replies, parsed back with dnspython (an independent parser)."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from policy.answers import MalformedQuery, blocked_reply


def _query(name: str, rdtype: str, **kw) -> dns.message.QueryMessage:
    return dns.message.make_query(name, rdtype, **kw)


@pytest.mark.parametrize(("rdtype", "address"), [("A", "0.0.0.0"), ("AAAA", "::")])
def test_null_answer(rdtype, address):
    q = _query("Ads.Example.com.", rdtype)
    r = dns.message.from_wire(blocked_reply(q.to_wire()))
    assert r.id == q.id and r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.QR and r.flags & dns.flags.RA and r.flags & dns.flags.RD
    assert not r.flags & dns.flags.AA
    assert r.question == q.question
    (rrset,) = r.answer
    assert rrset.name == q.question[0].name and rrset.ttl == 2
    assert [rd.address for rd in rrset] == [address]


def test_null_answer_for_other_types_is_nodata_and_ttl_configurable():
    r = dns.message.from_wire(blocked_reply(_query("ads.example.com", "MX").to_wire()))
    assert r.rcode() == dns.rcode.NOERROR and r.answer == []
    r = dns.message.from_wire(blocked_reply(_query("ads.example.com", "A").to_wire(), ttl=300))
    assert r.answer[0].ttl == 300


@pytest.mark.parametrize(
    ("mode", "rcode"),
    [("nxdomain", dns.rcode.NXDOMAIN), ("nodata", dns.rcode.NOERROR), ("refused", dns.rcode.REFUSED)],
)
def test_other_modes(mode, rcode):
    q = _query("ads.example.com", "A", use_edns=0)
    r = dns.message.from_wire(blocked_reply(q.to_wire(), mode))
    assert r.rcode() == rcode and r.answer == [] and r.question == q.question and r.id == q.id


@pytest.mark.parametrize("mode", ["null", "nxdomain", "nodata", "refused"])
@pytest.mark.parametrize("rdtype", ["A", "AAAA", "HTTPS"])
def test_an_edns_query_gets_an_opt_record_back_and_a_plain_one_does_not(mode, rdtype):
    cookie = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"\x01" * 8)
    q = _query("ads.example.com", rdtype, use_edns=0, payload=4096, want_dnssec=True, options=[cookie])
    r = dns.message.from_wire(blocked_reply(q.to_wire(), mode))
    assert r.edns == 0 and r.payload == 1232 and r.options == () and not r.ednsflags & dns.flags.DO
    assert r.question == q.question and r.rcode() == dns.message.from_wire(blocked_reply(
        _query("ads.example.com", rdtype).to_wire(), mode)).rcode()
    assert dns.message.from_wire(blocked_reply(_query("ads.example.com", rdtype).to_wire(), mode)).edns == -1


def test_bad_input():
    with pytest.raises(MalformedQuery):
        blocked_reply(b"\x00\x01")
    with pytest.raises(MalformedQuery):
        blocked_reply(_query("a.example", "A").to_wire()[:20])
    reply = dns.message.make_response(_query("a.example", "A")).to_wire()
    with pytest.raises(MalformedQuery):
        blocked_reply(reply)
    with pytest.raises(ValueError, match="unknown blocked answer"):
        blocked_reply(_query("a.example", "A").to_wire(), "custom")
