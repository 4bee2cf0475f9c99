"""The audit log's Ed25519 signing key: created, stored and loaded by the control plane only.

The private key is a PKCS#8 PEM file of mode 0600 owned by the control plane's user; a key
file that group or others can read is refused, not used. The public key is exported as PEM.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from ztlab.common.errors import KeyFileError
from ztlab.hub.private import read_private_file, write_private_file


def write_public_file(path: Path, data: bytes) -> None:
    """Write ``path`` (mode 0644) atomically: a temporary file renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    """The public key as SubjectPublicKeyInfo PEM."""
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def generate_signing_key(path: Path) -> Ed25519PrivateKey:
    """Create a new Ed25519 key at ``path`` (mode 0600) and its public key at ``path.pub``."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    try:
        write_private_file(path, pem)
    except FileExistsError as exc:
        raise KeyFileError(f"{path}: a key already exists; refusing to overwrite it") from exc
    write_public_file(path.with_name(path.name + ".pub"), public_key_pem(key.public_key()))
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the Ed25519 private key at ``path``, refusing unsafe permissions."""
    data = read_private_file(path, what="signing key")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: expected an Ed25519 key, got {type(key).__name__}")
    return key


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The key at ``path``, created first if there is none."""
    if not path.exists():
        return generate_signing_key(path)
    return load_signing_key(path)
