"""A short soak (``benchmarks/soak.py``): 200 clients on macvlans, each with its own MAC, query a real
``iotgw run`` for two minutes. The daemon's file descriptors must not grow and its memory must stay flat once
the first minute (every device's identification window) is over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dns_helpers import needs_dnsmasq

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,
    needs_dnsmasq,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and macvlans need root"),
]

ROOT = Path(__file__).resolve().parents[1]
DURATION_S = 120  # the second half starts after the daemon's 60-second identification windows have closed
QPS = 500
# What may still grow in the second half without being a leak: SQLite's page caches as the databases grow
# (2 MB per connection, a handful of connections), the answer cache (10,000 entries, about 3 MB when full)
# and the remembered question parses (25 new names a second here: about 1 MB a minute). A leak of half a
# kilobyte per query would add 15 MB in that minute (500 q/s x 60 s), so the bound tells the two apart.
RSS_GROWTH_MB = 12
FD_GROWTH = 2  # sockets and SQLite connections are all open by the half; a leak adds one per query or flush


def test_short_soak_keeps_memory_flat_and_leaks_no_descriptors():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--duration", str(DURATION_S),
                           "--qps", str(QPS), "--sample-s", "2"], capture_output=True, text=True, cwd=ROOT,
                          timeout=DURATION_S + 180)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["devices_by_mac"] == 200, "the clients did not come out as 200 devices"
    assert result["answered"] > result["sent"] // 2, result  # a functional floor: it served throughout
    assert result["daemon_errors_logged"] == 0
    assert result["fds_end"] <= result["fds_half"] + FD_GROWTH, result
    assert result["rss_mb_end"] - result["rss_mb_half"] <= RSS_GROWTH_MB, result


def test_a_soak_sends_every_query_of_its_duration():
    """qps x duration queries: the last one falls due at the very end and was dropped when nothing was still
    outstanding then (199 of 200 sent)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--clients", "3", "--qps", "20",
                           "--duration", "4", "--sample-s", "1"], capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["sent"] == 80
