"""Tables. Configuration and device state live in one database; the bulky query log lives in another
(a sibling SQLite file by default) so it can be pruned and written in batches without touching the rest.
"""

from __future__ import annotations

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class ConfigBase(DeclarativeBase):
    """Devices, names, fingerprints, identifications, settings."""


class QueryLogBase(DeclarativeBase):
    """The query log only."""


class Device(ConfigBase):
    __tablename__ = "devices"

    # A MAC address, lower case and colon separated; "ip:<address>" for a client whose MAC cannot be known
    # (loopback, another subnet), merged into its MAC's device when one appears.
    mac: Mapped[str] = mapped_column(String(48), primary_key=True)
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)
    vendor: Mapped[str | None] = mapped_column(String(200))  # from the OUI table
    name: Mapped[str | None] = mapped_column(String(200))  # the best name known; see DeviceName for all
    name_source: Mapped[str | None] = mapped_column(String(16))  # user | dhcp | mdns | rdns
    status: Mapped[str] = mapped_column(String(16), default="new")  # new | quarantined | approved
    # The current identification (its history is in Identification).
    manufacturer: Mapped[str | None] = mapped_column(String(100))
    device_type: Mapped[str | None] = mapped_column(String(100))
    category: Mapped[str | None] = mapped_column(String(50))
    confidence: Mapped[float | None] = mapped_column(Float)
    known: Mapped[bool | None] = mapped_column(Boolean)
    decided_after_s: Mapped[float | None] = mapped_column(Float)
    # The owner's confirmation or correction: the labels federated training learns from.
    label_manufacturer: Mapped[str | None] = mapped_column(String(100))
    label_device_type: Mapped[str | None] = mapped_column(String(100))
    label_category: Mapped[str | None] = mapped_column(String(50))
    labelled_at: Mapped[float | None] = mapped_column(Float)


class Address(ConfigBase):
    __tablename__ = "addresses"

    ip: Mapped[str] = mapped_column(String(45), primary_key=True)
    mac: Mapped[str] = mapped_column(ForeignKey("devices.mac", ondelete="CASCADE"), index=True)
    source: Mapped[str] = mapped_column(String(16))  # dhcp | neighbour | packet | server
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)


class DeviceName(ConfigBase):
    __tablename__ = "device_names"
    __table_args__ = (UniqueConstraint("mac", "source", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    mac: Mapped[str] = mapped_column(ForeignKey("devices.mac", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(String(16))  # dhcp | mdns | rdns | user
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)


class DhcpFingerprint(ConfigBase):
    __tablename__ = "dhcp_fingerprints"
    __table_args__ = (UniqueConstraint("mac", "param_list", "vendor_class", "hostname"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    mac: Mapped[str] = mapped_column(ForeignKey("devices.mac", ondelete="CASCADE"), index=True)
    first_seen: Mapped[float] = mapped_column(Float)
    hostname: Mapped[str | None] = mapped_column(String(255))
    param_list: Mapped[str] = mapped_column(String(255), default="")  # "1,3,6,15": order matters
    vendor_class: Mapped[str | None] = mapped_column(String(255))
    client_id: Mapped[str | None] = mapped_column(String(255))


class MdnsService(ConfigBase):
    __tablename__ = "mdns_services"
    __table_args__ = (UniqueConstraint("mac", "service"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    mac: Mapped[str] = mapped_column(ForeignKey("devices.mac", ondelete="CASCADE"), index=True)
    service: Mapped[str] = mapped_column(String(255))
    first_seen: Mapped[float] = mapped_column(Float)


class Identification(ConfigBase):
    """Every committed or revised identification of a device, newest last."""

    __tablename__ = "identifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    mac: Mapped[str] = mapped_column(ForeignKey("devices.mac", ondelete="CASCADE"), index=True)
    ts: Mapped[float] = mapped_column(Float)
    manufacturer: Mapped[str | None] = mapped_column(String(100))
    device_type: Mapped[str | None] = mapped_column(String(100))
    category: Mapped[str | None] = mapped_column(String(50))
    confidence: Mapped[float] = mapped_column(Float)
    known: Mapped[bool] = mapped_column(Boolean)
    decided_after_s: Mapped[float | None] = mapped_column(Float)
    alternatives: Mapped[list] = mapped_column(JSON, default=list)
    signals: Mapped[list] = mapped_column(JSON, default=list)
    model_version: Mapped[str] = mapped_column(String(64))


class ObservationWindow(ConfigBase):
    """What a device sent in its first seconds: the input its identification came from, kept so that an
    owner's confirmation can become a federated training example without the traffic leaving the home."""

    __tablename__ = "observation_windows"

    mac: Mapped[str] = mapped_column(ForeignKey("devices.mac", ondelete="CASCADE"), primary_key=True)
    started_at: Mapped[float] = mapped_column(Float)
    observations: Mapped[list] = mapped_column(JSON, default=list)  # [{"kind": "dns", "ts": 0.3, ...}]


class Setting(ConfigBase):
    """Small key/value state: revision counters the daemon polls, the gateway's secrets' metadata."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class AlertRecord(ConfigBase):
    """The recent alerts, newest last, for the web UI's alert list; pruned to the last few thousand."""

    __tablename__ = "alerts"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    mac: Mapped[str | None] = mapped_column(String(48), index=True)
    data: Mapped[dict] = mapped_column(JSON, default=dict)


class OutboxMessage(ConfigBase):
    """An alert written before it is published and deleted when the broker acknowledges it.

    The id orders delivery; AUTOINCREMENT so an id is never reused after the newest row was deleted.
    """

    __tablename__ = "outbox"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(32))
    mac: Mapped[str | None] = mapped_column(String(48))
    data: Mapped[dict] = mapped_column(JSON, default=dict)


class Query(QueryLogBase):
    __tablename__ = "queries"
    __table_args__ = (Index("ix_queries_mac_ts", "mac", "ts"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    client: Mapped[str] = mapped_column(String(45))
    mac: Mapped[str | None] = mapped_column(String(48))
    qname: Mapped[str] = mapped_column(String(255))
    qtype: Mapped[int] = mapped_column(Integer)
    sld: Mapped[str] = mapped_column(String(255), index=True)
    rcode: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    verdict: Mapped[str] = mapped_column(String(16))
    rule: Mapped[str | None] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(String(16))
    # The rule in the owner's words, as the policy engine said it when it decided (``Verdict.words``); NULL in rows
    # written before it was kept, which show the key instead.
    rule_words: Mapped[str | None] = mapped_column(String(1000))

    @property
    def rule_shown(self) -> str:
        """The rule as the query log page and ``iotgw queries`` show it: its words, else its key. No words can
        surely be read out of a key (an owner-given type or category name may hold " block " or "schedule=")."""
        return self.rule_words or self.rule or ""


class User(ConfigBase):
    """A web UI account (today only ``admin``); the password is an argon2 hash."""

    __tablename__ = "users"

    username: Mapped[str] = mapped_column(String(64), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    password_changed_at: Mapped[float] = mapped_column(Float)
    # Failed logins without a device cookie since ``failures_since`` (a 15-minute window), and how long clients
    # without one are refused once there were too many (``gateway.accounts``; the column's name is from when an
    # address that had logged in was let through instead).
    failures_since: Mapped[float | None] = mapped_column(Float)
    recent_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    new_addresses_locked_until: Mapped[float | None] = mapped_column(Float)
    # Bumped at logout: a session remembers it at login and is refused once it differs (the cookie is signed,
    # not stored, so without this a copied cookie would outlive the logout).
    session_generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class LoginAddress(ConfigBase):
    """One client address's failed logins to one account, made without a device cookie: its failures in a row and
    its lockout (``gateway.accounts`` bounds the rows)."""

    __tablename__ = "login_addresses"

    username: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(45), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_failure_at: Mapped[float | None] = mapped_column(Float)
    locked_until: Mapped[float | None] = mapped_column(Float)


class LoginDevice(ConfigBase):
    """A device cookie: given to a browser at its login, bound to the account. Only its SHA-256 is stored, as for
    API tokens. Failed logins made with it count here, in a row, and lock out this cookie, not the address."""

    __tablename__ = "login_devices"

    cookie_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    issued_at: Mapped[float] = mapped_column(Float)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[float | None] = mapped_column(Float)


class ApiToken(ConfigBase):
    """A bearer token for scripts. Only its SHA-256 is stored: the token itself is shown once, at creation."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(8))  # read | write
    created_at: Mapped[float] = mapped_column(Float)
    last_used_at: Mapped[float | None] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float)
    # None: never expires (a choice at creation, and every token made before tokens could expire).
    expires_at: Mapped[float | None] = mapped_column(Float)
