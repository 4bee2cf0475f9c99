"""The ``local`` compute backend: each user's cluster as sandboxed processes on this machine.

For cluster ``ID`` of user ``alice`` (account ``ztl-alice``):

- a directory ``/run/ztlab/clusters/ID`` owned by the account, mode 0500, holding the
  spec and the credentials (files 0400), bound read-only at ``/cluster`` in each process
  (the parents are 0711: bubblewrap binds it as the account; nobody else can list or read
  it);
- the **scheduler** in cgroup ``ztl-alice-ID-s`` (base devices only) and each **worker**
  ``N`` in cgroup ``ztl-alice-ID-N`` with the pool's per-worker memory and CPU limits and
  a device fence that opens only the GPU leased for that worker (``/dev/nvidiaM``);
- all of them in alice's network namespace (the one her server runs in): her kernels reach
  the scheduler on her sandbox address, nobody else's can (the firewall routes nothing
  between namespaces), and the hub reaches the scheduler's and dashboard's ports only;
- bubblewrap as for her server: her home read-write, the system read-only, the control
  plane's state hidden.

Stopping kills the cgroups (everything in them), closes the ports and removes the directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import socket
import ssl
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from ztlab.common.config import ZtlabConfig
from ztlab.common.errors import ZtlabError
from ztlab.hub.compute.backend import Cluster, ClusterRequest, ComputeBackend
from ztlab.kernels.layers import layer_path

if TYPE_CHECKING:
    from ztlab.hub.sandbox.cgroups import CgroupManager
    from ztlab.hub.sandbox.netns import NetworkSegments

#: where the clusters' directories are made (a tmpfs: gone, like the clusters, on reboot)
RUN_DIR = Path("/run/ztlab/clusters")
#: seconds a scheduler has to listen before the start fails
START_TIMEOUT_SECONDS = 60.0


class ClusterStartError(ZtlabError):
    """The cluster's processes did not start (the message says which and why)."""


class LocalComputeBackend(ComputeBackend):
    """Clusters as processes in the owners' sandboxes (``[compute] backend = "local"``)."""

    def __init__(
        self,
        *,
        config: ZtlabConfig,
        cgroups: CgroupManager,
        segments: NetworkSegments,
        run_dir: Path = RUN_DIR,
    ) -> None:
        self.config = config
        self.cgroups = cgroups
        self.segments = segments
        self.run_dir = run_dir
        for path in (run_dir.parent, run_dir):
            path.mkdir(mode=0o711, exist_ok=True)
            path.chmod(0o711)
        self.log_dir = config.state_dir / "logs" / "clusters"

    @classmethod
    def open(
        cls, *, config: ZtlabConfig, cgroups: CgroupManager | None, segments: NetworkSegments | None
    ) -> Self:
        """The backend for a validated configuration; it needs the sandbox."""
        if cgroups is None or segments is None:
            raise ZtlabError(
                "the local compute backend runs clusters in the users' sandboxes",
                hint="enable [sandbox] (the default) or choose another [compute] backend",
            )
        return cls(config=config, cgroups=cgroups, segments=segments)

    # -- naming --------------------------------------------------------------------------

    def _cgroup_names(self, account: str, cluster_id: str, workers: int) -> list[str]:
        return [
            f"{account}-{cluster_id}-s",
            *(f"{account}-{cluster_id}-{i}" for i in range(workers)),
        ]

    def _cluster_cgroups(self, cluster_id: str) -> list[str]:
        return [name for name in self.cgroups.names() if f"-{cluster_id}-" in name]

    # -- the interface ---------------------------------------------------------------------

    def start(self, request: ClusterRequest) -> Cluster:
        """Write the credentials, start the scheduler, wait for it, start the workers."""
        from ztlab.hub.sandbox.bwrap import DEFAULT_READONLY_PATHS, SandboxSpec
        from ztlab.hub.sandbox.cgroups import Limits, gpu_device_rules
        from ztlab.hub.sandbox.launch import (
            gpu_device_nodes,
            hidden_from_users,
            readonly_paths,
            sandbox_tools,
            start_sandboxed,
        )

        account = str(request.spec.get("account") or "")
        entry = pwd.getpwnam(account)
        netns = self.segments.create(request.owner)  # idempotent: her server's namespace
        directory = self._write_directory(request, entry, host=netns.sandbox_ip)
        tools = sandbox_tools(self.config.sandbox.bwrap)
        hidden = hidden_from_users(self.config)
        self.segments.allow_ingress(netns, port=request.port)
        self.segments.allow_ingress(netns, port=request.dashboard_port)
        python = str(Path(sys.executable))
        base_env = {
            "HOME": entry.pw_dir,
            "USER": request.owner,
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "PYTHONUNBUFFERED": "1",
            "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
            "DASK_TEMPORARY_DIRECTORY": "/tmp",  # noqa: S108 - the sandbox's private /tmp
        }
        names = self._cgroup_names(account, request.id, request.workers)
        processes = []
        for index, name in enumerate(names):
            worker = index - 1
            gpu_minor = request.minors[worker] if 0 <= worker < len(request.minors) else None
            limits = Limits(
                memory_bytes=request.worker_memory if worker >= 0 else 1024**3,
                cpus=request.worker_cpus if worker >= 0 else 1.0,
                pids=self.config.sandbox.pids_max,
            )
            devices = gpu_device_rules([gpu_minor]) if gpu_minor is not None else []
            cgroup = self.cgroups.create(name, limits=limits, devices=devices)
            cgroup.kill_all()
            env = dict(base_env)
            nodes: list[Path] = []
            if gpu_minor is not None:
                env["CUDA_VISIBLE_DEVICES"] = request.cuda_ids[worker]
                env["ZTLAB_GPU_POOL"] = request.pool
                nodes = gpu_device_nodes([gpu_minor])
            spec = SandboxSpec(
                uid=entry.pw_uid,
                gid=entry.pw_gid,
                home=Path(entry.pw_dir),
                binds={
                    "/cluster": directory,
                    **{folder: Path(folder) for folder in request.environments.values()},
                },
                devices=nodes,
                readonly_paths=readonly_paths(DEFAULT_READONLY_PATHS),
                hidden=hidden,
                hostname=f"cluster-{request.id[:8]}",
            )
            role = ["scheduler"] if worker < 0 else ["worker", str(worker)]
            command = [python, "-I", "-m", "ztlab.kernels.cluster", *role, "/cluster"]
            if request.environment is not None and worker >= 0:
                # workers run in the asking kernel's environment, with the owner's layer
                # (what they pip-installed); the layers are made first, as for a server
                env["ZTLAB_ENVIRONMENTS"] = json.dumps(dict(request.environments))
                env["ZTLAB_ENVIRONMENT"] = request.environment
                layer = layer_path(request.environment, Path(entry.pw_dir))
                env["VIRTUAL_ENV"] = str(layer)
                command = [
                    python, "-I", "-m", "ztlab.kernels.layers", "--",
                    str(layer / "bin" / "python"), *command[1:],
                ]  # fmt: skip
            log = self.log_dir / f"{request.id}-{'scheduler' if worker < 0 else worker}.log"
            processes.append(
                start_sandboxed(
                    spec=spec,
                    command=command,
                    env=env,
                    netns=netns.name,
                    cgroup=cgroup,
                    log=log,
                    tools=tools,
                )
            )
            if worker < 0:
                self._wait_listening(request, netns.sandbox_ip, processes[0], log)
        return Cluster(
            id=request.id,
            owner=request.owner,
            pool=request.pool,
            host=netns.sandbox_ip,
            port=request.port,
            dashboard_port=request.dashboard_port,
            workers=request.workers,
            started_at=time.time(),
            details={"account": account, "netns": netns.name},
        )

    def _write_directory(self, request: ClusterRequest, entry: Any, *, host: str) -> Path:
        """``run/ID``: the spec and credentials, readable by the owner's account only."""
        directory = self.run_dir / request.id
        directory.mkdir(mode=0o700, exist_ok=True)
        spec = dict(request.spec)
        spec["scheduler"] = {**dict(spec.get("scheduler", {})), "host": host}
        files = {**request.files, "cluster.json": json.dumps(spec, indent=1).encode()}
        for name, data in files.items():
            _write_owned(directory / name, data, entry.pw_uid, entry.pw_gid)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
        directory.chmod(0o500)
        return directory

    def _wait_listening(self, request: ClusterRequest, host: str, process: Any, log: Path) -> None:
        """Until the scheduler completes a TLS handshake with the control plane's
        certificate (a plain connect would be refused and reported as an attack)."""
        context = ssl.create_default_context(cadata=request.files["ca.pem"].decode())
        context.check_hostname = False
        cert, key = request.probe_certificate
        context.load_cert_chain(cert, key)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ClusterStartError(
                    f"the scheduler of cluster {request.id} exited ({process.returncode}): "
                    f"{_tail(log)}"
                )
            try:
                with (
                    socket.create_connection((host, request.port), timeout=2) as raw,
                    context.wrap_socket(raw) as tls,
                ):
                    tls.do_handshake()
                    return
            except OSError:
                time.sleep(0.2)
        raise ClusterStartError(
            f"the scheduler of cluster {request.id} did not listen within "
            f"{START_TIMEOUT_SECONDS:.0f} s: {_tail(log)}"
        )

    def clusters(self, *, owner: str | None = None) -> list[Cluster]:
        """The clusters whose scheduler cgroup still has processes."""
        found = []
        for name in self.cgroups.names():
            if not name.endswith("-s"):
                continue
            cgroup = self.cgroups.get(name)
            if cgroup is None or not cgroup.procs():
                continue
            cluster_id = name[:-2].rsplit("-", 1)[-1]
            spec_path = self.run_dir / cluster_id / "cluster.json"
            try:
                spec = json.loads(spec_path.read_text())
            except (OSError, ValueError):
                continue
            access = spec.get("access", {})
            if owner is not None and access.get("owner") != owner:
                continue
            found.append(
                Cluster(
                    id=cluster_id,
                    owner=str(access.get("owner", "")),
                    pool=str(access.get("pool", "")),
                    host=str(spec["scheduler"]["host"]),
                    port=int(spec["scheduler"]["port"]),
                    dashboard_port=int(spec["scheduler"]["dashboard_port"]),
                    workers=int(spec.get("workers", 0)),
                    started_at=spec_path.stat().st_mtime,
                )
            )
        return found

    def renew(self, cluster_id: str, files: Mapping[str, bytes]) -> None:
        """Replace credential files in place (the processes reload them)."""
        directory = self.run_dir / cluster_id
        if not directory.is_dir():
            return
        info = directory.stat()
        directory.chmod(0o700)
        try:
            for name, data in files.items():
                _write_owned(directory / name, data, info.st_uid, info.st_gid)
        finally:
            directory.chmod(0o500)

    def stop(self, cluster_id: str, *, reason: str) -> None:
        """Kill every process of the cluster, close its ports, remove its directory."""
        for name in self._cluster_cgroups(cluster_id):
            cgroup = self.cgroups.get(name)
            if cgroup is not None:
                cgroup.kill_all()
                cgroup.remove()
        directory = self.run_dir / cluster_id
        spec: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            spec = json.loads((directory / "cluster.json").read_text())
        owner = spec.get("access", {}).get("owner")
        netns = self.segments.get(owner) if owner else None
        if netns is not None:
            for key in ("port", "dashboard_port"):
                port = spec.get("scheduler", {}).get(key)
                if port:
                    self.segments.forbid_ingress(netns, port=int(port))
        if directory.exists():
            directory.chmod(0o700)
            for path in directory.iterdir():
                path.unlink()
            directory.rmdir()

    def close(self) -> None:
        """Nothing is held open (clusters keep running)."""


def _write_owned(path: Path, data: bytes, uid: int, gid: int) -> None:
    """Write ``path`` atomically, mode 0400, owned by ``uid``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
    try:
        os.write(fd, data)
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)
    tmp.replace(path)


def _tail(log: Path, lines: int = 5) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"
