"""The whole monitor on replayed traces: JSON trace, replay, attribution, real leases,
the default policy, the alert store, accounting and the hand-over check.

Each scenario of :mod:`ztlab.dev.gputraces` is written as a ``ztlab-nvml-trace/1`` document,
read back by :class:`ReplayedTelemetry` and sampled tick by tick by a :class:`GpuMonitor`
whose leases come from a real :class:`LeaseBroker` granted as the scenario says. Only the
hub's "stop this server" is replaced (the end-to-end test in ``tests/hub/test_monitor_e2e.py``
runs it for real).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ztlab.common.config import parse_config
from ztlab.dev import gputraces
from ztlab.hub.gpu import Inventory, LeaseBroker, PoolExhausted
from ztlab.hub.gpu.nvml import ReplayedNvml
from ztlab.hub.monitor.accounting import UNATTRIBUTED, Accounting
from ztlab.hub.monitor.alerts import AlertStore
from ztlab.hub.monitor.detectors import Detectors
from ztlab.hub.monitor.findings import Alert, Holder
from ztlab.hub.monitor.service import GpuMonitor
from ztlab.hub.monitor.sources import ReplayedTelemetry
from ztlab.hub.policy import PolicyEngine


@dataclass
class Records:
    rows: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def record(self, *, actor: str, action: str, detail: Any) -> None:
        self.rows.append((actor, action, dict(detail)))

    def __call__(self, actor: str, action: str, **detail: Any) -> None:
        self.rows.append((actor, action, detail))

    def actions(self, action: str) -> list[dict[str, Any]]:
        return [detail for _, name, detail in self.rows if name == action]


@dataclass
class Run:
    monitor: GpuMonitor
    broker: LeaseBroker
    records: Records
    stopped: list[Holder]
    scenario: gputraces.Scenario
    alerts: list[Alert] = field(default_factory=list)

    def tick_until(self, t: float) -> None:
        """Tick while the readings are before ``t`` (or the trace ends)."""
        for _ in range(self.scenario.ticks):
            result = self.monitor.tick()
            self.alerts += result.alerts
            if result.reading.t >= t:
                break
        self.monitor.wait_responses()


def _monitor(tmp_path: Path, scenario: gputraces.Scenario, *, limit: int | None = None) -> Run:
    pools: dict[str, list[str]] = {}
    for gpu in scenario.gpus:
        pool = scenario.pools.get(gpu.uuid)
        if pool is not None:
            pools.setdefault(pool, []).append(str(gpu.index))
    config = parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "roles": {"trainer": {"max_gpus": 8}},
            "gpu": {
                "pools": {
                    name: {"gpus": gpus, "roles": ["trainer"]} for name, gpus in pools.items()
                }
            },
        }
    )
    records = Records()
    policy = PolicyEngine.defaults(audit=records)
    inventory = Inventory.from_config(config, nvml=None)
    replayed = ReplayedNvml.from_dict(scenario.trace(limit=limit))

    def clock() -> float:  # the trace's time, for the readings and the leases alike
        return scenario.start + replayed.time

    broker = LeaseBroker(
        store_path=tmp_path / "state" / "gpu" / "leases.sqlite3",
        inventory=inventory,
        roles=config.roles,
        policy=policy,
        audit=records,
        clock=clock,
    )
    # the scenario's leases, granted for real: one lease per holder and pool, its GPUs
    # handed out in the pool's order
    wanted: dict[tuple[str, str, str], list[str]] = {}
    for lease in sorted(scenario.leases, key=lambda held: int(held.gpu)):
        wanted.setdefault((lease.user, lease.server, lease.pool), []).append(lease.gpu)
    for (user, server, pool), gpus in wanted.items():
        granted = broker.grant(
            user=user, roles=frozenset({"trainer"}), server=server, pool=pool, count=len(gpus)
        )
        assert granted is not None
        assert list(granted.gpus) == gpus
    source = ReplayedTelemetry(replayed, clock=clock)
    stopped: list[Holder] = []
    monitor = GpuMonitor(
        source=source,
        interval=scenario.interval,
        inventory=inventory,
        leases=broker,
        cgroups=None,
        detectors=Detectors(interval=scenario.interval),
        accounting=Accounting.open(tmp_path / "state" / "monitor" / "accounting.sqlite"),
        alerts=AlertStore.open(tmp_path / "state" / "monitor" / "alerts.sqlite"),
        policy=policy,
        record=records,
    )
    monitor.stop_holder = stopped.append
    users = {lease.user for lease in scenario.leases} | set(scenario.accounts.values())
    monitor.set_directory(
        accounts=scenario.accounts,
        activity=scenario.idle_since,
        roles={user: frozenset({"trainer"}) for user in users},
    )
    return Run(monitor, broker, records, stopped, scenario)


@pytest.fixture
def run_scenario(tmp_path: Path) -> Iterator[Any]:
    made: list[Run] = []

    def make(scenario: gputraces.Scenario, *, limit: int | None = None) -> Run:
        made.append(_monitor(tmp_path / scenario.name, scenario, limit=limit))
        return made[-1]

    yield make
    for run in made:
        run.monitor.close()
        run.broker.close()


@pytest.mark.parametrize("kind", sorted(gputraces.SCENARIOS))
def test_each_alert_kind_fires_within_two_intervals(kind: str, run_scenario: Any) -> None:
    scenario = gputraces.SCENARIOS[kind]()
    assert scenario.anomaly_t is not None
    run = run_scenario(scenario)
    deadline = scenario.anomaly_t + 2 * scenario.interval
    run.tick_until(deadline)
    early = [a for a in run.alerts if a.t < scenario.anomaly_t]
    assert not early, f"alerts before the anomaly: {early}"
    found = [a for a in run.alerts if a.kind == kind]
    assert found, f"no {kind} alert by {deadline - scenario.anomaly_t:.1f} s after it started"
    alert = found[0]
    assert alert.t <= deadline
    if scenario.user is not None:
        assert alert.holder is not None
        assert alert.holder.user == scenario.user
    if scenario.pid is not None:
        assert alert.pid == scenario.pid
    # always recorded, stored, and decided by the policy
    recorded = [r for r in run.records.actions("gpu.alert") if r["kind"] == kind]
    assert recorded
    assert "notify" in recorded[0]["responses"]
    assert run.monitor.alerts.counts()[kind] >= 1


def test_an_unleased_process_is_stopped_and_its_gpu_taken_from_the_lease(
    run_scenario: Any,
) -> None:
    scenario = gputraces.unleased_process()
    assert scenario.anomaly_t is not None
    run = run_scenario(scenario)
    run.tick_until(scenario.anomaly_t + 2 * scenario.interval)
    alert = next(a for a in run.alerts if a.kind == "unleased_process")
    assert alert.holder is not None
    # the default policy: stop the intruder's server, take the GPU from its lease
    assert alert.holder in run.stopped
    done = {r["response"]: r["outcome"] for r in run.records.actions("gpu.alert_response")}
    assert done == {"notify": "done", "stop_server": "done", "revoke_lease": "done"}
    assert alert.lease is not None
    assert run.broker.get(alert.lease.lease).released_at is not None  # type: ignore[union-attr]
    # the revoked GPU waits for its hand-over check and is not granted meanwhile
    assert alert.lease.gpu in {h.gpu for h in run.broker.pending_handovers()}


def test_a_normal_training_run_raises_nothing_and_is_fully_attributed(
    run_scenario: Any,
) -> None:
    # a simulated day through the whole monitor, from its JSON trace (two GPUs for 4 hours
    # in test_two_gpus_...; the detectors alone also run a day in test_detectors.py)
    scenario = gputraces.normal_training(hours=24, gpus=1)
    run = run_scenario(scenario)
    run.tick_until(float("inf"))
    assert run.alerts == []
    assert run.records.actions("gpu.alert") == []
    usage = run.monitor.accounting.usage()
    assert UNATTRIBUTED not in usage
    attributed = sum(u.gpu_seconds for u in usage.values())
    assert attributed == pytest.approx(run.monitor.accounting.busy_gpu_seconds)
    assert attributed > 12 * 3600  # hours of GPU time, all of it someone's


def test_two_gpus_of_one_cluster_raise_nothing(run_scenario: Any) -> None:
    run = run_scenario(gputraces.normal_training(hours=4, gpus=2))
    run.tick_until(float("inf"))
    assert run.alerts == []
    assert set(run.monitor.accounting.usage()) == {"alice"}


@pytest.mark.parametrize("kind", ["unleased_process", "outside_cgroup", "miner"])
def test_every_gpu_second_of_the_alert_traces_is_accounted(kind: str, run_scenario: Any) -> None:
    scenario = gputraces.SCENARIOS[kind]()
    run = run_scenario(scenario)
    run.tick_until(float("inf"))
    usage = run.monitor.accounting.usage()
    assert sum(u.gpu_seconds for u in usage.values()) == pytest.approx(
        run.monitor.accounting.busy_gpu_seconds
    )
    if kind == "outside_cgroup":
        assert usage[UNATTRIBUTED].gpu_seconds > 0


def test_a_lease_that_ends_with_processes_left_holds_the_gpu_back(run_scenario: Any) -> None:
    scenario = gputraces.normal_training(hours=0.05, gpus=1)
    run = run_scenario(scenario)
    run.monitor.tick()
    lease = run.broker.active()[0]
    run.broker.release(lease.id, reason="test", actor="test")
    # the holder's training still runs on the GPU: held back, and an alert
    run.monitor.tick()
    run.monitor.tick()
    run.monitor.wait_responses()
    (held,) = run.broker.pending_handovers()
    assert held.state == "held"
    assert held.lease == lease.id
    assert len(run.records.actions("gpu.handover.held")) == 1
    kinds = [r["kind"] for r in run.records.actions("gpu.alert")]
    assert kinds.count("handover_dirty") == 1
    assert set(kinds) == {"handover_dirty", "unleased_process"}  # its process outlived it
    # the next user is refused that GPU while it is held back
    with pytest.raises(PoolExhausted, match="held back"):
        run.broker.grant(user="bob", roles=frozenset({"trainer"}), server="", pool="train", count=1)


def test_a_clean_hand_over_frees_the_gpu_and_records_ecc_mode(run_scenario: Any) -> None:
    scenario = gputraces.normal_training(hours=0.05, gpus=1)
    run = run_scenario(scenario, limit=1)  # one snapshot: the training, then it stays
    run.monitor.tick()
    lease = run.broker.active()[0]
    run.broker.release(lease.id, reason="test", actor="test")
    # the replay keeps showing alice's process: still held
    run.monitor.tick()
    assert run.broker.pending_handovers()[0].state == "held"
    # an admin who checked gives it back
    run.broker.release_hold(lease.gpus[0], actor="erin")
    assert run.broker.grant(
        user="bob", roles=frozenset({"trainer"}), server="", pool="train", count=1
    )
