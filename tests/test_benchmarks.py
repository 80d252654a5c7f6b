"""Every benchmark (``benchmarks/*.py``) at its smallest settings: it exits 0 and prints exactly one JSON object
with the keys the docs quote from it. The values are not asserted: speed and memory are what the benchmarks
report, never what a test checks. A benchmark stopped by SIGTERM (a CI job cancelled, ``timeout``, ``kill``)
leaves no process, network namespace or temporary file behind.

``benchmarks/federated_apps.py`` is no benchmark: it holds the plain FedAvg apps ``federated_round.py`` runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.shared_data import DATA, needs_data

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NAME_SETS = DATA / "supplychain-domains" / "device_domains.csv"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces, macvlans and AF_PACKET need root")
needs_dnsmasq = pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq is not installed")
needs_dnsperf = pytest.mark.skipif(shutil.which("dnsperf") is None, reason="dnsperf is not installed")
needs_mosquitto = pytest.mark.skipif(shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
                                     reason="mosquitto is not installed")
needs_flwr = pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="flwr is not installed")


def env(tmp: Path) -> dict[str, str]:
    """This checkout first on the path (also for the Flower processes a benchmark starts); temporary files in
    ``tmp``, so that what a benchmark leaves behind can be seen."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "TMPDIR": str(tmp)}


SMOKE = [
    pytest.param("alerts_outbox.py", ["20"],
                 {"alerts", "send_mean_us", "send_p99_us", "drain_s", "drain_alerts_per_s"},
                 marks=needs_mosquitto, id="alerts_outbox"),
    pytest.param("broker_outage.py", ["--down-s", "2", "--before-s", "1", "--after-s", "1", "--drain-timeout-s", "60"],
                 {"sent", "received", "lost", "duplicates", "order_kept", "outbox_peak", "outbox_max", "backlog",
                  "backlog_delivered_s", "outbox_left"},
                 marks=needs_mosquitto, id="broker_outage"),
    pytest.param("capture_rate.py", ["--seconds", "0.5", "--start-pps", "1000", "--max-pps", "1000"],
                 {"lossless_pps", "rss_mb", "cpu_us_per_query", "limited_by", "steps"},
                 marks=needs_root, id="capture_rate"),
    pytest.param("dns_throughput.py", ["--seconds", "1", "--rounds", "1", "--names", "100", "--blocklist", "1000"],
                 {"iotgw_qps", "dnsmasq_qps", "ratio", "cached_ratio", "iotgw_cpu_us_per_query",
                  "dnsmasq_cpu_us_per_query", "iotgw_p99_ms_at_2000qps", "dnsmasq_p99_ms_at_2000qps", "lost",
                  "rss_mb", "rss_current_mb", "blocklist_names", "logged_rows", "daemon"},
                 marks=[needs_dnsmasq, needs_dnsperf], id="dns_throughput"),
    pytest.param("device_flood.py", ["--macs", "30", "--max", "10"],
                 {"macs", "max", "unbounded", "bounded"}, id="device_flood"),
    pytest.param("federated_accuracy.py", ["--data", str(DATA), "--homes", "2", "--rounds", "1", "--epochs", "1"],
                 {"centralized", "federated", "ratio", "ratio_per_head", "curve", "train_windows", "test_windows",
                  "test_samples"},
                 marks=needs_data, id="federated_accuracy"),
    # The longest here (about 80 s: two local fleets, plain and SecAgg+, one round each).
    pytest.param("federated_round.py", ["--data", str(NAME_SETS), "--homes", "2", "--rounds", "1"],
                 {"homes", "plain_round_s", "secagg_round_s", "ratio", "bytes_per_home", "bytes_per_home_plain",
                  "gateway_peak_rss_mb", "gateway_peak_rss_mb_plain", "gateway_peak_pss_mb",
                  "gateway_peak_pss_mb_plain", "parameters", "rounds_averaged",
                  "warm_clientapps"},
                 marks=[needs_data, needs_flwr], id="federated_round"),
    pytest.param("fuzz_dns.py", ["--packets", "1000"],
                 {"packets_sent", "udp_sent", "tcp_sent", "crashes", "server_died", "dns_errors", "by_class",
                  "malformed_counted", "notimp", "answered", "unaccounted", "udp_drops", "tcp", "probes_sent",
                  "probes_answered", "probe_p50_ms", "probe_max_ms", "capture", "rss_mb_start", "rss_mb_end",
                  "fds_start", "fds_end", "question_memo_worst_mb", "seconds", "packets_per_s"},
                 marks=needs_dnsmasq, id="fuzz_dns"),
    pytest.param("identify_cost.py", [],
                 {"devices", "updates", "update_us_p50", "update_us_p90", "update_us_p99", "model_bytes",
                  "weights_npz_bytes", "parameters", "rss_mb_after_numpy", "rss_mb_after_bundle_load",
                  "rss_mb_python_with_torch_imported"},
                 id="identify_cost"),
    pytest.param("policy_lookup.py", ["--names", "1000", "--queries", "1000"],
                 {"names", "load_s", "rss_added_mb", "index_mb", "lookup_us_p50", "lookup_us_p99",
                  "blocked_fraction"},
                 id="policy_lookup"),
    pytest.param("reidentify.py", ["--devices", "20", "--idle-s", "0.5"],
                 {"devices", "completed", "answers_changed", "pass_wall_s", "work_s", "work_cpu_s",
                  "work_ms_per_device", "rss_mb_before", "rss_mb_peak", "rss_mb_max", "dns_idle", "dns_during_pass",
                  "dns_lost"},
                 id="reidentify"),
    pytest.param("soak.py", ["--clients", "3", "--qps", "20", "--duration", "4", "--sample-s", "1"],
                 {"sent", "answered", "errors", "timeouts", "rcodes", "rss_mb_start", "rss_mb_half", "rss_mb_end",
                  "rss_mb_max", "rss_slope_mb_per_h_second_half", "fds_start", "fds_half", "fds_end", "fds_max",
                  "daemon_cpu_pct", "querylog_rows", "devices_by_mac", "daemon_errors_logged"},
                 marks=[needs_root, needs_dnsmasq], id="soak"),
]


@pytest.mark.parametrize(("script", "args", "keys"), SMOKE)
def test_benchmark_prints_one_json_object_with_the_documented_keys(script, args, keys, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # one object: a second line of output would be "Extra data"
    assert isinstance(result, dict), proc.stdout
    assert keys <= result.keys(), sorted(keys - result.keys())
    if "parameters" in keys:  # one count of the model in every benchmark that quotes it
        from identifier.bundle import Bundle

        assert result["parameters"] == Bundle.load().parameter_count()
    # torch keeps its compile cache in the temporary directory on purpose (it outlives every run)
    left = [f for f in tmp_path.iterdir() if not f.name.startswith("torchinductor_")]
    assert not left, f"the benchmark left temporary files behind: {left}"


@pytest.mark.parametrize("script", ["alerts_outbox.py", "identify_cost.py"])
def test_benchmark_help_explains_instead_of_running(script, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True,
                          text=True, cwd=ROOT, env=env(tmp_path), timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage:"), proc.stdout[:300]



@pytest.mark.parametrize(("script", "args"), [
    ("alerts_outbox.py", ["0"]),
    ("capture_rate.py", ["--seconds", "0"]),  # it ran, and printed a "lossless" rate of frames never sent
    ("capture_rate.py", ["--start-pps", "0"]),  # it doubled 0 forever
    ("dns_throughput.py", ["--rounds", "0"]),
    ("federated_accuracy.py", ["--homes", "0"]),
    ("federated_round.py", ["--homes", "0"]),
    ("policy_lookup.py", ["--queries", "0"]),
    ("device_flood.py", ["--macs", "0"]),
    ("reidentify.py", ["--devices", "0"]),
    ("soak.py", ["--clients", "0"]),
])
def test_benchmark_refuses_a_zero_count_or_length_with_a_usage_error(script, args, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env(tmp_path), timeout=120)
    assert proc.returncode == 2, (proc.stdout[-1000:], proc.stderr[-3000:])
    assert "usage:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not proc.stdout

@needs_data
@needs_flwr
def test_federated_round_with_a_failed_round_exits_non_zero_and_says_why(tmp_path):
    """A SecAgg+ round that fails (here: its stages given 0.1 s, less than local training takes) printed a null
    round time and exited 0, so a script or CI took it for a measurement. Now the JSON keeps what was measured and
    says which rounds failed and why, as stderr does, and the exit status is 1."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "federated_round.py"), "--data", str(NAME_SETS),
                           "--homes", "2", "--rounds", "1", "--stage-timeout", "0.1"],
                          capture_output=True, text=True, cwd=ROOT, env=env(tmp_path), timeout=600)
    assert proc.returncode == 1, (proc.stdout[-1000:], proc.stderr[-3000:])
    result = json.loads(proc.stdout)
    assert result["secagg_round_s"] is None and result["bytes_per_home"] > 0  # what it has, still printed
    assert "secagg: 0 of 1 rounds ok" in result["error"] and "round 1:" in result["error"]
    assert f"federated_round: 2 homes: {result['error']}" in proc.stderr and "Traceback" not in proc.stderr


def _has_child(*words: str) -> Callable[[list[psutil.Process], Path], bool]:
    """Ready once a descendant's command line holds every one of ``words``."""

    def ready(procs: list[psutil.Process], _tmp: Path) -> bool:
        for p in procs:
            try:
                line = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if all(w in line for w in words):
                return True
        return False

    return ready


def _has_file(name: str) -> Callable[[list[psutil.Process], Path], bool]:
    return lambda _procs, tmp: any(tmp.rglob(name))


STOPPED = [
    pytest.param("soak.py", ["--clients", "3", "--qps", "20", "--duration", "600"], _has_child("--generate"),
                 marks=[needs_root, needs_dnsmasq], id="soak"),
    pytest.param("capture_rate.py", ["--seconds", "600", "--start-pps", "100", "--max-pps", "100"],
                 _has_child("--send"), marks=needs_root, id="capture_rate"),
    pytest.param("dns_throughput.py", ["--seconds", "600", "--rounds", "1", "--names", "100"], _has_child("dnsperf"),
                 marks=[needs_dnsmasq, needs_dnsperf], id="dns_throughput"),
    # stopped while it draws its seeds, dnsmasq already up
    pytest.param("fuzz_dns.py", ["--packets", "100000000"], _has_child("dnsmasq"), marks=needs_dnsmasq,
                 id="fuzz_dns"),
    pytest.param("broker_outage.py", ["--down-s", "600"], _has_child("mosquitto"), marks=needs_mosquitto,
                 id="broker_outage"),
    pytest.param("alerts_outbox.py", ["1000000"], _has_file("iotgw.sqlite"), marks=needs_mosquitto,
                 id="alerts_outbox"),
    pytest.param("policy_lookup.py", ["--names", "100000000"], _has_file("big.txt"), id="policy_lookup"),
    pytest.param("federated_round.py", ["--data", str(NAME_SETS), "--homes", "2", "--rounds", "1"],
                 _has_child("identifier.federated.supernode"), marks=[needs_data, needs_flwr], id="federated_round"),
]


@pytest.mark.parametrize(("script", "args", "ready"), STOPPED)
def test_benchmark_stopped_by_sigterm_leaves_nothing_behind(script, args, ready, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:  # a file, not a pipe: processes left behind would hold a pipe open
        proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / script), *args],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env(tmp))
    me = psutil.Process(proc.pid)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while not ready(started, tmp):
            assert proc.poll() is None, stderr.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{script} did not get going"
            time.sleep(0.2)
            started = me.children(recursive=True)
        started = me.children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
        assert not _namespaces_of(proc.pid)
        left = [f for f in tmp.iterdir() if not f.name.startswith("torchinductor_")]  # torch's own cache
        assert not left, left
    finally:  # what the old code left: end it here, so one failure does not leak into the next test
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in started:
            try:
                p.kill()
            except psutil.Error:
                pass
        for name in _namespaces_of(proc.pid):
            subprocess.run(["ip", "netns", "del", name], check=False)


def _namespaces_of(pid: int) -> set[str]:
    """The network namespaces benchmark process ``pid`` names after itself (soak.py, capture_rate.py)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return set()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    ours = {f"soak-gw-{pid}", f"soak-cl-{pid}", f"iotgw-b{pid}-gw", f"iotgw-b{pid}-cl"}
    return {line.split()[0] for line in listed if line.split()} & ours
