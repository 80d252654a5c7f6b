"""The Debian package: ``firmware/build-deb.sh`` builds it, its metadata and contents are right, the venv
works from /opt/iotgw, and it installs, removes and purges cleanly in a throwaway root (dpkg --root, with the
maintainer scripts run chrootless under DPKG_ROOT)."""

from __future__ import annotations

import marshal
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gateway.config import Config, load

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware"
SCRIPTS = [FIRMWARE / "debian" / name for name in ("postinst", "prerm", "postrm")]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.mark.parametrize(
    "script", [*SCRIPTS, FIRMWARE / "build-deb.sh", *sorted(FIRMWARE.glob("pi-gen/**/*.sh"))]
)
def test_scripts_parse_and_pass_shellcheck(script: Path) -> None:
    shell = "bash" if script.read_text().startswith("#!/bin/bash") else "sh"
    subprocess.run([shell, "-n", str(script)], check=True)
    assert os.access(script, os.X_OK), f"{script} is not executable"
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def uncomment_settings(text: str) -> str:
    """The example with each commented-out ``# key = value  # note`` line made a setting. The note's spaces are
    matched within the line: matching a newline there swallowed the next setting, so every second one went
    unchecked."""
    return re.sub(r"^# (\w+ = .*?)([ \t]+#.*)?$", r"\1", text, flags=re.M)


def test_example_config_is_the_defaults_and_every_line_is_valid(tmp_path: Path) -> None:
    example = FIRMWARE / "iotgw.toml"
    assert load(example).gateway == Config().gateway and load(example).dns == Config().dns
    # Uncommenting every setting must still load: a typo in the example would otherwise ship as a trap.
    uncommented = uncomment_settings(example.read_text())
    (tmp_path / "all.toml").write_text(uncommented)
    cfg = load(tmp_path / "all.toml")
    assert cfg.capture.interface == "eth0" and cfg.web.listen == "0.0.0.0:8080"
    assert uncommented.count("\n# ") < example.read_text().count("\n# ")


def test_example_config_shows_every_key() -> None:
    """The installed file says it shows every setting: a key in gateway/config.py that it lacks ([devices] max did)
    is one an owner never learns of."""
    shown = tomllib.loads(uncomment_settings((FIRMWARE / "iotgw.toml").read_text()))
    missing = [
        f"[{section}] {key}"
        for section, value in vars(Config()).items()
        if section != "source"
        for key in vars(value)
        if key not in shown.get(section, {})
    ]
    assert not missing, f"firmware/iotgw.toml lacks {missing}"


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not shutil.which("dpkg-deb"):
        pytest.skip("dpkg-deb not installed")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [str(FIRMWARE / "build-deb.sh"), "--out", str(out)], capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    path = out / f"iotgw_{VERSION}_{arch}.deb"
    assert proc.stdout.strip().splitlines()[-1] == str(path) and path.exists()
    return path


@pytest.fixture(scope="module")
def extracted(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("x")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True).stdout.strip()


@pytest.mark.slow
def test_control_and_conffiles(deb: Path, tmp_path: Path) -> None:
    assert field(deb, "Package") == "iotgw" and field(deb, "Version") == VERSION
    depends = field(deb, "Depends")
    minor = (
        f"{sys.version_info[0]}.{sys.version_info[1]}"  # the venv is tied to the interpreter's minor version
    )
    assert "python3 (>= " in depends and "python3 (<< " in depends and "systemd" in depends, depends
    assert "iproute2" in depends, depends  # `ip` reads the neighbour table and the default routes
    assert minor  # informational: the build used /usr/bin/python3, not necessarily this interpreter
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    assert (control / "conffiles").read_text().split() == ["/etc/iotgw/iotgw.toml"]
    for name in ("postinst", "prerm", "postrm"):
        assert (control / name).read_text() == (FIRMWARE / "debian" / name).read_text()
        assert os.access(control / name, os.X_OK)


@pytest.mark.slow
def test_contents(deb: Path) -> None:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    paths = {line.split()[5] for line in listing.splitlines()}
    owners = {line.split()[1] for line in listing.splitlines()}
    assert owners == {"root/root"}
    for unit in ("iotgw.service", "iotgw-web.service", "iotgw-federation.service", "iotgw-federation.timer"):
        assert f"./lib/systemd/system/{unit}" in paths
    assert "./etc/iotgw/iotgw.toml" in paths and "./opt/iotgw/bin/iotgw" in paths
    assert "./usr/bin/iotgw -> /opt/iotgw/bin/iotgw" in listing.replace(
        "./usr/bin/iotgw ->", "./usr/bin/iotgw ->"
    )
    assert any(p.startswith("./opt/iotgw/lib/python3.") and p.endswith("/gateway/doctor.py") for p in paths)
    # The base package stays small for a Pi: no torch, no flwr, no pip.
    site = [p for p in paths if "/site-packages/" in p]
    assert not [p for p in site if re.search(r"/site-packages/(torch|flwr|pip)/", p)]
    assert "./opt/iotgw/.federation" not in paths


@pytest.mark.slow
def test_venv_is_relocated_to_opt_iotgw(deb: Path, extracted: Path) -> None:
    venv = extracted / "opt/iotgw"
    assert (venv / "bin/iotgw").read_text().splitlines()[0] == "#!/opt/iotgw/bin/python3"
    assert os.readlink(venv / "bin/python3") == "/usr/bin/python3"
    assert "/tmp" not in (venv / "pyvenv.cfg").read_text()
    leftovers = subprocess.run(
        ["grep", "-rlI", "iotgw-deb.", str(venv)], capture_output=True, text=True
    ).stdout
    assert leftovers == ""
    pyc = next(venv.glob("lib/python3.*/site-packages/gateway/__pycache__/doctor.*.pyc"))
    code = marshal.loads(pyc.read_bytes()[16:])  # noqa: S302 - our own build's file
    assert code.co_filename.startswith("/opt/iotgw/lib/python3.") and code.co_filename.endswith(
        "/gateway/doctor.py"
    )


def throwaway_root(path: Path) -> Path:
    """An empty dpkg database and an /etc with only root: enough for dpkg --root and the scripts."""
    (path / "var/lib/dpkg/info").mkdir(parents=True)
    (path / "var/lib/dpkg/updates").mkdir()
    (path / "var/lib/dpkg/status").touch()
    (path / "etc").mkdir()
    for name, line in (
        ("passwd", "root:x:0:0:root:/root:/bin/sh"),
        ("group", "root:x:0:"),
        ("shadow", "root:*:19000:0:99999:7:::"),
        ("gshadow", "root:*::"),
    ):
        (path / "etc" / name).write_text(line + "\n")
    return path


def dpkg(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["dpkg", f"--root={root}", "--force-script-chrootless", "--force-depends", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def passwd_entry(root: Path, name: str, file: str = "passwd") -> list[str] | None:
    for line in (root / "etc" / file).read_text().splitlines():
        if line.split(":")[0] == name:
            return line.split(":")
    return None


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="the maintainer scripts under DPKG_ROOT need root (useradd, chown)")
@pytest.mark.skipif(not shutil.which("deb-systemd-helper"), reason="needs deb-systemd-helper (init-system-helpers)")
def test_an_upgrade_after_the_admin_deleted_the_conffile_configures_and_keeps_it_deleted(tmp_path: Path) -> None:
    """dpkg keeps a deleted conffile deleted on upgrade (iotgw runs on its defaults then): postinst, run as dpkg
    runs it chrootless under DPKG_ROOT, must not fail under set -e on the missing file."""
    root = throwaway_root(tmp_path / "root")
    (root / "etc/iotgw").mkdir()
    env = {**os.environ, "DPKG_ROOT": str(root)}
    proc = subprocess.run(["sh", str(FIRMWARE / "debian/postinst"), "configure", "0.1.0"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not (root / "etc/iotgw/iotgw.toml").exists()
    gid = int(passwd_entry(root, "iotgw", "group")[2])
    etc = (root / "etc/iotgw").stat()
    assert (etc.st_uid, etc.st_gid, etc.st_mode & 0o777) == (0, gid, 0o750)
    assert ((root / "var/lib/iotgw").stat().st_mode & 0o777) == 0o750


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="dpkg --root with maintainer scripts needs root")
def test_install_run_remove_purge_in_a_throwaway_root(deb: Path, tmp_path: Path) -> None:
    root = throwaway_root(tmp_path / "root")
    proc = dpkg(root, "-i", str(deb))
    assert proc.returncode == 0, proc.stderr
    assert "sudo iotgw setup" in proc.stdout

    user = passwd_entry(root, "iotgw")
    assert user is not None and user[5] == "/var/lib/iotgw" and user[6] == "/usr/sbin/nologin"
    assert int(user[2]) < 1000  # a system user
    gid = int(passwd_entry(root, "iotgw", "group")[2])
    state = (root / "var/lib/iotgw").stat()
    assert (state.st_uid, state.st_gid, state.st_mode & 0o777) == (int(user[2]), gid, 0o750)
    conf = (root / "etc/iotgw/iotgw.toml").stat()
    assert (conf.st_uid, conf.st_gid, conf.st_mode & 0o777) == (0, gid, 0o640)
    wants = root / "etc/systemd/system"
    assert (wants / "multi-user.target.wants/iotgw.service").is_symlink()
    assert (wants / "multi-user.target.wants/iotgw-web.service").is_symlink()
    assert (wants / "timers.target.wants/iotgw-federation.timer").is_symlink()

    # The installed venv runs the installed code (cwd outside the repo, so nothing comes from the checkout).
    python = root / "opt/iotgw/bin/python3"
    config = tmp_path / "iotgw.toml"
    (tmp_path / "state").mkdir()
    config.write_text(
        f'[gateway]\nstate_dir = "{tmp_path / "state"}"\n'
        '[dns]\nlisten = ["127.0.0.1:0"]\n[capture]\nsniff = false\n'
    )
    run = subprocess.run(
        [str(python), "-m", "gateway.cli", "doctor", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"^ok\s+database", run.stdout, re.M)
    where = subprocess.run(
        [str(python), "-c", "import gateway; print(gateway.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout
    assert where.startswith(str(root / "opt/iotgw/lib/"))

    # The owner's edit of the conffile survives a remove; purge takes everything.
    (root / "etc/iotgw/iotgw.toml").write_text('[gateway]\nname = "edited"\n')
    (root / "var/lib/iotgw/iotgw.sqlite").write_text("state")
    proc = dpkg(root, "--remove", "iotgw")
    assert proc.returncode == 0, proc.stderr
    assert not (root / "opt/iotgw").exists() and not (root / "usr/bin/iotgw").exists()
    assert (root / "etc/iotgw/iotgw.toml").read_text() == '[gateway]\nname = "edited"\n'
    assert passwd_entry(root, "iotgw") is not None  # remove keeps the user and the state
    proc = dpkg(root, "--purge", "iotgw")
    assert proc.returncode == 0, proc.stderr
    assert passwd_entry(root, "iotgw") is None and passwd_entry(root, "iotgw", "group") is None
    assert not (root / "var/lib/iotgw").exists() and not (root / "etc/iotgw").exists()
    assert not list(wants.rglob("iotgw*"))
