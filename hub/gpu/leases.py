"""GPU leases: who holds which GPUs, until when, within which quota.

A :class:`LeaseBroker` hands GPUs of a pool to a user's server for a bounded time. A
grant goes through fixed steps, in order, and the code follows them:

(0) ``count == 0`` asks for nothing: no lease, no error (``None``);
(1) the policy decision ``lease_gpu`` on ``pool:NAME`` (deny: :class:`LeaseDenied` with
    the decision's reason), then the pool's own ``roles`` from the configuration;
(2) the quota: the largest ``max_gpus`` among the user's roles, counting the GPUs of
    every lease the user holds (:class:`QuotaExceeded`);
(3) the lifetime: ``min(hours or cap, cap)`` where ``cap`` is the largest
    ``max_server_hours`` among the user's roles;
(4) free GPUs of the pool, chosen in configuration order inside one SQLite
    ``BEGIN IMMEDIATE`` transaction, so that no two brokers (threads, hub processes, a
    hub before and after a restart) ever hand out the same GPU at once
    (:class:`PoolExhausted`);
(5) the lease is written and audited (``gpu.lease.granted``), then committed.

Steps (2) to (5) run in the one transaction. A lease ends when it is released
(:meth:`LeaseBroker.release`, :meth:`LeaseBroker.release_server`) or when
:meth:`LeaseBroker.expire`, called periodically by the hub, finds it past its
``expires_at``; until then its GPUs stay held, even past expiry, because the server
using them may still be running.

The leases live in one SQLite file (:class:`LeaseStore`), mode 0600 in a directory of
mode 0700, in WAL mode with ``synchronous=FULL``: every change is committed, durably,
before the call returns, so a hub restart neither loses nor doubles a lease. A table of
held GPUs whose primary key is the GPU id makes "one GPU, one lease" a property of the
database, not only of this code.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from ztlab.common.auditlog.sink import AuditSink
from ztlab.common.config import ZtlabConfig
from ztlab.common.config.model import RoleConfig
from ztlab.common.errors import UsageError
from ztlab.hub.gpu.backend import (
    Lease,
    LeaseBackend,
    LeaseDenied,
    LeaseError,
    LeaseNotFound,
    LeaseStoreError,
    PoolExhausted,
    QuotaExceeded,
)
from ztlab.hub.gpu.inventory import Inventory, UnknownPoolError
from ztlab.hub.policy import PolicyEngine, Principal
from ztlab.hub.private import private_directory, private_file
from ztlab.hub.timestamps import clock_text, utc_iso

__all__ = [
    "AUDIT_EXPIRED",
    "AUDIT_GRANTED",
    "AUDIT_RELEASED",
    "Lease",
    "LeaseBroker",
    "LeaseDenied",
    "LeaseError",
    "LeaseNotFound",
    "LeaseStore",
    "LeaseStoreError",
    "PoolExhausted",
    "QuotaExceeded",
]

#: audit actions
AUDIT_GRANTED: Final = "gpu.lease.granted"
AUDIT_RELEASED: Final = "gpu.lease.released"
AUDIT_EXPIRED: Final = "gpu.lease.expired"

#: the audit actor of what the control plane does on its own (expiry)
SYSTEM_ACTOR: Final = "ztlab-hub"

_SCHEMA_VERSION: Final = 1


def _gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


# --------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------

_DDL: Final = (
    """
    CREATE TABLE IF NOT EXISTS leases (
        id TEXT PRIMARY KEY,
        username TEXT NOT NULL,
        server TEXT NOT NULL,
        pool TEXT NOT NULL,
        gpus TEXT NOT NULL,
        minors TEXT NOT NULL,
        granted_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        released_at REAL,
        release_reason TEXT
    ) STRICT
    """,
    """
    CREATE TABLE IF NOT EXISTS held (
        gpu TEXT PRIMARY KEY,
        lease_id TEXT NOT NULL REFERENCES leases (id)
    ) STRICT
    """,
    "CREATE INDEX IF NOT EXISTS leases_by_expiry ON leases (expires_at) WHERE released_at IS NULL",
    "CREATE UNIQUE INDEX IF NOT EXISTS one_lease_per_server ON leases (username, server) "
    "WHERE released_at IS NULL",
)

_COLUMNS: Final = "id, username, server, pool, gpus, minors, granted_at, expires_at, released_at"


def _lease_from_row(row: Sequence[Any]) -> Lease:
    return Lease(
        id=row[0],
        user=row[1],
        server=row[2],
        pool=row[3],
        gpus=tuple(json.loads(row[4])),
        minors=tuple(json.loads(row[5])),
        granted_at=row[6],
        expires_at=row[7],
        released_at=row[8],
    )


class LeaseStore:
    """The lease database: one SQLite file shared by every broker that opens it.

    Opening creates the directory (0700) and the file (0600) when missing and refuses
    ones that group or others can access. Safe to share between threads; several
    processes may open the same file (SQLite locks it; a writer waits up to
    ``busy_timeout`` seconds). Reads see committed data only.
    """

    def __init__(self, *, path: Path, busy_timeout: float = 30.0) -> None:
        """Open (creating if needed) the lease database at ``path``."""
        self._path = Path(path)
        private_directory(self._path.parent, what="GPU lease directory", error=LeaseStoreError)
        private_file(self._path, what="GPU lease database", error=LeaseStoreError)
        try:
            conn = sqlite3.connect(
                self._path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise LeaseStoreError(
                f"{self._path}: cannot open the GPU lease database: {exc}"
            ) from exc
        self._conn = conn
        self._lock = threading.RLock()
        try:
            self._setup()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise LeaseStoreError(f"{self._path}: not a usable GPU lease database: {exc}") from exc
        except LeaseStoreError:
            conn.close()
            raise

    def _setup(self) -> None:
        conn = self._conn
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise LeaseStoreError(f"{self._path}: cannot switch the database to WAL mode")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        with self.transaction() as tx:
            version = tx.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise LeaseStoreError(
                    f"{self._path}: GPU lease database has schema version {version}; this "
                    f"ztlab understands version {_SCHEMA_VERSION}"
                )
            for statement in _DDL:
                tx.execute(statement)
            tx.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    def close(self) -> None:
        """Close the database connection (committed data is on disk already)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> LeaseStore:
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

    # -- reads (usable inside and outside a transaction) ------------------------------

    def get(self, lease_id: str) -> Lease | None:
        """The lease ``lease_id`` (active or not), or ``None``."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM leases WHERE id = ?",  # noqa: S608 - fixed columns
                (lease_id,),
            ).fetchone()
        return None if row is None else _lease_from_row(row)

    def active(
        self, *, user: str | None = None, pool: str | None = None, server: str | None = None
    ) -> list[Lease]:
        """Leases not yet released, in the order granted, filtered by what is given."""
        query = f"SELECT {_COLUMNS} FROM leases WHERE released_at IS NULL"  # noqa: S608
        args: list[str] = []
        for column, value in (("username", user), ("pool", pool), ("server", server)):
            if value is not None:
                query += f" AND {column} = ?"
                args.append(value)
        query += " ORDER BY granted_at, rowid"
        with self._lock:
            rows = self._conn.execute(query, args).fetchall()
        return [_lease_from_row(row) for row in rows]

    def held(self) -> dict[str, str]:
        """GPU id -> id of the lease holding it, for every held GPU."""
        with self._lock:
            rows = self._conn.execute("SELECT gpu, lease_id FROM held").fetchall()
        return {str(gpu): str(lease_id) for gpu, lease_id in rows}

    # -- writes (inside a transaction) ----------------------------------------------

    def _insert(self, conn: sqlite3.Connection, lease: Lease) -> None:
        conn.execute(
            f"INSERT INTO leases ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",  # noqa: S608
            (
                lease.id,
                lease.user,
                lease.server,
                lease.pool,
                json.dumps(list(lease.gpus)),
                json.dumps(list(lease.minors)),
                lease.granted_at,
                lease.expires_at,
            ),
        )
        conn.executemany(
            "INSERT INTO held (gpu, lease_id) VALUES (?, ?)", [(g, lease.id) for g in lease.gpus]
        )

    def _mark_released(
        self, conn: sqlite3.Connection, lease: Lease, *, at: float, reason: str
    ) -> Lease:
        conn.execute(
            "UPDATE leases SET released_at = ?, release_reason = ? "
            "WHERE id = ? AND released_at IS NULL",
            (at, reason, lease.id),
        )
        conn.execute("DELETE FROM held WHERE lease_id = ?", (lease.id,))
        return replace(lease, released_at=at)


# --------------------------------------------------------------------------------------
# The broker
# --------------------------------------------------------------------------------------


class LeaseBroker(LeaseBackend):
    """Grants, releases and expires GPU leases (see the module docstring for the steps).

    The ``local`` lease backend. One broker per hub process; several brokers (processes)
    may share one store file. Thread-safe. ``roles`` are the configured roles with their
    quotas; roles a user holds that are not configured count for nothing. ``clock`` returns
    POSIX seconds.
    """

    @classmethod
    def open(
        cls,
        *,
        config: ZtlabConfig,
        inventory: Inventory,
        policy: PolicyEngine,
        audit: AuditSink,
    ) -> LeaseBroker:
        """The broker of a configuration: leases in ``<state_dir>/gpu/leases.sqlite3``."""
        return cls(
            store_path=config.state_dir / "gpu" / "leases.sqlite3",
            inventory=inventory,
            roles=config.roles,
            policy=policy,
            audit=audit,
        )

    def __init__(
        self,
        *,
        store_path: Path,
        inventory: Inventory,
        roles: Mapping[str, RoleConfig],
        policy: PolicyEngine,
        audit: AuditSink | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open (or create) the lease store at ``store_path``."""
        self._store = LeaseStore(path=store_path)
        self._inventory = inventory
        self._roles = dict(roles)
        self._policy = policy
        self._audit = audit
        self._clock = clock

    @property
    def store(self) -> LeaseStore:
        """The lease database."""
        return self._store

    @property
    def inventory(self) -> Inventory:
        """The GPU inventory leases are made from."""
        return self._inventory

    def close(self) -> None:
        """Close the store."""
        self._store.close()

    def __enter__(self) -> LeaseBroker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- grant ----------------------------------------------------------------------

    def grant(
        self,
        *,
        user: str,
        roles: Set[str],
        server: str,
        pool: str,
        count: int,
        hours: float | None = None,
    ) -> Lease | None:
        """Lease ``count`` GPUs of ``pool`` to ``user``'s ``server`` (steps (0)-(5)).

        Returns the lease, or ``None`` when ``count`` is 0. A server holds at most one
        lease: asking again for the same pool and count returns the lease it holds
        (as after a hub restart); asking for another is :class:`LeaseDenied`.

        Raises :class:`LeaseDenied`, :class:`QuotaExceeded` or :class:`PoolExhausted`
        with a message for the user, :class:`~ztlab.hub.gpu.inventory.InventoryError`
        when a chosen GPU's device node is unknown, and :class:`UsageError` for a bad
        ``count`` or ``hours``.
        """
        # (0) nothing asked, nothing leased
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise UsageError(f"count must be a whole number of GPUs >= 0, got {count!r}")
        if hours is not None and (
            isinstance(hours, bool) or not isinstance(hours, int | float) or not hours > 0
        ):
            raise UsageError(f"hours must be a number > 0 (or None), got {hours!r}")
        if count == 0:
            return None
        roles = frozenset(roles)
        try:
            pool_gpus = self._inventory.pool(pool)
        except UnknownPoolError as exc:
            raise LeaseDenied(exc.message) from exc

        # (1) the policy decision, then the pool's roles
        decision = self._policy.authorize(
            Principal(name=user, roles=roles), "lease_gpu", f"pool:{pool}", {"gpus": count}
        )
        if not decision.allowed:
            raise LeaseDenied(f"GPU lease on pool {pool} denied: {decision.reason}")
        pool_roles = self._inventory.pool_roles(pool)
        if not roles & pool_roles:
            opened = ", ".join(sorted(pool_roles)) or "no role (the pool is closed)"
            raise LeaseDenied(
                f"GPU lease on pool {pool} denied: the pool is open to {opened}, and you "
                f"hold {', '.join(sorted(roles)) or 'no role'}"
            )

        with self._store.transaction() as tx:
            now = self._clock()
            existing = self._store.active(user=user, server=server)
            if existing:
                return self._same_server(existing[0], pool=pool, count=count, now=now)

            # (2) quota over every lease the user holds
            self._check_quota(user=user, roles=roles, pool=pool, count=count, now=now)

            # (3) lifetime
            cap = max(
                (self._roles[r].max_server_hours for r in roles if r in self._roles),
                default=0.0,
            )
            lifetime = cap if hours is None else min(hours, cap)

            # (4) free GPUs, in configuration order; the transaction keeps them free
            held = self._store.held()
            free = [gpu for gpu in pool_gpus if gpu.id not in held]
            if len(free) < count:
                raise self._exhausted(pool=pool, count=count, now=now)
            chosen = free[:count]
            minors = tuple(self._inventory.minor(gpu.id) for gpu in chosen)

            # (5) record and audit, then commit (an audit failure rolls the lease back)
            lease = Lease(
                id=secrets.token_hex(8),
                user=user,
                server=server,
                pool=pool,
                gpus=tuple(gpu.id for gpu in chosen),
                minors=minors,
                granted_at=now,
                expires_at=now + lifetime * 3600.0,
            )
            self._store._insert(tx, lease)
            self._record(
                user,
                AUDIT_GRANTED,
                lease,
                roles=sorted(roles),
                hours=lifetime,
                policy_id=decision.policy_id,
            )
        return lease

    def _same_server(self, lease: Lease, *, pool: str, count: int, now: float) -> Lease:
        if lease.pool == pool and len(lease.gpus) == count and not lease.expired(now):
            return lease
        state = (
            f"expired at {clock_text(lease.expires_at, now)} and is being released"
            if lease.expired(now)
            else f"holds {_gpus(len(lease.gpus))} of pool {lease.pool} until "
            f"{clock_text(lease.expires_at, now)}"
        )
        raise LeaseDenied(
            f"server {lease.server!r} already has GPU lease {lease.id}, which {state}; "
            "a server holds one lease at a time",
            hint="stop the server to release its GPUs, then start it again",
        )

    def _check_quota(
        self, *, user: str, roles: frozenset[str], pool: str, count: int, now: float
    ) -> None:
        known = sorted(r for r in roles if r in self._roles)
        if known:
            role = max(known, key=lambda r: self._roles[r].max_gpus)
            limit = self._roles[role].max_gpus
        else:
            role, limit = ", ".join(sorted(roles)) or "none", 0
        mine = self._store.active(user=user)
        held = sum(len(lease.gpus) for lease in mine)
        if held + count <= limit:
            return
        if limit == 0:
            head = f"role {role} may hold no GPU"
        else:
            head = f"role {role} may hold at most {_gpus(limit)} and you"
            listed = ", ".join(f"lease {lease.id} on pool {lease.pool}" for lease in mine)
            if held == 0:
                head += f" asked for {count}"
            elif held >= limit:
                head += f" hold {held} ({listed})"
            else:
                head += f" hold {held} ({listed}); you may ask for {limit - held} more, not {count}"
        raise QuotaExceeded(
            f"{head}; {self._pool_status(pool, now)}",
            hint="stop a server that holds GPUs, or ask for fewer",
        )

    def _exhausted(self, *, pool: str, count: int, now: float) -> PoolExhausted:
        total = len(self._inventory.pool(pool))
        if count > total:
            return PoolExhausted(
                f"pool {pool} has {_gpus(total)} in all and you asked for {count}",
                hint="ask for fewer GPUs",
            )
        return PoolExhausted(
            f"pool {pool} cannot lease {_gpus(count)} now; {self._pool_status(pool, now)}",
            hint="try again when a lease there ends, or ask for fewer GPUs",
        )

    def _pool_status(self, pool: str, now: float) -> str:
        """``free in pool research: 0 of 2 GPUs; next lease there expires at 14:05 UTC``."""
        gpus = self._inventory.pool(pool)
        held = self._store.held()
        free = sum(1 for gpu in gpus if gpu.id not in held)
        text = f"free in pool {pool}: {free} of {_gpus(len(gpus))}"
        leases = self._store.active(pool=pool)
        if leases:
            soonest = min(lease.expires_at for lease in leases)
            if soonest <= now:
                when = clock_text(soonest, now)
                text += f"; a lease there expired at {when} and will be released soon"
            else:
                text += f"; next lease there expires at {clock_text(soonest, now)}"
        return text

    # -- release and expiry ---------------------------------------------------------

    def release(self, lease_id: str, *, reason: str, actor: str | None = None) -> None:
        """Release lease ``lease_id`` and free its GPUs; releasing it again does nothing.

        ``actor`` (default: the lease's user) is recorded in the audit log with
        ``reason``. Raises :class:`LeaseNotFound` for an id no lease ever had.
        """
        with self._store.transaction() as tx:
            lease = self._store.get(lease_id)
            if lease is None:
                raise LeaseNotFound(f"there is no GPU lease {lease_id!r}")
            if not lease.active:
                return
            done = self._store._mark_released(tx, lease, at=self._clock(), reason=reason)
            self._record(actor or lease.user, AUDIT_RELEASED, done, reason=reason)

    def release_server(self, *, user: str, server: str, reason: str) -> list[Lease]:
        """Release every lease of ``user``'s ``server``; the leases released (maybe none)."""
        released: list[Lease] = []
        with self._store.transaction() as tx:
            now = self._clock()
            for lease in self._store.active(user=user, server=server):
                done = self._store._mark_released(tx, lease, at=now, reason=reason)
                self._record(user, AUDIT_RELEASED, done, reason=reason)
                released.append(done)
        return released

    def expire(self) -> list[Lease]:
        """Release every lease at or past its ``expires_at``; the leases expired."""
        expired: list[Lease] = []
        with self._store.transaction() as tx:
            now = self._clock()
            for lease in self._store.active():
                if lease.expired(now):
                    done = self._store._mark_released(tx, lease, at=now, reason="expired")
                    self._record(SYSTEM_ACTOR, AUDIT_EXPIRED, done, reason="expired")
                    expired.append(done)
        return expired

    # -- queries --------------------------------------------------------------------

    def active(self, *, user: str | None = None, pool: str | None = None) -> list[Lease]:
        """Leases not yet released (expired ones included until :meth:`expire`)."""
        return self._store.active(user=user, pool=pool)

    def free(self, pool: str) -> list[str]:
        """Ids of the GPUs of ``pool`` that no lease holds, in configuration order."""
        held = self._store.held()
        return [gpu.id for gpu in self._inventory.pool(pool) if gpu.id not in held]

    def get(self, lease_id: str) -> Lease | None:
        """The lease ``lease_id``, active or not, or ``None``."""
        return self._store.get(lease_id)

    # -- audit ----------------------------------------------------------------------

    def _record(self, actor: str, action: str, lease: Lease, **extra: Any) -> None:
        if self._audit is None:
            return
        detail: dict[str, Any] = {
            "lease": lease.id,
            "user": lease.user,
            "server": lease.server,
            "pool": lease.pool,
            "gpus": list(lease.gpus),
            "minors": list(lease.minors),
            "granted_at": utc_iso(lease.granted_at),
            "expires_at": utc_iso(lease.expires_at),
        }
        if lease.released_at is not None:
            detail["released_at"] = utc_iso(lease.released_at)
            detail["held_seconds"] = round(max(0.0, lease.released_at - lease.granted_at), 3)
        for key, value in extra.items():
            if isinstance(value, float) and not math.isfinite(value):
                continue
            detail[key] = value
        self._audit.record(actor=actor, action=action, detail=detail)
