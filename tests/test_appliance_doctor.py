"""``iotgw doctor`` against a good setup and broken ones: a port taken by a socket the test binds,
systemd-resolved's stub address, an unusable database, a bad config file, missing capabilities, a missing or
down interface, a broker that is there or not. Every run is a real process reading a real config file."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from gateway.config import Config
from gateway.doctor import check_broker, check_capabilities, check_clock, check_link_local
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, port: int, extra: str = "", listen: str | None = None) -> Path:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    path = tmp_path / "iotgw.toml"
    path.write_text(
        f'[gateway]\nstate_dir = "{state}"\n'
        f'[dns]\nlisten = ["{listen or f"127.0.0.1:{port}"}"]\n'
        "[capture]\nsniff = false\n" + extra
    )
    return path


def doctor(config: Path, *flags: str, prefix: tuple[str, ...] = ()) -> tuple[int, dict[str, dict], str]:
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "gateway.cli", "doctor", "--config", str(config), "--json", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    findings = {f["check"]: f for f in json.loads(proc.stdout)} if proc.stdout.strip() else {}
    return proc.returncode, findings, proc.stderr


def test_good_setup_passes(tmp_path: Path) -> None:
    code, findings, err = doctor(write_config(tmp_path, free_port()))
    assert code == 0, (findings, err)
    assert findings["dns-port"]["status"] == "ok" and "free" in findings["dns-port"]["detail"]
    assert findings["database"]["status"] == "ok"
    assert (tmp_path / "state" / "iotgw.sqlite").exists()  # opened and migrated for real
    assert findings["broker"]["status"] == "skip" and findings["interface"]["status"] == "skip"
    assert all(f["status"] != "fail" for f in findings.values())


def test_devices_the_daemon_could_not_keep_are_a_warning_that_names_the_setting(tmp_path: Path) -> None:
    from gateway.overview import UNTRACKED_SETTING
    from gateway.store.db import Store

    config = write_config(tmp_path, free_port(), "[devices]\nmax = 50\n")
    _, findings, err = doctor(config)
    assert findings["devices"]["status"] == "ok", (findings, err)
    store = Store(f"sqlite:///{tmp_path / 'state' / 'iotgw.sqlite'}")
    store.set_setting(UNTRACKED_SETTING, "37")  # as the daemon writes it at a flush
    store.close()
    code, findings, err = doctor(config)
    devices = findings["devices"]
    assert code == 0 and devices["status"] == "warn", (findings, err)
    assert "37 new devices were not kept" in devices["detail"] and "max = 50" in devices["detail"]
    assert "[devices] max" in devices["fix"]


def test_text_output_names_the_fix(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", port))
        proc = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "doctor", "--config", str(write_config(tmp_path, port))],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
    assert proc.returncode == 1
    line = next(x for x in proc.stdout.splitlines() if x.startswith("FAIL"))
    assert "dns-port" in line and f"port {port} is taken" in line
    assert "fix: " in proc.stdout


def test_port_taken_by_another_process_names_it(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", port))
        code, findings, _ = doctor(write_config(tmp_path, port))
    assert code == 1
    port_check = findings["dns-port"]
    assert port_check["status"] == "fail"
    assert f"pid {os.getpid()}" in port_check["detail"]  # the owner is found, not guessed
    assert "ss -lunp" in port_check["fix"]


def test_systemd_resolved_stub_listener_gets_its_own_fix(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stub:
        try:
            stub.bind(("127.0.0.53", port))  # where systemd-resolved listens
        except OSError as exc:
            pytest.skip(f"cannot bind 127.0.0.53 here: {exc}")
        code, findings, _ = doctor(write_config(tmp_path, port, listen=f"0.0.0.0:{port}"))
    assert code == 1
    assert "systemd-resolved" in findings["dns-port"]["detail"]
    assert "DNSStubListener=no" in findings["dns-port"]["fix"]


def test_database_path_that_is_not_a_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be\n")
    cfg = write_config(
        tmp_path, free_port(), extra=f'[store]\nurl = "sqlite:///{blocker}/sub/iotgw.sqlite"\n'
    )
    code, findings, _ = doctor(cfg)
    assert code == 1
    assert findings["database"]["status"] == "fail"
    assert "install -d -o iotgw" in findings["database"]["fix"]


def test_state_directory_that_is_a_file_is_one_failed_check_and_the_others_still_run(tmp_path: Path) -> None:
    """It was a configuration error that stopped doctor at its first line: the one finding was "config", and the
    port, capabilities, broker, model and clock went unchecked."""
    config = write_config(tmp_path, free_port())
    state = tmp_path / "state"
    state.rmdir()
    state.write_text("a file where the state directory should be\n")
    code, findings, err = doctor(config)
    assert code == 1, (findings, err)
    assert "config" not in findings
    assert findings["state-dir"]["status"] == "fail"
    assert findings["state-dir"]["detail"] == f"{config}: gateway.state_dir: {state} is not a directory"
    assert "move the file aside" in findings["state-dir"]["fix"]
    assert findings["database"]["status"] == "skip" and "(see state-dir)" in findings["database"]["detail"]
    assert {"dns-port", "capabilities", "interface", "devices", "broker", "model", "clock"} <= findings.keys()
    assert findings["dns-port"]["status"] == "ok" and findings["clock"]["status"] in ("ok", "warn")
    assert state.read_text() == "a file where the state directory should be\n"


def test_database_file_that_is_not_a_database(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, free_port())
    (tmp_path / "state" / "iotgw.sqlite").write_bytes(b"\x00garbage, not SQLite\n" * 100)
    code, findings, _ = doctor(cfg)
    assert code == 1
    assert findings["database"]["status"] == "fail"
    assert "not a database" in findings["database"]["detail"]


def test_database_url_that_does_not_parse_is_a_finding_without_its_password(tmp_path: Path) -> None:
    extra = '[store]\nurl = "postgresql://u:s3cretpw@[::1/x"\n'
    config = write_config(tmp_path, free_port(), extra=extra)
    code, findings, err = doctor(config)
    assert code == 1 and findings["config"]["status"] == "fail", (findings, err)
    detail = findings["config"]["detail"]
    assert f"{config}:8: store.url: 'postgresql://u:***@[::1/x' is not a database URL" in detail, detail
    assert "s3cretpw" not in json.dumps(findings)
    code, findings, err = doctor(write_config(tmp_path, free_port()), "--db", "postgresql://u:s3cretpw@[::1/x")
    assert code == 1 and findings["config"]["detail"].startswith("--db: 'postgresql://u:***@[::1/x'"), (findings, err)
    assert "s3cretpw" not in json.dumps(findings)


def test_bad_config_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "iotgw.toml"
    path.write_text('[gateway]\nname = "home"\n[dns]\nlisten = 53\n')
    code, findings, _ = doctor(path)
    assert code == 1
    assert findings["config"]["status"] == "fail"
    assert f"{path}:4" in findings["config"]["detail"] and "dns.listen" in findings["config"]["detail"]


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_missing_capabilities_fail(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, 53, listen="127.0.0.1:53")
    drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-net_bind_service,-net_raw,-net_admin"]
    code, findings, err = doctor(cfg, prefix=tuple(drop))
    assert code == 1, err
    assert findings["capabilities"]["status"] == "fail"
    assert "CAP_NET_BIND_SERVICE" in findings["capabilities"]["detail"]
    assert "AmbientCapabilities" in findings["capabilities"]["fix"]
    assert "not tested" in findings["dns-port"]["detail"]


# root without the capabilities that let it read and write every file: as a user's shell would be
NO_DAC = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_state_directory_it_may_not_read_is_a_finding_not_a_traceback(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, free_port())
    state = tmp_path / "state"
    os.chown(state, 65534, 65534)  # the service user's 0700 directory
    state.chmod(0o700)
    code, findings, err = doctor(cfg, prefix=tuple(NO_DAC))
    assert code == 1 and "Traceback" not in err, err
    assert findings["model"]["status"] == "fail"
    assert findings["model"]["detail"].startswith(f"permission denied: {state}")
    assert "sudo iotgw doctor" in findings["model"]["fix"]
    assert findings["clock"]["status"] in ("ok", "warn")  # the checks after it still ran


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_config_it_may_not_read_says_to_run_as_root(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, free_port())
    os.chown(cfg, 65534, 65534)
    cfg.chmod(0o600)
    code, findings, err = doctor(cfg, prefix=tuple(NO_DAC))
    assert code == 1 and findings["config"]["detail"] == f"{cfg}: cannot read: Permission denied", err
    assert "sudo iotgw doctor" in findings["config"]["fix"] and "line" not in findings["config"]["fix"]


def test_capabilities_check_against_a_bitmask() -> None:
    cfg = Config()
    cfg.capture.interface = "eth0"
    none = check_capabilities(cfg, caps=0)
    assert none.status == "fail" and "CAP_NET_RAW" in none.detail and "CAP_NET_BIND_SERVICE" in none.detail
    no_admin = check_capabilities(cfg, caps=(1 << 10) | (1 << 13))
    assert no_admin.status == "warn" and "CAP_NET_ADMIN" in no_admin.detail
    assert check_capabilities(cfg, caps=(1 << 10) | (1 << 12) | (1 << 13)).status == "ok"


def test_interface_missing_and_present(tmp_path: Path) -> None:
    code, findings, _ = doctor(write_config(tmp_path, free_port(), extra='interface = "nosuch0"\n'))
    assert code == 1 and findings["interface"]["status"] == "fail"
    assert "does not exist" in findings["interface"]["detail"]
    code, findings, _ = doctor(write_config(tmp_path, free_port(), extra='interface = "lo"\n'))
    assert findings["interface"]["status"] == "ok"


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="creating a veth pair needs root")
@pytest.mark.parametrize("name", ["..", "../../etc", "lo/../lo"])
def test_interface_name_that_is_a_path_is_a_missing_interface(tmp_path: Path, name: str) -> None:
    code, findings, err = doctor(write_config(tmp_path, free_port(), extra=f'interface = "{name}"\n'))
    assert code == 1 and "Traceback" not in err
    assert findings["interface"]["status"] == "fail"
    assert findings["interface"]["detail"] == f"interface {name!r} does not exist"


@pytest.mark.parametrize(("listen", "detail"), [
    ("foo.invalid", "'foo.invalid' is not an IP address"),
    ("[fe80::1%nosuchif]", "there is no interface named 'nosuchif'"),
])
def test_dns_listen_that_cannot_be_bound_says_why_not_port_taken(tmp_path: Path, listen: str, detail: str) -> None:
    listen = f"{listen}:{free_port()}"
    code, findings, err = doctor(write_config(tmp_path, 0, listen=listen))
    assert code == 1 and findings["dns-port"]["status"] == "fail", (findings, err)
    assert findings["dns-port"]["detail"].startswith(f"{listen}: {detail}")


def test_link_local_dns_clients_with_no_lan_interface_known_is_a_warning_that_names_the_setting() -> None:
    cfg = Config()  # fe80::/10 is in the default LAN; no [capture] interface
    finding = check_link_local(cfg)
    assert finding.status == "warn" and "REFUSED" in finding.detail and "[capture] interface" in finding.fix
    cfg.capture.interface = "br-lan"
    cfg.dns.listen = ["0.0.0.0:53", "[fe80::1%wlan0]:53"]  # a zone names a served link too
    assert (check_link_local(cfg).status, check_link_local(cfg).detail) == (
        "ok", "link-local clients are answered on br-lan, wlan0 only")
    cfg.dns.lan = ["192.168.0.0/16", "fd00::/8"]
    assert check_link_local(cfg).status == "skip"


def test_link_local_dns_clients_are_no_concern_of_a_dns_server_listening_on_ipv4_only() -> None:
    cfg = Config()  # fe80::/10 in the LAN and no [capture] interface, but no IPv6 client can reach the server
    cfg.dns.listen = ["0.0.0.0:53", "192.168.1.2:5353"]
    assert (check_link_local(cfg).status, check_link_local(cfg).detail) == ("skip", "[dns] listen has no IPv6 address")
    cfg.dns.listen = ["0.0.0.0:53", "[fd00::2]:53"]  # a link-local source may still send to a global address
    assert check_link_local(cfg).status == "warn"


def test_interface_down(tmp_path: Path) -> None:
    name = f"iotgwd{os.getpid() % 100000}"
    add = ["ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p"]
    if subprocess.run(add, capture_output=True).returncode:
        pytest.skip("cannot create a veth pair here")
    try:
        code, findings, _ = doctor(write_config(tmp_path, free_port(), extra=f'interface = "{name}"\n'))
        assert code == 1 and findings["interface"]["detail"] == f"interface {name} is down"
        assert findings["interface"]["fix"] == f"ip link set {name} up"
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


@pytest.mark.skipif(not shutil.which("mosquitto"), reason="mosquitto not installed")
def test_broker_reachable_and_not(tmp_path: Path) -> None:
    port = free_port()
    broker = start_mosquitto(tmp_path, port, "allow_anonymous true\n")
    try:
        up = write_config(tmp_path, free_port(), extra=f'[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\n')
        code, findings, err = doctor(up)
        assert findings["broker"]["status"] == "ok", (findings["broker"], err)
    finally:
        broker.terminate()
        broker.wait(timeout=10)
    code, findings, _ = doctor(up)  # the same config, the broker gone
    assert code == 1 and findings["broker"]["status"] == "fail"
    assert "cannot connect" in findings["broker"]["detail"]


def start_mosquitto(tmp_path: Path, port: int, extra: str = "") -> subprocess.Popen:
    conf = tmp_path / "mosquitto.conf"
    # user root: started as root, mosquitto would drop to its own user, which cannot read pytest's tmp_path.
    conf.write_text(f"user root\nlistener {port} 127.0.0.1\n{extra}")
    broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    return broker


@pytest.mark.skipif(not shutil.which("mosquitto_passwd"), reason="mosquitto not installed")
def test_broker_credentials_in_the_url_are_used_as_the_daemon_uses_them(tmp_path: Path) -> None:
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "alerts", "S3cretPw"], check=True)
    port = free_port()
    broker = start_mosquitto(tmp_path, port, f"allow_anonymous false\npassword_file {passwords}\n")
    try:
        good = f'[mqtt]\nurl = "mqtt://alerts:S3cretPw@127.0.0.1:{port}"\n'
        code, findings, err = doctor(write_config(tmp_path, free_port(), extra=good))
        assert findings["broker"]["status"] == "ok", (findings["broker"], err)
        wrong = f'[mqtt]\nurl = "mqtt://alerts:wrong@127.0.0.1:{port}"\n'
        code, findings, err = doctor(write_config(tmp_path, free_port(), extra=wrong))
        assert findings["broker"]["status"] == "fail" and "refused" in findings["broker"]["detail"]
    finally:
        broker.terminate()
        broker.wait(timeout=10)


@pytest.mark.parametrize(("url", "ca_file", "detail"), [
    ("mqtt://127.0.0.1:99999", "", "Port out of range"),
    ("mqtt://[::1", "", "Invalid IPv6 URL"),
    ("tcp://alerts:S3cretPw@127.0.0.1:1883", "", "'tcp://alerts:***@127.0.0.1:1883': scheme must be mqtt://"),
    ("mqtts://127.0.0.1:18883", "/nonexistent/ca.pem", "cannot set up TLS with ca_file '/nonexistent/ca.pem'"),
])
def test_broker_url_or_ca_file_the_daemon_cannot_use_is_a_fail_finding(url: str, ca_file: str, detail: str) -> None:
    cfg = Config()
    cfg.mqtt.url, cfg.mqtt.ca_file = url, ca_file
    finding = check_broker(cfg, timeout=1)
    assert finding.status == "fail" and detail in finding.detail and finding.fix
    assert "S3cretPw" not in finding.detail


def test_mqtts_with_a_missing_ca_file_is_a_fail_line(tmp_path: Path) -> None:
    extra = '[mqtt]\nurl = "mqtts://127.0.0.1:18883"\nca_file = "/nonexistent/ca.pem"\n'
    code, findings, err = doctor(write_config(tmp_path, free_port(), extra=extra))
    assert code == 1 and findings["broker"]["status"] == "fail" and "Traceback" not in err
    assert "/nonexistent/ca.pem" in findings["broker"]["detail"]


def test_model_dir_that_is_not_a_bundle(tmp_path: Path) -> None:
    empty = tmp_path / "model"
    empty.mkdir()
    code, findings, _ = doctor(
        write_config(tmp_path, free_port(), extra=f'[identifier]\nmodel_dir = "{empty}"\n')
    )
    try:
        import identifier.bundle  # noqa: F401 - only to know whether the check can run
    except ImportError:
        assert findings["model"]["status"] == "skip"
        return
    assert code == 1 and findings["model"]["status"] == "fail" and str(empty) in findings["model"]["detail"]


def test_clock_in_the_past_fails() -> None:
    assert check_clock(Config(), now=978307200).status == "fail"  # 2001-01-01: a Pi without RTC or NTP
    assert check_clock(Config()).status in ("ok", "warn")


def test_doctor_is_registered_in_the_cli() -> None:
    from gateway.cli import COMMAND_MODULES

    assert "gateway.commands.doctor" in COMMAND_MODULES


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_root_doctor_leaves_the_database_owned_by_the_state_owner() -> None:
    """Run as root (sudo iotgw doctor), the database is created as the state directory's owner, so the
    daemon (user iotgw) can still write it afterwards."""
    # Not tmp_path: pytest's base directory is root-only, and the other user must reach the state directory.
    base = Path(tempfile.mkdtemp(prefix="iotgw-doctor-"))
    try:
        base.chmod(0o755)
        cfg = write_config(base, free_port())
        os.chown(base / "state", 65534, 65534)
        code, findings, err = doctor(cfg)
        assert findings["database"]["status"] == "ok", (findings["database"], err)
        created = list((base / "state").iterdir())
        assert created and all(p.stat().st_uid == 65534 for p in created)
    finally:
        shutil.rmtree(base)
