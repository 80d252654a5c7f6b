"""``iotgw federation``: run the fleet's federation server, or take part in a nightly round from a gateway.

``server`` starts a Flower SuperLink and submits iotgw's ServerApp (one run of N SecAgg+ rounds), then exits
with the rounds' outcome. ``join`` exports the home's confirmed devices from the store and runs this gateway's
SuperNode for a time window (a systemd timer starts it at night, so Flower is not resident all day), raising
``federated_round`` / ``model_updated`` alerts as rounds end. ``keygen`` makes the SuperNode authentication
key pair; ``rollback`` puts the previous installed model back. The machinery is in ``identifier.federated``;
the store side in ``gateway.federation``.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from gateway.cli import (
    STATE_FLAGS,
    add_state_args,
    check_directory,
    config_from_args,
    interrupt_on_stop_signals,
    non_empty,
    non_empty_path,
    number_or_zero,
    positive_count,
    positive_number,
    positive_seconds,
    tcp_port,
    whole_number,
)
from gateway.config import ConfigError
from gateway.statedir import create_private

CONNECTION = "iotgw"
# What the SuperNode and its ClientApps write in the federation directory besides rounds.log: FLWR_HOME (the
# launcher, the warm ClientApp server's socket), the installed bundles, the home's kept contributions.
SUPERNODE_WRITES = ("flwr", "model", "contributions")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    fed = subparsers.add_parser(
        "federation", help="federated retraining with secure aggregation (Flower)",
        description="federated retraining with secure aggregation (Flower); --config and --db are for join and "
        "rollback, before or after the ACTION",
    )
    add_state_args(fed)
    sub = fed.add_subparsers(dest="federation_command", required=True, metavar="ACTION")

    server = sub.add_parser("server", help="run a SuperLink and one federated run of SecAgg+ rounds")
    server.add_argument("--state-dir", type=non_empty_path, required=True, metavar="DIR",
                        help="SuperLink database, FLWR_HOME, logs")
    server.add_argument(
        "--out-dir", type=non_empty_path, metavar="DIR",
        help="where the global model is published (default: model/ in --state-dir)",
    )
    server.add_argument(
        "--host", type=non_empty, default="127.0.0.1", help="address the SuperLink listens on (default 127.0.0.1)"
    )
    server.add_argument("--port", type=tcp_port, default=9092, help="the SuperLink's port (default 9092)")
    _add_tls_args(server, server_side=True)
    server.add_argument(
        "--authorized-key",
        type=non_empty_path,
        action="append",
        default=[],
        metavar="PUB",
        help="a gateway's public key (from `iotgw federation keygen`), repeatable; enables SuperNode "
        "authentication (without one, any SuperNode that reaches the SuperLink may join)",
    )
    server.add_argument(
        "--rounds", metavar="N", type=positive_count, default=3, help="SecAgg+ rounds in the run (default 3)"
    )
    server.add_argument(
        "--min-nodes", metavar="N", type=min_nodes, default=3,
        help="homes a round needs: 2 or more; fewer than 3 hide little of each other's update (default 3)",
    )
    server.add_argument(
        "--nodes-wait", metavar="SECONDS", type=positive_seconds, default=600.0,
        help="seconds to wait for --min-nodes (default 600)",
    )
    server.add_argument(
        "--stage-timeout", metavar="SECONDS", type=positive_seconds, default=120.0,
        help="seconds per SecAgg+ stage, local training included (default 120)",
    )
    server.add_argument(
        "--clip-norm", metavar="X", type=positive_number, default=5.0, help="L2 bound of a home's update (default 5.0)"
    )
    server.add_argument(
        "--dp-noise", metavar="X", type=number_or_zero, default=0.0, help="DP noise multiplier (default 0: off)"
    )
    server.add_argument(
        "--epochs", metavar="N", type=positive_count, default=5, help="local epochs per round on each home (default 5)"
    )
    server.add_argument(
        "--lr", metavar="X", type=positive_number, default=0.01, help="local learning rate (default 0.01)"
    )
    server.add_argument(
        "--bundle", type=non_empty_path, metavar="DIR",
        help="model bundle the federation starts from (default: the shipped one)",
    )
    server.set_defaults(func=_server)

    join = sub.add_parser(
        "join", help="export this home's confirmed devices and run its SuperNode for the nightly window"
    )
    add_state_args(join, again=True)
    join.add_argument(
        "--superlink", type=non_empty, metavar="HOST:PORT",
        help="the fleet's SuperLink (default: [federation] superlink)",
    )
    join.add_argument(
        "--window", type=positive_seconds, default=3600.0, metavar="SECONDS",
        help="how long to stay joined (default 3600)",
    )
    join.add_argument(
        "--pseudo-labels",
        action="store_true",
        help="also train on unconfirmed identifications the model is very sure of (off by default)",
    )
    join.add_argument(
        "--poll", type=positive_seconds, default=1.0, metavar="SECONDS",
        help="seconds between the SuperNode's polls while joined (default 1)"
    )
    join.add_argument(
        "--port", type=tcp_port, default=9094, help="local port of the SuperNode's runtime API (default 9094)"
    )
    _add_tls_args(join, server_side=False)
    join.add_argument(
        "--auth-key", type=non_empty_path, metavar="FILE",
        help="private key from `iotgw federation keygen` (default: [federation] auth_key)",
    )
    join.set_defaults(func=_join)

    keygen = sub.add_parser("keygen", help="make this gateway's SuperNode authentication key pair")
    keygen.add_argument(
        "--out", type=non_empty_path, required=True, metavar="FILE", help="private key path (the .pub goes beside it)"
    )
    keygen.add_argument("--force", action="store_true", help="replace an existing key pair")
    keygen.set_defaults(func=_keygen)

    rollback = sub.add_parser(
        "rollback", help="reinstall the model that was installed before the current one"
    )
    add_state_args(rollback, again=True)
    rollback.set_defaults(func=_rollback)


def min_nodes(text: str) -> int:
    """An argparse type for the homes a round needs: the sum of one home's update is that update."""
    return whole_number(text, 2, "2 or more: the sum of one home's update is that update")


def federation_dir(cfg) -> Path:  # noqa: ANN001 - gateway.config.Config, imported lazily
    """Where a gateway keeps its federation state: installed bundles, round log, exported windows, FLWR_HOME."""
    return cfg.federation_dir.resolve()


def _add_tls_args(parser: argparse.ArgumentParser, server_side: bool) -> None:
    # The SuperLink asks gateways for no client certificate (Flower sets require_client_auth=False): server-side
    # the CA is what its own connections back to the SuperLink (flwr run, the ServerApp) verify it with.
    ca_help = (
        "CA certificate (PEM) that signed --tls-cert: the server's own flwr run and ServerApp verify the SuperLink "
        "with it, and gateways join with the same file as their --tls-ca; it checks no gateway (--authorized-key "
        "does that)"
        if server_side else
        "CA certificate (PEM) that signed the SuperLink's certificate (default: [federation] tls_ca)"
    )
    parser.add_argument("--tls-ca", type=non_empty_path, metavar="FILE", help=ca_help)
    if server_side:
        parser.add_argument("--tls-cert", type=non_empty_path, metavar="FILE", help="SuperLink certificate (PEM)")
        parser.add_argument("--tls-key", type=non_empty_path, metavar="FILE", help="SuperLink private key (PEM)")
    parser.add_argument(
        "--insecure", action="store_true", help="no TLS (loopback tests only; updates are still masked)"
    )


def _tls(args: argparse.Namespace, server_side: bool):  # noqa: ANN202
    from identifier.federated.processes import Tls

    if args.insecure:
        return None
    needed = ("tls_ca", "tls_cert", "tls_key") if server_side else ("tls_ca",)
    missing = [f"--{n.replace('_', '-')}" for n in needed if getattr(args, n) is None]
    if missing:
        raise SystemExit(f"iotgw federation: give {', '.join(missing)} or --insecure")
    for name in needed:
        path = getattr(args, name)
        if not path.is_file():  # named by the flag, or by the config key it came from (_from_config)
            where = getattr(args, f"{name}_from", f"--{name.replace('_', '-')}")
            raise ConfigError(f"{where}: {path}: {'a directory, not a file' if path.is_dir() else 'no such file'}")
    return Tls(args.tls_ca, getattr(args, "tls_cert", None), getattr(args, "tls_key", None))


def _refuse_state_args(args: argparse.Namespace) -> int:
    """2, after saying so, when ``--config`` or ``--db`` came with an ACTION that reads no gateway state (they are
    taken before any ACTION for join and rollback): run anyway, the flag would look used. 0 otherwise."""
    given = [STATE_FLAGS[name][0] for name in ("config", "db") if getattr(args, name, None) is not None]
    if not given:
        return 0
    print(f"iotgw federation {args.federation_command} reads no gateway state: {' and '.join(given)} "
          f"{'is' if len(given) == 1 else 'are'} for join and rollback", file=sys.stderr)
    return 2


def _server(args: argparse.Namespace) -> int:
    from identifier.federated import processes

    if _refuse_state_args(args):
        return 2
    # Flower's connection file takes only absolute paths, and `flwr supernode register` runs in --state-dir:
    # a path as the operator typed it (ca.pem, homes/alice.pub) is the operator's, relative to where they are.
    for name in ("tls_ca", "tls_cert", "tls_key"):
        if getattr(args, name) is not None:
            setattr(args, name, Path(os.path.abspath(getattr(args, name))))
    args.authorized_key = [Path(os.path.abspath(key)) for key in args.authorized_key]
    tls = _tls(args, server_side=True)
    if args.authorized_key and tls is None:
        raise SystemExit("iotgw federation: SuperNode authentication needs TLS (Flower refuses it without)")
    check_directory("--state-dir", args.state_dir)
    # The SuperLink's own SuperExec, the ServerApp and flwr run reach it here and check its certificate
    # for this address: one issued only for the name gateways use fails them all, and the run never starts.
    connect_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    if tls is not None:
        _check_certificate_names(tls.cert, connect_host)
    state = args.state_dir.resolve()
    out_dir = (args.out_dir or state / "model").resolve()
    state.mkdir(parents=True, exist_ok=True)
    mark = uuid.uuid4().hex  # to end the ServerApp too, which Flower starts outside the SuperLink's session
    env = {**processes.flower_env(state), processes.MARK_ENV: mark}
    cmd = processes.superlink_cmd(
        args.host, args.port, state / "superlink.db", tls, bool(args.authorized_key)
    )
    with (state / "superlink.log").open("ab") as log:
        link = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        interrupt_on_stop_signals()
        processes.wait_for_port(connect_host, args.port)
        processes.write_connection(state, CONNECTION, f"{connect_host}:{args.port}", tls.ca if tls else None)
        for key in args.authorized_key:
            _register(key, env, state)
        run_config = processes.write_run_config(
            state / "run-config.toml",
            {
                "num-rounds": args.rounds,
                "min-nodes": args.min_nodes,
                "nodes-wait": args.nodes_wait,
                "stage-timeout": args.stage_timeout,
                "clip-norm": args.clip_norm,
                "dp-noise": args.dp_noise,
                "epochs": args.epochs,
                "lr": args.lr,
                "bundle": str(args.bundle.resolve()) if args.bundle else "",
                "out-dir": str(out_dir),
            },
        )
        before = set(out_dir.glob("run-*.json"))
        subprocess.run(processes.run_cmd(CONNECTION, run_config), env=env, cwd=state, check=False)
        reports = sorted(set(out_dir.glob("run-*.json")) - before, key=lambda p: p.stat().st_mtime)
        if not reports:
            print("iotgw federation: the run produced no report (see superlink.log)", file=sys.stderr)
            return 1
        report = json.loads(reports[-1].read_text())
        print(json.dumps({"rounds": report["rounds"], "installs": len(report["installs"])}, indent=2))
        return 0 if all(r["status"] == "ok" for r in report["rounds"]) else 1
    finally:
        _stop(link)
        processes.stop_marked(mark)


def _check_certificate_names(cert: Path, host: str) -> None:
    """Exit naming the certificate when its subjectAltName does not cover ``host`` (TLS ignores its CN)."""
    import ipaddress

    from cryptography import x509

    try:
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    except ValueError as exc:
        raise SystemExit(f"iotgw federation: --tls-cert {cert}: not a PEM certificate ({exc})") from None
    try:
        names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = x509.SubjectAlternativeName([])
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a host name
        address = None
    if address is not None:
        covered = address in names.get_values_for_type(x509.IPAddress)
    else:
        covered = any(_name_matches(pattern, host) for pattern in names.get_values_for_type(x509.DNSName))
    if not covered:
        shown = ", ".join(str(n.value) for n in names) or "none"
        kind = "DNS" if address is None else "IP"
        raise SystemExit(
            f"iotgw federation: --tls-cert {cert} is not valid for {host} (its subjectAltName: {shown}), where "
            f"this server's own Flower processes connect to the SuperLink: issue it with {kind}:{host} "
            "beside the name gateways use (docs/federation.md, \"The fleet server\")"
        )


def _name_matches(pattern: str, host: str) -> bool:
    """A certificate's DNS name against a host name; a wildcard stands for one leftmost label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        return "." in host and host.split(".", 1)[1] == pattern[2:]
    return pattern == host


def _register(key: Path, env: dict[str, str], state: Path) -> None:
    """Let the gateway holding ``key``'s private half join. A key the SuperLink's database already holds (this
    server ran before from the same --state-dir, as it does every night) is registered: the SuperLink keeps
    it, and Flower refuses to add it twice."""
    from identifier.federated import processes

    done = subprocess.run(
        processes.register_cmd(key, CONNECTION), env=env, cwd=state, capture_output=True, text=True, check=False
    )
    said = " ".join((done.stdout + done.stderr).split())
    if done.returncode == 0:
        node = re.search(r"SuperNode (\d+) registered", said)
        print(f"gateway key {key}: registered" + (f" as SuperNode {node[1]}" if node else ""))
    elif "already in use" in said:
        print(f"gateway key {key}: already registered")
    else:
        raise SystemExit(f"iotgw federation: cannot register the gateway key {key}: {_flower_error(said)}")


def _flower_error(said: str) -> str:
    """The message of a ``flwr`` command's error box, without the box drawing; all it said if it drew none."""
    words = " ".join(re.sub("[\u2500-\u257f]", " ", said).split())
    return words.split(" Error ", 1)[-1] or "no output"


def _join(args: argparse.Namespace) -> int:
    from gateway.federation import RoundAlerts, export_windows, outbox_sender
    from gateway.store.db import Store
    from identifier.federated import processes

    cfg = config_from_args(args)
    if not _from_config(args, cfg):
        # The timer runs on every install built with federation; a home that never joined one is not a failure.
        print(f"iotgw federation: not configured ([federation] superlink is not set in {cfg.source}); not joining")
        return 0
    tls = _tls(args, server_side=False)
    state = federation_dir(cfg)
    # The service user's, though an admin may run a join with sudo; the SuperNode then runs as that user too.
    create_private(state, directory=True)
    data = state / "confirmed.jsonl"
    store = Store(cfg.db_url)
    try:
        exported = export_windows(store, data, pseudo_labels=args.pseudo_labels)
        print(
            f"training data: {exported.owner} confirmed devices, {exported.pseudo} pseudo-labelled"
            + (f" ({exported.without_window} confirmed without a stored window)" if exported.without_window else "")
        )
        if exported.owner + exported.pseudo == 0:
            print("iotgw federation: no confirmed devices yet (confirm some in the web UI); not joining")
            return 0
        bundle = Path(cfg.identifier.model_dir).resolve() if cfg.identifier.model_dir else None
        ca = tls.ca if tls else None
        cmd = processes.supernode_cmd(args.superlink, args.port, data, state, ca, args.auth_key, bundle=bundle)
        env = processes.flower_env(state, poll_s=args.poll)
        owner = _supernode_owner(state)
        if owner is not None:
            _check_owner_can_use(owner, state, [data, ca, args.auth_key], bundle)
            env.update(_login_env(owner, state))
        alerts = RoundAlerts(state / "rounds.log", outbox_sender(store, cfg), say=lambda line: print(line, flush=True))
        with open(create_private(state / "supernode.log", exclusive=False), "ab") as log:
            node = subprocess.Popen(
                cmd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # Flower (a network-facing gRPC client) never runs as root, and all it writes is the owner's.
                user=owner[0] if owner else None,
                group=owner[1] if owner else None,
                extra_groups=[] if owner else None,
            )
        deadline = time.monotonic() + args.window
        print(f"joined {args.superlink} for {args.window:g} s; each round this home takes part in is reported here",
              flush=True)
        try:
            interrupt_on_stop_signals()
            while time.monotonic() < deadline:
                alerts.poll()
                if node.poll() is not None:
                    print(f"iotgw federation: SuperNode exited with {node.returncode} (see supernode.log)")
                    return 1
                time.sleep(1.0)
            return 0
        finally:
            _stop(node)
            alerts.finish()
    finally:
        store.close()


def _supernode_owner(state: Path) -> tuple[int, int] | None:
    """The (uid, gid) the SuperNode runs as: the federation directory's owner when root runs the join and the
    directory is another user's (the service user's, who runs the nightly join and must be able to write what
    Flower leaves there). None: it runs as we do."""
    if os.geteuid() != 0:
        return None
    st = state.stat()
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def _check_owner_can_use(owner: tuple[int, int], state: Path, files: list[Path | None], bundle: Path | None) -> None:
    """Refuse to start a SuperNode that would run as ``owner`` and fail on a file it cannot use: the
    interpreter and ``identifier``, the data, TLS CA and key it reads, the model it starts from, and the
    federation directory with what earlier joins left there (root's, if they ran as root before this check)."""
    from identifier.bundle import DEFAULT_DIR
    from identifier.federated.processes import PACKAGE_ROOT

    model = bundle or DEFAULT_DIR
    needs = [
        (Path(sys.executable), os.X_OK),
        (PACKAGE_ROOT, os.R_OK | os.X_OK),
        (state, os.W_OK | os.X_OK),
        *((f, os.R_OK) for f in files if f is not None),
        (model, os.R_OK | os.X_OK),
        (model / "bundle.json", os.R_OK),
        (model / "weights.npz", os.R_OK),
    ]
    for top in SUPERNODE_WRITES:
        for d, _dirs, names in os.walk(state / top):  # nothing when absent
            needs.append((Path(d), os.W_OK | os.X_OK))
            needs += [(Path(d) / n, os.W_OK) for n in names if not os.path.islink(Path(d) / n)]
    if (state / "rounds.log").exists():
        needs.append((state / "rounds.log", os.W_OK))
    refused = _refused_to(owner, needs)
    if refused is not None:
        path, mode = refused
        word = "writable" if mode & os.W_OK else "readable" if mode & os.R_OK else "executable"
        try:
            who = f"{pwd.getpwuid(owner[0]).pw_name} (uid {owner[0]})"
        except KeyError:
            who = f"uid {owner[0]}"
        raise SystemExit(
            f"iotgw federation: {path}: not {word} by {who}, the owner of {state}, whom the SuperNode runs as"
        )


def _refused_to(owner: tuple[int, int], needs: list[tuple[Path, int]]) -> tuple[Path, int] | None:
    """The first (path, access mode) of ``needs`` that ``owner`` (uid, gid, no other groups) may not use, or
    None. The kernel answers, in a child that takes those credentials: mode bits, ACLs and every directory on
    the way count, as they will for the SuperNode."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child only drops to the owner, asks and exits, whatever happens
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(owner[1])
            os.setuid(owner[0])
            refused = [i for i, (path, mode) in enumerate(needs) if not os.access(path, mode)]
            os.write(write_end, str(refused[0] if refused else -1).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        answer = fh.read()
    os.waitpid(pid, 0)
    if not answer:
        raise SystemExit(f"iotgw federation: could not check the files as uid {owner[0]} (the SuperNode's user)")
    index = int(answer)
    return None if index < 0 else needs[index]


def _login_env(owner: tuple[int, int], state: Path) -> dict[str, str]:
    """HOME, USER and LOGNAME of the SuperNode's user, as systemd's User= sets them, so nothing run as them
    looks in root's home; an owner without a passwd entry gets the federation directory as its home."""
    try:
        entry = pwd.getpwuid(owner[0])
    except KeyError:
        return {"HOME": str(state)}
    return {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name}


def _from_config(args: argparse.Namespace, cfg) -> bool:  # noqa: ANN001 - gateway.config.Config
    """Fill the join's flags left out from the config's [federation] section: a flag wins over the file (either
    of --tls-ca and --insecure over both of its keys), and the file's tls_ca over its insecure. False when no
    SuperLink is given either way."""
    fed = cfg.federation
    args.superlink = args.superlink or fed.superlink
    if args.tls_ca is None and not args.insecure:
        if fed.tls_ca:
            args.tls_ca = Path(fed.tls_ca)
            args.tls_ca_from = f"{cfg.source}: federation.tls_ca"
        else:
            args.insecure = fed.insecure
    if args.auth_key is None and fed.auth_key:
        args.auth_key = Path(fed.auth_key)
    return bool(args.superlink)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it if it lingers (a SuperNode can ignore SIGTERM mid-round)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _keygen(args: argparse.Namespace) -> int:
    from identifier.federated.processes import generate_node_key

    if _refuse_state_args(args):
        return 2
    try:
        import cryptography  # noqa: F401 - the federation extra brings it (with flwr); the key needs it
    except ModuleNotFoundError:
        raise SystemExit(
            "iotgw federation: this iotgw was built without federation support (no cryptography package)"
        ) from None
    out: Path = args.out
    if out.is_dir():
        raise SystemExit(f"iotgw federation keygen: {out} is a directory; --out names the private key file")
    if out.exists() and not args.force:
        raise SystemExit(
            f"iotgw federation keygen: {out} already exists; give --force to replace that key "
            "(the fleet operator must then register the new .pub)"
        )
    try:
        create_private(out.parent, directory=True)
        public = generate_node_key(out, open_new=create_private)
    except OSError as exc:
        raise SystemExit(f"iotgw federation keygen: cannot write {exc.filename or out}: {exc.strerror}") from None
    print(f"private key: {args.out}\npublic key (give it to the fleet operator): {public}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from gateway.events import Alert
    from gateway.federation import outbox_sender
    from gateway.store.db import Store
    from identifier.federated.updates import ModelStore

    cfg = config_from_args(args)
    default = Path(cfg.identifier.model_dir) if cfg.identifier.model_dir else None
    swapped = ModelStore(federation_dir(cfg) / "model", default).rollback()
    if swapped is None:
        print("no previous model to roll back to", file=sys.stderr)
        return 1
    restored, replaced = swapped
    store = Store(cfg.db_url)
    try:
        data = {"version": restored, "previous_version": replaced, "rolled_back": True}
        outbox_sender(store, cfg)(Alert("model_updated", time.time(), None, data))
    finally:
        store.close()
    print(f"model {restored} reinstalled (was {replaced})")
    return 0
