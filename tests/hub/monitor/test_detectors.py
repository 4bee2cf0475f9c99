"""The alert detectors on synthetic traces and hand-built ticks.

Every alert kind fires within two sampling intervals of its scenario's anomaly, for the
right holder and process, once while it lasts and again when it comes back; a day of
normal training raises nothing; miner signatures do not flag ordinary ML processes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

import pytest

from ztlab.common.errors import ConfigError
from ztlab.dev import gputraces
from ztlab.dev.gputraces import START, Scenario
from ztlab.hub.gpu.nvml import ReplayedNvml
from ztlab.hub.monitor.attribution import Attributor
from ztlab.hub.monitor.detectors import Detectors, Tick, match_miner
from ztlab.hub.monitor.findings import ALERT_KINDS, Alert, AttributedProcess, Holder, LeaseHold
from ztlab.hub.monitor.sources import ReplayedTelemetry
from ztlab.hub.monitor.telemetry import DeviceReading, ProcessFacts, ProcessReading, Reading

UUID = "GPU-00000000-0000-0000-0000-000000000000"
UUID1 = "GPU-11111111-1111-1111-1111-111111111111"


# --- attribution: the monitor's own (cgroup -> holder), with the scenario's accounts ----------


def holder_of(facts: ProcessFacts | None, accounts: Mapping[str, str]) -> Holder | None:
    """The holder the process's ztlab cgroup names, as the monitor attributes it."""
    return Attributor(accounts=lambda: accounts, facts=lambda pid: None).holder(facts, accounts)


def scenario_ticks(scenario: Scenario) -> Iterator[Tick]:
    leases = {gpu.uuid: scenario.lease_on(gpu.uuid) for gpu in scenario.gpus}
    for reading in scenario.readings():
        processes = [
            AttributedProcess(
                reading=process,
                facts=process.facts,
                holder=holder_of(process.facts, scenario.accounts),
                lease=leases.get(process.uuid),
                pool=scenario.pools.get(process.uuid),
            )
            for process in reading.processes
        ]
        yield Tick(
            t=reading.t,
            reading=reading,
            processes=processes,
            pool_devices=scenario.pools,
            idle_since=scenario.idle_since,
        )


def run(scenario: Scenario, detectors: Detectors | None = None) -> list[Alert]:
    detectors = detectors or Detectors(interval=scenario.interval)
    alerts: list[Alert] = []
    for tick in scenario_ticks(scenario):
        alerts.extend(detectors.check(tick))
    return alerts


# --- hand-built ticks --------------------------------------------------------------------


def device(uuid: str = UUID, index: int = 0, **values: object) -> DeviceReading:
    return DeviceReading(
        uuid=uuid,
        index=index,
        name="NVIDIA H100 80GB HBM3",
        parent=None,
        memory_total=85_520_809_984,
        **values,  # type: ignore[arg-type]
    )


def facts(
    pid: int,
    cmdline: Sequence[str],
    *,
    comm: str | None = None,
    cgroup: str | None = "/ztlab/ztl-alice",
    libraries: Sequence[str] = ("libc.so.6", "libcuda.so.1", "libtorch_cuda.so"),
) -> ProcessFacts:
    return ProcessFacts(
        pid=pid,
        uid=1001,
        comm=comm or cmdline[0].rsplit("/", 1)[-1][:15],
        cmdline=tuple(cmdline),
        cgroup=cgroup,
        libraries=tuple(libraries),
    )


ALICE = Holder(user="alice", server="", kind="server", account="ztl-alice", cgroup="ztl-alice")
BOB = Holder(user="bob", server="", kind="server", account="ztl-bob", cgroup="ztl-bob")
ALICE_LEASE = LeaseHold(lease="a1", user="alice", server="", pool="gpu", gpu="0")


def process(
    pid: int,
    *,
    uuid: str = UUID,
    holder: Holder | None = ALICE,
    lease: LeaseHold | None = ALICE_LEASE,
    pool: str | None = "gpu",
    known: ProcessFacts | None = None,
    cmdline: Sequence[str] = ("python", "train.py"),
    gone: bool = False,
) -> AttributedProcess:
    the_facts = None if gone else (known or facts(pid, cmdline))
    return AttributedProcess(
        reading=ProcessReading(pid=pid, uuid=uuid, used_memory=2**30, facts=the_facts),
        facts=the_facts,
        holder=holder,
        lease=lease,
        pool=pool,
    )


def tick(
    t: float,
    processes: Sequence[AttributedProcess] = (),
    devices: Sequence[DeviceReading] | None = None,
    *,
    pools: Mapping[str, str] | None = None,
    idle_since: Mapping[tuple[str, str], float | None] | None = None,
) -> Tick:
    devices = list(devices) if devices is not None else [device()]
    reading = Reading(t=t, devices=tuple(devices), processes=tuple(p.reading for p in processes))
    return Tick(
        t=t,
        reading=reading,
        processes=list(processes),
        pool_devices={UUID: "gpu"} if pools is None else pools,
        idle_since=idle_since or {},
    )


def kinds(alerts: Sequence[Alert]) -> list[str]:
    return [alert.kind for alert in alerts]


# --- the scenarios -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(gputraces.SCENARIOS))
def test_each_kind_fires_within_two_intervals_of_its_anomaly(kind: str) -> None:
    scenario = gputraces.SCENARIOS[kind]()
    assert scenario.kind == kind
    assert scenario.anomaly_t is not None
    alerts = run(scenario)
    assert kinds(alerts) == [kind], [alert.message for alert in alerts]
    (alert,) = alerts
    assert scenario.anomaly_t <= alert.t <= scenario.anomaly_t + 2 * scenario.interval
    assert alert.kind in ALERT_KINDS
    assert (alert.holder.user if alert.holder else None) == scenario.user
    assert alert.pid == scenario.pid
    assert alert.severity == ("warning" if kind in {"baseline", "idle_full_load"} else "critical")
    # one line for admins naming the device, the user and the process
    assert "\n" not in alert.message
    assert alert.uuid in alert.message
    if scenario.user is not None:
        assert f"user {scenario.user}" in alert.message
    if scenario.pid is not None:
        assert f"pid {scenario.pid}" in alert.message
    json.dumps(dict(alert.evidence))  # JSON-able


def test_evidence_of_the_scenarios() -> None:
    (miner,) = run(gputraces.miner())
    assert miner.evidence["signature"] == "name 'xmrig'"
    assert miner.evidence["process"]["cmdline"][0].endswith("xmrig")
    (unleased,) = run(gputraces.unleased_process())
    assert unleased.lease is not None
    assert unleased.lease.user == "bob"
    assert unleased.evidence["lease"]["user"] == "bob"
    assert unleased.evidence["holder"]["user"] == "alice"
    (outside,) = run(gputraces.outside_cgroup())
    assert outside.holder is None
    assert outside.evidence["process"]["cgroup"].startswith("/user.slice/")
    (xid,) = run(gputraces.xid_error())
    assert xid.evidence["xid"] == 79
    (ecc,) = run(gputraces.ecc_error())
    assert ecc.evidence["ecc_dbe"] == 1
    (idle,) = run(gputraces.idle_full_load())
    assert idle.evidence["idle_minutes"] >= 30
    assert idle.evidence["full_load_for_s"] >= 60 - 0.5


def test_baseline_scenario_evidence_names_the_transfer_volume() -> None:
    (alert,) = run(gputraces.baseline())
    metrics = alert.evidence["metrics"]
    assert set(metrics) == {"pcie_bytes"}
    assert metrics["pcie_bytes"]["baseline"] == "user"
    assert metrics["pcie_bytes"]["value"] > 15e9
    assert metrics["pcie_bytes"]["median"] < 2e9


def test_a_day_of_normal_training_raises_nothing() -> None:
    scenario = gputraces.normal_training(hours=24, gpus=1, interval=1.0)
    assert scenario.ticks == 86_400
    detectors = Detectors()
    alerts: list[Alert] = []
    busy = 0
    for each in scenario_ticks(scenario):
        busy += bool(each.processes)
        alerts.extend(detectors.check(each))
    assert alerts == [], [alert.message for alert in alerts]
    assert 55_000 < busy < 62_000  # a night without jobs
    # the baselines learned the training, with the checkpoints as usual peaks
    limit = detectors.baselines.limit("alice", "pcie_bytes", scenario.start + 86_400)
    assert limit.source == "user"
    assert limit.stats.peak > 10e9


def test_normal_training_has_the_structure_it_claims() -> None:
    scenario = gputraces.normal_training(hours=3, gpus=2)
    utils = []
    tx = []
    energy = []
    for reading in scenario.readings():
        first = reading.devices[0]
        utils.append(first.gpu_util or 0)
        tx.append(first.pcie_tx or 0)
        energy.append(first.energy_mj or 0)
        assert first.power_w is not None
        assert 60 <= first.power_w <= 700
    assert energy == sorted(energy)
    steady = utils[600:6000]
    assert sum(85 <= u <= 100 for u in steady) > 0.8 * len(steady)
    assert sum(45 <= u <= 65 for u in steady) > 60  # an evaluation
    assert sum(value > 8e9 for value in tx) >= 3  # checkpoint writes
    assert list(scenario.readings())[:50] == list(scenario.readings())[:50]  # deterministic


def test_traces_are_replayable() -> None:
    for make in (*gputraces.SCENARIOS.values(), gputraces.eight_gpu_steady):
        scenario = make()
        document = json.loads(json.dumps(scenario.trace(limit=5)))
        times = iter(scenario.start + i * scenario.interval for i in range(5))
        source = ReplayedTelemetry(ReplayedNvml.from_dict(document), clock=times.__next__)
        for expected in list(scenario.readings())[:5]:
            replayed = source.read()
            assert replayed.t == expected.t
            assert [p.facts for p in replayed.processes] == [p.facts for p in expected.processes]
            for ours in expected.devices:
                theirs = replayed.device(ours.uuid)
                assert theirs is not None
                assert (theirs.power_w, theirs.pcie_tx, theirs.ecc_dbe, theirs.xid) == (
                    ours.power_w,
                    ours.pcie_tx,
                    ours.ecc_dbe,
                    ours.xid,
                )


def test_eight_gpu_steady_is_quiet() -> None:
    scenario = gputraces.eight_gpu_steady(seconds=120)
    first = next(scenario.readings())
    assert len(first.devices) == 8
    assert len(first.processes) == 16
    assert run(scenario) == []


# --- once while it lasts, again when it comes back ---------------------------------------


def test_a_persisting_condition_fires_once_and_again_after_clearing() -> None:
    detectors = Detectors()
    intruder = process(7, holder=BOB, lease=ALICE_LEASE)
    fired = [kinds(detectors.check(tick(START + i, [intruder]))) for i in range(5)]
    assert fired == [["unleased_process"], [], [], [], []]
    assert detectors.check(tick(START + 5, [])) == []
    assert kinds(detectors.check(tick(START + 6, [intruder]))) == ["unleased_process"]


def test_unleased_process_cases() -> None:
    detectors = Detectors()
    own = process(1, holder=ALICE, lease=ALICE_LEASE)
    unleased = process(2, holder=ALICE, lease=None)
    other_server = process(
        3,
        holder=replace(ALICE, server="cluster-0123456789abcdef", kind="cluster"),
        lease=ALICE_LEASE,
    )
    off_pool = process(4, uuid=UUID1, holder=BOB, lease=None, pool=None)
    alerts = detectors.check(
        tick(
            START,
            [own, unleased, other_server, off_pool],
            [device(), device(UUID1, 1)],
        )
    )
    assert sorted((a.kind, a.pid) for a in alerts) == [
        ("unleased_process", 2),
        ("unleased_process", 3),
    ]
    (no_lease,) = [a for a in alerts if a.pid == 2]
    assert "the GPU is not leased" in no_lease.message


def test_outside_cgroup_counts_unknown_processes_only_on_two_ticks() -> None:
    detectors = Detectors()
    # a process gone before /proc was read, seen once: nothing
    assert detectors.check(tick(START, [process(9, holder=None, gone=True)])) == []
    assert detectors.check(tick(START + 1, [])) == []
    assert detectors.check(tick(START + 2, [process(9, holder=None, gone=True)])) == []
    (alert,) = detectors.check(tick(START + 3, [process(9, holder=None, gone=True)]))
    assert alert.kind == "outside_cgroup"
    assert "gone before it was read" in alert.message
    # a known process outside fires at once, also on an unleased pool GPU
    outsider = process(
        10, holder=None, lease=None, known=facts(10, ["python3", "x.py"], cgroup="/user.slice")
    )
    (alert,) = detectors.check(tick(START + 4, [outsider]))
    assert alert.kind == "outside_cgroup"
    # and not on a GPU outside the pools
    free = replace(outsider, pool=None)
    assert Detectors().check(tick(START, [free], pools={})) == []


def test_pool_of_a_mig_device_is_its_parents() -> None:
    mig = "MIG-22222222-2222-2222-2222-222222222222"
    reading = device(mig, 0, gpu_util=None)
    reading = replace(reading, parent=UUID)
    outsider = process(5, uuid=mig, holder=None, lease=None, pool=None)
    (alert,) = Detectors().check(tick(START, [outsider], [device(), reading]))
    assert alert.kind == "outside_cgroup"
    assert alert.uuid == mig


# --- miners ------------------------------------------------------------------------------

NORMAL_PROCESSES = [
    ["python", "train.py", "--epochs", "10"],
    ["/opt/conda/bin/python", "-m", "ipykernel_launcher", "-f", "/tmp/kernel-1a2b.json"],
    ["python", "-m", "distributed.cli.dask_worker", "tls://10.0.0.5:8786", "--nthreads", "4"],
    ["/usr/bin/python3", "-m", "torch.distributed.run", "--nproc-per-node=8", "pretrain.py"],
    ["python", "rl.py", "--algo", "ppo", "--env", "CartPole-v1"],
    ["python", "-a", "resnet50", "imagenet_train.py"],
    ["python", "hard_negative_miner.py", "--data", "/data/coco"],
    ["python", "/home/alice/projects/miner-analysis/plots.py"],
    ["jupyter-lab", "--no-browser"],
    ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/llama"],
    ["python", "-c", "import torch; torch.randn(10, device='cuda')"],
    ["bash", "-c", "python train.py --lr 3e-4 2>&1 | tee log.txt"],
    ["python", "ethereum_price_forecast.py", "--dataset", "eth.csv"],
]


@pytest.mark.parametrize("cmdline", NORMAL_PROCESSES, ids=lambda c: " ".join(c)[:40])
def test_ordinary_ml_processes_are_not_miners(cmdline: list[str]) -> None:
    libraries = ("libc.so.6", "libcuda.so.1", "libcudnn.so.9", "libnccl.so.2", "libtorch_cuda.so")
    assert match_miner(facts(1, cmdline, libraries=libraries)) is None


@pytest.mark.parametrize(
    ("cmdline", "comm", "libraries", "found"),
    [
        (["./xmrig", "--donate-level", "1"], None, (), "name 'xmrig'"),
        (["/opt/t-rex-0.26.8/t-rex", "-c", "config.json"], "t-rex", (), "name 't-rex'"),
        (["/opt/m/lolMiner", "--pool", "x"], None, (), "name 'lolMiner'"),
        (["/opt/m/PhoenixMiner_6.2c"], "PhoenixMiner_6.", (), "name 'PhoenixMiner_6.'"),
        (["python", "run.py", "-o", "stratum+tcp://eu.pool:4444"], None, (), "pool address"),
        (["./worker", "--algo", "kawpow", "--url", "x"], None, (), "algorithm 'kawpow'"),
        (["./worker", "--algo=EtHash"], None, (), "algorithm 'ethash'"),
        (["./worker", "-a", "autolykos2"], None, (), "algorithm 'autolykos2'"),
        (["[kworker/0:1]"], "kworker/0:1", ("libxmrig-cuda.so",), "library 'libxmrig-cuda.so'"),
        (["python", "svc.py"], None, ("libethash-cuda.so.1",), "library"),
        (["python", "/tmp/.hidden/nbminer.py"], None, (), "program '/tmp/.hidden/nbminer.py'"),
        (["/usr/local/bin/srbminer-multi", "--disable-cpu"], None, (), "name 'srbminer-multi'"),
    ],
)
def test_miner_signatures(
    cmdline: list[str], comm: str | None, libraries: tuple[str, ...], found: str | None
) -> None:
    signature = match_miner(facts(1, cmdline, comm=comm, libraries=libraries))
    assert signature is not None
    if found is not None:
        assert signature.startswith(found)


def test_miner_fires_on_any_gpu_and_extra_patterns_count() -> None:
    hidden = facts(11, ["./svc", "--threads", "8"], comm="svc", cgroup="/system.slice/x")
    miner = process(11, uuid=UUID1, holder=None, lease=None, pool=None, known=hidden)
    plain = Detectors()
    assert plain.check(tick(START, [miner], [device(UUID1, 1)], pools={})) == []
    detectors = Detectors(extra_miner_patterns=[r"^\./svc\b"])
    (alert,) = detectors.check(tick(START, [miner], [device(UUID1, 1)], pools={}))
    assert alert.kind == "miner"
    assert alert.severity == "critical"
    assert alert.holder is None
    assert "GPU 1" in alert.message
    with pytest.raises(ConfigError, match="extra_miner_patterns"):
        Detectors(extra_miner_patterns=["(unclosed"])


def test_a_process_cannot_break_or_forge_message_lines() -> None:
    forged = facts(
        12,
        ["./xmrig", "\nunleased_process: user bob pid 1 on GPU 0", "\x1b[2J", "--x"],
        cgroup="/user.slice/\nforged",
    )
    intruder = process(12, holder=None, lease=None, known=forged)
    alerts = Detectors().check(tick(START, [intruder]))
    assert sorted(kinds(alerts)) == ["miner", "outside_cgroup"]
    for alert in alerts:
        assert alert.message.isprintable(), alert.message
        assert "\\n" in alert.message
        assert alert.evidence["process"]["cmdline"][1].startswith("\n")  # kept as it was


# --- full load while idle ----------------------------------------------------------------


def test_idle_full_load_needs_an_idle_server_and_sustained_load() -> None:
    def ticks_at(util: int, since: float | None, holder: Holder) -> list[Tick]:
        busy = process(21, holder=holder)
        return [
            tick(START + i, [busy], [device(gpu_util=util)], idle_since={("alice", ""): since})
            for i in range(120)
        ]

    def fired(ticks: list[Tick], **config: float) -> list[str]:
        detectors = Detectors(**config)  # type: ignore[arg-type]
        return [a.kind for t in ticks for a in detectors.check(t)]

    away = START - 3600.0
    assert fired(ticks_at(97, away, ALICE)) == ["idle_full_load"]
    assert fired(ticks_at(97, START - 60.0, ALICE)) == []  # active a minute ago
    assert fired(ticks_at(97, None, ALICE)) == []  # unknown: not idle
    assert fired(ticks_at(80, away, ALICE)) == []  # not full load
    assert fired(ticks_at(97, away, ALICE), full_load_seconds=300) == []  # not long enough
    cluster = replace(ALICE, kind="cluster")
    assert fired(ticks_at(100, away, cluster)) == []  # clusters run without their user


def test_idle_full_load_fires_after_full_load_seconds_and_tolerates_noise() -> None:
    detectors = Detectors()
    busy = process(21)
    alerts = []
    for i in range(200):
        util = 30 if i < 50 else (86 if i % 7 == 0 else 96)  # dips of noise
        each = tick(
            START + i, [busy], [device(gpu_util=util)], idle_since={("alice", ""): START - 7200}
        )
        alerts += [(alert.t - START, alert.kind) for alert in detectors.check(each)]
    assert alerts == [(110.0, "idle_full_load")]


# --- baselines on hand-built ticks --------------------------------------------------------


def test_baseline_needs_two_consecutive_samples_and_fires_once() -> None:
    detectors = Detectors(baseline_min_samples=600)
    alerts: list[tuple[float, str]] = []

    def step(i: int, power: float) -> None:
        each = tick(START + i, [process(31)], [device(gpu_util=30, power_w=power)])
        alerts.extend((alert.t - START, alert.kind) for alert in detectors.check(each))

    for i in range(1200):
        step(i, 150.0 + (i % 5))
    step(1200, 450.0)  # a single spike
    step(1201, 152.0)
    assert alerts == []
    for i in range(1202, 1260):
        step(i, 450.0)  # sustained
    assert alerts == [(1203.0, "baseline")]


def test_new_user_is_judged_by_the_generic_baseline() -> None:
    detectors = Detectors(baseline_min_samples=600)
    bob = process(41, uuid=UUID1, holder=BOB, lease=None, pool=None)
    for i in range(900):
        detectors.check(tick(START + i, [bob], [device(UUID1, 1, power_w=200.0 + i % 3)]))
    carol = replace(ALICE, user="carol", account="ztl-carol", cgroup="ztl-carol")
    newcomer = process(42, holder=carol, lease=None, pool=None)
    found = []
    for i in range(900, 905):
        each = tick(
            START + i,
            [bob, newcomer],
            [device(power_w=650.0), device(UUID1, 1, power_w=201.0)],
            pools={},
        )
        found += detectors.check(each)
    (alert,) = found
    assert alert.holder == carol
    assert alert.evidence["metrics"]["power_w"]["baseline"] == "generic"
    assert "user carol" in alert.message
    assert "pid 42" in alert.message


# --- XID and ECC -------------------------------------------------------------------------


def test_xid_severity_and_repetition() -> None:
    detectors = Detectors()

    def xid(t: float, *codes: int) -> list[Alert]:
        return detectors.check(tick(t, [], [device(xid=codes)]))

    (warning,) = xid(START, 13)
    assert warning.severity == "warning"
    assert "XID 13" in warning.message
    assert xid(START + 1, 13) == []  # the same error reported again: no new alert
    (critical,) = xid(START + 2, 13, 79)
    assert critical.severity == "critical"
    assert "fallen off the bus" in critical.message
    assert xid(START + 3) == []
    assert [a.evidence["xid"] for a in xid(START + 4, 13)] == [13]  # back again
    (unknown,) = xid(START + 5, 999)
    assert unknown.severity == "warning"


def test_ecc_double_bit_each_increase_and_single_bit_rate() -> None:
    detectors = Detectors(ecc_sbe_threshold=100)

    def ecc(t: float, sbe: int, dbe: int) -> list[Alert]:
        return detectors.check(tick(t, [], [device(ecc_mode=True, ecc_sbe=sbe, ecc_dbe=dbe)]))

    assert ecc(START, 5, 2) == []  # the counts it starts with are not new
    (first,) = ecc(START + 1, 5, 3)
    assert (first.severity, first.evidence["ecc_dbe"]) == ("critical", 3)
    assert ecc(START + 2, 5, 3) == []
    (second,) = ecc(START + 3, 5, 4)
    assert second.evidence["ecc_dbe_before"] == 3
    t = START + 10
    count = 5
    for minute in range(3 * 60):  # 81 new single-bit errors an hour: below the threshold
        t += 60
        count += 1 if minute % 60 < 39 else 2
        assert ecc(t, count, 4) == []
    # then 100 within ten minutes
    (burst,) = [
        a for step in range(10) for a in ecc(t + 60 * (step + 1), count + 10 * (step + 1), 4)
    ]
    assert burst.severity == "warning"
    assert burst.evidence["ecc_sbe_new_in_hour"] >= 100
    # a driver reload resets the counters: nothing new
    assert ecc(t + 3600 * 3, 0, 0) == []


def test_configuration_is_checked() -> None:
    with pytest.raises(ConfigError, match="interval"):
        Detectors(interval=0)
    with pytest.raises(ConfigError, match="full_load_percent"):
        Detectors(full_load_percent=120)
