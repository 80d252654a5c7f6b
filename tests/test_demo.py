"""``iotgw demo``, the README's first command: a real process, no root, no ../shared, no config."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from pathlib import Path

from gateway.devices.service import list_devices
from gateway.store.db import Store
from tests.ports import free_port


def test_demo_devices_appear_get_identified_and_the_ui_asks_for_login(tmp_path):
    web_port, dns_port = free_port(), free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--duration", "35", "--state-dir", str(tmp_path),
         "--web-port", str(web_port), "--dns-port", str(dns_port), "--devices", "4"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,  # cwd: nothing of the checkout is needed
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"open (http://127\.0\.0\.1:\d+/) and log in as admin / (\S+)", proc.stdout)
    assert m, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    devices = list_devices(Store(f"sqlite:///{tmp_path / 'iotgw.sqlite'}", migrate=False))
    assert len(devices) >= 3 and all(not d.mac.startswith("ip:") for d in devices)
    identified = [d for d in devices if d.device_type and d.known]
    assert identified, [(d.mac, d.device_type) for d in devices]
    assert all(0 < d.confidence <= 1 and d.decided_after_s is not None for d in identified)


def test_demo_web_ui_needs_login(tmp_path):
    web_port, dns_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "demo", "--duration", "20", "--state-dir", str(tmp_path),
         "--web-port", str(web_port), "--dns-port", str(dns_port), "--devices", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "log in as admin" in line, line + proc.stderr.read()
        req = urllib.request.Request(f"http://127.0.0.1:{web_port}/api/v1/devices")
        try:
            urllib.request.urlopen(req, timeout=10)
            raise AssertionError("the API answered without a login")
        except urllib.error.HTTPError as exc:
            assert exc.code in (401, 403)
    finally:
        proc.terminate()
        proc.wait(30)
