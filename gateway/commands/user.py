"""``iotgw user``: the web UI's admin password and API tokens."""

from __future__ import annotations

import argparse
import getpass
import sys
import time
import unicodedata

from gateway.cli import add_state_args, config_from_args


def add_commands(sub: argparse._SubParsersAction) -> None:
    user = sub.add_parser("user", help="web UI password and API tokens")
    add_state_args(user)
    user_sub = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")

    p = user_sub.add_parser(
        "set-password", help="set the admin password (prompts, or reads one line from stdin)"
    )
    add_state_args(p, again=True)
    p.add_argument("--username", default="admin", help=argparse.SUPPRESS)
    p.set_defaults(func=_set_password)

    token = user_sub.add_parser("token", help="API bearer tokens")
    add_state_args(token, again=True)
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    p = token_sub.add_parser("create", help="create a token and print it once")
    add_state_args(p, again=True)
    p.add_argument("name", help="what will use the token, e.g. 'home-assistant'")
    p.add_argument(
        "--scope",
        choices=("read", "write"),
        default="read",
        help="read (default) or write (may rename devices and change policies)",
    )
    p.add_argument(
        "--expires",
        type=_lifetime,
        default="90",  # accounts.TOKEN_DEFAULT_DAYS, not imported for --help
        metavar="DAYS",
        help="days until the token stops working: 30, 90 (default), 365 or never",
    )
    p.set_defaults(func=_token_create)
    p = token_sub.add_parser("list", help="tokens not revoked, expired ones marked")
    add_state_args(p, again=True)
    p.set_defaults(func=_token_list)
    p = token_sub.add_parser("revoke", help="revoke a token by id")
    add_state_args(p, again=True)
    p.add_argument("id", type=int, help="the token's number, as token list prints it")
    p.set_defaults(func=_token_revoke)


def _lifetime(text: str) -> int | None:
    """An argparse type: ``--expires`` as days, None for never; a usage error (exit 2) for any other value."""
    from gateway import accounts  # only once ``token create`` is parsed: it loads SQLAlchemy and argon2

    try:
        return accounts.parse_lifetime(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _store(args: argparse.Namespace):  # noqa: ANN202 - a Store; imported lazily to keep --help fast
    from gateway.store.db import Store

    return Store(config_from_args(args).db_url)


def _set_password(args: argparse.Namespace) -> int:
    from gateway import accounts

    if sys.stdin.isatty():
        password = getpass.getpass("New password: ")
        if getpass.getpass("Again: ") != password:
            print("iotgw: the passwords differ; nothing changed", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    try:  # stdin's undecodable bytes arrive as lone surrogates; the hash would fail on them, saying "codec"
        password.encode("utf-8")
    except UnicodeEncodeError:
        print("iotgw: the password is not UTF-8 text; nothing changed", file=sys.stderr)
        return 1
    try:
        accounts.set_password(_store(args), password, args.username)
    except ValueError as exc:
        print(f"iotgw: {exc}", file=sys.stderr)
        return 1
    print(f"password set for {args.username}")
    return 0


def _token_create(args: argparse.Namespace) -> int:
    from gateway import accounts

    try:
        token, secret = accounts.create_token(_store(args), args.name, args.scope, args.expires)
    except ValueError as exc:
        print(f"iotgw: {exc}", file=sys.stderr)
        return 1
    print(secret)
    expires = f"expires {_minute(token.expires_at)}" if token.expires_at else "never expires"
    print(f"token {token.id} ({token.scope}, {expires}) created; it is shown only now", file=sys.stderr)
    return 0


def _token_list(args: argparse.Namespace) -> int:
    from gateway import accounts

    for t in accounts.list_tokens(_store(args)):
        used = _minute(t.last_used_at) if t.last_used_at else "never"
        if t.expires_at is None:
            expires = "never expires"
        else:
            expires = f"{'expired' if accounts.is_expired(t) else 'expires'} {_minute(t.expires_at)}"
        print(f"{t.id}\t{t.scope}\t{_printable(t.name)}\tlast used {used}\t{expires}")
    return 0


def _minute(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _printable(name: str) -> str:
    """A name stored before such names were refused, its control characters written out (ESC as \\u001b): they
    would break the tab-separated line or drive the terminal."""
    from policy.model import CONTROL_CATEGORIES

    return "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) in CONTROL_CATEGORIES else c for c in name)


def _token_revoke(args: argparse.Namespace) -> int:
    from gateway import accounts

    try:
        accounts.revoke_token(_store(args), args.id)
    except accounts.TokenNotFound:
        print(f"iotgw: no live token {args.id}", file=sys.stderr)
        return 1
    print(f"token {args.id} revoked")
    return 0
