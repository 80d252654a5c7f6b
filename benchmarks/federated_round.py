"""Round time of plain FedAvg against SecAgg+, bytes per home, and a gateway's peak RSS and PSS (one JSON object).

Real Flower processes on loopback (``identifier.federated.localfleet``), the identifier's shipped model, homes
cut from the shared supply-chain name sets (a Dirichlet split), local training as the run config's defaults.
Usage: ``python benchmarks/federated_round.py [--homes 5 20] [--rounds 2] [--stage-timeout 300]``. On a shared
machine the absolute times are noisy; plain and SecAgg+ run back to back so their ratio is comparable. A round
that fails leaves its time null: the JSON is still printed, with an ``error`` key saying which rounds failed and
why, the same is said on stderr, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.cli import interrupt_on_stop_signals, positive_count, positive_seconds  # noqa: E402
from identifier.bundle import Bundle  # noqa: E402
from identifier.dataset import domain_windows  # noqa: E402
from identifier.federated import homedata, model, processes  # noqa: E402
from identifier.federated.localfleet import Home, LocalFleet, RunResult  # noqa: E402

# Bounds, not what is measured: 20 homes' ClientApps share two cores, so a stage can take minutes here.
RUN = {"stage-timeout": 300.0, "nodes-wait": 60.0, "threshold-fraction": 0.6}


def plain_app_dir(root: Path) -> Path:
    app = root / "plain_app"
    app.mkdir(parents=True, exist_ok=True)
    text = (processes.APP_DIR / "pyproject.toml").read_text()
    text = text.replace("identifier.federated.server_app:app", "benchmarks.federated_apps:server")
    text = text.replace("identifier.federated.client_app:app", "benchmarks.federated_apps:client")
    (app / "pyproject.toml").write_text(text)
    return app


class MemorySampler(threading.Thread):
    """Peak memory of one home's SuperNode and everything it spawned, sampled every 0.25 s: the sum of their
    RSS (``peak_rss``: counts the pages a forked ClientApp shares with its warm server once per process) and of
    their PSS (``peak_pss``: each shared page split between its sharers, so the sum is what the home uses)."""

    def __init__(self, home: Home) -> None:
        super().__init__(daemon=True)
        self.home, self.peak_rss, self.peak_pss, self.stop = home, 0, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                root = psutil.Process(self.home.proc.pid)
                procs = [p for p in (root, *root.children(recursive=True)) if p.is_running()]
                self.peak_rss = max(self.peak_rss, sum(p.memory_info().rss for p in procs))
                self.peak_pss = max(self.peak_pss, sum(pss_bytes(p.pid) for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.25)


def pss_bytes(pid: int) -> int:
    """The process's proportional set size from ``/proc/PID/smaps_rollup`` (0 if it has exited)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024  # kB
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def payload_bytes(params: model.Params, homes: int) -> dict[str, int]:
    """Bytes of model payload a home moves per round (HTTP framing excluded): plain sends float32 arrays
    down and up; SecAgg+ sends the model down, a masked integer vector up, plus keys and key shares."""
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.quantization import quantize

    down = sum(len(ndarray_to_bytes(a)) for a in params)
    masked_up = sum(len(ndarray_to_bytes(a)) for a in quantize(params, 1.0, 1 << 22))
    keys = 2 * 2 * 91 * homes  # two public keys out, neighbours' keys in (DER P-384 ~91 bytes)
    shares = 2 * homes * 150  # encrypted (seed, sk1) share per neighbour, out and in
    return {"plain": 2 * down, "secagg": down + masked_up + keys + shares}


def failure(mode: str, rounds: int, run: RunResult) -> str:
    """Why a run's round times are missing: the failed rounds' own errors, else the end of ``flwr run``'s output."""
    records = run.report.get("rounds", [])
    failed = [f"round {r['round']}: {r.get('error') or r['status']}" for r in records if r["status"] != "ok"]
    ok = len(records) - len(failed)
    tail = run.output.strip().splitlines()[-1:] if not failed else []
    return f"{mode}: {ok} of {rounds} rounds ok, flwr run exited {run.returncode} ({'; '.join(failed + tail)})"


def measure(n: int, rounds: int, data: Path, root: Path, stage_timeout: float) -> dict:
    datasets, _ = homedata.split_homes(domain_windows(data, set()), n, seed=3)
    result: dict = {"homes": n}
    errors: list[str] = []
    for mode in ("plain", "secagg"):
        with LocalFleet(root / f"{mode}{n}") as fleet:  # ends every Flower process, also on a failure
            fleet.start_superlink()
            homes = [fleet.add_home(d) for d in datasets]
            fleet.wait_connected()  # round 1 must not include homes still starting
            sampler = MemorySampler(homes[0])
            sampler.start()
            app = plain_app_dir(root) if mode == "plain" else processes.APP_DIR
            run = fleet.run(
                {**RUN, "stage-timeout": stage_timeout, "num-rounds": rounds, "min-nodes": n}, root / f"out-{mode}{n}",
                app_dir=app,
            )
            sampler.stop.set()
            sampler.join()
            ok = [r["seconds"] for r in run.report.get("rounds", []) if r["status"] == "ok"]
            result[f"{mode}_round_s"] = round(float(np.mean(ok)), 2) if len(ok) == rounds else None
            if len(ok) != rounds or run.returncode != 0:
                errors.append(failure(mode, rounds, run))
            result[f"{mode}_rss_mb"] = round(sampler.peak_rss / 2**20, 1)
            result[f"{mode}_pss_mb"] = round(sampler.peak_pss / 2**20, 1)
            result[f"{mode}_warm"] = sum(h.warm_clientapps() for h in homes)
    bundle = Bundle.load()
    params = model.params_of(bundle)
    sizes = payload_bytes(params, n)
    p, s = result["plain_round_s"], result["secagg_round_s"]
    return ({"error": "; ".join(errors)} if errors else {}) | {
        "homes": n,
        "plain_round_s": p,
        "secagg_round_s": s,
        "ratio": round(s / p, 2) if p and s else None,
        "bytes_per_home": sizes["secagg"],
        "bytes_per_home_plain": sizes["plain"],
        "gateway_peak_rss_mb": result["secagg_rss_mb"],
        "gateway_peak_rss_mb_plain": result["plain_rss_mb"],
        # what one home uses: shared pages counted once (the RSS sum above counts them per process)
        "gateway_peak_pss_mb": result["secagg_pss_mb"],
        "gateway_peak_pss_mb_plain": result["plain_pss_mb"],
        "parameters": bundle.parameter_count(),
        "rounds_averaged": rounds,
        # ClientApp processes forked by the homes' warm servers (warm_clientapp), all homes, all rounds
        "warm_clientapps": {"plain": result["plain_warm"], "secagg": result["secagg_warm"]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    default_data = Path(__file__).resolve().parents[2] / "shared/data/supplychain-domains/device_domains.csv"
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--homes", type=positive_count, nargs="+", default=[5])
    parser.add_argument("--rounds", type=positive_count, default=2)
    parser.add_argument("--stage-timeout", type=positive_seconds, default=RUN["stage-timeout"],
                        help="seconds a round's stage may take before the round fails (default: %(default)s)")
    args = parser.parse_args()
    if not args.data.exists():
        parser.error(f"{args.data}: not found (give --data)")
    interrupt_on_stop_signals()  # SIGTERM, too, ends every Flower process (they run in sessions of their own)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.homes:
            try:
                results.append(measure(n, args.rounds, args.data, Path(tmp), args.stage_timeout))
            except Exception as exc:  # a fleet that would not start: said, and the other sizes still run
                results.append({"homes": n, "error": f"{type(exc).__name__}: {exc}"})
    out = results[0] if len(results) == 1 else {"runs": results}
    out["load_average"] = [round(x, 1) for x in psutil.getloadavg()]
    errors = [f"{r['homes']} homes: {r['error']}" for r in results if "error" in r]
    if errors and len(results) > 1:
        out["error"] = "; ".join(errors)
    print(json.dumps(out))  # what was measured, even when a round failed
    for error in errors:
        print(f"federated_round: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
