"""``iotgw backup FILE`` and ``iotgw restore FILE`` (``gateway.backup`` has what is in the file and why)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.cli import (
    add_state_args,
    check_directory,
    checked_flag,
    config_from_args,
    non_empty,
    non_empty_path,
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backup", help="write the gateway's state to one file (works while the daemon runs)",
        description="Write devices, names, labels, identification history, policy, block lists, web accounts and "
        "tokens, the federation keys and installed model, and the config file to one tar.gz FILE, readable by its "
        "owner only (0600: it holds password hashes and private keys). The database is snapshotted consistently "
        "while the daemon runs. The query log is left out unless --with-queries.")
    add_state_args(p, ("config", "db", "state_dir"))
    p.add_argument("file", type=non_empty_path, metavar="FILE", help="the backup to write (a .tar.gz)")
    p.add_argument("--with-queries", action="store_true",
                   help="include the query log (large; every name every device looked up)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(func=_backup)

    p = sub.add_parser(
        "restore", help="replace the gateway's state with a backup's (stop iotgw and iotgw-web first)",
        description="Replace the state directory, and the config file (--config, default /etc/iotgw/iotgw.toml), "
        "with those in FILE, made by `iotgw backup`. Refused while `iotgw run` or `iotgw web` uses the state "
        "directory. Everything is checked first (hashes, schema); a backup from an older iotgw is migrated. The "
        "replaced state directory is kept as DIR.before-restore, the config as FILE.before-restore.")
    add_state_args(p, ("config", "db", "state_dir"))
    p.add_argument("file", type=non_empty, metavar="FILE", help="a backup made by `iotgw backup`")
    p.set_defaults(func=_restore)


def _config_file(args: argparse.Namespace) -> Path | None:
    from gateway.config import DEFAULT_PATH

    if args.config:
        return Path(args.config)
    return DEFAULT_PATH if DEFAULT_PATH.exists() else None


def _backup(args: argparse.Namespace) -> int:
    from gateway.backup import BackupError, create

    cfg = config_from_args(args)
    try:
        manifest = create(cfg, args.file, config_file=_config_file(args), with_queries=args.with_queries,
                          overwrite=args.force)
    except BackupError as exc:
        print(str(exc), file=sys.stderr)
        return exc.code
    for note in manifest["notes"]:
        print(f"iotgw backup: {note}", file=sys.stderr)
    size = args.file.stat().st_size
    shown = f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"
    print(f"wrote {args.file} ({shown}, {len(manifest['files'])} files, schema "
          f"{manifest['schema']['config']}{', with the query log' if manifest['with_queries'] else ''}); "
          "it holds password hashes and private keys: keep it private")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from gateway.backup import BackupError, restore
    from gateway.config import DEFAULT_PATH, Config, check_database_url

    target = Path(args.config) if args.config else DEFAULT_PATH
    if args.config and not target.exists():
        # A reinstalled machine may have no config yet: the backup's goes there, and until then the defaults
        # (with --state-dir, --db) say where the state goes; not /etc/iotgw/iotgw.toml's, which was not named.
        cfg = Config()
        if args.db:
            cfg.store.url = checked_flag("--db", check_database_url, args.db)
        if args.state_dir:
            cfg.gateway.state_dir = args.state_dir
        check_directory("--state-dir" if args.state_dir else "state directory", cfg.state_dir)
    else:
        cfg = config_from_args(args)
    try:
        done = restore(cfg, Path(args.file), config_file=target)
    except BackupError as exc:
        print(str(exc), file=sys.stderr)
        return exc.code
    made = done.manifest.get("created_at")
    print(f"restored {args.file} (made {made} by iotgw {done.manifest.get('iotgw_version')}) into {done.state_dir}")
    if done.before:
        print(f"  the replaced state is in {done.before}")
    if done.config:
        print(f"  config written to {done.config}" + (f"; the replaced one is {done.config_before}"
                                                     if done.config_before else ""))
    for branch, revision in done.migrated_from.items():
        print(f"  {branch} database migrated from schema {revision or '(none)'} to this version's")
    if not done.manifest.get("with_queries"):
        print("  the backup held no query log: it starts empty")
    for note in done.notes:
        print(f"iotgw restore: {note}", file=sys.stderr)
    return 0
