"""``gateway.policies``, the functions the CLI, the web UI and Home Assistant share, on a real policy file."""

from __future__ import annotations

import functools
import http.server
import json
import multiprocessing
import os
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest

from gateway import policies
from policy import lists
from policy.model import Rule
from tests.list_server import list_server, replying

# The list servers here listen on loopback, which fetch refuses by default (test_list_servers_on_the_gateway...).
LOOPBACK_FETCH = functools.partial(lists.fetch, from_gateway=True)
MAC = "aa:bb:cc:00:00:01"


def _add_names(state_dir, prefix: str, count: int) -> None:
    for i in range(count):
        policies.add_rule(state_dir, "global", Rule("block", "name", f"{prefix}{i}.example"))


def test_concurrent_writers_lose_no_edit(tmp_path):
    # Two processes (a browser and a script, say) each adding rules at once: every rule survives.
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_add_names, args=(tmp_path, p, 25)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = policies.load(tmp_path)
    assert len(data.policies["global"].rules) == 50
    assert data.revision == 50


def test_replace_scope_names_each_problem_and_writes_nothing(tmp_path):
    scope = f"device:{MAC}"
    policies.replace_scope(tmp_path, scope, {"rules": [{"action": "block", "kind": "name", "value": "Ads.Example."}]})
    assert policies.describe_scope(policies.load(tmp_path), scope)["rules"] == [
        {"action": "block", "kind": "name", "value": "ads.example", "schedule": None, "label": "block name=ads.example"}
    ]
    bad = [
        ([], "expected a JSON object"),
        ({"rules": "x"}, "rules: expected a list"),
        ({"rules": [{"action": "drop", "kind": "name", "value": "a.example"}]}, "rules[0].action"),
        ({"rules": [{"action": "block", "value": "not a name!"}]}, "rules[0].value: 'not a name!' is not a domain"),
        ({"rules": [{"action": "block", "kind": "list", "value": "nope"}]}, "rules[0]: no list 'nope'"),
        ({"rules": [{"action": "block", "kind": "all", "schedule": "night"}]}, "rules[0]: no schedule 'night'"),
        ({"paused": "yes"}, "paused: expected true, false or null"),
        ({"answer": "drop"}, "answer: expected one of null"),
        ({"rulez": []}, "unknown field 'rulez'"),
    ]
    for body, message in bad:
        with pytest.raises(ValueError, match=None) as exc:
            policies.replace_scope(tmp_path, scope, body)
        assert message in str(exc.value), (body, str(exc.value))
    assert policies.load(tmp_path).revision == 1
    with pytest.raises(ValueError, match="not a MAC address"):
        policies.replace_scope(tmp_path, "device:12:34", {"rules": []})


def test_modes_and_the_device_view(tmp_path):
    policies.set_device_mode(tmp_path, MAC.upper(), "paused")
    assert policies.device_mode(tmp_path, MAC) == "paused"
    assert policies.device_mode(tmp_path, "ip:192.168.1.9") == "default"  # no policy of its own, no error
    policies.add_rule(tmp_path, "type:acme_cam", policies.rule_from_target("block", "video.example"))
    policies.set_mode(tmp_path, "category:camera", "strict")
    view = policies.device_view(policies.load(tmp_path), MAC, "acme_cam", "camera")
    assert view["mode"] == "paused"
    assert [s["scope"] for s in view["inherits"]] == ["type:acme_cam", "tag:device_camera", "global"]
    assert view["inherits"][1]["mode"] == "strict"
    with pytest.raises(ValueError, match="mode must be one of default, strict, paused"):
        policies.set_device_mode(tmp_path, MAC, "off")


def test_web_lists_are_confined_to_the_lists_directory(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    for path in (str(secret), "../secret.txt", ".hidden"):
        with pytest.raises(ValueError, match="file name in"):
            policies.add_list(tmp_path / "state", "x", path=path)
    lists = policies.lists_dir(tmp_path / "state")
    lists.mkdir(parents=True)
    (lists / "ads.txt").write_text("||ads.example^\n0.0.0.0 t.example\n@@||ok.ads.example^\nbad line here\n")
    report = policies.add_list(tmp_path / "state", "ads", path="ads.txt", category="privacy")
    assert (report.blocked, report.exceptions, report.error_count) == (2, 1, 1)
    assert "ads.txt:4: neither a hosts line" in report.errors[0]
    data = policies.load(tmp_path / "state")
    assert data.lists["ads"].path == "lists/ads.txt" and data.categories == {"privacy": ["ads"]}
    with pytest.raises(ValueError, match="list id"):
        policies.add_list(tmp_path / "state", "a/b", path="ads.txt")


def test_url_list_is_fetched_from_a_real_server_and_removed_only_when_unused(tmp_path):
    body = b"# a list\nads.example\ntracker.example\n"
    with list_server(replying(lambda: body)) as base:
        url = f"{base}/hosts.txt"
        report = policies.add_list(tmp_path, "remote", url=url, fetch=LOOPBACK_FETCH)
        assert report.blocked == 2 and (tmp_path / "lists" / "remote.txt").read_bytes() == body
        body = b"only.example\n"
        assert policies.update_list(tmp_path, "remote", fetch=LOOPBACK_FETCH).blocked == 1
    with pytest.raises(ValueError, match="only http and https"):
        policies.add_list(tmp_path, "f", url="file:///etc/passwd")
    policies.add_rule(tmp_path, f"device:{MAC}", policies.rule_from_target("block", "list:remote"))
    with pytest.raises(ValueError, match=f"used by device:{MAC}: block list=remote"):
        policies.remove_list(tmp_path, "remote")
    policies.remove_rule(tmp_path, f"device:{MAC}", 0)
    policies.remove_list(tmp_path, "remote")
    assert not (tmp_path / "lists" / "remote.txt").exists()
    assert json.loads((tmp_path / "policy.json").read_text())["lists"] == {}


def test_a_slow_list_server_does_not_hold_up_other_policy_changes(tmp_path):
    asked, release = threading.Event(), threading.Event()

    def slow(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.end_headers()
        handler.wfile.write(b"ads.example\n")
        handler.wfile.flush()
        asked.set()
        release.wait(30)
        handler.wfile.write(b"tracker.example\n")

    with list_server(slow) as base:
        added: list[policies.ListReport] = []
        adding = threading.Thread(
            target=lambda: added.append(policies.add_list(tmp_path, "slow", url=f"{base}/l", fetch=LOOPBACK_FETCH)))
        adding.start()
        assert asked.wait(30)
        # While the download is under way, a change from the web UI or MQTT goes through.
        rule = Rule("block", "name", "x.example")
        editing = threading.Thread(target=policies.add_rule, args=(tmp_path, "global", rule))
        editing.start()
        editing.join(20)
        finished_during_download = not editing.is_alive()
        release.set()
        adding.join(30)
        editing.join(30)
    assert finished_during_download
    assert added and added[0].blocked == 2
    data = policies.load(tmp_path)
    assert "slow" in data.lists and [r.value for r in data.policies["global"].rules] == ["x.example"]
    assert sorted(p.name for p in (tmp_path / "lists").iterdir()) == ["slow.txt"]  # no download left behind


def test_a_list_server_that_trickles_is_given_up_at_the_deadline_keeping_the_old_copy(tmp_path):
    body = [b"ads.example\n"]

    def serve(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.end_headers()
        handler.wfile.write(body[0])
        while body[0] == b"":  # a byte at a time, each well within the per-read timeout
            handler.wfile.write(b"#")
            handler.wfile.flush()
            time.sleep(0.05)

    with list_server(serve) as base:
        policies.add_list(tmp_path, "l", url=f"{base}/l", fetch=LOOPBACK_FETCH)
        body[0] = b""
        impatient = functools.partial(lists.fetch, deadline_s=0.5, from_gateway=True)
        with pytest.raises(lists.FetchError, match=rf"{base}/l: not downloaded within 0 s"):
            policies.update_list(tmp_path, "l", fetch=impatient)
    assert (tmp_path / "lists" / "l.txt").read_bytes() == b"ads.example\n"
    assert sorted(p.name for p in (tmp_path / "lists").iterdir()) == ["l.txt"]


def test_a_fetched_page_that_is_no_block_list_is_reported_by_line_and_reason_never_by_its_content(tmp_path):
    """Adding a LAN URL as a list showed the first lines of whatever it answered (a router's status page, a NAS
    share) in the report, to anyone who may add lists. The report names the lines and why they failed."""
    page = [b"<html><title>Router admin</title>\nwifi key: hunter2-secret\n||x.example^$secret-modifier\n"]
    with list_server(replying(lambda: page[0])) as base:
        added = policies.add_list(tmp_path, "nas", url=f"{base}/status", fetch=LOOPBACK_FETCH)
        page[0] = b"ok.example\n<b>other secret</b>\n"
        updated = policies.update_list(tmp_path, "nas", fetch=LOOPBACK_FETCH)
    shown = json.dumps([added.errors, added.summary(), updated.errors, updated.summary()])
    assert not any(word in shown for word in ("Router", "hunter2", "secret", "<b>", "html")), shown
    path = tmp_path / "lists" / "nas.txt"
    assert added.errors == [f"{path}:1: neither a hosts line, a domain nor an adblock rule",
                            f"{path}:2: neither a hosts line, a domain nor an adblock rule",
                            f"{path}:3: unsupported modifier"]
    assert updated.errors == [f"{path}:2: neither a hosts line, a domain nor an adblock rule"]
    assert updated.blocked == 1


def test_a_list_server_that_is_no_web_server_or_fails_is_refused_without_quoting_what_it_answered(tmp_path):
    """A URL at another service's port (SSH, SMTP, a printer) failed with the first line it sent, and an HTTP error
    with the reason phrase the server chose: either showed whoever may add lists what that service answers."""
    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        if handler.path == "/banner":  # as a service that is no web server greets its client
            handler.wfile.write(b"SSH-2.0-OpenSSH_9.2 banner-secret\r\n")
        else:
            handler.send_response(403, "wifi key hunter2-secret")
            handler.end_headers()

    with list_server(answer) as base:
        with pytest.raises(lists.FetchError) as banner:
            policies.add_list(tmp_path, "ssh", url=f"{base}/banner", fetch=LOOPBACK_FETCH)
        with pytest.raises(lists.FetchError) as failed:
            policies.add_list(tmp_path, "admin", url=f"{base}/admin", fetch=LOOPBACK_FETCH)
    assert str(banner.value) == f"{base}/banner: cannot be fetched: the server's answer is not HTTP (BadStatusLine)"
    assert str(failed.value) == f"{base}/admin: cannot be fetched: HTTP Error 403"
    assert policies.load(tmp_path).lists == {} and not list((tmp_path / "lists").iterdir())


def test_a_list_on_loopback_or_link_local_is_refused_before_anything_is_asked(tmp_path):
    """A write token or the owner could make the gateway fetch its own services (the web UI, the daemon's ports)
    or a router's link-local page as a list. The connection is closed before a request is sent."""
    asked: list[str] = []
    with list_server(replying(b"ads.example\n", asked)) as base:
        with pytest.raises(lists.FetchError, match=rf"{base}/l: cannot be fetched: 127.0.0.1 is a loopback address"):
            policies.add_list(tmp_path, "l", url=f"{base}/l")
        localhost = base.replace("127.0.0.1", "localhost")
        with pytest.raises(lists.FetchError, match="is a loopback address"):
            policies.add_list(tmp_path, "l", url=f"{localhost}/l")
    assert asked == []
    assert policies.load(tmp_path).lists == {} and not list((tmp_path / "lists").iterdir())
    for address, what in (("169.254.169.254", "a link-local address"), ("fe80::1%eth0", "a link-local address"),
                          ("::ffff:127.0.0.1", "a loopback address"), ("0.0.0.0", "no host's address")):
        with pytest.raises(lists.RefusedAddress, match=what):
            lists.check_list_server(address)
    lists.check_list_server("192.168.1.10")  # a NAS on the LAN
    lists.check_list_server("fd00::10")


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_list_servers_on_the_gateway_are_refused_also_after_a_redirect_and_a_lan_server_is_not(tmp_path):
    """From the gateway's namespace: a list on a LAN host is fetched; the gateway's own LAN address and loopback
    are refused, directly and when a LAN server redirects there, and the gateway's servers are never asked."""
    from tests.capture_netns import http_server, veth_pair

    asked_on_gateway = []

    gateway_service = replying(b"secret.example\n", asked_on_gateway)
    with (veth_pair(f"ls{os.getpid() % 100000}") as pair,
          http_server(pair, pair.gw, pair.gw_ip4, gateway_service) as own,
          http_server(pair, pair.gw, "127.0.0.1", gateway_service) as loopback):
        def lan(handler: http.server.BaseHTTPRequestHandler) -> None:
            target = {"/to-own": own, "/to-loopback": loopback}.get(handler.path)
            if target:
                handler.send_response(302)
                handler.send_header("Location", f"{target}/list.txt")
                handler.end_headers()
            else:
                handler.send_response(200)
                handler.end_headers()
                handler.wfile.write(b"ads.example\ntracker.example\n")

        with http_server(pair, pair.client, pair.client_ip4, lan) as nas, pair.enter():
            assert policies.add_list(tmp_path, "nas", url=f"{nas}/hosts.txt").blocked == 2
            for url, refused in ((f"{own}/list.txt", f"{pair.gw_ip4} is this gateway's own address"),
                                 (f"{nas}/to-own", f"{pair.gw_ip4} is this gateway's own address"),
                                 (f"{nas}/to-loopback", "127.0.0.1 is a loopback address")):
                with pytest.raises(lists.FetchError, match=f"{url}: cannot be fetched: {refused}"):
                    policies.add_list(tmp_path, "other", url=url)
    assert asked_on_gateway == []
    assert list(policies.load(tmp_path).lists) == ["nas"]


PROXIED_ADD = """
import sys
from gateway import policies
from policy import lists
try:
    policies.add_list(sys.argv[1], "l", url=sys.argv[2])
    print("added")
except lists.FetchError as exc:
    print(exc)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_a_list_fetch_ignores_proxy_variables_so_the_gateways_own_address_stays_refused(tmp_path):
    """With http_proxy set in the daemon's environment the fetch went to the proxy, and only the proxy's (LAN)
    address was checked: a proxy on the LAN handed over a list from the gateway's own address. Fetches now ignore
    proxy variables, so the list's own host is the one connected to and checked."""
    import subprocess
    import sys

    from tests.capture_netns import http_server, veth_pair

    asked_on_gateway, asked_proxy = [], []

    gateway_service = replying(b"secret.example\n", asked_on_gateway)
    proxy = replying(b"secret.example\n", asked_proxy)  # answers as if it fetched the URL it was given
    with (veth_pair(f"lp{os.getpid() % 100000}") as pair,
          http_server(pair, pair.gw, pair.gw_ip4, gateway_service) as own,
          http_server(pair, pair.client, pair.client_ip4, proxy) as lan_proxy):
        env = {**os.environ, "http_proxy": lan_proxy, "https_proxy": lan_proxy, "HTTP_PROXY": lan_proxy,
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        env.pop("no_proxy", None), env.pop("NO_PROXY", None)
        said = subprocess.run(["ip", "netns", "exec", pair.gw, sys.executable, "-c", PROXIED_ADD, str(tmp_path),
                               f"{own}/list.txt"], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert said.stdout.startswith(f"{own}/list.txt: cannot be fetched: {pair.gw_ip4} is this gateway's own address")
    assert asked_proxy == [] and asked_on_gateway == []
    assert policies.load(tmp_path).lists == {}


def test_an_unreachable_or_failing_list_server_is_a_clear_refusal(tmp_path):
    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        if handler.path == "/ftp":  # a redirect off http(s) is not followed
            handler.send_response(302)
            handler.send_header("Location", "ftp://127.0.0.1/list.txt")
            handler.end_headers()
        else:
            handler.send_error(404)

    with list_server(answer) as base:
        with pytest.raises(lists.FetchError, match=rf"{base}/gone: cannot be fetched: HTTP Error 404"):
            policies.add_list(tmp_path, "gone", url=f"{base}/gone", fetch=LOOPBACK_FETCH)
        with pytest.raises(lists.FetchError, match=rf"{base}/ftp: cannot be fetched: HTTP Error 302"):
            policies.add_list(tmp_path, "ftp", url=f"{base}/ftp", fetch=LOOPBACK_FETCH)
        port = int(base.rsplit(":", 1)[1])
    with pytest.raises(lists.FetchError, match=r"cannot be fetched: \[Errno 111\] Connection refused"):
        policies.add_list(tmp_path, "down", url=f"http://127.0.0.1:{port}/l", fetch=LOOPBACK_FETCH)
    assert policies.load(tmp_path).lists == {}
    assert not list((tmp_path / "lists").iterdir())
    with pytest.raises(ValueError, match="list id"):  # refused before anything is downloaded
        policies.add_list(tmp_path, "a/b", url=f"http://127.0.0.1:{port}/l")


def _edit_as(state_dir: Path, uid: int, gid: int) -> None:
    """In a forked child: become the service user, then change the policy and refresh its URL list."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    policies.add_rule(state_dir, "global", Rule("block", "name", "service.example"))
    policies.update_list(state_dir, "ads", fetch=LOOPBACK_FETCH)


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a file to another user needs root")
def test_policy_changes_made_as_root_stay_usable_by_the_state_directorys_owner():
    """`sudo iotgw policy ...`: every file it makes belongs to the service user, which owns the state directory,
    so the daemon still loads the policy and the CLI, run as that user, can still change it."""
    # Not pytest's tmp_path: its parents are root's 0700, which the service user could not pass through.
    with tempfile.TemporaryDirectory() as top, list_server(replying(b"ads.example\n")) as base:
        os.chmod(top, 0o711)  # noqa: S103 - only passed through, to reach the state directory
        state = Path(top) / "state"
        state.mkdir(mode=0o750)
        os.chown(state, 4242, 4243)
        policies.add_rule(state, "global", Rule("block", "name", "root.example"))
        policies.add_list(state, "ads", url=f"{base}/ads.txt", fetch=LOOPBACK_FETCH)
        made = [state / "policy.json", state / ".policy.lock", state / "lists", state / "lists" / "ads.txt"]
        assert {p.name: (p.stat().st_uid, p.stat().st_gid) for p in made} == dict.fromkeys(
            (p.name for p in made), (4242, 4243))
        assert {stat.S_IMODE(p.stat().st_mode) for p in made if p.is_file()} == {0o600}
        child = multiprocessing.get_context("fork").Process(target=_edit_as, args=(state, 4242, 4243))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        data = policies.load(state)
    assert [r.value for r in data.policies["global"].rules] == ["root.example", "service.example"]


def test_schedules_and_overview(tmp_path):
    policies.set_schedule(tmp_path, "night", "Europe/Berlin", ["mon=21:00-24:00", "tue=00:00-07:00"])
    with pytest.raises(ValueError, match="unknown time zone"):
        policies.set_schedule(tmp_path, "x", "Mars/Olympus", [])
    with pytest.raises(ValueError, match="'funday=1:00-2:00': the day is one of"):
        policies.set_schedule(tmp_path, "x", "UTC", ["funday=1:00-2:00"])
    policies.add_rule(tmp_path, "tag:device_tv", policies.rule_from_target("block", "all", "night"))
    with pytest.raises(ValueError, match="schedule night is used by tag:device_tv"):
        policies.remove_schedule(tmp_path, "night")
    view = policies.overview(policies.load(tmp_path))
    assert view["schedules"] == {
        "night": {"time_zone": "Europe/Berlin", "days": {"mon": "21:00-24:00", "tue": "00:00-07:00"}}
    }
    assert [p["scope"] for p in view["policies"]] == ["global", "tag:device_tv"]


def test_a_list_added_again_while_it_is_removed_keeps_its_new_file(tmp_path, monkeypatch):
    """``remove_list`` deleted a fetched list's file after letting the policy lock go: an ``add_list`` of the same id
    (another process) that took the lock in that moment had its new file deleted, and the policy named a list
    that was not there (blocking nothing). The file is now deleted before the lock is let go."""
    import fcntl

    body = b"ads.example\n"

    def add_again(url: str) -> None:
        policies.add_list(tmp_path, "remote", url=url, fetch=LOOPBACK_FETCH)

    real_flock, armed = fcntl.flock, threading.Event()

    def flock(fd, operation: int) -> None:  # noqa: ANN001
        real_flock(fd, operation)
        # The one interleaving that loses the file, made certain (the real window is a few microseconds): the
        # moment remove_list lets the lock go, another process adds the list again and is done.
        if operation == fcntl.LOCK_UN and armed.is_set():
            armed.clear()
            proc = multiprocessing.get_context("fork").Process(target=add_again, args=(url,))
            proc.start()
            proc.join(60)
            assert proc.exitcode == 0

    with list_server(replying(body)) as base:
        url = f"{base}/hosts.txt"
        policies.add_list(tmp_path, "remote", url=url, fetch=LOOPBACK_FETCH)
        monkeypatch.setattr(fcntl, "flock", flock)
        armed.set()
        policies.remove_list(tmp_path, "remote")
        assert not armed.is_set()  # the other process ran
    monkeypatch.undo()
    assert policies.load(tmp_path).lists["remote"].url == url
    assert (tmp_path / "lists" / "remote.txt").read_bytes() == body
    policies.add_rule(tmp_path, "global", policies.rule_from_target("block", "list:remote"))
    assert policies.decide(tmp_path, MAC, "x.ads.example")[0].action == "blocked"
