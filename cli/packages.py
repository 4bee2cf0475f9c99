"""``ztlab packages``: the package allowlist, and requests to extend it.

Exit statuses: 0 done, 2 bad input or a refusal (an admin-only command, an unknown request).
"""

from __future__ import annotations

from pathlib import Path

import click

from ztlab.cli._errors import handle_errors
from ztlab.cli.data import hub_client, hub_options


@click.group("packages", short_help="Ask for packages; decide requests (admins).")
def packages_group() -> None:
    """What `pip install` in your server may install (the package proxy's allowlist), and
    requests to extend it, which admins approve or deny."""


@packages_group.command("rules", short_help="Show the packages you may install.")
@hub_options
@handle_errors
def rules_command(hub_url: str | None, token_file: Path | None, config_path: Path) -> None:
    """The rules of your roles and your approved requests."""
    rows = hub_client(hub_url, token_file, config_path).call("GET", "/ztlab/packages/rules")
    if not rows["rules"]:
        click.echo('no packages; ask for one with: ztlab packages request NAME --reason "..."')
    for rule in rows["rules"]:
        click.echo(f"{rule['requirement']:<32} {rule['source']}")


@packages_group.command("request", short_help="Ask an admin for a package.")
@click.argument("requirement")
@click.option("--reason", required=True, help="What you need it for (admins read it).")
@hub_options
@handle_errors
def request_command(
    requirement: str,
    reason: str,
    hub_url: str | None,
    token_file: Path | None,
    config_path: Path,
) -> None:
    """Ask for REQUIREMENT (NAME, or NAME==VERSION, or a range) to be added to your allowlist."""
    row = hub_client(hub_url, token_file, config_path).call(
        "POST", "/ztlab/packages/requests", {"requirement": requirement, "reason": reason}
    )
    click.echo(f"request {row['id']} filed: {row['requirement']} (pending an admin's decision)")


@packages_group.command("requests", short_help="List package requests.")
@click.option("--status", type=click.Choice(["pending", "approved", "denied"]), default=None)
@hub_options
@handle_errors
def requests_command(
    status: str | None, hub_url: str | None, token_file: Path | None, config_path: Path
) -> None:
    """Requests: all of them for admins, your own for everyone else."""
    query = f"?status={status}" if status else ""
    rows = hub_client(hub_url, token_file, config_path).call(
        "GET", f"/ztlab/packages/requests{query}"
    )["requests"]
    if not rows:
        click.echo("no requests")
    for row in rows:
        decided = f" by {row['decided_by']}" if row["decided_by"] else ""
        click.echo(
            f"{row['id']:>4}  {row['status']:<8}{decided:<12} {row['user']:<12} "
            f"{row['requirement']:<24} {row['reason']}"
        )


def _decide(
    request_id: int,
    decision: str,
    note: str,
    role: str | None,
    hub_url: str | None,
    token_file: Path | None,
    config_path: Path,
) -> None:
    row = hub_client(hub_url, token_file, config_path).call(
        "POST",
        f"/ztlab/packages/requests/{request_id}",
        {"decision": decision, "note": note, "role": role},
    )
    scope = f" for {row['scope']}" if row["scope"] else ""
    click.echo(f"request {row['id']} {row['status']}{scope}: {row['requirement']}")


@packages_group.command("approve", short_help="Approve a request (admins).")
@click.argument("request_id", type=int)
@click.option("--role", default=None, help="Allow it for this whole role, not just the asker.")
@click.option("--note", default="", help="A note recorded with the decision.")
@hub_options
@handle_errors
def approve_command(
    request_id: int,
    role: str | None,
    note: str,
    hub_url: str | None,
    token_file: Path | None,
    config_path: Path,
) -> None:
    """Approve REQUEST_ID: its requirement joins the asker's allowlist (or ROLE's)."""
    _decide(request_id, "approve", note, role, hub_url, token_file, config_path)


@packages_group.command("deny", short_help="Deny a request (admins).")
@click.argument("request_id", type=int)
@click.option("--note", default="", help="Why (the asker sees it).")
@hub_options
@handle_errors
def deny_command(
    request_id: int, note: str, hub_url: str | None, token_file: Path | None, config_path: Path
) -> None:
    """Deny REQUEST_ID."""
    _decide(request_id, "deny", note, None, hub_url, token_file, config_path)
