"""Private files and directories in the state directory, owned like the state directory whoever creates them.

The service runs as its own user (``iotgw``), and admins run the CLI with sudo. A file root makes there (a new
policy, a session key, a federation key) would be root's 0600 file that the service can no longer read or
replace, so when root creates or opens one here it is handed to the owner of the directory it is in.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Literal, overload

from identifier.atomicfile import write_whole

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


@overload
def create_private(path: Path, *, directory: Literal[False] = False, exclusive: bool = True) -> int: ...
@overload
def create_private(path: Path, *, directory: Literal[True], exclusive: bool = True) -> None: ...


def create_private(path: Path, *, directory: bool = False, exclusive: bool = True) -> int | None:
    """Create ``path`` readable by its owner only, owned like its directory when we are root.

    A file: opened for writing and its descriptor returned for the caller to close; ``O_EXCL`` unless
    ``exclusive`` is false, when an existing file is opened as it is (not truncated) and made private again. A directory
    (``directory=True``): made with any missing parents, each like its own parent; an existing one is left
    with its mode but given back to its parent's owner if root had taken it. Returns None then.
    """
    path = Path(path)
    if directory:
        missing = []
        for p in (path, *path.parents):
            if p.is_dir():
                break
            missing.append(p)
        for p in reversed(missing or [path]):  # an existing directory is only given back, not made
            try:
                p.mkdir(PRIVATE_DIR_MODE)
            except FileExistsError:
                if not p.is_dir():
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(p)) from None
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
            try:
                _own_like_parent(fd, p)
            finally:
                os.close(fd)
        return None
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else 0) | os.O_NOFOLLOW
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    try:
        if not exclusive:
            os.fchmod(fd, PRIVATE_FILE_MODE)  # O_CREAT keeps an existing file's mode
        _own_like_parent(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def file_stamp(path: Path) -> tuple[int, int, int, int, int] | None:
    """What tells one version of ``path`` from the next (None when there is none): its inode and size as well as
    its times in nanoseconds. A float mtime alone misses a save within one timestamp tick (a jiffy on kernels
    before multigrain timestamps, a second on ext4 with small inodes), and ``write_private`` makes a new inode
    each time."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def write_private(path: Path, data: bytes, *, replace: bool = True) -> bool:
    """Write ``data`` to ``path`` whole (``identifier.atomicfile.write_whole``) through a private file made by
    ``create_private``, so the result is 0600 and owned like the state directory.

    With ``replace`` false an existing ``path`` is kept and False returned: two processes making it at the same
    moment agree on one.
    """
    return write_whole(Path(path), data, opener=create_private, replace=replace)


def _own_like_parent(fd: int, path: Path) -> None:
    """Give the open file or directory to the owner of ``path``'s parent if we are root, the parent is not
    root's and root holds the entry (an entry another user already owns is theirs to keep)."""
    if os.geteuid() != 0:
        return
    parent = path.parent.stat()
    if parent.st_uid != 0 and os.fstat(fd).st_uid == 0:
        os.fchown(fd, parent.st_uid, parent.st_gid)


RUNNING_LOCK = ".running.lock"


class StateInUse(Exception):
    """The state directory is held: by ``iotgw run`` or ``iotgw web`` (for a restore), or by a restore (for them)."""


def hold_running_lock(state_dir: Path) -> int:
    """Mark ``state_dir`` in use by this process until it exits (the descriptor returned stays open): a shared
    flock on ``<state_dir>/.running.lock``, which ``iotgw restore`` must take exclusively before it swaps the
    directory away. A lock, not a pid file: the kernel drops it when the process dies, however it dies, so a
    crashed daemon never leaves a restore refused. Raises StateInUse while a restore holds it."""
    state_dir = Path(state_dir)
    create_private(state_dir, directory=True)
    fd = create_private(state_dir / RUNNING_LOCK, exclusive=False)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateInUse(f"{state_dir}: `iotgw restore` is replacing this state directory; start again once it "
                         "has finished") from None
    return fd


def take_running_lock(state_dir: Path) -> int:
    """The exclusive side of ``hold_running_lock``, for ``iotgw restore``: StateInUse when a daemon or web UI has
    ``state_dir`` open. The descriptor returned holds the lock until closed."""
    fd = create_private(Path(state_dir) / RUNNING_LOCK, exclusive=False)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateInUse(f"{state_dir} is in use by `iotgw run` or `iotgw web`: stop them first "
                         "(`sudo systemctl stop iotgw iotgw-web`)") from None
    return fd
