"""Entry point of the ``ztlab`` command.

Each command group lives in its own module, loaded only when it runs: ``ztlab data
fingerprint`` imports the manifest code, not the hub, the policy engine or pydantic. The
summaries ``ztlab --help`` lists are kept here so that listing loads nothing (a test keeps
them equal to each command's own ``short_help``).

Exit statuses: 0 success (or "allowed"), 1 a negative answer (denied, does not verify),
2 bad input (an invalid configuration, an unreadable file, a malformed argument).
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from ztlab import __version__

#: command name -> (module:attribute, the summary `ztlab --help` shows)
COMMANDS: dict[str, tuple[str, str]] = {
    "audit": (
        "ztlab.cli.audit:audit_group",
        "Append to, verify, read and export the tamper-evident audit log.",
    ),
    "config": (
        "ztlab.cli.config:config_group",
        "Check, show and describe the ztlab.toml configuration file.",
    ),
    "data": ("ztlab.cli.data:data_group", "Fingerprint and verify datasets (manifests)."),
    "down": ("ztlab.cli.up:down_command", "Stop what `ztlab up` started."),
    "env": (
        "ztlab.cli.env:env_group",
        "Define, build, verify and retire kernel environments.",
    ),
    "hub": ("ztlab.cli.hub:hub_command", "Run the hub (JupyterHub, proxy, MFA login) here."),
    "k8s": ("ztlab.cli.k8s:k8s_group", "Render roles, quotas and pools for Kubernetes."),
    "model": (
        "ztlab.cli.model:model_group",
        "Sign and verify model directories (model-signing format).",
    ),
    "monitor": (
        "ztlab.cli.monitor:monitor_group",
        "GPU alerts, usage and hand-overs; scrape config; traces.",
    ),
    "packages": (
        "ztlab.cli.packages:packages_group",
        "Ask for packages; decide requests (admins).",
    ),
    "pools": (
        "ztlab.cli.pools:pools_group",
        "List pools and your clusters; stop a cluster.",
    ),
    "policy": (
        "ztlab.cli.policy:policy_group",
        "Query and check the Cedar access policies (deny by default).",
    ),
    "run": (
        "ztlab.cli.run:run_group",
        "Run a notebook in your sandbox; runs' history; verify provenance.",
    ),
    "schedule": (
        "ztlab.cli.schedule:schedule_group",
        "Run notebooks on a cron schedule; pause, resume, remove.",
    ),
    "up": ("ztlab.cli.up:up_command", "Start the control plane, dev IdP and hub."),
}


class LazyGroup(click.Group):
    """A group whose commands are imported when they are run (or their help is shown)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, _, attribute = COMMANDS[cmd_name][0].partition(":")
        command = getattr(importlib.import_module(module), attribute)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list, from the summaries above (nothing is imported)."""
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ztlab")
def cli() -> None:
    """zerotrust-lab: a zero-trust research environment for Jupyter on shared GPU servers."""


def main() -> Any:
    """Run the ``ztlab`` command."""
    return cli()
