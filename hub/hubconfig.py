"""JupyterHub configuration rendered from ``ztlab.toml``.

``hub/jupyterhub_config.py`` calls :func:`configure`; so does ``ztlab hub``. Files that hold
state or secrets (the hub database, cookie secret, auth-state key) live under
``<state_dir>/hub`` (mode 0700) and are created with mode 0600 before JupyterHub opens
them: stock JupyterHub creates its SQLite database world-readable.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ztlab.common.config import ZtlabConfig
from ztlab.common.errors import ConfigError
from ztlab.common.installed import npm_command
from ztlab.hub.api import DATA_SCOPE
from ztlab.hub.login.authenticator import MFAOAuthenticator, rbac_roles
from ztlab.hub.private import private_directory
from ztlab.hub.private import private_file as _private_file
from ztlab.hub.spawner.dedicated import DedicatedUserSpawner
from ztlab.kernels.kernelspec import KERNEL_NAME
from ztlab.kernels.kernelspec import install as install_kernelspec


def hub_dir(config: ZtlabConfig) -> Path:
    """Where the hub keeps its state: ``<state_dir>/hub``."""
    return config.state_dir / "hub"


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 and tighten it if the hub owns it."""
    return private_directory(path, what="state directory", error=ConfigError, tighten=True)


def private_file(path: Path, *, content: bytes | None = None) -> Path:
    """Create ``path`` with mode 0600 if missing (with ``content``); tighten it if present."""
    return _private_file(path, what="state file", error=ConfigError, content=content, tighten=True)


def configure(c: Any, config: ZtlabConfig, *, config_path: Path | None = None) -> None:
    """Fill a traitlets config ``c`` for JupyterHub from a validated ztlab configuration."""
    state = private_dir(hub_dir(config))
    login = config.login

    # -- the hub, its proxy and its database ------------------------------------------------
    c.JupyterHub.bind_url = config.hub.bind_url
    c.JupyterHub.hub_bind_url = config.hub.api_url
    # internal TLS: the proxy's REST API speaks https to the hub's client certificate
    c.ConfigurableHTTPProxy.api_url = config.hub.proxy_api_url.replace("http://", "https://", 1)
    c.ConfigurableHTTPProxy.command = [
        str(npm_command("configurable-http-proxy", "configurable-http-proxy"))
    ]
    c.ConfigurableHTTPProxy.pid_file = str(state / "proxy.pid")
    database = private_file(state / "jupyterhub.sqlite")
    c.JupyterHub.db_url = f"sqlite:///{database}"
    c.JupyterHub.cookie_secret_file = str(state / "jupyterhub_cookie_secret")
    refs = config.secret_refs()
    if "secrets.cookie_secret" in refs:
        c.JupyterHub.cookie_secret = refs["secrets.cookie_secret"].resolve().get_secret_value()
    crypt_key = private_file(state / "auth-state.key", content=secrets.token_hex(32).encode())
    c.CryptKeeper.keys = [bytes.fromhex(crypt_key.read_text().strip())]
    c.JupyterHub.pid_file = str(state / "jupyterhub.pid")
    # hub, proxy and servers talk over mutual TLS (JupyterHub's internal_ssl); the
    # certificate authority and keys live under state_dir/hub/internal-ssl (0700)
    c.JupyterHub.internal_ssl = True
    c.JupyterHub.internal_certs_location = str(private_dir(state / "internal-ssl"))
    c.JupyterHub.template_paths = [
        str(Path(__file__).parent / "login" / "templates"),
        str(Path(__file__).parent / "pages" / "templates"),
    ]

    # -- short, re-checked sessions and expiring tokens ---------------------------------------
    c.JupyterHub.cookie_max_age_days = login.session_max_age_seconds / 86400
    c.JupyterHub.token_expires_in_max_seconds = login.token_max_age_seconds
    c.Authenticator.auth_refresh_age = login.auth_refresh_age_seconds
    c.Authenticator.refresh_pre_spawn = True
    c.Authenticator.enable_auth_state = True

    # -- login: verified OIDC, enforced MFA, roles from groups --------------------------------
    c.JupyterHub.authenticator_class = MFAOAuthenticator
    auth = c.MFAOAuthenticator
    auth.issuer = login.issuer
    auth.client_id = login.client_id
    if "secrets.oidc_client_secret" not in refs:
        raise ConfigError(
            f"{config_path or 'ztlab.toml'}: secrets.oidc_client_secret: required for login; "
            'expected { env = "NAME" } or { file = "/path" }'
        )
    auth.client_secret = refs["secrets.oidc_client_secret"].resolve().get_secret_value()
    auth.oauth_callback_url = public_url(config, "/hub/oauth_callback")
    auth.scope = list(login.scopes)
    auth.username_claim = login.username_claim
    auth.groups_claim = login.groups_claim
    auth.accepted_amr = list(login.accepted_amr)
    auth.accepted_acr = list(login.accepted_acr)
    auth.group_roles = {group: list(roles) for group, roles in config.groups.items()}
    auth.allowed_networks = list(login.allowed_networks)
    auth.step_up_on_new_context = login.step_up_on_new_context
    auth.session_max_age_seconds = login.session_max_age_seconds
    auth.session_idle_seconds = login.session_idle_seconds
    auth.validate_server_cert = login.validate_provider_certificate
    auth.audit_log = str(config.audit_log_path)
    auth.audit_signing_key = str(config.audit_signing_key_path)
    auth.audit_origin = config.audit.origin
    auth.audit_checkpoint_interval = config.audit.checkpoint_interval_seconds
    auth.dataset_registry = str(config.dataset_registry_path)
    auth.attestation_key = str(config.attestation_key_path)
    auth.dataset_storage_roots = [str(p) for p in config.datasets.storage_roots]
    c.JupyterHub.custom_scopes = {
        DATA_SCOPE: {
            "description": "Use the zerotrust-lab dataset API (each action is a policy decision)"
        }
    }
    # the server's token (inherited by its kernels) may use the dataset API, nothing more
    c.Spawner.server_token_scopes = ["users:activity!user", "access:servers!server", DATA_SCOPE]
    auth.totp_db = str(state / "totp.sqlite")
    auth.totp_key = str(private_dir(config.state_dir / "keys") / "totp.key")
    auth.totp_max_failures = login.totp_max_failures
    auth.totp_lockout_seconds = login.totp_lockout_seconds
    roles = rbac_roles(sorted(config.roles))
    services: list[dict[str, Any]] = []
    if config.models.enabled:
        # MLflow on 127.0.0.1 only; users and kernels reach it through /hub/api/ztlab/mlflow
        from ztlab.hub.models.mlflow import server_command, server_environment

        store = private_dir(config.models_store)
        auth.models_store = str(store)
        auth.mlflow_url = f"http://127.0.0.1:{config.models.mlflow_port}"
        auth.protected_aliases = list(config.models.protected_aliases)
        auth.sign_on_register = config.models.sign_on_register
        auth.artifacts_destination = config.models.artifacts_destination or ""
        if config.models.s3_endpoint_url:
            # for the server (passed on below) and for the signing service in this process
            os.environ["MLFLOW_S3_ENDPOINT_URL"] = config.models.s3_endpoint_url
        services.append(
            {
                "name": "mlflow",
                "command": server_command(
                    store,
                    config.models.mlflow_port,
                    destination=config.models.artifacts_destination,
                ),
                "environment": server_environment(
                    store, default_permission=config.models.default_permission
                ),
            }
        )
    if config.hub.cull_idle_seconds:
        # idle servers are stopped (and their GPU leases end) by jupyterhub-idle-culler
        services += [
            {
                "name": "idle-culler",
                "command": [
                    sys.executable,
                    "-m",
                    "jupyterhub_idle_culler",
                    f"--timeout={config.hub.cull_idle_seconds}",
                    # through the proxy on this machine: the hub's own API speaks internal
                    # TLS with a private CA that the culler does not load
                    f"--url={public_url(config, '/hub/api')}",
                    f"--cull-every={max(30, config.hub.cull_idle_seconds // 10)}",
                ],
            }
        ]
        roles.append(
            {
                "name": "idle-culler",
                "description": "Stop idle servers",
                "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
                "services": ["idle-culler"],
            }
        )
    c.JupyterHub.services = services
    c.JupyterHub.load_roles = roles

    if config.policy_directory is not None:
        auth.policy_directory = str(config.policy_directory)

    # -- user servers: a dedicated unprivileged account each, after a policy decision; with
    #    [sandbox] enabled also namespaces, a cgroup, a network namespace and GPU leases -----
    if config.sandbox.enabled:
        from ztlab.hub.sandbox.netns import NetworkSegments
        from ztlab.hub.spawner.sandbox import SandboxSpawner

        segments = NetworkSegments(
            pool=config.sandbox.address_pool,
            table=config.sandbox.firewall_table,
            state_file=private_dir(config.state_dir / "sandbox") / "netns.json",
        )
        segments.setup()  # puts the service address on lo before the hub API binds to it
        api = urlsplit(config.hub.api_url)
        c.JupyterHub.hub_bind_url = f"{api.scheme}://{segments.service_ip}:{api.port or 8081}"
        c.JupyterHub.trusted_alt_names = [f"IP:{segments.service_ip}"]
        c.JupyterHub.spawner_class = SandboxSpawner
        c.Spawner.poll_interval = 10  # a server past its GPU lease is stopped within ~10 s
        if config_path is not None:
            c.SandboxSpawner.ztlab_config = str(config_path.resolve())
    else:
        c.JupyterHub.spawner_class = DedicatedUserSpawner
    c.JupyterHub.default_url = "/hub/home"
    singleuser = Path(sys.executable).with_name("jupyterhub-singleuser")
    c.Spawner.cmd = [str(singleuser if singleuser.exists() else "jupyterhub-singleuser")]
    c.Spawner.default_url = "/lab"
    # the secure kernel (ztlab extension preloaded) is every server's default kernel
    install_kernelspec(Path(sys.prefix))
    c.Spawner.args = [f"--MappingKernelManager.default_kernel_name={KERNEL_NAME}"]
    c.Spawner.http_timeout = 60


def public_url(config: ZtlabConfig, path: str) -> str:
    """The URL users reach ``path`` at (the bind address made connectable)."""
    parts = urlsplit(config.hub.bind_url)
    host = parts.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::"):  # noqa: S104 - a bind address, not a connection target
        host = "127.0.0.1"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}{path}"
