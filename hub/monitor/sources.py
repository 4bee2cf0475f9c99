"""Where readings come from: real NVML, a replayed trace, and a trace file that may change.

Three :class:`~ztlab.hub.monitor.telemetry.TelemetrySource` implementations:

- :class:`NvmlTelemetry` reads the GPUs through ``pynvml`` (via
  :class:`~ztlab.hub.gpu.nvml.RealNvml`): utilization, memory, power, energy, PCIe and NVLink
  throughput, temperature, SM clock, ECC, XID errors (from an NVML event set) and every
  process with its own SM utilization. A metric a device does not support is ``None`` and is
  not asked for again; one failing metric never fails the whole reading.
- :class:`ReplayedTelemetry` replays a ``ztlab-nvml-trace/1`` trace
  (:class:`~ztlab.hub.gpu.nvml.ReplayedNvml`), one snapshot per :meth:`~ReplayedTelemetry.read`.
- :class:`WatchedTrace` replays the trace file at a path and starts over whenever the file
  changes: demos and end-to-end tests write a trace naming real PIDs while the hub runs.

``hub.gpu`` does not know this package: the trace's value types are converted here.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from ztlab.common.errors import UsageError
from ztlab.hub.gpu.nvml import (
    TRACE_FORMAT,
    DeviceTelemetry,
    GpuDevice,
    GpuProcess,
    NvmlError,
    RealNvml,
    ReplayedNvml,
    TraceError,
    TraceProcessFacts,
    TraceSnapshot,
    device_json,
    normalize_uuid,
)
from ztlab.hub.monitor.telemetry import DeviceReading, ProcessFacts, ProcessReading, Reading

__all__ = [
    "MAX_EVENTS_PER_READ",
    "RETRY_FAILED_S",
    "NvmlTelemetry",
    "ReplayedTelemetry",
    "WatchedTrace",
    "process_facts",
    "record_telemetry",
    "snapshot_json",
    "snapshot_reading",
]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: seconds before a metric that failed with an error other than "not supported" is tried again
RETRY_FAILED_S: Final = 300.0
#: the most XID events one reading drains (a storm of events must not stall a tick)
MAX_EVENTS_PER_READ: Final = 256
#: ``scopeId`` that asks NVML for the sum over all NVLinks
_ALL_LINKS: Final = 0xFFFFFFFF
#: ``nvmlFieldValue_t.valueType`` -> the union member holding the value
_FIELD_VALUE_MEMBER: Final = {
    0: "dVal",
    1: "uiVal",
    2: "ulVal",
    3: "ullVal",
    4: "sllVal",
    5: "siVal",
    6: "usVal",
}


def _empty(t: float) -> Reading:
    return Reading(t=t, devices=(), processes=())


# --------------------------------------------------------------------------------------
# Replayed traces
# --------------------------------------------------------------------------------------


def process_facts(pid: int, facts: TraceProcessFacts) -> ProcessFacts:
    """A trace's ``proc`` entry of ``pid`` as :class:`ProcessFacts`."""
    return ProcessFacts(
        pid=pid,
        uid=facts.uid,
        comm=facts.comm,
        cmdline=tuple(facts.cmdline),
        cgroup=facts.cgroup,
        libraries=tuple(facts.libraries),
    )


def _process_reading(uuid: str, process: GpuProcess) -> ProcessReading:
    return ProcessReading(
        pid=process.pid,
        uuid=uuid,
        used_memory=process.used_memory,
        sm_util=process.sm_util,
        facts=None if process.facts is None else process_facts(process.pid, process.facts),
    )


def _used(processes: Iterable[GpuProcess]) -> int:
    return sum(p.used_memory for p in processes if p.used_memory is not None)


#: a device the snapshot records nothing beyond processes and utilization of
_NO_TELEMETRY: Final = DeviceTelemetry()


def _snapshot_device(
    snapshot: TraceSnapshot,
    *,
    uuid: str,
    index: int,
    name: str,
    parent: str | None,
    memory_total: int,
    fb_default: int,
) -> DeviceReading:
    rates = snapshot.utilization.get(uuid)
    extra = snapshot.telemetry.get(uuid) or _NO_TELEMETRY
    return DeviceReading(
        uuid=uuid,
        index=index,
        name=name,
        parent=parent,
        memory_total=memory_total,
        gpu_util=None if rates is None else rates.gpu,
        mem_util=None if rates is None else rates.memory,
        fb_used=fb_default if extra.fb_used is None else extra.fb_used,
        power_w=extra.power_w,
        energy_mj=extra.energy_mj,
        pcie_tx=extra.pcie_tx,
        pcie_rx=extra.pcie_rx,
        nvlink_tx=extra.nvlink_tx,
        nvlink_rx=extra.nvlink_rx,
        temperature_c=extra.temperature_c,
        sm_clock_mhz=extra.sm_clock_mhz,
        xid=extra.xid,
        ecc_mode=extra.ecc_mode,
        ecc_sbe=extra.ecc_sbe,
        ecc_dbe=extra.ecc_dbe,
    )


def snapshot_reading(devices: Iterable[GpuDevice], snapshot: TraceSnapshot, *, t: float) -> Reading:
    """The :class:`Reading` a trace ``snapshot`` of ``devices`` stands for, taken at ``t``.

    Where the snapshot records no ``fb_used`` for a device, the memory its processes use is
    taken instead (a MIG-enabled GPU: its own and its MIG devices' processes).
    """
    readings: list[DeviceReading] = []
    processes: list[ProcessReading] = []
    for gpu in devices:
        own = snapshot.processes.get(gpu.uuid, ())
        in_migs = [p for mig in gpu.mig for p in snapshot.processes.get(mig.uuid, ())]
        readings.append(
            _snapshot_device(
                snapshot,
                uuid=gpu.uuid,
                index=gpu.index,
                name=gpu.name,
                parent=None,
                memory_total=gpu.memory_total,
                fb_default=_used(own) + _used(in_migs),
            )
        )
        processes.extend(_process_reading(gpu.uuid, p) for p in own)
        for mig in gpu.mig:
            running = snapshot.processes.get(mig.uuid, ())
            readings.append(
                _snapshot_device(
                    snapshot,
                    uuid=mig.uuid,
                    index=gpu.index,
                    name=gpu.name,
                    parent=gpu.uuid,
                    memory_total=mig.memory_total,
                    fb_default=_used(running),
                )
            )
            processes.extend(_process_reading(mig.uuid, p) for p in running)
    return Reading(t=t, devices=tuple(readings), processes=tuple(processes))


class ReplayedTelemetry:
    """A :class:`TelemetrySource` replaying a trace: each :meth:`read` is one snapshot.

    Every GPU and MIG device of the trace is in every reading (a MIG device with its
    parent's index and name). At the last snapshot it stays there, or starts over from the
    first with ``loop=True``. ``t`` of a reading is ``clock()``, not the trace's time.
    """

    def __init__(
        self,
        trace: ReplayedNvml,
        *,
        clock: Callable[[], float] = time.time,
        loop: bool = False,
    ) -> None:
        """Replay ``trace`` from its current snapshot."""
        self._trace = trace
        self._clock = clock
        self._loop = loop
        self._devices = tuple(trace.devices())
        self._lock = threading.Lock()

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        loop: bool = False,
    ) -> ReplayedTelemetry:
        """Replay the trace file at ``path`` (:class:`TraceError` names file and key)."""
        return cls(ReplayedNvml.from_file(path), clock=clock, loop=loop)

    @property
    def trace(self) -> ReplayedNvml:
        """The trace replayed (its position is the snapshot the next :meth:`read` returns)."""
        return self._trace

    def read(self) -> Reading:
        """The current snapshot as a reading; then the trace moves on."""
        with self._lock:
            reading = snapshot_reading(self._devices, self._trace.snapshot, t=self._clock())
            if not self._trace.advance() and self._loop:
                self._trace.rewind()
            return reading

    def close(self) -> None:
        """Nothing to release."""


_Signature = tuple[int, int, int]


def _signature(stat: os.stat_result) -> _Signature:
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class WatchedTrace:
    """A :class:`TelemetrySource` replaying the trace file at ``path``, reloaded on change.

    Whenever the file's modification time, size or inode changes the replay starts over from
    the new file's first snapshot (then stays at its last one). While the file is missing,
    or when it is malformed, readings have no devices and no processes; a malformed file is
    logged once per change (and kept in :attr:`error`), never raised to the caller. Write the
    file atomically (a temporary file renamed over it), or a reader may see half of it.
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        """Watch ``path``; nothing is read before the first :meth:`read`."""
        self._path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: _Signature | None = None
        self._replay: ReplayedTelemetry | None = None
        self._error: TraceError | None = None

    @property
    def path(self) -> Path:
        """The trace file watched."""
        return self._path

    @property
    def error(self) -> TraceError | None:
        """Why the current file could not be replayed; ``None`` when it can (or is missing)."""
        return self._error

    def read(self) -> Reading:
        """The next snapshot of the current file; an empty reading without a usable file."""
        with self._lock:
            self._refresh()
            if self._replay is None:
                return _empty(self._clock())
            return self._replay.read()

    def close(self) -> None:
        """Forget the loaded trace."""
        with self._lock:
            self._replay = None
            self._seen = None

    def _refresh(self) -> None:
        try:
            current: _Signature | None = _signature(self._path.stat())
        except OSError:
            current = None
        if current == self._seen:
            return
        if current is None:
            if self._replay is not None or self._error is not None:
                _log.info("NVML trace %s is gone: no GPU readings until it is back", self._path)
            self._seen, self._replay, self._error = None, None, None
            return
        self._load()

    def _load(self) -> None:
        try:
            with self._path.open("rb") as stream:
                self._seen = _signature(os.fstat(stream.fileno()))
                data = stream.read()
            trace = ReplayedNvml.from_json(data.decode("utf-8", "replace"), source=str(self._path))
        except FileNotFoundError:
            self._seen, self._replay, self._error = None, None, None
            return
        except OSError as exc:
            self._fail(TraceError(f"{self._path}: cannot read the NVML trace: {exc.strerror}"))
            return
        except TraceError as exc:
            self._fail(exc)
            return
        _log.info("replaying NVML trace %s (%d snapshots)", self._path, len(trace))
        self._replay = ReplayedTelemetry(trace, clock=self._clock)
        self._error = None

    def _fail(self, error: TraceError) -> None:
        _log.error("cannot replay the NVML trace: %s", error.message)
        self._replay = None
        self._error = error


# --------------------------------------------------------------------------------------
# Real NVML
# --------------------------------------------------------------------------------------


class _Never(Exception):
    """Stands in for an error class a ``pynvml`` release lacks (never raised)."""


@dataclass(slots=True)
class _NvlinkCounters:
    """The cumulative NVLink data counters (KiB) at an NVML timestamp (microseconds)."""

    timestamp: int
    tx: int
    rx: int


def _field_value(value: Any) -> int:
    member = _FIELD_VALUE_MEMBER.get(int(value.valueType))
    if member is None:
        raise ValueError(f"unknown NVML field value type {value.valueType}")
    return int(getattr(value.value, member))


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class NvmlTelemetry:
    """A :class:`TelemetrySource` reading the GPUs through NVML (``pynvml``).

    Builds (and then owns and closes) a :class:`RealNvml` when none is given, so it raises
    :class:`~ztlab.hub.gpu.nvml.NvmlUnavailableError` where NVML cannot be used. The device
    list is read again every ``rescan_s`` seconds. Per device, a call NVML answers with "not
    supported" (or that this ``pynvml`` lacks) is not made again; one failing with another
    error is tried again after :data:`RETRY_FAILED_S`. :meth:`read` raises
    :class:`~ztlab.hub.gpu.nvml.NvmlError` only when NVML cannot list the devices at all.
    """

    def __init__(
        self,
        nvml: RealNvml | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rescan_s: float = 30.0,
    ) -> None:
        """Read the GPUs through ``nvml`` (built here when ``None``)."""
        self._owned = nvml is None
        self._nvml = RealNvml() if nvml is None else nvml
        self._pynvml = self._nvml.pynvml
        self._clock = clock
        self._monotonic = monotonic
        self._rescan_s = rescan_s
        self._lock = threading.Lock()
        self._devices: list[GpuDevice] = []
        self._scanned_at = -math.inf
        #: (uuid, call) -> monotonic time it may be tried again (inf: never)
        self._skip: dict[tuple[str, str], float] = {}
        #: per device: the largest process-utilization timestamp seen (microseconds)
        self._cursors: dict[str, int] = {}
        self._nvlink: dict[str, _NvlinkCounters] = {}
        self._events: Any = None
        self._events_unusable = False
        self._registered: set[str] = set()
        self._process_failures: set[str] = set()
        self._closed = False
        self._not_supported = self._error_class("NVMLError_NotSupported")
        self._not_found = self._error_class("NVMLError_NotFound")
        self._timeout = self._error_class("NVMLError_Timeout")

    def _error_class(self, name: str) -> type[BaseException]:
        found = getattr(self._pynvml, name, None)
        return found if isinstance(found, type) and issubclass(found, BaseException) else _Never

    # -- TelemetrySource ----------------------------------------------------------------

    def read(self) -> Reading:
        """Every GPU and MIG device and every process on them, now."""
        with self._lock:
            if self._closed:
                raise NvmlError("NVML telemetry was closed; cannot read")
            t = self._clock()
            try:
                return self._read(t)
            except NvmlError:
                self._scanned_at = -math.inf  # a device may have gone: scan again next time
                raise

    def _read(self, t: float) -> Reading:
        devices = self._device_list()
        xids = self._drain_xid(devices)
        readings: list[DeviceReading] = []
        processes: list[ProcessReading] = []
        for gpu in devices:
            in_migs: set[int] = set()
            migs: list[tuple[DeviceReading, list[ProcessReading]]] = []
            for mig in gpu.mig:
                reading = self._device(
                    mig.uuid, gpu=gpu, parent=gpu.uuid, memory_total=mig.memory_total
                )
                running = self._processes(mig.uuid)
                in_migs.update(p.pid for p in running)
                migs.append((reading, running))
            gpu_reading = self._device(
                gpu.uuid,
                gpu=gpu,
                parent=None,
                memory_total=gpu.memory_total,
                xid=tuple(xids.get(gpu.uuid, ())),
            )
            readings.append(gpu_reading)
            processes.extend(p for p in self._processes(gpu.uuid) if p.pid not in in_migs)
            for reading, running in migs:
                readings.append(reading)
                processes.extend(running)
        return Reading(t=t, devices=tuple(readings), processes=tuple(processes))

    def close(self) -> None:
        """Free the XID event set, and shut NVML down when it was built here."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            events, self._events = self._events, None
        if events is not None:
            try:
                self._pynvml.nvmlEventSetFree(events)
            except Exception as exc:  # closing must go on
                _log.warning("nvmlEventSetFree failed: %s", exc)
        if self._owned:
            self._nvml.close()

    def __enter__(self) -> NvmlTelemetry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- calls --------------------------------------------------------------------------

    def _optional(self, uuid: str, call: str, function: Callable[[], _T]) -> _T | None:
        """``function()``, or ``None`` when it fails (then skipped for a while or for good)."""
        key = (uuid, call)
        now = self._monotonic()
        if self._skip.get(key, -math.inf) > now:
            return None
        try:
            value = function()
        except self._not_supported:
            self._skip[key] = math.inf
            return None
        except (AttributeError, TypeError) as exc:
            _log.info("NVML %s is not usable with this pynvml on %s: %s", call, uuid, exc)
            self._skip[key] = math.inf
            return None
        except Exception as exc:  # one metric must not fail the reading
            _log.warning(
                "NVML %s failed on %s (tried again in %.0f s): %s", call, uuid, RETRY_FAILED_S, exc
            )
            self._skip[key] = now + RETRY_FAILED_S
            return None
        self._skip.pop(key, None)
        return value

    def _device_list(self) -> list[GpuDevice]:
        now = self._monotonic()
        if now - self._scanned_at >= self._rescan_s:
            self._devices = self._nvml.devices()
            self._scanned_at = now
        return self._devices

    def _device(
        self,
        uuid: str,
        *,
        gpu: GpuDevice,
        parent: str | None,
        memory_total: int,
        xid: tuple[int, ...] = (),
    ) -> DeviceReading:
        nvml = self._pynvml
        handle = self._nvml.handle(uuid)

        def metric(call: str, function: Callable[[], _T]) -> _T | None:
            return self._optional(uuid, call, function)

        rates = (
            None
            if parent is not None
            else metric("utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        )
        memory = metric("memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        power = metric("power", lambda: int(nvml.nvmlDeviceGetPowerUsage(handle)))
        ecc_mode = metric("ecc_mode", lambda: nvml.nvmlDeviceGetEccMode(handle))
        nvlink_tx, nvlink_rx = self._nvlink_rates(uuid, handle)
        return DeviceReading(
            uuid=uuid,
            index=gpu.index,
            name=gpu.name,
            parent=parent,
            memory_total=memory_total,
            gpu_util=None if rates is None else int(rates.gpu),
            mem_util=None if rates is None else int(rates.memory),
            fb_used=None if memory is None else int(memory.used),
            power_w=None if power is None else power / 1000.0,
            energy_mj=metric(
                "energy", lambda: int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
            ),
            pcie_tx=metric("pcie_tx", lambda: self._pcie(handle, "NVML_PCIE_UTIL_TX_BYTES")),
            pcie_rx=metric("pcie_rx", lambda: self._pcie(handle, "NVML_PCIE_UTIL_RX_BYTES")),
            nvlink_tx=nvlink_tx,
            nvlink_rx=nvlink_rx,
            temperature_c=metric(
                "temperature",
                lambda: int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            ),
            sm_clock_mhz=metric(
                "sm_clock", lambda: int(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))
            ),
            xid=xid,
            ecc_mode=None if ecc_mode is None else int(ecc_mode[0]) == _enabled(nvml),
            ecc_sbe=metric(
                "ecc_sbe", lambda: self._ecc(handle, "NVML_MEMORY_ERROR_TYPE_CORRECTED")
            ),
            ecc_dbe=metric(
                "ecc_dbe", lambda: self._ecc(handle, "NVML_MEMORY_ERROR_TYPE_UNCORRECTED")
            ),
        )

    def _pcie(self, handle: Any, counter: str) -> int:
        """``nvmlDeviceGetPcieThroughput`` (KB/s) in bytes per second."""
        nvml = self._pynvml
        return int(nvml.nvmlDeviceGetPcieThroughput(handle, getattr(nvml, counter))) * 1024

    def _ecc(self, handle: Any, error_type: str) -> int:
        nvml = self._pynvml
        return int(
            nvml.nvmlDeviceGetTotalEccErrors(
                handle, getattr(nvml, error_type), nvml.NVML_VOLATILE_ECC
            )
        )

    def _nvlink_rates(self, uuid: str, handle: Any) -> tuple[int | None, int | None]:
        """NVLink bytes per second since the previous reading, all links together.

        NVML's ``NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX``/``RX`` are counters in KiB with a
        timestamp: the first reading of a device (and a counter that went back) gives ``None``.
        """
        nvml = self._pynvml
        fields = (
            getattr(nvml, "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX", None),
            getattr(nvml, "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX", None),
        )
        if fields[0] is None or fields[1] is None:
            return None, None
        values = self._optional(
            uuid,
            "nvlink",
            lambda: nvml.nvmlDeviceGetFieldValues(handle, [(f, _ALL_LINKS) for f in fields]),
        )
        if values is None:
            return None, None
        tx, rx = values[0], values[1]
        if int(tx.nvmlReturn) != 0 or int(rx.nvmlReturn) != 0:
            # the field is not supported on this device (no NVLink): never ask again
            self._skip[(uuid, "nvlink")] = math.inf
            return None, None
        now = _NvlinkCounters(timestamp=int(tx.timestamp), tx=_field_value(tx), rx=_field_value(rx))
        before = self._nvlink.get(uuid)
        self._nvlink[uuid] = now
        if before is None or now.timestamp <= before.timestamp:
            return None, None
        if now.tx < before.tx or now.rx < before.rx:
            return None, None
        seconds = (now.timestamp - before.timestamp) / 1e6
        return (
            round((now.tx - before.tx) * 1024 / seconds),
            round((now.rx - before.rx) * 1024 / seconds),
        )

    # -- processes ----------------------------------------------------------------------

    def _processes(self, uuid: str) -> list[ProcessReading]:
        try:
            running = self._nvml.processes(uuid)
        except NvmlError as exc:
            if uuid not in self._process_failures:
                _log.error("cannot list the processes on %s: %s", uuid, exc.message)
                self._process_failures.add(uuid)
            return []
        if uuid in self._process_failures:
            _log.info("the processes on %s can be listed again", uuid)
            self._process_failures.discard(uuid)
        utilization = self._process_utilization(uuid) if running else {}
        return [
            ProcessReading(
                pid=p.pid, uuid=uuid, used_memory=p.used_memory, sm_util=utilization.get(p.pid)
            )
            for p in running
        ]

    def _process_utilization(self, uuid: str) -> Mapping[int, int]:
        """Mean SM utilization per pid over the samples since the device's cursor."""
        nvml = self._pynvml
        handle = self._nvml.handle(uuid)
        cursor = self._cursors.get(uuid, 0)

        def samples() -> list[Any]:
            try:
                return list(nvml.nvmlDeviceGetProcessUtilization(handle, cursor))
            except self._not_found:
                return []  # no sample since the cursor

        found = self._optional(uuid, "process_utilization", samples) or []
        per_pid: dict[int, list[int]] = {}
        for sample in found:
            stamp = int(sample.timeStamp)
            if stamp <= cursor:
                continue
            per_pid.setdefault(int(sample.pid), []).append(int(sample.smUtil))
            self._cursors[uuid] = max(self._cursors.get(uuid, 0), stamp)
        return {
            pid: min(100, max(0, round(sum(values) / len(values))))
            for pid, values in per_pid.items()
        }

    # -- XID events ---------------------------------------------------------------------

    def _drain_xid(self, devices: Iterable[GpuDevice]) -> dict[str, list[int]]:
        """XID codes raised since the previous reading, by GPU UUID."""
        events = self._event_set(devices)
        if events is None:
            return {}
        nvml = self._pynvml
        wait = getattr(nvml, "nvmlEventSetWait_v2", None) or nvml.nvmlEventSetWait
        xid_type = int(nvml.nvmlEventTypeXidCriticalError)
        found: dict[str, list[int]] = {}
        for _ in range(MAX_EVENTS_PER_READ):
            try:
                event = wait(events, 0)
            except self._timeout:
                break
            except Exception as exc:  # the rest of the reading goes on
                _log.warning("nvmlEventSetWait failed: %s", exc)
                break
            if not int(event.eventType) & xid_type:
                continue
            try:
                uuid = normalize_uuid(_text(nvml.nvmlDeviceGetUUID(event.device)))
            except Exception as exc:
                _log.warning("XID %s on a device NVML cannot name: %s", event.eventData, exc)
                continue
            found.setdefault(uuid, []).append(int(event.eventData))
        return found

    def _event_set(self, devices: Iterable[GpuDevice]) -> Any:
        """The XID event set, with every GPU registered once; ``None`` where unusable."""
        nvml = self._pynvml
        if self._events is None and not self._events_unusable:
            try:
                self._events = nvml.nvmlEventSetCreate()
            except Exception as exc:  # XIDs are optional
                _log.warning("cannot watch for XID errors: nvmlEventSetCreate failed: %s", exc)
                self._events_unusable = True
        if self._events is None:
            return None
        for gpu in devices:
            if gpu.uuid not in self._registered:
                self._register(gpu.uuid)
        return self._events

    def _register(self, uuid: str) -> None:
        nvml = self._pynvml
        handle = self._nvml.handle(uuid)

        def register() -> bool:
            nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, self._events)
            return True

        if (
            self._optional(uuid, "xid_events", register)
            or self._skip.get((uuid, "xid_events")) == math.inf
        ):
            self._registered.add(uuid)


def _enabled(nvml: Any) -> int:
    return int(getattr(nvml, "NVML_FEATURE_ENABLED", 1))


# --------------------------------------------------------------------------------------
# Recording readings as a trace
# --------------------------------------------------------------------------------------


def snapshot_json(reading: Reading, start: float) -> dict[str, Any]:
    """``reading`` as a trace snapshot (``t`` relative to ``start``), with every telemetry
    value and each process's SM use and facts that the reading has."""
    processes: dict[str, list[dict[str, Any]]] = {}
    for process in reading.processes:
        entry: dict[str, Any] = {"pid": process.pid, "used_memory": process.used_memory}
        entry["sm"] = process.sm_util
        facts = process.facts
        if facts is not None:
            entry["proc"] = {
                "uid": facts.uid,
                "comm": facts.comm,
                "cmdline": list(facts.cmdline),
                "cgroup": facts.cgroup,
                "libraries": list(facts.libraries),
            }
        processes.setdefault(process.uuid, []).append(entry)
    utilization = {}
    devices: dict[str, dict[str, Any]] = {}
    for device in reading.devices:
        if device.gpu_util is not None and device.mem_util is not None:
            utilization[device.uuid] = {"gpu": device.gpu_util, "memory": device.mem_util}
        devices[device.uuid] = {
            "fb_used": device.fb_used,
            "power_w": device.power_w,
            "energy_mj": device.energy_mj,
            "pcie_tx": device.pcie_tx,
            "pcie_rx": device.pcie_rx,
            "nvlink_tx": device.nvlink_tx,
            "nvlink_rx": device.nvlink_rx,
            "temperature_c": device.temperature_c,
            "sm_clock_mhz": device.sm_clock_mhz,
            "xid": list(device.xid),
            "ecc_mode": device.ecc_mode,
            "ecc_sbe": device.ecc_sbe,
            "ecc_dbe": device.ecc_dbe,
        }
    return {
        "t": round(reading.t - start, 3),
        "processes": processes,
        "utilization": utilization,
        "devices": devices,
    }


def record_telemetry(
    nvml: RealNvml,
    *,
    samples: int,
    interval: float,
    description: str = "",
    facts: Callable[[int], ProcessFacts | None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Sample real NVML ``samples`` times, ``interval`` seconds apart, into a trace with
    everything the monitor reads (telemetry, per-process SM use) and, with ``facts``
    (e.g. a :class:`~ztlab.hub.monitor.procfacts.ProcessFactsCache`'s ``get``), each
    process's facts from ``/proc``, so that the trace replays with its attribution on a
    machine where those PIDs do not exist."""
    if samples < 1:
        raise UsageError(f"samples must be at least 1, got {samples}")
    source = NvmlTelemetry(nvml)
    try:
        devices = [device_json(device) for device in nvml.devices()]
        snapshots: list[dict[str, Any]] = []
        start: float | None = None
        for sample in range(samples):
            if sample:
                sleep(interval)
            reading = source.read()
            if facts is not None:
                reading = Reading(
                    t=reading.t,
                    devices=reading.devices,
                    processes=tuple(
                        ProcessReading(
                            pid=p.pid,
                            uuid=p.uuid,
                            used_memory=p.used_memory,
                            sm_util=p.sm_util,
                            facts=facts(p.pid),
                        )
                        for p in reading.processes
                    ),
                )
            start = reading.t if start is None else start
            snapshots.append(snapshot_json(reading, start))
    finally:
        source.close()
    trace: dict[str, Any] = {"format": TRACE_FORMAT}
    if description:
        trace["description"] = description
    trace["devices"] = devices
    trace["snapshots"] = snapshots
    return trace
