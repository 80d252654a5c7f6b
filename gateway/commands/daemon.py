"""``iotgw run``, ``iotgw demo`` and ``iotgw replay``: the daemon, live, on loopback, or fed from captures."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

from gateway.cli import (
    add_state_args,
    check_directory,
    checked_flag,
    config_from_args,
    interrupt_on_stop_signals,
    non_empty,
    positive_count,
    seconds_or_zero,
    tcp_port,
)
from gateway.config import ConfigError, check_mqtt_url

log = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run the gateway daemon (DNS, capture, identification, policy, alerts)")
    add_state_args(run)
    # Each flag replaces its config key; the defaults named are the config's own when the file leaves it out.
    run.add_argument("--dns-listen", action="append", metavar="HOST:PORT",
                     help="DNS listen address, repeatable (default [dns] listen: 0.0.0.0:53 and [::]:53)")
    run.add_argument("--upstream", action="append", metavar="HOST[:PORT]",
                     help="upstream resolver, repeatable (default [dns] upstreams: 1.1.1.1 and 9.9.9.9)")
    run.add_argument("--lan", action="append", metavar="CIDR",
                     help="LAN prefix allowed to query, repeatable (default [dns] lan: the private and link-local "
                     "prefixes)")
    run.add_argument("--interface", type=non_empty, metavar="IFACE",
                     help="interface for passive capture (default [capture] interface; none: no capture)")
    run.add_argument("--no-sniff", action="store_true", help="no passive capture, whatever the config says")
    run.add_argument("--mqtt", type=non_empty, metavar="URL",
                     help="MQTT broker for alerts, mqtt://host:1883 or mqtts://host:8883 (default [mqtt] url; "
                     "none: no MQTT)")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="everything on loopback with virtual devices: no root, LAN or config")
    demo.add_argument("--dns-port", type=tcp_port, default=15353, metavar="PORT",
                      help="DNS port on 127.0.0.1 (default 15353)")
    demo.add_argument("--web-port", type=tcp_port, default=8080, metavar="PORT",
                      help="web UI port on 127.0.0.1 (default 8080)")
    demo.add_argument("--devices", type=positive_count, default=6, metavar="N",
                      help="how many virtual devices join, one every 4 s (default 6): one of each device type the "
                      "model knows, then more units of the same types")
    demo.add_argument("--state-dir", type=non_empty, metavar="DIR",
                      help="keep state here (default: a temporary directory, removed when the demo ends)")
    demo.add_argument("--mqtt", type=non_empty, metavar="URL", help="also publish alerts to this MQTT broker")
    demo.add_argument("--duration", type=seconds_or_zero, default=0, metavar="SECONDS",
                      help="stop after this many seconds (default 0: no limit); Ctrl-C or SIGTERM stops it at any "
                      "time")
    demo.set_defaults(func=cmd_demo)

    replay = sub.add_parser(
        "replay", help="feed pcap files through the capture path into the store",
        description="Feed capture files, in the order given, through live capture's path into the store. The "
        "capture's own clock rules: each device is new (alert, identification window) at its earliest frame in "
        "all the files, whatever their order, and it goes offline only where the capture shows it silent for the "
        "idle timeout (10 minutes) and online again at its next frame, each alert stamped with the capture's "
        "time. When the frames are out of time order (merged captures, files not in date order) no device goes "
        "offline. Every identification window still open closes when the replay ends, so each device gets an "
        "answer. The replay's end is no one's departure. Ctrl-C (or SIGTERM) ends it early, at the next frame: the "
        "devices replayed so far are kept, and the windows still open are left unanswered.")
    add_state_args(replay)
    replay.add_argument("pcaps", nargs="+", metavar="PCAP", help="pcap or pcapng files, in the order given")
    replay.add_argument("--realtime", action="store_true", help="at recorded speed (default: as fast as possible)")
    replay.set_defaults(func=cmd_replay)


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.daemon import Gateway, run_forever
    from gateway.store.db import Store

    cfg = config_from_args(args)
    if cfg.capture.sniff and cfg.capture.interface:
        # Checked before anything starts: the sniffer's bind failed with "[Errno 19] No such device" and a traceback
        # after the DNS server was already up.
        try:
            socket.if_nametoindex(cfg.capture.interface)
        except OSError:
            where = "--interface" if args.interface else f"{cfg.source}: capture.interface"
            raise ConfigError(f"{where}: no network interface {cfg.capture.interface!r} here (see `ip link`)") from None
    if not state_in_use(cfg):
        return 1
    store = Store(cfg.db_url)
    # nftables quarantine needs CAP_NET_ADMIN and the nft tool; without them quarantine is DNS-only.
    firewall = shutil.which("nft") is not None and _has_net_admin()
    run_forever(Gateway(cfg, store, firewall=firewall))
    return 0


def state_in_use(cfg) -> bool:  # noqa: ANN001 - gateway.config.Config
    """Mark the state directory in use for as long as this process lives (``gateway.statedir.hold_running_lock``),
    so ``iotgw restore`` refuses to swap it away underneath; False, said on stderr, while a restore holds it. A
    state directory that does not exist is only made when the database is to live in it (no ``--db``)."""
    from gateway.statedir import StateInUse, hold_running_lock

    if not cfg.state_dir.is_dir() and cfg.store.url:
        return True
    try:
        hold_running_lock(cfg.state_dir)  # its descriptor stays open, and the lock held, until the process exits
    except StateInUse as exc:
        print(f"iotgw: {exc}", file=sys.stderr)
        return False
    return True


def _has_net_admin() -> bool:
    """CAP_NET_ADMIN in the effective set (systemd grants it to the unprivileged iotgw user)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << 12))
    return os.geteuid() == 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import MAX_DEVICES  # here, not in the parser: importing it takes seconds, --help must not

    if args.devices > MAX_DEVICES:  # before anything starts, like argparse's own refusals
        print(f"iotgw demo: argument --devices: at most {MAX_DEVICES}, one loopback address each", file=sys.stderr)
        return 2
    if args.mqtt:  # before anything starts: a bad URL would otherwise end the demo in a traceback
        checked_flag("--mqtt", check_mqtt_url, args.mqtt)
    if args.state_dir:
        check_directory("--state-dir", Path(args.state_dir))
    temporary = not args.state_dir
    state = Path(args.state_dir or tempfile.mkdtemp(prefix="iotgw-demo-"))
    try:
        return _demo(args, state)
    except OSError as exc:  # a port in use, most likely: said plainly, not as a traceback
        print(f"iotgw demo: {exc.strerror or exc}; choose other ports with --web-port and --dns-port"
              if exc.errno == errno.EADDRINUSE else f"iotgw demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if temporary:  # Ctrl-C, SIGTERM or an error: the demo leaves nothing behind
            shutil.rmtree(state, ignore_errors=True)


def _demo(args: argparse.Namespace, state: Path) -> int:
    """Run the demo with its state in ``state`` until ``--duration`` ends, Ctrl-C or SIGTERM."""
    from gateway.accounts import set_password
    from gateway.config import Config
    from gateway.daemon import Gateway
    from gateway.demo import DeviceRunner, start_upstream, virtual_devices
    from gateway.store.db import Store

    cfg = Config(source="(demo)")
    cfg.gateway.state_dir = str(state)
    cfg.gateway.name = "iotgw-demo"
    cfg.dns.listen = [f"127.0.0.1:{args.dns_port}"]
    cfg.dns.lan = ["127.0.0.0/8"]
    cfg.capture.sniff = False
    cfg.store.flush_interval_s = 1.0
    if args.mqtt:
        cfg.mqtt.url = args.mqtt
    store = Store(cfg.db_url)
    password = secrets.token_urlsafe(9)  # a fresh one per demo: the UI is never open without a login
    set_password(store, password)

    async def main() -> None:
        from webui.server import serve_in_thread  # the composition root may start the web layer

        try:
            web = serve_in_thread(store, cfg, "127.0.0.1", args.web_port)
        except OSError as exc:
            raise OSError(exc.errno, f"web UI: cannot listen on 127.0.0.1:{args.web_port}: {exc.strerror}") from exc
        transport, upstream_port = await start_upstream()
        cfg.dns.upstreams = [f"127.0.0.1:{upstream_port}"]
        gateway = Gateway(cfg, store)
        runners: list[DeviceRunner] = []
        try:
            await gateway.start()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):  # both end the demo as --duration does: all flushed
                loop.add_signal_handler(sig, stop.set)
            runners = [DeviceRunner(gateway, device, args.dns_port, delay_s=2.0 + 4.0 * i)
                       for i, device in enumerate(virtual_devices(gateway, args.devices))]
            for runner in runners:
                runner.start()
            print(f"iotgw demo: open {web.url} and log in as admin / {password}", flush=True)
            print(f"  state in {state}", flush=True)
            print(f"  DNS on 127.0.0.1:{args.dns_port}; try: dig @127.0.0.1 -p {args.dns_port} example.com",
                  flush=True)
            print(f"  {len(runners)} virtual devices join over the next {4 * len(runners)} s: iotgw devices --db "
                  f"{cfg.db_url}", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.duration or None)
        finally:
            for runner in runners:
                runner.stopping.set()
            await gateway.stop()
            transport.close()
            web.stop()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # before the handlers are in place
        pass
    finally:
        store.close()
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from gateway.capture.replay import replay, timeline
    from gateway.daemon import Gateway
    from gateway.store.db import Store

    cfg = config_from_args(args)
    cfg.dns.listen = []
    cfg.capture.sniff = False
    order = timeline(args.pcaps)  # a first pass: each sender's earliest frame, and whether the frames are in order
    gateway = Gateway(cfg, Store(cfg.db_url), replay_in_order=order.in_order)

    # Ctrl-C or SIGTERM ends the replay at its next frame (also mid-wait with --realtime) and stops the gateway
    # cleanly; the replay thread would otherwise run to the capture's end before the program could exit.
    interrupted = threading.Event()

    async def main():  # noqa: ANN202 - a ReplayResult
        await gateway.start()
        ended = False
        try:  # the same parser and sink as live capture, in a thread so the consumer keeps draining
            result = await asyncio.to_thread(replay, args.pcaps, gateway.ingest, args.realtime, gateway.counters,
                                             order, interrupted)
            ended = not interrupted.is_set()
            return result
        finally:
            interrupted.set()
            await gateway.stop(capture_ended=ended)

    interrupt_on_stop_signals()

    result = asyncio.run(main())  # a file that cannot be read is logged by name; the others still run
    print(f"replayed {len(args.pcaps) - len(result.errors)} of {len(args.pcaps)} files; "
          f"{len(gateway.tracker.devices)} devices; counters {gateway.counters.values}")
    return 1 if result.errors else 0
