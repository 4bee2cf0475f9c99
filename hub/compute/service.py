"""Users' Dask clusters in the pools: decide, lease, certify, start, watch, stop.

:meth:`ClusterService.start` runs fixed steps, each refusal a message for the user:

1. **decide** -- the policy must allow ``join_pool`` on ``pool:NAME`` and the user must
   hold one of the pool's roles; each user the cluster is shared with must be allowed the
   same, and the pool must allow sharing;
2. **quota** -- the pool's per-user limits (clusters, workers, GPUs) are checked and the
   cluster recorded in one transaction (:meth:`ClusterStore.reserve`);
3. **lease** -- the GPUs asked for are leased (the lease backend keeps the roles'
   ``max_gpus`` over everything the user holds, servers included);
4. **certify** -- the pool's authority signs the caller's request for a client
   certificate naming the user, and makes the scheduler's and each worker's;
5. **start** -- the compute backend runs the cluster; it answers once the scheduler
   completes a TLS handshake.

A failure after step 2 releases what was taken. Every step's outcome is audited.

:meth:`sweep` (the hub calls it periodically) stops clusters past their lifetime, clusters
whose owner lost the pool (role or session), renews the scheduler's and workers'
certificates before they expire, and releases leases of clusters that are gone.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ztlab.common.config import ZtlabConfig
from ztlab.common.errors import UsageError, ZtlabError
from ztlab.common.poolidentity import (
    ClusterAccess,
    control_plane_identity,
    scheduler_identity,
    user_identity,
    worker_identity,
)
from ztlab.hub.compute.authority import PoolAuthority
from ztlab.hub.compute.backend import ClusterRequest, ComputeBackend
from ztlab.hub.compute.store import (
    ClusterDenied,
    ClusterError,
    ClusterNotFound,
    ClusterQuotaExceeded,
    ClusterRecord,
    ClusterStore,
)
from ztlab.hub.policy import PolicyEngine, Principal
from ztlab.hub.private import private_directory, write_private_file
from ztlab.hub.timestamps import utc_iso

#: renew the cluster's own certificates when less than this is left (seconds)
RENEW_BEFORE_SECONDS: Final = 25 * 60
#: most workers one request may ask for (the pool's max_workers applies too)
MAX_WORKERS: Final = 256

Record = Callable[..., None]


@dataclass(frozen=True, slots=True)
class Started:
    """A started cluster and the caller's client certificate."""

    cluster: ClusterRecord
    ca: bytes
    certificate: bytes
    certificate_expires_at: float


@dataclass(frozen=True, slots=True)
class Session:
    """What :meth:`ClusterService.sweep` needs to know about a cluster's owner now."""

    #: the owner's roles now (from the last login or refresh)
    roles: frozenset[str]
    #: whether the owner still has a running server (their session in the lab)
    active: bool


class ClusterService:
    """The control plane's side of the pools' clusters."""

    def __init__(
        self,
        config: ZtlabConfig,
        *,
        policy: PolicyEngine,
        record: Record,
        leases: Any,
        inventory: Any,
        backend: ComputeBackend,
        store: ClusterStore | None = None,
        environments: Any = None,
    ) -> None:
        self.config = config
        #: the environment service (kernel environments), or ``None`` without one
        self.environments = environments
        #: the hub's relays for shared clusters (set by the hub, which runs them)
        self.relays: Any = None
        self.policy = policy
        self.record = record
        self.leases = leases
        self.inventory = inventory
        self.backend = backend
        # tighten: a folder the control plane made wider (0755, before the authorities'
        # folder was made private) is narrowed to 0700, as the state directory is
        base = private_directory(
            config.state_dir / "compute", what="compute state directory", tighten=True
        )
        self.store = store or ClusterStore(base / "clusters.sqlite")
        self._authority_dir = private_directory(
            base / "ca", what="pool authorities directory", tighten=True
        )
        self._authorities: dict[str, PoolAuthority] = {}
        self._probes: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the store (clusters keep running; a new hub adopts them)."""
        self.backend.close()
        self.store.close()

    # -- authorities -------------------------------------------------------------------

    def authority(self, pool: str) -> PoolAuthority:
        """The CA of ``pool`` (made on first use)."""
        self._pool(pool)
        with self._lock:
            if pool not in self._authorities:
                self._authorities[pool] = PoolAuthority(self._authority_dir / pool, pool)
            return self._authorities[pool]

    def probe_certificate(self, pool: str) -> tuple[str, str]:
        """The control plane's own certificate and key files for ``pool`` (0600, made anew
        when half their life is gone): what the hub connects to schedulers with."""
        authority = self.authority(pool)
        with self._lock:
            paths = self._probes.get(pool)
            if paths is not None and Path(paths[0]).stat().st_mtime > time.time() - 1800:
                return paths
            issued = authority.issue_with_key(control_plane_identity(pool), minutes=60)
            directory = private_directory(
                self._authority_dir / pool / "probe", what="probe directory"
            )
            serial = f"{issued.serial:x}"
            cert, key = directory / f"{serial}.pem", directory / f"{serial}.key"
            write_private_file(key, issued.key)
            write_private_file(cert, issued.certificate)
            for old in directory.iterdir():
                if old.stem != serial:
                    old.unlink(missing_ok=True)
            self._probes[pool] = (str(cert), str(key))
            return self._probes[pool]

    def _pool(self, pool: str) -> Any:
        pools = self.config.gpu.pools
        if pool not in pools:
            known = ", ".join(sorted(pools)) or "none"
            raise ClusterNotFound(f"There is no pool {pool!r} (pools: {known}).")
        return pools[pool]

    # -- deciding ------------------------------------------------------------------------

    def refusal(self, principal: Principal, pool: str) -> str | None:
        """Why ``principal`` may not use ``pool`` (``None``: they may); audited decision."""
        limits = self._pool(pool)
        decision = self.policy.authorize(principal, "join_pool", f"pool:{pool}")
        if not decision.allowed:
            return f"Pool {pool} is not open to you: {decision.reason}"
        if not principal.roles & set(limits.roles):
            opened = ", ".join(sorted(limits.roles)) or "no role (the pool is closed)"
            held = ", ".join(sorted(principal.roles)) or "no role"
            return f"Pool {pool} is open to {opened}; you hold {held}."
        return None

    def pools(self, principal: Principal) -> list[dict[str, Any]]:
        """The pools, each with its limits, whether the caller may use it and what they hold."""
        shown = []
        for name, pool in self.config.gpu.pools.items():
            held = self.store.active(owner=principal.name, pool=name)
            shown.append(
                {
                    "name": name,
                    "description": pool.description,
                    "gpus": len(pool.gpus),
                    "roles": list(pool.roles),
                    "open_to_you": self.refusal(principal, name) is None,
                    "limits": {
                        "max_clusters": pool.max_clusters,
                        "max_workers": pool.max_workers,
                        "max_cluster_gpus": pool.max_cluster_gpus,
                        "worker_memory": pool.worker_memory,
                        "worker_cpus": pool.worker_cpus,
                        "cluster_hours": pool.cluster_hours,
                        "certificate_minutes": pool.certificate_minutes,
                        "allow_sharing": pool.allow_sharing,
                    },
                    "holding": {
                        "clusters": len(held),
                        "workers": sum(c.workers for c in held),
                        "gpus": sum(c.gpus for c in held),
                    },
                }
            )
        return shown

    # -- starting ------------------------------------------------------------------------

    def start(
        self,
        principal: Principal,
        *,
        pool: str,
        workers: int,
        gpus: int,
        csr: str,
        account: str,
        shared_with: Iterable[Principal] = (),
        environment: str | None = None,
    ) -> Started:
        """Steps 1-5 of the module's docstring; :class:`ClusterError` with the user's message."""
        limits = self._pool(pool)
        shared = tuple(shared_with)
        workers, gpus = _counts(workers, gpus)
        detail = {"pool": pool, "workers": workers, "gpus": gpus}
        try:
            reason = self.refusal(principal, pool)
            if reason is not None:
                raise ClusterDenied(reason)
            if shared and not limits.allow_sharing:
                raise ClusterDenied(
                    f"Pool {pool} does not allow sharing clusters (allow_sharing is false)."
                )
            for other in shared:
                why = self.refusal(other, pool)
                if why is not None:
                    raise ClusterDenied(f"You cannot share with {other.name}: {why}")
            granted, chosen = self._environments(principal, environment)
            cluster_id = secrets.token_hex(8)
            record = self.store.reserve(
                cluster_id=cluster_id,
                owner=principal.name,
                pool=pool,
                limits=limits,
                workers=workers,
                gpus=gpus,
                shared_with=tuple(sorted(p.name for p in shared)),
                lifetime_hours=limits.cluster_hours,
            )
        except ClusterError as exc:
            self.record(principal.name, "pool.cluster_refused", **detail, reason=exc.message)
            raise
        # the client's request is checked and the GPUs leased before anything starts
        authority = self.authority(pool)
        minutes = limits.certificate_minutes
        lease = None
        try:
            client = authority.sign_request(
                csr, user_identity(pool, principal.name), minutes=minutes
            )
            if gpus:
                lease = self._lease(principal, record)
                # a cluster never outlives its GPUs' lease (the roles' max_server_hours)
                record = self.store.update(
                    record,
                    lease=lease.id,
                    gpu_ids=tuple(lease.gpus),
                    expires_at=min(record.expires_at, lease.expires_at),
                )
        except ZtlabError as exc:
            if lease is not None:
                self.leases.release(lease.id, reason="cluster refused", actor=record.owner)
            self.store.update(
                record, state="stopped", stopped_at=time.time(), stop_reason="refused"
            )
            self.record(principal.name, "pool.cluster_refused", **detail, reason=exc.message)
            raise
        try:
            request = self._request(
                record, lease, account=account, environments=granted, environment=chosen
            )
            cluster = self.backend.start(request)
            record = self.store.update(
                record,
                state="running",
                host=cluster.host,
                port=cluster.port,
                dashboard_port=cluster.dashboard_port,
                certificates_expire_at=time.time() + minutes * 60,
            )
        except BaseException as exc:
            self._undo(record, lease, exc)
            raise
        self.record(
            principal.name,
            "pool.cluster_started",
            cluster=record.id,
            owner=record.owner,
            pool=pool,
            workers=workers,
            gpus=list(record.gpu_ids),
            **({"lease": lease.id} if lease is not None else {}),
            shared_with=list(record.shared_with),
            scheduler=record.address,
            expires_at=utc_iso(record.expires_at),
        )
        self._issued(principal.name, pool, client, cluster=record.id)
        return Started(
            cluster=record,
            ca=authority.ca_pem,
            certificate=client.certificate,
            certificate_expires_at=client.expires_at,
        )

    def _lease(self, principal: Principal, record: ClusterRecord) -> Any:
        from ztlab.hub.gpu.backend import LeaseDenied, LeaseError, PoolExhausted, QuotaExceeded

        if self.leases is None:
            raise ClusterError("This hub hands out no GPUs; ask for gpus=0.")
        try:
            return self.leases.grant(
                user=principal.name,
                roles=principal.roles,
                server=f"cluster-{record.id}",
                pool=record.pool,
                count=record.gpus,
                hours=self.config.gpu.pools[record.pool].cluster_hours,
            )
        except LeaseDenied as exc:
            raise ClusterDenied(exc.message, hint=exc.hint) from exc
        except (QuotaExceeded, PoolExhausted) as exc:
            raise ClusterQuotaExceeded(exc.message, hint=exc.hint) from exc
        except LeaseError as exc:
            raise ClusterError(exc.message, hint=exc.hint) from exc

    def _environments(
        self, principal: Principal, asked: str | None
    ) -> tuple[dict[str, str], str | None]:
        """The environments the owner may use (name -> folder) and the one the cluster's
        workers run in: the one asked for (the kernel's), else ``base``, else the first."""
        if self.environments is None:
            return {}, None
        usable = {u.name: str(u.path) for u in self.environments.usable(principal)}
        if asked:
            if asked not in usable:
                raise ClusterDenied(
                    f"You may not use environment {asked} (or it is not built): the cluster's "
                    "workers would run in it.",
                    hint="ztlab env list shows the environments you may use",
                )
            return usable, asked
        if not usable:
            return {}, None
        return usable, "base" if "base" in usable else next(iter(usable))

    def _request(
        self,
        record: ClusterRecord,
        lease: Any,
        *,
        account: str,
        environments: dict[str, str],
        environment: str | None,
    ) -> ClusterRequest:
        limits = self.config.gpu.pools[record.pool]
        port = self.config.compute.port_base + 2 * record.slot
        files = {"ca.pem": self.authority(record.pool).ca_pem, **self._process_credentials(record)}
        gpus = tuple(lease.gpus) if lease is not None else ()
        minors = tuple(lease.minors) if lease is not None else ()
        cuda_ids = tuple(map(self.inventory.cuda_id, gpus))
        access = ClusterAccess(
            pool=record.pool,
            cluster=record.id,
            owner=record.owner,
            shared_with=frozenset(record.shared_with),
        )
        spec = {
            "account": account,
            "access": access.as_json(),
            "scheduler": {
                "port": port,
                "dashboard_port": port + 1,
                "http_prefix": f"/hub/pools/clusters/{record.id}/dashboard",
            },
            "workers": record.workers,
            "gpus": list(cuda_ids),
            "memory": limits.worker_memory,
            "threads": max(1, int(limits.worker_cpus)),
        }
        return ClusterRequest(
            id=record.id,
            owner=record.owner,
            pool=record.pool,
            workers=record.workers,
            gpus=gpus,
            minors=minors,
            cuda_ids=cuda_ids,
            shared_with=record.shared_with,
            port=port,
            dashboard_port=port + 1,
            worker_memory=limits.worker_memory,
            worker_cpus=limits.worker_cpus,
            spec=spec,
            files=files,
            probe_certificate=self.probe_certificate(record.pool),
            environments=environments,
            environment=environment,
        )

    def _undo(self, record: ClusterRecord, lease: Any, exc: BaseException) -> None:
        error = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        try:
            self.backend.stop(record.id, reason="start failed")
        finally:
            if lease is not None:
                self.leases.release(lease.id, reason="cluster start failed", actor=record.owner)
            self.store.update(
                record, state="stopped", stopped_at=time.time(), stop_reason="start failed"
            )
            self.record(
                record.owner,
                "pool.cluster_failed",
                cluster=record.id,
                owner=record.owner,
                pool=record.pool,
                error=error,
            )

    def _issued(self, user: str, pool: str, issued: Any, *, cluster: str) -> None:
        self.record(
            user,
            "pool.certificate_issued",
            pool=pool,
            holder=user_identity(pool, user).uri,
            serial=f"{issued.serial:x}",
            expires_at=utc_iso(issued.expires_at),
            cluster=cluster,
        )

    # -- certificates while a session lives ------------------------------------------------

    def renew_client(self, principal: Principal, *, pool: str, csr: str) -> Started:
        """A new client certificate for a user who still may use ``pool`` and owns (or is
        shared) a running cluster there."""
        reason = self.refusal(principal, pool)
        if reason is not None:
            raise ClusterDenied(reason)
        usable = [
            c
            for c in self.store.active(pool=pool)
            if c.owner == principal.name or principal.name in c.shared_with
        ]
        if not usable:
            raise ClusterDenied(
                f"You have no running cluster in pool {pool}: no certificate is issued.",
                hint=f'start one with ztlab.pools.cluster("{pool}")',
            )
        authority = self.authority(pool)
        minutes = self.config.gpu.pools[pool].certificate_minutes
        issued = authority.sign_request(csr, user_identity(pool, principal.name), minutes=minutes)
        self._issued(principal.name, pool, issued, cluster="")
        return Started(
            cluster=usable[0],
            ca=authority.ca_pem,
            certificate=issued.certificate,
            certificate_expires_at=issued.expires_at,
        )

    # -- looking and stopping -----------------------------------------------------------------

    def visible(self, principal: Principal, *, admin: bool = False) -> list[ClusterRecord]:
        """Running clusters the caller owns or is shared (every one for an admin)."""
        return [
            c
            for c in self.store.active()
            if admin or c.owner == principal.name or principal.name in c.shared_with
        ]

    def get(self, cluster_id: str, principal: Principal, *, admin: bool = False) -> ClusterRecord:
        """One cluster the caller may see; :class:`ClusterNotFound` otherwise."""
        record = self.store.get(cluster_id)
        if record is None or not (
            admin or record.owner == principal.name or principal.name in record.shared_with
        ):
            raise ClusterNotFound(f"You have no cluster {cluster_id!r}.")
        return record

    def stop(self, record: ClusterRecord, *, actor: str, reason: str) -> ClusterRecord:
        """Stop the cluster, release its GPUs, record why."""
        if not record.active:
            return record
        try:
            self.backend.stop(record.id, reason=reason)
        finally:
            released = []
            if self.leases is not None:
                released = self.leases.release_server(
                    user=record.owner, server=f"cluster-{record.id}", reason=reason
                )
            record = self.store.update(
                record, state="stopped", stopped_at=time.time(), stop_reason=reason
            )
            self.record(
                actor,
                "pool.cluster_stopped",
                cluster=record.id,
                owner=record.owner,
                pool=record.pool,
                reason=reason,
                leases_released=[lease.id for lease in released],
            )
        return record

    def stop_owner(self, owner: str, *, actor: str, reason: str) -> list[ClusterRecord]:
        """Stop every cluster of ``owner`` (their server stopped, they lost the pool)."""
        return [self.stop(c, actor=actor, reason=reason) for c in self.store.active(owner=owner)]

    def sweep(self, sessions: Callable[[str], Session | None], *, actor: str) -> list[str]:
        """Stop what must stop, renew what must be renewed; the clusters stopped."""
        stopped = []
        now = time.time()
        for record in self.store.active():
            session = sessions(record.owner)
            reason = None
            if now >= record.expires_at:
                reason = "lifetime ended"
            elif session is None or not session.active:
                reason = "the owner's session ended"
            else:
                why = self.refusal(Principal(name=record.owner, roles=session.roles), record.pool)
                if why is not None:
                    reason = f"the owner lost the pool: {why}"
            if reason is not None:
                self.stop(record, actor=actor, reason=reason)
                stopped.append(record.id)
            elif record.state == "running" and record.certificates_expire_at - now < _renew_before(
                self.config.gpu.pools[record.pool].certificate_minutes
            ):
                self._renew_cluster(record)
        return stopped

    def _process_credentials(self, record: ClusterRecord) -> dict[str, bytes]:
        """New keys and certificates for the scheduler and each worker, by file name."""
        authority = self.authority(record.pool)
        minutes = self.config.gpu.pools[record.pool].certificate_minutes
        files: dict[str, bytes] = {}
        names = [("scheduler", scheduler_identity(record.pool, record.id))]
        names += [
            (f"worker-{index}", worker_identity(record.pool, record.id))
            for index in range(record.workers)
        ]
        for name, identity in names:
            issued = authority.issue_with_key(identity, minutes=minutes)
            files[f"{name}.pem"], files[f"{name}.key"] = issued.certificate, issued.key
        return files

    def _renew_cluster(self, record: ClusterRecord) -> None:
        minutes = self.config.gpu.pools[record.pool].certificate_minutes
        files = self._process_credentials(record)
        self.backend.renew(record.id, files)
        self.store.update(record, certificates_expire_at=time.time() + minutes * 60)

    def reconcile(self, running_owners: Set[str], *, actor: str) -> list[str]:
        """After a hub (re)start: stop clusters whose owner has no server running, and
        clusters the store lists that the backend no longer runs."""
        alive = {c.id for c in self.backend.clusters()}
        stopped = []
        for record in self.store.active():
            if record.owner not in running_owners:
                self.stop(record, actor=actor, reason="the owner's session ended")
                stopped.append(record.id)
            elif record.id not in alive:
                self.stop(record, actor=actor, reason="its processes were gone")
                stopped.append(record.id)
        return stopped

    def record_refusals(self, record: ClusterRecord, entries: Iterable[Any]) -> int:
        """Record the refusals a cluster's scheduler handed over; how many."""
        count = 0
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            holder = entry.get("holder")
            self.record(
                f"cluster {record.id}",
                "pool.connection_refused",
                cluster=record.id,
                owner=record.owner,
                pool=record.pool,
                peer=str(entry.get("peer", ""))[:200],
                reason=str(entry.get("reason", ""))[:500],
                holder=str(holder)[:200] if isinstance(holder, str) else None,
                count=int(entry.get("count") or 1),
            )
            count += 1
        return count


def _counts(workers: Any, gpus: Any) -> tuple[int, int]:
    for name, value in (("workers", workers), ("gpus", gpus)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{name} must be a whole number, got {value!r}.")
    if not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"workers must be 1-{MAX_WORKERS}, got {workers}.")
    if not 0 <= gpus <= workers:
        raise UsageError(
            f"gpus must be 0-{workers} (one GPU per worker, as dask-cuda runs them), got {gpus}."
        )
    return workers, gpus


def _renew_before(minutes: int) -> float:
    """Seconds before expiry the cluster's certificates are renewed: 25 minutes, or half
    their life when that is shorter (never at every sweep)."""
    return min(RENEW_BEFORE_SECONDS, minutes * 30.0)
