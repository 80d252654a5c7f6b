"""Small real DNS upstreams on loopback (asyncio UDP and TCP sockets) for the faults dnsmasq cannot produce:
slow, silent, SERVFAIL, truncating, spoofed answers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import dns.flags
import dns.message
import dns.rrset

from tests.ports import free_port

Reply = Callable[[dns.message.Message], "tuple[float, bytes | None]"]


def answer(address: str) -> Reply:
    def reply(query: dns.message.Message) -> tuple[float, bytes | None]:
        msg = dns.message.make_response(query)
        msg.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", address))
        return 0.0, msg.to_wire()
    return reply


def slow(seconds: float, inner: Reply) -> Reply:
    return lambda query: (seconds, inner(query)[1])


def rcode_reply(code: int) -> Reply:
    def reply(query: dns.message.Message) -> tuple[float, bytes | None]:
        msg = dns.message.make_response(query)
        msg.set_rcode(code)
        return 0.0, msg.to_wire()
    return reply


def truncated(query: dns.message.Message) -> tuple[float, bytes | None]:
    msg = dns.message.make_response(query)
    msg.flags |= dns.flags.TC
    return 0.0, msg.to_wire()


def silent(query: dns.message.Message) -> tuple[float, bytes | None]:
    return 0.0, None


def echo(query: dns.message.Message) -> tuple[float, bytes | None]:
    """The query sent back as it came (QR clear): right ID, right question, and no answer at all."""
    return 0.0, query.to_wire()


def wrong_id(query: dns.message.Message) -> tuple[float, bytes | None]:
    """A spoofer's answer: right question, ID off by one."""
    _, wire = answer("198.51.100.66")(query)
    assert wire is not None
    return 0.0, ((int.from_bytes(wire[:2], "big") + 1) & 0xFFFF).to_bytes(2, "big") + wire[2:]


class FakeUpstream:
    """A DNS server on loopback whose UDP and TCP answers are whatever ``udp`` and ``tcp`` return (after their
    delay); ``tcp=None`` means nothing listens on TCP. Counts the queries it received."""

    def __init__(self, udp: Reply, tcp: Reply | None = None) -> None:
        self.udp = udp
        self.tcp_reply = tcp
        self.port = free_port()
        self.queries = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> FakeUpstream:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop answering: afterwards the port is closed (the kernel refuses queries to it)."""
        if not self.thread.is_alive():
            return

        async def close() -> None:
            self.transport.close()
            if self.server is not None:
                self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _start(self) -> None:
        outer = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple) -> None:
                outer.queries += 1
                delay, wire = outer.udp(dns.message.from_wire(data))
                if wire is not None:
                    outer.loop.call_later(delay, self.transport.sendto, wire, addr)  # type: ignore[attr-defined]

        self.transport, _ = await self.loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", self.port))
        self.server = None
        if self.tcp_reply is not None:
            self.server = await asyncio.start_server(self._serve_tcp, "127.0.0.1", self.port)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.tcp_reply is not None
        try:
            head = await reader.readexactly(2)
            query = dns.message.from_wire(await reader.readexactly(int.from_bytes(head, "big")))
            self.queries += 1
            delay, wire = self.tcp_reply(query)
            await asyncio.sleep(delay)
            if wire is None:
                await asyncio.sleep(10)  # accepts, never answers
                return
            writer.write(len(wire).to_bytes(2, "big") + wire)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
