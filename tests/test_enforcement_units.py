"""The daemon's policy state across device-table reloads, without root: a real SQLite store, the real tracker
and ``Filtering`` answering real DNS query bytes (what ``iotgw run`` does per query, minus the sockets)."""

from __future__ import annotations

import os
import subprocess
import time

import dnslib
import pytest

from gateway.devices.service import forget, set_status
from gateway.devices.tracker import DeviceTracker
from gateway.events import DnsQuery
from gateway.filtering import Filtering
from gateway.policyfile import save_policy
from gateway.store.db import Store
from policy.model import PolicySet
from policy.nftables import QuarantineFirewall

MAC = "02:15:00:00:00:42"


def _decide(filtering: Filtering, mac: str, name: str) -> str:
    query = dnslib.DNSRecord.question(name).pack()
    decision = filtering.decide("10.0.0.42", mac, name, 1, query)
    return "allowed" if decision is None else decision.verdict


def _quarantine_on(state) -> None:  # noqa: ANN001 - a Path
    data = PolicySet()
    data.quarantine.enabled = True
    data.quarantine.allow = ["time.example"]
    save_policy(state, data)


def test_a_device_met_before_its_row_is_written_stays_quarantined_across_reloads(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'iotgw.sqlite'}")
    _quarantine_on(tmp_path)
    filtering = Filtering(store, tmp_path)
    filtering.refresh()
    filtering.seen(MAC)  # the tracker met it (a DHCP request, say); nothing is in the store yet
    filtering.reload_devices()  # an unrelated change elsewhere reloads the device table
    assert MAC in filtering.contexts
    assert filtering.engine.is_quarantined(filtering.contexts[MAC])
    assert _decide(filtering, MAC, "shop.example") == "blocked"
    assert _decide(filtering, MAC, "pool.time.example") == "allowed"


def test_approval_applies_and_a_forgotten_device_is_new_again(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'iotgw.sqlite'}")
    _quarantine_on(tmp_path)
    tracker = DeviceTracker(store)
    tracker.observe(DnsQuery(time.time(), "10.0.0.42", MAC, "shop.example", 1, "shop.example"))
    tracker.write(tracker.take())
    filtering = Filtering(store, tmp_path)
    filtering.refresh()
    assert _decide(filtering, MAC, "shop.example") == "blocked"

    set_status(store, MAC, "approved", by="api", publish=False)
    assert filtering.refresh()  # the devices revision moved
    assert _decide(filtering, MAC, "shop.example") == "allowed"

    forget(store, MAC)
    assert filtering.refresh()
    assert _decide(filtering, MAC, "shop.example") == "blocked"  # not still approved from before
    assert not filtering.refresh()  # nothing changed since


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and nftables need root")
def test_a_second_policy_save_within_one_mtime_tick_is_still_loaded(tmp_path):
    """The policy was reloaded when its float mtime changed. Two saves within one timestamp tick (a jiffy on a
    Pi's kernel, a second on ext4 with 128-byte inodes) share it: the second, saved after the daemon read the
    first, was never loaded. Setting the second file's mtime to the first's is what such a filesystem does."""
    store = Store(f"sqlite:///{tmp_path / 'iotgw.sqlite'}")
    _quarantine_on(tmp_path)
    filtering = Filtering(store, tmp_path)
    filtering.refresh()
    filtering.seen(MAC)
    assert _decide(filtering, MAC, "shop.example") == "blocked"
    first = os.stat(tmp_path / "policy.json").st_mtime_ns
    save_policy(tmp_path, PolicySet())  # quarantine off again, within the same tick
    os.utime(tmp_path / "policy.json", ns=(first, first))
    assert filtering.refresh()
    assert _decide(filtering, MAC, "shop.example") == "allowed"


def test_a_client_without_a_mac_getting_a_cname_answer_keeps_the_quarantine_set_in_sync(tmp_path):
    netns = f"iqu{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True, timeout=20)
    filtering = Filtering(Store(f"sqlite:///{tmp_path / 'iotgw.sqlite'}"), tmp_path, firewall=True)
    filtering._firewall = QuarantineFirewall(netns=netns)  # the daemon's own namespace is the host's
    try:
        _quarantine_on(tmp_path)
        filtering.refresh()
        filtering.open_firewall()
        filtering.seen(MAC)
        filtering.refresh()
        assert filtering._firewall.macs() == {MAC}

        query = dnslib.DNSRecord.question("www.example.test")
        reply = query.reply()
        reply.add_answer(*dnslib.RR.fromZone("www.example.test. 60 IN CNAME cdn.example.net.\n"
                                             "cdn.example.net. 60 IN A 192.0.2.1"))
        filtering.check_response("10.0.0.50", None, "www.example.test", reply.pack(), query.pack())
        assert "ip:10.0.0.50" in filtering.contexts  # keyed as decide keys a client without a MAC

        other = "02:15:00:00:00:43"
        filtering.seen(other)
        filtering.refresh()
        assert filtering._firewall.macs() == {MAC, other}
    finally:
        filtering.close()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=20)
