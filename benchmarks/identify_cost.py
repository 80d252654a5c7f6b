"""Cost of streaming identification in the daemon: per-observation update time, model size, memory.

Prints one JSON object. Replays the observations of real captures (../shared/data, or IOTGW_DATA) through
numpy-only sessions of the shipped bundle; falls back to the bundle's prototypes when the data is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    # No options (the data's place is IOTGW_DATA), but --help must explain rather than start the run.
    argparse.ArgumentParser(description=__doc__).parse_args()
    t0 = time.perf_counter()
    import numpy  # noqa: F401  (its import cost is part of the daemon's, measured apart from the model's)

    rss_numpy = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from identifier.bundle import DEFAULT_DIR
    from identifier.stream import Identifier

    ident = Identifier.load()
    load_s = time.perf_counter() - t0
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    data = Path(os.environ.get("IOTGW_DATA") or ROOT.parent / "shared" / "data") / "iot-sentinel" / "captures"
    devices = []
    if data.is_dir():
        from gateway.capture.windows import capture_windows

        for folder in sorted(data.iterdir())[:31]:
            pcap = sorted(folder.glob("*.pcap"))[0]
            mac = (folder / "_iotdevice-mac.txt").read_text().strip().lower()
            dev = capture_windows(pcap, 60.0).devices.get(mac)
            if dev:
                devices.append((mac, dev.first_ts, dev.observations))
        source = "iot-sentinel captures (first of each device, 60 s)"
    else:
        devices = [("02:00:00:00:00:01", 0.0, seq) for seq in ident.prototypes().values()]
        source = "bundle prototypes"

    times = []
    for mac, first_ts, observations in devices:
        session = ident.session(mac, first_ts)
        for obs in observations:
            t = time.perf_counter_ns()
            session.update(obs)
            times.append((time.perf_counter_ns() - t) / 1000)
    times.sort()

    def pct(xs, q):
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 2) if xs else None

    # what the daemon would carry if it ran the torch model instead (measured in a fresh process)
    torch_rss = subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource, torch; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    print(
        json.dumps(
            {
                "source": source,
                "devices": len(devices),
                "updates": len(times),
                "update_us_p50": pct(times, 0.5),
                "update_us_p90": pct(times, 0.9),
                "update_us_p99": pct(times, 0.99),
                "model_bytes": sum(f.stat().st_size for f in DEFAULT_DIR.iterdir()),
                "weights_npz_bytes": (DEFAULT_DIR / "weights.npz").stat().st_size,
                "parameters": ident.bundle.parameter_count(),
                "load_s": round(load_s, 3),
                "rss_mb_after_numpy": round(rss_numpy / 1024, 1),
                "rss_mb_after_bundle_load": round(rss_loaded / 1024, 1),
                "torch_imported": "torch" in sys.modules,
                "rss_mb_python_with_torch_imported": round(int(torch_rss) / 1024, 1)
                if torch_rss.isdigit()
                else None,
                "note": "2-core machine shared with other jobs: times are noisy",
            }
        )
    )


if __name__ == "__main__":
    main()
