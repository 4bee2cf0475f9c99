"""``ztlab audit``: append to, verify, read and export the tamper-evident audit log."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import click

from ztlab.cli._errors import handle_errors
from ztlab.common.auditlog.checkpoint import verifier_key, verify_checkpoint_note
from ztlab.common.auditlog.paths import checkpoints_path, public_key_path
from ztlab.common.auditlog.record import parse_record
from ztlab.common.auditlog.verify import (
    AuditVerificationError,
    VerifyReport,
    read_checkpoint_notes,
    verify_log,
)
from ztlab.common.errors import UsageError
from ztlab.common.keys import load_ed25519_public_key

LOG_OPTION = click.option(
    "--log",
    "log_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The audit log's records file (JSON Lines).",
)
PUBLIC_KEY_OPTION = click.option(
    "--public-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Pinned Ed25519 public key (PEM). Default: the key exported next to the log (<log>.pub).",
)


@click.group("audit")
def audit_group() -> None:
    """Append to, verify, read and export the tamper-evident audit log."""


@audit_group.command("append")
@LOG_OPTION
@click.option("--actor", required=True, help="Who did it (user or service name).")
@click.option("--action", required=True, help="What happened, a dotted name: break_glass.access.")
@click.option("--detail", default=None, help="Details as a JSON object.")
@click.option(
    "--key",
    "key_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Ed25519 signing key (PEM, mode 0600). Default: <log>.key, created if missing.",
)
@click.option("--origin", default=None, help="Checkpoint origin (the log's name).")
@handle_errors
def append_command(
    log_path: Path,
    actor: str,
    action: str,
    detail: str | None,
    key_path: Path | None,
    origin: str | None,
) -> None:
    """Append one admin-recorded event (e.g. break-glass access), durably, and sign it."""
    from ztlab.hub.audit import DEFAULT_ORIGIN, AuditLog

    parsed: dict[str, Any] = _json_object(detail, "--detail") if detail is not None else {}
    created = not log_path.exists()
    with AuditLog.open(log_path, key_path=key_path, origin=origin or DEFAULT_ORIGIN) as log:
        receipt = log.append(actor, action, parsed)
    if created:
        click.echo(f"created a new audit log at {log_path}", err=True)
    click.echo(f"appended record {receipt.seq} (leaf {receipt.leaf_hash[:16]}…) at {receipt.ts}")


@audit_group.command("verify")
@LOG_OPTION
@PUBLIC_KEY_OPTION
@click.option(
    "--origin", default=None, help="Pin the log's origin (default: as in its checkpoints)."
)
@click.option(
    "--trusted-checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A checkpoint note kept earlier (ztlab audit checkpoint): the log must still contain it.",
)
@handle_errors
def verify_command(
    log_path: Path, public_key: Path | None, origin: str | None, trusted_checkpoint: Path | None
) -> None:
    """Verify records, hash chain and signed checkpoints (exit 1 names the first bad record)."""
    report = _verify(log_path, public_key, origin, trusted_checkpoint)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(report.summary())


@audit_group.command("checkpoint")
@LOG_OPTION
@PUBLIC_KEY_OPTION
@handle_errors
def checkpoint_command(log_path: Path, public_key: Path | None) -> None:
    """Print the latest signed checkpoint (after verifying the log), to keep as a witness."""
    report = _verify(log_path, public_key, None, None)
    notes, _ = read_checkpoint_notes(checkpoints_path(log_path))
    if not notes:
        raise UsageError(f"{log_path}: the log has no signed checkpoint yet")
    click.echo(notes[-1], nl=False)
    click.echo(f"(covers {report.covered} of {report.records} records)", err=True)


@audit_group.command("tail")
@LOG_OPTION
@click.option("-n", "--lines", "count", default=10, show_default=True, help="Records to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing records as they are appended.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON lines.")
@handle_errors
def tail_command(log_path: Path, count: int, follow: bool, as_json: bool) -> None:
    """Show the last records (not verified: run `ztlab audit verify` for that)."""
    if count < 0:
        raise UsageError(f"--lines must be >= 0, got {count}")
    try:
        handle = log_path.open("rb")
    except OSError as exc:
        raise UsageError(f"{log_path}: cannot open the audit log: {exc.strerror}") from exc
    with handle:
        lines = handle.readlines()
        complete = [line for line in lines if line.endswith(b"\n")]
        for line in complete[len(complete) - count :] if count else []:
            _print_record(line, as_json, sys.stdout)
        if not follow:
            return
        handle.seek(sum(len(line) for line in complete))
        pending = b""
        while True:  # until interrupted
            chunk = handle.readline()
            if not chunk:
                time.sleep(0.5)
                continue
            pending += chunk
            if pending.endswith(b"\n"):
                _print_record(pending, as_json, sys.stdout)
                pending = b""


@audit_group.command("export")
@LOG_OPTION
@PUBLIC_KEY_OPTION
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl"]),
    default="jsonl",
    show_default=True,
    help="Output format.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write here instead of standard output.",
)
@handle_errors
def export_command(log_path: Path, public_key: Path | None, fmt: str, out: Path | None) -> None:
    """Verify the log, then export its complete records."""
    report = _verify(log_path, public_key, None, None)
    target: TextIO = out.open("w", encoding="ascii") if out else sys.stdout
    try:
        with log_path.open("rb") as handle:
            for index, line in enumerate(handle):
                if index >= report.records:
                    break
                target.write(json.dumps(parse_record(line[:-1]).to_json()) + "\n")
    finally:
        if out:
            target.close()
    if out:
        click.echo(f"exported {report.records} verified records to {out}", err=True)


@audit_group.command("public-key")
@LOG_OPTION
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pem", "note"]),
    default="pem",
    show_default=True,
    help="PEM, or the C2SP signed-note verifier key string.",
)
@click.option("--origin", default=None, help="Origin (key name) for the note format.")
@handle_errors
def public_key_command(log_path: Path, fmt: str, origin: str | None) -> None:
    """Print the log's exported public key, to pin it elsewhere."""
    key_file = public_key_path(log_path)
    key = load_ed25519_public_key(key_file)
    if fmt == "pem":
        click.echo(key_file.read_text(), nl=False)
        return
    if origin is None:
        notes, _ = read_checkpoint_notes(checkpoints_path(log_path))
        origin = notes[0].split("\n", 1)[0] if notes else "ztlab.local/audit"
    click.echo(verifier_key(origin, key))


def _verify(
    log_path: Path, public_key: Path | None, origin: str | None, trusted: Path | None
) -> VerifyReport:
    key = load_ed25519_public_key(public_key or public_key_path(log_path))
    witness = None
    if trusted is not None:
        note = trusted.read_text()
        witness_origin = origin or note.split("\n", 1)[0]
        witness = verify_checkpoint_note(note, origin=witness_origin, key=key)
    try:
        return verify_log(log_path, public_key=key, origin=origin, trusted=witness)
    except AuditVerificationError as exc:
        click.echo(f"FAIL: {log_path}: {exc.message}", err=True)
        sys.exit(1)


def _json_object(text: str, option: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{option}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from exc
    if not isinstance(value, dict):
        raise UsageError(f"{option}: expected a JSON object, got {type(value).__name__}")
    return value


def _print_record(line: bytes, as_json: bool, out: TextIO) -> None:
    if as_json:
        out.write(line.decode("ascii", errors="replace"))
        return
    try:
        record = parse_record(line.rstrip(b"\n"))
    except ValueError as exc:
        out.write(f"(malformed record: {exc})\n")
        return
    detail = json.dumps(dict(record.detail), sort_keys=True)
    out.write(f"{record.seq:>8} {record.ts} {record.actor} {record.action} {detail}\n")
    out.flush()
