"""The alert detectors: what in one tick of GPU readings is worth an admin's attention.

:class:`Detectors` keeps state across ticks and turns each :class:`Tick` (a reading with its
attributed processes) into the *new* :class:`~ztlab.hub.monitor.findings.Alert` values: a
condition that persists fires once, and again only after it cleared. The kinds (see
:data:`~ztlab.hub.monitor.findings.ALERT_KINDS`):

=====================  ==========  ======================================================
kind                   severity    condition
=====================  ==========  ======================================================
``unleased_process``   critical    a ztlab process on a pool GPU whose lease is missing
                                   or another holder's
``outside_cgroup``     critical    a process outside every ztlab cgroup on a pool GPU (one
                                   whose facts could not be read: on 2 ticks in a row)
``miner``              critical    a known miner signature in the name, command line or
                                   loaded libraries (any GPU, pool or not)
``baseline``           warning     a user's utilization, power or PCIe volume on one of
                                   their GPUs above their robust baseline
                                   (:mod:`~ztlab.hub.monitor.baseline`) on 2 samples in a row
``idle_full_load``     warning     a server's GPU at full load (``full_load_percent``,
                                   dips of up to 10 points allowed) for
                                   ``full_load_seconds`` while its user has been idle for
                                   ``idle_minutes``
``xid_error``          critical    the driver reported an XID error (critical codes in
                       / warning   :data:`XID_CODES`, warning for the others)
``ecc_error``          critical    new double-bit ECC errors (critical), or at least
                       / warning   ``ecc_sbe_threshold`` new single-bit ones within an hour
=====================  ==========  ======================================================

``handover_dirty`` is raised where leases end, not here. Every alert's message is one line
naming the user, the GPU (index and UUID), the process and the numbers; ``evidence`` holds
the numbers (JSON-able).

Cost: a tick of 8 GPUs and 16 processes takes well under a millisecond: signatures are
matched once per distinct process (cached), baselines are per-minute aggregates
(:class:`~ztlab.hub.monitor.baseline.BaselineBook`), full load is one start time per GPU.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ztlab.common.errors import ConfigError
from ztlab.hub.monitor.baseline import BaselineBook, Limit
from ztlab.hub.monitor.findings import Alert, AttributedProcess, Holder, LeaseHold
from ztlab.hub.monitor.telemetry import DeviceReading, ProcessFacts, Reading

__all__ = [
    "CRITICAL_XIDS",
    "MINER_ALGORITHMS",
    "MINER_LIBRARIES",
    "MINER_NAMES",
    "XID_CODES",
    "Detectors",
    "Tick",
    "match_miner",
]

Severity = Literal["warning", "critical"]

#: XID codes and what they mean (NVIDIA's XID catalogue, shortened)
XID_CODES: Final[Mapping[int, str]] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    32: "invalid or corrupted push buffer stream",
    43: "GPU stopped processing",
    45: "preemptive cleanup after a previous error",
    48: "double-bit ECC error",
    61: "internal micro-controller breakpoint/warning",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping recorded",
    64: "ECC page retirement or row remapping failed",
    68: "video processor exception",
    69: "graphics engine class error",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}

#: XID codes that need an admin now (hardware, memory or bus failures)
CRITICAL_XIDS: Final = frozenset({48, 62, 63, 64, 74, 79, 92, 94, 95, 119, 120})

#: executable names of common miners (compared with the program's name, case-insensitive)
MINER_NAMES: Final = frozenset(
    {
        "xmrig",
        "xmrig-cuda",
        "xmr-stak",
        "xmr-stak-rx",
        "ethminer",
        "kawpowminer",
        "t-rex",
        "trex",
        "nbminer",
        "lolminer",
        "phoenixminer",
        "ethdcrminer64",
        "gminer",
        "nanominer",
        "teamredminer",
        "bzminer",
        "rigel",
        "srbminer",
        "srbminer-multi",
        "wildrig",
        "wildrig-multi",
        "ccminer",
        "cpuminer",
        "cpuminer-opt",
        "minerd",
        "cgminer",
        "bfgminer",
        "nheqminer",
        "bminer",
        "miniz",
        "onezerominer",
        "excavator",
    }
)

#: ``--algo`` values of proof-of-work algorithms (not those of ML tools: ``--algo ppo``)
MINER_ALGORITHMS: Final = frozenset(
    {
        "ethash",
        "etchash",
        "kawpow",
        "progpow",
        "firopow",
        "randomx",
        "rx/0",
        "autolykos",
        "autolykos2",
        "octopus",
        "equihash",
        "zhash",
        "beamhash",
        "cuckoo",
        "cuckatoo32",
        "cuckaroo29",
        "kheavyhash",
        "karlsenhash",
        "sha256d",
        "scrypt",
        "x16r",
        "x16rv2",
        "cryptonight",
        "dynexsolve",
    }
)

#: shared libraries of miners (a loaded library's name starting with one of these)
MINER_LIBRARIES: Final = (
    "libxmrig-cuda",
    "libxmrig-cu",
    "libxmrig-opencl",
    "libethash",
    "libprogpow",
    "libkawpow",
    "librandomx",
    "libcuda-miner",
    "libcudaminer",
    "libethminer",
    "libnanominer",
)

_POOL_URL: Final = re.compile(r"stratum\d?\+(?:tcp|ssl|tls)://", re.IGNORECASE)
_ALGO_OPTIONS: Final = frozenset({"--algo", "--algorithm", "-a", "--coin"})
_INTERPRETERS: Final = re.compile(r"(?:python|perl|ruby|node|bash|sh|dash|zsh)[\d.]*\Z")
_EXECUTABLE_SUFFIX: Final = re.compile(r"(?:\.exe|\.sh|\.py|[-_]v?\d[\w.]*)\Z")
#: bound on the per-process signature cache (cleared when full)
_CACHE_SIZE: Final = 4096
#: how far back :attr:`Detectors` look for single-bit ECC errors
_SBE_WINDOW: Final = 3600.0
#: how many ticks a process whose facts are unknown must be seen before it counts
_UNKNOWN_TICKS: Final = 2
_COMMAND_CHARS: Final = 160
#: points below ``full_load_percent`` a reading may fall without ending a full load
_FULL_LOAD_HYSTERESIS: Final = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick:
    """What the detectors look at in one sampling tick."""

    #: POSIX seconds of the reading
    t: float
    reading: Reading
    #: every process of the reading, attributed (holder, lease, pool)
    processes: Sequence[AttributedProcess]
    #: UUID of every device (GPU or MIG) in a ztlab pool, and its pool
    pool_devices: Mapping[str, str] = field(default_factory=dict)
    #: ``(user, server)``: when that server last saw its user active (``None``: unknown)
    idle_since: Mapping[tuple[str, str], float | None] = field(default_factory=dict)


def _program(argument: str) -> str:
    """An argument's program name: the file name, lower-case, without version or suffix."""
    name = argument.rsplit("/", 1)[-1].lower()
    return _EXECUTABLE_SUFFIX.sub("", name) if name not in MINER_NAMES else name


def match_miner(facts: ProcessFacts, *, extra: Sequence[re.Pattern[str]] = ()) -> str | None:
    """What in ``facts`` is a miner's signature (for the evidence), or ``None``.

    Looked at: the short name and the program (the command line's first argument, or the
    script an interpreter runs) against :data:`MINER_NAMES`; a ``stratum+tcp://`` (or
    ``+ssl``) pool address anywhere in the command line; ``--algo``/``-a`` followed by an
    algorithm of :data:`MINER_ALGORITHMS`; the loaded libraries against
    :data:`MINER_LIBRARIES`; and every ``extra`` pattern against name, command line and
    libraries.
    """
    comm = facts.comm.lower()
    if comm in MINER_NAMES or _program(comm) in MINER_NAMES:
        return f"name {facts.comm!r}"
    for program in _programs(facts.cmdline):
        if _program(program) in MINER_NAMES:
            return f"program {program!r}"
    for position, argument in enumerate(facts.cmdline):
        if _POOL_URL.search(argument):
            return f"pool address {argument!r}"
        algorithm = _algorithm(facts.cmdline, position)
        if algorithm is not None:
            return f"algorithm {algorithm!r}"
    for library in facts.libraries:
        if library.lower().startswith(MINER_LIBRARIES):
            return f"library {library!r}"
    if extra:
        text = " ".join(facts.cmdline)
        for pattern in extra:
            for subject in (facts.comm, text, *facts.libraries):
                if pattern.search(subject):
                    return f"pattern {pattern.pattern!r} in {subject[:80]!r}"
    return None


def _programs(cmdline: Sequence[str]) -> Iterable[str]:
    """The program a command line runs: its first argument, or an interpreter's script."""
    if not cmdline:
        return ()
    first = cmdline[0]
    if not _INTERPRETERS.match(first.rsplit("/", 1)[-1]):
        return (first,)
    for argument in cmdline[1:]:
        if argument == "-m" or argument == "-c":
            return (first,)  # a module or inline code: no script file
        if not argument.startswith("-"):
            return (first, argument)
    return (first,)


def _algorithm(cmdline: Sequence[str], position: int) -> str | None:
    """The proof-of-work algorithm an ``--algo`` option at ``position`` names, if any."""
    argument = cmdline[position]
    option, equals, value = argument.partition("=")
    if option not in _ALGO_OPTIONS:
        return None
    if not equals:
        if position + 1 >= len(cmdline):
            return None
        value = cmdline[position + 1]
    value = value.lower()
    return value if value in MINER_ALGORITHMS else None


def _printable(text: str) -> str:
    """``text`` with control characters escaped: a process names itself, and must not be
    able to break an admin's one-line message (or forge a second line)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _command(facts: ProcessFacts | None) -> str:
    """A process's command for a message (shortened, printable), or what is known of it."""
    if facts is None:
        return "gone before it was read"
    text = _printable(" ".join(facts.cmdline) or facts.comm)
    return text if len(text) <= _COMMAND_CHARS else text[: _COMMAND_CHARS - 1] + "…"


def _device_text(uuid: str, device: DeviceReading | None) -> str:
    index = "?" if device is None else str(device.index)
    return f"GPU {index} ({uuid})"


def _holder_text(holder: Holder | None) -> str:
    if holder is None:
        return "no ztlab holder"
    name = holder.server or "default"
    return f"user {holder.user} ({holder.kind} {name!r}, account {holder.account})"


def _holder_evidence(holder: Holder | None) -> dict[str, Any] | None:
    if holder is None:
        return None
    return {
        "user": holder.user,
        "server": holder.server,
        "kind": holder.kind,
        "account": holder.account,
        "cgroup": holder.cgroup,
    }


def _lease_evidence(lease: LeaseHold | None) -> dict[str, Any] | None:
    if lease is None:
        return None
    return {
        "lease": lease.lease,
        "user": lease.user,
        "server": lease.server,
        "pool": lease.pool,
        "gpu": lease.gpu,
    }


def _process_evidence(process: AttributedProcess) -> dict[str, Any]:
    facts = process.facts
    return {
        "pid": process.reading.pid,
        "uid": None if facts is None else facts.uid,
        "comm": None if facts is None else facts.comm,
        "cmdline": None if facts is None else list(facts.cmdline),
        "cgroup": None if facts is None else facts.cgroup,
        "used_memory": process.reading.used_memory,
        "sm_util": process.reading.sm_util,
    }


class _Transitions:
    """Which conditions are on now, and which of them were off at the previous tick."""

    __slots__ = ("_on",)

    def __init__(self) -> None:
        self._on: set[tuple[Any, ...]] = set()

    def update(self, now: set[tuple[Any, ...]]) -> set[tuple[Any, ...]]:
        """Record ``now`` as the conditions on; return those that were off before."""
        new = now - self._on
        self._on = now
        return new


class _SbeHistory:
    """A device's single-bit ECC count when it changed within the last hour."""

    __slots__ = ("changes",)

    def __init__(self) -> None:
        self.changes: deque[tuple[float, int]] = deque()

    def increase(self, t: float, count: int) -> int:
        """Record ``count`` at ``t``; return how much it grew in the last hour."""
        changes = self.changes
        if changes and count < changes[-1][1]:
            changes.clear()  # the driver was reloaded: the counter starts again
        if not changes or changes[-1][1] != count:
            changes.append((t, count))
        while len(changes) > 1 and changes[1][0] <= t - _SBE_WINDOW:
            changes.popleft()
        return count - changes[0][1]


@dataclass(slots=True)
class _Found:
    """An alert in the making: its condition key and how to build it if it is new."""

    key: tuple[Any, ...]
    alert: Alert


class Detectors:
    """Every detector, with the state they keep across ticks (see the module docstring)."""

    def __init__(
        self,
        *,
        interval: float = 1.0,
        baseline_threshold: float = 8.0,
        baseline_window_hours: float = 24.0,
        baseline_min_samples: int = 7200,
        idle_minutes: float = 30.0,
        full_load_percent: int = 90,
        full_load_seconds: float = 60.0,
        ecc_sbe_threshold: int = 100,
        extra_miner_patterns: Sequence[str] = (),
    ) -> None:
        """Detectors for ticks every ``interval`` seconds.

        ``baseline_min_samples``: ticks of a user's own history (two hours at 1 Hz by default;
        a tick counts once however many GPUs the user has, and the history is kept in minutes)
        before their own baseline replaces the generic one; ``extra_miner_patterns``:
        regular expressions (case-insensitive) that also mark a process as a miner.
        """
        self._check_positive(
            interval=interval,
            baseline_threshold=baseline_threshold,
            baseline_window_hours=baseline_window_hours,
            idle_minutes=idle_minutes,
            full_load_seconds=full_load_seconds,
            ecc_sbe_threshold=ecc_sbe_threshold,
        )
        if not 0 < full_load_percent <= 100:
            raise ConfigError(
                f"full_load_percent: expected a percentage from 1 to 100, got {full_load_percent}"
            )
        self._interval = interval
        self._threshold = baseline_threshold
        self._idle_seconds = idle_minutes * 60.0
        self._full_percent = full_load_percent
        self._full_seconds = full_load_seconds
        self._sbe_threshold = ecc_sbe_threshold
        self._extra = tuple(self._compile(pattern) for pattern in extra_miner_patterns)
        self._book = BaselineBook(
            window_hours=baseline_window_hours,
            min_minutes=max(1, math.ceil(baseline_min_samples * interval / 60.0)),
            threshold=baseline_threshold,
        )
        self._transitions: dict[str, _Transitions] = {}
        self._miner_cache: dict[ProcessFacts, str | None] = {}
        self._seen: set[tuple[str, int]] = set()
        self._unknown: dict[tuple[str, int], int] = {}
        self._over: dict[tuple[str, str, str], int] = {}
        self._full_since: dict[str, float] = {}
        self._dbe: dict[str, int] = {}
        self._sbe: dict[str, _SbeHistory] = {}

    @staticmethod
    def _check_positive(**values: float) -> None:
        for name, value in values.items():
            if not value > 0:
                raise ConfigError(f"{name}: expected a number above 0, got {value}")

    @staticmethod
    def _compile(pattern: str) -> re.Pattern[str]:
        try:
            return re.compile(pattern, re.IGNORECASE)
        except re.error as error:
            raise ConfigError(
                f"extra_miner_patterns: {pattern!r} is not a regular expression ({error})",
                hint="write Python regular expressions, e.g. 'mysterious-?miner'",
            ) from None

    @property
    def baselines(self) -> BaselineBook:
        """The users' baselines (for the exporter and tests)."""
        return self._book

    def check(self, tick: Tick) -> list[Alert]:
        """The alerts that are new at ``tick`` (conditions that were off before)."""
        devices = {device.uuid: device for device in tick.reading.devices}
        found: dict[str, list[_Found]] = {
            "unleased_process": [],
            "outside_cgroup": [],
            "miner": [],
        }
        self._process_checks(tick, devices, found)
        found["baseline"] = self._baseline(tick, devices)
        found["idle_full_load"] = self._idle_full_load(tick, devices)
        found["xid_error"] = self._xid(tick, devices)
        found["ecc_error"] = self._ecc(tick)
        alerts: list[Alert] = []
        for kind, items in found.items():
            transitions = self._transitions.get(kind)
            if transitions is None:
                transitions = self._transitions[kind] = _Transitions()
            new = transitions.update({item.key for item in items})
            alerts.extend(item.alert for item in items if item.key in new)
        return alerts

    # --- processes: leases, cgroups, miners ------------------------------------------------

    def _process_checks(
        self, tick: Tick, devices: Mapping[str, DeviceReading], found: dict[str, list[_Found]]
    ) -> None:
        seen: set[tuple[str, int]] = set()
        for process in tick.processes:
            uuid = process.reading.uuid
            pid = process.reading.pid
            seen.add((uuid, pid))
            device = devices.get(uuid)
            pool = process.pool or self._pool_of(uuid, device, tick.pool_devices)
            if pool is not None:
                if process.holder is None:
                    if process.facts is not None or (uuid, pid) in self._seen:
                        found["outside_cgroup"].append(self._outside(tick, process, device, pool))
                elif not process.leased_to_holder:
                    found["unleased_process"].append(self._unleased(tick, process, device, pool))
            if process.facts is not None:
                signature = self._miner(process.facts)
                if signature is not None:
                    found["miner"].append(self._miner_alert(tick, process, device, signature))
        self._seen = seen

    @staticmethod
    def _pool_of(uuid: str, device: DeviceReading | None, pools: Mapping[str, str]) -> str | None:
        pool = pools.get(uuid)
        if pool is None and device is not None and device.parent is not None:
            pool = pools.get(device.parent)
        return pool

    def _miner(self, facts: ProcessFacts) -> str | None:
        cache = self._miner_cache
        if facts in cache:
            return cache[facts]
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
        signature = cache[facts] = match_miner(facts, extra=self._extra)
        return signature

    def _process_alert(
        self,
        kind: str,
        severity: Severity,
        tick: Tick,
        process: AttributedProcess,
        device: DeviceReading | None,
        what: str,
        evidence: dict[str, Any],
    ) -> _Found:
        uuid = process.reading.uuid
        pid = process.reading.pid
        holder = process.holder
        message = (
            f"{kind}: {_holder_text(holder)}: pid {pid} ({_command(process.facts)}) "
            f"on {_device_text(uuid, device)} {what}"
        )
        evidence = {
            **evidence,
            "process": _process_evidence(process),
            "holder": _holder_evidence(holder),
            "lease": _lease_evidence(process.lease),
            "gpu_index": None if device is None else device.index,
        }
        alert = Alert(
            kind=kind,
            severity=severity,
            message=message,
            uuid=uuid,
            pid=pid,
            holder=holder,
            lease=process.lease,
            t=tick.t,
            evidence=evidence,
        )
        return _Found(key=alert.key, alert=alert)

    def _outside(
        self, tick: Tick, process: AttributedProcess, device: DeviceReading | None, pool: str
    ) -> _Found:
        facts = process.facts
        cgroup = "unknown" if facts is None or facts.cgroup is None else _printable(facts.cgroup)
        uid = "unknown" if facts is None or facts.uid is None else str(facts.uid)
        what = f"of pool {pool!r} runs outside every ztlab cgroup (cgroup {cgroup}, uid {uid})"
        return self._process_alert(
            "outside_cgroup", "critical", tick, process, device, what, {"pool": pool}
        )

    def _unleased(
        self, tick: Tick, process: AttributedProcess, device: DeviceReading | None, pool: str
    ) -> _Found:
        lease = process.lease
        if lease is None:
            what = f"of pool {pool!r} without a lease (the GPU is not leased)"
        else:
            what = (
                f"of pool {pool!r} without a lease (lease {lease.lease} is "
                f"{lease.user}'s, server {lease.server or 'default'!r})"
            )
        return self._process_alert(
            "unleased_process", "critical", tick, process, device, what, {"pool": pool}
        )

    def _miner_alert(
        self,
        tick: Tick,
        process: AttributedProcess,
        device: DeviceReading | None,
        signature: str,
    ) -> _Found:
        what = f"matches a miner signature: {signature}"
        return self._process_alert(
            "miner", "critical", tick, process, device, what, {"signature": signature}
        )

    # --- baselines --------------------------------------------------------------------------

    def _baseline(self, tick: Tick, devices: Mapping[str, DeviceReading]) -> list[_Found]:
        users: dict[tuple[str, str], list[AttributedProcess]] = {}
        for process in tick.processes:
            if process.holder is not None:
                key = (process.holder.user, process.reading.uuid)
                users.setdefault(key, []).append(process)
        over: dict[tuple[str, str, str], int] = {}
        found: list[_Found] = []
        for (user, uuid), processes in users.items():
            device = devices.get(uuid)
            if device is None:
                continue
            firing = self._baseline_device(tick.t, user, device, over)
            if firing:
                found.append(self._baseline_alert(tick, user, device, processes, firing))
        self._over = over
        return found

    def _baseline_device(
        self,
        t: float,
        user: str,
        device: DeviceReading,
        over: dict[tuple[str, str, str], int],
    ) -> dict[str, tuple[float, Limit]]:
        """Feed the device's values into ``user``'s baselines; return the metrics firing."""
        book = self._book
        firing: dict[str, tuple[float, Limit]] = {}
        for metric, value in _metric_values(device):
            if value is None:
                continue
            limit = book.limit(user, metric, t)
            book.add(user, metric, t, value)
            if value > limit.value:
                key = (user, device.uuid, metric)
                count = over[key] = self._over.get(key, 0) + 1
                if count >= 2:
                    firing[metric] = (value, limit)
        return firing

    def _baseline_alert(
        self,
        tick: Tick,
        user: str,
        device: DeviceReading,
        processes: Sequence[AttributedProcess],
        firing: Mapping[str, tuple[float, Limit]],
    ) -> _Found:
        units = self._book.metrics
        numbers = ", ".join(
            f"{metric} {_number(value)} {units[metric].unit} > {_number(limit.value)} "
            f"({limit.source} baseline median {_number(limit.stats.center)}, "
            f"scale {_number(limit.stats.scale)})"
            for metric, (value, limit) in firing.items()
        )
        main = max(processes, key=lambda process: process.reading.used_memory or 0)
        pids = ", ".join(
            f"pid {process.reading.pid} ({_command(process.facts)})" for process in processes
        )
        message = (
            f"baseline: user {user} on {_device_text(device.uuid, device)} "
            f"above their baseline: {numbers}; {pids}"
        )
        evidence = {
            "metrics": {
                metric: {
                    "value": value,
                    "limit": limit.value,
                    "baseline": limit.source,
                    "median": limit.stats.center,
                    "scale": limit.stats.scale,
                    "peak": limit.stats.peak,
                    "samples": limit.stats.samples,
                }
                for metric, (value, limit) in firing.items()
            },
            "threshold": self._threshold,
            "gpu_index": device.index,
            "processes": [_process_evidence(process) for process in processes],
        }
        alert = Alert(
            kind="baseline",
            severity="warning",
            message=message,
            uuid=device.uuid,
            pid=main.reading.pid if len(processes) == 1 else None,
            holder=main.holder,
            lease=main.lease,
            t=tick.t,
            evidence=evidence,
        )
        return _Found(key=("baseline", device.uuid, user), alert=alert)

    # --- full load while idle ---------------------------------------------------------------

    def _idle_full_load(self, tick: Tick, devices: Mapping[str, DeviceReading]) -> list[_Found]:
        t = tick.t
        lasted = {uuid: self._sustained_load(t, uuid, device) for uuid, device in devices.items()}
        servers: dict[tuple[Holder, str], tuple[list[AttributedProcess], float]] = {}
        for process in tick.processes:
            holder = process.holder
            if holder is None or holder.kind != "server":
                continue
            uuid = process.reading.uuid
            duration = lasted.get(uuid)
            if duration is None or duration < self._full_seconds - self._interval / 2:
                continue
            since = tick.idle_since.get((holder.user, holder.server))
            if since is None or t - since < self._idle_seconds:
                continue
            servers.setdefault((holder, uuid), ([], since))[0].append(process)
        return [
            self._idle_alert(tick, holder, devices[uuid], processes, lasted[uuid] or 0.0, since)
            for (holder, uuid), (processes, since) in servers.items()
        ]

    def _sustained_load(self, t: float, uuid: str, device: DeviceReading) -> float | None:
        """How long the device has been at full load (``None``: it is not).

        Full load starts with a reading at ``full_load_percent`` or more and lasts until one
        falls more than :data:`_FULL_LOAD_HYSTERESIS` points below it (noise is not a pause).
        """
        util = device.gpu_util
        since = self._full_since.get(uuid)
        if util is None or util < self._full_percent - _FULL_LOAD_HYSTERESIS:
            self._full_since.pop(uuid, None)
            return None
        if since is None:
            if util < self._full_percent:
                return None
            since = self._full_since[uuid] = t
        return t - since

    def _idle_alert(
        self,
        tick: Tick,
        holder: Holder,
        device: DeviceReading,
        processes: Sequence[AttributedProcess],
        duration: float,
        since: float,
    ) -> _Found:
        main = max(processes, key=lambda process: process.reading.used_memory or 0)
        idle = (tick.t - since) / 60.0
        message = (
            f"idle_full_load: {_holder_text(holder)}: pid {main.reading.pid} "
            f"({_command(main.facts)}) keeps {_device_text(device.uuid, device)} at "
            f"{device.gpu_util}% (>= {self._full_percent}% for {duration:.0f} s) while the "
            f"user has been idle for {idle:.0f} min"
        )
        evidence = {
            "gpu_util": device.gpu_util,
            "full_load_for_s": duration,
            "full_load_percent": self._full_percent,
            "full_load_seconds": self._full_seconds,
            "idle_since": since,
            "idle_minutes": round(idle, 1),
            "gpu_index": device.index,
            "holder": _holder_evidence(holder),
            "processes": [_process_evidence(process) for process in processes],
        }
        alert = Alert(
            kind="idle_full_load",
            severity="warning",
            message=message,
            uuid=device.uuid,
            pid=main.reading.pid,
            holder=holder,
            lease=main.lease,
            t=tick.t,
            evidence=evidence,
        )
        return _Found(key=("idle_full_load", device.uuid, holder.user, holder.server), alert=alert)

    # --- hardware: XID and ECC --------------------------------------------------------------

    def _xid(self, tick: Tick, devices: Mapping[str, DeviceReading]) -> list[_Found]:
        found = []
        for uuid, device in devices.items():
            for code in device.xid:
                severity: Severity = "critical" if code in CRITICAL_XIDS else "warning"
                meaning = XID_CODES.get(code, "see NVIDIA's XID catalogue")
                holder, lease, who = _device_holder(tick, uuid)
                alert = Alert(
                    kind="xid_error",
                    severity=severity,
                    message=(
                        f"xid_error: {_device_text(uuid, device)} reported XID {code} "
                        f"({meaning}){who}"
                    ),
                    uuid=uuid,
                    holder=holder,
                    lease=lease,
                    t=tick.t,
                    evidence={"xid": code, "meaning": meaning, "gpu_index": device.index},
                )
                found.append(_Found(key=("xid_error", uuid, code), alert=alert))
        return found

    def _ecc(self, tick: Tick) -> list[_Found]:
        found = []
        for device in tick.reading.devices:
            uuid = device.uuid
            if device.ecc_dbe is not None:
                before = self._dbe.get(uuid)
                self._dbe[uuid] = device.ecc_dbe
                if before is not None and device.ecc_dbe > before:
                    found.append(self._dbe_alert(tick, device, before))
            if device.ecc_sbe is not None:
                history = self._sbe.get(uuid)
                if history is None:
                    history = self._sbe[uuid] = _SbeHistory()
                grown = history.increase(tick.t, device.ecc_sbe)
                if grown >= self._sbe_threshold:
                    found.append(self._sbe_alert(tick, device, grown))
        return found

    def _dbe_alert(self, tick: Tick, device: DeviceReading, before: int) -> _Found:
        now = device.ecc_dbe or 0
        holder, lease, who = _device_holder(tick, device.uuid)
        alert = Alert(
            kind="ecc_error",
            severity="critical",
            message=(
                f"ecc_error: {_device_text(device.uuid, device)} reported "
                f"{now - before} new uncorrectable (double-bit) ECC errors "
                f"({before} -> {now}){who}"
            ),
            uuid=device.uuid,
            holder=holder,
            lease=lease,
            t=tick.t,
            evidence={"ecc_dbe": now, "ecc_dbe_before": before, "gpu_index": device.index},
        )
        # a new key per count: every further increase is a new finding
        return _Found(key=("ecc_error", device.uuid, "dbe", now), alert=alert)

    def _sbe_alert(self, tick: Tick, device: DeviceReading, grown: int) -> _Found:
        holder, lease, who = _device_holder(tick, device.uuid)
        alert = Alert(
            kind="ecc_error",
            severity="warning",
            message=(
                f"ecc_error: {_device_text(device.uuid, device)} reported {grown} new "
                f"correctable (single-bit) ECC errors within an hour (now {device.ecc_sbe}, "
                f"threshold {self._sbe_threshold}){who}"
            ),
            uuid=device.uuid,
            holder=holder,
            lease=lease,
            t=tick.t,
            evidence={
                "ecc_sbe": device.ecc_sbe,
                "ecc_sbe_new_in_hour": grown,
                "threshold": self._sbe_threshold,
                "gpu_index": device.index,
            },
        )
        return _Found(key=("ecc_error", device.uuid, "sbe"), alert=alert)


def _metric_values(device: DeviceReading) -> tuple[tuple[str, float | None], ...]:
    """The device's values of the baseline metrics (``None`` where not reported)."""
    pcie: float | None = None
    if device.pcie_tx is not None or device.pcie_rx is not None:
        pcie = float((device.pcie_tx or 0) + (device.pcie_rx or 0))
    util = None if device.gpu_util is None else float(device.gpu_util)
    return (("gpu_util", util), ("power_w", device.power_w), ("pcie_bytes", pcie))


def _device_holder(tick: Tick, uuid: str) -> tuple[Holder | None, LeaseHold | None, str]:
    """The one holder of processes on ``uuid`` (if exactly one), its lease, and a text."""
    holders = {
        process.holder: process.lease
        for process in tick.processes
        if process.reading.uuid == uuid and process.holder is not None
    }
    if len(holders) != 1:
        return None, None, ""
    ((holder, lease),) = holders.items()
    return holder, lease, f"; in use by {_holder_text(holder)}"


def _number(value: float) -> str:
    """A number for a message: large ones with an SI prefix."""
    magnitude = abs(value)
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= factor:
            return f"{value / factor:.1f}{prefix}"
    return f"{value:.1f}"
