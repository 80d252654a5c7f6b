"""A SuperLink and N SuperNodes on loopback, each home with its own dataset and state directory.

What the tests, the benchmark and the simulation's end-to-end check run: real Flower processes, started
with ``processes``' command lines. Each SuperNode gets its own session so a home can be killed with all the
ClientApp processes it spawned, as a power cut would. Every process the fleet starts, and every process those
start, carries the fleet's mark (``processes.MARK_ENV``): ``stop`` (or leaving ``with LocalFleet(...)``)
ends them all, also the ServerApp that Flower starts outside the SuperLink's session.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from identifier.dataset import LabelledWindow
from identifier.federated import homedata, processes, warm_clientapp


@dataclass
class Home:
    index: int
    data: Path
    state_dir: Path
    port: int
    auth_key: Path | None = None
    proc: subprocess.Popen | None = None
    superlink: str = ""  # the address its SuperNode connects to; empty: the fleet's SuperLink

    def stages(self) -> list[tuple[str, str]]:
        """The (round, SecAgg+ stage) pairs this home's ClientApp has entered, in order."""
        log = self.state_dir / "rounds.log"
        if not log.exists():
            return []
        entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        return [(e["round"], e["stage"]) for e in entries if e.get("event") == "stage"]

    def warm_clientapps(self) -> int:
        """How many ClientApp processes the home's warm server forked (it logs each to the SuperNode's log)."""
        log = self.state_dir / "supernode.log"
        return log.read_text(errors="replace").count(warm_clientapp.FORK_LOG) if log.exists() else 0


@dataclass
class RunResult:
    returncode: int
    run_id: int | None
    report: dict
    output: str


@dataclass
class LocalFleet:
    root: Path
    tls: processes.Tls | None = None
    node_auth: bool = False
    homes: list[Home] = field(default_factory=list)
    superlink: subprocess.Popen | None = None
    port: int = 0
    mark: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return self._env(self.root / "server")

    def _env(self, state_dir: Path) -> dict[str, str]:
        return {**processes.flower_env(state_dir), processes.MARK_ENV: self.mark}

    def start_superlink(self) -> None:
        self.port = processes.free_port()
        server_dir = self.root / "server"
        server_dir.mkdir(parents=True, exist_ok=True)
        # In memory: nothing of a local fleet outlives it, and with 20 homes polling, the SQLite file's write
        # lock made the SuperLink answer pushes with "database is locked" (docs/federation.md, "Round cost").
        cmd = processes.superlink_cmd("127.0.0.1", self.port, processes.IN_MEMORY, self.tls, self.node_auth)
        self.superlink = self._spawn(cmd, self.env, server_dir / "superlink.log")
        processes.wait_for_port("127.0.0.1", self.port)
        processes.write_connection(server_dir, "iotgw", self.address, self.tls.ca if self.tls else None)

    def add_home(
        self, windows: list[LabelledWindow], auth_key: Path | None = None, superlink: str = ""
    ) -> Home:
        index = len(self.homes)
        home_dir = self.root / f"home{index}"
        home_dir.mkdir(parents=True, exist_ok=True)
        data = home_dir / "confirmed.jsonl"
        homedata.save(windows, data)
        home = Home(index, data, home_dir, processes.free_port(), auth_key, superlink=superlink)
        self.homes.append(home)
        self.start_home(home)
        return home

    def start_home(self, home: Home, max_wait: float | None = None) -> None:
        cmd = processes.supernode_cmd(
            home.superlink or self.address,
            home.port,
            home.data,
            home.state_dir,
            self.tls.ca if self.tls else None,
            home.auth_key,
            max_wait,
        )
        home.proc = self._spawn(cmd, self._env(home.state_dir), home.state_dir / "supernode.log")

    def wait_connected(self, timeout: float = 300.0) -> None:
        """Block until every home's SuperNode has connected to the SuperLink (it logs its node ID then), so
        that a run does not spend its first round waiting for homes that are still starting."""
        deadline = time.monotonic() + timeout
        for home in self.homes:
            log = home.state_dir / "supernode.log"
            while not (log.exists() and "SuperNode ID:" in log.read_text(errors="replace")):
                if home.proc is not None and home.proc.poll() is not None:
                    raise RuntimeError(f"home {home.index}'s SuperNode exited (see {log})")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"home {home.index}'s SuperNode did not connect in {timeout:.0f} s")
                time.sleep(0.2)

    def kill_home(self, home: Home) -> None:
        """SIGKILL the home's SuperNode and every process it spawned."""
        if home.proc is not None and home.proc.poll() is None:
            os.killpg(home.proc.pid, signal.SIGKILL)
            home.proc.wait()

    def run(
        self,
        run_config: dict[str, object],
        out_dir: Path,
        timeout: float = 900,
        app_dir: Path = processes.APP_DIR,
    ) -> RunResult:
        """``flwr run`` the iotgw app; returns when the run ends, with the ServerApp's round report."""
        server_dir = self.root / "server"
        cfg = processes.write_run_config(
            server_dir / "run-config.toml", {**run_config, "out-dir": str(out_dir)}
        )
        proc = subprocess.run(
            processes.run_cmd("iotgw", cfg, app_dir),
            env=self.env,
            cwd=server_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        output = proc.stdout + proc.stderr
        match = re.search(r"Successfully started run (\d+)", output)
        run_id = int(match.group(1)) if match else None
        report_path = out_dir / f"run-{run_id}.json"
        report = json.loads(report_path.read_text()) if run_id and report_path.exists() else {}
        return RunResult(proc.returncode, run_id, report, output)

    def stop(self) -> None:
        """End every process this fleet started, directly or not, whatever state the run is in."""
        for home in self.homes:
            self.kill_home(home)
        processes.stop_marked(self.mark)
        for proc in [self.superlink, *(h.proc for h in self.homes)]:
            if proc is not None:
                proc.wait()  # reap our own children

    @staticmethod
    def _spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
        log = log_path.open("ab")
        try:
            return subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()
