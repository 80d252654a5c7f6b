"""What re-identifying a home costs when a new model comes (JSON on stdout).

A real store of N devices, each with a stored first-minute window and the answer the shipped model gave it. The
windows are those of real captures read through the capture path (``capture_windows``, the first of each of the
31 iot-sentinel devices under ../shared/data, or IOTGW_DATA; the bundle's per-type prototypes when the data is
absent), each device given its template's MAC prefix and a device part of its own. The new model is the shipped
net with its open-set bars lowered, what a federated round that learnt the home's unknown products changes: the
devices it names differently are stored, applied and announced, as after a real install.

A real ``Gateway`` (DNS on loopback, its upstream an embedded one answering every name) runs that model and makes
the pass ``_reidentify_if_new`` starts, as after an install or at a start on another model. Measured: the pass's
wall time with its rests; its work (the rounds' time in their worker thread, and their CPU time); per device; the
process's RSS; and, from another process querying the daemon's DNS at a steady rate (never-seen names, so each
is forwarded), the answer latency while idle and during the pass.

    python benchmarks/reidentify.py [--devices 1000] [--qps 50] [--idle-s 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.cli import interrupt_on_stop_signals, positive_count, positive_number  # noqa: E402

TIMEOUT_S = 2.0  # a probe unanswered this long counts as lost


def templates() -> tuple[str, list[tuple[str, list[dict]]]]:
    """Windows to copy: (the device's MAC, its observations as the store keeps them)."""
    from gateway.daemon import WINDOW_MAX_OBS
    from identifier.bundle import Bundle
    from identifier.observation import to_json

    data = Path(os.environ.get("IOTGW_DATA") or ROOT.parent / "shared" / "data") / "iot-sentinel" / "captures"
    if data.is_dir():
        from gateway.capture.windows import capture_windows

        out = []
        for folder in sorted(data.iterdir()):
            pcap = sorted(folder.glob("*.pcap"))[0]
            mac = (folder / "_iotdevice-mac.txt").read_text().strip().lower()
            dev = capture_windows(pcap, 60.0).devices.get(mac)
            if dev:
                out.append((mac, [to_json(o) for o in dev.observations[:WINDOW_MAX_OBS]]))
        return "iot-sentinel captures (first of each device, 60 s)", out
    bundle = Bundle.load()
    ouis = bundle.oui_prefixes
    return "bundle prototypes", [(f"{ouis.get(t) or '02:00:00'}:00:00:00", seq) for t, seq in
                                 sorted(bundle.prototypes.items())]


def seed(store, old, count: int, windows: list[tuple[str, list[dict]]]) -> None:  # noqa: ANN001
    """``count`` devices with windows, identified by the model ``old`` as the daemon stores its answers."""
    from gateway.daemon import IDENTIFIED_BY_SETTING, record_identity, window_identity
    from gateway.store.schema import Device, ObservationWindow

    now = time.time()
    with store.transaction() as s:
        for i in range(count):
            template_mac, observations = windows[i % len(windows)]
            mac = f"{template_mac[:8]}:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
            start = now - 86_400 + i
            shifted = [{**obs, "t": obs["t"] - observations[0]["t"] + start} for obs in observations]
            device = Device(mac=mac, first_seen=start, last_seen=now, status="approved")
            s.add(device)
            s.add(ObservationWindow(mac=mac, started_at=start, observations=shifted))
            record_identity(s, device, start + 60, window_identity(old, mac, start, shifted))
    store.set_setting(IDENTIFIED_BY_SETTING, old.version)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6, 1)


def percentiles(values: list[float]) -> dict:
    values = sorted(values)

    def at(q: float) -> float | None:
        return round(values[min(len(values) - 1, int(q * len(values)))], 2) if values else None

    return {"count": len(values), "p50_ms": at(0.5), "p95_ms": at(0.95), "p99_ms": at(0.99),
            "max_ms": round(values[-1], 2) if values else None}


def query(qid: int, name: str) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack(">HH", 1, 1)


def probe(port: int, qps: float) -> None:
    """The other process: a query every 1/qps s until stdin closes, then one JSON line of (monotonic time sent,
    milliseconds to the answer or None). CLOCK_MONOTONIC is the machine's, so the parent can place each in time."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(TIMEOUT_S)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    out, i, due = [], 0, time.monotonic()
    while not stop.is_set():
        i += 1
        sent = time.monotonic()
        sock.sendto(query(i & 0xFFFF, f"p{i}.reidentify.test"), ("127.0.0.1", port))
        rtt = None
        try:
            while True:  # an answer to an earlier probe that timed out is not this one's
                data = sock.recv(512)
                if data[:2] == struct.pack(">H", i & 0xFFFF):
                    rtt = (time.monotonic() - sent) * 1000
                    break
        except TimeoutError:
            pass
        out.append((sent, rtt))
        due += 1 / qps
        time.sleep(max(0.0, due - time.monotonic()))
    print(json.dumps(out))


async def run(count: int, qps: float, idle_s: float) -> dict:
    from sqlalchemy import func, select

    from gateway.config import Config
    from gateway.daemon import IDENTIFIED_BY_SETTING, REIDENTIFY_BATCH, Gateway
    from gateway.demo import start_upstream
    from gateway.store.db import Store
    from gateway.store.schema import Identification
    from identifier.bundle import Bundle
    from identifier.stream import Identifier

    source, windows = templates()
    shipped = Bundle.load()
    th = replace(shipped.thresholds, known=0.0, known_unvoted=0.0, known_without_specific=0.0, max_new_words=1.0)
    new = replace(shipped, version=f"{shipped.version}-learnt", thresholds=th)
    with tempfile.TemporaryDirectory() as tmp:
        new.save(Path(tmp) / "model")
        upstream, upstream_port = await start_upstream()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = Config()
        cfg.gateway.state_dir = str(Path(tmp) / "state")
        cfg.identifier.model_dir = str(Path(tmp) / "model")
        cfg.dns.listen = [f"127.0.0.1:{port}"]
        cfg.dns.upstreams = [f"127.0.0.1:{upstream_port}"]
        cfg.dns.lan = ["127.0.0.0/8"]
        cfg.capture.sniff = False
        cfg.devices.max = max(cfg.devices.max, count + 10)  # room for the probing client beside the home
        store = Store(cfg.db_url)
        t0 = time.perf_counter()
        await asyncio.to_thread(seed, store, Identifier(shipped), count, windows)
        seed_s = time.perf_counter() - t0
        # Started as on the model the home was identified with, so the pass starts when the benchmark says.
        store.set_setting(IDENTIFIED_BY_SETTING, new.version)
        gw = Gateway(cfg, store)
        work = {"wall": 0.0, "cpu": 0.0, "rounds": 0}

        def timed(method):  # noqa: ANN001, ANN202 - a round's part, in its worker thread, with its time noted
            def run_timed(*args):  # noqa: ANN002, ANN202
                wall, cpu = time.perf_counter(), time.thread_time()
                try:
                    return method(*args)
                finally:
                    work["wall"] += time.perf_counter() - wall
                    work["cpu"] += time.thread_time() - cpu
            return run_timed

        gw._reidentify_batch = timed(gw._reidentify_batch)
        gw._store_answers = timed(gw._store_answers)
        prober = None
        try:
            await gw.start()
            prober = subprocess.Popen([sys.executable, __file__, "--probe", str(port), "--qps", str(qps)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            rss_before = rss_mb()
            await asyncio.sleep(idle_s)  # answers while idle, beside those during the pass
            store.set_setting(IDENTIFIED_BY_SETTING, shipped.version)
            began = time.monotonic()
            await gw._reidentify_if_new(gw.identifier)
            rss_peak = rss_before
            while not gw._reidentifying.done():
                await asyncio.sleep(0.1)
                rss_peak = max(rss_peak, rss_mb())
            ended = time.monotonic()
            gw._reidentifying.result()
            done = store.get_setting(IDENTIFIED_BY_SETTING) == new.version
            await asyncio.sleep(0.5)  # the last probes out
            latencies = json.loads((await asyncio.to_thread(prober.communicate, "", 30))[0])
        finally:
            if prober is not None and prober.poll() is None:  # interrupted mid-run
                prober.kill()
                prober.wait()
            await gw.stop()
            upstream.close()
        with store.session() as s:
            changed = s.scalar(select(func.count()).where(Identification.model_version == new.version))
        store.close()
    idle = [ms for sent, ms in latencies if sent < began and ms is not None]
    during = [ms for sent, ms in latencies if began <= sent <= ended and ms is not None]
    return {
        "source": source,
        "devices": count,
        "templates": len(windows),
        "observations_per_window_mean": round(sum(len(w) for _, w in windows) / len(windows), 1),
        "seed_s": round(seed_s, 2),
        "completed": done,
        "answers_changed": changed,
        "batch": REIDENTIFY_BATCH,
        "pass_wall_s": round(ended - began, 2),
        "work_s": round(work["wall"], 2),
        "work_cpu_s": round(work["cpu"], 2),
        "work_ms_per_device": round(work["wall"] * 1000 / count, 2),
        "rss_mb_before": rss_before,
        "rss_mb_peak": rss_peak,
        "rss_mb_max": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6, 1),  # kB
        "dns_qps": qps,
        "dns_idle": percentiles(idle),
        "dns_during_pass": percentiles(during),
        "dns_lost": sum(ms is None for _, ms in latencies),
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=positive_count, default=1000, help="devices in the store")
    ap.add_argument("--qps", type=positive_number, default=50.0, help="DNS probes a second during the run")
    ap.add_argument("--idle-s", type=positive_number, default=3.0, help="seconds of probes before the pass")
    ap.add_argument("--probe", type=int, help=argparse.SUPPRESS)  # the probing process's own mode
    args = ap.parse_args()
    if args.probe is not None:
        probe(args.probe, args.qps)
        return
    interrupt_on_stop_signals()  # SIGTERM, too, stops the daemon and removes the temporary store
    result = asyncio.run(run(args.devices, args.qps, args.idle_s))
    print(json.dumps(result))
    if not result["completed"]:  # a pass that failed measured nothing a script should take for its cost
        sys.exit("the pass did not complete: the model's version was not recorded (see the log above)")


if __name__ == "__main__":
    main()
