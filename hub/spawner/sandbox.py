"""``SandboxSpawner``: each user's server isolated, limited and fenced by the kernel.

:meth:`SandboxSpawner.start` runs fixed stages; subclasses override one stage, not start:

1. **decide** -- the policy engine must allow ``spawn_server`` on ``server:NAME`` (audited);
2. **account** -- the dedicated unprivileged account ``ztl-NAME`` (created on first spawn);
3. **lease** -- GPUs asked for in the user options are leased from their pool (policy,
   role quota, lifetime); a refusal names the limit and what is free;
4. **sandbox** -- a cgroup with the role's memory/CPU limits, ``pids.max`` and a device
   fence that opens only the leased ``/dev/nvidiaN``; a network namespace reachable by the
   proxy on one port, reaching only the hub API; bubblewrap namespaces with a private home
   and /tmp, the system read-only and the hub's state hidden;
5. **start** -- the server, its environment passed by descriptor (its token never appears
   on a command line), placed in the cgroup before it execs.

Stopping kills the whole cgroup and releases the lease; :meth:`poll` ends a server whose
lease or lifetime has expired.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

from traitlets import Float, Integer, Unicode, default

from ztlab.common.config import ZtlabConfig, load_config
from ztlab.common.errors import ZtlabError
from ztlab.hub.spawner.dedicated import DedicatedUserSpawner, SpawnRefused


class _ControlPlane:
    """The per-hub objects every sandboxed spawn shares (one set per configuration file)."""

    def __init__(self, config: ZtlabConfig, *, audit: Any, policy: Any) -> None:
        from ztlab.hub.gpu import Inventory, LeaseBroker, discover
        from ztlab.hub.sandbox.cgroups import CgroupManager
        from ztlab.hub.sandbox.netns import NetworkSegments

        self.config = config
        self.cgroups = CgroupManager.detect(parent="ztlab")
        self.segments = NetworkSegments(
            pool=config.sandbox.address_pool,
            table=config.sandbox.firewall_table,
            state_file=config.state_dir / "sandbox" / "netns.json",
        )
        self.segments.setup()
        inventory = Inventory.from_config(config, nvml=discover()) if config.gpu.pools else None
        self.inventory = inventory
        self.leases = (
            LeaseBroker(
                store_path=config.state_dir / "gpu" / "leases.sqlite3",
                inventory=inventory,
                roles=config.roles,
                policy=policy,
                audit=audit,
            )
            if inventory is not None
            else None
        )


class SandboxSpawner(DedicatedUserSpawner):
    """Spawn each server in namespaces and cgroups, with leased GPUs fenced by the kernel."""

    ztlab_config = Unicode(
        "",
        config=True,
        help="""The ``ztlab.toml`` whose roles, quotas, GPU pools and ``[sandbox]`` apply.

        Example: ``c.SandboxSpawner.ztlab_config = "/etc/ztlab/ztlab.toml"``. Added in 0.1.
        """,
    )

    server_port = Integer(
        8888,
        config=True,
        help="""Port every server listens on inside its own network namespace.

        Example: ``c.SandboxSpawner.server_port = 8888``. Added in 0.1.
        """,
    )

    started_at = Float(0.0, help="When the running server started (seconds since the epoch).")
    max_hours = Float(0.0, help="How long the running server may run, from its roles.")

    _planes: ClassVar[dict[str, _ControlPlane]] = {}

    # -- shared state ------------------------------------------------------------------------

    @property
    def plane(self) -> _ControlPlane:
        """The hub's shared sandbox objects, made on first use."""
        key = self.ztlab_config
        if key not in self._planes:
            config = load_config(key)
            self._planes[key] = _ControlPlane(
                config, audit=self.authenticator.audit, policy=self.authenticator.policy_engine
            )
        return self._planes[key]

    # -- user options ------------------------------------------------------------------------

    @default("options_form")
    def _options_form_default(self) -> str:
        pools = self.plane.config.gpu.pools
        choices = "".join(f'<option value="{name}">{name}</option>' for name in pools)
        return (
            '<label for="gpus">GPUs</label>'
            '<input id="gpus" name="gpus" type="number" min="0" value="0" class="form-control">'
            f'<label for="pool">GPU pool</label><select id="pool" name="pool" '
            f'class="form-control">{choices}</select>'
        )

    def options_from_form(self, formdata: dict[str, list[str]]) -> dict[str, Any]:
        """``gpus`` (a count) and ``pool`` from the spawn form."""
        gpus = (formdata.get("gpus") or ["0"])[0]
        pool = (formdata.get("pool") or [""])[0]
        options: dict[str, Any] = {"gpus": gpus, "pool": pool}
        hours = (formdata.get("hours") or [""])[0]
        if hours:
            options["hours"] = hours
        return options

    def _requested_hours(self) -> float | None:
        raw = (self.user_options or {}).get("hours")
        if raw in (None, ""):
            return None
        try:
            hours = float(raw)
        except (TypeError, ValueError) as exc:
            raise SpawnRefused(f"hours must be a number, got {raw!r}") from exc
        if not hours > 0:
            raise SpawnRefused(f"hours must be more than 0, got {hours}")
        return hours

    def _requested_gpus(self) -> tuple[int, str | None]:
        options = self.user_options or {}
        raw = options.get("gpus", 0)
        try:
            count = int(raw)
        except (TypeError, ValueError) as exc:
            raise SpawnRefused(f"GPUs must be a whole number, got {raw!r}") from exc
        if count < 0:
            raise SpawnRefused(f"GPUs must be 0 or more, got {count}")
        pools = self.plane.config.gpu.pools
        pool = options.get("pool") or (next(iter(pools)) if len(pools) == 1 else None)
        if count and pool not in pools:
            known = ", ".join(pools) or "none"
            raise SpawnRefused(f"unknown GPU pool {pool!r}; the pools are: {known}")
        return count, pool if count else None

    async def create_certs(self) -> dict[str, str]:
        """Internal TLS: the server's certificate names its sandbox address.

        JupyterHub calls this before :meth:`start`; the account and the network namespace
        (whose address is stable per user) are made here first.
        """
        self.ensure_account()
        netns = self.plane.segments.create(self.user.name)
        self.ssl_alt_names = [f"IP:{netns.sandbox_ip}"]
        paths: dict[str, str] = await super().create_certs()
        return paths

    # -- the stages ----------------------------------------------------------------------------

    async def start(self) -> Any:
        """Decide, account, lease, sandbox, start. Do not override: override a stage."""
        await self.decide()
        self.ensure_account()
        roles = await self._roles()
        lease = self.lease(roles)
        try:
            address = self.sandbox_and_start(roles, lease)
        except ZtlabError as exc:
            self._release(reason="start failed")
            raise SpawnRefused(f"Your server could not start: {exc.message}") from exc
        except BaseException:
            self._release(reason="start failed")
            raise
        self.started_at = time.time()
        self.max_hours = self.lifetime_hours(roles)
        return address

    def lifetime_hours(self, roles: frozenset[str]) -> float:
        """The longest a server may run: the most generous ``max_server_hours`` of its roles."""
        config = self.plane.config
        quotas = [config.roles[r] for r in roles if r in config.roles] or [config.roles["viewer"]]
        return max(q.max_server_hours for q in quotas)

    async def _roles(self) -> frozenset[str]:
        from ztlab.hub.login.authenticator import granted_roles

        return granted_roles(await self.user.get_auth_state() or {})

    def lease(self, roles: frozenset[str]) -> Any:
        """Lease the GPUs asked for, or refuse with the broker's message."""
        from ztlab.hub.gpu import LeaseError

        count, pool = self._requested_gpus()
        if not count:
            return None
        broker = self.plane.leases
        if broker is None or pool is None:
            raise SpawnRefused("this hub has no GPU pools")
        try:
            return broker.grant(
                user=self.user.name,
                roles=roles,
                server=self.name or "",
                pool=pool,
                count=count,
                hours=self._requested_hours(),
            )
        except LeaseError as exc:
            raise SpawnRefused(exc.message) from exc

    def limits_for(self, roles: frozenset[str]) -> Any:
        """The most generous memory and CPU quota among the user's roles."""
        from ztlab.hub.sandbox.cgroups import Limits

        config = self.plane.config
        quotas = [config.roles[r] for r in roles if r in config.roles] or [config.roles["viewer"]]
        return Limits(
            memory_bytes=max(q.memory for q in quotas),
            cpus=max(q.cpus for q in quotas),
            pids=config.sandbox.pids_max,
        )

    def granted_datasets(self, roles: frozenset[str]) -> dict[str, Path]:
        """``/datasets/NAME`` -> directory, for each dataset the policy lets the user read."""
        from ztlab.hub.policy import Principal

        granted: dict[str, Path] = {}
        principal = Principal(name=self.user.name, roles=roles)
        for name, path in self.plane.config.sandbox.datasets.items():
            decision = self.authenticator.policy_engine.authorize(
                principal, "read_dataset", f"dataset:{name}", {}
            )
            if decision.allowed and path.is_dir():
                granted[f"/datasets/{name}"] = path
        # registered versions the user may read, at /datasets/NAME@VERSION (each grant is an
        # audited read_dataset decision)
        registry = getattr(self.authenticator, "dataset_registry_store", None)
        if registry is not None:
            policy = self.authenticator.policy_engine
            for row in registry.all_versions():
                if not policy.authorize(principal, "read_dataset", f"dataset:{row.ref}").allowed:
                    continue
                if Path(row.source).is_dir():
                    granted[f"/datasets/{row.ref}"] = Path(row.source)
        return granted

    def sandbox_and_start(self, roles: frozenset[str], lease: Any) -> tuple[str, int]:
        """Make the cgroup, network namespace and bubblewrap sandbox; start the server."""
        from ztlab.hub.sandbox.bwrap import (
            DEFAULT_READONLY_PATHS,
            SandboxSpec,
            env_file_content,
            sandbox_argv,
        )
        from ztlab.hub.sandbox.cgroups import base_device_rules, gpu_device_rules

        plane = self.plane
        config = plane.config
        minors = list(lease.minors) if lease is not None else []
        devices = base_device_rules() + (gpu_device_rules(minors) if minors else [])
        cgroup = plane.cgroups.create(self.account, limits=self.limits_for(roles), devices=devices)
        cgroup.kill_all()  # nothing left over from an earlier server of this user
        netns = plane.segments.create(self.user.name)
        plane.segments.allow_ingress(netns, port=self.server_port)
        plane.segments.allow(netns, dest=plane.segments.service_ip, port=_port(config.hub.api_url))

        entry = pwd.getpwnam(self.account)
        self.port = self.server_port
        self.ip = "0.0.0.0"  # noqa: S104 - inside the user's own network namespace
        env = self.get_env()
        scheme = "https" if self.internal_ssl else "http"
        env["JUPYTERHUB_API_URL"] = (
            f"{scheme}://{plane.segments.service_ip}:{_port(config.hub.api_url)}/hub/api"
        )
        env["PATH"] = f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"
        if lease is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(_cuda_ids(plane, lease))
            env["ZTLAB_GPU_LEASE"] = lease.id
            env["ZTLAB_GPU_POOL"] = lease.pool
        if "MLFLOW_TRACKING_URI" in env:
            from ztlab.hub.spawner.dedicated import mlflow_env

            mlflow_env(env)  # the API URL changed to the service address
        env["ZTLAB_DATASETS_MOUNT"] = "/datasets"  # registered versions at /datasets/NAME@VERSION
        gpu_nodes = [Path(f"/dev/nvidia{m}") for m in minors]
        extra = [Path("/dev/nvidiactl"), Path("/dev/nvidia-uvm"), Path("/dev/nvidia-uvm-tools")]
        device_binds = [p for p in gpu_nodes + (extra if minors else []) if p.exists()]
        spec = SandboxSpec(
            uid=entry.pw_uid,
            gid=entry.pw_gid,
            home=Path(entry.pw_dir),
            datasets=self.granted_datasets(roles),
            devices=device_binds,
            readonly_paths=_readonly_paths(DEFAULT_READONLY_PATHS),
            # other users' cgroups (names, pids, usage) are not the sandbox's business
            hidden=[config.state_dir, Path("/etc/ztlab"), Path("/sys/fs/cgroup")],
        )
        read_end, write_end = os.pipe()
        try:
            os.write(write_end, env_file_content(env))
        finally:
            os.close(write_end)
        command = [*self.cmd, *self.get_args()]
        argv = sandbox_argv(spec, command, netns=netns.name, env_fd=read_end, die_with_parent=False)
        try:
            # the child joins the user's cgroup before it execs anything (needs root)
            self.proc = subprocess.Popen(
                argv,
                preexec_fn=cgroup.preexec(),
                pass_fds=(read_end,),
                start_new_session=True,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
        finally:
            os.close(read_end)
        self.pid = self.proc.pid
        self.authenticator.record(
            self.user.name,
            "server.started",
            account=self.account,
            cgroup=cgroup.name,
            netns=netns.name,
            lease=lease.id if lease is not None else None,
            gpus=list(lease.gpus) if lease is not None else [],
        )
        return netns.sandbox_ip, self.server_port

    # -- lifecycle -----------------------------------------------------------------------------

    async def poll(self) -> int | None:
        """Alive, or ended: a server past its lease or its role's lifetime is stopped here."""
        status = await super().poll()
        if status is not None:
            return int(status)
        if self.started_at and time.time() - self.started_at > self.max_hours * 3600:
            self.authenticator.record(self.user.name, "server.lifetime_ended", hours=self.max_hours)
            await self.stop(now=True)
            return 0
        broker = self.plane.leases
        if broker is not None:
            for lease in broker.active(user=self.user.name):
                if lease.server == (self.name or "") and lease.expired(time.time()):
                    self.authenticator.record(
                        self.user.name, "server.lease_expired", lease=lease.id
                    )
                    await self.stop(now=True)
                    broker.expire()
                    return 0
        return None

    async def stop(self, now: bool = False) -> None:
        """Stop the server, kill everything in its cgroup, release its GPUs."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
        cgroup = self.plane.cgroups.get(self.account)
        if cgroup is not None:
            cgroup.kill_all()
        self._release(reason="server stopped")
        self.clear_state()

    def _release(self, *, reason: str) -> None:
        broker = self.plane.leases
        if broker is not None:
            broker.release_server(user=self.user.name, server=self.name or "", reason=reason)

    def get_state(self) -> dict[str, Any]:
        """Saved in the hub database: the pid, and when the server started and may run to."""
        state: dict[str, Any] = super().get_state()
        if self.started_at:
            state["started_at"] = self.started_at
            state["max_hours"] = self.max_hours
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.started_at = float(state.get("started_at", 0.0))
        self.max_hours = float(state.get("max_hours", 0.0))

    def clear_state(self) -> None:
        super().clear_state()
        self.started_at = 0.0
        self.max_hours = 0.0


def _port(url: str) -> int:
    from urllib.parse import urlsplit

    return urlsplit(url).port or 8081


def _cuda_ids(plane: _ControlPlane, lease: Any) -> list[str]:
    ids = []
    for gpu_id in lease.gpus:
        gpu = plane.inventory.gpu(gpu_id) if plane.inventory is not None else None
        ids.append(gpu.uuid if gpu is not None and gpu.uuid else str(gpu_id))
    return ids


def _readonly_paths(system: tuple[Path, ...]) -> tuple[Path, ...]:
    """The system, plus the venv (which holds ztlab itself) where it lives outside it."""
    venv = Path(sys.prefix).resolve()
    if any(venv == p or venv.is_relative_to(p) for p in system):
        return system
    return (*system, venv)
