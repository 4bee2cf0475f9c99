"""The sandbox a notebook run executes in: a user's server's parts, with papermill for a server.

:class:`SandboxRunLauncher` is the run service's launcher (:mod:`ztlab.hub.runs`). For run
``ID`` of ``alice`` (account ``ztl-alice``) it makes, with the same code as her server:

- the account (on first use), her roles' memory, CPU and pids limits in cgroup
  ``ztl-alice-run-ID`` (the GPU monitor attributes its processes to the run), with a device
  fence opening only the GPUs leased to the run;
- her network namespace (reaching the hub's API and the package gateway, nothing else);
- bubblewrap with her home, her dataset mounts (each an audited ``read_dataset`` decision)
  and the environments the policy lets her use;
- a hub token of hers for this run only (note ``ztlab-run:ID``, the data scope, expiring
  with ``[runs] max_hours``) and a certificate for the hub's internal TLS, in the run's
  folder ``/run/ztlab/runs/ID`` (0700, hers; bound read-write at :data:`FOLDER_INSIDE`),
  with the notebook and its parameters.

It then runs ``python -I -m ztlab.kernels.run`` there. :meth:`end` kills the cgroup,
revokes the token and certificate and removes the folder; it needs nothing but the run's
record, so the next hub can end a run the last one left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ztlab.common.errors import ZtlabError
from ztlab.common.keys import public_key_pem
from ztlab.hub.environments.build import KERNEL_PREFIX
from ztlab.hub.policy import Principal
from ztlab.hub.runs.notebook import read_owned_file
from ztlab.hub.runs.store import RunRecord
from ztlab.hub.spawner.dedicated import mlflow_env
from ztlab.hub.spawner.sandbox import (
    default_environment,
    environment_variables,
    lease_environment,
    package_environment,
)
from ztlab.hub.spawner.serverenv import server_environment
from ztlab.kernels.kernelspec import KERNEL_NAME

__all__ = ["FOLDER_INSIDE", "RUN_DIR", "RunCredentials", "SandboxRunLauncher"]

#: where runs' folders are made (a tmpfs: gone, like the runs, on reboot)
RUN_DIR: Final = Path("/run/ztlab/runs")
#: where a run sees its folder
FOLDER_INSIDE: Final = "/run/ztlab-run"


class RunLaunchFailed(ZtlabError):
    """A run's sandbox could not be made or started (the message says which part)."""


@dataclass(frozen=True)
class RunCredentials:
    """What the hub issues a run: a token and its internal-TLS certificate (PEM)."""

    token: str
    key: bytes
    certificate: bytes
    ca: bytes


class Credentials:
    """The hub's side: issue and revoke a run's credentials (run on the hub's loop)."""

    def issue(self, owner: str, run_id: str, seconds: float) -> RunCredentials:
        """A token of ``owner`` for run ``run_id``, and a certificate."""
        raise NotImplementedError

    def revoke(self, owner: str, run_id: str) -> None:
        """Revoke what :meth:`issue` made (idempotent)."""
        raise NotImplementedError


@dataclass
class SandboxedRun:
    """A started run (:class:`~ztlab.hub.runs.service.RunHandle`)."""

    process: subprocess.Popen[bytes]
    cgroup_handle: Any
    folder: Path
    cgroup: str
    environment: tuple[str, str] | None
    log: Path
    #: the cgroup's memory limit (bytes) and its OOM kills before the run started
    memory: int = 0
    oom_kills: int = 0

    def wait(self, timeout: float | None) -> int | None:
        """The exit status of the run's process, or ``None`` after ``timeout``."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """Kill everything in the run's cgroup."""
        self.cgroup_handle.kill_all()

    def executed(self, limit: int) -> bytes | None:
        """The executed notebook (the owner's file: read without following links)."""
        return read_owned_file(self.folder / "executed.ipynb", limit=limit)

    def said(self) -> str:
        """The last ``ztlab run:`` line of the run's log (the control plane's file)."""
        return last_words(self.log)

    def memory_exceeded(self) -> int | None:
        """The memory limit, when the cgroup killed a process of the run for it."""
        killed = self.cgroup_handle.oom_kills() > self.oom_kills
        return self.memory if killed else None


class SandboxRunLauncher:
    """Runs in their owners' sandboxes (see the module docstring)."""

    def __init__(
        self,
        plane: Any,
        *,
        spawner_of: Callable[[str], Any],
        credentials: Credentials,
        run_dir: Path = RUN_DIR,
    ) -> None:
        """``spawner_of(owner)``: the owner's (default) sandbox spawner, for the account
        and the grants its server would have; ``credentials``: the hub's token issuer."""
        self.plane = plane
        self.spawner_of = spawner_of
        self.credentials = credentials
        self.run_dir = run_dir
        for path in (run_dir.parent, run_dir):
            path.mkdir(mode=0o711, exist_ok=True)
            path.chmod(0o711)
        self.log_dir = plane.config.state_dir / "logs" / "runs"
        self._runtime_digest: str | None = None

    def runtime_digest(self) -> str:
        """``sha256:HEX`` of the secure kernel's runtime (what a run without an environment
        runs in), computed once per hub: it changes only when the hub is upgraded."""
        if self._runtime_digest is None:
            from ztlab.hub.environments.build import runtime_digest

            self._runtime_digest = runtime_digest()
        return self._runtime_digest

    def cgroup_name(self, account: str, run: RunRecord) -> str:
        """``ACCOUNT-run-ID`` (what the GPU monitor attributes to the run)."""
        return f"{account}-{run.server}"

    def start(
        self, run: RunRecord, principal: Principal, lease: Any, notebook: bytes, *, seconds: float
    ) -> SandboxedRun:
        """Make the run's sandbox and start papermill in it (module docstring)."""
        from ztlab.hub.sandbox.bwrap import DEFAULT_READONLY_PATHS, SandboxSpec
        from ztlab.hub.sandbox.cgroups import base_device_rules, gpu_device_rules
        from ztlab.hub.sandbox.launch import (
            gpu_device_nodes,
            hidden_from_users,
            readonly_paths,
            sandbox_tools,
            start_sandboxed,
        )

        plane = self.plane
        config = plane.config
        sandbox = plane.sandbox
        if sandbox is None:
            raise RunLaunchFailed("this hub runs without a sandbox; runs need one")
        spawner = self.spawner_of(run.owner)
        entry = spawner._ensure_account()
        roles = principal.roles
        minors = list(lease.minors) if lease is not None else []
        devices = base_device_rules() + (gpu_device_rules(minors) if minors else [])
        name = self.cgroup_name(spawner.account, run)
        limits = spawner.limits_for(roles)
        cgroup = sandbox.cgroups.create(name, limits=limits, devices=devices)
        cgroup.kill_all()
        oom_kills = cgroup.oom_kills()
        netns = sandbox.segments.create(run.owner)
        service_ip = sandbox.segments.service_ip
        sandbox.segments.allow(netns, dest=service_ip, port=config.hub.api_port)
        if plane.mirror is not None:
            sandbox.segments.allow(netns, dest=service_ip, port=config.packages.port)
        issued = self.credentials.issue(run.owner, run.id, seconds + 300)
        folder = self._folder(run, entry, notebook, issued)
        home = Path(entry.pw_dir)
        env = self._environment(run, principal, issued, home, service_ip, lease)
        environments = spawner.granted_environments(roles)
        python = str(Path(sys.executable))
        command = [python, "-I", "-m", "ztlab.kernels.run", FOLDER_INSIDE]
        kernel = KERNEL_NAME
        environment = (KERNEL_NAME, self.runtime_digest())
        if environments:
            chosen = default_environment(environments)
            kernel = KERNEL_PREFIX + chosen.name
            environment = (chosen.name, chosen.digest)
            env.update(environment_variables(environments, home, env["PATH"]))
            command = [python, "-I", "-m", "ztlab.kernels.layers", "--", *command]
        self._write_request(folder, run, kernel, home, entry)
        spec = SandboxSpec(
            uid=entry.pw_uid,
            gid=entry.pw_gid,
            home=home,
            datasets=spawner.granted_datasets(roles),
            binds={str(usable.path): usable.path for usable in environments},
            writable={FOLDER_INSIDE: folder},
            devices=gpu_device_nodes(minors),
            readonly_paths=readonly_paths(DEFAULT_READONLY_PATHS),
            # and other runs' folders (its own is bound over them)
            hidden=[*hidden_from_users(config), self.run_dir],
            hostname=f"run-{run.id}",
        )
        try:
            process = start_sandboxed(
                spec=spec,
                command=command,
                env=env,
                netns=netns.name,
                cgroup=cgroup,
                log=self.log_dir / f"{run.id}.log",
                tools=sandbox_tools(config.sandbox.bwrap),
            )
        except (OSError, ZtlabError) as exc:
            raise RunLaunchFailed(f"the run's sandbox did not start: {exc}") from exc
        return SandboxedRun(
            process=process, cgroup_handle=cgroup, folder=folder, cgroup=name,
            environment=environment, log=self.log_dir / f"{run.id}.log",
            memory=limits.memory_bytes, oom_kills=oom_kills,
        )  # fmt: skip

    def _folder(self, run: RunRecord, entry: Any, notebook: bytes, issued: RunCredentials) -> Path:
        folder = self.run_dir / run.id
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(mode=0o700)
        files = {
            "input.ipynb": notebook,
            "hub.key": issued.key,
            "hub.crt": issued.certificate,
            "hub-ca.pem": issued.ca,
        }
        for file_name, data in files.items():
            _write_owned(folder / file_name, data, entry.pw_uid, entry.pw_gid)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
        return folder

    def _write_request(
        self, folder: Path, run: RunRecord, kernel: str, home: Path, entry: Any
    ) -> None:
        request = {
            "name": run.notebook_name,
            "parameters": dict(run.parameters),
            "kernel": kernel,
            "cwd": str(home),
        }
        _write_owned(
            folder / "request.json", json.dumps(request).encode(), entry.pw_uid, entry.pw_gid
        )

    def _environment(
        self,
        run: RunRecord,
        principal: Principal,
        issued: RunCredentials,
        home: Path,
        service_ip: str,
        lease: Any,
    ) -> dict[str, str]:
        """What the run's kernel sees: a server's environment, with this run's token."""
        plane = self.plane
        config = plane.config
        env = {
            "HOME": str(home),
            "USER": principal.name,
            "LANG": "C.UTF-8",
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "PYTHONUNBUFFERED": "1",
            "JUPYTERHUB_USER": principal.name,
            "JUPYTERHUB_API_URL": f"https://{service_ip}:{config.hub.api_port}/hub/api",
            "JUPYTERHUB_API_TOKEN": issued.token,
            "JUPYTERHUB_SSL_KEYFILE": f"{FOLDER_INSIDE}/hub.key",
            "JUPYTERHUB_SSL_CERTFILE": f"{FOLDER_INSIDE}/hub.crt",
            "JUPYTERHUB_SSL_CLIENT_CA": f"{FOLDER_INSIDE}/hub-ca.pem",
            "ZTLAB_TRUSTED_KEYS": public_key_pem(plane.datasets.public_key),
            "ZTLAB_DATASETS_MOUNT": "/datasets",
            "ZTLAB_RUN_ID": run.id,
            **server_environment(Path(sys.prefix), home),
        }
        if plane.models is not None:
            mlflow_env(env)
        if plane.mirror is not None:
            env.update(package_environment(service_ip, config.packages.port))
        if lease is not None:
            env.update(lease_environment(plane.inventory, lease))
        return env

    def end(self, run: RunRecord) -> None:
        """Kill the run's cgroup, revoke its credentials, remove its folder."""
        sandbox = self.plane.sandbox
        if sandbox is not None:
            try:
                account = self.spawner_of(run.owner).account
            except KeyError:
                account = None
            if account is not None:
                cgroup = sandbox.cgroups.get(self.cgroup_name(account, run))
                if cgroup is not None:
                    cgroup.kill_all()
                    cgroup.remove()
        folder = self.run_dir / run.id
        try:
            self.credentials.revoke(run.owner, run.id)
        finally:  # the folder holds the run's certificate key: it goes whatever happens
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)


def last_words(log: Path, *, limit: int = 65536) -> str:
    """The last line of ``log`` that the runner wrote (``ztlab run: ...``), trimmed."""
    try:
        with log.open("rb") as handle:
            handle.seek(max(0, log.stat().st_size - limit))
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    said = [line for line in lines if line.startswith("ztlab run:")]
    return said[-1].removeprefix("ztlab run:").strip()[:500] if said else ""


def _write_owned(path: Path, data: bytes, uid: int, gid: int) -> None:
    """Write ``path`` (new), mode 0400, owned by ``uid``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o400)
    try:
        os.write(fd, data)
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


# -- the hub's side: tokens, certificates, identity -------------------------------------------


class HubCredentials(Credentials):
    """Tokens from JupyterHub's database and certificates from its internal CA, made on the
    hub's event loop (the database session belongs to it) for callers in other threads."""

    def __init__(self, app: Any, loop: Any) -> None:
        self.app = app
        self.loop = loop

    def _on_loop(self, call: Callable[[], Any]) -> Any:
        import asyncio

        async def run() -> Any:
            return call()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=60)

    def issue(self, owner: str, run_id: str, seconds: float) -> RunCredentials:
        """A token of ``owner`` noted ``ztlab-run:ID`` and a certificate ``run-ID``."""
        return self._on_loop(lambda: self._issue(owner, run_id, seconds))  # type: ignore[no-any-return]

    def _issue(self, owner: str, run_id: str, seconds: float) -> RunCredentials:
        from certipy import Certipy

        from ztlab.hub.identity import RUN_TOKEN_NOTE, RUN_TOKEN_SCOPES

        app = self.app
        user = app.users[owner]
        token = user.new_api_token(
            note=f"{RUN_TOKEN_NOTE}{run_id}", expires_in=int(seconds), scopes=RUN_TOKEN_SCOPES
        )
        certipy = Certipy(store_dir=app.internal_certs_location)
        pair = certipy.create_signed_pair(
            f"run-{run_id}", "notebooks-ca", alt_names=["DNS:localhost"], overwrite=True
        )
        return RunCredentials(
            token=token,
            key=Path(pair["files"]["key"]).read_bytes(),
            certificate=Path(pair["files"]["cert"]).read_bytes(),
            ca=Path(app.internal_trust_bundles["notebooks-ca"]).read_bytes(),
        )

    def revoke(self, owner: str, run_id: str) -> None:
        """Delete the run's tokens and certificate."""
        self._on_loop(lambda: self._revoke(owner, run_id))

    def _revoke(self, owner: str, run_id: str) -> None:
        from certipy import Certipy
        from jupyterhub import orm

        from ztlab.hub.identity import RUN_TOKEN_NOTE

        db = self.app.db
        for token in db.query(orm.APIToken).filter(
            orm.APIToken.note == f"{RUN_TOKEN_NOTE}{run_id}"
        ):
            db.delete(token)
        db.commit()
        certipy = Certipy(store_dir=self.app.internal_certs_location)
        name = f"run-{run_id}"
        if _has_record(certipy, name):
            certipy.store.remove_files(name, delete_dir=True)  # the record, then the files


def _has_record(certipy: Any, name: str) -> bool:
    try:
        certipy.store.get_record(name)
    except Exception:  # certipy raises its own CertNotFoundError
        return False
    return True


def wire_runs(app: Any, plane: Any, loop: Any) -> None:
    """Give the run service the hub's launcher and identity checks (calls from other
    threads run on ``loop``, the hub's); the hub then starts it, from a thread."""
    import asyncio

    from ztlab.hub.runs import RunRefused

    runs = plane.runs

    def spawner_of(owner: str) -> Any:
        async def find() -> Any:
            return app.users[owner].spawner

        return asyncio.run_coroutine_threadsafe(find(), loop).result(timeout=60)

    def vouch(owner: str) -> Principal:
        from ztlab.common.errors import UsageError

        async def ask() -> frozenset[str]:
            try:
                user = app.users[owner]
            except KeyError:
                raise UsageError(f"there is no hub user {owner!r}") from None
            roles: frozenset[str] = await app.authenticator.vouch(user)
            return roles

        try:
            roles = asyncio.run_coroutine_threadsafe(ask(), loop).result(timeout=60)
        except UsageError as exc:
            raise RunRefused(exc.message, hint=exc.hint) from exc
        return Principal(name=owner, roles=roles)

    runs.launcher = SandboxRunLauncher(
        plane, spawner_of=spawner_of, credentials=HubCredentials(app, loop)
    )
    runs.vouch = vouch
