"""Signed checkpoints in the C2SP ``tlog-checkpoint`` format, wrapped in a ``signed-note``.

A checkpoint commits to the first ``size`` records of the log through their RFC 6962
Merkle root. Its body is::

    <origin>
    <size in decimal>
    <base64 root hash>
    timestamp <milliseconds since the epoch>

and the signed note appends a blank line and one signature line::

    \u2014 <key name> <base64(4-byte key hash || 64-byte Ed25519 signature)>

The key hash is the first four bytes of SHA-256(key name || "\\n" || 0x01 || public key), as in
C2SP signed-note, so notes made here can be checked by any signed-note verifier given our
verifier key (``<name>+<hex key hash>+<base64(0x01 || public key)>``). This module only
verifies; signing keys live in the control plane (:mod:`ztlab.hub.audit`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ztlab.common.errors import VerificationError

ED25519_ALG = 0x01
_SIG_PREFIX = "\u2014 "
_ORIGIN_RE = re.compile(r"[\x21-\x2a\x2c-\x7e]+\Z")


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_hash(name: str, key: Ed25519PublicKey) -> bytes:
    """C2SP signed-note key hash: SHA-256(name || "\\n" || 0x01 || key)[:4]."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([ED25519_ALG]) + raw_public_key(key))
    return digest.digest()[:4]


def verifier_key(name: str, key: Ed25519PublicKey) -> str:
    """The signed-note verifier key string ``name+hash+base64(0x01||key)``."""
    encoded = base64.b64encode(bytes([ED25519_ALG]) + raw_public_key(key)).decode()
    return f"{name}+{key_hash(name, key).hex()}+{encoded}"


def check_origin(origin: str) -> None:
    """An origin is printable ASCII without spaces or ``+`` (it is also the key name)."""
    if not _ORIGIN_RE.match(origin):
        raise ValueError(
            f"checkpoint origin must be printable ASCII without spaces or '+', such as "
            f"'ztlab.local/audit', got {origin!r}"
        )


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A verified checkpoint: the log ``origin`` had ``size`` records with Merkle ``root``."""

    origin: str
    size: int
    root: bytes
    timestamp_ms: int

    def body(self) -> str:
        """The checkpoint body that is signed."""
        root = base64.b64encode(self.root).decode()
        return f"{self.origin}\n{self.size}\n{root}\ntimestamp {self.timestamp_ms}\n"


def signed_note(body: str, name: str, key_id: bytes, signature: bytes) -> str:
    """Assemble a signed note from its body and one signature."""
    sig = base64.b64encode(key_id + signature).decode()
    return f"{body}\n{_SIG_PREFIX}{name} {sig}\n"


def verify_checkpoint_note(note: str, *, origin: str, key: Ed25519PublicKey) -> Checkpoint:
    """Verify one signed checkpoint note and return what it commits to.

    Raises :class:`VerificationError` saying which step failed.
    """
    # (1) Split the note into body and signature block at the last blank line.
    body, sep, sig_block = note.rpartition("\n\n")
    if not sep or not sig_block.endswith("\n"):
        raise VerificationError("checkpoint is not a signed note (no blank line before signatures)")
    body += "\n"
    # (2) Find a signature line by our key (name and key hash must both match).
    want_id = key_hash(origin, key)
    signature: bytes | None = None
    for line in sig_block[:-1].split("\n"):
        if not line.startswith(_SIG_PREFIX):
            raise VerificationError(f"malformed signature line {line!r}")
        name, _, sig_b64 = line[len(_SIG_PREFIX) :].rpartition(" ")
        try:
            raw = base64.b64decode(sig_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise VerificationError(f"signature line for {name!r} is not base64") from exc
        # canonical encoding only: base64 ignores the unused low bits of its last
        # character, so without this a changed character could decode to the same bytes
        if base64.b64encode(raw).decode() != sig_b64:
            raise VerificationError(f"signature line for {name!r} is not canonical base64")
        if name == origin and raw[:4] == want_id and len(raw) == 4 + 64:
            signature = raw[4:]
            break
    if signature is None:
        raise VerificationError(
            f"checkpoint has no signature by the expected key {origin}+{want_id.hex()}"
        )
    # (3) Check the Ed25519 signature over the body bytes.
    try:
        key.verify(signature, body.encode())
    except InvalidSignature as exc:
        raise VerificationError("checkpoint signature does not verify") from exc
    # (4) Parse the signed body: origin, size, root, timestamp extension.
    lines = body[:-1].split("\n")
    if len(lines) != 4 or lines[0] != origin:
        raise VerificationError(f"checkpoint body is not for origin {origin!r}")
    size_text, root_text, ts_text = lines[1], lines[2], lines[3]
    if not size_text.isdigit() or not ts_text.startswith("timestamp "):
        raise VerificationError("checkpoint body has a malformed size or timestamp line")
    try:
        root = base64.b64decode(root_text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise VerificationError("checkpoint root hash is not base64") from exc
    if base64.b64encode(root).decode() != root_text:
        raise VerificationError("checkpoint root hash is not canonical base64")
    if len(root) != 32 or not ts_text[10:].isdigit():
        raise VerificationError("checkpoint root hash or timestamp is malformed")
    return Checkpoint(origin=origin, size=int(size_text), root=root, timestamp_ms=int(ts_text[10:]))
