"""``ztlab env``: kernel environments, defined and built by the control plane.

Exit statuses: 0 done (or the build verifies), 1 a build failed or a build differs from its
lock, 2 bad input or a refusal (not allowed, unknown environment).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from ztlab.cli._errors import handle_errors
from ztlab.cli.data import hub_client, hub_options


@click.group("env", short_help="Define, build, verify and retire kernel environments.")
def env_group() -> None:
    """Kernel environments: each is built by the control plane through the package proxy,
    locked (every file hashed, one digest for the whole) and offered as a kernel to the
    users the policy lets use it (`use_environment`)."""


def _line(env: dict[str, Any]) -> str:
    current = env.get("current") or {}
    state = "retired" if env["retired"] else current.get("status", "not built")
    digest = (current.get("digest") or "")[:23]
    build = f"build {current['build']}" if current else ""
    return f"{env['name']:<16} {state:<10} {build:<9} {digest}"


@env_group.command("list", short_help="List the environments you may use or manage.")
@hub_options
@handle_errors
def list_command(hub_url: str | None, token_file: Path | None, config_path: Path) -> None:
    """List the environments you may use or manage, with their current build."""
    rows = hub_client(hub_url, token_file, config_path).call("GET", "/ztlab/environments")
    for env in rows["environments"]:
        click.echo(_line(env))


@env_group.command("show", short_help="Show an environment, its builds and its lock.")
@click.argument("name")
@click.option("--packages", is_flag=True, help="List every distribution the environment sees.")
@hub_options
@handle_errors
def show_command(
    name: str, packages: bool, hub_url: str | None, token_file: Path | None, config_path: Path
) -> None:
    """Show NAME: its definition, its builds and its current lock."""
    env = hub_client(hub_url, token_file, config_path).call("GET", f"/ztlab/environments/{name}")
    click.echo(_line(env))
    if env.get("layer_on"):
        click.echo(f"  layers on    {env['layer_on']}")
    lock = env.get("lock")
    if lock:
        click.echo(f"  digest       {lock['digest']}")
        click.echo(f"  python       {lock['python']}")
        click.echo(f"  files        {lock['files']:,} ({lock['bytes']:,} bytes)")
        click.echo(f"  layers       {', '.join(lock['layers'])}")
        click.echo(f"  packages     {len(lock['distributions'])}")
        if packages:
            for dist, version in sorted(lock["distributions"].items()):
                click.echo(f"    {dist}=={version}")
    requirements = [r for r in env["requirements"].splitlines() if r.split("#")[0].strip()]
    click.echo(f"  requirements {', '.join(requirements) or '(none: the layers only)'}")
    for build in env.get("builds", []):
        extra = f"  {build['error']}" if build.get("error") else ""
        click.echo(
            f"  build {build['build']:<4} {build['status']:<9} {build['started_at']} "
            f"by {build['built_by']}{extra}"
        )


@env_group.command("create", short_help="Define an environment from a requirements file.")
@click.argument("name")
@click.option(
    "-r",
    "--requirements",
    "requirements_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="A requirements file (names and version ranges; a lock file with == pins works).",
)
@click.option("--layer-on", default=None, help="An interpreter whose packages it layers on.")
@click.option("--description", default="", help="What the environment is for.")
@hub_options
@handle_errors
def create_command(
    name: str,
    requirements_file: Path,
    layer_on: str | None,
    description: str,
    hub_url: str | None,
    token_file: Path | None,
    config_path: Path,
) -> None:
    """Define (or redefine) NAME from a requirements file; `ztlab env build NAME` builds it."""
    body = {
        "name": name,
        "requirements": requirements_file.read_text(encoding="utf-8"),
        "layer_on": layer_on,
        "description": description,
    }
    env = hub_client(hub_url, token_file, config_path).call("POST", "/ztlab/environments", body)
    click.echo(f"defined {env['name']}; build it with: ztlab env build {env['name']}")


@env_group.command("build", short_help="Build an environment (through the package proxy).")
@click.argument("name")
@click.option("--layer-on", default=None, help="Layer on this interpreter's packages.")
@click.option("--wait/--no-wait", default=True, help="Follow the build's log until it ends.")
@hub_options
@handle_errors
def build_command(
    name: str,
    layer_on: str | None,
    wait: bool,
    hub_url: str | None,
    token_file: Path | None,
    config_path: Path,
) -> None:
    """Build NAME: a new build folder, every file hashed into its lock. Servers started
    afterwards get the new build; running kernels keep the one they have."""
    api = hub_client(hub_url, token_file, config_path)
    row = api.call("POST", f"/ztlab/environments/{name}/builds", {"layer_on": layer_on})
    click.echo(f"building {name} build {row['build']} in {row['path']}", err=True)
    if not wait:
        return
    seen = 0
    while True:
        state = api.call("GET", f"/ztlab/environments/{name}/builds/{row['build']}?since={seen}")
        for line in state["log"]:
            click.echo(line, err=True)
        seen = state["log_lines"]
        if state["status"] != "building":
            break
        time.sleep(1)
    if state["status"] != "ready":
        click.echo(f"error: build {row['build']} of {name} failed: {state['error']}", err=True)
        sys.exit(1)
    click.echo(f"{name} build {row['build']}: {state['digest']}")


@env_group.command("retire", short_help="Retire an environment (running kernels keep it).")
@click.argument("name")
@hub_options
@handle_errors
def retire_command(
    name: str, hub_url: str | None, token_file: Path | None, config_path: Path
) -> None:
    """Retire NAME: servers started from now on do not get it; kernels running in it keep
    working until they stop."""
    hub_client(hub_url, token_file, config_path).call("POST", f"/ztlab/environments/{name}/retire")
    click.echo(f"retired {name}")


@env_group.command("verify", short_help="Compare an environment's build with its lock.")
@click.argument("name")
@hub_options
@handle_errors
def verify_command(
    name: str, hub_url: str | None, token_file: Path | None, config_path: Path
) -> None:
    """Hash NAME's current build and its layers again and compare with its lock; every
    changed, missing or added file is listed (exit status 1)."""
    result = hub_client(hub_url, token_file, config_path).call(
        "POST", f"/ztlab/environments/{name}/verify"
    )
    build = result["build"]
    if result["ok"]:
        click.echo(f"{name} build {build['build']} matches its lock {build['digest']}")
        return
    for problem in result["problems"]:
        click.echo(problem)
    click.echo(f"{name} build {build['build']} differs from its lock", err=True)
    sys.exit(1)
