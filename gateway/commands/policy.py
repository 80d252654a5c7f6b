"""``iotgw policy ...``: view and change filtering policy.

Until the store holds policy, it lives in ``<state_dir>/policy.json`` (a ``PolicySet``); every change bumps
its revision, which is how the daemon notices it. Lists fetched from a URL are kept in ``<state_dir>/lists``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gateway.cli import add_state_args, config_from_args
from gateway.policyfile import load_policy, save_policy


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="filtering policy: rules, lists, schedules, pause, quarantine")
    add_state_args(p)
    p.add_argument("--state-dir", metavar="DIR", help="state directory (default from the config)")
    cmds = p.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    scope_help = "global, device:MAC, type:TYPE, category:CATEGORY or tag:device_TAG"

    c = cmds.add_parser("show", help="print the policy as JSON")
    c.set_defaults(func=_show)

    for action in ("block", "allow"):
        c = cmds.add_parser(action, help=f"{action} a name and its subdomains, a list, a category, or all")
        c.add_argument("scope", help=scope_help)
        c.add_argument("target", help="a domain name, list:ID, category:NAME, or all")
        c.add_argument("--schedule", help="apply only while this schedule is active")
        c.set_defaults(func=_add_rule, action=action)

    c = cmds.add_parser("unrule", help="remove a rule by its number (see show)")
    c.add_argument("scope", help=scope_help)
    c.add_argument("index", type=int)
    c.set_defaults(func=_remove_rule)

    c = cmds.add_parser("list-add", help="add a block list from a local file or a URL (fetched now)")
    c.add_argument("id", help="a short id, e.g. oisd")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", help="a local hosts, domain or adblock file")
    src.add_argument("--url", help="http(s) URL, downloaded now and on list-update")
    c.add_argument("--category", help="also put the list in this category")
    c.set_defaults(func=_list_add)

    c = cmds.add_parser("list-update", help="fetch a URL list again")
    c.add_argument("id")
    c.set_defaults(func=_list_update)

    c = cmds.add_parser(
        "schedule", help="define a weekly schedule, e.g. --day mon=21:00-24:00 --day tue=00:00-07:00"
    )
    c.add_argument("name")
    c.add_argument("--tz", default="UTC", help="IANA time zone, e.g. Europe/Berlin")
    c.add_argument("--day", action="append", default=[], metavar="DAY=HH:MM-HH:MM")
    c.set_defaults(func=_schedule)

    for name, help_text in (("pause", "pause internet"), ("resume", "end a pause")):
        c = cmds.add_parser(name, help=help_text)
        c.add_argument("scope", help=scope_help)
        c.set_defaults(func=_pause, paused=name == "pause")

    c = cmds.add_parser("strict", help="allow only the device type's profile (on, off, inherit)")
    c.add_argument("scope", help=scope_help)
    c.add_argument("mode", choices=("on", "off", "inherit"))
    c.set_defaults(func=_strict)

    c = cmds.add_parser("answer", help="how blocked queries are answered")
    c.add_argument("scope", help=scope_help)
    c.add_argument("mode", choices=("null", "nxdomain", "nodata", "refused", "inherit"))
    c.set_defaults(func=_answer)

    c = cmds.add_parser("quarantine", help="quarantine new devices until approved (on/off)")
    c.add_argument("mode", choices=("on", "off"))
    c.add_argument("--allow", action="append", metavar="NAME", help="replace the allow list (repeatable)")
    c.set_defaults(func=_quarantine)

    c = cmds.add_parser("import-mud", help="import an RFC 8520 MUD file as a device type's allow profile")
    c.add_argument("device_type")
    c.add_argument("file")
    c.set_defaults(func=_import_mud)

    c = cmds.add_parser("test", help="what the policy decides for a device and a name")
    c.add_argument("mac")
    c.add_argument("name")
    c.add_argument("--type", dest="device_type")
    c.add_argument("--category")
    c.add_argument("--status", default="approved", choices=("new", "identified", "approved"))
    c.set_defaults(func=_test)


# -- the policy file ---------------------------------------------------------------------------------------


def _state_dir(args: argparse.Namespace) -> Path:
    return config_from_args(args).state_dir


def _change(args: argparse.Namespace, edit) -> int:
    state_dir = _state_dir(args)
    data = load_policy(state_dir)
    try:
        message = edit(data, state_dir)
        save_policy(state_dir, data)
    except ValueError as exc:
        print(f"iotgw policy: {exc}", file=sys.stderr)
        return 2
    print(f"{message} (revision {data.revision})")
    return 0


# -- actions -----------------------------------------------------------------------------------------------


def _show(args: argparse.Namespace) -> int:
    print(json.dumps(load_policy(_state_dir(args)).to_dict(), indent=2, sort_keys=True))
    return 0


def _add_rule(args: argparse.Namespace) -> int:
    from policy.model import Rule

    def edit(data, _):
        kind, _, value = args.target.partition(":")
        if args.target == "all":
            rule = Rule(args.action, "all", "", args.schedule)
        elif kind in ("list", "category") and value:
            rule = Rule(args.action, kind, value, args.schedule)
        else:
            rule = Rule(args.action, "name", args.target, args.schedule)
        data.policy(args.scope).rules.append(rule)
        return f"{args.scope}: {rule.label()}"

    return _change(args, edit)


def _remove_rule(args: argparse.Namespace) -> int:
    def edit(data, _):
        rules = data.policy(args.scope).rules
        if not 0 <= args.index < len(rules):
            raise ValueError(f"{args.scope} has no rule {args.index} (it has {len(rules)})")
        return f"{args.scope}: removed {rules.pop(args.index).label()}"

    return _change(args, edit)


def _report_list(path: Path) -> None:
    from policy import lists

    parsed = lists.load(path)
    print(
        f"{path}: {len(parsed.block)} blocked, {len(parsed.allow)} exceptions, {parsed.error_count} bad lines"
    )
    for error in parsed.errors[:20]:
        print(f"  {error}", file=sys.stderr)
    if parsed.error_count > 20:
        print(f"  ... and {parsed.error_count - 20} more", file=sys.stderr)


def _list_add(args: argparse.Namespace) -> int:
    from policy import lists
    from policy.model import ListSpec

    def edit(data, state_dir: Path):
        if args.url:
            rel = f"lists/{args.id}.txt"
            lists.fetch(args.url, state_dir / rel)
            spec = ListSpec(rel, url=args.url, name=args.id)
        else:
            spec = ListSpec(str(Path(args.file).resolve()), name=args.id)
        data.lists[args.id] = spec
        _report_list(state_dir / spec.path)
        if args.category:
            members = data.categories.setdefault(args.category, [])
            if args.id not in members:
                members.append(args.id)
        return f"list {args.id} added" + (f" to category {args.category}" if args.category else "")

    try:
        return _change(args, edit)
    except OSError as exc:
        print(f"iotgw policy: {exc}", file=sys.stderr)
        return 1


def _list_update(args: argparse.Namespace) -> int:
    from policy import lists

    state_dir = _state_dir(args)
    spec = load_policy(state_dir).lists.get(args.id)
    if spec is None or not spec.url:
        print(f"iotgw policy: no URL list {args.id!r}", file=sys.stderr)
        return 2
    try:
        lists.fetch(spec.url, state_dir / spec.path)
    except (OSError, ValueError) as exc:
        print(f"iotgw policy: {exc}", file=sys.stderr)
        return 1
    _report_list(state_dir / spec.path)
    return _change(args, lambda data, _: f"list {args.id} updated")


def _schedule(args: argparse.Namespace) -> int:
    from policy.schedule import Schedule, parse_clock

    def edit(data, _):
        days = {}
        for spec in args.day:
            day, _, span = spec.partition("=")
            start, _, end = span.partition("-")
            if not end:
                raise ValueError(f"--day {spec!r}: use DAY=HH:MM-HH:MM")
            days[day.lower()] = (parse_clock(start), parse_clock(end))
        data.schedules[args.name] = Schedule(args.tz, days)
        return f"schedule {args.name} set"

    return _change(args, edit)


def _pause(args: argparse.Namespace) -> int:
    def edit(data, _):
        data.policy(args.scope).paused = True if args.paused else None
        return f"{args.scope}: {'paused' if args.paused else 'resumed'}"

    return _change(args, edit)


def _strict(args: argparse.Namespace) -> int:
    def edit(data, _):
        data.policy(args.scope).strict = {"on": True, "off": False, "inherit": None}[args.mode]
        return f"{args.scope}: strict {args.mode}"

    return _change(args, edit)


def _answer(args: argparse.Namespace) -> int:
    def edit(data, _):
        if args.scope == "global":
            data.answer = "null" if args.mode == "inherit" else args.mode
        else:
            data.policy(args.scope).answer = None if args.mode == "inherit" else args.mode
        return f"{args.scope}: blocked queries answered {args.mode}"

    return _change(args, edit)


def _quarantine(args: argparse.Namespace) -> int:
    from policy.lists import normalise_name

    def edit(data, _):
        data.quarantine.enabled = args.mode == "on"
        if args.allow:
            data.quarantine.allow = [normalise_name(n) for n in args.allow]
        return f"quarantine {args.mode}, allowing {', '.join(data.quarantine.allow)}"

    return _change(args, edit)


def _import_mud(args: argparse.Namespace) -> int:
    from policy.mud import load_mud

    def edit(data, _):
        profile = load_mud(args.file)
        data.profiles[args.device_type] = profile
        return f"type {args.device_type}: profile of {len(profile.names)} names from {profile.source}"

    return _change(args, edit)


def _test(args: argparse.Namespace) -> int:
    from policy.engine import PolicyEngine
    from policy.model import normalise_mac
    from policy.records import DeviceContext

    state_dir = _state_dir(args)
    engine = PolicyEngine.build(load_policy(state_dir), base_dir=state_dir)
    for error in engine.list_errors[:20]:
        print(f"  {error}", file=sys.stderr)
    try:
        ctx = DeviceContext(normalise_mac(args.mac), args.device_type, args.category, args.status)
    except ValueError as exc:
        print(f"iotgw policy: {exc}", file=sys.stderr)
        return 2
    verdict = engine.decide(ctx, args.name, time.time())
    print(
        json.dumps(
            {
                "action": verdict.action,
                "rule": verdict.rule,
                "answer": verdict.answer,
                "anomaly": verdict.anomaly,
            }
        )
    )
    return 0
