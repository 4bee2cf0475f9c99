"""Notebook runs with papermill, by hand and on schedules: the control plane's scheduler.

- :mod:`ztlab.hub.runs.store` -- schedules, fires and runs in SQLite (exactly-once fires);
- :mod:`ztlab.hub.runs.service` -- :class:`RunService`: the scheduler's thread, each run's
  steps (decide, lease, sandbox, run, finish), retries, recovery after a crash, provenance;
- :mod:`ztlab.hub.runs.provenance` -- what a run made, its SLSA statement, and the check of
  a model version's run provenance for approvals;
- :mod:`ztlab.hub.runs.configured` -- ``[[runs.schedules]]`` synced when the hub starts;
- :mod:`ztlab.hub.runs.notify` -- the owner's webhook for runs that did not succeed;
- :mod:`ztlab.hub.runs.notebook` -- reading an executed notebook (which cell failed).

The sandbox a run executes in is made by the hub's launcher
(:mod:`ztlab.hub.spawner.runs`), with the same parts as a user's server.
"""

from ztlab.hub.runs.service import RunHandle, RunLauncher, RunRefused, RunService
from ztlab.hub.runs.store import RunRecord, RunStore, RunStoreError, ScheduleRecord

__all__ = [
    "RunHandle",
    "RunLauncher",
    "RunRecord",
    "RunRefused",
    "RunService",
    "RunStore",
    "RunStoreError",
    "ScheduleRecord",
]
