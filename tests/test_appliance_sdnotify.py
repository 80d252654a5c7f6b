"""gateway.sdnotify against a real AF_UNIX datagram socket standing in for systemd's notify socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from gateway.sdnotify import notify, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_ready_watchdog_and_status_arrive_as_datagrams(notify_socket: socket.socket) -> None:
    assert notify("READY=1")
    assert notify_socket.recv(4096) == b"READY=1"
    assert notify("WATCHDOG=1")
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert notify("STATUS=serving DNS on 0.0.0.0:53 \u2713\nREADY=1")
    assert notify_socket.recv(4096).decode() == "STATUS=serving DNS on 0.0.0.0:53 \u2713\nREADY=1"


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"iotgw-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1")
        assert sock.recv(64) == b"READY=1"


def test_without_systemd_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


def test_a_vanished_socket_is_reported_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert notify("WATCHDOG=1") is False


def test_watchdog_interval_is_half_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0
    monkeypatch.delenv("WATCHDOG_PID")
    assert watchdog_interval() == 15.0


@pytest.mark.parametrize(("usec", "pid"), [(None, None), ("abc", None), ("0", None), ("30000000", "1")])
def test_watchdog_interval_off(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None) -> None:
    for var, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    assert watchdog_interval() is None
