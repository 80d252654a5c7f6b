"""``iotgw backup`` and ``iotgw restore`` as an owner runs them: real stores written by the real code paths, the
CLI in its own process, a real daemon holding the state directory."""

from __future__ import annotations

import fcntl
import io
import json
import os
import sqlite3
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import create_engine

from gateway import accounts
from gateway.config import load
from gateway.devices import service
from gateway.statedir import RUNNING_LOCK
from gateway.store.db import MIGRATIONS, Store
from gateway.store.schema import Address, ConfigBase, Device
from tests.ports import free_port
from tests.webui_seed import add_device

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery staple"  # noqa: S105 - the test account's
CAMERA = "aa:bb:cc:00:00:01"
PLUG = "aa:bb:cc:00:00:02"


def iotgw(*argv: str, check: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", *argv], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if check is not None:
        assert proc.returncode == check, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def write_config(path: Path, state: Path) -> Path:
    path.write_text(f'[gateway]\nname = "home"\nstate_dir = "{state}"\n\n[store]\nquerylog_days = 30\n')
    return path


@pytest.fixture
def home(tmp_path):
    """A gateway's state as the daemon, the web UI and the CLI leave it: devices with names, labels and an
    identification, a policy, the admin account and a token, the federation key and an installed model."""
    state = tmp_path / "state"
    config = write_config(tmp_path / "iotgw.toml", state)
    cfg = load(config)
    store = Store(cfg.db_url)
    add_device(store, CAMERA, hostname="cam-1", identified=True, queries=("a.example.com", "b.example.com"))
    add_device(store, PLUG, hostname="plug-1", ip="192.168.1.51")
    service.rename(store, CAMERA, "Front door camera")
    service.label(store, CAMERA, manufacturer="Reolink", device_type="reolink-e1", category="camera")
    accounts.set_password(store, PASSWORD)
    _token, secret = accounts.create_token(store, "home assistant", "read", 365)
    store.close()
    iotgw("policy", "--config", str(config), "block", f"device:{CAMERA}", "tracker.example")
    iotgw("policy", "--config", str(config), "pause", f"device:{PLUG}")
    federation = state / "federation"
    (federation / "model" / "bundle-1").mkdir(parents=True)
    (federation / "model" / "bundle-1" / "model.json").write_text('{"version": "fed-7"}')
    (federation / "model" / "current").symlink_to("bundle-1")
    (federation / "node_key").write_bytes(b"-----BEGIN EC PRIVATE KEY-----\nnot really\n")
    return {"state": state, "config": config, "cfg": cfg, "token": secret}


def test_a_backup_taken_while_a_writer_writes_restores_everything_into_a_fresh_state_dir(home, tmp_path):
    store = Store(home["cfg"].db_url)
    stop, written = threading.Event(), []
    some_written = threading.Event()

    def writer() -> None:
        # A device and its address in one transaction, as the tracker's flush writes them: a snapshot that is
        # not one moment would show a device without its address
        n = 0
        while not stop.is_set():
            mac = f"02:00:00:00:{n // 256:02x}:{n % 256:02x}"
            with store.transaction() as s:
                s.add(Device(mac=mac, first_seen=time.time(), last_seen=time.time(), status="new"))
                s.flush()
                s.add(Address(ip=f"10.9.{n // 256}.{n % 256}", mac=mac, source="dns", first_seen=time.time(),
                              last_seen=time.time()))
            written.append(mac)
            n += 1
            if n == 20:
                some_written.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert some_written.wait(120)
        before = len(written)
        backup = tmp_path / "out" / "iotgw-backup.tar.gz"
        done = iotgw("backup", "--config", str(home["config"]), str(backup))
        during = len(written)
    finally:
        stop.set()
        thread.join()
        store.close()
    assert "keep it private" in done.stdout
    assert during > before, "the writer went on writing while the backup ran"
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    with tarfile.open(backup) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("manifest.json"))
    assert names[0] == "manifest.json"
    assert manifest["schema"] == {"config": "config_0007_login_devices", "querylog": None}
    assert not any("querylog" in n for n in names)  # left out by default
    assert manifest["links"] == {"state/federation/model/current": "bundle-1"}

    fresh, config = tmp_path / "restored" / "state", tmp_path / "restored" / "iotgw.toml"
    out = iotgw("restore", "--config", str(config), "--state-dir", str(fresh), str(backup)).stdout
    assert f"into {fresh}" in out
    db = f"sqlite:///{fresh / 'iotgw.sqlite'}"
    devices = {d["mac"]: d for d in json.loads(iotgw("devices", "--db", db, "--json").stdout)}
    assert devices[CAMERA]["name"] == "Front door camera"
    assert devices[CAMERA]["device_type"] == "tplink-plug-hs110"
    assert devices[PLUG]["name"] == "plug-1"
    restored_writes = {mac for mac in devices if mac.startswith("02:")}
    assert before <= len(restored_writes) <= during
    assert restored_writes == set(written[:len(restored_writes)])  # a prefix of the writes: one moment
    shown = json.loads(iotgw("policy", "--state-dir", str(fresh), "show").stdout)
    assert shown["policies"][f"device:{CAMERA}"]["rules"][0]["value"] == "tracker.example"
    assert shown["policies"][f"device:{PLUG}"]["paused"] is True
    store = Store(db)
    try:
        assert accounts.verify_login(store, accounts.ADMIN, PASSWORD, "192.168.1.9")
        assert accounts.authenticate_token(store, home["token"]) is not None
        detail = service.get_device(store, CAMERA)
        assert (detail.device.label_manufacturer, detail.device.label_category) == ("Reolink", "camera")
        assert len(detail.identifications) == 1
        for mac in restored_writes:
            assert [a.mac for a in service.get_device(store, mac).addresses] == [mac]
    finally:
        store.close()
    assert (fresh / "federation" / "node_key").read_bytes() == (home["state"] / "federation" / "node_key").read_bytes()
    assert os.readlink(fresh / "federation" / "model" / "current") == "bundle-1"
    assert (fresh / "federation" / "model" / "current" / "model.json").read_text() == '{"version": "fed-7"}'
    assert config.read_text() == home["config"].read_text()
    # The query log was left out: it starts empty, not missing
    assert iotgw("queries", "--db", db, "--json").stdout == ""


def test_with_queries_the_query_log_comes_back(home, tmp_path):
    backup = tmp_path / "b.tar.gz"
    iotgw("backup", "--config", str(home["config"]), "--with-queries", str(backup))
    fresh = tmp_path / "fresh"
    iotgw("restore", "--config", str(tmp_path / "new.toml"), "--state-dir", str(fresh), str(backup))
    lines = iotgw("queries", "--db", f"sqlite:///{fresh / 'iotgw.sqlite'}", "--json").stdout.splitlines()
    assert sorted(json.loads(line)["qname"] for line in lines) == ["a.example.com", "b.example.com"]


def test_restore_is_refused_while_the_daemon_runs_and_the_old_state_is_kept_after(home, tmp_path):
    backup = tmp_path / "b.tar.gz"
    port = free_port()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", "--config", str(home["config"]), "--dns-listen",
         f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{free_port()}", "--no-sniff"],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        _wait_until_held(home["state"] / RUNNING_LOCK, daemon)
        iotgw("backup", "--config", str(home["config"]), str(backup))  # a backup works while it runs
        iotgw("policy", "--config", str(home["config"]), "block", "global", "later.example")
        refused = iotgw("restore", "--config", str(home["config"]), str(backup), check=1)
        assert "in use by `iotgw run` or `iotgw web`" in refused.stderr
        assert "systemctl stop iotgw iotgw-web" in refused.stderr
        assert "later.example" in (home["state"] / "policy.json").read_text()  # nothing was touched
        assert not list(tmp_path.glob("state.*"))
    finally:
        daemon.terminate()
        assert daemon.wait(60) == 0, daemon.stderr.read()[-3000:]
        daemon.stderr.close()
    iotgw("restore", "--config", str(home["config"]), str(backup))
    assert "later.example" not in (home["state"] / "policy.json").read_text()
    assert "later.example" in (tmp_path / "state.before-restore" / "policy.json").read_text()
    assert (tmp_path / "iotgw.toml.before-restore").read_text() == home["config"].read_text()


def _wait_until_held(lock: Path, proc: subprocess.Popen) -> None:
    """Until ``proc`` holds its shared lock on the state directory (it takes it before opening the store)."""
    give_up = time.monotonic() + 300  # a bound on a hang, not a timing: the daemon takes it as it starts
    while True:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < give_up, f"the daemon never took {lock}"
        if lock.exists():
            with open(lock) as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return
                fcntl.flock(fh, fcntl.LOCK_UN)
        time.sleep(0.1)


def test_a_backup_of_an_older_schema_is_migrated_on_restore(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    db = state / "iotgw.sqlite"
    engine = create_engine(f"sqlite:///{db}")
    alembic = AlembicConfig()
    alembic.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:  # the schema an iotgw of four migrations ago left
        alembic.attributes["connection"], alembic.attributes["metadata"] = conn, ConfigBase.metadata
        command.upgrade(alembic, "config_0003_alerts")
        conn.exec_driver_sql("INSERT INTO devices (mac, first_seen, last_seen, status, name, name_source) "
                             "VALUES (?, 1, 2, 'approved', 'Old plug', 'user')", (PLUG,))
    engine.dispose()
    config = write_config(tmp_path / "iotgw.toml", state)
    backup = tmp_path / "old.tar.gz"
    iotgw("backup", "--config", str(config), str(backup))
    with tarfile.open(backup) as tar:  # the backup leaves the live database as it was: it never migrates
        assert json.load(tar.extractfile("manifest.json"))["schema"]["config"] == "config_0003_alerts"
    fresh = tmp_path / "fresh"
    out = iotgw("restore", "--config", str(tmp_path / "new.toml"), "--state-dir", str(fresh), str(backup)).stdout
    assert "config database migrated from schema config_0003_alerts" in out
    devices = json.loads(iotgw("devices", "--db", f"sqlite:///{fresh / 'iotgw.sqlite'}", "--json").stdout)
    assert [(d["mac"], d["name"], d["status"]) for d in devices] == [(PLUG, "Old plug", "approved")]
    with sqlite3.connect(fresh / "iotgw.sqlite") as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "config_0007_login_devices"


def test_a_backup_from_a_newer_schema_is_refused_naming_the_versions(home, tmp_path):
    with sqlite3.connect(home["state"] / "iotgw.sqlite") as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'config_0099_from_the_future'")
    backup = tmp_path / "new.tar.gz"
    iotgw("backup", "--config", str(home["config"]), str(backup))
    fresh = tmp_path / "fresh"
    refused = iotgw("restore", "--config", str(tmp_path / "n.toml"), "--state-dir", str(fresh), str(backup), check=2)
    assert refused.stderr.startswith(f"{backup}: its database is at schema revision config_0099_from_the_future, "
                                     "newer than this iotgw")
    assert not fresh.exists() and not (tmp_path / "n.toml").exists()
    assert not [p for p in tmp_path.iterdir() if ".restore-" in p.name]


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("case", ["truncated", "corrupt", "not-gzip", "dotdot", "absolute", "symlink", "hardlink",
                                  "altered", "no-manifest"])
def test_a_bad_archive_is_refused_naming_it_and_nothing_changes(home, tmp_path, case):
    good = tmp_path / "good.tar.gz"
    iotgw("backup", "--config", str(home["config"]), str(good))
    data = good.read_bytes()
    bad = tmp_path / f"{case}.tar.gz"
    with tarfile.open(good) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    said = {
        "truncated": "cut short", "corrupt": "not a whole iotgw backup", "not-gzip": "not a readable backup",
        "dotdot": "would be written outside the restore", "absolute": "would be written outside the restore",
        "symlink": "is a symlink: refused", "hardlink": "is a hard link: refused",
        "altered": "state/policy.json does not match its SHA-256", "no-manifest": "no manifest.json",
    }[case]
    if case == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif case == "corrupt":
        middle = len(data) // 2
        bad.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:])
    elif case == "not-gzip":
        bad.write_text("[gateway]\nname = 'not a backup'\n")
    elif case == "dotdot":
        _tar(bad, [*members, (tarfile.TarInfo("state/../../escaped"), b"x")])
    elif case == "absolute":
        _tar(bad, [*members, (tarfile.TarInfo(str(tmp_path / "escaped")), b"x")])
    elif case == "symlink":
        _tar(bad, [*members, (_link("state/escaped", str(tmp_path)), b"")])
    elif case == "hardlink":
        _tar(bad, [*members, (_link("state/escaped", "state/policy.json", tarfile.LNKTYPE), b"")])
    elif case == "altered":
        _tar(bad, [(m, b'{"revision": 99}' if m.name == "state/policy.json" else body) for m, body in members])
    elif case == "no-manifest":
        _tar(bad, [(m, body) for m, body in members if m.name != "manifest.json"])
    policy_before = (home["state"] / "policy.json").read_bytes()
    refused = iotgw("restore", "--config", str(home["config"]), str(bad), check=2)
    assert refused.stderr.startswith(f"{bad}: "), refused.stderr
    assert said in refused.stderr
    assert "Traceback" not in refused.stderr
    assert (home["state"] / "policy.json").read_bytes() == policy_before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["state", "iotgw.toml", "good.tar.gz", bad.name])
    assert not list(tmp_path.rglob("escaped"))


def test_postgres_is_refused_naming_pg_dump(tmp_path):
    refused = iotgw("backup", "--db", "postgresql://iotgw@db.example/iotgw", "--state-dir", str(tmp_path),
                    str(tmp_path / "b.tar.gz"), check=2)
    assert "pg_dump" in refused.stderr
    assert not (tmp_path / "b.tar.gz").exists()



def test_the_settings_page_downloads_a_backup_after_the_password_is_given_again(home, tmp_path):
    from webui.app import create_app

    store = Store(home["cfg"].db_url)
    try:
        app = create_app(store, home["cfg"])
        client = app.test_client()
        client.get("/login")
        with client.session_transaction() as sess:
            csrf = sess["csrf_token"]
        login = client.post("/login", data={"username": "admin", "password": PASSWORD, "csrf_token": csrf})
        assert login.status_code == 302
        with client.session_transaction() as sess:
            csrf = sess["csrf_token"]
        assert b'action="/settings/backup"' in client.get("/settings").data
        wrong = client.post("/settings/backup", data={"current": "not it", "csrf_token": csrf})
        assert wrong.status_code == 302 and wrong.mimetype != "application/gzip"
        got = client.post("/settings/backup", data={"current": PASSWORD, "csrf_token": csrf})
        assert got.status_code == 200 and got.mimetype == "application/gzip"
        assert got.headers["Content-Disposition"].startswith("attachment; filename=iotgw-backup-")
        assert got.headers["Cache-Control"] == "no-store"
        backup = tmp_path / "downloaded.tar.gz"
        backup.write_bytes(got.data)
        got.close()
    finally:
        store.close()
    assert not [p for p in Path(tempfile.gettempdir()).glob("iotgw-web-backup-*")]
    fresh = tmp_path / "fresh"
    iotgw("restore", "--config", str(tmp_path / "new.toml"), "--state-dir", str(fresh), str(backup))
    devices = json.loads(iotgw("devices", "--db", f"sqlite:///{fresh / 'iotgw.sqlite'}", "--json").stdout)
    assert {d["mac"]: d["name"] for d in devices} == {CAMERA: "Front door camera", PLUG: "plug-1"}
    assert (tmp_path / "new.toml").read_text() == home["config"].read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="handing files to the service user needs root")
def test_a_restore_run_as_root_gives_the_state_to_the_service_user_and_keeps_the_configs_owner(home, tmp_path):
    backup = tmp_path / "b.tar.gz"
    iotgw("backup", "--config", str(home["config"]), str(backup))
    # An installed system: /var/lib/iotgw is the iotgw user's (0750), /etc/iotgw/iotgw.toml root:iotgw 0640
    target = tmp_path / "installed"
    state, config = target / "state", target / "iotgw.toml"
    state.mkdir(parents=True)
    os.chown(state, 4242, 4243)
    state.chmod(0o750)
    write_config(config, state)
    os.chown(config, 0, 4243)
    config.chmod(0o640)
    iotgw("restore", "--config", str(config), str(backup))
    made = [state, *state.rglob("*")]
    assert {(p.lstat().st_uid, p.lstat().st_gid) for p in made} == {(4242, 4243)}
    assert stat.S_IMODE(state.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in made if p.is_file() and not p.is_symlink()} == {0o600}
    st = config.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 4243, 0o640)
    assert config.read_text() == home["config"].read_text()


def test_the_daemon_and_the_web_ui_do_not_start_on_a_state_dir_a_restore_is_replacing(home):
    from gateway.statedir import take_running_lock

    held = take_running_lock(home["state"])  # as `iotgw restore` holds it while it swaps the directory
    try:
        for argv in (["run", "--dns-listen", f"127.0.0.1:{free_port()}", "--no-sniff"],
                     ["web", "--listen", f"127.0.0.1:{free_port()}"]):
            refused = iotgw(*argv, "--config", str(home["config"]), check=1)
            assert "`iotgw restore` is replacing this state directory" in refused.stderr
    finally:
        os.close(held)
