"""``iotgw web`` as its own process: it migrates the store, serves on ``--listen`` and sends every visitor
to the login."""

from __future__ import annotations

import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from gateway import accounts
from gateway.store.db import Store

ROOT = Path(__file__).resolve().parents[1]
# Only the web and user command groups: the daemon's groups are built elsewhere and wired by the lead.
RUN = (
    "import sys\n"
    "from gateway.cli import Parser\n"
    "from gateway.commands import web\n"
    "p = Parser(); web.add_commands(p.add_subparsers(required=True))\n"
    "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return None


def test_iotgw_web_serves_the_login_on_the_listen_address(tmp_path):
    db = f"sqlite:///{tmp_path / 'iotgw.sqlite'}"
    store = Store(db)
    accounts.set_password(store, "a long password")
    store.close()
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            RUN,
            "web",
            "--db",
            db,
            "--state-dir",
            str(tmp_path),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        opener = urllib.request.build_opener(_NoRedirect)
        deadline = time.monotonic() + 60
        while True:
            try:
                opener.open(f"http://127.0.0.1:{port}/devices", timeout=5)
            except urllib.error.HTTPError as exc:
                response = exc
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "iotgw web did not start listening"
                time.sleep(0.2)
        assert response.code == 302 and response.headers["Location"].startswith("/login")
        assert response.headers["X-Frame-Options"] == "DENY"
        login = urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=5)  # noqa: S310 - loopback
        assert login.status == 200 and b'name="csrf_token"' in login.read()
        assert (tmp_path / "web-secret-key").stat().st_mode & 0o777 == 0o600
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_iotgw_web_without_a_password_names_the_set_password_command_for_its_own_database(tmp_path):
    db = f"sqlite:///{tmp_path / 'my state' / 'iotgw.sqlite'}"  # not the default, and with a space to quote
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "web", "--db", db, "--state-dir", str(tmp_path),
                             "--listen", f"127.0.0.1:{port}"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    try:
        for line in proc.stderr:  # ends when the process does
            if "no admin password yet" in line:
                break
        hint = re.search(r"run `(iotgw user set-password[^`]*)`", line)
        assert hint, line
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    argv = shlex.split(hint.group(1))
    # Checked before running it: without --db it would set the password of the machine's default database.
    assert argv[:3] == ["iotgw", "user", "set-password"] and argv[3:] == ["--db", db], argv
    done = subprocess.run([sys.executable, "-m", "gateway.cli", *argv[1:]], input="a long password\n",  # as told
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert accounts.has_password(Store(db, migrate=False))


def test_iotgw_web_on_an_address_it_cannot_listen_on_says_so_naming_the_flag_or_the_config_key(tmp_path):
    """A host name that does not resolve passed the address check and ended in waitress's traceback; a bad
    --listen was reported as the config's web.listen."""
    db = f"sqlite:///{tmp_path / 'iotgw.sqlite'}"
    config = tmp_path / "iotgw.toml"
    config.write_text('[web]\nlisten = "gateway.invalid:8080"\n')
    for flags, said in (
        (["--listen", "gateway.invalid:8080"], "--listen: cannot listen on 'gateway.invalid'"),
        (["--listen", "127.0.0.1:99999"], "--listen: '127.0.0.1:99999': port out of range"),
        (["--config", str(config)], f"{config}: web.listen: cannot listen on 'gateway.invalid'"),
    ):
        proc = subprocess.run([sys.executable, "-m", "gateway.cli", "web", "--db", db, "--state-dir", str(tmp_path),
                               *flags], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert len(proc.stderr.splitlines()) == 1 and f"iotgw: configuration error: {said}" in proc.stderr, proc.stderr


def test_iotgw_web_stopped_by_sigterm_cleans_up_as_ctrl_c_does(tmp_path):
    """systemd stops the service with SIGTERM, which killed the process where it stood: the database was never
    closed (its WAL left beside it, unmerged) and nothing said the UI had stopped. Now SIGTERM ends it as Ctrl-C
    does: the clean-up runs, it says so, and it exits 0, as `iotgw run` does."""
    db = tmp_path / "iotgw.sqlite"
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "web", "--db", f"sqlite:///{db}",
                             "--state-dir", str(tmp_path), "--listen", f"127.0.0.1:{port}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # ends when the process does
            if "web UI on" in line:
                break
        deadline = time.monotonic() + 60
        while True:  # a page served: waitress's loop is running, where SIGTERM usually finds it
            try:
                login = urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=5)  # noqa: S310 - loopback
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "iotgw web did not start serving"
                time.sleep(0.2)
        assert login.status == 200
        assert Path(f"{db}-wal").exists()  # the database is open in WAL mode
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "web UI stopped" in rest and "Traceback" not in rest, rest
    assert not Path(f"{db}-wal").exists()  # closed: the last connection merged the WAL into the database
