"""``/hub/api/ztlab/pools``: what ``ztlab.pools`` in a kernel and ``ztlab pools`` call.

======  ===============================================  =========================================
method  path                                             what
======  ===============================================  =========================================
GET     ``/api/ztlab/pools``                             the pools, their limits, what you hold
GET     ``/api/ztlab/pools/clusters``                    your running clusters (admins: every one)
POST    ``/api/ztlab/pools/NAME/clusters``               start one ``{"workers", "gpus", "csr",
                                                         "share_with"?}`` (201, with your client
                                                         certificate)
POST    ``/api/ztlab/pools/NAME/certificate``            renew your client certificate
                                                         ``{"csr"}``
GET     ``/api/ztlab/pools/clusters/ID``                 one cluster and its scheduler's status
DELETE  ``/api/ztlab/pools/clusters/ID``                 stop it
======  ===============================================  =========================================

The dashboard of a cluster is served through the hub at ``/hub/pools/clusters/ID/dashboard/``
(:class:`DashboardHandler`), to its owner and the users it is shared with only.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tornado import httpclient, web

from ztlab.common.errors import ZtlabError
from ztlab.hub.api.base import ZtlabAPIHandler
from ztlab.hub.compute.probe import collect_refusals
from ztlab.hub.identity import user_principal
from ztlab.hub.timestamps import utc_iso

_POOL = r"([a-z][a-z0-9_-]{0,63})"
_ID = r"([a-f0-9]{16})"
#: response headers the dashboard proxy passes on
_PASSED_HEADERS = ("Content-Type", "Cache-Control", "Last-Modified", "ETag")


class _PoolsAPIHandler(ZtlabAPIHandler):
    @property
    def service(self) -> Any:
        """The cluster service, or a 404 on a hub without pools."""
        if self.plane.clusters is None:
            raise web.HTTPError(
                404, "This hub runs no clusters (no [gpu.pools], or [sandbox] is off)."
            )
        return self.plane.clusters

    async def act(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a service call in a thread; its result, or the error answered (``None``)."""
        try:
            return await asyncio.to_thread(call, *args, **kwargs)
        except ZtlabError as error:
            await self.fail(error)
            return None

    def is_admin(self, principal: Any) -> bool:
        """Whether the caller holds the admin role (sees and stops every cluster)."""
        return "admin" in principal.roles


class PoolsHandler(_PoolsAPIHandler):
    """The pools."""

    async def get(self) -> None:
        principal = await self.principal()
        pools = await asyncio.to_thread(self.service.pools, principal)
        await self.reply({"pools": pools})


class ClustersHandler(_PoolsAPIHandler):
    """The caller's clusters."""

    async def get(self) -> None:
        principal = await self.principal()
        shown = self.service.visible(principal, admin=self.is_admin(principal))
        await self.reply({"clusters": [c.as_json() for c in shown]})


class StartHandler(_PoolsAPIHandler):
    """Start a cluster in a pool."""

    async def post(self, pool: str) -> None:
        principal = await self.principal()
        body = self.body()
        csr = body.get("csr")
        if not isinstance(csr, str):
            raise web.HTTPError(400, 'Expected {"workers": N, "gpus": N, "csr": "PEM"}.')
        shared = []
        names = body.get("share_with") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise web.HTTPError(400, "share_with must be an array of user names.")
        for name in names:
            user = self.find_user(name)
            if user is None:
                raise web.HTTPError(400, f"There is no user {name!r} to share with.")
            shared.append(await user_principal(user))
        account = getattr(self.current_user.spawner, "account", None)
        if not isinstance(account, str):
            raise web.HTTPError(
                409, "This hub's spawner gives users no account to run clusters as."
            )
        started = await self.act(
            self.service.start,
            principal,
            pool=pool,
            workers=body.get("workers", 1),
            gpus=body.get("gpus", 0),
            csr=csr,
            account=account,
            shared_with=shared,
            environment=body.get("environment")
            if isinstance(body.get("environment"), str)
            else None,
        )
        if started is not None:
            if self.service.relays is not None:
                await self.service.relays.sync(self.service.store.active())
            await self.reply(_started(started), 201)


class CertificateHandler(_PoolsAPIHandler):
    """Renew a client certificate."""

    async def post(self, pool: str) -> None:
        principal = await self.principal()
        csr = self.body().get("csr")
        if not isinstance(csr, str):
            raise web.HTTPError(400, 'Expected {"csr": "PEM"}.')
        issued = await self.act(self.service.renew_client, principal, pool=pool, csr=csr)
        if issued is not None:
            await self.reply(_started(issued))


class ClusterHandler(_PoolsAPIHandler):
    """One cluster: its status, or stop it."""

    async def get(self, cluster_id: str) -> None:
        principal = await self.principal()
        record = await self.act(
            self.service.get, cluster_id, principal, admin=self.is_admin(principal)
        )
        if record is None:
            return
        answer = record.as_json()
        relays = self.service.relays
        answer["relay"] = relays.address(record.id) if relays is not None else None
        if record.state == "running":
            answer["status"] = await scheduler_status(self.service, record)
        await self.reply(answer)

    async def delete(self, cluster_id: str) -> None:
        principal = await self.principal()
        record = await self.act(
            self.service.get, cluster_id, principal, admin=self.is_admin(principal)
        )
        if record is None:
            return
        if record.owner != principal.name and not self.is_admin(principal):
            raise web.HTTPError(403, f"Only {record.owner} (or an admin) may stop this cluster.")
        await collect_refusals(self.service, [record])  # before they go with the cluster
        stopped = await self.act(
            self.service.stop, record, actor=principal.name, reason=f"stopped by {principal.name}"
        )
        if stopped is not None:
            await self.reply(stopped.as_json())


async def scheduler_status(service: Any, record: Any) -> dict[str, Any]:
    """What the scheduler says (workers, their GPUs), or ``{"error": ...}``."""
    from ztlab.hub.compute.probe import ask_scheduler

    try:
        info = await ask_scheduler(service, record, "identity")
    except (OSError, TimeoutError) as exc:
        return {"error": f"the scheduler does not answer: {exc}"}
    workers = info.get("workers", {})
    return {
        "workers": len(workers),
        "threads": sum(int(w.get("nthreads", 0)) for w in workers.values()),
        "memory": sum(int(w.get("memory_limit", 0) or 0) for w in workers.values()),
        "gpus": sum(1 for w in workers.values() if (w.get("resources") or {}).get("GPU")),
    }


class DashboardHandler(_PoolsAPIHandler):
    """The cluster's dashboard through the hub: its owner and shared users only."""

    async def get(self, cluster_id: str, path: str) -> None:
        principal = await self.principal_or_cookie()
        record = await self.act(self.service.get, cluster_id, principal, admin=False)
        if record is None:
            return
        if record.state != "running":
            raise web.HTTPError(404, "The cluster is not running.")
        prefix = f"/hub/pools/clusters/{record.id}/dashboard"
        query = f"?{self.request.query}" if self.request.query else ""
        url = f"http://{record.host}:{record.dashboard_port}{prefix}/{path}{query}"
        client = httpclient.AsyncHTTPClient()
        try:
            response = await client.fetch(url, raise_error=False, request_timeout=20)
        except OSError as exc:
            raise web.HTTPError(502, f"The dashboard does not answer: {exc}") from exc
        self.set_status(response.code)
        for name in _PASSED_HEADERS:
            if name in response.headers:
                self.set_header(name, response.headers[name])
        self.finish(response.body or b"")

    async def principal_or_cookie(self) -> Any:
        """The browser's hub session (no data scope needed to look at one's dashboard)."""
        user = self.current_user
        if user is None or getattr(user, "kind", "user") != "user":
            raise web.HTTPError(403, "Sign in to the hub to see a cluster's dashboard.")
        return await user_principal(user)


def _started(started: Any) -> dict[str, Any]:
    return {
        "cluster": started.cluster.as_json(),
        "ca": started.ca.decode(),
        "certificate": started.certificate.decode(),
        "certificate_expires_at": utc_iso(started.certificate_expires_at),
    }


def pool_handlers() -> list[tuple[str, Any]]:
    """The pools' handlers, relative to the hub prefix."""
    return [
        ("api/ztlab/pools", PoolsHandler),
        ("api/ztlab/pools/clusters", ClustersHandler),
        (f"api/ztlab/pools/clusters/{_ID}", ClusterHandler),
        (f"api/ztlab/pools/{_POOL}/clusters", StartHandler),
        (f"api/ztlab/pools/{_POOL}/certificate", CertificateHandler),
        (f"pools/clusters/{_ID}/dashboard/?(.*)", DashboardHandler),
    ]
