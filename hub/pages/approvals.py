"""``/hub/ztlab/models``: a small page listing signed model versions to approve or reject.

Cookie-authenticated (the signed-in user, XSRF-checked forms); each decision goes through
the same :class:`~ztlab.hub.models.service.ModelService` call as the API and command line,
so the policy (two-person rule) and the re-verification apply alike. A version trained by a
notebook run shows the run's provenance, verified as the page is made; one whose provenance
does not verify is not approved (:func:`~ztlab.hub.models.provenance.check_approvable`, as
in the API).
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from jupyterhub.handlers.base import BaseHandler
from tornado import web

from ztlab.common.errors import ZtlabError
from ztlab.hub.controlplane import ControlPlane, control_plane
from ztlab.hub.identity import user_principal
from ztlab.hub.models.provenance import VersionProvenance, check_approvable, provenance_of_version
from ztlab.hub.pages.runs import provenance_view


def provenance_row(provenance: VersionProvenance | None) -> dict[str, Any] | None:
    """What a row shows of a version's run provenance (``None``: no run trained it)."""
    if provenance is None:
        return None
    run = provenance.run.as_json()
    view = provenance_view(provenance.statement) if provenance.statement else None
    if view is not None:
        notebook = view["notebook"]
        parameters = view["parameters"]
        datasets = [{"dataset": d["name"], "root": d["digest"]} for d in view["datasets"]]
    else:
        notebook, parameters = run["notebook"], run["parameters"]
        datasets = [{"dataset": d["dataset"], "root": d["root"]} for d in run["datasets"]]
    return {
        "verified": provenance.verified,
        "problem": provenance.problem,
        "run": run["id"],
        "owner": run["owner"],
        "schedule": run["schedule"],
        "notebook": notebook["name"],
        "sha256": notebook["sha256"],
        "parameters": parameters,
        "datasets": datasets,
        "started": view["started"] if view else run["started_at"],
        "finished": view["finished"] if view else run["finished_at"],
    }


class ModelsPage(BaseHandler):  # type: ignore[misc]
    """List signed versions; approve or reject one."""

    @property
    def plane(self) -> ControlPlane:
        """The hub's control plane."""
        return control_plane(self.settings)

    @property
    def service(self) -> Any:
        """The model service, or a 404 where the hub runs without ``[models]``."""
        if self.plane.models is None:
            raise web.HTTPError(404, "This hub has no model registry ([models] enabled = false).")
        return self.plane.models

    async def _principal(self) -> Any:
        if self.current_user is None:
            raise web.HTTPError(403)
        return await user_principal(self.current_user)

    async def _show(self, message: str = "", failed: bool = False) -> None:
        service = self.service
        runs = self.plane.runs

        def collect() -> list[dict[str, Any]]:
            rows = []
            for signature in service.signed_versions():
                envelope = json.loads(signature.bundle)["dsseEnvelope"]
                statement = json.loads(base64.b64decode(envelope["payload"]))
                provenance = provenance_of_version(runs, signature)
                rows.append(
                    {
                        "name": signature.name,
                        "version": signature.version,
                        "trainer": signature.trainer,
                        "datasets": statement["predicate"].get("ztlab", {}).get("datasets", []),
                        "history": service.history(signature.name, signature.version),
                        "provenance": provenance_row(provenance),
                    }
                )
            return rows

        rows = await asyncio.to_thread(collect)
        html = await self.render_template(
            "ztlab-models.html",
            rows=rows,
            message=message,
            failed=failed,
            xsrf=self.xsrf_token.decode("ascii"),
        )
        self.finish(html)

    @web.authenticated
    async def get(self) -> None:
        """The list."""
        await self._principal()
        await self._show()

    @web.authenticated
    async def post(self, name: str = "", version: str = "") -> None:
        """A decision from the form: ``action`` approve|reject, ``reason``."""
        principal = await self._principal()
        action = self.get_body_argument("action", "")
        reason = self.get_body_argument("reason", "").strip()
        service = self.service
        try:
            if action == "approve":
                alias = service.protected_aliases[0]

                def approve() -> None:
                    check_approvable(
                        self.plane.runs,
                        service,
                        actor=principal.name,
                        name=name,
                        version=version,
                        record=self.plane.record,
                    )
                    service.approve(principal, name, version, reason, alias)

                await asyncio.to_thread(approve)
            elif action == "reject":
                await asyncio.to_thread(service.reject, principal, name, version, reason)
            else:
                raise web.HTTPError(400, "unknown action")
        except ZtlabError as error:
            await self.plane.flush()
            self.set_status(getattr(error, "status", 400))
            await self._show(f"{name} {version}: {error.message}", failed=True)
            return
        await self.plane.flush()
        await self._show(f"{action}d {name} version {version}")


def approval_handlers() -> list[tuple[str, Any]]:
    """The approvals page, relative to the hub prefix."""
    return [
        (r"/ztlab/models", ModelsPage),
        (r"/ztlab/models/([A-Za-z0-9][A-Za-z0-9_.-]{0,127})/([0-9]{1,9})", ModelsPage),
    ]
