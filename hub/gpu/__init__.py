"""GPUs on the control plane: inventory, leases with expiry, and per-role quotas.

- :mod:`~ztlab.hub.gpu.nvml`: the typed boundary to NVML (:class:`RealNvml` through the
  ``[gpu]`` extra, :class:`ReplayedNvml` for recorded traces, :func:`discover`);
- :mod:`~ztlab.hub.gpu.inventory`: the configured pools, each GPU resolved to its UUID
  and ``/dev/nvidiaN`` minor number (:class:`Inventory`);
- :mod:`~ztlab.hub.gpu.leases`: who holds which GPUs until when (:class:`LeaseBroker`
  over a SQLite :class:`LeaseStore`), after a policy decision and within role quotas;
  with hand-over checks on, a GPU whose lease ended waits (a :class:`Handover`) until the
  GPU monitor confirms that none of the old holder's processes remain on it.

Start-up, on a GPU server::

    inventory = Inventory.from_config(config, nvml=discover())
    broker = LeaseBroker(
        store_path=config.state_dir / "gpu" / "leases.sqlite3",
        inventory=inventory,
        roles=config.roles,
        policy=engine,
        audit=audit_log,
    )
    lease = broker.grant(user="alice", roles=frozenset({"trainer"}), server="alice",
                         pool="research", count=1)
"""

from ztlab.hub.gpu.inventory import (
    Gpu,
    Inventory,
    InventoryError,
    UnknownGpuError,
    UnknownPoolError,
)
from ztlab.hub.gpu.leases import (
    AUDIT_EXPIRED,
    AUDIT_GRANTED,
    AUDIT_HANDOVER_CLEARED,
    AUDIT_HANDOVER_HELD,
    AUDIT_HANDOVER_RELEASED_BY_ADMIN,
    AUDIT_RELEASED,
    Handover,
    HandoverNotFound,
    Lease,
    LeaseBroker,
    LeaseDenied,
    LeaseError,
    LeaseNotFound,
    LeaseStore,
    LeaseStoreError,
    PoolExhausted,
    QuotaExceeded,
)
from ztlab.hub.gpu.nvml import (
    GpuDevice,
    GpuProcess,
    MigDevice,
    NvmlError,
    NvmlSource,
    NvmlUnavailableError,
    RealNvml,
    ReplayedNvml,
    TraceError,
    Utilization,
    discover,
    record_trace,
)

__all__ = [
    "AUDIT_EXPIRED",
    "AUDIT_GRANTED",
    "AUDIT_HANDOVER_CLEARED",
    "AUDIT_HANDOVER_HELD",
    "AUDIT_HANDOVER_RELEASED_BY_ADMIN",
    "AUDIT_RELEASED",
    "Gpu",
    "GpuDevice",
    "GpuProcess",
    "Handover",
    "HandoverNotFound",
    "Inventory",
    "InventoryError",
    "Lease",
    "LeaseBroker",
    "LeaseDenied",
    "LeaseError",
    "LeaseNotFound",
    "LeaseStore",
    "LeaseStoreError",
    "MigDevice",
    "NvmlError",
    "NvmlSource",
    "NvmlUnavailableError",
    "PoolExhausted",
    "QuotaExceeded",
    "RealNvml",
    "ReplayedNvml",
    "TraceError",
    "UnknownGpuError",
    "UnknownPoolError",
    "Utilization",
    "discover",
    "record_trace",
]
