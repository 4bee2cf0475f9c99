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

Hand-over checks (on while the GPU monitor runs, :meth:`LeaseBroker.require_handover_checks`):
the transaction that ends a lease also puts each of its GPUs into the ``handovers`` table,
state ``checking``; step (4) skips every GPU there, whoever asks (the user who just had it
too). The monitor then clears it (:meth:`LeaseBroker.clear_handover`, audited
``gpu.handover.cleared``) once no process of the old holder remains on it, or holds it back
(:meth:`LeaseBroker.hold_handover`, state ``held``, audited ``gpu.handover.held`` once per
change of state); an administrator may release a hold (:meth:`LeaseBroker.release_hold`,
``gpu.handover.released_by_admin``). GPUs already waiting keep waiting when checks are
turned off: the table is honoured always, it is only filled while checks are on.

The leases live in one SQLite file (:class:`LeaseStore`), mode 0600 in a directory of
mode 0700, in WAL mode with ``synchronous=FULL``: every change is committed, durably,
before the call returns, so a hub restart neither loses nor doubles a lease, nor forgets a
GPU waiting for its hand-over check. A table of held GPUs whose primary key is the GPU id
makes "one GPU, one lease" a property of the database, not only of this code. Schema
version 1 (before hand-over checks) is migrated to 2 when opened.
"""

from __future__ import annotations

import json
import math
import secrets
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from ztlab.common.auditlog.sink import AuditSink
from ztlab.common.config import ZtlabConfig
from ztlab.common.config.model import RoleConfig
from ztlab.common.errors import UsageError
from ztlab.hub.gpu.backend import (
    HANDOVER_CHECKING,
    HANDOVER_HELD,
    Handover,
    HandoverNotFound,
    HandoverState,
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
from ztlab.hub.private import DurableDatabase
from ztlab.hub.timestamps import clock_text, utc_iso

__all__ = [
    "AUDIT_EXPIRED",
    "AUDIT_GRANTED",
    "AUDIT_HANDOVER_CLEARED",
    "AUDIT_HANDOVER_HELD",
    "AUDIT_HANDOVER_RELEASED_BY_ADMIN",
    "AUDIT_RELEASED",
    "Handover",
    "HandoverNotFound",
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
AUDIT_HANDOVER_CLEARED: Final = "gpu.handover.cleared"
AUDIT_HANDOVER_HELD: Final = "gpu.handover.held"
AUDIT_HANDOVER_RELEASED_BY_ADMIN: Final = "gpu.handover.released_by_admin"

#: the audit actor of what the control plane does on its own (expiry)
SYSTEM_ACTOR: Final = "ztlab-hub"

_SCHEMA_VERSION: Final = 2


def _gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def _holder(user: str, server: str) -> str:
    """``alice's server`` (the default server) or ``alice's server 'gpu'``."""
    return f"{user}'s server" if not server else f"{user}'s server {server!r}"


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

#: GPUs whose lease ended and that wait for their hand-over check (schema version 2)
_HANDOVERS_DDL: Final = """
    CREATE TABLE IF NOT EXISTS handovers (
        gpu TEXT PRIMARY KEY,
        lease_id TEXT NOT NULL REFERENCES leases (id),
        since REAL NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('checking', 'held')),
        reason TEXT NOT NULL
    ) STRICT
    """

#: schema version -> the statements that take a database of that version to the next one
_MIGRATIONS: Final[Mapping[int, tuple[str, ...]]] = {1: (_HANDOVERS_DDL,)}

_HANDOVER_COLUMNS: Final = (
    "h.gpu, h.lease_id, l.username, l.server, l.pool, h.since, h.state, h.reason "
    "FROM handovers AS h JOIN leases AS l ON l.id = h.lease_id"
)

_COLUMNS: Final = "id, username, server, pool, gpus, minors, granted_at, expires_at, released_at"


def _handover_from_row(row: Sequence[Any]) -> Handover:
    state: HandoverState = HANDOVER_HELD if row[6] == HANDOVER_HELD else HANDOVER_CHECKING
    return Handover(
        gpu=row[0],
        lease=row[1],
        user=row[2],
        server=row[3],
        pool=row[4],
        since=row[5],
        state=state,
        reason=row[7],
    )


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


class LeaseStore(DurableDatabase):
    """The lease database: one SQLite file shared by every broker that opens it.

    Opening creates the directory (0700) and the file (0600) when missing and refuses
    ones that group or others can access. Safe to share between threads; several
    processes may open the same file (SQLite locks it; a writer waits up to
    ``busy_timeout`` seconds). Reads see committed data only. A version 1 database (before
    hand-over checks) is migrated when opened.
    """

    def __init__(self, *, path: Path, busy_timeout: float = 30.0) -> None:
        """Open (creating if needed) the lease database at ``path``."""
        super().__init__(
            path=path,
            what="GPU lease database",
            directory="GPU lease directory",
            error=LeaseStoreError,
            version=_SCHEMA_VERSION,
            ddl=(*_DDL, _HANDOVERS_DDL),
            migrations=_MIGRATIONS,
            foreign_keys=True,
            busy_timeout=busy_timeout,
        )

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

    def handovers(self) -> list[Handover]:
        """Every GPU waiting for (or held back by) its hand-over check, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_HANDOVER_COLUMNS} ORDER BY h.since, h.rowid"
            ).fetchall()
        return [_handover_from_row(row) for row in rows]

    def handover(self, gpu: str) -> Handover | None:
        """The hand-over ``gpu`` waits for, or ``None``."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_HANDOVER_COLUMNS} WHERE h.gpu = ?",
                (gpu,),
            ).fetchone()
        return None if row is None else _handover_from_row(row)

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
        self, conn: sqlite3.Connection, lease: Lease, *, at: float, reason: str, handover: bool
    ) -> Lease:
        """End ``lease``; with ``handover``, its GPUs go to the hand-over check (same
        transaction: no moment where they are free)."""
        conn.execute(
            "UPDATE leases SET released_at = ?, release_reason = ? "
            "WHERE id = ? AND released_at IS NULL",
            (at, reason, lease.id),
        )
        conn.execute("DELETE FROM held WHERE lease_id = ?", (lease.id,))
        if handover:
            waiting = (
                f"lease {lease.id} of {_holder(lease.user, lease.server)} ended; waiting for "
                "the GPU monitor to confirm that none of its processes remain"
            )
            conn.executemany(
                "INSERT INTO handovers (gpu, lease_id, since, state, reason) "
                "VALUES (?, ?, ?, ?, ?)",
                [(gpu, lease.id, at, HANDOVER_CHECKING, waiting) for gpu in lease.gpus],
            )
        return replace(lease, released_at=at)

    def _hold(self, conn: sqlite3.Connection, gpu: str, *, reason: str) -> None:
        conn.execute(
            "UPDATE handovers SET state = ?, reason = ? WHERE gpu = ?",
            (HANDOVER_HELD, reason, gpu),
        )

    def _end_handover(self, conn: sqlite3.Connection, gpu: str) -> None:
        conn.execute("DELETE FROM handovers WHERE gpu = ?", (gpu,))


# --------------------------------------------------------------------------------------
# The broker
# --------------------------------------------------------------------------------------


class LeaseBroker(LeaseBackend):
    """Grants, releases and expires GPU leases (see the module docstring for the steps).

    The ``local`` lease backend. One broker per hub process; several brokers (processes)
    may share one store file. Thread-safe. ``roles`` are the configured roles with their
    quotas; roles a user holds that are not configured count for nothing. ``clock`` returns
    POSIX seconds. ``handover_checks`` turns hand-over checks on from the start (see
    :meth:`require_handover_checks`).
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
        handover_checks: bool = False,
    ) -> None:
        """Open (or create) the lease store at ``store_path``."""
        self._store = LeaseStore(path=store_path)
        self._inventory = inventory
        self._roles = dict(roles)
        self._policy = policy
        self._audit = audit
        self._clock = clock
        self._handover_checks = bool(handover_checks)

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

            # (4) free GPUs (neither held nor waiting for their hand-over check), in
            # configuration order; the transaction keeps them free
            taken = self._taken()
            free = [gpu for gpu in pool_gpus if gpu.id not in taken]
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

    def _taken(self) -> set[str]:
        """GPU ids that cannot be leased now: held by a lease or waiting for a hand-over."""
        return set(self._store.held()) | {h.gpu for h in self._store.handovers()}

    def _exhausted(self, *, pool: str, count: int, now: float) -> PoolExhausted:
        total = len(self._inventory.pool(pool))
        if count > total:
            return PoolExhausted(
                f"pool {pool} has {_gpus(total)} in all and you asked for {count}",
                hint="ask for fewer GPUs",
            )
        checking, _ = self._waiting(pool)
        return PoolExhausted(
            f"pool {pool} cannot lease {_gpus(count)} now; {self._pool_status(pool, now)}",
            hint=(
                "try again in a few minutes: a GPU is leased again once its hand-over check "
                "passes; or ask for fewer GPUs"
                if checking
                else "try again when a lease there ends, or ask for fewer GPUs"
            ),
        )

    def _waiting(self, pool: str) -> tuple[int, int]:
        """How many GPUs of ``pool`` are in the hand-over check, and how many held back."""
        ids = {gpu.id for gpu in self._inventory.pool(pool)}
        states = [h.state for h in self._store.handovers() if h.gpu in ids]
        return states.count(HANDOVER_CHECKING), states.count(HANDOVER_HELD)

    def _pool_status(self, pool: str, now: float) -> str:
        """``free in pool research: 0 of 2 GPUs; next lease there expires at 14:05 UTC``,
        with the GPUs waiting for their hand-over check, if any.

        A held-back GPU is counted, not explained: the reason names the previous holder's
        processes, which are for administrators, not for whoever asks next.
        """
        gpus = self._inventory.pool(pool)
        taken = self._taken()
        free = sum(1 for gpu in gpus if gpu.id not in taken)
        text = f"free in pool {pool}: {free} of {_gpus(len(gpus))}"
        checking, held_back = self._waiting(pool)
        if checking:
            verb = "is waiting for its" if checking == 1 else "are waiting for their"
            text += f"; {_gpus(checking)} of pool {pool} {verb} hand-over check"
        if held_back:
            verb = "is" if held_back == 1 else "are"
            text += (
                f"; {_gpus(held_back)} of pool {pool} {verb} held back: the hand-over check "
                "found processes of the previous holder (it returns once they are gone, or "
                "when an administrator releases it)"
            )
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
            done = self._store._mark_released(
                tx, lease, at=self._clock(), reason=reason, handover=self._handover_checks
            )
            self._record(actor or lease.user, AUDIT_RELEASED, done, reason=reason)

    def release_server(self, *, user: str, server: str, reason: str) -> list[Lease]:
        """Release every lease of ``user``'s ``server``; the leases released (maybe none)."""
        released: list[Lease] = []
        with self._store.transaction() as tx:
            now = self._clock()
            for lease in self._store.active(user=user, server=server):
                done = self._store._mark_released(
                    tx, lease, at=now, reason=reason, handover=self._handover_checks
                )
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
                    done = self._store._mark_released(
                        tx, lease, at=now, reason="expired", handover=self._handover_checks
                    )
                    self._record(SYSTEM_ACTOR, AUDIT_EXPIRED, done, reason="expired")
                    expired.append(done)
        return expired

    # -- queries --------------------------------------------------------------------

    def active(self, *, user: str | None = None, pool: str | None = None) -> list[Lease]:
        """Leases not yet released (expired ones included until :meth:`expire`)."""
        return self._store.active(user=user, pool=pool)

    def free(self, pool: str) -> list[str]:
        """Ids of the GPUs of ``pool`` that can be leased now (no lease holds them, none
        waits for its hand-over check), in configuration order."""
        taken = self._taken()
        return [gpu.id for gpu in self._inventory.pool(pool) if gpu.id not in taken]

    def get(self, lease_id: str) -> Lease | None:
        """The lease ``lease_id``, active or not, or ``None``."""
        return self._store.get(lease_id)

    # -- hand-over checks -----------------------------------------------------------

    @property
    def handover_checks(self) -> bool:
        """Whether a lease's end puts its GPUs into the hand-over check."""
        return self._handover_checks

    def require_handover_checks(self, enabled: bool) -> None:
        """Turn hand-over checks on or off for leases that end from now on (through this
        broker). Turning them off frees no GPU already waiting: :meth:`release_hold` does."""
        self._handover_checks = bool(enabled)

    def pending_handovers(self) -> list[Handover]:
        """The GPUs waiting for (or held back by) their hand-over check, oldest first."""
        return self._store.handovers()

    def clear_handover(
        self,
        gpu: str,
        *,
        actor: str,
        ecc_mode: bool | None,
        checked: str,
        lease: str | None = None,
    ) -> None:
        """The monitor found no process of the old holder on ``gpu``: lease it again.

        ``checked`` says what the monitor checked (recorded in the audit log), ``ecc_mode``
        the GPU's ECC mode as read (``None``: unknown). Pass ``lease`` (the lease id of the
        :class:`Handover` the check was for) so that a check made for one lease never
        clears the next one's. Raises :class:`HandoverNotFound` when ``gpu`` does not wait
        (for ``lease``).
        """
        with self._store.transaction() as tx:
            handover = self._pending(gpu, lease)
            self._store._end_handover(tx, gpu)
            self._record_handover(
                actor, AUDIT_HANDOVER_CLEARED, handover, ecc_mode=ecc_mode, checked=checked
            )

    def hold_handover(
        self, gpu: str, *, reason: str, actor: str, lease: str | None = None
    ) -> Handover:
        """The check found the old holder still on ``gpu``: it stays out of new leases.

        Audited when it goes from ``checking`` to ``held``; holding a held GPU again (every
        tick of the monitor) updates the reason and records nothing. Returns the hand-over
        as stored. :class:`HandoverNotFound` as for :meth:`clear_handover`.
        """
        with self._store.transaction() as tx:
            handover = self._pending(gpu, lease)
            now_held = replace(handover, state=HANDOVER_HELD, reason=reason)
            if handover != now_held:
                self._store._hold(tx, gpu, reason=reason)
            if handover.state != HANDOVER_HELD:
                self._record_handover(actor, AUDIT_HANDOVER_HELD, handover, reason=reason)
        return now_held

    def release_hold(self, gpu: str, *, actor: str) -> Handover:
        """An administrator (``actor``) lets ``gpu`` be leased again whatever the check
        found (or while no monitor runs); the hand-over removed, audited with its last
        state and reason. :class:`HandoverNotFound` when ``gpu`` does not wait."""
        with self._store.transaction() as tx:
            handover = self._pending(gpu, None)
            self._store._end_handover(tx, gpu)
            self._record_handover(
                actor, AUDIT_HANDOVER_RELEASED_BY_ADMIN, handover, reason=handover.reason
            )
        return handover

    def _pending(self, gpu: str, lease: str | None) -> Handover:
        handover = self._store.handover(gpu)
        if handover is None:
            raise HandoverNotFound(
                f"GPU {gpu!r} is not waiting for a hand-over check",
                hint="the GPUs waiting are those of pending_handovers()",
            )
        if lease is not None and handover.lease != lease:
            raise HandoverNotFound(
                f"GPU {gpu!r} waits for the hand-over check of lease {handover.lease}, "
                f"not of lease {lease}",
                hint="check the GPU again for the holder of the lease it waits for",
            )
        return handover

    # -- audit ----------------------------------------------------------------------

    def _record_handover(self, actor: str, action: str, handover: Handover, **extra: Any) -> None:
        detail: dict[str, Any] = {
            "gpu": handover.gpu,
            "lease": handover.lease,
            "user": handover.user,
            "server": handover.server,
            "pool": handover.pool,
            # the state it was in until this event
            "state": handover.state,
            "since": utc_iso(handover.since),
            "waited_seconds": round(max(0.0, self._clock() - handover.since), 3),
        }
        self._emit(actor, action, detail, extra)

    def _record(self, actor: str, action: str, lease: Lease, **extra: Any) -> None:
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
        self._emit(actor, action, detail, extra)

    def _emit(
        self, actor: str, action: str, detail: dict[str, Any], extra: Mapping[str, Any]
    ) -> None:
        if self._audit is None:
            return
        for key, value in extra.items():
            if isinstance(value, float) and not math.isfinite(value):
                continue
            detail[key] = value
        self._audit.record(actor=actor, action=action, detail=detail)
