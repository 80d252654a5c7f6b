"""A real HTTP server in this process for block-list fetches, whose GET is a function the test gives.

Loopback by default; ``capture_netns.http_server`` puts it in a network namespace, for fetches that must come
from another host.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

DoGet = Callable[[http.server.BaseHTTPRequestHandler], None]


@contextlib.contextmanager
def list_server(do_get: DoGet, host: str = "127.0.0.1",
                bind: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext) -> Iterator[str]:
    """Serve GET with ``do_get`` on ``host``, a thread per connection (a slow answer must not hold up the next);
    ``bind`` is entered while the listening socket is made, which decides its network namespace and that of
    every connection it accepts. Yields the base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            do_get(self)

        def log_message(self, *args) -> None:  # noqa: ANN002
            pass

    with bind():
        server = http.server.ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{host}:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def replying(body: bytes | Callable[[], bytes], asked: list[str] | None = None) -> DoGet:
    """A GET answered 200 with ``body`` (called at each request when the test changes it between fetches),
    each path asked for noted in ``asked``."""

    def do_get(handler: http.server.BaseHTTPRequestHandler) -> None:
        if asked is not None:
            asked.append(handler.path)
        handler.send_response(200)
        handler.end_headers()
        handler.wfile.write(body() if callable(body) else body)

    return do_get
