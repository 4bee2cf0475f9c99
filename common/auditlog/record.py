"""Audit records: one JSON object per line, in a fixed key order.

A record line is exactly::

    {"seq":N,"prev":"<64 hex>","ts":"<RFC 3339 UTC>","actor":"...","action":"...","detail":{...}}

followed by ``\\n``. ``seq`` counts from 0; ``prev`` is the hex leaf hash of the previous
line (64 zeros for record 0), which makes the records a hash chain as well as the leaves of
an RFC 6962 Merkle tree (leaf hash = SHA-256(0x00 || line without its newline)). ``detail``
is canonical JSON (sorted keys, no spaces, ASCII only), so no record contains a raw newline.
The fixed prefix lets a verifier check ``seq`` and ``prev`` without parsing the whole line.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ztlab.common.errors import UsageError

#: ``prev`` of record 0
GENESIS_PREV = "0" * 64
#: largest record line we write or accept, in bytes
MAX_RECORD_BYTES = 64 * 1024

_ACTION_RE = re.compile(r"[a-z][a-z0-9_]*(?:[.-][a-z0-9_]+)*\Z")
HEAD_RE = re.compile(rb'\{"seq":(0|[1-9][0-9]*),"prev":"([0-9a-f]{64})","ts":"')


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One parsed audit record."""

    seq: int
    prev: str
    ts: str
    actor: str
    action: str
    detail: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The record as a plain JSON-able dict (key order as on disk)."""
        return {
            "seq": self.seq,
            "prev": self.prev,
            "ts": self.ts,
            "actor": self.actor,
            "action": self.action,
            "detail": dict(self.detail),
        }


def record_leaf_hash(line: bytes) -> bytes:
    """RFC 6962 leaf hash of one record line (``line`` without its trailing newline)."""
    return hashlib.sha256(b"\x00" + line).digest()


def canonical_json(value: Any) -> str:
    """Canonical JSON: sorted keys, no insignificant whitespace, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def utc_timestamp(now: datetime | None = None) -> str:
    """An RFC 3339 UTC timestamp with microseconds, e.g. ``2026-11-26T15:30:00.123456Z``."""
    moment = now if now is not None else datetime.now(UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_event(actor: str, action: str, detail: Mapping[str, Any] | None) -> str:
    """Validate one event before it is queued; return its encoded body (see :func:`event_body`).

    Raises :class:`UsageError` naming the field and what was expected.
    """
    if not isinstance(actor, str) or not actor or len(actor) > 256:
        raise UsageError(
            f"audit actor must be a non-empty string of at most 256 characters, got {actor!r}"
        )
    if not isinstance(action, str) or not _ACTION_RE.match(action) or len(action) > 128:
        raise UsageError(
            "audit action must be a dotted lower-case name such as 'policy.decision', "
            f"got {action!r}"
        )
    if detail is None:
        detail = {}
    if not isinstance(detail, Mapping):
        raise UsageError(f"audit detail must be a JSON object, got {type(detail).__name__}")
    try:
        text = canonical_json(detail)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"audit detail is not JSON-serialisable: {exc}") from exc
    if len(text) > MAX_RECORD_BYTES - 512:
        raise UsageError(
            f"audit detail is {len(text)} bytes; expected at most {MAX_RECORD_BYTES - 512}"
        )
    return event_body(actor, action, text)


def event_body(actor: str, action: str, detail_json: str) -> str:
    """The part of a record line after its ``ts``: actor, action and detail, then ``}``."""
    return f'"actor":{json.dumps(actor)},"action":{json.dumps(action)},"detail":{detail_json}}}'


def format_line(*, seq: int, prev: str, ts: str, body: str) -> bytes:
    """Serialise one record line from an encoded :func:`event_body`, without newline."""
    return f'{{"seq":{seq},"prev":"{prev}","ts":"{ts}",{body}'.encode("ascii")


def format_record(
    *, seq: int, prev: str, ts: str, actor: str, action: str, detail_json: str
) -> bytes:
    """Serialise one record line, without its trailing newline."""
    return format_line(seq=seq, prev=prev, ts=ts, body=event_body(actor, action, detail_json))


def parse_record(line: bytes) -> AuditRecord:
    """Parse and fully check one record line (without newline). Raises ``ValueError``."""
    if len(line) > MAX_RECORD_BYTES:
        raise ValueError(f"record is {len(line)} bytes, more than {MAX_RECORD_BYTES}")
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from exc
    if not isinstance(obj, dict) or list(obj) != ["seq", "prev", "ts", "actor", "action", "detail"]:
        raise ValueError("expected a JSON object with keys seq, prev, ts, actor, action, detail")
    seq, prev, ts = obj["seq"], obj["prev"], obj["ts"]
    actor, action, detail = obj["actor"], obj["action"], obj["detail"]
    if not (isinstance(seq, int) and isinstance(prev, str) and isinstance(ts, str)):
        raise ValueError("seq must be an integer, prev and ts strings")
    if not (isinstance(actor, str) and isinstance(action, str) and isinstance(detail, dict)):
        raise ValueError("actor and action must be strings, detail an object")
    again = format_record(
        seq=seq, prev=prev, ts=ts, actor=actor, action=action, detail_json=canonical_json(detail)
    )
    if again != line:
        raise ValueError("record is not in canonical form")
    return AuditRecord(seq=seq, prev=prev, ts=ts, actor=actor, action=action, detail=detail)
