"""``iotgw policy ...``: view and change filtering policy, through ``gateway.policies`` (as the web UI does).

The policy is ``<state_dir>/policy.json``; every change bumps its revision, which is how the daemon notices
it. Lists fetched from a URL are kept in ``<state_dir>/lists``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from pathlib import Path

from gateway import policies
from gateway.cli import add_state_args, config_from_args, non_empty

STATE_ARGS = ("config", "state_dir")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="filtering policy: rules, lists, schedules, pause, quarantine")
    add_state_args(p, STATE_ARGS)
    _refuse_db(p)
    cmds = p.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    # policy.model.normalise_scope: a tag is a device category, named as AdGuard Home names its device tags
    scope_help = (
        "where it applies: global; device:MAC; type:TYPE (a device type, e.g. type:TP-LinkPlugHS110); or tag:TAG, "
        "every device of a category, named like AdGuard Home's device tags: tag:device_camera, tag:device_tv, "
        "tag:device_audio (speakers), tag:device_plug... (category:camera is the same as tag:device_camera)"
    )

    c = cmds.add_parser("show", help="print the policy as JSON")
    c.set_defaults(func=_show)

    for action in ("block", "allow"):
        c = cmds.add_parser(action, help=f"{action} a name and its subdomains, a list, a category, or all")
        c.add_argument("scope", help=scope_help)
        c.add_argument("target", help="a domain name, list:ID, category:NAME, or all")
        c.add_argument("--schedule", type=non_empty, metavar="NAME",
                       help="apply only while this schedule (see schedule) is active (default: always)")
        c.set_defaults(func=_add_rule, action=action)

    c = cmds.add_parser("unrule", help="remove a rule by its label, or by its number (see show)")
    c.add_argument("scope", help=scope_help)
    c.add_argument(
        "rule",
        help="the rule as block/allow printed it, e.g. 'block name=ads.example' (removed wherever it is now), "
        "or its number in the scope's rules in show (0 first; another writer may have moved it since)",
    )
    c.set_defaults(func=_remove_rule)

    c = cmds.add_parser("list-add", help="add a block list from a local file or a URL (fetched now)")
    c.add_argument("id", help="a short id, e.g. oisd")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", type=non_empty, help="a local hosts, domain or adblock file")
    src.add_argument("--url", type=non_empty, help="http(s) URL, downloaded now and on list-update")
    c.add_argument("--category", type=non_empty, help="also put the list in this category")
    c.set_defaults(func=_list_add)

    c = cmds.add_parser("list-update", help="fetch a URL list again")
    c.add_argument("id", help="the id it was added under")
    c.set_defaults(func=_list_update)

    c = cmds.add_parser(
        "schedule", help="define a weekly schedule, e.g. --day mon=22:00-07:00 (Monday 22:00 to Tuesday 07:00)"
    )
    c.add_argument("name", help="the schedule's name, for --schedule of block and allow (replaced if it exists)")
    c.add_argument("--tz", type=non_empty, default="UTC", help="IANA time zone, e.g. Europe/Berlin (default UTC)")
    c.add_argument("--day", action="append", default=[], metavar="DAY=HH:MM-HH:MM",
                   help="a day (mon..sun) and its hours; an end before the start is on the next day (fri=22:00-07:00 "
                   "ends on Saturday); repeatable, each day at most once")
    c.set_defaults(func=_schedule)

    for name, help_text in (("pause", "block all of the scope's queries until resume"), ("resume", "end a pause")):
        c = cmds.add_parser(name, help=help_text)
        c.add_argument("scope", help=scope_help)
        c.set_defaults(func=_pause, paused=name == "pause")

    c = cmds.add_parser("strict", help="allow only the device type's profile (on, off, inherit)")
    c.add_argument("scope", help=scope_help)
    c.add_argument("mode", choices=("on", "off", "inherit"),
                   help="on: block every name outside the profile (every name, for a type with none); off: do not, "
                   "even where a wider scope is strict; inherit: as the wider scope says")
    c.set_defaults(func=_strict)

    c = cmds.add_parser("answer", help="how blocked queries are answered")
    c.add_argument("scope", help=scope_help)
    c.add_argument("mode", choices=("null", "nxdomain", "nodata", "refused", "inherit"),
                   help="null: 0.0.0.0 or :: (the default); nxdomain: no such name; nodata: the name, no address; "
                   "refused; inherit: as the wider scope says (global: back to null)")
    c.set_defaults(func=_answer)

    c = cmds.add_parser("quarantine", help="quarantine new devices until approved (on/off)")
    c.add_argument("mode", choices=("on", "off"), help="on: a device not yet approved may query only the "
                   "--allow names and its type's profile (its vendor's cloud, to be set up); off: no quarantine")
    c.add_argument("--allow", action="append", metavar="NAME",
                   help="names a quarantined device may still query, replacing the list (repeatable; "
                   "without it the list stays; at first it is public NTP servers)")
    c.set_defaults(func=_quarantine)

    c = cmds.add_parser("import-mud", help="import an RFC 8520 MUD file as a device type's allow profile")
    c.add_argument("device_type", type=non_empty, metavar="TYPE",
                   help="the device type the profile is for, e.g. TP-LinkPlugHS110")
    c.add_argument("file", metavar="FILE", help="the MUD file (JSON)")
    c.set_defaults(func=_import_mud)

    c = cmds.add_parser("test", help="what the policy decides for a device and a name")
    c.add_argument("mac", help="the device's MAC address")
    c.add_argument("name", help="the name it asks for")
    c.add_argument("--type", dest="device_type", metavar="TYPE",
                   help="the device's type, for type: rules and strict mode")
    c.add_argument("--category", help="the device's category, for category: rules")
    c.add_argument("--status", default="approved", choices=("new", "identified", "approved"),
                   help="the device's status: all but approved are quarantined while quarantine is on "
                   "(default approved)")
    c.add_argument("--at", type=_moment, metavar="WHEN",
                   help="decide at this time instead of now, for scheduled rules: ISO 8601, e.g. 2026-11-23T23:00 "
                   "(this machine's local time) or 2026-11-23T23:00+01:00")
    c.set_defaults(func=_test)

    for c in cmds.choices.values():
        add_state_args(c, STATE_ARGS, again=True)
        _refuse_db(c)


class _NoDatabase(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        parser.error("--db: the policy is a file in the state directory, not in the database; "
                     "give --state-dir DIR or --config FILE")


def _refuse_db(parser: argparse.ArgumentParser) -> None:
    """``--db``, which every other state command takes, refused by name: it was once accepted here and ignored,
    and unknown it would read as the ACTION ("invalid choice: 'sqlite:///...'"). Not in --help."""
    parser.add_argument("--db", action=_NoDatabase, help=argparse.SUPPRESS)


# -- actions: each calls gateway.policies and prints what happened -------------------------------------------


def _state_dir(args: argparse.Namespace) -> Path:
    return config_from_args(args).state_dir


def _run(args: argparse.Namespace, change: Callable[[Path], str]) -> int:
    """Apply ``change`` and print its message with the new revision, or the reason it was refused."""
    state_dir = _state_dir(args)
    try:
        message = change(state_dir)
    except ValueError as exc:
        print(f"iotgw policy: {exc}", file=sys.stderr)
        return 2
    except PermissionError:
        raise  # a user's shell on the root-owned state: cli.main says who can, in one line
    except OSError as exc:  # a list that cannot be fetched or read
        print(f"iotgw policy: {exc}", file=sys.stderr)
        return 1
    print(f"{message} (revision {policies.load(state_dir).revision})")
    return 0


def _print_report(report: policies.ListReport) -> None:
    print(f"{report.path}: {report.summary()}")
    for error in report.errors:
        print(f"  {error}", file=sys.stderr)
    if report.error_count > len(report.errors):
        print(f"  ... and {report.error_count - len(report.errors)} more", file=sys.stderr)


def _show(args: argparse.Namespace) -> int:
    print(json.dumps(policies.load(_state_dir(args)).to_dict(), indent=2, sort_keys=True))
    return 0


def _add_rule(args: argparse.Namespace) -> int:
    def change(state_dir: Path) -> str:
        rule = policies.add_rule(
            state_dir, args.scope, policies.rule_from_target(args.action, args.target, args.schedule)
        )
        return f"{args.scope}: {rule.label()}"

    return _run(args, change)


def _remove_rule(args: argparse.Namespace) -> int:
    # A label names the rule itself: the web UI may have added or removed rules since the owner looked.
    text = args.rule.strip()
    index, label = (int(text), None) if text.isascii() and text.isdigit() else (-1, " ".join(text.split()))
    return _run(args, lambda d: f"{args.scope}: removed {policies.remove_rule(d, args.scope, index, label).label()}")


def _list_add(args: argparse.Namespace) -> int:
    def change(state_dir: Path) -> str:
        report = policies.add_list(
            state_dir, args.id, path=args.file, url=args.url, category=args.category, any_path=True
        )
        _print_report(report)
        return f"list {args.id} added" + (f" to category {args.category}" if args.category else "")

    return _run(args, change)


def _list_update(args: argparse.Namespace) -> int:
    def change(state_dir: Path) -> str:
        _print_report(policies.update_list(state_dir, args.id))
        return f"list {args.id} updated"

    return _run(args, change)


def _schedule(args: argparse.Namespace) -> int:
    def change(state_dir: Path) -> str:
        schedule = policies.set_schedule(state_dir, args.name, args.tz, args.day)
        return f"schedule {args.name.strip()} set ({schedule.time_zone}): {schedule.describe()}"

    return _run(args, change)


def _pause(args: argparse.Namespace) -> int:
    def change(state_dir: Path) -> str:
        policies.set_paused(state_dir, args.scope, args.paused)
        return f"{args.scope}: {'paused' if args.paused else 'resumed'}"

    return _run(args, change)


def _strict(args: argparse.Namespace) -> int:
    def change(state_dir: Path) -> str:
        policies.set_strict(state_dir, args.scope, args.mode)
        return f"{args.scope}: strict {args.mode}"

    return _run(args, change)


def _answer(args: argparse.Namespace) -> int:
    def change(state_dir: Path) -> str:
        policies.set_answer(state_dir, args.scope, args.mode)
        return f"{args.scope}: blocked queries answered {args.mode}"

    return _run(args, change)


def _quarantine(args: argparse.Namespace) -> int:
    def change(state_dir: Path) -> str:
        allowed = policies.set_quarantine(state_dir, args.mode == "on", args.allow)
        return f"quarantine {args.mode}, allowing {', '.join(allowed)}"

    return _run(args, change)


def _import_mud(args: argparse.Namespace) -> int:
    def change(state_dir: Path) -> str:
        count = policies.import_mud(state_dir, args.device_type, args.file)
        return f"type {args.device_type}: profile of {count} names from {args.file}"

    return _run(args, change)


def _moment(text: str) -> float:
    """``--at``'s ISO 8601 time as Unix seconds; one without an offset is this machine's local time."""
    try:
        return datetime.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time such as 2026-11-23T23:00") from None


def _test(args: argparse.Namespace) -> int:
    try:
        verdict, errors = policies.decide(
            _state_dir(args), args.mac, args.name,
            device_type=args.device_type, category=args.category, status=args.status, at=args.at,
        )
    except ValueError as exc:
        print(f"iotgw policy: {exc}", file=sys.stderr)
        return 2
    for error in errors[: policies.MAX_REPORTED_ERRORS]:
        print(f"  {error}", file=sys.stderr)
    print(json.dumps({"action": verdict.action, "rule": verdict.rule, "answer": verdict.answer,
                      "anomaly": verdict.anomaly, "rule_words": verdict.words}))  # as the query log would say it
    return 0
