"""Tests for :mod:`ztlab.common.merkle` against RFC 6962 reference values and the
transparency-dev/merkle verifier test vectors (see ``tests/data/merkle/README.md``)."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztlab.common.errors import UsageError, VerificationError
from ztlab.common.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    CompactRange,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "merkle"

# The RFC 6962 reference leaves (transparency-dev/merkle testonly.LeafInputs) ...
RFC_LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
# ... and the roots of the trees of their first 0..8 leaves (testonly.RootHashes).
RFC_ROOTS = [
    bytes.fromhex(h)
    for h in (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    )
]
RFC_LEAF_HASHES = [leaf_hash(d) for d in RFC_LEAVES]


def reference_root(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) straight from RFC 9162 section 2.1.1, independent of CompactRange."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaves[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(
        b"\x01" + reference_root(leaves[:k]) + reference_root(leaves[k:])
    ).digest()


def random_leaves(n: int, seed: int = 6962) -> list[bytes]:
    rng = random.Random(seed)
    return [leaf_hash(rng.randbytes(rng.randrange(0, 40))) for _ in range(n)]


def flip_bit(h: bytes, bit: int) -> bytes:
    b = bytearray(h)
    b[bit // 8 % len(b)] ^= 1 << (bit % 8)
    return bytes(b)


def load_cases(name: str) -> list[Any]:
    doc = json.loads((DATA / name).read_text(encoding="utf-8"))
    cases: list[Any] = doc["cases"]
    return [pytest.param(c, id=c["name"]) for c in cases]


# --- published vectors ----------------------------------------------------------------


@pytest.mark.parametrize("case", load_cases("inclusion.json"))
def test_inclusion_vectors(case: dict[str, Any]) -> None:
    args = (
        bytes.fromhex(case["leafHash"]),
        case["leafIdx"],
        case["treeSize"],
        [bytes.fromhex(p) for p in case["proof"]],
        bytes.fromhex(case["root"]),
    )
    if case["wantErr"]:
        with pytest.raises(VerificationError):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


@pytest.mark.parametrize("case", load_cases("consistency.json"))
def test_consistency_vectors(case: dict[str, Any]) -> None:
    args = (
        case["size1"],
        case["size2"],
        [bytes.fromhex(p) for p in case["proof"]],
        bytes.fromhex(case["root1"]),
        bytes.fromhex(case["root2"]),
    )
    if case["wantErr"]:
        with pytest.raises(VerificationError):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


def test_vector_files_are_complete() -> None:
    inclusion = json.loads((DATA / "inclusion.json").read_text(encoding="utf-8"))["cases"]
    consistency = json.loads((DATA / "consistency.json").read_text(encoding="utf-8"))["cases"]
    assert len(inclusion) == 98
    assert len(consistency) == 98
    assert sum(not c["wantErr"] for c in inclusion + consistency) == 12


def happy_rfc_cases(name: str) -> list[Any]:
    """The passing vectors that are proofs over (a prefix of) the RFC leaves."""
    return [
        p
        for p in load_cases(name)
        if not p.values[0]["wantErr"]
        and p.values[0].get("root", p.values[0].get("root2")) in {r.hex() for r in RFC_ROOTS[1:]}
    ]


@pytest.mark.parametrize("case", happy_rfc_cases("inclusion.json"))
def test_generator_reproduces_inclusion_vectors(case: dict[str, Any]) -> None:
    assert bytes.fromhex(case["leafHash"]) == RFC_LEAF_HASHES[case["leafIdx"]]
    assert bytes.fromhex(case["root"]) == RFC_ROOTS[case["treeSize"]]
    got = inclusion_proof(RFC_LEAF_HASHES, case["leafIdx"], case["treeSize"])
    assert [p.hex() for p in got] == case["proof"]


@pytest.mark.parametrize("case", happy_rfc_cases("consistency.json"))
def test_generator_reproduces_consistency_vectors(case: dict[str, Any]) -> None:
    assert bytes.fromhex(case["root1"]) == RFC_ROOTS[case["size1"]]
    assert bytes.fromhex(case["root2"]) == RFC_ROOTS[case["size2"]]
    got = consistency_proof(RFC_LEAF_HASHES, case["size1"], case["size2"])
    assert [p.hex() for p in got] == case["proof"]


# --- hashing and roots ----------------------------------------------------------------


def test_hash_constants() -> None:
    assert HASH_SIZE == 32
    assert EMPTY_ROOT == RFC_ROOTS[0] == hashlib.sha256(b"").digest()
    assert leaf_hash(b"") == RFC_ROOTS[1]
    assert leaf_hash(b"") != EMPTY_ROOT
    assert node_hash(RFC_LEAF_HASHES[0], RFC_LEAF_HASHES[1]) == RFC_ROOTS[2]


@pytest.mark.parametrize("size", range(9))
def test_rfc_reference_roots(size: int) -> None:
    leaves = RFC_LEAF_HASHES[:size]
    assert root_from_leaves(leaves) == RFC_ROOTS[size]
    assert reference_root(leaves) == RFC_ROOTS[size]
    compact = CompactRange()
    for h in leaves:
        compact.append(h)
    assert compact.size == size
    assert compact.root() == RFC_ROOTS[size]


def test_compact_range_matches_reference_root_at_every_size() -> None:
    leaves = random_leaves(70)
    compact = CompactRange()
    assert compact.root() == EMPTY_ROOT
    for n in range(71):
        assert compact.size == n
        want = reference_root(leaves[:n])
        assert compact.root() == want
        assert root_from_leaves(leaves[:n]) == want
        if n < 70:
            compact.append(leaves[n])


def test_compact_range_copy_and_equality() -> None:
    leaves = random_leaves(20)
    a = CompactRange()
    for h in leaves[:11]:
        a.append(h)
    b = a.copy()
    assert a == b
    assert a != "not a range"
    b.append(leaves[11])
    assert a != b
    assert a.size == 11
    assert b.size == 12
    assert a.root() == reference_root(leaves[:11])
    assert b.root() == reference_root(leaves[:12])
    a.append(leaves[11])
    assert a == b
    assert a.root() == b.root()
    assert "size=12" in repr(a)
    with pytest.raises(TypeError):
        hash(a)


def test_compact_range_rejects_bad_hash_length() -> None:
    compact = CompactRange()
    with pytest.raises(VerificationError, match="leaf hash has 31 bytes, expected 32"):
        compact.append(b"\x00" * 31)
    assert compact.size == 0


# --- generated proofs -----------------------------------------------------------------

LEAVES_40 = random_leaves(40)
ROOTS_40 = [reference_root(LEAVES_40[:n]) for n in range(41)]


@pytest.mark.parametrize("size", range(1, 41))
def test_generated_inclusion_proofs(size: int) -> None:
    root = ROOTS_40[size]
    for index in range(size):
        leaf = LEAVES_40[index]
        proof = inclusion_proof(LEAVES_40, index, size)
        verify_inclusion(leaf, index, size, proof, root)
        # Every hash in the proof matters.
        for i, p in enumerate(proof):
            bad = [*proof[:i], flip_bit(p, index + i), *proof[i + 1 :]]
            with pytest.raises(VerificationError, match="does not match"):
                verify_inclusion(leaf, index, size, bad, root)
        with pytest.raises(VerificationError):
            verify_inclusion(flip_bit(leaf, size), index, size, proof, root)
        # The proof does not prove the leaf into any other tree of the same leaves.
        for other in {size - 1, size + 1, 2 * size, size // 2} - {size}:
            if index < other <= 40:
                with pytest.raises(VerificationError):
                    verify_inclusion(leaf, index, other, proof, ROOTS_40[other])
        # Nor another leaf at another index.
        if size > 1:
            other_index = (index + 1) % size
            with pytest.raises(VerificationError):
                verify_inclusion(leaf, other_index, size, proof, root)


@pytest.mark.parametrize("size2", range(1, 41))
def test_generated_consistency_proofs(size2: int) -> None:
    root2 = ROOTS_40[size2]
    for size1 in range(1, size2 + 1):
        root1 = ROOTS_40[size1]
        proof = consistency_proof(LEAVES_40, size1, size2)
        verify_consistency(size1, size2, proof, root1, root2)
        for i, p in enumerate(proof):
            bad = [*proof[:i], flip_bit(p, size1 + i), *proof[i + 1 :]]
            with pytest.raises(VerificationError, match="does not match"):
                verify_consistency(size1, size2, bad, root1, root2)
        for s1, s2 in ((size1 - 1, size2), (size1 + 1, size2), (size1, size2 - 1)):
            if 0 <= s1 <= 40 and 0 <= s2 <= 40:
                with pytest.raises(VerificationError):
                    verify_consistency(s1, s2, proof, ROOTS_40[s1], ROOTS_40[s2])
        if size2 < 40:
            with pytest.raises(VerificationError):
                verify_consistency(size1, size2 + 1, proof, root1, ROOTS_40[size2 + 1])
        if size1 < size2:
            with pytest.raises(VerificationError):
                verify_consistency(size1, size2, proof, root2, root1)
            with pytest.raises(VerificationError):
                verify_consistency(size1, size2, proof, flip_bit(root1, 3), root2)


def test_inclusion_size_is_bound_only_through_the_root() -> None:
    """RFC 6962 hashes do not commit to the tree size: a proof for leaf 0 of 4 leaves is
    also a valid-looking proof for leaf 0 of 3 against the same root. Callers must take
    the size and the root from the same signed checkpoint."""
    root4 = ROOTS_40[4]
    proof = inclusion_proof(LEAVES_40, 0, 4)
    verify_inclusion(LEAVES_40[0], 0, 3, proof, root4)


# --- messages and bad arguments -------------------------------------------------------


def test_verifier_messages() -> None:
    proof = inclusion_proof(RFC_LEAF_HASHES, 5, 8)
    with pytest.raises(
        VerificationError,
        match=r"^inclusion proof has 2 hashes, expected 3 for index 5 in a tree of size 8$",
    ):
        verify_inclusion(RFC_LEAF_HASHES[5], 5, 8, proof[:2], RFC_ROOTS[8])
    with pytest.raises(
        VerificationError,
        match=r"calculated root [0-9a-f]{16}… does not match expected root 5dc9da79a70659a9…",
    ):
        verify_inclusion(RFC_LEAF_HASHES[4], 5, 8, proof, RFC_ROOTS[8])
    with pytest.raises(VerificationError, match="leaf index 8 is outside a tree of size 8"):
        verify_inclusion(RFC_LEAF_HASHES[5], 8, 8, proof, RFC_ROOTS[8])
    with pytest.raises(VerificationError, match="leaf hash has 0 bytes, expected 32"):
        verify_inclusion(b"", 5, 8, proof, RFC_ROOTS[8])
    with pytest.raises(VerificationError, match="expected root has 3 bytes, expected 32"):
        verify_inclusion(RFC_LEAF_HASHES[5], 5, 8, proof, b"abc")
    with pytest.raises(VerificationError, match="inclusion proof hash 1 has 33 bytes"):
        verify_inclusion(RFC_LEAF_HASHES[5], 5, 8, [proof[0], proof[1] + b"!", proof[2]], b"x" * 32)
    with pytest.raises(VerificationError, match="must not be negative"):
        verify_inclusion(RFC_LEAF_HASHES[5], -1, 8, proof, RFC_ROOTS[8])

    cproof = consistency_proof(RFC_LEAF_HASHES, 3, 8)
    with pytest.raises(
        VerificationError,
        match=r"^consistency proof has 3 hashes, expected 4 from size 3 to size 8$",
    ):
        verify_consistency(3, 8, cproof[:3], RFC_ROOTS[3], RFC_ROOTS[8])
    with pytest.raises(VerificationError, match="size1 9 is larger than size2 8"):
        verify_consistency(9, 8, cproof, RFC_ROOTS[3], RFC_ROOTS[8])
    with pytest.raises(VerificationError, match="empty tree"):
        verify_consistency(0, 8, [], EMPTY_ROOT, RFC_ROOTS[8])
    with pytest.raises(VerificationError, match="expected 0 for equal sizes 8"):
        verify_consistency(8, 8, cproof, RFC_ROOTS[8], RFC_ROOTS[8])
    with pytest.raises(VerificationError, match="calculated root 6e340b9c"):
        verify_consistency(1, 1, [], RFC_ROOTS[1], RFC_ROOTS[2])
    with pytest.raises(VerificationError, match="root1 has 0 bytes, expected 32"):
        verify_consistency(3, 8, cproof, b"", RFC_ROOTS[8])
    with pytest.raises(VerificationError, match=r"calculated root1 .* does not match"):
        verify_consistency(3, 8, cproof, RFC_ROOTS[4], RFC_ROOTS[8])
    with pytest.raises(VerificationError, match=r"calculated root2 .* does not match"):
        verify_consistency(3, 8, cproof, RFC_ROOTS[3], RFC_ROOTS[7])
    with pytest.raises(VerificationError, match="must not be negative"):
        verify_consistency(-1, 8, cproof, RFC_ROOTS[3], RFC_ROOTS[8])


def test_generators_reject_bad_arguments() -> None:
    with pytest.raises(UsageError, match="leaf index 3 is outside a tree of size 3"):
        inclusion_proof(RFC_LEAF_HASHES, 3, 3)
    with pytest.raises(UsageError, match="leaf index -1"):
        inclusion_proof(RFC_LEAF_HASHES, -1, 3)
    with pytest.raises(UsageError, match="tree size 9 exceeds the 8 leaf hashes given"):
        inclusion_proof(RFC_LEAF_HASHES, 0, 9)
    with pytest.raises(UsageError, match="size1 4 is larger than size2 3"):
        consistency_proof(RFC_LEAF_HASHES, 4, 3)
    with pytest.raises(UsageError, match="non-empty first tree"):
        consistency_proof(RFC_LEAF_HASHES, 0, 3)
    with pytest.raises(UsageError, match="tree size 9 exceeds"):
        consistency_proof(RFC_LEAF_HASHES, 1, 9)
    assert consistency_proof(RFC_LEAF_HASHES, 5, 5) == []
    assert not issubclass(UsageError, VerificationError)


# --- properties -----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=1, max_value=300).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.integers(min_value=0, max_value=n - 1),
            st.integers(min_value=1, max_value=n),
        )
    ),
    st.integers(min_value=0, max_value=2**32),
)
def test_proofs_verify_property(args: tuple[int, int, int], seed: int) -> None:
    size, index, size1 = args
    leaves = random_leaves(size, seed)
    root = root_from_leaves(leaves)
    verify_inclusion(leaves[index], index, size, inclusion_proof(leaves, index, size), root)
    root1 = root_from_leaves(leaves[:size1])
    verify_consistency(size1, size, consistency_proof(leaves, size1, size), root1, root)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=32, max_size=32), max_size=100))
def test_compact_range_property(leaves: list[bytes]) -> None:
    compact = CompactRange()
    snapshots = []
    for h in leaves:
        snapshots.append(compact.copy())
        compact.append(h)
    assert compact.root() == reference_root(leaves)
    for n, snap in enumerate(snapshots):
        assert snap.size == n
        assert snap.root() == reference_root(leaves[:n])
