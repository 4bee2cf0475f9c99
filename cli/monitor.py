"""``ztlab monitor``: the GPU monitor's alerts, usage and hand-overs; scraping; traces.

``alerts``, ``ack``, ``now``, ``handovers`` and ``release`` are for admins; ``usage`` shows
your own GPU-seconds, energy and memory (admins: ``--all``). ``scrape-config`` prints a
Prometheus scrape job for this hub, and ``record-trace`` records NVML on a GPU server into a
trace that ``[gpu.monitor] source = "replay"`` and the tests replay. Exit statuses: 0 done,
2 bad input or a refusal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import click

from ztlab.cli._errors import handle_errors
from ztlab.cli.data import hub_client, hub_options
from ztlab.cli.hub import CONFIG_OPTION


@click.group("monitor", short_help="GPU alerts, usage and hand-overs; scrape config; traces.")
def monitor_group() -> None:
    """The GPU activity monitor: who uses which GPU, alerts, and metrics."""


def _when(row: dict[str, Any]) -> str:
    return str(row.get("time", ""))[:19].replace("T", " ")


@monitor_group.command("alerts", short_help="The alerts, newest first (admins).")
@click.option("--open", "open_only", is_flag=True, help="Only alerts nobody acknowledged.")
@click.option("--user", default=None, help="Only alerts about this user.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@hub_options
@handle_errors
def alerts_command(
    open_only: bool,
    user: str | None,
    as_json: bool,
    hub_url: str | None,
    token_file: Path | None,
    config_path: Path,
) -> None:
    """Each alert: when, kind, severity, the responses taken, and what it says."""
    api = hub_client(hub_url, token_file, config_path)
    query = {"open": "1"} if open_only else {}
    if user:
        query["user"] = user
    suffix = f"?{urlencode(query)}" if query else ""
    rows = api.call("GET", f"/ztlab/monitor/alerts{suffix}")["alerts"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no alerts" + (" open" if open_only else ""))
    for row in rows:
        responses = ", ".join(row.get("responses") or []) or "recorded only"
        seen = f"  acknowledged by {row['acknowledged_by']}" if row.get("acknowledged_by") else ""
        click.echo(f"#{row['id']}  {_when(row)}  {row['severity']:<8} {row['kind']}{seen}")
        click.echo(f"  {row['message']}")
        click.echo(f"  responses: {responses}")


@monitor_group.command("ack", short_help="Acknowledge an alert (admins).")
@click.argument("alert_id", type=int)
@hub_options
@handle_errors
def ack_command(
    alert_id: int, hub_url: str | None, token_file: Path | None, config_path: Path
) -> None:
    """Mark alert ALERT_ID as seen (it stays in the record and the audit log)."""
    api = hub_client(hub_url, token_file, config_path)
    row = api.call("POST", f"/ztlab/monitor/alerts/{alert_id}/acknowledge", {})
    click.echo(f"alert #{row['id']} acknowledged by {row['acknowledged_by']}")


@monitor_group.command("usage", short_help="GPU-seconds, energy and memory per user.")
@click.option("--all", "everyone", is_flag=True, help="Everyone's (admins).")
@hub_options
@handle_errors
def usage_command(
    everyone: bool, hub_url: str | None, token_file: Path | None, config_path: Path
) -> None:
    """What the monitor has accounted to you (or to everyone)."""
    api = hub_client(hub_url, token_file, config_path)
    usage = api.call("GET", "/ztlab/monitor/usage" + ("?all=1" if everyone else ""))["usage"]
    if not usage:
        click.echo("no GPU use recorded")
    for user, row in usage.items():
        click.echo(
            f"{user:<16} {row['gpu_seconds'] / 3600:8.2f} GPU-hours  "
            f"{row['energy_joules'] / 3.6e6:8.3f} kWh  "
            f"{row['memory_byte_seconds'] / 2**30 / 3600:8.2f} GiB-hours"
        )


@monitor_group.command("now", short_help="GPU processes of the last sample and whose (admins).")
@hub_options
@handle_errors
def now_command(hub_url: str | None, token_file: Path | None, config_path: Path) -> None:
    """Every process on a GPU in the last sample: user, server, lease."""
    api = hub_client(hub_url, token_file, config_path)
    now = api.call("GET", "/ztlab/monitor/now")
    if not now["processes"]:
        click.echo("no GPU processes")
    for row in now["processes"]:
        owner = row["user"] or "(outside every ztlab cgroup)"
        server = f"/{row['server']}" if row["server"] else ""
        click.echo(
            f"pid {row['pid']:<8} {row['gpu']}  {owner}{server}  lease {row['lease'] or 'none'}"
        )


@monitor_group.command("handovers", short_help="GPUs in their hand-over check (admins).")
@hub_options
@handle_errors
def handovers_command(hub_url: str | None, token_file: Path | None, config_path: Path) -> None:
    """GPUs whose lease ended and that wait for the monitor's check, or are held back."""
    api = hub_client(hub_url, token_file, config_path)
    rows = api.call("GET", "/ztlab/monitor/handovers")["handovers"]
    if not rows:
        click.echo("no GPU is waiting for a hand-over check")
    for row in rows:
        click.echo(f"GPU {row['gpu']}: {row['state']} after lease {row['lease']} ({row['user']})")
        if row.get("reason"):
            click.echo(f"  {row['reason']}")


@monitor_group.command("release", short_help="Give a held-back GPU back (admins).")
@click.argument("gpu")
@hub_options
@handle_errors
def release_command(
    gpu: str, hub_url: str | None, token_file: Path | None, config_path: Path
) -> None:
    """Release GPU (its id as configured) from its hand-over hold; audited."""
    api = hub_client(hub_url, token_file, config_path)
    api.call("POST", f"/ztlab/monitor/handovers/{quote(gpu, safe='')}/release", {})
    click.echo(f"GPU {gpu} is back in its pool")


@monitor_group.command("scrape-config", short_help="A Prometheus scrape job for this hub.")
@CONFIG_OPTION
@handle_errors
def scrape_config_command(config_path: Path) -> None:
    """Print a Prometheus ``scrape_configs`` entry for the hub's metrics endpoint.

    It authenticates with the ``gpu-metrics`` service's token, which the hub keeps in
    STATE_DIR/monitor/scrape-token (mode 0600): copy it where Prometheus reads secrets.
    """
    from urllib.parse import urlsplit

    from ztlab.common.config import load_config

    config = load_config(config_path)
    url = urlsplit(config.public_url("/hub/api/ztlab/metrics"))
    token = config.state_dir / "monitor" / "scrape-token"
    click.echo(
        "\n".join(
            [
                "scrape_configs:",
                "  - job_name: ztlab-gpu",
                f"    scrape_interval: {max(1, round(config.gpu.monitor.interval_seconds * 5))}s",
                f"    scheme: {url.scheme}",
                f"    metrics_path: {url.path}",
                "    authorization:",
                "      type: token",
                f"      credentials_file: {token}",
                "    static_configs:",
                f"      - targets: ['{url.netloc}']",
            ]
        )
    )


@monitor_group.command("record-trace", short_help="Record NVML into a replayable trace.")
@click.argument("output", type=click.Path(dir_okay=False, writable=True, path_type=Path))
@click.option("--samples", type=click.IntRange(1, 86_400), default=10, show_default=True)
@click.option("--interval", type=click.FloatRange(0.1, 60), default=1.0, show_default=True)
@click.option("--description", default="", help="Free text stored in the trace.")
@handle_errors
def record_trace_command(output: Path, samples: int, interval: float, description: str) -> None:
    """Sample this machine's GPUs SAMPLES times into OUTPUT (format ztlab-nvml-trace/1):
    everything the monitor reads, and each GPU process's account, command line and cgroup
    from /proc, so that the trace replays with its attribution elsewhere (it names users'
    accounts and commands: keep it where the audit log is kept)."""
    import time

    from ztlab.hub.gpu.nvml import RealNvml
    from ztlab.hub.monitor.procfacts import ProcessFactsCache
    from ztlab.hub.monitor.sources import record_telemetry

    with RealNvml() as nvml, click.progressbar(length=samples, label="recording") as bar:

        def sleep(seconds: float) -> None:
            time.sleep(seconds)
            bar.update(1)

        trace = record_telemetry(
            nvml,
            samples=samples,
            interval=interval,
            description=description,
            facts=ProcessFactsCache().get,
            sleep=sleep,
        )
        bar.update(1)
    output.write_text(json.dumps(trace, indent=1) + "\n", encoding="utf-8")
    click.echo(f"{output}: {samples} samples of {len(trace['devices'])} GPUs")
