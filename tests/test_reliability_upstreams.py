"""Upstream faults against the real forwarder: dead, slow, SERVFAIL, truncating, spoofed, and silent over TCP.

Each fault is a small real upstream on loopback (asyncio UDP and TCP sockets) where dnsmasq cannot produce it.
The server runs with its default 2-second budget; clients wait 2.5 s (0.5 s of scheduling slack on a shared
2-core machine), so a reply that comes at all came within the budget.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import nullcontext

import dns.edns
import dns.message
import dns.rcode
import pytest

from gateway.dns import Decision
from gateway.dns import server as server_module
from gateway.events import Counters, DnsQuery
from tests.dns_helpers import ask, config, needs_dnsmasq, rcode, running
from tests.fake_upstream import FakeUpstream, answer, echo, rcode_reply, silent, slow, truncated, wrong_id
from tests.ports import free_port

BUDGET_S = 2.0
CLIENT_WAIT_S = BUDGET_S + 0.5
BUSY_S = 1.4  # past the first upstream's share of the budget (0.95 s), short of the whole budget (1.9 s)

def timed_ask(port: int, name: str, **kw: object) -> tuple[dns.message.Message, float]:
    t0 = time.monotonic()
    reply = ask(port, name, timeout=CLIENT_WAIT_S, **kw)
    return reply, time.monotonic() - t0


def a_records(msg: dns.message.Message) -> set[str]:
    return {rr.to_text() for rrset in msg.answer for rr in rrset}


# (fault, its UDP and TCP behaviour, what a client gets when it is the only upstream)
FAULTS = {
    "dead": (None, None, "SERVFAIL"),
    "slow-3s": (slow(3.0, answer("192.0.2.1")), None, "SERVFAIL"),
    "servfail": (rcode_reply(dns.rcode.SERVFAIL), None, "SERVFAIL"),
    "refused": (rcode_reply(dns.rcode.REFUSED), None, "REFUSED"),
    "truncates-tcp-answers": (truncated, answer("192.0.2.7"), "NOERROR"),
    "truncates-tcp-silent": (truncated, silent, "SERVFAIL"),
    "truncates-no-tcp": (truncated, None, "SERVFAIL"),
    "spoofed-id": (wrong_id, None, "SERVFAIL"),
    # Not an answer (QR clear): was passed on, and cached, as if it were one.
    "echoes-the-query": (echo, None, "SERVFAIL"),
    "truncates-tcp-echoes": (truncated, echo, "SERVFAIL"),
    "silent": (silent, None, "SERVFAIL"),
}


def fault_upstream(name: str) -> FakeUpstream | None:
    udp, tcp, _ = FAULTS[name]
    return None if udp is None else FakeUpstream(udp, tcp)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_faulty_upstream_alone_gives_an_answer_or_servfail_within_the_budget(fault: str) -> None:
    upstream = fault_upstream(fault)
    address = upstream.address if upstream else f"127.0.0.1:{free_port()}"  # dead: nothing listens
    expected = FAULTS[fault][2]
    with upstream or nullcontext(), running(config([address], timeout_s=BUDGET_S)) as srv:
        for tcp in (False, True):
            reply, _ = timed_ask(srv.port, f"q{int(tcp)}.example.test", tcp=tcp)
            assert rcode(reply) == expected, (fault, tcp)
            if expected == "NOERROR":
                assert a_records(reply) == {"192.0.2.7"}
        assert not srv.call(lambda: len(srv.server._pending))  # nothing left waiting


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_faulty_first_upstream_fails_over_to_the_second(fault: str) -> None:
    upstream = fault_upstream(fault)
    address = upstream.address if upstream else f"127.0.0.1:{free_port()}"
    with upstream or nullcontext(), FakeUpstream(answer("192.0.2.53")) as good, \
            running(config([address, good.address], timeout_s=BUDGET_S)) as srv:
        reply, _ = timed_ask(srv.port, "first.example.test")
        if fault == "truncates-tcp-answers":  # not a fault: the first upstream answers over TCP
            assert a_records(reply) == {"192.0.2.7"}
            return
        assert a_records(reply) == {"192.0.2.53"}, fault
        # A second query, other name: answered from the good upstream again (a timed-out or refusing
        # upstream is tried last for a while; one that answered SERVFAIL is still asked first).
        assert a_records(timed_ask(srv.port, "second.example.test")[0]) == {"192.0.2.53"}
        assert a_records(timed_ask(srv.port, "third.example.test", tcp=True)[0]) == {"192.0.2.53"}
        if fault in ("servfail", "refused"):
            assert srv.counters.get("dns_upstream_failed") >= 1
        if fault == "spoofed-id":
            assert srv.counters.get("dns_upstream_stray") >= 1


def test_other_clients_are_served_while_an_upstream_stalls() -> None:
    """Queries stuck on a slow name do not hold up anyone else; each stuck one ends in SERVFAIL."""
    fast, stall = answer("192.0.2.80"), slow(3.0, answer("192.0.2.81"))

    def by_name(query: dns.message.Message) -> tuple[float, bytes | None]:
        return (stall if query.question[0].name.to_text().startswith("stall") else fast)(query)

    with FakeUpstream(by_name) as up, running(config([up.address], timeout_s=BUDGET_S)) as srv:
        stuck = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stuck.bind(("127.0.0.2", 0))
        stuck.settimeout(CLIENT_WAIT_S)
        ids = set()
        for i in range(200):
            query = dns.message.make_query(f"stall{i}.example.test", "A")
            ids.add(query.id)
            stuck.sendto(query.to_wire(), ("127.0.0.1", srv.port))
        assert a_records(ask(srv.port, "fast.example.test", timeout=1.0)) == {"192.0.2.80"}
        assert a_records(ask(srv.port, "fast2.example.test", tcp=True, timeout=1.0)) == {"192.0.2.80"}
        assert srv.call(lambda: len(srv.server._pending)) > 0  # the stalled ones were still waiting
        codes = []
        with stuck:
            while len(codes) < 200:
                reply = dns.message.from_wire(stuck.recv(4096))
                ids.discard(reply.id)
                codes.append(rcode(reply))
        assert codes == ["SERVFAIL"] * 200 and not ids
        assert not srv.call(lambda: len(srv.server._pending))


def test_a_late_retry_gets_servfail_at_its_deadline_not_behind_later_ones() -> None:
    """A retry whose deadline is cut to the query's budget is timed out at that deadline, even when queries
    sent before it wait with later ones: its SERVFAIL comes before their first timeout, within timeout_s."""
    started = threading.Event()
    answered: list[tuple[str, int, int]] = []  # (name, rcode, upstream timeouts counted by then)
    counters: list[Counters] = []

    def decide(ip: str, mac: str | None, qname: str, qtype: int, query: bytes) -> Decision | None:
        if not qname.startswith("busy."):
            return None
        # A busy event loop (a slow hook, a loaded Pi): the first upstream's timeout for a.example.test is
        # noticed late, so its retry's deadline is cut to the budget, earlier than b.example.test's below.
        started.set()
        time.sleep(BUSY_S)
        return Decision("blocked", "test", dns.message.make_response(dns.message.from_wire(query)).to_wire())

    def emit(event: DnsQuery) -> None:
        answered.append((event.qname, event.rcode, counters[0].get("dns_upstream_timeouts")))

    with FakeUpstream(silent) as first, FakeUpstream(silent) as second, \
            running(config([first.address, second.address], timeout_s=BUDGET_S), decide=decide, emit=emit) as srv:
        counters.append(srv.counters)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(2 * CLIENT_WAIT_S)
            for name in ("a.example.test", "busy.example.test"):
                client.sendto(dns.message.make_query(name, "A").to_wire(), ("127.0.0.1", srv.port))
            assert started.wait(CLIENT_WAIT_S)
            client.sendto(dns.message.make_query("b.example.test", "A").to_wire(), ("127.0.0.1", srv.port))
            replies = {}
            while len(replies) < 3:
                reply = dns.message.from_wire(client.recv(4096))
                replies[reply.question[0].name.to_text()] = rcode(reply)
        assert replies == {"a.example.test.": "SERVFAIL", "busy.example.test.": "NOERROR",
                           "b.example.test.": "SERVFAIL"}
    # a.example.test fails after its own two timeouts, before b.example.test's first one.
    assert [a for a in answered if a[0] != "busy.example.test"] == [
        ("a.example.test", dns.rcode.SERVFAIL, 2), ("b.example.test", dns.rcode.SERVFAIL, 4)]


def test_a_flood_towards_a_silent_upstream_is_capped_and_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond MAX_PENDING waiting queries new ones get SERVFAIL at once: the ID table never fills."""
    monkeypatch.setattr(server_module, "MAX_PENDING", 20)
    with FakeUpstream(silent) as up, running(config([up.address], timeout_s=BUDGET_S)) as srv:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(CLIENT_WAIT_S)
            for i in range(50):
                client.sendto(dns.message.make_query(f"n{i}.example.test", "A").to_wire(), ("127.0.0.1", srv.port))
            codes = [rcode(dns.message.from_wire(client.recv(4096))) for _ in range(50)]
        assert codes == ["SERVFAIL"] * 50
        assert srv.counters.get("dns_pending_full") == 30
        assert up.queries == 20


def test_the_bytes_of_queries_waiting_for_a_silent_upstream_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_PENDING alone let 16,384 queries of 4 kB each (padded with an EDNS option) wait: 64 MB for the budget.
    Beyond MAX_PENDING_BYTES new ones get SERVFAIL at once, however few are waiting."""
    monkeypatch.setattr(server_module, "MAX_PENDING_BYTES", 40_000)  # 10 of these queries, and the one that tips it
    padding = dns.edns.GenericOption(dns.edns.OptionType.PADDING, bytes(3900))
    queries = [dns.message.make_query(f"n{i}.example.test", "A", use_edns=0, options=[padding]).to_wire(max_size=65535)
               for i in range(30)]
    assert all(3900 < len(q) < 4000 for q in queries)
    with FakeUpstream(silent) as up, running(config([up.address], timeout_s=BUDGET_S, rate_limit_per_minute=0)) as srv:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(CLIENT_WAIT_S)
            for query in queries:
                client.sendto(query, ("127.0.0.1", srv.port))
            codes = [rcode(dns.message.from_wire(client.recv(4096))) for _ in queries]
        assert codes == ["SERVFAIL"] * 30
        assert srv.counters.get("dns_pending_full") == 19
        assert up.queries == 11
        # Every query has had its answer, so none waits and no byte is left counted.
        assert srv.call(lambda: (len(srv.server._pending), srv.server._pending.bytes)) == (0, 0)


@needs_dnsmasq
def test_failover_to_dnsmasq_keeps_answering_after_the_first_upstream_dies(upstream) -> None:
    """A working upstream that goes away mid-run: the next query moves to dnsmasq within the budget."""
    with FakeUpstream(answer("192.0.2.1")) as first, \
            running(config([first.address, upstream.address], timeout_s=BUDGET_S, cache_size=0)) as srv:
        assert a_records(timed_ask(srv.port, "www.example.test")[0]) == {"192.0.2.1"}
        first.close()
        for name in ("www.example.test", "other.example.test"):
            reply, _ = timed_ask(srv.port, name)
            assert rcode(reply) == "NOERROR" and a_records(reply) <= {"192.0.2.10", "192.0.2.11"}


def test_client_timeout_figure_is_the_config_default() -> None:
    """The budget these tests hold the server to is what a default install uses."""
    from gateway.config import DnsConfig

    assert DnsConfig(upstreams=["127.0.0.1"]).timeout_s == BUDGET_S



def test_tcp_retries_of_truncated_answers_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each truncated answer opened a TCP connection upstream, bounded by nothing; past the cap a query gets
    SERVFAIL at once instead of a connection (and a descriptor) of its own."""
    monkeypatch.setattr(server_module, "MAX_TCP_RETRIES", 3, raising=False)  # old code fails the counts below
    with FakeUpstream(truncated, tcp=silent) as up, running(config([up.address], timeout_s=2.0)) as srv:
        clients = []
        for i in range(10):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.settimeout(5)
            sock.sendto(dns.message.make_query(f"fat{i}.example.test", "TXT").to_wire(), ("127.0.0.1", srv.port))
            clients.append(sock)
        try:
            for sock in clients:
                assert dns.message.from_wire(sock.recv(4096)).rcode() == dns.rcode.SERVFAIL
        finally:
            for sock in clients:
                sock.close()
        assert srv.counters.get("dns_tcp_retries") == 3 and srv.counters.get("dns_tcp_retries_full") == 7
        assert up.queries == 10 + 3
        assert srv.call(lambda: srv.server._tcp_retries) == 0
