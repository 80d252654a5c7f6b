"""``iotgw demo``, the README's first command: a real process, no root, no ../shared, no config."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from gateway.devices.service import list_devices
from gateway.store.db import Store
from tests.ports import free_port


def test_demo_devices_appear_get_identified_and_the_ui_asks_for_login(tmp_path):
    web_port, dns_port = free_port(), free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--duration", "35", "--state-dir", str(tmp_path),
         "--web-port", str(web_port), "--dns-port", str(dns_port), "--devices", "4"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,  # cwd: nothing of the checkout is needed
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"open (http://127\.0\.0\.1:\d+/) and log in as admin / (\S+)", proc.stdout)
    assert m, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    devices = list_devices(Store(f"sqlite:///{tmp_path / 'iotgw.sqlite'}", migrate=False))
    assert len(devices) >= 3 and all(not d.mac.startswith("ip:") for d in devices)
    identified = [d for d in devices if d.device_type and d.known]
    assert identified, [(d.mac, d.device_type) for d in devices]
    assert all(0 < d.confidence <= 1 and d.decided_after_s is not None for d in identified)


def test_demo_web_ui_needs_login(tmp_path):
    web_port, dns_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "demo", "--duration", "20", "--state-dir", str(tmp_path),
         "--web-port", str(web_port), "--dns-port", str(dns_port), "--devices", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "log in as admin" in line, line + proc.stderr.read()
        req = urllib.request.Request(f"http://127.0.0.1:{web_port}/api/v1/devices")
        try:
            urllib.request.urlopen(req, timeout=10)
            raise AssertionError("the API answered without a login")
        except urllib.error.HTTPError as exc:
            assert exc.code in (401, 403)
    finally:
        proc.terminate()
        proc.wait(30)


def demo_env(tmp_path: Path) -> dict[str, str]:
    """The demo's environment, its temporary directory under ``tmp_path`` so the test sees what it leaves."""
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TMPDIR": str(tmp_path)}


@pytest.mark.parametrize("busy", ["web", "dns"])
def test_demo_on_a_port_in_use_says_which_and_leaves_nothing_behind(tmp_path, busy):
    web_port, dns_port = free_port(), free_port()
    kind = socket.SOCK_STREAM if busy == "web" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as holder:  # another program has the port
        holder.bind(("127.0.0.1", web_port if busy == "web" else dns_port))
        if busy == "web":
            holder.listen()
        proc = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "demo", "--duration", "5", "--web-port", str(web_port),
             "--dns-port", str(dns_port), "--devices", "1"],
            capture_output=True, text=True, timeout=120, cwd=tmp_path, env=demo_env(tmp_path))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    busy_port = web_port if busy == "web" else dns_port
    assert f"cannot listen on 127.0.0.1:{busy_port}" in proc.stderr and "--web-port" in proc.stderr, proc.stderr
    assert not list(tmp_path.glob("iotgw-demo-*")), "the temporary state directory was left behind"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_ended_by_ctrl_c_or_sigterm_exits_cleanly_and_removes_its_temporary_state(tmp_path, sig):
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "demo", "--web-port", str(free_port()), "--dns-port", str(free_port()),
         "--devices", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=demo_env(tmp_path))
    try:
        line = proc.stdout.readline()
        assert "log in as admin" in line, line + proc.stderr.read()
        assert list(tmp_path.glob("iotgw-demo-*"))
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert not list(tmp_path.glob("iotgw-demo-*")), "the temporary state directory was left behind"


@pytest.mark.parametrize(("flag", "value", "said"), [("--devices", "-1", "must be above 0"),
                                                     ("--devices", "246", "at most 245, one loopback address each"),
                                                     ("--dns-port", "70000", "is not a port"),
                                                     ("--duration", "-5", "0 or more"),
                                                     ("--duration", "nan", "0 or more")])
def test_demo_with_a_bad_option_says_which_and_starts_nothing(tmp_path, flag, value, said):
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "demo", flag, value, "--duration", "5"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, env=demo_env(tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]  # argparse's usage error
    assert f"argument {flag}: " in proc.stderr and said in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("iotgw-demo-*"))


def test_demo_with_a_state_dir_that_is_a_file_says_so_and_starts_nothing(tmp_path):
    """It failed as "[Errno 17] File exists: 'X'", naming neither the flag nor what is wrong with it."""
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("a file\n")
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "demo", "--state-dir", str(not_a_dir), "--duration",
                           "5", "--web-port", str(free_port()), "--dns-port", str(free_port())],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, env=demo_env(tmp_path))
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f"iotgw: configuration error: --state-dir: {not_a_dir} is not a directory"]


def test_devices_command_the_demo_prints_after_it_ended_says_there_is_no_database_and_creates_nothing(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--duration", "3", "--web-port", str(free_port()),
         "--dns-port", str(free_port()), "--devices", "1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=demo_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"iotgw devices --db (\S+)", proc.stdout)
    assert m, proc.stdout
    assert not list(tmp_path.glob("iotgw-demo-*"))
    for command in ("devices", "queries"):  # run as the demo said, once it has ended
        shown = subprocess.run([sys.executable, "-m", "gateway.cli", command, "--db", m.group(1)],
                               capture_output=True, text=True, timeout=60, cwd=tmp_path, env=demo_env(tmp_path))
        assert shown.returncode == 1 and "no database at" in shown.stderr, shown.stderr[-2000:]
        assert "Traceback" not in shown.stderr
        assert not list(tmp_path.glob("iotgw-demo-*")), "reading the ended demo's database recreated its directory"


def test_demo_with_a_malformed_mqtt_url_says_so_and_starts_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "demo", "--mqtt", "bogus://broker", "--duration", "5",
                           "--web-port", str(free_port()), "--dns-port", str(free_port())],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, env=demo_env(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--mqtt: MQTT URL 'bogus://broker': scheme must be mqtt:// or mqtts://" in proc.stderr, proc.stderr
    assert "log in as admin" not in proc.stdout and not list(tmp_path.glob("iotgw-demo-*"))


@pytest.mark.parametrize("unbuffered", ["", "1"])
@pytest.mark.parametrize("as_json", [[], ["--json"]])
def test_device_list_piped_to_a_reader_that_left_ends_without_a_traceback(tmp_path, as_json, unbuffered):
    db = f"sqlite:///{tmp_path / 'iotgw.sqlite'}"
    Store(db).close()
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `| head` does once it has its lines; here before the first one is written
    try:
        proc = subprocess.run([sys.executable, "-m", "gateway.cli", "devices", "--db", db, *as_json],
                              stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60, cwd=tmp_path,
                              env={**demo_env(tmp_path), "PYTHONUNBUFFERED": unbuffered})
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 1


def test_demo_asked_for_more_devices_than_device_types_runs_that_many(tmp_path):
    # The model knows 51 types; --devices 60 ran 51 devices, one of each, and said 51 without a word of why.
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--duration", "3", "--web-port", str(free_port()),
         "--dns-port", str(free_port()), "--devices", "60"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=demo_env(tmp_path))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "60 virtual devices join over the next 240 s" in proc.stdout, proc.stdout


@pytest.fixture
def demo_gateway(tmp_path):
    """A gateway with the shipped model, as the demo builds its virtual devices from."""
    from gateway.config import Config
    from gateway.daemon import Gateway

    cfg = Config(source="(test)")
    cfg.gateway.state_dir = str(tmp_path)
    store = Store(cfg.db_url)
    try:
        yield Gateway(cfg, store)
    finally:
        store.close()


def test_virtual_devices_past_one_of_each_type_are_second_units_with_their_own_mac_address_and_name(demo_gateway):
    from gateway.demo import MAX_DEVICES, virtual_devices

    types = sorted(demo_gateway.identifier.prototypes())
    devices = virtual_devices(demo_gateway, len(types) + 9)
    few = virtual_devices(demo_gateway, 6)
    with pytest.raises(ValueError, match=f"room for 1 to {MAX_DEVICES} devices, not {MAX_DEVICES + 1}"):
        virtual_devices(demo_gateway, MAX_DEVICES + 1)
    most = virtual_devices(demo_gateway, MAX_DEVICES)
    firsts, seconds = devices[:len(types)], devices[len(types):]
    assert sorted(d.name for d in firsts) == types  # one of each type first
    assert [d.name for d in seconds] == [f"{d.name}-2" for d in firsts[:9]]
    assert [d.script for d in seconds] == [d.script for d in firsts[:9]]
    for second, first in zip(seconds, firsts, strict=False):  # the same maker's prefix, a unit of its own
        assert second.mac[:8] == first.mac[:8] and second.mac != first.mac
    assert few == devices[:6]  # asking for more adds devices to the same ones
    assert len({d.mac for d in most}) == len({d.ip for d in most}) == len({d.name for d in most}) == MAX_DEVICES
    assert most[-1].ip == "127.0.0.254"


def test_a_second_unit_announces_its_own_mdns_host_name_not_the_first_units(demo_gateway):
    # Two hosts claiming one .local name on a link is a conflict a real responder resolves by renaming itself
    # "name-2" (RFC 6762, 9); the second unit announced the first's names at its own address.
    from gateway.capture.frames import parse_frame
    from gateway.demo import build_frame, virtual_devices
    from gateway.events import MdnsSeen
    from identifier.observation import MdnsObservation

    types = len(demo_gateway.identifier.prototypes())
    devices = virtual_devices(demo_gateway, 2 * types)

    def hosts(device) -> list[str]:
        names = []
        for obs in device.script:
            if isinstance(obs, MdnsObservation) and (frame := build_frame(device, obs)) is not None:
                names += [n for e in parse_frame(frame, 0.0) if isinstance(e, MdnsSeen) for n in e.names
                          if "._" not in n]
        return sorted(set(names))

    announcing = [(first, second) for first, second in zip(devices[:types], devices[types:], strict=True)
                  if hosts(first)]
    assert len(announcing) >= 3  # HueBridge, Lightify, EdimaxCam...
    for first, second in announcing:
        assert hosts(second) == [f"{name.removesuffix('.local')}-2.local" for name in hosts(first)], first.name


def test_a_virtual_devices_mdns_announcement_reads_back_as_its_prototypes_names_and_services(demo_gateway):
    # The demo announced each service under the type's name ("D-LinkSensor._http._tcp.local"): the real device's
    # instance names ("D-Link DCH-S150 Configuration Utility") were lost, and with them what tells a D-Link sensor
    # from its siren, so the demo's sensor came out an unknown siren.
    from gateway.capture.frames import parse_frame
    from gateway.demo import build_frame, virtual_devices
    from gateway.events import MdnsSeen
    from identifier.observation import MdnsObservation

    checked = 0
    for device in virtual_devices(demo_gateway, len(demo_gateway.identifier.prototypes())):
        for obs in device.script:
            if not isinstance(obs, MdnsObservation) or (frame := build_frame(device, obs)) is None:
                continue
            (seen,) = [e for e in parse_frame(frame, obs.ts) if isinstance(e, MdnsSeen)]
            assert (set(seen.names), set(seen.services)) == (set(obs.names), set(obs.services)), device.name
            checked += 1
    assert checked >= 10
