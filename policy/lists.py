"""Block and allow lists in the formats Pi-hole and AdGuard Home users already have.

One parser reads every line on its own, so files that mix formats work: hosts lines (``0.0.0.0 ads.example``),
plain domain lists (``ads.example``), and adblock-style rules (``||ads.example^``, exceptions
``@@||ok.example^``). Comments (``#``, ``!``), headers (``[Adblock Plus 2.0]``) and browser-only cosmetic
rules (``##``) are skipped.
A line that cannot be used is reported with its file and line, and the good lines still load.
"""

from __future__ import annotations

import array
import http.client
import ipaddress
import os
import re
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from policy.matcher import name_hash

# Names a hosts file maps to itself; they are not block entries.
_HOSTS_SELF = frozenset(
    {
        "localhost",
        "localhost.localdomain",
        "local",
        "broadcasthost",
        "ip6-localhost",
        "ip6-loopback",
        "ip6-localnet",
        "ip6-mcastprefix",
        "ip6-allnodes",
        "ip6-allrouters",
        "ip6-allhosts",
        "0.0.0.0",
    }
)
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
# The three common line forms in one match, so a million-line list loads in seconds; anything else (and
# anything this does not fully validate) goes through ``parse_line``.
_FAST = re.compile(r"(?:(?:0\.0\.0\.0|127\.0\.0\.1|::1?|::)[ \t]+|\|\|)?([A-Za-z0-9_.-]+)\^?[ \t]*\r?\n?")
_ADBLOCK = re.compile(r"(@@)?\|\|([^\^$|/]+)\^?\|?(?:\$(.*))?")
# Modifiers that do not narrow a rule for a DNS filter; anything else would change its meaning, so such a
# line is reported rather than silently widened.
_HARMLESS_MODIFIERS = frozenset({"important", "all", "document", "doc", "popup"})
MAX_ERRORS_KEPT = 1000
MAX_FETCH_BYTES = 128 * 1024 * 1024
FETCH_DEADLINE_S = 120.0  # for the whole download: a server trickling bytes never hits the per-read timeout


class RefusedAddress(OSError):
    """A list server at an address no block list comes from: the gateway itself, loopback, link-local."""


def check_list_server(address: str) -> None:
    """Raise ``RefusedAddress`` unless a list may be fetched from ``address`` (the IP a connection reached).

    Whoever may add a list (the owner, a write token) could otherwise have the gateway read its own services
    (the web UI, a router's link-local page, a cloud metadata address) and probe what answers there. Private LAN
    addresses stay allowed: a NAS or a Pi-hole on the LAN is a real place for a list."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    what = (
        "a loopback address" if ip.is_loopback
        else "a link-local address" if ip.is_link_local
        else "no host's address" if ip.is_unspecified or ip.is_multicast
        else "this gateway's own address" if _own_address(ip)
        else None
    )
    if what:
        raise RefusedAddress(f"{ip} is {what}; lists are fetched from the LAN or the internet, not from the gateway")


def _own_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``ip`` is assigned to this host: only a local address can be bound."""
    with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(ip), 0))
        except OSError:
            return False
    return True


def _checked_connection(address: tuple[str, int], *args: object, **kwargs: object) -> socket.socket:
    """``socket.create_connection`` that closes the socket before anything is sent when the address it reached
    is refused: checked after the name is resolved and connected, so a name that resolves twice (DNS
    rebinding) cannot slip past, and for every redirect, as each opens its own connection."""
    sock = socket.create_connection(address, *args, **kwargs)
    try:
        check_list_server(sock.getpeername()[0])
    except BaseException:
        sock.close()
        raise
    return sock


class _CheckedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _checked_connection


class _CheckedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _checked_connection  # before the TLS handshake, too


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_CheckedHTTPConnection, req)


class _CheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_CheckedHTTPSConnection, req, context=self._context)


def _opener(checked: bool) -> urllib.request.OpenerDirector:
    """Only http(s), also after a redirect (urllib's default opener would follow one to ftp://), and never
    through a proxy from the environment."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        # No proxy, whatever http_proxy / https_proxy say: through one, the address checked would be the proxy's and
        # any host behind it (the gateway itself, loopback, link-local) could be read. A home gateway needs none.
        urllib.request.ProxyHandler({}),
        _CheckedHTTPHandler() if checked else urllib.request.HTTPHandler(),
        _CheckedHTTPSHandler() if checked else urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


_OPENERS = {True: _opener(checked=True), False: _opener(checked=False)}


class FetchError(ValueError):
    """A list that could not be downloaded: the message names the URL and the reason."""


@dataclass(frozen=True)
class ListError:
    """One unusable line: where it is, what it says (as text, never interpreted; "" when not kept, see ``load``)
    and why it was skipped. The reason never quotes the line: it alone is shown for a fetched list."""

    source: str
    line: int
    text: str
    reason: str

    def __str__(self) -> str:
        if not self.text:
            return f"{self.source}:{self.line}: {self.reason}"
        text = self.text if len(self.text) <= 80 else self.text[:77] + "..."
        return f"{self.source}:{self.line}: {self.reason}: {text!r}"


@dataclass
class ParsedList:
    """A list loaded into hashes: ``block`` and ``allow`` (``@@`` exceptions) as sorted ``uint64`` arrays."""

    source: str
    block: np.ndarray
    allow: np.ndarray
    errors: list[ListError] = field(default_factory=list)
    error_count: int = 0  # all bad lines; ``errors`` keeps the first MAX_ERRORS_KEPT

    def __len__(self) -> int:
        return len(self.block) + len(self.allow)


def normalise_name(text: str) -> str:
    """A name as the matcher keeps it (lower case, no trailing dot, IDNA); ValueError if invalid."""
    name = text.strip().rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError("not a valid internationalised domain name") from exc
    if not name or len(name) > 253:
        raise ValueError("not a domain name")
    if not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError("not a domain name")
    return name


def parse_line(line: str) -> list[tuple[str, bool]]:
    """The entries of one line as ``(name, is_exception)``; ``[]`` for comments and blanks.

    Raises ``ValueError`` with the reason for a line that cannot be used.
    """
    text = line.strip()
    if not text or text[0] in "#!" or (text[0] == "[" and text[-1] == "]"):
        return []
    if "##" in text or "#@#" in text or "#?#" in text:
        return []  # cosmetic (element hiding) rules are for browsers
    if text.startswith(("||", "@@")):
        m = _ADBLOCK.fullmatch(text)
        if not m:
            raise ValueError("unsupported adblock rule")
        exception, host, modifiers = m.groups()
        if modifiers:
            unknown = [mod for mod in modifiers.split(",") if mod.strip().lower() not in _HARMLESS_MODIFIERS]
            if unknown:
                raise ValueError("unsupported modifier")
        if "*" in host:
            raise ValueError("wildcards are not supported")
        return [(normalise_name(host), bool(exception))]
    if text[0] in "|/":
        raise ValueError("unsupported adblock rule")
    fields = text.split("#", 1)[0].split()
    if len(fields) == 1:
        if "*" in fields[0]:
            raise ValueError("wildcards are not supported")
        return [(normalise_name(fields[0]), False)]
    try:
        ipaddress.ip_address(fields[0].split("%")[0])
    except ValueError:
        raise ValueError("neither a hosts line, a domain nor an adblock rule") from None
    return [(normalise_name(n), False) for n in fields[1:] if n.lower() not in _HOSTS_SELF]


def _fast_name(line: str) -> str | None:
    """The name of a plain, hosts or ``||name^`` line if it is certainly valid, else None."""
    m = _FAST.fullmatch(line)
    if m is None:
        return None
    name = m.group(1).rstrip(".")
    if (
        not name
        or len(name) > 63
        or ".." in name
        or ".-" in name
        or "-." in name
        or name[0] in ".-"
        or name[-1] == "-"
    ):
        return None  # long names may hold a label over 63 characters: let the full check decide
    return name.lower()


def load(path: str | Path, source: str | None = None, *, quote: bool = True) -> ParsedList:
    """Read a list file into hashes, streaming (a million names never sit in memory as strings).

    ``quote=False`` for a list fetched from a URL: its errors give the line and the reason but not the line's
    text, or adding a LAN URL as a list would show whoever may add lists what that server answers."""
    path = Path(path)
    source = source or str(path)
    hashes = {False: array.array("Q"), True: array.array("Q")}  # hashed at once: no strings pile up
    block = hashes[False]
    errors: list[ListError] = []
    count = 0
    # utf-8-sig: a list saved by Windows Notepad starts with a BOM, which would spoil its first entry
    with path.open(encoding="utf-8-sig", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            name = _fast_name(line)  # the common case first: this loop runs a million times
            if name is not None:
                if name not in _HOSTS_SELF:
                    block.append(name_hash(name))
                continue
            try:
                entries = parse_line(line)
            except ValueError as exc:
                count += 1
                if len(errors) < MAX_ERRORS_KEPT:
                    errors.append(ListError(source, number, line.rstrip("\r\n") if quote else "", str(exc)))
                continue
            for entry, exception in entries:
                hashes[exception].append(name_hash(entry))
    return ParsedList(
        source,
        np.unique(np.frombuffer(hashes[False], dtype=np.uint64)),
        np.unique(np.frombuffer(hashes[True], dtype=np.uint64)),
        errors,
        count,
    )


def _failure(exc: BaseException) -> str:
    """Why a fetch failed, in words of our own: the server's reason phrase and, from a service that is no web
    server, the first line it sent (BadStatusLine) are its text, not to be shown to whoever may add lists."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP Error {exc.code}"
    if isinstance(exc, urllib.error.URLError):  # wraps the socket's reason (refused, unreachable, RefusedAddress)
        return _failure(exc.reason) if isinstance(exc.reason, BaseException) else str(exc.reason)
    if isinstance(exc, http.client.HTTPException):
        return f"the server's answer is not HTTP ({type(exc).__name__})"
    return str(exc)


def _check_url(url: str) -> None:
    """ValueError for a URL no request can be made of; urllib's own refusals (InvalidURL, "no host given") came
    after the attempt, as a FetchError, a 502 that blamed a server never asked."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is no number or out of range
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a URL: {exc}") from None
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError(f"{url!r}: a list's URL has no spaces or control characters (write a space as %20)")
    # A '%' belongs in a host only as an IPv6 literal's zone ("[fe80::1%25eth0]"); "%00" is no name to look up.
    if not parts.hostname or ("%" in parts.hostname and ":" not in parts.hostname):
        raise ValueError(f"{url!r}: a list's URL needs a host name")


def fetch(
    url: str,
    dest: str | Path,
    timeout: float = 30.0,
    deadline_s: float = FETCH_DEADLINE_S,
    *,
    from_gateway: bool = False,
) -> Path:
    """Download a list the user added (an explicit action, never at DNS time) to ``dest``, atomically.

    ``FetchError`` when the server cannot be reached, answers an error, sends too much or takes longer than
    ``deadline_s`` in all, or is at an address ``check_list_server`` refuses (also after a redirect) unless
    ``from_gateway`` (for tests, whose servers listen on loopback); ``dest`` is then left as it was. Always
    direct: proxy environment variables are ignored (``_opener``)."""
    if not url.lower().startswith(("https://", "http://")):
        raise ValueError(f"{url}: only http and https lists can be fetched")
    _check_url(url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": "iotgw"})  # noqa: S310 (scheme checked)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".fetch-")
    give_up = time.monotonic() + deadline_s
    try:
        with _OPENERS[not from_gateway].open(request, timeout=timeout) as response, os.fdopen(fd, "wb") as out:
            total = 0
            while chunk := response.read1(1 << 16):  # what has come, so the deadline is checked as it trickles
                total += len(chunk)
                if total > MAX_FETCH_BYTES:
                    raise FetchError(f"{url}: larger than {MAX_FETCH_BYTES >> 20} MB")
                if time.monotonic() > give_up:
                    raise FetchError(f"{url}: not downloaded within {deadline_s:.0f} s")
                out.write(chunk)
        os.replace(tmp, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        Path(tmp).unlink(missing_ok=True)
        raise FetchError(f"{url}: cannot be fetched: {_failure(exc)}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest
