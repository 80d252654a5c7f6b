"""The Policies page and the forms of the policy editors (on it and on each device's page).

Each form posts the scope it edits (``global``, ``type:...``, ``tag:...``, ``device:<mac>``); the view calls
``gateway.policies``, flashes the outcome or the reason it was refused, and returns to where the form was.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flask import flash, redirect, render_template, request, url_for

from gateway import policies
from gateway.devices.service import device_categories, device_types, list_devices
from policy.model import CATEGORY_TAGS, category_tag, normalise_scope
from policy.records import ANSWERS
from policy.schedule import DAYS
from webui.context import ctx
from webui.pages import bp

# How the pages name each answer a blocked query can get: a flash said "Blocked queries answered null."
ANSWER_WORDS = {"null": "0.0.0.0 / ::", "nxdomain": "NXDOMAIN", "nodata": "no data", "refused": "REFUSED"}


@bp.get("/policies", endpoint="policies")
def policies_page():  # noqa: ANN201
    data = policies.load(ctx().cfg.state_dir)
    view = policies.overview(data)
    scopes = view["policies"]
    own = {s["scope"][len("device:"):]: s for s in scopes if s["scope"].startswith("device:")}
    # Only the devices with a policy of their own: a LAN host spoofing MACs can make thousands of others.
    names = {d.mac: d.name for d in list_devices(ctx().store, macs=list(own))}
    return render_template(
        "policies.html",
        p=view,
        global_scope=scopes[0],
        defaults=[s for s in scopes if s["scope"].startswith(("type:", "tag:"))],
        devices=[s | {"mac": mac, "name": names.get(mac)} for mac, s in own.items()],
        modes=policies.MODES,
        answers=ANSWERS,
        answer_words=ANSWER_WORDS,
        days=DAYS,
        schedule_times={name: schedule.describe() for name, schedule in data.schedules.items()},
        types=device_types(ctx().store),
        # AdGuard Home's tags and the home's own categories' (a plug is device_plug, which AdGuard Home has not)
        tags=sorted({*CATEGORY_TAGS.values(), *map(category_tag, device_categories(ctx().store))}),
        lists_dir=policies.lists_dir(ctx().cfg.state_dir),
    )


@bp.post("/policies/rules")
def policy_rule_add():  # noqa: ANN201
    form = request.form
    return _apply(
        lambda d, scope: "Added: " + policies.add_rule(
            d, scope, policies.rule_from_target(form.get("action", ""), form.get("target", ""), form.get("schedule"))
        ).words() + ".",
    )


@bp.post("/policies/rules/remove")
def policy_rule_remove():  # noqa: ANN201
    index = request.form.get("index", type=int)
    label = request.form.get("rule")  # the rule the page showed at ``index``: it goes even if it moved since

    def remove(d: Path, scope: str) -> str:
        return f"Removed: {policies.remove_rule(d, scope, -1 if index is None else index, label).words()}."

    return _apply(remove)


@bp.post("/policies/mode")
def policy_mode():  # noqa: ANN201
    mode = request.form.get("mode", "")
    return _apply(lambda d, scope: policies.set_mode(d, scope, mode), f"Mode set to {mode}.")


@bp.post("/policies/answer")
def policy_answer():  # noqa: ANN201
    answer = request.form.get("answer", "")
    return _apply(lambda d, scope: policies.set_answer(d, scope, answer),
                  f"Blocked queries now get {ANSWER_WORDS.get(answer, answer)}.")


@bp.post("/policies/lists")
def policy_list_add():  # noqa: ANN201
    form = request.form

    def add(d: Path, _: str) -> str:
        report = policies.add_list(
            d,
            form.get("list_id", ""),
            path=form.get("file", "").strip() or None,
            url=form.get("url", "").strip() or None,
            category=form.get("category"),
        )
        for error in report.errors[:5]:
            flash(error)
        return report.summary() + "."

    return _apply(add, scope="global")


@bp.post("/policies/lists/<list_id>/update")
def policy_list_update(list_id: str):  # noqa: ANN201
    return _apply(lambda d, _: policies.update_list(d, list_id).summary() + ".", scope="global")


@bp.post("/policies/lists/<list_id>/remove")
def policy_list_remove(list_id: str):  # noqa: ANN201
    return _apply(lambda d, _: policies.remove_list(d, list_id), f"List {list_id} removed.", scope="global")


@bp.post("/policies/schedules")
def policy_schedule_set():  # noqa: ANN201
    form = request.form
    name = form.get("name", "").strip()
    span = f"{form.get('start', '').strip()}-{form.get('end', '').strip()}"
    days = [f"{day}={span}" for day in form.getlist("day")]

    def save(state_dir: Path, _: str) -> str:  # said back as saved: 22:00-07:00 reads as ending the next morning
        schedule = policies.set_schedule(state_dir, name, form.get("time_zone", "UTC"), days)
        return f"Schedule {name} saved: {schedule.describe()}."

    return _apply(save, scope="global")


@bp.post("/policies/schedules/<name>/remove")
def policy_schedule_remove(name: str):  # noqa: ANN201
    return _apply(lambda d, _: policies.remove_schedule(d, name), f"Schedule {name} removed.", scope="global")


@bp.post("/policies/quarantine")
def policy_quarantine():  # noqa: ANN201
    form = request.form
    enabled = form.get("enabled") == "on"
    allow = form.get("allow", "").replace(",", " ").split()

    def change(d: Path, _: str) -> str:
        allowed = policies.set_quarantine(d, enabled, allow)
        return f"Quarantine of new devices {'on' if enabled else 'off'}; allowed: {', '.join(allowed)}."

    return _apply(change, scope="global")


def _apply(change: Callable[[Path, str], object], done: str | None = None, scope: str | None = None):  # noqa: ANN202
    """Run ``change(state_dir, scope)`` for the form's scope and go back to its editor, flashing ``done`` (or
    what ``change`` returned) or the reason the change was refused."""
    form = request.form
    try:
        if scope is None:
            # An existing scope comes as "scope"; a new type or category default as "kind" and "target_scope".
            scope = normalise_scope(
                form.get("scope") or f"{form.get('kind', '')}:{form.get('target_scope', '').strip()}"
            )
        result = change(ctx().cfg.state_dir, scope)
        flash(done or str(result))
    except ValueError as exc:
        flash(f"Not changed: {exc}")
    if scope and scope.startswith("device:"):
        return redirect(url_for("pages.device", mac=scope[len("device:"):]) + "#policy-editor")
    return redirect(url_for("pages.policies"))
