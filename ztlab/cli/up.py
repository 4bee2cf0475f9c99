"""``ztlab up``: prepare the control plane's state and start what exists so far.

Today that is: validate the configuration, load and validate the policies, create the state
directory (mode 0700), open the audit log (creating its Ed25519 key with mode 0600 on first
use), and record that the control plane came up. Later pieces (the identity provider for
development, the hub and its services) are started here too as they land.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from ztlab.cli._errors import handle_errors
from ztlab.common.config import load_config
from ztlab.common.errors import ConfigError


@click.command("up")
@click.option(
    "--config",
    "config_path",
    envvar="ZTLAB_CONFIG",
    default="/etc/ztlab/ztlab.toml",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The configuration file (or $ZTLAB_CONFIG).",
)
@handle_errors
def up_command(config_path: Path) -> None:
    """Set up the control plane (keys, audit log, policies) and start it."""
    from ztlab.hub.audit import AuditLog
    from ztlab.hub.policy import PolicyEngine

    config = load_config(config_path)
    state_dir = config.state_dir
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        state_dir.chmod(0o700)
    except OSError as exc:
        raise ConfigError(
            f"{config_path}: state_dir: cannot create {state_dir}: {exc.strerror}"
        ) from exc
    policy_dir = config.policy_directory
    with AuditLog.open(
        config.audit_log_path,
        key_path=config.audit_signing_key_path,
        origin=config.audit.origin,
        checkpoint_interval=config.audit.checkpoint_interval_seconds,
    ) as log:
        engine = (
            PolicyEngine.from_directory(policy_dir, audit=log)
            if policy_dir is not None
            else PolicyEngine.defaults(audit=log)
        )
        receipt = log.append(
            "ztlab",
            "control_plane.up",
            {
                "config": str(config_path.resolve()),
                "policies": list(engine.policy_ids),
                "roles": sorted(config.roles),
                "pid": os.getpid(),
            },
        )
        recovered = log.recovery
        fingerprint = log.verifier_key
    click.echo(f"zerotrust-lab control plane is up (config {config_path})")
    click.echo(f"  state directory   {state_dir} (mode 0700)")
    click.echo(
        f"  audit log         {config.audit_log_path} ({receipt.seq + 1} records so far"
        f"{', recovered after a crash' if recovered.records > recovered.covered else ''})"
    )
    click.echo(f"  audit public key  {fingerprint}")
    click.echo(
        f"  policies          {len(engine.policy_ids)} Cedar policies, "
        f"{len(engine.actions)} actions, deny by default"
    )
    click.echo(f"  roles             {', '.join(sorted(config.roles))}")
    click.echo("  verify the log    ztlab audit verify --log " + str(config.audit_log_path))
