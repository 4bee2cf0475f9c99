"""``/hub/ztlab/runs``: notebook runs, their schedules, and each run's signed provenance.

Cookie-authenticated (the signed-in user). The list shows the user's own runs, newest
first, with their schedules above them; an admin sees everyone's with ``?all=1``.
``/hub/ztlab/runs/ID`` shows one run: every field the API gives, the cell that failed with
its traceback, and -- for a run whose every cell ran -- its provenance statement, verified
again against the control plane's key as the page is made. Another user's run is a 403
(admins see all), as in the API (:mod:`ztlab.hub.api.runs`); the page only reads.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from typing import Any

from jupyterhub.handlers.base import BaseHandler
from tornado import web

from ztlab.common.attest.dsse import Envelope, SignatureError
from ztlab.common.attest.provenance import verify_run_provenance
from ztlab.common.errors import ZtlabError
from ztlab.hub.controlplane import ControlPlane, control_plane
from ztlab.hub.identity import user_principal

__all__ = [
    "RunsPage",
    "digest_text",
    "provenance_view",
    "read_provenance",
    "run_page_handlers",
]

#: statuses shown as a failure (red), and as "did not run" (grey)
FAILED = frozenset({"failed", "refused", "interrupted"})
NOT_RUN = frozenset({"skipped", "missed", "cancelled"})
#: the most runs the list shows
LIST_LIMIT = 200
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def digest_text(digest: Any) -> str:
    """A digest set (``{"sha256": "…"}``) as ``sha256:…`` (several joined with ``, ``)."""
    return ", ".join(f"{algorithm}:{value}" for algorithm, value in _object(digest).items())


def provenance_view(statement: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a run's provenance statement (SLSA provenance v1, see
    :mod:`ztlab.common.attest.provenance`) a page shows; missing parts are empty."""
    predicate = _object(statement.get("predicate"))
    definition = _object(predicate.get("buildDefinition"))
    external = _object(definition.get("externalParameters"))
    internal = _object(definition.get("internalParameters"))
    details = _object(predicate.get("runDetails"))
    metadata = _object(details.get("metadata"))
    builder = _object(details.get("builder"))
    notebook = _object(external.get("notebook"))
    dependencies = [_object(d) for d in definition.get("resolvedDependencies") or []]
    named = [(str(d.get("name", "")), _object(d.get("digest"))) for d in dependencies]
    git_commit = next((digest["gitCommit"] for _, digest in named if "gitCommit" in digest), None)
    return {
        "subjects": [
            {"name": str(s.get("name", "")), "digest": digest_text(s.get("digest"))}
            for s in map(_object, statement.get("subject") or [])
        ],
        "notebook": {
            "name": str(notebook.get("name", "")),
            "sha256": str(_object(notebook.get("digest")).get("sha256", "")),
        },
        "git_commit": git_commit,
        "parameters": _object(external.get("parameters")),
        "schedule": external.get("schedule"),
        "owner": internal.get("owner"),
        "pool": internal.get("pool"),
        "gpus": internal.get("gpus"),
        "datasets": [
            {"name": name.removeprefix("dataset:"), "digest": digest_text(digest)}
            for name, digest in named
            if name.startswith("dataset:")
        ],
        "environment": next(
            (
                {"name": name.removeprefix("environment:"), "digest": digest_text(digest)}
                for name, digest in named
                if name.startswith("environment:")
            ),
            None,
        ),
        "builder": str(builder.get("id", "")),
        "builder_version": str(_object(builder.get("version")).get("ztlab", "")),
        "invocation": metadata.get("invocationId"),
        "started": metadata.get("startedOn"),
        "finished": metadata.get("finishedOn"),
        "byproducts": [
            {"name": str(b.get("name", "")), "digest": digest_text(b.get("digest"))}
            for b in map(_object, details.get("byproducts") or [])
        ],
    }


def duration_text(seconds: float | None) -> str:
    """``2h 03m``, ``4m 05s``, ``12.3 s``; empty when the run did not start."""
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def moment_text(value: str | None) -> str:
    """An RFC 3339 UTC time as the page shows it (``2026-12-06 14:05:00``)."""
    return value[:19].replace("T", " ") if value else ""


def status_class(status: str) -> str:
    """The Bootstrap colour of a status badge."""
    if status in FAILED:
        return "danger"
    if status in NOT_RUN:
        return "secondary"
    if status == "succeeded":
        return "success"
    return "info"


def _row(run: Mapping[str, Any]) -> dict[str, Any]:
    """A run's JSON with what the list shows, formatted."""
    return {
        **run,
        "failure": run["status"] in FAILED,
        "badge": status_class(run["status"]),
        "scheduled": moment_text(run["scheduled_for"]),
        "started": moment_text(run["started_at"]),
        "finished": moment_text(run["finished_at"]),
        "took": duration_text(run["duration_seconds"]),
    }


def read_provenance(runs: Any, principal: Any, run: Any) -> dict[str, Any]:
    """``run``'s envelope, verified now against the control plane's key and checked against
    the run's record (its id, notebook and parameters): ``verified``, ``problem``,
    ``statement`` (decoded even when it does not verify) and ``view``
    (:func:`provenance_view`). Reads a file: call it in a thread."""
    try:
        envelope = Envelope.from_dict(json.loads(runs.provenance(principal, run.id)))
        statement = _object(json.loads(envelope.payload))
    except (ZtlabError, ValueError) as error:
        problem = getattr(error, "message", str(error))
        return {"verified": False, "problem": problem, "statement": {}, "view": None}
    view = provenance_view(statement)
    try:
        checked = verify_run_provenance(
            envelope, {runs.keyid: runs.key.public_key()}, parameters=dict(run.parameters)
        )
        if checked.provenance.run_id != run.id:
            raise SignatureError(f"the provenance is run {checked.provenance.run_id}'s")
        if checked.provenance.notebook.digest.get("sha256") != run.notebook_sha256:
            raise SignatureError("the provenance names another notebook than the run ran")
    except (ZtlabError, ValueError) as error:
        problem = getattr(error, "message", str(error))
        return {"verified": False, "problem": problem, "statement": statement, "view": view}
    return {"verified": True, "problem": "", "statement": statement, "view": view}


class RunsPage(BaseHandler):  # type: ignore[misc]
    """A user's runs and schedules, and one run."""

    @property
    def plane(self) -> ControlPlane:
        """The hub's control plane."""
        return control_plane(self.settings)

    @property
    def runs(self) -> Any:
        """The run service, or a 404 on a hub that runs no notebooks."""
        if self.plane.runs is None:
            raise web.HTTPError(
                404, "This hub runs no notebooks ([runs] enabled = false, or no [sandbox])."
            )
        return self.plane.runs

    async def _principal(self) -> Any:
        if self.current_user is None:
            raise web.HTTPError(403)
        return await user_principal(self.current_user)

    @web.authenticated
    async def get(self, run_id: str = "") -> None:
        """The list, or one run."""
        principal = await self._principal()
        if run_id:
            await self._detail(principal, run_id)
        else:
            await self._list(principal)

    async def _list(self, principal: Any) -> None:
        runs = self.runs
        admin = "admin" in principal.roles
        everyone = admin and self.get_argument("all", "0") in ("1", "true")
        owner = None if everyone else principal.name
        records = await asyncio.to_thread(runs.store.runs, owner=owner, limit=LIST_LIMIT)
        schedules = await asyncio.to_thread(runs.store.schedules, owner=owner)
        html = await self.render_template(
            "ztlab-runs.html",
            runs=[_row(r.as_json()) for r in records],
            schedules=[
                {**s.as_json(), "next": moment_text(s.as_json()["next_run"])} for s in schedules
            ],
            everyone=everyone,
            admin=admin,
            limit=LIST_LIMIT,
        )
        self.finish(html)

    async def _detail(self, principal: Any, run_id: str) -> None:
        runs = self.runs
        try:
            run = await asyncio.to_thread(runs.get, principal, run_id)
        except ZtlabError as error:
            status = getattr(error, "status", 400)
            raise web.HTTPError(status, error.message) from error
        provenance = None
        if run.provenance_sha256:
            provenance = await asyncio.to_thread(read_provenance, runs, principal, run)
        record = run.as_json()
        html = await self.render_template(
            "ztlab-run.html",
            run=_row(record),
            fields=[
                (key, value if isinstance(value, str | int | float | None) else json.dumps(value))
                for key, value in record.items()
            ],
            traceback=_ANSI.sub("", run.traceback),
            provenance=provenance,
            statement_json=json.dumps(provenance["statement"], indent=2, sort_keys=True)
            if provenance
            else "",
        )
        self.finish(html)


def run_page_handlers() -> list[tuple[str, Any]]:
    """The runs pages, relative to the hub prefix."""
    return [
        (r"/ztlab/runs", RunsPage),
        (r"/ztlab/runs/([0-9a-f]{12})", RunsPage),
    ]
