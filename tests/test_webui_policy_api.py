"""``/api/v1/policies`` on a real store and policy file: tokens and sessions, clear refusals, and changes that
show in ``policy.json`` and in the real ``iotgw policy`` command."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import event

from gateway import accounts, policies
from gateway.store.db import Store
from gateway.store.schema import Device
from policy.engine import PolicyEngine
from policy.records import DeviceContext
from tests.test_policy_engine import _ts
from tests.webui_seed import add_device, config
from webui.app import create_app

MAC = "aa:bb:cc:00:00:01"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def api(tmp_path):
    cfg = config(tmp_path)
    store = Store(cfg.db_url)
    add_device(store, MAC, hostname="plug", identified=True)  # tplink-plug-hs110, category plug
    _, write = accounts.create_token(store, "automation", "write")
    _, read = accounts.create_token(store, "dashboard", "read")
    app = create_app(store, cfg)
    yield app, cfg.state_dir, {"Authorization": f"Bearer {write}"}, {"Authorization": f"Bearer {read}"}
    store.close()


def _cli(state_dir: Path, *argv: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "policy", "--state-dir", str(state_dir), *argv],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_read_token_reads_but_cannot_change_policy(api):
    app, state_dir, _, read = api
    client = app.test_client()
    assert client.get("/api/v1/policies", headers=read).json["policies"][0]["scope"] == "global"
    body = {"rules": [{"action": "block", "kind": "name", "value": "ads.example"}]}
    for method, url in (
        ("PUT", f"/api/v1/policies/device/{MAC}"),
        ("PUT", "/api/v1/policies/global"),
        ("DELETE", "/api/v1/policies/type/cam"),
        ("PUT", "/api/v1/policies/quarantine"),
        ("POST", "/api/v1/policies/lists"),
    ):
        r = client.open(url, method=method, json=body, headers=read)
        assert r.status_code == 403 and r.json["error"] == "this token is read-only", url
    assert not (state_dir / "policy.json").exists()


def test_device_policy_put_shows_in_policy_json_and_in_iotgw_policy(api):
    app, state_dir, write, _ = api
    client = app.test_client()
    body = {"rules": [{"action": "block", "kind": "name", "value": "Ads.Example."}], "answer": "nxdomain"}
    r = client.put(f"/api/v1/policies/device/{MAC.upper()}", json=body, headers=write)
    assert r.status_code == 200, r.json
    assert r.json["scope"] == f"device:{MAC}" and r.json["rules"][0]["value"] == "ads.example"
    assert [s["scope"] for s in r.json["inherits"]] == ["global"]  # no type or tag default yet
    saved = json.loads((state_dir / "policy.json").read_text())
    assert saved["policies"][f"device:{MAC}"]["rules"] == [
        {"action": "block", "kind": "name", "value": "ads.example", "schedule": None}
    ]
    assert saved["policies"][f"device:{MAC}"]["answer"] == "nxdomain"
    shown = json.loads(_cli(state_dir, "show"))
    assert shown["policies"][f"device:{MAC}"]["rules"][0]["value"] == "ads.example"
    verdict = json.loads(_cli(state_dir, "test", MAC, "x.ads.example").strip().splitlines()[-1])
    assert verdict == {"action": "blocked", "rule": f"device:{MAC} block name=ads.example", "answer": "nxdomain",
                       "anomaly": False, "rule_words": "its own rule: block ads.example"}
    other = json.loads(_cli(state_dir, "test", "aa:bb:cc:00:00:02", "x.ads.example").strip().splitlines()[-1])
    assert other["action"] == "allowed"

    # A type default shows up in the device's chain; the CLI's change shows in the API.
    _cli(state_dir, "block", "type:tplink-plug-hs110", "video.example")
    r = client.get(f"/api/v1/policies/device/{MAC}", headers=write)
    assert [s["scope"] for s in r.json["inherits"]] == ["type:tplink-plug-hs110", "global"]
    assert client.get("/api/v1/policies/type/tplink-plug-hs110", headers=write).json["rules"][0]["value"] == (
        "video.example"
    )
    assert client.delete(f"/api/v1/policies/device/{MAC}", headers=write).status_code == 204
    assert client.delete(f"/api/v1/policies/device/{MAC}", headers=write).status_code == 404
    assert f"device:{MAC}" not in json.loads((state_dir / "policy.json").read_text())["policies"]


@pytest.mark.parametrize(
    ("url", "body", "message"),
    [
        ("/api/v1/policies/global", {"rules": [{"action": "block", "value": "not a name"}]},
         "rules[0].value: 'not a name' is not a domain name"),
        ("/api/v1/policies/global", {"rules": [{"action": "deny", "value": "a.example"}]},
         "rules[0].action: expected one of block, allow"),
        ("/api/v1/policies/tag/device_tv", {"rules": [{"action": "block", "kind": "list", "value": "oisd"}]},
         "rules[0]: no list 'oisd'"),
        ("/api/v1/policies/device/not-a-mac", {"rules": []}, "'not-a-mac' is not a MAC address"),
        ("/api/v1/policies/global", ["block", "ads.example"], "expected a JSON object"),
        ("/api/v1/policies/global", {"strict": 1}, "strict: expected true, false or null"),
        ("/api/v1/policies/tag/device_tv", {"paused": 0.0}, "paused: expected true, false or null"),
        ("/api/v1/policies/quarantine", {"enabled": "yes"}, "enabled: expected true or false"),
        ("/api/v1/policies/quarantine", {"enabled": True, "allow": ["ntp.example", "no way"]},
         "'no way' is not a domain name"),
        ("/api/v1/policies/schedules/night", {"time_zone": "Mars/Base", "days": {"mon": "21:00-24:00"}},
         "unknown time zone 'Mars/Base'"),
        ("/api/v1/policies/schedules/night", {"days": {"mon": "22:00-22:00"}}, "mon: 22:00-22:00 is empty"),
        ("/api/v1/policies/schedules/night", {"days": {"mon": "24:00-07:00"}}, "starts at 24:00"),
        ("/api/v1/policies/schedules/night", {"time_zone": 0, "days": {"mon": "21:00-24:00"}},
         "time_zone: expected a string"),
        # A misspelt field was ignored: the schedule was saved in UTC, the quarantine kept its old allow list.
        ("/api/v1/policies/schedules/night", {"timezone": "Europe/Berlin", "days": {"mon": "21:00-24:00"}},
         "unknown field 'timezone'"),
        ("/api/v1/policies/quarantine", {"enabled": True, "allowed": ["ntp.example"]}, "unknown field 'allowed'"),
    ],
)
def test_bad_input_is_a_400_with_a_clear_message_and_changes_nothing(api, url, body, message):
    app, state_dir, write, _ = api
    r = app.test_client().put(url, json=body, headers=write)
    assert r.status_code == 400 and message in r.json["error"], r.json
    assert not (state_dir / "policy.json").exists()


@pytest.mark.parametrize(("kind", "name", "found"), [
    ("type", "cam\u202eevil", "U+202E"), ("type", "two%0Alines", "U+000A"), ("tag", "device_%1B[2Jtv", "U+001B"),
    ("tag", "tv%09x", "U+0009"), ("type", "x" * 101, None)])
def test_a_type_or_tag_named_with_control_or_bidi_characters_is_a_400_and_changes_nothing(api, kind, name, found):
    """Type and tag scopes took any name through the API (the path is the name): a newline or U+202E was stored
    in policy.json and shown on the policy page and by ``iotgw policy show``. They are refused as in device names."""
    app, state_dir, write, _ = api
    client = app.test_client()
    body = {"rules": [{"action": "block", "value": "ads.example"}]}
    for method, kwargs in (("put", {"json": body}), ("delete", {}), ("get", {})):
        r = getattr(client, method)(f"/api/v1/policies/{kind}/{name}", headers=write, **kwargs)
        assert r.status_code == 400, (method, r.status_code, r.json)
        expected = f"control or bidi characters (found {found})" if found else "at most 100 characters"
        assert f"a {kind if kind == 'type' else 'tag'} name" in r.json["error"] and expected in r.json["error"]
    assert not (state_dir / "policy.json").exists()
    assert client.put(f"/api/v1/policies/{kind}/smart%20plug\u200d", json=body, headers=write).status_code == 200


def test_lists_schedules_and_quarantine_through_the_api(api, tmp_path):
    app, state_dir, write, _ = api
    client = app.test_client()
    outside = tmp_path / "ads.txt"
    outside.write_text("ads.example\n")
    r = client.post("/api/v1/policies/lists", json={"id": "ads", "file": str(outside)}, headers=write)
    assert r.status_code == 400 and "a file name in" in r.json["error"]
    (state_dir / "lists").mkdir(parents=True)
    (state_dir / "lists" / "ads.txt").write_text("ads.example\n||t.example^\n<script>x</script>\n")
    r = client.post("/api/v1/policies/lists", json={"id": "ads", "file": "ads.txt", "category": "privacy"},
                    headers=write)
    assert r.status_code == 201 and (r.json["blocked"], r.json["error_count"]) == (2, 1)
    assert "ads.txt:3:" in r.json["errors"][0]
    r = client.put("/api/v1/policies/tag/device_plug",
                   json={"rules": [{"action": "block", "kind": "category", "value": "privacy"}]}, headers=write)
    assert r.status_code == 200
    r = client.put(f"/api/v1/policies/device/{MAC}",
                   json={"rules": [{"action": "allow", "kind": "list", "value": "ads"}]}, headers=write)
    assert r.status_code == 200
    r = client.delete("/api/v1/policies/lists/ads", headers=write)
    assert r.status_code == 400 and f"used by device:{MAC}: allow list=ads" in r.json["error"]
    assert client.delete(f"/api/v1/policies/device/{MAC}", headers=write).status_code == 204
    r = client.put("/api/v1/policies/schedules/night",
                   json={"time_zone": "Europe/Berlin", "days": {"mon": "21:00-24:00"}}, headers=write)
    assert r.json == {"time_zone": "Europe/Berlin", "days": {"mon": "21:00-24:00"}}
    r = client.put("/api/v1/policies/quarantine", json={"enabled": True, "allow": ["pool.ntp.org"]}, headers=write)
    assert r.json == {"enabled": True, "allow": ["pool.ntp.org"]}
    view = client.get("/api/v1/policies", headers=write).json
    assert view["lists"] == [{"id": "ads", "path": "lists/ads.txt", "url": "", "enabled": True,
                              "categories": ["privacy"]}]
    assert view["quarantine"]["enabled"] is True and "night" in view["schedules"]
    verdict = json.loads(_cli(state_dir, "test", MAC, "x.t.example", "--category", "plug").strip().splitlines()[-1])
    assert verdict["rule"] == "tag:device_plug block category=privacy list=ads"


def _log_in(app):  # noqa: ANN001, ANN202 - a Flask app; (test client, its CSRF token)
    """A browser session logged in as admin, and its CSRF token."""
    accounts.set_password(app.extensions["iotgw"].store, "correct horse battery")
    client = app.test_client()
    client.get("/login")
    with client.session_transaction() as sess:
        token = sess["csrf_token"]
    client.post("/login", data={"username": "admin", "password": "correct horse battery", "csrf_token": token})
    with client.session_transaction() as sess:  # login starts a new session with its own token
        return client, sess["csrf_token"]


@pytest.mark.parametrize(
    ("file", "message"),
    [("x" * 300, "at most 255 bytes"), ("x" * 5000, "at most 255 bytes"), ("é" * 200, "at most 255 bytes"),
     ("ads\x00.txt", "no control characters"), ("ads\n.txt", "no control characters")],
    ids=["300", "5000", "400 bytes", "nul", "newline"],
)
def test_list_file_name_the_os_would_refuse_is_a_400_on_the_api_and_the_page(api, file, message):
    app, state_dir, write, _ = api
    (state_dir / "lists").mkdir(parents=True)
    client = app.test_client()
    r = client.post("/api/v1/policies/lists", json={"id": "l1", "file": file}, headers=write)
    assert r.status_code == 400 and message in r.json["error"] and len(r.json["error"]) < 300
    client, token = _log_in(app)
    r = client.post("/policies/lists", data={"list_id": "l1", "file": file, "csrf_token": token})
    if "\x00" in file:  # refused before any view: no form field holds a NUL (PostgreSQL refuses them)
        assert r.status_code == 400 and "A NUL character is in the request" in r.get_data(as_text=True)
    else:
        assert r.status_code == 302
        with client.session_transaction() as sess:
            assert any(message in text for _, text in sess.get("_flashes", []))
    assert not (state_dir / "policy.json").exists()


def test_a_list_whose_server_is_down_is_a_502_on_the_api_and_a_message_on_the_page(api):
    app, state_dir, write, _ = api
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/hosts.txt"
    client = app.test_client()
    r = client.post("/api/v1/policies/lists", json={"id": "ads", "url": url}, headers=write)
    assert r.status_code == 502 and r.json["error"].startswith(f"{url}: cannot be fetched: ")
    client, token = _log_in(app)
    r = client.post("/policies/lists", data={"list_id": "ads", "url": url, "csrf_token": token})
    assert r.status_code == 302
    with client.session_transaction() as sess:
        assert any(text.startswith(f"Not changed: {url}: cannot be fetched") for _, text in sess["_flashes"])
    assert not (state_dir / "policy.json").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
@pytest.mark.parametrize("url", ["http://exa mple.com/ads.txt", "http://a.example/ads.txt\r\nX: y",
                                 "http://%00/ads.txt", "http:///ads.txt", "https://a.example:99999/ads.txt"])
def test_a_list_url_that_is_no_url_is_a_400_naming_it_not_a_502_blaming_a_server(api, url):
    app, state_dir, write, _ = api
    r = app.test_client().post("/api/v1/policies/lists", json={"id": "ads", "url": url}, headers=write)
    assert r.status_code == 400 and repr(url) in r.json["error"], r.json
    assert not (state_dir / "policy.json").exists()


def test_a_lan_page_added_as_a_list_is_not_shown_back_by_the_api_or_the_page(api):
    """A write token or the owner could have the gateway fetch any LAN URL and read its lines in the list report.
    The page is on another host of a LAN (a namespace): fetching from the gateway's own addresses is refused."""
    from tests.capture_netns import http_server, veth_pair

    app, _, write, _ = api

    def page(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.end_headers()
        handler.wfile.write(b"<html>\nadmin password: hunter2\n")

    client, token = _log_in(app)
    with (veth_pair(f"wl{os.getpid() % 100000}") as pair,
          http_server(pair, pair.client, pair.client_ip4, page) as base, pair.enter()):
        url = f"{base}/status"
        r = app.test_client().post("/api/v1/policies/lists", json={"id": "nas", "url": url}, headers=write)
        form = client.post("/policies/lists", data={"list_id": "page", "url": url, "csrf_token": token})
    assert r.status_code == 201 and r.json["error_count"] == 2
    assert r.json["errors"][1].endswith("nas.txt:2: neither a hosts line, a domain nor an adblock rule")
    assert form.status_code == 302
    with client.session_transaction() as sess:
        flashed = [text for _, text in sess["_flashes"]]
    assert any(text.endswith("page.txt:2: neither a hosts line, a domain nor an adblock rule") for text in flashed)
    assert "hunter2" not in r.get_data(as_text=True) + json.dumps(flashed)


def test_session_writes_need_the_csrf_header(api):
    app, state_dir, _, _ = api
    client, token = _log_in(app)
    body = {"paused": True}
    assert client.put(f"/api/v1/policies/device/{MAC}", json=body).status_code == 403
    r = client.put(f"/api/v1/policies/device/{MAC}", json=body, headers={"X-CSRF-Token": token})
    assert r.status_code == 200 and r.json["mode"] == "paused"
    assert _cli(state_dir, "show").count('"paused": true') == 1


def test_hostile_type_names_render_as_text_on_the_policies_page(api):
    app, _, write, _ = api
    evil = "<img src=x onerror=alert(1)>"
    client = app.test_client()
    assert client.put(f"/api/v1/policies/type/{evil}", json={"paused": True}, headers=write).status_code == 200
    r = client.put("/api/v1/policies/schedules/a b", json={"days": {}}, headers=write)
    assert r.status_code == 400 and "schedule name 'a b'" in r.json["error"]
    client, _ = _log_in(app)
    html = client.get("/policies").get_data(as_text=True)
    assert "<img src=x" not in html and "type:&lt;img src=x onerror=alert(1)&gt;" in html


def test_a_rule_removed_on_a_page_shown_before_the_cli_changed_the_scope_is_the_rule_shown(api):
    """The remove button posted the rule's place alone: after ``iotgw policy unrule`` (or another browser) removed
    an earlier rule, it removed the rule below the one the owner clicked, and said so only in passing."""
    import re

    app, state_dir, _, _ = api
    scope = f"device:{MAC}"
    for name in ("a.example", "b.example", "c.example"):
        _cli(state_dir, "block", scope, name)
    client, _ = _log_in(app)
    html = client.get(f"/devices/{MAC}").get_data(as_text=True)
    forms = re.findall(r'<form method="post" action="/policies/rules/remove"[^>]*>(.*?)</form>', html, re.S)
    fields = [dict(re.findall(r'name="([a-z_]+)" value="([^"]*)"', form)) for form in forms]
    assert len(fields) == 3
    _cli(state_dir, "unrule", scope, "0")  # meanwhile, from a shell: a.example goes
    r = client.post("/policies/rules/remove", data=fields[1])  # the owner removes b.example, as shown
    assert r.status_code == 302
    left = [rule["value"] for rule in json.loads(_cli(state_dir, "show"))["policies"][scope]["rules"]]
    assert left == ["c.example"]
    r = client.post("/policies/rules/remove", data=fields[0])  # a.example, already gone: nothing else goes
    with client.session_transaction() as sess:
        assert "no rule 'block name=a.example'" in sess["_flashes"][-1][1]
    assert [rule["value"] for rule in json.loads(_cli(state_dir, "show"))["policies"][scope]["rules"]] == left


def test_a_put_made_from_a_scope_changed_since_it_was_read_is_refused_with_412_and_keeps_the_other_change(api):
    """PUT replaced a scope whole with no version check: a script that read a scope, edited it and wrote it back
    silently dropped the rule ``iotgw policy block`` added in between. GET gives an ETag; a PUT with If-Match
    that no longer matches is a 412 and changes nothing; a PUT without If-Match still replaces the scope."""
    app, state_dir, write, _ = api
    client = app.test_client()
    url = f"/api/v1/policies/device/{MAC}"
    _cli(state_dir, "block", f"device:{MAC}", "a.example")
    r = client.get(url, headers=write)
    etag, rules = r.headers["ETag"], r.json["rules"]
    assert etag.startswith('"')
    _cli(state_dir, "block", f"device:{MAC}", "cli.example")  # meanwhile, the owner's shell
    _cli(state_dir, "block", "global", "elsewhere.example")  # another scope's change is no conflict
    body = {"rules": [*rules, {"action": "block", "kind": "name", "value": "script.example"}]}
    r = client.put(url, json=body, headers={**write, "If-Match": etag})
    assert r.status_code == 412 and "changed since it was read" in r.json["error"]
    saved = json.loads(_cli(state_dir, "show"))["policies"][f"device:{MAC}"]["rules"]
    assert [rule["value"] for rule in saved] == ["a.example", "cli.example"]  # nothing lost, nothing written

    r = client.get(url, headers=write)  # the script reads again and redoes its edit
    body = {"rules": [*r.json["rules"], {"action": "block", "kind": "name", "value": "script.example"}]}
    r2 = client.put(url, json=body, headers={**write, "If-Match": r.headers["ETag"]})
    assert r2.status_code == 200 and r2.headers["ETag"] != r.headers["ETag"]
    assert [rule["value"] for rule in r2.json["rules"]] == ["a.example", "cli.example", "script.example"]
    assert client.get(url, headers=write).headers["ETag"] == r2.headers["ETag"]
    r = client.put(url, json=body, headers={**write, "If-Match": r.headers["ETag"]})  # the same PUT, replayed
    assert r.status_code == 412

    r = client.get("/api/v1/policies/global", headers=write)
    assert r.headers["ETag"]
    r = client.put("/api/v1/policies/global", json={"rules": []}, headers={**write, "If-Match": "*"})
    assert r.status_code == 200 and r.json["rules"] == []
    r = client.put(url, json={"rules": []}, headers=write)  # a simple client without If-Match
    assert r.status_code == 200 and r.json["rules"] == []

def test_the_policies_page_reads_only_the_devices_with_a_policy_of_their_own(api):
    app, _, write, _ = api
    store = app.extensions["iotgw"].store
    for i in range(2, 302):  # what a LAN host spoofing MACs leaves behind
        add_device(store, f"02:00:00:00:{i // 256:02x}:{i % 256:02x}", ip=f"10.0.{i // 256}.{i % 256}")
    client = app.test_client()
    assert client.put(f"/api/v1/policies/device/{MAC}", json={"paused": True}, headers=write).status_code == 200
    loaded = []

    def count(target: Device, _context: object) -> None:
        loaded.append(target.mac)

    event.listen(Device, "load", count)
    try:
        client, _ = _log_in(app)
        html = client.get("/policies").get_data(as_text=True)
    finally:
        event.remove(Device, "load", count)
    assert loaded == [MAC] and ">plug</a>" in html


def test_a_policy_file_broken_by_hand_is_named_on_the_pages_and_the_api_not_a_bare_500(api):
    app, state_dir, write, _ = api
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    (Path(state_dir) / "policy.json").write_text('{"policies": {"global": {"rules": [{"action": "x"}]}}}')
    client, _ = _log_in(app)
    for url in ("/devices", f"/devices/{MAC}", "/policies"):
        r = client.get(url)
        assert r.status_code == 500 and "The policy file cannot be read: " in r.get_data(as_text=True), url
        assert "policy.json" in r.get_data(as_text=True)
    r = app.test_client().get("/api/v1/policies", headers=write)
    assert r.status_code == 500 and r.json["error"].startswith("The policy file cannot be read: ")


def test_a_schedule_named_with_spaces_around_is_saved_under_its_name_and_answered(api):
    app, _, write, _ = api
    client = app.test_client()
    r = client.put("/api/v1/policies/schedules/%20bedtime%09", json={"days": {"mon": "21:00-24:00"}}, headers=write)
    assert r.status_code == 200 and r.json["days"] == {"mon": "21:00-24:00"}
    assert list(client.get("/api/v1/policies", headers=write).json["schedules"]) == ["bedtime"]


def test_a_bedtime_from_22_to_07_is_saved_through_the_api_and_blocks_that_night(api):
    """{"mon": "22:00-07:00"} was a 400 ("crosses midnight"): it is Monday 22:00 to Tuesday 07:00, answered and
    listed as sent, so that a client can send it back."""
    app, state_dir, write, _ = api
    client = app.test_client()
    r = client.put("/api/v1/policies/schedules/bedtime",
                   json={"time_zone": "America/New_York", "days": {"mon": "22:00-07:00"}}, headers=write)
    assert r.status_code == 200 and r.json == {"time_zone": "America/New_York", "days": {"mon": "22:00-07:00"}}
    r = client.put(f"/api/v1/policies/device/{MAC}",
                   json={"rules": [{"action": "block", "kind": "all", "schedule": "bedtime"}]}, headers=write)
    assert r.status_code == 200
    assert client.get("/api/v1/policies", headers=write).json["schedules"]["bedtime"]["days"] == {"mon": "22:00-07:00"}
    engine = PolicyEngine.build(policies.load(state_dir), base_dir=state_dir)
    device = DeviceContext(MAC, None, None, "approved")
    tz = "America/New_York"
    assert [engine.decide(device, "x.example", _ts(tz, 2024, 1, d, h, m, 0)).blocked
            for d, h, m in ((15, 21, 59), (15, 22, 0), (16, 6, 59), (16, 7, 0))] == [False, True, True, False]
