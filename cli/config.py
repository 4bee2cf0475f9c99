"""``ztlab config``: check, show and describe the ``ztlab.toml`` configuration file.

The file is FILE when given, else ``$ZTLAB_CONFIG``, else ``/etc/ztlab/ztlab.toml``.
An invalid file prints ``error: ...`` on stderr and exits 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ztlab.cli._errors import handle_errors
from ztlab.common.config import ZtlabConfig, dump_json, dump_toml, load_config
from ztlab.common.errors import ConfigError, SecretError

#: used when neither FILE nor $ZTLAB_CONFIG is given
DEFAULT_CONFIG_PATH = "/etc/ztlab/ztlab.toml"
CONFIG_ENV = "ZTLAB_CONFIG"


def config_path(file: Path | None) -> Path:
    """The configuration file to use: FILE, else ``$ZTLAB_CONFIG``, else the default."""
    if file is not None:
        return file
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


def _load(file: Path | None, path: Path) -> ZtlabConfig:
    """Load ``path``; when it was found by default and is missing, say how to choose one."""
    try:
        return load_config(path)
    except ConfigError as exc:
        if file is None and exc.hint is None and not path.exists():
            hint = f"pass FILE, or set ${CONFIG_ENV} (ztlab.example.toml is a start)"
            raise ConfigError(exc.message, hint=hint) from exc
        raise


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def summary(config: ZtlabConfig) -> str:
    """``5 roles, 1 GPU pool, 2 group mappings, 2 secrets referenced``."""
    return ", ".join(
        [
            _plural(len(config.roles), "role", "roles"),
            _plural(len(config.gpu.pools), "GPU pool", "GPU pools"),
            _plural(len(config.groups), "group mapping", "group mappings"),
            _plural(len(config.secret_refs()), "secret referenced", "secrets referenced"),
        ]
    )


_FILE_ARGUMENT = click.argument(
    "file", required=False, type=click.Path(path_type=Path, dir_okay=True)
)


@click.group("config")
def config_group() -> None:
    """Check, show and describe the ztlab.toml configuration file.

    FILE defaults to $ZTLAB_CONFIG, else /etc/ztlab/ztlab.toml.
    """


@config_group.command("check", short_help="Validate the configuration file.")
@_FILE_ARGUMENT
@click.option(
    "--resolve-secrets",
    is_flag=True,
    help="Also check that every secret reference resolves (values are never printed).",
)
@handle_errors
def check(file: Path | None, resolve_secrets: bool) -> None:
    """Validate the configuration file.

    Prints a summary and exits 0 when it is valid; prints every problem, each with its
    key path, and exits 2 when it is not. FILE defaults to $ZTLAB_CONFIG, else
    /etc/ztlab/ztlab.toml.
    """
    path = config_path(file)
    config = _load(file, path)
    text = summary(config)
    if resolve_secrets:
        try:
            config.resolve_secrets()
        except SecretError as exc:
            raise SecretError(f"{path}: {exc.message}", hint=exc.hint) from exc
        text += ", all resolved"
    click.echo(f"{path}: OK ({text})")


@config_group.command("show", short_help="Print the effective configuration.")
@_FILE_ARGUMENT
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["toml", "json"]),
    default="toml",
    show_default=True,
    help="Output format.",
)
@handle_errors
def show(file: Path | None, output_format: str) -> None:
    """Print the effective configuration.

    Defaults are filled in (the audit log and key paths included); secrets appear as
    their references, { env = "NAME" } or { file = "/path" }, never as values. FILE
    defaults to $ZTLAB_CONFIG, else /etc/ztlab/ztlab.toml.
    """
    path = config_path(file)
    config = _load(file, path).effective()
    if output_format == "json":
        click.echo(dump_json(config), nl=False)
    else:
        header = (
            f"Effective configuration from {path}: defaults filled in,\n"
            "secrets shown as references only."
        )
        click.echo(dump_toml(config, header=header), nl=False)


@config_group.command("schema", short_help="Print the JSON Schema of the file.")
def schema() -> None:
    """Print the JSON Schema of the configuration file."""
    click.echo(json.dumps(ZtlabConfig.model_json_schema(), indent=2))
