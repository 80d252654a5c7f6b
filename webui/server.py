"""Serving the app with waitress: in the foreground for ``iotgw web``, or in a thread for ``iotgw demo`` and
the browser tests."""

from __future__ import annotations

import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import MultiSocketServer, TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher
from waitress.wasyncore import close_all

from gateway.config import Config
from gateway.store.db import Store
from webui.app import MAX_BODY_BYTES, create_app

THREADS = 4  # a Pi has four cores; the views spend their time in SQLite, not in Python
# Waitress reads a whole request body (to a temporary file past 512 KiB) before the app sees it, up to 1 GiB by
# default: anyone on the LAN, before any login, could make it take in a gigabyte per connection only to hear 413
# from Flask. So waitress stops reading at twice the app's limit, and the app keeps the exact one: waitress counts a
# chunked body's framing too, which must not turn away a body within the limit.
MAX_READ_BYTES = 2 * MAX_BODY_BYTES
# Waitress's default, stated because the cap below is a share of it: it counts the listening socket and the loop's
# trigger too, so 98 clients fit. More would cost descriptors (up to three per connection, past its buffers).
CONNECTION_LIMIT = 100
# Connections one client address may hold; more are closed as soon as they are accepted. Waitress has no such cap:
# 110 idle half-sent requests from one LAN host (a compromised device) took every slot, and the owner's browser got
# no answer until they timed out. A browser keeps up to 6 connections per host, shared by its tabs; two browsers on
# the owner's machine and a Home Assistant integration polling fit in 16, and one host takes at most a sixth.
MAX_CONNECTIONS_PER_CLIENT = 16
# Waitress closes a connection that has sent nothing for channel_timeout (120 s by default), checked every
# cleanup_interval (30 s): an idle keep-alive connection or a request sent in part (its headers never end) holds a
# slot for up to 150 s. Now 30-40 s: the dashboard polls every 15 s, and a browser whose idle connection was closed
# opens another. A client sending a byte now and then keeps its connection: the cap above is what bounds it.
CHANNEL_TIMEOUT_S = 30
CLEANUP_INTERVAL_S = 10

log = logging.getLogger(__name__)


@dataclass
class RunningServer:
    """A server started by ``serve_in_thread``: where it listens and how to stop it."""

    host: str
    port: int
    stop: Callable[[], None]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


class _CappedServer(TcpWSGIServer):
    """Waitress's TCP server, refusing a connection from an address that already holds its share."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - TcpWSGIServer's own
        super().__init__(*args, **kwargs)
        self._refusing: set[str] = set()  # addresses at the cap that were warned about: once, or retries flood the log

    def accept(self) -> tuple | None:
        """``handle_accept`` makes a channel of what this returns, and nothing of None (its answer when no
        connection was waiting): so a refused connection is closed before anything is read from it."""
        accepted = super().accept()
        if accepted is None:
            return None
        conn, addr = accepted
        address = self.fix_addr(addr)[0]  # as the channels' addr has it: fe80::2 on two links is two clients
        # Counted over the map, which all of a host name's listening sockets share, rather than kept in a tally
        # that a missed close would skew; the map holds at most CONNECTION_LIMIT entries.
        held = Counter(ch.addr[0] for ch in self._map.values() if isinstance(ch, HTTPChannel))
        # Only addresses still at the cap are kept: at most CONNECTION_LIMIT / MAX_CONNECTIONS_PER_CLIENT of them.
        self._refusing &= {other for other, n in held.items() if n >= MAX_CONNECTIONS_PER_CLIENT}
        if held[address] < MAX_CONNECTIONS_PER_CLIENT:
            return accepted
        conn.close()
        if address not in self._refusing:
            self._refusing.add(address)
            log.warning("web UI: %s holds %d connections; refusing more from it", address, held[address])
        return None

    def fix_addr(self, addr: tuple) -> tuple:
        """The peer address a channel keeps, and waitress hands the app as REMOTE_ADDR: a link-local peer's with
        its interface (``fe80::2%eth0``), which the LAN check needs (``security.from_lan``). Python's accept()
        gives the scope id only as the 4th item of the tuple and its host text without it, so the REMOTE_ADDR of
        fe80::2 on the LAN and of fe80::2 on the WAN port were the same. Named at accept, as it is in a log line;
        its index when the interface has no name by then."""
        if len(addr) < 4 or not addr[3]:
            return addr
        try:
            zone = socket.if_indextoname(addr[3])
        except OSError:
            zone = str(addr[3])
        return (f"{addr[0]}%{zone}", *addr[1:])


def make_server(store: Store, cfg: Config, host: str, port: int):  # noqa: ANN201
    """A waitress server for the app, bound (port 0 picks a free one: see ``effective_port``).

    What ``waitress.create_server`` does, with ``_CappedServer`` for its TCP server, which it does not let one
    choose: a server per address the host name resolves to (``localhost``: 127.0.0.1 and ::1), sharing one
    socket map and one pool of threads."""
    # No proxy headers are trusted: the peer address decides whether the setup page is offered.
    adj = Adjustments(
        host=host,
        port=port,
        threads=THREADS,
        ident="iotgw",
        clear_untrusted_proxy_headers=True,
        max_request_body_size=MAX_READ_BYTES,
        connection_limit=CONNECTION_LIMIT,
        channel_timeout=CHANNEL_TIMEOUT_S,
        cleanup_interval=CLEANUP_INTERVAL_S,
    )
    app = create_app(store, cfg)
    dispatcher = ThreadedTaskDispatcher()
    socket_map: dict = {}
    servers = [_CappedServer(app, socket_map, dispatcher=dispatcher, adj=adj, sockinfo=info) for info in adj.listen]
    dispatcher.set_thread_count(adj.threads)  # once bound: an address in use leaves no threads behind
    if len(servers) == 1:
        return servers[0]
    listen = [(server.effective_host, server.effective_port) for server in servers]
    return MultiSocketServer(socket_map, adj, listen, dispatcher, servers[0].log_info)


def serve(store: Store, cfg: Config, host: str, port: int) -> None:
    """Serve until interrupted."""
    server = make_server(store, cfg, host, port)
    try:
        server.run()
    finally:
        server.close()


def serve_in_thread(
    store: Store, cfg: Config, host: str = "127.0.0.1", port: int = 0
) -> RunningServer:
    """Start serving in a daemon thread; ``.stop()`` closes every connection and joins the thread."""
    server = make_server(store, cfg, host, port)
    thread = threading.Thread(target=server.run, name="iotgw-web", daemon=True)
    thread.start()

    def stop() -> None:
        def shutdown() -> None:  # runs inside the server's loop, the only thread that may touch its sockets
            server.task_dispatcher.shutdown()
            close_all(server._map)

        server.trigger.pull_trigger(shutdown)
        thread.join(timeout=10)

    # getnameinfo gives the port as a string; socket.connect wants the number RunningServer says it is
    return RunningServer(host=server.effective_host, port=int(server.effective_port), stop=stop)
