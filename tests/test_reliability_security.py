"""Security under hostile use: the resolver's LAN boundary and per-client rate limit with several real clients
at once (loopback addresses 127.0.0.2 and 127.0.0.3), secrets files private, and secrets absent from every log
the real processes write while those secrets are used, mistyped and created."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import socket
import stat
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import dns.message
import dns.query
import pytest

from gateway.dns import server as server_module
from gateway.store.db import Store
from identifier.federated import processes
from tests.dns_helpers import config, needs_dnsmasq, rcode, running
from tests.fake_upstream import FakeUpstream, answer
from tests.ports import free_port
from webui.app import SECRET_KEY_FILE, load_secret_key

ROOT = Path(__file__).resolve().parents[1]
LAN_CLIENT, OUTSIDER = "127.0.0.2", "127.0.0.3"


def ask_from(source: str, port: int, name: str, *, tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    if tcp:
        return dns.query.tcp(query, "127.0.0.1", port=port, source=source, timeout=3)
    return dns.query.udp(query, "127.0.0.1", port=port, source=source, timeout=3)


def test_only_lan_clients_are_served_and_an_outsider_reaches_no_upstream() -> None:
    with FakeUpstream(answer("192.0.2.10")) as up, \
            running(config([up.address], lan=[f"{LAN_CLIENT}/32"], cache_size=0)) as srv:
        for tcp in (False, True):
            assert rcode(ask_from(LAN_CLIENT, srv.port, "www.example.test", tcp=tcp)) == "NOERROR"
        for outsider in (OUTSIDER, "127.0.0.1"):
            assert rcode(ask_from(outsider, srv.port, "www.example.test")) == "REFUSED"
            # over TCP an outsider is closed on at accept, before it can take one of the connection slots
            with pytest.raises((EOFError, ConnectionError)):
                ask_from(outsider, srv.port, "www.example.test", tcp=True)
        assert srv.counters.get("dns_refused") == 2 and srv.counters.get("dns_tcp_refused") == 2
        assert up.queries == 2  # the LAN client's two; a refused query costs the upstream nothing
    by_client = {(e.client, e.verdict) for e in srv.events}
    assert by_client == {(LAN_CLIENT, "allowed"), (OUTSIDER, "refused"), ("127.0.0.1", "refused")}


@needs_dnsmasq
def test_rate_limit_holds_under_a_flood_while_another_client_is_served(upstream) -> None:
    limit, flood = 100, 1500
    with running(config([upstream.address], rate_limit_per_minute=limit)) as srv:
        flooder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        flooder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        flooder.bind((LAN_CLIENT, 0))
        flooder.settimeout(3)
        other: list[str] = []
        with flooder:
            for i in range(flood):
                flooder.sendto(dns.message.make_query(f"f{i}.example.test", "A").to_wire(), ("127.0.0.1", srv.port))
                if i % 100 == 50:  # the neighbour keeps asking in the middle of the flood
                    other.append(rcode(ask_from(OUTSIDER, srv.port, "www.example.test", tcp=i % 200 == 50)))
            codes: dict[str, int] = {}
            for _ in range(flood):
                code = rcode(dns.message.from_wire(flooder.recv(4096)))
                codes[code] = codes.get(code, 0) + 1
        assert other == ["NOERROR"] * (flood // 100)
        assert codes == {"NXDOMAIN": limit, "REFUSED": flood - limit}
        assert srv.counters.get("dns_ratelimited") == flood - limit


def test_secret_files_are_private_even_where_a_readable_file_was(tmp_path: Path) -> None:
    key = tmp_path / "node_key"
    key.write_text("old")
    key.chmod(0o644)
    processes.generate_node_key(key)  # a new key over an old, readable file
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes()

    session_key = tmp_path / SECRET_KEY_FILE
    session_key.write_bytes(b"k" * 32)
    session_key.chmod(0o644)
    assert load_secret_key(tmp_path) == b"k" * 32
    assert stat.S_IMODE(session_key.stat().st_mode) == 0o600

    store = Store(f"sqlite:///{tmp_path / 'iotgw.sqlite'}")  # password hashes, token digests, query log
    try:
        with store.transaction() as s:
            s.execute(store_write_probe())
        files = [p for p in tmp_path.glob("iotgw*.sqlite*")]
        assert {p.name for p in files} >= {"iotgw.sqlite", "iotgw-querylog.sqlite", "iotgw.sqlite-wal"}
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == dict.fromkeys(
            (p.name for p in files), 0o600)
    finally:
        store.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a file to another user needs root")
def test_a_store_created_by_root_belongs_to_the_state_directorys_owner(tmp_path: Path) -> None:
    """`sudo iotgw user set-password` before the service ever ran must not lock the service user out."""
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 4242, 4243)  # the service user's state directory
    store = Store(f"sqlite:///{state / 'iotgw.sqlite'}")
    try:
        with store.transaction() as s:
            s.execute(store_write_probe())
        files = list(state.glob("iotgw*.sqlite*"))
        assert {p.name for p in files} >= {"iotgw.sqlite", "iotgw-querylog.sqlite", "iotgw.sqlite-wal"}
        assert {(p.stat().st_uid, p.stat().st_gid) for p in files} == {(4242, 4243)}
    finally:
        store.close()


def store_write_probe():  # noqa: ANN201 - a statement that makes SQLite open its WAL file
    from sqlalchemy import text
    return text("CREATE TABLE IF NOT EXISTS probe (x INTEGER)")


PASSWORD = "secret-horse-battery-42"  # noqa: S105 - the test account's
TYPO = "secret-horse-battery-43"  # noqa: S105 - a mistyped password is usually the real one, one key off


def cli(args: list[str], log: Path, stdin: str | None = None) -> str:
    """``iotgw -v ...`` (debug logging); stderr, where logs go, is appended to ``log``; stdout is returned."""
    with log.open("a") as err:
        out = subprocess.run([sys.executable, "-m", "gateway.cli", "-v", *args], input=stdin, text=True,
                             stdout=subprocess.PIPE, stderr=err, cwd=ROOT, timeout=120, check=True)
    return out.stdout


def test_secrets_never_reach_the_logs(tmp_path: Path) -> None:
    log = tmp_path / "all.log"
    db = f"sqlite:///{tmp_path / 'iotgw.sqlite'}"
    cli(["user", "set-password", "--db", db], log, stdin=PASSWORD + "\n")
    cli_token = cli(["user", "token", "create", "scripts", "--scope", "write", "--db", db], log).strip()
    assert cli_token  # printed once on stdout for the owner to copy, which is not a log
    cli(["federation", "keygen", "--out", str(tmp_path / "node_key")], log)
    port = free_port()
    web_log = tmp_path / "web.log"
    with web_log.open("w") as out:
        web = subprocess.Popen([sys.executable, "-m", "gateway.cli", "-v", "web", "--db", db, "--state-dir",
                                str(tmp_path), "--listen", f"127.0.0.1:{port}"], stdout=out,
                               stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        base = f"http://127.0.0.1:{port}"
        jar = http.cookiejar.CookieJar()
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        login_page = wait_for(browser, f"{base}/login", web)
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', login_page).group(1)  # type: ignore[union-attr]
        with pytest.raises(urllib.error.HTTPError) as failed:
            post(browser, f"{base}/login", {"username": "admin", "password": TYPO, "csrf_token": csrf})
        assert failed.value.code == 401
        landed = post(browser, f"{base}/login", {"username": "admin", "password": PASSWORD, "csrf_token": csrf})
        assert "/login" not in landed.geturl()
        cookies = {c.name: c.value for c in jar}
        session_cookie, device_cookie = cookies["iotgw_session"], cookies["iotgw_device"]
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', landed.read().decode()).group(1)  # type: ignore[union-attr]
        body = json.dumps({"name": "ha", "scope": "read"}).encode()
        create = urllib.request.Request(f"{base}/api/v1/tokens", data=body,
                                        headers={"X-CSRF-Token": csrf, "Content-Type": "application/json"},
                                        method="POST")
        api_token = json.loads(browser.open(create, timeout=10).read())["token"]
        writes = urllib.request.Request(f"{base}/api/v1/tokens", headers={"Authorization": f"Bearer {cli_token}"})
        with pytest.raises(urllib.error.HTTPError) as session_only:  # token management needs the login session
            urllib.request.urlopen(writes, timeout=10)  # noqa: S310 - loopback
        assert session_only.value.code == 403
        reads = urllib.request.Request(f"{base}/api/v1/devices", headers={"Authorization": f"Bearer {api_token}"})
        assert urllib.request.urlopen(reads, timeout=10).status == 200  # noqa: S310 - loopback
        wrong = urllib.request.Request(f"{base}/api/v1/devices", headers={"Authorization": f"Bearer {api_token}x"})
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(wrong, timeout=10)  # noqa: S310 - loopback
        assert denied.value.code == 401
    finally:
        web.terminate()
        web.wait(10)
    logs = log.read_text() + web_log.read_text()
    assert "DEBUG" in logs or "INFO" in logs  # the processes did log: this check looks at something
    session_key = (tmp_path / SECRET_KEY_FILE).read_bytes()
    private_key = (tmp_path / "node_key").read_text()
    secrets = {
        "password": PASSWORD, "mistyped password": TYPO, "CLI token": cli_token, "API token": api_token,
        "wrong token": api_token + "x", "session cookie": session_cookie,
        "device cookie": device_cookie, "session key (hex)": session_key.hex(),
        "node private key": "".join(private_key.splitlines()[1:3]),
    }
    for what, secret in secrets.items():
        assert secret not in logs, f"{what} appears in the logs"
    for line in private_key.splitlines()[1:-1]:
        assert line not in logs, "a line of the node's private key appears in the logs"


def wait_for(opener: urllib.request.OpenerDirector, url: str, proc: subprocess.Popen) -> str:
    deadline = time.monotonic() + 60
    while True:
        try:
            return opener.open(url, timeout=5).read().decode()
        except OSError:
            assert proc.poll() is None, "iotgw web exited"
            assert time.monotonic() < deadline, "iotgw web did not start listening"
            time.sleep(0.2)


def post(opener: urllib.request.OpenerDirector, url: str, fields: dict[str, str]):  # noqa: ANN201
    return opener.open(urllib.request.Request(url, data=urllib.parse.urlencode(fields).encode()), timeout=10)


def test_idle_tcp_connections_cannot_starve_the_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client holding open many silent TCP connections uses up only the TCP slots: UDP clients are still
    answered, the connection over the cap is closed at once, and a slot frees when an idle one goes."""
    monkeypatch.setattr(server_module, "MAX_TCP_CLIENTS", 5)
    with FakeUpstream(answer("192.0.2.10")) as up, running(config([up.address])) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=3, source_address=(OUTSIDER, 0))
                for _ in range(5)]
        try:
            time.sleep(0.2)  # let the server accept them
            assert rcode(ask_from(LAN_CLIENT, srv.port, "www.example.test")) == "NOERROR"
            with socket.create_connection(("127.0.0.1", srv.port), timeout=3) as extra:
                assert extra.recv(10) == b""  # closed without a word
            assert srv.counters.get("dns_tcp_rejected") == 1
            idle.pop().close()
            deadline = time.monotonic() + 5
            while True:  # the server sees the hang-up on its next turn
                try:
                    assert rcode(ask_from(LAN_CLIENT, srv.port, "www.example.test", tcp=True)) == "NOERROR"
                    break
                except (EOFError, ConnectionError):
                    assert time.monotonic() < deadline, "the freed TCP slot was never reused"
                    time.sleep(0.1)
        finally:
            for conn in idle:
                conn.close()


def test_a_tcp_client_that_never_reads_its_answers_loses_its_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pipelined queries whose answers the client never reads fill the socket buffers; the server's write then
    waits. Before, it waited for good, so a few such clients held every TCP slot."""
    monkeypatch.setattr(server_module, "MAX_TCP_CLIENTS", 1)
    monkeypatch.setattr(server_module, "TCP_IDLE_S", 0.5)
    big = server_module.Decision("blocked", "test", b"\0\0\x81\x80" + b"\0" * 60000)  # 60 kB an answer

    def decide(client, mac, qname, qtype, query):  # noqa: ANN001, ANN202
        return big if qname == "big.example.test" else None

    with FakeUpstream(answer("192.0.2.10")) as up, running(config([up.address]), decide=decide) as srv:
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", srv.port))
        try:
            query = dns.message.make_query("big.example.test", "A").to_wire()
            # 300 answers, 18 MB: more than the kernel's buffers on both ends and asyncio's take
            stuck.sendall((len(query).to_bytes(2, "big") + query) * 300)
            deadline = time.monotonic() + 30
            while True:
                try:
                    assert rcode(ask_from(LAN_CLIENT, srv.port, "www.example.test", tcp=True)) == "NOERROR"
                    break
                except (EOFError, ConnectionError):
                    assert time.monotonic() < deadline, "the client that never reads kept the only TCP slot"
                    time.sleep(0.2)
            assert srv.counters.get("dns_tcp_stalled") == 1
        finally:
            stuck.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="forging a UDP source port takes a raw socket (root)")
def test_a_udp_query_from_port_0_is_dropped_without_asking_the_upstream() -> None:
    """No answer can reach port 0: before, the forged query was forwarded and logged as a LAN client's."""
    with FakeUpstream(answer("192.0.2.10")) as up, running(config([up.address])) as srv:
        query = dns.message.make_query("port0.example.test", "A").to_wire()
        udp = struct.pack("!4H", 0, srv.port, 8 + len(query), 0) + query  # checksum 0: none, valid for IPv4
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                         socket.inet_aton(LAN_CLIENT), socket.inet_aton("127.0.0.1"))
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
            raw.sendto(ip + udp, ("127.0.0.1", 0))
        # A query after it on the same socket is read after it: once it is answered, the forged one was read.
        assert rcode(ask_from(LAN_CLIENT, srv.port, "www.example.test")) == "NOERROR"
        assert srv.counters.get("dns_port_zero") == 1 and up.queries == 1
    assert [e.qname for e in srv.events] == ["www.example.test"]


def test_one_host_holding_idle_tcp_connections_leaves_slots_for_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, one LAN host opening MAX_TCP_CLIENTS idle connections (and opening them again as they timed out)
    shut every other host out of DNS over TCP."""
    monkeypatch.setattr(server_module, "MAX_TCP_CLIENTS", 5)
    monkeypatch.setattr(server_module, "MAX_TCP_PER_CLIENT", 2, raising=False)  # old code fails below instead
    with FakeUpstream(answer("192.0.2.10")) as up, running(config([up.address])) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=3, source_address=(OUTSIDER, 0))  # LAN here
                for _ in range(5)]
        try:
            for conn in idle[2:]:
                assert conn.recv(10) == b""  # over its share: closed at once
            assert rcode(ask_from(LAN_CLIENT, srv.port, "www.example.test", tcp=True)) == "NOERROR"
            assert srv.counters.get("dns_tcp_rejected") == 3
        finally:
            for conn in idle:
                conn.close()
