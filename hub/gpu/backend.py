"""The interface to whoever hands out GPUs, and how the configuration picks one.

The control plane, the spawners and (later) the compute pools ask a :class:`LeaseBackend`
for GPUs; ``[gpu] lease_backend`` in ztlab.toml names which one, looked up among the
``ztlab.lease_backends`` entry points (``local``: :class:`~ztlab.hub.gpu.leases.LeaseBroker`,
SQLite on this machine). A backend for a cluster scheduler registers its own entry point;
nothing else changes. A subclass that leaves a method out fails when it is defined, not when
a user first asks for a GPU.

Hand-over hygiene: when ``handover_checks`` is on (the GPU monitor runs), a GPU whose lease
ends is not granted again until the monitor has confirmed that no process of the old holder
remains on it (:meth:`LeaseBackend.clear_handover`); one that fails the check is held back
(:meth:`LeaseBackend.hold_handover`) until a later check passes or an administrator releases
it (:meth:`LeaseBackend.release_hold`). Each GPU waiting is a :class:`Handover`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, Self

from ztlab.common.auditlog.sink import AuditSink
from ztlab.common.config import ZtlabConfig
from ztlab.common.errors import UsageError, ZtlabError
from ztlab.hub.backends import check_complete, load_backend

if TYPE_CHECKING:
    from ztlab.hub.gpu.inventory import Inventory
    from ztlab.hub.policy import PolicyEngine

#: the entry-point group lease backends register in
ENTRY_POINT_GROUP = "ztlab.lease_backends"


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


class LeaseError(ZtlabError):
    """A lease request that cannot be granted; ``message`` is for the user."""


class LeaseDenied(LeaseError):
    """The policy (or the pool's roles) does not let this user lease on this pool."""


class QuotaExceeded(LeaseError):
    """The lease would take the user past the GPU quota of their roles."""


class PoolExhausted(LeaseError):
    """The pool has fewer free GPUs than asked for."""


class LeaseNotFound(UsageError):
    """No lease has this id."""


class LeaseStoreError(ZtlabError):
    """The lease database cannot be opened safely or is not a lease database."""


class HandoverNotFound(UsageError):
    """The GPU is not waiting for a hand-over check (or waits for another lease's)."""


# --------------------------------------------------------------------------------------
# Leases
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Lease:
    """GPUs of one pool held by one user's server until ``expires_at`` (POSIX seconds)."""

    id: str
    user: str
    server: str
    pool: str
    #: GPU ids as configured, in the pool's order
    gpus: tuple[str, ...]
    #: ``N`` of ``/dev/nvidiaN`` for each GPU (a MIG device: its parent's), same order
    minors: tuple[int, ...]
    granted_at: float
    expires_at: float
    #: when it was released or expired; ``None`` while it is held
    released_at: float | None = None

    @property
    def active(self) -> bool:
        """Whether the lease still holds its GPUs (not yet released)."""
        return self.released_at is None

    def expired(self, now: float) -> bool:
        """Whether ``now`` is at or past ``expires_at``."""
        return now >= self.expires_at


#: where a GPU whose lease ended stands: the monitor has not yet confirmed it clean, or the
#: check found a process of the old holder still on it
HandoverState = Literal["checking", "held"]
HANDOVER_CHECKING: Final = "checking"
HANDOVER_HELD: Final = "held"


@dataclass(frozen=True, slots=True, kw_only=True)
class Handover:
    """A GPU whose lease ended, held back from new leases until its hand-over check passes."""

    #: the GPU id as configured
    gpu: str
    #: the lease that ended, and its holder
    lease: str
    user: str
    server: str
    pool: str
    #: when the lease ended (POSIX seconds)
    since: float
    state: HandoverState
    #: why it is held back, for administrators (``processes of alice's server still run:
    #: pid 4242 (python)``)
    reason: str


class LeaseBackend(ABC):
    """Who holds which GPUs, until when, within which quota."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        check_complete(cls, LeaseBackend)

    @classmethod
    @abstractmethod
    def open(
        cls,
        *,
        config: ZtlabConfig,
        inventory: Inventory,
        policy: PolicyEngine,
        audit: AuditSink,
    ) -> Self:
        """The backend for a validated configuration (its state opened or created)."""

    @abstractmethod
    def grant(
        self,
        *,
        user: str,
        roles: Set[str],
        server: str,
        pool: str,
        count: int,
        hours: float | None = None,
    ) -> Lease | None:
        """Lease ``count`` GPUs of ``pool`` to ``user``'s ``server`` (``None`` for 0), or
        raise a :class:`~ztlab.hub.gpu.leases.LeaseError` whose message names the limit."""

    @abstractmethod
    def release(self, lease_id: str, *, reason: str, actor: str | None = None) -> None:
        """End one lease."""

    @abstractmethod
    def release_server(self, *, user: str, server: str, reason: str) -> list[Lease]:
        """End every lease of ``user``'s ``server``; the leases ended."""

    @abstractmethod
    def expire(self) -> list[Lease]:
        """End every lease past its expiry; the leases ended."""

    @abstractmethod
    def active(self, *, user: str | None = None, pool: str | None = None) -> list[Lease]:
        """The leases still held."""

    @abstractmethod
    def close(self) -> None:
        """Release what the backend holds open (not the leases)."""

    # -- hand-over checks -----------------------------------------------------------

    @property
    @abstractmethod
    def handover_checks(self) -> bool:
        """Whether a lease's end puts its GPUs into a hand-over check (default off)."""

    @abstractmethod
    def require_handover_checks(self, enabled: bool) -> None:
        """Turn hand-over checks on (the GPU monitor runs) or off, for leases ending from
        now on; GPUs already waiting keep waiting either way."""

    @abstractmethod
    def pending_handovers(self) -> list[Handover]:
        """The GPUs waiting for (or held back by) a hand-over check, oldest first."""

    @abstractmethod
    def clear_handover(
        self,
        gpu: str,
        *,
        actor: str,
        ecc_mode: bool | None,
        checked: str,
        lease: str | None = None,
    ) -> None:
        """The monitor found no process of the old holder on ``gpu``: it may be leased
        again. ``checked`` says what was checked; ``lease``, when given, must be the lease
        the GPU waits for (else :class:`HandoverNotFound`, as for a GPU not waiting)."""

    @abstractmethod
    def hold_handover(
        self, gpu: str, *, reason: str, actor: str, lease: str | None = None
    ) -> Handover:
        """The check found the old holder still on ``gpu``: hold it back (state ``held``)
        with ``reason``; the hand-over as it now stands. :class:`HandoverNotFound` as for
        :meth:`clear_handover`."""

    @abstractmethod
    def release_hold(self, gpu: str, *, actor: str) -> Handover:
        """An administrator lets ``gpu`` be leased again without a passing check; the
        hand-over removed. :class:`HandoverNotFound` when it is not waiting."""


def lease_backend(name: str, *, source: str = "ztlab.toml") -> type[LeaseBackend]:
    """The LeaseBackend registered as ``name``; :class:`ConfigError` naming the key."""
    return load_backend(
        ENTRY_POINT_GROUP,
        name,
        LeaseBackend,
        key="gpu.lease_backend",
        source=source,
        what="lease backend",
    )
