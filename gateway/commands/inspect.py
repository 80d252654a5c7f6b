"""``iotgw devices`` and ``iotgw queries``: read the store, as a table or as JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

from gateway.cli import add_state_args, config_from_args, positive_count
from gateway.devices import device_key

if TYPE_CHECKING:
    from gateway.store.db import Store


def add_commands(sub: argparse._SubParsersAction) -> None:
    devices = sub.add_parser("devices", help="list devices")
    add_state_args(devices)
    devices.add_argument("--json", action="store_true", help="one JSON array")
    devices.add_argument("--search", metavar="TEXT",
                         help="only devices whose MAC, name, vendor, type or address contains TEXT")
    devices.set_defaults(func=cmd_devices)

    queries = sub.add_parser("queries", help="the query log, newest first")
    add_state_args(queries)
    queries.add_argument("--device", metavar="MAC", type=device_key,
                         help="one device's queries (AA-BB-.., aabb.ccdd.eeff too)")
    queries.add_argument("--search", metavar="TEXT", help="only names that contain TEXT")
    queries.add_argument("--limit", type=positive_count, default=50, metavar="N", help="at most N queries (default 50)")
    queries.add_argument("--json", action="store_true", help="one JSON object per line")
    queries.set_defaults(func=cmd_queries)


def cmd_devices(args: argparse.Namespace) -> int:
    from gateway.devices.service import list_devices

    store = _existing_store(args)
    if store is None:
        return 1
    rows = [
        {
            "mac": d.mac, "name": d.name, "name_source": d.name_source, "vendor": d.vendor, "status": d.status,
            "manufacturer": d.manufacturer, "device_type": d.device_type, "category": d.category,
            "confidence": d.confidence, "known": d.known, "decided_after_s": d.decided_after_s,
            "first_seen": d.first_seen, "last_seen": d.last_seen,
        }
        for d in list_devices(store, search=args.search)
    ]
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
        return 0
    print(f"{'MAC':<20} {'NAME':<24} {'VENDOR':<22} {'TYPE':<20} {'CONF':>5} {'STATUS':<11} LAST SEEN")
    for r in rows:
        conf = f"{r['confidence']:.2f}" if r["confidence"] is not None else ""
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_seen"]))
        print(f"{r['mac']:<20} {_cut(r['name'], 24)} {_cut(r['vendor'], 22)} {_cut(r['device_type'], 20)} "
              f"{conf:>5} {r['status']:<11} {seen}")
    return 0


def cmd_queries(args: argparse.Namespace) -> int:
    from gateway.store.querylog import recent

    store = _existing_store(args)
    if store is None:
        return 1
    for q in recent(store, mac=args.device, search=args.search,
                    limit=args.limit):
        row = {"ts": q.ts, "client": q.client, "mac": q.mac, "qname": q.qname, "qtype": q.qtype, "sld": q.sld,
               "rcode": q.rcode, "latency_ms": q.latency_ms, "verdict": q.verdict, "rule": q.rule,
               "source": q.source, "rule_words": q.rule_words}
        if args.json:
            print(json.dumps(row))
        else:
            seen = time.strftime("%H:%M:%S", time.localtime(q.ts))
            rule = f"  {q.rule_shown}" if q.rule else ""  # as the web UI's query log says it
            print(f"{seen} {q.client:<16} {q.mac or '':<20} {q.verdict:<11} {q.qname}{rule}")
    return 0


def _existing_store(args: argparse.Namespace) -> Store | None:
    """The store to read, or None (said on stderr) when its SQLite file does not exist: these commands only
    read, and opening a stale path (a demo's removed state directory, a typo) would create it empty."""
    from gateway.store.db import Store, missing_sqlite_file

    url = config_from_args(args).db_url
    missing = missing_sqlite_file(url)
    if missing is not None:
        print(f"iotgw {args.command}: no database at {missing}: nothing has run with this --db or --config "
              "(`iotgw run` and `iotgw demo` create it; a demo's temporary one is removed when the demo ends)",
              file=sys.stderr)
        return None
    return Store(url)


def _cut(value: str | None, width: int) -> str:
    text = (value or "").replace("\n", " ")
    return (text[: width - 1] + "…" if len(text) > width else text).ljust(width)
