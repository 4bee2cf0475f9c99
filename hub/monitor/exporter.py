"""The monitor's Prometheus exposition: DCGM-compatible device series and ztlab's own.

:func:`render` writes the text exposition format 0.0.4 for one host from the latest reading,
its attributed processes, the accounting totals, the alert counts and the sampler's health:

* device series under the names and labels of NVIDIA's DCGM exporter (``DCGM_FI_DEV_GPU_UTIL``
  with ``gpu``, ``UUID``, ``device``, ``modelName``, ``Hostname``), so that existing DCGM
  dashboards and alert rules work unchanged. A MIG device is labelled with its own
  ``MIG-…`` UUID (DCGM uses the parent's UUID plus ``GPU_I_ID``, which the reading does not
  carry), so every device has series of its own. A value the device does not report is left
  out, never written as 0: a missing reading must not look like an idle GPU;
* per-process and per-user series (``ztlab_gpu_*``) with ``user``, ``server``, ``lease`` and
  ``pool`` labels: memory and SM utilization per process, processes per user and device,
  accounting counters per user, alerts per kind, unattributed processes;
* the sampler's health (``ztlab_monitor_*``).

Labels stay bounded: users, servers, leases, pools, devices and live PIDs, never command
lines. Rendering is plain string building (8 GPUs take well under 2 ms).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from ztlab.hub.monitor.accounting import UNATTRIBUTED, Accounting
from ztlab.hub.monitor.findings import ALERT_KINDS, AttributedProcess
from ztlab.hub.monitor.telemetry import DeviceReading, Reading

__all__ = [
    "CONTENT_TYPE",
    "DEVICE_METRICS",
    "DeviceMetric",
    "SamplerStats",
    "XidMemory",
    "escape",
    "render",
]

#: the ``Content-Type`` of :func:`render`'s output
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

_MIB: Final = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplerStats:
    """The sampler's health, as the exporter reports it."""

    #: seconds the last tick took (reading, attribution, detection); ``None`` before the first
    last_duration_s: float | None = None
    #: ticks completed since start
    samples: int = 0
    #: ticks that failed since start
    errors: int = 0
    #: POSIX seconds of the last successful reading; ``None`` before the first
    last_sample_t: float | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, float | int | None]) -> SamplerStats:
        """From a mapping keyed like the series: ``last_sample_duration_seconds``,
        ``samples_total``, ``errors_total``, ``last_sample_timestamp_seconds`` (a missing key
        or ``None``: not known)."""
        duration = values.get("last_sample_duration_seconds")
        last_t = values.get("last_sample_timestamp_seconds")
        return cls(
            last_duration_s=None if duration is None else float(duration),
            samples=int(values.get("samples_total") or 0),
            errors=int(values.get("errors_total") or 0),
            last_sample_t=None if last_t is None else float(last_t),
        )


@dataclass(frozen=True, slots=True)
class DeviceMetric:
    """One DCGM-compatible device series: its name, Prometheus type and help text."""

    name: str
    kind: str  # "gauge" or "counter"
    help: str


#: the DCGM-compatible series, in the order they are written
DEVICE_METRICS: Final[tuple[DeviceMetric, ...]] = (
    DeviceMetric("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %)."),
    DeviceMetric("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %)."),
    DeviceMetric("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB)."),
    DeviceMetric("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB)."),
    DeviceMetric("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W)."),
    DeviceMetric(
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "counter",
        "Total energy consumption since boot (in mJ).",
    ),
    DeviceMetric("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C)."),
    DeviceMetric("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz)."),
    DeviceMetric(
        "DCGM_FI_PROF_PCIE_TX_BYTES", "gauge", "Rate of data transmitted over PCIe (in B/s)."
    ),
    DeviceMetric(
        "DCGM_FI_PROF_PCIE_RX_BYTES", "gauge", "Rate of data received over PCIe (in B/s)."
    ),
    DeviceMetric(
        "DCGM_FI_PROF_NVLINK_TX_BYTES", "gauge", "Rate of data transmitted over NVLink (in B/s)."
    ),
    DeviceMetric(
        "DCGM_FI_PROF_NVLINK_RX_BYTES", "gauge", "Rate of data received over NVLink (in B/s)."
    ),
    DeviceMetric(
        "DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered (0: none)."
    ),
    DeviceMetric(
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
        "counter",
        "Total number of single-bit volatile ECC errors.",
    ),
    DeviceMetric(
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "counter",
        "Total number of double-bit volatile ECC errors.",
    ),
)


def _device_values(device: DeviceReading, last_xid: int) -> dict[str, float | int | None]:
    """The device's value of each :data:`DEVICE_METRICS` series (``None``: not reported)."""
    used = device.fb_used
    return {
        "DCGM_FI_DEV_GPU_UTIL": device.gpu_util,
        "DCGM_FI_DEV_MEM_COPY_UTIL": device.mem_util,
        "DCGM_FI_DEV_FB_USED": None if used is None else used // _MIB,
        "DCGM_FI_DEV_FB_FREE": (
            None if used is None else max(device.memory_total - used, 0) // _MIB
        ),
        "DCGM_FI_DEV_POWER_USAGE": device.power_w,
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": device.energy_mj,
        "DCGM_FI_DEV_GPU_TEMP": device.temperature_c,
        "DCGM_FI_DEV_SM_CLOCK": device.sm_clock_mhz,
        "DCGM_FI_PROF_PCIE_TX_BYTES": device.pcie_tx,
        "DCGM_FI_PROF_PCIE_RX_BYTES": device.pcie_rx,
        "DCGM_FI_PROF_NVLINK_TX_BYTES": device.nvlink_tx,
        "DCGM_FI_PROF_NVLINK_RX_BYTES": device.nvlink_rx,
        "DCGM_FI_DEV_XID_ERRORS": device.xid[-1] if device.xid else last_xid,
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": device.ecc_sbe,
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": device.ecc_dbe,
    }


class XidMemory:
    """The last XID error seen on each device, for ``DCGM_FI_DEV_XID_ERRORS``.

    A reading carries only the XIDs raised since the previous one; DCGM reports the last
    XID until the next, so the monitor feeds every reading through :meth:`observe`.
    """

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def observe(self, reading: Reading) -> None:
        """Remember the last XID of every device that raised one."""
        for device in reading.devices:
            if device.xid:
                self._last[device.uuid] = device.xid[-1]

    def last(self) -> Mapping[str, int]:
        """The last XID per device UUID."""
        return dict(self._last)


def escape(value: str) -> str:
    """A label value escaped for the text format (backslash, double quote, newline)."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{name}="{escape(value)}"' for name, value in pairs) + "}"


class _Writer:
    """Collects families: HELP and TYPE once, then the samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[str]) -> None:
        """Write ``name``'s family if it has samples (each ``'{labels} value'``)."""
        body = [f"{name}{sample}" for sample in samples]
        if body:
            self.lines.append(f"# HELP {name} {help_text}")
            self.lines.append(f"# TYPE {name} {kind}")
            self.lines.extend(body)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n" if self.lines else ""


def _device_labels(device: DeviceReading, hostname: str) -> str:
    return _labels(
        (
            ("gpu", str(device.index)),
            ("UUID", device.uuid),
            ("device", f"nvidia{device.index}"),
            ("modelName", device.name),
            ("Hostname", hostname),
        )
    )


def _devices(
    out: _Writer, reading: Reading | None, hostname: str, last_xid: Mapping[str, int]
) -> None:
    devices = reading.devices if reading is not None else ()
    rows = [
        (_device_labels(d, hostname), _device_values(d, last_xid.get(d.uuid, 0))) for d in devices
    ]
    for metric in DEVICE_METRICS:
        out.family(
            metric.name,
            metric.kind,
            metric.help,
            (
                f"{labels} {_number(value)}"
                for labels, values in rows
                if (value := values[metric.name]) is not None
            ),
        )


def _holder_labels(process: AttributedProcess, device: DeviceReading | None, hostname: str) -> str:
    """The labels of a process's holder on its device (``(unattributed)`` for none)."""
    holder, lease = process.holder, process.lease
    return _labels(
        (
            ("user", holder.user if holder is not None else UNATTRIBUTED),
            ("server", holder.server if holder is not None else ""),
            ("lease", lease.lease if lease is not None else ""),
            ("pool", process.pool or ""),
            ("gpu", str(device.index) if device is not None else ""),
            ("UUID", process.reading.uuid),
            ("Hostname", hostname),
        )
    )


def _processes(
    out: _Writer,
    reading: Reading | None,
    processes: Sequence[AttributedProcess],
    hostname: str,
) -> None:
    devices = {d.uuid: d for d in reading.devices} if reading is not None else {}
    memory: list[str] = []
    sm: list[str] = []
    per_user: dict[str, int] = {}
    for process in processes:
        device = devices.get(process.reading.uuid)
        key = _holder_labels(process, device, hostname)
        per_user[key] = per_user.get(key, 0) + 1
        labels = f'{{pid="{process.reading.pid}",{key[1:]}'
        if process.reading.used_memory is not None:
            memory.append(f"{labels} {process.reading.used_memory}")
        if process.reading.sm_util is not None:
            sm.append(f"{labels} {process.reading.sm_util}")
    out.family(
        "ztlab_gpu_process_memory_bytes",
        "gauge",
        "GPU memory a process uses (bytes), with its ztlab holder.",
        memory,
    )
    out.family(
        "ztlab_gpu_process_sm_util_percent",
        "gauge",
        "SM utilization of a process over the last period (%).",
        sm,
    )
    out.family(
        "ztlab_gpu_user_processes",
        "gauge",
        "GPU processes of a user's server on a device.",
        (f"{labels} {count}" for labels, count in per_user.items()),
    )
    unattributed = sum(1 for p in processes if p.holder is None)
    out.family(
        "ztlab_gpu_unattributed_processes",
        "gauge",
        "GPU processes that run outside every ztlab cgroup.",
        [f"{_labels([('Hostname', hostname)])} {unattributed}"],
    )


#: accounting counter -> (the :class:`~ztlab.hub.monitor.accounting.Usage` field, help)
_USAGE_COUNTERS: Final = (
    (
        "ztlab_gpu_user_seconds_total",
        "gpu_seconds",
        "GPU-seconds a user's server held busy devices (shared devices: its share).",
    ),
    (
        "ztlab_gpu_user_energy_joules_total",
        "energy_joules",
        "Energy of a user's server's share of busy devices (J).",
    ),
    (
        "ztlab_gpu_user_memory_byte_seconds_total",
        "memory_byte_seconds",
        "GPU memory a user's server held, times seconds (byte-seconds).",
    ),
)


def _accounting(out: _Writer, accounting: Accounting, hostname: str) -> None:
    usage = [
        (_labels((("user", user), ("server", server), ("Hostname", hostname))), totals)
        for (user, server), totals in sorted(accounting.by_server().items())
    ]
    for name, field, help_text in _USAGE_COUNTERS:
        out.family(
            name,
            "counter",
            help_text,
            (f"{labels} {_number(getattr(totals, field))}" for labels, totals in usage),
        )


def _alerts(out: _Writer, alert_counts: Mapping[str, int], hostname: str) -> None:
    kinds = sorted(set(ALERT_KINDS) | set(alert_counts))
    out.family(
        "ztlab_gpu_alerts_total",
        "counter",
        "Alerts the GPU monitor raised, by kind.",
        (
            f"{_labels((('kind', kind), ('Hostname', hostname)))} {alert_counts.get(kind, 0)}"
            for kind in kinds
        ),
    )


def _sampler(out: _Writer, reading: Reading | None, stats: SamplerStats, hostname: str) -> None:
    host = _labels((("Hostname", hostname),))
    last_t = reading.t if reading is not None else stats.last_sample_t
    duration = stats.last_duration_s
    out.family(
        "ztlab_monitor_sample_duration_seconds",
        "gauge",
        "Seconds the last sampling tick took.",
        [] if duration is None else [f"{host} {_number(duration)}"],
    )
    out.family(
        "ztlab_monitor_samples_total",
        "counter",
        "Sampling ticks completed.",
        [f"{host} {stats.samples}"],
    )
    out.family(
        "ztlab_monitor_errors_total",
        "counter",
        "Sampling ticks that failed.",
        [f"{host} {stats.errors}"],
    )
    out.family(
        "ztlab_monitor_last_sample_timestamp_seconds",
        "gauge",
        "POSIX time of the last successful reading.",
        [] if last_t is None else [f"{host} {_number(last_t)}"],
    )


def render(
    *,
    reading: Reading | None,
    processes: Sequence[AttributedProcess],
    accounting: Accounting,
    alert_counts: Mapping[str, int],
    hostname: str,
    sampler: SamplerStats | Mapping[str, float | int | None],
    last_xid: Mapping[str, int] | None = None,
) -> str:
    """The Prometheus text exposition (format 0.0.4) of one host's GPU monitor.

    ``reading`` is the latest reading (``None`` before the first: only the ztlab series are
    written), ``processes`` its attributed processes, ``alert_counts`` the alerts raised per
    kind since start, ``sampler`` the sampler's health (:class:`SamplerStats`, or a mapping
    :meth:`SamplerStats.from_mapping` reads), ``last_xid`` the last XID per device UUID
    (:class:`XidMemory`; without it a device's XID is its reading's last, else 0).
    """
    if not isinstance(sampler, SamplerStats):
        sampler = SamplerStats.from_mapping(sampler)
    out = _Writer()
    _devices(out, reading, hostname, last_xid or {})
    _processes(out, reading, processes, hostname)
    _accounting(out, accounting, hostname)
    _alerts(out, alert_counts, hostname)
    _sampler(out, reading, sampler, hostname)
    return out.text()
