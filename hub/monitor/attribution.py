"""Whose is each GPU process: its cgroup names the holder, and the lease says whether it may.

(1) The process's cgroup (from ``/proc/PID/cgroup``, or the facts a replayed trace carries)
    is looked up under the ztlab cgroup parent (``ztlab``). No ztlab cgroup: no holder.
(2) The cgroup's name names the holder, as the control plane named it when it started it:

    =============================  ===========================================
    cgroup                         holder
    =============================  ===========================================
    ``ACCOUNT``                    the user's server (lease key ``(user, "")``)
    ``ACCOUNT-ID-s``               cluster ``ID``'s scheduler (``cluster-ID``)
    ``ACCOUNT-ID-N``               cluster ``ID``'s worker ``N`` (``cluster-ID``)
    ``ACCOUNT-run-ID``             scheduled run ``ID`` (``run-ID``)
    =============================  ===========================================

    ``ACCOUNT`` must be a hub user's account (``accounts`` maps account to user): a cgroup
    under the parent whose account nobody holds is treated as outside (no holder).
(3) The device's lease (:class:`LeaseView`, rebuilt each tick from the lease backend) is
    attached, so :attr:`~ztlab.hub.monitor.findings.AttributedProcess.leased_to_holder` says
    whether the holder may use that GPU.

Nothing here trusts the process: the cgroup is set by the control plane before the process
runs, and a process cannot move itself out of it (the sandbox has no write access to the
cgroup tree).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

from ztlab.hub.gpu.backend import Lease
from ztlab.hub.gpu.inventory import Inventory
from ztlab.hub.monitor.findings import AttributedProcess, Holder, HolderKind, LeaseHold
from ztlab.hub.monitor.telemetry import DeviceReading, ProcessFacts, ProcessReading

__all__ = ["Attributor", "LeaseView", "cgroup_name"]

_CLUSTER: Final = re.compile(r"(?P<account>.+)-(?P<id>[0-9a-f]{16})-(?P<part>s|[0-9]+)\Z")
_RUN: Final = re.compile(r"(?P<account>.+)-run-(?P<id>[0-9a-z]{1,32})\Z")
#: the cgroups the control plane names after a cluster or a run, and what they hold
_NAMED: Final[tuple[tuple[re.Pattern[str], HolderKind], ...]] = (
    (_CLUSTER, "cluster"),
    (_RUN, "run"),
)


def cgroup_name(path: str | None, parent: str) -> str | None:
    """The cgroup's name right under ``parent`` (``ztlab``) in ``path``, or ``None``.

    ``/ztlab/ztl-alice`` and ``/machine.slice/ztlab/ztl-alice`` give ``ztl-alice``; a
    path deeper than one level below the parent, or not under it, gives ``None``.
    """
    if not path:
        return None
    parts = [p for p in path.split("/") if p]
    wanted = [p for p in parent.split("/") if p]
    for start in range(len(parts) - len(wanted)):
        if parts[start : start + len(wanted)] == wanted and len(parts) == start + len(wanted) + 1:
            return parts[-1]
    return None


class LeaseView:
    """Which lease (and pool) each device is under, from the inventory and active leases.

    A configured GPU is matched to a reading's device by UUID where the inventory knows it,
    else by NVML index (a GPU configured as ``"0"`` on a host whose inventory was resolved
    without NVML).
    """

    def __init__(
        self,
        *,
        inventory: Inventory | None,
        leases: Iterable[Lease],
        devices: Sequence[DeviceReading],
    ) -> None:
        """Match ``inventory``'s GPUs to ``devices`` and attach the ``leases`` held now."""
        self._pool: dict[str, str] = {}
        self._gpu: dict[str, str] = {}
        self._lease: dict[str, LeaseHold] = {}
        if inventory is None:
            return
        by_index = {d.index: d.uuid for d in devices if d.parent is None}
        known = {d.uuid for d in devices}
        for gpu in inventory:
            uuid = gpu.uuid if gpu.uuid in known else None
            if uuid is None and gpu.id.isdigit():
                uuid = by_index.get(int(gpu.id))
            if uuid is None:
                continue
            self._pool[uuid] = gpu.pool
            self._gpu[uuid] = gpu.id
        by_gpu = {gpu_id: uuid for uuid, gpu_id in self._gpu.items()}
        for lease in leases:
            for gpu_id in lease.gpus:
                uuid = by_gpu.get(gpu_id)
                if uuid is not None:
                    self._lease[uuid] = LeaseHold(
                        lease=lease.id,
                        user=lease.user,
                        server=lease.server,
                        pool=lease.pool,
                        gpu=gpu_id,
                    )

    @property
    def pool_devices(self) -> Mapping[str, str]:
        """Device UUID -> pool, for every device a pool lists."""
        return self._pool

    def gpu_id(self, uuid: str) -> str | None:
        """The GPU id as configured for the device ``uuid``, if a pool lists it."""
        return self._gpu.get(uuid)

    def uuid_of(self, gpu_id: str) -> str | None:
        """The device UUID of the configured GPU ``gpu_id``, if seen in the reading."""
        for uuid, configured in self._gpu.items():
            if configured == gpu_id:
                return uuid
        return None

    def lease(self, uuid: str) -> LeaseHold | None:
        """The lease the device ``uuid`` is under, if any."""
        return self._lease.get(uuid)


class Attributor:
    """Maps GPU processes to their holders (see the module docstring)."""

    def __init__(
        self,
        *,
        accounts: Callable[[], Mapping[str, str]],
        facts: Callable[[int], ProcessFacts | None],
        parent: str = "ztlab",
    ) -> None:
        """``accounts()``: Unix account -> hub user, asked once per tick; ``facts(pid)``:
        what ``/proc`` says (cached by the caller); ``parent``: the ztlab cgroup parent."""
        self._accounts = accounts
        self._facts = facts
        self._parent = parent

    def holder(self, facts: ProcessFacts | None, accounts: Mapping[str, str]) -> Holder | None:
        """The holder the process's cgroup names, or ``None`` (outside every ztlab cgroup)."""
        if facts is None:
            return None
        name = cgroup_name(facts.cgroup, self._parent)
        return None if name is None else self.cgroup_holder(name, accounts)

    def cgroup_holder(self, name: str, accounts: Mapping[str, str] | None = None) -> Holder | None:
        """The holder the ztlab cgroup ``name`` belongs to (see the module docstring)."""
        if accounts is None:
            accounts = self._accounts()
        if name in accounts:
            return Holder(user=accounts[name], server="", kind="server", account=name, cgroup=name)
        for pattern, kind in _NAMED:
            match = pattern.match(name)
            if match is not None and match["account"] in accounts:
                account = match["account"]
                return Holder(
                    user=accounts[account],
                    server=f"{kind}-{match['id']}",
                    kind=kind,
                    account=account,
                    cgroup=name,
                )
        return None

    def attribute(
        self, processes: Sequence[ProcessReading], view: LeaseView
    ) -> list[AttributedProcess]:
        """Every process with its facts, holder, lease and pool."""
        accounts = self._accounts()
        found: list[AttributedProcess] = []
        for process in processes:
            facts = process.facts if process.facts is not None else self._facts(process.pid)
            found.append(
                AttributedProcess(
                    reading=process,
                    facts=facts,
                    holder=self.holder(facts, accounts),
                    lease=view.lease(process.uuid),
                    pool=view.pool_devices.get(process.uuid),
                )
            )
        return found
