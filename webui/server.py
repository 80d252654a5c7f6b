"""Serving the app with waitress: in the foreground for ``iotgw web``, or in a thread for ``iotgw demo`` and
the browser tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from waitress import create_server
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


def make_server(store: Store, cfg: Config, host: str, port: int):  # noqa: ANN201
    """A waitress server for the app, bound (port 0 picks a free one: see ``effective_port``)."""
    # No proxy headers are trusted: the peer address decides whether the setup page is offered.
    return create_server(
        create_app(store, cfg),
        host=host,
        port=port,
        threads=THREADS,
        ident="iotgw",
        clear_untrusted_proxy_headers=True,
        max_request_body_size=MAX_READ_BYTES,
    )


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

    return RunningServer(host=server.effective_host, port=server.effective_port, stop=stop)
