"""Commands run as root whose children drop to an unprivileged user (the join's SuperNode runs as the state
directory's owner), and places that user can reach.

pytest's own temporary directories are under a 0700 directory of root's, and on a machine whose Python lives
in root's 0700 home (pyenv under /root) the dropped user could not even start the interpreter. ``open_scratch``
is a temporary directory anyone may traverse; ``with_python_reachable`` runs a command in a mount namespace of
its own where a 0755 directory stands in for /root with the interpreter's tree bound into it: /root itself is
left as it is, and where the interpreter is elsewhere the command runs unchanged.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

UID, GID = 4242, 4243  # no such user: the state directory's owner, as the service user would be

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="running the SuperNode as another user needs root (and unshare, for a Python under /root)",
)


@contextmanager
def open_scratch() -> Iterator[Path]:
    """A temporary directory (0755) that an unprivileged user can reach, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="iotgw-unprivileged-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def with_python_reachable(cmd: list[str], scratch: Path) -> list[str]:
    """``cmd``, run so that other users can run this interpreter even if it is under root's 0700 home."""
    home = Path("/root")
    exe = Path(sys.executable).resolve()
    if home not in exe.parents:
        return cmd
    top = exe.relative_to(home).parts[0]
    stand_in = scratch / "root-stand-in"
    (stand_in / top).mkdir(parents=True, exist_ok=True)
    stand_in.chmod(0o755)
    # The stand-in must be bound recursively over /root, or the interpreter's tree bound into it is left behind.
    script = 'mount --bind "$1" "$2" && mount --rbind "$3" /root && shift 3 && exec "$@"'
    return [
        "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
        str(home / top), str(stand_in / top), str(stand_in), *cmd,
    ]  # fmt: skip
