"""``/hub/ztlab/monitor``: the GPU monitor for admins: open alerts, GPU processes, hand-overs.

Cookie-authenticated, admins only (the ``admin`` role), XSRF-checked forms. Acknowledging an
alert and releasing a held-back GPU go through the same calls as the API and ``ztlab
monitor``, and are audited alike.
"""

from __future__ import annotations

import asyncio
from typing import Any

from jupyterhub.handlers.base import BaseHandler
from tornado import web

from ztlab.common.errors import ZtlabError
from ztlab.hub.controlplane import ControlPlane, control_plane
from ztlab.hub.identity import user_principal
from ztlab.hub.timestamps import utc_iso


class MonitorPage(BaseHandler):  # type: ignore[misc]
    """The admins' view of the GPU monitor."""

    @property
    def plane(self) -> ControlPlane:
        """The hub's control plane."""
        return control_plane(self.settings)

    async def _admin(self) -> Any:
        if self.current_user is None:
            raise web.HTTPError(403)
        principal = await user_principal(self.current_user)
        if "admin" not in principal.roles:
            raise web.HTTPError(403, "Only admins see the GPU monitor.")
        return principal

    async def _show(self, message: str = "", failed: bool = False) -> None:
        monitor = self.plane.monitor
        if monitor is None:
            raise web.HTTPError(404, "This hub runs no GPU monitor ([gpu.monitor]).")
        alerts = await asyncio.to_thread(monitor.alerts.list, open_only=True, limit=200)
        latest = monitor.latest
        leases = self.plane.leases
        handovers = await asyncio.to_thread(leases.pending_handovers) if leases else []
        usage = sorted(monitor.accounting.usage().items(), key=lambda item: -item[1].gpu_seconds)
        html = await self.render_template(
            "ztlab-monitor.html",
            alerts=[{**a.to_json(), "time": utc_iso(a.t)} for a in alerts],
            processes=latest.processes if latest else (),
            sampled=utc_iso(latest.reading.t) if latest else "not yet",
            handovers=handovers,
            usage=usage,
            message=message,
            failed=failed,
            xsrf=self.xsrf_token.decode("ascii"),
        )
        self.finish(html)

    @web.authenticated
    async def get(self) -> None:
        """The page."""
        await self._admin()
        await self._show()

    @web.authenticated
    async def post(self) -> None:
        """``acknowledge`` an alert (``alert``) or ``release`` a held GPU (``gpu``)."""
        principal = await self._admin()
        monitor = self.plane.monitor
        if monitor is None:
            raise web.HTTPError(404)
        action = self.get_body_argument("action", "")
        try:
            if action == "acknowledge":
                alert = int(self.get_body_argument("alert", "0"))
                await asyncio.to_thread(monitor.acknowledge, alert, by=principal.name)
                message = f"alert #{alert} acknowledged"
            elif action == "release" and self.plane.leases is not None:
                gpu = self.get_body_argument("gpu", "")
                await asyncio.to_thread(self.plane.leases.release_hold, gpu, actor=principal.name)
                message = f"GPU {gpu} is back in its pool"
            else:
                raise web.HTTPError(400, "unknown action")
        except (ZtlabError, ValueError) as error:
            await self.plane.flush()
            self.set_status(400)
            await self._show(getattr(error, "message", str(error)), failed=True)
            return
        await self.plane.flush()
        await self._show(message)


def monitor_page_handlers() -> list[tuple[str, Any]]:
    """The monitor page, relative to the hub prefix."""
    return [(r"/ztlab/monitor", MonitorPage)]
