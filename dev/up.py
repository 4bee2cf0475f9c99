"""``ztlab up`` on one machine: prepare the state, start the development IdP and the hub.

:func:`bring_up` validates the configuration and the policies, prepares the control plane's
state (directory 0700, audit key 0600, generated secrets 0600), records that it came up,
then starts in the background the development OpenID provider (when ``[login]
development_provider`` is on) and the hub, and waits until the hub answers.
:func:`bring_down` stops them.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ztlab.common.config import ZtlabConfig
from ztlab.common.errors import ConfigError
from ztlab.hub.private import state_directory
from ztlab.hub.processes import ManagedProcess, ProcessError

#: the background processes of ``ztlab up``, stopped in this order by ``ztlab down``
PROCESSES = ("hub", "devidp")


@dataclass(frozen=True)
class Started:
    """What :func:`bring_up` reports."""

    records: int
    verifier_key: str
    policies: int
    actions: int


def running_hub(config: ZtlabConfig) -> int | None:
    """The pid of a hub ``ztlab up`` started, if it runs."""
    return ManagedProcess("hub", config.state_dir).pid()


def bring_up(config: ZtlabConfig, config_path: Path, hub_argv: list[str]) -> Started:
    """Prepare the state, record the start, start the IdP (development) and the hub."""
    _prepare_state(config, config_path)
    started = _record_start(config, config_path)
    if config.login.development_provider:
        _start_dev_provider(config)
    hub = ManagedProcess("hub", config.state_dir)
    hub.start(hub_argv, cwd=state_directory(config.state_dir / "hub"))
    wait_for(config.public_url("/hub/health"), hub, "the hub")
    return started


def bring_down(config: ZtlabConfig) -> dict[str, bool]:
    """Stop the hub (which stops the servers, MLflow and devpi) and the IdP; tear the network
    down."""
    stopped = {name: ManagedProcess(name, config.state_dir).stop() for name in PROCESSES}
    # the hub stops MLflow and devpi on a clean stop; this ends what a killed hub left behind
    for service in ("mlflow", "devpi"):
        ManagedProcess(service, config.state_dir).stop()
    if config.sandbox.enabled:
        from ztlab.hub.sandbox.netns import NetworkSegments

        NetworkSegments(
            pool=config.sandbox.address_pool,
            table=config.sandbox.firewall_table,
            state_file=config.state_dir / "sandbox" / "netns.json",
        ).teardown()
    return stopped


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


def _record_start(config: ZtlabConfig, config_path: Path) -> Started:
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
        return Started(
            records=receipt.seq + 1,
            verifier_key=log.verifier_key,
            policies=len(engine.policy_ids),
            actions=len(engine.actions),
        )


def _start_dev_provider(config: ZtlabConfig) -> None:
    from urllib.parse import urlsplit

    refs = config.secret_refs()
    issuer = config.login.issuer
    settings = {
        "state_dir": str(state_directory(config.state_dir / "devidp")),
        "port": urlsplit(issuer).port or 80,
        "issuer": issuer,
        "clients": [
            {
                "client_id": config.login.client_id,
                "client_secret": refs["secrets.oidc_client_secret"].resolve().get_secret_value(),
                "redirect_uris": [config.public_url("/hub/oauth_callback")],
            }
        ],
    }
    launch = config.state_dir / "devidp" / "launch.json"
    fd = os.open(launch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(settings, handle)
    process = ManagedProcess("devidp", config.state_dir)
    process.start([sys.executable, "-m", "ztlab.dev.idp", "--config", str(launch)])
    wait_for(f"{issuer}/.well-known/openid-configuration", process, "the development IdP")


def wait_for(url: str, process: ManagedProcess, what: str, timeout: float = 60) -> None:
    """Wait until ``url`` answers 200, or fail with the end of ``process``'s log."""
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
