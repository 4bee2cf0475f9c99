"""``ztlab pools``: the pools, your clusters in them, and stopping one.

Clusters are started from a notebook (``ztlab.pools.cluster("POOL")``); these commands
look at them and stop them. Exit statuses: 0 done, 2 bad input or a refusal.
"""

from __future__ import annotations

from pathlib import Path

import click

from ztlab.cli._errors import handle_errors
from ztlab.cli.data import hub_client, hub_options


@click.group("pools", short_help="List pools and your clusters; stop a cluster.")
def pools_group() -> None:
    """GPU pools and the Dask clusters you run in them."""


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _size(value: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}"
        value /= 1024
    return f"{value:.0f}T"


@pools_group.command("list", short_help="The pools, their limits and what you hold.")
@hub_options
@handle_errors
def list_command(hub_url: str | None, token_file: Path | None, config_path: Path) -> None:
    """Each pool: whether it is open to you, its per-user limits and what you hold."""
    api = hub_client(hub_url, token_file, config_path)
    pools = api.call("GET", "/ztlab/pools")["pools"]
    if not pools:
        click.echo("no pools on this hub")
    for pool in pools:
        limits, held = pool["limits"], pool["holding"]
        access = "open to you" if pool["open_to_you"] else "not open to you"
        click.echo(
            f"{pool['name']}: {pool['gpus']} GPUs, {access} (roles: {', '.join(pool['roles'])})"
        )
        if pool["description"]:
            click.echo(f"  {pool['description']}")
        click.echo(
            f"  clusters {held['clusters']}/{limits['max_clusters']}, "
            f"workers {held['workers']}/{limits['max_workers']}, "
            f"GPUs {held['gpus']}/{limits['max_cluster_gpus']}; each worker "
            f"{_size(limits['worker_memory'])} and {limits['worker_cpus']:g} CPUs; "
            f"clusters stop after {limits['cluster_hours']:g} h"
        )


@pools_group.command("status", short_help="Your clusters, or one in detail.")
@click.argument("cluster_id", required=False)
@hub_options
@handle_errors
def status_command(
    cluster_id: str | None, hub_url: str | None, token_file: Path | None, config_path: Path
) -> None:
    """Your running clusters (admins: everyone's); with CLUSTER_ID, what its scheduler says."""
    api = hub_client(hub_url, token_file, config_path)
    if cluster_id is None:
        rows = api.call("GET", "/ztlab/pools/clusters")["clusters"]
        if not rows:
            click.echo('no clusters; start one in a notebook: ztlab.pools.cluster("POOL")')
        for row in rows:
            gpus = ",".join(row["gpus"]) or "none"
            click.echo(
                f"{row['id']}  {row['owner']:<12} {row['pool']:<12} "
                f"{_n(row['workers'], 'worker'):<10}  GPUs {gpus:<8} {row['state']:<9} "
                f"until {row['expires_at']}"
            )
        return
    row = api.call("GET", f"/ztlab/pools/clusters/{cluster_id}")
    click.echo(f"cluster {row['id']} of {row['owner']} in pool {row['pool']}: {row['state']}")
    click.echo(f"  scheduler {row['scheduler'] or '-'}; stops by {row['expires_at']}")
    click.echo(f"  GPUs {', '.join(row['gpus']) or 'none'} (lease {row['lease'] or '-'})")
    if row.get("shared_with"):
        click.echo(f"  shared with {', '.join(row['shared_with'])}")
    status = row.get("status")
    if status is not None:
        if "error" in status:
            click.echo(f"  {status['error']}")
        else:
            click.echo(
                f"  {_n(status['workers'], 'worker')} joined, {_n(status['threads'], 'thread')}, "
                f"{_size(status['memory'])} memory, {_n(status['gpus'], 'GPU worker')}"
            )
    if row.get("stop_reason"):
        click.echo(f"  stopped: {row['stop_reason']}")


@pools_group.command("stop", short_help="Stop a cluster and release its GPUs.")
@click.argument("cluster_id")
@hub_options
@handle_errors
def stop_command(
    cluster_id: str, hub_url: str | None, token_file: Path | None, config_path: Path
) -> None:
    """Stop CLUSTER_ID (yours; admins: anyone's): its processes end, its GPUs are released."""
    row = hub_client(hub_url, token_file, config_path).call(
        "DELETE", f"/ztlab/pools/clusters/{cluster_id}"
    )
    click.echo(f"cluster {row['id']} stopped ({row['stop_reason']})")
