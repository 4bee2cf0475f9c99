"""``ztlab up`` and ``ztlab down``: start and stop the environment on this machine.

``up`` validates the configuration and the policies, prepares the control plane's state
(directory 0700, audit key 0600, generated secrets 0600), records that it came up, then
starts in the background the development OpenID provider (when ``[login]
development_provider`` is on) and the hub (JupyterHub with configurable-http-proxy), waits
until the hub answers, and prints where to go and who can sign in.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import click

from ztlab.cli._errors import handle_errors
from ztlab.cli.hub import CONFIG_OPTION, hub_command_line
from ztlab.common.config import ZtlabConfig, load_config
from ztlab.common.errors import ConfigError
from ztlab.dev.processes import ManagedProcess, ProcessError


def _prepare_state(config: ZtlabConfig, config_path: Path) -> None:
    state_dir = config.state_dir
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        state_dir.chmod(0o700)
    except OSError as exc:
        raise ConfigError(
            f"{config_path}: state_dir: cannot create {state_dir}: {exc.strerror}"
        ) from exc
    # secrets kept as files under state_dir are generated on first start
    for ref in config.secret_refs().values():
        if ref.file is not None and ref.file.is_relative_to(state_dir) and not ref.file.exists():
            ref.file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(ref.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, secrets.token_hex(32).encode())
            finally:
                os.close(fd)


def _record_start(config: ZtlabConfig, config_path: Path) -> tuple[int, str, int, int]:
    from ztlab.hub.audit import AuditLog
    from ztlab.hub.policy import PolicyEngine

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
        return receipt.seq + 1, log.verifier_key, len(engine.policy_ids), len(engine.actions)


def _start_dev_provider(config: ZtlabConfig) -> None:
    from urllib.parse import urlsplit

    from ztlab.hub.hubconfig import private_dir, public_url

    refs = config.secret_refs()
    issuer = config.login.issuer
    settings = {
        "state_dir": str(private_dir(config.state_dir / "devidp")),
        "port": urlsplit(issuer).port or 80,
        "issuer": issuer,
        "clients": [
            {
                "client_id": config.login.client_id,
                "client_secret": refs["secrets.oidc_client_secret"].resolve().get_secret_value(),
                "redirect_uris": [public_url(config, "/hub/oauth_callback")],
            }
        ],
    }
    launch = config.state_dir / "devidp" / "launch.json"
    fd = os.open(launch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(settings, handle)
    process = ManagedProcess("devidp", config.state_dir)
    process.start([sys.executable, "-m", "ztlab.dev.idp", "--config", str(launch)])
    _wait_for(f"{issuer}/.well-known/openid-configuration", process, "the development IdP")


def _wait_for(url: str, process: ManagedProcess, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.pid() is None:
            raise ProcessError(f"{what} exited while starting:\n{process.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our URL
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise ProcessError(f"{what} did not answer {url} within {timeout:.0f} s:\n{process.log_tail()}")


@click.command("up", short_help="Start the control plane, dev IdP and hub.")
@CONFIG_OPTION
@handle_errors
def up_command(config_path: Path) -> None:
    """Start the environment on this machine: control plane, IdP (dev) and hub."""
    from ztlab.hub.hubconfig import public_url

    config = load_config(config_path)
    running = ManagedProcess("hub", config.state_dir).pid()
    if running is not None:
        click.echo(
            f"zerotrust-lab is already up (hub pid {running}): open "
            f"{public_url(config, '/hub/')}; `ztlab down` stops it"
        )
        return
    _prepare_state(config, config_path)
    records, verifier, policies, actions = _record_start(config, config_path)
    if config.login.development_provider:
        _start_dev_provider(config)
    argv, env, workdir = hub_command_line(config_path)
    hub = ManagedProcess("hub", config.state_dir)
    hub.start(argv, env=env, cwd=workdir)
    _wait_for(public_url(config, "/hub/health"), hub, "the hub")

    click.echo(f"zerotrust-lab is up (config {config_path})")
    click.echo(f"  open              {public_url(config, '/hub/')}")
    click.echo(f"  state directory   {config.state_dir} (mode 0700)")
    click.echo(f"  audit log         {config.audit_log_path} ({records} records so far)")
    click.echo(f"  audit public key  {verifier}")
    click.echo(f"  policies          {policies} Cedar policies, {actions} actions, deny by default")
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
    """Stop what `ztlab up` started (the hub and the development IdP)."""
    config = load_config(config_path)
    for name in ("hub", "devidp"):
        stopped = ManagedProcess(name, config.state_dir).stop()
        click.echo(f"{name}: {'stopped' if stopped else 'not running'}")
    if config.sandbox.enabled:
        from ztlab.hub.sandbox.netns import NetworkSegments

        NetworkSegments(
            pool=config.sandbox.address_pool,
            table=config.sandbox.firewall_table,
            state_file=config.state_dir / "sandbox" / "netns.json",
        ).teardown()
        click.echo("sandbox network: removed")


def _strings(value: object) -> list[str]:
    return [str(item) for item in value] if isinstance(value, list) else []
