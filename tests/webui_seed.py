"""Writes the rows the daemon would write (devices, fingerprints, queries), for the web UI tests."""

from __future__ import annotations

import time

from gateway.config import Config
from gateway.store.db import Store
from gateway.store.schema import Address, Device, DeviceName, DhcpFingerprint, Identification, Query


def config(tmp_path) -> Config:  # noqa: ANN001 - a pytest tmp_path
    cfg = Config()
    cfg.gateway.state_dir = str(tmp_path / "state")
    cfg.store.url = f"sqlite:///{tmp_path / 'state' / 'iotgw.sqlite'}"
    return cfg


def add_device(
    store: Store,
    mac: str,
    *,
    hostname: str | None = None,
    ip: str = "192.168.1.50",
    vendor: str | None = "Espressif Inc.",
    queries: tuple[str, ...] = (),
    identified: bool = False,
) -> None:
    now = time.time()
    with store.transaction() as s:
        s.add(
            Device(
                mac=mac,
                first_seen=now - 30,
                last_seen=now,
                vendor=vendor,
                name=hostname,
                name_source="dhcp" if hostname else None,
                status="new",
            )
        )
        s.flush()
        s.add(Address(ip=ip, mac=mac, source="dhcp", first_seen=now - 30, last_seen=now))
        if hostname:
            s.add(DeviceName(mac=mac, name=hostname, source="dhcp", first_seen=now - 30, last_seen=now))
            s.add(DhcpFingerprint(mac=mac, first_seen=now - 30, hostname=hostname, param_list="1,3,6,15,28"))
        if identified:
            device = s.get(Device, mac)
            device.manufacturer, device.device_type, device.category = "TP-Link", "tplink-plug-hs110", "plug"
            device.confidence, device.known, device.decided_after_s = 0.94, True, 4.2
            s.add(
                Identification(
                    mac=mac,
                    ts=now - 25,
                    manufacturer="TP-Link",
                    device_type="tplink-plug-hs110",
                    category="plug",
                    confidence=0.94,
                    known=True,
                    decided_after_s=4.2,
                    alternatives=[["tplink-plug-hs100", 0.04], ["belkin-wemo-plug", 0.01]],
                    signals=["dns", "oui", "dhcp"],
                    model_version="test-1",
                )
            )
    if queries:
        with store.querylog_session.begin() as s:
            for i, qname in enumerate(queries):
                s.add(
                    Query(
                        ts=now - 20 + i,
                        client=ip,
                        mac=mac,
                        qname=qname,
                        qtype=1,
                        sld=".".join(qname.rsplit(".", 2)[-2:]),
                        verdict="blocked" if i % 2 else "allowed",
                        source="server",
                    )
                )
