"""A warm ``flwr-clientapp`` per home: a fork server that has already imported Flower's ClientApp runtime.

Flower 1.41's SuperExec starts a new ``flwr-clientapp`` process for every message to a home (a SecAgg+
round is four, plain FedAvg one), and each spends ~1 s of CPU importing flwr before it does anything
(docs/federation.md, "Round cost"); Flower's warm executor pools are Kubernetes-only. So the SuperNode
wrapper (``supernode.main``) starts this server first. It imports what a ClientApp process needs (Flower's
``flwr_clientapp`` the way ``clientapp_process`` loads it, and ``client_app``; not torch, which training
imports) and waits on a unix socket. The ``flwr-clientapp`` launcher that ``supernode.install_launcher``
writes (``main`` here, stdlib only) hands the server its command line, environment, working directory and
stdin/stdout/stderr; the server forks a child that takes them over and runs Flower's own
``flwr_clientapp()``, and reports the child's exit back to the launcher, which exits the same way and
forwards SIGTERM/SIGINT to the child. Without a server the launcher runs ``clientapp_process`` as before.

Fork safety: the server starts no thread and creates no gRPC or HTTP client (gRPC Python supports fork when
its objects are created after it; numpy's OpenBLAS stops its worker threads around a fork). Each child
reseeds numpy's global RNG, which SecAgg+'s stochastic quantisation draws from (``random`` reseeds itself).
The socket's directory is 0700 and the server only serves its own user: a child runs whatever ClientApp
the runtime address it is given serves.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

SOCKET_ENV = "IOTGW_CLIENTAPP_SOCKET"
SOCKET_NAME = "clientapp.sock"
FORK_LOG = "warm clientapp: forked child"
MAX_MESSAGE = 1 << 20  # command line and environment of one launcher
REPLY_TIMEOUT_S = 30.0  # a live server forks at once; longer means it is stuck: start cold instead


# --- the launcher's side: what runs as ``flwr-clientapp`` (imports only the standard library) ---


def launch(argv: list[str], path: str) -> int | None:
    """Run ``argv`` in a child of the server at ``path``, with this process's stdio; the child's exit code
    (negative: killed by that signal), or None if no server took the task (nothing was started then)."""
    child: list[int] = []
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if not child:
            pending.append(signum)
            return
        try:
            os.kill(child[0], signum)
        except ProcessLookupError:  # exited already; its status is on its way
            pass

    before = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        try:
            sock.settimeout(REPLY_TIMEOUT_S)
            sock.connect(path)
            task = {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}
            socket.send_fds(sock, [json.dumps(task).encode()], [0, 1, 2])
            reply = sock.recv(64).split()
        except OSError:  # no server, a stale socket, or a server that does not answer
            reply = []
        if not reply:
            for sig, handler in before.items():
                signal.signal(sig, handler)
            return -pending[0] if pending else None  # asked to stop before anything started: done
        child.append(int(reply[1]))
        for sig in pending:
            os.kill(child[0], sig)
        sock.settimeout(None)
        try:
            status = sock.recv(64).split()
        except OSError:
            status = []
    if not status:  # the server died: its child is on its own, stop it as a cold ClientApp would be
        try:
            os.kill(child[0], signal.SIGTERM)
        except ProcessLookupError:
            pass
        return 1
    return int(status[1]) if status[0] == b"exit" else -int(status[1])


def main() -> None:
    """``flwr-clientapp``: run warm through the home's server if it answers, else start cold."""
    path = os.environ.get(SOCKET_ENV)
    code = launch(["flwr-clientapp", *sys.argv[1:]], path) if path else None
    if code is None:
        from identifier.federated.clientapp_process import main as cold

        cold()  # exits
        return
    if code < 0:  # end the way the child ended, for whoever waits on this process
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code  # a signal whose default is not to end a process: the shell's convention
    sys.exit(code)


# --- the server's side ---


def run_flower_clientapp() -> None:
    """A child's task: Flower's own ``flwr-clientapp`` with the command line the launcher was given."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()


def preload() -> None:
    """Import what every ClientApp process imports, so that children start with it loaded."""
    from identifier.federated import clientapp_process

    clientapp_process.register_light_cli()
    import flwr.supernode.cli.flwr_clientapp  # noqa: F401

    import identifier.federated.client_app  # noqa: F401


def socket_path(state: Path) -> Path:
    return state / SOCKET_NAME


def temp_path(path: Path, pid: int) -> Path:
    """Where the server binds before renaming the socket into place (``path``)."""
    return path.with_name(f".{path.name}.{pid}")


class Server:
    """Accepts launchers on ``path`` and runs each one's task in a forked child until ``parent_pid`` exits.

    One thread: a selector over the listening socket, each launcher's connection, a pidfd per child (ready
    when it exits, then it is reaped and its exit sent to its launcher) and a pidfd of the parent."""

    def __init__(self, path: Path, parent_pid: int, task: Callable[[], None]) -> None:
        import selectors

        self.path = path
        self.task = task
        self.selector = selectors.DefaultSelector()
        try:
            self.parent = os.pidfd_open(parent_pid)
        except ProcessLookupError:
            raise SystemExit(0) from None
        if os.getppid() != parent_pid:  # gone (and its pid taken) before we could watch it
            raise SystemExit(0)
        self.selector.register(self.parent, selectors.EVENT_READ, ("parent", None))
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        tmp = temp_path(path, os.getpid())
        tmp.unlink(missing_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(tmp))
        os.chmod(tmp, 0o600)
        self.listener.listen(16)
        tmp.replace(path)  # launchers see the socket only once it is served
        self.selector.register(self.listener, selectors.EVENT_READ, ("listener", None))
        self.children: dict[int, tuple[int, socket.socket | None]] = {}  # pidfd -> (pid, its launcher)
        self.forked = 0

    def serve(self) -> None:
        try:
            while True:
                for key, _ in self.selector.select():
                    kind, conn = key.data
                    if kind == "parent":
                        return
                    if kind == "listener":
                        self._accept()
                    elif kind == "task":
                        self._start(conn)
                    elif kind == "launcher":
                        self._launcher_gone(conn)
                    else:
                        self._reap(key.fd)
        finally:
            self.path.unlink(missing_ok=True)

    def _accept(self) -> None:
        import selectors
        import struct

        conn, _ = self.listener.accept()
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[1] != os.getuid():  # the socket's mode says so too; be sure
            conn.close()
            return
        self.selector.register(conn, selectors.EVENT_READ, ("task", conn))

    def _start(self, conn: socket.socket) -> None:
        import selectors

        self.selector.unregister(conn)
        try:
            msg, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 3)
            task = json.loads(msg) if len(fds) == 3 else None
        except (OSError, ValueError):
            task, fds = None, []
        if not task:  # a launcher that gave up, or not a launcher: nothing to run
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()  # or the child writes the server's buffered output again
        pid = os.fork()
        if pid == 0:
            self._child(task, fds, conn)
        for fd in fds:
            os.close(fd)
        self.forked += 1
        print(f"{FORK_LOG} {self.forked} (pid {pid})", file=sys.stderr, flush=True)
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = (pid, conn)
        self.selector.register(pidfd, selectors.EVENT_READ, ("child", None))
        self.selector.register(conn, selectors.EVENT_READ, ("launcher", conn))
        try:
            conn.send(f"pid {pid}".encode())
        except OSError:
            self._launcher_gone(conn)

    def _launcher_gone(self, conn: socket.socket) -> None:
        """The launcher's end closed before its child exited: it was killed, so its child is stopped too."""
        self.selector.unregister(conn)
        conn.close()
        for pidfd, (pid, launcher) in self.children.items():
            if launcher is conn:
                self.children[pidfd] = (pid, None)
                os.kill(pid, signal.SIGTERM)

    def _reap(self, pidfd: int) -> None:
        pid, conn = self.children.pop(pidfd)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        if conn is None:
            return
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        reply = f"signal {sig}" if sig else f"exit {os.waitstatus_to_exitcode(status)}"
        self.selector.unregister(conn)
        try:
            conn.send(reply.encode())
        except OSError:
            pass
        conn.close()

    def _child(self, task: dict, fds: list[int], conn: socket.socket) -> NoReturn:
        """In the forked child: become the launcher's ``flwr-clientapp`` process and run the task."""
        code: object = 1
        try:
            for sig in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.selector.close()
            self.listener.close()
            conn.close()
            for fd in [self.parent, *self.children]:
                os.close(fd)
            for _, conn in self.children.values():
                if conn is not None:
                    conn.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            os.chdir(task["cwd"])
            os.environ.clear()
            os.environ.update(task["env"])
            sys.argv = list(task["argv"])
            if "numpy" in sys.modules:  # its global RNG was the server's: every child would draw the same
                sys.modules["numpy"].random.seed()
            self.task()
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        except BaseException:  # noqa: BLE001 - report it as the process would, then exit
            import traceback

            traceback.print_exc()
        finally:
            if not isinstance(code, int | None):
                print(code, file=sys.stderr)
                code = 1
            import logging

            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            # Not sys.exit: that would unwind into the server's loop. The server's atexit handlers are not
            # the child's to run.
            os._exit(code or 0)


def start(state: Path) -> bool:
    """Start this home's server (a child of this process) on ``state``'s socket and hand the path to the
    processes this one starts (``SOCKET_ENV``). False if the path is too long for a unix socket (launchers
    then start cold)."""
    import subprocess
    import threading

    import identifier

    path = socket_path(state)
    if len(os.fsencode(temp_path(path, 4194304))) >= 108:  # sun_path, with the longest pid Linux gives
        print(f"warm clientapp: {path} is too long for a unix socket; ClientApps start cold", file=sys.stderr)
        return False
    root = str(Path(identifier.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "identifier.federated.warm_clientapp", str(path), str(os.getpid())], env=env
    )
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it should it end first
    os.environ[SOCKET_ENV] = str(path)
    return True


def serve_main(task: Callable[[], None] = run_flower_clientapp) -> None:
    """``python -m identifier.federated.warm_clientapp SOCKET PARENT_PID``: serve until PARENT_PID exits."""
    path, parent_pid = Path(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave no socket behind
    preload()
    Server(path, parent_pid, task).serve()


if __name__ == "__main__":
    serve_main()
