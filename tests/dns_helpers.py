"""Real parts for the DNS tests: dnsmasq on loopback as the upstream, and the server running in a thread."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from gateway.config import DnsConfig
from gateway.dns import DnsServer
from gateway.events import Counters, DnsQuery
from tests.ports import free_port

needs_dnsmasq = pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq is not installed")


class Dnsmasq:
    """dnsmasq answering for example.test from host records with a known TTL, never forwarding; ``extra``
    options add records a test needs (a CNAME chain, say)."""

    def __init__(self, tmp: Path, ttl: int = 300, extra: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.cmd = [
            "dnsmasq", "--no-daemon", "--keep-in-foreground", f"--port={self.port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces", "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--user=root",
            f"--pid-file={tmp / 'dnsmasq.pid'}", f"--local-ttl={ttl}",
            "--local=/example.test/",  # names not listed here are NXDOMAIN, not REFUSED
            "--host-record=www.example.test,192.0.2.10,2001:db8::10",
            "--host-record=other.example.test,192.0.2.11",
            # A big answer: more than a 512-byte UDP reply holds.
            *[f"--host-record=big.example.test,192.0.2.{i}" for i in range(1, 60)],
            *extra,
        ]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                ask(self.port, "www.example.test", timeout=0.2)
                return
            except dns.exception.Timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"dnsmasq exited: {self.proc.stderr.read().decode()}") from None
        raise RuntimeError("dnsmasq does not answer")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def ask(port: int, name: str, rdtype: str = "A", *, host: str = "127.0.0.1", tcp: bool = False,
        timeout: float = 3.0, source: str | None = None, **make: object) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **make)
    if tcp:
        return dns.query.tcp(query, host, port=port, timeout=timeout, source=source)
    return dns.query.udp(query, host, port=port, timeout=timeout, source=source)


class Running:
    """A started DnsServer on its own event loop thread, with the events it emitted (the server emits after
    answering, so read them once the ``running`` block has ended)."""

    def __init__(self, server: DnsServer, loop: asyncio.AbstractEventLoop, events: list[DnsQuery]) -> None:
        self.server = server
        self.loop = loop
        self.events = events

    @property
    def port(self) -> int:
        return self.server.bound[0][1]

    @property
    def counters(self) -> Counters:
        return self.server.counters

    def call(self, fn, *args):  # noqa: ANN001, ANN201 - runs fn on the server's loop, for state checks
        return asyncio.run_coroutine_threadsafe(_call(fn, *args), self.loop).result(5)


async def _call(fn, *args):  # noqa: ANN001, ANN202
    return fn(*args)


@contextmanager
def running(config: DnsConfig, *, within: Callable[[], AbstractContextManager] | None = None,
            **hooks: object) -> Iterator[Running]:
    """A DnsServer on a loop of its own thread; ``within`` (e.g. a network namespace's ``enter``) is the context
    that thread runs in, so the server's sockets are made there."""
    events: list[DnsQuery] = []
    hooks.setdefault("emit", events.append)
    loop = asyncio.new_event_loop()

    def serve() -> None:
        with within() if within else nullcontext():
            loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    server = DnsServer(config, Counters(), **hooks)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        try:
            yield Running(server, loop, events)
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def config(upstreams: list[str], **kw: object) -> DnsConfig:
    kw.setdefault("listen", ["127.0.0.1:0"])
    kw.setdefault("lan", ["127.0.0.0/8", "::1/128"])
    kw.setdefault("timeout_s", 1.0)
    return DnsConfig(upstreams=upstreams, **kw)


def rcode(msg: dns.message.Message) -> str:
    return dns.rcode.to_text(msg.rcode())
