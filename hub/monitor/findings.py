"""What the monitor concludes from a reading: whose each GPU process is, and the alerts.

Shared by attribution (:mod:`~ztlab.hub.monitor.attribution`), the detectors
(:mod:`~ztlab.hub.monitor.detectors`), the responses (:mod:`~ztlab.hub.monitor.responses`)
and the exporter (:mod:`~ztlab.hub.monitor.exporter`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ztlab.hub.monitor.telemetry import ProcessFacts, ProcessReading

__all__ = [
    "ALERT_KINDS",
    "Alert",
    "AttributedProcess",
    "Holder",
    "HolderKind",
    "LeaseHold",
]

#: what a ztlab cgroup runs
HolderKind = Literal["server", "cluster", "run"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Holder:
    """Whose process it is: a user's server, a pool cluster's process, or a scheduled run.

    ``(user, server)`` is the key leases use: ``""`` for the default server,
    ``cluster-ID`` for a cluster, ``run-ID`` for a scheduled run.
    """

    user: str
    server: str
    kind: HolderKind
    #: the Unix account the process runs as (``ztl-alice``)
    account: str
    #: the cgroup's name under the ztlab parent (``ztl-alice``, ``ztl-alice-<id>-0``)
    cgroup: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseHold:
    """The lease a device is under at this tick."""

    lease: str
    user: str
    server: str
    pool: str
    #: the GPU id as configured (``"0"``, ``GPU-<uuid>`` or ``MIG-<uuid>``)
    gpu: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AttributedProcess:
    """A GPU process with what attribution found out about it."""

    reading: ProcessReading
    #: from ``/proc`` or the trace; ``None`` when the process was gone before it was read
    facts: ProcessFacts | None
    #: its ztlab holder; ``None`` when it runs outside every ztlab cgroup
    holder: Holder | None
    #: the lease its device is under; ``None`` when the device is not leased
    lease: LeaseHold | None
    #: the pool its device belongs to; ``None`` when the device is in no pool
    pool: str | None

    @property
    def leased_to_holder(self) -> bool:
        """Whether the device's lease is the holder's own."""
        return (
            self.holder is not None
            and self.lease is not None
            and (self.lease.user, self.lease.server) == (self.holder.user, self.holder.server)
        )


#: every kind of alert, and what it means (the docs list them from here)
ALERT_KINDS: Final[Mapping[str, str]] = {
    "unleased_process": "a ztlab process runs on a GPU its holder has no lease for",
    "outside_cgroup": "a process outside every ztlab cgroup runs on a pool GPU",
    "miner": "a process matches a known cryptocurrency-miner signature",
    "baseline": "a user's utilization, power or transfer volume is far outside their baseline",
    "idle_full_load": "a server's GPU runs at full load while its user is idle",
    "xid_error": "the driver reported an XID error on a GPU",
    "ecc_error": "a GPU reported new uncorrectable (or many correctable) ECC errors",
    "handover_dirty": "a lease ended and processes of its holder still run on the GPU",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Alert:
    """One finding. ``key`` identifies the condition, so an ongoing one fires once."""

    #: one of :data:`ALERT_KINDS`
    kind: str
    #: ``warning`` or ``critical``
    severity: Literal["warning", "critical"]
    #: one line for admins, naming user, GPU and process
    message: str
    #: the device (``GPU-…``/``MIG-…``)
    uuid: str
    #: the process, where one is involved
    pid: int | None = None
    #: whose process or GPU it is (subject of the responses), where known
    holder: Holder | None = None
    #: the lease the device is under, where leased
    lease: LeaseHold | None = None
    #: POSIX seconds of the reading that raised it
    t: float = 0.0
    #: the numbers behind it (JSON-able), recorded with it
    evidence: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, int | None, str | None]:
        """The condition: kind, device, process and user (the same key fires once)."""
        return (self.kind, self.uuid, self.pid, self.holder.user if self.holder else None)
