"""Where the policy lives: ``<state_dir>/policy.json``, a ``PolicySet`` written atomically with a revision
that the daemon polls (a stat per half second), so a change from the CLI or the web UI applies within a second.

The device and query tables are in the database; the policy stays a file so that it can be edited, diffed
and backed up by hand like Pi-hole's and AdGuard Home's configuration.
"""

from __future__ import annotations

import json
from pathlib import Path

from gateway.config import ConfigError
from gateway.statedir import write_private
from policy.model import PolicySet


def policy_path(state_dir: Path) -> Path:
    return state_dir / "policy.json"


def load_policy(state_dir: Path) -> PolicySet:
    """The ``PolicySet`` in ``state_dir`` (empty if there is none yet)."""
    path = policy_path(state_dir)
    if not path.exists():
        return PolicySet()
    try:
        return PolicySet.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def save_policy(state_dir: Path, data: PolicySet) -> None:
    """Validate, bump the revision and write atomically: a reader never sees half a file, a power cut leaves
    the old or the new policy, and a full disk leaves the old one with no temporary file behind."""
    data.validate()
    data.revision += 1
    state_dir.mkdir(parents=True, exist_ok=True)
    # Owned like the state directory: a policy saved by `sudo iotgw policy ...` stays readable by the daemon.
    text = json.dumps(data.to_dict(), indent=2, sort_keys=True)
    try:
        write_private(policy_path(state_dir), text.encode("utf-8"))
    except BaseException:
        data.revision -= 1
        raise

