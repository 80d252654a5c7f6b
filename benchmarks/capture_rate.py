"""Passive capture rate: the highest DNS packet rate the sniffer records with no loss, in network namespaces.

Two namespaces joined by a veth pair. In the client namespace a sender writes prebuilt Ethernet frames (DNS
queries for 1,000 names from 20 devices, addressed to a host that does not exist, as a mirror port would show
them) to an AF_PACKET socket at a fixed rate, in 1 ms bursts. In the gateway namespace a separate process runs
``gateway.capture.sniffer.Sniffer`` with a sink that counts the DnsQuery events. Rates double until a step
loses a packet, then a binary search narrows the limit; a step is lossless when every frame sent came out as
an event and the kernel counted no drop. Sender, sniffer and kernel share the machine's cores.

Prints one JSON object: lossless_pps, rss_mb (the capturing process's peak RSS), cpu_us_per_query, limited_by,
steps (every rate tried).
Needs root; otherwise prints {"error": ...}.

    python benchmarks/capture_rate.py [--seconds 3] [--max-pps 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GHOST_IP = "10.213.0.77"  # nobody has it: the gateway's kernel drops the frames silently after capture


def main() -> int:
    from gateway.cli import positive_count, positive_seconds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=positive_seconds, default=3.0, help="length of each rate step")
    parser.add_argument("--max-pps", type=positive_count, default=200_000, help="stop doubling here")
    parser.add_argument("--start-pps", type=positive_count, default=5_000)  # 0 would double forever
    parser.add_argument("--capture", metavar="IFACE", help=argparse.SUPPRESS)
    parser.add_argument("--send", nargs=4, metavar=("IFACE", "DST_MAC", "PPS", "SECONDS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.capture:
        return capture_child(args.capture)
    if args.send:
        iface, dst_mac, pps, seconds = args.send
        return send_child(iface, dst_mac, int(pps), float(seconds))
    if os.geteuid() != 0:
        print(json.dumps({"error": "needs root (network namespaces, AF_PACKET)"}))
        return 1
    from gateway.cli import interrupt_on_stop_signals

    interrupt_on_stop_signals()  # SIGTERM, too, removes the namespaces and ends the capture process
    print(json.dumps(run(args.seconds, args.start_pps, args.max_pps)))
    return 0


def run(seconds: float, start_pps: int, max_pps: int) -> dict:
    from tests.capture_netns import veth_pair

    with veth_pair(f"b{os.getpid()}") as pair:
        child = subprocess.Popen(
            ["ip", "netns", "exec", pair.gw, sys.executable, __file__, "--capture", pair.gw_if],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert child.stdout is not None and child.stdin is not None
            if child.stdout.readline().strip() != "ready":
                return {"error": "capture process did not start"}

            def stats() -> dict:
                child.stdin.write("stats\n")
                child.stdin.flush()
                return json.loads(child.stdout.readline())

            steps: list[dict] = []
            first = stats()

            def step(pps: int) -> bool:
                before = stats()
                out = subprocess.run(
                    ["ip", "netns", "exec", pair.client, sys.executable, __file__, "--send", pair.client_if,
                     pair.gw_mac, str(pps), str(seconds)],
                    capture_output=True, text=True, check=True,
                )
                sent = json.loads(out.stdout)
                after = _settled(stats, before["queries"] + sent["sent"])
                recorded = after["queries"] - before["queries"]
                dropped = after["dropped"] - before["dropped"]
                lossless = recorded == sent["sent"] and dropped == 0
                # A sender that could not keep the rate measured less than asked: not a pass at this rate.
                on_rate = sent["achieved_pps"] >= 0.97 * pps
                steps.append({"pps": pps, "achieved_pps": sent["achieved_pps"], "sent": sent["sent"],
                              "recorded": recorded, "dropped": dropped, "lossless": lossless,
                              "sender_kept_rate": on_rate})
                return lossless and on_rate

            good, bad = 0, None
            pps = start_pps
            while pps <= max_pps:  # double until a step loses packets
                if not step(pps):
                    bad = pps
                    break
                good, pps = pps, pps * 2
            while bad is not None and bad - good > max(500, good // 20):  # then bisect to within 5 %
                mid = (good + bad) // 2
                if step(mid):
                    good = mid
                else:
                    bad = mid
            final = stats()
            recorded = sum(s["recorded"] for s in steps)
            return {
                "lossless_pps": good,
                "rss_mb": round(final["peak_rss_mb"], 1),
                "seconds_per_step": seconds,
                "steps": steps,
                # "sender" when the lowest rate that failed did so because the sender could not keep it:
                # the capture's own limit is then higher than lossless_pps.
                "limited_by": _limit(steps, bad),
                "capture_malformed": final["malformed"],
                # CPU the capturing process spent per recorded query (all threads): 1e6 / this is the rate
                # one free core would sustain, a figure less at the mercy of the machine's other load.
                "cpu_us_per_query": round((final["cpu_s"] - first["cpu_s"]) / max(1, recorded) * 1e6, 1),
                "note": "2-core machine shared with other jobs; sender, kernel and sniffer compete for it",
            }
        finally:
            child.kill()
            child.wait()


def _limit(steps: list[dict], bad: int | None) -> str:
    if bad is None:
        return "max_pps"
    failed = next(s for s in steps if s["pps"] == bad)
    return "capture" if failed["dropped"] or failed["recorded"] < failed["sent"] else "sender"


def _settled(stats, expected: int) -> dict:
    """Stats once the sniffer has drained its queue: it reached ``expected`` or stopped moving."""
    last = stats()
    deadline = time.monotonic() + 5
    while last["queries"] < expected and time.monotonic() < deadline:
        time.sleep(0.25)
        now = stats()
        if now["queries"] == last["queries"]:
            return now
        last = now
    return last


def capture_child(iface: str) -> int:
    """The capturing process: a Sniffer whose sink counts queries; answers "stats" lines on stdin."""
    from gateway.capture.sniffer import Sniffer
    from gateway.events import DnsQuery

    queries = 0

    def sink(events: list) -> None:
        nonlocal queries
        queries += sum(1 for e in events if isinstance(e, DnsQuery))

    sniffer = Sniffer(iface, sink)
    sniffer.start()
    print("ready", flush=True)
    for _line in sys.stdin:
        sniffer.read_stats()  # the kernel's drops now, not within a second
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"queries": queries, "dropped": sniffer.counters.get("capture_dropped"),
                          "malformed": sniffer.counters.get("capture_malformed"), "peak_rss_mb": peak,
                          "cpu_s": time.process_time()}),
              flush=True)
    sniffer.stop()
    return 0


def send_child(iface: str, dst_mac: str, pps: int, seconds: float) -> int:
    """Send DNS query frames at ``pps`` for ``seconds`` in 1 ms bursts; print what was really sent."""
    frames = _frames(dst_mac)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((iface, 0))
    send = sock.send
    total = int(pps * seconds)
    n = len(frames)
    sent = 0
    start = time.perf_counter()
    while sent < total:
        due = min(total, int((time.perf_counter() - start) * pps) + 1)
        while sent < due:
            try:
                send(frames[sent % n])
            except BlockingIOError:  # the veth queue is full: count it as not sent and retry
                break
            sent += 1
        time.sleep(0.001)
    elapsed = time.perf_counter() - start
    print(json.dumps({"sent": sent, "achieved_pps": round(sent / elapsed)}))
    return 0


def _frames(dst_mac: str) -> list[bytes]:
    from scapy.layers.dns import DNS, DNSQR
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    out = []
    for i in range(1000):
        dev = i % 20
        qname = f"host{i}.service{i % 97}.example{i % 13}.com"
        out.append(bytes(
            Ether(src=f"02:00:00:00:01:{dev:02x}", dst=dst_mac)
            / IP(src=f"10.213.0.{100 + dev}", dst=GHOST_IP)
            / UDP(sport=20000 + i, dport=53)
            / DNS(id=i, rd=1, qd=DNSQR(qname=qname, qtype="AAAA" if i % 3 == 0 else "A"))
        ))
    return out


if __name__ == "__main__":
    sys.exit(main())
