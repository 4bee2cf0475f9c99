"""``/hub/api/ztlab/datasets``: register, list, read and report on dataset versions.

=======  ===========================================  ==========================================
method   path                                         what
=======  ===========================================  ==========================================
GET      ``/api/ztlab/datasets``                      versions the caller may read
POST     ``/api/ztlab/datasets``                      register ``{"ref", "path"}`` (201)
GET      ``/api/ztlab/datasets/NAME@VERSION``         one version and its signed manifest
POST     ``/api/ztlab/datasets/NAME@VERSION/reports`` record a failed verification (202)
GET      ``/api/ztlab/keys``                          the public keys that sign statements
=======  ===========================================  ==========================================

Errors are JSON ``{"status", "message", "hint"}``: 400 bad input, 403 no credentials,
missing scope or a policy denial, 404 unknown version, 409 the version exists.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from jupyterhub.apihandlers.base import APIHandler
from tornado import web

from ztlab.common.errors import UsageError, ZtlabError
from ztlab.common.keys import key_id, public_key_pem
from ztlab.hub.controlplane import ControlPlane, control_plane
from ztlab.hub.identity import DATA_SCOPE, user_principal

_REF = r"([a-z0-9][a-z0-9_.-]{0,63}@[A-Za-z0-9][A-Za-z0-9_.-]{0,63})"


class _ZtlabAPIHandler(APIHandler):  # type: ignore[misc]
    """Token or cookie authentication, the data scope, and JSON errors.

    Answers wait until the request's audit records are on disk (:meth:`reply`,
    :meth:`fail`), so a client never sees an answer whose record a crash could lose.
    """

    @property
    def plane(self) -> ControlPlane:
        """The hub's control plane."""
        return control_plane(self.settings)

    async def principal(self) -> Any:
        """The calling user as a policy principal, or a 403."""
        user = self.current_user
        if user is None:
            raise web.HTTPError(403, "Missing or invalid credentials.")
        if getattr(user, "kind", "user") != "user":
            raise web.HTTPError(403, "Only users may use the dataset API, not services.")
        if DATA_SCOPE not in getattr(self, "expanded_scopes", set()):
            raise web.HTTPError(
                403, f"This token lacks the {DATA_SCOPE} scope (make a token that has it)."
            )
        return await user_principal(user)

    @property
    def registry(self) -> Any:
        """The hub's dataset registry."""
        return self.plane.datasets

    def body(self) -> dict[str, Any]:
        """The request's JSON object, or a 400."""
        try:
            data = json.loads(self.request.body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise web.HTTPError(400, f"The request body is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise web.HTTPError(400, "The request body must be a JSON object.")
        return data

    async def reply(self, data: Any, status: int = 200) -> None:
        """Finish with ``data`` as JSON, once the request's audit records are durable."""
        await self.plane.flush()
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))

    async def fail(self, error: ZtlabError) -> None:
        """Finish with the error's status, message and hint (records durable first)."""
        status = getattr(error, "status", 400 if isinstance(error, UsageError) else 500)
        await self.reply({"status": status, "message": error.message, "hint": error.hint}, status)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """JSON errors like ours for tornado's own (403, 404, 500)."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = getattr(exc, "log_message", None) or self._reason
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": status_code, "message": message, "hint": None}))


class DatasetsHandler(_ZtlabAPIHandler):
    """List and register dataset versions."""

    async def get(self) -> None:
        """The versions the caller may read (no envelopes)."""
        principal = await self.principal()
        rows = await asyncio.to_thread(self.registry.readable, principal)
        await self.reply({"datasets": [row.summary() for row in rows]})

    async def post(self) -> None:
        """Register ``ref`` from ``path``; the control plane fingerprints and signs it."""
        principal = await self.principal()
        body = self.body()
        ref, path = body.get("ref"), body.get("path")
        if not isinstance(ref, str) or not isinstance(path, str) or set(body) - {"ref", "path"}:
            raise web.HTTPError(400, 'Expected {"ref": "NAME@VERSION", "path": "/dir"}.')
        try:
            row = await asyncio.to_thread(self.registry.register, principal, ref, path)
        except ZtlabError as error:
            await self.fail(error)
            return
        await self.reply({**row.summary(), "envelope": json.loads(row.envelope)}, 201)


class DatasetHandler(_ZtlabAPIHandler):
    """One dataset version and its signed manifest."""

    async def get(self, ref: str) -> None:
        """The version's summary and envelope, if the policy lets the caller read it."""
        principal = await self.principal()
        try:
            row = await asyncio.to_thread(self.registry.get, principal, ref)
        except ZtlabError as error:
            await self.fail(error)
            return
        await self.reply({**row.summary(), "envelope": json.loads(row.envelope)})


class ReportsHandler(_ZtlabAPIHandler):
    """A kernel reports that data did not verify (recorded in the audit log)."""

    async def post(self, ref: str) -> None:
        """Record the report ``{"kind", "file", "expected", "actual", "detail"}``."""
        principal = await self.principal()
        body = self.body()
        try:
            self.registry.report(principal, ref, body)
        except ZtlabError as error:
            await self.fail(error)
            return
        await self.reply({"recorded": True}, 202)


class KeysHandler(_ZtlabAPIHandler):
    """The public keys that verify the control plane's signed statements."""

    async def get(self) -> None:
        """``{"keys": [{"keyid", "pem"}]}``."""
        await self.principal()
        key = self.registry.public_key
        await self.reply({"keys": [{"keyid": key_id(key), "pem": public_key_pem(key)}]})


def dataset_handlers() -> list[tuple[str, Any]]:
    """The handlers, relative to the hub prefix (``/hub``)."""
    return [
        (r"/api/ztlab/datasets", DatasetsHandler),
        (rf"/api/ztlab/datasets/{_REF}", DatasetHandler),
        (rf"/api/ztlab/datasets/{_REF}/reports", ReportsHandler),
        (r"/api/ztlab/keys", KeysHandler),
    ]
