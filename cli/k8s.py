"""``ztlab k8s``: the same roles, quotas and GPU pools on Kubernetes (Zero to JupyterHub).

``ztlab k8s render [CONFIG] --out DIR`` writes ``values.yaml`` (Helm values for the z2jh
chart: one KubeSpawner profile per role and GPU pool, restricted to the roles a user
holds) and ``networkpolicies.yaml`` (the user servers' NetworkPolicies). CONFIG defaults
to $ZTLAB_CONFIG, else /etc/ztlab/ztlab.toml. Exits 2 on an invalid configuration or
option.

``ztlab k8s gateway [CONFIG] [--out DIR]`` renders the GPU pools for Dask Gateway (the
``dask-gateway`` chart): ``gateway-values.yaml`` (JupyterHub authentication, the worker
image, and a gateway configuration with cluster options per pool and the per-user and
per-group quotas Gateway lacks) and ``dask_gateway_config.py`` (that configuration alone).
Without --out the values are printed.
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
    """Render ztlab's roles, quotas and GPU pools for Kubernetes (Zero to JupyterHub and
    Dask Gateway)."""


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


@k8s_group.command("gateway", short_help="Write Dask Gateway Helm values with pool quotas.")
@click.argument("config", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help=(
        "Directory to write gateway-values.yaml and dask_gateway_config.py into (created "
        "if missing). Default: print the values."
    ),
)
@click.option(
    "--image",
    metavar="NAME[:TAG]",
    help=(
        "Image of the schedulers and workers (dask-gateway, distributed and, for GPU "
        "workers, CUDA). Default: a placeholder to replace."
    ),
)
@click.option(
    "--hub-api-url",
    metavar="URL",
    help=(
        "JupyterHub's API URL, e.g. http://hub:8081/hub/api. Default: the chart infers it "
        "from the hub service in the same namespace."
    ),
)
@click.option(
    "--service-name",
    default="dask-gateway",
    show_default=True,
    help=(
        "The gateway's JupyterHub service name; tokens need access:services!service=NAME. "
        "An empty name accepts any hub user's token."
    ),
)
@click.option(
    "--node-selector",
    "node_selectors",
    multiple=True,
    metavar="POOL=KEY=VALUE",
    help=(
        "A node label the pool's GPU workers need. Repeatable; replaces the pool's default, "
        "nvidia.com/gpu.present=true and ztlab.io/gpu-pool=POOL."
    ),
)
@click.option(
    "--toleration",
    "tolerations",
    multiple=True,
    metavar="POOL=KEY[=VALUE][:EFFECT]",
    help=(
        "A taint the pool's GPU workers tolerate. Repeatable; replaces the pool's default, "
        "nvidia.com/gpu:NoSchedule."
    ),
)
@handle_errors
def gateway(
    config: Path | None,
    out_dir: Path | None,
    image: str | None,
    hub_api_url: str | None,
    service_name: str,
    node_selectors: tuple[str, ...],
    tolerations: tuple[str, ...],
) -> None:
    """Render the GPU pools for Dask Gateway on Kubernetes, with their quotas.

    gateway-values.yaml holds Helm values for the dask-gateway chart: JupyterHub
    authentication, the worker image and, as gateway.extraConfig, a gateway configuration
    that offers each user the pools their roles may use (cluster options pool, workers
    and GPUs per worker; the pool sets the workers' cores, memory, nvidia.com/gpu limit,
    node selector and tolerations) and refuses a cluster past the pool's per-user
    max_clusters, max_workers or max_cluster_gpus, or past the max_gpus of the roles the
    user's groups grant. dask_gateway_config.py is that configuration alone. The header of
    the values says what the JupyterHub release needs. CONFIG defaults to $ZTLAB_CONFIG,
    else /etc/ztlab/ztlab.toml.
    """
    path = config_path(config)
    loaded = load_config(path)
    from ztlab.deploy.gateway import (
        GatewayOptions,
        Toleration,
        gateway_values_text,
        parse_node_selector,
        parse_toleration,
        write_gateway_files,
    )

    selectors: dict[str, dict[str, str]] = {}
    for spec in node_selectors:
        pool, key, value = parse_node_selector(spec)
        selectors.setdefault(pool, {})[key] = value
    tolerated: dict[str, list[Toleration]] = {}
    for spec in tolerations:
        pool, toleration = parse_toleration(spec)
        tolerated.setdefault(pool, []).append(toleration)
    options = GatewayOptions(
        image=image,
        hub_api_url=hub_api_url,
        service_name=service_name or None,
        node_selectors=selectors,
        tolerations=tolerated,
    )
    if out_dir is None:
        click.echo(gateway_values_text(loaded, options, source=str(path)), nl=False)
        return
    written = write_gateway_files(loaded, out_dir, options, source=str(path))
    click.echo(f"{written.values}: {written.pools} GPU pools")
    click.echo(f"{written.config}: the gateway configuration (also in the values)")
