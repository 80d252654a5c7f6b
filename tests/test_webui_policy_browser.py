"""End to end: the real daemon on loopback (dnsmasq upstream), the web UI served by waitress on its own store,
Debian's Chromium driven by Playwright. A device appears, the owner blocks a domain for it in the browser, and
a real DNS query from its address is answered 0.0.0.0 while another device still gets the real answer."""

from __future__ import annotations

import json
import shutil

import pytest

from gateway import accounts
from gateway.store.db import Store
from tests.dns_helpers import needs_dnsmasq
from tests.test_gateway import RunningGateway, answers, eventually
from tests.test_webui_browser import CHROMIUM, PASSWORD, _login, _shot, page  # noqa: F401 - page is a fixture
from webui.server import serve_in_thread

pytestmark = [
    needs_dnsmasq,
    pytest.mark.skipif(not shutil.which(CHROMIUM), reason="Debian's chromium is not installed"),
]
MAC = "02:aa:bb:cc:dd:51"
IP, OTHER_IP = "127.0.0.51", "127.0.0.52"


def test_block_a_domain_for_one_device_in_the_browser_and_its_dns_is_blocked(tmp_path, upstream, page):  # noqa: F811
    with RunningGateway(tmp_path, upstream) as gw:
        web_store = Store(gw.cfg.db_url)  # the web UI is its own process in production: its own connections
        accounts.set_password(web_store, PASSWORD)
        server = serve_in_thread(web_store, gw.cfg, "127.0.0.1", 0)
        base = server.url.rstrip("/")
        try:
            gw.dhcp(MAC, IP, "kids-tablet")
            assert answers(gw.ask("www.example.test", IP)) == {"192.0.2.10"}
            _login(page, base)

            def device_listed() -> bool:
                page.reload()
                return page.locator(f"tr[data-mac='{MAC}']").count() == 1
            eventually(device_listed)
            page.locator(f"tr[data-mac='{MAC}']").get_by_role("link", name="kids-tablet").click()
            page.wait_for_url(f"{base}/devices/{MAC}")

            page.select_option("#device-rule-form select[name=action]", "block")
            page.fill("#device-rule-form input[name=target]", "example.test")
            page.click("#device-rule-form button")
            page.wait_for_url(f"{base}/devices/{MAC}#policy-editor")
            assert page.locator(".flash").inner_text() == "Added: block example.test."
            assert page.locator("#device-rules").get_by_text("block example.test").count() == 1

            # The running daemon picks the change up within a second; only this device is affected.
            eventually(lambda: answers(gw.ask("www.example.test", IP)) == {"0.0.0.0"}, timeout=5)
            assert answers(gw.ask("www.example.test", OTHER_IP)) == {"192.0.2.10"}
            assert answers(gw.ask("other.example.test", IP)) == {"0.0.0.0"}  # subdomains too

            def blocked_in_log() -> bool:
                page.goto(f"{base}/queries?mac={MAC}&verdict=blocked")
                return page.locator("td.qname").get_by_text("www.example.test", exact=True).count() >= 1
            eventually(blocked_in_log)

            # Pause from the editor: every name is blocked for the device, the other device is untouched.
            page.goto(f"{base}/devices/{MAC}")
            page.select_option("#device-mode-form select[name=mode]", "paused")
            page.click("#device-mode-form button")
            page.wait_for_url(f"{base}/devices/{MAC}#policy-editor")
            eventually(lambda: gw.ask("anything.example.test", IP).answer and
                       answers(gw.ask("anything.example.test", IP)) == {"0.0.0.0"}, timeout=5)
            assert answers(gw.ask("other.example.test", OTHER_IP)) == {"192.0.2.11"}
            _shot(page, "device-policy")
            saved = json.loads((gw.cfg.state_dir / "policy.json").read_text())["policies"][f"device:{MAC}"]
            assert saved["paused"] is True and saved["rules"][0]["value"] == "example.test"

            # The Policies page: a schedule and a type default made through its forms, kept as a screenshot.
            page.goto(f"{base}/policies")
            page.fill("#schedule-form input[name=name]", "bedtime")
            page.check("#schedule-form input[value=mon]")
            page.fill("#schedule-form input[name=start]", "22:00")
            page.fill("#schedule-form input[name=end]", "07:00")  # to Tuesday morning
            page.click("#schedule-form button")
            page.wait_for_url(f"{base}/policies")
            assert page.locator(".flash").inner_text() == "Schedule bedtime saved: mon 22:00-07:00 (next day)."
            page.select_option("#default-rule-form select[name=kind]", "tag")
            page.fill("#default-rule-form input[name=target_scope]", "device_tv")
            page.fill("#default-rule-form input[name=target]", "all")
            page.select_option("#default-rule-form select[name=schedule]", "bedtime")
            page.click("#default-rule-form button")
            page.wait_for_url(f"{base}/policies")
            assert page.locator("#type-defaults .scope h3").inner_text() == "tag:device_tv"
            page.fill("#default-rule-form input[name=target_scope]", "cam")
            page.fill("#default-rule-form input[name=target]", "not a domain!")
            page.click("#default-rule-form button")
            page.wait_for_url(f"{base}/policies")
            assert "Not changed: 'not a domain!' is not a domain name" in page.locator(".flash").inner_text()
            _shot(page, "policies-edited")
            page.set_viewport_size({"width": 390, "height": 844})
            page.reload()
            _shot(page, "policies-edited-phone")
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"the Policies page scrolls sideways on a phone ({width}px)"
            page.goto(f"{base}/devices/{MAC}")
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"the device policy editor scrolls sideways on a phone ({width}px)"
            assert page.dialogs == []
        finally:
            server.stop()
            web_store.close()


def test_the_query_log_says_a_type_rule_in_words_when_the_owner_named_the_type_freely(tmp_path, upstream, page):  # noqa: F811
    """The owner labels a device "smart block speaker" and blocks a name for that type: the real daemon blocks
    it, and the query log page says the rule in words. Parsed back out of the engine's key, the words took
    " block " for where the rule began and the cell showed the raw key."""
    from gateway import policies
    from gateway.devices import service
    from policy.model import Rule

    with RunningGateway(tmp_path, upstream) as gw:
        web_store = Store(gw.cfg.db_url)
        accounts.set_password(web_store, PASSWORD)
        server = serve_in_thread(web_store, gw.cfg, "127.0.0.1", 0)
        base = server.url.rstrip("/")
        try:
            gw.dhcp(MAC, IP, "speaker")
            assert answers(gw.ask("www.example.test", IP)) == {"192.0.2.10"}
            eventually(lambda: any(d.mac == MAC for d in service.list_devices(web_store)))
            service.label(web_store, MAC, manufacturer="Acme", device_type="smart block speaker", category="")
            policies.add_rule(gw.cfg.state_dir, "type:smart block speaker", Rule("block", "name", "example.test"))
            eventually(lambda: answers(gw.ask("www.example.test", IP)) == {"0.0.0.0"}, timeout=5)
            _login(page, base)

            def said_in_words() -> bool:
                page.goto(f"{base}/queries?mac={MAC}&verdict=blocked")
                return page.locator("td[data-label=Rule]").count() >= 1
            eventually(said_in_words)
            cell = page.locator("td[data-label=Rule]").first
            assert cell.inner_text() == "type smart block speaker rule: block example.test"
            assert cell.get_attribute("title") == "type:smart block speaker block name=example.test"
        finally:
            server.stop()
            web_store.close()
