"""``ztlab schedule``: run a notebook on a cron schedule, as yourself, and manage schedules.

A schedule is checked here first (cron expression, time zone, parameters: the same
:class:`~ztlab.common.schedule.ScheduleSpec` the hub checks), so a typo fails before
anything is sent. Each of its runs is a run like ``ztlab run``'s (``docs/runs.md``).
A schedule is named ``NAME`` (yours) or ``OWNER/NAME`` (an admin naming someone's).
Exit statuses: 0 done, 2 bad input or a refusal.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import click

from ztlab.cli._errors import handle_errors
from ztlab.cli.data import hub_client, hub_options
from ztlab.cli.run import (
    PARAMETER_OPTION,
    notebook_body,
    parse_parameters,
    read_notebook,
)
from ztlab.common.errors import UsageError

if TYPE_CHECKING:
    from ztlab.common.hubapi import HubAPI

#: ztlab.common.schedule's CONCURRENCY and MISSED (kept here so `--help` imports nothing)
CONCURRENCY = ("skip", "queue")
MISSED = ("skip", "latest", "all")

NAME_ARGUMENT = click.argument("name", metavar="NAME|OWNER/NAME")


@click.group("schedule", short_help="Run notebooks on a cron schedule; pause, resume, remove.")
def schedule_group() -> None:
    """Schedules of notebook runs: each fire runs the notebook as its owner, in their
    sandbox, decided by the policy again at every run."""


def _local(moment: str | None, timezone: str) -> str:
    """A UTC time from the hub as wall-clock time in ``timezone`` (and in UTC)."""
    if not moment:
        return "-"
    from zoneinfo import ZoneInfo

    try:
        when = datetime.fromisoformat(moment.replace("Z", "+00:00"))
        local = when.astimezone(ZoneInfo(timezone))
    except (ValueError, KeyError):
        return moment
    if timezone == "UTC":
        return f"{local:%Y-%m-%d %H:%M} UTC"
    return f"{local:%Y-%m-%d %H:%M} {timezone} ({moment})"


def _path(owner: str, name: str) -> str:
    return f"/ztlab/schedules/{quote(owner, safe='')}/{quote(name, safe='')}"


def _resolve(api: HubAPI, name: str) -> tuple[str, str]:
    """``OWNER/NAME`` as given, or ``NAME`` looked up among your own schedules."""
    if "/" in name:
        owner, _, bare = name.partition("/")
        if not owner or not bare or "/" in bare:
            raise UsageError(f"{name!r} is not NAME or OWNER/NAME")
        return owner, bare
    mine = api.call("GET", "/ztlab/schedules")["schedules"]
    found = [s for s in mine if s["name"] == name]
    if not found:
        raise UsageError(
            f"you have no schedule {name!r}",
            hint="see `ztlab schedule list`; name someone else's as OWNER/NAME (admins)",
        )
    return str(found[0]["owner"]), name


def _spec_lines(row: dict[str, Any]) -> list[str]:
    state = "paused" if row["paused"] else f"next run {_local(row['next_run'], row['timezone'])}"
    lines = [
        f"schedule {row['owner']}/{row['name']}: {state}",
        f"  cron        {row['cron']} ({row['timezone']})",
        f"  notebook    {row['notebook']['name']} sha256:{row['notebook']['sha256']}",
        f"  parameters  {json.dumps(row.get('parameters') or {}, sort_keys=True)}",
    ]
    if row.get("gpus"):
        lines.append(f"  GPUs        {row['gpus']} from pool {row.get('pool') or '-'}")
    lines.append(
        f"  retries     {row['retries']} (first after {row['retry_backoff_seconds']} s, doubling)"
    )
    lines.append(f"  concurrency {row['concurrency']}; missed fires: {row['missed']}")
    origin = "ztlab.toml ([[runs.schedules]])" if row.get("source") == "config" else "the API"
    lines.append(f"  added       {row['created_at']} by {row['created_by']}, from {origin}")
    return lines


@schedule_group.command("add", short_help="Add a schedule: a notebook and a cron expression.")
@click.argument("name")
@click.argument("notebook", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--cron",
    required=True,
    metavar="EXPR",
    help="Five-field cron expression: minute hour day-of-month month day-of-week "
    "(e.g. '0 2 * * *').",
)
@click.option(
    "--timezone",
    default="UTC",
    show_default=True,
    metavar="TZ",
    help="IANA time zone the cron expression is read in (e.g. Europe/Berlin).",
)
@PARAMETER_OPTION
@click.option("--pool", default=None, help="GPU pool of the runs' GPUs.")
@click.option(
    "--gpus", type=click.IntRange(0, 64), default=0, show_default=True, help="GPUs per run."
)
@click.option(
    "--retries",
    type=click.IntRange(0, 10),
    default=0,
    show_default=True,
    help="Further attempts after a run fails or is interrupted.",
)
@click.option(
    "--retry-backoff",
    type=click.IntRange(0, 86_400),
    default=60,
    show_default=True,
    metavar="SECONDS",
    help="Wait before the first retry; each further one waits twice as long.",
)
@click.option(
    "--concurrency",
    type=click.Choice(CONCURRENCY),
    default="skip",
    show_default=True,
    help="A fire while the previous run still runs: skip it, or queue it.",
)
@click.option(
    "--missed",
    type=click.Choice(MISSED),
    default="latest",
    show_default=True,
    help="Fires missed while the hub was down: run the latest once, all, or none.",
)
@hub_options
@handle_errors
def add_command(
    name: str,
    notebook: Path,
    cron: str,
    timezone: str,
    parameters: tuple[tuple[str, str], ...],
    pool: str | None,
    gpus: int,
    retries: int,
    retry_backoff: int,
    concurrency: str,
    missed: str,
    hub_url: str | None,
    token_file: Path | None,
    config_path: Path,
) -> None:
    """Run NOTEBOOK as schedule NAME at every time CRON names. The hub keeps a copy of the
    notebook (by its SHA-256): later edits change nothing until you add it again."""
    from ztlab.common.schedule import ScheduleSpec

    spec = ScheduleSpec.parse(
        {
            "name": name,
            "cron": cron,
            "timezone": timezone,
            "parameters": parse_parameters(parameters),
            "pool": pool,
            "gpus": gpus,
            "retries": retries,
            "retry_backoff_seconds": retry_backoff,
            "concurrency": concurrency,
            "missed": missed,
        },
        where="schedule",
    )
    data = read_notebook(notebook)
    row = hub_client(hub_url, token_file, config_path).call(
        "POST", "/ztlab/schedules", {**spec.to_json(), "notebook": notebook_body(notebook, data)}
    )
    click.echo(
        f"schedule {row['owner']}/{row['name']} added: '{row['cron']}' in {row['timezone']}; "
        f"next run {_local(row['next_run'], row['timezone'])}"
    )


@schedule_group.command("list", short_help="Your schedules and their next runs.")
@click.option("--all", "everyone", is_flag=True, help="Everyone's schedules (admins).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@hub_options
@handle_errors
def list_command(
    everyone: bool, as_json: bool, hub_url: str | None, token_file: Path | None, config_path: Path
) -> None:
    """Each schedule: OWNER/NAME, cron expression and time zone, next run, notebook."""
    api = hub_client(hub_url, token_file, config_path)
    rows = api.call("GET", "/ztlab/schedules" + ("?all=1" if everyone else ""))["schedules"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no schedules")
        return
    width = max(len(f"{r['owner']}/{r['name']}") for r in rows)
    for row in rows:
        state = "paused" if row["paused"] else f"next {_local(row['next_run'], 'UTC')}"
        source = "  (ztlab.toml)" if row.get("source") == "config" else ""
        click.echo(
            f"{row['owner'] + '/' + row['name']:<{width}}  {row['cron']:<16} "
            f"{row['timezone']:<16} {state:<26} {row['notebook']['name']}{source}"
        )


@schedule_group.command("show", short_help="One schedule, with its last runs.")
@NAME_ARGUMENT
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@hub_options
@handle_errors
def show_command(
    name: str, as_json: bool, hub_url: str | None, token_file: Path | None, config_path: Path
) -> None:
    """The schedule's settings and its last 20 runs."""
    api = hub_client(hub_url, token_file, config_path)
    row = api.call("GET", _path(*_resolve(api, name)))
    if as_json:
        click.echo(json.dumps(row, indent=2))
        return
    click.echo("\n".join(_spec_lines(row)))
    runs = row.get("runs") or []
    click.echo("  last runs" + ("" if runs else "  none yet"))
    for run in runs:
        took = run.get("duration_seconds")
        click.echo(
            f"    {run['id']}  {(run.get('scheduled_for') or '-'):<20}  #{run['attempt']}  "
            f"{run['status']:<11} {'' if took is None else f'{took:.1f} s  '}"
            f"{' '.join((run.get('message') or '').split())[:60]}"
        )


@schedule_group.command("pause", short_help="Pause a schedule (it fires nothing).")
@NAME_ARGUMENT
@hub_options
@handle_errors
def pause_command(
    name: str, hub_url: str | None, token_file: Path | None, config_path: Path
) -> None:
    """Keep the schedule but fire nothing until it is resumed (queued runs stay)."""
    api = hub_client(hub_url, token_file, config_path)
    owner, bare = _resolve(api, name)
    api.call("POST", _path(owner, bare) + "/pause", {})
    click.echo(f"schedule {owner}/{bare} paused")


@schedule_group.command("resume", short_help="Resume a paused schedule.")
@NAME_ARGUMENT
@hub_options
@handle_errors
def resume_command(
    name: str, hub_url: str | None, token_file: Path | None, config_path: Path
) -> None:
    """Fire again from the next cron time on (the times it was paused are not made up)."""
    api = hub_client(hub_url, token_file, config_path)
    owner, bare = _resolve(api, name)
    row = api.call("POST", _path(owner, bare) + "/resume", {})
    click.echo(
        f"schedule {owner}/{bare} resumed; next run {_local(row['next_run'], row['timezone'])}"
    )


@schedule_group.command("remove", short_help="Remove a schedule; its queued runs are cancelled.")
@NAME_ARGUMENT
@hub_options
@handle_errors
def remove_command(
    name: str, hub_url: str | None, token_file: Path | None, config_path: Path
) -> None:
    """Remove the schedule; its queued runs are cancelled, a running one runs to its end,
    and its past runs stay in the history."""
    api = hub_client(hub_url, token_file, config_path)
    owner, bare = _resolve(api, name)
    answer = api.call("DELETE", _path(owner, bare))
    cancelled = answer.get("cancelled") or []
    note = f"; cancelled queued runs {', '.join(cancelled)}" if cancelled else ""
    click.echo(f"schedule {owner}/{bare} removed{note}")
