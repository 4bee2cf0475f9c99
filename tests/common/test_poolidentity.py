"""Pool identities: what a certificate names, and whom a cluster admits."""

from __future__ import annotations

import pytest

from ztlab.common.poolidentity import (
    ClusterAccess,
    IdentityError,
    PeerIdentity,
    control_plane_identity,
    parse_uri,
    scheduler_identity,
    user_identity,
    worker_identity,
)

ACCESS = ClusterAccess(
    pool="research", cluster="0123456789abcdef", owner="alice", shared_with=frozenset({"bob"})
)


@pytest.mark.parametrize(
    "identity",
    [
        user_identity("research", "alice"),
        scheduler_identity("research", "0123456789abcdef"),
        worker_identity("research", "0123456789abcdef"),
        control_plane_identity("research"),
    ],
)
def test_every_identity_round_trips_through_its_uri(identity: PeerIdentity) -> None:
    assert parse_uri(identity.uri) == identity


@pytest.mark.parametrize(
    "uri",
    [
        "ztlab://pool/research/user/alice/../bob",
        "ztlab://pool/research/user/",
        "ztlab://pool/Research/user/alice",
        "ztlab://pool/research/cluster/XYZ/worker",
        "ztlab://pool/research/cluster/0123456789abcdef/admin",
        "https://pool/research/user/alice",
        "ztlab://pool/research/user/alice\n",
    ],
)
def test_anything_else_names_nobody(uri: str) -> None:
    assert parse_uri(uri) is None


def test_a_name_that_cannot_be_written_is_refused() -> None:
    with pytest.raises(IdentityError):
        user_identity("research", "alice/../bob")


def test_the_owner_shared_users_own_processes_and_the_control_plane_are_admitted() -> None:
    for peer in (
        user_identity("research", "alice"),
        user_identity("research", "bob"),
        scheduler_identity("research", "0123456789abcdef"),
        worker_identity("research", "0123456789abcdef"),
        control_plane_identity("research"),
    ):
        assert ACCESS.refusal(peer) is None, peer


def test_strangers_are_refused_with_a_reason() -> None:
    assert ACCESS.refusal(user_identity("research", "carol")) == (
        "user carol is neither the owner (alice) nor shared with"
    )
    assert "another cluster" in str(ACCESS.refusal(worker_identity("research", "fedcba9876543210")))
    assert "pool other" in str(ACCESS.refusal(user_identity("other", "alice")))
    assert ACCESS.refusal(None) == "the certificate names no pool identity"


def test_the_spec_form_round_trips_and_bad_specs_name_the_file() -> None:
    assert ClusterAccess.from_json(ACCESS.as_json(), source="x.json") == ACCESS
    with pytest.raises(IdentityError, match=r"x.json: missing key 'owner'"):
        ClusterAccess.from_json(
            {"pool": "research", "cluster": "0123456789abcdef"}, source="x.json"
        )
    with pytest.raises(IdentityError, match="shared_with must be an array"):
        ClusterAccess.from_json({**ACCESS.as_json(), "shared_with": "bob"}, source="x.json")
