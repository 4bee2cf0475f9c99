"""Schedules an administrator owns in ``ztlab.toml`` (``[[runs.schedules]]``).

When the hub starts, the run database is made to match the file: a configured schedule
that is new is added, one whose spec or notebook changed is changed (its next fire
recomputed from now), one gone from the file is removed (its queued runs cancelled), and
its ``paused`` flag follows the file. The notebook is read from its path and kept by its
SHA-256, so editing the file on disk changes nothing until the hub restarts. A configured
notebook that cannot be read stops the hub, naming the schedule and the path.
"""

from __future__ import annotations

from typing import Any

from ztlab.hub.runs.store import RunStoreError

__all__ = ["sync_configured"]


def sync_configured(runs: Any, *, actor: str) -> None:
    """Make ``runs`` (a :class:`~ztlab.hub.runs.service.RunService`) hold the schedules of
    its configuration's ``[[runs.schedules]]``; ``actor`` records the changes."""
    store = runs.store
    wanted = {(s.owner, s.name): s for s in runs.settings.schedules}
    for record in store.schedules():
        if record.source == "config" and (record.owner, record.name) not in wanted:
            cancelled = store.remove_schedule(record)
            runs.record(
                actor, "schedule.removed", schedule=record.name, owner=record.owner,
                cancelled=cancelled,
            )  # fmt: skip
    for (owner, name), configured in wanted.items():
        where = f"runs.schedules {owner}/{name} notebook"
        try:
            data = configured.notebook.read_bytes()
        except OSError as exc:
            raise RunStoreError(
                f"{where}: cannot read {configured.notebook}: {exc.strerror}",
                hint="fix the path in ztlab.toml ([[runs.schedules]] notebook)",
            ) from exc
        digest = runs.keep_notebook(data, where=f"{where} {configured.notebook}")
        spec = configured.spec()
        existing = store.schedule(owner, name)
        if existing is not None and existing.source != "config":
            raise RunStoreError(
                f"runs.schedules: {owner} has a schedule {name!r} of their own",
                hint="give the configured schedule another name",
            )
        if existing is None:
            record = store.add_schedule(
                owner,
                spec,
                notebook_name=configured.notebook.name,
                notebook_sha256=digest,
                source="config",
                created_by=actor,
                paused=configured.paused,
            )
            runs.schedule_added(record, actor)
            continue
        if existing.spec != spec or existing.notebook_sha256 != digest:
            store.replace_schedule(
                existing, spec, notebook_name=configured.notebook.name, sha256=digest
            )
            changed = store.schedule(owner, name)
            assert changed is not None
            runs.schedule_added(changed, actor)
        if existing.paused != configured.paused:
            store.set_paused(existing, configured.paused)
