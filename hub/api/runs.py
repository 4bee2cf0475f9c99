"""Notebook runs and their schedules (``ztlab run``, ``ztlab schedule``).

======  ==============================================  ==========================================
method  path                                            what (the owner, or an admin)
======  ==============================================  ==========================================
POST    ``/api/ztlab/runs``                             start a run: ``{"notebook": {"name",
                                                        "content" (base64)}, "parameters", "pool",
                                                        "gpus", "git_commit"}`` (201)
GET     ``/api/ztlab/runs``                             your runs, newest first (``?schedule=``,
                                                        ``?status=``, ``?limit=``; admins:
                                                        ``?all=1``)
GET     ``/api/ztlab/runs/ID``                          one run (status, cell that failed,
                                                        traceback, digests, models)
POST    ``/api/ztlab/runs/ID/cancel``                   cancel a queued or active run
GET     ``/api/ztlab/runs/ID/provenance``               its signed provenance (DSSE envelope)
GET     ``/api/ztlab/runs/ID/notebook``                 the executed notebook
POST    ``/api/ztlab/schedules``                        add a schedule: the fields of
                                                        :class:`~ztlab.common.schedule.ScheduleSpec`
                                                        and ``notebook`` as above (201)
GET     ``/api/ztlab/schedules``                        your schedules (admins: ``?all=1``)
GET     ``/api/ztlab/schedules/OWNER/NAME``             one, with its last runs
POST    ``/api/ztlab/schedules/OWNER/NAME/pause``       pause (``resume`` to resume)
DELETE  ``/api/ztlab/schedules/OWNER/NAME``             remove (queued runs are cancelled)
GET     ``/api/ztlab/provenance/trust``                 the key provenance is signed with (PEM)
======  ==============================================  ==========================================
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

from tornado import web

from ztlab.common.attest import public_key_pem
from ztlab.common.errors import UsageError, ZtlabError
from ztlab.common.schedule import ScheduleSpec
from ztlab.hub.api.base import ZtlabAPIHandler

__all__ = ["run_handlers"]

_ID = r"([0-9a-f]{12})"
_NAME = r"([^/]+)"


class _RunsHandler(ZtlabAPIHandler):
    @property
    def runs(self) -> Any:
        """The run service, or a 404 on a hub without one."""
        if self.plane.runs is None:
            raise web.HTTPError(
                404, "This hub runs no notebooks ([runs] enabled = false, or no [sandbox])."
            )
        return self.plane.runs

    def notebook(self, body: dict[str, Any]) -> tuple[str, bytes]:
        """``{"notebook": {"name", "content"}}``: the name and the decoded bytes."""
        notebook = body.get("notebook")
        if not isinstance(notebook, dict):
            raise UsageError('the request needs "notebook": {"name": ..., "content": base64}')
        name = notebook.get("name")
        content = notebook.get("content")
        if not isinstance(name, str) or not name or "/" in name or not isinstance(content, str):
            raise UsageError("notebook.name must be a file name and notebook.content base64")
        try:
            return name, base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise UsageError(f"notebook.content is not base64: {exc}") from exc

    async def call(self, function: Any, *args: Any, status: int = 200, **kwargs: Any) -> None:
        """Run a service call in a thread; reply with its JSON, or fail with its error."""
        try:
            result = await asyncio.to_thread(function, *args, **kwargs)
        except ZtlabError as error:
            await self.fail(error)
            return
        await self.reply(result, status)


def _gpus(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 64:
        raise UsageError(f"gpus must be a whole number from 0 to 64, got {value!r}")
    return value


class RunsHandler(_RunsHandler):
    """Start a run; list runs."""

    async def post(self) -> None:
        principal = await self.principal()
        try:
            body = self.body()
            name, data = self.notebook(body)
            parameters = body.get("parameters") or {}
            gpus = _gpus(body.get("gpus", 0))
            commit = body.get("git_commit")
            if commit is not None and not isinstance(commit, str):
                raise UsageError("git_commit must be a string")
        except ZtlabError as error:
            await self.fail(error)
            return

        def submit() -> dict[str, Any]:
            run = self.runs.submit(
                principal,
                notebook_name=name,
                notebook=data,
                parameters=parameters,
                pool=body.get("pool"),
                gpus=gpus,
                git_commit=commit,
            )
            return dict(run.as_json())

        await self.call(submit, status=201)

    async def get(self) -> None:
        principal = await self.principal()
        everyone = "admin" in principal.roles and self.get_argument("all", "0") in ("1", "true")
        status = self.get_argument("status", None)
        schedule = self.get_argument("schedule", None)
        try:
            limit = int(self.get_argument("limit", "50"))
        except ValueError:
            raise web.HTTPError(400, "limit must be a whole number") from None

        def listing() -> dict[str, Any]:
            runs = self.runs.store.runs(
                owner=None if everyone else principal.name,
                statuses=[status] if status else None,
                limit=None if schedule else max(1, min(limit, 1000)),
            )
            if schedule:
                runs = [r for r in runs if r.schedule_name == schedule][:limit]
            return {"runs": [r.as_json() for r in runs]}

        await self.call(listing)


class RunHandler(_RunsHandler):
    """One run."""

    async def get(self, run_id: str) -> None:
        principal = await self.principal()
        await self.call(lambda: self.runs.get(principal, run_id).as_json())


class RunCancelHandler(_RunsHandler):
    """Cancel a run."""

    async def post(self, run_id: str) -> None:
        principal = await self.principal()
        reason = str(self.body().get("reason") or "")
        await self.call(lambda: self.runs.cancel(principal, run_id, reason=reason).as_json())


class RunFileHandler(_RunsHandler):
    """A run's provenance envelope or executed notebook."""

    async def get(self, run_id: str, what: str) -> None:
        principal = await self.principal()
        reader = self.runs.provenance if what == "provenance" else self.runs.executed_notebook
        try:
            data = await asyncio.to_thread(reader, principal, run_id)
        except ZtlabError as error:
            await self.fail(error)
            return
        await self.plane.flush()
        self.set_header("Content-Type", "application/json")
        self.finish(data)


class TrustHandler(_RunsHandler):
    """The public key run provenance is signed with (for offline verification)."""

    async def get(self) -> None:
        await self.principal()
        key = self.runs.key.public_key()
        await self.reply({"keyid": self.runs.keyid, "public_key": public_key_pem(key)})


class SchedulesHandler(_RunsHandler):
    """Add a schedule; list schedules."""

    async def post(self) -> None:
        principal = await self.principal()
        try:
            body = self.body()
            name, data = self.notebook(body)
            spec = ScheduleSpec.parse(
                {k: v for k, v in body.items() if k != "notebook"}, where="schedule"
            )
        except ZtlabError as error:  # a bad schedule (ScheduleError) among them
            await self.fail(error)
            return
        await self.call(
            lambda: self.runs.add_schedule(
                principal, spec, notebook_name=name, notebook=data
            ).as_json(),
            status=201,
        )

    async def get(self) -> None:
        principal = await self.principal()
        everyone = "admin" in principal.roles and self.get_argument("all", "0") in ("1", "true")
        records = self.runs.store.schedules(owner=None if everyone else principal.name)
        await self.reply({"schedules": [r.as_json() for r in records]})


class ScheduleHandler(_RunsHandler):
    """One schedule: show, remove."""

    async def get(self, owner: str, name: str) -> None:
        principal = await self.principal()

        def show() -> dict[str, Any]:
            record = self.runs.schedule(principal, owner, name)
            runs = self.runs.store.runs(schedule_id=record.id, limit=20)
            return {**record.as_json(), "runs": [r.as_json() for r in runs]}

        await self.call(show)

    async def delete(self, owner: str, name: str) -> None:
        principal = await self.principal()
        await self.call(lambda: {"cancelled": self.runs.remove_schedule(principal, owner, name)})


class SchedulePauseHandler(_RunsHandler):
    """Pause or resume a schedule."""

    async def post(self, owner: str, name: str, action: str) -> None:
        principal = await self.principal()
        await self.call(
            lambda: self.runs.set_paused(principal, owner, name, action == "pause").as_json()
        )


def run_handlers() -> list[tuple[str, Any]]:
    """The handlers, relative to the hub prefix."""
    return [
        (r"/api/ztlab/runs", RunsHandler),
        (rf"/api/ztlab/runs/{_ID}", RunHandler),
        (rf"/api/ztlab/runs/{_ID}/cancel", RunCancelHandler),
        (rf"/api/ztlab/runs/{_ID}/(provenance|notebook)", RunFileHandler),
        (r"/api/ztlab/provenance/trust", TrustHandler),
        (r"/api/ztlab/schedules", SchedulesHandler),
        (rf"/api/ztlab/schedules/{_NAME}/{_NAME}", ScheduleHandler),
        (rf"/api/ztlab/schedules/{_NAME}/{_NAME}/(pause|resume)", SchedulePauseHandler),
    ]
