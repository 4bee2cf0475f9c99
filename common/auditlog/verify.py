"""Verifying an audit log: the records file, its signed checkpoints, and nothing else.

Verification needs only the public key, so anyone (an auditor, a monitor on another host)
can run it. It reads like the procedure it implements; each step is numbered below.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ztlab.common.auditlog.checkpoint import Checkpoint, key_hash, verify_checkpoint_note
from ztlab.common.auditlog.paths import checkpoints_path
from ztlab.common.auditlog.record import GENESIS_PREV, HEAD_RE, parse_record
from ztlab.common.errors import UsageError, VerificationError
from ztlab.common.merkle import CompactRange


class AuditVerificationError(VerificationError):
    """The log does not verify; ``record`` is the index of the first bad record, if known."""

    def __init__(self, message: str, *, record: int | None = None) -> None:
        super().__init__(message)
        self.record = record


@dataclass(frozen=True)
class TornTail:
    """An incomplete last line: bytes written by a writer that died mid-append."""

    offset: int
    length: int


@dataclass(frozen=True)
class VerifyReport:
    """What a successful verification established."""

    records: int
    checkpoints: int
    covered: int
    root: bytes
    origin: str | None
    key_id: str | None
    last_checkpoint_ms: int | None
    #: the Merkle tree of all complete records and the hash of the last one, so that a
    #: writer can continue the log where verification stopped
    tree: CompactRange = field(repr=False, compare=False)
    prev: str = field(repr=False, compare=False)
    torn_tail: TornTail | None = None
    torn_checkpoint: bool = False
    warnings: tuple[str, ...] = field(default=())

    @property
    def unsigned(self) -> int:
        """Records after the last signed checkpoint (not yet covered by a signature)."""
        return self.records - self.covered

    def summary(self) -> str:
        """One line for humans."""
        text = (
            f"OK: {self.records} records, {self.checkpoints} signed checkpoints; "
            f"the last covers {self.covered} records (root {self.root.hex()[:16]}…)"
        )
        if self.key_id:
            text += f", key {self.origin}+{self.key_id}"
        if self.unsigned:
            text += f"; {self.unsigned} records after it are not yet signed"
        return text


def read_checkpoint_notes(path: Path) -> tuple[list[str], bool]:
    """The notes in a checkpoints file, and whether its last line is torn."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], False
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the checkpoints file: {exc.strerror}") from exc
    lines = data.split(b"\n")
    torn = lines[-1] != b""
    notes: list[str] = []
    for number, raw in enumerate(lines[:-1], start=1):
        try:
            obj = json.loads(raw)
            note = obj["note"]
            if not isinstance(note, str) or list(obj) != ["note"]:
                raise TypeError
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditVerificationError(
                f'{path}: line {number} is not a checkpoint entry (expected {{"note": "..."}})'
            ) from exc
        notes.append(note)
    return notes, torn


def _origin_of(note: str) -> str:
    return note.split("\n", 1)[0]


def verify_log(
    path: Path | str,
    *,
    public_key: Ed25519PublicKey,
    origin: str | None = None,
    trusted: Checkpoint | None = None,
) -> VerifyReport:
    """Verify the audit log at ``path`` against ``public_key``.

    Returns a :class:`VerifyReport` or raises :class:`AuditVerificationError` naming the
    first bad record. ``origin`` pins the log's origin (default: the first checkpoint's);
    ``trusted`` is a checkpoint obtained earlier out of band (a witness): the log must still
    contain it, which detects a rollback of both files.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such audit log (expected a file of JSON lines)")

    # (1) Read the checkpoints file; every complete entry must verify under the key.
    notes, torn_checkpoint = read_checkpoint_notes(checkpoints_path(path))
    if origin is None and notes:
        origin = _origin_of(notes[0])
    checkpoints: list[Checkpoint] = []
    for index, note in enumerate(notes):
        assert origin is not None
        try:
            checkpoint = verify_checkpoint_note(note, origin=origin, key=public_key)
        except VerificationError as exc:
            raise AuditVerificationError(f"checkpoint {index}: {exc.message}") from exc
        # (2) Checkpoints only grow, in size and in time.
        if checkpoints:
            last = checkpoints[-1]
            if checkpoint.size < last.size or checkpoint.timestamp_ms < last.timestamp_ms:
                raise AuditVerificationError(
                    f"checkpoint {index} (size {checkpoint.size}) goes back from checkpoint "
                    f"{index - 1} (size {last.size}): checkpoints were reordered or replaced"
                )
        checkpoints.append(checkpoint)
    if trusted is not None:
        if origin is not None and trusted.origin != origin:
            raise AuditVerificationError(f"trusted checkpoint is for origin {trusted.origin!r}")
        checkpoints.append(trusted)
        checkpoints.sort(key=lambda c: c.size)
    expected_size = checkpoints[-1].size if checkpoints else 0

    # (3) Walk the records: sequence numbers, hash chain, Merkle leaves; at each checkpoint
    #     size, the Merkle root must equal the signed root.
    tree = CompactRange()
    prev = GENESIS_PREV.encode()
    pending = iter(checkpoints)
    next_checkpoint: Checkpoint | None = next(pending, None)
    next_checkpoint, checkpoint_index = _check_roots(tree, next_checkpoint, pending, 0, 0)
    count = 0
    torn: TornTail | None = None
    offset = 0
    for raw in _lines(path):
        if not raw.endswith(b"\n"):
            torn = TornTail(offset=offset, length=len(raw))
            break
        line = raw[:-1]
        head = HEAD_RE.match(line)
        if head is None:
            raise AuditVerificationError(
                f"record {count} (line {count + 1}) is not a well-formed record", record=count
            )
        if int(head[1]) != count:
            raise AuditVerificationError(
                f"record {count} (line {count + 1}) has sequence number {int(head[1])}, "
                f"expected {count}: a record was removed, inserted or reordered",
                record=count,
            )
        if head[2] != prev:
            bad = count - 1
            raise AuditVerificationError(
                f"record {bad} (line {bad + 1}) was modified: its hash does not match the "
                f"prev hash stored in record {count}",
                record=bad,
            )
        leaf = hashlib.sha256(b"\x00" + line).digest()
        prev = leaf.hex().encode()
        tree.append(leaf)
        count += 1
        offset += len(raw)
        if next_checkpoint is not None and next_checkpoint.size == count:
            start = checkpoints[checkpoint_index - 1].size if checkpoint_index else 0
            next_checkpoint, checkpoint_index = _check_roots(
                tree, next_checkpoint, pending, checkpoint_index, start
            )

    # (4) Every signed checkpoint must have been reached: else the log was truncated.
    if count < expected_size:
        where = f"a torn record at byte {torn.offset}" if torn else "the end of the file"
        raise AuditVerificationError(
            f"record {count}: the log is truncated: a signed checkpoint covers {expected_size} "
            f"records but the log holds only {count} before {where}",
            record=count,
        )

    # (5) Records after the last checkpoint are not signed yet: check each one fully.
    if count > expected_size:
        _check_unsigned_tail(path, expected_size)

    warnings: list[str] = []
    if torn is not None:
        warnings.append(
            f"the last line is torn ({torn.length} bytes at byte {torn.offset}): a writer died "
            "mid-append; that record was never acknowledged"
        )
    if torn_checkpoint:
        warnings.append("the checkpoints file ends in a torn line (ignored)")
    if not checkpoints and count:
        warnings.append("the log has no signed checkpoint yet")
    final = checkpoints[-1] if checkpoints else None
    return VerifyReport(
        records=count,
        checkpoints=len(notes),
        covered=expected_size,
        root=final.root if final else tree.root(),
        origin=origin,
        key_id=key_hash(origin, public_key).hex() if origin else None,
        last_checkpoint_ms=final.timestamp_ms if final else None,
        tree=tree,
        prev=prev.decode(),
        torn_tail=torn,
        torn_checkpoint=torn_checkpoint,
        warnings=tuple(warnings),
    )


def _check_roots(
    tree: CompactRange,
    checkpoint: Checkpoint | None,
    pending: Iterator[Checkpoint],
    index: int,
    start: int,
) -> tuple[Checkpoint | None, int]:
    """Check every checkpoint of the tree's current size; return the next one to reach."""
    while checkpoint is not None and checkpoint.size == tree.size:
        if tree.root() != checkpoint.root:
            last = tree.size - 1
            raise AuditVerificationError(
                f"record {last} (line {last + 1}) was modified, or records {start}..{last} were "
                f"rewritten with a recomputed hash chain: they do not match signed checkpoint "
                f"{index} (size {checkpoint.size})",
                record=last,
            )
        checkpoint = next(pending, None)
        index += 1
    return checkpoint, index


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        yield from handle


def _check_unsigned_tail(path: Path, start: int) -> None:
    for index, raw in enumerate(_lines(path)):
        if index < start or not raw.endswith(b"\n"):
            continue
        try:
            parse_record(raw[:-1])
        except ValueError as exc:
            raise AuditVerificationError(
                f"record {index} (line {index + 1}) is malformed: {exc}", record=index
            ) from exc
