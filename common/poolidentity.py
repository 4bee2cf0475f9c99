"""Who a pool certificate names, and whom a cluster admits: the format both sides share.

Every certificate a pool's authority issues (:mod:`ztlab.hub.compute.authority`) names its
holder in one subject-alternative-name URI, and nothing else in the certificate counts:

=========================================  =================================================
``ztlab://pool/POOL/user/NAME``            a user's client (a kernel, ``ztlab pools``)
``ztlab://pool/POOL/cluster/ID/scheduler`` the scheduler of cluster ``ID``
``ztlab://pool/POOL/cluster/ID/worker``    a worker of cluster ``ID``
``ztlab://pool/POOL/control-plane``        the hub (status, dashboards)
=========================================  =================================================

A pool's certificates chain only to that pool's authority, so the TLS handshake already
refuses another pool's certificate, an expired one and none at all; :class:`ClusterAccess`
then decides whether the peer named by a certificate that verified may talk to one
cluster: its owner, the users it is shared with, its own scheduler and workers, and the
control plane. Another user's certificate for the same pool verifies, and is refused here.

Pure: it imports only the standard library and ``cryptography`` (to read a certificate).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Literal

from cryptography import x509

from ztlab.common.errors import UsageError

#: the URI scheme of pool identities
SCHEME: Final = "ztlab"

_NAME = r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}"
_POOL = r"[a-z][a-z0-9_-]{0,63}"
_CLUSTER = r"[a-f0-9]{8,32}"
_URI = re.compile(
    rf"ztlab://pool/(?P<pool>{_POOL})/(?:"
    rf"user/(?P<user>{_NAME})"
    rf"|cluster/(?P<cluster>{_CLUSTER})/(?P<role>scheduler|worker)"
    rf"|(?P<plane>control-plane))\Z"
)

Kind = Literal["user", "scheduler", "worker", "control-plane"]


class IdentityError(UsageError):
    """A name that cannot be put in (or read from) a pool certificate."""


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """The holder a pool certificate names."""

    kind: Kind
    pool: str
    #: the user (``kind == "user"``)
    user: str = ""
    #: the cluster (``scheduler`` and ``worker``)
    cluster: str = ""

    @property
    def uri(self) -> str:
        """The subject-alternative-name URI that names this holder."""
        base = f"{SCHEME}://pool/{self.pool}"
        if self.kind == "user":
            return f"{base}/user/{self.user}"
        if self.kind == "control-plane":
            return f"{base}/control-plane"
        return f"{base}/cluster/{self.cluster}/{self.kind}"

    def __str__(self) -> str:
        if self.kind == "user":
            return f"user {self.user} of pool {self.pool}"
        if self.kind == "control-plane":
            return f"the control plane of pool {self.pool}"
        return f"the {self.kind} of cluster {self.cluster} in pool {self.pool}"


def user_identity(pool: str, user: str) -> PeerIdentity:
    """A user's client in ``pool``."""
    return _checked(PeerIdentity("user", pool, user=user))


def scheduler_identity(pool: str, cluster: str) -> PeerIdentity:
    """The scheduler of ``cluster``."""
    return _checked(PeerIdentity("scheduler", pool, cluster=cluster))


def worker_identity(pool: str, cluster: str) -> PeerIdentity:
    """A worker of ``cluster``."""
    return _checked(PeerIdentity("worker", pool, cluster=cluster))


def control_plane_identity(pool: str) -> PeerIdentity:
    """The hub, in ``pool``."""
    return _checked(PeerIdentity("control-plane", pool))


def _checked(identity: PeerIdentity) -> PeerIdentity:
    if parse_uri(identity.uri) != identity:
        raise IdentityError(
            f"cannot name {identity.kind} {identity.user or identity.cluster!r} "
            f"in pool {identity.pool!r} in a certificate"
        )
    return identity


def parse_uri(uri: str) -> PeerIdentity | None:
    """The identity ``uri`` names, or ``None`` for anything else."""
    match = _URI.match(uri)
    if match is None:
        return None
    pool = match["pool"]
    if match["user"]:
        return PeerIdentity("user", pool, user=match["user"])
    if match["plane"]:
        return PeerIdentity("control-plane", pool)
    role: Kind = "scheduler" if match["role"] == "scheduler" else "worker"
    return PeerIdentity(role, pool, cluster=match["cluster"])


def identity_of(certificate_der: bytes) -> PeerIdentity | None:
    """The one identity a DER certificate names, or ``None`` (none, several, unreadable)."""
    try:
        certificate = x509.load_der_x509_certificate(certificate_der)
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    found = {parse_uri(uri) for uri in names.get_values_for_type(x509.UniformResourceIdentifier)}
    found.discard(None)
    if len(found) != 1:
        return None
    return found.pop()


@dataclass(frozen=True, slots=True)
class ClusterAccess:
    """Whom one cluster admits, as the control plane wrote it into the cluster's spec."""

    pool: str
    cluster: str
    owner: str
    shared_with: frozenset[str] = field(default_factory=frozenset)

    def refusal(self, peer: PeerIdentity | None) -> str | None:
        """Why ``peer`` may not talk to this cluster, or ``None`` when it may."""
        if peer is None:
            return "the certificate names no pool identity"
        if peer.pool != self.pool:
            return f"the certificate is for pool {peer.pool}, this cluster is in pool {self.pool}"
        if peer.kind == "control-plane":
            return None
        if peer.kind == "user":
            if peer.user == self.owner or peer.user in self.shared_with:
                return None
            return f"user {peer.user} is neither the owner ({self.owner}) nor shared with"
        if peer.cluster != self.cluster:
            return f"the certificate is for the {peer.kind} of another cluster ({peer.cluster})"
        return None

    def as_json(self) -> dict[str, object]:
        """For the cluster's spec file."""
        return {
            "pool": self.pool,
            "cluster": self.cluster,
            "owner": self.owner,
            "shared_with": sorted(self.shared_with),
        }

    @classmethod
    def from_json(cls, data: dict[str, object], *, source: str) -> ClusterAccess:
        """Read what :meth:`as_json` wrote; :class:`IdentityError` naming ``source``."""
        try:
            pool, cluster, owner = data["pool"], data["cluster"], data["owner"]
            shared = data.get("shared_with", [])
        except (KeyError, TypeError) as exc:
            raise IdentityError(f"{source}: missing key {exc}") from exc
        if not (isinstance(pool, str) and isinstance(cluster, str) and isinstance(owner, str)):
            raise IdentityError(f"{source}: pool, cluster and owner must be strings")
        if not isinstance(shared, list) or not all(isinstance(u, str) for u in shared):
            raise IdentityError(f"{source}: shared_with must be an array of user names")
        return cls(pool=pool, cluster=cluster, owner=owner, shared_with=frozenset(shared))
