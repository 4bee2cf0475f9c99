"""Helpers shared by the audit-log tests: building logs and tampering with them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ztlab.common.auditlog.paths import public_key_path
from ztlab.common.auditlog.verify import VerifyReport, verify_log
from ztlab.common.keys import load_ed25519_public_key
from ztlab.hub.audit import AuditLog


def write_log(
    path: Path, events: Iterable[tuple[str, str, Mapping[str, Any]]], **options: Any
) -> None:
    """Write ``events`` to a new log at ``path`` and close it cleanly."""
    with AuditLog.open(path, **options) as log:
        futures = [log.submit(actor, action, detail) for actor, action, detail in events]
        for future in futures:
            future.result(timeout=30)


def verify(path: Path) -> VerifyReport:
    """Verify ``path`` against its exported public key."""
    return verify_log(path, public_key=load_ed25519_public_key(public_key_path(path)))


def record_lines(path: Path) -> list[bytes]:
    """The records file's lines, each with its newline."""
    return path.read_bytes().splitlines(keepends=True)
