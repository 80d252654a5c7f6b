"""The decision for each DNS query: compiled policies, looked up in microseconds.

``PolicyEngine.build`` does all the slow work (reading lists, hashing names, resolving categories) once; the
gateway rebuilds the engine when the policy revision changes and swaps it in. ``decide`` then only does
dictionary and set lookups plus one hashed-list search per query, and allocates only the name's suffixes and
a list of the parts active now in each of the device's scopes: every ``Verdict`` it can return is made at build time.

Order of a decision: quarantine (if the device is in it) -> pause -> rules, most specific scope first
(device, type, tag, global; within a scope an allow beats a block) -> strict profile -> allowed.
Independently, a name outside the device type's profile sets ``anomaly``.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from policy import lists
from policy.lists import ListError, normalise_name
from policy.matcher import DomainIndex, hash_names, suffixes
from policy.model import PolicySet, Rule, category_tag, scope_words
from policy.records import ALLOWED, ALLOWED_ANOMALY, ANSWERS, DeviceContext, Verdict
from policy.schedule import Schedule

_Pair = tuple[Verdict, Verdict]  # (without anomaly, with anomaly), indexed by the anomaly flag
_Verdicts = dict[str, _Pair]  # answer mode -> pair: a rule's answer is the asking device's setting


# What a mode blocks, in words; its key is "<scope> paused|strict".
_MODES = {"paused": "paused (internet off)", "strict": "strict (only its profile)"}


def _pair(action: str, rule: str, words: str, answer: str) -> _Pair:
    return Verdict(action, rule, answer, False, words), Verdict(action, rule, answer, True, words)


def _verdicts(action: str, rule: str, words: str) -> _Verdicts:
    return {answer: _pair(action, rule, words, answer) for answer in ANSWERS}


def _mode(scope: str, mode: str, answer: str) -> _Pair:
    return _pair("blocked", f"{scope} {mode}", f"{scope_words(scope)} mode: {_MODES[mode]}", answer)


def _quarantine(allowed: bool, answer: str) -> _Pair:
    if allowed:
        return _pair("allowed", "quarantine allow", "quarantine: on its allowed list", answer)
    return _pair("blocked", "quarantine", "quarantine: not on its allowed list", answer)


@dataclass
class _Part:
    """The rules of one scope that share a schedule (``None``: always)."""

    schedule: Schedule | None
    allow_names: dict[str, _Verdicts]
    block_names: dict[str, _Verdicts]
    allow_mask: int  # list slots whose hits allow
    block_mask: int
    slot_verdicts: dict[int, _Verdicts]  # slot -> the verdicts naming the rule and list behind it
    block_all: _Verdicts | None


@dataclass
class _Scope:
    key: str
    parts: list[_Part]
    strict: bool | None
    paused: bool | None
    answer: str | None


@dataclass
class _Resolved:
    """A device's chain of scopes with its inherited settings, cached per (mac, type, category)."""

    chain: tuple[_Scope, ...]
    paused: _Pair | None
    strict: _Pair | None
    answer: str
    uses_lists: bool


class PolicyEngine:
    """Compiled policies; ``decide`` is the DNS hot path."""

    def __init__(self) -> None:
        self.revision = 0
        self.list_errors: list[ListError] = []  # bad lines of every list, with file and line
        self.list_sizes: dict[str, int] = {}  # list id -> entries loaded
        self._index = DomainIndex([])
        self._index_key: tuple = ()
        self._scopes: dict[str, _Scope] = {}
        self._profiles: dict[str, frozenset[str]] = {}
        self._quarantine_on = False
        self._quarantine_allow: frozenset[str] = frozenset()
        self._answer = "null"
        self._quarantine_pairs: tuple[_Pair, _Pair] = (_quarantine(True, "null"),) * 2
        self._resolved: dict[tuple, _Resolved] = {}

    # -- building -------------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        data: PolicySet,
        learned_profiles: Mapping[str, Iterable[str]] | None = None,
        base_dir: str | Path = ".",
        previous: PolicyEngine | None = None,
    ) -> PolicyEngine:
        """Compile ``data``. ``learned_profiles`` maps a device type to the SLDs its class contacts (from the
        identifier's model bundle); imported profiles (MUD) in ``data.profiles`` are added to them. List
        paths are relative to ``base_dir``. With ``previous``, lists whose files did not change are reused,
        so a rule change applies at once even with a million listed names.
        """
        data.validate()
        engine = cls()
        engine.revision = data.revision
        engine._answer = data.answer
        used = _used_lists(data)
        slot_of = {list_id: 2 * i for i, list_id in enumerate(used)}  # block entries; +1: exceptions
        if engine._load_lists(data, used, Path(base_dir), previous):
            _release_free_heap()

        profiles: dict[str, set[str]] = {}
        for device_type, names in (learned_profiles or {}).items():
            profiles.setdefault(device_type, set()).update(normalise_name(n) for n in names)
        for device_type, profile in data.profiles.items():
            profiles.setdefault(device_type, set()).update(normalise_name(n) for n in profile.names)
        engine._profiles = {k: frozenset(v) for k, v in profiles.items()}

        engine._quarantine_on = data.quarantine.enabled
        engine._quarantine_allow = frozenset(normalise_name(n) for n in data.quarantine.allow)
        engine._quarantine_pairs = (_quarantine(False, data.answer), _quarantine(True, data.answer))
        for scope, pol in data.policies.items():
            grouped: dict[str | None, list[Rule]] = {}
            for rule in pol.rules:
                grouped.setdefault(rule.schedule, []).append(rule)
            parts = [
                engine._compile_part(scope, data, rules, slot_of, data.schedules.get(name) if name else None)
                for name, rules in grouped.items()
            ]
            engine._scopes[scope] = _Scope(scope, parts, pol.strict, pol.paused, pol.answer)
        return engine

    def _load_lists(
        self, data: PolicySet, used: list[str], base: Path, previous: PolicyEngine | None
    ) -> bool:
        """Load the lists in use into one index, or reuse ``previous``'s; True if anything was read."""
        paths = [base / data.lists[list_id].path for list_id in used]
        key = tuple((list_id, str(p), *_stamp(p)) for list_id, p in zip(used, paths, strict=True))
        if previous is not None and previous._index_key == key:
            self._index, self._index_key = previous._index, key
            self.list_errors, self.list_sizes = previous.list_errors, previous.list_sizes
            return False
        slots = []
        for list_id, path in zip(used, paths, strict=True):
            try:
                parsed = lists.load(path, source=str(path), quote=not data.lists[list_id].url)
            except OSError as exc:
                self.list_errors.append(
                    ListError(str(path), 0, "", f"cannot read list {list_id!r}: {exc.strerror}")
                )
                parsed = lists.ParsedList(str(path), hash_names(()), hash_names(()))
            self.list_errors.extend(parsed.errors)
            self.list_sizes[list_id] = len(parsed)
            slots += [parsed.block, parsed.allow]
        self._index = DomainIndex(slots)
        self._index_key = key
        return bool(used)

    def _compile_part(
        self,
        scope: str,
        data: PolicySet,
        rules: list[Rule],
        slot_of: dict[str, int],
        schedule: Schedule | None,
    ) -> _Part:
        part = _Part(schedule, {}, {}, 0, 0, {}, None)
        for rule in rules:
            # The key and its words are made here, side by side: an owner-given name (a type, a tag, a list
            # category) can hold anything, spaces and " block " too, so no words can be parsed out of a key.
            label = f"{scope} {rule.label()}"
            said = f"{scope_words(scope)} rule: {rule.words()}"
            blocked = _verdicts("blocked", label, said)
            allowed = _verdicts("allowed", label, said)
            if rule.kind == "all":
                if rule.action == "block":
                    part.block_all = blocked
                continue  # "allow all" is what no rule means
            if rule.kind == "name":
                names = part.block_names if rule.action == "block" else part.allow_names
                names[normalise_name(rule.value)] = blocked if rule.action == "block" else allowed
                continue
            ids = [rule.value] if rule.kind == "list" else data.categories[rule.value]
            for list_id in ids:
                if list_id not in slot_of:
                    continue  # disabled list
                base = slot_of[list_id]
                sub, sub_said = label, said
                if rule.kind == "category":  # which of the category's lists named the name
                    sub, sub_said = f"{label} list={list_id}", f"{said} (list {list_id})"
                if rule.action == "block":
                    part.block_mask |= 1 << base
                    part.allow_mask |= 1 << (base + 1)  # the list's own @@ exceptions
                    part.slot_verdicts.setdefault(base, _verdicts("blocked", sub, sub_said))
                    part.slot_verdicts.setdefault(base + 1, _verdicts(
                        "allowed", f"{sub} exception", f"{sub_said}, but the list makes an exception"))
                else:
                    part.allow_mask |= 0b11 << base
                    part.slot_verdicts[base] = part.slot_verdicts[base + 1] = _verdicts("allowed", sub, sub_said)
        return part

    # -- deciding -----------------------------------------------------------------------------------------

    def is_quarantined(self, ctx: DeviceContext) -> bool:
        """Whether ``ctx`` gets only its quarantine allow list (and its traffic through the gateway is dropped)."""
        return ctx.quarantined or (self._quarantine_on and ctx.status != "approved")

    def profile(self, device_type: str | None) -> frozenset[str] | None:
        """The allow profile of a device type (learned and imported), or None if it has none."""
        return self._profiles.get(device_type) if device_type else None

    def decide(self, ctx: DeviceContext, qname: str, now: float) -> Verdict:
        """The verdict for ``qname`` (``example.com`` or ``example.com.``, any case) from ``ctx`` at ``now``
        (Unix seconds)."""
        sfx = suffixes(qname.rstrip(".").lower())
        profile = self._profiles.get(ctx.device_type) if ctx.device_type else None
        anomaly = profile is not None and profile.isdisjoint(sfx)
        if ctx.quarantined or (self._quarantine_on and ctx.status != "approved"):
            ok = (
                not self._quarantine_allow.isdisjoint(sfx)
                or (profile is not None and not anomaly)
                or not ctx.cloud_slds.isdisjoint(sfx)
            )
            return self._quarantine_pairs[ok][anomaly]
        res = self._resolve(ctx)
        if res.paused is not None:
            return res.paused[anomaly]
        matched = self._match(res, sfx, now)
        if matched is not None:
            return matched[res.answer][anomaly]
        if res.strict is not None and (profile is None or anomaly):
            return res.strict[anomaly]
        return ALLOWED_ANOMALY if anomaly else ALLOWED

    def check_cname_chain(self, ctx: DeviceContext, names: Iterable[str], now: float) -> Verdict:
        """The verdict for the CNAME targets of an upstream answer: a target that a block rule or list names
        blocks the answer. Only explicit rules apply here; profiles, strict mode and quarantine judge the name
        the device asked for, not the CDN behind it."""
        res = self._resolve(ctx)
        for name in names:
            matched = self._match(res, suffixes(name.rstrip(".").lower()), now)
            if matched is not None and matched[res.answer][0].blocked:
                alias, rule = name.rstrip(".").lower(), matched[res.answer][0]
                return Verdict("blocked", f"cname {alias}: {rule.rule}", res.answer,
                               words=f"its alias {alias}: {rule.words}")
        return ALLOWED

    def _match(self, res: _Resolved, sfx: list[str], now: float) -> _Verdicts | None:
        mask = self._index.mask(sfx) if res.uses_lists else 0
        for scope in res.chain:
            active = [p for p in scope.parts if p.schedule is None or p.schedule.active(now)]
            for part in active:  # allows first: an exception beats a block in the same scope
                if part.allow_names and not part.allow_names.keys().isdisjoint(sfx):
                    return next(part.allow_names[s] for s in sfx if s in part.allow_names)
                if mask & part.allow_mask:
                    return part.slot_verdicts[_lowest_slot(mask & part.allow_mask)]
            for part in active:
                if part.block_names and not part.block_names.keys().isdisjoint(sfx):
                    return next(part.block_names[s] for s in sfx if s in part.block_names)
                if mask & part.block_mask:
                    return part.slot_verdicts[_lowest_slot(mask & part.block_mask)]
                if part.block_all is not None:
                    return part.block_all
        return None

    def _resolve(self, ctx: DeviceContext) -> _Resolved:
        key = (ctx.mac, ctx.device_type, ctx.category)
        res = self._resolved.get(key)
        if res is not None:
            return res
        keys = [f"device:{ctx.mac.lower()}"]
        if ctx.device_type:
            keys.append(f"type:{ctx.device_type}")
        if ctx.category:
            keys.append(f"tag:{category_tag(ctx.category)}")
        keys.append("global")
        chain = tuple(self._scopes[k] for k in keys if k in self._scopes)
        paused = next((s for s in chain if s.paused is not None), None)
        strict = next((s for s in chain if s.strict is not None), None)
        answer = next((s.answer for s in chain if s.answer is not None), self._answer)
        res = _Resolved(
            chain,
            _mode(paused.key, "paused", answer) if paused and paused.paused else None,
            _mode(strict.key, "strict", answer) if strict and strict.strict else None,
            answer,
            any(p.allow_mask or p.block_mask for s in chain for p in s.parts),
        )
        if len(self._resolved) > 65536:  # bounded: devices come and go
            self._resolved.clear()
        self._resolved[key] = res
        return res


def _release_free_heap() -> None:
    """Hand the heap freed after a bulk list load back to the OS (glibc keeps it otherwise: ~50 MB for a
    million names, which a Pi feels). Elsewhere this does nothing."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _lowest_slot(mask: int) -> int:
    return (mask & -mask).bit_length() - 1


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_mtime_ns, st.st_size)


def _used_lists(data: PolicySet) -> list[str]:
    """Enabled lists some rule refers to, directly or through a category, in a stable order."""
    used: dict[str, None] = {}
    for pol in data.policies.values():
        for rule in pol.rules:
            ids = (
                [rule.value]
                if rule.kind == "list"
                else data.categories.get(rule.value, [])
                if rule.kind == "category"
                else []
            )
            for list_id in ids:
                if data.lists[list_id].enabled:
                    used[list_id] = None
    if 2 * len(used) > DomainIndex.MAX_SLOTS:
        raise ValueError(f"{len(used)} lists in use; at most {DomainIndex.MAX_SLOTS // 2} (merge some lists)")
    return list(used)
