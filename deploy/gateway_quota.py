"""GPU pools with per-user and per-group quotas, inside dask-gateway-server.

Dask Gateway has cluster options and per-cluster limits (``cluster_max_workers``), but
nothing that counts what one user, or the members of a group, hold over all their
clusters. ztlab's control plane does that for its own pools (``max_clusters``,
``max_workers``, ``max_cluster_gpus`` per user and pool; the largest ``max_gpus`` of the
user's roles over everything they hold). This module brings the same limits to a
gateway: ``ztlab k8s gateway`` (:mod:`ztlab.deploy.gateway`) embeds its source in the
gateway's configuration, so the gateway image needs nothing but ``dask-gateway-server``;
it imports only the standard library and ``dask_gateway_server``.

Two parts, both built from one :class:`QuotaPolicy` (a plain mapping rendered from
``ztlab.toml``):

* :meth:`QuotaPolicy.cluster_options` is ``c.Backend.cluster_options``: for each user,
  a ``pool`` choice among the pools their roles may use, ``workers`` (the most workers
  the cluster may scale to) and ``gpus`` (GPUs per worker); its handler turns the pool
  into worker resources: cores, memory, ``cluster_max_workers`` and, on Kubernetes, the
  ``nvidia.com/gpu`` limit, node selector and tolerations. The handler refuses what no
  state is needed to refuse (a pool the user's roles may not use, more workers or GPUs
  than the pool allows to anyone).
* :func:`quota_backend` makes a subclass of a gateway backend (``KubeBackend``,
  ``LocalBackend``, ...) whose ``start_cluster`` first counts the clusters the user holds
  -- the backend's own ``list_clusters``, the only record of clusters a gateway has --
  and refuses a cluster past a limit with a message naming it. A cluster counts with
  its *caps*: ``workers`` workers and ``workers * gpus`` GPUs, whether or not it has
  scaled up yet, because scaling happens later, without asking the backend first; the
  per-cluster ``cluster_max_workers`` keeps each cluster within what was counted. The
  subclass also stops clusters older than their pool's ``cluster_hours``.

What a user "holds" is what this gateway sees: its active clusters (pending, running or
stopping) and, for the moment between a cluster's creation and the backend seeing it
(Kubernetes: the informer's cache), the clusters this process just created. A user's
groups come from the authenticator (JupyterHub: the groups the token may read); roles
come from ``ztlab-role-ROLE`` groups (what ztlab's hub sets) and from ``[groups]`` of
``ztlab.toml``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dask_gateway_server.backends.base import PublicException  # type: ignore[import-untyped]
from dask_gateway_server.models import ClusterStatus  # type: ignore[import-untyped]
from dask_gateway_server.options import (  # type: ignore[import-untyped]
    Integer,
    Options,
    Select,
)

if TYPE_CHECKING:
    import logging

__all__ = [
    "ACTIVE_STATUSES",
    "Held",
    "PoolLimits",
    "QuotaBackendMixin",
    "QuotaExceeded",
    "QuotaPolicy",
    "Request",
    "merge_json",
    "quota_backend",
]

#: cluster states that hold resources: a stopping cluster's pods may still hold GPUs
ACTIVE_STATUSES = (ClusterStatus.PENDING, ClusterStatus.RUNNING, ClusterStatus.STOPPING)


class QuotaExceeded(PublicException):  # type: ignore[misc]
    """A refusal the user sees (HTTP 422; ``dask_gateway`` raises it as ``ValueError``)."""


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def merge_json(base: Any, extra: Any) -> Any:
    """``extra`` laid over ``base`` as the gateway's controller does it: mappings merged
    key by key, lists appended, anything else replaced. Neither input is changed."""
    if isinstance(base, Mapping) and isinstance(extra, Mapping):
        out = {key: copy.deepcopy(value) for key, value in base.items()}
        for key, value in extra.items():
            out[key] = merge_json(out[key], value) if key in out else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(extra, list):
        return copy.deepcopy(base) + copy.deepcopy(extra)
    return copy.deepcopy(extra)


# --------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolLimits:
    """One ``[gpu.pools.NAME]``, as far as a gateway enforces it."""

    name: str
    description: str
    #: roles allowed in the pool
    roles: frozenset[str]
    #: GPUs in the pool: the most one worker may have
    gpus: int
    max_clusters: int
    max_workers: int
    max_cluster_gpus: int
    #: bytes
    worker_memory: int
    worker_cores: float
    cluster_hours: float
    #: Kubernetes placement of GPU workers: ``gpu_resource``, ``node_selector``,
    #: ``tolerations`` and ``labels`` (``None`` on a backend that is not Kubernetes)
    kubernetes: Mapping[str, Any] | None

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> PoolLimits:
        placement = data.get("kubernetes")
        return cls(
            name=name,
            description=str(data.get("description", "")),
            roles=frozenset(data["roles"]),
            gpus=int(data["gpus"]),
            max_clusters=int(data["max_clusters"]),
            max_workers=int(data["max_workers"]),
            max_cluster_gpus=int(data["max_cluster_gpus"]),
            worker_memory=int(data["worker_memory"]),
            worker_cores=float(data["worker_cores"]),
            cluster_hours=float(data["cluster_hours"]),
            kubernetes=copy.deepcopy(dict(placement)) if placement is not None else None,
        )


@dataclass(frozen=True, slots=True)
class Request:
    """What a user asks for: a pool, a worker cap and GPUs per worker."""

    pool: str | None
    workers: int
    gpus: int

    @property
    def total_gpus(self) -> int:
        """GPUs the cluster holds once scaled to its cap."""
        return self.workers * self.gpus

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> Request:
        """From parsed cluster options (``pool``, ``workers``, ``gpus``)."""
        pool = options.get("pool")
        return cls(
            pool=pool if isinstance(pool, str) else None,
            workers=_whole(options.get("workers", 0)),
            gpus=_whole(options.get("gpus", 0)),
        )


def _whole(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(frozen=True, slots=True)
class Held:
    """A cluster a user holds, as counted against their limits."""

    name: str
    pool: str | None
    workers: int
    gpus: int

    @property
    def total_gpus(self) -> int:
        return self.workers * self.gpus

    @classmethod
    def of(cls, cluster: Any) -> Held:
        """From a gateway ``Cluster`` model: its options say what it was granted."""
        request = Request.of(getattr(cluster, "options", None) or {})
        return cls(
            name=str(cluster.name), pool=request.pool, workers=request.workers, gpus=request.gpus
        )

    def describe(self) -> str:
        return f"{self.name} ({_n(self.workers, 'worker')} x {_n(self.gpus, 'GPU')})"


def _listing(held: Sequence[Held]) -> str:
    return ", ".join(h.describe() for h in held) if held else "none"


class QuotaPolicy:
    """The pools, roles and groups of ``ztlab.toml`` that a gateway enforces.

    ``data`` is what :func:`ztlab.deploy.gateway.quota_policy` renders: ``pools`` (name
    -> limits), ``roles`` (name -> ``max_gpus``), ``groups`` (group -> role names) and
    ``role_group_prefix``. ``defaults`` are the configured values of
    ``KubeClusterConfig`` that the handler's per-pool settings are merged into (the
    chart's ``gateway.backend.*``), so that they are extended, not replaced.
    """

    def __init__(
        self, data: Mapping[str, Any], *, defaults: Mapping[str, Any] | None = None
    ) -> None:
        self.pools: dict[str, PoolLimits] = {
            name: PoolLimits.from_dict(name, pool) for name, pool in data["pools"].items()
        }
        self.role_max_gpus: dict[str, int] = {
            name: int(max_gpus) for name, max_gpus in data["roles"].items()
        }
        self.groups: dict[str, tuple[str, ...]] = {
            group: tuple(roles) for group, roles in data.get("groups", {}).items()
        }
        self.role_group_prefix: str = str(data["role_group_prefix"])
        self.defaults: dict[str, Any] = copy.deepcopy(dict(defaults or {}))

    # -- who the user is -----------------------------------------------------------------

    def roles_of(self, user: Any) -> dict[str, str]:
        """The user's roles, each with the group that grants it (the first, sorted)."""
        out: dict[str, str] = {}
        prefix = self.role_group_prefix
        for group in sorted(str(getattr(g, "name", g)) for g in getattr(user, "groups", ())):
            granted: Iterable[str] = self.groups.get(group, ())
            if prefix and group.startswith(prefix):
                granted = (*granted, group[len(prefix) :])
            for role in granted:
                if role in self.role_max_gpus:
                    out.setdefault(role, group)
        return out

    def gpu_quota(self, roles: Mapping[str, str]) -> tuple[int, str, str]:
        """``(max_gpus, role, group)``: the largest ``max_gpus`` among ``roles``."""
        if not roles:
            return 0, "", ""
        role = max(sorted(roles), key=lambda r: self.role_max_gpus[r])
        return self.role_max_gpus[role], role, roles[role]

    def pools_for(self, roles: Mapping[str, str]) -> list[PoolLimits]:
        """The pools one of ``roles`` may use and that run clusters, in order."""
        return [
            pool for pool in self.pools.values() if pool.roles & set(roles) and pool.max_clusters
        ]

    # -- c.Backend.cluster_options ---------------------------------------------------------

    def cluster_options(self, user: Any) -> Any:
        """``c.Backend.cluster_options``: the options ``user`` may choose from."""
        roles = self.roles_of(user)
        pools = self.pools_for(roles)
        if not pools:
            # Select needs a choice; with none, every request is refused with the reason
            return Options(handler=self.configuration)
        quota, _, _ = self.gpu_quota(roles)
        max_workers = max(pool.max_workers for pool in pools)
        # the roles' quota is left to the check, whose refusal says what it is
        max_gpus = max(min(pool.gpus, pool.max_cluster_gpus) for pool in pools)
        return Options(
            Select(
                "pool",
                [pool.name for pool in pools],
                label="GPU pool (" + "; ".join(_pool_line(pool) for pool in pools) + ")",
            ),
            Integer(
                "workers",
                default=1,
                min=1,
                max=max_workers,
                label="Workers: the most this cluster may scale to",
            ),
            Integer(
                "gpus",
                default=min(1, max_gpus, quota),
                min=0,
                max=max_gpus,
                label="GPUs per worker",
            ),
            handler=self.configuration,
        )

    def configuration(self, options: Mapping[str, Any], user: Any) -> dict[str, Any]:
        """The options handler: the chosen pool as ``ClusterConfig`` settings.

        Refuses (:class:`QuotaExceeded`, shown to the user) what is wrong whatever the
        user holds; :class:`QuotaBackendMixin` checks what they hold before this runs.
        """
        request = Request.of(options)
        self.check(user, request, ())
        pool = self.pools[str(request.pool)]
        settings: dict[str, Any] = {
            "cluster_max_workers": request.workers,
            "worker_memory": pool.worker_memory,
        }
        placement = pool.kubernetes
        if placement is None:
            # ClusterConfig.worker_cores is a whole number outside Kubernetes
            settings["worker_cores"] = max(1, math.ceil(pool.worker_cores))
            return settings
        settings.update(
            worker_cores=pool.worker_cores,
            worker_cores_limit=pool.worker_cores,
            worker_memory_limit=pool.worker_memory,
        )
        resource = str(placement["gpu_resource"])
        worker_container: dict[str, Any]
        worker_pod: dict[str, Any] = {}
        if request.gpus:
            count = str(request.gpus)
            worker_container = {
                "resources": {"requests": {resource: count}, "limits": {resource: count}}
            }
            if placement.get("node_selector"):
                worker_pod["nodeSelector"] = dict(placement["node_selector"])
            if placement.get("tolerations"):
                worker_pod["tolerations"] = [dict(t) for t in placement["tolerations"]]
        else:
            # an image built on nvidia/cuda asks for every GPU of a node whose default
            # runtime is NVIDIA's; a worker without a GPU limit gets none
            worker_container = {"env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}]}
        scheduler_container = {"env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}]}
        for key, extra in (
            ("worker_extra_container_config", worker_container),
            ("worker_extra_pod_config", worker_pod),
            ("worker_extra_pod_labels", dict(placement.get("labels") or {})),
            ("scheduler_extra_container_config", scheduler_container),
        ):
            settings[key] = merge_json(self.defaults.get(key) or {}, extra)
        return settings

    # -- the limits ------------------------------------------------------------------------

    def check(self, user: Any, request: Request, held: Sequence[Held]) -> None:
        """Raise :class:`QuotaExceeded` unless ``user``, holding ``held``, may have
        ``request``; the message names the limit."""
        name = str(getattr(user, "name", user))
        roles = self.roles_of(user)
        if request.pool is None:
            granted = ", ".join(sorted(roles)) or "none"
            raise QuotaExceeded(
                f"User {name} may use no GPU pool: no pool that runs clusters is open to "
                f"the roles their groups grant ({granted})."
            )
        pool = self.pools.get(request.pool)
        if pool is None:
            raise QuotaExceeded(
                f"There is no GPU pool {request.pool!r}; pools: {', '.join(self.pools)}."
            )
        if not pool.roles & set(roles):
            raise QuotaExceeded(
                f"User {name} may not use pool {pool.name}: it is open to role(s) "
                f"{', '.join(sorted(pool.roles)) or 'none'} and their groups grant "
                f"{', '.join(sorted(roles)) or 'no role'}."
            )
        if pool.max_clusters == 0:
            raise QuotaExceeded(f"Pool {pool.name} runs no clusters (its max_clusters is 0).")
        if request.workers < 1:
            raise QuotaExceeded(f"A cluster needs at least 1 worker, not {request.workers}.")
        if request.gpus > pool.gpus:
            raise QuotaExceeded(
                f"Pool {pool.name} has {_n(pool.gpus, 'GPU')}; a worker cannot have {request.gpus}."
            )
        mine = [h for h in held if h.pool == pool.name]
        stop_one = "stop one (cluster.shutdown()) and wait until it has stopped"
        if len(mine) + 1 > pool.max_clusters:
            raise QuotaExceeded(
                f"Pool {pool.name} allows {_n(pool.max_clusters, 'cluster')} per user "
                f"(max_clusters); {name} holds {_listing(mine)}; {stop_one}."
            )
        busy = sum(h.workers for h in mine)
        if busy + request.workers > pool.max_workers:
            raise QuotaExceeded(
                f"Pool {pool.name} allows {_n(pool.max_workers, 'worker')} per user over all "
                f"clusters (max_workers); {name} asked for a cluster of up to "
                f"{request.workers} and holds {_n(busy, 'worker')} ({_listing(mine)})."
            )
        asked = request.total_gpus
        busy = sum(h.total_gpus for h in mine)
        if asked and busy + asked > pool.max_cluster_gpus:
            raise QuotaExceeded(
                f"Pool {pool.name} allows {_n(pool.max_cluster_gpus, 'GPU')} per user for "
                f"clusters (max_cluster_gpus); {name} asked for {request.workers} x "
                f"{request.gpus} = {_n(asked, 'GPU')} and holds {_n(busy, 'GPU')} "
                f"({_listing(mine)})."
            )
        quota, role, group = self.gpu_quota(roles)
        busy = sum(h.total_gpus for h in held)
        if asked and busy + asked > quota:
            everywhere = [h for h in held if h.total_gpus]
            raise QuotaExceeded(
                f"Role {role} (group {group}) may hold at most {_n(quota, 'GPU')} (max_gpus); "
                f"{name} asked for {request.workers} x {request.gpus} = {_n(asked, 'GPU')} "
                f"and holds {_n(busy, 'GPU')} in Dask clusters ({_listing(everywhere)})."
            )

    def expired(self, cluster: Any, now_ms: float) -> PoolLimits | None:
        """The pool whose ``cluster_hours`` ``cluster`` outlived, else ``None``."""
        name = Held.of(cluster).pool
        pool = self.pools.get(name) if name is not None else None
        start = getattr(cluster, "start_time", None)
        if pool is None or not isinstance(start, int | float):
            return None
        return pool if now_ms - start > pool.cluster_hours * 3_600_000 else None


def _pool_line(pool: PoolLimits) -> str:
    text = (
        f"{pool.name}: {_n(pool.max_workers, 'worker')}, {_n(pool.max_cluster_gpus, 'GPU')} "
        f"and {_n(pool.max_clusters, 'cluster')} per user"
    )
    return f"{text}, {pool.description}" if pool.description else text


# --------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------


class QuotaBackendMixin:
    """Counts a user's clusters before a gateway backend starts another.

    Mix in front of a ``dask_gateway_server`` backend (see :func:`quota_backend`);
    ``ztlab_policy`` must be set on the class. Checks and starts run one at a time in
    this process, so two requests cannot both take the last place.
    """

    ztlab_policy: QuotaPolicy
    #: seconds between sweeps for clusters past their pool's ``cluster_hours``
    ztlab_sweep_seconds: float = 60.0
    #: how long a cluster this process created counts before the backend lists it
    ztlab_pending_seconds: float = 300.0

    if TYPE_CHECKING:
        log: logging.Logger
        cluster_options: Any

        async def list_clusters(
            self, username: str | None = None, statuses: Any = None
        ) -> list[Any]: ...

        async def stop_cluster(self, cluster_name: str, failed: bool = False) -> None: ...

    async def setup(self, app: Any) -> None:
        self._ztlab_lock = asyncio.Lock()
        self._ztlab_pending: dict[str, tuple[str, Request, float]] = {}
        await super().setup(app)  # type: ignore[misc]
        # (traitlets hands the backend a deep copy of the configured policy)
        if getattr(self.cluster_options, "__func__", None) is not QuotaPolicy.cluster_options:
            raise ValueError(
                "ztlab: c.Backend.cluster_options was replaced after ztlab's configuration; "
                "the quota check counts ztlab's pool, workers and gpus options"
            )
        self._ztlab_sweeper = asyncio.ensure_future(self._ztlab_sweep_loop())

    async def cleanup(self) -> None:
        sweeper = getattr(self, "_ztlab_sweeper", None)
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        await super().cleanup()  # type: ignore[misc]

    async def start_cluster(self, user: Any, cluster_options: Any) -> str:
        policy = self.ztlab_policy
        try:
            options = policy.cluster_options(user).parse_options(cluster_options)
        except Exception as exc:
            raise PublicException(str(exc)) from exc
        request = Request.of(options)
        async with self._ztlab_lock:
            held = await self.ztlab_held(user.name)
            try:
                policy.check(user, request, held)
            except QuotaExceeded as exc:
                self.log.info("ztlab: refused a cluster for user %s: %s", user.name, exc)
                raise
            name: str = await super().start_cluster(user, cluster_options)  # type: ignore[misc]
            self._ztlab_pending[name] = (user.name, request, time.monotonic())
        return name

    async def ztlab_held(self, username: str) -> list[Held]:
        """The clusters ``username`` holds: active ones, and ones just created here."""
        clusters = await self.list_clusters(username=username, statuses=list(ClusterStatus))
        listed = {c.name for c in clusters}
        now = time.monotonic()
        for name, (_, _, created) in list(self._ztlab_pending.items()):
            if name in listed or now - created > self.ztlab_pending_seconds:
                del self._ztlab_pending[name]
        held = [Held.of(c) for c in clusters if c.status in ACTIVE_STATUSES]
        held += [
            Held(name, request.pool, request.workers, request.gpus)
            for name, (owner, request, _) in self._ztlab_pending.items()
            if owner == username
        ]
        return held

    async def ztlab_sweep(self) -> list[str]:
        """Stop the clusters past their pool's ``cluster_hours``; their names."""
        stopped = []
        now_ms = time.time() * 1000
        for cluster in await self.list_clusters():
            pool = self.ztlab_policy.expired(cluster, now_ms)
            if pool is None:
                continue
            self.log.info(
                "ztlab: stopping cluster %s of user %s: pool %s allows %s hours (cluster_hours)",
                cluster.name,
                cluster.username,
                pool.name,
                f"{pool.cluster_hours:g}",
            )
            await self.stop_cluster(cluster.name)
            stopped.append(cluster.name)
        return stopped

    async def _ztlab_sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ztlab_sweep_seconds)
            try:
                await self.ztlab_sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.warning("ztlab: sweep for expired clusters failed", exc_info=True)


def quota_backend(base: type, policy: QuotaPolicy, **settings: Any) -> type:
    """``base`` (a gateway backend class) with :class:`QuotaBackendMixin` and ``policy``.

    The subclass is named ``Ztlab`` + the base's name; configuration sections of the base
    (``c.KubeBackend``, ``c.LocalBackend``, ``c.Backend``) still apply to it. ``settings``
    override the mixin's class attributes (``ztlab_sweep_seconds``, ...).
    """
    unknown = sorted(set(settings) - {"ztlab_sweep_seconds", "ztlab_pending_seconds"})
    if unknown:
        raise TypeError(f"quota_backend: unknown settings {unknown}")
    return type(
        f"Ztlab{base.__name__}",
        (QuotaBackendMixin, base),
        {"ztlab_policy": policy, "__module__": __name__, **settings},
    )
