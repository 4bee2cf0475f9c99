"""Requests to add a package to the allowlist, and the admins' decisions on them.

``ztlab packages request NAME[==VERSION] --reason TEXT`` files a request (the hub's API,
:mod:`ztlab.hub.api.packages`); an admin approves or denies it (``ztlab packages approve
ID`` / ``deny ID``). An approved request becomes a :class:`~ztlab.hub.packages.rules.Rule`
for the user who asked (or, when the admin says so, for a role). Both steps are audited by
the API. The requests live in ``<state_dir>/packages/requests.sqlite`` (0600); a decision
is committed before it is acknowledged.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ztlab.common.errors import UsageError
from ztlab.hub.packages.rules import Rule
from ztlab.hub.private import state_database
from ztlab.hub.timestamps import utc_iso

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  user TEXT NOT NULL,
  requirement TEXT NOT NULL,
  reason TEXT NOT NULL,
  requested_at REAL NOT NULL,
  status TEXT NOT NULL DEFAULT 'pending',
  decided_by TEXT,
  decided_at REAL,
  note TEXT,
  scope TEXT
);
"""


@dataclass(frozen=True, slots=True)
class PackageRequest:
    """One request. ``scope``: ``user:NAME`` or ``role:NAME`` once approved."""

    id: int
    user: str
    requirement: str
    reason: str
    requested_at: float
    status: str
    decided_by: str | None
    decided_at: float | None
    note: str | None
    scope: str | None

    def as_json(self) -> dict[str, object]:
        """The request as the API returns it."""
        return {
            "id": self.id,
            "user": self.user,
            "requirement": self.requirement,
            "reason": self.reason,
            "requested_at": utc_iso(self.requested_at),
            "status": self.status,
            "decided_by": self.decided_by,
            "decided_at": utc_iso(self.decided_at) if self.decided_at else None,
            "note": self.note,
            "scope": self.scope,
        }


class RequestNotFound(UsageError):
    """No request has that id."""


class PackageRequests:
    """The request store (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self._db = state_database(path, _SCHEMA)
        self._lock = threading.Lock()

    def file(self, *, user: str, requirement: str, reason: str) -> PackageRequest:
        """Store a new pending request."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO requests (user, requirement, reason, requested_at) VALUES (?,?,?,?)",
                (user, requirement, reason, time.time()),
            )
            assert cursor.lastrowid is not None
            return self._get(cursor.lastrowid)

    def decide(
        self, request_id: int, *, approve: bool, by: str, note: str = "", role: str | None = None
    ) -> PackageRequest:
        """Approve (for the requester, or for ``role``) or deny a pending request."""
        with self._lock:
            current = self._get(request_id)
            if current.status != "pending":
                raise UsageError(
                    f"request {request_id} was already {current.status} by {current.decided_by}",
                    hint="file a new request to change the decision",
                )
            scope = (f"role:{role}" if role else f"user:{current.user}") if approve else None
            self._db.execute(
                "UPDATE requests SET status=?, decided_by=?, decided_at=?, note=?, scope=? "
                "WHERE id=?",
                ("approved" if approve else "denied", by, time.time(), note, scope, request_id),
            )
            return self._get(request_id)

    def get(self, request_id: int) -> PackageRequest:
        """One request, or :class:`RequestNotFound`."""
        with self._lock:
            return self._get(request_id)

    def _get(self, request_id: int) -> PackageRequest:
        row = self._db.execute("SELECT * FROM requests WHERE id=?", (request_id,)).fetchone()
        if row is None:
            raise RequestNotFound(f"there is no package request {request_id}")
        return PackageRequest(*row)

    def all(self, *, user: str | None = None, status: str | None = None) -> list[PackageRequest]:
        """Requests, newest first, of ``user`` and in ``status`` when given."""
        query = "SELECT * FROM requests WHERE 1=1"
        args: list[object] = []
        if user is not None:
            query += " AND user=?"
            args.append(user)
        if status is not None:
            query += " AND status=?"
            args.append(status)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id DESC", args).fetchall()
        return [PackageRequest(*row) for row in rows]

    def approved_rules(self, user: str, roles: frozenset[str]) -> list[Rule]:
        """The approved requests that apply to ``user`` (theirs, or for one of ``roles``)."""
        scopes = [f"user:{user}", *(f"role:{role}" for role in sorted(roles))]
        marks = ",".join("?" for _ in scopes)
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, requirement FROM requests WHERE status='approved' "  # noqa: S608
                f"AND scope IN ({marks})",
                scopes,
            ).fetchall()
        return [Rule(requirement, f"request {rid}") for rid, requirement in rows]

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
