"""``DedicatedUserSpawner``: each hub user's server runs as its own unprivileged Unix account.

Registered as the JupyterHub spawner ``ztlab-dedicated``. The stages of :meth:`start` are
fixed: **decide** (the policy engine must allow ``spawn_server`` on ``server:NAME`` for the
user's roles; the decision is audited), **account** (``ztl-NAME`` is created on first
spawn: never root, no sudo, no login shell, a private home of mode 0700), **start**
(JupyterHub's local-process start, as that account). Namespaces, cgroups and GPU leases are
added by the sandbox spawner that builds on this one. A failing stage raises
:class:`~ztlab.hub.spawner.failures.SpawnFailed`, which the user sees and the audit log
records with the stage.

The services come from the hub's :class:`~ztlab.hub.controlplane.ControlPlane`
(:attr:`DedicatedUserSpawner.plane`), never from the authenticator.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import pwd
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from jupyterhub.spawner import LocalProcessSpawner, set_user_setuid
from jupyterhub.utils import maybe_future
from traitlets import Unicode

from ztlab.common.keys import public_key_pem
from ztlab.hub.controlplane import ControlPlane, control_plane
from ztlab.hub.identity import granted_roles
from ztlab.hub.policy import Principal
from ztlab.hub.spawner.failures import SpawnFailed, SpawnRefused, Stage
from ztlab.hub.spawner.serverenv import server_environment
from ztlab.kernels.kernelspec import KERNEL_NAME

_UNIX_NAME = re.compile(r"[a-z_][a-z0-9_-]*\Z")

#: ``useradd`` takes /etc/passwd's lock: concurrent first spawns create accounts in turn
_ACCOUNTS = threading.Lock()

#: how long the policy decision of a spawn's first step holds for its later steps
DECISION_HOLDS_SECONDS = 60.0

__all__ = ["DedicatedUserSpawner", "SpawnFailed", "SpawnRefused", "mlflow_env"]


def mlflow_env(env: dict[str, str]) -> None:
    """Point MLflow's client at the hub's authenticated endpoint, with the server's token."""
    env["MLFLOW_TRACKING_URI"] = env["JUPYTERHUB_API_URL"].rstrip("/") + "/ztlab/mlflow"
    env["MLFLOW_TRACKING_TOKEN"] = env.get("JUPYTERHUB_API_TOKEN", "")
    if env.get("JUPYTERHUB_SSL_CLIENT_CA"):
        env["MLFLOW_TRACKING_SERVER_CERT_PATH"] = env["JUPYTERHUB_SSL_CLIENT_CA"]


class DedicatedUserSpawner(LocalProcessSpawner):  # type: ignore[misc]
    """Start each user's server as a dedicated, unprivileged Unix account ``ztl-NAME``."""

    #: whether the server runs in a sandbox of its own (see ``SandboxSpawner``)
    sandboxed = False

    account_prefix = Unicode(
        "ztl-",
        config=True,
        help="""Prefix of the Unix account made for each hub user (``ztl-alice``).

        Example: ``c.DedicatedUserSpawner.account_prefix = "lab-"``. Added in 0.1.
        """,
    )

    home_root = Unicode(
        "/home",
        config=True,
        help="""Directory holding the accounts' private homes (mode 0700 each).

        Example: ``c.DedicatedUserSpawner.home_root = "/srv/homes"``. Added in 0.1.
        """,
    )

    #: when this spawn's policy decision was made (``time.monotonic``), or ``None``
    _decided_at: float | None = None

    _stage_seconds: dict[str, float] | None = None

    @property
    def stage_seconds(self) -> dict[str, float]:
        """How long each stage of the current spawn took (logged when it has started)."""
        if self._stage_seconds is None:
            self._stage_seconds = {}
        return self._stage_seconds

    def log_stages(self) -> None:
        """One line: how long each stage of this spawn took (then start counting afresh)."""
        times = ", ".join(f"{stage} {took:.3f} s" for stage, took in self.stage_seconds.items())
        self.log.info("spawned %s's server: %s", self.user.name, times)
        self.stage_seconds.clear()

    @property
    def plane(self) -> ControlPlane:
        """The hub's control plane (from the hub's tornado settings)."""
        return control_plane(self.user.settings)

    @property
    def account(self) -> str:
        """The Unix account of this server's user."""
        name = f"{self.account_prefix}{self.user.name.lower()}"
        if not _UNIX_NAME.match(name) or len(name) > 32:
            digest = hashlib.sha256(self.user.name.encode()).hexdigest()[:12]
            name = f"{self.account_prefix}{digest}"
        return name

    def record(self, action: str, **detail: Any) -> None:
        """Queue an audit record about this user's server."""
        self.plane.record(self.user.name, action, **detail)

    def get_env(self) -> dict[str, str]:
        """JupyterHub's environment plus the public key that signs dataset manifests.

        Kernels verify signed manifests with ``ZTLAB_TRUSTED_KEYS`` (PEM), so a registry
        answer that the control plane did not sign is refused even if it arrives over the
        hub API.
        """
        env: dict[str, str] = super().get_env()
        env.update(server_environment(Path(sys.prefix), self.home))
        plane = self.plane
        env["ZTLAB_TRUSTED_KEYS"] = public_key_pem(plane.datasets.public_key)
        if plane.models is not None:
            mlflow_env(env)
        return env

    @property
    def home(self) -> Path:
        """The home directory of this server's account (once the account exists)."""
        try:
            return Path(pwd.getpwnam(self.account).pw_dir)
        except KeyError:
            return Path(self.home_root) / self.account

    #: the server's default kernel: the secure kernel, or an environment's (SandboxSpawner)
    default_kernel: str = KERNEL_NAME

    def get_args(self) -> list[str]:
        """JupyterHub's arguments, plus the notebook trust database in the user's home (the
        server's data directory is the control plane's, read-only) and the default kernel."""
        args: list[str] = super().get_args()
        notary = self.home / ".local" / "share" / "jupyter"
        return [
            *args,
            f"--NotebookNotary.data_dir={notary}",
            f"--MappingKernelManager.default_kernel_name={self.default_kernel}",
        ]

    # -- the stages ------------------------------------------------------------------------

    async def create_certs(self) -> dict[str, str]:
        """The policy decides before anything is made for the user (JupyterHub makes the
        server's internal-TLS certificates before it calls :meth:`start`)."""
        await self.decided()
        paths: dict[str, str] = await super().create_certs()
        return paths

    async def start(self) -> Any:
        """Decide, create the account, then start the server as that account.

        Do not override: override a stage.
        """
        await self.decided()
        self._decided_at = None  # the next spawn asks again
        async with self.stage("account"):
            await self.ensure_account()
        async with self.stage("start"):
            ip, port = await maybe_future(super().start())
            await self.until_listening((ip, port), log=None)
        self.log_stages()
        return ip, port

    async def until_listening(self, address: tuple[str, int], *, log: Path | None) -> None:
        """Return once the server accepts connections at ``address``; a
        :class:`SpawnFailed` saying why if its process ends first (quoting the end of
        ``log``) or :attr:`start_timeout` passes. JupyterHub's own check then succeeds at
        once instead of backing off."""
        deadline = time.monotonic() + self.start_timeout
        where = f"An administrator can read {log} on the hub." if log else None
        while True:
            status = self.proc.poll()
            if status is not None:
                raise SpawnFailed(
                    "start",
                    f"Your server exited while starting (exit status {status})"
                    + (_last_lines(log) if log else "."),
                    hint="Try again; if it keeps failing, tell an administrator. " + (where or ""),
                )
            if await _accepts(address):
                return
            if time.monotonic() > deadline:
                raise SpawnFailed(
                    "start",
                    f"Your server did not start listening within {self.start_timeout} s.",
                    hint=where,
                )
            await asyncio.sleep(0.05)

    async def decided(self) -> None:
        """The ``decide`` stage, once per spawn: a decision made for this spawn's first
        step (certificates) holds for its last (start) for :data:`DECISION_HOLDS_SECONDS`."""
        made = self._decided_at
        if made is not None and time.monotonic() - made < DECISION_HOLDS_SECONDS:
            return
        async with self.stage("decide"):
            await self.decide()
        self._decided_at = time.monotonic()

    def stage(self, name: Stage) -> _StageGuard:
        """``async with self.stage("lease"):`` -- any failure inside becomes a
        :class:`SpawnFailed` of that stage, recorded as ``server.spawn_failed``."""
        return _StageGuard(self, name)

    async def roles(self) -> frozenset[str]:
        """The policy roles the identity provider granted this user."""
        return granted_roles(await self.user.get_auth_state() or {})

    async def decide(self) -> None:
        """Ask the policy engine; refuse with its reason when it denies."""
        principal = Principal(name=self.user.name, roles=await self.roles())
        decision = self.plane.policy.authorize(
            principal, "spawn_server", f"server:{self.user.name}", {}
        )
        if not decision.allowed:
            raise SpawnRefused(
                f"Your server may not start: {decision.reason}.",
                hint="Ask an administrator for a role that may start a notebook server.",
            )

    async def ensure_account(self) -> pwd.struct_passwd:
        """Create the account on first use: no root, no sudo, no shell, private home."""
        return await asyncio.to_thread(self._ensure_account)

    def _ensure_account(self) -> pwd.struct_passwd:
        account = self.account
        with _ACCOUNTS:
            try:
                entry = pwd.getpwnam(account)
            except KeyError:
                home = str(Path(self.home_root) / account)
                subprocess.run(
                    [
                        "useradd",
                        "--create-home",
                        "--home-dir",
                        home,
                        "--shell",
                        "/usr/sbin/nologin",
                        "--user-group",
                        "--comment",
                        f"zerotrust-lab user {self.user.name}",
                        account,
                    ],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
                entry = pwd.getpwnam(account)
                self.record("account.created", account=account)
        if entry.pw_uid == 0:
            raise SpawnFailed(
                "account",
                f"Refusing to run {self.user.name}'s server as root ({account} has uid 0).",
                hint="An administrator must give the account an unprivileged uid.",
            )
        Path(entry.pw_dir).chmod(0o700)
        return entry

    async def move_certs(self, paths: dict[str, str]) -> dict[str, str]:
        """Stage the server's internal-TLS key, certificate and CA in the account's home.

        (JupyterHub's own version looks up a Unix user named like the hub user.)
        """
        async with self.stage("account"):
            # JupyterHub moves certificates before it calls start()
            entry = await self.ensure_account()
        return await asyncio.to_thread(_move_certs, paths, entry)

    def make_preexec_fn(self, name: str) -> Any:
        return set_user_setuid(self.account)

    def user_env(self, env: dict[str, str]) -> dict[str, str]:
        entry = pwd.getpwnam(self.account)
        env["USER"] = self.account
        env["HOME"] = entry.pw_dir
        env["SHELL"] = "/bin/sh"
        return env


class _StageGuard:
    """Turns any failure inside a stage into a recorded :class:`SpawnFailed`."""

    def __init__(self, spawner: DedicatedUserSpawner, stage: Stage) -> None:
        self._spawner = spawner
        self._stage = stage
        self._started = 0.0

    async def __aenter__(self) -> None:
        self._started = time.monotonic()

    async def __aexit__(self, kind: Any, error: BaseException | None, tb: Any) -> bool:
        spawner = self._spawner
        spawner.stage_seconds[self._stage] = (
            spawner.stage_seconds.get(self._stage, 0.0) + time.monotonic() - self._started
        )
        if error is None or not isinstance(error, Exception):
            return False
        if isinstance(error, SpawnFailed):
            failure = error
        else:
            said = getattr(error, "message", None) or str(error) or type(error).__name__
            hint = getattr(error, "hint", None)
            failure = SpawnFailed(
                self._stage,
                f"Your server could not start ({_STAGE_WORDS[self._stage]}): {said}.",
                hint=f"An administrator can fix this: {hint}."
                if hint
                else "Try again; if it keeps failing, tell an administrator the time it "
                "happened (the hub's log has the details).",
            )
        spawner.log.error(
            "spawn of %s failed at stage %s: %s", spawner.user.name, failure.stage, error
        )
        spawner.record(
            "server.spawn_failed",
            stage=failure.stage,
            reason=failure.jupyterhub_message,
            server=spawner.name or "",
        )
        await spawner.plane.flush()
        if failure is error:
            return False
        raise failure from error


#: how many lines of a server's log a start-up failure quotes
_LOG_LINES = 3


async def _accepts(address: tuple[str, int]) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(*address), timeout=0.5)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _last_lines(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "."
    if not lines:
        return "."
    return ": " + " / ".join(line.strip()[:200] for line in lines[-_LOG_LINES:])


_STAGE_WORDS: dict[str, str] = {
    "decide": "the policy decision failed",
    "account": "its Unix account could not be prepared",
    "lease": "its GPUs could not be leased",
    "sandbox": "its sandbox could not be made",
    "start": "the server process failed",
}


def _move_certs(paths: dict[str, str], entry: pwd.struct_passwd) -> dict[str, str]:
    home = Path(entry.pw_dir)
    hub_dir = home / ".jupyterhub"
    out_dir = hub_dir / "jupyterhub-certs"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(mode=0o700, parents=True)
    moved = {
        "keyfile": out_dir / Path(paths["keyfile"]).name,
        "certfile": out_dir / Path(paths["certfile"]).name,
        "cafile": out_dir / Path(paths["cafile"]).name,
    }
    shutil.move(paths["keyfile"], moved["keyfile"])
    shutil.move(paths["certfile"], moved["certfile"])
    shutil.copy(paths["cafile"], moved["cafile"])
    for path in (hub_dir, out_dir, *moved.values()):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    moved["keyfile"].chmod(0o600)
    return {key: str(value) for key, value in moved.items()}
