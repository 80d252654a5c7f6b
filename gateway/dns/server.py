"""The DNS forwarder: UDP and TCP listeners, LAN check, rate limit, policy hook, cache, upstream failover.

The UDP hot path avoids asyncio's per-datagram protocol machinery: each non-blocking socket is watched with
``loop.add_reader`` and drained with ``recvfrom`` until it would block. A forwarded query gets a fresh random
ID and waits in a table keyed by that ID; one periodic sweep handles every timeout (no timer per query).
Queries are read with the minimal parser in ``wire`` and the parse is remembered per distinct question, so
the work per query is a few dict lookups, the hooks, and four syscalls (REFERENCE.md: that is what decides
the throughput against dnsmasq).
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import (
    DnsConfig,
    link_local_interfaces,
    on_lan_link,
    parse_hostport,
    peer_ip,
    socket_address,
    upstream_address,
)
from gateway.dns import wire
from gateway.dns.cache import AnswerCache
from gateway.events import Counters, DnsQuery

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class Decision:
    """The policy's answer for one query. With ``reply`` the server answers with those bytes (their ID is
    replaced by the query's); without, it forwards and only records ``verdict``, ``rule`` and ``rule_words``.
    ``rule`` keys the policy rule that decided, ``rule_words`` says it to the owner; both go into the query log."""

    verdict: str
    rule: str | None = None
    reply: bytes | None = None
    rule_words: str | None = None


# What the server logs for a query no rule decided (or one it refused before any policy was asked).
_ALLOWED = Decision("allowed")
_REFUSED = Decision("refused")
_RATELIMITED = Decision("ratelimited")


MacFor = Callable[[str], "str | None"]
Decide = Callable[[str, "str | None", str, int, bytes], "Decision | None"]
# (client, mac, qname, response, query): the query lets the hook build the reply that replaces the response
CheckResponse = Callable[[str, "str | None", str, bytes, bytes], "Decision | None"]
Emit = Callable[[DnsQuery], None]

RATE_WINDOW_S = 60.0  # Pi-hole counts queries per client per minute
DOWN_FOR_S = 30.0  # an upstream that timed out or refused is tried last for this long
# Per-client state (LAN check, rate window), LAN clients and outsiders apart; each table cleared when full, so
# a flood of refused outsiders cannot reset the LAN clients' rate windows.
MAX_CLIENTS = 65536
# Remembered question parses. Filled before the LAN check and the rate limit, so any client can fill it: at
# 8,192 long names it holds ~28 MB (benchmarks/fuzz_dns.py, question_memo_worst_mb); 65,536 held ~230 MB.
MAX_QUESTIONS = 8192
UPSTREAM_SOCKETS = 4  # source ports per upstream: 2 more random bits against spoofed answers
BURST = 256  # datagrams read per wake-up before other sockets and timers get their turn
BUFFER_BYTES = 4 << 20  # socket buffers absorb bursts instead of dropping
TCP_IDLE_S = 10.0
MAX_TCP_CLIENTS = 256  # open DNS-over-TCP connections; more are closed at once (file descriptors are finite)
# Of them, one address's: else one LAN host (a slowloris reconnecting as each times out) held them all. TCP is a
# stub's fallback for the odd big answer; a few hosts behind one address (a guest router) stay well under it.
# Twice what a busy client keeps open: one that closes and reopens at once may briefly count one more than it
# holds (the fuzz benchmark's 32 at a time lost queries to a cap of 32).
MAX_TCP_PER_CLIENT = 64
# TCP connections to upstreams for truncated answers at once; more get SERVFAIL. Outside MAX_PENDING, they were
# bounded by nothing: a flood of names with big answers (any LAN host, from spoofed addresses past the rate
# limit) towards an upstream slow on TCP took every descriptor of the process (systemd's soft limit is 1,024).
MAX_TCP_RETRIES = 128
# Queries waiting for an upstream. Beyond this (a flood towards a silent upstream) new ones get SERVFAIL at once:
# the 16-bit ID space must never fill, or picking a free ID would never end.
MAX_PENDING = 16384
# And the bytes of their queries: MAX_PENDING alone let 16,384 UDP queries padded to 4 kB (an EDNS option) wait,
# 64 MB for the 2 s budget, and TCP ones may be 64 kB. A real query is 30 to 100 bytes (about 300 at most
# with a 255-byte name and an OPT), so a full table of them stays under a tenth of this.
MAX_PENDING_BYTES = 4 << 20
_IDS = [i.to_bytes(2, "big") for i in range(65536)]
# The largest UDP answer, whatever size a client offers (dnsmasq's edns-packet-max and Unbound's max-udp-size
# default to the same): bigger ones go truncated and are fetched over TCP. A 40-byte query with a forged LAN
# source and an EDNS size of 65535 drew a 64 KiB cached answer at its victim, 1,600 times what it cost.
UDP_ANSWER_MAX = 1232
CLASS_IN, CLASS_ANY = 1, 255  # the classes forwarded; queries in any other are REFUSED here


class _Client:
    __slots__ = ("ip", "allowed", "window", "count")

    def __init__(self, ip: str, allowed: bool) -> None:
        self.ip = ip
        self.allowed = allowed
        self.window = 0.0
        self.count = 0


class _Upstream:
    __slots__ = ("host", "port", "socks", "down_until")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.socks: list[socket.socket] = []
        self.down_until = 0.0


class _Pending:
    """A query waiting for an upstream: who asked, how to answer, and what to log."""

    __slots__ = ("query", "question", "sock", "addr", "fut", "client", "mac", "decided", "key", "t0",
                 "client_max", "upstream", "tried", "sent_id", "deadline")

    def __init__(self, query: bytes, question: wire.Question, sock: socket.socket | None, addr: tuple,
                 fut: asyncio.Future | None, client: _Client, mac: str | None, decided: Decision,
                 key: bytes | None, t0: float, client_max: int) -> None:
        self.query = query
        self.question = question
        self.sock = sock
        self.addr = addr
        self.fut = fut
        self.client = client
        self.mac = mac
        self.decided = decided  # what the query log says decided it, unless the answer's CNAMEs are blocked
        self.key = key
        self.t0 = t0
        self.client_max = client_max
        self.upstream = -1
        self.tried = 0  # bit i set: upstream i was asked
        self.sent_id = b""
        self.deadline = 0.0

    def answered_by(self, data: bytes) -> bool:
        """Whether ``data`` (over UDP or TCP) answers this query as it was sent: its ID, QR set (our own query
        reflected back, or any non-answer, would be passed on and cached), and the question echoed."""
        end = 12 + self.question.length
        return (data[:2] == self.sent_id and len(data) >= 12 and data[2] & 0x80 != 0
                and data[12:end] == self.query[12:end])


class _PendingTable:
    """The queries waiting for an upstream, by the ID each was sent with, and the bytes of those queries: counted
    here with every insert and removal, so that no caller can change one without the other."""

    __slots__ = ("_by_id", "bytes", "get")

    def __init__(self) -> None:
        self._by_id: dict[bytes, _Pending] = {}
        self.bytes = 0
        self.get = self._by_id.get  # the dict's own, for the hot path: no Python call per upstream answer

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, sent_id: bytes) -> bool:
        return sent_id in self._by_id

    def full(self) -> bool:
        """No room for another (MAX_PENDING, MAX_PENDING_BYTES)."""
        return len(self._by_id) >= MAX_PENDING or self.bytes >= MAX_PENDING_BYTES

    def add(self, p: _Pending) -> None:
        """``p``, sent with the ID ``p.sent_id``, which no waiting query holds."""
        self._by_id[p.sent_id] = p
        self.bytes += len(p.query)

    def remove(self, p: _Pending) -> None:
        del self._by_id[p.sent_id]
        self.bytes -= len(p.query)

    def waiting(self) -> list[_Pending]:
        """A copy, so that the caller may remove some as it goes."""
        return list(self._by_id.values())


class DnsServer:
    """A forwarding DNS server for the LAN. ``start()`` binds every listen address (UDP and TCP on the same
    port); ``bound`` then lists the (host, port) pairs, which matters with port 0. ``lan_interface`` is the
    interface the LAN is on (``[capture] interface``): with the zones of the listen addresses, the only ones a
    link-local client is answered on (``config.link_local_interfaces``); with none, no link-local client is."""

    def __init__(self, config: DnsConfig, counters: Counters, *, mac_for: MacFor | None = None,
                 decide: Decide | None = None, check_response: CheckResponse | None = None,
                 emit: Emit | None = None, lan_interface: str | None = None) -> None:
        self.config = config
        self.counters = counters
        self.mac_for = mac_for
        self.decide = decide
        self.check_response = check_response
        self.emit = emit
        self.bound: list[tuple[str, int]] = []
        self._lan = [ipaddress.ip_network(prefix, strict=False) for prefix in config.lan]
        self._links = frozenset(link_local_interfaces(config, lan_interface))
        self._upstreams = [_Upstream(*_upstream(u)) for u in config.upstreams]
        if not self._upstreams:
            raise ValueError("dns.upstreams: at least one upstream is needed")
        # The sweep runs every tick, so budget one tick less: SERVFAIL reaches the client within timeout_s.
        self._tick = max(0.01, min(0.1, config.timeout_s / len(self._upstreams) / 5))
        self._timeout = max(self._tick, config.timeout_s - self._tick)
        self._attempt_s = self._timeout / len(self._upstreams)
        self._limit = config.rate_limit_per_minute
        self._cache = AnswerCache(config.cache_size)
        self._questions: dict[bytes, wire.Question] = {}
        # Peer address text (with the scope id for a link-local one: see _client) -> LAN client, or outsider
        self._clients: dict[str | tuple[str, int], _Client] = {}
        self._outsiders: dict[str | tuple[str, int], _Client] = {}
        self._pending = _PendingTable()
        # A heap of (deadline, upstream ID); answered queries leave their entry to expire here, so it holds no
        # reference to them. Not a FIFO: a late retry's deadline is cut to the query's budget, earlier than
        # those of queries sent before it, and must not wait behind them past timeout_s.
        self._deadlines: list[tuple[float, bytes]] = []
        self._udp: list[socket.socket] = []
        self._tcp: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task] = set()
        self._tcp_held: dict[str, int] = {}  # open TCP connections by client address
        self._tcp_retries = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        try:
            for listen in self.config.listen:
                host, port = parse_hostport(listen, 53)
                try:
                    self.bound.append((host, await self._listen(host, port)))
                except OSError as exc:
                    # The default config listens on [::] too; a Pi with IPv6 switched off still serves IPv4.
                    if host == "::" and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                        log.warning("dns: no IPv6 here, not listening on %s", listen)
                        continue
                    raise OSError(exc.errno, f"dns: cannot listen on {listen}: {exc.strerror}") from exc
            if not self.bound:
                raise OSError("dns: no listen address could be bound")
            for up in self._upstreams:
                family = socket.AF_INET6 if ":" in up.host else socket.AF_INET
                for _ in range(UPSTREAM_SOCKETS):
                    sock = socket.socket(family, socket.SOCK_DGRAM)
                    up.socks.append(sock)
                    sock.setblocking(False)
                    _big_buffers(sock)
                    sock.connect((up.host, up.port))
                    loop.add_reader(sock.fileno(), self._on_upstream, up, sock)
        except BaseException:
            await self.stop()
            raise
        self._sweeper = loop.call_later(self._tick, self._sweep)
        upstreams = [f"{u.host}:{u.port}" for u in self._upstreams]
        log.info("dns: listening on %s, upstreams %s", self.bound, upstreams)

    async def stop(self) -> None:
        loop = self._loop or asyncio.get_running_loop()
        if self._sweeper:
            self._sweeper.cancel()
        for sock in self._udp + [s for up in self._upstreams for s in up.socks]:
            if sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
                sock.close()
        self._udp.clear()
        for up in self._upstreams:
            up.socks.clear()
        for server in self._tcp:
            server.close()
        tasks = list(self._tasks)  # TCP retries and TCP clients' connections
        for task in tasks:
            task.cancel()
        for server in self._tcp:
            await server.wait_closed()
        self._tcp.clear()
        # Awaited, so that each connection has closed its socket before stop() returns: left to the loop's end,
        # they ran on a closed loop ("Event loop is closed") wherever the caller closed it straight after.
        await asyncio.gather(*tasks, return_exceptions=True)
        for pending in self._pending.waiting():
            self._pending.remove(pending)
            if pending.fut is not None and not pending.fut.done():
                pending.fut.cancel()
        self._deadlines.clear()

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _listen(self, host: str, port: int) -> int:
        """Bind UDP, then TCP on the same port; with port 0, retry if TCP finds the UDP's port taken."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _ in range(10):
            sock = socket.socket(family, socket.SOCK_DGRAM)  # raises EAFNOSUPPORT without IPv6
            try:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(socket_address(host, port))
                bound_port = sock.getsockname()[1]
                server = await asyncio.start_server(self._serve_tcp, host, bound_port, reuse_address=True)
            except OSError:
                sock.close()
                if port:
                    raise
                continue
            sock.setblocking(False)
            _big_buffers(sock)
            self._udp.append(sock)
            self._tcp.append(server)
            assert self._loop is not None
            self._loop.add_reader(sock.fileno(), self._on_udp, sock)
            return bound_port
        raise OSError(f"dns: no free port for both UDP and TCP on {host}")

    # ---- the hot path ------------------------------------------------------------------------------------

    def _on_udp(self, sock: socket.socket) -> None:
        recvfrom = sock.recvfrom
        handle = self._handle
        for _ in range(BURST):
            try:
                data, addr = recvfrom(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("dns: receive error %s", exc)
                return
            if not addr[1]:  # a forged source: no answer can reach port 0, so it must not cost an upstream query
                self.counters.add("dns_port_zero")
                continue
            try:
                handle(data, addr, sock, None)
            except Exception:  # a bug must cost one query, never the listener
                self.counters.add("dns_errors")
                log.exception("dns: query from %s failed", addr[0])

    def _handle(self, data: bytes, addr: tuple, sock: socket.socket | None,
                fut: asyncio.Future | None) -> None:
        """One query from a client: answered from here (refused, policy, cache) or sent upstream."""
        now = time.monotonic()
        counts = data[4:12]
        # Fast path: a standard query (QR clear, opcode QUERY: byte 2 below 8), one question, no additional or
        # just an OPT.
        if (counts == wire.COUNTS_EDNS or counts == wire.COUNTS_PLAIN) and len(data) > 16 and data[2] < 8:
            end = data.find(0, 12) + 5
            question_bytes = data[12:end]
            q = self._questions.get(question_bytes)
            if q is None:
                try:
                    q = wire.parse_question(data)
                except wire.Malformed:
                    self._malformed(fut)
                    return
                if q.length + 12 == end:  # else a zero byte inside a label fooled the find(): don't remember
                    if len(self._questions) >= MAX_QUESTIONS:
                        self._questions.clear()
                    self._questions[question_bytes] = q
                else:
                    end = 12 + q.length
                    question_bytes = data[12:end]
            if counts == wire.COUNTS_EDNS:
                opt = wire.opt_at(data, end)
                if opt is None:
                    self._slow(data, addr, sock, fut, now)
                    return
                flags, client_max = opt
            else:
                flags, client_max = 0, 512
            if data[3] & 0x10:
                flags |= wire.FLAG_CD
        else:
            self._slow(data, addr, sock, fut, now)
            return
        self._query(data, q, question_bytes, flags, client_max, addr, sock, fut, now)

    def _query(self, data: bytes, q: wire.Question, question_bytes: bytes, flags: int, client_max: int,
               addr: tuple, sock: socket.socket | None, fut: asyncio.Future | None, now: float) -> None:
        client = self._clients.get(addr[0]) or self._client(addr)
        if fut is not None:
            client_max = 65535
        elif client_max > UDP_ANSWER_MAX:
            client_max = UDP_ANSWER_MAX
        if not client.allowed:
            self.counters.add("dns_refused")
            self._local(wire.error_reply(data, q.length, wire.REFUSED, bool(flags & wire.FLAG_EDNS)),
                        sock, addr, fut, client, None, q, now, _REFUSED)
            return
        if self._limit:
            if now - client.window >= RATE_WINDOW_S:
                client.window = now
                client.count = 0
            client.count += 1
            if client.count > self._limit:
                self.counters.add("dns_ratelimited")
                self._local(wire.error_reply(data, q.length, wire.REFUSED, bool(flags & wire.FLAG_EDNS)),
                            sock, addr, fut, client, None, q, now, _RATELIMITED)
                return
        if q.qclass != CLASS_IN and q.qclass != CLASS_ANY:
            # CHAOS and the like are about the server, not the internet: forwarded, the upstream told anyone on
            # the LAN its software and version (version.bind) or, from dnsmasq, its own upstreams (servers.bind).
            self.counters.add("dns_class_refused")
            self._local(wire.error_reply(data, q.length, wire.REFUSED, bool(flags & wire.FLAG_EDNS)),
                        sock, addr, fut, client, None, q, now, _REFUSED)
            return
        mac = self.mac_for(client.ip) if self.mac_for is not None else None
        decided = _ALLOWED
        if self.decide is not None:
            decision = self.decide(client.ip, mac, q.qname, q.qtype, data)
            if decision is not None:
                if decision.reply is not None:
                    self._local(data[:2] + decision.reply[2:], sock, addr, fut, client, mac, q, now, decision)
                    return
                decided = decision
        key = None
        if self._cache.size:
            key = q.cache_keys[flags]
            cached = self._cache.get(key, now)
            if cached is not None:
                self.counters.add("dns_cache_hits")
                response, decided = self._finish(
                    data[:2] + cached[2:12] + question_bytes + cached[12 + q.length :], data, q, client, mac, decided,
                    client_max)
                self._local(response, sock, addr, fut, client, mac, q, now, decided)
                return
        pending = _Pending(wire.clamp_udp_size(data, 12 + q.length), q, sock, addr, fut, client, mac, decided,
                           key, now, client_max)
        if not self._send_upstream(pending, now):
            self._fail(pending)

    def _local(self, response: bytes, sock: socket.socket | None, addr: tuple, fut: asyncio.Future | None,
               client: _Client, mac: str | None, q: wire.Question, t0: float, decided: Decision) -> None:
        """Send an answer (made here, or an upstream's as the client gets it) and log it."""
        self._reply(response, addr, sock, fut)
        if self.emit is not None:
            self.emit(DnsQuery(time.time(), client.ip, mac, q.qname, q.qtype, q.sld, response[3] & 0x0F,
                               (time.monotonic() - t0) * 1000.0, decided.verdict, decided.rule, "server",
                               decided.rule_words))

    def _send_upstream(self, p: _Pending, now: float) -> bool:
        """Send ``p`` to the first healthy upstream not yet tried (else the first untried); False if none is
        left or its budget is spent."""
        if now >= p.t0 + self._timeout:
            return False
        ups = self._upstreams
        if not p.tried and ups[0].down_until <= now:
            choice = 0  # the common case: first try, first upstream healthy
        else:
            choice = -1
            for i, up in enumerate(ups):
                if p.tried >> i & 1:
                    continue
                if up.down_until <= now:
                    choice = i
                    break
                if choice < 0:
                    choice = i
            if choice < 0:
                return False
        if self._pending.full():
            self.counters.add("dns_pending_full")
            return False
        bits = random.getrandbits(18)
        new_id = _IDS[bits & 0xFFFF]
        while new_id in self._pending:
            new_id = _IDS[random.getrandbits(16)]
        up = ups[choice]
        p.upstream = choice
        p.tried |= 1 << choice
        p.sent_id = new_id
        try:
            up.socks[(bits >> 16) % len(up.socks)].send(new_id + p.query[2:])
        except OSError:  # an earlier ICMP error surfaces here, or the route is gone
            up.down_until = now + DOWN_FOR_S
            return self._send_upstream(p, now)
        p.deadline = min(now + self._attempt_s, p.t0 + self._timeout)
        self._pending.add(p)
        heapq.heappush(self._deadlines, (p.deadline, new_id))
        return True

    def _on_upstream(self, up: _Upstream, sock: socket.socket) -> None:
        recv = sock.recv
        pending = self._pending
        for _ in range(BURST):
            try:
                data = recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                self._upstream_refused(up)
                continue
            except OSError as exc:
                log.debug("dns: upstream %s receive error %s", up.host, exc)
                return
            p = pending.get(data[:2])
            if p is None or self._upstreams[p.upstream] is not up or not p.answered_by(data):
                self.counters.add("dns_upstream_stray")
                continue
            pending.remove(p)
            if data[3] & 0x0F in (wire.SERVFAIL, wire.REFUSED) and self._untried(p):
                # A broken or misconfigured upstream: another may answer (dnsmasq does the same).
                self.counters.add("dns_upstream_failed")
                self._retry(p, time.monotonic())
                continue
            if data[2] & 0x02:  # truncated: ask the same upstream over TCP
                if self._tcp_retries >= MAX_TCP_RETRIES:
                    self.counters.add("dns_tcp_retries_full")
                    self._fail(p)
                    continue
                self._tcp_retries += 1
                task = asyncio.ensure_future(self._tcp_retry(p))
                self._tasks.add(task)
                task.add_done_callback(self._tcp_retry_done)  # not a finally: a task cancelled unstarted runs none
                continue
            self._answer_safely(p, data)

    def _answer_safely(self, p: _Pending, response: bytes) -> None:
        """``_answer``, where a bug (or a hook's) costs one query, never the upstream socket; a TCP client's
        connection is closed rather than left waiting with its slot."""
        try:
            self._answer(p, response, time.monotonic())
        except Exception:
            self.counters.add("dns_errors")
            log.exception("dns: answer for %s failed", p.question.qname)
            if p.fut is not None and not p.fut.done():
                p.fut.set_result(None)

    def _answer(self, p: _Pending, response: bytes, now: float) -> None:
        """Deliver an upstream answer to the client who asked (and cache it)."""
        q = p.question
        if p.key is not None:
            self._cache.put(p.key, response, q.length, now)
        response, decided = self._finish(p.query[:2] + response[2:], p.query, q, p.client, p.mac, p.decided,
                                         p.client_max)
        self._local(response, p.sock, p.addr, p.fut, p.client, p.mac, q, p.t0, decided)

    def _finish(self, response: bytes, query: bytes, q: wire.Question, client: _Client, mac: str | None,
                decided: Decision, client_max: int) -> tuple[bytes, Decision]:
        """The reply to ``query`` from ``response`` (an upstream's or the cache's answer, with the query's ID and
        question), and what to log as deciding it: the policy checks the whole answer (``check_response``, whose
        reply may replace it), and only then is it cut to a header and question with TC when bigger than the
        client takes (it asks again over TCP). Cut first, a cached answer's CNAME chain to a blocked name was
        hidden from the check."""
        if self.check_response is not None:
            decision = self.check_response(client.ip, mac, q.qname, response, query)
            if decision is not None:
                decided = decision
                if decision.reply is not None:
                    response = query[:2] + decision.reply[2:]
        if len(response) > client_max:
            end = 12 + q.length
            response = wire.truncated_reply(query[:2], response, query[12:end], wire.has_opt(query, end))
        return response, decided

    # ---- failures, timeouts, truncation ------------------------------------------------------------------

    def _fail(self, p: _Pending) -> None:
        """No upstream answered in time: SERVFAIL."""
        self.counters.add("dns_servfail")
        edns = wire.has_opt(p.query, 12 + p.question.length)
        self._local(wire.error_reply(p.query, p.question.length, wire.SERVFAIL, edns), p.sock, p.addr, p.fut,
                    p.client, p.mac, p.question, p.t0, p.decided)

    def _untried(self, p: _Pending) -> bool:
        return p.tried != (1 << len(self._upstreams)) - 1

    def _retry(self, p: _Pending, now: float) -> None:
        if not self._send_upstream(p, now):
            self._fail(p)

    def _sweep(self) -> None:
        now = time.monotonic()
        deadlines = self._deadlines
        pending = self._pending
        while deadlines and deadlines[0][0] <= now:
            _, key = heapq.heappop(deadlines)
            p = pending.get(key)
            if p is not None and p.deadline <= now:  # else answered, and the ID maybe reused since
                pending.remove(p)
                self.counters.add("dns_upstream_timeouts")
                self._upstreams[p.upstream].down_until = now + DOWN_FOR_S
                self._retry(p, now)
        assert self._loop is not None
        self._sweeper = self._loop.call_later(self._tick, self._sweep)

    def _upstream_refused(self, up: _Upstream) -> None:
        """The upstream's host says nothing listens there: move its queries on now rather than at timeout."""
        now = time.monotonic()
        up.down_until = now + DOWN_FOR_S
        self.counters.add("dns_upstream_refused")
        for p in self._pending.waiting():
            if self._upstreams[p.upstream] is up:
                self._pending.remove(p)
                self._retry(p, now)

    def _tcp_retry_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._tcp_retries -= 1

    async def _tcp_retry(self, p: _Pending) -> None:
        self.counters.add("dns_tcp_retries")
        up = self._upstreams[p.upstream]
        try:
            # What is left of this upstream's attempt: a TCP side that accepts and stalls must leave time
            # for the next upstream.
            response = await asyncio.wait_for(_tcp_exchange(up.host, up.port, p.sent_id + p.query[2:]),
                                              p.deadline - time.monotonic())
            if not p.answered_by(response):
                raise wire.Malformed("TCP answer does not match the question")
        except (OSError, TimeoutError, asyncio.IncompleteReadError, wire.Malformed) as exc:
            log.debug("dns: TCP retry to %s failed: %s", up.host, exc)
            up.down_until = time.monotonic() + DOWN_FOR_S
            self._retry(p, time.monotonic())
            return
        self._answer_safely(p, response)

    # ---- the slow path: odd queries, new clients, TCP clients ----------------------------------------------

    def _slow(self, data: bytes, addr: tuple, sock: socket.socket | None, fut: asyncio.Future | None,
              now: float) -> None:
        """Queries the fast path does not recognise: responses (dropped), other opcodes (NOTIMP), a question count
        other than 1 (FORMERR), queries with several additionals (TSIG, cookies) or an OPT elsewhere. Outsiders
        get REFUSED for the answers made here, whatever they ask, as _query refuses their queries."""
        if len(data) < 12 or data[2] & 0x80:
            self._malformed(fut)
            return
        if data[2] & 0x78:
            try:
                length = wire.question_end(data) - 12
            except wire.Malformed:
                self._malformed(fut)
                return
            if not self._client(addr).allowed:
                self.counters.add("dns_refused")
                reply = wire.error_reply(data, length, wire.REFUSED, False)
            else:
                self.counters.add("dns_notimp")
                reply = wire.error_reply(data, length, wire.NOTIMP, False)
            self._reply(reply, addr, sock, fut)
            return
        if data[4] or data[5] != 1:
            # RFC 9619: a query holds exactly one question. Dropped, the client waited out its timeout and asked
            # again; BIND and Unbound answer FORMERR, with the header alone (which question would it echo?).
            if not self._client(addr).allowed:
                self.counters.add("dns_refused")
                self._reply(wire.header_reply(data, wire.REFUSED), addr, sock, fut)
                return
            self.counters.add("dns_malformed")
            self.counters.add("dns_formerr")
            self._reply(wire.header_reply(data, wire.FORMERR), addr, sock, fut)
            return
        try:
            q, flags, client_max = wire.full_parse(data)
        except wire.Malformed:
            self._malformed(fut)
            return
        self._query(data, q, data[12 : 12 + q.length], flags, client_max, addr, sock, fut, now)

    def _reply(self, reply: bytes, addr: tuple, sock: socket.socket | None, fut: asyncio.Future | None) -> None:
        """Send a reply made here: to the UDP client's address, or as the TCP connection's answer."""
        if fut is None:
            try:
                sock.sendto(reply, addr)  # type: ignore[union-attr]
            except OSError:
                self.counters.add("dns_send_errors")
        elif not fut.done():
            fut.set_result(reply)

    def _malformed(self, fut: asyncio.Future | None) -> None:
        self.counters.add("dns_malformed")
        if fut is not None and not fut.done():
            fut.set_result(None)  # a TCP client sending garbage loses its connection

    def _client(self, addr: tuple) -> _Client:
        """The state of the client at ``addr`` (the socket's peer address), made on its first query. Keyed by the
        address's text, and a link-local one also by its scope id: Python's text has no ``%eth0``, and the same
        address on two links is two clients. So a link-local client misses the hot path's lookup by text and is
        found here."""
        raw = addr[0]
        key = (raw, addr[3]) if len(addr) > 3 and addr[3] else raw
        client = self._clients.get(key) or self._outsiders.get(key)
        if client is not None:
            return client
        address = peer_ip(raw)
        allowed = any(address in net for net in self._lan)
        if allowed and address.version == 6 and address.is_link_local:
            allowed = on_lan_link(addr[3] if len(addr) > 3 else 0, self._links)
        client = _Client(raw.split("%", 1)[0], allowed)
        table = self._clients if client.allowed else self._outsiders
        if len(table) >= MAX_CLIENTS:
            table.clear()
        table[key] = client
        return client

    @property
    def _tcp_clients(self) -> int:
        """Open DNS-over-TCP connections: summed when one is accepted (at most MAX_TCP_CLIENTS addresses)."""
        return sum(self._tcp_held.values())

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """DNS over TCP: 2-byte length framing, one query at a time per connection."""
        task = asyncio.current_task()
        if task is not None:  # stop() ends it
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        peer = writer.get_extra_info("peername")
        assert self._loop is not None
        # Outsiders are turned away before they take a slot: else they could hold every one and shut the LAN out.
        client = self._client(peer) if peer else None
        if client is None or not client.allowed:
            self.counters.add("dns_tcp_refused")
            writer.close()
            return
        held = self._tcp_held.get(client.ip, 0)
        if self._tcp_clients >= MAX_TCP_CLIENTS or held >= MAX_TCP_PER_CLIENT:
            self.counters.add("dns_tcp_rejected")
            writer.close()
            return
        self._tcp_held[client.ip] = held + 1
        # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancel that comes as the awaited thing
        # finishes (a drain done at once), and stop() then waited out the next read's TCP_IDLE_S.
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_S):
                    head = await reader.readexactly(2)
                async with asyncio.timeout(TCP_IDLE_S):
                    data = await reader.readexactly(int.from_bytes(head, "big"))
                fut: asyncio.Future = self._loop.create_future()
                try:
                    self._handle(data, peer, None, fut)
                except Exception:
                    self.counters.add("dns_errors")
                    log.exception("dns: TCP query from %s failed", peer[0])
                    break
                # Every path resolves fut within the upstream timeout; the bound is for a bug that does not.
                async with asyncio.timeout(self._timeout + TCP_IDLE_S):
                    response = await fut
                if response is None:
                    break
                writer.write(len(response).to_bytes(2, "big") + response)
                try:
                    # A client that sends queries and never reads its answers would hold its slot for good.
                    async with asyncio.timeout(TCP_IDLE_S):
                        await writer.drain()
                except TimeoutError:
                    self.counters.add("dns_tcp_stalled")
                    writer.transport.abort()  # close() would wait to flush what the client does not read
                    break
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            if self._tcp_held[client.ip] == 1:
                del self._tcp_held[client.ip]
            else:
                self._tcp_held[client.ip] -= 1
            writer.close()


async def _tcp_exchange(host: str, port: int, message: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(len(message).to_bytes(2, "big") + message)
        await writer.drain()
        length = int.from_bytes(await reader.readexactly(2), "big")
        return await reader.readexactly(length)
    finally:
        writer.close()


def _upstream(text: str) -> tuple[str, int]:
    """The config file's upstreams were checked by config.validate; a DnsConfig built in code is checked here."""
    try:
        return upstream_address(text)
    except ValueError as exc:
        raise ValueError(f"dns.upstreams: {exc}") from None


def _big_buffers(sock: socket.socket) -> None:
    for option in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_BYTES)
            return
        except OSError:
            continue
