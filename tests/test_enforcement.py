"""Policy enforced by ``iotgw run`` as a real process on a routed LAN of network namespaces: clients told apart
by MAC, a type's default applied after the daemon identified the device, and quarantine by DNS and nftables.

Changes are made the way a user makes them: ``iotgw policy ...`` as its own process, and the device service
(``set_status``, what the CLI and the web UI call) for approval. The daemon picks both up without a restart;
the design says within a second (it re-reads twice a second). The polls below allow a few seconds, because
the machine running the suite may be loaded; the time each change took is printed (``pytest -s``).
"""

from __future__ import annotations

import os
import shutil

import pytest

from gateway.devices.service import list_devices
from gateway.store.db import Store
from gateway.store.querylog import recent
from tests.dns_helpers import needs_dnsmasq
from tests.routed_lan import UPSTREAM_ANSWER, Lan, ns_tag, poll, routed_lan, running_daemon

pytestmark = [
    pytest.mark.root,
    needs_dnsmasq,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and nftables need root"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="nftables (nft) is not installed"),
]

APPLIES_WITHIN_S = 5.0  # generous for a loaded CI machine; the daemon's own period is 0.5 s
RESOLVED = ("NOERROR", [UPSTREAM_ANSWER])
NULL_BLOCKED = ("NOERROR", ["0.0.0.0"])


@pytest.fixture(scope="module")
def lan():
    with routed_lan(ns_tag()) as topology:
        yield topology


def _until(agent, name: str, expected: tuple[str, list[str]], what: str) -> float:  # noqa: ANN001 - an Agent
    seconds = poll(lambda: agent.resolve(name) == expected, APPLIES_WITHIN_S,
                   lambda: f"{what}: {name} still answers {agent.resolve(name)}, expected {expected}")
    print(f"{what}: {seconds:.2f} s")
    return seconds


def test_a_block_for_one_mac_applies_to_that_client_only_and_lifts(tmp_path, lan: Lan):
    a, b = lan.clients
    with running_daemon(lan, tmp_path / "state") as daemon:
        # A canary per device tells the test when the daemon knows each client by its MAC (after its first
        # query the daemon reads the kernel's neighbour table; until then a client is only an address).
        for client in (a, b):
            daemon.policy("block", f"device:{client.mac}", "canary.example.test")
        for client in (a, b):
            _until(client.agent, "canary.example.test", NULL_BLOCKED, f"{client.mac} known by MAC")
        assert a.agent.resolve("ads.example.test") == RESOLVED
        assert b.agent.resolve("ads.example.test") == RESOLVED

        daemon.policy("block", f"device:{a.mac}", "ads.example.test")
        _until(a.agent, "ads.example.test", NULL_BLOCKED, "block applied")
        assert a.agent.resolve("sub.ads.example.test") == NULL_BLOCKED  # a name blocks its subdomains
        assert b.agent.resolve("ads.example.test") == RESOLVED  # the other MAC is untouched
        assert a.agent.resolve("other.example.test") == RESOLVED

        daemon.policy("unrule", f"device:{a.mac}", "1")  # rule 0 is the canary
        _until(a.agent, "ads.example.test", RESOLVED, "unblock applied")
        assert a.agent.resolve("canary.example.test") == NULL_BLOCKED

        store = Store(daemon.db_url, migrate=False)
        poll(lambda: any(q.verdict == "blocked" for q in recent(store, mac=a.mac, search="ads.example.test")),
             APPLIES_WITHIN_S, "the blocked query never reached the query log")
        blocked = [q for q in recent(store, mac=a.mac, search="ads.example.test") if q.verdict == "blocked"]
        assert all(f"device:{a.mac}" in q.rule and "ads.example.test" in q.rule for q in blocked)
        assert not [q for q in recent(store, mac=b.mac, search="ads.example.test") if q.verdict == "blocked"]
        assert {d.mac for d in list_devices(store)} >= {a.mac, b.mac}
