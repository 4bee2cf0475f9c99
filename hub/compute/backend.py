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
from typing import Any, Self

from ztlab.common.config import ZtlabConfig
from ztlab.hub.backends import check_complete, load_backend

#: the entry-point group compute backends register in
ENTRY_POINT_GROUP = "ztlab.compute_backends"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterRequest:
    """What the control plane asks a backend to run, after its decisions."""

    id: str
    owner: str
    pool: str
    workers: int
    #: GPU ids leased for the workers (worker ``i`` gets ``gpus[i]``; the rest run on CPUs)
    gpus: tuple[str, ...] = ()
    #: ``N`` of ``/dev/nvidiaN`` of each leased GPU, in the same order
    minors: tuple[int, ...] = ()
    #: what ``CUDA_VISIBLE_DEVICES`` names each leased GPU by, in the same order
    cuda_ids: tuple[str, ...] = ()
    #: users the owner shares the cluster with (already allowed by policy)
    shared_with: tuple[str, ...] = ()
    #: the scheduler's and its dashboard's ports
    port: int
    dashboard_port: int
    #: each worker's memory limit (bytes) and CPU cores
    worker_memory: int
    worker_cpus: float
    #: the spec the cluster's processes read (``cluster.json``), less the scheduler's host
    spec: Mapping[str, Any] = field(default_factory=dict)
    #: credentials by file name (``ca.pem``, ``scheduler.key``, ``worker-0.pem``, ...)
    files: Mapping[str, bytes] = field(default_factory=dict)
    #: the control plane's own certificate and key files (never handed to the cluster),
    #: for a backend that checks the scheduler answers
    probe_certificate: tuple[str, str] = ("", "")
    #: kernel environments the owner may use (name -> folder), and the one the workers
    #: run in (the asking kernel's); none: the hub's own runtime
    environments: Mapping[str, str] = field(default_factory=dict)
    environment: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Cluster:
    """A running cluster, as the backend reports it."""

    id: str
    owner: str
    pool: str
    #: the scheduler's host, as the owner's processes reach it
    host: str
    port: int
    dashboard_port: int
    workers: int
    started_at: float
    details: Mapping[str, str] = field(default_factory=dict)

    @property
    def scheduler_address(self) -> str:
        """``tls://HOST:PORT``."""
        return f"tls://{self.host}:{self.port}"


class ComputeBackend(ABC):
    """Runs users' clusters; decides nothing."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        check_complete(cls, ComputeBackend)

    @classmethod
    @abstractmethod
    def open(cls, *, config: ZtlabConfig, cgroups: Any, segments: Any) -> Self:
        """The backend for a validated configuration (``cgroups`` and ``segments``: the
        sandbox's, or ``None`` on a hub without it)."""

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
    def renew(self, cluster_id: str, files: Mapping[str, bytes]) -> None:
        """Replace credential files of a running cluster (its processes load them)."""

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
