"""Entry point of the ``ztlab`` command.

Each command group lives in its own module and is registered here.
Exit statuses: 0 success (or "allowed"), 1 a negative answer (denied, does not verify),
2 bad input (an invalid configuration, an unreadable file, a malformed argument).
"""

from __future__ import annotations

import click

from ztlab import __version__
from ztlab.cli.audit import audit_group
from ztlab.cli.config import config_group
from ztlab.cli.data import data_group
from ztlab.cli.hub import hub_command
from ztlab.cli.k8s import k8s_group
from ztlab.cli.model import model_group
from ztlab.cli.policy import policy_group
from ztlab.cli.up import down_command, up_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ztlab")
def cli() -> None:
    """zerotrust-lab: a zero-trust research environment for Jupyter on shared GPU servers."""


cli.add_command(config_group)
cli.add_command(policy_group)
cli.add_command(audit_group)
cli.add_command(up_command)
cli.add_command(hub_command)
cli.add_command(down_command)
cli.add_command(k8s_group)
cli.add_command(data_group)
cli.add_command(model_group)


def main() -> None:
    """Run the ``ztlab`` command."""
    cli()
