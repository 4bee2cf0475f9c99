"""The GPU monitor's cost per sample, and how soon an unleased process becomes an alert.

``python -m bench monitor``. Eight GPUs of eight users' servers, two processes each, as
:func:`ztlab.dev.gputraces.eight_gpu_steady` replays them (telemetry, per-process SM use),
except that the processes are real: sixteen sleeping processes in eight real cgroups under
``ztlab-bench/ztl-benchN``, so that every tick reads ``/proc`` (status, command line,
cgroup; libraries from ``maps`` once a minute) as it would on a GPU server. Leases come from
a real :class:`LeaseBroker`, decisions from the real policy engine, and the alert store,
accounting and audit records are real (the audit sink is an in-memory list). Only NVML is
replaced by the replay.

- **CPU per sample**: process CPU time (all threads) of :meth:`GpuMonitor.tick` over a few
  hundred ticks, as a share of one core at 1 Hz. Target: under 1 %. Baseline, same run: a
  per-GPU exporter's work on the same readings (read and render the DCGM series, no
  attribution, accounting or detection), which is what the DCGM exporter does.
- **The sampler at 1 Hz**: process CPU time while the real sampler thread runs for a while,
  per second of wall time (everything the monitor costs, idle waits included).
- **Alert latency**: with the sampler thread at 1 Hz, a process of one user appears (at a
  random moment) on another user's GPU; the time until its ``unleased_process`` alert is
  recorded, over many trials: p50 and p95. Target: p95 under 2 s.
"""

from __future__ import annotations

import random
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench._table import Row, median, percentile
from ztlab.common.config import parse_config
from ztlab.dev import gputraces
from ztlab.hub.gpu import Inventory, LeaseBroker
from ztlab.hub.monitor.accounting import Accounting
from ztlab.hub.monitor.alerts import AlertStore
from ztlab.hub.monitor.detectors import Detectors
from ztlab.hub.monitor.exporter import render
from ztlab.hub.monitor.service import GpuMonitor
from ztlab.hub.monitor.telemetry import ProcessReading, Reading
from ztlab.hub.policy import PolicyEngine
from ztlab.hub.sandbox.cgroups import CgroupManager, Limits

PARENT = "ztlab-bench"
#: the benchmark's policy: alerts are only told (nothing is stopped or revoked here)
NOTIFY_ONLY = """
@id("bench-notify")
@reason("the benchmark only records and notifies")
permit (principal, action == Ztlab::Action::"respond_to_alert", resource)
when { context.response == "notify" };
"""


class Source:
    """Replays readings in a loop, with real PIDs, and can slip in an unleased process."""

    def __init__(self, readings: list[Reading], pids: dict[int, int]) -> None:
        self._readings = [
            replace(
                r,
                processes=tuple(replace(p, pid=pids[p.pid], facts=None) for p in r.processes),
            )
            for r in readings
        ]
        self._next = 0
        self._lock = threading.Lock()
        #: (process, wall time it appears) or None
        self.intruder: tuple[ProcessReading, float] | None = None

    def read(self) -> Reading:
        reading = self._readings[self._next % len(self._readings)]
        self._next += 1
        now = time.time()
        with self._lock:
            intruder = self.intruder
        processes = reading.processes
        if intruder is not None and intruder[1] <= now:
            processes = (*processes, intruder[0])
        return replace(reading, t=now, processes=processes)

    def close(self) -> None:
        pass


@contextmanager
def _sleepers(users: int) -> Iterator[dict[str, list[int]]]:
    """Two sleeping processes per user, each user's in a cgroup ``ztl-benchN``."""
    manager = CgroupManager.detect(parent=PARENT)
    limits = Limits(memory_bytes=256 << 20, cpus=1, pids=64)
    made: dict[str, list[int]] = {}
    procs: list[subprocess.Popen[bytes]] = []
    cgroups = []
    try:
        for n in range(users):
            cgroup = manager.create(f"ztl-bench{n}", limits=limits)
            cgroups.append(cgroup)
            for _ in range(2):
                proc = subprocess.Popen(
                    ["sleep", "3600"],
                    preexec_fn=cgroup.preexec(),
                )
                procs.append(proc)
                made.setdefault(f"ztl-bench{n}", []).append(proc.pid)
        yield made
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for cgroup in cgroups:
            cgroup.kill_all()
            cgroup.remove()


@contextmanager
def _monitor(tmp: Path, seconds: int) -> Iterator[tuple[GpuMonitor, Source, list[Any]]]:
    scenario = gputraces.eight_gpu_steady(seconds=seconds)
    readings = list(scenario.readings())
    config = parse_config(
        {
            "state_dir": str(tmp / "state"),
            "roles": {"trainer": {"max_gpus": 8}},
            "gpu": {"pools": {"gpu": {"gpus": [str(i) for i in range(8)], "roles": ["trainer"]}}},
        }
    )
    policies = tmp / "policy"
    policies.mkdir()
    (policies / "bench.cedar").write_text(NOTIFY_ONLY)
    records: list[Any] = []

    class Sink:
        def record(self, *, actor: str, action: str, detail: Any) -> None:
            records.append((time.time(), action, dict(detail)))

    policy = PolicyEngine.from_directory(policies, audit=Sink())
    inventory = Inventory.from_config(config, nvml=None)
    broker = LeaseBroker(
        store_path=tmp / "state" / "gpu" / "leases.sqlite3",
        inventory=inventory,
        roles=config.roles,
        policy=PolicyEngine.defaults(audit=Sink()),  # leases as shipped
        audit=Sink(),
    )
    with _sleepers(8) as sleepers:
        accounts = {f"ztl-bench{n}": f"user{n}" for n in range(8)}
        for n in range(8):
            broker.grant(
                user=f"user{n}", roles=frozenset({"trainer"}), server="", pool="gpu", count=1
            )
        # the scenario's pids (5000 + 100 * gpu + 1|2) become the sleepers of that GPU's user
        pids = {
            5000 + 100 * n + k: sleepers[f"ztl-bench{n}"][k - 1] for n in range(8) for k in (1, 2)
        }
        source = Source(readings, pids)

        def record(actor: str, action: str, **detail: Any) -> None:
            records.append((time.time(), action, detail))

        monitor = GpuMonitor(
            source=source,
            interval=1.0,
            inventory=inventory,
            leases=broker,
            cgroups=None,
            detectors=Detectors(interval=1.0),
            accounting=Accounting.open(tmp / "state" / "monitor" / "accounting.sqlite"),
            alerts=AlertStore.open(tmp / "state" / "monitor" / "alerts.sqlite"),
            policy=policy,
            record=record,
            cgroup_parent=PARENT,
        )
        monitor.set_directory(
            accounts=accounts,
            activity={},
            roles={user: frozenset({"trainer"}) for user in accounts.values()},
        )
        try:
            yield monitor, source, records
        finally:
            monitor.close()
            broker.close()


def _cpu_per_tick(monitor: GpuMonitor, ticks: int) -> tuple[float, float]:
    """Median process CPU seconds of a full tick, and of a per-GPU exporter's work."""
    full: list[float] = []
    exporter: list[float] = []
    for _ in range(ticks):
        start = time.process_time()
        monitor.tick()
        full.append(time.process_time() - start)
        start = time.process_time()
        reading = monitor.source.read()
        render(
            reading=reading,
            processes=(),
            accounting=Accounting(),
            alert_counts={},
            hostname="bench",
            sampler={},
        )
        exporter.append(time.process_time() - start)
    return median(full), median(exporter)


def _latency(monitor: GpuMonitor, source: Source, records: list[Any], trials: int) -> list[float]:
    """Seconds from an unleased process appearing to its recorded alert, per trial."""
    rng = random.Random(14)
    intruder_pid = source.read().processes[0].pid  # user0's training process...
    target = source.read().devices[1].uuid  # ...shows up on user1's GPU
    found: list[float] = []
    monitor.start()
    for _ in range(trials):
        time.sleep(rng.uniform(0.5, 1.5))
        seen = len(records)
        appears = time.time()
        with source._lock:
            source.intruder = (
                ProcessReading(pid=intruder_pid, uuid=target, used_memory=1 << 30, sm_util=90),
                appears,
            )
        deadline = appears + 10
        while time.time() < deadline:
            alerts = [
                at
                for at, action, detail in records[seen:]
                if action == "gpu.alert" and detail.get("kind") == "unleased_process"
            ]
            if alerts:
                found.append(alerts[0] - appears)
                break
            time.sleep(0.01)
        with source._lock:
            source.intruder = None
        time.sleep(2.2)  # a tick without it: the condition clears and can fire again
    return found


def run(*, quick: bool = False) -> list[Row]:
    ticks = 120 if quick else 600
    trials = 5 if quick else 25
    with (
        tempfile.TemporaryDirectory(dir="/var/tmp") as tmp,
        _monitor(Path(tmp), seconds=ticks + 60) as (monitor, source, records),
    ):
        for _ in range(30):  # warm up (libraries read, baselines started)
            monitor.tick()
        per_tick, exporter = _cpu_per_tick(monitor, ticks)
        # the sampler thread at 1 Hz, everything included
        cpu0, wall0 = time.process_time(), time.monotonic()
        monitor.start()
        time.sleep(10 if quick else 30)
        sampler = (time.process_time() - cpu0) / (time.monotonic() - wall0)
        latencies = _latency(monitor, source, records, trials)
    rows = [
        Row(
            "monitor",
            "CPU per sample, 8 GPUs / 16 processes (share of a core at 1 Hz)",
            per_tick * 100,
            "%",
            target="< 1 %",
            baseline=f"per-GPU exporter work: {exporter * 1e3:.2f} ms/sample",
            ratio=per_tick / exporter if exporter else None,
        ),
        Row(
            "monitor",
            "sampler thread at 1 Hz, process CPU per wall second",
            sampler * 100,
            "%",
            target="< 1 %",
        ),
    ]
    if latencies:
        rows += [
            Row("monitor", "unleased process -> alert, p50", median(latencies), "s"),
            Row(
                "monitor",
                f"unleased process -> alert, p95 ({len(latencies)} of {trials} trials)",
                percentile(latencies, 0.95),
                "s",
                target="< 2 s",
            ),
        ]
    return rows
