"""What usually goes wrong on an install, checked one small function at a time, each with how to fix it.

Every check takes the loaded ``Config`` and returns one ``Finding``; none changes the system except the
database check, which migrates as the daemon would (as the state directory's owner when run as root, so a
root ``iotgw doctor`` never leaves root-owned files where the ``iotgw`` user must write).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.config import Config, link_local_interfaces, parse_hostport, redact_url, socket_address

Status = Literal["ok", "warn", "fail", "skip"]

# Capability bit numbers from linux/capability.h.
CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_NAMES = {
    CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE",
    CAP_NET_ADMIN: "CAP_NET_ADMIN",
    CAP_NET_RAW: "CAP_NET_RAW",
}

RESOLVED_STUB = ("127.0.0.53", "127.0.0.54")  # systemd-resolved's stub listeners (the second since v251)
BUILD_YEAR = 2026  # a clock before this year has certainly not been set


@dataclass
class Finding:
    check: str
    status: Status
    detail: str
    fix: str = ""


def run_all(cfg: Config) -> list[Finding]:
    return [_run(check, cfg) for check in CHECKS]


def _run(check: Callable[[Config], Finding], cfg: Config) -> Finding:
    """One check; a file it may not read is a finding (doctor is often first run from a user's shell)."""
    try:
        return check(cfg)
    except PermissionError as exc:
        name = check.__name__.removeprefix("check_").replace("_", "-")
        what = exc.filename if exc.filename is not None else exc
        return Finding(
            name, "fail", f"permission denied: {what}", "run it as root (`sudo iotgw doctor`) or as the iotgw user"
        )


# ---------------------------------------------------------------- port 53


def check_dns_port(cfg: Config) -> Finding:
    """Each ``dns.listen`` address must be free (or held by iotgw itself)."""
    problems: list[Finding] = []
    notes: list[str] = []
    for listen in cfg.dns.listen:
        host, port = parse_hostport(listen, 53)
        owner = _listener(port, host)
        if owner and "iotgw" in owner[1]:
            notes.append(f"{listen} served by iotgw (pid {owner[0]})")
            continue
        error = _try_bind(host, port)
        if error is None:
            notes.append(f"{listen} free")
        elif error.errno == errno.EACCES:
            notes.append(f"{listen} not tested (no permission to bind port {port}; see capabilities)")
        elif error.errno == errno.EADDRNOTAVAIL:
            problems.append(
                Finding(
                    "dns-port",
                    "fail",
                    f"{listen}: no interface has the address {host}",
                    "set [dns] listen to an address of this machine (`ip -brief addr`)",
                )
            )
        elif error.errno == errno.EAFNOSUPPORT:
            notes.append(f"{listen} skipped (IPv6 disabled)")
        elif error.errno == errno.EADDRINUSE:
            problems.append(_port_taken(listen, host, port, owner))
        else:
            problems.append(_unbindable(listen, host, error))
    if problems:
        return problems[0]
    return Finding("dns-port", "ok", "; ".join(notes))


def _unbindable(listen: str, host: str, error: OSError) -> Finding:
    """A listen address that cannot be bound for a reason other than the port being in use."""
    if isinstance(error, socket.gaierror):
        scope = host.partition("%")[2]
        if scope and not _interface_exists(scope):
            reason = f"there is no interface named {scope!r}"
        else:
            reason = f"{host!r} is not an IP address ({error.strerror})"
    else:
        reason = f"cannot bind {host}: {error.strerror or error}"
    return Finding(
        "dns-port",
        "fail",
        f"{listen}: {reason}",
        "set [dns] listen to IP addresses of this machine (`ip -brief addr`); a link-local IPv6 address "
        "needs its interface, as in [fe80::1%eth0]:53",
    )


def _interface_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _port_taken(listen: str, host: str, port: int, owner: tuple[int, str] | None) -> Finding:
    stub = _listener(port, RESOLVED_STUB[0], exact=True) or _listener(port, RESOLVED_STUB[1], exact=True)
    if stub or (owner and "systemd-resolve" in owner[1]):
        return Finding(
            "dns-port",
            "fail",
            f"{listen}: port {port} is taken by systemd-resolved's stub listener on 127.0.0.53",
            "turn the stub listener off, keeping resolved for this machine's own lookups:\n"
            "  mkdir -p /etc/systemd/resolved.conf.d\n"
            "  printf '[Resolve]\\nDNSStubListener=no\\n' > /etc/systemd/resolved.conf.d/iotgw.conf\n"
            "  ln -sf /run/systemd/resolve/resolv.conf /etc/resolv.conf\n"
            "  systemctl restart systemd-resolved",
        )
    who = f"{owner[1]} (pid {owner[0]})" if owner else "another program"
    hint = {
        "dnsmasq": "stop it (`systemctl disable --now dnsmasq`) or set `port=0` in /etc/dnsmasq.conf "
        "to keep only its DHCP server",
        "pihole-FTL": "Pi-hole already answers DNS here: run one or the other",
        "named": "stop bind9 (`systemctl disable --now named`)",
    }
    fix = next((v for k, v in hint.items() if owner and k in owner[1]), "")
    return Finding(
        "dns-port",
        "fail",
        f"{listen}: port {port} is taken by {who}",
        fix or f"find it with `ss -lunp 'sport = :{port}'` and stop it, or listen on another address",
    )


def _try_bind(host: str, port: int) -> OSError | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        try:
            with socket.socket(family, kind) as sock:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(socket_address(host, port))
        except OSError as exc:
            return exc
    return None


def _listener(port: int, host: str, *, exact: bool = False) -> tuple[int, str] | None:
    """(pid, command line) of a process listening on ``port`` at ``host`` (or any address unless ``exact``);
    ``None`` if there is none or it cannot be seen (another user's process, when not root)."""
    import psutil  # late: only the doctor needs it

    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, OSError):
        return None
    for conn in conns:
        if not conn.laddr or conn.laddr.port != port:
            continue
        if conn.type == socket.SOCK_STREAM and conn.status != psutil.CONN_LISTEN:
            continue
        addr = conn.laddr.ip
        if exact and addr != host:
            continue
        if not exact and addr not in (host, "0.0.0.0", "::") and host not in ("0.0.0.0", "::"):
            continue
        if conn.pid is None:
            return (0, "an unknown process") if exact else None
        try:
            return conn.pid, " ".join(psutil.Process(conn.pid).cmdline()) or psutil.Process(conn.pid).name()
        except psutil.Error:
            return conn.pid, "an exited process"
    return None


# ---------------------------------------------------------------- capabilities


def effective_capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_capabilities(cfg: Config, caps: int | None = None) -> Finding:
    """The capabilities this process holds against those the config needs."""
    caps = effective_capabilities() if caps is None else caps
    low = _unprivileged_port_start()
    needed: dict[int, str] = {}
    if any(parse_hostport(x, 53)[1] < low for x in cfg.dns.listen):
        needed[CAP_NET_BIND_SERVICE] = f"DNS on a port below {low}"
    if cfg.capture.sniff and cfg.capture.interface:
        needed[CAP_NET_RAW] = f"capturing DHCP and mDNS on {cfg.capture.interface}"
    missing = {bit: why for bit, why in needed.items() if not caps & (1 << bit)}
    service_hint = (
        "run it as the service does: `systemctl start iotgw` (iotgw.service grants "
        "CAP_NET_BIND_SERVICE CAP_NET_RAW CAP_NET_ADMIN as AmbientCapabilities), or for a test from a shell "
        "`sudo setpriv --reuid=iotgw --regid=iotgw --init-groups --inh-caps=+net_bind_service,+net_raw,"
        "+net_admin --ambient-caps=+net_bind_service,+net_raw,+net_admin iotgw doctor`"
    )
    if missing:
        names = ", ".join(f"{CAP_NAMES[b]} ({why})" for b, why in missing.items())
        return Finding("capabilities", "fail", f"this process lacks {names}", service_hint)
    if not caps & (1 << CAP_NET_ADMIN):
        return Finding(
            "capabilities",
            "warn",
            "no CAP_NET_ADMIN: quarantine can answer DNS only, not drop other traffic",
            service_hint,
        )
    held = [CAP_NAMES[b] for b in sorted(CAP_NAMES) if caps & (1 << b)]
    return Finding("capabilities", "ok", "holds " + ", ".join(held))


def _unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


# ---------------------------------------------------------------- interface


def check_interface(cfg: Config) -> Finding:
    name = cfg.capture.interface
    available = sorted(p.name for p in Path("/sys/class/net").iterdir() if p.name != "lo")
    if not name:
        if not cfg.capture.sniff:
            return Finding("interface", "skip", "capture.sniff is off; DNS alone identifies devices")
        return Finding(
            "interface",
            "warn",
            "no LAN interface chosen: DHCP and mDNS are not captured",
            f"run `iotgw setup`, or set [capture] interface to one of: {', '.join(available) or '(none)'}",
        )
    # Looked up among the listed names, never joined onto the path: ".." or "../../etc" is a name, not a path.
    path = Path("/sys/class/net") / name
    try:
        if name not in {p.name for p in Path("/sys/class/net").iterdir()}:
            raise FileNotFoundError(name)
        flags = int((path / "flags").read_text(), 16)
        carrier = (path / "operstate").read_text().strip()
    except (OSError, ValueError):
        return Finding(
            "interface",
            "fail",
            f"interface {name!r} does not exist",
            f"set [capture] interface to one of: {', '.join(available) or '(none)'}",
        )
    if not flags & 0x1:  # IFF_UP
        return Finding("interface", "fail", f"interface {name} is down", f"ip link set {name} up")
    if carrier == "down":
        return Finding(
            "interface",
            "warn",
            f"interface {name} is up but has no link (cable, Wi-Fi)",
            "check the cable or the Wi-Fi connection",
        )
    return Finding("interface", "ok", f"{name} is up ({carrier})")


# ---------------------------------------------------------------- state directory


def check_state_dir(cfg: Config) -> Finding:
    """The state directory (policy, session key, federation, the SQLite database) is a directory, or not there yet.
    A file in its place was a configuration error that stopped doctor before any other check."""
    if _state_dir_is_a_file(cfg):
        return Finding(
            "state-dir",
            "fail",
            f"{cfg.source}: gateway.state_dir: {cfg.state_dir} is not a directory",
            "move the file aside, or set [gateway] state_dir to a directory"
            + ("" if cfg.source == "(defaults)" else f" in {cfg.source}"),
        )
    if not cfg.state_dir.exists():
        return Finding("state-dir", "ok", f"{cfg.state_dir} does not exist yet")
    return Finding("state-dir", "ok", str(cfg.state_dir))


def _state_dir_is_a_file(cfg: Config) -> bool:
    return cfg.state_dir.exists() and not cfg.state_dir.is_dir()


# ---------------------------------------------------------------- link-local DNS clients


def check_link_local(cfg: Config) -> Finding:
    """A link-local client (fe80::/10) is only answered on an interface of ``config.link_local_interfaces``: with
    none known, every one is refused, which a LAN whose router hands out the gateway's fe80:: address needs."""
    link_local = ipaddress.ip_network("fe80::/10")
    nets = [ipaddress.ip_network(prefix, strict=False) for prefix in cfg.dns.lan]
    if not any(n.version == 6 and n.overlaps(link_local) for n in nets):
        return Finding("link-local", "skip", "[dns] lan has no link-local prefix (fe80::/10)")
    # An IPv4-only server hears no IPv6 client at all: warning that link-local ones get REFUSED was false.
    if not any(":" in parse_hostport(listen, 53)[0] for listen in cfg.dns.listen):
        return Finding("link-local", "skip", "[dns] listen has no IPv6 address")
    names = link_local_interfaces(cfg.dns, cfg.capture.interface)
    if not names:
        return Finding(
            "link-local",
            "warn",
            "link-local IPv6 clients (fe80::/10 is in [dns] lan) get REFUSED: no LAN interface is set, and a "
            "link-local address means nothing without its interface (the WAN link has them too)",
            "run `iotgw setup`, or set [capture] interface to the LAN interface (sniff = false keeps capture off)",
        )
    return Finding("link-local", "ok", f"link-local clients are answered on {', '.join(names)} only")


# ---------------------------------------------------------------- database


def check_database(cfg: Config) -> Finding:
    """Opens and migrates the database, as the state directory's owner when run as root."""
    if not cfg.store.url and _state_dir_is_a_file(cfg):  # said once, by check_state_dir
        return Finding("database", "skip", f"the state directory {cfg.state_dir} is not a directory (see state-dir)")
    if os.geteuid() == 0 and cfg.db_url.startswith("sqlite") and not cfg.state_dir.exists():
        # Creating it here would leave it owned by root, and the daemon (user iotgw) could not write it.
        return Finding(
            "database",
            "warn",
            f"{cfg.state_dir} does not exist yet",
            "`systemctl start iotgw` creates it (StateDirectory=) with the database inside",
        )
    owner = _state_owner(cfg)
    # Loaded before the fork: the child, as another user, then needs to read nothing but the database.
    import sqlite3  # noqa: F401

    import alembic.runtime.migration  # noqa: F401
    import sqlalchemy.dialects.sqlite  # noqa: F401

    import gateway.store.db  # noqa: F401

    if owner is None:
        ok, detail = _open_database(cfg.db_url)
    else:
        ok, detail = _as_user(owner, lambda: _open_database(cfg.db_url))
    if ok:
        return Finding("database", "ok", detail)
    return Finding(
        "database",
        "fail",
        detail,
        f"the state directory {cfg.state_dir} must be a directory the iotgw user can write "
        f"(`install -d -o iotgw -g iotgw -m 0750 {cfg.state_dir}`); for a server URL, check that it is "
        "reachable and the credentials are right",
    )


def _open_database(url: str) -> tuple[bool, str]:
    from gateway.store.db import DatabaseUnavailable, Store  # late: SQLAlchemy and Alembic are not needed elsewhere

    try:
        store = Store(url)
        try:
            store.get_setting("schema-check")
        finally:
            store.close()
    except DatabaseUnavailable as exc:  # its message names the URL already
        return False, str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure to open is the finding itself
        return (
            False,
            f"{_safe_url(url)}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
        )
    return True, f"{_safe_url(url)} opens and is at the newest schema"


def check_devices(cfg: Config) -> Finding:
    """Whether the running daemon left new devices untracked, [devices] max being reached with none to make room
    (what it last wrote to the store: this run's devices_untracked)."""
    from gateway.overview import UNTRACKED_SETTING  # late: SQLAlchemy is not needed for the other checks
    from gateway.store.db import missing_sqlite_file

    if missing_sqlite_file(cfg.db_url) is not None:
        return Finding("devices", "skip", "no database yet")
    owner = _state_owner(cfg)

    def read() -> tuple[bool, str]:
        from gateway.store.db import Store

        store = Store(cfg.db_url, migrate=False)
        try:
            return True, store.get_setting(UNTRACKED_SETTING) or "0"
        finally:
            store.close()

    try:
        ok, text = read() if owner is None else _as_user(owner, read)
    except Exception as exc:  # noqa: BLE001 - the database check says what is wrong with it
        ok, text = False, f"{type(exc).__name__}: {exc}"
    if not ok or not text.isdigit():
        return Finding("devices", "skip", f"cannot read the database: {text}")
    if int(text):
        return Finding(
            "devices",
            "warn",
            f"too many devices: possible MAC flood. {text} new devices were not kept since the daemon started "
            f"([devices] max = {cfg.devices.max} reached, none the owner left untouched unseen for 24 h)",
            "find the host sending from ever new MACs or addresses (the query log names them); if the network "
            "really has this many devices, raise [devices] max",
        )
    return Finding("devices", "ok", f"every device met is kept (at most {cfg.devices.max})")


def _state_owner(cfg: Config) -> tuple[int, int] | None:
    """(uid, gid) to open the database as: the state directory's owner when we are root and it is not."""
    if os.geteuid() != 0 or not cfg.db_url.startswith("sqlite"):
        return None
    try:
        st = cfg.state_dir.stat()
    except OSError:
        return None
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def _as_user(owner: tuple[int, int], fn: Callable[[], tuple[bool, str]]) -> tuple[bool, str]:
    """Run ``fn`` in a child process with the given uid/gid and bring its result back over a pipe."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            os.setgroups([])
            os.setgid(owner[1])
            os.setuid(owner[0])
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, never raised in a fork
            result = (False, f"{type(exc).__name__}: {exc}")
        os.write(write_fd, json.dumps(result).encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    ok, detail = json.loads(data or b'[false, "the check process died"]')
    return bool(ok), str(detail)


def _safe_url(url: str) -> str:
    """``url`` with its password as ``***``; also for a URL that does not parse (urlsplit would raise)."""
    return redact_url(url)


# ---------------------------------------------------------------- MQTT broker


def check_broker(cfg: Config, timeout: float = 5.0) -> Finding:
    if not cfg.mqtt.url:
        return Finding("broker", "skip", "MQTT is off (mqtt.url is empty)")
    import paho.mqtt.client as mqtt  # late: only needed when MQTT is on

    from gateway.alerts.mqtt import parse_url  # the daemon's own reading of the URL and the credentials

    try:
        broker = parse_url(cfg.mqtt.url, cfg.mqtt.username, cfg.mqtt.password)
    except ValueError as exc:  # its message hides the password
        return Finding("broker", "fail", str(exc), "fix [mqtt] url: mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    result: dict[str, object] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"iotgw-doctor-{os.getpid()}")
    client.on_connect = lambda _c, _u, _f, reason, _p: result.setdefault("reason", reason)
    if broker.username:
        client.username_pw_set(broker.username, broker.password or None)
    where = f"{broker.host}:{broker.port}"
    if broker.tls:
        try:
            client.tls_set(ca_certs=cfg.mqtt.ca_file or None)
        except (OSError, ValueError) as exc:  # a missing or unreadable CA file, or one that is no certificate
            return Finding(
                "broker",
                "fail",
                f"{where}: cannot set up TLS with ca_file {cfg.mqtt.ca_file!r}: {exc}",
                "point [mqtt] ca_file at the broker's CA certificate (PEM), or leave it empty for the system's",
            )
    try:
        client.connect(broker.host, broker.port, keepalive=10)
    except (OSError, ValueError) as exc:
        return Finding(
            "broker",
            "fail",
            f"{where}: cannot connect: {exc}",
            "start the broker (`systemctl status mosquitto`) or fix [mqtt] url",
        )
    deadline = time.monotonic() + timeout
    while "reason" not in result and time.monotonic() < deadline:
        client.loop(timeout=0.2)
    client.disconnect()
    reason = result.get("reason")
    if reason is None:
        return Finding(
            "broker",
            "fail",
            f"{where}: no answer to CONNECT within {timeout:.0f} s",
            "is this an MQTT port? (mqtts needs the TLS port, 8883 by default)",
        )
    if getattr(reason, "is_failure", False):
        return Finding(
            "broker",
            "fail",
            f"{where}: the broker refused: {reason}",
            "check [mqtt] username and password (or the user:password@ in [mqtt] url) against the broker's "
            "password file",
        )
    return Finding("broker", "ok", f"{where} accepts the connection")


# ---------------------------------------------------------------- model bundle


def check_model(cfg: Config) -> Finding:
    try:
        from identifier.bundle import Bundle, BundleError  # late: numpy weights, only here
    except ImportError:
        return Finding("model", "skip", "this build has no identifier bundle support")
    try:
        bundle = Bundle.load(cfg.model_dir)
    except BundleError as exc:
        return Finding(
            "model",
            "fail",
            str(exc),
            "point [identifier] model_dir at a bundle directory (bundle.json + weights.npz), "
            "or leave it empty for the shipped model",
        )
    return Finding("model", "ok", f"model bundle {bundle.version} loads")


# ---------------------------------------------------------------- clock


def check_clock(cfg: Config, now: float | None = None) -> Finding:
    year = time.gmtime(time.time() if now is None else now).tm_year
    if year < BUILD_YEAR:
        return Finding(
            "clock",
            "fail",
            f"the clock says {year}: TLS certificates and schedules will fail",
            "a Raspberry Pi has no battery clock: enable NTP (`timedatectl set-ntp true`) and "
            "make sure UDP 123 reaches the Internet",
        )
    synced = _ntp_synchronized()
    if synced is False:
        return Finding(
            "clock",
            "warn",
            f"year {year} looks right, but NTP is not synchronized",
            "`timedatectl set-ntp true`; `timedatectl timesync-status` shows why it is not",
        )
    return Finding("clock", "ok", f"year {year}" + (", NTP synchronized" if synced else ""))


def _ntp_synchronized() -> bool | None:
    """timedatectl's view, or None when it cannot tell (no timedatectl, systemd not running)."""
    if not shutil.which("timedatectl"):
        return None
    try:
        proc = subprocess.run(
            ["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    value = proc.stdout.strip()
    return {"yes": True, "no": False}.get(value) if proc.returncode == 0 else None


CHECKS: tuple[Callable[[Config], Finding], ...] = (
    check_dns_port,
    check_capabilities,
    check_interface,
    check_state_dir,
    check_link_local,
    check_database,
    check_devices,
    check_broker,
    check_model,
    check_clock,
)
