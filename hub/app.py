"""``ZtlabHub``: JupyterHub with the zerotrust-lab control plane.

:func:`run_hub` (what ``ztlab hub`` runs) reads ``ztlab.toml`` once, opens the
:class:`~ztlab.hub.controlplane.ControlPlane`, starts the processes it runs (MLflow), and
runs the hub in this process. The app adds three things to stock JupyterHub, each at a
named stage of its start-up:

- **settings** -- :meth:`ZtlabHub.load_config_file`: JupyterHub's configuration is rendered
  from the plane (:func:`~ztlab.hub.settings.jupyterhub_settings`), which it carries in its
  tornado settings for the authenticator, spawners and handlers; no ``jupyterhub_config.py``
  is read;
- **handlers** -- :meth:`ZtlabHub.init_handlers`: the control plane's API and pages are
  mounted under ``/hub``, in this process, next to the audit log's single writer;
- **reconcile** -- :meth:`ZtlabHub.init_spawners`: once JupyterHub has adopted the servers
  that survived a restart (or cleaned up the ones that died), the plane matches GPU leases
  and sandboxes with them.

On a clean stop JupyterHub stops the servers and the proxy, then the plane closes (MLflow
stopped, a final audit checkpoint signed).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jupyterhub import orm
from jupyterhub.app import JupyterHub
from tornado.ioloop import PeriodicCallback
from traitlets import Instance
from traitlets.config import Config

from ztlab.common.config import load_config
from ztlab.common.config.model import RoleConfig
from ztlab.common.errors import UsageError
from ztlab.hub.controlplane import SETTINGS_KEY, SYSTEM_ACTOR, ControlPlane, KnownUser
from ztlab.hub.private import state_directory
from ztlab.hub.proxy.egress import EgressMeter
from ztlab.hub.proxy.enforce import Enforcer
from ztlab.hub.settings import jupyterhub_settings

if TYPE_CHECKING:
    from ztlab.hub.monitor.findings import Holder

#: how often, in seconds, the hub checks that the plane's service processes still run
SERVICE_CHECK_SECONDS = 10
#: seconds between sweeps of the pools' clusters (lifetime, lost role or session, renewal)
CLUSTER_SWEEP_SECONDS = 10
#: seconds between updates of the GPU monitor's view of users (accounts, activity, roles)
MONITOR_DIRECTORY_SECONDS = 5
#: how often, in seconds, the enforcement point records what it let through
ACCESS_SUMMARY_SECONDS = 60
#: how often, in seconds, the egress accounting reads the proxy's access log
EGRESS_POLL_SECONDS = 1


def control_plane_handlers(enforcer: Enforcer) -> list[tuple[Any, ...]]:
    """Every handler of the control plane, relative to the hub prefix (``/hub/``)."""
    from ztlab.hub.api import api_handlers
    from ztlab.hub.pages import page_handlers
    from ztlab.hub.proxy.enforce import enforce_handlers

    return [*enforce_handlers(enforcer), *api_handlers(), *page_handlers()]


class ZtlabHub(JupyterHub):  # type: ignore[misc]
    """JupyterHub, configured from ``ztlab.toml`` and carrying the control plane."""

    #: JupyterHub's trait (declared for the type checker; JupyterHub is untyped)
    tornado_settings: dict[str, Any]

    control_plane = Instance(
        ControlPlane,
        allow_none=True,
        help="""The control plane this hub runs with (built by :func:`run_hub`).""",
    )

    enforcer: Enforcer | None = None
    egress: EgressMeter | None = None
    package_gateway: Any = None

    ztlab_settings = Instance(
        Config,
        allow_none=True,
        help="""JupyterHub's settings rendered from the plane (by :func:`run_hub`).""",
    )

    def load_config_file(self, filename: str, path: Any = None) -> None:
        """Take the settings rendered from the control plane (no config file is read)."""
        if self.control_plane is None or self.ztlab_settings is None:
            raise RuntimeError("ZtlabHub needs a control plane: start it with run_hub()")
        plane = self.control_plane
        settings = Config(self.ztlab_settings)
        settings.merge(self.cli_config)  # the command line still wins, as in JupyterHub
        self.update_config(settings)
        # not through the configuration: traitlets copies configuration values
        self.tornado_settings = {**self.tornado_settings, SETTINGS_KEY: plane}

    def init_handlers(self) -> None:
        """JupyterHub's handlers, with the enforcement point, the control plane's API and
        its pages in front."""
        super().init_handlers()
        plane = self.control_plane
        assert plane is not None
        self.enforcer = Enforcer(
            plane,
            settings=self.tornado_settings,
            cache_seconds=plane.config.proxy.decision_cache_seconds,
            session_seconds=plane.config.proxy.session_seconds,
        )
        ours = self.add_url_prefix(self.hub_prefix, control_plane_handlers(self.enforcer))
        self.handlers[:0] = ours

    async def init_spawners(self) -> Any:
        """Adopt (or clean up) the servers that outlived the last hub, then reconcile."""
        adopted = await super().init_spawners()
        plane = self.control_plane
        assert plane is not None
        users = []
        for orm_user in self.db.query(orm.User):
            user = self.users[orm_user]
            running = frozenset(name for name, spawner in user.spawners.items() if spawner.active)
            account = getattr(user.spawner, "account", None)
            if isinstance(account, str):
                users.append(KnownUser(name=user.name, account=account, running=running))
        result = plane.reconcile(users)
        self.log.info(
            "control plane reconciled: %d servers running, leases released %s, "
            "sandboxes stopped %s",
            len(result.running),
            list(result.leases_released) or "none",
            list(result.sandboxes_stopped) or "none",
        )
        return adopted

    async def start(self) -> None:
        """Start the package gateway and JupyterHub, and watch the plane's service processes."""
        plane = self.control_plane
        assert plane is not None
        if plane.mirror is not None:
            self.start_package_gateway(plane)  # before the API answers: builds need it
        await super().start()
        watch = PeriodicCallback(plane.watch_services, SERVICE_CHECK_SECONDS * 1000)
        self._periodic_callbacks["ztlab-services"] = watch
        watch.start()
        if plane.clusters is not None:
            if plane.sandbox is not None:
                from ztlab.hub.compute.relay import ClusterRelays

                plane.clusters.relays = ClusterRelays(
                    segments=plane.sandbox.segments,
                    port_base=plane.config.compute.relay_port_base,
                    record=plane.record,
                )
                await plane.clusters.relays.sync(plane.clusters.store.active())
            sweep = PeriodicCallback(self.sweep_clusters, CLUSTER_SWEEP_SECONDS * 1000)
            self._periodic_callbacks["ztlab-clusters"] = sweep
            sweep.start()
        if plane.monitor is not None:
            await self.start_monitor(plane)
        if plane.runs is not None:
            from ztlab.hub.spawner.runs import wire_runs

            wire_runs(self, plane, asyncio.get_running_loop())
            # in a thread: ending the runs a killed hub left asks this loop (tokens)
            await asyncio.to_thread(plane.runs.start)
        assert self.enforcer is not None  # made by init_handlers
        summary = PeriodicCallback(self.enforcer.flush_summary, ACCESS_SUMMARY_SECONDS * 1000)
        self._periodic_callbacks["ztlab-access-summary"] = summary
        summary.start()
        access_log = getattr(self.proxy, "access_log_file", "")
        if access_log:
            self.egress = EgressMeter(
                Path(access_log),
                record=plane.record,
                report_bytes=self._egress_report_bytes,
                websocket_log=_optional_path(getattr(self.proxy, "websocket_log_file", "")),
            )
            self.egress.start_at_end()
            meter = PeriodicCallback(self._poll_egress, EGRESS_POLL_SECONDS * 1000)
            self._periodic_callbacks["ztlab-egress"] = meter
            meter.start()

    def start_package_gateway(self, plane: ControlPlane) -> None:
        """The sandboxes' route to packages, on the service address (see
        :mod:`ztlab.hub.packages.gateway`); environment builds install through it."""
        from ztlab.hub.identity import granted_roles
        from ztlab.hub.packages.gateway import PackageGateway
        from ztlab.hub.packages.rules import role_rules

        assert plane.mirror is not None
        assert plane.package_requests is not None
        config = plane.config

        async def roles_of(name: str) -> frozenset[str]:
            try:
                user = self.users[name]
            except KeyError:
                return frozenset()
            return granted_roles(await user.get_auth_state() or {})

        def owner_of(address: str) -> str | None:
            return plane.sandbox.segments.owner_of(address) if plane.sandbox else None

        gateway = PackageGateway(
            mirror=plane.mirror,
            requests=plane.package_requests,
            role_rules=role_rules(config.roles),
            roles_of=roles_of,
            owner_of=owner_of,
            record=plane.record,
            flush=plane.flush,
            temp_dir=config.state_dir / "packages" / "tmp",
        )
        address = package_address(plane)
        gateway.listen(address, config.packages.port)
        self.package_gateway = gateway
        if plane.environments is not None:

            @contextlib.contextmanager
            def index_for(label: str) -> Iterator[str]:
                with gateway.build_token(label) as token:
                    yield f"http://build:{token}@{address}:{config.packages.port}/simple/"

            plane.environments.index_for = index_for
            plane.environments.ensure_base()

    async def sweep_clusters(self) -> None:
        """Stop clusters past their lifetime or whose owner lost the pool or the session
        (no server running); renew their own certificates (see ClusterService.sweep)."""
        from ztlab.hub.compute.probe import collect_refusals
        from ztlab.hub.compute.service import Session
        from ztlab.hub.identity import granted_roles

        plane = self.control_plane
        assert plane is not None
        assert plane.clusters is not None
        sessions: dict[str, Session | None] = {}
        for record in plane.clusters.store.active():
            if record.owner in sessions:
                continue
            try:
                user = self.users[record.owner]
            except KeyError:
                sessions[record.owner] = None
                continue
            roles = granted_roles(await user.get_auth_state() or {})
            sessions[record.owner] = Session(roles=roles, active=user.spawner.active)
        await collect_refusals(plane.clusters, plane.clusters.store.active())
        try:
            await asyncio.to_thread(plane.clusters.sweep, sessions.get, actor=SYSTEM_ACTOR)
        except Exception:
            self.log.exception("sweeping the pools' clusters failed")
        if plane.clusters.relays is not None:
            await plane.clusters.relays.sync(plane.clusters.store.active())

    async def start_monitor(self, plane: ControlPlane) -> None:
        """Tell the GPU monitor who is who and how to stop a server, then start its sampler."""
        monitor = plane.monitor
        assert monitor is not None
        loop = asyncio.get_running_loop()

        def stop_holder(holder: Holder) -> None:  # called from the sampler thread
            reason = "stopped by the GPU monitor"
            if holder.kind == "cluster" and plane.clusters is not None:
                record = plane.clusters.store.get(holder.server.removeprefix("cluster-"))
                if record is not None:
                    plane.clusters.stop(record, actor=SYSTEM_ACTOR, reason=reason)
                return
            if holder.kind == "run" and plane.runs is not None:
                plane.runs.cancel_by_system(holder.server.removeprefix("run-"), reason=reason)
                return
            if holder.kind != "server":
                raise RuntimeError(f"cannot stop a {holder.kind} from the monitor")
            done = asyncio.run_coroutine_threadsafe(
                self.stop_user_server(holder.user, holder.server), loop
            )
            done.result(timeout=60)

        monitor.stop_holder = stop_holder
        await self.refresh_monitor()
        refresh = PeriodicCallback(self.refresh_monitor, MONITOR_DIRECTORY_SECONDS * 1000)
        self._periodic_callbacks["ztlab-monitor"] = refresh
        refresh.start()
        monitor.start()

    async def stop_user_server(self, name: str, server: str) -> None:
        """Stop ``name``'s server ``server`` (``""``: the default one); :class:`UsageError`
        when it is not running (the response is then recorded as failed, not as done)."""
        try:
            user = self.users[name]  # UserDict looks names up in the database
        except KeyError:
            raise UsageError(f"there is no hub user {name!r}") from None
        if server not in user.orm_spawners or not user.spawners[server].active:
            shown = f"server {server!r}" if server else "default server"
            raise UsageError(f"{name}'s {shown} is not running")
        await user.stop(server)

    async def refresh_monitor(self) -> None:
        """Give the monitor the hub's accounts, last activity and roles (see set_directory)."""
        from ztlab.hub.identity import granted_roles

        plane = self.control_plane
        assert plane is not None
        assert plane.monitor is not None
        accounts: dict[str, str] = {}
        activity: dict[tuple[str, str], float | None] = {}
        roles: dict[str, frozenset[str]] = {}
        for orm_user in self.db.query(orm.User):
            user = self.users[orm_user]
            account = getattr(user.spawner, "account", None)
            if isinstance(account, str):
                accounts[account] = user.name
            for name, spawner in user.spawners.items():
                if not spawner.active:
                    continue
                last = spawner.orm_spawner.last_activity
                activity[(user.name, name)] = (
                    last.replace(tzinfo=datetime.UTC).timestamp() if last else None
                )
                if user.name not in roles:
                    roles[user.name] = granted_roles(await user.get_auth_state() or {})
        plane.monitor.set_directory(accounts=accounts, activity=activity, roles=roles)

    def _poll_egress(self) -> None:
        if self.egress is not None:
            self.egress.poll()

    def _egress_report_bytes(self, actor: str) -> int:
        """The largest ``egress_report`` of the roles ``actor`` held at their last request."""
        assert self.control_plane is not None
        assert self.enforcer is not None
        roles = self.control_plane.config.roles
        held = [roles[r].egress_report for r in self.enforcer.roles_of.get(actor, ()) if r in roles]
        return max(held, default=RoleConfig().egress_report)

    async def cleanup(self) -> None:
        """JupyterHub's clean-up (servers, proxy), then close the control plane."""
        plane = self.control_plane
        if plane is not None and plane.clusters is not None and plane.clusters.relays is not None:
            await plane.clusters.relays.close()
        try:
            await super().cleanup()
        finally:
            if self.egress is not None:
                self.egress.poll()
            if self.package_gateway is not None:
                self.package_gateway.stop()
            if self.enforcer is not None:
                self.enforcer.flush_summary()
            if self.control_plane is not None:
                self.control_plane.close()


def package_address(plane: ControlPlane) -> str:
    """Where the package gateway listens: the sandboxes' service address (127.0.0.1 on a
    hub without sandboxes)."""
    return plane.sandbox.segments.service_ip if plane.sandbox is not None else "127.0.0.1"


def _optional_path(value: str) -> Path | None:
    return Path(value) if value else None


def interruptible() -> None:
    """Let SIGINT stop the hub, and the services it starts, even when the hub was started with
    SIGINT ignored (as a shell does for a command it runs in the background): JupyterHub stops
    a service with SIGINT first and waits 10 s before SIGTERM, and a child inherits an
    ignored signal, so an idle culler would hold the hub's shutdown that long."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_hub(config_path: Path, argv: Sequence[str] = ()) -> None:
    """Read ``config_path``, open the control plane, start its services, run the hub here.

    Configuration and control-plane errors are raised before JupyterHub starts, as
    :class:`~ztlab.common.errors.ZtlabError` with the file and key they concern.
    """
    source = str(config_path)
    config = load_config(config_path)
    interruptible()
    if config.models.enabled:
        from ztlab.hub.models.server import ModelServer

        ModelServer(config, config_source=source).prepare()  # before anything changes
    if config.packages.enabled:
        from ztlab.hub.packages import PackageMirror

        PackageMirror(config, config_source=source).prepare()
    os.chdir(state_directory(config.state_dir / "hub"))
    plane = ControlPlane.open(config, source=source)
    try:
        settings = jupyterhub_settings(plane, source=source)
        plane.start_services()
        ZtlabHub.instance(control_plane=plane, ztlab_settings=settings)
        ZtlabHub.launch_instance(list(argv))
    finally:
        plane.close()
