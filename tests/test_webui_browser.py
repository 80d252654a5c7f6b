"""The web UI in a real browser: Debian's Chromium driven by Playwright against the app served by waitress on
a loopback port, on a temporary SQLite store. Screenshots of the main pages go to ``test-artifacts/``."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from gateway import accounts
from gateway.devices import service
from gateway.store.db import Store
from tests.webui_seed import add_device, config
from webui.server import serve_in_thread

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM), reason="Debian's chromium is not installed")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
PASSWORD = "correct horse battery"  # noqa: S105 - the test account's
SCRIPT = "<script>alert('dhcp')</script>"
IMG = "<img src=x onerror=alert('mdns')>"
QUERY = "<img src=x onerror=alert(1)>.evil.example"


@pytest.fixture
def served(tmp_path):
    cfg = config(tmp_path)
    store = Store(cfg.db_url)
    accounts.set_password(store, PASSWORD)
    server = serve_in_thread(store, cfg, "127.0.0.1", 0)
    yield server.url.rstrip("/"), store
    server.stop()
    store.close()


@pytest.fixture
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        context = browser.new_context(viewport={"width": 1100, "height": 900})
        pg = context.new_page()
        pg.dialogs = []
        pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
        yield pg
        context.close()
        browser.close()


def _login(page, base: str) -> None:  # noqa: ANN001
    page.goto(base + "/devices")
    assert "/login" in page.url
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/devices")


def _shot(page, name: str) -> None:  # noqa: ANN001
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _placeholders_fit(page, selector: str) -> list[tuple[str, bool]]:  # noqa: ANN001
    """For each field ``selector`` finds: its name, and whether its placeholder, measured in the field's own font,
    fits the room inside the field and the field is on screen."""
    return page.locator(selector).evaluate_all("""els => els.map(e => {
        const cs = getComputedStyle(e), ctx = document.createElement("canvas").getContext("2d");
        ctx.font = `${cs.fontStyle} ${cs.fontWeight} ${cs.fontSize} ${cs.fontFamily}`;
        const room = e.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
        const box = e.getBoundingClientRect();
        return [e.name, ctx.measureText(e.placeholder).width <= room && box.left >= 0
                        && box.right <= document.documentElement.clientWidth];
    })""")


def test_log_in_watch_a_device_appear_rename_and_approve_it(served, page):
    base, store = served
    _login(page, base)
    assert page.locator("#devices tbody tr").first.inner_text().startswith("No devices")
    mac = "aa:bb:cc:00:00:07"
    add_device(
        store,
        mac,
        hostname="esp-3f2a1c",
        identified=True,
        queries=("devs.tplinkcloud.com", "n-devs.tplinkcloud.com", "time.google.com", "ads.tracker.net"),
    )
    page.reload()
    row = page.locator(f"tr[data-mac='{mac}']")
    assert "esp-3f2a1c" in row.inner_text() and "tplink-plug-hs110" in row.inner_text()
    _shot(page, "devices")

    row.get_by_role("link", name="esp-3f2a1c").click()
    page.wait_for_url(f"{base}/devices/{mac}")
    assert "Identified after 4.2 s" in page.content()
    assert page.locator("#timeline tbody tr").count() == 3  # three second-level domains
    page.fill("#rename-form input[name=name]", "Kitchen plug")
    page.click("#rename-form button")
    page.wait_for_load_state()
    assert page.locator("#device-name").inner_text() == "Kitchen plug"
    page.get_by_role("button", name="Approve").click()
    page.wait_for_load_state()
    assert page.get_by_role("button", name="Approve").is_disabled()
    device = service.get_device(store, mac).device
    assert (device.name, device.name_source, device.status) == ("Kitchen plug", "user", "approved")
    page.fill("#label-form input[name=device_type]", "tplink-plug-hs100")
    page.click("#label-form button")
    page.wait_for_load_state()
    assert service.get_device(store, mac).device.label_device_type == "tplink-plug-hs100"
    _shot(page, "device")

    for path, name in (
        ("/", "dashboard"),
        ("/queries", "queries"),
        ("/policies", "policies"),
        ("/alerts", "alerts"),
        ("/model", "model"),
        ("/settings", "settings"),
    ):
        page.goto(base + path)
        assert page.locator("h1").count() == 1
        _shot(page, name)
    page.goto(base + "/")
    assert page.locator("[data-summary=devices]").inner_text() == "1"
    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    page.goto(base + f"/devices/{mac}")
    _shot(page, "device-phone")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the device page scrolls sideways on a phone ({width}px)"
    assert page.dialogs == []


def test_device_list_pages_with_a_more_link(served, page):
    base, store = served
    for i in range(1, 4):
        add_device(store, f"aa:bb:cc:00:01:0{i}", hostname=f"dev{i}", ip=f"192.168.1.{60 + i}")
    _login(page, base)
    page.goto(base + "/devices?limit=2")
    first = page.locator("#devices tbody tr").evaluate_all("rows => rows.map(r => r.dataset.mac)")
    assert len(first) == 2
    page.get_by_role("link", name="More devices").click()
    page.wait_for_load_state()
    second = page.locator("#devices tbody tr").evaluate_all("rows => rows.map(r => r.dataset.mac)")
    assert sorted(first + second) == [f"aa:bb:cc:00:01:0{i}" for i in range(1, 4)]
    assert page.get_by_role("link", name="More devices").count() == 0


def test_an_unknown_device_offers_its_closest_matches_but_no_prefilled_guess(served, page):
    base, store = served
    mac = "aa:bb:cc:00:00:08"
    add_device(store, mac, hostname="mystery", identified=True)
    with store.transaction() as s:  # as the daemon records an unknown device: labels unknown, guesses kept
        from gateway.store.schema import Device, Identification

        device = s.get(Device, mac)
        device.manufacturer = device.device_type = device.category = "unknown"
        device.known = False
        for row in s.query(Identification).filter_by(mac=mac):
            row.manufacturer = row.device_type = row.category = "unknown"
            row.known = False
    _login(page, base)
    page.goto(f"{base}/devices/{mac}")
    assert page.get_by_role("heading", name="Closest matches").count() == 1
    assert page.get_by_role("heading", name="Alternatives").count() == 0
    form = page.locator("#label-form")
    # confirming must not record "unknown" as the owner's label: the owner types what it is
    assert [form.locator(f"input[name={f}]").input_value() for f in ("manufacturer", "device_type", "category")] \
        == ["", "", ""]
    assert form.locator("input[name=device_type]").get_attribute("placeholder") == "closest: tplink-plug-hs100"
    page.fill("#label-form input[name=device_type]", "tplink-plug-hs100")
    page.click("#label-form button")
    page.wait_for_load_state()
    device = service.get_device(store, mac).device
    assert (device.label_device_type, device.label_manufacturer) == ("tplink-plug-hs100", None)


def test_a_device_named_only_at_its_windows_end_is_shown_as_a_best_guess_to_confirm(served, page):
    base, store = served
    mac, decided = "aa:bb:cc:00:00:09", "aa:bb:cc:00:00:0a"
    add_device(store, mac, hostname="kettle", identified=True)
    add_device(store, decided, hostname="plug", ip="192.168.1.51", identified=True)
    with store.transaction() as s:  # as the daemon records a known device that never committed
        from gateway.store.schema import Device, Identification

        s.get(Device, mac).decided_after_s = None
        for row in s.query(Identification).filter_by(mac=mac):
            row.decided_after_s = None
    _login(page, base)
    page.goto(f"{base}/devices/{mac}")
    assert "Best guess after its first minute by model test-1" in page.locator("#best-guess").inner_text()
    assert page.get_by_text("Identified after").count() == 0
    assert page.locator("#label-form input[name=device_type]").input_value() == "tplink-plug-hs110"
    page.goto(f"{base}/devices/{decided}")
    assert page.locator("#best-guess").count() == 0
    assert page.get_by_text("Identified after 4.2 s by model test-1.").count() == 1


def test_hostile_hostnames_and_query_names_render_as_text(served, page):
    base, store = served
    mac = "aa:bb:cc:00:00:66"
    add_device(store, mac, hostname=SCRIPT, queries=(QUERY, "<script>alert(3)</script>.example.com"))
    with store.transaction() as s:
        from gateway.store.schema import DeviceName

        s.add(DeviceName(mac=mac, name=IMG, source="mdns", first_seen=0, last_seen=0))
    _login(page, base)
    assert page.locator(f"tr[data-mac='{mac}'] a").first.inner_text() == SCRIPT
    page.goto(f"{base}/devices/{mac}")
    assert page.locator("#device-name").inner_text() == SCRIPT
    assert page.get_by_text(IMG, exact=True).count() == 1
    assert (
        page.locator("#timeline").get_by_text("<script>alert(3)</script>.example.com").count() == 0
    )  # sld only
    assert page.locator("td.qname").get_by_text(QUERY, exact=True).count() == 1
    page.goto(f"{base}/queries")
    assert page.locator("td.qname").get_by_text(QUERY, exact=True).count() == 1
    page.goto(f"{base}/")
    assert page.get_by_text(SCRIPT, exact=True).count() == 1
    _shot(page, "hostile-device")
    # Nothing injected ran, and no element came from the payloads.
    assert page.dialogs == []
    page.goto(f"{base}/devices/{mac}")
    assert page.locator("img[src=x]").count() == 0
    assert page.dialogs == []


def test_the_dashboard_says_when_its_session_ends_and_logs_back_in_to_it(served, page):
    """The dashboard's counters poll the API; after the session ended (12 h, a logout in another tab) every poll got
    401 and the numbers went stale without a word. The page now says so, with a login that comes back to it."""
    base, store = served
    _login(page, base)
    page.goto(base + "/")
    polls = []
    page.on("response", lambda r: polls.append(r.status) if r.url.endswith("/api/v1/summary") else None)
    accounts.end_sessions(store, accounts.ADMIN)  # what the 12 h expiry or a logout elsewhere does server-side
    note = page.locator("#session-ended")
    note.wait_for(state="visible", timeout=60_000)  # the page polls every 15 s
    assert polls and polls[-1] == 401
    assert note.inner_text() == "Session ended - log in again"
    assert page.locator("[data-summary].stale").count() == page.locator("[data-summary]").count()
    _shot(page, "dashboard-session-ended")
    note.get_by_role("link", name="log in again").click()
    page.wait_for_url(base + "/login?next=%2F")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")
    assert page.locator("#session-ended").count() == 0


def test_while_guessing_from_many_addresses_goes_on_only_a_browser_that_logged_in_before_gets_in(served, page,
                                                                                                monkeypatch):
    """Chromium keeps the device cookie the login gives, out of the page's scripts' reach, and it lets that
    browser in while the account refuses new clients; another browser on the same machine (the same address,
    which before was let in for having logged in) is refused and told why."""
    monkeypatch.setattr(accounts, "MAX_ACCOUNT_FAILURES", 10)  # the rule, at a fifth of the argon2 checks
    base, store = served
    _login(page, base)
    [device] = [c for c in page.context.cookies() if c["name"] == "iotgw_device"]
    assert device["httpOnly"] and device["sameSite"] == "Strict" and not device["secure"]
    assert "iotgw_device" not in page.evaluate("document.cookie")  # no script, an injected one included, reads it
    for n in range(accounts.MAX_ACCOUNT_FAILURES // accounts.MAX_FAILED_LOGINS):  # a device with many addresses
        for _ in range(accounts.MAX_FAILED_LOGINS):
            assert not accounts.verify_login(store, accounts.ADMIN, "guess", f"fd00::{n:x}")
    other = page.context.browser.new_context()
    try:
        stranger = other.new_page()
        stranger.goto(base + "/login")
        stranger.fill("input[name=password]", PASSWORD)
        stranger.click("button[type=submit]")
        assert "from many addresses" in stranger.locator("main").inner_text()
        assert "/login" in stranger.url
    finally:
        other.close()
    page.context.clear_cookies(name="iotgw_session")  # the owner's session is over; the device cookie stays
    _login(page, base)
    assert page.locator("#devices").count() == 1


def test_on_a_phone_every_column_of_the_device_list_and_query_log_is_on_screen(served, page):
    """At 390 px the tables scrolled sideways inside their box: a device's status and last seen, a query's
    verdict, when a domain was last asked for were off screen with nothing saying so. Each row now stacks its
    cells, each led by its column's name."""
    base, store = served
    mac = "aa:bb:cc:00:00:31"
    add_device(store, mac, hostname="kitchen-plug", identified=True, queries=("tplinkcloud.com", "ads.tracker.net"))
    _login(page, base)
    page.set_viewport_size({"width": 390, "height": 844})
    verdict = "tbody tr td:nth-child(5)"
    pages = ((f"/devices/{mac}", "#timeline tbody tr td:last-child"),  # the domains it asked for, when last
             ("/devices", f"tr[data-mac='{mac}'] td:last-child"), ("/queries", verdict))
    for path, last_cell in pages:
        page.goto(base + path)
        cell = page.locator(last_cell).first
        box = cell.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, f"{path}: {box}"
        assert cell.evaluate("c => getComputedStyle(c, '::before').content") != "none"  # led by its column's name
    _shot(page, "queries-phone")
    assert page.locator(verdict).first.inner_text() in ("allowed", "blocked")


def test_a_device_without_a_name_shows_its_mac_once_and_says_online_in_words(served, page):
    base, store = served
    add_device(store, "aa:bb:cc:00:00:32")
    _login(page, base)
    cell = page.locator("tr[data-mac='aa:bb:cc:00:00:32'] td").first
    assert cell.inner_text().count("aa:bb:cc:00:00:32") == 1
    assert "● online" in cell.inner_text()  # a green dot alone meant nothing, and a title needs a mouse


def test_the_query_log_names_each_record_type(served, page):
    """The Type column showed the stored number (1, 28, 65): it now says A, AAAA, HTTPS."""
    base, store = served
    add_device(store, "aa:bb:cc:00:00:33", queries=("a.example.com", "b.example.com", "c.example.com"))
    with store.querylog_session.begin() as s:
        from gateway.store.schema import Query

        for row, number in zip(s.query(Query).order_by(Query.ts), (1, 28, 65), strict=True):
            row.qtype = number
    _login(page, base)
    page.goto(base + "/queries")
    types = page.locator("table.queries tbody tr td:nth-child(4)").all_inner_texts()
    assert sorted(types) == ["A", "AAAA", "HTTPS"]


def test_an_error_page_says_what_happened_in_the_sites_layout_with_a_way_back(served, page):
    """A forgotten device's old link showed Werkzeug's bare "Not Found ... check your spelling" with no way back."""
    base, _ = served
    _login(page, base)
    response = page.goto(base + "/devices/aa:bb:cc:00:00:99")
    assert response.status == 404
    error = page.locator("#error")
    assert "the device may have been forgotten" in error.inner_text()
    assert page.get_by_role("link", name="Devices").count() >= 1  # the site's navigation is there
    error.get_by_role("link", name="Back to the dashboard").click()
    page.wait_for_url(base + "/")
    response = page.goto(base + "/queries?before=x")  # a reason given by the view is kept
    assert response.status == 400 and "before must be an integer" in page.locator("#error").inner_text()


def test_the_model_page_says_its_accuracy_in_words_and_folds_the_raw_figures(served, page):
    """The shipped bundle's metrics were one table of nested JSON, some 18,000 px tall on a phone."""
    base, _ = served
    _login(page, base)
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(base + "/model")
    summary = page.locator("#model-summary").inner_text()
    # one decimal: 99.5% is not shown as 100%
    assert re.search(r"names the right product for \d+\.\d% of devices and the right manufacturer for \d+\.\d%",
                     summary)
    assert not page.locator("#metrics").is_visible()
    assert page.evaluate("document.documentElement.scrollHeight") < 3000
    page.get_by_text("All evaluation figures").click()
    assert page.locator("#metrics").is_visible()


def test_removing_a_schedule_asks_first_and_cancelling_keeps_it(served, page, tmp_path):
    """Forget device, revoke token and remove list asked first; a schedule's Remove dropped its days and times at
    once."""
    from gateway import policies

    base, _ = served
    state_dir = config(tmp_path).state_dir  # the served app's
    policies.set_schedule(state_dir, "bedtime", "UTC", ["mon=21:00-24:00"])
    _login(page, base)
    page.goto(base + "/policies")
    page.locator("#schedules").get_by_role("button", name="Remove").click()  # the fixture dismisses the dialog
    assert page.dialogs == ["Remove the schedule bedtime and its times?"]
    assert "bedtime" in policies.load(state_dir).schedules
    assert page.locator("#schedules").get_by_text("bedtime").count() == 1


def test_removing_a_policy_rule_asks_first_and_cancelling_keeps_it(served, page, tmp_path):
    """A rule's Remove dropped it at once, while every other Remove on the site asked first."""
    from gateway import policies

    base, _ = served
    state_dir = config(tmp_path).state_dir  # the served app's
    scope = policies.scope_key("tag", "device_tv")
    policies.set_schedule(state_dir, "bedtime", "UTC", ["mon=21:00-24:00"])
    policies.add_rule(state_dir, scope, policies.rule_from_target("block", "all", "bedtime"))
    policies.add_rule(state_dir, scope, policies.rule_from_target("block", "ads.example"))
    _login(page, base)
    page.goto(base + "/policies")
    card = page.locator("#type-defaults .scope")
    card.get_by_role("button", name="Remove rule 1").click()  # the fixture dismisses the dialog
    card.get_by_role("button", name="Remove rule 2").click()
    assert page.dialogs == ["Remove the rule 'block everything' during bedtime?",
                            "Remove the rule 'block ads.example'?"]
    assert [r.label() for r in policies.load(state_dir).policies[scope].rules] == [
        "block all schedule=bedtime", "block name=ads.example"]
    assert card.locator("table.rules tbody tr").count() == 2


def test_a_device_page_explains_its_addresses_and_timeline_and_skips_empty_dhcp_lines(served, page):
    """The page showed "hostname — · options — · vendor class —" for a request that carried none of them, an address
    "(server, 3 s ago)", and a domains table whose "After +0.0 s" said after what to nobody."""
    from gateway.store.schema import Address, DhcpFingerprint

    base, store = served
    mac = "aa:bb:cc:00:00:35"
    add_device(store, mac, ip="192.168.1.70", queries=("a.example.com", "b.example.net"))
    with store.transaction() as s:
        s.query(Address).filter_by(mac=mac).update({"source": "server"})
        s.add(DhcpFingerprint(mac=mac, first_seen=1.0, client_id="01:aa:bb"))  # nothing the page shows
        s.add(DhcpFingerprint(mac=mac, first_seen=2.0, param_list="1,3,6"))
    _login(page, base)
    page.goto(f"{base}/devices/{mac}")
    dhcp = page.locator("h3:text-is('DHCP') ~ ul.list").first.locator("li").all_inner_texts()
    assert dhcp == ["hostname — · options 1,3,6 · vendor class —"]
    address = page.locator("li", has_text="192.168.1.70")
    assert "its DNS queries come from it" in address.inner_text() and "server" not in address.inner_text()
    assert page.locator("#timeline th").first.inner_text() == "First asked"
    assert "after the gateway first saw the device" in page.locator("#timeline-legend").inner_text()
    assert page.locator("#timeline tbody td").first.inner_text().startswith("after ")


def test_something_seen_this_second_reads_just_now_everywhere(served, page):
    """A device seen within the second read "last seen 0 s ago". Its times are set a moment ahead of the clock (as
    the daemon's clock may be ahead of the web UI's) so that the page is read within that second, however slow."""
    import time

    from gateway.store.schema import Address, Device

    base, store = served
    mac = "aa:bb:cc:00:00:34"
    add_device(store, mac, hostname="doorbell")
    with store.transaction() as s:
        ahead = time.time() + 3
        s.get(Device, mac).last_seen = ahead
        s.query(Address).filter_by(mac=mac).update({"last_seen": ahead})
    _login(page, base)
    assert page.locator(f"tr[data-mac='{mac}'] td[data-label='Last seen']").inner_text() == "just now"
    page.goto(f"{base}/devices/{mac}")
    assert "last seen just now" in page.locator("main p.muted").first.inner_text()
    assert page.get_by_text("192.168.1.50 (given to it by DHCP, just now)").count() == 1
    assert "0 s ago" not in page.locator("main").inner_text()


def test_on_a_phone_the_schedule_form_shows_each_field_and_its_placeholder_whole(served, page):
    """At 390 px the schedule's "to" field cut its placeholder "HH:MM (24:00 = midnight)" off mid-word."""
    base, _ = served
    _login(page, base)
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(base + "/policies")
    fits = _placeholders_fit(page, "#schedule-form input:not([type=hidden]):not([type=checkbox])")
    assert fits and all(ok for _, ok in fits), fits
    assert "24:00 is midnight" in page.locator("#schedule-form label", has=page.locator("input[name=end]")).inner_text()


def test_the_router_badge_and_an_expired_token_read_whole_on_a_phone(served, page):
    """Never seen on a page before: on a phone the device page's router badge, a whole sentence in a pill, broke
    across lines into two half pills, and an expired token looked like any other but bold."""
    import json

    base, store = served
    mac = "aa:bb:cc:00:00:36"
    add_device(store, mac, hostname="fritz.box", ip="192.168.1.1", vendor="AVM Audiovisuelles Marketing GmbH")
    store.set_setting(service.ROUTER_SETTING, json.dumps([mac]))  # as the daemon writes it
    token, _ = accounts.create_token(store, "old-home-assistant", "read", days=30)
    with store.transaction() as s:
        from gateway.store.schema import ApiToken

        s.get(ApiToken, token.id).expires_at = 1.0
    _login(page, base)
    page.set_viewport_size({"width": 390, "height": 844})
    for path in ("/devices", f"/devices/{mac}"):
        page.goto(base + path)
        badges = page.locator(".status")
        assert badges.count() == 2
        assert badges.evaluate_all("bs => bs.map(b => b.getClientRects().length)") == [1, 1], path  # one piece each
        assert badges.nth(1).inner_text() == "router"
        _shot(page, "router-" + ("device" if mac in path else "devices") + "-phone")
    assert "never quarantined as new" in page.locator("main p.muted").first.inner_text()
    page.goto(base + "/settings")
    expired = page.locator("#tokens .expired")
    assert expired.inner_text().startswith("expired ")
    bad = page.locator("#tokens button.danger").evaluate("b => getComputedStyle(b).backgroundColor")
    assert expired.evaluate("e => getComputedStyle(e).color") == bad  # in the colour of danger, not the text's
    _shot(page, "settings-expired-token-phone")


def test_the_dashboard_explains_devices_left_unlisted_at_the_device_limit(served, page):
    """The card read '3 not kept  too many devices: possible MAC flood ([devices] max)': not kept where, and what
    happens to them? It now says they were left out of Devices, why, and that they are filtered as any new device."""
    base, store = served
    from gateway.overview import UNTRACKED_SETTING

    store.set_setting(UNTRACKED_SETTING, "3")
    _login(page, base)
    page.goto(base + "/")
    card = page.locator(".card", has=page.locator("[data-summary=untracked]")).inner_text()
    assert card.startswith("3") and "devices not listed" in card
    assert "[devices] max" in card and "filtered as any new device" in card


def test_every_placeholder_reads_whole_on_a_desktop_and_on_a_phone(served, page):
    """The rule field ("domain, list:ID, category:NAME or all"), the type-or-tag field of a new default, the token's
    "Used by (e.g. home-assistant)" and the device search ("Search name, vendor, type, MAC, IP") were cut off
    mid-word, on a desktop as on a phone."""
    base, store = served
    mac = "aa:bb:cc:00:00:37"
    add_device(store, mac, hostname="kitchen-plug", identified=True)
    _login(page, base)
    cut, seen = [], 0
    for width in (1280, 390):
        page.set_viewport_size({"width": width, "height": 900})
        for path in ("/devices", f"/devices/{mac}", "/policies", "/settings", "/queries"):
            page.goto(base + path)
            fits = _placeholders_fit(page, "main input[placeholder]")
            seen += len(fits)
            cut += [(width, path, name) for name, ok in fits if not ok]
    assert seen > 20 and cut == []


def test_a_devices_names_say_where_each_came_from_in_plain_words(served, page):
    """Each name was followed by the store's word for its source: "(dhcp)", "(mdns)", "(user)"."""
    from gateway.store.schema import DeviceName

    base, store = served
    mac = "aa:bb:cc:00:00:38"
    add_device(store, mac, hostname="esp-3f2a1c")
    with store.transaction() as s:
        s.add(DeviceName(mac=mac, name="Kitchen-Plug._hap._tcp.local", source="mdns", first_seen=0, last_seen=0))
    service.rename(store, mac, "Kitchen plug")
    _login(page, base)
    page.goto(f"{base}/devices/{mac}")
    names = page.locator("h3:text-is('Names') + ul.list li").all_inner_texts()
    assert sorted(names) == sorted([
        "Kitchen plug · named by you",
        "esp-3f2a1c · the name it gave when it asked for an address (DHCP)",
        "Kitchen-Plug._hap._tcp.local · the name it announces on the local network (mDNS)",
    ])


def test_the_devices_not_listed_card_comes_updates_and_goes_with_the_dashboards_poll(served, page):
    """The card was drawn only on a page load: a dashboard left open showed no sign of devices being left out, and
    kept a number that the other counters' poll never updated. The page's clock is Playwright's, moved past the
    15 s poll, so that no test waits on real time."""
    from gateway.overview import UNTRACKED_SETTING

    base, store = served
    _login(page, base)
    page.clock.install()
    page.goto(base + "/")
    card = page.locator("#untracked-card")
    assert not card.is_visible()
    for shown in ("3", "5", "0"):
        store.set_setting(UNTRACKED_SETTING, shown)
        with page.expect_response(lambda r: r.url.endswith("/api/v1/summary")) as polled:
            page.clock.run_for(15_000)
        polled.value.finished()  # the body is read and the page's handler runs after it: wait for what it shows
        if shown == "0":
            card.wait_for(state="hidden")
        else:
            page.locator("#untracked-card [data-summary=untracked]", has_text=shown).wait_for()
            assert card.is_visible() and "devices not listed" in card.inner_text()


def test_alerts_say_what_happened_in_words_without_empty_details(served, page):
    """The dashboard and the alert list showed "new_device" and "device_identified", the MQTT identifiers, and a new
    device's details read "name: None"."""
    from gateway.events import ALERT_KINDS
    from gateway.store.schema import AlertRecord
    from webui import views

    assert set(views.ALERT_KINDS) == set(ALERT_KINDS)  # every kind the daemon raises has its words
    base, store = served
    mac = "aa:bb:cc:00:00:39"
    add_device(store, mac)
    with store.transaction() as s:  # as the daemon records them
        s.add(AlertRecord(ts=1.0, kind="new_device", mac=mac, data={"vendor": "Espressif Inc.", "name": None,
                                                                    "ip": "192.168.1.50"}))
        s.add(AlertRecord(ts=2.0, kind="device_identified", mac=mac, data={"device_type": "tplink-plug-hs110"}))
    _login(page, base)
    page.goto(base + "/")
    latest = page.locator("h2:text-is('Latest alerts') + ul.list li").all_inner_texts()
    assert [line.split(" · ")[1] for line in latest] == ["device identified", "new device"]
    page.goto(base + "/alerts")
    assert page.locator("#alerts td[data-label=Kind]").all_inner_texts() == ["device identified", "new device"]
    details = page.locator("#alerts td[data-label=Details]").all_inner_texts()
    assert details[1] == "maker of its network card: Espressif Inc., address: 192.168.1.50"


def test_a_devices_signals_used_are_said_in_words(served, page):
    """"Signals used" listed the identifier's own words: dns, oui, dhcp, macblock."""
    from gateway.store.schema import Identification
    from identifier.features import SIGNALS
    from webui import views

    assert set(views.SIGNALS) == {*SIGNALS, "macblock"}  # every signal the identifier reports has its words
    base, store = served
    mac = "aa:bb:cc:00:00:3a"
    add_device(store, mac, hostname="plug", identified=True)  # signals dns, oui, dhcp
    with store.transaction() as s:
        s.query(Identification).filter_by(mac=mac).update({"signals": ["dhcp", "dns", "macblock", "oui"]})
    _login(page, base)
    page.goto(f"{base}/devices/{mac}")
    assert page.locator("h3:text-is('Signals used') + ul.list li").all_inner_texts() == [
        "how it asked for an address (DHCP)",
        "the domains it looks up (DNS)",
        "a MAC address next to a known unit's (one production run)",
        "who made its network card (its MAC address's prefix)",
    ]


def _real_alerts(tmp_path, mac: str) -> list:  # noqa: ANN001
    """One alert of every kind, made by the code that raises it where that code stands alone (presence, the blocked
    summary, federation's round log) and as the daemon, the outbox and Home Assistant's command build it elsewhere."""
    import json

    from gateway.alerts.blocked import BlockedSummariser
    from gateway.alerts.presence import Presence
    from gateway.events import Alert, DnsQuery
    from gateway.federation import RoundAlerts

    t = 1_790_000_000.0
    presence = Presence()
    presence.seen(mac, t)
    alerts = presence.expire(t + 700)  # device_offline
    alerts.append(presence.seen(mac, t + 7384.23))  # device_online: unseen for 7384.2 s
    blocked = BlockedSummariser()
    for i, name in enumerate(("ads.example", "ads.example", "track.example")):
        blocked.add(DnsQuery(t + i, "192.168.1.50", mac, name, 1, name, verdict="blocked"))
    alerts += blocked.flush(t + 400)
    log = tmp_path / "rounds.log"
    rounds = RoundAlerts(log, alerts.append)
    log.write_text("".join(json.dumps(e) + "\n" for e in (
        {"ts": t, "event": "stage", "run": 7, "round": "2", "stage": "fit"},
        {"ts": t + 1, "event": "install", "installed": True, "version": "v2", "previous_version": "v1", "round": 2,
         "accuracy": 0.91234, "accuracy_before": 0.8876},
    )))
    rounds.poll()
    rounds.finish()  # federated_round, failed after the fit stage
    return [*alerts,  # as gateway.daemon, gateway.alerts.outbox and gateway.alerts.publisher build theirs
            Alert("new_device", t, mac, {"vendor": "Espressif Inc.", "name": None, "ip": "192.168.1.50"}),
            Alert("device_identified", t, mac, {"confidence": 0.9397, "decided_after_s": 3.0001440048217773,
                                                "manufacturer": "TP-Link", "device_type": "tplink-plug-hs110",
                                                "category": "plug"}),
            Alert("unknown_device", t, mac, {"confidence": 0.41, "decided_after_s": None,
                                             "previous_device_type": "WeMoSwitch", "model_version": "fed-r2"}),
            Alert("quarantine_entered", t, mac, {"by": "home_assistant"}),
            Alert("quarantine_lifted", t, mac, {"by": "home_assistant"}),
            Alert("anomaly", t, mac, {"domain": "evil.example", "reason": "outside the learned profile"}),
            Alert("alerts_dropped", t, None, {"dropped": 12, "oldest_ts": t, "newest_ts": t + 60}),
            Alert("too_many_devices", t, None, {"max": 512, "message": "too many devices: possible MAC flood"})]


def test_alert_details_are_said_in_words_and_rounded(served, page, tmp_path):
    """The alert list showed each detail by its key, unrounded: "decided_after_s: 3.0001440048217773, confidence:
    0.9397". Every key the gateway's alerts carry now has words; one it does not know is still shown, as text."""
    from gateway.store.schema import AlertRecord
    from webui import views

    base, store = served
    mac = "aa:bb:cc:00:00:3b"
    add_device(store, mac)
    alerts = _real_alerts(tmp_path, mac)
    assert {a.kind for a in alerts} == set(views.ALERT_KINDS)
    assert {k for a in alerts for k in a.data} <= set(views.ALERT_DETAILS)  # every real key has words
    with store.transaction() as s:
        for i, a in enumerate(alerts):
            s.add(AlertRecord(ts=a.ts + i, kind=a.kind, mac=a.mac, data=a.data))
        s.add(AlertRecord(ts=0.5, kind="anomaly", mac=mac, data={"domain": "x.example", SCRIPT: IMG}))
    _login(page, base)
    page.goto(base + "/alerts")
    rows = page.locator("#alerts tbody tr").evaluate_all(
        "rs => rs.map(r => [r.querySelector('[data-label=Kind]').innerText,"
        " r.querySelector('[data-label=Details]').innerText])")
    details = {kind: text for kind, text in rows if kind != "unusual query" or "evil" in text}
    t = 1_790_000_000.0
    assert details["device identified"] == ("confidence: 94%, decided: after 3.0 s, manufacturer: TP-Link, "
                                            "type: tplink-plug-hs110, category: plug")
    assert details["device not recognised"] == (
        "confidence: 41%, decided: as a best guess at the end of its first minute, type before: WeMoSwitch, "
        "re-identified by model: fed-r2")
    assert details["back online"] == "offline for: 2 h 3 min"
    assert details["went offline"] == f"last seen: {views.when(t)}, counted offline after no traffic for: 10 min"
    assert details["blocked queries summary"] == (
        f"blocked queries: 3, from: {views.when(t)}, to: {views.when(t + 2)}, summed up every: 5 min, "
        "most blocked: ads.example (2), track.example (1)")
    assert details["identification model updated"] == ("model version: v2, replacing: v1, round: 2, accuracy: 91%, "
                                                        "accuracy before: 89%")
    assert details["federated learning round"] == "round: 2, result: failed, error: stopped after the fit stage, run: 7"
    assert details["quarantined"] == "by: Home Assistant"
    assert details["new device"] == "maker of its network card: Espressif Inc., address: 192.168.1.50"
    assert details["alerts lost while the MQTT broker was away"] == (
        f"alerts lost: 12, first lost: {views.when(t)}, last lost: {views.when(t + 60)}")
    assert details["device limit reached"] == "device limit: 512, why: too many devices: possible MAC flood"
    assert f"domain: x.example, {SCRIPT}: {IMG}" in [text for _, text in rows]  # an unknown key, as text
    assert page.locator("#alerts img").count() == 0 and page.dialogs == []
    _shot(page, "alerts-details")


def test_a_device_decided_at_once_says_so_instead_of_after_0_0_s(served, page):
    """A device that named itself in its first packets read "Identified after 0.0 s", like a fault."""
    from gateway.store.schema import Device, Identification

    base, store = served
    at_once, tenth = "aa:bb:cc:00:00:3c", "aa:bb:cc:00:00:3d"
    for mac, ip, after in ((at_once, "192.168.1.52", 0.04), (tenth, "192.168.1.53", 0.1)):
        add_device(store, mac, hostname="plug", ip=ip, identified=True)
        with store.transaction() as s:
            s.get(Device, mac).decided_after_s = after
            s.query(Identification).filter_by(mac=mac).update({"decided_after_s": after})
    _login(page, base)
    page.goto(f"{base}/devices/{at_once}")
    assert page.get_by_text(
        "Identified at once (within a tenth of a second of first being seen) by model test-1.").count() == 1
    assert "after 0.0 s" not in page.locator("main").inner_text()
    _shot(page, "device-decided-at-once")
    page.goto(f"{base}/devices/{tenth}")
    assert page.get_by_text("Identified after 0.1 s by model test-1.").count() == 1


def test_a_devices_address_sources_are_said_in_words_from_views(served, page):
    """The words for how each address was learnt were written in the device page's template, apart from every other
    mapping of the store's words; every source the tracker records has its words there."""
    from gateway.store.schema import Address
    from webui import views

    assert set(views.ADDRESS_SOURCES) == {"server", "dhcp", "neighbour", "packet"}  # Address.source
    base, store = served
    mac = "aa:bb:cc:00:00:3e"
    add_device(store, mac, ip="192.168.1.71")
    with store.transaction() as s:
        for i, source in enumerate(("server", "neighbour", "packet", "<b>later</b>")):
            s.add(Address(ip=f"192.168.1.{72 + i}", mac=mac, source=source, first_seen=0, last_seen=0))
    _login(page, base)
    page.goto(f"{base}/devices/{mac}")
    said = page.locator("h3:text-is('Addresses') + ul.list li").all_inner_texts()
    assert sorted(re.sub(r", [^,]+\)$", ")", line) for line in said) == [  # without when each was last seen
        "192.168.1.71 (given to it by DHCP)",
        "192.168.1.72 (its DNS queries come from it)",
        "192.168.1.73 (in the gateway's neighbour table)",
        "192.168.1.74 (seen in its traffic)",
        "192.168.1.75 (<b>later</b>)",  # a source from a later version, as its text
    ]


def _lines(page, selector: str) -> list[int]:  # noqa: ANN001
    """How many lines the text of each element ``selector`` finds takes: its line boxes' distinct tops."""
    return page.locator(selector).evaluate_all("""els => els.map(e => {
        const r = document.createRange();
        r.selectNodeContents(e);
        return new Set([...r.getClientRects()].filter(b => b.width > 0).map(b => Math.round(b.top))).size;
    })""")


def test_the_device_lists_headers_and_a_mac_with_its_online_badge_read_on_one_line(served, page):
    """At 1280 px, as in `iotgw demo`, the header "Queries 24 h" broke between "24" and "h", and a device listed by
    its MAC had "● online" on a second line under it."""
    base, store = served
    by_mac = "02:00:00:de:40:0f"
    add_device(store, by_mac, vendor=None)
    add_device(store, "50:c7:bf:de:40:0d", hostname="HS110(EU)", ip="192.168.1.51",
               vendor="TP-LINK TECHNOLOGIES CO.,LTD.", identified=True)
    add_device(store, "74:da:38:de:40:0a", ip="192.168.1.52", vendor="Edimax Technology Co. Ltd.", identified=True)
    _login(page, base)
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(base + "/devices")
    headers = page.locator("#devices th").all_inner_texts()
    assert "Queries 24 h" in headers
    assert dict(zip(headers, _lines(page, "#devices th"), strict=True)) == dict.fromkeys(headers, 1)
    for mac in (by_mac, "74:da:38:de:40:0a"):
        link, badge = (page.locator(f"tr[data-mac='{mac}'] td:first-child {s}") for s in ("a", ".online"))
        assert link.inner_text() == mac and badge.inner_text() == "● online"
        assert badge.bounding_box()["y"] < link.bounding_box()["y"] + link.bounding_box()["height"], mac  # its line
    _shot(page, "devices-1280")
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: still stacked, nothing off screen
    page.reload()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.locator(f"tr[data-mac='{by_mac}'] td[data-label=Status]").evaluate(
        "c => getComputedStyle(c).display") == "block"
    _shot(page, "devices-phone")


def test_no_page_makes_the_browser_log_an_error(served, page):
    """Walking `iotgw demo` in Chromium: every page logged "Failed to load resource: 404" in the console, the
    browser asking for /favicon.ico, which the site does not have."""
    base, store = served
    add_device(store, "aa:bb:cc:00:00:41", hostname="esp-41", identified=True)
    errors = []
    page.on("console", lambda m: errors.append((page.url, m.text)) if m.type == "error" else None)
    page.goto(base + "/login")
    _login(page, base)
    for path in ("/", "/devices", "/devices/aa:bb:cc:00:00:41", "/policies", "/queries", "/alerts", "/model",
                 "/settings"):
        page.goto(base + path)
        page.wait_for_load_state("networkidle")
    assert errors == []


def test_alerts_name_a_named_device_and_keep_its_mac_beside_the_name(served, page):
    """Alerts named each device by its MAC only, on the dashboard and the alert list, after the owner had named it
    "Kitchen plug" on its page."""
    from gateway.devices import service
    from gateway.store.schema import AlertRecord

    base, store = served
    named, bare = "aa:bb:cc:00:00:42", "aa:bb:cc:00:00:43"
    add_device(store, named, hostname="HS110(EU)")
    add_device(store, bare, hostname=None, ip="192.168.1.51")
    service.rename(store, named, "Kitchen plug")
    with store.transaction() as s:
        s.add(AlertRecord(ts=1.0, kind="new_device", mac=bare, data={"ip": "192.168.1.51"}))
        s.add(AlertRecord(ts=2.0, kind="new_device", mac=named, data={"ip": "192.168.1.50"}))
    _login(page, base)
    page.goto(base + "/alerts")
    cells = page.locator("#alerts td[data-label=Device]")
    assert cells.all_inner_texts() == [f"Kitchen plug\n{named}", bare]
    assert cells.first.get_by_role("link").inner_text() == "Kitchen plug"
    page.goto(base + "/")
    latest = page.locator("h2:text-is('Latest alerts') + ul.list li").all_inner_texts()
    assert [line.split(" · ", 2)[2] for line in latest] == ["Kitchen plug", bare]
    page.locator("h2:text-is('Latest alerts') + ul.list").get_by_role("link", name="Kitchen plug").click()
    page.wait_for_url(f"{base}/devices/{named}")


def test_a_bedtime_from_22_to_07_is_saved_from_the_form_and_blocks_those_nights(served, page, tmp_path):
    """A schedule of 22:00 to 07:00, a bedtime, was stopped by the form ("crosses midnight: save 22:00-24:00 and
    00:00-07:00 as two schedules") and refused by the server: a bedtime every night took two schedules and two
    rules. Now mon 22:00-07:00 is Monday 22:00 to Tuesday 07:00, said so on the page; only an empty range is
    stopped before it is sent."""
    from gateway import policies
    from policy.engine import PolicyEngine
    from policy.records import DeviceContext
    from tests.test_policy_engine import _ts

    base, _ = served
    state_dir = config(tmp_path).state_dir  # the served app's
    _login(page, base)
    page.goto(base + "/policies")
    assert "runs into the next day" in page.locator("#schedule-hint").inner_text()
    form = page.locator("#schedule-form")
    form.locator("input[name=name]").fill("bedtime")
    form.locator("input[name=time_zone]").fill("Europe/London")
    for day in ("sun", "mon"):
        form.locator(f"input[value={day}]").check()
    form.locator("input[name=start]").fill("22:00")
    end = form.locator("input[name=end]")
    end.fill("22:00")
    form.get_by_role("button", name="Save schedule").click()
    assert end.evaluate("e => e.validationMessage") == (
        "22:00-22:00 is empty: give an end other than the start (the whole day is 00:00-24:00)")
    assert page.locator(".flash").count() == 0  # not sent: what was typed is still there
    assert form.locator("input[name=name]").input_value() == "bedtime"
    end.fill("07:00")
    assert end.evaluate("e => e.validationMessage") == ""
    form.get_by_role("button", name="Save schedule").click()
    page.wait_for_load_state()
    assert page.locator(".flash").inner_text() == (
        "Schedule bedtime saved: mon 22:00-07:00 (next day), sun 22:00-07:00 (next day).")
    assert page.locator("#schedules li").first.inner_text().startswith(
        "bedtime (Europe/London): mon 22:00-07:00 (next day), sun 22:00-07:00 (next day)")

    rule_form = page.locator("#global-rule-form")
    rule_form.locator("input[name=target]").fill("all")
    rule_form.locator("select[name=schedule]").select_option("bedtime")
    rule_form.get_by_role("button", name="Add rule").click()
    page.wait_for_load_state()
    assert page.locator(".flash").inner_text() == "Added: block everything during bedtime."
    engine = PolicyEngine.build(policies.load(state_dir), base_dir=state_dir)
    device = DeviceContext("aa:bb:cc:00:00:09", None, None, "approved")
    tz = "Europe/London"
    cases = [  # 2024-01-14 is a Sunday
        ((14, 21, 59), False), ((14, 22, 0), True), ((15, 6, 59), True), ((15, 7, 0), False),
        ((15, 23, 0), True), ((16, 6, 59), True), ((16, 7, 0), False), ((16, 23, 0), False),
    ]
    got = [engine.decide(device, "x.example", _ts(tz, 2024, 1, *when, 0)).blocked for when, _ in cases]
    assert got == [want for _, want in cases]


def test_a_type_default_offers_the_homes_device_types_as_the_model_and_owner_name_them(served, page):
    """The default's field offered only AdGuard Home's category tags (no device_plug for the home's plugs) and gave
    "tplink-plug-hs110" as its example, a name the shipped model never gives (it says "TP-LinkPlugHS110"): a
    default typed that way applied to no device."""
    from gateway.devices import service

    base, store = served
    add_device(store, "aa:bb:cc:00:00:44", hostname="plug", identified=True)  # the model said tplink-plug-hs110
    add_device(store, "aa:bb:cc:00:00:45", ip="192.168.1.51", vendor="eQ-3 Entwicklung GmbH")
    service.label(store, "aa:bb:cc:00:00:45", manufacturer="eQ-3", device_type="HomeMaticPlug", category="plug")
    _login(page, base)
    page.goto(base + "/policies")
    field = page.locator("#default-rule-form input[name=target_scope]")
    options = page.locator(f"datalist#{field.get_attribute('list')} option").evaluate_all(
        "os => os.map(o => o.value)")
    assert {"tplink-plug-hs110", "HomeMaticPlug", "device_camera", "device_plug"} <= set(options)
    assert "TP-LinkPlugHS110" in field.get_attribute("placeholder")
    field.fill("HomeMaticPlug")
    page.locator("#default-rule-form input[name=target]").fill("example.com")
    page.locator("#default-rule-form").get_by_role("button", name="Add rule").click()
    page.wait_for_load_state()
    page.goto(base + "/devices/aa:bb:cc:00:00:45")
    assert "type:HomeMaticPlug" in page.locator("#policy-editor ~ p.muted").last.inner_text()



def test_policy_changes_are_confirmed_in_the_words_the_page_uses(served, page, tmp_path):
    """Adding a rule flashed its internal label, "block name=doubleclick.net schedule=bedtime added.", and choosing
    "0.0.0.0 / ::" for blocked queries flashed "Blocked queries answered null."."""
    from gateway import policies

    base, _ = served
    policies.set_schedule(config(tmp_path).state_dir, "bedtime", "UTC", ["mon=21:00-24:00"])
    _login(page, base)
    page.goto(base + "/policies")
    form = page.locator("#global-rule-form")
    form.locator("input[name=target]").fill("doubleclick.net")
    form.locator("select[name=schedule]").select_option("bedtime")
    form.get_by_role("button", name="Add rule").click()
    page.wait_for_load_state()
    assert page.locator(".flash").inner_text() == "Added: block doubleclick.net during bedtime."
    assert page.locator("#global-rules td.qname").inner_text() == "block doubleclick.net"
    answer = page.locator("#global-policy select[name=answer]")
    for value, shown in (("nxdomain", "NXDOMAIN"), ("null", "0.0.0.0 / ::")):
        answer.select_option(value)
        page.locator("#global-policy form:has(select[name=answer])").get_by_role("button", name="Save").click()
        page.wait_for_load_state()
        assert page.locator(".flash").inner_text() == f"Blocked queries now get {shown}."
        assert answer.locator("option:checked").inner_text() == shown


def test_a_device_page_without_a_name_says_its_mac_once(served, page):
    """Its heading is its MAC when it has no name, and the line under it began with the same MAC again."""
    base, store = served
    mac = "aa:bb:cc:00:00:46"
    add_device(store, mac)
    add_device(store, "aa:bb:cc:00:00:47", hostname="esp-47", ip="192.168.1.51")
    _login(page, base)
    page.goto(f"{base}/devices/{mac}")
    assert page.locator("#device-name").inner_text() == mac
    assert page.locator("main").inner_text().count(mac) == 1
    page.goto(f"{base}/devices/aa:bb:cc:00:00:47")  # a named one keeps its MAC under its name
    assert page.locator("#device-name + p").inner_text().startswith("aa:bb:cc:00:00:47 · Espressif Inc.")


def test_the_model_page_says_federations_last_round_in_words_and_how_to_take_part(served, page):
    """The last round read "at: ...", "error: None", "round: 3", "status: ok" (its record's keys, sorted), and with
    no round yet the page said so without what federated learning is or how a gateway takes part."""
    import json

    base, store = served
    _login(page, base)
    page.goto(base + "/model")
    assert "iotgw federation join" in page.locator("#federation").inner_text()
    store.set_setting("federation_last_round", json.dumps({"round": 3, "status": "ok", "error": None,
                                                           "at": "2026-11-23 03:10:00"}))
    page.reload()
    text = page.locator("#federation").inner_text()
    assert "The last round this gateway took part in, at 2026-11-23 03:10:00:" in text
    assert "round: 3" in text and "result: ok" in text
    assert "None" not in text and "at:" not in text


def test_the_query_logs_rule_column_says_which_rule_in_words(served, page, tmp_path):
    """The Rule column showed the engine's key, "device:aa:bb:cc:00:00:48 block name=ads.example schedule=bedtime",
    then words parsed back out of it, which left a key raw when the owner named a device type "smart block speaker"
    and misread a list category named "ads schedule=night" as a rule with a schedule. The words are the engine's,
    made as it decides; the key stays as the cell's title, for whoever debugs a rule. A row logged before the
    engine gave words shows its key."""
    from gateway.events import DnsQuery
    from gateway.store.querylog import QueryLogWriter
    from policy.engine import PolicyEngine
    from policy.model import ListSpec, PolicySet, Rule
    from policy.records import DeviceContext
    from policy.schedule import Schedule

    base, store = served
    mac = "aa:bb:cc:00:00:48"
    add_device(store, mac)
    (tmp_path / "ads.txt").write_text("||tracker.example^\n")
    ps = PolicySet(lists={"ads": ListSpec("ads.txt")}, categories={"ads schedule=night": ["ads"]})
    ps.schedules["bedtime"] = Schedule("UTC", {d: (0, 86_400_000) for d in ("mon", "tue", "wed", "thu", "fri",
                                                                           "sat", "sun")})
    ps.policy(f"device:{mac}").rules.append(Rule("block", "name", "ads.example", schedule="bedtime"))
    ps.policy("type:smart block speaker").rules.append(Rule("block", "name", "shop.example"))
    ps.policy("type:smart block speaker").rules.append(Rule("block", "category", "ads schedule=night"))
    ps.policy("tag:device_camera").paused = True
    engine = PolicyEngine.build(ps, base_dir=tmp_path)
    speaker = DeviceContext(mac, "smart block speaker", None, "approved")
    camera = DeviceContext("aa:bb:cc:00:00:49", None, "camera", "approved")
    asked = [(speaker, "ads.example"), (speaker, "shop.example"), (speaker, "tracker.example"), (camera, "x.example")]
    verdicts = [engine.decide(ctx, name, time.time()) for ctx, name in asked]
    writer = QueryLogWriter(store)
    writer.add([DnsQuery(time.time() - 100 + i, "192.168.1.50", mac, name, 1, "example", 0, 1.0, v.action, v.rule,
                         "server", v.words) for i, ((_, name), v) in enumerate(zip(asked, verdicts, strict=True))])
    old = "type:smart block speaker block name=old.example"  # logged before the engine gave words
    writer.add([DnsQuery(time.time(), "192.168.1.50", mac, "old.example", 1, "example", 0, 1.0, "blocked", old)])
    assert writer.flush() == 5
    words = [
        "its own rule: block ads.example during bedtime",
        "type smart block speaker rule: block shop.example",
        "type smart block speaker rule: block category ads schedule=night (list ads)",
        "category camera mode: paused (internet off)",
        old,
    ]
    keys = [
        f"device:{mac} block name=ads.example schedule=bedtime",
        "type:smart block speaker block name=shop.example",
        "type:smart block speaker block category=ads schedule=night list=ads",
        "tag:device_camera paused",
        old,
    ]
    _login(page, base)
    for path in ("/queries", f"/devices/{mac}"):
        page.goto(base + path)
        cells = page.locator("table.queries td[data-label=Rule]")
        assert cells.all_inner_texts()[::-1] == words, path
        assert cells.evaluate_all("cs => cs.map(c => c.title)")[::-1] == keys, path


def test_a_password_change_lands_on_the_login_page_saying_what_happened(served, page):
    """The change ends every session, this one too: the login page it lands on said nothing, as if it had failed."""
    base, store = served
    _login(page, base)
    page.goto(base + "/settings")
    new = "a new and longer passphrase"
    page.fill("input[name=current]", PASSWORD)
    page.fill("input[name=password]", new)
    page.fill("input[name=confirm]", new)
    page.get_by_role("button", name="Change password").click()
    page.wait_for_url(base + "/login")
    assert page.get_by_role("status").inner_text() == (
        "Password changed: every session was ended, this one too. Log in with the new password.")
    _shot(page, "login-password-changed")
    page.reload()  # said once, not on every later visit
    assert page.get_by_role("status").count() == 0
    page.fill("input[name=password]", new)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")
    assert page.get_by_role("status").count() == 0


def test_a_devices_page_lists_its_identification_history_newest_first_with_what_changed(served, page):
    """The page showed only the latest answer: an owner could not see that a revision or a new model changed it."""
    base, store = served
    mac = "aa:bb:cc:00:00:0b"
    add_device(store, mac, hostname="plug", identified=True)  # tplink-plug-hs110 by test-1, 25 s ago
    from gateway.store.schema import Identification

    now = time.time()
    answer = {"manufacturer": "TP-Link", "category": "plug", "known": True, "alternatives": [], "signals": ["dns"]}
    with store.transaction() as s:
        for n in range(10):  # older checks of the same answer: past the ten shown
            s.add(Identification(mac=mac, ts=now - 100 - n, device_type="tplink-plug-hs110", confidence=0.9,
                                 decided_after_s=4.2, model_version="test-1", **answer))
        s.add(Identification(mac=mac, ts=now - 20, device_type="tplink-plug-hs100", confidence=0.97,
                             decided_after_s=9.0, model_version="test-1", **answer))
        s.add(Identification(mac=mac, ts=now - 10, device_type="tplink-plug-hs100", confidence=0.99,
                             decided_after_s=None, model_version="test-2", **answer))
    _login(page, base)
    page.goto(f"{base}/devices/{mac}")
    rows = page.locator("#identifications tbody tr")
    assert rows.count() == 10
    cells = [rows.nth(i).locator("td").all_inner_texts() for i in range(3)]
    assert cells[0][1:] == ["tplink-plug-hs100 (TP-Link) · plug", "99%",
                            "as a best guess at the end of its first minute", "test-2", "new model (was test-1)"]
    assert cells[1][1:] == ["tplink-plug-hs100 (TP-Link) · plug", "97%", "after 9.0 s", "test-1",
                            "answer changed from tplink-plug-hs110 (TP-Link) · plug"]
    assert cells[2][1:] == ["tplink-plug-hs110 (TP-Link) · plug", "94%", "after 4.2 s", "test-1",
                            "same answer, confidence was 90%"]
    assert "(the last 10 of 13)" in page.locator("#history-legend").inner_text()
    _shot(page, "device-history")
    page.set_viewport_size({"width": 390, "height": 844})
    page.reload()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    _shot(page, "device-history-phone")


def test_a_devices_identification_history_counts_every_answer_past_the_hundred_the_page_reads(served, page):
    """The page reads a device's newest 100 identifications: with 130 stored it said "the last 10 of 100"."""
    from gateway.store.schema import Identification

    base, store = served
    mac = "aa:bb:cc:00:00:0c"
    add_device(store, mac, hostname="plug", identified=True)  # one identification
    now = time.time()
    with store.transaction() as s:
        for n in range(129):
            s.add(Identification(mac=mac, ts=now - 1000 + n, manufacturer="TP-Link", device_type="tplink-plug-hs110",
                                 category="plug", confidence=0.9, known=True, decided_after_s=4.2, alternatives=[],
                                 signals=["dns"], model_version="test-1"))
    _login(page, base)
    page.goto(f"{base}/devices/{mac}")
    assert page.locator("#identifications tbody tr").count() == 10
    assert "(the last 10 of 130)" in page.locator("#history-legend").inner_text()


def test_a_device_without_names_says_where_names_come_from(served, page):
    base, store = served
    mac = "aa:bb:cc:00:00:0c"
    add_device(store, mac)  # no DHCP host name, no mDNS, not named by the owner
    _login(page, base)
    page.goto(f"{base}/devices/{mac}")
    said = page.locator("#names").inner_text()
    assert said.startswith("None yet.") and all(w in said for w in ("(DHCP)", "(mDNS)", "by you: Rename above"))


@pytest.mark.parametrize("width", [1100, 390])
def test_the_dashboard_charts_legend_reads_as_one_legend_under_its_time_axis(served, page, width):
    """The legend's words were spread over the chart's whole width between the axis's two times, as if each labelled
    a part of the chart."""
    base, store = served
    add_device(store, "aa:bb:cc:00:00:0d", queries=("a.example.com", "b.example.com", "c.example.com"))
    page.set_viewport_size({"width": width, "height": 900})
    _login(page, base)
    page.goto(base + "/")
    box = {name: page.locator(sel).bounding_box() for name, sel in (
        ("chart", ".chart svg"), ("total", ".legend-total"), ("blocked", ".legend-blocked"),
        ("legend", "#chart-legend"), ("first", ".chart-axis span:first-child"), ("now", ".chart-axis span:last-child"))}
    line = box["total"]["height"]
    assert box["blocked"]["x"] - (box["total"]["x"] + box["total"]["width"]) < line  # side by side, one space apart
    assert box["legend"]["height"] < 1.5 * line  # one line, the peak on it too
    assert re.fullmatch(r"queries blocked · peak \d/h", page.locator("#chart-legend").inner_text())
    assert abs(box["first"]["x"] - box["chart"]["x"]) < 2  # the axis's times at the ends of the bars
    assert abs(box["now"]["x"] + box["now"]["width"] - box["chart"]["x"] - box["chart"]["width"]) < 2
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    _shot(page, f"dashboard-chart-{width}")
