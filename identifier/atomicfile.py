"""Whole-file writes: a reader or a power cut meets the old file or the new one, never half of one.

The one place files are written beside their name and renamed over it. It lives in ``identifier``, the lower
layer, so the gateway (``gateway.statedir``: private files owned like the state directory) and the library
(model bundles, the federation server's files) share it without ``identifier`` importing the gateway.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

OpenNew = Callable[[Path], int]


def open_new(path: Path) -> int:
    """Create ``path`` for writing (exclusive, never through a symlink) with the umask's mode; return its fd."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)


def write_whole(
    path: Path, data: bytes, *, opener: OpenNew = open_new, mode: int | None = None, replace: bool = True
) -> bool:
    """Write ``data`` to ``path`` whole: into a new file beside it made by ``opener`` (``open_new`` unless the
    caller needs another owner or mode), given ``mode`` if one is named, fsynced, renamed over ``path``, and the
    directory fsynced so the new name survives a power cut too.

    With ``replace`` false an existing ``path`` is kept and False returned: the file is linked into place, which
    fails if it exists, so two processes making it at the same moment agree on one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}-{secrets.token_hex(8)}")
    try:
        with os.fdopen(opener(tmp), "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)  # before any byte is written: the umask may have left more
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        sync_dir(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def sync_dir(d: Path) -> None:
    """fsync a directory, so the names created or renamed in it survive a power cut."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
