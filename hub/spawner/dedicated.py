"""``DedicatedUserSpawner``: each hub user's server runs as its own unprivileged Unix account.

The stages of :meth:`start` are fixed: **decide** (the policy engine must allow
``spawn_server`` on ``server:NAME`` for the user's roles; the decision is audited),
**account** (``ztl-NAME`` is created on first spawn: never root, no sudo, no login shell,
a private home of mode 0700), **start** (JupyterHub's local-process start, as that account).
Namespaces, cgroups and GPU leases are added by the sandbox spawner that builds on this one.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from jupyterhub.spawner import LocalProcessSpawner, set_user_setuid
from jupyterhub.utils import maybe_future
from tornado import web
from traitlets import Unicode

_UNIX_NAME = re.compile(r"[a-z_][a-z0-9_-]*\Z")


class SpawnRefused(web.HTTPError):
    """The policy engine refused the spawn; the message says why."""

    def __init__(self, message: str) -> None:
        super().__init__(403, "spawn refused by policy")
        self.jupyterhub_message = message


def mlflow_env(env: dict[str, str]) -> None:
    """Point MLflow's client at the hub's authenticated endpoint, with the server's token."""
    env["MLFLOW_TRACKING_URI"] = env["JUPYTERHUB_API_URL"].rstrip("/") + "/ztlab/mlflow"
    env["MLFLOW_TRACKING_TOKEN"] = env.get("JUPYTERHUB_API_TOKEN", "")
    if env.get("JUPYTERHUB_SSL_CLIENT_CA"):
        env["MLFLOW_TRACKING_SERVER_CERT_PATH"] = env["JUPYTERHUB_SSL_CLIENT_CA"]


class DedicatedUserSpawner(LocalProcessSpawner):  # type: ignore[misc]
    """Start each user's server as a dedicated, unprivileged Unix account ``ztl-NAME``."""

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

    @property
    def account(self) -> str:
        """The Unix account of this server's user."""
        name = f"{self.account_prefix}{self.user.name.lower()}"
        if not _UNIX_NAME.match(name) or len(name) > 32:
            digest = hashlib.sha256(self.user.name.encode()).hexdigest()[:12]
            name = f"{self.account_prefix}{digest}"
        return name

    def get_env(self) -> dict[str, str]:
        """JupyterHub's environment plus the public key that signs dataset manifests.

        Kernels verify signed manifests with ``ZTLAB_TRUSTED_KEYS`` (PEM), so a registry
        answer that the control plane did not sign is refused even if it arrives over the
        hub API.
        """
        env: dict[str, str] = super().get_env()
        registry = getattr(self.authenticator, "dataset_registry_store", None)
        if registry is not None:
            from ztlab.common.attest import public_key_pem

            env["ZTLAB_TRUSTED_KEYS"] = public_key_pem(registry.public_key)
        if getattr(self.authenticator, "mlflow_url", ""):
            mlflow_env(env)
        return env

    async def start(self) -> Any:
        """Decide, create the account, then start the server as that account."""
        await self.decide()
        self.ensure_account()
        return await maybe_future(super().start())

    async def decide(self) -> None:
        """Ask the policy engine; refuse with its reason when it denies."""
        from ztlab.hub.login.authenticator import user_principal

        decision = self.authenticator.policy_engine.authorize(
            await user_principal(self.user),
            "spawn_server",
            f"server:{self.user.name}",
            {},
        )
        if not decision.allowed:
            raise SpawnRefused(f"Your server may not start: {decision.reason}")

    def ensure_account(self) -> None:
        """Create the account on first use: no root, no sudo, no shell, private home."""
        account = self.account
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
            self.authenticator.record(self.user.name, "account.created", account=account)
        if entry.pw_uid == 0:
            raise RuntimeError(f"refusing to run {self.user.name}'s server as root")
        Path(entry.pw_dir).chmod(0o700)

    async def move_certs(self, paths: dict[str, str]) -> dict[str, str]:
        """Stage the server's internal-TLS key, certificate and CA in the account's home.

        (JupyterHub's own version looks up a Unix user named like the hub user.)
        """
        self.ensure_account()  # JupyterHub moves certificates before it calls start()
        entry = pwd.getpwnam(self.account)
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

    def make_preexec_fn(self, name: str) -> Any:
        return set_user_setuid(self.account)

    def user_env(self, env: dict[str, str]) -> dict[str, str]:
        entry = pwd.getpwnam(self.account)
        env["USER"] = self.account
        env["HOME"] = entry.pw_dir
        env["SHELL"] = "/bin/sh"
        return env
