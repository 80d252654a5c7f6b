"""``iotgw backup`` and ``iotgw restore``: the whole gateway in one file, for the day its SD card dies.

A backup is a gzip'd tar (``MANIFEST`` first) holding:

- ``database/<name>``: a snapshot of the SQLite store (devices, names, labels, identification history, accounts,
  tokens, settings) taken with ``VACUUM INTO``: one read transaction, so the daemon may go on writing (WAL) and
  the copy is still one consistent moment, which a copy of the file and its ``-wal`` is not;
- ``database/<name>-querylog<suffix>`` only with ``--with-queries``: the query log is most of the bytes (up to
  ``[store] querylog_max_rows``), and it is every name every device looked up for months, which does not belong
  in a file that gets copied to laptops and cloud drives by default; it is history, not configuration;
- ``state/...``: every other file of the state directory (the policy, block lists, the web UI's session key,
  ``federation/``: its keys, installed model bundles, confirmed labels), symlinks (the model's ``current`` and
  ``previous``) as entries of the manifest rather than tar members;
- ``config/iotgw.toml``: the config file, when one was read.

The manifest names the iotgw version, the schema revisions (alembic) of the snapshot, when it was made and each
member's size and SHA-256. The file holds password hashes, token digests and private keys: it is written 0600.

A restore checks everything before it touches anything: each member is a plain file at a relative path (no
absolute path, ``..``, link or device: a hostile archive cannot write outside its directory), its hash, the
database's integrity and that its schema is one this version knows. The new state directory is built beside the
old one, migrated to this version's schema, and swapped in with two renames; the old one stays as
``<state_dir>.before-restore``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import sqlite3
import stat
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from sqlalchemy.engine import make_url

from gateway.config import Config
from gateway.statedir import RUNNING_LOCK, create_private, take_running_lock
from gateway.store.db import querylog_url

FORMAT = "iotgw-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG_MEMBER = "config/iotgw.toml"
_CHUNK = 1 << 20
# Not state to carry over: locks (held by the processes of this machine) and the SQLite files, which are
# snapshotted instead of copied.
_SKIPPED_NAMES = {RUNNING_LOCK, ".policy.lock"}
_SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


class BackupError(Exception):
    """A backup or restore that cannot be done; the message names the file and the problem. ``code`` is the exit
    status: 2 for a bad archive or a setup the command does not handle, 1 for a state that may pass (in use)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Restored:
    state_dir: Path
    before: Path | None  # where the replaced state directory went (None: there was none)
    config: Path | None  # the config file written (None: the backup held none)
    config_before: Path | None
    manifest: dict
    migrated_from: dict[str, str | None] = field(default_factory=dict)  # branch: revision, when it was migrated
    notes: list[str] = field(default_factory=list)


def iotgw_version() -> str:
    try:
        return importlib.metadata.version("iotgw")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def sqlite_paths(cfg: Config, action: str) -> tuple[Path, Path]:
    """The configuration database and query log files of ``cfg``, refused (BackupError) for a database this
    command does not handle: PostgreSQL, whose own tools do it properly, and SQLite outside the state directory."""
    url = make_url(cfg.db_url)
    if url.get_backend_name() != "sqlite":
        raise BackupError(
            f"iotgw {action} handles the SQLite store only; this gateway's store is {url.get_backend_name()} "
            f"({url.render_as_string(hide_password=True)}): "
            + ("back it up with pg_dump (`pg_dump -Fc -f iotgw.dump DBNAME`), and copy the state directory (policy, "
               "block lists, keys) and the config file as they are" if action == "backup" else
               "restore its pg_dump with pg_restore, and the state directory and config by hand")
        )
    if url.database in (None, "", ":memory:"):
        raise BackupError(f"iotgw {action}: an in-memory database cannot be backed up or restored")
    db = Path(url.database)
    state = cfg.state_dir
    if os.path.abspath(db.parent) != os.path.abspath(state):
        raise BackupError(
            f"iotgw {action}: the database {db} is not in the state directory {state}; {action} handles a store "
            "that lives there only (the default): copy it with `sqlite3 DB '.backup FILE'` instead"
        )
    return db, Path(make_url(querylog_url(cfg.db_url)).database)


# ---------------------------------------------------------------------------------------------------- backup


def create(cfg: Config, out: Path, *, config_file: Path | None, with_queries: bool = False,
           overwrite: bool = False) -> dict:
    """Write the backup of ``cfg``'s gateway to ``out`` (0600) and return its manifest. Works while the daemon
    runs. ``config_file``: the config to include (None: none was read)."""
    db, querylog = sqlite_paths(cfg, "backup")
    out = Path(out)
    if not db.is_file():
        raise BackupError(f"iotgw backup: no database at {db}: nothing to back up (wrong --config or --state-dir?)")
    if out.is_dir():
        raise BackupError(f"iotgw backup: {out} is a directory; name the file to write")
    if out.exists() and not overwrite:
        raise BackupError(f"iotgw backup: {out} already exists; give --force to replace it")
    if os.path.abspath(out).startswith(os.path.abspath(cfg.state_dir) + os.sep):
        raise BackupError(f"iotgw backup: {out} is inside the state directory {cfg.state_dir}: the next backup "
                          "would hold this one, and a restore would lose it; write it elsewhere")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".iotgw-backup-", dir=out.parent))
    try:
        files: dict[str, Path] = {}
        schema: dict[str, str | None] = {}
        files[f"database/{db.name}"] = _snapshot(db, staging / "database" / db.name)
        schema["config"] = _revision(files[f"database/{db.name}"])
        schema["querylog"] = None
        if with_queries and querylog.is_file():
            files[f"database/{querylog.name}"] = _snapshot(querylog, staging / "database" / querylog.name)
            schema["querylog"] = _revision(files[f"database/{querylog.name}"])
        skipped = {p.name + s for p in (db, querylog) for s in _SQLITE_SUFFIXES}
        links: dict[str, str] = {}
        notes: list[str] = []
        from gateway.policies import locked  # the policy and its list files, as of one moment

        with locked(cfg.state_dir):
            for rel, kind, target in _state_files(cfg.state_dir, skipped):
                name = f"state/{rel}"
                if kind == "link":
                    if "/" in target or target in (".", ".."):
                        notes.append(f"left out {cfg.state_dir / rel}: a symlink out of its directory ({target})")
                    else:
                        links[name] = target
                    continue
                copy = staging / name
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(cfg.state_dir / rel, copy, follow_symlinks=False)
                files[name] = copy
        if config_file is not None:
            copy = staging / CONFIG_MEMBER
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(config_file, copy)
            files[CONFIG_MEMBER] = copy
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "iotgw_version": iotgw_version(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "schema": schema,
            "with_queries": schema["querylog"] is not None,
            "source": {"state_dir": str(cfg.state_dir), "database": db.name,
                       "config": str(config_file) if config_file else None},
            "files": {name: {"size": path.stat().st_size, "sha256": _sha256(path)} for name, path in files.items()},
            "links": links,
            "notes": notes,
        }
        _write_archive(out, manifest, files)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _snapshot(db: Path, dest: Path) -> Path:
    """A consistent copy of the live SQLite database ``db`` at ``dest``. ``VACUUM INTO`` reads in one transaction
    (WAL: the daemon keeps writing meanwhile) and writes a compact file with no ``-wal`` beside it."""
    from gateway.store.db import BUSY_TIMEOUT_S

    dest.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    try:
        conn.execute("VACUUM INTO ?", (str(dest),))
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"iotgw backup: cannot read the database {db}: {exc}", 1) from exc
    finally:
        conn.close()
    return dest


def _revision(db: Path) -> str | None:
    """The alembic revision the SQLite file ``db`` is at (None: never migrated)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    return row[0] if row else None


def _state_files(state_dir: Path, skipped: set[str]) -> Iterator[tuple[str, str, str]]:
    """(relative path, "file" or "link", link target) of what the state directory holds, in a stable order."""
    for root, dirs, names in os.walk(state_dir):
        dirs.sort()
        for entry in sorted(names) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = Path(root, entry)
            rel = path.relative_to(state_dir).as_posix()
            if root == str(state_dir) and entry in skipped or entry in _SKIPPED_NAMES:
                continue
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                yield rel, "link", os.readlink(path)
            elif stat.S_ISREG(mode):
                yield rel, "file", ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_archive(out: Path, manifest: dict, files: dict[str, Path]) -> None:
    """The tar.gz, manifest first, written to a private temporary file and renamed over ``out``: a full disk or
    Ctrl-C leaves no half backup under the name."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    fd = create_private(tmp)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
            body = json.dumps(manifest, indent=2, sort_keys=True).encode()
            _add(tar, MANIFEST, len(body), lambda: io.BytesIO(body))
            for name, path in files.items():
                _add(tar, name, path.stat().st_size, lambda p=path: open(p, "rb"))
            tar.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _add(tar: tarfile.TarFile, name: str, size: int, opener) -> None:  # noqa: ANN001 - a callable giving a reader
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, int(time.time())
    with opener() as fh:
        tar.addfile(info, fh)


# --------------------------------------------------------------------------------------------------- restore


def restore(cfg: Config, archive: Path, *, config_file: Path | None) -> Restored:
    """Replace ``cfg``'s state directory (and ``config_file``, when the backup holds a config) with the backup's.
    Refused, with nothing changed, while ``iotgw run`` or ``iotgw web`` uses the state directory."""
    from gateway.statedir import StateInUse

    db, _querylog = sqlite_paths(cfg, "restore")
    archive = Path(archive)
    state = Path(os.path.abspath(cfg.state_dir))
    if state.exists() and not state.is_dir():
        raise BackupError(f"iotgw restore: {state} is not a directory")
    lock = None
    if state.is_dir():
        try:
            lock = take_running_lock(state)
        except StateInUse as exc:
            raise BackupError(f"iotgw restore: {exc}", 1) from None
    else:
        state.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{state.name}.restore-", dir=state.parent))
    try:
        manifest = _unpack(archive, building / ".unpacked")
        result = Restored(state, None, None, None, manifest)
        _build(archive, building, db.name, manifest, result)
        config_text = None
        if CONFIG_MEMBER in manifest["files"] and config_file is not None:
            config_text = (building / ".unpacked" / CONFIG_MEMBER).read_bytes()
        shutil.rmtree(building / ".unpacked")
        if state.is_dir():
            st = state.stat()
            _own_tree(building, st.st_uid, st.st_gid)
            os.chmod(building, stat.S_IMODE(st.st_mode))
            result.before = _free_name(state.with_name(state.name + ".before-restore"))
            os.rename(state, result.before)
            try:
                os.rename(building, state)
            except BaseException:
                os.rename(result.before, state)
                raise
        else:
            os.rename(building, state)
        if config_text is not None:
            result.config, result.config_before = config_file, _replace_config(config_file, config_text)
            _note_state_dir(result, config_text)
        return result
    finally:
        if lock is not None:
            os.close(lock)
        shutil.rmtree(building, ignore_errors=True)


def _unpack(archive: Path, into: Path) -> dict:
    """Every member of ``archive`` written under ``into``, checked against the manifest; BackupError naming the
    archive and the problem otherwise (a file that is no gzip'd tar, cut short, altered, or a member that would
    land outside ``into`` or is not a plain file)."""
    into.mkdir()
    seen: dict[str, tuple[int, str]] = {}
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            for member in tar:
                name = _member_name(archive, member)
                if member.isdir():
                    continue
                if name in seen:
                    raise BackupError(f"{archive}: holds {name} twice")
                dest = into / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                digest, size = hashlib.sha256(), 0
                source = tar.extractfile(member)
                with source, open(create_private(dest), "wb") as fh:
                    while chunk := source.read(_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        fh.write(chunk)
                seen[name] = (size, digest.hexdigest())
            # tarfile takes a damaged header after the first for the archive's end; reading the gzip stream to its
            # end checks its CRC and length, so damage anywhere is named as such rather than as a missing member
            while tar.fileobj.read(_CHUNK):
                pass
    except FileNotFoundError:
        raise BackupError(f"{archive}: no such file") from None
    except IsADirectoryError:
        raise BackupError(f"{archive}: is a directory, not a backup") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        what = "cut short" if isinstance(exc, EOFError) or "unexpected end" in str(exc) else "not a readable backup"
        raise BackupError(f"{archive}: {what} (not a whole iotgw backup: {exc})") from None
    if MANIFEST not in seen:
        raise BackupError(f"{archive}: not an iotgw backup (no {MANIFEST})")
    try:
        manifest = json.loads((into / MANIFEST).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BackupError(f"{archive}: {MANIFEST} is not JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{archive}: not an iotgw backup ({MANIFEST} names no {FORMAT!r} format)")
    if not isinstance(manifest.get("format_version"), int) or manifest["format_version"] > FORMAT_VERSION:
        raise BackupError(f"{archive}: made by iotgw {manifest.get('iotgw_version')} in backup format "
                          f"{manifest.get('format_version')}, which this iotgw ({iotgw_version()}) cannot read: "
                          "install that version or a newer one first")
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise BackupError(f"{archive}: {MANIFEST} lists no files")
    for name, want in listed.items():
        if name not in seen:
            raise BackupError(f"{archive}: {name} is missing (the manifest lists it)")
        size, digest = seen[name]
        if not isinstance(want, dict) or want.get("sha256") != digest or want.get("size") != size:
            raise BackupError(f"{archive}: {name} does not match its SHA-256 in the manifest: the file is damaged")
    extra = sorted(set(seen) - set(listed) - {MANIFEST})
    if extra:
        raise BackupError(f"{archive}: {extra[0]} is not in the manifest")
    for name, target in (manifest.get("links") or {}).items():
        _member_name(archive, tarfile.TarInfo(name))
        if not isinstance(target, str) or "/" in target or target in ("", ".", ".."):
            raise BackupError(f"{archive}: the link {name} points out of its directory ({target!r}): refused")
    return manifest


def _member_name(archive: Path, member: tarfile.TarInfo) -> str:
    """The member's name, once it is known to stay inside the directory it is unpacked into."""
    name = member.name
    parts = PurePosixPath(name).parts
    if name.startswith("/") or not parts or ".." in parts or "\\" in name or "\0" in name:
        raise BackupError(f"{archive}: the member {name!r} would be written outside the restore (an absolute "
                          "path or ..): refused")
    if not (member.isfile() or member.isdir()):
        kind = "a symlink" if member.issym() else "a hard link" if member.islnk() else "not a plain file"
        raise BackupError(f"{archive}: the member {name!r} is {kind}: refused")
    return "/".join(p for p in parts if p != ".")


def _build(archive: Path, building: Path, db_name: str, manifest: dict, result: Restored) -> None:
    """The new state directory in ``building``: the state files, the links, and the databases, checked and
    migrated to this version's schema."""
    from gateway.store.db import Store, known_revision

    unpacked = building / ".unpacked"
    databases = [n for n in manifest["files"] if n.startswith("database/")]
    source_db = manifest.get("source", {}).get("database")
    if f"database/{source_db}" not in databases:
        raise BackupError(f"{archive}: holds no database ({MANIFEST} names {source_db!r})")
    for name in databases:
        path = unpacked / name
        _check_sqlite(archive, name, path)
        revision = _revision(path)
        branch = "config" if name == f"database/{source_db}" else "querylog"
        if revision is not None and not known_revision(revision):
            raise BackupError(
                f"{archive}: its database is at schema revision {revision}, newer than this iotgw "
                f"({iotgw_version()}) knows; it was made by iotgw {manifest.get('iotgw_version')}: install that "
                "version or a newer one, then restore"
            )
        result.migrated_from[branch] = revision
    for name in manifest["files"]:
        if name.startswith("state/"):
            dest = building / name.removeprefix("state/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(unpacked / name, dest)
    for name, target in (manifest.get("links") or {}).items():
        link = building / name.removeprefix("state/")
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(target, link)
        except FileExistsError:
            raise BackupError(f"{archive}: the link {name} is also a file in it") from None
    # The database under this gateway's own name, and its query log beside it as Store expects
    db = building / db_name
    os.rename(unpacked / f"database/{source_db}", db)
    for name in databases:
        if name != f"database/{source_db}":
            os.rename(unpacked / name, Path(make_url(querylog_url(f"sqlite:///{db}")).database))
    store = Store(f"sqlite:///{db}")  # migrates an older schema; makes an empty query log when none came
    store.close()
    after = {"config": _revision(db), "querylog": _revision(Path(make_url(querylog_url(f"sqlite:///{db}")).database))}
    result.migrated_from = {branch: was for branch, was in result.migrated_from.items() if was != after[branch]}


def _check_sqlite(archive: Path, name: str, path: Path) -> None:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{archive}: {name} is not a SQLite database: {exc}") from None
    if verdict != "ok":
        raise BackupError(f"{archive}: {name} is damaged: {verdict}")


def _own_tree(root: Path, uid: int, gid: int) -> None:
    """Give everything under ``root`` to the replaced state directory's owner (the service user) when we are root,
    or the daemon could not open its own restored database."""
    if os.geteuid() != 0:
        return
    for path in [root, *root.rglob("*")]:
        os.lchown(path, uid, gid)


def _free_name(path: Path) -> Path:
    """``path``, or ``path.2``, ``path.3``...: a second restore keeps the first one's copy too."""
    candidate, n = path, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def _replace_config(path: Path, text: bytes) -> Path | None:
    """Write the backup's config over ``path`` with the replaced file's mode and owner (root:iotgw 0640 on an
    installed system), the old one kept as ``path.before-restore``; returns where the old one went."""
    path = Path(path)
    before = None
    mode, owner = 0o640, None
    if path.exists():
        st = path.stat()
        mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
        before = _free_name(path.with_name(path.name + ".before-restore"))
        shutil.copy2(path, before)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        if owner is not None and os.geteuid() == 0:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return before


def _note_state_dir(result: Restored, config_text: bytes) -> None:
    """A note when the restored config names another state directory than the one restored into (--state-dir):
    the daemon would run on that one."""
    import tomllib

    try:
        named = tomllib.loads(config_text.decode("utf-8")).get("gateway", {}).get("state_dir")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return
    if named and os.path.abspath(named) != str(result.state_dir):
        result.notes.append(f"the restored config names the state directory {named}, not {result.state_dir} "
                            "where the state was restored: change [gateway] state_dir or move the directory")
