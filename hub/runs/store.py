"""The run database: schedules, their fires and every run, kept through crashes.

One SQLite file (``STATE_DIR/runs/runs.sqlite``, a
:class:`~ztlab.hub.private.DurableDatabase`). What makes a schedule fire exactly once:

- :meth:`RunStore.fire_due` inserts the runs of every due fire time and moves the
  schedule's ``next_due`` past them **in one transaction**, and ``runs`` has
  ``UNIQUE (schedule_id, scheduled_for, attempt)``: a crash either leaves both or neither,
  and no second scheduler (another hub process on the same file) can insert the same fire;
- :meth:`RunStore.claim` moves a run from ``queued`` to ``starting`` with a guarded
  ``UPDATE``; only the caller whose update changed the row starts it;
- a run left ``starting``, ``running`` or ``finishing`` by a scheduler that died is
  :meth:`RunStore.interrupt`-ed when the next one opens, before anything else starts.

Statuses: ``queued`` -> ``starting`` -> ``running`` -> ``finishing`` -> ``succeeded`` or
``failed`` (a GPU quota refusal fails a run); ``refused`` (the policy or the identity
provider said no before it ran),
``skipped`` (its schedule's previous run still ran), ``missed`` (fired while the scheduler
was down, and the schedule's ``missed`` policy left it), ``interrupted`` (its scheduler
died), ``cancelled``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ztlab.common.errors import ZtlabError
from ztlab.common.schedule import ScheduleSpec, fire_times
from ztlab.hub.private import DurableDatabase

__all__ = [
    "ACTIVE",
    "FINAL",
    "RunRecord",
    "RunStore",
    "RunStoreError",
    "ScheduleRecord",
]

_SCHEMA_VERSION: Final = 1
#: a run holding (or about to hold) a sandbox
ACTIVE: Final = ("starting", "running", "finishing")
#: a run that is over
FINAL: Final = ("succeeded", "failed", "refused", "skipped", "missed", "interrupted", "cancelled")

_DDL: Final = (
    """
    CREATE TABLE schedules (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        spec TEXT NOT NULL,
        notebook_name TEXT NOT NULL,
        notebook_sha256 TEXT NOT NULL,
        source TEXT NOT NULL,
        paused INTEGER NOT NULL DEFAULT 0,
        next_due REAL NOT NULL,
        last_fire REAL NOT NULL,
        created_at REAL NOT NULL,
        created_by TEXT NOT NULL,
        UNIQUE (owner, name)
    ) STRICT
    """,
    """
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        actor TEXT NOT NULL,
        schedule_id INTEGER,
        schedule_name TEXT,
        scheduled_for REAL,
        attempt INTEGER NOT NULL,
        status TEXT NOT NULL,
        notebook_name TEXT NOT NULL,
        notebook_sha256 TEXT NOT NULL,
        parameters TEXT NOT NULL,
        pool TEXT,
        gpus INTEGER NOT NULL,
        git_commit TEXT,
        created_at REAL NOT NULL,
        not_before REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        message TEXT NOT NULL DEFAULT '',
        failed_cell INTEGER,
        traceback TEXT NOT NULL DEFAULT '',
        lease TEXT,
        executed_sha256 TEXT,
        provenance_sha256 TEXT,
        models TEXT NOT NULL DEFAULT '[]',
        datasets TEXT NOT NULL DEFAULT '[]',
        UNIQUE (schedule_id, scheduled_for, attempt)
    ) STRICT
    """,
    "CREATE INDEX runs_by_status ON runs (status, not_before)",
    "CREATE INDEX runs_by_owner ON runs (owner, created_at)",
    """
    CREATE TABLE mlflow_runs (
        mlflow_run_id TEXT PRIMARY KEY,
        run_id TEXT NOT NULL REFERENCES runs (id)
    ) STRICT
    """,
)

_RUN_COLUMNS: Final = (
    "id, owner, actor, schedule_id, schedule_name, scheduled_for, attempt, status, "
    "notebook_name, notebook_sha256, parameters, pool, gpus, git_commit, created_at, "
    "not_before, started_at, finished_at, message, failed_cell, traceback, lease, "
    "executed_sha256, provenance_sha256, models, datasets"
)
_SCHEDULE_COLUMNS: Final = (
    "id, owner, name, spec, notebook_name, notebook_sha256, source, paused, next_due, "
    "last_fire, created_at, created_by"
)


class RunStoreError(ZtlabError):
    """The run database cannot be opened, or a change to it is not possible."""

    def __init__(self, message: str, *, status: int = 400, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


@dataclass(frozen=True)
class ScheduleRecord:
    """A stored schedule."""

    id: int
    owner: str
    spec: ScheduleSpec
    notebook_name: str
    notebook_sha256: str
    #: ``api`` (its owner made it) or ``config`` (``[[runs.schedules]]``, an admin's)
    source: str
    paused: bool
    next_due: float
    last_fire: float
    created_at: float
    created_by: str

    @property
    def name(self) -> str:
        """The schedule's name (unique per owner)."""
        return self.spec.name

    @property
    def resource(self) -> str:
        """The policy resource its runs are decided on (``schedule:OWNER/NAME``)."""
        return f"schedule:{self.owner}/{self.spec.name}"

    def as_json(self) -> dict[str, Any]:
        """For the API and the command line."""
        from ztlab.hub.timestamps import utc_iso

        return {
            **self.spec.to_json(),
            "owner": self.owner,
            "notebook": {"name": self.notebook_name, "sha256": self.notebook_sha256},
            "source": self.source,
            "paused": self.paused,
            "next_run": None if self.paused else utc_iso(self.next_due),
            "created_at": utc_iso(self.created_at),
            "created_by": self.created_by,
        }


@dataclass(frozen=True)
class RunRecord:
    """A stored run."""

    id: str
    owner: str
    actor: str
    schedule_id: int | None
    schedule_name: str | None
    scheduled_for: float | None
    attempt: int
    status: str
    notebook_name: str
    notebook_sha256: str
    parameters: Mapping[str, Any]
    pool: str | None
    gpus: int
    git_commit: str | None
    created_at: float
    not_before: float
    started_at: float | None
    finished_at: float | None
    message: str
    failed_cell: int | None
    traceback: str
    lease: str | None
    executed_sha256: str | None
    provenance_sha256: str | None
    models: tuple[str, ...] = field(default=())
    datasets: tuple[Mapping[str, str], ...] = field(default=())

    @property
    def resource(self) -> str:
        """The policy resource it is decided on (``schedule:OWNER/NAME`` or
        ``schedule:OWNER/once`` for a run started by hand)."""
        return f"schedule:{self.owner}/{self.schedule_name or 'once'}"

    @property
    def server(self) -> str:
        """What it holds GPU leases and a cgroup as (``run-ID``)."""
        return f"run-{self.id}"

    @property
    def duration(self) -> float | None:
        """Seconds from start to finish (or to now, while it runs)."""
        if self.started_at is None:
            return None
        return (self.finished_at or time.time()) - self.started_at

    def as_json(self) -> dict[str, Any]:
        """For the API, the page and the command line."""
        from ztlab.hub.timestamps import utc_iso

        def moment(value: float | None) -> str | None:
            return utc_iso(value) if value is not None else None

        return {
            "id": self.id,
            "owner": self.owner,
            "actor": self.actor,
            "schedule": self.schedule_name,
            "scheduled_for": moment(self.scheduled_for),
            "attempt": self.attempt,
            "status": self.status,
            "notebook": {"name": self.notebook_name, "sha256": self.notebook_sha256},
            "parameters": dict(self.parameters),
            "pool": self.pool,
            "gpus": self.gpus,
            "git_commit": self.git_commit,
            "created_at": moment(self.created_at),
            "not_before": moment(self.not_before),
            "started_at": moment(self.started_at),
            "finished_at": moment(self.finished_at),
            "duration_seconds": round(self.duration, 3) if self.duration is not None else None,
            "message": self.message,
            "failed_cell": self.failed_cell,
            "traceback": self.traceback,
            "lease": self.lease,
            "executed_sha256": self.executed_sha256,
            "provenance_sha256": self.provenance_sha256,
            "models": list(self.models),
            "datasets": [dict(d) for d in self.datasets],
        }


def new_run_id() -> str:
    """A run's id: 12 hex digits (it is part of a cgroup name and a lease holder)."""
    return secrets.token_hex(6)


class RunStore(DurableDatabase):
    """The run database (see the module docstring). Thread-safe; one per hub process."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        super().__init__(
            path=path,
            what="run database",
            directory="run directory",
            error=RunStoreError,
            version=_SCHEMA_VERSION,
            ddl=_DDL,
            foreign_keys=True,
        )

    # -- schedules ------------------------------------------------------------------------

    def add_schedule(
        self,
        owner: str,
        spec: ScheduleSpec,
        *,
        notebook_name: str,
        notebook_sha256: str,
        source: str,
        created_by: str,
        paused: bool = False,
    ) -> ScheduleRecord:
        """Store a new schedule; its first fire is the first cron time after now."""
        now = self._clock()
        with self.transaction() as tx:
            found = tx.execute(
                "SELECT 1 FROM schedules WHERE owner = ? AND name = ?", (owner, spec.name)
            ).fetchone()
            if found:
                raise RunStoreError(
                    f"{owner} has a schedule {spec.name!r} already",
                    status=409,
                    hint=f"remove it first (ztlab schedule remove {spec.name}) or pick "
                    "another name",
                )
            tx.execute(
                f"INSERT INTO schedules ({_SCHEDULE_COLUMNS}) "  # noqa: S608 - fixed columns, placeholders
                "VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    owner,
                    spec.name,
                    json.dumps(spec.to_json(), sort_keys=True),
                    notebook_name,
                    notebook_sha256,
                    source,
                    int(paused),
                    spec.next_after(now),
                    now,
                    now,
                    created_by,
                ),
            )
        record = self.schedule(owner, spec.name)
        assert record is not None
        return record

    def replace_schedule(
        self, record: ScheduleRecord, spec: ScheduleSpec, *, notebook_name: str, sha256: str
    ) -> None:
        """Change a schedule's spec and notebook (``[[runs.schedules]]`` edited); its fire
        history stays, its next fire is recomputed from now."""
        now = self._clock()
        with self.transaction() as tx:
            tx.execute(
                "UPDATE schedules SET spec = ?, notebook_name = ?, notebook_sha256 = ?, "
                "next_due = ?, last_fire = MAX(last_fire, ?) WHERE id = ?",
                (
                    json.dumps(spec.to_json(), sort_keys=True),
                    notebook_name,
                    sha256,
                    spec.next_after(now),
                    now,
                    record.id,
                ),
            )

    def schedule(self, owner: str, name: str) -> ScheduleRecord | None:
        """``owner``'s schedule ``name``, if any."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_SCHEDULE_COLUMNS} FROM schedules WHERE owner = ? AND name = ?",  # noqa: S608 - fixed columns, placeholders
                (owner, name),
            ).fetchone()
        return _schedule(row) if row else None

    def schedule_by_id(self, schedule_id: int) -> ScheduleRecord | None:
        """The schedule with ``schedule_id``, if it still exists."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_SCHEDULE_COLUMNS} FROM schedules WHERE id = ?",  # noqa: S608
                (schedule_id,),
            ).fetchone()
        return _schedule(row) if row else None

    def schedules(self, *, owner: str | None = None) -> list[ScheduleRecord]:
        """Every schedule (of ``owner``), by owner and name."""
        sql = f"SELECT {_SCHEDULE_COLUMNS} FROM schedules"  # noqa: S608 - fixed columns, placeholders
        args: tuple[Any, ...] = ()
        if owner is not None:
            sql += " WHERE owner = ?"
            args = (owner,)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY owner, name", args).fetchall()
        return [_schedule(row) for row in rows]

    def set_paused(self, record: ScheduleRecord, paused: bool) -> ScheduleRecord:
        """Pause or resume; resuming fires next at the first cron time after now (the
        fires while paused are not made up)."""
        now = self._clock()
        with self.transaction() as tx:
            tx.execute(
                "UPDATE schedules SET paused = ?, next_due = ?, last_fire = ? WHERE id = ?",
                (int(paused), record.spec.next_after(now), now, record.id),
            )
        found = self.schedule_by_id(record.id)
        assert found is not None
        return found

    def remove_schedule(self, record: ScheduleRecord) -> list[str]:
        """Remove the schedule; its queued runs are cancelled (their ids returned)."""
        with self.transaction() as tx:
            queued = [
                row[0]
                for row in tx.execute(
                    "SELECT id FROM runs WHERE schedule_id = ? AND status = 'queued'",
                    (record.id,),
                )
            ]
            tx.execute(
                "UPDATE runs SET status = 'cancelled', finished_at = ?, "
                "message = 'its schedule was removed' WHERE schedule_id = ? AND status = 'queued'",
                (self._clock(), record.id),
            )
            tx.execute("DELETE FROM schedules WHERE id = ?", (record.id,))
        return queued

    # -- fires ------------------------------------------------------------------------------

    def fire_due(self, now: float, *, on_time_seconds: float) -> list[RunRecord]:
        """Make the runs of every fire time that has come, and move each schedule on.

        A fire time later than ``now - on_time_seconds`` is on time: a run is queued (or
        ``skipped``, when the schedule's ``concurrency`` is ``skip`` and a run of it is
        queued or active). Older fire times were missed while no scheduler ran: the
        schedule's ``missed`` policy queues all of them (``all``), only the latest
        (``latest``) or none (``skip``); the others are recorded as ``missed``. One
        transaction; returns the runs made, queued or not.
        """
        made: list[str] = []
        with self.transaction() as tx:
            rows = tx.execute(
                f"SELECT {_SCHEDULE_COLUMNS} FROM schedules WHERE paused = 0 AND next_due <= ?",  # noqa: S608 - fixed columns, placeholders
                (now,),
            ).fetchall()
            for row in rows:
                schedule = _schedule(row)
                spec = schedule.spec
                times = fire_times(spec.cron, spec.timezone, schedule.last_fire, now)
                on_time = [t for t in times if t > now - on_time_seconds]
                late = [t for t in times if t <= now - on_time_seconds]
                wanted = set(on_time)
                if spec.missed == "all":
                    wanted.update(late)
                elif spec.missed == "latest" and late and not on_time:
                    wanted.add(late[-1])
                for moment in times:
                    status, message = "queued", ""
                    if moment not in wanted:
                        status = "missed"
                        message = (
                            "fired while no scheduler was running; the schedule's missed "
                            f"policy is {spec.missed!r}"
                        )
                    elif spec.concurrency == "skip":
                        busy = tx.execute(
                            "SELECT id FROM runs WHERE schedule_id = ? AND status IN "
                            "('queued', 'starting', 'running', 'finishing') LIMIT 1",
                            (schedule.id,),
                        ).fetchone()
                        if busy:
                            status = "skipped"
                            message = f"the schedule's previous run {busy[0]} had not finished"
                    made.append(
                        self._insert_run(
                            tx,
                            owner=schedule.owner,
                            actor="ztlab-scheduler",
                            schedule=schedule,
                            scheduled_for=moment,
                            attempt=1,
                            status=status,
                            message=message,
                            parameters=spec.parameters,
                            pool=spec.pool,
                            gpus=spec.gpus,
                            not_before=now,
                            notebook_name=schedule.notebook_name,
                            notebook_sha256=schedule.notebook_sha256,
                        )
                    )
                tx.execute(
                    "UPDATE schedules SET last_fire = ?, next_due = ? WHERE id = ?",
                    (max(times, default=now), spec.next_after(now), schedule.id),
                )
        return [self._get(run_id) for run_id in made]

    def submit(
        self,
        *,
        owner: str,
        actor: str,
        notebook_name: str,
        notebook_sha256: str,
        parameters: Mapping[str, Any],
        pool: str | None,
        gpus: int,
        git_commit: str | None = None,
    ) -> RunRecord:
        """Queue a run started by hand (``ztlab run``): it starts at once."""
        now = self._clock()
        with self.transaction() as tx:
            run_id = self._insert_run(
                tx,
                owner=owner,
                actor=actor,
                schedule=None,
                scheduled_for=None,
                attempt=1,
                status="queued",
                message="",
                parameters=parameters,
                pool=pool,
                gpus=gpus,
                not_before=now,
                notebook_name=notebook_name,
                notebook_sha256=notebook_sha256,
                git_commit=git_commit,
            )
        return self._get(run_id)

    def _insert_run(
        self,
        tx: Any,
        *,
        owner: str,
        actor: str,
        schedule: ScheduleRecord | None,
        scheduled_for: float | None,
        attempt: int,
        status: str,
        message: str,
        parameters: Mapping[str, Any],
        pool: str | None,
        gpus: int,
        not_before: float,
        notebook_name: str,
        notebook_sha256: str,
        git_commit: str | None = None,
    ) -> str:
        run_id = new_run_id()
        now = self._clock()
        final = status in FINAL
        tx.execute(
            "INSERT INTO runs (id, owner, actor, schedule_id, schedule_name, scheduled_for, "
            "attempt, status, notebook_name, notebook_sha256, parameters, pool, gpus, "
            "git_commit, created_at, not_before, finished_at, message) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                owner,
                actor,
                schedule.id if schedule else None,
                schedule.name if schedule else None,
                scheduled_for,
                attempt,
                status,
                notebook_name,
                notebook_sha256,
                json.dumps(dict(parameters), sort_keys=True),
                pool,
                gpus,
                git_commit,
                now,
                not_before,
                now if final else None,
                message,
            ),
        )
        return run_id

    # -- a run's life -----------------------------------------------------------------------

    def claimable(self, now: float) -> list[RunRecord]:
        """Queued runs whose time has come, oldest first, leaving a queued run of a
        schedule whose previous run is still active (``concurrency = "queue"``) waiting."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE status = 'queued' AND not_before <= ? "  # noqa: S608 - fixed columns, placeholders
                "ORDER BY not_before, created_at",
                (now,),
            ).fetchall()
            busy = {
                row[0]
                for row in self._conn.execute(
                    "SELECT schedule_id FROM runs WHERE schedule_id IS NOT NULL AND status IN "
                    "('starting', 'running', 'finishing')"
                )
            }
        found: list[RunRecord] = []
        for row in rows:
            run = _run(row)
            if run.schedule_id is not None:
                if run.schedule_id in busy:
                    continue
                busy.add(run.schedule_id)  # one at a time per schedule
            found.append(run)
        return found

    def claim(self, run_id: str) -> RunRecord | None:
        """``queued`` -> ``starting``; ``None`` when someone else claimed it first."""
        with self.transaction() as tx:
            changed = tx.execute(
                "UPDATE runs SET status = 'starting', started_at = ? "
                "WHERE id = ? AND status = 'queued'",
                (self._clock(), run_id),
            ).rowcount
        return self._get(run_id) if changed else None

    def update(self, run_id: str, *, expect: Iterable[str], **fields: Any) -> RunRecord | None:
        """Set ``fields`` of a run whose status is one of ``expect``; ``None`` if it was not
        (another path ended it first). ``status`` in FINAL also sets ``finished_at``."""
        allowed = {
            "status", "message", "failed_cell", "traceback", "lease", "executed_sha256",
            "provenance_sha256", "models", "datasets", "started_at",
        }  # fmt: skip
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"not a run field: {sorted(unknown)}")
        values = dict(fields)
        for key in ("models", "datasets"):
            if key in values:
                values[key] = json.dumps(list(values[key]), sort_keys=True)
        if values.get("status") in FINAL:
            values["finished_at"] = self._clock()
        expected = list(expect)
        assignments = ", ".join(f"{key} = ?" for key in values)
        marks = ", ".join("?" for _ in expected)
        with self.transaction() as tx:
            changed = tx.execute(
                f"UPDATE runs SET {assignments} WHERE id = ? AND status IN ({marks})",  # noqa: S608 - fixed columns, placeholders
                (*values.values(), run_id, *expected),
            ).rowcount
        return self._get(run_id) if changed else None

    def retry(self, run: RunRecord, *, delay: float) -> RunRecord:
        """Queue the next attempt of a scheduled run, ``delay`` seconds from now."""
        schedule = self.schedule_by_id(run.schedule_id) if run.schedule_id is not None else None
        if schedule is None:
            raise RunStoreError(f"run {run.id} has no schedule left to retry it")
        with self.transaction() as tx:
            run_id = self._insert_run(
                tx,
                owner=run.owner,
                actor="ztlab-scheduler",
                schedule=schedule,
                scheduled_for=run.scheduled_for,
                attempt=run.attempt + 1,
                status="queued",
                message=f"retry of {run.id}",
                parameters=run.parameters,
                pool=run.pool,
                gpus=run.gpus,
                not_before=self._clock() + delay,
                notebook_name=run.notebook_name,
                notebook_sha256=run.notebook_sha256,
            )
        return self._get(run_id)

    def left_active(self) -> list[RunRecord]:
        """Runs a scheduler left active (on opening: the one before this died)."""
        return self.runs(statuses=ACTIVE)

    # -- MLflow runs made by a run -------------------------------------------------------

    def attach_mlflow_run(self, run_id: str, mlflow_run_id: str) -> None:
        """Remember that the run created MLflow run ``mlflow_run_id``."""
        with self.transaction() as tx:
            tx.execute(
                "INSERT OR IGNORE INTO mlflow_runs (mlflow_run_id, run_id) VALUES (?, ?)",
                (mlflow_run_id, run_id),
            )

    def mlflow_runs_of(self, run_id: str) -> list[str]:
        """The MLflow runs the run created."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT mlflow_run_id FROM mlflow_runs WHERE run_id = ? ORDER BY rowid",
                (run_id,),
            ).fetchall()
        return [row[0] for row in rows]

    def run_of_mlflow(self, mlflow_run_id: str) -> RunRecord | None:
        """The run that created MLflow run ``mlflow_run_id``, if a run did."""
        with self._lock:
            row = self._conn.execute(
                "SELECT run_id FROM mlflow_runs WHERE mlflow_run_id = ?", (mlflow_run_id,)
            ).fetchone()
        return self.get(row[0]) if row else None

    # -- reads ------------------------------------------------------------------------------

    def get(self, run_id: str) -> RunRecord | None:
        """The run ``run_id``, if any."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?",  # noqa: S608 - fixed columns
                (run_id,),
            ).fetchone()
        return _run(row) if row else None

    def _get(self, run_id: str) -> RunRecord:
        found = self.get(run_id)
        assert found is not None
        return found

    def runs(
        self,
        *,
        owner: str | None = None,
        schedule_id: int | None = None,
        statuses: Iterable[str] | None = None,
        limit: int | None = None,
    ) -> list[RunRecord]:
        """Runs, newest first, filtered by owner, schedule and status."""
        where: list[str] = []
        args: list[Any] = []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if schedule_id is not None:
            where.append("schedule_id = ?")
            args.append(schedule_id)
        if statuses is not None:
            wanted = list(statuses)
            where.append(f"status IN ({', '.join('?' for _ in wanted)})")
            args += wanted
        sql = f"SELECT {_RUN_COLUMNS} FROM runs"  # noqa: S608 - fixed columns, placeholders
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, rowid DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [_run(row) for row in rows]


def _schedule(row: Any) -> ScheduleRecord:
    spec = ScheduleSpec.parse(json.loads(row[3]), where=f"stored schedule {row[2]}")
    return ScheduleRecord(
        id=row[0],
        owner=row[1],
        spec=spec,
        notebook_name=row[4],
        notebook_sha256=row[5],
        source=row[6],
        paused=bool(row[7]),
        next_due=row[8],
        last_fire=row[9],
        created_at=row[10],
        created_by=row[11],
    )


def _run(row: Any) -> RunRecord:
    return RunRecord(
        id=row[0],
        owner=row[1],
        actor=row[2],
        schedule_id=row[3],
        schedule_name=row[4],
        scheduled_for=row[5],
        attempt=row[6],
        status=row[7],
        notebook_name=row[8],
        notebook_sha256=row[9],
        parameters=json.loads(row[10]),
        pool=row[11],
        gpus=row[12],
        git_commit=row[13],
        created_at=row[14],
        not_before=row[15],
        started_at=row[16],
        finished_at=row[17],
        message=row[18],
        failed_cell=row[19],
        traceback=row[20],
        lease=row[21],
        executed_sha256=row[22],
        provenance_sha256=row[23],
        models=tuple(json.loads(row[24])),
        datasets=tuple(json.loads(row[25])),
    )
