"""JupyterHub's settings, rendered from ``ztlab.toml`` and the control plane.

:func:`jupyterhub_settings` is the one place the validated configuration becomes
JupyterHub traitlets; :class:`~ztlab.hub.app.ZtlabHub` calls it after building the
:class:`~ztlab.hub.controlplane.ControlPlane`. Each part of the hub has its own small
function below. Nothing here reads the TOML file again, and no trait of ours mirrors a
ztlab.toml key: the authenticator and spawners read ``[login]``, ``[roles]`` and the rest
from the control plane.

Files that hold state or secrets (the hub database, cookie secret, auth-state key) live
under ``<state_dir>/hub`` (mode 0700) and are created with mode 0600 before JupyterHub opens
them: stock JupyterHub creates its SQLite database world-readable.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from traitlets.config import Config

from ztlab.common.config import ZtlabConfig
from ztlab.common.errors import ConfigError
from ztlab.hub.api.monitor import METRICS_SCOPE
from ztlab.hub.controlplane import ControlPlane
from ztlab.hub.identity import DATA_SCOPE, SERVER_TOKEN_SCOPES, rbac_roles
from ztlab.hub.private import state_directory, state_file
from ztlab.hub.spawner.serverenv import install as install_server_config
from ztlab.hub.spawner.serverenv import server_command
from ztlab.kernels.kernelspec import install as install_kernelspec

#: the entry-point names the hub is configured with (see pyproject.toml)
AUTHENTICATOR = "ztlab-mfa"
PROXY = "ztlab-traefik"
SANDBOX_SPAWNER = "ztlab-sandbox"
DEDICATED_SPAWNER = "ztlab-dedicated"


def jupyterhub_settings(plane: ControlPlane, *, source: str = "ztlab.toml") -> Config:
    """The JupyterHub configuration of a control plane's validated configuration.

    (The plane itself is not configuration: the hub puts it into its tornado settings.)
    """
    c = Config()
    config = plane.config
    _hub(c, config)
    _proxy(c, plane)
    _sessions(c, config)
    _login(c, config, source)
    roles = rbac_roles(sorted(config.roles))
    services, extra_roles = _services(config)
    if plane.monitor is not None:
        scraper, scraper_role = _metrics_scraper(config)
        services.append(scraper)
        extra_roles.append(scraper_role)
    c.JupyterHub.services = services
    c.JupyterHub.load_roles = roles + extra_roles
    _servers(c, plane)
    return c


def _hub(c: Config, config: ZtlabConfig) -> None:
    """The hub's addresses, its database and secrets, internal TLS."""
    state = state_directory(config.state_dir / "hub")
    c.JupyterHub.bind_url = config.hub.bind_url
    c.JupyterHub.hub_bind_url = config.hub.api_url
    c.JupyterHub.db_url = f"sqlite:///{state_file(state / 'jupyterhub.sqlite')}"
    c.JupyterHub.cookie_secret_file = str(state / "jupyterhub_cookie_secret")
    refs = config.secret_refs()
    if "secrets.cookie_secret" in refs:
        c.JupyterHub.cookie_secret = refs["secrets.cookie_secret"].resolve().get_secret_value()
    crypt_key = state_file(state / "auth-state.key", content=secrets.token_hex(32).encode())
    c.CryptKeeper.keys = [bytes.fromhex(crypt_key.read_text().strip())]
    c.JupyterHub.pid_file = str(state / "jupyterhub.pid")
    # hub, proxy and servers talk over mutual TLS (JupyterHub's internal_ssl); the
    # certificate authority and keys live under state_dir/hub/internal-ssl (0700)
    c.JupyterHub.internal_ssl = True
    c.JupyterHub.internal_certs_location = str(state_directory(state / "internal-ssl"))
    here = Path(__file__).parent
    c.JupyterHub.template_paths = [
        str(here / "login" / "templates"),
        str(here / "pages" / "templates"),
    ]
    c.JupyterHub.default_url = "/hub/home"


def _hub_api_netloc(plane: ControlPlane) -> str:
    """``host:port`` of the hub's own API: with the sandbox, on the service address servers
    can reach (put on ``lo`` by the plane); otherwise as in ``[hub] api_url``."""
    hub = plane.config.hub
    host = (
        plane.sandbox.segments.service_ip
        if plane.sandbox is not None
        else urlsplit(hub.api_url).hostname
    )
    return f"{host}:{hub.api_port}"


def _proxy(c: Config, plane: ControlPlane) -> None:
    """Traefik, started by the hub, with the enforcement point in front of every server."""
    config = plane.config
    state = state_directory(config.state_dir / "hub")
    logs = state_directory(config.state_dir / "logs")
    c.JupyterHub.proxy_class = PROXY
    proxy = c.ZtlabProxy
    proxy.traefik_api_url = config.hub.proxy_api_url
    proxy.traefik_api_username = "ztlab-hub"
    # kept across restarts: Traefik's dynamic configuration (which a restarted hub reuses)
    # holds the hash of this password for Traefik's API
    password = state_file(state / "proxy-api-password", content=secrets.token_urlsafe(32).encode())
    proxy.traefik_api_password = password.read_text().strip()
    proxy.static_config_file = str(state / "traefik.toml")
    proxy.dynamic_config_file = str(state / "traefik-routes.toml")
    proxy.log_file = str(logs / "proxy.log")
    proxy.access_log_file = str(state / "proxy-access.log")
    proxy.websocket_log_file = str(state / "proxy-websocket.log")
    proxy.pid_file = str(state / "proxy.pid")
    proxy.traefik_log_level = "WARN"
    # internal TLS: the hub's API speaks https
    proxy.enforce_url = f"https://{_hub_api_netloc(plane)}/hub/ztlab/enforce"


def _sessions(c: Config, config: ZtlabConfig) -> None:
    """Short, re-checked sessions and expiring tokens."""
    login = config.login
    c.JupyterHub.cookie_max_age_days = login.session_max_age_seconds / 86400
    c.JupyterHub.token_expires_in_max_seconds = login.token_max_age_seconds
    c.Authenticator.auth_refresh_age = login.auth_refresh_age_seconds
    c.Authenticator.refresh_pre_spawn = True
    c.Authenticator.enable_auth_state = True


def _login(c: Config, config: ZtlabConfig, source: str) -> None:
    """OAuthenticator's own traits (the provider, the client); ours come from the plane."""
    login = config.login
    refs = config.secret_refs()
    c.JupyterHub.authenticator_class = AUTHENTICATOR
    if "secrets.oidc_client_secret" not in refs:
        raise ConfigError(
            f"{source}: secrets.oidc_client_secret: required for login; "
            'expected { env = "NAME" } or { file = "/path" }'
        )
    auth = c.MFAOAuthenticator
    auth.client_id = login.client_id
    auth.client_secret = refs["secrets.oidc_client_secret"].resolve().get_secret_value()
    auth.oauth_callback_url = config.public_url("/hub/oauth_callback")
    auth.scope = list(login.scopes)
    auth.username_claim = login.username_claim
    auth.validate_server_cert = login.validate_provider_certificate
    c.JupyterHub.custom_scopes = {
        DATA_SCOPE: {"description": "Use the zerotrust-lab API (each action is a policy decision)"},
        METRICS_SCOPE: {"description": "Read the GPU monitor's Prometheus metrics"},
    }


def _services(config: ZtlabConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hub-managed services (the idle culler) and their roles.

    MLflow is not one of them: the control plane runs it (see ``ModelServer``).
    """
    if not config.hub.cull_idle_seconds:
        return [], []
    # idle servers are stopped (and their GPU leases end) by jupyterhub-idle-culler, through
    # the proxy on this machine: the hub's own API speaks internal TLS with a private CA
    # that the culler does not load
    culler = {
        "name": "idle-culler",
        # it ends with the hub, even a hub killed with SIGKILL (a restarted hub starts its own)
        "command": [
            sys.executable,
            "-m",
            "ztlab.hub.processes",
            str(os.getpid()),
            "--",
            sys.executable,
            "-m",
            "jupyterhub_idle_culler",
            f"--timeout={config.hub.cull_idle_seconds}",
            f"--url={config.public_url('/hub/api')}",
            f"--cull-every={max(30, config.hub.cull_idle_seconds // 10)}",
        ],
    }
    role = {
        "name": "idle-culler",
        "description": "Stop idle servers",
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
        "services": ["idle-culler"],
    }
    return [culler], [role]


def scrape_token_path(config: ZtlabConfig) -> Path:
    """The ``gpu-metrics`` service's API token, for Prometheus (0600, control plane only)."""
    return config.state_dir / "monitor" / "scrape-token"


def _metrics_scraper(config: ZtlabConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``gpu-metrics`` service (no process: Prometheus uses its token to scrape
    ``/hub/api/ztlab/metrics``) and its role, which holds only the metrics scope."""
    state_directory(config.state_dir / "monitor")
    path = state_file(scrape_token_path(config), content=secrets.token_hex(32).encode())
    service = {"name": "gpu-metrics", "api_token": path.read_text(encoding="ascii").strip()}
    role = {
        "name": "gpu-metrics-scraper",
        "description": "Read the GPU monitor's Prometheus metrics",
        "scopes": [METRICS_SCOPE],
        "services": ["gpu-metrics"],
    }
    return service, role


def _servers(c: Config, plane: ControlPlane) -> None:
    """User servers: a dedicated unprivileged account each, after a policy decision; with
    ``[sandbox] enabled`` also namespaces, a cgroup, a network namespace and GPU leases."""
    config = plane.config
    if plane.sandbox is not None:
        segments = plane.sandbox.segments
        api = urlsplit(config.hub.api_url)
        c.JupyterHub.hub_bind_url = f"{api.scheme}://{_hub_api_netloc(plane)}"
        c.JupyterHub.trusted_alt_names = [f"IP:{segments.service_ip}"]
        c.JupyterHub.spawner_class = SANDBOX_SPAWNER
        c.Spawner.poll_interval = 10  # a server past its GPU lease is stopped within ~10 s
    else:
        c.JupyterHub.spawner_class = DEDICATED_SPAWNER
    # the command line, configuration and paths come from the control plane; nothing the
    # user can write (config files, user site, .pth, shell rc files) changes the server
    c.Spawner.cmd = server_command()
    install_server_config(Path(sys.prefix))
    c.Spawner.disable_user_config = True
    c.Spawner.env_keep = ["LANG", "LC_ALL", "TZ"]
    c.Spawner.default_url = "/lab"
    # the server's token (inherited by its kernels) may use the control plane's API, no more
    c.Spawner.server_token_scopes = SERVER_TOKEN_SCOPES
    # the secure kernel (ztlab extension preloaded): the default kernel of a server with no
    # environment (the spawners name each server's default kernel, DedicatedUserSpawner)
    install_kernelspec(Path(sys.prefix))
    c.Spawner.http_timeout = 60
