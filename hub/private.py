"""Files and directories only the control plane may read: one set of helpers for all state.

Every file that holds state or a secret (hub database, cookie secret, keys, the audit log,
the dataset registry, GPU leases, model signatures, MLflow's stores) is created mode 0600
in a directory of mode 0700, owned by the control plane's user. An existing one that group
or others can reach, or that another user owns, is refused with the path and the fix
(``tighten=True`` instead narrows the mode of one the control plane owns, for directories
it creates at start-up such as the state directory).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Self

from ztlab.common.errors import ConfigError, KeyFileError, ZtlabError


def _check(
    path: Path, info: os.stat_result, *, what: str, error: type[ZtlabError], directory: bool
) -> None:
    kind, expected = ("directory", 0o700) if directory else ("regular file", 0o600)
    is_kind = stat.S_ISDIR(info.st_mode) if directory else stat.S_ISREG(info.st_mode)
    if not is_kind:
        raise error(f"{path}: the {what} is not a {kind}")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise error(
            f"{path}: the {what} is readable or writable by group/others (mode {mode:04o}); "
            f"expected {expected:04o}",
            hint=f"chmod {expected:o} {path}",
        )
    if info.st_uid != os.geteuid():
        raise error(
            f"{path}: the {what} is owned by uid {info.st_uid}, not by this control-plane "
            f"user (uid {os.geteuid()})"
        )


def check_private_file(
    path: Path, info: os.stat_result, *, what: str, error: type[ZtlabError] = KeyFileError
) -> None:
    """Refuse a file that is not regular, that group/others may access, or that another
    user owns; ``what`` names it in the message, ``error`` is the exception to raise."""
    _check(path, info, what=what, error=error, directory=False)


def private_directory(
    path: Path, *, what: str, error: type[ZtlabError] = ZtlabError, tighten: bool = False
) -> Path:
    """Create ``path`` (and parents) with mode 0700, or check an existing one.

    ``tighten``: narrow an existing directory the control plane owns to 0700 instead of
    refusing it.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
        if tighten and info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & 0o077:
            path.chmod(0o700)
            info = path.stat()
    except OSError as exc:
        raise error(f"{path}: cannot create the {what}: {exc.strerror}") from exc
    _check(path, info, what=what, error=error, directory=True)
    return path


def private_file(
    path: Path,
    *,
    what: str,
    error: type[ZtlabError] = ZtlabError,
    content: bytes | None = None,
    tighten: bool = False,
) -> Path:
    """Create ``path`` with mode 0600 (written with ``content`` and synced), or check it.

    The directory is created 0700 if missing. An existing file is not rewritten; with
    ``tighten`` one the control plane owns is narrowed to 0600 instead of refused.
    """
    try:
        write_private_file(path, content or b"")
        return path
    except FileExistsError:
        pass
    except OSError as exc:
        raise error(f"{path}: cannot create the {what}: {exc.strerror}") from exc
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise error(f"{path}: cannot open the {what}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if tighten and info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
            info = os.fstat(fd)
    finally:
        os.close(fd)
    _check(path, info, what=what, error=error, directory=False)
    return path


def write_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (failing if it exists), write and fsync it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_private_file(path: Path, *, what: str, error: type[ZtlabError] = KeyFileError) -> bytes:
    """The bytes of a file only the control plane may read; refuse anything else.

    ``what`` names the file in messages ("signing key"). The file must exist, be a regular
    file, have no group/other permission bits and belong to this process's user.
    """
    try:
        info = path.stat()
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise error(f"{path}: no such {what}") from exc
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror}") from exc
    check_private_file(path, info, what=what, error=error)
    return data


def state_directory(path: Path) -> Path:
    """A directory of the control plane's state: created 0700, or tightened to 0700 if the
    control plane owns it; :class:`~ztlab.common.errors.ConfigError` otherwise."""
    return private_directory(path, what="state directory", error=ConfigError, tighten=True)


def state_file(path: Path, *, content: bytes | None = None) -> Path:
    """A file of the control plane's state: created 0600 (with ``content``), or tightened to
    0600 if the control plane owns it; :class:`~ztlab.common.errors.ConfigError` otherwise."""
    return private_file(path, what="state file", error=ConfigError, content=content, tighten=True)


def state_database(path: Path, schema: str) -> sqlite3.Connection:
    """A SQLite database of the control plane's state: the file created 0600 in a 0700
    directory (SQLite would make it world-readable), WAL journal, autocommit, usable from
    several threads (callers hold their own lock), ``schema`` applied."""
    state_directory(path.parent)
    if not path.exists():
        state_file(path, content=b"")
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(schema)
    return db


class DurableDatabase:
    """A SQLite file of the control plane's state that keeps every commit through a crash.

    The base of the stores whose writes must survive a crash once acknowledged (GPU
    leases, GPU alerts). Opening creates the directory (0700) and the file (0600) when
    missing and refuses ones that group or others can reach; the database runs in WAL mode
    with ``synchronous=FULL``; its schema version (``PRAGMA user_version``) is checked, a
    new file gets ``ddl`` and an older one the ``migrations`` from its version on, all in
    one transaction. Safe to share between threads (hold :attr:`_lock` to read through
    :attr:`_conn`); several processes may open the same file (a writer waits up to
    ``busy_timeout`` seconds). Errors are ``error``, naming the file and ``what`` it is.
    """

    def __init__(
        self,
        *,
        path: Path,
        what: str,
        directory: str,
        error: type[ZtlabError],
        version: int,
        ddl: Sequence[str],
        migrations: Mapping[int, Sequence[str]] | None = None,
        foreign_keys: bool = False,
        busy_timeout: float = 30.0,
    ) -> None:
        """Open (creating if needed) the database at ``path``; ``what`` names it in
        messages ("GPU lease database"), ``directory`` its folder ("GPU lease directory")."""
        self._path = Path(path)
        self._what = what
        self._error = error
        private_directory(self._path.parent, what=directory, error=error)
        private_file(self._path, what=what, error=error)
        try:
            conn = sqlite3.connect(
                self._path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise error(f"{self._path}: cannot open the {what}: {exc}") from exc
        self._conn = conn
        self._lock = threading.RLock()
        try:
            self._setup(version, ddl, migrations or {}, foreign_keys=foreign_keys)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise error(f"{self._path}: not a usable {what}: {exc}") from exc
        except error:
            conn.close()
            raise

    def _setup(
        self,
        version: int,
        ddl: Sequence[str],
        migrations: Mapping[int, Sequence[str]],
        *,
        foreign_keys: bool,
    ) -> None:
        conn = self._conn
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise self._error(f"{self._path}: cannot switch the {self._what} to WAL mode")
        conn.execute("PRAGMA synchronous=FULL")
        if foreign_keys:
            conn.execute("PRAGMA foreign_keys=ON")
        with self.transaction() as tx:
            found = tx.execute("PRAGMA user_version").fetchone()[0]
            if found != 0 and found != version and found not in migrations:
                known = (
                    f"versions {min(migrations)} to {version}"
                    if migrations
                    else (f"version {version}")
                )
                raise self._error(
                    f"{self._path}: {self._what} has schema version {found}; this ztlab "
                    f"understands {known}"
                )
            if found == 0:
                for statement in ddl:
                    tx.execute(statement)
            else:  # each step in the one transaction: a failed migration leaves the old one
                for step in range(found, version):
                    for statement in migrations.get(step, ()):
                        tx.execute(statement)
            tx.execute(f"PRAGMA user_version={version}")

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    def close(self) -> None:
        """Close the connection (committed data is on disk already)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``): committed on exit, rolled back on error.

        Holds SQLite's write lock from the start, so what it reads cannot change under it
        in this or any other process until it ends.
        """
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
