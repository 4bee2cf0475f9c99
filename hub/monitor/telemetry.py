"""What one sampling tick reads from the GPUs: typed readings, and the sources they come from.

A :class:`TelemetrySource` returns one :class:`Reading` per call of :meth:`~TelemetrySource.read`:
every GPU and MIG device (:class:`DeviceReading`: utilization, memory, power, energy, PCIe
and NVLink throughput, XID errors, ECC) and every process on them (:class:`ProcessReading`:
memory and, where NVML reports it, the process's own SM utilization). Two sources implement
it (see :mod:`ztlab.hub.monitor.sources`): real NVML through ``pynvml`` and replayed traces
(``ztlab-nvml-trace/1``, see :mod:`ztlab.hub.gpu.nvml`), so that everything but NVML itself
runs in CI.

A value NVML does not report on a device (MIG devices have no power reading; consumer GPUs no
ECC) is ``None``, never ``0``: a missing reading must not look like an idle GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "DeviceReading",
    "ProcessFacts",
    "ProcessReading",
    "Reading",
    "TelemetrySource",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessFacts:
    """What the host says about a process: its account, names and cgroup.

    Read from ``/proc/PID`` (:func:`ztlab.hub.monitor.procfacts.read_process`) or, for
    synthetic PIDs of a replayed trace, from the trace itself.
    """

    pid: int
    #: the real user id, or ``None`` where unknown
    uid: int | None
    #: the short name (``/proc/PID/comm``)
    comm: str
    #: the command line, one string per argument
    cmdline: tuple[str, ...]
    #: the cgroup path the device fence applies to (v1 ``devices`` hierarchy, v2 the unified
    #: path), e.g. ``/ztlab/ztl-alice``; ``None`` where unknown
    cgroup: str | None
    #: the shared libraries it has mapped, by file name (``libcuda.so.1``)
    libraries: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceReading:
    """One GPU or MIG device at one tick. ``None``: not reported by this device or source."""

    #: ``GPU-<uuid>`` or ``MIG-<uuid>`` (normalized)
    uuid: str
    #: NVML index of the GPU (a MIG device: its parent's)
    index: int
    #: product name (``NVIDIA H100 80GB HBM3``)
    name: str
    #: the parent GPU's UUID for a MIG device, ``None`` for a GPU
    parent: str | None
    #: bytes of GPU memory
    memory_total: int
    #: percent of the last period the SMs were busy (``DCGM_FI_DEV_GPU_UTIL``)
    gpu_util: int | None = None
    #: percent of the last period the memory was read or written (``DCGM_FI_DEV_MEM_COPY_UTIL``)
    mem_util: int | None = None
    #: bytes of GPU memory in use
    fb_used: int | None = None
    #: watts drawn now
    power_w: float | None = None
    #: millijoules since the driver loaded (a counter)
    energy_mj: int | None = None
    #: PCIe bytes per second sent (tx) and received (rx) by the GPU
    pcie_tx: int | None = None
    pcie_rx: int | None = None
    #: NVLink bytes per second, all links together
    nvlink_tx: int | None = None
    nvlink_rx: int | None = None
    #: degrees Celsius
    temperature_c: int | None = None
    #: SM clock, MHz
    sm_clock_mhz: int | None = None
    #: XID error codes raised since the previous reading
    xid: tuple[int, ...] = ()
    #: whether ECC is enabled (``None``: not supported)
    ecc_mode: bool | None = None
    #: volatile single- and double-bit ECC error counts since the driver loaded
    ecc_sbe: int | None = None
    ecc_dbe: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessReading:
    """One process on one GPU or MIG device at one tick."""

    pid: int
    #: the device it runs on (``GPU-…`` or ``MIG-…``)
    uuid: str
    #: bytes of GPU memory it uses, ``None`` where NVML cannot tell
    used_memory: int | None
    #: percent SM utilization of this process over the last period, ``None`` if unknown
    sm_util: int | None = None
    #: facts a replayed trace carries for a synthetic PID; ``None``: read ``/proc``
    facts: ProcessFacts | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Reading:
    """Everything one tick read."""

    #: POSIX seconds when the reading was taken
    t: float
    devices: tuple[DeviceReading, ...]
    processes: tuple[ProcessReading, ...]

    def device(self, uuid: str) -> DeviceReading | None:
        """The reading of ``uuid``, or ``None``."""
        for device in self.devices:
            if device.uuid == uuid:
                return device
        return None


class TelemetrySource(Protocol):
    """Where readings come from (real NVML or a replayed trace)."""

    def read(self) -> Reading:
        """Everything now (a replayed source: the current snapshot, then it moves on)."""
        ...

    def close(self) -> None:
        """Release what the source holds (NVML handles, files)."""
        ...
