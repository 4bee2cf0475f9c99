"""The boundary to NVIDIA's management library (NVML): devices, processes, utilization.

Everything the control plane learns about GPUs passes through :class:`NvmlSource`, a
small typed protocol with two implementations:

- :class:`RealNvml` calls NVML through ``pynvml`` (the ``nvidia-ml-py`` package of the
  ``[gpu]`` extra), imported when one is built, never at import time;
- :class:`ReplayedNvml` replays a recorded JSON trace, snapshot by snapshot: the path
  tests and CI take, since neither has a GPU.

:func:`discover` returns a :class:`RealNvml` where NVML works and ``None`` elsewhere.
:func:`record_trace` samples any source into a trace that :class:`ReplayedNvml` replays,
so a trace can be recorded on a real GPU server and kept as a test fixture.

A trace is a JSON object::

    {
      "format": "ztlab-nvml-trace/1",
      "description": "one H100, one training process",   # optional, free text
      "devices": [
        {"index": 0, "uuid": "GPU-<uuid>", "name": "NVIDIA H100 80GB HBM3",
         "memory_total": 85520809984, "minor_number": 0,
         "mig": [{"uuid": "MIG-<uuid>", "gpu_instance_id": 1,
                  "compute_instance_id": 0, "memory_total": 21139292160}]}
      ],
      "snapshots": [
        {"t": 0.0,
         "processes": {"GPU-<uuid>": [
            {"pid": 4242, "used_memory": 1073741824,
             "sm": 95,                                          # optional
             "proc": {"comm": "python3", "uid": 1001,           # optional
                      "cmdline": ["python3", "train.py"],
                      "cgroup": "/ztlab/ztl-alice",
                      "libraries": ["libcuda.so.1"]}}]},
         "utilization": {"GPU-<uuid>": {"gpu": 97, "memory": 41}},
         "devices": {"GPU-<uuid>": {                            # optional
            "fb_used": 1073741824, "power_w": 312.5, "energy_mj": 912345678,
            "pcie_tx": 1048576, "pcie_rx": 2097152, "nvlink_tx": 0, "nvlink_rx": 0,
            "temperature_c": 61, "sm_clock_mhz": 1980, "xid": [79],
            "ecc_mode": true, "ecc_sbe": 0, "ecc_dbe": 0}}}
      ]
    }

Sizes are bytes, ``t`` is seconds since the first snapshot, and a device a snapshot does
not mention has no processes (and no utilization reading) at that moment. UUIDs are
normalized as the configuration normalizes them: ``GPU-``/``MIG-`` prefix, lower-case hex.

The optional parts describe what the GPU monitor (:mod:`ztlab.hub.monitor`) reads:

- a process's ``sm`` is its own SM utilization in percent (0 to 100, or ``null``);
- a process's ``proc`` stands for ``/proc/PID`` of a synthetic PID: ``comm`` (required),
  the real ``uid``, the ``cmdline`` arguments, the ``cgroup`` path the device fence applies
  to and the mapped shared ``libraries`` by file name;
- a snapshot's ``devices`` holds, per GPU or MIG UUID of the trace, what NVML reports
  beyond processes and utilization (every field optional, ``null`` = not reported): bytes of
  memory in use (``fb_used``), watts (``power_w``), the energy counter in millijoules
  (``energy_mj``), PCIe and NVLink bytes per second (``pcie_tx``/``pcie_rx``,
  ``nvlink_tx``/``nvlink_rx``), ``temperature_c``, ``sm_clock_mhz``, the XID error codes
  raised since the previous snapshot (``xid``), whether ECC is enabled (``ecc_mode``) and
  the volatile single- and double-bit ECC error counts (``ecc_sbe``, ``ecc_dbe``).

Traces without these keys stay valid; every other key is refused, naming file and key path.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any, Final, NamedTuple, Protocol

from ztlab.common.errors import UsageError, ZtlabError

__all__ = [
    "TRACE_FORMAT",
    "DeviceTelemetry",
    "GpuDevice",
    "GpuProcess",
    "MigDevice",
    "NvmlError",
    "NvmlSource",
    "NvmlUnavailableError",
    "RealNvml",
    "ReplayedNvml",
    "TraceError",
    "TraceProcessFacts",
    "TraceSnapshot",
    "Utilization",
    "device_json",
    "discover",
    "normalize_uuid",
    "record_trace",
]

_log = logging.getLogger(__name__)

#: the ``format`` of the traces :class:`ReplayedNvml` reads and :func:`record_trace` writes
TRACE_FORMAT: Final = "ztlab-nvml-trace/1"

_UUID_RE = re.compile(
    r"(GPU|MIG)-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\Z",
    re.IGNORECASE,
)


# --------------------------------------------------------------------------------------
# Errors and values
# --------------------------------------------------------------------------------------


class NvmlError(ZtlabError):
    """NVML failed, or was asked about a device it does not have."""


class NvmlUnavailableError(NvmlError):
    """NVML cannot be used here: ``pynvml`` is not installed, or NVML did not start."""


class TraceError(UsageError):
    """A recorded NVML trace is unreadable or malformed (the message names file and key)."""


def normalize_uuid(uuid: str) -> str:
    """``GPU-``/``MIG-`` prefix and lower-case hex, as the configuration writes UUIDs.

    A string that is not such a UUID comes back unchanged (stripped of white space).
    """
    text = uuid.strip()
    match = _UUID_RE.match(text)
    if match is None:
        return text
    return f"{match[1].upper()}-{match[2].lower()}"


@dataclass(frozen=True, slots=True, kw_only=True)
class MigDevice:
    """A MIG device (a GPU instance with a compute instance) on a MIG-enabled GPU."""

    #: ``MIG-<uuid>``
    uuid: str
    gpu_instance_id: int
    compute_instance_id: int
    #: bytes of GPU memory the instance owns
    memory_total: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuDevice:
    """A physical GPU as NVML reports it."""

    #: NVML's index (the order of ``nvidia-smi``; not necessarily the minor number)
    index: int
    #: ``GPU-<uuid>``
    uuid: str
    #: the product name, e.g. ``NVIDIA H100 80GB HBM3``
    name: str
    #: bytes of GPU memory
    memory_total: int
    #: ``N`` of the device node ``/dev/nvidiaN``
    minor_number: int
    #: its MIG devices, when MIG is enabled (empty otherwise)
    mig: tuple[MigDevice, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceProcessFacts:
    """What a trace records about a synthetic PID in place of ``/proc/PID`` (``proc``)."""

    #: the short name (``/proc/PID/comm``)
    comm: str
    #: the real user id, ``None`` where not recorded
    uid: int | None = None
    #: the command line, one string per argument
    cmdline: tuple[str, ...] = ()
    #: the cgroup path the device fence applies to, ``None`` where not recorded
    cgroup: str | None = None
    #: mapped shared libraries, by file name
    libraries: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuProcess:
    """A process using a GPU or MIG device."""

    pid: int
    #: bytes of GPU memory it uses, or ``None`` where NVML cannot tell
    used_memory: int | None
    #: percent SM utilization of this process (a trace's ``sm``), ``None`` where unknown
    sm_util: int | None = None
    #: a trace's facts about a synthetic PID (``proc``); ``None``: ask ``/proc``
    facts: TraceProcessFacts | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceTelemetry:
    """What a trace snapshot records of one device beyond processes and utilization.

    ``None`` (and an empty ``xid``): not reported. Units as in the module docstring.
    """

    fb_used: int | None = None
    power_w: float | None = None
    energy_mj: int | None = None
    pcie_tx: int | None = None
    pcie_rx: int | None = None
    nvlink_tx: int | None = None
    nvlink_rx: int | None = None
    temperature_c: int | None = None
    sm_clock_mhz: int | None = None
    xid: tuple[int, ...] = ()
    ecc_mode: bool | None = None
    ecc_sbe: int | None = None
    ecc_dbe: int | None = None


class Utilization(NamedTuple):
    """Percent of the last sample period the GPU's kernels and its memory were busy."""

    gpu: int
    memory: int


class NvmlSource(Protocol):
    """Where GPU facts come from: real NVML or a replayed trace.

    UUIDs given and returned are normalized (:func:`normalize_uuid`); a UUID may name a
    GPU or a MIG device. Asking about a UUID the source does not have raises
    :class:`NvmlError`.
    """

    def devices(self) -> list[GpuDevice]:
        """Every GPU, in NVML index order, with its MIG devices."""
        ...

    def processes(self, uuid: str) -> list[GpuProcess]:
        """The processes using the GPU or MIG device ``uuid`` now, by pid."""
        ...

    def utilization(self, uuid: str) -> Utilization | None:
        """GPU and memory utilization of ``uuid`` now; ``None`` where not reported (MIG)."""
        ...


# --------------------------------------------------------------------------------------
# Real NVML (pynvml)
# --------------------------------------------------------------------------------------


def _import_pynvml() -> ModuleType:
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        raise NvmlUnavailableError(
            "cannot use NVML: the Python package pynvml is not installed",
            hint="install the GPU extra: pip install 'zerotrust-lab[gpu]' (nvidia-ml-py)",
        ) from exc


def _text(value: object) -> str:
    """pynvml returns ``bytes`` in old releases and ``str`` in new ones."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class RealNvml:
    """:class:`NvmlSource` backed by the NVIDIA driver through ``pynvml``.

    Building one imports ``pynvml`` and initializes NVML; :meth:`close` (or leaving a
    ``with`` block) shuts it down. Raises :class:`NvmlUnavailableError` when ``pynvml``
    is missing or NVML does not start (no driver, no GPU). Safe to share between threads
    (NVML is thread-safe).
    """

    def __init__(self) -> None:
        """Import ``pynvml`` and initialize NVML."""
        nvml = _import_pynvml()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise NvmlUnavailableError(
                f"cannot use NVML: nvmlInit failed: {exc}",
                hint="check that the NVIDIA driver is loaded (nvidia-smi)",
            ) from exc
        self._nvml = nvml
        self._closed = False
        self._lock = threading.Lock()
        self._handles: dict[str, Any] = {}

    def close(self) -> None:
        """Shut NVML down (once; later calls do nothing)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError as exc:  # pragma: no cover - driver-dependent
            _log.warning("nvmlShutdown failed: %s", exc)

    def __enter__(self) -> RealNvml:
        return self

    @property
    def pynvml(self) -> ModuleType:
        """The ``pynvml`` module it calls (for readers of further metrics)."""
        return self._nvml

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def handle(self, uuid: str) -> Any:
        """The NVML handle of the GPU or MIG device ``uuid`` (:class:`NvmlError` if none)."""
        return self._handle(uuid)

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, what: str, function: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise NvmlError(f"NVML was shut down; cannot call {what}")
        try:
            return function(*args)
        except self._nvml.NVMLError as exc:
            raise NvmlError(f"NVML call {what} failed: {exc}") from exc

    def _mig_devices(self, handle: Any) -> Iterator[tuple[MigDevice, Any]]:
        nvml = self._nvml
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError:
            return  # not a MIG-capable GPU
        if current != nvml.NVML_DEVICE_MIG_ENABLE:
            return
        count = int(
            self._call(
                "nvmlDeviceGetMaxMigDeviceCount", nvml.nvmlDeviceGetMaxMigDeviceCount, handle
            )
        )
        for slot in range(count):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except nvml.NVMLError:
                continue  # an empty slot
            yield (
                MigDevice(
                    uuid=normalize_uuid(
                        _text(self._call("nvmlDeviceGetUUID", nvml.nvmlDeviceGetUUID, mig))
                    ),
                    gpu_instance_id=int(
                        self._call(
                            "nvmlDeviceGetGpuInstanceId", nvml.nvmlDeviceGetGpuInstanceId, mig
                        )
                    ),
                    compute_instance_id=int(
                        self._call(
                            "nvmlDeviceGetComputeInstanceId",
                            nvml.nvmlDeviceGetComputeInstanceId,
                            mig,
                        )
                    ),
                    memory_total=int(
                        self._call(
                            "nvmlDeviceGetMemoryInfo", nvml.nvmlDeviceGetMemoryInfo, mig
                        ).total
                    ),
                ),
                mig,
            )

    def _scan(self) -> tuple[list[GpuDevice], dict[str, Any]]:
        """Every device, and a handle for every GPU and MIG UUID."""
        nvml = self._nvml
        devices: list[GpuDevice] = []
        handles: dict[str, Any] = {}
        count = int(self._call("nvmlDeviceGetCount", nvml.nvmlDeviceGetCount))
        for index in range(count):
            handle = self._call(
                "nvmlDeviceGetHandleByIndex", nvml.nvmlDeviceGetHandleByIndex, index
            )
            uuid = normalize_uuid(
                _text(self._call("nvmlDeviceGetUUID", nvml.nvmlDeviceGetUUID, handle))
            )
            migs = list(self._mig_devices(handle))
            devices.append(
                GpuDevice(
                    index=index,
                    uuid=uuid,
                    name=_text(self._call("nvmlDeviceGetName", nvml.nvmlDeviceGetName, handle)),
                    memory_total=int(
                        self._call(
                            "nvmlDeviceGetMemoryInfo", nvml.nvmlDeviceGetMemoryInfo, handle
                        ).total
                    ),
                    minor_number=int(
                        self._call(
                            "nvmlDeviceGetMinorNumber", nvml.nvmlDeviceGetMinorNumber, handle
                        )
                    ),
                    mig=tuple(mig for mig, _ in migs),
                )
            )
            handles[uuid] = handle
            handles.update((mig.uuid, mig_handle) for mig, mig_handle in migs)
        return devices, handles

    def _handle(self, uuid: str) -> Any:
        """The NVML handle of ``uuid``, scanning the devices again when it is not known."""
        key = normalize_uuid(uuid)
        handle = self._handles.get(key)
        if handle is None:
            self._handles = self._scan()[1]
            handle = self._handles.get(key)
        if handle is None:
            known = ", ".join(self._handles) or "none"
            raise NvmlError(f"NVML has no GPU or MIG device {key!r}; it has: {known}")
        return handle

    def devices(self) -> list[GpuDevice]:
        """Every GPU in NVML index order, with its MIG devices when MIG is enabled."""
        devices, self._handles = self._scan()
        return devices

    def processes(self, uuid: str) -> list[GpuProcess]:
        """Compute and graphics processes on ``uuid``, one entry per pid, by pid."""
        nvml = self._nvml
        handle = self._handle(uuid)
        found: dict[int, int | None] = {}
        for name in (
            "nvmlDeviceGetComputeRunningProcesses",
            "nvmlDeviceGetGraphicsRunningProcesses",
        ):
            for info in self._call(name, getattr(nvml, name), handle):
                pid = int(info.pid)
                used = info.usedGpuMemory
                memory = int(used) if isinstance(used, int) else None
                previous = found.get(pid)
                if pid not in found or (
                    memory is not None and (previous is None or memory > previous)
                ):
                    found[pid] = memory
        return [GpuProcess(pid=pid, used_memory=found[pid]) for pid in sorted(found)]

    def utilization(self, uuid: str) -> Utilization | None:
        """``nvmlDeviceGetUtilizationRates``; ``None`` where unsupported (MIG devices)."""
        nvml = self._nvml
        handle = self._handle(uuid)
        try:
            rates = nvml.nvmlDeviceGetUtilizationRates(handle)
        except nvml.NVMLError_NotSupported:
            return None
        except nvml.NVMLError as exc:
            raise NvmlError(f"NVML call nvmlDeviceGetUtilizationRates failed: {exc}") from exc
        return Utilization(gpu=int(rates.gpu), memory=int(rates.memory))


def discover() -> NvmlSource | None:
    """A :class:`RealNvml` when ``pynvml`` imports and NVML starts, else ``None``.

    ``None`` means "no NVML here" (no ``[gpu]`` extra, no driver, no GPU); the reason is
    logged at INFO level. Callers then resolve GPU ids from the configuration alone.
    """
    try:
        return RealNvml()
    except NvmlUnavailableError as exc:
        _log.info("NVML not available, GPUs are resolved from the configuration: %s", exc.message)
        return None


# --------------------------------------------------------------------------------------
# Replayed traces
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceSnapshot:
    """One moment of a trace: processes, utilization and telemetry per device UUID."""

    #: seconds since the first snapshot
    t: float
    processes: Mapping[str, tuple[GpuProcess, ...]] = field(default_factory=dict)
    utilization: Mapping[str, Utilization] = field(default_factory=dict)
    #: the snapshot's ``devices``: what else was read of a device (absent: nothing)
    telemetry: Mapping[str, DeviceTelemetry] = field(default_factory=dict)


class _Reader:
    """Checks one trace document, naming the source and key path of the first problem."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, expected: str, got: object) -> TraceError:
        shown = json.dumps(got)[:60] if not isinstance(got, dict | list) else type(got).__name__
        return TraceError(f"{self.source}: {where}: expected {expected}, got {shown}")

    def table(
        self, value: object, where: str, keys: Sequence[str], optional: Sequence[str] = ()
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, "an object", value)
        missing = [k for k in keys if k not in value]
        if missing:
            raise TraceError(f"{self.source}: {where}: missing key {missing[0]!r}")
        unknown = sorted(set(value) - set(keys) - set(optional))
        if unknown:
            raise TraceError(
                f"{self.source}: {where}: unknown key {unknown[0]!r}; "
                f"expected {', '.join(repr(k) for k in (*keys, *optional))}"
            )
        return value

    def mapping(self, value: object, where: str) -> dict[str, Any]:
        """An object whose keys are data (device UUIDs), not fixed names."""
        if not isinstance(value, dict):
            raise self.fail(where, "an object", value)
        return value

    def array(self, value: object, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, "an array", value)
        return value

    def integer(
        self, value: object, where: str, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(where, f"an integer >= {minimum}", value)
        if maximum is not None and value > maximum:
            raise self.fail(where, f"an integer <= {maximum}", value)
        return value

    def uuid(self, value: object, where: str, prefix: str) -> str:
        if not isinstance(value, str) or not value.upper().startswith(prefix + "-"):
            raise self.fail(where, f'a UUID "{prefix}-<uuid>"', value)
        normalized = normalize_uuid(value)
        if not _UUID_RE.match(normalized):
            raise self.fail(where, f'a UUID "{prefix}-<uuid>"', value)
        return normalized

    def device(self, value: object, where: str) -> GpuDevice:
        data = self.table(
            value, where, ("index", "uuid", "name", "memory_total", "minor_number"), ("mig",)
        )
        migs: list[MigDevice] = []
        for i, raw in enumerate(self.array(data.get("mig", []), f"{where}.mig")):
            here = f"{where}.mig[{i}]"
            mig = self.table(
                raw, here, ("uuid", "gpu_instance_id", "compute_instance_id", "memory_total")
            )
            migs.append(
                MigDevice(
                    uuid=self.uuid(mig["uuid"], f"{here}.uuid", "MIG"),
                    gpu_instance_id=self.integer(mig["gpu_instance_id"], f"{here}.gpu_instance_id"),
                    compute_instance_id=self.integer(
                        mig["compute_instance_id"], f"{here}.compute_instance_id"
                    ),
                    memory_total=self.integer(mig["memory_total"], f"{here}.memory_total"),
                )
            )
        name = data["name"]
        if not isinstance(name, str) or not name:
            raise self.fail(f"{where}.name", "a non-empty string", name)
        return GpuDevice(
            index=self.integer(data["index"], f"{where}.index"),
            uuid=self.uuid(data["uuid"], f"{where}.uuid", "GPU"),
            name=name,
            memory_total=self.integer(data["memory_total"], f"{where}.memory_total"),
            minor_number=self.integer(data["minor_number"], f"{where}.minor_number"),
            mig=tuple(migs),
        )

    def text(self, value: object, where: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, "a string", value)
        return value

    def texts(self, value: object, where: str) -> tuple[str, ...]:
        return tuple(
            self.text(item, f"{where}[{i}]") for i, item in enumerate(self.array(value, where))
        )

    def optional_integer(
        self, data: Mapping[str, Any], key: str, where: str, *, minimum: int = 0
    ) -> int | None:
        value = data.get(key)
        return None if value is None else self.integer(value, f"{where}.{key}", minimum=minimum)

    def snapshot(self, value: object, where: str, known: set[str]) -> TraceSnapshot:
        data = self.table(value, where, ("t",), ("processes", "utilization", "devices"))
        t = data["t"]
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise self.fail(f"{where}.t", "a number of seconds >= 0", t)
        processes: dict[str, tuple[GpuProcess, ...]] = {}
        raw_processes = self.mapping(data.get("processes", {}), f"{where}.processes")
        for key, entries in raw_processes.items():
            uuid = self.known_uuid(key, f"{where}.processes", known)
            listed = [
                self.process(raw, f"{where}.processes.{key}[{i}]")
                for i, raw in enumerate(self.array(entries, f"{where}.processes.{key}"))
            ]
            processes[uuid] = tuple(sorted(listed, key=lambda p: p.pid))
        utilization: dict[str, Utilization] = {}
        raw_utilization = self.mapping(data.get("utilization", {}), f"{where}.utilization")
        for key, raw in raw_utilization.items():
            uuid = self.known_uuid(key, f"{where}.utilization", known)
            here = f"{where}.utilization.{key}"
            entry = self.table(raw, here, ("gpu", "memory"))
            utilization[uuid] = Utilization(
                gpu=self.integer(entry["gpu"], f"{here}.gpu", maximum=100),
                memory=self.integer(entry["memory"], f"{here}.memory", maximum=100),
            )
        telemetry: dict[str, DeviceTelemetry] = {}
        raw_devices = self.mapping(data.get("devices", {}), f"{where}.devices")
        for key, raw in raw_devices.items():
            uuid = self.known_uuid(key, f"{where}.devices", known)
            telemetry[uuid] = self.telemetry(raw, f"{where}.devices.{key}")
        return TraceSnapshot(
            t=float(t), processes=processes, utilization=utilization, telemetry=telemetry
        )

    def process(self, value: object, where: str) -> GpuProcess:
        entry = self.table(value, where, ("pid", "used_memory"), ("sm", "proc"))
        used = entry["used_memory"]
        sm = entry.get("sm")
        raw_facts = entry.get("proc")
        return GpuProcess(
            pid=self.integer(entry["pid"], f"{where}.pid", minimum=1),
            used_memory=None if used is None else self.integer(used, f"{where}.used_memory"),
            sm_util=None if sm is None else self.integer(sm, f"{where}.sm", maximum=100),
            facts=None if raw_facts is None else self.facts(raw_facts, f"{where}.proc"),
        )

    def facts(self, value: object, where: str) -> TraceProcessFacts:
        data = self.table(value, where, ("comm",), ("uid", "cmdline", "cgroup", "libraries"))
        cgroup = data.get("cgroup")
        return TraceProcessFacts(
            comm=self.text(data["comm"], f"{where}.comm"),
            uid=self.optional_integer(data, "uid", where),
            cmdline=self.texts(data.get("cmdline", []), f"{where}.cmdline"),
            cgroup=None if cgroup is None else self.text(cgroup, f"{where}.cgroup"),
            libraries=self.texts(data.get("libraries", []), f"{where}.libraries"),
        )

    def telemetry(self, value: object, where: str) -> DeviceTelemetry:
        counters = (
            *("fb_used", "energy_mj", "pcie_tx", "pcie_rx", "nvlink_tx", "nvlink_rx"),
            *("sm_clock_mhz", "ecc_sbe", "ecc_dbe"),
        )
        data = self.table(
            value, where, (), (*counters, "power_w", "temperature_c", "xid", "ecc_mode")
        )
        power = data.get("power_w")
        if power is not None and (
            isinstance(power, bool)
            or not isinstance(power, int | float)
            or not math.isfinite(power)
            or power < 0
        ):
            raise self.fail(f"{where}.power_w", "a number of watts >= 0", power)
        ecc_mode = data.get("ecc_mode")
        if ecc_mode is not None and not isinstance(ecc_mode, bool):
            raise self.fail(f"{where}.ecc_mode", "true, false or null", ecc_mode)
        xid = tuple(
            self.integer(code, f"{where}.xid[{i}]")
            for i, code in enumerate(self.array(data.get("xid", []), f"{where}.xid"))
        )
        count = {key: self.optional_integer(data, key, where) for key in counters}
        return DeviceTelemetry(
            fb_used=count["fb_used"],
            power_w=None if power is None else float(power),
            energy_mj=count["energy_mj"],
            pcie_tx=count["pcie_tx"],
            pcie_rx=count["pcie_rx"],
            nvlink_tx=count["nvlink_tx"],
            nvlink_rx=count["nvlink_rx"],
            temperature_c=self.optional_integer(data, "temperature_c", where, minimum=-273),
            sm_clock_mhz=count["sm_clock_mhz"],
            xid=xid,
            ecc_mode=ecc_mode,
            ecc_sbe=count["ecc_sbe"],
            ecc_dbe=count["ecc_dbe"],
        )

    def known_uuid(self, key: str, where: str, known: set[str]) -> str:
        uuid = normalize_uuid(key)
        if uuid not in known:
            raise TraceError(
                f"{self.source}: {where}: {key!r} is not a device of the trace; "
                f"expected one of {', '.join(sorted(known))}"
            )
        return uuid


class ReplayedNvml:
    """:class:`NvmlSource` that replays a recorded trace, one snapshot at a time.

    Devices are fixed for the whole trace; processes and utilization are those of the
    current snapshot. It starts at the first snapshot; :meth:`advance` moves on. Build
    one with :meth:`from_file` or :meth:`from_dict`.
    """

    def __init__(
        self,
        *,
        devices: Sequence[GpuDevice],
        snapshots: Sequence[TraceSnapshot],
        source: str = "<trace>",
    ) -> None:
        """Replay ``snapshots`` (at least one, in time order) of ``devices``."""
        if not snapshots:
            raise TraceError(f"{source}: snapshots: expected at least one snapshot, got none")
        times = [s.t for s in snapshots]
        if times != sorted(times):
            raise TraceError(f"{source}: snapshots: expected snapshots in order of t")
        self._devices = tuple(devices)
        self._snapshots = tuple(snapshots)
        self._source = source
        self._position = 0
        self._lock = threading.Lock()
        self._known: dict[str, bool] = {}  # uuid -> is a MIG device
        for device in self._devices:
            self._known[device.uuid] = False
            self._known.update((mig.uuid, True) for mig in device.mig)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<trace>") -> ReplayedNvml:
        """Replay a trace already parsed from JSON (see the module docstring)."""
        reader = _Reader(source)
        doc = reader.table(
            dict(data), "trace", ("format", "devices", "snapshots"), ("description", "recorded")
        )
        if doc["format"] != TRACE_FORMAT:
            raise reader.fail("format", json.dumps(TRACE_FORMAT), doc["format"])
        devices = [
            reader.device(raw, f"devices[{i}]")
            for i, raw in enumerate(reader.array(doc["devices"], "devices"))
        ]
        known: set[str] = set()
        for i, device in enumerate(devices):
            for uuid in (device.uuid, *(mig.uuid for mig in device.mig)):
                if uuid in known:
                    raise TraceError(f"{source}: devices[{i}]: UUID {uuid} appears twice")
                known.add(uuid)
        snapshots = [
            reader.snapshot(raw, f"snapshots[{i}]", known)
            for i, raw in enumerate(reader.array(doc["snapshots"], "snapshots"))
        ]
        return cls(devices=devices, snapshots=snapshots, source=source)

    @classmethod
    def from_file(cls, path: str | Path) -> ReplayedNvml:
        """Replay the JSON trace in ``path``; :class:`TraceError` names file and key."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TraceError(f"{path}: cannot read the NVML trace: {exc.strerror}") from exc
        return cls.from_json(text, source=str(path))

    @classmethod
    def from_json(cls, text: str, *, source: str = "<trace>") -> ReplayedNvml:
        """Replay the JSON trace ``text``; ``source`` names it in errors (a file name)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TraceError(
                f"{source}: line {exc.lineno}, column {exc.colno}: not JSON: {exc.msg}"
            ) from exc
        if not isinstance(data, dict):
            raise TraceError(f"{source}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, source=source)

    # -- replay ---------------------------------------------------------------------

    def __len__(self) -> int:
        """The number of snapshots."""
        return len(self._snapshots)

    @property
    def position(self) -> int:
        """Index of the current snapshot (0 for the first)."""
        return self._position

    @property
    def time(self) -> float:
        """``t`` of the current snapshot: seconds since the first."""
        return self._snapshots[self._position].t

    @property
    def snapshot(self) -> TraceSnapshot:
        """The current snapshot."""
        return self._snapshots[self._position]

    def advance(self) -> bool:
        """Move to the next snapshot; ``False`` (staying put) when at the last one."""
        with self._lock:
            if self._position + 1 >= len(self._snapshots):
                return False
            self._position += 1
            return True

    def rewind(self) -> None:
        """Go back to the first snapshot."""
        with self._lock:
            self._position = 0

    def _check(self, uuid: str) -> tuple[str, bool]:
        key = normalize_uuid(uuid)
        if key not in self._known:
            raise NvmlError(
                f"{self._source}: no GPU or MIG device {key!r} in the trace; "
                f"it has: {', '.join(self._known)}"
            )
        return key, self._known[key]

    # -- NvmlSource -------------------------------------------------------------------

    def devices(self) -> list[GpuDevice]:
        """The trace's devices, in index order."""
        return sorted(self._devices, key=lambda d: d.index)

    def processes(self, uuid: str) -> list[GpuProcess]:
        """The processes on ``uuid`` in the current snapshot."""
        key, _ = self._check(uuid)
        return list(self.snapshot.processes.get(key, ()))

    def utilization(self, uuid: str) -> Utilization | None:
        """Utilization of ``uuid`` in the current snapshot; ``None`` if not recorded."""
        key, _ = self._check(uuid)
        return self.snapshot.utilization.get(key)

    def telemetry(self, uuid: str) -> DeviceTelemetry | None:
        """The current snapshot's ``devices`` entry for ``uuid``; ``None`` if not recorded."""
        key, _ = self._check(uuid)
        return self.snapshot.telemetry.get(key)


# --------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------


def device_json(device: GpuDevice) -> dict[str, Any]:
    """A device as a trace's ``devices`` entry."""
    return {
        "index": device.index,
        "uuid": device.uuid,
        "name": device.name,
        "memory_total": device.memory_total,
        "minor_number": device.minor_number,
        "mig": [
            {
                "uuid": mig.uuid,
                "gpu_instance_id": mig.gpu_instance_id,
                "compute_instance_id": mig.compute_instance_id,
                "memory_total": mig.memory_total,
            }
            for mig in device.mig
        ],
    }


def _process_json(process: GpuProcess) -> dict[str, Any]:
    entry: dict[str, Any] = {"pid": process.pid, "used_memory": process.used_memory}
    if process.sm_util is not None:
        entry["sm"] = process.sm_util
    facts = process.facts
    if facts is not None:
        proc: dict[str, Any] = {"comm": facts.comm}
        if facts.uid is not None:
            proc["uid"] = facts.uid
        proc["cmdline"] = list(facts.cmdline)
        if facts.cgroup is not None:
            proc["cgroup"] = facts.cgroup
        proc["libraries"] = list(facts.libraries)
        entry["proc"] = proc
    return entry


def _telemetry_json(source: NvmlSource, uuid: str) -> dict[str, Any]:
    """The ``devices`` entry of ``uuid`` where ``source`` has ``telemetry(uuid)`` (a replay)."""
    reader = getattr(source, "telemetry", None)
    recorded = reader(uuid) if callable(reader) else None
    if not isinstance(recorded, DeviceTelemetry):
        return {}
    entry: dict[str, Any] = {
        item.name: getattr(recorded, item.name)
        for item in fields(recorded)
        if item.name != "xid" and getattr(recorded, item.name) is not None
    }
    if recorded.xid:
        entry["xid"] = list(recorded.xid)
    return entry


def record_trace(
    source: NvmlSource,
    *,
    samples: int,
    interval: float,
    description: str = "",
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Sample ``source`` ``samples`` times, ``interval`` seconds apart, into a trace.

    The result is a JSON-able trace that :meth:`ReplayedNvml.from_dict` replays: record
    one on a GPU server (``record_trace(RealNvml(), samples=10, interval=1)``) and keep
    it under ``tests/data/nvml/``. Devices are read once, at the start. A process's
    ``sm_util`` and ``facts`` are written as ``sm`` and ``proc``, and a source with a
    ``telemetry(uuid)`` method returning :class:`DeviceTelemetry` (:class:`ReplayedNvml`)
    also fills each snapshot's ``devices``.
    """
    if samples < 1:
        raise UsageError(f"samples must be at least 1, got {samples}")
    devices = source.devices()
    uuids = [u for d in devices for u in (d.uuid, *(m.uuid for m in d.mig))]
    snapshots: list[dict[str, Any]] = []
    start = clock()
    for sample in range(samples):
        if sample:
            sleep(interval)
        processes: dict[str, list[dict[str, Any]]] = {}
        utilization: dict[str, dict[str, int]] = {}
        telemetry: dict[str, dict[str, Any]] = {}
        for uuid in uuids:
            running = source.processes(uuid)
            if running:
                processes[uuid] = [_process_json(p) for p in running]
            rates = source.utilization(uuid)
            if rates is not None:
                utilization[uuid] = {"gpu": rates.gpu, "memory": rates.memory}
            recorded = _telemetry_json(source, uuid)
            if recorded:
                telemetry[uuid] = recorded
        snapshot: dict[str, Any] = {
            "t": round(clock() - start, 3),
            "processes": processes,
            "utilization": utilization,
        }
        if telemetry:
            snapshot["devices"] = telemetry
        snapshots.append(snapshot)
    trace: dict[str, Any] = {"format": TRACE_FORMAT}
    if description:
        trace["description"] = description
    trace["devices"] = [device_json(d) for d in devices]
    trace["snapshots"] = snapshots
    return trace
