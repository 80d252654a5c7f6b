"""``iotgw setup`` on a copy of the shipped example config: the interface lands in [capture] with every
comment kept, the router guidance names this machine's address, and the doctor's checks run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.commands.setup import set_key
from gateway.config import load
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]


def example_config(tmp_path: Path) -> Path:
    text = (ROOT / "firmware/iotgw.toml").read_text()
    text = set_key(text, "gateway", "state_dir", f'"{tmp_path / "state"}"')
    text = set_key(text, "dns", "listen", f'["127.0.0.1:{free_port()}"]')
    (tmp_path / "state").mkdir()
    path = tmp_path / "iotgw.toml"
    path.write_text(text)
    path.chmod(0o640)
    return path


def run_setup(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "gateway.cli", "setup", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


def test_setup_writes_the_interface_and_guides_the_router(tmp_path: Path) -> None:
    path = example_config(tmp_path)
    before = path.read_text()
    proc = run_setup("--config", str(path), "--interface", "lo", "--no-password")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = path.read_text()
    assert load(path).capture.interface == "lo"
    assert (
        '# interface = "eth0"' in before
        and 'interface = "lo"' in after
        and '# interface = "eth0"' not in after
    )
    # Only that line changed: every other line, comments included, is as shipped.
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert changed == [('# interface = "eth0"', 'interface = "lo"')]
    assert path.stat().st_mode & 0o777 == 0o640
    assert "6,127.0.0.1" in proc.stdout and "DHCP option 6" in proc.stdout
    assert "iotgw user set-password" in proc.stdout or "--no-password" in proc.args
    assert "ok    database" in proc.stdout
    assert (tmp_path / "state" / ".setup-done").exists()


def test_setup_refuses_an_unknown_interface(tmp_path: Path) -> None:
    path = example_config(tmp_path)
    before = path.read_text()
    proc = run_setup("--config", str(path), "--interface", "nosuch0", "--no-password")
    assert proc.returncode == 2 and "nosuch0" in proc.stderr and "lo" in proc.stderr
    assert path.read_text() == before


def test_setup_names_the_users_file_and_line_for_a_mistake_already_in_it(tmp_path: Path) -> None:
    path = tmp_path / "iotgw.toml"
    path.write_text(f'[gateway]\nstate_dir = "{tmp_path}"\n[dns]\nlistenx = ["127.0.0.1:1"]\n')
    before = path.read_text()
    proc = run_setup("--config", str(path), "--interface", "lo", "--no-password")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{path}:4: dns.listenx: unknown key" in proc.stderr and ".iotgw-setup" not in proc.stderr
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["iotgw.toml"]


def test_setup_refuses_a_config_that_is_a_directory_or_not_utf8(tmp_path: Path) -> None:
    folder = tmp_path / "dir.toml"
    folder.mkdir()
    proc = run_setup("--config", str(folder), "--interface", "lo", "--no-password")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"iotgw: configuration error: {folder}: cannot read: Is a directory"
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[gateway]\nname = "caf\xe9"\n')
    proc = run_setup("--config", str(latin1), "--interface", "lo", "--no-password")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{latin1}:2: not UTF-8 (byte 21 is 0xe9)" in proc.stderr
    assert latin1.read_bytes() == b'[gateway]\nname = "caf\xe9"\n'


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_setup_without_root_says_to_run_as_root_in_one_line(tmp_path: Path) -> None:
    path = example_config(tmp_path)
    etc = tmp_path / "etc"
    etc.mkdir()
    path = path.rename(etc / "iotgw.toml")
    os.chown(etc, 65534, 65534)  # a directory only its owner may write, as /etc is root's
    before = path.read_text()
    # root without the capabilities that let it write every file: as a user's shell would be
    no_dac = ("setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search")
    proc = run_setup("--config", str(path), "--interface", "lo", "--no-password", prefix=no_dac)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"iotgw: permission denied: {path}.iotgw-setup: run this as root (sudo) or as the iotgw user"
    ]
    assert path.read_text() == before


def test_set_key_cases() -> None:
    assert set_key("", "capture", "interface", '"eth0"') == '[capture]\ninterface = "eth0"\n'
    # TOML allows spaces inside the brackets: the same section, not one to append a second time
    spaced = "[ capture ]  # LAN\nsniff = true\n"
    assert set_key(spaced, "capture", "interface", '"eth0"') == '[ capture ]  # LAN\ninterface = "eth0"\nsniff = true\n'
    live = '[capture]\n# interface = "x"\ninterface = "wlan0"\n[web]\ninterface = "no"\n'
    assert set_key(live, "capture", "interface", '"eth0"') == (
        '[capture]\n# interface = "x"\ninterface = "eth0"\n[web]\ninterface = "no"\n'
    )
    assert set_key("[dns]\n[capture]\nsniff = true\n", "capture", "interface", '"e"') == (
        '[dns]\n[capture]\ninterface = "e"\nsniff = true\n'
    )
    assert set_key('[gateway]\nname = "x"\n', "capture", "interface", '"e"').endswith(
        '\n\n[capture]\ninterface = "e"\n'
    )


def test_setup_without_a_terminal_names_the_set_password_command_for_its_own_config(tmp_path: Path) -> None:
    path = example_config(tmp_path)
    proc = run_setup("--config", str(path), "--interface", "lo")  # stdin is not a terminal: it cannot prompt
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Without --config the command would set the password of the default config's database, not this one's.
    assert f"run `sudo iotgw user set-password --config {path}` to set it" in proc.stdout, proc.stdout


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace with its own interfaces and routes needs root")
@pytest.mark.parametrize(("wan", "picked"), [("203.0.113.2/24", "lan0"), ("100.64.0.2/24", "lan0"),
                                             ("192.168.50.2/24", "wan0")])
def test_setup_without_a_terminal_offers_the_lan_port_of_a_router_not_its_default_route(tmp_path, wan, picked):
    """On a router the default route leaves by the WAN port, and the interface setup writes is the one whose
    link-local DNS and web clients are trusted: it wrote the WAN port. Now an interface outside [dns] lan (public,
    carrier-grade NAT) is passed over for one inside it; a default route on a LAN address (a Pi's one port, or a
    router behind another router, which only the owner can tell) is still the default."""
    ns = f"iotgw-setup{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for name, address in (("wan0", wan), ("lan0", "192.168.77.1/24")):
            # a veth pair with both ends here: a link that is up, as a port with a cable in is
            subprocess.run(["ip", "-n", ns, "link", "add", name, "type", "veth", "peer", "name", f"{name}p"],
                           check=True)
            subprocess.run(["ip", "-n", ns, "addr", "add", address, "dev", name], check=True)
            for end in (name, f"{name}p"):
                subprocess.run(["ip", "-n", ns, "link", "set", end, "up"], check=True)
        gateway = wan.rsplit(".", 1)[0] + ".1"
        subprocess.run(["ip", "-n", ns, "route", "add", "default", "via", gateway, "dev", "wan0"], check=True)
        path = example_config(tmp_path)
        proc = run_setup("--config", str(path), "--no-password", prefix=("ip", "netns", "exec", ns))
        assert f"LAN interface: {picked}" in proc.stdout, proc.stdout + proc.stderr
        assert load(path).capture.interface == picked
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
