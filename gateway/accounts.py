"""Web UI accounts and API tokens: one set of functions for ``iotgw user`` and the web UI.

The admin password is hashed with argon2id. API tokens are random, shown once, and stored as SHA-256 digests: a
leaked database does not leak usable tokens, and a token is long enough (256 bits) that a fast unsalted hash is as
good as a slow one.

Failed logins. The threat is a compromised device on the LAN: it can guess the password, and if a lockout were the
account's it could keep the owner out for good with five wrong guesses every 15 minutes; it can also take many
addresses (IPv4 aliases, IPv6 privacy addresses are free, and every host of a home shares one /64). The answer is
OWASP's device cookies ("Slow Down Online Guessing Attacks with Device Cookies"): a browser that logs in gets a
random cookie bound to the account (``issue_device_cookie``), and

- a login made with a valid device cookie is judged by that cookie alone: five wrong passwords in a row with it
  lock out that cookie for 15 minutes, not the address, and nothing else refuses it, whatever its address;
- a login without one (or with a forged, revoked, expired or other account's cookie) is judged by its client
  address (the TCP peer, never a forwarded header): five wrong passwords in a row lock that address out of the
  account for 15 minutes, as AdGuard Home does, and other addresses go on; a login from the address clears its
  count. Past 50 such failures to the account within 15 minutes, every client without a device cookie is refused
  for 15 minutes, so guessing from fresh addresses stays at about 50 per 15 minutes while the owner's browsers,
  which hold cookies, still get in, from any address (a fresh IPv6 privacy address included).

An address that logged in earns nothing. It did, for 30 days, until device cookies: but DHCP hands a departed
laptop's address to the next host, which may be the guessing device, and the owner's own machines change
addresses; a cookie is held by the browser that typed the password, which is who the exemption was meant for.

A locked client is refused without its password being checked, so guessing then learns nothing. Setting the
password anew (``set_password``) ends every lockout and revokes every device cookie of the account.

The counts, locks and cookies are rows of the config database (cookies as SHA-256 digests, like API tokens), so
restarting ``iotgw web`` resets nothing (an attacker who can make it restart gains no guesses). The rows are
bounded whatever an attacker sends: ``MAX_DEVICES`` cookies per account (only the password makes one, so a flood of
failures cannot push the owner's out; the longest unused go first, and any unused for ``DEVICE_LIFETIME_S``) and
``MAX_ADDRESSES`` failing addresses in all, the longest quiet dropped first.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
import unicodedata
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, func, select, true, update
from sqlalchemy.exc import IntegrityError, OperationalError

from gateway.config import peer_ip
from gateway.store.db import INT64_LIMIT, Store, database_busy
from gateway.store.schema import ApiToken, LoginAddress, LoginDevice, User
from policy.model import CONTROL_CATEGORIES

ADMIN = "admin"
MIN_PASSWORD_LENGTH = 8
MAX_FAILED_LOGINS = 5  # in a row from one address, or with one device cookie: it is locked out for LOCKOUT_S
LOCKOUT_S = 15 * 60
# Failures without a device cookie within LOCKOUT_S past which every client without one is refused for LOCKOUT_S
# (the module's docstring says why).
MAX_ACCOUNT_FAILURES = 50
# A device cookie lasts this long from the login that gave it (each login gives a new one): an owner who opens the
# web UI once a season keeps theirs; one not used for a year is dropped.
DEVICE_LIFETIME_S = 365 * 86400
MAX_DEVICES = 64  # per account: a household's browsers, many times over
# In all. Well beyond MAX_ACCOUNT_FAILURES: fresh addresses are throttled hours before they could push out one
# that is still locked.
MAX_ADDRESSES = 1024
TOKEN_SCOPES = ("read", "write")
# A token's last use is noted to the minute (the token list shows minutes): one write a minute per token at most.
TOKEN_USE_RESOLUTION_S = 60.0
# A new token's lifetime in days, as GitHub offers them; None never expires. Not never by default: a token
# pasted into a script and forgotten should stop working by itself.
TOKEN_LIFETIMES_DAYS: tuple[int | None, ...] = (30, 90, 365, None)
TOKEN_DEFAULT_DAYS = 90
_DAYS = [str(d) for d in TOKEN_LIFETIMES_DAYS if d is not None]
_LIFETIME_CHOICES = f"a token expires after {', '.join(_DAYS[:-1])} or {_DAYS[-1]} days, or never"
TOKEN_PREFIX = "iotgw_"  # noqa: S105 - not a secret: makes a leaked token recognisable to scanners

_hasher = PasswordHasher()
# Verified when the username is unknown, so a wrong name costs the same time as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))
# Each argon2 check takes ~64 MiB and a core for tens of milliseconds; more at once only queue for the CPU.
MAX_PASSWORD_CHECKS = 2
_password_checks = threading.BoundedSemaphore(MAX_PASSWORD_CHECKS)
log = logging.getLogger(__name__)


class LockedOut(Exception):
    """Too many failed logins; ``until`` is when the next attempt will be heard. ``cause`` says whose failures:
    ``"device"``, this device cookie's ``MAX_FAILED_LOGINS`` in a row; ``"address"``, this address's (a client
    without a device cookie); ``"account"``, the account's from many addresses, which refuses every client without
    a device cookie."""

    CAUSES = ("device", "address", "account")

    def __init__(self, until: float, cause: str) -> None:
        if cause not in self.CAUSES:
            raise ValueError(f"a lockout's cause is one of {', '.join(self.CAUSES)}, not {cause!r}")
        super().__init__(f"locked until {time.strftime('%H:%M:%S', time.localtime(until))} ({cause})")
        self.until = until
        self.cause = cause


class TokenNotFound(LookupError):
    pass


@dataclass(frozen=True)
class Principal:
    """Who is making a request: the session's user or an API token; ``can_write`` is false for read tokens."""

    name: str
    can_write: bool
    token_id: int | None = None


def has_password(store: Store, username: str = ADMIN) -> bool:
    with store.session() as s:
        return s.get(User, username) is not None


def set_password(store: Store, password: str, username: str = ADMIN) -> None:
    """Create the account or replace its password; existing web sessions of the user stop working. Failure counts
    and lockouts end (they were guesses at the old password; ``iotgw user set-password`` is also the way out of one),
    and every device cookie of the account is revoked: a new password is also how an owner shuts out a browser
    (or a copied cookie) that should no longer get past a lockout."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"the password needs at least {MIN_PASSWORD_LENGTH} characters")
    digest = _hasher.hash(password)
    now = time.time()
    with store.transaction() as s:
        user = s.get(User, username)
        if user is None:
            s.add(User(username=username, password_hash=digest, password_changed_at=now))
        else:
            user.password_hash, user.password_changed_at = digest, now
            user.failures_since, user.recent_failures, user.new_addresses_locked_until = None, 0, None
            s.execute(delete(LoginAddress).where(LoginAddress.username == username))
            s.execute(delete(LoginDevice).where(LoginDevice.username == username))


def set_initial_password(store: Store, password: str, username: str = ADMIN) -> bool:
    """The first-visit setup: creates the account only if it does not exist yet (False otherwise), so a
    second visitor racing the owner cannot replace a password that was just set."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"the password needs at least {MIN_PASSWORD_LENGTH} characters")
    digest = _hasher.hash(password)
    try:
        with store.transaction() as s:
            s.add(User(username=username, password_hash=digest, password_changed_at=time.time()))
    except IntegrityError:
        return False
    return True


def session_state(store: Store, username: str) -> tuple[float, int] | None:
    """(password_changed_at, session_generation): a session remembers both at login and is refused once either
    changes. None for an unknown user."""
    with store.session() as s:
        user = s.get(User, username)
        return (user.password_changed_at, user.session_generation) if user else None


def end_sessions(store: Store, username: str) -> None:
    """Logout: every session of the user made so far stops working, a copied cookie included."""
    with store.transaction() as s:
        s.execute(
            update(User).where(User.username == username).values(session_generation=User.session_generation + 1)
        )


def client_address(peer: str) -> str:
    """The address a login is counted under: ``peer`` (the TCP peer) in one spelling, an IPv4-mapped IPv6 address
    as IPv4, without a zone. ValueError for anything that is not an IP address."""
    try:
        return str(peer_ip(peer))
    except ValueError:
        raise ValueError(f"a login's client address must be an IP address, not {peer[:64]!r}") from None


def verify_login(
    store: Store, username: str, password: str, peer: str, *, device: str | None = None, now: float | None = None
) -> bool:
    """True for the right password from client address ``peer``, presenting the device cookie ``device`` if the
    browser holds one. Raises ``LockedOut`` while that cookie (if valid) or else that address is locked out of the
    account, or the account refuses clients without a valid cookie, without checking the password at all, so that
    guessing during a lockout learns nothing (the module's docstring has the rules). A cookie that is not valid
    for this account counts as none.

    The slow argon2 check runs with no transaction open and at most ``MAX_PASSWORD_CHECKS`` at a time: a login
    flood must not hold the database's write lock (every other writer would wait) nor take every core."""
    now = time.time() if now is None else now
    address = client_address(peer)
    cookie = _cookie_sha256(device) if device else None
    with store.session() as s:
        user = s.get(User, username)
        digest = user.password_hash if user else None
        if user is not None:
            _refuse_if_locked(user, *_login_rows(s, username, cookie, address, now), now)
    with _password_checks:
        ok = _verify(digest or _DUMMY_HASH, password)
        rehashed = _hasher.hash(password) if ok and digest and _hasher.check_needs_rehash(digest) else None
    if digest is None:
        return False  # no rows for names that have no account: guessing names fills no table
    # A short transaction: another login may have counted a failure or locked the client meanwhile. The user's
    # row is locked for it (SQLite's BEGIN IMMEDIATE already is one writer at a time), so that on PostgreSQL two
    # logins cannot both add the same new address nor both count from the same number.
    with store.transaction() as s:
        user = s.get(User, username, with_for_update=True)
        if user is None or user.password_hash != digest:
            return False  # deleted or re-set during the check: it checked a password that no longer applies
        known, row = _login_rows(s, username, cookie, address, now)
        _refuse_if_locked(user, known, row, now)
        if ok and rehashed:
            user.password_hash = rehashed
        if known is not None:  # the cookie's own count; the address and the account's count are not touched
            known.failures = 0 if ok else known.failures + 1
            if known.failures >= MAX_FAILED_LOGINS:
                known.failures, known.locked_until = 0, now + LOCKOUT_S
            return ok
        if ok:
            if row is not None:
                s.delete(row)  # a login clears the address's count; a row stays only while it has failures
            return True
        if row is None:
            row = LoginAddress(username=username, address=address, failures=0)
            s.add(row)
        row.failures, row.last_failure_at = row.failures + 1, now
        if row.failures >= MAX_FAILED_LOGINS:
            row.failures, row.locked_until = 0, now + LOCKOUT_S
        _count_account_failure(user, now)
        s.flush()
        _forget_beyond(s, LoginAddress, true(), MAX_ADDRESSES, LoginAddress.last_failure_at)
    return False


def issue_device_cookie(store: Store, username: str, *, replacing: str | None = None,
                        password_changed_at: float | None = None, now: float | None = None) -> str | None:
    """A new device cookie for a browser that just logged in to ``username``; the cookie it presented
    (``replacing``), if that was the account's, stops working, so each login renews the cookie and a copy taken
    before it lapses. Only the digest is stored, with its own count of failures.

    ``password_changed_at``: the account's, read before the login checked the password (``session_state``). None
    (no cookie) if the password was set anew since: the login proved the old one, and the new password's
    revocation of every cookie must not be outlived by one issued just after it."""
    now = time.time() if now is None else now
    secret = secrets.token_urlsafe(32)
    with store.transaction() as s:
        # The account's row lock, as verify_login takes it before it counts a failure on a cookie's row: deleted
        # here meanwhile (replaced, expired or pushed out), that row's update matched nothing and the login failed
        # with a StaleDataError on PostgreSQL. SQLite's BEGIN IMMEDIATE already is one writer at a time.
        user = s.get(User, username, with_for_update=True)
        if password_changed_at is not None and (user is None or user.password_changed_at != password_changed_at):
            return None
        if replacing:
            s.execute(delete(LoginDevice).where(LoginDevice.cookie_sha256 == _cookie_sha256(replacing),
                                                LoginDevice.username == username))
        s.execute(delete(LoginDevice).where(LoginDevice.issued_at < now - DEVICE_LIFETIME_S))
        s.add(LoginDevice(cookie_sha256=_cookie_sha256(secret), username=username, issued_at=now, failures=0))
        s.flush()
        _forget_beyond(s, LoginDevice, LoginDevice.username == username, MAX_DEVICES, LoginDevice.issued_at)
    return secret


def _cookie_sha256(cookie: str) -> str:
    # surrogatepass: a cookie is client text; whatever it holds must hash to a digest that matches nothing, not raise
    return hashlib.sha256(cookie.encode("utf-8", "surrogatepass")).hexdigest()


def _login_rows(s, username: str, cookie: str | None, address: str,  # noqa: ANN001 - a session
                now: float) -> tuple[LoginDevice | None, LoginAddress | None]:
    """The device cookie's row if it is a live one of this account, else the address's row (either may be None)."""
    known = s.get(LoginDevice, cookie) if cookie else None
    if known is not None and (known.username != username or known.issued_at < now - DEVICE_LIFETIME_S):
        known = None
    if known is not None:
        return known, None
    return None, s.get(LoginAddress, (username, address))


def _refuse_if_locked(user: User, known: LoginDevice | None, row: LoginAddress | None, now: float) -> None:
    if known is not None:
        if known.locked_until is not None and now < known.locked_until:
            raise LockedOut(known.locked_until, "device")
        return  # a live cookie is judged by its own count alone, whatever the address or the account's state
    if row is not None and row.locked_until is not None and now < row.locked_until:
        raise LockedOut(row.locked_until, "address")
    until = user.new_addresses_locked_until
    if until is not None and now < until:
        raise LockedOut(until, "account")


def _count_account_failure(user: User, now: float) -> None:
    """One more failure without a device cookie to the account within the current window of ``LOCKOUT_S``; at
    ``MAX_ACCOUNT_FAILURES`` clients without one are refused for ``LOCKOUT_S`` and the count starts again."""
    if user.failures_since is None or not 0 <= now - user.failures_since < LOCKOUT_S:
        user.failures_since, user.recent_failures = now, 0
    user.recent_failures += 1
    if user.recent_failures >= MAX_ACCOUNT_FAILURES:
        user.failures_since, user.recent_failures = None, 0
        user.new_addresses_locked_until = now + LOCKOUT_S
        # Once per lock: what the owner (or fail2ban) should hear, with no address, since it came from many.
        log.warning(
            "%d failed logins for %r within %d min: clients without a device cookie are refused until %s",
            MAX_ACCOUNT_FAILURES, user.username[:64], LOCKOUT_S // 60,
            time.strftime("%H:%M:%S", time.localtime(now + LOCKOUT_S)),
        )


def _forget_beyond(s, model, which, limit: int, age) -> None:  # noqa: ANN001 - a session, a model, SQL expressions
    """Delete the rows of ``model`` that ``which`` selects beyond ``limit``, those with the oldest ``age`` first."""
    excess = s.scalar(select(func.count()).select_from(model).where(which)) - limit
    if excess > 0:
        for oldest in s.scalars(select(model).where(which).order_by(age).limit(excess)).all():
            s.delete(oldest)


def create_token(
    store: Store, name: str, scope: str, days: int | None = TOKEN_DEFAULT_DAYS
) -> tuple[ApiToken, str]:
    """A new token: the record and the secret, which is never stored and cannot be shown again. It stops
    working ``days`` days from now (one of ``TOKEN_LIFETIMES_DAYS``; None: never)."""
    if scope not in TOKEN_SCOPES:
        raise ValueError(f"scope must be one of {', '.join(TOKEN_SCOPES)}")
    # type(): True and 90.0 equal members of the tuple but are no number of days a client meant
    if (days is not None and type(days) is not int) or days not in TOKEN_LIFETIMES_DAYS:
        raise ValueError(_LIFETIME_CHOICES)
    name = name.strip()[:100]
    if not name:
        raise ValueError("a token needs a name (what uses it)")
    bad = next((c for c in name if unicodedata.category(c) in CONTROL_CATEGORIES), None)
    if bad is not None:  # a tab, newline or ESC would break `token list` lines or drive the terminal
        raise ValueError(f"a token name may not contain control characters (found U+{ord(bad):04X})")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = time.time()
    expires_at = None if days is None else now + days * 86400
    token = ApiToken(name=name, token_sha256=_sha256(secret), scope=scope, created_at=now, expires_at=expires_at)
    with store.transaction() as s:
        s.add(token)
    return token, secret


def parse_lifetime(text: str) -> int | None:
    """A lifetime typed in a form or on the command line ("90", "never") as ``create_token`` takes it."""
    text = text.strip().lower()
    if text == "never":
        return None
    if text.isdigit() and int(text) in TOKEN_LIFETIMES_DAYS:
        return int(text)
    raise ValueError(_LIFETIME_CHOICES)


def is_expired(token: ApiToken, now: float | None = None) -> bool:
    """The token's expiry has passed: it is refused like a revoked one, and listed as expired until revoked."""
    return token.expires_at is not None and (time.time() if now is None else now) >= token.expires_at


def list_tokens(store: Store, *, include_revoked: bool = False) -> list[ApiToken]:
    """Tokens not revoked, expired ones included (``is_expired``): the owner sees what stopped working."""
    stmt = select(ApiToken).order_by(ApiToken.id)
    if not include_revoked:
        stmt = stmt.where(ApiToken.revoked_at.is_(None))
    with store.session() as s:
        return list(s.scalars(stmt))


def revoke_token(store: Store, token_id: int) -> None:
    """Raises ``TokenNotFound`` for an unknown or already revoked id, also for one no database row can have."""
    if not 0 < token_id < INT64_LIMIT:  # the driver refuses such an integer with OverflowError
        raise TokenNotFound(token_id)
    with store.transaction() as s:
        token = s.get(ApiToken, token_id)
        if token is None or token.revoked_at is not None:
            raise TokenNotFound(token_id)
        token.revoked_at = time.time()


def authenticate_token(store: Store, secret: str) -> Principal | None:
    """The principal for a live token, or None for an unknown, revoked or expired one. Only reads, but for noting the
    token's use now and then (``_note_use``): a read-only API call must not queue behind a busy daemon."""
    with store.session() as s:
        token = s.scalar(select(ApiToken).where(ApiToken.token_sha256 == _sha256(secret)))
    now = time.time()
    if token is None or token.revoked_at is not None or is_expired(token, now):
        return None
    if token.last_used_at is None or not 0 <= now - token.last_used_at < TOKEN_USE_RESOLUTION_S:
        _note_use(store, token.id, now)
    return Principal(name=f"token:{token.name}", can_write=token.scope == "write", token_id=token.id)


def _note_use(store: Store, token_id: int, now: float) -> None:
    """Record a token's last use if the database is free at once; while another process holds it the note is
    skipped (the next request makes it): it serves the owner's token list, not the request."""
    try:
        with store.transaction(wait=False) as s:
            s.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=now))
    except OperationalError as exc:
        if not database_busy(exc):
            raise


def _verify(digest: str, password: str) -> bool:
    try:
        return _hasher.verify(digest, password)
    except (VerificationError, InvalidHashError):
        return False


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
