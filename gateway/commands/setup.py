"""``iotgw setup``: the first-boot steps. Choose the LAN interface (written into the config file, comments
kept), set the admin password (``iotgw user set-password``, when the web UI is installed), say how to make the
router hand out this machine as DNS server (DHCP option 6), then run the doctor's checks."""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from gateway.cli import non_empty
from gateway.config import DEFAULT_PATH, ConfigError, DnsConfig, decode, load


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("setup", help="first-boot setup: LAN interface, admin password, router DNS")
    p.add_argument(
        "--config", type=non_empty, metavar="FILE", default=str(DEFAULT_PATH),
        help=f"config file to update (default {DEFAULT_PATH})",
    )
    p.add_argument(
        "--interface", type=non_empty, metavar="IFACE",
        help="the LAN interface (default: ask, offering the default route's; on a router, the one with a LAN address)",
    )
    p.add_argument("--no-password", action="store_true", help="skip setting the admin password")
    p.set_defaults(func=setup)


def setup(args: argparse.Namespace) -> int:
    from gateway.doctor import run_all  # late: the checks load psutil and the store

    path = Path(args.config)
    candidates = lan_interfaces()
    name = args.interface or ask_interface(candidates, lan_prefixes(path))
    if name not in candidates:
        print(
            f"iotgw setup: {name!r} is not an interface with an IPv4 address here; "
            f"choose one of: {', '.join(candidates) or '(none)'}",
            file=sys.stderr,
        )
        return 2
    text = read_config(path)
    updated = set_key(text, "capture", "interface", f'"{name}"')
    write_checked(path, updated)
    print(f"LAN interface: {name} (written to {path})")

    if not args.no_password:
        set_admin_password(path)

    address = candidates[name]
    print(ROUTER_GUIDE.format(ip=address))

    cfg = load(path)
    findings = run_all(cfg)
    for f in findings:
        print(f"  {f.status:<5} {f.check:<13} {f.detail}")
        if f.fix:
            print(f"  {'':<5} {'':<13} fix: {f.fix.splitlines()[0]}")
    try:
        cfg.state_dir.joinpath(".setup-done").touch()  # stops the login reminder (firmware/pi-gen)
    except OSError:
        pass
    return 1 if any(f.status == "fail" for f in findings) else 0


def lan_interfaces() -> dict[str, str]:
    """Interface name -> its first IPv4 address, for every interface that is up and has one."""
    import psutil

    stats = psutil.net_if_stats()
    found: dict[str, str] = {}
    for name, addrs in psutil.net_if_addrs().items():
        if not stats.get(name) or not stats[name].isup:
            continue
        for addr in addrs:
            if addr.family == socket.AF_INET:
                found[name] = addr.address
                break
    return found


def default_route_interface() -> str | None:
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and fields[1] == "00000000":
            return fields[0]
    return None


def lan_prefixes(path: Path) -> list[str]:
    """The config's ``[dns] lan`` (the defaults when there is no config yet, or it does not load: the steps after
    this one say what is wrong with it)."""
    try:
        return load(path).dns.lan if path.exists() else DnsConfig().lan
    except (ConfigError, OSError):
        return DnsConfig().lan


def default_lan_interface(candidates: dict[str, str], lan: list[str]) -> str:
    """The interface offered as the LAN's: the default route's (a Pi's one port), unless its address is outside
    the LAN prefixes while another interface's is inside. A router's default route leaves by its WAN port, whose
    address is public or carrier-grade NAT, and the LAN interface is the one whose link-local clients the DNS
    server and the web UI trust, so offering the WAN port would open both to the ISP's side."""
    nets = [ipaddress.ip_network(prefix, strict=False) for prefix in lan]
    inside = [name for name, address in candidates.items()
              if name != "lo" and any(ipaddress.ip_address(address) in net for net in nets)]
    default = default_route_interface()
    if default in candidates and (default in inside or not inside):
        return default
    return inside[0] if inside else next((n for n in candidates if n != "lo"), "")


def ask_interface(candidates: dict[str, str], lan: list[str]) -> str:
    default = default_lan_interface(candidates, lan)
    if not sys.stdin.isatty():
        return default
    print("Interfaces with an IPv4 address:")
    for name, address in candidates.items():
        print(f"  {name:<12} {address}{'   (default route)' if name == default_route_interface() else ''}")
    answer = input(f"LAN interface [{default}]: ").strip()
    return answer or default


def read_config(path: Path) -> str:
    """The config's text, or "" when there is none yet; ConfigError for a directory, an unreadable file or
    one that is not UTF-8, so nothing is written over it."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return ""
    except PermissionError:
        raise  # the CLI says to run as root
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    return decode(path, raw)


def set_key(text: str, section: str, key: str, literal: str) -> str:
    """``text`` with ``key = literal`` in ``[section]``: replaces the key's line (or its commented example),
    else adds it under the section header, else appends the section. Other lines stay as they are."""
    lines = text.splitlines()
    start = next(
        (i for i, line in enumerate(lines) if re.fullmatch(rf"\s*\[\s*{section}\s*\]\s*(#.*)?", line)), None
    )
    if start is None:
        return text.rstrip("\n") + ("\n\n" if text.strip() else "") + f"[{section}]\n{key} = {literal}\n"
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"\s*\[", lines[i])), len(lines))
    pattern = re.compile(rf"\s*(#\s*)?{re.escape(key)}\s*=")
    setting = [i for i in range(start + 1, end) if pattern.match(lines[i])]
    live = [i for i in setting if not lines[i].lstrip().startswith("#")]
    target = (live or setting or [None])[0]
    if target is None:
        lines.insert(start + 1, f"{key} = {literal}")
    else:
        lines[target] = f"{key} = {literal}"
    return "\n".join(lines) + "\n"


def write_checked(path: Path, text: str) -> None:
    """Write ``text`` only if it loads as a config, atomically, keeping the file's owner and mode."""
    tmp = path.with_name(path.name + ".iotgw-setup")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text, encoding="utf-8")
    try:
        try:
            load(tmp)
        except ConfigError as exc:  # the temporary file is gone when the user reads this: name theirs
            raise ConfigError(str(exc).replace(str(tmp), str(path))) from exc
        if path.exists():
            st = path.stat()
            os.chown(tmp, st.st_uid, st.st_gid)
            os.chmod(tmp, st.st_mode & 0o7777)
        os.replace(tmp, path)
    except (ConfigError, OSError):
        tmp.unlink(missing_ok=True)
        raise


def set_admin_password(config: Path) -> None:
    # Named with this config unless it is the default: the password must go to the database it configures.
    again = "sudo iotgw user set-password" + ("" if config == DEFAULT_PATH else f" --config {shlex.quote(str(config))}")
    if importlib.util.find_spec("webui") is None or not sys.stdin.isatty():
        print(f"Admin password: run `{again}` to set it.")
        return
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "user", "set-password", "--config", str(config)]
    )
    if proc.returncode != 0:
        print(f"Admin password not set: run `{again}` to set it.")


ROUTER_GUIDE = """
Make your router hand out this gateway as the DNS server (DHCP option 6):
  1. Give this machine a fixed address on the router (a static DHCP lease for {ip}).
  2. In the router's DHCP settings, set the DNS server to {ip} (often "Local DNS server" or "DNS server 1").
     OpenWrt:  uci add_list dhcp.lan.dhcp_option='6,{ip}' && uci commit dhcp && /etc/init.d/dnsmasq restart
     dnsmasq:  dhcp-option=option:dns-server,{ip}
  3. Devices switch when they renew their lease (reconnect them, or wait).
  More (IPv6, devices with hard-coded DNS): /usr/share/doc/iotgw/openwrt.md
"""
