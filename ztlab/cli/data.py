"""``ztlab data``: fingerprint a dataset into a manifest, and verify a dataset against one.

Exit statuses: 0 the data matches (or the manifest was written), 1 the data differs (every
modified, missing, extra or refused path is listed), 2 bad input (an unreadable or malformed
manifest, a link or device in the dataset when fingerprinting, a bad argument).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from ztlab.cli._errors import handle_errors
from ztlab.common.manifest import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    ProgressCallback,
    VerifyResult,
    fingerprint,
    load_manifest,
    verify,
)
from ztlab.common.manifest.format import check_algorithm

DIR_ARGUMENT = click.argument(
    "directory",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)
SYMLINKS_OPTION = click.option(
    "--allow-symlinks",
    is_flag=True,
    help="Hash symbolic links that resolve to a regular file inside DIRECTORY as that file.",
)
PROGRESS_OPTION = click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar on stderr. Default: only when stderr is a terminal.",
)
WORKERS_OPTION = click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Threads hashing small files. Default: the calling thread (faster on few cores).",
)


@click.group("data", short_help="Fingerprint and verify datasets (manifests).")
def data_group() -> None:
    """Fingerprint a dataset into a manifest, and verify a dataset against one."""


@data_group.command("fingerprint")
@DIR_ARGUMENT
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the manifest (JSON, format ztlab-manifest/1).",
)
@click.option(
    "--algorithm",
    type=click.Choice(ALGORITHMS),
    default=DEFAULT_ALGORITHM,
    show_default=True,
    help="Digest of each file and of the root.",
)
@SYMLINKS_OPTION
@PROGRESS_OPTION
@WORKERS_OPTION
@handle_errors
def fingerprint_command(
    directory: Path,
    out: Path,
    algorithm: str,
    allow_symlinks: bool,
    progress: bool | None,
    workers: int | None,
) -> None:
    """Hash every regular file under DIRECTORY and write a manifest."""
    with _progress_bar(progress, "fingerprint") as callback:
        manifest = fingerprint(
            directory,
            algorithm=check_algorithm(algorithm),
            allow_symlinks=allow_symlinks,
            exclude=_inside(out, directory),
            workers=workers,
            progress=callback,
        )
    manifest.write(out)
    click.echo(
        f"wrote {out}: {len(manifest.entries)} files, {manifest.total_size:,} bytes, "
        f"{manifest.algorithm} root {manifest.root}"
    )


@data_group.command("verify")
@DIR_ARGUMENT
@click.option(
    "--manifest",
    "manifest_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The manifest written by `ztlab data fingerprint`.",
)
@SYMLINKS_OPTION
@PROGRESS_OPTION
@WORKERS_OPTION
@handle_errors
def verify_command(
    directory: Path,
    manifest_path: Path,
    allow_symlinks: bool,
    progress: bool | None,
    workers: int | None,
) -> None:
    """Check DIRECTORY against a manifest; exit 1 listing every difference."""
    manifest = load_manifest(manifest_path)
    with _progress_bar(progress, "verify") as callback:
        result = verify(
            directory,
            manifest,
            allow_symlinks=allow_symlinks,
            exclude=_inside(manifest_path, directory),
            workers=workers,
            progress=callback,
        )
    if result.ok:
        click.echo(
            f"OK: {result.checked} files match the manifest ({result.algorithm} root {result.root})"
        )
        return
    _print_differences(result)
    sys.exit(1)


def _print_differences(result: VerifyResult) -> None:
    algo = result.algorithm
    for item in result.modified:
        click.echo(f"modified: {item.path}")
        click.echo(f"  expected {algo}:{item.expected_digest} ({item.expected_size:,} bytes)")
        click.echo(f"  actual   {algo}:{item.actual_digest} ({item.actual_size:,} bytes)")
    for entry in result.missing:
        click.echo(f"missing: {entry.path}")
        click.echo(f"  expected {algo}:{entry.digest} ({entry.size:,} bytes)")
    for entry in result.extra:
        click.echo(f"extra: {entry.path}")
        click.echo(f"  actual   {algo}:{entry.digest} ({entry.size:,} bytes)")
    for unsafe in result.unsafe:
        click.echo(f"refused: {unsafe.path}: {unsafe.reason}")
        if unsafe.expected is not None:
            expected = unsafe.expected
            click.echo(f"  expected {algo}:{expected.digest} ({expected.size:,} bytes)")
    click.echo(
        f"FAILED: {result.problems} difference(s): {len(result.modified)} modified, "
        f"{len(result.missing)} missing, {len(result.extra)} extra, "
        f"{len(result.unsafe)} refused ({result.checked} files hashed)"
    )


def _inside(path: Path, directory: Path) -> list[str]:
    """``path`` relative to ``directory`` (as a manifest path) when it lies inside it."""
    real_dir = os.path.realpath(directory)
    real = os.path.realpath(path)
    if real.startswith(real_dir.rstrip("/") + "/"):
        return [os.path.relpath(real, real_dir).replace(os.sep, "/")]
    return []


@contextmanager
def _progress_bar(enabled: bool | None, label: str) -> Iterator[ProgressCallback | None]:
    """A rich progress bar on stderr, as a progress callback; ``None`` when disabled."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(file=sys.stderr)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=not console.is_terminal,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
