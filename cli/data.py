"""``ztlab data``: fingerprint a dataset into a manifest, and verify a dataset against one.

Exit statuses: 0 the data matches (or the manifest was written), 1 the data differs (every
modified, missing, extra or refused path is listed), 2 bad input (an unreadable or malformed
manifest, a link or device in the dataset when fingerprinting, a bad argument).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ztlab.cli._errors import handle_errors
from ztlab.cli.hub import CONFIG_OPTION
from ztlab.common.errors import UsageError

if TYPE_CHECKING:
    from ztlab.common.hubapi import HubAPI
    from ztlab.common.manifest import ProgressCallback, VerifyResult

# The manifest code (and BLAKE3, cryptography) is imported by the commands that run, not to
# show `--help`: a command line that starts fast is part of hashing fast. These are
# ztlab.common.manifest's ALGORITHMS and DEFAULT_ALGORITHM (a test keeps them equal).
ALGORITHMS = ("blake3", "sha256")
DEFAULT_ALGORITHM = "blake3"

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
    from ztlab.common.manifest import fingerprint
    from ztlab.common.manifest.format import check_algorithm

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
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The manifest written by `ztlab data fingerprint`.",
)
@click.option(
    "--signed",
    "signed_path",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A signed manifest (DSSE envelope from `ztlab data show --out` or `data sign`); "
    "its signature is checked with --public-key first.",
)
@click.option(
    "--public-key",
    "public_keys",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Trusted public key (PEM) for --signed; repeat for several.",
)
@click.option("--ref", default=None, help="With --signed: the dataset version it must be for.")
@SYMLINKS_OPTION
@PROGRESS_OPTION
@WORKERS_OPTION
@handle_errors
def verify_command(
    directory: Path,
    manifest_path: Path | None,
    signed_path: Path | None,
    public_keys: tuple[Path, ...],
    ref: str | None,
    allow_symlinks: bool,
    progress: bool | None,
    workers: int | None,
) -> None:
    """Check DIRECTORY against a manifest (plain or signed); exit 1 listing every difference."""
    from ztlab.common.manifest import load_manifest, verify

    if (manifest_path is None) == (signed_path is None):
        raise UsageError("give exactly one of --manifest and --signed")
    if signed_path is not None:
        from ztlab.common.attest import (
            Envelope,
            load_public_keys,
            parse_dataset_ref,
            verify_signed_manifest,
        )

        if not public_keys:
            raise UsageError("--signed needs --public-key (the key that must have signed it)")
        if ref is not None:
            parse_dataset_ref(ref)
        try:
            text = signed_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the signed manifest {signed_path}: {exc}") from exc
        signed = verify_signed_manifest(
            Envelope.from_json(text, source=str(signed_path)),
            load_public_keys(list(public_keys)),
            expected_ref=ref,
        )
        click.echo(
            f"signature OK: {signed.ref}, signed by key {signed.keyid[:16]}… "
            f"(registered by {signed.registered_by} at {signed.registered_at})"
        )
        manifest = signed.manifest
        exclude = _inside(signed_path, directory)
    else:
        assert manifest_path is not None
        manifest = load_manifest(manifest_path)
        exclude = _inside(manifest_path, directory)
    with _progress_bar(progress, "verify") as callback:
        result = verify(
            directory,
            manifest,
            allow_symlinks=allow_symlinks,
            exclude=exclude,
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


# -- signed manifests and the registry --------------------------------------------------

HUB_OPTIONS = [
    click.option(
        "--hub-url",
        envvar="JUPYTERHUB_API_URL",
        default=None,
        help="The hub's API URL (…/hub/api). Default: $JUPYTERHUB_API_URL, else the "
        "configuration's public URL.",
    ),
    click.option(
        "--token-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="File holding a hub API token. Default: $ZTLAB_TOKEN or $JUPYTERHUB_API_TOKEN.",
    ),
]


F = TypeVar("F", bound=Callable[..., Any])


def hub_options(func: F) -> F:
    """--hub-url, --token-file and --config, for commands that call the hub's API."""
    for option in reversed(HUB_OPTIONS):
        func = option(func)
    return CONFIG_OPTION(func)


def hub_client(hub_url: str | None, token_file: Path | None, config_path: Path) -> HubAPI:
    """The hub's API with the user's token (the configuration is read only without --hub-url)."""
    from ztlab.common.hubapi import HubAPI

    if token_file is not None:
        token = token_file.read_text(encoding="utf-8").strip()
    else:
        token = os.environ.get("ZTLAB_TOKEN") or os.environ.get("JUPYTERHUB_API_TOKEN") or ""
    if not token:
        raise UsageError(
            "no hub API token",
            hint="make one on the hub's Token page and pass --token-file, or set ZTLAB_TOKEN",
        )
    if token_file is None and hub_url and hub_url == os.environ.get("JUPYTERHUB_API_URL"):
        return HubAPI.from_environment()  # in a user's server: its token and TLS settings
    if not hub_url:
        from ztlab.common.config import load_config

        hub_url = load_config(config_path).public_url("/hub/api")
    return HubAPI(hub_url, token)


def _summary_lines(row: dict[str, Any]) -> list[str]:
    return [
        f"{row['ref']}",
        f"  root       {row['algorithm']}:{row['root']}",
        f"  files      {row['files']:,} ({row['bytes']:,} bytes)",
        f"  source     {row['source']}",
        f"  registered {row['registered_at']} by {row['registered_by']}",
        f"  signed by  key {row['keyid'][:16]}…",
    ]


@data_group.command("register", short_help="Register NAME@VERSION (control plane signs it).")
@click.argument("ref")
@click.argument("path")
@hub_options
@handle_errors
def register_command(
    ref: str, path: str, hub_url: str | None, token_file: Path | None, config_path: Path
) -> None:
    """Register dataset version REF (NAME@VERSION) from PATH, a directory on the hub's machine.

    The control plane checks that you may (policy `register_dataset`), that PATH lies in a
    storage root and that the version is new, fingerprints the files itself, signs the
    manifest and records the registration in the audit log. Versions are immutable.
    """
    from ztlab.common.attest import parse_dataset_ref

    parse_dataset_ref(ref)
    row = hub_client(hub_url, token_file, config_path).call(
        "POST", "/ztlab/datasets", {"ref": ref, "path": path}
    )
    click.echo("registered " + "\n".join(_summary_lines(row)))


@data_group.command("list", short_help="List the dataset versions you may read.")
@hub_options
@handle_errors
def list_command(hub_url: str | None, token_file: Path | None, config_path: Path) -> None:
    """List the registered dataset versions the policy lets you read."""
    rows = hub_client(hub_url, token_file, config_path).call("GET", "/ztlab/datasets")["datasets"]
    if not rows:
        click.echo("no dataset versions you may read")
        return
    width = max(len(r["ref"]) for r in rows)
    for row in rows:
        click.echo(
            f"{row['ref']:<{width}}  {row['files']:>8,} files  {row['bytes']:>16,} bytes  "
            f"{row['algorithm']}:{row['root'][:16]}…  {row['registered_at']}  "
            f"{row['registered_by']}"
        )


@data_group.command("show", short_help="Show a version; verify its signed manifest.")
@click.argument("ref")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the signed manifest (DSSE envelope JSON) to this file.",
)
@hub_options
@handle_errors
def show_command(
    ref: str,
    out: Path | None,
    hub_url: str | None,
    token_file: Path | None,
    config_path: Path,
) -> None:
    """Show dataset version REF and check its signature with the hub's public key."""
    from ztlab.common.attest import (
        Envelope,
        parse_dataset_ref,
        public_key_from_pem,
        verify_signed_manifest,
    )
    from ztlab.common.keys import key_id

    parse_dataset_ref(ref)
    hub = hub_client(hub_url, token_file, config_path)
    row = hub.call("GET", f"/ztlab/datasets/{ref}")
    envelope = Envelope.from_dict(row["envelope"], source=f"the hub's answer for {ref}")
    keys = [
        public_key_from_pem(key["pem"], source="the hub's keys")
        for key in hub.call("GET", "/ztlab/keys").get("keys", [])
    ]
    signed = verify_signed_manifest(envelope, {key_id(k): k for k in keys}, expected_ref=ref)
    click.echo("\n".join(_summary_lines(row)))
    click.echo(f"  signature  OK ({len(signed.manifest.entries):,} entries)")
    if out is not None:
        out.write_text(envelope.to_json(), encoding="utf-8")
        click.echo(f"wrote {out}")


@data_group.command("sign", short_help="Sign a manifest offline as NAME@VERSION.")
@click.argument(
    "manifest_path", metavar="MANIFEST", type=click.Path(dir_okay=False, path_type=Path)
)
@click.option("--ref", required=True, help="The dataset version, NAME@VERSION.")
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM private key (ECDSA P-256/P-384 or Ed25519), mode 0600.",
)
@click.option("--source", required=True, help="The directory the manifest describes.")
@click.option("--by", "registered_by", default=None, help="Who registers it (default: $USER).")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the signed manifest (DSSE envelope).",
)
@handle_errors
def sign_command(
    manifest_path: Path,
    ref: str,
    key_path: Path,
    source: str,
    registered_by: str | None,
    out: Path,
) -> None:
    """Sign MANIFEST (from `ztlab data fingerprint`) with a key, without a control plane.

    For offline and demonstration use (a local registry); in a deployment the control
    plane fingerprints and signs at registration.
    """
    from ztlab.common.attest import sign_manifest
    from ztlab.common.manifest import load_manifest
    from ztlab.hub.keys import load_private_key

    manifest = load_manifest(manifest_path)
    key = load_private_key(key_path, accept=("p256", "p384", "ed25519"), error=UsageError)
    envelope = sign_manifest(
        manifest,
        ref,
        key,
        registered_by=registered_by or os.environ.get("USER", "unknown"),
        source=os.path.realpath(source),
    )
    out.write_text(envelope.to_json(), encoding="utf-8")
    click.echo(f"wrote {out}: {ref}, {manifest.algorithm} root {manifest.root}")
