"""``iotgw web``: the web UI and JSON API in their own process, on the daemon's database."""

from __future__ import annotations

import argparse
import logging
import shlex
import socket

from gateway.cli import add_state_args, config_from_args, interrupt_on_stop_signals, non_empty
from gateway.config import ConfigError, parse_hostport

log = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("web", help="serve the web UI and JSON API")
    add_state_args(p)
    p.add_argument(
        "--listen", type=non_empty, metavar="HOST:PORT", help="address to serve on (default [web].listen, 0.0.0.0:8080)"
    )
    p.add_argument("--state-dir", type=non_empty, metavar="DIR",
                   help="state directory: the session signing key, and the database unless --db")
    p.set_defaults(func=_web)


def _web(args: argparse.Namespace) -> int:
    from gateway import accounts
    from gateway.commands.daemon import state_in_use
    from gateway.store.db import Store
    from webui.server import serve  # lazily: the daemon and the other commands never import Flask

    cfg = config_from_args(args)
    if args.listen:
        cfg.web.listen = args.listen
    where = "--listen" if args.listen else f"{cfg.source}: web.listen"
    try:
        host, port = parse_hostport(cfg.web.listen, 8080)
        # A host name that does not resolve passes parse_hostport; waitress would refuse it with a traceback
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    except socket.gaierror as exc:
        raise ConfigError(f"{where}: cannot listen on {host!r}: {exc.strerror}") from exc
    # systemd stops the service with SIGTERM: it ends the server as Ctrl-C does (waitress's loop takes the
    # KeyboardInterrupt and returns), so the clean-up below runs, rather than the process dying where it stands.
    interrupt_on_stop_signals()
    if not state_in_use(cfg):
        return 1
    store = Store(cfg.db_url)
    try:
        shown = f"[{host}]" if ":" in host else host
        log.info("web UI on http://%s:%d/", shown, port)
        if not accounts.has_password(store):
            # The same --config and --db, or the password would go to another database than the one served.
            same = "".join(f" --{flag} {shlex.quote(value)}"
                           for flag, value in (("config", args.config), ("db", args.db)) if value)
            log.warning("no admin password yet: open the web UI from the LAN, or run `iotgw user set-password%s`",
                        same)
        serve(store, cfg, host, port)
    except KeyboardInterrupt:  # one that came before waitress's loop, which takes its own
        pass
    finally:
        store.close()  # the last connection to close checkpoints SQLite's WAL into the database file
        log.info("web UI stopped")
    return 0
