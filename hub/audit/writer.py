"""The control plane's audit-log writer: append-only, durable, with signed checkpoints.

One :class:`AuditLog` per log, in one process: it holds an exclusive lock for its lifetime.
Appends are queued to a writer thread that writes every pending record in one ``write``,
calls ``fsync`` once for the batch (group commit) and only then acknowledges them. While
records arrive it signs a checkpoint at least every ``checkpoint_interval`` seconds, and it
signs one on every clean close. On open it quarantines a torn last line left by a crash,
verifies the whole log, and refuses to extend a log that does not verify.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import queue
import threading
import time
import weakref
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ztlab.common.auditlog.checkpoint import (
    Checkpoint,
    check_origin,
    key_hash,
    signed_note,
    verifier_key,
)
from ztlab.common.auditlog.paths import (
    checkpoints_path,
    lock_path,
    public_key_path,
    quarantine_path,
)
from ztlab.common.auditlog.record import (
    GENESIS_PREV,
    check_event,
    format_line,
    record_leaf_hash,
    utc_timestamp,
)
from ztlab.common.auditlog.verify import verify_log
from ztlab.common.errors import AuditError, AuditLockedError, VerificationError
from ztlab.common.keys import public_key_pem
from ztlab.common.merkle import CompactRange
from ztlab.hub.keys import load_or_create_audit_key, write_public_file

DEFAULT_ORIGIN = "ztlab.local/audit"


@dataclass(frozen=True, slots=True)
class Receipt:
    """Proof that a record is durable: its sequence number, leaf hash and timestamp."""

    seq: int
    leaf_hash: str
    ts: str


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What :meth:`AuditLog.open` found and repaired."""

    records: int
    covered: int
    quarantined: tuple[Path, ...]


# an encoded event body, and the future to resolve (None for fire-and-forget records)
_Event = tuple[str, "Future[Receipt] | None"]
_CHECKPOINT = object()
_FLUSH = object()
_CLOSE = object()


class AuditLog:
    """The audit log, as written by the control plane. Use :meth:`open`."""

    def __init__(
        self,
        *,
        path: Path,
        signing_key: Ed25519PrivateKey,
        origin: str,
        checkpoint_interval: float,
        records_fd: int,
        checkpoints_fd: int,
        lock_fd: int,
        tree: CompactRange,
        prev: str,
        covered: int,
        last_checkpoint_ms: int,
        recovery: RecoveryReport,
    ) -> None:
        self.path = path
        self.origin = origin
        self.checkpoint_interval = checkpoint_interval
        self.recovery = recovery
        self._key = signing_key
        self._key_id = key_hash(origin, signing_key.public_key())
        self._records_fd = records_fd
        self._checkpoints_fd = checkpoints_fd
        self._lock_fd = lock_fd
        self._tree = tree
        self._prev = prev
        self._covered = covered
        self._size_on_disk = os.fstat(records_fd).st_size
        self._last_checkpoint_ms = last_checkpoint_ms
        self._last_checkpoint_at = time.monotonic()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._failure: AuditError | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"audit-writer:{path.name}")
        self._thread.daemon = True
        self._thread.start()
        atexit.register(_close_at_exit, weakref.ref(self))

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        key_path: Path | str | None = None,
        origin: str = DEFAULT_ORIGIN,
        checkpoint_interval: float = 2.0,
    ) -> AuditLog:
        """Open (creating if needed) the log at ``path`` for appending.

        ``key_path`` is the Ed25519 signing key (default ``<log>.key``), created with mode
        0600 if missing. Raises :class:`AuditLockedError` if another writer holds the log and
        :class:`AuditError` if the existing log does not verify.
        """
        path = Path(path)
        key_file = Path(key_path) if key_path is not None else path.with_name(path.name + ".key")
        try:
            check_origin(origin)
        except ValueError as exc:
            raise AuditError(str(exc)) from exc
        if not checkpoint_interval > 0:
            raise AuditError(f"checkpoint interval must be > 0 seconds, got {checkpoint_interval}")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_fd = _acquire_lock(path)
        try:
            key = load_or_create_audit_key(key_file)
            _export_public_key(path, key)
            quarantined = [
                q
                for q in (
                    _quarantine_torn_tail(path),
                    _quarantine_torn_tail(checkpoints_path(path)),
                )
                if q is not None
            ]
            records_fd = _open_private(path)
            checkpoints_fd = _open_private(checkpoints_path(path))
        except BaseException:
            os.close(lock_fd)
            raise
        try:
            try:
                report = verify_log(path, public_key=key.public_key(), origin=origin)
            except VerificationError as exc:
                raise AuditError(
                    f"{path}: the existing audit log does not verify, so it will not be extended: "
                    f"{exc.message}",
                    hint=f"run `ztlab audit verify --log {path}` and investigate before rotating",
                ) from exc
            log = cls(
                path=path,
                signing_key=key,
                origin=origin,
                checkpoint_interval=checkpoint_interval,
                records_fd=records_fd,
                checkpoints_fd=checkpoints_fd,
                lock_fd=lock_fd,
                tree=report.tree,
                prev=report.prev,
                covered=report.covered,
                last_checkpoint_ms=report.last_checkpoint_ms or 0,
                recovery=RecoveryReport(
                    records=report.records, covered=report.covered, quarantined=tuple(quarantined)
                ),
            )
        except BaseException:
            for fd in (records_fd, checkpoints_fd, lock_fd):
                os.close(fd)
            raise
        # Records acknowledged before a crash but not yet signed get a checkpoint now.
        if report.records > report.covered:
            log.checkpoint().result()
        for quarantine in quarantined:
            log.record(
                actor="ztlab-audit",
                action="audit.torn_tail_quarantined",
                detail={"file": str(quarantine), "bytes": quarantine.stat().st_size},
            )
        return log

    # -- appending -------------------------------------------------------------------------

    def submit(
        self, actor: str, action: str, detail: Mapping[str, Any] | None = None
    ) -> Future[Receipt]:
        """Queue one event; the future resolves to its :class:`Receipt` once durable."""
        future: Future[Receipt] = Future()
        self._enqueue((check_event(actor, action, detail), future))
        return future

    def append(
        self,
        actor: str,
        action: str,
        detail: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Receipt:
        """Append one event and wait until it is on disk (fsync'd)."""
        return self.submit(actor, action, detail).result(timeout)

    def record(self, *, actor: str, action: str, detail: Mapping[str, Any]) -> None:
        """:class:`~ztlab.common.auditlog.sink.AuditSink`: queue an event without waiting.

        Raises at once if the log has failed or is closed (enforcement fails closed).
        """
        self._enqueue((check_event(actor, action, detail), None))

    def flush(self) -> Future[None]:
        """A future that resolves once every event queued before this call is durable.

        The hub awaits it before it acknowledges anything to a client (an API answer, a
        login, a started server), so no acknowledged record can be lost to a crash.
        """
        future: Future[None] = Future()
        self._enqueue((_FLUSH, future))
        return future

    def checkpoint(self) -> Future[Checkpoint | None]:
        """Ask for a signed checkpoint of everything written so far (``None`` if no change)."""
        future: Future[Checkpoint | None] = Future()
        self._enqueue((_CHECKPOINT, future))
        return future

    def _enqueue(self, item: tuple[Any, ...]) -> None:
        # Under the close lock, so nothing can be queued after the writer's last drain.
        with self._close_lock:
            if self._failure is not None:
                raise self._failure
            if self._closed:
                raise AuditError(f"{self.path}: the audit log is closed")
            self._queue.put(item)

    @property
    def verifier_key(self) -> str:
        """The public key as a C2SP signed-note verifier key, to pin elsewhere."""
        return verifier_key(self.origin, self._key.public_key())

    @property
    def size(self) -> int:
        """Records written (acknowledged or about to be)."""
        return self._tree.size

    def close(self) -> None:
        """Write what is queued, sign a final checkpoint, release the lock. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_CLOSE)
        self._thread.join()
        for fd in (self._records_fd, self._checkpoints_fd, self._lock_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._failure is not None:
            raise self._failure

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        closing = False
        while not closing:
            timeout = None
            if self._tree.size > self._covered:
                elapsed = time.monotonic() - self._last_checkpoint_at
                timeout = max(0.0, self.checkpoint_interval - elapsed)
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                self._signed_checkpoint()
                continue
            events: list[_Event] = []
            checkpoints: list[Future[Checkpoint | None]] = []
            flushes: list[Future[None]] = []
            while True:
                if item is _CLOSE:
                    closing = True
                elif item[0] is _CHECKPOINT:
                    checkpoints.append(item[1])
                elif item[0] is _FLUSH:
                    flushes.append(item[1])
                else:
                    events.append(item)
                if len(events) >= 8192:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if events:
                self._write_batch(events)
            for flushed in flushes:
                if self._failure is not None:
                    flushed.set_exception(self._failure)
                else:
                    flushed.set_result(None)
            due = time.monotonic() - self._last_checkpoint_at >= self.checkpoint_interval
            if checkpoints or closing or due:
                result = self._signed_checkpoint()
                for future in checkpoints:
                    _resolve(future, result, self._failure)
        # Anything queued after close() began is refused, not silently dropped.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _CLOSE and item[1] is not None:
                item[1].set_exception(AuditError(f"{self.path}: the audit log is closed"))

    def _write_batch(self, events: list[_Event]) -> None:
        if self._failure is not None:
            _reject(events, self._failure)
            return
        ts = utc_timestamp(datetime.now(UTC))
        chunks: list[bytes] = []
        leaves: list[str] = []
        tree = self._tree.copy()
        prev = self._prev
        first = tree.size
        for body, _ in events:
            line = format_line(seq=tree.size, prev=prev, ts=ts, body=body)
            leaf = record_leaf_hash(line)
            tree.append(leaf)
            prev = leaf.hex()
            chunks.append(line + b"\n")
            leaves.append(prev)
        data = b"".join(chunks)
        try:
            _write_all(self._records_fd, data)
            os.fsync(self._records_fd)
        except OSError as exc:
            self._fail(f"cannot write the audit log: {exc.strerror}", exc)
            with contextlib.suppress(OSError):
                os.ftruncate(self._records_fd, self._size_on_disk)
            _reject(events, self._failure or AuditError("audit log failed"))
            return
        self._size_on_disk += len(data)
        self._tree = tree
        self._prev = prev
        for offset, (_, future) in enumerate(events):
            if future is not None:
                future.set_result(Receipt(seq=first + offset, leaf_hash=leaves[offset], ts=ts))

    def _signed_checkpoint(self) -> Checkpoint | None:
        if self._failure is not None or self._tree.size == self._covered:
            return None
        stamp = max(self._last_checkpoint_ms, time.time_ns() // 1_000_000)
        checkpoint = Checkpoint(
            origin=self.origin, size=self._tree.size, root=self._tree.root(), timestamp_ms=stamp
        )
        body = checkpoint.body()
        note = signed_note(body, self.origin, self._key_id, self._key.sign(body.encode()))
        entry = (json.dumps({"note": note}, separators=(",", ":")) + "\n").encode()
        try:
            _write_all(self._checkpoints_fd, entry)
            os.fsync(self._checkpoints_fd)
        except OSError as exc:
            self._fail(f"cannot write a checkpoint: {exc.strerror}", exc)
            return None
        self._covered = checkpoint.size
        self._last_checkpoint_ms = stamp
        self._last_checkpoint_at = time.monotonic()
        return checkpoint

    def _fail(self, message: str, exc: OSError) -> None:
        # Fail closed: once a write fails, nothing more is accepted.
        error = AuditError(f"{self.path}: {message}; the audit log refuses further appends")
        error.__cause__ = exc
        self._failure = error


def _reject(events: list[_Event], error: AuditError) -> None:
    for _, future in events:
        if future is not None:
            future.set_exception(error)


def _resolve(
    future: Future[Checkpoint | None], result: Checkpoint | None, failure: AuditError | None
) -> None:
    if failure is not None:
        future.set_exception(failure)
    else:
        future.set_result(result)


def _close_at_exit(ref: weakref.ref[AuditLog]) -> None:
    log = ref()
    if log is not None:
        with contextlib.suppress(AuditError):
            log.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _open_private(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def _acquire_lock(path: Path) -> int:
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise AuditLockedError(
            f"{path}: the audit log is held by another writer (pid {holder})",
            hint="append through the running control plane instead",
        ) from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _export_public_key(path: Path, key: Ed25519PrivateKey) -> None:
    exported = public_key_path(path)
    pem = public_key_pem(key.public_key()).encode("ascii")
    if exported.exists():
        if exported.read_bytes() != pem:
            raise AuditError(
                f"{exported}: the log's exported public key is not the signing key's; "
                "refusing to sign this log with a different key"
            )
        return
    write_public_file(exported, pem)


def _quarantine_torn_tail(path: Path) -> Path | None:
    """Move an incomplete last line (no newline) aside and cut it off; return where it went."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size == 0:
                return None
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return None
            start = max(0, size - 1024 * 1024)
            handle.seek(start)
            tail = handle.read()
    except FileNotFoundError:
        return None
    cut = tail.rfind(b"\n") + 1 + start if b"\n" in tail else _last_newline(path, start)
    with path.open("rb") as handle:
        handle.seek(cut)
        torn = handle.read()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = quarantine_path(path, cut, stamp)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, torn)
        os.fsync(fd)
    finally:
        os.close(fd)
    with path.open("r+b") as handle:
        handle.truncate(cut)
        os.fsync(handle.fileno())
    return target


def _last_newline(path: Path, before: int) -> int:
    with path.open("rb") as handle:
        position = before
        while position > 0:
            start = max(0, position - 1024 * 1024)
            handle.seek(start)
            chunk = handle.read(position - start)
            index = chunk.rfind(b"\n")
            if index >= 0:
                return start + index + 1
            position = start
    return 0


__all__ = ["DEFAULT_ORIGIN", "GENESIS_PREV", "AuditLog", "Receipt", "RecoveryReport"]
