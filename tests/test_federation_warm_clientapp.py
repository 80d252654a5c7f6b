"""The warm ClientApp server and its ``flwr-clientapp`` launcher, with real processes on a real unix socket.

``warm_clientapp`` forks each home's ClientApps from a process that imported flwr once. Here a server runs
either Flower's own ``flwr_clientapp()`` (as on a gateway) or a small task of the test's (to see exit codes,
stdio, signals and RNG draws of a forked child); the launcher is the script ``supernode.install_launcher``
writes, run as the SuperExec runs it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from identifier.federated import processes, warm_clientapp
from identifier.federated.supernode import install_launcher

# A server whose children run this instead of Flower's ClientApp: what a child does with its launcher's
# command line, environment, working directory and stdio is then the test's to see.
TASK_SERVER = """
import os, sys, time
import numpy
from identifier.federated import warm_clientapp

numpy.random.rand()  # numpy seeds its global RNG at first use: here the server's, as any import could

def task():
    cmd = sys.argv[1]
    if cmd == "echo":
        print("out", os.getcwd(), os.environ.get("PROBE"), flush=True)
        print("err", file=sys.stderr, flush=True)
        sys.exit(int(sys.argv[2]))
    if cmd == "rand":
        print(numpy.random.randint(0, 2**31))
    if cmd == "sleep":
        print("sleeping", flush=True)
        time.sleep(60)

warm_clientapp.serve_main(task)
"""


@pytest.fixture
def launcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PATH", os.environ["PATH"])  # install_launcher prepends to it; restored after the test
    assert install_launcher(tmp_path / "bin")
    return tmp_path / "bin" / "flwr-clientapp"


def start_server(sock: Path, code: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(processes.PACKAGE_ROOT)}
    proc = subprocess.Popen([sys.executable, *code, str(sock), str(os.getpid())], env=env)
    deadline = time.monotonic() + 60
    while not sock.exists():  # the server binds its socket once it has imported flwr
        assert proc.poll() is None, "the server exited"
        assert time.monotonic() < deadline, "the server never listened"
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def task_server(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen]]:
    sock = tmp_path / "warm" / warm_clientapp.SOCKET_NAME
    proc = start_server(sock, ["-c", TASK_SERVER])
    yield sock, proc
    stop(proc)


def run(launcher: Path, sock: Path | None, *args: str, **kw) -> subprocess.CompletedProcess:  # noqa: ANN003
    env = {**os.environ, "PROBE": "from-the-launcher"}
    if sock is not None:
        env[warm_clientapp.SOCKET_ENV] = str(sock)
    return subprocess.run([str(launcher), *args], env=env, capture_output=True, text=True, timeout=60, **kw)


def forked(server: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(server.pid).children()


def wait_gone(proc: psutil.Process, timeout: float = 10) -> None:
    """Wait for a process that is not this one's child to end (a zombie counts: whoever reaps it is init)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.05)
    raise AssertionError(f"{proc.pid} still running")


def test_a_forked_child_runs_with_the_launcher_s_argv_env_cwd_stdio_and_exit_code(
    launcher: Path, task_server: tuple[Path, subprocess.Popen], tmp_path: Path
) -> None:
    sock, server = task_server
    done = run(launcher, sock, "echo", "7", cwd=tmp_path)
    assert done.returncode == 7
    assert done.stdout.splitlines() == [f"out {tmp_path} from-the-launcher"]
    assert "err" in done.stderr.splitlines()
    assert run(launcher, sock, "echo", "0").returncode == 0
    assert forked(server) == []  # both children reaped: no zombies
    # the socket is its user's alone
    assert (sock.stat().st_mode & 0o777, sock.parent.stat().st_mode & 0o777) == (0o600, 0o700)


def test_two_children_draw_different_numpy_numbers(
    launcher: Path, task_server: tuple[Path, subprocess.Popen]
) -> None:
    """SecAgg+ quantises stochastically with numpy's global RNG: forks of one process must not share it."""
    sock, _ = task_server
    draws = {run(launcher, sock, "rand").stdout.strip() for _ in range(2)}
    assert len(draws) == 2, draws


def test_sigterm_to_the_launcher_reaches_the_child_and_a_killed_launcher_takes_its_child_along(
    launcher: Path, task_server: tuple[Path, subprocess.Popen]
) -> None:
    sock, server = task_server
    env = {**os.environ, warm_clientapp.SOCKET_ENV: str(sock)}
    for sig, expected in ((signal.SIGTERM, -signal.SIGTERM), (signal.SIGKILL, -signal.SIGKILL)):
        proc = subprocess.Popen([str(launcher), "sleep"], env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "sleeping"  # the child runs, on the launcher's stdout
        (child,) = forked(server)
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == expected  # SIGTERM: the launcher ends as its child did
        proc.stdout.close()
        wait_gone(child)  # SIGKILL: the server saw its launcher's end close and stopped the child
        deadline = time.monotonic() + 10
        while forked(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert forked(server) == []


def test_without_a_server_the_launcher_starts_flower_s_clientapp_cold(launcher: Path, tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"  # a server that died: its socket file is still there
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(str(stale))
    for sock in (None, tmp_path / "absent.sock", stale):
        done = run(launcher, sock, "--help")
        assert done.returncode == 0 and "--runtime-api-address" in done.stdout, done.stderr


def test_flower_s_clientapp_runs_warm_and_dies_with_the_superexec(launcher: Path, tmp_path: Path) -> None:
    """The server as a home runs it: Flower's ``flwr-clientapp`` in the child, no torch in the server, and
    Flower's ``--parent-pid`` monitor still ends the child when the process that started it (the SuperExec)
    dies."""
    sock = tmp_path / "warm" / warm_clientapp.SOCKET_NAME
    server = start_server(sock, ["-m", "identifier.federated.warm_clientapp"])
    try:
        assert "libtorch" not in Path(f"/proc/{server.pid}/maps").read_text()
        done = run(launcher, sock, "--help")
        assert done.returncode == 0 and "--runtime-api-address" in done.stdout
        superexec = subprocess.Popen(["sleep", "60"])
        nothing = processes.free_port()  # no Runtime API there: the ClientApp waits for it
        env = {**os.environ, warm_clientapp.SOCKET_ENV: str(sock)}
        app = subprocess.Popen(
            [str(launcher), "--runtime-api-address", f"127.0.0.1:{nothing}", "--token", "t", "--insecure",
             "--parent-pid", str(superexec.pid)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not forked(server):
            assert time.monotonic() < deadline and app.poll() is None
            time.sleep(0.05)
        time.sleep(0.5)
        assert app.poll() is None  # waiting on the Runtime API
        superexec.kill()
        superexec.wait()
        app.wait(timeout=20)  # Flower's monitor saw its parent go: the child exited, then its launcher
        assert forked(server) == []
    finally:
        stop(server)
    assert not sock.exists()  # a server that was stopped leaves no socket behind


def test_the_server_exits_with_the_process_that_started_it(tmp_path: Path) -> None:
    """``start`` is what the SuperNode wrapper calls; when the SuperNode dies, its server goes too."""
    state = tmp_path / "warm"
    node = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys, time; from pathlib import Path; from identifier.federated import warm_clientapp\n"
         "assert warm_clientapp.start(Path(sys.argv[1]))\n"
         "print(os.environ[warm_clientapp.SOCKET_ENV], flush=True); time.sleep(120)", str(state)],
        env={**os.environ, "PYTHONPATH": str(processes.PACKAGE_ROOT)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert node.stdout.readline().strip() == str(warm_clientapp.socket_path(state))
        (server,) = psutil.Process(node.pid).children()
        deadline = time.monotonic() + 60
        while not warm_clientapp.socket_path(state).exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        node.kill()
        node.wait()
        node.stdout.close()
    wait_gone(server)
    assert not warm_clientapp.socket_path(state).exists()
