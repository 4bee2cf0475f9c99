"""``ztlab k8s``: the same roles, quotas and GPU pools on Kubernetes (Zero to JupyterHub).

``ztlab k8s render [CONFIG] --out DIR`` writes ``values.yaml`` (Helm values for the z2jh
chart: one KubeSpawner profile per role and GPU pool, restricted to the roles a user
holds) and ``networkpolicies.yaml`` (the user servers' NetworkPolicies). CONFIG defaults
to $ZTLAB_CONFIG, else /etc/ztlab/ztlab.toml. Exits 2 on an invalid configuration or
option.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from ztlab.cli._errors import handle_errors
from ztlab.cli.config import config_path
from ztlab.common.config import load_config


@click.group("k8s", short_help="Render roles, quotas and pools for Kubernetes.")
def k8s_group() -> None:
    """Render ztlab's roles, quotas and GPU pools for Kubernetes (Zero to JupyterHub)."""


@k8s_group.command("render", short_help="Write z2jh Helm values and NetworkPolicies.")
@click.argument("config", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Directory to write values.yaml and networkpolicies.yaml into (created if missing).",
)
@click.option(
    "--namespace",
    help="Namespace of the release, written into the NetworkPolicies.",
)
@click.option(
    "--release",
    help="Helm release name; the NetworkPolicies then also match its release label.",
)
@click.option(
    "--allow-egress",
    "egress",
    multiple=True,
    metavar="PEER:PORT[/PROTO]",
    help=(
        "A control-plane service the user servers may call, e.g. "
        "app=mlflow@ztlab-system:5000 or 10.0.5.10/32:443. Repeatable."
    ),
)
@click.option(
    "--dns",
    multiple=True,
    metavar="PEER",
    help=("Where cluster DNS runs (port 53). Repeatable. Default: k8s-app=kube-dns@kube-system."),
)
@click.option(
    "--uid",
    type=int,
    default=1000,
    show_default=True,
    help="User id the servers run as (never 0).",
)
@click.option(
    "--fs-gid",
    type=int,
    default=100,
    show_default=True,
    help="Group that owns mounted volumes (never 0).",
)
@click.option(
    "--guarantee",
    type=float,
    default=1.0,
    show_default=True,
    help="CPU and memory requests as a fraction of the role's limits (1: no overcommit).",
)
@handle_errors
def render(
    config: Path | None,
    out_dir: Path,
    namespace: str | None,
    release: str | None,
    egress: tuple[str, ...],
    dns: tuple[str, ...],
    uid: int,
    fs_gid: int,
    guarantee: float,
) -> None:
    """Write Zero to JupyterHub values and NetworkPolicies for the configuration.

    values.yaml has one profile per role (the role's CPU, memory and run-time quota),
    and one per GPU pool for each role that may use it; a hub snippet offers each user
    only the profiles of the roles they hold. networkpolicies.yaml lets user servers
    talk only to the hub, DNS and the --allow-egress services. CONFIG defaults to
    $ZTLAB_CONFIG, else /etc/ztlab/ztlab.toml.
    """
    path = config_path(config)
    loaded = load_config(path)
    from ztlab.deploy.k8s import K8sOptions, parse_egress_rule, parse_peer, write_files

    options = K8sOptions(
        namespace=namespace,
        release=release,
        uid=uid,
        fs_gid=fs_gid,
        guarantee=guarantee,
        control_plane=tuple(parse_egress_rule(spec) for spec in egress),
    )
    if dns:
        options = replace(options, dns=tuple(parse_peer(spec) for spec in dns))
    written = write_files(loaded, out_dir, options, source=str(path))
    click.echo(f"{written.values}: {written.profiles} profiles")
    click.echo(f"{written.network_policies}: {written.policies} NetworkPolicies")
