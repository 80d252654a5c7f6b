"""Configuration: a TOML file (``/etc/iotgw/iotgw.toml`` by default) overridden by command-line flags.

Every section is a dataclass with defaults, so an empty file (or none at all) is a working configuration.
A bad file fails with ``ConfigError`` naming the file, the line and the key.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
import tomllib
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

DEFAULT_PATH = Path("/etc/iotgw/iotgw.toml")
DEFAULT_STATE_DIR = Path("/var/lib/iotgw")


class ConfigError(Exception):
    """A configuration that cannot be used; the message names file, line and key."""


@dataclass
class DnsConfig:
    listen: list[str] = field(default_factory=lambda: ["0.0.0.0:53", "[::]:53"])
    upstreams: list[str] = field(default_factory=lambda: ["1.1.1.1", "9.9.9.9"])
    # Clients outside these prefixes get REFUSED: never an open resolver. A link-local client (fe80::/10) must also
    # come from an interface of link_local_interfaces: the same address on the WAN link is someone else.
    lan: list[str] = field(
        default_factory=lambda: ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "fe80::/10"]
    )
    timeout_s: float = 2.0
    cache_size: int = 10000
    rate_limit_per_minute: int = 1000  # Pi-hole's default; 0 switches it off


@dataclass
class CaptureConfig:
    interface: str | None = None
    sniff: bool = True


@dataclass
class StoreConfig:
    url: str = ""  # empty: SQLite under [gateway].state_dir
    querylog_days: int = 90
    querylog_max_rows: int = 2_000_000
    flush_interval_s: float = 2.0


@dataclass
class MqttConfig:
    url: str = ""  # mqtt://host:1883 or mqtts://host:8883; empty switches MQTT off
    username: str = ""
    password: str = ""
    ca_file: str = ""
    discovery_prefix: str = "homeassistant"
    outbox_max: int = 10000
    # Client devices announced to Home Assistant (approved ones first, then the oldest): a flood of spoofed MACs
    # must not fill the owner's Home Assistant with entities. Those beyond it are in the web UI only.
    ha_devices_max: int = 200


@dataclass
class DevicesConfig:
    # Devices the gateway keeps (in memory and in the store). A host spoofing source MACs or LAN addresses makes
    # a device of each; past this, devices the owner never touched and unseen for a day make room, and if none
    # can, a new device is answered and filtered but not kept (counted in devices_untracked, alerted once).
    max: int = 1000


@dataclass
class IdentifierConfig:
    model_dir: str = ""  # empty: the model bundle that ships with the package


@dataclass
class WebConfig:
    listen: str = "0.0.0.0:8080"
    # Host names the web UI answers to besides its addresses and LAN-only names (see webui.security.host_allowed);
    # ".example.org" also allows every name under it.
    hosts: list[str] = field(default_factory=list)


@dataclass
class FederationConfig:
    """What the nightly ``iotgw federation join`` (iotgw-federation.timer) joins; its flags override these."""

    superlink: str = ""  # the fleet's SuperLink, HOST:PORT; empty: this home is in no federation
    tls_ca: str = ""  # CA certificate (PEM) that signed the SuperLink's certificate
    insecure: bool = False  # no TLS (loopback tests only; updates are still masked)
    auth_key: str = ""  # private key from `iotgw federation keygen`, when the SuperLink authenticates nodes


@dataclass
class GatewayConfig:
    name: str = "iotgw"
    state_dir: str = str(DEFAULT_STATE_DIR)


@dataclass
class Config:
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    identifier: IdentifierConfig = field(default_factory=IdentifierConfig)
    web: WebConfig = field(default_factory=WebConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    source: str = "(defaults)"  # the file this came from, for messages

    @property
    def state_dir(self) -> Path:
        return Path(self.gateway.state_dir)

    @property
    def federation_dir(self) -> Path:
        """Federated retraining's state: the home's exported windows, round log and installed models."""
        return self.state_dir / "federation"

    @property
    def model_dir(self) -> Path | None:
        """The identification bundle the gateway runs: ``[identifier].model_dir`` when set, else the one
        federated retraining installed, else None (the bundle shipped with the package)."""
        if self.identifier.model_dir:
            return Path(self.identifier.model_dir)
        # imported here: it brings numpy, and everything reads the config
        from identifier.federated.updates import ModelStore

        return ModelStore(self.federation_dir / "model").installed_dir()

    @property
    def db_url(self) -> str:
        return self.store.url or f"sqlite:///{self.state_dir / 'iotgw.sqlite'}"


def load(path: str | Path | None = None) -> Config:
    """Read ``path`` (or the default path if it exists); no file at all gives the defaults."""
    if path is None:
        if not DEFAULT_PATH.exists():
            return Config()
        path = DEFAULT_PATH
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    text = decode(path, raw)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib says "(at line L, column C)", or "(at end of document)" for an unclosed value.
        m = re.search(r"at line (\d+)", str(exc))
        line = m.group(1) if m else str(len(text.splitlines()) or 1)
        raise ConfigError(f"{path}:{line}: {exc}") from exc
    cfg = Config(source=str(path))
    hints = get_type_hints(Config)
    for section, values in data.items():
        if section not in hints or section == "source":
            raise ConfigError(f"{path}:{_line(text, section, None)}: unknown section [{section}]")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}:{_line(text, None, section)}: {section} must be a [section]")
        target = getattr(cfg, section)
        fields = get_type_hints(type(target))
        for key, value in values.items():
            where = f"{path}:{_line(text, section, key)}: {section}.{key}"
            if key not in fields:
                raise ConfigError(f"{where}: unknown key")
            setattr(target, key, _coerce(value, fields[key], where))
    validate(cfg, text)
    return cfg


def decode(path: Path, raw: bytes) -> str:
    """``raw`` as UTF-8 (TOML's only encoding); ConfigError names the line and byte of the first bad one."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 (byte {exc.start} is {raw[exc.start]:#04x}): save the file as UTF-8"
        ) from exc


def validate(cfg: Config, text: str | None = None) -> None:
    """Checks that need more than a type: addresses and prefixes parse, upstreams are IP addresses, numbers are
    in range. ``text`` is the file's text, to name the line of a bad value."""

    def where(key: str, section: str = "dns") -> str:
        line = f":{_line(text, section, key)}" if text is not None else ""
        return f"{cfg.source}{line}: {section}.{key}"

    for key in ADDRESS_CHECKS:
        try:
            check_addresses(key, getattr(cfg.dns, key))
        except ValueError as exc:
            raise ConfigError(f"{where(key)}: {exc}") from exc
    # Each of these loads fine out of range and then breaks later: a negative cache size fails each forwarded
    # answer, a zero timeout SERVFAILs everything, a zero querylog_days makes the prune delete every row.
    for (section, key), limits in NUMBER_RANGES.items():
        problem = _range_problem(getattr(getattr(cfg, section), key), *limits)
        if problem:
            raise ConfigError(f"{where(key, section)}: {problem}")
    if cfg.store.url:
        try:
            check_database_url(cfg.store.url)
        except ValueError as exc:
            raise ConfigError(f"{where('url', 'store')}: {exc}") from exc
    if cfg.mqtt.url:
        try:
            check_mqtt_url(cfg.mqtt.url)
        except ValueError as exc:
            raise ConfigError(f"{where('url', 'mqtt')}: {exc}") from exc
    problem = discovery_prefix_problem(cfg.mqtt.discovery_prefix)
    if problem:
        raise ConfigError(f"{where('discovery_prefix', 'mqtt')}: {problem}")
    try:
        parse_hostport(cfg.web.listen, 8080)
    except ValueError as exc:
        raise ConfigError(f"{where('listen', 'web')}: {exc}") from exc
    for host in cfg.web.hosts:
        if not HOST_NAME.fullmatch(host):
            raise ConfigError(f"{where('hosts', 'web')}: {host!r} is not a host name (or .domain for all under it)")


# (section, key) -> (lowest, highest, whether the lowest itself is refused, what to say after the lowest).
# Highest: far beyond any real use, and small enough for a database integer.
NUMBER_RANGES: dict[tuple[str, str], tuple[float, float, bool, str]] = {
    ("dns", "cache_size"): (0, 10**9, False, " (0 switches it off)"),
    ("dns", "rate_limit_per_minute"): (0, 10**9, False, " (0 switches it off)"),
    ("dns", "timeout_s"): (0, 60, True, " seconds"),
    ("store", "querylog_days"): (1, 36500, False, " (days of queries to keep)"),
    ("store", "querylog_max_rows"): (1000, 10**12, False, " (queries to keep)"),
    ("store", "flush_interval_s"): (0, 3600, True, " seconds"),
    ("mqtt", "outbox_max"): (2, 10**9, False, " (the outbox keeps a drop notice besides the alerts)"),
    ("mqtt", "ha_devices_max"): (0, 10**6, False, " (0 announces the gateway alone)"),
    ("devices", "max"): (10, 10**6, False, " (devices the gateway keeps)"),
}


def _range_problem(value: float, low: float, high: float, low_refused: bool, note: str) -> str | None:
    """What is wrong with ``value`` for a key with these limits, or None; inf and nan are never in range."""
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if low_refused and value <= low:
        return f"must be more than {low}{note}, got {value}"
    if value < low:
        return f"must be {low} or more{note}, got {value}"
    if value > high:
        return f"must be at most {high}, got {value}"
    return None


def check_mqtt_url(url: str) -> None:
    """ValueError (password hidden) unless ``url`` is one the daemon's MQTT link takes."""
    from gateway.alerts.mqtt import parse_url  # late: paho loads only when MQTT is configured

    parse_url(url)


def check_database_url(url: str) -> None:
    """ValueError (password hidden) unless SQLAlchemy can read ``url`` and has its database's dialect; left
    unchecked, a path or a misspelt scheme failed with a traceback from deep inside SQLAlchemy."""
    from sqlalchemy.engine import make_url  # late: only a configured URL needs SQLAlchemy here
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError):  # ValueError: a port that is no number
        raise ValueError(
            f"{redact_url(url)!r} is not a database URL: sqlite:////path/to/iotgw.sqlite or "
            "postgresql://user:password@host/iotgw"
        ) from None


def discovery_prefix_problem(prefix: str) -> str | None:
    """What keeps ``prefix`` from starting the topics the daemon publishes discovery to, or None. Left
    unchecked, a wildcard there made every discovery publish fail at run time and Home Assistant saw nothing."""
    if not prefix:
        return "must not be empty (Home Assistant's default is homeassistant)"
    if any(c in prefix for c in "+#\0"):
        return f"{prefix!r} is not an MQTT topic: no '+', '#' or NUL"
    if prefix.startswith("$"):
        return f"{prefix!r}: topics starting with '$' belong to the broker"
    return None


def redact_url(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part replaced by ``***``: URLs end up in messages.
    Works on URLs that do not parse, since those are the ones printed in errors."""
    m = re.match(r"([^:/?#]*:)?//([^/?#]*)", url)
    if not m or "@" not in m.group(2):
        return url
    userinfo, _, hostport = m.group(2).rpartition("@")
    if ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return url[: m.start(2)] + f"{user}:***@{hostport}" + url[m.end(2) :]


HOST_NAME = re.compile(r"\.?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")


def upstream_address(text: str) -> tuple[str, int]:
    """An upstream's (IP address, port); ValueError for a host name: resolving it could ask this very server."""
    host, port = parse_hostport(text, 53)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None
    return host, port


def peer_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address a socket peer stands for, in one spelling: its scope id (``%eth0``) dropped, an IPv4-mapped
    IPv6 address (``::ffff:10.0.0.5``, a dual-stack socket's IPv4 client) as the IPv4 one, so that a LAN prefix
    or a per-address count sees one client. ValueError when ``text`` is no IP address. A link-local address says
    nothing of its link here: its scope says that (``on_lan_link``)."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def link_local_interfaces(dns: DnsConfig, lan_interface: str | None) -> list[str]:
    """The interfaces the DNS server answers link-local (fe80::/10) clients on: the LAN interface (``[capture]
    interface``, which ``iotgw setup`` writes) and any interface a listen address names as its zone
    (``[fe80::1%br-lan]:53``). A link-local address is only unique on its own link: from any other interface
    (the WAN port's, whose neighbours are the ISP's modem and beyond) such a client is an outsider."""
    names = [lan_interface] if lan_interface else []
    for listen in dns.listen:
        zone = parse_hostport(listen, 53)[0].partition("%")[2]
        if zone and zone not in names:
            names.append(zone)
    return names


def on_lan_link(interface: str | int, links: Collection[str]) -> bool:
    """Whether a link-local peer (fe80::/10) that came in on ``interface`` is on a LAN link: ``interface`` is one of
    ``links`` (``link_local_interfaces``), by name or by index. ``interface`` is the peer address's scope: its index
    (the 4th item of a socket's IPv6 peer address) or the zone of its text (``fe80::2%eth0``; an index there when
    the interface had no name left). ``links`` are names or indexes as configured (``[fe80::1%3]:53``). No scope
    (0 or empty) is no known link. Looked up for each peer rather than once at start: a bridge made again after a
    restart of the network has a new index. A link-local address is only unique on its own link, so fe80::2 on the
    WAN port is the ISP's modem or beyond, not the LAN's fe80::2."""
    if not interface or not links:
        return False
    if str(interface) in links:  # as configured; an index matches without its name, which may be gone by now
        return True
    try:
        if isinstance(interface, int):
            return socket.if_indextoname(interface) in links
        return str(socket.if_nametoindex(interface)) in links
    except OSError:  # no such interface (any more)
        return False


def socket_address(host: str, port: int) -> tuple:
    """The address ``bind`` takes for ``host``: Python reads the ``%eth0`` of an IPv6 address's text but leaves the
    scope id at 0, so binding ``fe80::1%eth0`` failed (EINVAL); getaddrinfo fills it in. socket.gaierror when
    there is no such interface."""
    if "%" not in host:
        return host, port
    return socket.getaddrinfo(host, port, socket.AF_INET6, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST)[0][4]


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """``1.2.3.4``, ``1.2.3.4:53``, ``[::1]:53`` or ``::1`` -> (host, port)."""
    text = text.strip()
    m = re.fullmatch(r"\[([0-9a-fA-F:.%\w]+)\](?::(\d+))?", text)
    if m:
        host, port = m.group(1), m.group(2)
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, None
    try:
        ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9.-]+", host):
            raise ValueError(f"{text!r} is not HOST[:PORT]") from None
    p = int(port) if port else default_port
    if not 0 <= p <= 65535:
        raise ValueError(f"{text!r}: port out of range")
    return host, p


def _network(text: str) -> None:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not a network prefix") from None


# dns.<key> -> the check of one value (ValueError): one table for the config file and the command-line flags
ADDRESS_CHECKS = {
    "lan": _network,
    "listen": lambda text: parse_hostport(text, 53),
    "upstreams": upstream_address,
}


def check_addresses(key: str, values: list[str]) -> None:
    """Raise ValueError for the first of ``values`` that is not a valid ``dns.<key>`` entry."""
    for value in values:
        ADDRESS_CHECKS[key](value)



def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if origin is list:
        (item,) = get_args(hint)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
            raise ConfigError(f"{where}: expected a list of {item.__name__}")
        return value
    allowed = tuple(a for a in get_args(hint) if a is not type(None)) or (hint,)
    if value in (None, "") and type(None) in get_args(hint):
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and bool not in allowed:
        raise ConfigError(f"{where}: expected {' or '.join(a.__name__ for a in allowed)}, got a boolean")
    if not isinstance(value, allowed):
        raise ConfigError(f"{where}: expected {' or '.join(a.__name__ for a in allowed)}, got {value!r}")
    return value


def _line(text: str, section: str | None, key: str | None) -> int:
    """The line number of ``key`` inside ``[section]`` (tomllib keeps no positions, so look it up). Keys may be
    quoted (``"timeout_s" = 0``) or dotted (``timeout_s.x = 1``, or ``dns.timeout_s = 0`` before any header)."""
    current = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        m = re.fullmatch(r"\[\s*([^\]]+?)\s*\]\s*(#.*)?", stripped)
        if m:
            current = re.sub(r"""["'\s]""", "", m.group(1))
            if key is None and current == section:
                return number
            continue
        if not key:
            continue
        if (section is None or current == section) and re.match(rf"{_key_path(key)}\s*[=.]", stripped):
            return number
        if section and current is None and re.match(rf"{_key_path(section, key)}\s*[=.]", stripped):
            return number
    return 1


def _key_path(*names: str) -> str:
    """A regex for the dotted key ``names``, each bare or quoted, as TOML allows."""
    parts = (rf"""(?:{re.escape(n)}|"{re.escape(n)}"|'{re.escape(n)}')""" for n in names)
    return r"\s*\.\s*".join(parts)
