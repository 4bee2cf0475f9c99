"""``ztlab policy``: ask the policy decision point, check policy files, show the defaults.

Exit statuses follow :mod:`ztlab.cli.main`: ``check`` exits 0 when allowed and 1 when
denied; any command exits 2 on bad input (malformed context, unknown action, invalid
policy files).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ztlab.cli._errors import handle_errors
from ztlab.common.errors import PolicyError
from ztlab.hub.policy import PolicyEngine, Principal, default_policy_files

_POLICY_DIR_HELP = (
    "Directory of *.cedar policies (and optionally schema.cedarschema) to use instead "
    "of the shipped defaults."
)


def _engine(policy_dir: Path | None) -> PolicyEngine:
    if policy_dir is None:
        return PolicyEngine.defaults()
    return PolicyEngine.from_directory(policy_dir)


def _parse_context(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyError(
            f"--context is not valid JSON: {exc.msg} at line {exc.lineno}, "
            f"column {exc.colno} (char {exc.pos})",
            hint='pass a JSON object, e.g. --context \'{"trainer": "bob"}\'',
        ) from exc
    if not isinstance(value, dict):
        raise PolicyError(
            f"--context must be a JSON object, got {type(value).__name__}",
            hint='pass a JSON object, e.g. --context \'{"trainer": "bob"}\'',
        )
    return value


def _parse_roles(text: str) -> frozenset[str]:
    return frozenset(role.strip() for role in text.split(",") if role.strip())


@click.group("policy")
def policy_group() -> None:
    """Query and check the Cedar access policies (deny by default)."""


@policy_group.command("check", short_help="Decide one request: allow (exit 0) or deny (1).")
@click.option("--principal", "name", required=True, help="User name asking for access.")
@click.option(
    "--roles",
    default="",
    show_default=False,
    help="Comma-separated roles of the user, e.g. trainer,approver (default: none).",
)
@click.option("--action", required=True, help="Action to decide, e.g. lease_gpu.")
@click.option("--resource", required=True, help="Resource as KIND:NAME, e.g. pool:research.")
@click.option(
    "--context",
    "context_json",
    default=None,
    help='Request context as a JSON object, e.g. \'{"trainer": "bob"}\'.',
)
@click.option(
    "--policy-dir",
    type=click.Path(path_type=Path),
    default=None,
    help=_POLICY_DIR_HELP,
)
@click.option(
    "--audit-log",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Record the decision in this audit log (its key: <log>.key), as enforcement does.",
)
@click.pass_context
@handle_errors
def check_command(
    ctx: click.Context,
    name: str,
    roles: str,
    action: str,
    resource: str,
    context_json: str | None,
    policy_dir: Path | None,
    audit_log: Path | None,
) -> None:
    """Decide one request; exit 0 if allowed, 1 if denied, 2 on bad input."""
    context = _parse_context(context_json)
    principal = Principal(name=name, roles=_parse_roles(roles))
    engine = _engine(policy_dir)
    if audit_log is None:
        decision = engine.authorize(principal, action, resource, context)
    else:
        from ztlab.hub.audit import AuditLog

        with AuditLog.open(audit_log) as log:
            decision = engine.with_audit(log).authorize(principal, action, resource, context)
    verdict = "ALLOW" if decision.allowed else "DENY "
    click.echo(f"{verdict}  {name} {action} {resource}")
    click.echo(f"  {decision.reason}")
    ctx.exit(0 if decision.allowed else 1)


@policy_group.command("validate", short_help="Check policy files against the schema.")
@click.option(
    "--policy-dir",
    type=click.Path(path_type=Path),
    default=None,
    help=_POLICY_DIR_HELP,
)
@handle_errors
def validate_command(policy_dir: Path | None) -> None:
    """Parse and validate policies against the schema; exit 2 naming the first problem."""
    engine = _engine(policy_dir)
    click.echo(f"{len(engine.policy_ids)} policies, {len(engine.actions)} actions, valid")


@policy_group.command("show-defaults", short_help="Print the shipped schema and policies.")
@handle_errors
def show_defaults_command() -> None:
    """Print the shipped schema and default policies (a starting point for --policy-dir)."""
    for name, text in default_policy_files().items():
        click.echo(f"// ==== {name} ====")
        click.echo(text.rstrip("\n"))
        click.echo()
