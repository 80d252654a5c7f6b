"""``iotgw doctor``: check the install and say how to fix what is wrong (checks in ``gateway/doctor.py``)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from gateway.cli import add_state_args, config_with_flags
from gateway.config import ConfigError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="check port 53, capabilities, interface, state directory, link-local DNS clients, database, devices, "
             "broker, model, clock",
    )
    add_state_args(p)
    p.add_argument("--json", action="store_true", help="one JSON list of findings")
    p.set_defaults(func=doctor)


def doctor(args: argparse.Namespace) -> int:
    from gateway.doctor import Finding, run_all  # late: psutil and the store load only here

    try:
        findings = run_all(config_with_flags(args))  # a state directory that is a file is one finding
    except ConfigError as exc:
        unreadable = isinstance(exc.__cause__, PermissionError)
        findings = [
            Finding(
                "config",
                "fail",
                str(exc),
                "run it as root (`sudo iotgw doctor`) or as the iotgw user: this user may not read the file"
                if unreadable
                else "fix the flag it names, or the file at the line named (or move the file aside to run on the "
                "defaults)",
            )
        ]
    if args.json:
        json.dump([asdict(f) for f in findings], sys.stdout, indent=1)
        print()
    else:
        for f in findings:
            mark = f.status.upper() if f.status == "fail" else f.status
            print(f"{mark:<5} {f.check:<13} {f.detail}")
            for i, line in enumerate(f.fix.splitlines()):
                print(f"{'':<5} {'':<13} {'fix: ' if i == 0 else '     '}{line}")
    return 1 if any(f.status == "fail" for f in findings) else 0
