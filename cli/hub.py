"""``ztlab hub``: run the hub (JupyterHub with the control plane) configured from ztlab.toml."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ztlab.cli._errors import handle_errors

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    envvar="ZTLAB_CONFIG",
    default="/etc/ztlab/ztlab.toml",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The configuration file (or $ZTLAB_CONFIG).",
)


def hub_command_line(config_path: Path) -> list[str]:
    """The command that runs the hub for ``config_path`` (for running it in the background)."""
    return [sys.executable, "-m", "ztlab", "hub", "--config", str(config_path.resolve())]


@click.command(
    "hub",
    short_help="Run the hub (JupyterHub, proxy, MFA login) here.",
    context_settings={"ignore_unknown_options": True},
)
@CONFIG_OPTION
@click.argument("jupyterhub_args", nargs=-1, type=click.UNPROCESSED)
@handle_errors
def hub_command(config_path: Path, jupyterhub_args: tuple[str, ...]) -> None:
    """Run the hub in the foreground: the control plane and JupyterHub with its proxy.

    Everything comes from the configuration file. JUPYTERHUB_ARGS are passed on to
    JupyterHub (for example `--debug`); they win over the file.
    """
    from ztlab.hub.app import run_hub

    run_hub(config_path, jupyterhub_args)
