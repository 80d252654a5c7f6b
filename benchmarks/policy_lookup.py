"""Block list lookups with a million names: load time, memory added, and per-query latency (JSON on stdout).

Writes a list of N synthetic names (mixed hosts / plain / adblock lines) to a temporary file, loads it through
``PolicyEngine.build`` as a global block list, and times ``decide`` for queries of which half are listed (or
under a listed name) and half are not; every parent suffix of each name is checked.

    python benchmarks/policy_lookup.py [--names 1000000] [--queries 200000]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.cli import interrupt_on_stop_signals, positive_count  # noqa: E402
from policy.engine import PolicyEngine  # noqa: E402
from policy.model import ListSpec, PolicySet, Rule  # noqa: E402
from policy.records import DeviceContext  # noqa: E402

LABELS = ["ads", "track", "cdn", "pixel", "metrics", "img", "api", "srv", "edge", "stat"]
TLDS = ["com", "net", "org", "io", "de", "co.uk", "info"]


def _name(rng: random.Random, i: int) -> str:
    return f"{rng.choice(LABELS)}{i}.{rng.choice(LABELS)}-{i % 99991}.{rng.choice(TLDS)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--names", type=positive_count, default=1_000_000)
    ap.add_argument("--queries", type=positive_count, default=200_000, help="rounded up to an even number")
    args = ap.parse_args()
    interrupt_on_stop_signals()  # SIGTERM, too, removes the temporary list (tens of MB at a million names)
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.txt"
        with path.open("w") as fh:
            for i in range(args.names):
                form = i % 3
                name = _name(rng, i)
                fh.write(f"0.0.0.0 {name}\n" if form == 0 else f"||{name}^\n" if form == 1 else f"{name}\n")
        rng = random.Random(1)
        listed = [_name(rng, i) for i in range(args.names)]
        queries = []
        for _ in range((args.queries + 1) // 2):
            queries.append("www." + rng.choice(listed) + ".")  # hit through a parent suffix
            queries.append(f"host{rng.randrange(10**9)}.{rng.choice(LABELS)}-miss.{rng.choice(TLDS)}.")
        rng.shuffle(queries)
        del listed
        ps = PolicySet(lists={"big": ListSpec(str(path))})
        ps.policy("global").rules.append(Rule("block", "list", "big"))
        gc.collect()
        proc = psutil.Process()
        rss0 = proc.memory_info().rss
        t0 = time.perf_counter()
        engine = PolicyEngine.build(ps)
        load_s = time.perf_counter() - t0
        gc.collect()
        rss_added = (proc.memory_info().rss - rss0) / 2**20
    ctx = DeviceContext("aa:bb:cc:dd:ee:ff", "cam", "camera", "approved")
    now = time.time()
    decide = engine.decide
    for q in queries[:1000]:
        decide(ctx, q, now)
    times = []
    clock = time.perf_counter_ns
    blocked = 0
    for q in queries:
        t = clock()
        v = decide(ctx, q, now)
        times.append(clock() - t)
        blocked += v.action == "blocked"
    times.sort()
    print(
        json.dumps(
            {
                "names": len(engine._index),
                "load_s": round(load_s, 3),
                "rss_added_mb": round(rss_added, 1),
                "index_mb": round(engine._index.nbytes / 2**20, 1),
                "lookup_us_p50": round(times[len(times) // 2] / 1000, 2),
                "lookup_us_p99": round(times[int(len(times) * 0.99)] / 1000, 2),
                "queries": len(queries),
                "blocked_fraction": round(blocked / len(queries), 3),
                "note": "decide() end to end, every parent suffix; shared 2-core machine",
            }
        )
    )


if __name__ == "__main__":
    main()
