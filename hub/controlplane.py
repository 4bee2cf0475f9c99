"""The control plane: every service the hub runs, built once from the validated configuration.

One :class:`ControlPlane` per hub process owns the audit writer, the policy engine, the TOTP
store, the dataset registry, the model service (and the MLflow server behind it), the GPU
lease backend, the cgroups and the network segments. :meth:`ControlPlane.open` builds them
in that order, each from :class:`~ztlab.common.config.ZtlabConfig` and nothing else: the
configuration file is read once, by whoever calls :meth:`open`.

The hub (:class:`~ztlab.hub.app.ZtlabHub`) puts the plane into its tornado settings under
:data:`SETTINGS_KEY`; the authenticator, the spawners and the API handlers all take it from
there with :func:`control_plane`, so they share one instance and none of them owns a
service.

Every audit record the plane's services write goes through :meth:`ControlPlane.record`
(or the :attr:`ControlPlane.events` sink handed to the services), which refuses an event
missing from the catalogue (:mod:`ztlab.common.auditlog.events`). Whatever the hub
acknowledges to a client waits for :meth:`ControlPlane.flush` first, so no acknowledged
record is lost to a crash.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ztlab import __version__
from ztlab.common.auditlog.events import CataloguedSink
from ztlab.common.config import ZtlabConfig
from ztlab.common.errors import ConfigError
from ztlab.hub.audit import AuditLog
from ztlab.hub.datasets import DatasetRegistry
from ztlab.hub.keys import load_or_create_attestation_key
from ztlab.hub.mfa import TotpStore
from ztlab.hub.policy import PolicyEngine
from ztlab.hub.private import private_directory

if TYPE_CHECKING:
    from ztlab.hub.compute.service import ClusterService
    from ztlab.hub.environments import EnvironmentService
    from ztlab.hub.gpu.backend import LeaseBackend
    from ztlab.hub.gpu.inventory import Inventory
    from ztlab.hub.models.server import ModelServer
    from ztlab.hub.models.service import ModelService
    from ztlab.hub.monitor.service import GpuMonitor
    from ztlab.hub.packages import PackageMirror, PackageRequests
    from ztlab.hub.runs import RunService
    from ztlab.hub.sandbox.cgroups import CgroupManager
    from ztlab.hub.sandbox.netns import NetworkSegments

#: where the hub's tornado settings hold the plane
SETTINGS_KEY: Final = "ztlab_control_plane"
#: the audit actor of what the control plane does on its own
SYSTEM_ACTOR: Final = "ztlab-hub"


class ControlPlaneMissing(ConfigError):
    """Something asked for the control plane where the hub has none (not run by ztlab)."""


@dataclass(frozen=True, slots=True)
class KnownUser:
    """A hub user as :meth:`ControlPlane.reconcile` needs them."""

    name: str
    #: the user's Unix account (its cgroup has the same name)
    account: str
    #: the names of the user's servers that run or are starting
    running: frozenset[str]


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """What :meth:`ControlPlane.reconcile` found and mended."""

    running: tuple[str, ...]
    leases_released: tuple[str, ...]
    sandboxes_stopped: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Sandboxing:
    """The host's isolation machinery, when ``[sandbox] enabled``."""

    cgroups: CgroupManager
    segments: NetworkSegments


class ControlPlane:
    """The hub's services. Build with :meth:`open`; hand out with :data:`SETTINGS_KEY`."""

    def __init__(
        self,
        *,
        config: ZtlabConfig,
        audit: AuditLog,
        policy: PolicyEngine,
        totp: TotpStore,
        datasets: DatasetRegistry,
        models: ModelService | None,
        model_server: ModelServer | None,
        sandbox: Sandboxing | None,
        inventory: Inventory | None,
        leases: LeaseBackend | None,
        environments: EnvironmentService | None = None,
        mirror: PackageMirror | None = None,
        package_requests: PackageRequests | None = None,
        clusters: ClusterService | None = None,
        monitor: GpuMonitor | None = None,
        runs: RunService | None = None,
    ) -> None:
        """Use :meth:`open`; this takes services that are already open."""
        self.config = config
        self.audit = audit
        self.policy = policy
        self.totp = totp
        self.datasets = datasets
        self.models = models
        self.model_server = model_server
        self.sandbox = sandbox
        self.inventory = inventory
        self.leases = leases
        self.environments = environments
        self.mirror = mirror
        self.package_requests = package_requests
        self.clusters = clusters
        self.monitor = monitor
        self.runs = runs
        #: the sink every service records through (catalogued events only)
        self.events = CataloguedSink(audit)
        self._closed = False

    # -- building ------------------------------------------------------------------------

    @classmethod
    def open(cls, config: ZtlabConfig, *, source: str = "ztlab.toml") -> ControlPlane:
        """Open every service of ``config``; ``source`` names the file in error messages.

        Order: the state directory (0700), the audit log, the policy engine, the TOTP
        store, the statement key and the dataset registry, the model service, the sandbox
        (cgroups, network segments: the service address is put on ``lo`` here, before the
        hub's API binds to it) and the GPU inventory and lease backend. What was opened is
        closed again if a later step fails.
        """
        private_directory(config.state_dir, what="state directory", error=ConfigError, tighten=True)
        audit = AuditLog.open(
            config.audit_log_path,
            key_path=config.audit_signing_key_path,
            origin=config.audit.origin,
            checkpoint_interval=config.audit.checkpoint_interval_seconds,
        )
        opened: list[Any] = [audit]
        try:
            events = CataloguedSink(audit)
            policy = (
                PolicyEngine.from_directory(config.policy_directory, audit=events)
                if config.policy_directory is not None
                else PolicyEngine.defaults(audit=events)
            )
            keys = private_directory(
                config.state_dir / "keys", what="key directory", error=ConfigError, tighten=True
            )
            hub_state = private_directory(
                config.state_dir / "hub", what="state directory", error=ConfigError, tighten=True
            )
            totp = TotpStore.open(
                hub_state / "totp.sqlite",
                key_path=keys / "totp.key",
                audit=events,
                max_failures=config.login.totp_max_failures,
                lockout_seconds=config.login.totp_lockout_seconds,
            )
            opened.append(totp)
            statement_key = load_or_create_attestation_key(config.attestation_key_path)
            datasets = DatasetRegistry(
                path=config.dataset_registry_path,
                key=statement_key,
                policy=policy,
                audit=events,
                storage_roots=list(config.datasets.storage_roots),
            )
            models, model_server = _models(config, source, statement_key, policy, events, datasets)
            sandbox = _sandboxing(config) if config.sandbox.enabled else None
            inventory, leases = _gpus(config, source, policy, events)
            if leases is not None:
                opened.append(leases)
            environments, mirror, package_requests = _packages(config, source, policy, events)
            opened += [s for s in (environments, package_requests) if s is not None]
            clusters = _clusters(config, source, policy, events, sandbox, inventory, leases)
            if clusters is not None:
                clusters.environments = environments
            if clusters is not None:
                opened.append(clusters)
            monitor = _monitor(config, policy, events, sandbox, inventory, leases)
            if monitor is not None:
                opened.append(monitor)
            runs = _runs(config, policy, events, sandbox, statement_key, inventory, leases, models)
            if runs is not None:
                opened.append(runs)
        except BaseException:
            for service in reversed(opened):
                service.close()
            raise
        plane = cls(
            config=config,
            audit=audit,
            policy=policy,
            totp=totp,
            datasets=datasets,
            models=models,
            model_server=model_server,
            sandbox=sandbox,
            inventory=inventory,
            leases=leases,
            environments=environments,
            mirror=mirror,
            package_requests=package_requests,
            clusters=clusters,
            monitor=monitor,
            runs=runs,
        )
        plane.record(
            SYSTEM_ACTOR,
            "control_plane.started",
            config=source,
            pid=os.getpid(),
            services=plane.services,
            version=__version__,
        )
        return plane

    @property
    def services(self) -> list[str]:
        """The services this plane runs, by name."""
        names = ["audit", "policy", "totp", "datasets"]
        if self.models is not None:
            names.append("models")
        if self.sandbox is not None:
            names.append("sandbox")
        if self.leases is not None:
            names.append("gpu-leases")
        if self.mirror is not None:
            names += ["packages", "environments"]
        if self.clusters is not None:
            names.append("clusters")
        if self.monitor is not None:
            names.append("gpu-monitor")
        if self.runs is not None:
            names.append("runs")
        return names

    # -- auditing ------------------------------------------------------------------------

    def record(self, actor: str, action: str, **detail: Any) -> None:
        """Queue one audit record, checked against the catalogue (never blocks on disk)."""
        self.events.record(actor=actor or "anonymous", action=action, detail=detail)

    async def flush(self) -> None:
        """Wait until every record queued so far is on disk (before acknowledging)."""
        await asyncio.wrap_future(self.audit.flush())

    # -- services the hub runs -----------------------------------------------------------

    def start_services(self) -> None:
        """Start the processes the plane runs (MLflow), stopping what a crashed hub left."""
        if self.model_server is not None:
            self.model_server.start()
        if self.mirror is not None:
            self.mirror.start()

    def watch_services(self) -> None:
        """Start again a service process that exited (called periodically by the hub)."""
        for name, server in (("mlflow", self.model_server), ("devpi", self.mirror)):
            if server is not None and not server.running():
                status = server.exit_status()
                server.start()
                self.record(
                    SYSTEM_ACTOR,
                    "control_plane.service_restarted",
                    service=name,
                    exit_status=status,
                    log=str(server.log_file),
                )

    # -- restart safety --------------------------------------------------------------------

    def reconcile(self, users: Iterable[KnownUser]) -> Reconciliation:
        """Match leases and sandboxes with the servers that run, after a (re)start.

        (1) The clusters of users with no server running or starting are stopped (and
        those whose processes are gone). (2) A lease whose server (or cluster) does not run
        is released. (3) The sandbox of a known user with no server running or starting is
        ended (everything in its cgroup killed): processes a crashed hub left behind hold no
        lease and reach no GPU. Users this hub does not know (another hub's, on the same
        machine) are left alone.
        """
        known = list(users)
        running = {(user.name, server) for user in known for server in user.running}
        holders = set(running)
        if self.clusters is not None:  # before the leases: a cluster's lease is its own
            self.clusters.reconcile(
                {user.name for user in known if user.running}, actor=SYSTEM_ACTOR
            )
            holders |= {(c.owner, f"cluster-{c.id}") for c in self.clusters.store.active()}
        if self.runs is not None:  # ended (and their leases released) by runs.recover()
            holders |= {(r.owner, r.server) for r in self.runs.store.left_active()}
        released: list[str] = []
        if self.leases is not None:
            for lease in self.leases.active():
                if (lease.user, lease.server) not in holders:
                    self.leases.release(lease.id, reason="reconciled", actor=SYSTEM_ACTOR)
                    released.append(lease.id)
        stopped: list[str] = []
        if self.sandbox is not None:
            cgroups = self.sandbox.cgroups
            for user in known:
                if user.running:
                    continue
                cgroup = cgroups.get(user.account)
                if cgroup is not None and cgroup.procs():
                    cgroup.kill_all()
                    stopped.append(user.account)
        result = Reconciliation(
            running=tuple(sorted(f"{user}/{server}" for user, server in running)),
            leases_released=tuple(released),
            sandboxes_stopped=tuple(stopped),
        )
        self.record(
            SYSTEM_ACTOR,
            "control_plane.reconciled",
            running=list(result.running),
            leases_released=list(result.leases_released),
            sandboxes_stopped=list(result.sandboxes_stopped),
        )
        return result

    def close(self) -> None:
        """Stop the plane's processes and close every service (the audit log last)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.runs is not None:
                self.runs.close()
            if self.monitor is not None:
                self.monitor.close()
            if self.model_server is not None:
                self.model_server.stop()
            if self.mirror is not None:
                self.mirror.stop()
            for service in (self.environments, self.package_requests, self.clusters):
                if service is not None:
                    service.close()
            if self.leases is not None:
                self.leases.close()
            self.totp.close()
            self.datasets.close()
            self.record(SYSTEM_ACTOR, "control_plane.stopped", pid=os.getpid())
        finally:
            self.audit.close()


def control_plane(settings: Mapping[str, Any]) -> ControlPlane:
    """The hub's control plane, from its tornado settings (or the settings' owner)."""
    plane = settings.get(SETTINGS_KEY)
    if not isinstance(plane, ControlPlane):
        raise ControlPlaneMissing(
            "this hub has no zerotrust-lab control plane",
            hint="run the hub with `ztlab hub` (it builds the control plane from ztlab.toml)",
        )
    return plane


# -- the parts that depend on the configuration --------------------------------------------


def _models(
    config: ZtlabConfig,
    source: str,
    key: Any,
    policy: PolicyEngine,
    events: CataloguedSink,
    datasets: DatasetRegistry,
) -> tuple[ModelService | None, ModelServer | None]:
    if not config.models.enabled:
        return None, None
    from ztlab.hub.models.mlflow import MlflowREST, proxy_key
    from ztlab.hub.models.server import ModelServer
    from ztlab.hub.models.service import ModelService

    store = private_directory(
        config.models_store, what="model store", error=ConfigError, tighten=True
    )
    if config.models.s3_endpoint_url:
        # for the MLflow server (it inherits it) and the signing service in this process
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = config.models.s3_endpoint_url
    server = ModelServer(config, config_source=source)
    service = ModelService(
        store=store,
        mlflow=MlflowREST(server.url, key=proxy_key(store)),
        key=key,
        policy=policy,
        audit=events,
        datasets=datasets,
        protected_aliases=list(config.models.protected_aliases),
        artifacts_destination=config.models.artifacts_destination or None,
    )
    return service, server


def _packages(
    config: ZtlabConfig, source: str, policy: PolicyEngine, events: CataloguedSink
) -> tuple[EnvironmentService | None, PackageMirror | None, PackageRequests | None]:
    """The package mirror, the request store and the environment service (``[packages]``:
    environments are built through the package proxy, so they come with it)."""
    if not config.packages.enabled:
        return None, None, None
    from ztlab.hub.environments import EnvironmentRegistry, EnvironmentService
    from ztlab.hub.packages import PackageMirror, PackageRequests

    def record(actor: str, action: str, **detail: Any) -> None:
        events.record(actor=actor, action=action, detail=detail)

    requests = PackageRequests(config.state_dir / "packages" / "requests.sqlite")
    environments = EnvironmentService(
        config,
        policy=policy,
        record=record,
        registry=EnvironmentRegistry(config.state_dir / "environments"),
    )
    return environments, PackageMirror(config, config_source=source), requests


def _clusters(
    config: ZtlabConfig,
    source: str,
    policy: PolicyEngine,
    events: CataloguedSink,
    sandbox: Sandboxing | None,
    inventory: Inventory | None,
    leases: LeaseBackend | None,
) -> ClusterService | None:
    """The pools' clusters (whenever pools are configured)."""
    if not config.gpu.pools or (config.compute.backend == "local" and sandbox is None):
        return None  # the local backend runs clusters in the users' sandboxes
    from ztlab.hub.compute.backend import compute_backend
    from ztlab.hub.compute.service import ClusterService

    def record(actor: str, action: str, **detail: Any) -> None:
        events.record(actor=actor, action=action, detail=detail)

    backend = compute_backend(config.compute.backend, source=source).open(
        config=config,
        cgroups=sandbox.cgroups if sandbox is not None else None,
        segments=sandbox.segments if sandbox is not None else None,
    )
    return ClusterService(
        config, policy=policy, record=record, leases=leases, inventory=inventory, backend=backend
    )


def _monitor(
    config: ZtlabConfig,
    policy: PolicyEngine,
    events: CataloguedSink,
    sandbox: Sandboxing | None,
    inventory: Inventory | None,
    leases: LeaseBackend | None,
) -> GpuMonitor | None:
    """The GPU monitor, where ``[gpu.monitor] source`` gives readings (see ``open_source``)."""
    from ztlab.hub.monitor.service import GpuMonitor, open_source

    source = open_source(config)
    if source is None:
        return None

    def record(actor: str, action: str, **detail: Any) -> None:
        events.record(actor=actor, action=action, detail=detail)

    try:
        return GpuMonitor.open(
            config,
            source=source,
            policy=policy,
            record=record,
            inventory=inventory,
            leases=leases,
            cgroups=sandbox.cgroups if sandbox is not None else None,
        )
    except BaseException:
        source.close()
        raise


def _runs(
    config: ZtlabConfig,
    policy: PolicyEngine,
    events: CataloguedSink,
    sandbox: Sandboxing | None,
    key: Any,
    inventory: Inventory | None,
    leases: LeaseBackend | None,
    models: ModelService | None,
) -> RunService | None:
    """The notebook runs' scheduler (``[runs] enabled``, with the sandbox runs execute in)."""
    if not config.runs.enabled or sandbox is None:
        return None
    from ztlab.hub.runs import RunService

    def record(actor: str, action: str, **detail: Any) -> None:
        events.record(actor=actor, action=action, detail=detail)

    service = RunService(
        config,
        policy=policy,
        record=record,
        key=key,
        leases=leases,
        inventory=inventory,
        models=models,
    )
    try:
        service.sync_configured()
    except BaseException:
        service.close()
        raise
    return service


def _sandboxing(config: ZtlabConfig) -> Sandboxing:
    from ztlab.hub.sandbox.cgroups import CgroupManager
    from ztlab.hub.sandbox.netns import NetworkSegments

    segments = NetworkSegments(
        pool=config.sandbox.address_pool,
        table=config.sandbox.firewall_table,
        state_file=private_directory(
            config.state_dir / "sandbox", what="sandbox state", error=ConfigError, tighten=True
        )
        / "netns.json",
    )
    segments.setup()  # the service address goes on lo before the hub API binds to it
    return Sandboxing(cgroups=CgroupManager.detect(parent="ztlab"), segments=segments)


def _gpus(
    config: ZtlabConfig, source: str, policy: PolicyEngine, events: CataloguedSink
) -> tuple[Inventory | None, LeaseBackend | None]:
    if not config.gpu.pools:
        return None, None
    from ztlab.hub.gpu.backend import lease_backend
    from ztlab.hub.gpu.inventory import Inventory
    from ztlab.hub.gpu.nvml import discover

    backend = lease_backend(config.gpu.lease_backend, source=source)
    inventory = Inventory.from_config(config, nvml=discover())
    return inventory, backend.open(config=config, inventory=inventory, policy=policy, audit=events)
