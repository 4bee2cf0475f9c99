"""Synthetic GPU traces for the GPU monitor's tests, benchmarks and end-to-end runs.

Every generator here builds a :class:`Scenario` deterministically (a seeded
:class:`random.Random`): the readings a sampler would take, one per ``interval``, as
:class:`~ztlab.hub.monitor.telemetry.Reading` values (with the synthetic PIDs' facts filled
in), and the same as a ``ztlab-nvml-trace/1`` document (:meth:`Scenario.trace`) that
:class:`~ztlab.hub.gpu.nvml.ReplayedNvml` replays.

- :func:`normal_training`: a day of one user's training on a pool cluster, with realistic
  structure (warm-up with the model load, 85-99 % utilization with noise, evaluation dips every
  30-60 minutes, dataloader stalls, checkpoint writes with PCIe bursts about every 30 minutes,
  power following utilization, a growing energy counter, a night with nothing running, then a
  new job). No detector should fire on it.
- one scenario per alert kind (:data:`SCENARIOS`): :func:`unleased_process`,
  :func:`outside_cgroup`, :func:`miner`, :func:`baseline`, :func:`idle_full_load`,
  :func:`xid_error`, :func:`ecc_error`; each knows when its anomaly starts and which alert it
  should raise, for whom.
- :func:`eight_gpu_steady`: 8 GPUs with 2 processes each, for the sampler's benchmark.

Attribution is not done here: a scenario describes holders as the control plane would create
them, by the cgroup path in each process's facts (``/ztlab/ztl-alice`` for alice's server,
``/ztlab/ztl-alice-<16 hex>-0`` for a cluster worker, ``/user.slice/...`` outside), and lists
``accounts`` (Unix account -> user), ``leases`` and ``pools`` for the attribution to use.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ztlab.hub.monitor.findings import LeaseHold
from ztlab.hub.monitor.sources import snapshot_json
from ztlab.hub.monitor.telemetry import DeviceReading, ProcessFacts, ProcessReading, Reading

__all__ = [
    "SCENARIOS",
    "START",
    "GpuInfo",
    "Scenario",
    "baseline",
    "ecc_error",
    "eight_gpu_steady",
    "idle_full_load",
    "miner",
    "normal_training",
    "outside_cgroup",
    "unleased_process",
    "xid_error",
]

#: POSIX seconds of every scenario's first reading (2026-01-01 00:00 UTC)
START: Final = 1_767_225_600.0
TRACE_FORMAT: Final = "ztlab-nvml-trace/1"
_H100: Final = "NVIDIA H100 80GB HBM3"
_H100_MEMORY: Final = 85_520_809_984
_GB: Final = 1_000_000_000
_IDLE_W: Final = 68.0
_MAX_W: Final = 700.0
_BASE_MEMORY: Final = 520 * 2**20
_TORCH_LIBRARIES: Final = (
    "libc.so.6",
    "libcuda.so.1",
    "libcudart.so.12",
    "libcublas.so.12",
    "libnccl.so.2",
    "libtorch_cuda.so",
)
_UIDS: Final = {"alice": 1001, "bob": 1002, "carol": 1003, "dave": 1004}


# --------------------------------------------------------------------------------------
# What a scenario is
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuInfo:
    """A GPU of a scenario, as a trace's ``devices`` lists it."""

    index: int
    uuid: str
    name: str = _H100
    memory_total: int = _H100_MEMORY


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """A synthetic trace and what the monitor should make of it.

    ``anomaly_t`` is when the anomaly's condition holds under the default
    :class:`~ztlab.hub.monitor.detectors.Detectors` settings (for ``idle_full_load``: once the
    user has been idle 30 minutes and the load lasted 60 s); a detector should raise ``kind``
    for ``user`` (``None``: a process without holder) and ``pid`` within two intervals of it.
    """

    name: str
    description: str
    #: seconds between readings
    interval: float
    #: POSIX seconds of the first reading
    start: float
    #: how many readings
    ticks: int
    gpus: tuple[GpuInfo, ...]
    #: the alert kind expected (``None``: none should fire)
    kind: str | None
    #: POSIX seconds the anomaly starts (``None``: no anomaly)
    anomaly_t: float | None
    #: the user the alert should name (``None``: no holder)
    user: str | None
    #: the process the alert should name (``None``: a device-level alert)
    pid: int | None
    #: device UUID -> pool, for every pool GPU
    pools: Mapping[str, str]
    #: the leases held throughout the scenario
    leases: tuple[LeaseHold, ...]
    #: Unix account -> hub user
    accounts: Mapping[str, str]
    #: ``(user, server)`` -> when that server last saw its user active (constant here)
    idle_since: Mapping[tuple[str, str], float | None] = field(default_factory=dict)
    #: makes the readings (a fresh, identical sequence on every call)
    build: Callable[[], Iterator[Reading]] = field(repr=False)

    def readings(self) -> Iterator[Reading]:
        """The readings, one per tick, in time order."""
        return self.build()

    def lease_on(self, uuid: str) -> LeaseHold | None:
        """The lease the device ``uuid`` is under, if any."""
        index = next((gpu.index for gpu in self.gpus if gpu.uuid == uuid), None)
        return next((lease for lease in self.leases if lease.gpu == str(index)), None)

    def trace(self, *, limit: int | None = None) -> dict[str, Any]:
        """The scenario as a ``ztlab-nvml-trace/1`` document (the first ``limit`` ticks)."""
        snapshots = []
        for number, reading in enumerate(self.readings()):
            if limit is not None and number >= limit:
                break
            snapshots.append(snapshot_json(reading, self.start))
        return {
            "format": TRACE_FORMAT,
            "description": f"synthetic ({self.name}): {self.description}",
            "devices": [
                {
                    "index": gpu.index,
                    "uuid": gpu.uuid,
                    "name": gpu.name,
                    "memory_total": gpu.memory_total,
                    "minor_number": gpu.index,
                    "mig": [],
                }
                for gpu in self.gpus
            ],
            "snapshots": snapshots,
        }


# --------------------------------------------------------------------------------------
# Load profiles: what one process does to its GPU at each tick
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Load:
    """One process's share of a GPU at one tick."""

    util: float
    memory: int
    tx: float = 0.0
    rx: float = 0.0
    #: watts beyond what the utilization explains (a power-hungry kernel)
    extra_w: float = 0.0


class _Profile:
    """How a process loads its GPU over time (called in time order)."""

    def sample(self, t: float, rng: random.Random) -> _Load:
        raise NotImplementedError


class _TrainingJob:
    """A training job's schedule, shared by its ranks: warm-up, evaluations, checkpoints."""

    def __init__(self, *, start: float, rng: random.Random) -> None:
        self.start = start
        self.base = rng.uniform(90.0, 96.0)
        self.rx = rng.uniform(1.5, 2.5) * _GB
        self.tx = rng.uniform(0.1, 0.3) * _GB
        self.link = rng.uniform(11.0, 13.0) * _GB
        self.memory = int(rng.uniform(60.0, 75.0) * _GB)
        self.load_end = start + rng.uniform(4.0, 8.0)
        self.warm_end = self.load_end + rng.uniform(120.0, 300.0)
        self.eval_start = start + rng.uniform(1800.0, 3600.0)
        self.eval_end = self.eval_start + rng.uniform(120.0, 300.0)
        self.ckpt_start = start + rng.uniform(1700.0, 1900.0)
        self.ckpt_end = self.ckpt_start + rng.uniform(4.0, 10.0)
        self.ckpt_rate = self.link * rng.uniform(0.95, 1.05)
        self.stall_end = 0.0
        self._at: float | None = None
        self._phase = "train"

    def phase(self, t: float, rng: random.Random) -> str:
        """``load``, ``warmup``, ``train``, ``eval``, ``checkpoint`` or ``stall`` at ``t``."""
        if self._at == t:
            return self._phase
        self._at = t
        self._phase = self._next_phase(t, rng)
        return self._phase

    def _next_phase(self, t: float, rng: random.Random) -> str:
        if t < self.load_end:
            return "load"
        if t < self.warm_end:
            return "warmup"
        if t >= self.ckpt_end:
            self.ckpt_start = t + rng.uniform(1700.0, 1900.0)
            self.ckpt_end = self.ckpt_start + rng.uniform(4.0, 10.0)
            self.ckpt_rate = self.link * rng.uniform(0.95, 1.05)
        if t >= self.ckpt_start:
            return "checkpoint"
        if t >= self.eval_end:
            self.eval_start = t + rng.uniform(1800.0, 3600.0)
            self.eval_end = self.eval_start + rng.uniform(120.0, 300.0)
        if t >= self.eval_start:
            return "eval"
        if t < self.stall_end:
            return "stall"
        if rng.random() < 1.0 / 900.0:
            self.stall_end = t + rng.uniform(3.0, 20.0)
            return "stall"
        return "train"


class _TrainingRank(_Profile):
    """One rank (one GPU) of a :class:`_TrainingJob`."""

    def __init__(self, job: _TrainingJob) -> None:
        self.job = job

    def sample(self, t: float, rng: random.Random) -> _Load:
        job = self.job
        phase = job.phase(t, rng)
        noise = rng.gauss(0.0, 2.5)
        rx = job.rx * rng.uniform(0.9, 1.1)
        tx = job.tx * rng.uniform(0.8, 1.2)
        if phase == "load":
            ramp = (t - job.start) / max(job.load_end - job.start, 1.0)
            return _Load(util=2.0, memory=int(job.memory * 0.3 * ramp), rx=job.link, tx=0.0)
        if phase == "warmup":
            ramp = (t - job.load_end) / (job.warm_end - job.load_end)
            memory = int(job.memory * (0.3 + 0.7 * ramp))
            return _Load(util=job.base * ramp + noise, memory=memory, rx=rx * ramp, tx=tx * ramp)
        if phase == "checkpoint":
            return _Load(util=rng.uniform(5.0, 20.0), memory=job.memory, tx=job.ckpt_rate, rx=rx)
        if phase == "eval":
            return _Load(util=rng.uniform(45.0, 65.0), memory=job.memory, rx=rx * 1.1, tx=tx)
        if phase == "stall":
            return _Load(util=rng.uniform(0.0, 30.0), memory=job.memory, rx=rx * 0.3, tx=tx * 0.3)
        return _Load(util=job.base + noise, memory=job.memory, rx=rx, tx=tx)


class _Notebook(_Profile):
    """Interactive work in a notebook kernel: cells of GPU work between pauses."""

    def __init__(self, *, rng: random.Random, scale: float = 1.0) -> None:
        self.scale = scale
        self.memory = int(rng.uniform(6.0, 14.0) * _GB)
        self.until = 0.0
        self.busy = False
        self.level = 0.0

    def sample(self, t: float, rng: random.Random) -> _Load:
        if t >= self.until:
            self.busy = not self.busy
            self.until = t + (rng.uniform(10.0, 120.0) if self.busy else rng.uniform(5.0, 90.0))
            self.level = rng.uniform(25.0, 60.0) if self.busy else rng.uniform(0.0, 4.0)
        util = max(self.level + rng.gauss(0.0, 3.0), 0.0) * self.scale
        rx = (0.9 if self.busy else 0.05) * _GB * rng.uniform(0.5, 1.5) * self.scale
        tx = (0.2 if self.busy else 0.01) * _GB * rng.uniform(0.5, 1.5) * self.scale
        return _Load(util=util, memory=self.memory, rx=rx, tx=tx)


class _Steady(_Profile):
    """A constant load with noise."""

    def __init__(
        self, *, util: float, memory: int, tx: float = 0.0, rx: float = 0.0, extra_w: float = 0.0
    ) -> None:
        self.load = _Load(util=util, memory=memory, tx=tx, rx=rx, extra_w=extra_w)

    def sample(self, t: float, rng: random.Random) -> _Load:
        load = self.load
        return _Load(
            util=load.util + rng.gauss(0.0, 1.0),
            memory=load.memory,
            tx=load.tx * rng.uniform(0.95, 1.05),
            rx=load.rx * rng.uniform(0.95, 1.05),
            extra_w=load.extra_w,
        )


class _Switch(_Profile):
    """One profile until ``at``, another from then on."""

    def __init__(self, before: _Profile, after: _Profile, at: float) -> None:
        self.before = before
        self.after = after
        self.at = at

    def sample(self, t: float, rng: random.Random) -> _Load:
        return (self.after if t >= self.at else self.before).sample(t, rng)


# --------------------------------------------------------------------------------------
# Processes and devices, and the engine that samples them
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Process:
    """A process of a scenario: its facts, its GPU, its lifetime and its load."""

    facts: ProcessFacts
    gpu: int
    start: float
    end: float
    profile: _Profile
    #: whether its facts are known (``False``: gone before ``/proc`` was read)
    known: bool = True


@dataclass(slots=True, kw_only=True)
class _DeviceEvents:
    """What happens to a GPU beyond its load: XID errors and ECC counts, by tick."""

    xid: dict[int, tuple[int, ...]] = field(default_factory=dict)
    #: tick -> ECC double-bit count from then on
    dbe: dict[int, int] = field(default_factory=dict)
    #: tick -> single-bit errors added at that tick
    sbe: dict[int, int] = field(default_factory=dict)


def _rng(seed: str) -> random.Random:
    """A seeded generator: the same scenario every time (synthetic data, no secrets)."""
    return random.Random(seed)  # noqa: S311 - deterministic test data


def _gpus(rng: random.Random, count: int) -> tuple[GpuInfo, ...]:
    def uuid() -> str:
        bits = rng.getrandbits(128)
        text = f"{bits:032x}"
        return f"GPU-{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"

    return tuple(GpuInfo(index=i, uuid=uuid()) for i in range(count))


def _engine(
    *,
    seed: str,
    gpus: Sequence[GpuInfo],
    processes: Callable[[random.Random], Sequence[_Process]],
    ticks: int,
    interval: float,
    events: Mapping[int, _DeviceEvents] | None = None,
) -> Callable[[], Iterator[Reading]]:
    """A factory of the readings: fresh random state on every call, so identical runs."""

    def build() -> Iterator[Reading]:
        rng = _rng(seed)
        return _run(rng, gpus, processes(rng), ticks, interval, events or {})

    return build


def _run(
    rng: random.Random,
    gpus: Sequence[GpuInfo],
    processes: Sequence[_Process],
    ticks: int,
    interval: float,
    events: Mapping[int, _DeviceEvents],
) -> Iterator[Reading]:
    energy = [rng.randrange(10**9, 10**11) for _ in gpus]
    sbe = [0 for _ in gpus]
    dbe = [0 for _ in gpus]
    for tick in range(ticks):
        t = START + tick * interval
        loads: list[list[_Load]] = [[] for _ in gpus]
        readings: list[ProcessReading] = []
        for process in processes:
            if not process.start <= t < process.end:
                continue
            load = process.profile.sample(t, rng)
            load.util = min(max(load.util, 0.0), 100.0)
            loads[process.gpu].append(load)
            readings.append(
                ProcessReading(
                    pid=process.facts.pid,
                    uuid=gpus[process.gpu].uuid,
                    used_memory=load.memory,
                    sm_util=round(load.util),
                    facts=process.facts if process.known else None,
                )
            )
        devices = []
        for gpu in gpus:
            happening = events.get(gpu.index)
            xid: tuple[int, ...] = ()
            if happening is not None:
                xid = happening.xid.get(tick, ())
                dbe[gpu.index] = happening.dbe.get(tick, dbe[gpu.index])
                sbe[gpu.index] += happening.sbe.get(tick, 0)
            device, joules = _device(rng, gpu, loads[gpu.index], interval)
            energy[gpu.index] += joules
            devices.append(
                _with_counters(device, energy[gpu.index], xid, sbe[gpu.index], dbe[gpu.index])
            )
        yield Reading(t=t, devices=tuple(devices), processes=tuple(readings))


def _device(
    rng: random.Random, gpu: GpuInfo, loads: Sequence[_Load], interval: float
) -> tuple[dict[str, Any], int]:
    """A GPU's values from its processes' loads, and the millijoules of this interval."""
    util = min(sum(load.util for load in loads), 100.0)
    extra = sum(load.extra_w for load in loads)
    power = _IDLE_W + (_MAX_W - 90.0 - _IDLE_W) * util / 100.0 + extra + rng.gauss(0.0, 6.0)
    power = min(max(power, _IDLE_W - 5.0), _MAX_W)
    tx = sum(load.tx for load in loads) + rng.uniform(1e3, 5e4)
    rx = sum(load.rx for load in loads) + rng.uniform(1e3, 5e4)
    busy = util > 1.0
    values = {
        "uuid": gpu.uuid,
        "index": gpu.index,
        "name": gpu.name,
        "memory_total": gpu.memory_total,
        "gpu_util": round(util),
        "mem_util": min(round(util * 0.45 + rng.uniform(0.0, 3.0)), 100),
        "fb_used": _BASE_MEMORY + sum(load.memory for load in loads),
        "power_w": round(power, 2),
        "pcie_tx": int(tx),
        "pcie_rx": int(rx),
        "temperature_c": round(32 + 0.38 * util + rng.uniform(-1.0, 1.0)),
        "sm_clock_mhz": 1980 if busy else 345,
    }
    return values, int(power * interval * 1000)


def _with_counters(
    values: dict[str, Any], energy: int, xid: tuple[int, ...], sbe: int, dbe: int
) -> DeviceReading:
    return DeviceReading(
        **values,
        parent=None,
        energy_mj=energy,
        xid=xid,
        ecc_mode=True,
        ecc_sbe=sbe,
        ecc_dbe=dbe,
    )


# --------------------------------------------------------------------------------------
# Facts of typical processes
# --------------------------------------------------------------------------------------


def _facts(
    pid: int,
    user: str,
    cgroup: str,
    cmdline: Sequence[str],
    *,
    comm: str | None = None,
    libraries: Sequence[str] = _TORCH_LIBRARIES,
    uid: int | None = None,
) -> ProcessFacts:
    program = cmdline[0].rsplit("/", 1)[-1]
    return ProcessFacts(
        pid=pid,
        uid=_UIDS.get(user, 1099) if uid is None else uid,
        comm=(comm or program)[:15],
        cmdline=tuple(cmdline),
        cgroup=cgroup,
        libraries=tuple(libraries),
    )


def _kernel(pid: int, user: str) -> ProcessFacts:
    connection = f"/home/{user}/.local/share/jupyter/runtime/kernel-{pid:x}a1-4c2e.json"
    return _facts(
        pid,
        user,
        f"/ztlab/ztl-{user}",
        ["/opt/conda/bin/python", "-m", "ipykernel_launcher", "-f", connection],
    )


def _server_cgroup(user: str) -> str:
    return f"/ztlab/ztl-{user}"


def _server_lease(rng: random.Random, user: str, gpu: int, *, pool: str = "gpu") -> LeaseHold:
    return LeaseHold(
        lease=f"{rng.getrandbits(64):016x}", user=user, server="", pool=pool, gpu=str(gpu)
    )


def _accounts(*users: str) -> dict[str, str]:
    return {f"ztl-{user}": user for user in users}


def _ticks(seconds: float, interval: float) -> int:
    return max(1, math.ceil(seconds / interval))


# --------------------------------------------------------------------------------------
# The scenarios
# --------------------------------------------------------------------------------------


def normal_training(
    hours: float = 24.0, gpus: int = 1, interval: float = 1.0, seed: int = 7
) -> Scenario:
    """A day of alice's training on a pool cluster: nothing should fire.

    Job one runs from the start to 58 % of ``hours`` (warm-up, steady 85-99 % utilization,
    evaluation dips, dataloader stalls, checkpoints), nothing runs until 90 %, then a new job
    starts in the same cluster. One process (rank) per GPU, with DDP-like shared phases.
    """
    name = "normal_training"
    rng = _rng(f"{name}:{seed}:setup")
    devices = _gpus(rng, gpus)
    cluster = f"{rng.getrandbits(64):016x}"
    span = hours * 3600.0
    jobs = ((START, START + 0.58 * span), (START + 0.90 * span, START + span + interval))
    leases = tuple(
        LeaseHold(
            lease=f"{rng.getrandbits(64):016x}",
            user="alice",
            server=f"cluster-{cluster}",
            pool="train",
            gpu=str(gpu.index),
        )
        for gpu in devices
    )

    def processes(rng: random.Random) -> list[_Process]:
        found = []
        pid = 40_000
        for number, (begin, end) in enumerate(jobs):
            job = _TrainingJob(start=begin, rng=rng)
            for gpu in devices:
                pid += 1
                facts = _facts(
                    pid,
                    "alice",
                    f"/ztlab/ztl-alice-{cluster}-0",
                    [
                        "/opt/conda/bin/python",
                        "-u",
                        "train.py",
                        "--config",
                        f"configs/run{number}.yaml",
                        f"--local-rank={gpu.index}",
                    ],
                )
                found.append(
                    _Process(
                        facts=facts, gpu=gpu.index, start=begin, end=end, profile=_TrainingRank(job)
                    )
                )
        return found

    return Scenario(
        name=name,
        description=f"{hours:g} h of training on {gpus} GPU(s), a night off, a new job",
        interval=interval,
        start=START,
        ticks=_ticks(span, interval),
        gpus=devices,
        kind=None,
        anomaly_t=None,
        user=None,
        pid=None,
        pools={gpu.uuid: "train" for gpu in devices},
        leases=leases,
        accounts=_accounts("alice"),
        idle_since={("alice", f"cluster-{cluster}"): START},
        build=_engine(
            seed=f"{name}:{seed}",
            gpus=devices,
            processes=processes,
            ticks=_ticks(span, interval),
            interval=interval,
        ),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class _Setup:
    """The common ground of the alert scenarios: two pool GPUs, alice's and bob's servers."""

    gpus: tuple[GpuInfo, ...]
    leases: tuple[LeaseHold, ...]
    background: Callable[[random.Random, float], list[_Process]]


def _two_servers(name: str, seed: int) -> _Setup:
    """GPU 0 leased to alice's server (a notebook kernel), GPU 1 to bob's (a training)."""
    rng = _rng(f"{name}:{seed}:setup")
    devices = _gpus(rng, 2)
    leases = (_server_lease(rng, "alice", 0), _server_lease(rng, "bob", 1))

    def background(rng: random.Random, end: float) -> list[_Process]:
        bob = _facts(
            2202,
            "bob",
            _server_cgroup("bob"),
            ["python", "-m", "torch.distributed.run", "--nproc-per-node=1", "finetune.py"],
        )
        return [
            _Process(
                facts=_kernel(1101, "alice"),
                gpu=0,
                start=START,
                end=end,
                profile=_Notebook(rng=rng),
            ),
            _Process(
                facts=bob,
                gpu=1,
                start=START,
                end=end,
                profile=_TrainingRank(_TrainingJob(start=START - 3600.0, rng=rng)),
            ),
        ]

    return _Setup(gpus=devices, leases=leases, background=background)


def _alert_scenario(
    *,
    name: str,
    description: str,
    seed: int,
    seconds: float,
    interval: float,
    anomaly: float,
    user: str | None,
    pid: int | None,
    extra: Callable[[random.Random, _Setup], list[_Process]] = lambda rng, setup: [],
    events: Mapping[int, _DeviceEvents] | None = None,
    idle_since: Mapping[tuple[str, str], float | None] | None = None,
    setup: _Setup | None = None,
    accounts: Mapping[str, str] | None = None,
) -> Scenario:
    """A scenario on the two-server setup, with ``extra`` processes and device ``events``."""
    ground = setup or _two_servers(name, seed)
    end = START + seconds + interval

    def processes(rng: random.Random) -> list[_Process]:
        return ground.background(rng, end) + extra(rng, ground)

    return Scenario(
        name=name,
        description=description,
        interval=interval,
        start=START,
        ticks=_ticks(seconds, interval),
        gpus=ground.gpus,
        kind=name,
        anomaly_t=START + anomaly,
        user=user,
        pid=pid,
        pools={gpu.uuid: "gpu" for gpu in ground.gpus},
        leases=ground.leases,
        accounts=dict(accounts or _accounts("alice", "bob")),
        idle_since=dict(idle_since or {}),
        build=_engine(
            seed=f"{name}:{seed}",
            gpus=ground.gpus,
            processes=processes,
            ticks=_ticks(seconds, interval),
            interval=interval,
            events=events,
        ),
    )


def unleased_process(seed: int = 1, interval: float = 1.0) -> Scenario:
    """After 5 minutes alice's server starts a training on GPU 1, which bob holds."""
    anomaly = 300.0

    def extra(rng: random.Random, setup: _Setup) -> list[_Process]:
        facts = _facts(1150, "alice", _server_cgroup("alice"), ["python", "train.py", "--gpu", "1"])
        job = _TrainingJob(start=START + anomaly, rng=rng)
        return [
            _Process(
                facts=facts, gpu=1, start=START + anomaly, end=math.inf, profile=_TrainingRank(job)
            )
        ]

    return _alert_scenario(
        name="unleased_process",
        description="alice's server runs a process on bob's leased GPU",
        seed=seed,
        seconds=600.0,
        interval=interval,
        anomaly=anomaly,
        user="alice",
        pid=1150,
        extra=extra,
    )


def outside_cgroup(seed: int = 1, interval: float = 1.0) -> Scenario:
    """After 5 minutes a login-session process (carol, no ztlab cgroup) uses GPU 0."""
    anomaly = 300.0

    def extra(rng: random.Random, setup: _Setup) -> list[_Process]:
        facts = _facts(
            3303,
            "carol",
            "/user.slice/user-1003.slice/session-12.scope",
            ["python3", "/scratch/carol/bench.py"],
        )
        load = _Steady(util=60.0, memory=4 * _GB, rx=0.5 * _GB)
        return [_Process(facts=facts, gpu=0, start=START + anomaly, end=math.inf, profile=load)]

    return _alert_scenario(
        name="outside_cgroup",
        description="a process outside every ztlab cgroup runs on alice's pool GPU",
        seed=seed,
        seconds=600.0,
        interval=interval,
        anomaly=anomaly,
        user=None,
        pid=3303,
        extra=extra,
    )


def miner(seed: int = 1, interval: float = 1.0) -> Scenario:
    """After 5 minutes alice's server starts xmrig (CUDA plugin) on her own GPU."""
    anomaly = 300.0

    def extra(rng: random.Random, setup: _Setup) -> list[_Process]:
        facts = _facts(
            1177,
            "alice",
            _server_cgroup("alice"),
            [
                "/home/alice/.cache/.x/xmrig",
                "-o",
                "stratum+ssl://pool.example.net:443",
                "-u",
                "4Adummywallet",
                "--cuda",
            ],
            libraries=("libc.so.6", "libcuda.so.1", "libxmrig-cuda.so"),
        )
        load = _Steady(util=99.0, memory=3 * _GB, extra_w=20.0)
        return [_Process(facts=facts, gpu=0, start=START + anomaly, end=math.inf, profile=load)]

    return _alert_scenario(
        name="miner",
        description="a miner in alice's server",
        seed=seed,
        seconds=600.0,
        interval=interval,
        anomaly=anomaly,
        user="alice",
        pid=1177,
        extra=extra,
    )


def baseline(seed: int = 1, interval: float = 1.0, history_hours: float = 3.0) -> Scenario:
    """Hours of alice's moderate notebook work, then sustained PCIe transmit and more power.

    The anomaly (exfiltration-like: 20 GB/s sent from the GPU, 180 W more) starts after
    ``history_hours`` and lasts 10 minutes.
    """
    anomaly = history_hours * 3600.0

    setup = _two_servers("baseline", seed)

    def background(rng: random.Random, end: float) -> list[_Process]:
        found = setup.background(rng, end)
        kernel = found[0]
        exfil = _Steady(util=35.0, memory=12 * _GB, tx=20.0 * _GB, rx=0.4 * _GB, extra_w=180.0)
        found[0] = _Process(
            facts=kernel.facts,
            gpu=0,
            start=kernel.start,
            end=end,
            profile=_Switch(kernel.profile, exfil, START + anomaly),
        )
        return found

    return _alert_scenario(
        name="baseline",
        description="alice's GPU suddenly sends 20 GB/s over PCIe after hours of notebook work",
        seed=seed,
        seconds=anomaly + 600.0,
        interval=interval,
        anomaly=anomaly,
        user="alice",
        pid=1101,
        setup=_Setup(gpus=setup.gpus, leases=setup.leases, background=background),
    )


def idle_full_load(seed: int = 1, interval: float = 1.0) -> Scenario:
    """alice leaves at minute 2; at minute 40 her kernel's GPU goes to 100 % and stays.

    bob's cluster worker also runs at full load with bob idle, which must not fire (clusters
    run without their user).
    """
    load_start = 2400.0
    idle_since = START + 120.0
    anomaly = max(load_start + 60.0, idle_since - START + 30 * 60.0)
    rng = _rng(f"idle_full_load:{seed}:cluster")
    cluster = f"{rng.getrandbits(64):016x}"
    setup = _two_servers("idle_full_load", seed)

    def background(rng: random.Random, end: float) -> list[_Process]:
        kernel = _kernel(1101, "alice")
        worker = _facts(
            2290,
            "bob",
            f"/ztlab/ztl-bob-{cluster}-0",
            ["python", "-m", "distributed.cli.dask_worker", "tls://10.0.0.5:8786"],
        )
        busy = _Steady(util=100.0, memory=30 * _GB, rx=1.0 * _GB)
        return [
            _Process(
                facts=kernel,
                gpu=0,
                start=START,
                end=end,
                profile=_Switch(_Notebook(rng=rng), busy, START + load_start),
            ),
            _Process(facts=worker, gpu=1, start=START, end=end, profile=busy),
        ]

    leases = (
        setup.leases[0],
        LeaseHold(
            lease=setup.leases[1].lease,
            user="bob",
            server=f"cluster-{cluster}",
            pool="gpu",
            gpu="1",
        ),
    )
    return _alert_scenario(
        name="idle_full_load",
        description="alice's kernel keeps her GPU at full load while she is away",
        seed=seed,
        seconds=anomaly + 600.0,
        interval=interval,
        anomaly=anomaly,
        user="alice",
        pid=1101,
        idle_since={("alice", ""): idle_since, ("bob", f"cluster-{cluster}"): START},
        setup=_Setup(gpus=setup.gpus, leases=leases, background=background),
    )


def xid_error(seed: int = 1, interval: float = 1.0) -> Scenario:
    """After 5 minutes GPU 1 (bob's) falls off the bus: XID 79 on 3 readings, then quiet."""
    anomaly = 300.0
    tick = _ticks(anomaly, interval)
    events = {1: _DeviceEvents(xid={tick + i: (79,) for i in range(3)})}
    return _alert_scenario(
        name="xid_error",
        description="bob's GPU reports XID 79",
        seed=seed,
        seconds=600.0,
        interval=interval,
        anomaly=tick * interval,
        user="bob",
        pid=None,
        events=events,
    )


def ecc_error(seed: int = 1, interval: float = 1.0) -> Scenario:
    """A few single-bit ECC errors on GPU 0, then after 5 minutes a double-bit one."""
    anomaly = 300.0
    tick = _ticks(anomaly, interval)
    events = {0: _DeviceEvents(dbe={tick: 1}, sbe={30: 2, 200: 3, tick: 4})}
    return _alert_scenario(
        name="ecc_error",
        description="alice's GPU reports an uncorrectable ECC error",
        seed=seed,
        seconds=600.0,
        interval=interval,
        anomaly=tick * interval,
        user="alice",
        pid=None,
        events=events,
    )


def eight_gpu_steady(seconds: float = 600.0, interval: float = 1.0, seed: int = 1) -> Scenario:
    """8 leased GPUs of 8 users' servers, 2 processes each (a training and a kernel)."""
    name = "eight_gpu_steady"
    rng = _rng(f"{name}:{seed}:setup")
    devices = _gpus(rng, 8)
    users = [f"user{i}" for i in range(8)]
    leases = tuple(
        _server_lease(rng, user, gpu.index) for user, gpu in zip(users, devices, strict=True)
    )

    def processes(rng: random.Random) -> list[_Process]:
        found = []
        for user, gpu in zip(users, devices, strict=True):
            base = 5000 + 100 * gpu.index
            job = _TrainingJob(start=START - 3600.0, rng=rng)
            train = _facts(base + 1, user, _server_cgroup(user), ["python", "train.py"])
            found.append(
                _Process(
                    facts=train,
                    gpu=gpu.index,
                    start=START,
                    end=math.inf,
                    profile=_TrainingRank(job),
                )
            )
            found.append(
                _Process(
                    facts=_kernel(base + 2, user),
                    gpu=gpu.index,
                    start=START,
                    end=math.inf,
                    profile=_Notebook(rng=rng, scale=0.1),
                )
            )
        return found

    return Scenario(
        name=name,
        description="8 GPUs, 2 processes each",
        interval=interval,
        start=START,
        ticks=_ticks(seconds, interval),
        gpus=devices,
        kind=None,
        anomaly_t=None,
        user=None,
        pid=None,
        pools={gpu.uuid: "gpu" for gpu in devices},
        leases=leases,
        accounts=_accounts(*users),
        build=_engine(
            seed=f"{name}:{seed}",
            gpus=devices,
            processes=processes,
            ticks=_ticks(seconds, interval),
            interval=interval,
        ),
    )


#: the scenario of each alert kind (``handover_dirty`` is raised where leases end)
SCENARIOS: Final[Mapping[str, Callable[..., Scenario]]] = {
    "unleased_process": unleased_process,
    "outside_cgroup": outside_cgroup,
    "miner": miner,
    "baseline": baseline,
    "idle_full_load": idle_full_load,
    "xid_error": xid_error,
    "ecc_error": ecc_error,
}
