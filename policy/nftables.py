"""Quarantine enforcement: drop everything quarantined MACs send through the gateway, with nftables.

iotgw owns one table, ``inet iotgw``: a set of quarantined MACs and a forward-hook chain that drops what
those MACs send through the gateway. DNS to the gateway itself and DHCP are the gateway's input, not its
forward path, so they are never touched: the device still resolves, under its quarantine policy. DNS to an
outside resolver is dropped too, or a device with a hard-coded 8.8.8.8 would escape that policy. Only this
table is ever changed; it is deleted on close.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable

from policy.model import normalise_mac

TABLE = "iotgw"


class NftError(RuntimeError):
    """``nft`` is missing or refused a command; the message carries its output."""


def _ruleset(table: str) -> str:
    # Traffic *to* the gateway (DNS on :53, DHCP) takes the input hook and passes; the forward hook sees only
    # what the gateway routes onward, and quarantined devices get nothing there.
    return f"""
table inet {table} {{
    set quarantined {{
        type ether_addr
    }}
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        ether saddr @quarantined counter drop
    }}
}}
"""


class QuarantineFirewall:
    """The iotgw nftables table: ``open`` creates it, ``add``/``remove``/``sync`` change the MAC set,
    ``close``
    deletes it. Use as a context manager so the table goes away with the daemon."""

    def __init__(self, table: str = TABLE, netns: str | None = None) -> None:
        """``netns``: run inside that network namespace (``ip netns exec``), for a gateway living in one."""
        self.table = table
        self._nft = shutil.which("nft")
        self._prefix = ["ip", "netns", "exec", netns] if netns else []

    @property
    def available(self) -> bool:
        return self._nft is not None

    def _run(self, *args: str, stdin: str | None = None) -> str:
        if self._nft is None:
            raise NftError("nft not found: install nftables to drop quarantined devices' traffic")
        proc = subprocess.run(
            [*self._prefix, self._nft, *args], input=stdin, capture_output=True, text=True, timeout=10
        )
        if proc.returncode != 0:
            raise NftError(f"nft {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def open(self) -> QuarantineFirewall:
        """Create the table afresh (a stale one from a crashed run is replaced)."""
        self.close()
        self._run("-f", "-", stdin=_ruleset(self.table))
        return self

    def close(self) -> None:
        """Delete the table if it exists."""
        if self._nft is None:
            return
        if self.table in self._run("list", "tables", "inet"):
            self._run("delete", "table", "inet", self.table)

    def add(self, mac: str) -> None:
        self._run("add", "element", "inet", self.table, "quarantined", f"{{ {normalise_mac(mac)} }}")

    def remove(self, mac: str) -> None:
        mac = normalise_mac(mac)
        if mac in self.macs():
            self._run("delete", "element", "inet", self.table, "quarantined", f"{{ {mac} }}")

    def macs(self) -> set[str]:
        """The MACs in the set now."""
        out = self._run("list", "set", "inet", self.table, "quarantined")
        start = out.find("elements = {")
        if start < 0:
            return set()
        body = out[start + len("elements = {") : out.index("}", start)]
        return {normalise_mac(m.strip()) for m in body.replace("\n", " ").split(",") if m.strip()}

    def sync(self, macs: Iterable[str]) -> None:
        """Make the set exactly ``macs`` in one transaction (the daemon calls this on each revision)."""
        wanted = sorted({normalise_mac(m) for m in macs})
        script = f"flush set inet {self.table} quarantined\n"
        if wanted:
            script += f"add element inet {self.table} quarantined {{ {', '.join(wanted)} }}\n"
        self._run("-f", "-", stdin=script)

    def __enter__(self) -> QuarantineFirewall:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
