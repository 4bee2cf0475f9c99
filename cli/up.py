"""``ztlab up`` and ``ztlab down``: start and stop the environment on this machine.

``up`` validates the configuration and the policies, prepares the control plane's state,
records that it came up, starts the development OpenID provider (when ``[login]
development_provider`` is on) and the hub in the background, waits until the hub answers,
and prints where to go and who can sign in (:mod:`ztlab.dev.up` does the work).
"""

from __future__ import annotations

from pathlib import Path

import click

from ztlab.cli._errors import handle_errors
from ztlab.cli.hub import CONFIG_OPTION, hub_command_line
from ztlab.common.config import load_config


@click.command("up", short_help="Start the control plane, dev IdP and hub.")
@CONFIG_OPTION
@handle_errors
def up_command(config_path: Path) -> None:
    """Start the environment on this machine: control plane, IdP (dev) and hub."""
    from ztlab.dev.up import bring_up, running_hub

    config = load_config(config_path)
    running = running_hub(config)
    if running is not None:
        click.echo(
            f"zerotrust-lab is already up (hub pid {running}): open "
            f"{config.public_url('/hub/')}; `ztlab down` stops it"
        )
        return
    started = bring_up(config, config_path, hub_command_line(config_path))
    click.echo(f"zerotrust-lab is up (config {config_path})")
    click.echo(f"  open              {config.public_url('/hub/')}")
    click.echo(f"  state directory   {config.state_dir} (mode 0700)")
    click.echo(f"  audit log         {config.audit_log_path} ({started.records} records so far)")
    click.echo(f"  audit public key  {started.verifier_key}")
    click.echo(
        f"  policies          {started.policies} Cedar policies, {started.actions} actions, "
        "deny by default"
    )
    click.echo(f"  identity provider {config.login.issuer}")
    click.echo(f"  logs              {config.state_dir / 'logs'}")
    if config.login.development_provider:
        from ztlab.dev.idp import demo_users

        click.echo("  demo users (password: NAME-password):")
        for name, user in demo_users().items():
            groups = ", ".join(map(str, _strings(user["groups"]))) or "no group"
            amr = set(_strings(user["amr"]))
            mfa = "provider MFA" if amr & set(config.login.accepted_amr) else "hub TOTP"
            note = " (disabled)" if user.get("disabled") else ""
            click.echo(f"    {name:<6} {groups:<16} {mfa}{note}")
    click.echo("  stop with         ztlab down (or make down)")


@click.command("down", short_help="Stop what `ztlab up` started.")
@CONFIG_OPTION
@handle_errors
def down_command(config_path: Path) -> None:
    """Stop what `ztlab up` started (the hub, its servers and MLflow, the development IdP)."""
    from ztlab.dev.up import bring_down

    config = load_config(config_path)
    for name, stopped in bring_down(config).items():
        click.echo(f"{name}: {'stopped' if stopped else 'not running'}")
    if config.sandbox.enabled:
        click.echo("sandbox network: removed")


def _strings(value: object) -> list[str]:
    return [str(item) for item in value] if isinstance(value, list) else []
