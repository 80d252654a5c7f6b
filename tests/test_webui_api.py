"""The JSON API's answers on a real store, through a write-scoped bearer token (the session path is covered by
test_webui_security)."""

from __future__ import annotations

import json
import time

import pytest

from gateway import accounts
from gateway.alerts import Alerts
from gateway.devices import service
from gateway.events import Alert
from gateway.store.db import Store
from gateway.store.schema import DeviceName, DhcpFingerprint, MdnsService, Query
from tests.webui_seed import add_device, config
from webui.app import create_app

MAC = "aa:bb:cc:00:00:01"


@pytest.fixture
def api(tmp_path):
    cfg = config(tmp_path)
    cfg.identifier.model_dir = str(tmp_path / "model")
    store = Store(cfg.db_url)
    add_device(
        store,
        MAC,
        hostname="plug",
        identified=True,
        queries=("a.example.com", "b.example.com", "c.other.net"),
    )
    _, secret = accounts.create_token(store, "tests", "write")

    # Recorded the way the daemon records it (MQTT is off in this config, so only the history is written).
    Alerts(store, cfg).send(Alert(kind="new_device", ts=1.0, mac=MAC, data={"vendor": None, "name": "<b>plug</b>",
                                                                          "ip": None}))
    app = create_app(store, cfg)
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {secret}"
    yield client, store, tmp_path
    store.close()


def test_device_detail_carries_identity_alternatives_and_timeline(api):
    client, _, _ = api
    d = client.get(f"/api/v1/devices/{MAC.upper()}").json
    assert d["identity"]["device_type"] == "tplink-plug-hs110" and d["identity"]["decided_after_s"] == 4.2
    assert d["alternatives"][0] == {"label": "tplink-plug-hs100", "confidence": 0.04}
    assert d["signals"] == ["dns", "oui", "dhcp"]
    assert [t["sld"] for t in d["timeline"]] == ["example.com", "other.net"]
    assert [t["count"] for t in d["timeline"]] == [2, 1]
    assert client.get("/api/v1/devices/aa:aa:aa:aa:aa:aa").status_code == 404


def test_a_mac_typed_in_any_common_notation_finds_its_device_as_iotgw_identify_reads_it(api):
    # one MAC parser for the API, the CLI and `iotgw identify`: aabbcc000001 once found nothing here
    client, _, _ = api
    for typed in ("AABBCC000001", "aabb.cc00.0001", "aa:bb:cc:0:0:1", "AA-BB-CC-00-00-01"):
        assert client.get(f"/api/v1/devices/{typed}").json["mac"] == MAC
        assert {q["mac"] for q in client.get(f"/api/v1/queries?mac={typed}").json} == {MAC}
    assert client.get("/api/v1/devices/aabbcc00000").status_code == 404  # eleven digits: no MAC, no device


def test_a_device_announcing_thousands_of_names_shows_its_newest_hundred_of_each(api):
    client, store, _ = api
    with store.transaction() as s:
        for i in range(1, 301):
            s.add(DeviceName(mac=MAC, name=f"n{i}", source="mdns", first_seen=i, last_seen=i))
            s.add(MdnsService(mac=MAC, service=f"_s{i}._tcp.local", first_seen=i))
            s.add(DhcpFingerprint(mac=MAC, first_seen=i, hostname=f"h{i}", param_list="1,3"))
    d = client.get(f"/api/v1/devices/{MAC}").json
    assert len(d["names"]) == len(d["mdns_services"]) == len(d["dhcp"]) == 100  # service.DETAIL_ROWS
    assert "plug" in [n["name"] for n in d["names"]] and d["mdns_services"][0] == "_s300._tcp.local"
    assert d["identifications"][-1]["model_version"] == "test-1" and d["model_version"] == "test-1"


def test_list_search_and_filter(api):
    client, store, _ = api
    add_device(store, "aa:bb:cc:00:00:02", hostname="camera", ip="192.168.1.77")
    assert {d["mac"] for d in client.get("/api/v1/devices").json} == {MAC, "aa:bb:cc:00:00:02"}
    assert [d["mac"] for d in client.get("/api/v1/devices?q=192.168.1.77").json] == ["aa:bb:cc:00:00:02"]
    service.set_status(store, MAC, "approved", by="api", publish=False)
    assert [d["mac"] for d in client.get("/api/v1/devices?status=approved").json] == [MAC]
    assert client.get("/api/v1/devices?status=bogus").status_code == 400
    counts = {d["mac"]: (d["queries_24h"], d["blocked_24h"]) for d in client.get("/api/v1/devices").json}
    assert counts == {MAC: (3, 1), "aa:bb:cc:00:00:02": (0, 0)}


def test_a_search_for_an_underscore_or_percent_finds_only_devices_with_it(api):
    client, store, _ = api
    add_device(store, "aa:bb:cc:00:00:02", hostname="esp_32 100%", ip="192.168.1.77")
    for q in ("_", "%", "P_3", "0%"):
        assert [d["mac"] for d in client.get("/api/v1/devices", query_string={"q": q}).json] == ["aa:bb:cc:00:00:02"]
    assert [d["mac"] for d in client.get("/api/v1/devices?q=PLUG").json] == [MAC]


def test_device_list_comes_a_page_at_a_time_with_a_link_to_the_next(api):
    client, store, _ = api
    for i in range(2, 6):
        add_device(store, f"aa:bb:cc:00:00:0{i}", hostname=f"h{i}", ip=f"192.168.1.{60 + i}")
    seen, url = [], "/api/v1/devices?limit=2"
    while url:
        r = client.get(url)
        assert r.status_code == 200 and len(r.json) <= 2
        seen += [d["mac"] for d in r.json]
        url = r.headers["Link"].split(">")[0].lstrip("<") if "Link" in r.headers else None
    assert sorted(seen) == [f"aa:bb:cc:00:00:0{i}" for i in range(1, 6)]  # each device once, none left out
    assert len(client.get("/api/v1/devices").json) == 5
    assert len(client.get("/api/v1/devices?limit=0").json) == 1  # clamped to 1, like 10**30 to 1000
    assert len(client.get(f"/api/v1/devices?limit={10**30}&offset={10**30}").json) == 0
    assert client.get("/api/v1/devices?limit=all").status_code == 400
    assert [d["mac"] for d in client.get("/api/v1/devices?q=h4&limit=1").json] == ["aa:bb:cc:00:00:04"]


def test_updates_label_and_forget(api):
    client, store, _ = api
    r = client.patch(f"/api/v1/devices/{MAC}", json={"name": "Plug", "status": "quarantined"})
    assert r.status_code == 200 and (r.json["name"], r.json["status"]) == ("Plug", "quarantined")
    assert client.patch(f"/api/v1/devices/{MAC}", json={"status": "owned"}).status_code == 400
    assert client.patch(f"/api/v1/devices/{MAC}", data="name=x").status_code == 400
    r = client.put(
        f"/api/v1/devices/{MAC}/label",
        json={"manufacturer": "TP-Link", "device_type": "hs100", "category": "plug"},
    )
    assert r.json["label"]["device_type"] == "hs100"
    assert client.delete(f"/api/v1/devices/{MAC}").status_code == 204
    assert client.get("/api/v1/devices").json == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("", {"name": {"first": "evil"}}),
        ("", {"name": ["x"]}),
        ("", {"status": 1}),
        ("", {"name": "x" * 201}),
        ("/label", {"manufacturer": ["TP-Link"]}),
        ("/label", {"device_type": 42}),
        ("/label", {"category": {"x": 1}}),
        ("/label", {"manufacturer": "x" * 20000}),
        ("/label", {"category": "x" * 51}),
        ("/label", {"manufacturer": "TP-Link", "vendor": "TP-Link"}),
        ("/label", {}),
    ],
)
def test_device_writes_refuse_wrong_types_long_texts_and_unknown_keys_and_keep_the_device(api, path, body):
    assert refused_device_write(api, path, body)


def refused_device_write(api, path: str, body: dict) -> str:  # noqa: ANN001 - the api fixture
    """The error of a device write (PATCH, or PUT of ``path``) that must be a 400 and leave name, status and
    label as they were."""
    client, store, _ = api
    service.rename(store, MAC, "Plug")
    service.label(store, MAC, manufacturer="TP-Link", device_type="hs110", category="plug")
    before = client.get(f"/api/v1/devices/{MAC}").json
    method = client.put if path else client.patch
    r = method(f"/api/v1/devices/{MAC}{path}", json=body)
    assert r.status_code == 400
    after = client.get(f"/api/v1/devices/{MAC}").json
    assert (after["name"], after["status"], after["label"]) == (before["name"], before["status"], before["label"])
    return r.json["error"]


def test_device_writes_take_null_as_clear_and_texts_at_their_limits(api):
    client, _, _ = api
    r = client.put(f"/api/v1/devices/{MAC}/label", json={"manufacturer": "m" * 100, "category": None})
    assert r.status_code == 200
    assert r.json["label"]["manufacturer"] == "m" * 100 and r.json["label"]["category"] is None
    assert client.patch(f"/api/v1/devices/{MAC}", json={"name": "n" * 200}).json["name"] == "n" * 200
    assert client.patch(f"/api/v1/devices/{MAC}", json={"name": None}).json["name"] != "n" * 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("", {"name": "gnp.\u202eexe"}),
        ("", {"name": "a\x00b"}),
        ("", {"name": "two\nlines", "status": "approved"}),
        ("/label", {"manufacturer": "TP-Link", "device_type": "hs\u2066110"}),
        ("/label", {"category": "plug\x1b[2J"}),
    ],
)
def test_names_and_labels_with_control_or_bidi_characters_are_refused_and_change_nothing(api, path, body):
    assert "control or bidi characters" in refused_device_write(api, path, body)
    client = api[0]
    # Joiners are text: they build emoji sequences.
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467 iPad"
    assert client.patch(f"/api/v1/devices/{MAC}", json={"name": family}).json["name"] == family


@pytest.mark.parametrize("path", [f"/api/v1/devices/{MAC}", "/api/v1/policies/global"])
def test_a_json_body_nested_too_deeply_is_a_400_and_changes_nothing(api, path):
    client, store, tmp_path = api
    nested = "[" * 20000 + "]" * 20000  # 40 KB: within the body limit
    method = client.patch if "devices" in path else client.put
    r = method(path, data=nested, content_type="application/json")
    assert r.status_code == 400 and "nested too deeply" in r.json["error"]
    assert service.get_device(store, MAC).device.name == "plug"
    assert not (tmp_path / "state" / "policy.json").exists()


def test_a_device_is_found_however_its_mac_is_typed(api):
    client, store, _ = api
    typed = " AA-BB-CC-00-00-01"
    assert client.get(f"/api/v1/devices/{typed}").json["mac"] == MAC
    assert len(client.get("/api/v1/queries", query_string={"mac": typed}).json) == 3
    # The policy view inherits from the device's type, as the daemon applies it to the device.
    assert client.put("/api/v1/policies/type/tplink-plug-hs110", json={"rules": []}).status_code == 200
    inherits = [s["scope"] for s in client.get(f"/api/v1/policies/device/{typed}").json["inherits"]]
    assert inherits == ["type:tplink-plug-hs110", "global"]
    assert client.patch(f"/api/v1/devices/{typed}", json={"name": "Kettle"}).json["name"] == "Kettle"
    assert client.delete(f"/api/v1/devices/{typed}").status_code == 204
    with pytest.raises(service.NotFound):
        service.get_device(store, MAC)


def test_renaming_back_to_an_earlier_name_keeps_one_history_row(api):
    client, store, _ = api
    for name in ("Kitchen plug", "Living room", "Kitchen plug"):
        r = client.patch(f"/api/v1/devices/{MAC}", json={"name": name})
        assert r.status_code == 200 and r.json["name"] == name
    user_names = [n for n in service.get_device(store, MAC).names if n.source == "user"]
    assert sorted(n.name for n in user_names) == ["Kitchen plug", "Living room"]
    kitchen, living = sorted(user_names, key=lambda n: n.name)
    assert kitchen.last_seen >= living.last_seen >= kitchen.first_seen


def test_clearing_the_owners_name_shows_the_best_name_the_device_gave_itself_at_once(api):
    """Clearing the owner's name left the device nameless until the daemon wrote the device's own name back, and
    for good with no daemon running. Now it is called at once what the daemon would call it: the latest name of
    the most trusted source it named itself by (DHCP before mDNS), with that source."""
    client, store, _ = api
    with store.transaction() as s:
        s.add(DeviceName(mac=MAC, name="plug-later", source="dhcp", first_seen=time.time() + 5,
                         last_seen=time.time() + 5))
        s.add(DeviceName(mac=MAC, name="plug-mdns", source="mdns", first_seen=time.time() + 9,
                         last_seen=time.time() + 9))
    assert client.patch(f"/api/v1/devices/{MAC}", json={"name": "Kitchen plug"}).json["name"] == "Kitchen plug"
    cleared = client.patch(f"/api/v1/devices/{MAC}", json={"name": ""}).json
    assert (cleared["name"], cleared["name_source"]) == ("plug-later", "dhcp")
    assert "Kitchen plug" in [n["name"] for n in cleared["names"]]  # the history keeps the owner's name

    add_device(store, "aa:bb:cc:00:00:03", ip="192.168.1.53")  # a device that never named itself: nameless
    service.rename(store, "aa:bb:cc:00:00:03", "Mystery")
    service.rename(store, "aa:bb:cc:00:00:03", "")
    device = service.get_device(store, "aa:bb:cc:00:00:03").device
    assert (device.name, device.name_source) == (None, None)


def test_query_log_filters_and_pages(api):
    client, store, _ = api
    now = time.time()
    with store.querylog_session.begin() as s:
        s.add_all(
            Query(
                ts=now - i,
                client="192.168.1.9",
                mac=None,
                qname=f"q{i}.example.org",
                qtype=1,
                sld="example.org",
                verdict="allowed",
                source="server",
            )
            for i in range(25)
        )
    first = client.get("/api/v1/queries?limit=10").json
    second = client.get(f"/api/v1/queries?limit=10&before={first[-1]['id']}").json
    assert len(first) == len(second) == 10 and first[-1]["id"] > second[0]["id"]
    blocked = client.get("/api/v1/queries?verdict=blocked").json
    assert [q["qname"] for q in blocked] == ["b.example.com"]
    assert [q["qname"] for q in client.get(f"/api/v1/queries?mac={MAC}&q=c.oth").json] == ["c.other.net"]


def test_a_query_logs_rule_comes_as_its_key_and_the_words_the_engine_said_it_in(api):
    """The API gives ``rule_words`` beside ``rule`` (the web page's Rule column shows the words, the key as its
    title); a row logged before the engine gave words has null words."""
    client, store, _ = api
    with store.querylog_session.begin() as s:
        for i, words in enumerate((None, "type smart block speaker rule: block w.example")):
            s.add(Query(ts=time.time() + i, client="192.168.1.9", mac=None, qname="w.example", qtype=1, sld="w.example",
                        verdict="blocked", rule="type:smart block speaker block name=w.example", rule_words=words,
                        source="server"))
    rows = client.get("/api/v1/queries?q=w.example").json
    assert [(q["rule"], q["rule_words"]) for q in rows] == [
        ("type:smart block speaker block name=w.example", "type smart block speaker rule: block w.example"),
        ("type:smart block speaker block name=w.example", None),
    ]


@pytest.mark.parametrize(
    "before", [str(2**63), str(-(2**63) - 1), "9" * 5000, "abc"], ids=["2**63", "-2**63-1", "5000 digits", "text"]
)
def test_query_cursor_no_row_id_can_be_is_a_400(api, before):
    client, _, _ = api
    r = client.get(f"/api/v1/queries?before={before}")
    assert r.status_code == 400 and "before" in r.json["error"]


@pytest.mark.parametrize("url", ["/api/v1/queries?limit=ten", "/api/v1/alerts?limit=1e3",
                                 "/api/v1/stats/queries?hours=2.5", "/api/v1/stats/queries?buckets=x"])
def test_a_count_that_is_not_an_integer_is_a_400_naming_it_not_the_default(api, url):
    client, _, _ = api
    r = client.get(url)
    assert r.status_code == 400 and r.json["error"] == f"{url.split('?')[1].split('=')[0]} must be an integer"


def test_counts_beyond_their_range_are_taken_to_its_end(api):
    client, _, _ = api
    assert len(client.get("/api/v1/queries?limit=-5").json) == 1
    assert len(client.get("/api/v1/queries?limit=99999999999999999999999").json) == 3
    assert len(client.get("/api/v1/stats/queries?buckets=100000").json) == 240


@pytest.mark.parametrize(("method", "url", "status"), [("GET", "/api/v1/nothing-here", 404),
                                                        ("POST", f"/api/v1/devices/{MAC}", 405),
                                                        ("PUT", "/api/v1/summary", 405),
                                                        ("DELETE", "/api/v1/tokens/abc", 404)])
def test_a_path_or_method_no_api_route_has_is_a_json_error(api, method, url, status):
    client, _, _ = api
    r = client.open(url, method=method)
    assert r.status_code == status and r.mimetype == "application/json" and r.json["error"]


def test_summary_and_queries_over_time(api):
    client, _, _ = api
    s = client.get("/api/v1/summary").json
    assert s == {"devices": 1, "online": 1, "new": 1, "identifying": 0, "queries_24h": 3, "blocked_24h": 1,
                 "untracked": 0}
    buckets = client.get("/api/v1/stats/queries?hours=1&buckets=6").json
    assert len(buckets) == 6 and buckets[-1]["total"] == 3 and sum(b["total"] for b in buckets) == 3


def test_alerts_and_model_status(api):
    client, store, tmp_path = api
    assert client.get("/api/v1/alerts").json[0]["data"]["name"] == "<b>plug</b>"
    assert client.get("/api/v1/model").json["error"] == "no model bundle installed"
    model = tmp_path / "model"
    model.mkdir()
    (model / "bundle.json").write_text(json.dumps({"version": "2026.1", "metrics": {"macro_f1_30s": 0.81}}))
    (model / "accuracy.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    store.set_setting("federation_last_round", json.dumps({"round": 3, "clients": 5}))
    m = client.get("/api/v1/model").json
    assert (m["version"], m["metrics"], m["plots"]) == ("2026.1", {"macro_f1_30s": 0.81}, ["accuracy.png"])
    assert m["federation"] == {"round": 3, "clients": 5}


def test_a_write_while_another_process_holds_the_database_is_a_503_to_retry_not_a_500(tmp_path, monkeypatch):
    """Another process (the daemon's flush, a CLI command, a backup) holding the database's write lock past the busy
    timeout made every web UI write an Internal Server Error; it is a 503 saying to try again, and changes nothing."""
    import sqlite3

    from gateway.store import db as store_db
    from tests.test_webui_policy_api import _log_in

    monkeypatch.setattr(store_db, "BUSY_TIMEOUT_S", 0.5)  # the real wait is 30 s; the lock below is real
    cfg = config(tmp_path)
    store = Store(cfg.db_url)
    add_device(store, MAC, hostname="plug")
    _, secret = accounts.create_token(store, "tests", "write")
    app = create_app(store, cfg)
    token_client = app.test_client()
    token_client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {secret}"
    browser, csrf = _log_in(app)
    holder = sqlite3.connect(tmp_path / "state" / "iotgw.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        r = token_client.patch(f"/api/v1/devices/{MAC}", json={"name": "Plug"})
        assert r.status_code == 503 and r.headers["Retry-After"] and "try again" in r.json["error"]
        r = browser.post(f"/devices/{MAC}/name", data={"name": "Plug", "csrf_token": csrf})
        assert r.status_code == 503 and "try again" in r.get_data(as_text=True)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert service.get_device(store, MAC).device.name == "plug"  # nothing changed
    r = token_client.patch(f"/api/v1/devices/{MAC}", json={"name": "Plug"})  # the retry, once the lock is gone
    assert r.status_code == 200 and r.json["name"] == "Plug"
    store.close()


def test_a_token_read_while_another_process_holds_the_database_is_served_and_its_use_recorded_later(
        tmp_path, monkeypatch):
    """Every request with a token wrote the token's last use in a write transaction: while the daemon (a backup, a
    sqlite3 shell) held the write lock, a read-only GET waited the whole busy timeout and then failed. It is
    served at once; the last use is recorded at most once a minute, and skipped, not waited for, while busy."""
    import sqlite3

    from gateway.store import db as store_db

    monkeypatch.setattr(store_db, "BUSY_TIMEOUT_S", 0.5)  # the real wait is 30 s; the lock below is real
    cfg = config(tmp_path)
    store = Store(cfg.db_url)
    add_device(store, MAC, hostname="plug")
    created, secret = accounts.create_token(store, "dashboard", "read")
    client = create_app(store, cfg).test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {secret}"
    holder = sqlite3.connect(tmp_path / "state" / "iotgw.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        for _ in range(3):
            r = client.get(f"/api/v1/devices/{MAC}")
            assert r.status_code == 200 and r.json["mac"] == MAC
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    [token] = accounts.list_tokens(store)
    assert token.id == created.id and token.last_used_at is None  # skipped while busy
    assert client.get(f"/api/v1/devices/{MAC}").status_code == 200
    first = accounts.list_tokens(store)[0].last_used_at
    assert first is not None  # recorded once the database was free
    assert client.get(f"/api/v1/devices/{MAC}").status_code == 200
    assert accounts.list_tokens(store)[0].last_used_at == first  # not rewritten within the minute
    store.close()
