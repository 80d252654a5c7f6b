"""``iotgw identify``, ``iotgw train`` and ``iotgw evaluate``: device identification from captures.

The gateway turns captures into observation windows (``gateway.capture.windows``); the identifier library
trains on and classifies them. torch, scikit-learn and matplotlib are imported inside the handlers only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from gateway.cli import non_empty, positive_count, positive_seconds, whole_number
from policy.model import normalise_mac

# ../shared/data beside a source checkout; an installed package has none (it points into site-packages' parents)
DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
# What a data directory must hold: the labelled captures' index and the domain list (the captures are read from
# iot-sentinel/captures/ as labels.csv names them)
TRAINING_FILES = ("iot-sentinel/labels.csv", "supplychain-domains/device_domains.csv")
DATA_HELP = (
    f"the directory holding {' and '.join(TRAINING_FILES)} (default: ../shared/data beside a source checkout; "
    "an installed iotgw has none, so give it)"
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("identify", help="identify the devices in pcaps (or DNS sessions) with the model")
    p.add_argument("pcaps", nargs="*", metavar="PCAP", help="pcap or pcapng files (or --sessions instead)")
    p.add_argument(
        "--model", type=non_empty, metavar="DIR", help="model bundle directory (default: the shipped one)"
    )
    p.add_argument(
        "--window",
        type=positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="seconds from each device's first packet that count (default 30)",
    )
    p.add_argument(
        "--signals", choices=("all", "dns"), default="all", help="use every signal (default) or DNS names only"
    )
    p.add_argument(
        "--sessions", type=non_empty, metavar="FILE.jsonl",
        help='identify DNS sessions instead: one JSON object per line, {"id", "queries": [{"t", "name"}], "mac"?, '
        '"dhcp"?} (docs/identification.md)',
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_identify)

    p = sub.add_parser("train", help="train a model bundle on the labelled captures and domain lists (--data)")
    p.add_argument("--data", type=non_empty, metavar="DIR", help=DATA_HELP)
    p.add_argument(
        "--out", type=non_empty, metavar="DIR", help="bundle directory (default: the shipped identifier/bundle)"
    )
    p.add_argument("--seed", type=seed, default=0, metavar="N", help="random seed (default 0)")
    p.add_argument(
        "--cv-folds",
        type=cv_folds,
        default=5,
        metavar="N",
        help="folds of the cross-validation recorded in the bundle (default 5; 0: none)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="cross-validated accuracy, baselines, open set and plots")
    p.add_argument("--data", type=non_empty, metavar="DIR", help=DATA_HELP)
    p.add_argument(
        "--out", type=non_empty, default="evaluation", metavar="DIR",
        help="where the JSON report and PNG plots go (default ./evaluation)",
    )
    p.add_argument(
        "--seeds", type=positive_count, default=5, metavar="N", help="seeds 0..N-1, each its own folds (default 5)"
    )
    p.add_argument("--folds", type=folds, default=5, metavar="N", help="cross-validation folds (default 5)")
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=("baselines", "seed-paper", "open-set", "lab", "nested-lab"),
        help="leave a part out (repeatable)",
    )
    p.set_defaults(func=cmd_evaluate)


def seed(text: str) -> int:
    """An argparse type for a random seed: a whole number from 0 (numpy refuses a negative one, and did so only
    after the captures were read, as a traceback)."""
    return whole_number(text, 0, "0 or above")


def folds(text: str) -> int:
    """An argparse type for a number of cross-validation folds: 2 or more. One fold tests every capture on a
    model trained on none of them; 0 or fewer crashed, and for ``iotgw train`` only after the training."""
    value = positive_count(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{value} fold leaves no capture to train on: give 2 or more")
    return value


def cv_folds(text: str) -> int:
    """``folds``, or 0: no cross-validation."""
    return 0 if text.strip() == "0" else folds(text)


# --- identify
# -------------------------------------------------------------------------------------------------


def _record(identity) -> dict:
    """The JSON contract's fields: the closest match always, ``known`` saying whether it is trusted."""
    decided = identity.decided_after_s
    return {
        "manufacturer": identity.manufacturer,
        "device_type": identity.device_type,
        "category": identity.category,
        "confidence": identity.confidence,
        "decided_after_s": round(decided, 3) if decided is not None else None,  # _classify stops at the window
        "known": identity.known,
    }


def _classify(ident, mac: str, first_ts: float, observations, window: float):
    session = ident.session(mac, first_ts)
    for obs in observations:
        if obs.ts - first_ts > window:
            break
        session.update(obs)
    return session.current()


def cmd_identify(args: argparse.Namespace) -> int:
    from gateway.capture.pcap import PcapError
    from gateway.capture.windows import capture_windows
    from identifier.bundle import BundleError
    from identifier.stream import Identifier

    if not args.pcaps and not args.sessions:
        print("iotgw identify: give PCAP files or --sessions FILE.jsonl", file=sys.stderr)
        return 2
    try:
        ident = Identifier.load(args.model, ("dns",) if args.signals == "dns" else None)
    except BundleError as exc:
        print(f"iotgw identify: {exc}", file=sys.stderr)
        return 2
    failed = 0

    def emit(row: dict) -> None:
        """One device's line, printed at once: an input that fails later loses nothing already identified."""
        if args.json:
            print(json.dumps(row), flush=True)
            return
        where = _shown(row["id"]) if "id" in row else f"{_shown(row['source'])} {row['mac']}"
        when = "-" if row["decided_after_s"] is None else f"{row['decided_after_s']:.1f}s"
        names = f"{row['manufacturer']} / {row['device_type']} / {row['category']}"
        print(
            f"{where}  {names if row['known'] else f'unknown (closest: {names})'}  "
            f"conf {row['confidence']:.2f}  decided {when}",
            flush=True,
        )

    for path in args.pcaps:
        try:
            windows = capture_windows(path, args.window, keep_partial=True)
        except (PcapError, OSError) as exc:
            print(f"iotgw identify: {exc if str(path) in str(exc) else f'{path}: {exc}'}", file=sys.stderr)
            failed += 1
            continue
        if windows.error:  # corrupt part-way: devices seen before the damage are still answered, as replay does
            print(f"iotgw identify: {windows.error}", file=sys.stderr)
            failed += 1
        if windows.malformed:  # counted and dropped; the rest of the capture still counts
            print(f"iotgw identify: {path}: {windows.malformed} malformed frames dropped", file=sys.stderr)
        if windows.skipped.total:  # a `tcpdump -i any` capture: the host's own packets, loopback, tunnels
            print(f"iotgw identify: {path}: {windows.skipped}", file=sys.stderr)
        if not windows.devices and not windows.error:
            # a valid capture, so no failure; but with no line for it, a batch could not tell it from one forgotten
            print(f"iotgw identify: {path}: no device sent a packet in it", file=sys.stderr)
        for mac, dev in windows.devices.items():
            identity = _classify(ident, mac, dev.first_ts, dev.observations, args.window)
            emit({"source": path, "mac": mac, **_record(identity)})
    if args.sessions:
        unread_keys: dict[str, str] = {}  # dhcp key -> the first session that had it
        for item in read_sessions(args.sessions):
            if isinstance(item, SessionError):  # this line is lost, the lines after it are not
                print(f"iotgw identify: {item}", file=sys.stderr)
                failed += 1
                continue
            sid, mac, observations, unread = item
            for key in unread:
                if len(unread_keys) < 5:  # the warning names five: a hostile file's keys are not all kept
                    unread_keys.setdefault(key, sid)
            first = min((o.ts for o in observations), default=0.0)
            emit({"id": sid, **_record(_classify(ident, mac, first, observations, args.window))})
        if unread_keys:  # a warning, not a failure: the sessions were identified on what could be read
            first = ", ".join(f"{k!r} (first in session {_shown(sid)})" for k, sid in sorted(unread_keys.items()))
            print(
                f"iotgw identify: {args.sessions}: dhcp keys not read: {first}; a dhcp object takes t and "
                + ", ".join(f"{field} (or {', '.join(names[1:4])}...)" for field, names in DHCP_FIELDS.items()),
                file=sys.stderr,
            )
    return 1 if failed else 0


def _shown(text: str) -> str:
    """``text`` for a line of text output: as it is when printable, else quoted with its escapes, so a session id
    is data: a newline in it printed a forged device line, an ESC sequence reached the terminal."""
    return text if text.isprintable() else repr(text)


class SessionError(ValueError):
    """A sessions file line that is not a valid session; the message names file and line."""


class NotASession(ValueError):
    """What makes a line no session, said in the file's words: the message is shown without Python's."""


_JSON_KINDS = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}


def read_sessions(path: str):
    """Per line of a sessions JSONL file, ``(id, mac, observations, unread)``, or a ``SessionError`` naming the
    file and line when it is not a session, so one bad line loses none of the others. A line is ``{"id",
    "queries": [{"t", "name", "qtype"?}], "mac"?, "dhcp"?}``; ``dhcp`` is one object or a list (``t`` and the
    fields of ``DHCP_FIELDS``, under any of their names); ``mac`` in any common notation (``_mac``). An
    observation without ``t`` is at the session's first timed one (a DHCP request comes first), or at 0 when none
    is timed. ``unread`` lists the keys of ``dhcp`` objects that are none of these, for a warning: a fingerprint
    under a name we do not know would otherwise be judged as absent without a word.
    """
    try:
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    # a byte order mark is how some editors start a UTF-8 file: not part of the first session
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                    if line.strip():
                        yield _session(json.loads(line))
                except NotASession as exc:
                    yield SessionError(f"{path}:{lineno}: not a session ({exc})")
                # UnicodeDecodeError is a ValueError; OverflowError is a number too big for a float (a 400-digit
                # "t", an Infinity qtype): every one is this line's fault, never the file's
                except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
                    yield SessionError(f"{path}:{lineno}: not a session ({exc.__class__.__name__}: {exc})")
    except OSError as exc:  # here, not around the caller's loop, where a failed write of the answers is one too
        yield SessionError(f"{path}: cannot be read ({exc.strerror or exc})")


def _session(item):
    from identifier.observation import DhcpObservation, DnsObservation

    if not isinstance(item, dict):
        kind = "null" if item is None else f"a {_JSON_KINDS[type(item)]}"  # json.loads makes no other kind
        raise NotASession(f'a session is a JSON object {{"id", "queries", ...}}, not {kind}')
    if not isinstance(item.get("id"), (str, int)) or isinstance(item["id"], bool):
        raise NotASession('"id" must be a string')
    queries = item.get("queries")
    if not isinstance(queries, list):  # also a misspelt key: the session would be judged on nothing
        raise NotASession('"queries" must be a list (empty for a device that sent no DNS)')
    dhcp = item.get("dhcp") or []
    dhcp = [dhcp] if isinstance(dhcp, dict) else dhcp
    # before anything is read from them: ``"t" in`` a string or a list is no key, and the error a TypeError
    if not isinstance(dhcp, list) or not all(isinstance(d, dict) for d in dhcp):
        raise NotASession('"dhcp" must be an object or a list of them')
    if not all(isinstance(q, dict) for q in queries):
        raise NotASession('"queries" must be a list of objects ({"t", "name", "qtype"?})')
    timed = [_seconds(o["t"]) for o in [*queries, *dhcp] if "t" in o]
    start = min(timed, default=0.0)
    observations = []
    for q in queries:
        if "name" not in q:
            raise NotASession('a query without a "name"')
        name = q["name"]
        if not isinstance(name, str) or not name.strip("."):
            raise NotASession(f"query name {name!r} is not a DNS name")
        t = _seconds(q["t"]) if "t" in q else start
        qtype = _code(q.get("qtype", 1), "qtype", 0xFFFF)
        observations.append(DnsObservation(t, name.rstrip(".").lower(), qtype))
    unread: set[str] = set()
    for d in dhcp:
        t = _seconds(d["t"]) if "t" in d else start
        fields = _dhcp_fields(d)
        unread |= set(d) - {"t"} - {name for names in DHCP_FIELDS.values() for name in names}
        hostname, vendor_class = fields.get("hostname"), fields.get("vendor_class")
        if not all(isinstance(v, (str, type(None))) for v in (hostname, vendor_class)):
            raise NotASession("dhcp hostname and vendor_class must be strings")
        params = _param_list(fields.get("param_list", []))
        kind = _message_type(fields["message_type"]) if fields.get("message_type") is not None else None
        observations.append(DhcpObservation(t, hostname, params, vendor_class, kind))
    mac = item.get("mac") or ""
    if not isinstance(mac, str):
        raise NotASession('"mac" must be a string')
    observations.sort(key=lambda o: o.ts)
    return str(item["id"]), _mac(mac) if mac else "", observations, sorted(unread)


# A DHCP request's fields under the names other tools give them (ours first; Fingerbank's fingerprint and vendor,
# the option numbers, scapy's and Wireshark's words), so a session file another tool wrote is read as it means.
DHCP_FIELDS = {
    "param_list": (
        "param_list", "parameter_request_list", "param_req_list", "prl", "fingerprint", "dhcp_fingerprint",
        "option_55", "option55", "55",
    ),
    "vendor_class": (
        "vendor_class", "vendor_class_id", "vendor_class_identifier", "dhcp_vendor", "option_60", "option60", "60",
    ),
    "hostname": ("hostname", "host_name", "option_12", "option12", "12"),
    "message_type": ("message_type", "message-type", "option_53", "option53", "53"),
}
DHCP_MESSAGE_TYPES = {"discover": 1, "offer": 2, "request": 3, "decline": 4, "ack": 5, "nak": 6, "release": 7,
                      "inform": 8}


def _dhcp_fields(d: dict) -> dict:
    out = {}
    for field, names in DHCP_FIELDS.items():
        # null is the option not sent (Fingerbank's "dhcp_vendor": null), as a null hostname always was
        given = [name for name in names if d.get(name) is not None]
        if len(given) > 1:  # two values for one field: which one the device sent is anyone's guess
            raise NotASession(f"dhcp gives its {field} twice ({', '.join(given)})")
        if given:
            out[field] = d[given[0]]
    return out


def _param_list(value) -> tuple[int, ...]:
    """Option 55 as a list of codes, or as the text Fingerbank writes ("1,3,6,15" or "1 3 6 15")."""
    if isinstance(value, str):
        parts = value.replace(",", " ").split()
        if not all(p.isdigit() for p in parts):
            raise NotASession(f"dhcp param_list {value[:40]!r} is not option codes separated by commas")
        value = [int(p) for p in parts]
    if not isinstance(value, list):
        raise NotASession("dhcp param_list must be a list of option codes or a text of them")
    return tuple(_code(c, "dhcp param_list entry", 0xFF) for c in value)


def _message_type(value) -> int:
    """Option 53 as its number or its name (``request``, ``DHCPREQUEST``)."""
    if isinstance(value, str):
        name = value.lower().removeprefix("dhcp")
        if name not in DHCP_MESSAGE_TYPES:
            raise NotASession(f"dhcp message_type {value[:40]!r} is none of {', '.join(DHCP_MESSAGE_TYPES)}")
        return DHCP_MESSAGE_TYPES[name]
    return _code(value, "dhcp message_type", 0xFF)


def _mac(text: str) -> str:
    """``text`` in lower-case colon form, the one the identifier's vendor prefix and MAC blocks are read from:
    in another notation the same device would get another answer. ValueError if it is not a MAC."""
    try:
        return normalise_mac(text)
    except ValueError:  # normalise_mac's message echoes the whole text; a session line's may be megabytes
        raise NotASession(
            f'"mac" {text[:40]!r} is not a MAC address (aa:bb:cc:dd:ee:ff, aa-bb-..., aabb.ccdd.eeff)'
        ) from None


def _code(value, what: str, top: int) -> int:
    """A protocol number as the wire carries it (0..top): 1e300 or 1.5 is no qtype or DHCP option."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
        raise NotASession(f"{what} must be a whole number from 0 to {top}, not {value!r}")
    return value


def _seconds(value) -> float:
    """A JSON number of seconds: a string ("1.5") or a bool is a mistake in the file, not a time."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise NotASession(f"t must be a finite number of seconds, not {value!r}")
    return float(value)


# --- train
# ----------------------------------------------------------------------------------------------------


def missing_training_files(data: Path) -> list[str]:
    """Which of ``TRAINING_FILES`` ``data`` lacks: a look taken before anything is read or written."""
    return [name for name in TRAINING_FILES if not (data / name).is_file()]


def load_training_data(data: str | Path):
    """The labelled capture windows and domain name sets under ``data`` (../shared/data); DataError naming the
    file and line of anything that would make training learn less, or other labels, than the files say."""
    from gateway.capture.windows import labelled_captures
    from identifier.dataset import DataError, domain_windows

    data = Path(data)
    missing = missing_training_files(data)
    if missing:
        raise DataError(f"{data}: no {' and no '.join(missing)} there")
    sentinel, domains = data / "iot-sentinel", data / "supplychain-domains" / "device_domains.csv"
    captures = labelled_captures(sentinel, 60.0)
    # the list's own IoT-Sentinel rows repeat these captures under other labels (MAX! Cube as Ubiquiti)
    names = domain_windows(
        domains, {w.category for w in captures if w.category}, exclude_sources=("IoT-Sentinel",)
    )
    return captures, names


def _writable_dir(directory: Path) -> str | None:
    """Why ``directory`` cannot take a bundle or report (created if missing), or None: asked before minutes of
    training, which a file in the way or a read-only place would otherwise throw away at the end."""
    import tempfile

    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        return f"{directory}: cannot write there ({exc.strerror or exc})"
    return None


def _data_dir(command: str, given: str | None) -> Path | None:
    """``--data`` or its default, once it holds the training data; None, after saying what is missing and what to
    give, when it does not. Asked first: ``evaluate`` made its ``--out`` directory, and then stopped on this."""
    data = Path(given) if given else DEFAULT_DATA
    missing = missing_training_files(data)
    if not missing:
        return data
    where = f"--data {data}" if given else f"{data} (the default without --data)"
    print(
        f"iotgw {command}: {where}: no {' and no '.join(missing)} there; give --data DIR, the directory holding "
        "iot-sentinel/ and supplychain-domains/ (../shared/data beside a source checkout)",
        file=sys.stderr,
    )
    return None


def cmd_train(args: argparse.Namespace) -> int:
    from identifier.bundle import DEFAULT_DIR
    from identifier.dataset import DataError
    from identifier.evaluate import cross_validated_metrics
    from identifier.train import train

    data = _data_dir("train", args.data)
    if data is None:
        return 2
    out_dir = Path(args.out) if args.out else DEFAULT_DIR
    problem = _writable_dir(out_dir)
    if problem:
        print(f"iotgw train: --out {problem}", file=sys.stderr)
        return 2
    try:
        captures, names = load_training_data(data)
    except DataError as exc:  # nothing trained, the bundle in --out untouched
        print(f"iotgw train: {exc}", file=sys.stderr)
        return 2
    print(f"training on {len(captures)} captures and {len(names)} name sets", file=sys.stderr)
    bundle = train(captures + names, seed=args.seed, progress=True)
    if args.cv_folds:
        bundle.metrics = cross_validated_metrics(captures, names, seed=args.seed, k=args.cv_folds)
    out = bundle.save(out_dir)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(
        json.dumps({"bundle": str(out), "version": bundle.version, "bytes": size, "metrics": bundle.metrics})
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from identifier.dataset import DataError
    from identifier.report import run_report

    data = _data_dir("evaluate", args.data)
    if data is None:
        return 2
    problem = _writable_dir(Path(args.out))
    if problem:
        print(f"iotgw evaluate: --out {problem}", file=sys.stderr)
        return 2
    try:
        captures, names = load_training_data(data)
    except DataError as exc:
        print(f"iotgw evaluate: {exc}", file=sys.stderr)
        return 2
    report = run_report(
        captures, names, Path(args.out), seeds=args.seeds, folds=args.folds, skip=set(args.skip)
    )
    print(json.dumps(report["headline"], indent=1))
    return 0
