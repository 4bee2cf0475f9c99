"""Notebook runs under their owner's identity, in their owner's sandbox, with signed provenance.

:class:`RunService` is the control plane's scheduler. It runs one thread in the hub process,
independent of any user's server: every ``[runs] tick_seconds`` it makes the runs of the
fire times that have come (:meth:`~ztlab.hub.runs.store.RunStore.fire_due`) and starts the
queued runs whose time has come; a run started by hand wakes it at once.

Each run follows fixed steps in a thread of its own, each outcome audited:

1. **decide** -- the identity provider is asked about the owner again (a disabled account,
   or one that lost its groups, is refused) and the policy decides ``run_schedule`` on
   ``schedule:OWNER/NAME`` (``schedule:OWNER/once`` for a run started by hand) with the
   owner's roles now;
2. **lease** -- the GPUs asked for are leased as ``run-ID`` (the roles' quotas apply, over
   everything the owner holds);
3. **sandbox** -- the launcher (the hub's, :mod:`ztlab.hub.spawner.runs`) makes the run's
   cgroup ``ACCOUNT-run-ID`` with the owner's limits and a device fence, puts it in the
   owner's network namespace and bubblewrap sandbox with their dataset mounts and
   environments, and gives it a hub token for this run only, expiring with it;
4. **run** -- papermill executes the notebook (``ztlab.kernels.run``); the run ends when it
   exits, is cancelled, or passes ``max_hours``;
5. **finish** -- the executed notebook is copied out and hashed, the sandbox ended, the
   token revoked, the lease released. A run whose every cell ran must have its registered
   models signed; its SLSA provenance is signed and stored with its MLflow runs, here and in
   the audit log. A run that failed says which cell raised, with its traceback, and the
   model versions it registered are withdrawn.

A failed or interrupted scheduled run is retried as its schedule says. A scheduler that
dies (``kill -9``) leaves runs active in the database: the next one ends what is left of
them (:meth:`RunService.start`), marks them ``interrupted`` and retries them by their
policy -- a run never runs twice at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

from ztlab.common.attest import PrivateKey, key_id
from ztlab.common.attest.provenance import sign_run_provenance
from ztlab.common.config import ZtlabConfig
from ztlab.common.errors import ZtlabError
from ztlab.common.schedule import ScheduleError, ScheduleSpec, check_notebook, check_parameters
from ztlab.hub.policy import PolicyEngine, Principal
from ztlab.hub.private import private_directory, write_private_file
from ztlab.hub.runs.configured import sync_configured
from ztlab.hub.runs.notebook import failed_cell
from ztlab.hub.runs.notify import failure_document, post_json
from ztlab.hub.runs.provenance import (
    ModelProvenance,
    collect_outputs,
    model_provenance,
    run_statement,
)
from ztlab.hub.runs.store import (
    ACTIVE,
    RunRecord,
    RunStore,
    RunStoreError,
    ScheduleRecord,
)
from ztlab.hub.timestamps import utc_iso

__all__ = ["RunHandle", "RunLauncher", "RunRefused", "RunService"]

_log = logging.getLogger("ztlab.runs")

#: the actor of what the scheduler does on its own
SCHEDULER: Final = "ztlab-scheduler"
Record = Callable[..., None]


class RunRefused(RunStoreError):
    """A run may not start, or a request about runs is not allowed (403)."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, status=403, hint=hint)


class RunHandle(Protocol):
    """A started run's sandbox (what :meth:`RunLauncher.start` returns)."""

    #: the run's cgroup
    cgroup: str
    #: the environment it runs in: (name, ``sha256:HEX`` of its lock, or of the kernel
    #: runtime for the secure kernel), ``None`` when unknown
    environment: tuple[str, str] | None

    def wait(self, timeout: float | None) -> int | None:
        """The exit status, or ``None`` if it still runs after ``timeout`` seconds."""

    def kill(self) -> None:
        """Kill everything in the run's cgroup."""

    def executed(self, limit: int) -> bytes | None:
        """The executed notebook the run wrote (``None``: none, or too large)."""

    def said(self) -> str:
        """The runner's last words (its log's last ``ztlab run:`` line), for a failure."""

    def memory_exceeded(self) -> int | None:
        """The run's memory limit (bytes) when it killed one of its processes, else
        ``None`` (asked before the sandbox ends)."""


class RunLauncher(Protocol):
    """Starts runs in sandboxes (the hub's: :class:`~ztlab.hub.spawner.runs.SandboxRunLauncher`)."""

    def start(
        self, run: RunRecord, principal: Principal, lease: Any, notebook: bytes, *, seconds: float
    ) -> RunHandle:
        """Sandbox, token and process of ``run``; raises :class:`ZtlabError` saying why not."""

    def end(self, run: RunRecord) -> None:
        """Kill what is left of ``run``, revoke its token, remove its folder (idempotent;
        works from the record alone, after a restart)."""


class RunService:
    """The scheduler and the runs (see the module docstring)."""

    def __init__(
        self,
        config: ZtlabConfig,
        *,
        policy: PolicyEngine,
        record: Record,
        key: PrivateKey,
        leases: Any = None,
        inventory: Any = None,
        models: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.settings = config.runs
        self.policy = policy
        self.record = record
        self.key = key
        self.keyid = key_id(key.public_key())
        self.leases = leases
        self.inventory = inventory
        self.models = models
        self.clock = clock
        base = private_directory(config.state_dir / "runs", what="run directory", tighten=True)
        self.store = RunStore(base / "runs.sqlite", clock=clock)
        self.notebooks = private_directory(base / "notebooks", what="run notebook store")
        self.outputs = private_directory(base / "outputs", what="run output store")
        #: starts runs in sandboxes (set by the hub)
        self.launcher: RunLauncher | None = None
        #: the owner as the identity provider vouches for them now (set by the hub; raises
        #: :class:`RunRefused` for a disabled account or one with no role)
        self.vouch: Callable[[str], Principal] | None = None
        self._handles: dict[str, RunHandle] = {}
        self._cancelled: dict[str, tuple[str, str]] = {}
        self._workers: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    # -- notebooks --------------------------------------------------------------------------

    def keep_notebook(self, data: bytes, *, where: str) -> str:
        """Check and keep a notebook's bytes (by SHA-256); return the digest."""
        if len(data) > self.settings.max_notebook_bytes:
            raise RunStoreError(
                f"{where} is {len(data)} bytes; runs take notebooks up to "
                f"{self.settings.max_notebook_bytes} bytes",
                status=413,
                hint="clear the notebook's outputs, or ask an admin to raise "
                "[runs] max_notebook_bytes",
            )
        check_notebook(data, where=where)
        digest = hashlib.sha256(data).hexdigest()
        path = self.notebooks / f"{digest}.ipynb"
        if not path.exists():
            with contextlib.suppress(FileExistsError):  # kept meanwhile by another request
                write_private_file(path, data)
        return digest

    def notebook(self, sha256: str) -> bytes:
        """The kept notebook with this digest (checked again as it is read)."""
        data = (self.notebooks / f"{sha256}.ipynb").read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise RunStoreError(f"the kept notebook {sha256[:12]} changed on disk", status=500)
        return data

    # -- requests ---------------------------------------------------------------------------

    def _decide(self, principal: Principal, resource: str) -> None:
        decision = self.policy.authorize(principal, "run_schedule", resource)
        if not decision.allowed:
            raise RunRefused(
                f"{principal.name} may not run notebooks ({resource}): {decision.reason}",
                hint="runs need a role the policy lets run_schedule (trainer, admin)",
            )

    def _check_pool(self, pool: str | None, gpus: int) -> str | None:
        if not gpus:
            return None
        pools = self.config.gpu.pools
        chosen = pool or (next(iter(pools)) if len(pools) == 1 else None)
        if chosen not in pools:
            known = ", ".join(pools) or "none"
            raise RunStoreError(
                f"there is no GPU pool {chosen!r}" if chosen else "name the GPU pool (--pool)",
                hint=f"pools: {known}",
            )
        return chosen

    def submit(
        self,
        principal: Principal,
        *,
        notebook_name: str,
        notebook: bytes,
        parameters: Mapping[str, Any],
        pool: str | None = None,
        gpus: int = 0,
        git_commit: str | None = None,
    ) -> RunRecord:
        """Queue a run started by hand; it starts at once (checked again when it does)."""
        self._decide(principal, f"schedule:{principal.name}/once")
        try:
            checked = check_parameters(parameters)
        except ScheduleError as exc:
            raise RunStoreError(exc.message, hint=exc.hint) from exc
        digest = self.keep_notebook(notebook, where=notebook_name)
        run = self.store.submit(
            owner=principal.name,
            actor=principal.name,
            notebook_name=notebook_name,
            notebook_sha256=digest,
            parameters=checked,
            pool=self._check_pool(pool, gpus),
            gpus=gpus,
            git_commit=git_commit,
        )
        self._queued(run)
        self._wake.set()
        return run

    def add_schedule(
        self, principal: Principal, spec: ScheduleSpec, *, notebook_name: str, notebook: bytes
    ) -> ScheduleRecord:
        """Keep a new schedule of ``principal`` (decided now, and again at every run)."""
        self._decide(principal, f"schedule:{principal.name}/{spec.name}")
        self._check_pool(spec.pool, spec.gpus)
        digest = self.keep_notebook(notebook, where=notebook_name)
        record = self.store.add_schedule(
            principal.name,
            spec,
            notebook_name=notebook_name,
            notebook_sha256=digest,
            source="api",
            created_by=principal.name,
        )
        self.schedule_added(record, principal.name)
        return record

    def schedule_added(self, record: ScheduleRecord, actor: str) -> None:
        """Record that ``record`` was added or changed (``schedule.added``)."""
        self.record(
            actor,
            "schedule.added",
            schedule=record.name,
            owner=record.owner,
            cron=record.spec.cron,
            timezone=record.spec.timezone,
            notebook=record.notebook_name,
            notebook_sha256=record.notebook_sha256,
            source=record.source,
        )

    def _may_manage(self, principal: Principal, owner: str) -> None:
        if principal.name != owner and "admin" not in principal.roles:
            raise RunRefused(f"{owner}'s runs and schedules are theirs (and admins')")

    def schedule(self, principal: Principal, owner: str, name: str) -> ScheduleRecord:
        """``owner``'s schedule ``name``, for its owner or an admin."""
        self._may_manage(principal, owner)
        found = self.store.schedule(owner, name)
        if found is None:
            raise RunStoreError(
                f"{owner} has no schedule {name!r}", status=404, hint="see ztlab schedule list"
            )
        return found

    def set_paused(
        self, principal: Principal, owner: str, name: str, paused: bool
    ) -> ScheduleRecord:
        """Pause or resume a schedule."""
        record = self.store.set_paused(self.schedule(principal, owner, name), paused)
        self.record(
            principal.name,
            "schedule.paused" if paused else "schedule.resumed",
            schedule=name,
            owner=owner,
        )
        return record

    def remove_schedule(self, principal: Principal, owner: str, name: str) -> list[str]:
        """Remove a schedule (an admin's from ``ztlab.toml`` only there)."""
        record = self.schedule(principal, owner, name)
        if record.source == "config":
            raise RunStoreError(
                f"{owner}/{name} is defined in ztlab.toml ([[runs.schedules]])",
                status=409,
                hint="remove it there and restart the hub, or pause it",
            )
        cancelled = self.store.remove_schedule(record)
        self.record(
            principal.name, "schedule.removed", schedule=name, owner=owner, cancelled=cancelled
        )
        return cancelled

    def _find(self, run_id: str) -> RunRecord:
        run = self.store.get(run_id)
        if run is None:
            raise RunStoreError(f"there is no run {run_id!r}", status=404)
        return run

    def get(self, principal: Principal, run_id: str) -> RunRecord:
        """A run, for its owner, an admin, or whoever the policy lets approve a model it
        made (``approve_model``, with the run's owner as the trainer): an approver reads
        the run behind the version they decide on."""
        run = self._find(run_id)
        if principal.name == run.owner or "admin" in principal.roles:
            return run
        for made in run.models:
            name, _, version = made.rpartition("@")
            resource = f"model:{name}@{version}"
            context = {"trainer": run.owner}
            if self.policy.authorize(principal, "approve_model", resource, context).allowed:
                return run
        raise RunRefused(
            f"{run.owner}'s runs are theirs, admins', and the approvers' of the models they made"
        )

    def cancel(self, principal: Principal, run_id: str, *, reason: str = "") -> RunRecord:
        """Cancel a queued run, or stop an active one (it ends ``cancelled``): its owner or
        an admin."""
        run = self._find(run_id)
        self._may_manage(principal, run.owner)
        return self._cancel(run, actor=principal.name, reason=reason or "cancelled by its owner")

    def cancel_by_system(self, run_id: str, *, reason: str) -> None:
        """Stop a run as the control plane (the GPU monitor's ``stop_server`` response)."""
        self._cancel(self._find(run_id), actor=SCHEDULER, reason=reason)

    def _cancel(self, run: RunRecord, *, actor: str, reason: str) -> RunRecord:
        if run.status == "queued":
            done = self.store.update(run.id, expect=("queued",), status="cancelled", message=reason)
            if done is not None:
                self._audit_run("run.cancelled", done, actor=actor, reason=reason)
                return done
            run = self.store.get(run.id) or run
        if run.status not in ACTIVE:
            raise RunStoreError(f"run {run.id} is {run.status}; only a queued or active run stops")
        with self._lock:
            self._cancelled[run.id] = (actor, reason)
            handle = self._handles.get(run.id)
        if handle is not None:
            handle.kill()
        return run

    def provenance(self, principal: Principal, run_id: str) -> bytes:
        """The signed provenance envelope of a run (for whoever may :meth:`get` it)."""
        run = self.get(principal, run_id)
        return self.envelope_of(run)

    def envelope_of(self, run: RunRecord) -> bytes:
        """The stored envelope of ``run`` (404 when it has none)."""
        path = self.outputs / run.id / "provenance.dsse.json"
        if not run.provenance_sha256 or not path.is_file():
            raise RunStoreError(
                f"run {run.id} has no provenance ({run.status})",
                status=404,
                hint="only a run whose every cell ran has signed provenance",
            )
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != run.provenance_sha256:
            raise RunStoreError(f"run {run.id}'s stored provenance changed on disk", status=500)
        return data

    def executed_notebook(self, principal: Principal, run_id: str) -> bytes:
        """The executed notebook a run left (for whoever may :meth:`get` it)."""
        run = self.get(principal, run_id)
        path = self.outputs / run.id / "executed.ipynb"
        if not run.executed_sha256 or not path.is_file():
            raise RunStoreError(f"run {run.id} left no executed notebook", status=404)
        return path.read_bytes()

    def provenance_of_model(self, name: str, version: str, run_id: str) -> ModelProvenance | None:
        """The provenance of the run that made MLflow run ``run_id`` (a model version's
        run), verified now (:func:`~ztlab.hub.runs.provenance.model_provenance`); ``None``
        when the version was not trained by a run."""
        run = self.store.run_of_mlflow(run_id) if run_id else None
        if run is None:
            return None
        try:
            envelope: bytes | ZtlabError = self.envelope_of(run)
        except ZtlabError as error:
            envelope = error
        return model_provenance(
            run, envelope, name=name, version=version, keyid=self.keyid,
            key=self.key.public_key(),
        )  # fmt: skip

    def attach_mlflow_run(self, run_id: str, mlflow_run_id: str) -> None:
        """The hub saw run ``run_id``'s token create MLflow run ``mlflow_run_id``."""
        if self.store.get(run_id) is not None:
            self.store.attach_mlflow_run(run_id, mlflow_run_id)

    # -- schedules from ztlab.toml ---------------------------------------------------------

    def sync_configured(self) -> None:
        """Make the schedules from ``[[runs.schedules]]`` match the file
        (:mod:`ztlab.hub.runs.configured`)."""
        sync_configured(self, actor=SCHEDULER)

    # -- the scheduler ----------------------------------------------------------------------

    def start(self) -> None:
        """End what a dead scheduler left, then start the scheduler's thread."""
        if self.launcher is None:
            raise RunStoreError("the run service has no launcher (the hub sets it)", status=500)
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="ztlab-runs", daemon=True)
        self._thread.start()

    def recover(self) -> list[RunRecord]:
        """Runs a dead scheduler left active: end them, mark them ``interrupted``, retry."""
        ended = []
        for run in self.store.left_active():
            reason = f"its scheduler stopped while it was {run.status} (hub restarted)"
            self._clean_up(run)
            withdrawn = self._withdraw(run, reason=f"run {run.id} was interrupted")
            done = self.store.update(run.id, expect=ACTIVE, status="interrupted", message=reason)
            if done is None:
                continue
            self._audit_run("run.interrupted", done, reason=reason, models_withdrawn=withdrawn)
            self._notify(done)
            self._maybe_retry(done)
            ended.append(done)
        return ended

    def _loop(self) -> None:
        while not self._closed.is_set():
            try:
                self.tick()
            except Exception:
                _log.exception("the run scheduler's tick failed")
            self._wake.wait(self.settings.tick_seconds)
            self._wake.clear()

    def tick(self, now: float | None = None) -> list[str]:
        """One pass: make due fires' runs, start queued runs; the ids started."""
        moment = self.clock() if now is None else now
        for run in self.store.fire_due(moment, on_time_seconds=self.settings.on_time_seconds):
            if run.status == "queued":
                self._queued(run)
            else:
                self._audit_run(
                    "run.skipped",
                    run,
                    scheduled_for=utc_iso(run.scheduled_for or moment),
                    status=run.status,
                    reason=run.message,
                )
        started = []
        active: dict[str, int] = {}
        for run in self.store.runs(statuses=ACTIVE):
            active[run.owner] = active.get(run.owner, 0) + 1
        for run in self.store.claimable(moment):
            if active.get(run.owner, 0) >= self.settings.max_active_per_user:
                continue
            claimed = self.store.claim(run.id)
            if claimed is None:
                continue
            active[run.owner] = active.get(run.owner, 0) + 1
            worker = threading.Thread(
                target=self._execute, args=(claimed,), name=f"ztlab-run-{run.id}", daemon=True
            )
            with self._lock:
                self._workers[run.id] = worker
            worker.start()
            started.append(run.id)
        return started

    def wait(self, run_id: str, timeout: float | None = None) -> RunRecord | None:
        """Wait for a run's worker thread (tests, benchmarks); the run as it is then."""
        with self._lock:
            worker = self._workers.get(run_id)
        if worker is not None:
            worker.join(timeout)
        return self.store.get(run_id)

    def close(self) -> None:
        """Stop the scheduler. Active runs are left as they are (the next hub ends them)."""
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.store.close()

    # -- one run ------------------------------------------------------------------------------

    def _execute(self, run: RunRecord) -> None:
        """The steps of one run (module docstring), in its own thread."""
        try:
            self._steps(run)
        except Exception as exc:  # never leave a run active: it would block its schedule
            _log.exception("run %s failed in the control plane", run.id)
            self._fail(run, f"the control plane failed: {type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._handles.pop(run.id, None)
                self._workers.pop(run.id, None)
                self._cancelled.pop(run.id, None)
            self._wake.set()  # a queued run of the same schedule or owner may start now

    def _steps(self, run: RunRecord) -> None:
        assert self.launcher is not None
        try:
            principal = self._principal(run.owner)
            self._decide(principal, run.resource)
        except RunRefused as exc:
            self._clean_up(run)
            done = self.store.update(run.id, expect=ACTIVE, status="refused", message=exc.message)
            if done is not None:
                self._audit_run("run.refused", done, reason=exc.message)
                self._notify(done)
            return
        lease = None
        try:
            lease = self._lease(run, principal)
            seconds = self.settings.max_hours * 3600
            handle = self.launcher.start(
                run, principal, lease, self.notebook(run.notebook_sha256), seconds=seconds
            )
        except ZtlabError as exc:
            self._clean_up(run)  # _fail withdraws what it registered
            self._fail(run, exc.message)
            return
        with self._lock:
            self._handles[run.id] = handle
            cancelled = run.id in self._cancelled
        if cancelled:
            handle.kill()
        running = self.store.update(
            run.id, expect=("starting",), status="running", lease=lease.id if lease else None
        )
        self._audit_run(
            "run.started",
            running or run,
            cgroup=handle.cgroup,
            lease=lease.id if lease is not None else None,
            gpus=list(lease.gpus) if lease is not None else [],
        )
        status = handle.wait(seconds)
        timed_out = status is None
        if timed_out:
            handle.kill()
            status = handle.wait(30)
        self._finish(running or run, handle, status, timed_out=timed_out)

    def _principal(self, owner: str) -> Principal:
        if self.vouch is None:
            raise RunRefused("this hub cannot ask the identity provider about run owners")
        return self.vouch(owner)

    def _lease(self, run: RunRecord, principal: Principal) -> Any:
        if not run.gpus:
            return None
        from ztlab.hub.gpu import LeaseError

        if self.leases is None or run.pool is None:
            raise RunStoreError("this hub has no GPU pools; run with 0 GPUs")
        try:
            return self.leases.grant(
                user=run.owner,
                roles=principal.roles,
                server=run.server,
                pool=run.pool,
                count=run.gpus,
                hours=self.settings.max_hours,
            )
        except LeaseError as exc:
            raise RunStoreError(
                f"no GPU for the run: {exc.message}" + (f" ({exc.hint})" if exc.hint else "")
            ) from exc

    def _finish(
        self, run: RunRecord, handle: RunHandle, status: int | None, *, timed_out: bool
    ) -> None:
        """Copy out, end, then judge the run (module docstring, step 5)."""
        self.store.update(run.id, expect=("running", "starting"), status="finishing")
        executed = handle.executed(self.settings.max_notebook_bytes)
        memory = handle.memory_exceeded()
        executed_sha = None
        if executed is not None:
            folder = private_directory(self.outputs / run.id, what="run output folder")
            write_private_file(folder / "executed.ipynb", executed)
            executed_sha = hashlib.sha256(executed).hexdigest()
        self._clean_up(run)  # sandbox ended, token revoked, lease released
        with self._lock:
            cancelled = self._cancelled.get(run.id)
        if cancelled is not None:
            self._withdraw(run, reason=f"run {run.id} was cancelled")
            done = self.store.update(
                run.id, expect=("finishing",), status="cancelled", message=cancelled[1],
                executed_sha256=executed_sha,
            )  # fmt: skip
            if done is not None:
                self._audit_run("run.cancelled", done, actor=cancelled[0], reason=cancelled[1])
            return
        if status == 0 and not timed_out:
            try:
                self._succeed(run, executed, executed_sha)
                return
            except ZtlabError as exc:
                self._fail(run, exc.message, executed_sha=executed_sha)
                return
        failure = failed_cell(executed) if executed is not None else None
        if timed_out:
            reason = f"it ran past [runs] max_hours ({self.settings.max_hours} h) and was stopped"
        elif memory is not None:  # the kernel killed: papermill saw a dead kernel, or a cell
            reason = (
                f"it was stopped by its memory limit ({memory // 2**20} MiB, the owner's "
                "role's quota)"
            )
        elif failure is not None:
            reason = f"cell {failure.index} raised {failure.error}"
        elif status == 4:
            reason = f"papermill could not run the notebook: {handle.said() or 'no reason given'}"
        else:
            reason = f"the run ended with exit status {status} (killed, or out of memory?)"
        self._fail(
            run,
            reason,
            failed=failure.index if failure else None,
            traceback=failure.traceback if failure else "",
            executed_sha=executed_sha,
        )

    def _succeed(self, run: RunRecord, executed: bytes | None, executed_sha: str | None) -> None:
        """Every cell ran: its models signed, its provenance signed and stored."""
        if executed is None or executed_sha is None:
            raise RunStoreError("the run left no executed notebook (or one too large to keep)")
        mlflow_runs = self.store.mlflow_runs_of(run.id)
        outputs = collect_outputs(self.models, mlflow_runs, run.owner)
        with self._lock:
            handle = self._handles.get(run.id)
        provenance, subjects = run_statement(
            run,
            executed_sha=executed_sha,
            outputs=outputs,
            environment=handle.environment if handle is not None else None,
            builder_id=self.config.public_url("/hub/ztlab/runs"),
            finished=self.clock(),
        )
        text = sign_run_provenance(provenance, subjects, self.key).to_json().encode()
        provenance_sha = hashlib.sha256(text).hexdigest()
        folder = private_directory(self.outputs / run.id, what="run output folder")
        write_private_file(folder / "provenance.dsse.json", text)
        stored_with = []
        if self.models is not None:
            for mlflow_run in mlflow_runs:
                self.models.store_run_file(mlflow_run, "provenance.dsse.json", text)
                self.models.store_run_file(mlflow_run, "executed.ipynb", executed)
                self.models.tag_run(mlflow_run, "ztlab.run", run.id)
                self.models.tag_run(mlflow_run, "ztlab.provenance", f"sha256:{provenance_sha}")
                self.models.end_run(mlflow_run, "FINISHED")
                stored_with.append(mlflow_run)
        done = self.store.update(
            run.id,
            expect=("finishing",),
            status="succeeded",
            message="every cell ran",
            executed_sha256=executed_sha,
            provenance_sha256=provenance_sha,
            models=[f"{n}@{v}" for n, v, _ in outputs.models],
            datasets=[
                {"dataset": k, "root": v["root"]} for k, v in sorted(outputs.datasets.items())
            ],
        )
        assert done is not None
        self._audit_run(
            "run.provenance",
            done,
            provenance_sha256=provenance_sha,
            keyid=self.keyid,
            subjects=[s.name for s in subjects],
            mlflow_runs=stored_with,
            envelope=json.loads(text),
        )
        self._audit_run(
            "run.succeeded",
            done,
            duration_seconds=round(done.duration or 0.0, 3),
            executed_sha256=executed_sha,
            provenance_sha256=provenance_sha,
            models=list(done.models),
            datasets=[dict(d) for d in done.datasets],
        )

    def _fail(
        self,
        run: RunRecord,
        reason: str,
        *,
        failed: int | None = None,
        traceback: str = "",
        executed_sha: str | None = None,
    ) -> None:
        withdrawn = self._withdraw(run, reason=f"run {run.id} failed: {reason}")
        done = self.store.update(
            run.id,
            expect=ACTIVE,
            status="failed",
            message=reason,
            failed_cell=failed,
            traceback=traceback,
            executed_sha256=executed_sha,
        )
        if done is None:
            return
        detail: dict[str, Any] = {"reason": reason, "models_withdrawn": withdrawn}
        if failed is not None:
            detail["failed_cell"] = failed
        if done.duration is not None:
            detail["duration_seconds"] = round(done.duration, 3)
        if executed_sha is not None:
            detail["executed_sha256"] = executed_sha
        self._audit_run("run.failed", done, **detail)
        self._notify(done)
        self._maybe_retry(done)

    def _clean_up(self, run: RunRecord) -> None:
        """End the sandbox, revoke the token, release the lease."""
        if self.launcher is not None:
            try:
                self.launcher.end(run)
            except Exception:
                _log.exception("ending run %s's sandbox failed", run.id)
        if self.leases is not None:
            with contextlib.suppress(ZtlabError):
                self.leases.release_server(user=run.owner, server=run.server, reason="run ended")

    def _withdraw(self, run: RunRecord, *, reason: str) -> list[str]:
        """Delete the model versions a run that did not succeed registered."""
        if self.models is None:
            return []
        withdrawn = []
        for mlflow_run in self.store.mlflow_runs_of(run.id):
            try:
                versions = self.models.versions_of_run(mlflow_run)
                for name, version in versions:
                    self.models.withdraw(name, version, actor=SCHEDULER, reason=reason)
                    withdrawn.append(f"{name}@{version}")
                self.models.end_run(mlflow_run, "FAILED")
            except ZtlabError as exc:
                _log.error("withdrawing the models of run %s failed: %s", run.id, exc.message)
        return withdrawn

    def _maybe_retry(self, run: RunRecord) -> None:
        if run.schedule_id is None:
            return
        schedule = self.store.schedule_by_id(run.schedule_id)
        if schedule is None or run.attempt > schedule.spec.retries:
            return
        delay = schedule.spec.backoff(run.attempt + 1)
        retry = self.store.retry(run, delay=delay)
        self._queued(retry)

    # -- records ---------------------------------------------------------------------------

    def _queued(self, run: RunRecord) -> None:
        detail: dict[str, Any] = {
            "notebook": run.notebook_name,
            "notebook_sha256": run.notebook_sha256,
            "parameters": dict(run.parameters),
        }
        if run.scheduled_for is not None:
            detail["scheduled_for"] = utc_iso(run.scheduled_for)
        self._audit_run("run.queued", run, actor=run.actor, **detail)

    def _audit_run(
        self, action: str, run: RunRecord, *, actor: str = SCHEDULER, **detail: Any
    ) -> None:
        base: dict[str, Any] = {"run": run.id, "owner": run.owner, "attempt": run.attempt}
        if run.schedule_name is not None:
            base["schedule"] = run.schedule_name
        self.record(actor, action, **base, **detail)

    def _notify(self, run: RunRecord) -> None:
        """Tell the owner's webhook (``[runs] notify_url``) that a run did not succeed."""
        if self.settings.notify_url:
            page = self.config.public_url(f"/hub/ztlab/runs/{run.id}")
            post_json(self.settings.notify_url, failure_document(run, page=page))
