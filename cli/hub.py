"""``ztlab hub``: run JupyterHub (with configurable-http-proxy) configured from ztlab.toml."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from ztlab.cli._errors import handle_errors
from ztlab.common.config import load_config
from ztlab.common.errors import UsageError

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    envvar="ZTLAB_CONFIG",
    default="/etc/ztlab/ztlab.toml",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The configuration file (or $ZTLAB_CONFIG).",
)


def hub_command_line(config_path: Path) -> tuple[list[str], dict[str, str], Path]:
    """The JupyterHub command, its environment and working directory for a config file."""
    from ztlab.common.installed import npm_command
    from ztlab.hub.hubconfig import hub_dir, private_dir

    config = load_config(config_path)
    jupyterhub = Path(sys.executable).with_name("jupyterhub")
    if not jupyterhub.exists():
        found = shutil.which("jupyterhub")
        if found is None:
            raise UsageError("jupyterhub is not installed in this environment")
        jupyterhub = Path(found)
    npm_command("configurable-http-proxy", "configurable-http-proxy")  # fail early, with the fix
    if config.models.enabled:
        _check_port_free(config.models.mlflow_port, "models.mlflow_port", config_path)
    import ztlab.hub

    hub_config = Path(ztlab.hub.__file__).parent / "jupyterhub_config.py"
    env = dict(os.environ, ZTLAB_CONFIG=str(config_path.resolve()))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    workdir = private_dir(hub_dir(config))
    return [str(jupyterhub), "-f", str(hub_config)], env, workdir


def _check_port_free(port: int, key: str, config_path: Path) -> None:
    """Refuse to start when a managed service's port is taken (JupyterHub would restart the
    service forever, each start failing to bind)."""
    import errno
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise UsageError(
                f"{config_path}: {key}: port {port} on 127.0.0.1 is in use by another process",
                hint=f"stop it (`ss -ltnp 'sport = :{port}'` names it; an MLflow server left "
                f"by a hub that crashed is one) or set {key} to a free port",
            ) from exc


@click.command("hub", short_help="Run the hub (JupyterHub, proxy, MFA login) here.")
@CONFIG_OPTION
@handle_errors
def hub_command(config_path: Path) -> None:
    """Run the hub in the foreground (JupyterHub + proxy, login with enforced MFA)."""
    argv, env, workdir = hub_command_line(config_path)
    os.chdir(workdir)
    os.execve(argv[0], argv, env)  # noqa: S606 - replaces this process with the hub
