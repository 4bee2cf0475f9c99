"""The control plane's private keys: created, stored and loaded here, nowhere else.

- the audit log's **Ed25519** checkpoint key (:func:`load_or_create_audit_key`);
- the **ECDSA P-256** key that signs dataset manifests and model statements
  (:func:`load_or_create_attestation_key`);
- any signing key an operator hands the offline ``sign`` commands (:func:`load_private_key`).

Every private key is an unencrypted PKCS#8 PEM file of mode 0600 owned by the user reading
it; a key file that group or others can read, or that another user owns, is refused, not
used. A new key's public half is written next to it (``KEY.pub``, mode 0644). Public keys and
key ids are :mod:`ztlab.common.keys`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from ztlab.common.errors import KeyFileError, ZtlabError
from ztlab.common.keys import PrivateKey, public_key_pem
from ztlab.hub.private import read_private_file, write_private_file

#: what :func:`load_private_key` may accept
KeyKind = Literal["ed25519", "p256", "p384"]

_CURVES = {"secp256r1": "p256", "secp384r1": "p384"}
_NAMES = {"ed25519": "Ed25519", "p256": "ECDSA P-256", "p384": "ECDSA P-384"}


def write_public_file(path: Path, data: bytes) -> None:
    """Write ``path`` (mode 0644) atomically: a temporary file renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)


def load_private_key(
    path: Path,
    *,
    accept: tuple[KeyKind, ...],
    what: str = "signing key",
    error: type[ZtlabError] = KeyFileError,
) -> PrivateKey:
    """The key at ``path`` if it is one of ``accept``; ``error`` for anything else.

    The file must be mode 0600 (or stricter) and owned by this user.
    """
    data = read_private_file(path, what=what)
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise error(f"{path}: not an unencrypted PEM private key: {exc}") from exc
    kind: str | None = None
    if isinstance(key, Ed25519PrivateKey):
        kind = "ed25519"
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        kind = _CURVES.get(key.curve.name)
    if kind is None or kind not in accept:
        expected = " or ".join(_NAMES[k] for k in accept)
        raise error(f"{path}: expected an {expected} key, got {type(key).__name__}")
    assert isinstance(key, Ed25519PrivateKey | ec.EllipticCurvePrivateKey)
    return key


def _generate(path: Path, key: PrivateKey) -> None:
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    try:
        write_private_file(path, pem)
    except FileExistsError as exc:
        raise KeyFileError(f"{path}: a key already exists; refusing to overwrite it") from exc
    write_public_file(
        path.with_name(path.name + ".pub"), public_key_pem(key.public_key()).encode("ascii")
    )


# -- the audit log's checkpoint key -------------------------------------------------------


def generate_audit_key(path: Path) -> Ed25519PrivateKey:
    """Create a new Ed25519 key at ``path`` (mode 0600) and its public key at ``path.pub``."""
    key = Ed25519PrivateKey.generate()
    _generate(path, key)
    return key


def load_audit_key(path: Path) -> Ed25519PrivateKey:
    """The audit log's Ed25519 key at ``path``, refusing unsafe permissions."""
    key = load_private_key(path, accept=("ed25519",))
    assert isinstance(key, Ed25519PrivateKey)
    return key


def load_or_create_audit_key(path: Path) -> Ed25519PrivateKey:
    """The key at ``path``, created first if there is none."""
    if not path.exists():
        return generate_audit_key(path)
    return load_audit_key(path)


# -- the statement signing key --------------------------------------------------------------


def generate_attestation_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Create a P-256 key at ``path`` (0600) and its public key at ``path.pub``."""
    key = ec.generate_private_key(ec.SECP256R1())
    _generate(path, key)
    return key


def load_attestation_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The P-256 key at ``path``, refusing unsafe permissions or another key type."""
    key = load_private_key(path, accept=("p256",), what="statement signing key")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def load_or_create_attestation_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The key at ``path``, created first if there is none."""
    if not path.exists():
        return generate_attestation_key(path)
    return load_attestation_key(path)
