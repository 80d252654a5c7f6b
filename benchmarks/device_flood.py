"""What a flood of spoofed MACs costs the daemon, with and without ``[devices] max`` (JSON on stdout).

Each of N made-up MACs sends one DHCP request and one mDNS announcement, fed to a real ``Gateway`` (no DNS
listener, no sniffing, no identification: the device bookkeeping alone) on a fresh SQLite store, flushed as
the daemon flushes. Run twice side by side in one process, once with no practical bound and once with
``--max``: the memory the Python heap still holds afterwards (tracemalloc), the database's size, the devices
kept and those counted as not kept.

    python benchmarks/device_flood.py [--macs 10000] [--max 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.cli import interrupt_on_stop_signals, positive_count, whole_number  # noqa: E402
from gateway.config import Config  # noqa: E402
from gateway.daemon import Gateway  # noqa: E402
from gateway.events import DhcpSeen, MdnsSeen  # noqa: E402
from gateway.store.db import Store  # noqa: E402

UNBOUNDED = 1_000_000  # the highest [devices] max the config takes


def flood(state_dir: Path, macs: int, cap: int) -> dict:
    """Feed ``macs`` spoofed devices to a gateway whose ``[devices] max`` is ``cap``; what it keeps."""
    cfg = Config()
    cfg.gateway.state_dir = str(state_dir)
    cfg.dns.listen = []
    cfg.capture.sniff = False
    cfg.devices.max = cap
    store = Store(cfg.db_url)
    gw = Gateway(cfg, store)
    gw.identifier = None  # identification sessions are measured by identify_cost.py
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    now = time.time()
    for i in range(macs):
        mac = f"02:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}:00:01"
        gw.ingest([DhcpSeen(now, mac, None, f"host-{i}", (1, 3, 6, 15), "udhcp 1.30"),
                   MdnsSeen(now, mac, f"10.0.{i >> 8 & 255}.{i & 255}", (f"host-{i}.local",), ("_hap._tcp.local",))])
        if i % 1000 == 999:
            gw._drain()  # as the daemon's loop does between batches
    gw._drain()
    asyncio.run(gw._flush())
    gw._alert_feed.put(None)
    gw._record_alerts()  # what the alert thread keeps: presence, new-device alerts
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    store.close()
    db = state_dir / "iotgw.sqlite"
    size = sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())
    return {"devices_kept": len(gw.tracker.devices), "untracked": gw.counters.get("devices_untracked"),
            "held_mb": round(held / 1e6, 1), "db_mb": round(size / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--macs", type=positive_count, default=10_000, help="spoofed MACs in the flood")
    ap.add_argument("--max", type=lambda text: whole_number(text, 10, "at least 10, as [devices] max"), default=1000,
                    help="[devices] max for the bounded run")
    args = ap.parse_args()
    interrupt_on_stop_signals()  # SIGTERM, too, removes the temporary stores
    result: dict = {"macs": args.macs, "max": args.max}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cap in (("unbounded", UNBOUNDED), ("bounded", args.max)):
            (Path(tmp) / name).mkdir()
            result[name] = flood(Path(tmp) / name, args.macs, cap)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
