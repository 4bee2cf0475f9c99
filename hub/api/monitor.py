"""The GPU monitor's endpoints: Prometheus metrics, alerts, usage and hand-overs.

======  ==================================================  =====================================
method  path                                                who, what
======  ==================================================  =====================================
GET     ``/api/ztlab/metrics``                              the ``gpu-metrics`` service's token
                                                            (scope ``custom:ztlab:metrics``) or an
                                                            admin's: Prometheus text
GET     ``/api/ztlab/monitor/alerts``                       admins: alerts (``?open=1``, ``?user=``)
POST    ``/api/ztlab/monitor/alerts/ID/acknowledge``        admins: mark an alert as seen
GET     ``/api/ztlab/monitor/usage``                        your GPU-seconds, energy and memory
                                                            (admins: everyone's)
GET     ``/api/ztlab/monitor/now``                          admins: the processes of the last
                                                            sample and whose they are
GET     ``/api/ztlab/monitor/handovers``                    admins: GPUs waiting for or failing
                                                            their hand-over check
POST    ``/api/ztlab/monitor/handovers/GPU/release``        admins: give a held-back GPU back
======  ==================================================  =====================================
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any, Final

from tornado import web

from ztlab.common.errors import ZtlabError
from ztlab.hub.api.base import ZtlabAPIHandler
from ztlab.hub.controlplane import SYSTEM_ACTOR
from ztlab.hub.timestamps import utc_iso

__all__ = ["METRICS_SCOPE", "monitor_handlers"]

#: the scope a token needs to read ``/hub/api/ztlab/metrics``
METRICS_SCOPE: Final = "custom:ztlab:metrics"


class _MonitorHandler(ZtlabAPIHandler):
    @property
    def monitor(self) -> Any:
        """The GPU monitor, or a 404 on a hub without one."""
        if self.plane.monitor is None:
            raise web.HTTPError(
                404,
                "This hub runs no GPU monitor ([gpu.monitor] source found no NVML, or is off).",
            )
        return self.plane.monitor

    async def admin(self) -> Any:
        """The caller, who must hold the admin role (else a 403)."""
        principal = await self.principal()
        if "admin" not in principal.roles:
            raise web.HTTPError(403, "Only admins see the GPU monitor's alerts and hand-overs.")
        return principal


class MetricsHandler(_MonitorHandler):
    """Prometheus exposition (DCGM names plus per-user series)."""

    async def get(self) -> None:
        if self.current_user is None:
            raise web.HTTPError(403, "Missing or invalid credentials.")
        if METRICS_SCOPE not in getattr(self, "expanded_scopes", set()):
            refusal = (
                f"Reading metrics needs the {METRICS_SCOPE} scope (the gpu-metrics service's "
                "token; see `ztlab monitor scrape-config`) or an admin's token."
            )
            if getattr(self.current_user, "kind", "user") != "user":
                raise web.HTTPError(403, refusal)
            principal = await self.principal()  # a user token with the data scope
            if "admin" not in principal.roles:
                raise web.HTTPError(403, refusal)
        text = await asyncio.to_thread(self.monitor.metrics)
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(text)


def _alert_json(alert: Any) -> dict[str, Any]:
    data: dict[str, Any] = alert.to_json()
    data["time"] = utc_iso(alert.t)
    return data


class AlertsHandler(_MonitorHandler):
    """The alerts, newest first."""

    async def get(self) -> None:
        await self.admin()
        user = self.get_argument("user", None)
        open_only = self.get_argument("open", "0") in ("1", "true", "yes")
        alerts = await asyncio.to_thread(
            self.monitor.alerts.list, open_only=open_only, user=user, limit=500
        )
        await self.reply({"alerts": [_alert_json(a) for a in alerts]})


class AcknowledgeHandler(_MonitorHandler):
    """Mark one alert as seen."""

    async def post(self, alert_id: str) -> None:
        principal = await self.admin()
        try:
            alert = await asyncio.to_thread(
                self.monitor.acknowledge, int(alert_id), by=principal.name
            )
        except ZtlabError as error:
            await self.fail(error)
            return
        await self.reply(_alert_json(alert))


class UsageHandler(_MonitorHandler):
    """GPU-seconds, energy and memory per user."""

    async def get(self) -> None:
        principal = await self.principal()
        everyone = "admin" in principal.roles and self.get_argument("all", "0") in ("1", "true")
        usage = self.monitor.accounting.usage(None if everyone else principal.name)
        await self.reply({"usage": {user: asdict(value) for user, value in sorted(usage.items())}})


class NowHandler(_MonitorHandler):
    """What the last sample saw."""

    async def get(self) -> None:
        await self.admin()
        from ztlab.hub.monitor.service import describe

        latest = self.monitor.latest
        await self.reply(describe(latest) if latest is not None else {"t": None, "processes": []})


class HandoversHandler(_MonitorHandler):
    """GPUs in their hand-over check, or held back."""

    async def get(self) -> None:
        await self.admin()
        leases = self.plane.leases
        pending = await asyncio.to_thread(leases.pending_handovers) if leases else []
        await self.reply({"handovers": [asdict(h) for h in pending]})


class ReleaseHoldHandler(_MonitorHandler):
    """An admin gives a held-back GPU back to its pool."""

    async def post(self, gpu: str) -> None:
        principal = await self.admin()
        leases = self.plane.leases
        if leases is None:
            raise web.HTTPError(404, "This hub leases no GPUs.")
        try:
            await asyncio.to_thread(leases.release_hold, gpu, actor=principal.name)
        except ZtlabError as error:
            await self.fail(error)
            return
        await self.reply({"gpu": gpu, "released_by": principal.name, "system": SYSTEM_ACTOR})


def monitor_handlers() -> list[tuple[str, Any]]:
    """The monitor's handlers, relative to the hub prefix."""
    return [
        ("api/ztlab/metrics", MetricsHandler),
        ("api/ztlab/monitor/alerts", AlertsHandler),
        (r"api/ztlab/monitor/alerts/([0-9]{1,18})/acknowledge", AcknowledgeHandler),
        ("api/ztlab/monitor/usage", UsageHandler),
        ("api/ztlab/monitor/now", NowHandler),
        ("api/ztlab/monitor/handovers", HandoversHandler),
        (r"api/ztlab/monitor/handovers/([A-Za-z0-9:._-]{1,80})/release", ReleaseHoldHandler),
    ]
