"""``ztlab run``: run a notebook in your sandbox, follow it, and check its signed provenance.

``ztlab run NOTEBOOK -p NAME VALUE`` sends the notebook to the hub, which runs it with
papermill under your identity in a sandbox of its own (``docs/runs.md``), and waits for
the end, showing each change of status. ``list``, ``show``, ``cancel``, ``provenance`` and
``notebook`` ask the hub about runs; ``verify`` checks a run's signed provenance offline,
with nothing but the envelope, the signing key and what you hold (the notebook, the
parameters, the datasets' digests).

Exit statuses: 0 the run succeeded (or the answer came), 1 the run did not succeed or the
provenance does not verify, 2 bad input or a refusal.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlencode

import click

from ztlab.cli._errors import handle_errors
from ztlab.cli.data import hub_client, hub_options
from ztlab.common.errors import UsageError

if TYPE_CHECKING:
    from ztlab.common.hubapi import HubAPI

#: every status a run can have (ztlab.hub.runs.store; kept here so `--help` imports nothing)
STATUSES: Final = (
    "queued",
    "starting",
    "running",
    "finishing",
    "succeeded",
    "failed",
    "refused",
    "skipped",
    "missed",
    "interrupted",
    "cancelled",
)
#: the statuses of a run that is over
FINAL: Final = frozenset(STATUSES[4:])
#: the commands of the group; any other first argument is a notebook to run
SUBCOMMANDS: Final = ("list", "show", "cancel", "provenance", "notebook", "verify")
_RUN_ID: Final = re.compile(r"[0-9a-f]{12}\Z")
_COMMIT: Final = re.compile(r"[0-9a-f]{40,64}\Z")
_DATASET: Final = re.compile(r"([^=\s]+@[^=\s]+)=([a-z0-9]+):([0-9a-f]{32,128})\Z")

#: how long the waiting loop sleeps (a name to replace in tests)
_sleep: Callable[[float], None] = time.sleep


# -- parameters and notebooks (shared with ztlab schedule) ------------------------------------

PARAMETER_OPTION = click.option(
    "-p",
    "--parameter",
    "parameters",
    nargs=2,
    multiple=True,
    metavar="NAME VALUE",
    help="A papermill parameter; VALUE is read as JSON when it is JSON (3, 0.1, true, "
    '[1, 2], "text"), else kept as text. Repeat for several.',
)


def parameter_value(text: str) -> Any:
    """A ``-p`` value: the JSON it spells (number, boolean, null, list, object, quoted
    string), else the text itself (papermill's habit: ``-p name alice`` is ``"alice"``)."""

    def refuse(constant: str) -> Any:
        raise ValueError(constant)  # NaN and Infinity stay text: they are not JSON

    try:
        return json.loads(text, parse_constant=refuse)
    except ValueError:
        return text


def parse_parameters(pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """``-p NAME VALUE`` pairs as a parameter table, checked as the hub checks them."""
    from ztlab.common.schedule import check_parameters

    table: dict[str, Any] = {}
    for name, text in pairs:
        if name in table:
            raise UsageError(f"-p {name}: the parameter is given twice")
        table[name] = parameter_value(text)
    return check_parameters(table, where="-p")


def read_notebook(path: Path) -> bytes:
    """The bytes of a notebook file, checked to be a notebook (JSON with a list of cells)."""
    from ztlab.common.schedule import check_notebook

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(
            f"{path}: no such notebook",
            hint=f"run a notebook file (`ztlab run train.ipynb`), or one of the commands "
            f"{', '.join(SUBCOMMANDS)}",
        ) from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the notebook: {exc.strerror}") from exc
    check_notebook(data, where=str(path))
    return data


def notebook_body(path: Path, data: bytes) -> dict[str, str]:
    """The ``notebook`` field of a request: its file name and base64 content."""
    return {"name": path.name, "content": base64.b64encode(data).decode("ascii")}


def git_commit_of(path: Path) -> str | None:
    """The commit ``HEAD`` of the git work tree holding ``path`` when the file is tracked
    and unchanged there (so the commit holds exactly these bytes); else ``None``."""
    folder = str(path.resolve().parent)

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", folder, *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    name = path.resolve().name
    if git("ls-files", "--error-unmatch", "--", name) is None:
        return None  # not in a work tree, or not tracked (or ignored) there
    status = git("status", "--porcelain", "--", name)
    if status is None or status.strip():
        return None  # changed, staged or in conflict: HEAD does not hold these bytes
    head = git("rev-parse", "HEAD")
    commit = head.strip() if head else ""
    return commit if _COMMIT.match(commit) else None


# -- talking to the hub -----------------------------------------------------------------------


def _run_id(value: str) -> str:
    if not _RUN_ID.match(value):
        raise UsageError(
            f"{value!r} is not a run id", hint="a run id is 12 hex digits (see ztlab run list)"
        )
    return value


def _fetch_bytes(api: HubAPI, path: str) -> bytes:
    """GET ``path`` of the hub's API as raw bytes (an executed notebook written back from
    parsed JSON would not have the digest the run recorded)."""
    return api.fetch(path)


def _write(data: bytes, out: Path) -> None:
    try:
        out.write_bytes(data)
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror}") from exc


# -- showing runs -----------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _when(value: str | None) -> str:
    return (value or "-").replace("T", " ").removesuffix("Z")


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(", ", ": "))


def _trim(text: str, width: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _schedule_of(run: dict[str, Any]) -> str:
    if not run.get("schedule"):
        return "-"
    attempt = run.get("attempt", 1)
    return str(run["schedule"]) + (f" #{attempt}" if attempt and attempt > 1 else "")


def _detail_lines(run: dict[str, Any]) -> list[str]:
    """A run as ``ztlab run show`` prints it."""
    notebook = run["notebook"]
    lines = [
        f"run {run['id']} of {run['owner']}: {run['status']}"
        + (f" ({run['message']})" if run.get("message") else ""),
        f"  notebook    {notebook['name']} sha256:{notebook['sha256']}",
        f"  parameters  {_compact(run.get('parameters') or {})}",
    ]
    if run.get("git_commit"):
        lines.append(f"  git commit  {run['git_commit']}")
    if run.get("schedule"):
        lines.append(
            f"  schedule    {run['schedule']}, attempt {run['attempt']}, "
            f"for {_when(run.get('scheduled_for'))} UTC"
        )
    elif run.get("actor") and run["actor"] != run["owner"]:
        lines.append(f"  started by  {run['actor']}")
    if run.get("gpus"):
        lease = f", lease {run['lease']}" if run.get("lease") else ""
        lines.append(f"  GPUs        {run['gpus']} from pool {run.get('pool') or '-'}{lease}")
    lines.append(
        f"  times (UTC) queued {_when(run.get('created_at'))}, started "
        f"{_when(run.get('started_at'))}, finished {_when(run.get('finished_at'))} "
        f"({_seconds(run.get('duration_seconds'))})"
    )
    lines += _outcome_lines(run)
    return lines


def _outcome_lines(run: dict[str, Any]) -> list[str]:
    lines = []
    if run.get("models"):
        lines.append(f"  models      {', '.join(run['models'])}")
    if run.get("datasets"):
        lines.append("  datasets    " + ", ".join(str(d.get("dataset")) for d in run["datasets"]))
    if run.get("executed_sha256"):
        lines.append(f"  executed    sha256:{run['executed_sha256']}")
    if run.get("provenance_sha256"):
        lines.append(f"  provenance  sha256:{run['provenance_sha256']}")
    if run.get("failed_cell") is not None:
        lines.append(f"  failed cell {run['failed_cell']} (0-based, the parameters cell included)")
    if run.get("traceback"):
        lines.append("  traceback:")
        lines += [f"    {line}" for line in str(run["traceback"]).splitlines()]
    return lines


# -- the group --------------------------------------------------------------------------------


class RunGroup(click.Group):
    """``ztlab run``: a notebook path as the first argument runs it (the hidden ``start``
    command); a command name runs that command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["start", *args]
        return super().parse_args(ctx, args)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The group's options and commands, then the options of ``ztlab run NOTEBOOK``."""
        super().format_options(ctx, formatter)
        start = self.commands.get("start")
        if start is None:
            return
        with click.Context(start, info_name="start", parent=ctx) as start_ctx:
            rows = [
                record
                for param in start.get_params(start_ctx)
                if isinstance(param, click.Option)
                and not param.is_eager
                and (record := param.get_help_record(start_ctx)) is not None
            ]
        with formatter.section("Options of ztlab run NOTEBOOK"):
            formatter.write_dl(rows)


@click.group(
    "run",
    cls=RunGroup,
    subcommand_metavar="NOTEBOOK [-p NAME VALUE]... | COMMAND [ARGS]...",
    short_help="Run a notebook in your sandbox; runs' history; verify provenance.",
)
def run_group() -> None:
    """Run NOTEBOOK with papermill in a sandbox of yours, on the hub, and wait for it.

    The hub runs it under your identity (the policy decides `run_schedule` again), with
    your quotas, your datasets and a hub token for this run only; a run whose every cell
    ran gets signed SLSA provenance. Example:

        ztlab run train.ipynb -p epochs 3 -p lr 0.01 --gpus 1

    The commands look at runs, download their provenance and executed notebook, and
    verify provenance offline.
    """


@run_group.command("start", hidden=True, short_help="Run a notebook and wait for it.")
@click.argument("notebook", type=click.Path(dir_okay=False, path_type=Path))
@PARAMETER_OPTION
@click.option("--pool", default=None, help="GPU pool of the GPUs (when the hub has several).")
@click.option(
    "--gpus", type=click.IntRange(0, 64), default=0, show_default=True, help="GPUs to lease."
)
@click.option(
    "--git-commit",
    default=None,
    metavar="SHA",
    help="The commit the notebook comes from. Default: HEAD when the notebook is tracked and "
    "unchanged in a git work tree.",
)
@click.option("--no-wait", is_flag=True, help="Print the run's id and return at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON at the end.")
@hub_options
@handle_errors
def start_command(
    notebook: Path,
    parameters: tuple[tuple[str, str], ...],
    pool: str | None,
    gpus: int,
    git_commit: str | None,
    no_wait: bool,
    as_json: bool,
    hub_url: str | None,
    token_file: Path | None,
    config_path: Path,
) -> None:
    """Run NOTEBOOK on the hub and wait: status changes on stderr, then a summary."""
    table = parse_parameters(parameters)
    if git_commit is not None:
        git_commit = git_commit.lower()
        if not _COMMIT.match(git_commit):
            raise UsageError(f"--git-commit {git_commit!r} is not a full commit hash (hex)")
    data = read_notebook(notebook)
    commit = git_commit or git_commit_of(notebook)
    api = hub_client(hub_url, token_file, config_path)
    body: dict[str, Any] = {
        "notebook": notebook_body(notebook, data),
        "parameters": table,
        "gpus": gpus,
    }
    if pool:
        body["pool"] = pool
    if commit:
        body["git_commit"] = commit
    run = api.call("POST", "/ztlab/runs", body)
    if no_wait:
        if as_json:
            click.echo(json.dumps(run, indent=2))
        else:
            click.echo(f"run {run['id']} {run['status']}; follow it: ztlab run show {run['id']}")
        return
    run = _wait(api, run)
    if as_json:
        click.echo(json.dumps(run, indent=2))
    else:
        _summary(run)
    if run["status"] != "succeeded":
        sys.exit(1)


def _wait(api: HubAPI, run: dict[str, Any]) -> dict[str, Any]:
    """Poll the run until it is over; one line on stderr per change of status."""
    from ztlab.common.hubapi import HubUnreachable

    began = time.monotonic()
    shown = ""
    failures = 0
    try:
        while True:
            elapsed = time.monotonic() - began
            if run["status"] != shown:
                shown = run["status"]
                note = f": {run['message']}" if run.get("message") else ""
                click.echo(f"[{elapsed:6.1f} s] run {run['id']} {shown}{note}", err=True)
            if shown in FINAL:
                return run
            _sleep(0.5 if elapsed < 10 else 1.0)
            try:
                run = api.call("GET", f"/ztlab/runs/{run['id']}")
                failures = 0
            except HubUnreachable as exc:
                failures += 1  # a hub restarting; the run is interrupted there, and said so
                if failures > 10:
                    raise
                click.echo(f"[{elapsed:6.1f} s] {exc.message}; asking again", err=True)
    except KeyboardInterrupt:
        click.echo(
            f"\nstopped waiting; run {run['id']} goes on (ztlab run show {run['id']}, "
            f"ztlab run cancel {run['id']})",
            err=True,
        )
        sys.exit(130)


def _summary(run: dict[str, Any]) -> None:
    status = run["status"]
    took = _seconds(run.get("duration_seconds"))
    if status == "succeeded":
        click.echo(f"run {run['id']} succeeded in {took}")
    else:
        reason = f": {run['message']}" if run.get("message") else ""
        click.echo(f"run {run['id']} {status} after {took}{reason}")
    notebook = run["notebook"]
    click.echo(f"  notebook    {notebook['name']} sha256:{notebook['sha256']}")
    for line in _outcome_lines(run):
        click.echo(line)
    if status == "succeeded":
        click.echo(
            f"  get them    ztlab run provenance {run['id']} -o provenance.json "
            f"--key-out hub-key.pem; ztlab run notebook {run['id']} -o executed.ipynb"
        )


@run_group.command("list", short_help="Your runs, newest first.")
@click.option("--schedule", default=None, help="Only the runs of this schedule.")
@click.option("--status", type=click.Choice(STATUSES), default=None, help="Only runs in it.")
@click.option("--all", "everyone", is_flag=True, help="Everyone's runs (admins).")
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="At most."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@hub_options
@handle_errors
def list_command(
    schedule: str | None,
    status: str | None,
    everyone: bool,
    limit: int,
    as_json: bool,
    hub_url: str | None,
    token_file: Path | None,
    config_path: Path,
) -> None:
    """Each run: id, status, owner, schedule, start, duration, notebook, message."""
    query: dict[str, str] = {"limit": str(limit)}
    if schedule:
        query["schedule"] = schedule
    if status:
        query["status"] = status
    if everyone:
        query["all"] = "1"
    api = hub_client(hub_url, token_file, config_path)
    runs = api.call("GET", f"/ztlab/runs?{urlencode(query)}")["runs"]
    if as_json:
        click.echo(json.dumps(runs, indent=2))
        return
    if not runs:
        click.echo("no runs")
        return
    rows = [
        (
            run["id"],
            run["status"],
            run["owner"],
            _schedule_of(run),
            _when(run.get("started_at") or run.get("created_at"))[:16],
            _seconds(run.get("duration_seconds")),
            run["notebook"]["name"],
            _trim(run.get("message") or "", 48),
        )
        for run in runs
    ]
    header = ("ID", "STATUS", "OWNER", "SCHEDULE", "STARTED (UTC)", "TOOK", "NOTEBOOK", "MESSAGE")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, str(row[-1])]).rstrip())


@run_group.command("show", short_help="One run: status, failing cell, digests, models.")
@click.argument("run_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@hub_options
@handle_errors
def show_command(
    run_id: str, as_json: bool, hub_url: str | None, token_file: Path | None, config_path: Path
) -> None:
    """Run ID in full: its notebook and parameters, times, what failed, what it made."""
    run = hub_client(hub_url, token_file, config_path).call("GET", f"/ztlab/runs/{_run_id(run_id)}")
    if as_json:
        click.echo(json.dumps(run, indent=2))
        return
    click.echo("\n".join(_detail_lines(run)))


@run_group.command("cancel", short_help="Cancel a queued run or stop a running one.")
@click.argument("run_id", metavar="ID")
@click.option("--reason", default="", help="Why (kept in the audit log).")
@hub_options
@handle_errors
def cancel_command(
    run_id: str, reason: str, hub_url: str | None, token_file: Path | None, config_path: Path
) -> None:
    """Cancel run ID (yours; admins: anyone's). A running run is stopped: its sandbox is
    ended and the models it registered are withdrawn."""
    run = hub_client(hub_url, token_file, config_path).call(
        "POST", f"/ztlab/runs/{_run_id(run_id)}/cancel", {"reason": reason}
    )
    if run["status"] == "cancelled":
        click.echo(f"run {run['id']} cancelled")
    else:
        click.echo(f"run {run['id']} was {run['status']}; it is being stopped (ends cancelled)")


@run_group.command("provenance", short_help="Download a run's signed provenance.")
@click.argument("run_id", metavar="ID")
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the envelope here (default: standard output).",
)
@click.option(
    "--key-out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the hub's provenance signing key (public, PEM) here.",
)
@hub_options
@handle_errors
def provenance_command(
    run_id: str,
    out: Path | None,
    key_out: Path | None,
    hub_url: str | None,
    token_file: Path | None,
    config_path: Path,
) -> None:
    """The DSSE envelope of run ID's SLSA provenance, byte for byte as the hub stored it
    (its SHA-256 is the run's `provenance_sha256` and in the audit record run.provenance).
    Check it with `ztlab run verify`."""
    api = hub_client(hub_url, token_file, config_path)
    data = _fetch_bytes(api, f"/ztlab/runs/{_run_id(run_id)}/provenance")
    digest = hashlib.sha256(data).hexdigest()
    if out is None:
        click.echo(data.decode("utf-8"), nl=False)
    else:
        _write(data, out)
        click.echo(f"wrote {out} (sha256:{digest})", err=True)
    if key_out is not None:
        trust = api.call("GET", "/ztlab/provenance/trust")
        _write(str(trust["public_key"]).encode("ascii"), key_out)
        click.echo(f"wrote {key_out} (key {trust['keyid']})", err=True)


@run_group.command("notebook", short_help="Download a run's executed notebook.")
@click.argument("run_id", metavar="ID")
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write it here (default: standard output).",
)
@hub_options
@handle_errors
def notebook_command(
    run_id: str, out: Path | None, hub_url: str | None, token_file: Path | None, config_path: Path
) -> None:
    """The executed notebook run ID left (its outputs; a failed run's up to the failing
    cell), byte for byte: its SHA-256 is the provenance's executed.ipynb subject."""
    api = hub_client(hub_url, token_file, config_path)
    data = _fetch_bytes(api, f"/ztlab/runs/{_run_id(run_id)}/notebook")
    if out is None:
        click.echo(data.decode("utf-8"), nl=False)
        return
    _write(data, out)
    click.echo(f"wrote {out} (sha256:{hashlib.sha256(data).hexdigest()})", err=True)


# -- verification, offline --------------------------------------------------------------------


def parse_dataset_option(text: str) -> tuple[str, dict[str, str]]:
    """``NAME@V=ALGO:HEX`` as the provenance names it: ``("dataset:NAME@V", {ALGO: HEX})``."""
    match = _DATASET.match(text)
    if not match:
        raise UsageError(
            f"--dataset {text!r} is not NAME@VERSION=ALGORITHM:HEX",
            hint="e.g. --dataset mnist@3=blake3:<the manifest's root> "
            "(ztlab data show mnist@3 prints it)",
        )
    ref, algorithm, digest = match.groups()
    return f"dataset:{ref}", {algorithm: digest}


@run_group.command("verify", short_help="Verify a run's signed provenance offline.")
@click.argument(
    "envelope_path", metavar="ENVELOPE", type=click.Path(dir_okay=False, path_type=Path)
)
@click.option(
    "--key",
    "key_paths",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Trusted public key (PEM), e.g. from `ztlab run provenance --key-out`; repeat "
    "for several.",
)
@click.option(
    "--notebook",
    "notebook_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The notebook you hold: it must be the one the run executed.",
)
@click.option(
    "--executed",
    "executed_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="An executed notebook (`ztlab run notebook`): it must be the run's output.",
)
@PARAMETER_OPTION
@click.option(
    "--dataset",
    "datasets",
    multiple=True,
    metavar="NAME@V=ALGO:HEX",
    help="A dataset version and its manifest root digest; with any, the run must have "
    "read exactly those given.",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was verified as JSON.")
@handle_errors
def verify_command(
    envelope_path: Path,
    key_paths: tuple[Path, ...],
    notebook_path: Path | None,
    executed_path: Path | None,
    parameters: tuple[tuple[str, str], ...],
    datasets: tuple[str, ...],
    as_json: bool,
) -> None:
    """Check ENVELOPE (from `ztlab run provenance`) without the hub: a trusted key's
    signature, SLSA provenance v1 of a notebook run, every field; then that what you give
    is what the run used. With -p, the run's whole parameter set must be the one given.
    Exit 1 naming what does not match."""
    from ztlab.common.attest.dsse import Envelope
    from ztlab.common.attest.provenance import verify_run_provenance
    from ztlab.common.errors import VerificationError
    from ztlab.common.keys import load_public_keys

    trusted = load_public_keys(list(key_paths))
    wanted_parameters = parse_parameters(parameters) if parameters else None
    wanted_datasets = dict(parse_dataset_option(text) for text in datasets) if datasets else None
    notebook = _read_file(notebook_path, "notebook") if notebook_path else None
    executed = _read_file(executed_path, "executed notebook") if executed_path else None
    text = _read_file(envelope_path, "provenance envelope")
    try:
        envelope = Envelope.from_json(text, source=str(envelope_path))
        verified = verify_run_provenance(
            envelope,
            trusted,
            notebook=notebook,
            parameters=wanted_parameters,
            datasets=wanted_datasets,
        )
        if executed is not None:
            digest = hashlib.sha256(executed).hexdigest()
            named = [s for s in verified.subjects if s.name == "executed.ipynb"]
            if not named or named[0].digest.get("sha256") != digest:
                raise VerificationError(
                    f"{executed_path} is not the executed notebook of run "
                    f"{verified.provenance.run_id} (its SHA-256 differs from the provenance's)"
                )
    except VerificationError as exc:
        click.echo(f"FAIL: {envelope_path}: {exc.message}", err=True)
        sys.exit(1)
    checked = [
        what
        for what, given in (
            ("notebook", notebook),
            ("executed", executed),
            ("parameters", wanted_parameters),
            ("datasets", wanted_datasets),
        )
        if given is not None
    ]
    _print_verified(verified, checked, as_json)


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the {what} {path}: {exc.strerror}") from exc


def _print_verified(verified: Any, checked: list[str], as_json: bool) -> None:
    run = verified.provenance
    notebook = run.notebook
    subjects = {s.name: dict(s.digest) for s in verified.subjects}
    datasets = {d.name: dict(d.digest) for d in run.datasets}
    if as_json:
        click.echo(
            json.dumps(
                {
                    "verified": True,
                    "checked": checked,
                    "keyid": verified.keyid,
                    "run": run.run_id,
                    "owner": run.owner,
                    "notebook": {"name": notebook.name, "digest": dict(notebook.digest)},
                    "git_commit": run.git_commit,
                    "parameters": dict(run.parameters),
                    "schedule": run.schedule,
                    "pool": run.pool,
                    "gpus": run.gpus,
                    "datasets": datasets,
                    "environment": run.environment.to_json() if run.environment else None,
                    "builder": run.builder_id,
                    "started_on": run.started_on,
                    "finished_on": run.finished_on,
                    "subjects": subjects,
                },
                indent=2,
            )
        )
        return

    def digest(value: dict[str, str]) -> str:
        return ", ".join(f"{algorithm}:{hex_}" for algorithm, hex_ in value.items())

    def mark(what: str) -> str:
        return " (checked)" if what in checked else ""

    lines = [
        f"verified: run {run.run_id} of {run.owner}, notebook {notebook.name} "
        f"sha256:{notebook.digest.get('sha256')}, signed by {verified.keyid}",
        f"  notebook    {notebook.name} {digest(dict(notebook.digest))}{mark('notebook')}",
    ]
    if run.git_commit:
        lines.append(f"  git commit  {run.git_commit}")
    lines.append(f"  parameters  {_compact(dict(run.parameters))}{mark('parameters')}")
    used = ", ".join(f"{n.removeprefix('dataset:')} {digest(d)}" for n, d in datasets.items())
    lines.append(f"  datasets    {used or 'none'}{mark('datasets')}")
    if run.environment is not None:
        lines.append(
            f"  environment {run.environment.name.removeprefix('environment:')} "
            f"{digest(dict(run.environment.digest))}"
        )
    if run.schedule:
        lines.append(f"  schedule    {run.schedule}")
    if run.gpus:
        lines.append(f"  GPUs        {run.gpus} from pool {run.pool or '-'}")
    lines.append(f"  ran         {run.started_on} to {run.finished_on} on {run.builder_id}")
    lines.append(
        "  subjects    "
        + "; ".join(f"{name} {digest(d)}" for name, d in subjects.items())
        + mark("executed")
    )
    click.echo("\n".join(lines))
