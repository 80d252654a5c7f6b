"""The ``iotgw`` command: the composition root. Each command group lives in ``gateway/commands/<group>.py``
and registers itself with ``add_commands(subparsers)``; handlers import what they need lazily, so
``iotgw --help`` stays fast and the daemon never loads torch.
"""

from __future__ import annotations

import argparse
import errno
import functools
import importlib
import logging
import math
import os
import select
import signal
import sys
from collections.abc import Callable
from gettext import gettext  # argparse's messages go through it
from pathlib import Path
from typing import NoReturn

from gateway.config import Config, ConfigError, check_addresses, check_database_url, check_mqtt_url, load

COMMAND_MODULES = (
    "gateway.commands.daemon",  # run, demo, replay
    "gateway.commands.inspect",  # devices, queries
    "gateway.commands.policy",  # policy rules, lists, schedules, pause, quarantine
    "gateway.commands.user",  # set-password, token create/list/revoke
    "gateway.commands.web",  # the web UI
    "gateway.commands.federation",  # federation server, join, keygen, rollback
    "gateway.commands.doctor",  # doctor
    "gateway.commands.setup",  # setup (first boot)
    "gateway.commands.identify",  # identify, train, evaluate
    "gateway.commands.backup",  # backup, restore
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)  # one line per migration step is noise
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so a reader that left (`| head`) is met below rather than at exit
        return code
    except ConfigError as exc:
        print(f"iotgw: configuration error: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:  # the usual cause: a root-only command run from a user's shell
        print(f"iotgw: {permission_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        if not stdout_reader_gone():
            raise
        # `iotgw queries | head`: the reader has what it wanted. Later writes (the interpreter's own flush at
        # exit) go nowhere rather than raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        # A write that found no room (`> /dev/full`, a full disk or quota): Python names no file for a write on an
        # open one, so neither can this; the words are enough to act on, a traceback is not.
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or exc.filename is not None:  # (EIO can be a read's)
            raise
        print(f"iotgw: a write failed: {exc.strerror}", file=sys.stderr)
        try:
            sys.stdout.flush()
        except OSError:  # stdout itself: the interpreter's flush at exit would fail again, with a traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        if _database_unavailable(exc):
            print(f"iotgw: cannot open the database {exc} (--db, or [store] url in the config)", file=sys.stderr)
            return 2
        if not _database_busy(exc):
            raise
        from gateway.store.db import BUSY_TIMEOUT_S

        print(f"iotgw: the database is busy: another process (the daemon, the web UI, another command) held it "
              f"for {BUSY_TIMEOUT_S:.0f} s; nothing was changed, try again", file=sys.stderr)
        return 1


def _database_busy(exc: Exception) -> bool:
    """SQLite's "database is locked" after its busy timeout (``gateway.store.db.database_busy``). A command that
    never loaded SQLAlchemy cannot have raised it, and ``iotgw --help`` must not load it to find out."""
    if "sqlalchemy" not in sys.modules:
        return False
    from gateway.store.db import database_busy

    return database_busy(exc)


def _database_unavailable(exc: Exception) -> bool:
    """``gateway.store.db.DatabaseUnavailable``, looked for the way ``_database_busy`` does."""
    if "gateway.store.db" not in sys.modules:
        return False
    from gateway.store.db import DatabaseUnavailable

    return isinstance(exc, DatabaseUnavailable)


def stdout_reader_gone() -> bool:
    """True when stdout is a pipe whose reader has closed it; a broken pipe elsewhere (a socket) is an error."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def interrupt_on_stop_signals() -> None:
    """SIGTERM (systemd, ``kill``, a cancelled CI job) and SIGINT both end the program the way Ctrl-C does, so its
    ``finally`` stops what it started (Flower processes, a benchmark's servers and namespaces). Set explicitly,
    like the daemon's handlers: a background job inherits SIGINT ignored."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)


def permission_message(exc: PermissionError) -> str:
    """One line for a PermissionError: the path refused and who can do it."""
    what = exc.filename if exc.filename is not None else exc
    return f"permission denied: {what}: run this as root (sudo) or as the iotgw user"


class Parser(argparse.ArgumentParser):
    """A parser that takes only whole flag names. With argparse's prefix matching, ``--d`` on ``policy schedule``
    was ``--day`` or the hidden ``--db``, and a flag added later would silently change what an abbreviation in
    someone's script means. ``add_subparsers`` makes its parsers of the parent's class, so every ACTION's parser
    takes only whole names too (``allow_abbrev`` itself is not inherited).

    argparse has no public way to name the flag behind a refused value, nor to give every subcommand's parser an
    argument, so this reaches into three of its internals: the ``_check_value(action, value)`` hook, the
    ``_option_string_actions`` table and the ``_SubParsersAction`` class (registered as "parsers"). Checked by
    running tests/test_cli.py on CPython 3.11.7, 3.12.1 and 3.13.0, and by reading the argparse.py of CPython's
    main branch (3.15, with ``suggest_on_error`` and ``color`` on by default): all three are still there, and the
    hook is still called for every positional with choices, subcommands included. Were a later argparse to stop
    calling it, the flag would go unnamed (argparse's own "invalid choice" instead) and
    test_an_unknown_flag_before_a_positional_is_named_not_the_positional would fail to say so."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)
        self._arg_strings: list[str] = []
        self._is_action = False  # a COMMAND's or ACTION's parser (made by _Commands.add_parser)
        self.register("action", "parsers", _Commands)

    # argparse puts a flag it does not know aside and takes the value the user meant for it as the next
    # positional: ``policy --sta X show`` said "argument ACTION: invalid choice: 'X'", naming neither what was
    # wrong nor where. When a positional is refused and an unknown flag came before it, the flag is named instead,
    # in argparse's own words for it.

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's signature
        self._arg_strings = list(sys.argv[1:] if args is None else args)  # a subparser is called with its own
        # Every value is checked to be UTF-8 (_utf8_checked) by its own action, which names it. Wrapped here, not
        # in add_argument: an argument group's add_argument never reaches ours.
        for action in self._actions:
            if action.nargs not in (0, argparse.PARSER):  # PARSER: a subcommand, a parser's name, not a value
                if not getattr(action.type, "checks_utf8", False):
                    action.type = _utf8_checked(action.type)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self._is_action:
            # argparse hands what a COMMAND's parser did not take up to ``iotgw``, which refused it with its own
            # usage (``policy --sta=X show``: "usage: iotgw [-h] [-v] COMMAND"); the parser that was given it says so
            self.error(_unrecognized(extras))
        return namespace, extras

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's signature
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(_unrecognized(extras))
        return namespace

    def _check_value(self, action: argparse.Action, value: object) -> None:
        if not action.option_strings and action.choices is not None and value not in action.choices:
            flag = self._unknown_flag_before(value)
            if flag:
                raise argparse.ArgumentError(None, _unrecognized([flag]))
        super()._check_value(action, value)

    def error(self, message: str) -> NoReturn:
        if message.startswith(_MISSING_ARGUMENTS):  # ``policy strict --mod on``: "on" became the scope, no mode
            flag = self._unknown_flag_before(None)
            if flag:
                message = _unrecognized([flag])
        super().error(message)

    def _unknown_flag_before(self, value: object) -> str | None:
        """The first flag-like argument this parser does not know, before ``value`` (before the end if None).
        Every argument up to its first positional is this parser's own, not an ACTION's."""
        for arg in self._arg_strings:
            if arg == "--" or (value is not None and arg == value):
                return None
            if arg.startswith("-") and arg != "-" and not _is_number(arg):
                known = arg.split("=", 1)[0] if arg.startswith("--") else arg[:2]
                if known not in self._option_string_actions:
                    return arg.split("=", 1)[0]
        return None


_MISSING_ARGUMENTS = gettext("the following arguments are required: %s").split("%s")[0]


def _unrecognized(extras: list[str]) -> str:
    """argparse's words for arguments no parser took, naming an unknown flag by its name alone: given as
    ``--sta=X`` or ``--sta X``, the mistake is ``--sta``, whatever its value."""
    first = extras[0]
    if first.startswith("-") and first != "-" and not _is_number(first):
        return gettext("unrecognized arguments: %s") % first.split("=", 1)[0]
    return gettext("unrecognized arguments: %s") % " ".join(extras)


class _Commands(argparse._SubParsersAction):
    """``add_subparsers`` of a Parser: each COMMAND's (and ACTION's) parser reports arguments it did not take
    itself, and its one-line ``help`` (the line in its parent's list) is also the description its own --help
    starts with, unless it has a longer one."""

    def add_parser(self, name: str, **kwargs: object) -> argparse.ArgumentParser:
        kwargs.setdefault("description", kwargs.get("help"))
        parser = super().add_parser(name, **kwargs)
        parser._is_action = True
        # ``iotgw run -v`` as well as ``iotgw -v run``: where -v goes is no thing to make a user learn. SUPPRESS
        # leaves the top level's value alone when it is not given here.
        parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
        return parser


def _utf8_checked(convert: Callable[[str], object] | None) -> Callable[[str], object]:
    """``convert`` (an argparse type; None: the text itself) refusing first a value that is not UTF-8, as a usage
    error naming its flag (or positional) whichever way it was given (``--search X``, ``--search=X``).

    A Latin-1 terminal's bytes reach Python as lone surrogates, which passed every check and then failed, with a
    traceback, where the text was stored, encoded or printed. A name for a file that does not exist yet (an
    ``--out``) is refused too, on purpose: what iotgw is given ends up in UTF-8 only text (the TOML config that
    must name a key or a model directory to use it, the database, JSON, stdout). The name of a file that exists
    is left alone: file names are bytes, and opening one works (``iotgw replay``)."""

    @functools.wraps(convert or str)  # keeps the name argparse shows in "invalid int value: 'x'"
    def checked(text: str) -> object:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            if not os.path.lexists(text):
                shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                raise argparse.ArgumentTypeError(
                    f"'{shown}' is not UTF-8 text: iotgw keeps names and paths in UTF-8 (its config, database and "
                    "JSON), so only a file that already exists may be named in another encoding"
                ) from None
        return convert(text) if convert else text

    checked.checks_utf8 = True
    return checked


def _is_number(text: str) -> bool:
    """``-5`` is a value to argparse, not a flag (no command has a flag that looks like a number)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="iotgw", description="IoT edge gateway",
                    epilog="Run 'iotgw COMMAND --help' for a command's options.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


STATE_FLAGS = {
    "config": ("--config", "FILE", "TOML config (default /etc/iotgw/iotgw.toml if present)"),
    "db": ("--db", "URL", "database URL (default: SQLite under the state directory)"),
    "state_dir": ("--state-dir", "DIR", "state directory (default from the config)"),
}


def add_state_args(
    parser: argparse.ArgumentParser, names: tuple[str, ...] = ("config", "db"), *, again: bool = False
) -> None:
    """``--config`` and ``--db`` (``names``, from STATE_FLAGS): every command that reads or writes state takes them.

    A command with ACTIONs takes them on its own parser and again (``again``) on each ACTION that reads state, so
    they work before and after the ACTION alike. An ACTION parses into a namespace of its own that is then copied
    over the command's: with a default there, ``policy --config X show`` would lose X to ``show``'s None. So
    ``again`` leaves the default out; given in both places, the later one wins, as a flag given twice does."""
    for name in names:
        flag, metavar, help_text = STATE_FLAGS[name]
        parser.add_argument(
            flag, dest=name, metavar=metavar, help=help_text, type=non_empty,
            default=argparse.SUPPRESS if again else None,
        )


def non_empty(text: str) -> str:
    """An argparse type for a file, directory, URL, address or name: an empty one (``--db "$DB"`` with DB unset)
    was taken as the flag left out, or as the current directory, without a word."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def non_empty_path(text: str) -> Path:
    """``non_empty`` as a Path: ``Path("")`` is the current directory."""
    return Path(non_empty(text))


def positive_seconds(text: str) -> float:
    """An argparse type for a span of seconds: a finite number above 0. A negative, zero, NaN or infinite
    ``--window`` would otherwise count nothing, or everything, without a word."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds above 0")
    return value


def positive_number(text: str) -> float:
    """An argparse type for a finite number above 0 (a norm, a learning rate)."""
    return _finite(text, above_zero=True)


def number_or_zero(text: str) -> float:
    """An argparse type for a finite number, 0 or more (a noise multiplier, 0 being none)."""
    return _finite(text, above_zero=False)


def _finite(text: str, above_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0 or (above_zero and value == 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number {'above 0' if above_zero else '0 or more'}")
    return value


def seconds_or_zero(text: str) -> float:
    """An argparse type for a limit in seconds where 0 means none: a finite number, 0 or more. A negative or
    NaN ``--duration`` ended the demo at once, after it had printed an address and a login that no longer work."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds, 0 or more")
    return value


def whole_number(text: str, minimum: int, wanted: str) -> int:
    """``text`` as a whole number of at least ``minimum`` for an argparse type, refused with a usage error saying
    it must be ``wanted`` rather than with a traceback from deep inside the command."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} must be {wanted}")
    return value


def positive_count(text: str) -> int:
    """An argparse type for how many of something: a whole number above 0."""
    return whole_number(text, 1, "above 0")


def tcp_port(text: str) -> int:
    """argparse type: a TCP port, 1-65535, refused at once rather than by whatever would bind or dial it later."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (1-65535)")
    return port


def checked_flag(flag: str, check: Callable[[str], object], value: str) -> str:
    """``value`` once ``check`` passes it; ConfigError naming the flag otherwise (the config file's own checks
    name its file and line, which would point at the wrong place)."""
    try:
        check(value)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from exc
    return value


def config_from_args(args: argparse.Namespace) -> Config:
    """The config file with the command line's flags on top, its state directory checked (``check_directory``)."""
    cfg = config_with_flags(args)
    where = "--state-dir" if getattr(args, "state_dir", None) else f"{cfg.source}: gateway.state_dir"
    check_directory(where, cfg.state_dir)
    return cfg


def config_with_flags(args: argparse.Namespace) -> Config:
    """The config file with the command line's flags on top, its state directory not yet looked at: ``iotgw
    doctor`` reports a state directory that is a file as one of its findings and goes on with the others."""
    cfg = load(args.config)
    if getattr(args, "db", None):
        cfg.store.url = checked_flag("--db", check_database_url, args.db)
    for flag, key in (("dns_listen", "listen"), ("upstream", "upstreams"), ("lan", "lan")):
        value = getattr(args, flag, None)
        if value:
            try:  # named by the flag: the config file's checks name its file and line
                check_addresses(key, list(value))
            except ValueError as exc:
                raise ConfigError(f"--{flag.replace('_', '-')}: {exc}") from exc
            setattr(cfg.dns, key, list(value))
    if getattr(args, "interface", None):
        cfg.capture.interface = args.interface
    if getattr(args, "no_sniff", False):
        cfg.capture.sniff = False
    if getattr(args, "mqtt", None):
        cfg.mqtt.url = checked_flag("--mqtt", check_mqtt_url, args.mqtt)
    if getattr(args, "state_dir", None):
        cfg.gateway.state_dir = args.state_dir
    return cfg


def check_directory(where: str, path: Path) -> None:
    """ConfigError naming ``where`` when ``path`` exists but is not a directory (a missing one is made when
    needed): otherwise the first write into it fails as "[Errno 17] File exists", naming neither."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{where}: {path} is not a directory")


if __name__ == "__main__":
    sys.exit(main())
