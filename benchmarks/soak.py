"""Soak: N virtual clients send a steady R queries a second for D seconds to a real ``iotgw run``, while the
daemon's resident memory and open file descriptors are sampled. Prints one JSON object.

Network (root only): the daemon and a dnsmasq upstream live in one network namespace, the clients in
another, joined by a veth pair. Each client is a macvlan interface on the client end of the veth, with its
own MAC and IPv4 address, so the gateway sees N distinct devices (its tracker keys devices by MAC, from the
kernel's neighbour table) without N namespaces: one namespace per client would cost N sets of kernel
state, while macvlans are a few kilobytes each. One generator process drives all clients, each socket bound
to its macvlan (SO_BINDTODEVICE) so its packets leave with that MAC.

Usage: python benchmarks/soak.py [--clients 200] [--qps 2000] [--duration 1800] [--sample-s 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GW_IP = "10.99.0.1"
PREFIX = 16
TIMEOUT_S = 2.0  # a query unanswered this long counts as an error
UNIQUE_SHARE = 0.05  # queries for never-seen names: they are forwarded and churn the answer cache
NAMES_PER_CLIENT = 20  # what a device asks again and again (its cloud, NTP, ...)


def client_ip(i: int) -> str:
    return f"10.99.{1 + i // 250}.{1 + i % 250}"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


def build_network(stack: ExitStack, tag: str, clients: int) -> tuple[str, str]:
    """The two namespaces, the veth and the macvlans; removed when ``stack`` closes."""
    gw, cl = f"soak-gw-{tag}", f"soak-cl-{tag}"
    for ns in (gw, cl):
        sh("ip", "netns", "add", ns)
        stack.callback(subprocess.run, ["ip", "netns", "del", ns], check=False)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", "sgw0", "netns", gw, "type", "veth", "peer", "name", "scl0", "netns", cl)
    sh("ip", "-n", gw, "addr", "add", f"{GW_IP}/{PREFIX}", "dev", "sgw0")
    sh("ip", "-n", gw, "link", "set", "sgw0", "up")
    sh("ip", "-n", cl, "link", "set", "scl0", "up")
    # Every macvlan holds an address of the same prefix: answer ARP only for the interface's own address,
    # and accept replies on any of them (the reverse-path check would pick one route for all).
    for key, value in (("arp_ignore", "1"), ("arp_announce", "2"), ("rp_filter", "0")):
        for scope in ("all", "default"):
            sh("ip", "netns", "exec", cl, "sysctl", "-qw", f"net.ipv4.conf.{scope}.{key}={value}")
    batch = []
    for i in range(clients):
        batch.append(f"link add m{i} link scl0 type macvlan mode bridge")
        batch.append(f"addr add {client_ip(i)}/{PREFIX} dev m{i}")
        batch.append(f"link set m{i} up")
    subprocess.run(["ip", "-n", cl, "-batch", "-"], input="\n".join(batch) + "\n", check=True, text=True,
                   capture_output=True, timeout=120)
    return gw, cl


def write_config(path: Path, state: Path) -> None:
    path.write_text(f"""
[gateway]
state_dir = "{state}"
[dns]
listen = ["{GW_IP}:53"]
upstreams = ["127.0.0.1:5300"]
lan = ["10.99.0.0/16"]
[capture]
sniff = false
""")


def start(stack: ExitStack, cmd: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    stack.callback(stop)
    return proc


def wait_ready(ns: str, daemon: subprocess.Popen, log: Path) -> None:
    probe = ("import dns.message, dns.query; "
             f"dns.query.udp(dns.message.make_query('ready.soak.test', 'A'), '{GW_IP}', timeout=0.5)")
    deadline = time.monotonic() + 60
    while subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", probe], capture_output=True).returncode:
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the daemon did not come up:\n{log.read_text()}")
        time.sleep(0.5)


def sample(pid: int) -> tuple[float, int, float]:
    """(resident MB, open file descriptors, CPU seconds used) of ``pid``, read from /proc."""
    with open(f"/proc/{pid}/statm") as fh:
        rss_pages = int(fh.read().split()[1])
    with open(f"/proc/{pid}/stat") as fh:
        utime, stime = fh.read().rsplit(")", 1)[1].split()[11:13]
    cpu = (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")
    return rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**20, len(os.listdir(f"/proc/{pid}/fd")), cpu


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB), in MB per hour."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / var * 3600 if var else 0.0


def query(qid: int, name: str) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack(">HH", 1, 1)


def generate(clients: int, qps: float, duration: float) -> dict:
    """The load, run inside the clients' namespace: an even pace, round robin over the clients."""
    socks = []
    for i in range(clients):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, f"m{i}".encode())
        s.bind((client_ip(i), 0))
        s.setblocking(False)
        socks.append(s)
    by_fd = {s.fileno(): i for i, s in enumerate(socks)}
    poller = select.epoll()
    for s in socks:
        poller.register(s.fileno(), select.EPOLLIN)
    names = [[f"n{j}.c{i}.soak.test" for j in range(NAMES_PER_CLIENT)] for i in range(clients)]
    outstanding: dict[tuple[int, int], float] = {}
    rcodes: dict[str, int] = {}
    sent = answered = timeouts = unique = 0
    next_id = [random.randrange(65536) for _ in range(clients)]
    t0 = time.monotonic()
    last_sweep = t0
    while True:
        now = time.monotonic()
        elapsed = now - t0
        due = min(int(qps * min(elapsed, duration)), int(qps * duration)) - sent
        # Only once the last query is sent: it falls due at the very end, when nothing may be outstanding.
        if elapsed >= duration and not outstanding and due <= 0:
            break
        for _ in range(max(due, 0)):
            i = sent % clients
            qid = next_id[i] = (next_id[i] + 1) & 0xFFFF
            if random.random() < UNIQUE_SHARE:
                unique += 1
                name = f"u{unique}.c{i}.soak.test"
            else:
                name = random.choice(names[i])
            try:
                socks[i].sendto(query(qid, name), (GW_IP, 53))
                outstanding[(i, qid)] = now
            except OSError:
                rcodes["send_error"] = rcodes.get("send_error", 0) + 1
            sent += 1
        for fd, _ in poller.poll(0.005):
            i = by_fd[fd]
            while True:
                try:
                    data = socks[i].recv(4096)
                except BlockingIOError:
                    break
                if len(data) < 12 or outstanding.pop((i, int.from_bytes(data[:2], "big")), None) is None:
                    continue  # late (already counted as a timeout) or not ours
                answered += 1
                rcode = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED")[data[3] & 0x0F] \
                    if data[3] & 0x0F < 6 else str(data[3] & 0x0F)
                rcodes[rcode] = rcodes.get(rcode, 0) + 1
        if now - last_sweep > 0.5:
            last_sweep = now
            for key in [k for k, t in outstanding.items() if now - t > TIMEOUT_S]:
                del outstanding[key]
                timeouts += 1
    return {"sent": sent, "answered": answered, "timeouts": timeouts, "rcodes": rcodes,
            "elapsed_s": time.monotonic() - t0}


def soak(clients: int, qps: float, duration: float, sample_s: float) -> dict:
    for tool in ("ip", "dnsmasq"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    if os.geteuid() != 0:
        raise SystemExit("network namespaces need root")
    with tempfile.TemporaryDirectory(prefix="iotgw-soak-") as tmp, ExitStack() as stack:
        tmpdir = Path(tmp)
        gw, cl = build_network(stack, str(os.getpid()), clients)
        start(stack, ["ip", "netns", "exec", gw, "dnsmasq", "--no-daemon", "--port=5300",
                      "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
                      "--conf-file=/dev/null", "--user=root", f"--pid-file={tmpdir / 'dnsmasq.pid'}",
                      "--address=/soak.test/192.0.2.1", "--local-ttl=60", "--cache-size=0"], tmpdir / "dnsmasq.log")
        write_config(tmpdir / "iotgw.toml", tmpdir / "state")
        daemon = start(stack, ["ip", "netns", "exec", gw, sys.executable, "-m", "gateway.cli", "run", "--config",
                               str(tmpdir / "iotgw.toml")], tmpdir / "daemon.log")
        wait_ready(cl, daemon, tmpdir / "daemon.log")
        samples = [(0.0, *sample(daemon.pid))]
        gen = subprocess.Popen(["ip", "netns", "exec", cl, sys.executable, __file__, "--generate",
                                "--clients", str(clients), "--qps", str(qps), "--duration", str(duration)],
                               stdout=subprocess.PIPE, text=True, cwd=ROOT)
        stack.callback(lambda: gen.poll() is None and (gen.kill(), gen.wait()))  # interrupted mid-run
        t0 = time.monotonic()
        while gen.poll() is None:
            time.sleep(min(sample_s, max(0.1, duration - (time.monotonic() - t0))) if duration else sample_s)
            if daemon.poll() is not None:
                gen.kill()
                raise SystemExit(f"the daemon died:\n{(tmpdir / 'daemon.log').read_text()[-3000:]}")
            samples.append((time.monotonic() - t0, *sample(daemon.pid)))
        load = json.loads(gen.stdout.read())
        with sqlite3.connect(tmpdir / "state" / "iotgw-querylog.sqlite") as db:
            rows = db.execute("SELECT count(*) FROM queries").fetchone()[0]
        with sqlite3.connect(tmpdir / "state" / "iotgw.sqlite") as db:
            devices = db.execute("SELECT count(*) FROM devices WHERE mac NOT LIKE 'ip:%'").fetchone()[0]
        log = (tmpdir / "daemon.log").read_text()
    second_half = [(t, rss) for t, rss, _, _ in samples if t >= duration / 2]
    half_rss, half_fds = second_half[0][1], next(f for t, _, f, _ in samples if t >= duration / 2)
    errors = load["timeouts"] + sum(n for k, n in load["rcodes"].items() if k not in ("NOERROR", "NXDOMAIN"))
    return {
        "duration_s": duration,
        "clients": clients,
        "qps_target": qps,
        "qps_achieved": round(load["answered"] / load["elapsed_s"], 1),
        "sent": load["sent"],
        "answered": load["answered"],
        "errors": errors,
        "timeouts": load["timeouts"],
        "rcodes": load["rcodes"],
        "rss_mb_start": round(samples[0][1], 1),
        "rss_mb_half": round(half_rss, 1),
        "rss_mb_end": round(samples[-1][1], 1),
        "rss_mb_max": round(max(r for _, r, _, _ in samples), 1),
        "rss_slope_mb_per_h_second_half": round(slope_per_hour(second_half), 2),
        "fds_start": samples[0][2],
        "fds_half": half_fds,
        "fds_end": samples[-1][2],
        "fds_max": max(f for _, _, f, _ in samples),
        "daemon_cpu_pct": round(100 * (samples[-1][3] - samples[0][3]) / samples[-1][0], 1),
        "samples": len(samples),
        "querylog_rows": rows,
        "devices_by_mac": devices,
        "daemon_errors_logged": sum(1 for line in log.splitlines() if " ERROR " in line),
        # Twenty points of (s, RSS MB, fds) across the run: the shape behind the figures above.
        "series": [[round(t), round(r, 1), f] for t, r, f, _ in samples[:: max(1, len(samples) // 20)]],
        "note": "shared 2-core machine (other helpers' work ran alongside): compare runs side by side",
    }


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from gateway.cli import positive_count, positive_seconds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=positive_count, default=200)
    parser.add_argument("--qps", type=float, default=2000)
    parser.add_argument("--duration", type=positive_seconds, default=1800)
    parser.add_argument("--sample-s", type=positive_seconds, default=5.0)
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)  # the load, in its netns
    args = parser.parse_args()
    if args.generate:
        print(json.dumps(generate(args.clients, args.qps, args.duration)))
    else:
        from gateway.cli import interrupt_on_stop_signals

        interrupt_on_stop_signals()  # SIGTERM, too, ends every process and removes the namespaces
        print(json.dumps(soak(args.clients, args.qps, args.duration, args.sample_s)))


if __name__ == "__main__":
    main()
