"""The alert store: every alert the GPU monitor raised, for admins to see and acknowledge.

Each alert (:class:`~ztlab.hub.monitor.findings.Alert`) is kept as a :class:`StoredAlert`
with the responses the policy permitted for it, what became of each, and who
acknowledged it. A per-kind counter, kept in the same transaction as each alert, gives the
totals since the store was created (the exporter's ``ztlab_gpu_alerts_total``).

The store is one SQLite file, mode 0600 in a directory of mode 0700 (refused when group
or others can reach either), in WAL mode with ``synchronous=FULL``: an alert is on disk
when :meth:`AlertStore.add` returns, and closing and reopening keeps everything.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ztlab.common.errors import UsageError, ZtlabError
from ztlab.hub.monitor.findings import Alert
from ztlab.hub.private import DurableDatabase

__all__ = ["AlertStore", "AlertStoreError", "StoredAlert"]

_SCHEMA_VERSION: Final = 1

_DDL: Final = (
    """
    CREATE TABLE IF NOT EXISTS alerts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        severity TEXT NOT NULL,
        message TEXT NOT NULL,
        uuid TEXT NOT NULL,
        pid INTEGER,
        username TEXT,
        server TEXT,
        lease TEXT,
        t REAL NOT NULL,
        evidence TEXT NOT NULL,
        responses TEXT NOT NULL,
        outcomes TEXT NOT NULL,
        acknowledged_by TEXT,
        acknowledged_at REAL
    ) STRICT
    """,
    "CREATE INDEX IF NOT EXISTS alerts_by_t ON alerts (t)",
    "CREATE INDEX IF NOT EXISTS alerts_open ON alerts (id) WHERE acknowledged_at IS NULL",
    """
    CREATE TABLE IF NOT EXISTS kind_counts (
        kind TEXT PRIMARY KEY,
        total INTEGER NOT NULL
    ) STRICT
    """,
)

_COLUMNS: Final = (
    "id, kind, severity, message, uuid, pid, username, server, lease, t, evidence, "
    "responses, outcomes, acknowledged_by, acknowledged_at"
)


class AlertStoreError(ZtlabError):
    """The alert database cannot be opened, or is not one this ztlab understands."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredAlert:
    """One alert as kept: what was found, what was done, and who acknowledged it."""

    #: the store's number for it (acknowledge by it)
    id: int
    kind: str
    severity: str
    message: str
    #: the device (``GPU-…``/``MIG-…``)
    uuid: str
    pid: int | None
    #: whose process or GPU it is: the holder's user, else the lease holder; ``None``: no one's
    user: str | None
    #: that user's server name (``""``: the default server, ``cluster-ID``, ``run-ID``)
    server: str | None
    #: the id of the lease the device was under
    lease: str | None
    #: POSIX seconds of the reading that raised it
    t: float
    evidence: Mapping[str, Any] = field(default_factory=dict)
    #: the responses the policy permitted and the monitor set out to carry out, in order
    responses: tuple[str, ...] = ()
    #: response -> ``done`` or ``failed: <why>``, as each finished
    outcomes: Mapping[str, str] = field(default_factory=dict)
    acknowledged_by: str | None = None
    acknowledged_at: float | None = None

    @property
    def open(self) -> bool:
        """Whether no admin has acknowledged it yet."""
        return self.acknowledged_at is None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form (for the API and the CLI)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "severity": self.severity,
            "message": self.message,
            "uuid": self.uuid,
            "pid": self.pid,
            "user": self.user,
            "server": self.server,
            "lease": self.lease,
            "t": self.t,
            "evidence": dict(self.evidence),
            "responses": list(self.responses),
            "outcomes": dict(self.outcomes),
            "acknowledged_by": self.acknowledged_by,
            "acknowledged_at": self.acknowledged_at,
        }


def subject_of(alert: Alert) -> tuple[str | None, str | None]:
    """``(user, server)`` an alert is about: its holder's, else its lease's, else nobody's."""
    if alert.holder is not None:
        return alert.holder.user, alert.holder.server
    if alert.lease is not None:
        return alert.lease.user, alert.lease.server
    return None, None


def _from_row(row: Sequence[Any]) -> StoredAlert:
    return StoredAlert(
        id=int(row[0]),
        kind=row[1],
        severity=row[2],
        message=row[3],
        uuid=row[4],
        pid=row[5],
        user=row[6],
        server=row[7],
        lease=row[8],
        t=float(row[9]),
        evidence=json.loads(row[10]),
        responses=tuple(json.loads(row[11])),
        outcomes=json.loads(row[12]),
        acknowledged_by=row[13],
        acknowledged_at=row[14],
    )


class AlertStore(DurableDatabase):
    """The alert database (see the module docstring). Thread-safe; one per hub process."""

    def __init__(
        self, *, path: Path, clock: Callable[[], float] = time.time, busy_timeout: float = 30.0
    ) -> None:
        """Open (creating if needed) the alert database at ``path``; ``clock`` gives the
        moment of an acknowledgement (POSIX seconds)."""
        self._clock = clock
        super().__init__(
            path=path,
            what="alert database",
            directory="alert directory",
            error=AlertStoreError,
            version=_SCHEMA_VERSION,
            ddl=_DDL,
            busy_timeout=busy_timeout,
        )

    @classmethod
    def open(cls, path: Path, *, clock: Callable[[], float] = time.time) -> AlertStore:
        """The store at ``path`` (created 0600 in a 0700 directory when missing)."""
        return cls(path=path, clock=clock)

    # -- writes ---------------------------------------------------------------------------

    def add(self, alert: Alert, responses: Sequence[str]) -> StoredAlert:
        """Keep ``alert`` with the ``responses`` the monitor set out to carry out."""
        user, server = subject_of(alert)
        evidence = json.dumps(dict(alert.evidence), sort_keys=True, default=str)
        with self.transaction() as tx:
            cursor = tx.execute(
                f"INSERT INTO alerts ({_COLUMNS}) "  # noqa: S608 - fixed columns
                "VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '{}', NULL, NULL)",
                (
                    alert.kind,
                    alert.severity,
                    alert.message,
                    alert.uuid,
                    alert.pid,
                    user,
                    server,
                    alert.lease.lease if alert.lease is not None else None,
                    float(alert.t),
                    evidence,
                    json.dumps(list(responses)),
                ),
            )
            tx.execute(
                "INSERT INTO kind_counts (kind, total) VALUES (?, 1) "
                "ON CONFLICT (kind) DO UPDATE SET total = total + 1",
                (alert.kind,),
            )
            alert_id = cursor.lastrowid
        assert alert_id is not None
        return self.get(alert_id)

    def set_outcome(self, alert_id: int, response: str, outcome: str) -> StoredAlert:
        """Note what became of one response (``done``, ``failed: <why>``)."""
        with self.transaction() as tx:
            stored = self._get(tx, alert_id)
            outcomes = {**stored.outcomes, response: outcome}
            tx.execute(
                "UPDATE alerts SET outcomes = ? WHERE id = ?",
                (json.dumps(outcomes, sort_keys=True), alert_id),
            )
            return self._get(tx, alert_id)

    def acknowledge(self, alert_id: int, *, by: str) -> StoredAlert:
        """Mark an alert as seen by the admin ``by``; an acknowledged one stays as it was.

        Raises :class:`UsageError` when no alert has that id.
        """
        if not by:
            raise UsageError("acknowledging an alert needs the name of the admin doing it")
        with self.transaction() as tx:
            stored = self._get(tx, alert_id)
            if stored.acknowledged_at is not None:
                return stored
            tx.execute(
                "UPDATE alerts SET acknowledged_by = ?, acknowledged_at = ? WHERE id = ?",
                (by, float(self._clock()), alert_id),
            )
            return self._get(tx, alert_id)

    # -- reads ----------------------------------------------------------------------------

    def _get(self, conn: sqlite3.Connection, alert_id: int) -> StoredAlert:
        if isinstance(alert_id, bool) or not isinstance(alert_id, int):
            raise UsageError(f"alert id {alert_id!r} is not a number")
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM alerts WHERE id = ?",  # noqa: S608 - fixed columns
            (alert_id,),
        ).fetchone()
        if row is None:
            raise UsageError(
                f"no alert with id {alert_id}", hint="list the alerts to see their ids"
            )
        return _from_row(row)

    def get(self, alert_id: int) -> StoredAlert:
        """The alert ``alert_id``; :class:`UsageError` when there is none."""
        with self._lock:
            return self._get(self._conn, alert_id)

    def list(
        self,
        *,
        open_only: bool = False,
        since: float | None = None,
        user: str | None = None,
        limit: int = 100,
    ) -> builtins.list[StoredAlert]:
        """The newest alerts first: only unacknowledged ones (``open_only``), raised at or
        after ``since`` (POSIX seconds), about ``user``; at most ``limit`` of them."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise UsageError(f"limit must be a positive whole number, got {limit!r}")
        query = f"SELECT {_COLUMNS} FROM alerts WHERE 1 = 1"  # noqa: S608 - fixed columns
        args: list[Any] = []
        if open_only:
            query += " AND acknowledged_at IS NULL"
        if since is not None:
            query += " AND t >= ?"
            args.append(float(since))
        if user is not None:
            query += " AND username = ?"
            args.append(user)
        query += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._conn.execute(query, args).fetchall()
        return [_from_row(row) for row in rows]

    def counts(self) -> Mapping[str, int]:
        """Alert kind -> how many were added since the store was created."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT kind, total FROM kind_counts ORDER BY kind"
            ).fetchall()
        return {str(kind): int(total) for kind, total in rows}
