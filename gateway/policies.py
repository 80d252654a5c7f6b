"""What the CLI, the web UI and Home Assistant do to the filtering policy: one set of functions for all three,
so no view or command holds policy logic of its own.

The policy is ``<state_dir>/policy.json`` (``gateway.policyfile``). Every change is a read-modify-write under
an exclusive lock, so a browser, a script and an MQTT command changing it at once cannot lose each other's
edits; a refused change (``ValueError`` with a message for the user) writes nothing. JSON-ready dicts come out
of ``describe_scope`` and ``overview``: the API returns them and the pages render them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.policyfile import load_policy, save_policy
from gateway.statedir import create_private
from policy import lists
from policy.lists import normalise_name
from policy.model import RULE_ACTIONS, RULE_KINDS, ListSpec, Policy, PolicySet, Rule, normalise_scope
from policy.records import ANSWERS, DeviceContext, Verdict
from policy.schedule import DAYS, Schedule, format_clock, parse_clock

# A scope's mode: follow its rules ("default"), allow only the device type's profile, or block everything.
# For a device this is the choice Home Assistant's policy select and the web UI offer.
MODES = ("default", "strict", "paused")
STRICT_CHOICES = {"on": True, "off": False, "inherit": None}
LISTS_DIR = "lists"  # under the state directory: fetched lists, and files the web UI may add
MAX_REPORTED_ERRORS = 20
MAX_FILE_NAME_BYTES = 255  # NAME_MAX of Linux file systems: a longer name is an OSError, not a missing file
_LOCK_FILE = ".policy.lock"
_SCHEDULE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # it goes into URLs and rule labels


# -- reading and changing ------------------------------------------------------------------------------------


def load(state_dir: Path) -> PolicySet:
    """The current policy (empty if none was saved yet)."""
    return load_policy(Path(state_dir))


@contextmanager
def editing(state_dir: Path) -> Iterator[PolicySet]:
    """The policy to change in place; saved (validated, next revision) when the block ends without error."""
    with locked(state_dir):
        data = load_policy(Path(state_dir))
        yield data
        save_policy(Path(state_dir), data)


@contextmanager
def locked(state_dir: Path) -> Iterator[None]:
    """Hold the policy's lock: every change to the policy, and to the list files it names, is made under it."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    # Owned like the state directory, so a lock file made by `sudo iotgw policy ...` does not shut the service out.
    with open(create_private(state_dir / _LOCK_FILE, exclusive=False), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def scope_key(kind: str, target: str = "") -> str:
    """The canonical scope of ``kind`` (global, device, type, tag, category) and its target."""
    return normalise_scope("global" if kind == "global" else f"{kind}:{target}")


def rule_from_target(action: str, target: str, schedule: str | None = None) -> Rule:
    """A rule from the CLI's and the forms' target: a domain name, ``list:ID``, ``category:NAME`` or ``all``."""
    if action not in RULE_ACTIONS:
        raise ValueError(f"action must be one of {', '.join(RULE_ACTIONS)}")
    target = target.strip()
    schedule = (schedule or "").strip() or None
    kind, _, value = target.partition(":")
    if target == "all":
        return Rule(action, "all", "", schedule)
    if kind in ("list", "category") and value:
        return Rule(action, kind, value, schedule)
    return Rule(action, "name", _name(target), schedule)


def add_rule(state_dir: Path, scope: str, rule: Rule) -> Rule:
    with editing(state_dir) as data:
        data.policy(scope).rules.append(rule)
    return rule


def remove_rule(state_dir: Path, scope: str, index: int, label: str | None = None) -> Rule:
    """Remove rule ``index`` of ``scope``. With ``label`` (the rule a page showed there) the rule with that label
    goes, wherever it is now: another writer (the CLI, another browser) may have added or removed rules since the
    page was shown, and the index alone would then remove a rule the owner never chose."""
    with editing(state_dir) as data:
        rules = data.policy(scope).rules
        if label is not None and not (0 <= index < len(rules) and rules[index].label() == label):
            # rules with one label are one rule (the label names all its fields): any of them will do
            index = next((i for i, rule in enumerate(rules) if rule.label() == label), -1)
            if index < 0:
                raise ValueError(f"{scope} has no rule {label!r} (any more)")
        if not 0 <= index < len(rules):
            raise ValueError(f"{scope} has no rule {index} (it has {len(rules)})")
        return rules.pop(index)


def set_mode(state_dir: Path, scope: str, mode: str) -> None:
    """``default`` (inherit), ``strict`` (only the type's profile) or ``paused`` (block everything)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    with editing(state_dir) as data:
        policy = data.policy(scope)
        policy.paused = True if mode == "paused" else None
        policy.strict = True if mode == "strict" else None


def mode_of(policy: Policy | None) -> str:
    if policy is not None and policy.paused:
        return "paused"
    if policy is not None and policy.strict:
        return "strict"
    return "default"


def device_mode(state_dir: Path, mac: str) -> str:
    """The device's mode; ``default`` for a device known only by its address (``ip:...``): it has no policy."""
    try:
        key = scope_key("device", mac)
    except ValueError:
        return "default"
    return mode_of(load(state_dir).policies.get(key))


def device_modes(data: PolicySet) -> dict[str, str]:
    """MAC -> mode of every device with a policy of its own (the device list's policy column)."""
    return {k[len("device:"):]: mode_of(p) for k, p in data.policies.items() if k.startswith("device:")}


def set_device_mode(state_dir: Path, mac: str, mode: str) -> None:
    set_mode(state_dir, scope_key("device", mac), mode)


def set_paused(state_dir: Path, scope: str, paused: bool) -> None:
    with editing(state_dir) as data:
        data.policy(scope).paused = True if paused else None


def set_strict(state_dir: Path, scope: str, choice: str) -> None:
    """``on``, ``off`` (also when the type is strict) or ``inherit``."""
    if choice not in STRICT_CHOICES:
        raise ValueError(f"strict must be one of {', '.join(STRICT_CHOICES)}")
    with editing(state_dir) as data:
        data.policy(scope).strict = STRICT_CHOICES[choice]


def set_answer(state_dir: Path, scope: str, answer: str) -> None:
    """How blocked queries are answered; ``inherit`` drops a scope's own setting (globally: back to null)."""
    if answer not in (*ANSWERS, "inherit"):
        raise ValueError(f"answer must be one of {', '.join(ANSWERS)} or inherit")
    with editing(state_dir) as data:
        if normalise_scope(scope) == "global":
            data.answer = "null" if answer == "inherit" else answer
        else:
            data.policy(scope).answer = None if answer == "inherit" else answer


class ScopeChanged(Exception):
    """A replacement made from a scope as it was (``if_match``) found it changed since: writing it would silently
    undo the other writer's change (a rule the CLI or the web page added in between)."""


def scope_etag(data: PolicySet, scope: str) -> str:
    """The version of one scope's own policy (HTTP's ETag): a digest of what ``describe_scope`` shows, not the
    policy's revision, so that a change to another scope does not refuse a write to this one."""
    text = json.dumps(describe_scope(data, scope), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def replace_scope(state_dir: Path, scope: str, body: Any, if_match: Collection[str] | None = None) -> None:
    """Replace a scope's policy with ``body``, the JSON form ``describe_scope`` returns (``rules``, ``strict``,
    ``paused``, ``answer``; read-only fields are ignored). Every problem is named with its place in ``body``.

    With ``if_match`` (the ``scope_etag`` values the caller read the scope at) a scope changed since is left as it
    is and ``ScopeChanged`` raised; without it the scope is replaced whatever it holds now."""
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object with rules, strict, paused and answer")
    unknown = set(body) - {"rules", "strict", "paused", "answer", "scope", "mode", "inherits"}
    if unknown:
        raise ValueError(f"unknown field {sorted(unknown)[0]!r} (use rules, strict, paused, answer)")
    raw_rules = body.get("rules", [])
    if not isinstance(raw_rules, list):
        raise ValueError("rules: expected a list")
    rules = [_rule_from_json(i, r) for i, r in enumerate(raw_rules)]
    for key in ("strict", "paused"):
        # Not ``in (None, True, False)``: 1 and 0.0 equal True and False, and were stored and answered as numbers.
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise ValueError(f"{key}: expected true, false or null")
    answer = body.get("answer")
    if answer is not None and answer not in ANSWERS:
        raise ValueError(f"answer: expected one of {', '.join(ANSWERS)} or null")
    with editing(state_dir) as data:
        key = normalise_scope(scope)
        if if_match is not None and scope_etag(data, key) not in if_match:
            raise ScopeChanged(f"{key} was changed since it was read: read it again (GET) and redo the change")
        policy = Policy(rules, body.get("strict"), body.get("paused") or None)
        if key == "global":
            data.answer = answer or "null"
        else:
            policy.answer = answer
        data.policies[key] = policy
        _check_references(data, key)


def clear_scope(state_dir: Path, scope: str) -> bool:
    """Drop a scope's own policy (it inherits again); False if it had none."""
    with editing(state_dir) as data:
        return data.policies.pop(normalise_scope(scope), None) is not None


# -- lists ---------------------------------------------------------------------------------------------------


@dataclass
class ListReport:
    """What loading a list found: shown after adding or updating it (bad lines as text, with file and line)."""

    list_id: str
    path: str
    blocked: int
    exceptions: int
    error_count: int
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"list {self.list_id}: {self.blocked} blocked, {self.exceptions} exceptions, "
            f"{self.error_count} bad lines"
        )


def lists_dir(state_dir: Path) -> Path:
    return Path(state_dir) / LISTS_DIR


def add_list(
    state_dir: Path,
    list_id: str,
    *,
    path: str | None = None,
    url: str | None = None,
    category: str | None = None,
    any_path: bool = False,
    fetch: Callable[[str, Path], object] = lists.fetch,
) -> ListReport:
    """Add a block list from a local file or an http(s) URL (downloaded now, an explicit action).

    Without ``any_path`` (the web UI and API) a local file must be a file name in ``<state_dir>/lists``:
    whoever holds a browser session should not make the gateway read any file it can, and a list's bad
    lines are shown back. The shell user of the CLI may name any file.
    """
    state_dir = Path(state_dir)
    list_id = (list_id or "").strip()
    if bool(path) == bool(url):
        raise ValueError("give either a local file or a URL")
    category = (category or "").strip() or None
    url = url.strip() if url else None

    def stage(data: PolicySet) -> ListSpec:
        if url:
            if not url.lower().startswith(("https://", "http://")):
                raise ValueError(f"{url}: only http and https lists can be fetched")
            spec = ListSpec(f"{LISTS_DIR}/{list_id}.txt", url=url, name=list_id)
        else:
            spec = ListSpec(_local_list(state_dir, path or "", any_path), name=list_id)
        data.lists[list_id] = spec
        if category:
            members = data.categories.setdefault(category, [])
            if list_id not in members:
                members.append(list_id)
        data.validate()  # the id, before it names a file
        return spec

    downloaded = None
    if url:
        stage(load(state_dir))  # a bad id or URL is refused before the download, not after it
        downloaded = _download(state_dir, url, fetch)
    try:
        with editing(state_dir) as data:
            spec = stage(data)
            if downloaded is not None:
                os.replace(downloaded, state_dir / spec.path)
            report = _report(list_id, state_dir / spec.path, fetched=bool(spec.url))
    finally:
        if downloaded is not None:
            downloaded.unlink(missing_ok=True)
    return report


def update_list(
    state_dir: Path, list_id: str, fetch: Callable[[str, Path], object] = lists.fetch
) -> ListReport:
    """Fetch a URL list again; the new revision makes the daemon reload it."""
    state_dir = Path(state_dir)
    spec = load(state_dir).lists.get(list_id)
    if spec is None or not spec.url:
        raise ValueError(f"no URL list {list_id!r}")
    downloaded = _download(state_dir, spec.url, fetch)
    try:
        with editing(state_dir) as data:
            current = data.lists.get(list_id)
            if current is None or (current.url, current.path) != (spec.url, spec.path):
                raise ValueError(f"list {list_id!r} was changed while it was fetched; update it again")
            os.replace(downloaded, state_dir / spec.path)
            report = _report(list_id, state_dir / spec.path, fetched=True)
    finally:
        downloaded.unlink(missing_ok=True)
    return report


def _download(state_dir: Path, url: str, fetch: Callable[[str, Path], object]) -> Path:
    """``url`` fetched into a hidden file of the lists directory, before the policy lock is taken: a slow list
    server would otherwise hold up every other change to the policy, from the web UI, the CLI and MQTT."""
    directory = lists_dir(state_dir)
    create_private(directory, directory=True)
    name = directory / f".download-{secrets.token_hex(8)}"
    try:
        fetch(url, name)
        # fetch puts a file of its own in place, root's under sudo: the daemon must be able to read the list.
        os.close(create_private(name, exclusive=False))
    except BaseException:
        name.unlink(missing_ok=True)
        raise
    return name


def remove_list(state_dir: Path, list_id: str) -> None:
    """Remove a list that no rule uses (a fetched copy is deleted; a file of the user's is left alone).

    The copy is deleted after the policy is saved without the list (a failed save leaves both) and before the
    lock is let go: an ``add_list`` of the same id waiting for the lock puts its new file there next."""
    state_dir = Path(state_dir)
    with locked(state_dir):
        data = load_policy(state_dir)
        spec = data.lists.pop(list_id, None)
        if spec is None:
            raise ValueError(f"no list {list_id!r}")
        users = [
            f"{scope}: {rule.label()}"
            for scope, pol in data.policies.items()
            for rule in pol.rules
            if rule.kind == "list" and rule.value == list_id
        ]
        if users:
            raise ValueError(f"list {list_id} is used by {'; '.join(users)}: remove those rules first")
        for members in data.categories.values():
            if list_id in members:
                members.remove(list_id)
        save_policy(state_dir, data)
        if spec.url:
            (state_dir / spec.path).unlink(missing_ok=True)


def _local_list(state_dir: Path, path: str, any_path: bool) -> str:
    """The list file's path as the policy stores it; ValueError (a 400 in the web UI) for a name that is not a
    readable file, including one the OS would refuse outright (too long, or with a NUL)."""
    path = path.strip()
    shown = repr(path[:80]) + ("..." if len(path) > 80 else "")
    try:
        if any_path:
            return str(Path(path).resolve())
        if not path or "/" in path or "\\" in path or path.startswith("."):
            raise ValueError(f"a local list is a file name in {lists_dir(state_dir)}, not a path")
        if not path.isprintable():
            raise ValueError(f"a list's file name has no control characters: {shown}")
        if len(path.encode("utf-8", "surrogatepass")) > MAX_FILE_NAME_BYTES:
            raise ValueError(f"a list's file name has at most {MAX_FILE_NAME_BYTES} bytes: {shown}")
        if not (lists_dir(state_dir) / path).is_file():
            raise ValueError(f"no file {shown} in {lists_dir(state_dir)}")
    except OSError as exc:
        raise ValueError(f"cannot use list file {shown}: {exc.strerror or exc}") from exc
    return f"{LISTS_DIR}/{path}"


def _report(list_id: str, path: Path, *, fetched: bool) -> ListReport:
    """What loading the list found; a fetched list's bad lines are named by number and reason only."""
    try:
        parsed = lists.load(path, quote=not fetched)
    except OSError as exc:
        raise ValueError(f"cannot read list {list_id!r} from {path}: {exc.strerror}") from exc
    return ListReport(
        list_id,
        str(path),
        len(parsed.block),
        len(parsed.allow),
        parsed.error_count,
        [str(e) for e in parsed.errors[:MAX_REPORTED_ERRORS]],
    )


# -- schedules, quarantine, profiles --------------------------------------------------------------------------


def parse_days(specs: list[str]) -> dict[str, tuple[int, int]]:
    """``["mon=22:00-07:00", "sat=09:00-12:00"]`` -> schedule days; mon=22:00-07:00 ends on Tuesday at 07:00."""
    days: dict[str, tuple[int, int]] = {}
    for spec in specs:
        day, _, span = spec.strip().partition("=")
        start, _, end = span.partition("-")
        if not end:
            raise ValueError(f"{spec!r}: use DAY=HH:MM-HH:MM")
        day = day.strip().lower()
        if day not in DAYS:
            raise ValueError(f"{spec!r}: the day is one of {', '.join(DAYS)}")
        if day in days:  # a schedule holds one range a day: the later one silently replaced the earlier
            raise ValueError(f"{spec!r}: {day} is given twice; a schedule has one range a day")
        days[day] = (parse_clock(start.strip()), parse_clock(end.strip()))
    return days


def set_schedule(state_dir: Path, name: str, time_zone: str, days: list[str]) -> Schedule:
    """Save the schedule ``name`` (replacing one of that name) and return it, to be said back to the owner."""
    name = (name or "").strip()
    if not _SCHEDULE_NAME.fullmatch(name):
        raise ValueError(f"schedule name {name!r}: 1-64 letters, digits, '_', '-' or '.'")
    schedule = Schedule((time_zone or "UTC").strip(), parse_days(days))
    with editing(state_dir) as data:
        data.schedules[name] = schedule
    return schedule


def remove_schedule(state_dir: Path, name: str) -> None:
    with editing(state_dir) as data:
        if data.schedules.pop(name, None) is None:
            raise ValueError(f"no schedule {name!r}")
        users = [
            f"{scope}: {rule.label()}"
            for scope, pol in data.policies.items()
            for rule in pol.rules
            if rule.schedule == name
        ]
        if users:
            raise ValueError(f"schedule {name} is used by {'; '.join(users)}: remove those rules first")


def set_quarantine(state_dir: Path, enabled: bool, allow: list[str] | None = None) -> list[str]:
    """Switch quarantine of new devices; ``allow`` (when given) replaces its allow list."""
    names = None if allow is None else [_name(n) for n in allow if n.strip()]
    with editing(state_dir) as data:
        data.quarantine.enabled = enabled
        if names is not None:
            data.quarantine.allow = names
        return list(data.quarantine.allow)


def import_mud(state_dir: Path, device_type: str, file: str) -> int:
    """Import an RFC 8520 MUD file as the type's allow profile; the number of names it lists."""
    from policy.mud import load_mud

    profile = load_mud(file)
    with editing(state_dir) as data:
        data.profiles[device_type] = profile
    return len(profile.names)


# -- describing ---------------------------------------------------------------------------------------------


def describe_scope(data: PolicySet, scope: str) -> dict[str, Any]:
    """A scope's own policy as JSON (what ``replace_scope`` takes back) and its mode."""
    key = normalise_scope(scope)
    pol = data.policies.get(key) or Policy()
    return {
        "scope": key,
        "rules": [{**vars(r), "label": r.label()} for r in pol.rules],
        "strict": pol.strict,
        "paused": pol.paused,
        "answer": data.answer if key == "global" else pol.answer,
        "mode": mode_of(pol),
    }


def device_view(data: PolicySet, mac: str, device_type: str | None, category: str | None) -> dict[str, Any]:
    """A device's own policy plus the scopes it inherits from, most specific first (the device editor)."""
    out = describe_scope(data, scope_key("device", mac))
    chain = []
    if device_type:
        chain.append(scope_key("type", device_type))
    if category:
        chain.append(scope_key("category", category))
    chain.append("global")
    out["inherits"] = [describe_scope(data, k) for k in chain if k in data.policies or k == "global"]
    return out


def overview(data: PolicySet) -> dict[str, Any]:
    """Everything configured: scopes (global, then types, tags, devices), lists, categories, schedules."""
    order = {"global": 0, "type": 1, "tag": 2, "device": 3}
    scopes = sorted({"global", *data.policies}, key=lambda k: (order[k.partition(":")[0]], k))
    in_categories: dict[str, list[str]] = {}
    for category, ids in data.categories.items():
        for list_id in ids:
            in_categories.setdefault(list_id, []).append(category)
    return {
        "revision": data.revision,
        "policies": [describe_scope(data, k) for k in scopes],
        "lists": [
            {"id": k, "path": v.path, "url": v.url, "enabled": v.enabled, "categories": in_categories.get(k, [])}
            for k, v in sorted(data.lists.items())
        ],
        "categories": {k: list(v) for k, v in sorted(data.categories.items())},
        "schedules": {k: _schedule_view(v) for k, v in sorted(data.schedules.items())},
        "quarantine": {"enabled": data.quarantine.enabled, "allow": list(data.quarantine.allow)},
        "profiles": {k: {"names": len(v.names), "source": v.source} for k, v in sorted(data.profiles.items())},
    }


def decide(
    state_dir: Path,
    mac: str,
    name: str,
    *,
    device_type: str | None = None,
    category: str | None = None,
    status: str = "approved",
    at: float | None = None,
) -> tuple[Verdict, list[str]]:
    """What the policy decides for ``name`` asked by a device, now or ``at`` (Unix seconds: scheduled rules), and
    the bad lines of the lists it loaded."""
    from policy.engine import PolicyEngine
    from policy.model import normalise_mac

    engine = PolicyEngine.build(load(state_dir), base_dir=state_dir)
    ctx = DeviceContext(normalise_mac(mac), device_type, category, status)
    return engine.decide(ctx, name, time.time() if at is None else at), [str(e) for e in engine.list_errors]


def _schedule_view(schedule: Schedule) -> dict[str, Any]:
    return {
        "time_zone": schedule.time_zone,
        "days": {d: f"{format_clock(s)}-{format_clock(e)}" for d, (s, e) in schedule.days.items()},
    }


def _rule_from_json(index: int, raw: Any) -> Rule:
    where = f"rules[{index}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object with action, kind, value and schedule")
    unknown = set(raw) - {"action", "kind", "value", "schedule", "label"}
    if unknown:
        raise ValueError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    action, kind = raw.get("action"), raw.get("kind", "name")
    value, schedule = raw.get("value", ""), raw.get("schedule")
    if action not in RULE_ACTIONS:
        raise ValueError(f"{where}.action: expected one of {', '.join(RULE_ACTIONS)}")
    if kind not in RULE_KINDS:
        raise ValueError(f"{where}.kind: expected one of {', '.join(RULE_KINDS)}")
    if not isinstance(value, str) or (schedule is not None and not isinstance(schedule, str)):
        raise ValueError(f"{where}: value and schedule are strings")
    if kind == "name":
        try:
            value = _name(value)
        except ValueError as exc:
            raise ValueError(f"{where}.value: {exc}") from None
    elif kind == "all":
        value = ""
    elif not value:
        raise ValueError(f"{where}.value: the id of a {kind}")
    return Rule(action, kind, value, schedule or None)


def _check_references(data: PolicySet, scope: str) -> None:
    """Name the rule of ``scope`` that refers to a list, category or schedule that does not exist."""
    for i, rule in enumerate(data.policies[scope].rules):
        if missing := data.missing_reference(rule):
            raise ValueError(f"rules[{i}]: no {missing}")


def _name(text: str) -> str:
    try:
        return normalise_name(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is {exc}") from None

