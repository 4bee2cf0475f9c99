"""The interface to whatever runs users' compute clusters (Dask) in a pool.

A backend starts, lists and stops one user's cluster in one pool: its scheduler and workers
run as that user, fenced to the GPUs leased for them, and authenticate with certificates the
control plane issues. The control plane decides (policy, quotas, leases) and records; the
backend only runs what it was told to. Backends register as ``ztlab.compute_backends``
entry points: one for this machine (processes in the users' sandboxes) and one for Dask
Gateway on Kubernetes are the first two. A subclass that leaves a method out fails when it
is defined.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

from ztlab.hub.backends import check_complete, load_backend

#: the entry-point group compute backends register in
ENTRY_POINT_GROUP = "ztlab.compute_backends"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterRequest:
    """What the control plane asks a backend to run, after its decisions."""

    owner: str
    pool: str
    workers: int
    #: GPU ids leased for the workers (one per worker where GPUs are asked for)
    gpus: tuple[str, ...] = ()
    #: users the owner shares the cluster with (already allowed by policy)
    shared_with: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Cluster:
    """A running cluster, as the backend reports it."""

    id: str
    owner: str
    pool: str
    scheduler_address: str
    workers: int
    started_at: float
    details: Mapping[str, str] = field(default_factory=dict)


class ComputeBackend(ABC):
    """Runs users' clusters; decides nothing."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        check_complete(cls, ComputeBackend)

    @abstractmethod
    def start(self, request: ClusterRequest) -> Cluster:
        """Start a cluster as ``request`` says; return once its scheduler listens."""

    @abstractmethod
    def clusters(self, *, owner: str | None = None) -> list[Cluster]:
        """The clusters running (of ``owner``)."""

    @abstractmethod
    def stop(self, cluster_id: str, *, reason: str) -> None:
        """Stop a cluster and everything it runs."""

    @abstractmethod
    def close(self) -> None:
        """Release what the backend holds open (clusters keep running)."""


def compute_backend(name: str, *, source: str = "ztlab.toml") -> type[ComputeBackend]:
    """The ComputeBackend registered as ``name``; :class:`ConfigError` naming the key."""
    return load_backend(
        ENTRY_POINT_GROUP,
        name,
        ComputeBackend,
        key="compute.backend",
        source=source,
        what="compute backend",
    )
