"""Which clusters run, whose they are, and the per-user pool quotas checked atomically.

One SQLite database (``<state_dir>/compute/clusters.sqlite``, 0600). :meth:`ClusterStore.reserve`
checks a pool's per-user limits and records the new cluster in one ``BEGIN IMMEDIATE``
transaction, so concurrent requests (several hub threads, or two hubs sharing the state
directory) never take a user past a limit. The GPUs themselves are leased by the lease
backend, whose own transaction keeps the roles' ``max_gpus``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ztlab.common.config import GpuPool
from ztlab.common.errors import UsageError, ZtlabError
from ztlab.hub.private import state_database
from ztlab.hub.timestamps import clock_text, utc_iso

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clusters (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    pool TEXT NOT NULL,
    workers INTEGER NOT NULL,
    gpus INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    shared_with TEXT NOT NULL DEFAULT '[]',
    state TEXT NOT NULL,
    lease TEXT,
    gpu_ids TEXT NOT NULL DEFAULT '[]',
    host TEXT NOT NULL DEFAULT '',
    port INTEGER NOT NULL DEFAULT 0,
    dashboard_port INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    certificates_expire_at REAL NOT NULL DEFAULT 0,
    stopped_at REAL,
    stop_reason TEXT
);
CREATE INDEX IF NOT EXISTS clusters_owner ON clusters (owner, state);
"""

#: states a cluster holds its quota in
ACTIVE = ("starting", "running")


class ClusterError(ZtlabError):
    """A cluster request the control plane refuses; ``message`` is for the user."""

    status = 400


class ClusterDenied(ClusterError):
    """The policy or the pool's roles do not let this user run a cluster in the pool."""

    status = 403


class ClusterQuotaExceeded(ClusterError):
    """The cluster would take the user past a limit of the pool (the message names it)."""

    status = 409


class ClusterNotFound(UsageError):
    """No cluster has this id (or the caller may not see it)."""

    status = 404


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterRecord:
    """One cluster as the control plane keeps it."""

    id: str
    owner: str
    pool: str
    workers: int
    gpus: int
    slot: int
    shared_with: tuple[str, ...]
    state: str
    lease: str | None
    gpu_ids: tuple[str, ...]
    host: str
    port: int
    dashboard_port: int
    created_at: float
    expires_at: float
    certificates_expire_at: float
    stopped_at: float | None
    stop_reason: str | None

    @property
    def active(self) -> bool:
        """Whether it holds its quota (starting or running)."""
        return self.state in ACTIVE

    @property
    def address(self) -> str:
        """The scheduler's address, for a client in the owner's network namespace."""
        return f"tls://{self.host}:{self.port}" if self.port else ""

    def as_json(self) -> dict[str, Any]:
        """What the API answers about it."""
        return {
            "id": self.id,
            "owner": self.owner,
            "pool": self.pool,
            "workers": self.workers,
            "gpus": list(self.gpu_ids),
            "lease": self.lease,
            "shared_with": list(self.shared_with),
            "state": self.state,
            "scheduler": self.address,
            "created_at": utc_iso(self.created_at),
            "expires_at": utc_iso(self.expires_at),
            "stopped_at": utc_iso(self.stopped_at) if self.stopped_at else None,
            "stop_reason": self.stop_reason,
        }


class ClusterStore:
    """The clusters table."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = state_database(path, _SCHEMA)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def reserve(
        self,
        *,
        cluster_id: str,
        owner: str,
        pool: str,
        limits: GpuPool,
        workers: int,
        gpus: int,
        shared_with: tuple[str, ...],
        lifetime_hours: float,
        now: float | None = None,
    ) -> ClusterRecord:
        """Record a new cluster as ``starting`` if it fits the pool's per-user limits.

        :class:`ClusterQuotaExceeded` names the limit, what the owner holds and when the
        first of it frees.
        """
        now = time.time() if now is None else now
        with self._immediate() as db:
            held = [
                _record(row)
                for row in db.execute(
                    "SELECT * FROM clusters WHERE owner = ? AND state IN (?, ?)",
                    (owner, *ACTIVE),
                )
            ]
            in_pool = [c for c in held if c.pool == pool]
            _check_limits(pool, limits, in_pool, workers=workers, gpus=gpus)
            used = {c.slot for c in held}
            slot = next(n for n in range(len(used) + 1) if n not in used)
            record = ClusterRecord(
                id=cluster_id,
                owner=owner,
                pool=pool,
                workers=workers,
                gpus=gpus,
                slot=slot,
                shared_with=shared_with,
                state="starting",
                lease=None,
                gpu_ids=(),
                host="",
                port=0,
                dashboard_port=0,
                created_at=now,
                expires_at=now + lifetime_hours * 3600.0,
                certificates_expire_at=0.0,
                stopped_at=None,
                stop_reason=None,
            )
            db.execute(
                "INSERT INTO clusters (id, owner, pool, workers, gpus, slot, shared_with, state,"
                " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    owner,
                    pool,
                    workers,
                    gpus,
                    slot,
                    json.dumps(list(shared_with)),
                    "starting",
                    now,
                    record.expires_at,
                ),
            )
        return record

    def update(self, record: ClusterRecord, **changes: Any) -> ClusterRecord:
        """Write ``changes`` to ``record``'s row; the changed record."""
        new = replace(record, **changes)
        with self._immediate() as db:
            db.execute(
                "UPDATE clusters SET state = ?, lease = ?, gpu_ids = ?, host = ?, port = ?,"
                " dashboard_port = ?, expires_at = ?, certificates_expire_at = ?,"
                " stopped_at = ?, stop_reason = ? WHERE id = ?",
                (
                    new.state,
                    new.lease,
                    json.dumps(list(new.gpu_ids)),
                    new.host,
                    new.port,
                    new.dashboard_port,
                    new.expires_at,
                    new.certificates_expire_at,
                    new.stopped_at,
                    new.stop_reason,
                    new.id,
                ),
            )
        return new

    def get(self, cluster_id: str) -> ClusterRecord | None:
        """One cluster, stopped or not."""
        with self._lock:
            row = self._db.execute("SELECT * FROM clusters WHERE id = ?", (cluster_id,)).fetchone()
        return _record(row) if row is not None else None

    def active(self, *, owner: str | None = None, pool: str | None = None) -> list[ClusterRecord]:
        """The clusters starting or running (of ``owner``, in ``pool``), oldest first."""
        query = "SELECT * FROM clusters WHERE state IN (?, ?)"
        args: list[Any] = list(ACTIVE)
        if owner is not None:
            query += " AND owner = ?"
            args.append(owner)
        if pool is not None:
            query += " AND pool = ?"
            args.append(pool)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_at", args).fetchall()
        return [_record(row) for row in rows]

    def recent(self, *, owner: str | None = None, limit: int = 50) -> list[ClusterRecord]:
        """The latest clusters, stopped ones included, newest first."""
        query = "SELECT * FROM clusters"
        args: list[Any] = []
        if owner is not None:
            query += " WHERE owner = ?"
            args.append(owner)
        with self._lock:
            rows = self._db.execute(
                query + " ORDER BY created_at DESC LIMIT ?", [*args, limit]
            ).fetchall()
        return [_record(row) for row in rows]


def _n(count: int, word: str) -> str:
    """``1 worker``, ``2 workers``."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def _check_limits(
    pool: str, limits: GpuPool, held: list[ClusterRecord], *, workers: int, gpus: int
) -> None:
    def holding() -> str:
        if not held:
            return "you hold none"
        listed = ", ".join(
            f"{c.id} ({_n(c.workers, 'worker')}, {_n(c.gpus, 'GPU')}, "
            f"stops by {clock_text(c.expires_at, time.time())})"
            for c in held
        )
        return f"you hold {listed}; stop one with `ztlab pools stop ID`, or wait until it stops"

    if limits.max_clusters == 0:
        raise ClusterQuotaExceeded(f"Pool {pool} runs no clusters (its max_clusters is 0).")
    if len(held) + 1 > limits.max_clusters:
        raise ClusterQuotaExceeded(
            f"Pool {pool} allows {_n(limits.max_clusters, 'cluster')} per user (max_clusters); "
            f"{holding()}."
        )
    busy_workers = sum(c.workers for c in held)
    if busy_workers + workers > limits.max_workers:
        raise ClusterQuotaExceeded(
            f"Pool {pool} allows {_n(limits.max_workers, 'worker')} per user (max_workers); you "
            f"asked for {workers} and {holding() if held else 'hold none'}."
        )
    busy_gpus = sum(c.gpus for c in held)
    if busy_gpus + gpus > limits.max_cluster_gpus:
        raise ClusterQuotaExceeded(
            f"Pool {pool} allows {_n(limits.max_cluster_gpus, 'GPU')} per user for clusters "
            f"(max_cluster_gpus); you asked for {gpus} and "
            f"{holding() if held else 'hold none'}."
        )


def _record(row: sqlite3.Row) -> ClusterRecord:
    return ClusterRecord(
        id=row["id"],
        owner=row["owner"],
        pool=row["pool"],
        workers=row["workers"],
        gpus=row["gpus"],
        slot=row["slot"],
        shared_with=tuple(json.loads(row["shared_with"])),
        state=row["state"],
        lease=row["lease"],
        gpu_ids=tuple(json.loads(row["gpu_ids"])),
        host=row["host"],
        port=row["port"],
        dashboard_port=row["dashboard_port"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        certificates_expire_at=row["certificates_expire_at"],
        stopped_at=row["stopped_at"],
        stop_reason=row["stop_reason"],
    )
