"""The systemd units: ``systemd-analyze verify`` is clean, the exposure stays what systemd/README.md reports,
each unit gets only the privileges its job needs, and ``MemoryDenyWriteExecute=yes`` holds for the libraries
the daemon and the web UI load (checked with the kernel's own PR_SET_MDWE)."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"
SERVICES = ("iotgw.service", "iotgw-web.service", "iotgw-federation.service")
ALL_UNITS = (*SERVICES, "iotgw-federation.timer")

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60)


def unit_settings(name: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit, in order, keyed ``Section.Key`` (keys may repeat in systemd)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


@pytest.fixture(scope="module")
def verify_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway root holding the system's units, ours, and a stub /usr/bin/iotgw (verify checks that
    ExecStart is executable; the real one only exists once the package is installed)."""
    root = tmp_path_factory.mktemp("root")
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name in ALL_UNITS:
        shutil.copy(UNITS / name, root / "etc/systemd/system" / name)
    stub = root / "usr/bin/iotgw"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return root


@needs_analyze
@pytest.mark.parametrize("name", ALL_UNITS)
def test_verify_is_clean(verify_root: Path, name: str) -> None:
    # verify exits 0 even for unknown keys and unparsable values; it only warns, so stderr must be empty.
    proc = analyze("verify", "--man=no", f"--root={verify_root}", f"/etc/systemd/system/{name}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


@needs_analyze
def test_verify_catches_a_broken_unit(verify_root: Path) -> None:
    """The check above can fail: a typo in a hardening key shows up on stderr."""
    text = (UNITS / "iotgw.service").read_text().replace("ProtectSystem=strict", "ProtectSystm=strict")
    (verify_root / "etc/systemd/system/iotgw-typo.service").write_text(text)
    proc = analyze("verify", "--man=no", f"--root={verify_root}", "/etc/systemd/system/iotgw-typo.service")
    assert "ProtectSystm" in proc.stderr


def documented_exposure() -> dict[str, float]:
    table = (UNITS / "README.md").read_text()
    rows = re.finditer(r"^\| `([\w.-]+\.service)` \| (\d+\.\d) ", table, re.M)
    return {m.group(1): float(m.group(2)) for m in rows}


@needs_analyze
@pytest.mark.parametrize("name", SERVICES)
def test_exposure_is_what_the_readme_says(name: str) -> None:
    proc = analyze("security", "--offline=yes", str(UNITS / name))
    if proc.returncode != 0 and "offline" in proc.stderr:
        pytest.skip(f"this systemd cannot analyse offline: {proc.stderr.strip()}")
    overall = float(re.search(r"Overall exposure level for \S+: (\d+\.\d)", proc.stdout).group(1))
    assert overall == documented_exposure()[name], "update the table in systemd/README.md"
    # The JSON form names each check; the essential ones must never be the ones left open.
    checks = json.loads(analyze("security", "--offline=yes", "--json=short", str(UNITS / name)).stdout)
    failing = {c["name"] for c in checks if c.get("set") is False}
    essential = {"NoNewPrivileges=", "ProtectSystem=", "SystemCallFilter=~@privileged", "User=/DynamicUser="}
    assert not failing & essential


def test_daemon_gets_exactly_its_three_capabilities() -> None:
    s = unit_settings("iotgw.service")
    wanted = {"CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_NET_ADMIN"}
    assert set(s["Service.AmbientCapabilities"][0].split()) == wanted
    assert set(s["Service.CapabilityBoundingSet"][0].split()) == wanted
    assert s["Service.Type"] == ["notify"] and s["Service.WatchdogSec"]
    assert "AF_PACKET" in s["Service.RestrictAddressFamilies"][0].split()
    assert s["Service.User"] == ["iotgw"] and s["Service.StateDirectory"] == ["iotgw"]
    assert s["Service.ExecStart"] == ["/usr/bin/iotgw run --config /etc/iotgw/iotgw.toml"]


@pytest.mark.parametrize("name", ["iotgw-web.service", "iotgw-federation.service"])
def test_web_and_federation_get_no_privilege(name: str) -> None:
    s = unit_settings(name)
    assert s["Service.CapabilityBoundingSet"] == [""] and s["Service.AmbientCapabilities"] == [""]
    families = s["Service.RestrictAddressFamilies"][0].split()
    assert "AF_PACKET" not in families and "AF_NETLINK" not in families
    assert s["Service.User"] == ["iotgw"] and s["Service.NoNewPrivileges"] == ["yes"]


def test_timer_runs_nightly_and_spreads_the_fleet() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read(UNITS / "iotgw-federation.timer")
    assert parser["Timer"]["OnCalendar"].startswith("*-*-* 0")
    assert parser["Timer"]["RandomizedDelaySec"]


def _seconds(span: str) -> float:
    """A systemd time span (``90min``, ``1h 30min``, ``5400``) in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "hr": 3600}
    parts = re.findall(r"(\d+)\s*([a-z]*)", span)
    assert parts and "".join(n + u for n, u in parts) == span.replace(" ", ""), span
    return sum(int(n) * units[u] for n, u in parts)


def test_every_home_of_the_fleet_is_joined_at_once_for_half_an_hour_a_night() -> None:
    """Each home joins at 02:00 plus its own delay (up to RandomizedDelaySec) and stays for the join's window:
    all of them are joined together only from the last start to the first end. The fleet server's rounds must
    fit there (docs/federation.md, "When the server runs"). Before, a 90 min spread and a 60 min window left
    no such moment: at best two thirds of the homes were joined at once, and a server started at 02:00 met
    the few whose delay was under its --nodes-wait."""
    from gateway.cli import build_parser

    timer = configparser.ConfigParser(strict=False, interpolation=None)
    timer.read(UNITS / "iotgw-federation.timer")
    spread = _seconds(timer["Timer"]["RandomizedDelaySec"])
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.read(UNITS / "iotgw-federation.service")
    argv = service["Service"]["ExecStart"].split()
    assert argv[:3] == ["/usr/bin/iotgw", "federation", "join"]
    window = build_parser().parse_args(argv[1:]).window  # the unit's join, with the flags it is given
    assert window - spread >= 30 * 60, (window, spread)


MDWE_PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN (Linux 6.3+)
    sys.exit(77)
import mmap
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit(78)  # MDWE not enforced: the probe would prove nothing
except OSError:
    pass
import argon2, dnslib, flask, numpy, paho.mqtt.client, sqlalchemy, waitress
from scapy.arch.common import compile_filter
compile_filter("udp port 53", iface="lo")  # libpcap through ctypes, as capture does
ph = argon2.PasswordHasher()
assert ph.verify(ph.hash("pw"), "pw")
import gateway.config, gateway.sdnotify, identifier.domains, identifier.oui
assert identifier.domains.sld("a.b.example.co.uk") == "example.co.uk"
print("ok")
"""


def test_daemon_and_web_libraries_run_under_memory_deny_write_execute() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", MDWE_PROBE], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    if proc.returncode in (77, 78):
        pytest.skip("kernel has no PR_SET_MDWE (Linux 6.3+) to emulate MemoryDenyWriteExecute=")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
