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

from tornado import web

from ztlab.common.errors import ZtlabError
from ztlab.common.keys import key_id, public_key_pem
from ztlab.hub.api.base import ZtlabAPIHandler

_REF = r"([a-z0-9][a-z0-9_.-]{0,63}@[A-Za-z0-9][A-Za-z0-9_.-]{0,63})"


class _DatasetsAPIHandler(ZtlabAPIHandler):
    """The API's base, with the dataset registry."""

    @property
    def registry(self) -> Any:
        """The hub's dataset registry."""
        return self.plane.datasets


class DatasetsHandler(_DatasetsAPIHandler):
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


class DatasetHandler(_DatasetsAPIHandler):
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


class ReportsHandler(_DatasetsAPIHandler):
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


class KeysHandler(_DatasetsAPIHandler):
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
