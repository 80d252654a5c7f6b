"""The ``iotgw`` command line as a whole (``gateway/cli.py``): what every command's parser takes, run as an owner
runs it, as ``python -m gateway.cli``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import accounts
from gateway.cli import build_parser
from gateway.store.db import Store

ROOT = Path(__file__).resolve().parents[1]


def iotgw(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *argv], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, stdin=subprocess.DEVNULL)


def _parsers(parser: argparse.ArgumentParser, name: str = "iotgw"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_parser_of_every_command_takes_only_whole_flag_names():
    """``allow_abbrev`` is not inherited: each ACTION's parser must refuse abbreviations itself."""
    taking = [name for name, parser in _parsers(build_parser()) if parser.allow_abbrev]
    assert taking == []


def test_every_argument_and_action_of_every_command_says_what_it_is():
    """``policy strict``'s, ``answer``'s and ``quarantine``'s modes and ``identify``'s PCAP were listed in --help
    with nothing beside them: what ``inherit`` or ``nodata`` does was nowhere on the command line."""
    silent = []
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                silent += [f"{name} {choice.dest}" for choice in action._choices_actions if not choice.help]
            elif not action.help:
                silent.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert silent == []


def test_every_command_and_action_has_a_description_and_the_list_says_where_the_options_are():
    """Only ``replay`` and ``federation`` said what they were at the top of their --help; the others opened on the
    usage line alone. The one line of ``iotgw --help``'s list is the least each one says."""
    bare = [name for name, parser in _parsers(build_parser()) if not parser.description]
    assert bare == []
    proc = iotgw("--help")
    assert proc.returncode == 0
    assert proc.stdout.rstrip().endswith("Run 'iotgw COMMAND --help' for a command's options.")
    assert iotgw("devices", "--help").stdout.split("\n\n")[1] == "list devices"


# Arguments of one name that are different things: train's and evaluate's --out is a directory, keygen's a key
# file; policy's scope is where a rule applies, a token's what it may do.
NAMES_FOR_DIFFERENT_THINGS = {"out", "scope"}


def test_an_argument_is_shown_under_one_name_in_every_command():
    """``setup --interface IF`` and ``run --interface IFACE``, ``policy test --type DEVICE_TYPE`` and ``import-mud
    device_type``, ``replay FILE.pcap`` and ``identify PCAP``: one thing under two names reads as two things."""
    shown: dict[str, set[str]] = {}
    for _name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if action.nargs == 0 or action.help == argparse.SUPPRESS or action.dest in NAMES_FOR_DIFFERENT_THINGS:
                continue
            if isinstance(action, argparse._SubParsersAction):
                continue
            metavar = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
            shown.setdefault(action.dest, set()).add(str(metavar) if action.choices is None else "{choices}")
    assert {dest: names for dest, names in shown.items() if len(names) > 1} == {}


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'iotgw.sqlite'}"
    Store(url).close()
    return url


@pytest.mark.parametrize(("argv", "abbreviated"), [
    (["queries", "--db", "{db}", "--js"], "--js"),  # --json
    (["user", "--db", "{db}", "token", "create", "ha", "--sc", "write"], "--sc"),  # --scope
    (["policy", "--state-dir", "{state}", "schedule", "night", "--da", "mon=21:00-24:00"], "--da"),  # --day
])
def test_an_abbreviated_flag_is_refused_with_a_usage_error_and_changes_nothing(tmp_path, db, argv, abbreviated):
    """argparse's prefix matching took ``--da`` for ``--day``; a flag added later (a hidden ``--db``) would make it
    ambiguous or silently mean something else. Only whole names work, at the top and in nested ACTIONs."""
    state = tmp_path / "state"
    proc = iotgw(*(a.format(db=db, state=state) for a in argv))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("usage: ") and f"error: unrecognized arguments: {abbreviated}" in proc.stderr
    assert proc.stdout == "" and not state.exists()
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("argv", "prog", "flag"), [
    (["policy", "--sta", "{state}", "show"], "iotgw policy", "--sta"),  # was: argument ACTION: invalid choice
    (["policy", "--config", "{state}/none.toml", "--sta", "{state}", "show"], "iotgw policy", "--sta"),
    (["--conf", "x.toml", "devices"], "iotgw", "--conf"),  # was: argument COMMAND: invalid choice: 'x.toml'
    (["user", "--sc", "write", "token", "list"], "iotgw user", "--sc"),
    (["policy", "strict", "--mod", "on"], "iotgw policy strict", "--mod"),  # was: arguments are required: mode
    # as --flag=value argparse took the ACTION and passed the flag up to iotgw, refused with iotgw's usage
    (["policy", "--sta={state}", "show"], "iotgw policy", "--sta"),
    (["policy", "show", "--sta={state}"], "iotgw policy show", "--sta"),
    (["user", "token", "list", "--sc", "write"], "iotgw user token list", "--sc"),
    (["--conf=x.toml", "devices"], "iotgw", "--conf"),
])
def test_an_unknown_flag_before_a_positional_is_named_not_the_positional(tmp_path, argv, prog, flag):
    """argparse takes the value meant for a flag it does not know as the next positional, and refused that
    (``policy --sta X show``: "invalid choice: 'X'"), never saying that the flag was the mistake. Given as
    ``--sta=X``, or after the ACTION, the flag went up to ``iotgw``, which refused it with its own usage."""
    state = tmp_path / "state"
    proc = iotgw(*(a.format(state=state) for a in argv))
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    assert proc.stderr.splitlines()[-1] == f"{prog}: error: unrecognized arguments: {flag}"
    assert not state.exists()


def test_a_positional_refused_with_no_unknown_flag_before_it_is_named_as_before():
    proc = iotgw("policy", "--config", "x.toml", "shw")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith("iotgw policy: error: argument ACTION: invalid choice: 'shw'")
    proc = iotgw("policy", "strict", "global")
    assert proc.stderr.splitlines()[-1] == "iotgw policy strict: error: the following arguments are required: mode"


NOT_UTF8 = ("is not UTF-8 text: iotgw keeps names and paths in UTF-8 (its config, database and JSON), so only a "
            "file that already exists may be named in another encoding")


def test_an_argument_that_is_not_utf8_is_a_usage_error_naming_its_flag(tmp_path, db):
    """A Latin-1 terminal's bytes reach Python as lone surrogates: they passed argparse and every check and ended in
    a traceback where they were stored (``token create``) or searched for (``queries --search``). The flag is named
    however it was given (``--search=X`` named none), and a name for a file still to be made (``keygen --out``) is
    refused too, saying why: a path iotgw is given ends up in its UTF-8 only config, database or JSON."""
    key = bytes(tmp_path) + b"/caf\xe9.key"
    for argv, prog, said in (
        ([b"queries", b"--db", db.encode(), b"--search", b"caf\xe9"], "iotgw queries", r"argument --search: 'caf\xe9'"),
        ([b"queries", b"--db", db.encode(), b"--search=caf\xe9"], "iotgw queries", r"argument --search: 'caf\xe9'"),
        ([b"user", b"--db", db.encode(), b"token", b"create", b"caf\xe9"], "iotgw user token create",
         r"argument name: 'caf\xe9'"),
        ([b"federation", b"keygen", b"--out=" + key], "iotgw federation keygen",
         f"argument --out: '{tmp_path}/caf\\xe9.key'"),
    ):
        proc = subprocess.run([sys.executable, "-m", "gateway.cli", *argv], capture_output=True, text=True,
                              timeout=60, cwd=ROOT)
        assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
        assert proc.stderr.splitlines()[-1] == f"{prog}: error: {said} {NOT_UTF8}"
    store = Store(db)
    assert accounts.list_tokens(store) == []
    store.close()
    assert not os.path.lexists(key) and not os.path.lexists(key + b".pub")


def test_the_name_of_a_file_that_exists_may_be_in_any_encoding(tmp_path, db):
    """File names are bytes: a capture saved under a Latin-1 name is replayed (here: read, and found no capture)."""
    latin1 = bytes(tmp_path) + b"/caf\xe9.pcap"
    with open(latin1, "wb") as f:
        f.write(b"not a capture\n")
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "replay", "--db", db, latin1], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1 and "replayed 0 of 1 files" in proc.stdout, proc.stderr
    assert "not a pcap or pcapng file" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
def broken_config(tmp_path: Path) -> Path:
    """A config with a syntax error: without the fix below, each command stops on it before it does anything."""
    path = tmp_path / "broken.toml"
    path.write_text("[dns\n")
    return path


@pytest.mark.parametrize(("argv", "flag"), [
    (["devices", "--config", "{config}", "--db", ""], "--db"),
    (["policy", "--config", "", "show"], "--config"),
    (["policy", "--config", "{config}", "list-add", "x", "--file", ""], "--file"),
    (["user", "--config", "{config}", "token", "list", "--db", ""], "--db"),
    (["run", "--config", "{config}", "--mqtt", ""], "--mqtt"),
    (["run", "--config", "{config}", "--interface", " "], "--interface"),
    (["web", "--config", "{config}", "--listen", ""], "--listen"),
    (["federation", "keygen", "--out", ""], "--out"),
    (["setup", "--config", "", "--no-password"], "--config"),
])
def test_an_empty_flag_value_is_refused_naming_the_flag(broken_config, argv, flag):
    """``--db "$DB"`` with DB unset: an empty value was taken as the flag left out (the default database, the
    default broker, all interfaces) or as the current directory, without a word."""
    proc = iotgw(*(a.format(config=broken_config) for a in argv))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1].endswith(f"error: argument {flag}: must not be empty"), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("make", "said"), [
    (lambda p: p.mkdir(), "{path} is a directory, not a database file"),
    (lambda p: p.write_bytes(b"not SQLite\n" * 100), "file is not a database"),
])
def test_a_db_that_cannot_be_opened_is_one_line_naming_it(tmp_path, make, said):
    path = tmp_path / "iotgw.sqlite"
    make(path)
    url = f"sqlite:///{path}"
    for argv in (["devices", "--db", url], ["user", "token", "list", "--db", url]):
        proc = iotgw(*argv)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines() == [
            f"iotgw: cannot open the database {url}: {said.format(path=path)} (--db, or [store] url in the config)"
        ]
    if path.is_dir():  # refused before the query log's database was made beside it
        assert [p.name for p in tmp_path.iterdir()] == ["iotgw.sqlite"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device every write to fails as full")
def test_output_to_a_full_device_is_one_line_not_a_traceback(tmp_path):
    sessions = tmp_path / "s.jsonl"
    sessions.write_text('{"id": "a", "queries": [{"t": 0, "name": "devs.tplinkcloud.com"}]}\n')
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "gateway.cli", "identify", "--json", "--sessions", str(sessions)],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, cwd=ROOT)
    assert (proc.returncode, proc.stderr) == (1, "iotgw: a write failed: No space left on device\n")


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_train_and_evaluate_without_the_training_data_say_what_to_give_and_write_nothing(tmp_path, command):
    """The default --data is ../shared/data beside a source checkout, which an installed iotgw has not: the error
    was "iotgw: no training data under ..." (exit 1) without naming --data, and evaluate had made its --out first."""
    data, out = tmp_path / "data", tmp_path / "out"
    (data / "iot-sentinel").mkdir(parents=True)
    (data / "iot-sentinel" / "labels.csv").write_text("folder,device_type,manufacturer,category\n")
    for given, lacking in ((tmp_path / "none", "no iot-sentinel/labels.csv and no supplychain-domains/device_domains"
                            ".csv"), (data, "no supplychain-domains/device_domains.csv")):
        proc = iotgw(command, "--data", str(given), "--out", str(out))
        assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
        assert proc.stderr.splitlines() == [
            f"iotgw {command}: --data {given}: {lacking} there; give --data DIR, the directory holding "
            "iot-sentinel/ and supplychain-domains/ (../shared/data beside a source checkout)"
        ]
        assert not out.exists()


def test_verbose_is_taken_before_or_after_any_command_or_action():
    """``iotgw run -v`` was refused ("unrecognized arguments: -v"): only ``iotgw -v run`` turned debug logging on."""
    parser = build_parser()
    lacking = [name for name, sub in _parsers(parser) if "-v" not in sub._option_string_actions]
    assert lacking == []
    assert parser.parse_args(["devices"]).verbose is False
    assert parser.parse_args(["devices", "-v"]).verbose is True
    assert parser.parse_args(["-v", "devices"]).verbose is True
    assert parser.parse_args(["policy", "show", "--verbose"]).verbose is True
