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
   on a command line), placed in the cgroup before it execs; the stage ends when the server
   listens, or says why it exited (with the last lines of its log, kept by the control
   plane under ``<state_dir>/logs/servers``).

A failure at any stage reaches the user as a
:class:`~ztlab.hub.spawner.failures.SpawnFailed` naming the stage, and is recorded as
``server.spawn_failed``. The blocking work of a stage (``useradd``, cgroups, ``ip`` and
``nft``) runs in threads, so one user's spawn does not hold up another's.

Stopping kills the whole cgroup and releases the lease; :meth:`poll` ends a server whose
lease or lifetime has expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from traitlets import Float, Integer, default

from ztlab.hub.controlplane import SYSTEM_ACTOR
from ztlab.hub.environments.build import KERNEL_PREFIX
from ztlab.hub.policy import Principal
from ztlab.hub.spawner.dedicated import DedicatedUserSpawner, SpawnFailed, mlflow_env
from ztlab.kernels.kernelspec import KERNEL_NAME


class SandboxSpawner(DedicatedUserSpawner):
    """Spawn each server in namespaces and cgroups, with leased GPUs fenced by the kernel.

    Registered as the JupyterHub spawner ``ztlab-sandbox``; the hub uses it when
    ``[sandbox] enabled`` (the default).
    """

    #: the server runs in its own mount namespace (the enforcement point looks through it)
    sandboxed = True

    server_port = Integer(
        8888,
        config=True,
        help="""Port every server listens on inside its own network namespace.

        Example: ``c.SandboxSpawner.server_port = 8888``. Added in 0.1.
        """,
    )

    #: the network namespace made for the spawn under way (by :meth:`create_certs`)
    _netns: Any = None

    started_at = Float(0.0, help="When the running server started (seconds since the epoch).")
    max_hours = Float(0.0, help="How long the running server may run, from its roles.")

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
            raise SpawnFailed("lease", f"hours must be a number, got {raw!r}.") from exc
        if not hours > 0:
            raise SpawnFailed("lease", f"hours must be more than 0, got {hours}.")
        return hours

    def _requested_gpus(self) -> tuple[int, str | None]:
        options = self.user_options or {}
        raw = options.get("gpus", 0)
        try:
            count = int(raw)
        except (TypeError, ValueError) as exc:
            raise SpawnFailed("lease", f"GPUs must be a whole number, got {raw!r}.") from exc
        if count < 0:
            raise SpawnFailed("lease", f"GPUs must be 0 or more, got {count}.")
        pools = self.plane.config.gpu.pools
        pool = options.get("pool") or (next(iter(pools)) if len(pools) == 1 else None)
        if count and pool not in pools:
            known = ", ".join(pools) or "none"
            raise SpawnFailed(
                "lease",
                f"There is no GPU pool {pool!r}.",
                hint=f"Choose one of: {known}.",
            )
        return count, pool if count else None

    async def create_certs(self) -> dict[str, str]:
        """Internal TLS: the server's certificate names its sandbox address.

        JupyterHub calls this before :meth:`start`; the policy decides first, then the
        account and the network namespace (whose address is stable per user) are made.
        """
        await self.decided()
        async with self.stage("account"):
            await self.ensure_account()
        async with self.stage("sandbox"):
            netns = await asyncio.to_thread(self._sandboxing().segments.create, self.user.name)
        self._netns = netns  # made for this spawn: the sandbox stage uses it as it is
        self.ssl_alt_names = [f"IP:{netns.sandbox_ip}"]
        paths: dict[str, str] = await super().create_certs()
        return paths

    def _sandboxing(self) -> Any:
        sandbox = self.plane.sandbox
        if sandbox is None:
            raise SpawnFailed(
                "sandbox",
                "This hub runs without a sandbox ([sandbox] enabled = false).",
                hint="An administrator must enable [sandbox] or use the dedicated spawner.",
            )
        return sandbox

    # -- the stages ----------------------------------------------------------------------------

    async def start(self) -> Any:
        """Decide, account, lease, sandbox, start. Do not override: override a stage."""
        await self.decided()
        self._decided_at = None  # the next spawn asks again
        async with self.stage("account"):
            await self.ensure_account()
        roles = await self.roles()
        async with self.stage("lease"):
            lease = self.lease(roles)
        try:
            async with self.stage("sandbox"):
                launch = await asyncio.to_thread(self.make_sandbox, roles, lease)
            async with self.stage("start"):
                address = await self.start_server(launch)
        except BaseException:
            await asyncio.to_thread(self._end, reason="server start failed")
            raise
        self.started_at = time.time()
        self.max_hours = self.lifetime_hours(roles)
        self.record(
            "server.started",
            server=self.name or "",
            account=self.account,
            cgroup=launch.cgroup.name,
            netns=launch.netns.name,
            lease=lease.id if lease is not None else None,
            gpus=list(lease.gpus) if lease is not None else [],
        )
        await self.plane.flush()  # the server is acknowledged once its record is on disk
        self.log_stages()
        return address

    def lifetime_hours(self, roles: frozenset[str]) -> float:
        """The longest a server may run: the most generous ``max_server_hours`` of its roles."""
        config = self.plane.config
        quotas = [config.roles[r] for r in roles if r in config.roles] or [config.roles["viewer"]]
        return max(q.max_server_hours for q in quotas)

    def lease(self, roles: frozenset[str]) -> Any:
        """Lease the GPUs asked for, or refuse with the backend's message."""
        from ztlab.hub.gpu import LeaseError

        count, pool = self._requested_gpus()
        if not count:
            return None
        backend = self.plane.leases
        if backend is None or pool is None:
            raise SpawnFailed("lease", "This hub has no GPU pools.", hint="Ask for 0 GPUs.")
        try:
            return backend.grant(
                user=self.user.name,
                roles=roles,
                server=self.name or "",
                pool=pool,
                count=count,
                hours=self._requested_hours(),
            )
        except LeaseError as exc:
            raise SpawnFailed("lease", exc.message, hint=exc.hint) from exc

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
        plane = self.plane
        granted: dict[str, Path] = {}
        principal = Principal(name=self.user.name, roles=roles)
        for name, path in plane.config.sandbox.datasets.items():
            decision = plane.policy.authorize(principal, "read_dataset", f"dataset:{name}", {})
            if decision.allowed and path.is_dir():
                granted[f"/datasets/{name}"] = path
        # registered versions the user may read, at /datasets/NAME@VERSION (each grant is an
        # audited read_dataset decision)
        for row in plane.datasets.all_versions():
            if not plane.policy.authorize(principal, "read_dataset", f"dataset:{row.ref}").allowed:
                continue
            if Path(row.source).is_dir():
                granted[f"/datasets/{row.ref}"] = Path(row.source)
        return granted

    def granted_environments(self, roles: frozenset[str]) -> list[Any]:
        """The ready environments the policy lets the user use (each decision audited)."""
        service = self.plane.environments
        if service is None:
            return []
        usable: list[Any] = service.usable(Principal(name=self.user.name, roles=roles))
        return usable

    def make_sandbox(self, roles: frozenset[str], lease: Any) -> _Launch:
        """The cgroup, network namespace and bubblewrap command of the server (a thread)."""
        from ztlab.hub.sandbox.bwrap import DEFAULT_READONLY_PATHS, SandboxSpec
        from ztlab.hub.sandbox.cgroups import base_device_rules, gpu_device_rules
        from ztlab.hub.sandbox.launch import gpu_device_nodes, hidden_from_users, readonly_paths

        plane = self.plane
        config = plane.config
        sandbox = self._sandboxing()
        tools = _tools(config.sandbox.bwrap)
        minors = list(lease.minors) if lease is not None else []
        devices = base_device_rules() + (gpu_device_rules(minors) if minors else [])
        cgroup = sandbox.cgroups.create(
            self.account, limits=self.limits_for(roles), devices=devices
        )
        cgroup.kill_all()  # nothing left over from an earlier server of this user
        netns = self._netns or sandbox.segments.create(self.user.name)
        self._netns = None  # the next spawn makes (or repairs) it again
        sandbox.segments.allow_ingress(netns, port=self.server_port)
        api_port = config.hub.api_port
        sandbox.segments.allow(netns, dest=sandbox.segments.service_ip, port=api_port)
        if plane.mirror is not None:  # the package gateway: the only route to packages
            sandbox.segments.allow(
                netns, dest=sandbox.segments.service_ip, port=config.packages.port
            )

        entry = pwd.getpwnam(self.account)
        self.port = self.server_port
        self.ip = "0.0.0.0"  # noqa: S104 - inside the user's own network namespace
        env = self.get_env()
        scheme = "https" if self.internal_ssl else "http"
        env["JUPYTERHUB_API_URL"] = f"{scheme}://{sandbox.segments.service_ip}:{api_port}/hub/api"
        env["PATH"] = f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"
        if lease is not None:
            env.update(lease_environment(plane.inventory, lease))
        if "MLFLOW_TRACKING_URI" in env:
            mlflow_env(env)  # the API URL changed to the service address
        env["ZTLAB_DATASETS_MOUNT"] = "/datasets"  # registered versions at /datasets/NAME@VERSION
        if plane.mirror is not None:
            env.update(package_environment(sandbox.segments.service_ip, config.packages.port))
        environments = self.granted_environments(roles)
        self.default_kernel = (
            KERNEL_PREFIX + default_environment(environments).name if environments else KERNEL_NAME
        )
        command = [*self.cmd, *self.get_args()]
        if environments:
            env.update(environment_variables(environments, Path(entry.pw_dir), env["PATH"]))
            command = environment_command(environments, command)
        spec = SandboxSpec(
            uid=entry.pw_uid,
            gid=entry.pw_gid,
            home=Path(entry.pw_dir),
            datasets=self.granted_datasets(roles),
            binds={str(usable.path): usable.path for usable in environments},
            devices=gpu_device_nodes(minors),
            readonly_paths=readonly_paths(DEFAULT_READONLY_PATHS),
            hidden=hidden_from_users(config),
        )
        log = config.state_dir / "logs" / "servers" / f"{self.account}.log"
        return _Launch(
            memory=self.limits_for(roles).memory_bytes,
            oom_kills=cgroup.oom_kills(),
            spec=spec,
            command=command,
            tools=tools,
            env=env,
            cgroup=cgroup,
            netns=netns,
            log=log,
        )

    async def start_server(self, launch: _Launch) -> tuple[str, int]:
        """Start the server in its sandbox; return once it listens (or say why it ended)."""
        self.proc = await asyncio.to_thread(_spawn, launch)
        self.pid = self.proc.pid
        address = (launch.netns.sandbox_ip, self.server_port)
        try:
            await self.until_listening(address, log=launch.log)
        except SpawnFailed:
            if await asyncio.to_thread(launch.cgroup.oom_kills) > launch.oom_kills:
                raise SpawnFailed(
                    "start",
                    "Your server was stopped by its memory limit "
                    f"({launch.memory // 2**20} MiB) while starting.",
                    hint="Ask an administrator for a role with more memory.",
                ) from None
            raise
        return address

    # -- lifecycle -----------------------------------------------------------------------------

    async def poll(self) -> int | None:
        """Alive, or ended: a server past its lease or its role's lifetime is stopped here."""
        started = self.started_at  # (the parent's poll clears the state of an ended server)
        status = await super().poll()
        if status is not None:
            if started:  # it ended on its own: nothing of it may stay behind
                await self._ended(f"ended without a stop (exit status {status})")
            return int(status)
        if self.started_at and time.time() - self.started_at > self.max_hours * 3600:
            self.record("server.lifetime_ended", hours=self.max_hours)
            await self.stop(now=True)
            return 0
        backend = self.plane.leases
        if backend is not None:
            for lease in backend.active(user=self.user.name):
                if lease.server == (self.name or "") and lease.expired(time.time()):
                    self.record("server.lease_expired", lease=lease.id)
                    await self.stop(now=True)
                    backend.expire()
                    return 0
        return None

    async def stop(self, now: bool = False) -> None:
        """Stop the server, kill everything in its cgroup, release its GPUs."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
        await self._finish("stopped")

    async def _ended(self, reason: str) -> None:
        """The server's process is gone without a stop (killed, crashed): end its sandbox
        (a process it left, such as the server under bubblewrap, would otherwise run on
        unseen, since JupyterHub calls :meth:`stop` only on servers that still run) and
        release its leases, as the control plane's doing."""
        await self._finish(reason, actor=SYSTEM_ACTOR)

    async def _finish(self, reason: str, *, actor: str | None = None) -> None:
        """End the sandbox and record why (``server.stopped``): what every end shares."""
        clusters = self.plane.clusters
        if clusters is not None and not self.name:  # _end stops them: collect first
            from ztlab.hub.compute.probe import collect_refusals

            await collect_refusals(clusters, clusters.store.active(owner=self.user.name))
        released = await asyncio.to_thread(self._end, reason=f"server {reason}", actor=actor)
        self.record(
            "server.stopped",
            server=self.name or "",
            leases_released=[lease.id for lease in released],
            reason=reason,
        )
        self.clear_state()
        await self.plane.flush()

    def _end(self, *, reason: str, actor: str | None = None) -> list[Any]:
        """Kill the sandbox's processes and release the server's leases (a thread); the
        default server's end also ends the user's clusters (their session in the lab).
        ``actor``: who ends it (default: the user)."""
        clusters = self.plane.clusters
        if clusters is not None and not self.name:
            clusters.stop_owner(
                self.user.name, actor=actor or self.user.name, reason=f"the owner's {reason}"
            )
        sandbox = self.plane.sandbox
        if sandbox is not None:
            cgroup = sandbox.cgroups.get(self.account)
            if cgroup is not None:
                cgroup.kill_all()
        backend = self.plane.leases
        if backend is None:
            return []
        return backend.release_server(user=self.user.name, server=self.name or "", reason=reason)

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


@dataclass(frozen=True, slots=True, kw_only=True)
class _Launch:
    """What :meth:`SandboxSpawner.make_sandbox` prepared for the start stage."""

    memory: int
    oom_kills: int
    spec: Any
    command: list[str]
    tools: dict[str, str]
    env: dict[str, str]
    cgroup: Any
    netns: Any
    log: Path


def _spawn(launch: _Launch) -> subprocess.Popen[bytes]:
    """Start the server's sandbox chain (see :func:`~ztlab.hub.sandbox.launch.start_sandboxed`)."""
    from ztlab.hub.sandbox.launch import start_sandboxed

    return start_sandboxed(
        spec=launch.spec,
        command=launch.command,
        env=launch.env,
        netns=launch.netns.name,
        cgroup=launch.cgroup,
        log=launch.log,
        tools=launch.tools,
    )


def lease_environment(inventory: Any, lease: Any) -> dict[str, str]:
    """What a process holding ``lease`` is told of its GPUs: CUDA's ids, the lease, the pool."""
    assert inventory is not None  # leases are granted from the inventory
    return {
        "CUDA_VISIBLE_DEVICES": ",".join(map(inventory.cuda_id, lease.gpus)),
        "ZTLAB_GPU_LEASE": lease.id,
        "ZTLAB_GPU_POOL": lease.pool,
    }


def package_environment(service_ip: str, port: int) -> dict[str, str]:
    """pip and uv in the server point at the package gateway, and at nothing else (the
    machine's own pip configuration files are not read)."""
    index = f"http://{service_ip}:{port}/simple/"
    return {
        "PIP_INDEX_URL": index,
        "PIP_TRUSTED_HOST": f"{service_ip}:{port}",
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "UV_DEFAULT_INDEX": index,
        "UV_INDEX_URL": index,
        "UV_NO_CONFIG": "1",
    }


def environment_variables(environments: list[Any], home: Path, path: str) -> dict[str, str]:
    """The server's view of its environments: their folders (``ZTLAB_ENVIRONMENTS``), their
    kernelspecs (``JUPYTER_PATH``) and, for terminals, the default one's user layer first
    on ``PATH`` (``pip`` there installs into it)."""
    import json

    from ztlab.kernels.layers import layer_path

    default = default_environment(environments)
    layer = layer_path(default.name, home)
    return {
        "ZTLAB_ENVIRONMENTS": json.dumps({e.name: str(e.path) for e in environments}),
        "JUPYTER_PATH": ":".join(str(e.path / "share" / "jupyter") for e in environments),
        "VIRTUAL_ENV": str(layer),
        "PATH": f"{layer / 'bin'}:{path}",
    }


def default_environment(environments: list[Any]) -> Any:
    """``base`` when granted, else the first."""
    return next((e for e in environments if e.name == "base"), environments[0])


def environment_command(environments: list[Any], command: list[str]) -> list[str]:
    """The server's command, after the user's layers are made; only the environments'
    kernels are offered."""
    kernels = [KERNEL_PREFIX + e.name for e in environments]
    return [
        command[0],
        "-I",
        "-m",
        "ztlab.kernels.layers",
        "--",
        *command,
        f"--KernelSpecManager.allowed_kernelspecs={kernels!r}",
    ]


def _tools(bwrap: str) -> dict[str, str]:
    """The sandbox's programs, resolved now so that a missing one fails the sandbox stage."""
    from ztlab.hub.sandbox.bwrap import SandboxError
    from ztlab.hub.sandbox.launch import sandbox_tools

    try:
        return sandbox_tools(bwrap)
    except SandboxError as exc:
        raise SpawnFailed(
            "sandbox",
            f"The sandbox cannot start: {exc.message}.",
            hint=f"An administrator must {exc.hint}.",
        ) from exc
