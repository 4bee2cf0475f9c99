"""The GPU inventory: the configured pools, with each GPU resolved to its device node.

A sandbox gives a server its GPUs through device rules on ``/dev/nvidiaN``, so every
leased GPU must be resolved to its minor number ``N``. The configuration names GPUs as
NVIDIA tools do (``"0"``, ``"GPU-<uuid>"``, ``"MIG-<uuid>"``); NVML, when available,
resolves them:

=====================  ===============================  ==================================
configured id          with NVML                        without NVML
=====================  ===============================  ==================================
index ``"N"``          the UUID and minor of index N    minor ``N``, UUID unknown
``GPU-<uuid>``         that GPU's minor                 minor unknown
``MIG-<uuid>``         the minor of its parent GPU      minor unknown
=====================  ===============================  ==================================

With NVML the inventory is checked when it is built: a configured GPU that NVML does
not see, a GPU listed twice under two names, a whole GPU listed beside one of its MIG
devices, or a whole GPU whose MIG mode is on stops start-up with one
:class:`InventoryError` naming every pool and GPU concerned. Without NVML a GPU whose
minor is unknown can be configured but not leased: :meth:`Inventory.minor` raises,
naming the GPU.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from ztlab.common.config.model import GpuConfig, GpuPool, Problem, ZtlabConfig, key_path
from ztlab.common.errors import ConfigError, UsageError
from ztlab.hub.gpu.nvml import GpuDevice, NvmlSource, normalize_uuid

__all__ = ["Gpu", "Inventory", "InventoryError", "UnknownGpuError", "UnknownPoolError"]

_INDEX_RE = re.compile(r"\d+\Z")
_LEGACY_MIG_RE = re.compile(r"MIG-(GPU-[0-9a-f-]{36})/(\d+)/(\d+)\Z", re.IGNORECASE)


class InventoryError(ConfigError):
    """The configured GPUs do not match the machine, or a GPU cannot be resolved."""


class UnknownPoolError(UsageError):
    """A request names a GPU pool that is not configured."""


class UnknownGpuError(UsageError):
    """A request names a GPU that no pool lists."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Gpu:
    """One configured GPU (or MIG device) and what is known of its device."""

    #: the id as configured (normalized): ``"0"``, ``"GPU-<uuid>"`` or ``"MIG-<uuid>"``
    id: str
    #: its UUID (``GPU-``/``MIG-``), or ``None`` when unknown (an index without NVML)
    uuid: str | None
    #: ``N`` of ``/dev/nvidiaN`` (for a MIG device, its parent's), or ``None`` if unknown
    minor: int | None
    #: the pool it belongs to
    pool: str

    @property
    def is_mig(self) -> bool:
        """Whether this is a MIG device rather than a whole GPU."""
        return self.id.upper().startswith("MIG-")

    @property
    def device_node(self) -> str | None:
        """``/dev/nvidiaN``, or ``None`` when the minor is unknown."""
        return None if self.minor is None else f"/dev/nvidia{self.minor}"


@dataclass(frozen=True, slots=True)
class _Resolved:
    uuid: str | None
    minor: int | None
    #: the physical GPU's UUID (the parent's for a MIG device), for overlap checks
    parent: str | None = None


def _describe(devices: Sequence[GpuDevice]) -> str:
    if not devices:
        return "NVML sees no GPU"
    shown = "; ".join(
        f"{d.index}: {d.uuid} ({d.name}, /dev/nvidia{d.minor_number}"
        + (f", MIG {', '.join(m.uuid for m in d.mig)}" if d.mig else "")
        + ")"
        for d in devices
    )
    return f"NVML sees {shown}"


def _resolve(gpu_id: str, devices: Sequence[GpuDevice]) -> _Resolved | str:
    """Resolve one configured id against NVML's devices: the result, or what is wrong."""
    if _INDEX_RE.match(gpu_id):
        index = int(gpu_id)
        for device in devices:
            if device.index == index:
                return _Resolved(device.uuid, device.minor_number, device.uuid)
        return f'GPU "{gpu_id}" is not on this machine: no GPU has index {index}'
    if legacy := _LEGACY_MIG_RE.match(gpu_id):
        parent_uuid = normalize_uuid(legacy[1])
        gi, ci = int(legacy[2]), int(legacy[3])
        for device in devices:
            if device.uuid != parent_uuid:
                continue
            for mig in device.mig:
                if (mig.gpu_instance_id, mig.compute_instance_id) == (gi, ci):
                    return _Resolved(mig.uuid, device.minor_number, device.uuid)
            return (
                f'MIG device "{gpu_id}" is not on this machine: GPU {parent_uuid} has no '
                f"GPU instance {gi} with compute instance {ci}"
            )
        return f'MIG device "{gpu_id}" is not on this machine: no GPU has UUID {parent_uuid}'
    uuid = normalize_uuid(gpu_id)
    if uuid.startswith("MIG-"):
        for device in devices:
            for mig in device.mig:
                if mig.uuid == uuid:
                    return _Resolved(mig.uuid, device.minor_number, device.uuid)
        return f'MIG device "{gpu_id}" is not on this machine'
    for device in devices:
        if device.uuid == uuid:
            return _Resolved(device.uuid, device.minor_number, device.uuid)
    return f'GPU "{gpu_id}" is not on this machine'


def _resolve_offline(gpu_id: str) -> _Resolved:
    """Without NVML only an index says which device node it is."""
    if _INDEX_RE.match(gpu_id):
        return _Resolved(None, int(gpu_id))
    if gpu_id.upper().startswith(("GPU-", "MIG-")) and "/" not in gpu_id:
        return _Resolved(normalize_uuid(gpu_id), None)
    return _Resolved(None, None)


class Inventory:
    """The configured GPU pools, each GPU resolved to its UUID and minor number.

    Build it at start-up with :meth:`from_config`; it is immutable afterwards and safe
    to share between threads. Pools and GPUs keep the order of the configuration.
    """

    def __init__(self, *, pools: Mapping[str, GpuPool], nvml: NvmlSource | None = None) -> None:
        """Resolve every GPU of ``pools`` (validated ``[gpu.pools]``), through ``nvml`` if given.

        Raises :class:`InventoryError` listing every configured GPU that NVML does not
        see or that overlaps another.
        """
        self._nvml_used = nvml is not None
        devices = nvml.devices() if nvml is not None else []
        by_uuid = {d.uuid: d for d in devices}
        problems: list[Problem] = []
        pools_out: dict[str, tuple[Gpu, ...]] = {}
        roles_out: dict[str, frozenset[str]] = {}
        seen: dict[str, str] = {}  # resolved UUID -> key path of its first listing
        whole: dict[str, str] = {}  # physical GPU UUID -> key path where the whole GPU is listed
        parts: dict[str, str] = {}  # physical GPU UUID -> key path of one of its MIG devices
        for pool_name, pool in pools.items():
            gpus: list[Gpu] = []
            for i, gpu_id in enumerate(pool.gpus):
                where = key_path(("gpu", "pools", pool_name, "gpus", i))
                if nvml is None:
                    resolved = _resolve_offline(gpu_id)
                else:
                    found = _resolve(gpu_id, devices)
                    if isinstance(found, str):
                        problems.append(Problem(where, f"{found}; {_describe(devices)}"))
                        continue
                    resolved = found
                    problems.extend(
                        self._overlaps(gpu_id, where, resolved, by_uuid, seen, whole, parts)
                    )
                gpus.append(
                    Gpu(id=gpu_id, uuid=resolved.uuid, minor=resolved.minor, pool=pool_name)
                )
            pools_out[pool_name] = tuple(gpus)
            roles_out[pool_name] = frozenset(pool.roles)
        if problems:
            raise InventoryError(_problems_message(problems), hint=_HINT)
        self._pools = pools_out
        self._roles = roles_out
        self._gpus = {gpu.id: gpu for gpus in pools_out.values() for gpu in gpus}

    @staticmethod
    def _overlaps(
        gpu_id: str,
        where: str,
        resolved: _Resolved,
        by_uuid: Mapping[str, GpuDevice],
        seen: dict[str, str],
        whole: dict[str, str],
        parts: dict[str, str],
    ) -> Iterator[Problem]:
        assert resolved.uuid is not None
        assert resolved.parent is not None
        if resolved.uuid in seen:
            yield Problem(
                where,
                f'GPU "{gpu_id}" is {resolved.uuid}, already listed at {seen[resolved.uuid]}; '
                "expected each GPU once",
            )
            return
        seen[resolved.uuid] = where
        if resolved.uuid == resolved.parent:  # a whole GPU
            device = by_uuid[resolved.parent]
            if device.mig:
                yield Problem(
                    where,
                    f'GPU "{gpu_id}" ({resolved.uuid}) is in MIG mode, so it cannot be '
                    "leased whole; expected its MIG devices instead: "
                    + ", ".join(m.uuid for m in device.mig),
                )
            if resolved.parent in parts:
                yield Problem(
                    where,
                    f'GPU "{gpu_id}" ({resolved.uuid}) is listed whole and one of its MIG '
                    f"devices is listed at {parts[resolved.parent]}; expected one or the other",
                )
            whole.setdefault(resolved.parent, where)
        else:
            if resolved.parent in whole:
                yield Problem(
                    where,
                    f'MIG device "{gpu_id}" belongs to GPU {resolved.parent}, which is '
                    f"listed whole at {whole[resolved.parent]}; expected one or the other",
                )
            parts.setdefault(resolved.parent, where)

    @classmethod
    def from_config(
        cls, config: ZtlabConfig | GpuConfig, *, nvml: NvmlSource | None = None
    ) -> Inventory:
        """The inventory of a validated configuration's ``[gpu.pools]``.

        Pass ``nvml=discover()`` on a GPU server; ``None`` resolves from the
        configuration alone.
        """
        gpu = config.gpu if isinstance(config, ZtlabConfig) else config
        return cls(pools=gpu.pools, nvml=nvml)

    # -- queries --------------------------------------------------------------------

    @property
    def resolved_with_nvml(self) -> bool:
        """Whether NVML resolved the GPUs (else only indices have known minors)."""
        return self._nvml_used

    @property
    def pool_names(self) -> tuple[str, ...]:
        """The configured pools, in configuration order."""
        return tuple(self._pools)

    def pool(self, name: str) -> tuple[Gpu, ...]:
        """The GPUs of pool ``name``; :class:`UnknownPoolError` if there is none."""
        try:
            return self._pools[name]
        except KeyError:
            raise UnknownPoolError(self._unknown_pool(name)) from None

    def pool_roles(self, name: str) -> frozenset[str]:
        """The roles the configuration opens pool ``name`` to."""
        try:
            return self._roles[name]
        except KeyError:
            raise UnknownPoolError(self._unknown_pool(name)) from None

    def _unknown_pool(self, name: str) -> str:
        known = ", ".join(self._pools) or "none are configured"
        return f"there is no GPU pool named {name!r}; pools: {known}"

    def gpu(self, gpu_id: str) -> Gpu:
        """The configured GPU ``gpu_id``; :class:`UnknownGpuError` if no pool lists it."""
        try:
            return self._gpus[gpu_id]
        except KeyError:
            raise UnknownGpuError(f"no GPU pool lists a GPU {gpu_id!r}") from None

    def cuda_id(self, gpu_id: str) -> str:
        """What ``CUDA_VISIBLE_DEVICES`` names ``gpu_id`` by: its UUID where known, else the
        id as configured (an index)."""
        gpu = self.gpu(gpu_id)
        return gpu.uuid or gpu.id

    def minor(self, gpu_id: str) -> int:
        """``N`` of ``/dev/nvidiaN`` for ``gpu_id``, needed for the device rules.

        Raises :class:`InventoryError` naming the GPU when its minor is unknown (a UUID
        configured on a host where NVML is not available).
        """
        gpu = self.gpu(gpu_id)
        if gpu.minor is None:
            raise InventoryError(
                f'GPU "{gpu.id}" of pool {gpu.pool} cannot be leased: its device node '
                "(/dev/nvidiaN) is unknown, because NVML is not available to resolve the "
                "UUID, so its device rules cannot be computed",
                hint='install the GPU extra (pip install "zerotrust-lab[gpu]") on the GPU '
                'server, or list the GPU by its index ("0")',
            )
        return gpu.minor

    def __iter__(self) -> Iterator[Gpu]:
        """Every configured GPU, pool by pool."""
        for gpus in self._pools.values():
            yield from gpus

    def __len__(self) -> int:
        """The number of configured GPUs."""
        return len(self._gpus)

    def __contains__(self, gpu_id: object) -> bool:
        """Whether a pool lists ``gpu_id``."""
        return gpu_id in self._gpus


_HINT = "compare [gpu.pools] in ztlab.toml with nvidia-smi -L"


def _problems_message(problems: Sequence[Problem]) -> str:
    head = "the configured GPUs do not match this machine"
    if len(problems) == 1:
        return f"{head}: {problems[0]}"
    lines = "\n".join(f"  {p}" for p in problems)
    return f"{head}: {len(problems)} problems\n{lines}"
