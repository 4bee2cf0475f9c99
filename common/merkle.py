"""RFC 6962 / RFC 9162 Merkle trees over SHA-256: roots, inclusion and consistency proofs.

The tree is the one Certificate Transparency defines (RFC 6962 section 2.1, restated in
RFC 9162 section 2.1): a leaf hashes as ``SHA-256(0x00 || data)``, an interior node as
``SHA-256(0x01 || left || right)``, and a tree of ``n`` leaves splits at the largest power
of two smaller than ``n``. The empty tree's root is ``SHA-256("")``.

:class:`CompactRange` accumulates leaf hashes one at a time in O(log n) memory, which is
how the audit log keeps a running root. The proof generators take the full list of leaf
hashes and are meant for tests and small trees; the verifiers take only hashes and sizes.

Verifiers return ``None`` on success and raise :class:`~ztlab.common.errors.VerificationError`
on any failure, including malformed arguments. Proof generators raise
:class:`~ztlab.common.errors.UsageError` when asked for a proof that does not exist.

The verifiers accept and reject exactly what the reference Go verifier
(transparency-dev/merkle ``proof`` package) does on its published test vectors, in
particular:

* a consistency proof from the empty tree (``size1 == 0``) is rejected, whatever the
  proof and roots: every tree is trivially consistent with the empty tree, so such a
  "proof" proves nothing and a caller asking for one has a bug;
* when ``size1 == size2`` the proof must be empty and the two roots must be equal byte
  strings; nothing else is checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import sha256
from typing import Final

from ztlab.common.errors import UsageError, VerificationError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactRange",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root_from_leaves",
    "verify_consistency",
    "verify_inclusion",
]

#: length in bytes of every hash in the tree (SHA-256)
HASH_SIZE: Final = 32

#: Merkle tree hash of the empty tree: SHA-256 of the empty string
EMPTY_ROOT: Final = sha256(b"").digest()

_LEAF_PREFIX: Final = b"\x00"
_NODE_PREFIX: Final = b"\x01"


def leaf_hash(data: bytes) -> bytes:
    """Return the RFC 6962 hash of a leaf: ``SHA-256(0x00 || data)``."""
    return sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return the RFC 6962 hash of an interior node: ``SHA-256(0x01 || left || right)``."""
    return sha256(_NODE_PREFIX + left + right).digest()


class CompactRange:
    """An incremental Merkle tree accumulator over the leaves ``[0, size)``.

    It keeps only the roots of the perfect subtrees that the tree of ``size`` leaves
    decomposes into, largest (leftmost) first: one per set bit of ``size``. Appending a
    leaf merges equal-sized subtrees like a binary counter carries, so each append costs
    one leaf-level hash amortised, and memory is O(log size).
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        """Start an empty range (size 0)."""
        self._hashes: list[bytes] = []
        self._size = 0

    @property
    def size(self) -> int:
        """The number of leaf hashes appended so far."""
        return self._size

    def append(self, leaf_hash: bytes) -> None:
        """Append the hash of the next leaf (a :func:`leaf_hash` result, not raw data)."""
        if len(leaf_hash) != HASH_SIZE:
            raise VerificationError(f"leaf hash has {len(leaf_hash)} bytes, expected {HASH_SIZE}")
        hashes = self._hashes
        size = self._size
        self._size = size + 1
        # Each set low bit of the old size is a perfect subtree of the same height as the
        # one being carried: merge them, exactly as a binary increment carries.
        while size & 1:
            leaf_hash = sha256(_NODE_PREFIX + hashes.pop() + leaf_hash).digest()
            size >>= 1
        hashes.append(leaf_hash)

    def root(self) -> bytes:
        """Return the RFC 6962 Merkle tree hash of all leaves appended (EMPTY_ROOT if none)."""
        hashes = self._hashes
        if not hashes:
            return EMPTY_ROOT
        # The tree splits at the largest power of two below its size, so its root is the
        # right fold of the subtree roots: h0 . (h1 . (h2 . ...)).
        root = hashes[-1]
        for left in reversed(hashes[:-1]):
            root = node_hash(left, root)
        return root

    def copy(self) -> CompactRange:
        """Return an independent copy: appending to one does not change the other."""
        other = CompactRange.__new__(CompactRange)
        other._hashes = self._hashes.copy()
        other._size = self._size
        return other

    def __eq__(self, other: object) -> bool:
        """Two ranges are equal when they cover the same number of identical leaves."""
        if not isinstance(other, CompactRange):
            return NotImplemented
        return self._size == other._size and self._hashes == other._hashes

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        """Show the size and the current root."""
        return f"CompactRange(size={self._size}, root={self.root().hex()})"


def root_from_leaves(leaf_hashes: Sequence[bytes]) -> bytes:
    """Return the Merkle tree hash ``MTH(D[n])`` of a list of leaf hashes."""
    compact = CompactRange()
    for leaf in leaf_hashes:
        compact.append(leaf)
    return compact.root()


# --- proof generation (RFC 9162 sections 2.1.3.1 and 2.1.4.1) ---------------------------


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_leaves(leaf_hashes: Sequence[bytes], size: int) -> None:
    if size > len(leaf_hashes):
        raise UsageError(f"tree size {size} exceeds the {len(leaf_hashes)} leaf hashes given")


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int, size: int) -> list[bytes]:
    """Return the audit path ``PATH(index, D[size])`` for leaf ``index``.

    ``leaf_hashes`` must hold at least ``size`` leaf hashes; only the first ``size`` are
    used. Raises :class:`UsageError` unless ``0 <= index < size``.
    """
    if not 0 <= index < size:
        raise UsageError(f"leaf index {index} is outside a tree of size {size}")
    _check_leaves(leaf_hashes, size)

    def path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
        n = len(leaves)
        if n == 1:
            return []
        k = _split(n)
        if m < k:
            return [*path(m, leaves[:k]), root_from_leaves(leaves[k:])]
        return [*path(m - k, leaves[k:]), root_from_leaves(leaves[:k])]

    return path(index, leaf_hashes[:size])


def consistency_proof(leaf_hashes: Sequence[bytes], size1: int, size2: int) -> list[bytes]:
    """Return the consistency proof ``PROOF(size1, D[size2])``.

    The proof is empty when ``size1 == size2``. Raises :class:`UsageError` unless
    ``0 < size1 <= size2``: a proof from the empty tree would prove nothing.
    """
    if size1 > size2:
        raise UsageError(f"size1 {size1} is larger than size2 {size2}")
    if size1 <= 0:
        raise UsageError(f"size1 is {size1}: a consistency proof needs a non-empty first tree")
    _check_leaves(leaf_hashes, size2)

    def subproof(m: int, leaves: Sequence[bytes], whole: bool) -> list[bytes]:
        n = len(leaves)
        if m == n:
            return [] if whole else [root_from_leaves(leaves)]
        k = _split(n)
        if m <= k:
            return [*subproof(m, leaves[:k], whole), root_from_leaves(leaves[k:])]
        return [*subproof(m - k, leaves[k:], False), root_from_leaves(leaves[:k])]

    return subproof(size1, leaf_hashes[:size2], True)


# --- verification (RFC 9162 sections 2.1.3.2 and 2.1.4.2) -------------------------------


def _check_hash(what: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise VerificationError(f"{what} has {len(value)} bytes, expected {HASH_SIZE}")


def _check_proof_hashes(kind: str, proof: Sequence[bytes]) -> None:
    for i, h in enumerate(proof):
        _check_hash(f"{kind} proof hash {i}", h)


def _short(h: bytes) -> str:
    return h.hex()[:16] + "…" if len(h) > 8 else h.hex() or "(empty)"


def _check_root(what: str, calculated: bytes, expected: bytes) -> None:
    if calculated != expected:
        raise VerificationError(
            f"calculated {what} {_short(calculated)} does not match "
            f"expected {what} {_short(expected)}"
        )


def _inclusion_proof_size(index: int, size: int) -> int:
    """Audit path length for ``index`` in a tree of ``size``: levels below the point where
    the paths to ``index`` and ``size - 1`` diverge, plus one left sibling per level above
    it where ``index``'s ancestor is a right child."""
    inner = (index ^ (size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``size`` leaves with ``root``.

    Returns ``None`` on success; raises :class:`VerificationError` otherwise.
    """
    if index < 0 or size < 0:
        raise VerificationError(f"index {index} and size {size} must not be negative")
    # 1. Compare leaf_index against tree_size. If leaf_index is greater than or equal to
    #    tree_size, then fail the proof verification.
    if index >= size:
        raise VerificationError(f"leaf index {index} is outside a tree of size {size}")
    _check_hash("leaf hash", leaf_hash)
    _check_hash("expected root", root)
    _check_proof_hashes("inclusion", proof)
    expected = _inclusion_proof_size(index, size)
    if len(proof) != expected:
        raise VerificationError(
            f"inclusion proof has {len(proof)} hashes, expected {expected} "
            f"for index {index} in a tree of size {size}"
        )

    # 2. Set fn to leaf_index and sn to tree_size - 1.
    fn, sn = index, size - 1
    # 3. Set r to hash.
    r = leaf_hash
    # 4. For each value p in the inclusion_path array:
    for p in proof:
        # a. If sn is 0, then stop the iteration and fail the proof verification.
        if sn == 0:
            raise VerificationError("inclusion proof is longer than the path to the root")
        # b. If LSB(fn) is set, or if fn is equal to sn, then:
        if fn & 1 or fn == sn:
            # 1. Set r to HASH(0x01 || p || r).
            r = node_hash(p, r)
            # 2. If LSB(fn) is not set, then right-shift both fn and sn equally until
            #    either LSB(fn) is set or fn is 0.
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        #    Otherwise: Set r to HASH(0x01 || r || p).
        else:
            r = node_hash(r, p)
        # c. Finally, right-shift both fn and sn one time.
        fn >>= 1
        sn >>= 1
    # 5. Compare sn to 0. Compare r against the root_hash. If sn is equal to 0 and r and
    #    the root_hash are equal, then the log has proven the inclusion of hash.
    #    Otherwise, fail the proof verification.
    if sn != 0:
        raise VerificationError("inclusion proof is shorter than the path to the root")
    _check_root("root", r, root)


def _consistency_proof_size(size1: int, size2: int) -> int:
    """Consistency proof length for ``0 < size1 < size2``: the audit path of leaf
    ``size1 - 1`` in the tree of ``size2``, without the levels inside the rightmost
    perfect subtree of the first tree, plus that subtree's root unless it is the whole
    first tree (``size1`` a power of two), whose root the verifier already has."""
    shift = ((size1 & -size1).bit_length()) - 1  # trailing zero bits of size1
    own_root = 0 if size1 == 1 << shift else 1
    return _inclusion_proof_size(size1 - 1, size2) - shift + own_root


def verify_consistency(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
) -> None:
    """Check that the tree of ``size2`` leaves with ``root2`` extends the one of ``size1``.

    Returns ``None`` on success; raises :class:`VerificationError` otherwise. See the
    module docstring for the ``size1 == 0`` and ``size1 == size2`` cases.
    """
    if size1 < 0 or size2 < 0:
        raise VerificationError(f"sizes {size1} and {size2} must not be negative")
    if size1 > size2:
        raise VerificationError(f"size1 {size1} is larger than size2 {size2}")
    if size1 == 0:
        raise VerificationError(
            "consistency proof from the empty tree (size1 0) proves nothing; expected size1 > 0"
        )
    if size1 == size2:
        if proof:
            raise VerificationError(
                f"consistency proof has {len(proof)} hashes, expected 0 for equal sizes {size1}"
            )
        _check_root("root", root1, root2)
        return
    _check_hash("root1", root1)
    _check_hash("root2", root2)
    _check_proof_hashes("consistency", proof)
    expected = _consistency_proof_size(size1, size2)
    if len(proof) != expected:
        raise VerificationError(
            f"consistency proof has {len(proof)} hashes, expected {expected} "
            f"from size {size1} to size {size2}"
        )

    # 1. If consistency_path is an empty array, stop and fail the proof verification.
    if not proof:  # pragma: no cover - expected is never 0 when 0 < size1 < size2
        raise VerificationError("consistency proof is empty")
    # 2. If first is an exact power of 2, then prepend first_hash to the consistency_path
    #    array.
    path = list(proof)
    if size1 & (size1 - 1) == 0:
        path.insert(0, root1)
    # 3. Set fn to first - 1 and sn to second - 1.
    fn, sn = size1 - 1, size2 - 1
    # 4. If LSB(fn) is set, then right-shift both fn and sn equally until LSB(fn) is not
    #    set.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5. Set both fr and sr to the first value in the consistency_path array.
    fr = sr = path[0]
    # 6. For each subsequent value c in the consistency_path array:
    for c in path[1:]:
        # a. If sn is 0, then stop the iteration and fail the proof verification.
        if sn == 0:
            raise VerificationError("consistency proof is longer than the path to the root")
        # b. If LSB(fn) is set, or if fn is equal to sn, then:
        if fn & 1 or fn == sn:
            # 1. Set fr to HASH(0x01 || c || fr).
            #    Set sr to HASH(0x01 || c || sr).
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            # 2. If LSB(fn) is not set, then right-shift both fn and sn equally until
            #    either LSB(fn) is set or fn is 0.
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        #    Otherwise: Set sr to HASH(0x01 || sr || c).
        else:
            sr = node_hash(sr, c)
        # c. Finally, right-shift both fn and sn one time.
        fn >>= 1
        sn >>= 1
    # 7. After completing iterating through the consistency_path array as described
    #    above, verify that the fr calculated is equal to the first_hash supplied, that
    #    the sr calculated is equal to the second_hash supplied, and that sn is 0.
    if sn != 0:
        raise VerificationError("consistency proof is shorter than the path to the root")
    _check_root("root1", fr, root1)
    _check_root("root2", sr, root2)
