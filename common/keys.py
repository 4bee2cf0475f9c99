"""Public keys, as both sides of the trust boundary read them (no private key lives here).

Statements are signed with ECDSA P-256 (the control plane's default, the curve OpenSSF
model-signing uses for its key method) or Ed25519; the audit log's checkpoints with Ed25519.
A key is named by its *key id*: the lowercase hex SHA-256 of its DER SubjectPublicKeyInfo,
so the same public key always has the same id whatever file it came from. Creating, storing
and loading private keys is the control plane's (:mod:`ztlab.hub.keys`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from ztlab.common.errors import KeyFileError

PrivateKey = ec.EllipticCurvePrivateKey | Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | Ed25519PublicKey


def key_id(key: PublicKey) -> str:
    """The hex SHA-256 of the key's DER SubjectPublicKeyInfo."""
    der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def public_key_pem(key: PublicKey) -> str:
    """The key as SubjectPublicKeyInfo PEM text."""
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def public_key_from_pem(data: bytes | str, *, source: str = "public key") -> PublicKey:
    """Parse one PEM public key; :class:`KeyFileError` unless it is P-256/P-384 or Ed25519."""
    raw = data.encode("ascii") if isinstance(data, str) else data
    try:
        key = load_pem_public_key(raw)
    except ValueError as exc:
        raise KeyFileError(f"{source}: not a PEM public key ({exc})") from exc
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise KeyFileError(
                f"{source}: elliptic curve {key.curve.name} is not accepted",
                hint="use a P-256 (secp256r1) or P-384 key",
            )
        return key
    if isinstance(key, Ed25519PublicKey):
        return key
    raise KeyFileError(
        f"{source}: a {type(key).__name__} is not accepted",
        hint="expected an ECDSA P-256/P-384 or Ed25519 public key",
    )


def load_public_key(path: Path) -> PublicKey:
    """The PEM public key in the file at ``path``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path}: no such public key file") from exc
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the public key: {exc.strerror}") from exc
    return public_key_from_pem(data, source=str(path))


def load_public_keys(paths: list[Path]) -> dict[str, PublicKey]:
    """Trusted keys by key id, from PEM files."""
    return {key_id(key): key for key in (load_public_key(path) for path in paths)}


def load_ed25519_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in the PEM file at ``path`` (an audit log's verifier key)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyFileError(
            f"{path}: no such public key", hint="pass the exported key with --public-key"
        ) from exc
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the public key: {exc.strerror}") from exc
    try:
        key = load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(f"{path}: not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: expected an Ed25519 public key, got {type(key).__name__}")
    return key
