"""The ECDSA P-256 key that signs dataset manifests and model statements.

Like the audit key: a PKCS#8 PEM file of mode 0600 owned by the control plane's user,
created on first use with its public key next to it (``KEY.pub``, mode 0644). A key file
that group or others can read, or that another user owns, is refused.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from ztlab.common.attest.keys import public_key_pem
from ztlab.common.errors import KeyFileError
from ztlab.hub.audit.keys import write_public_file
from ztlab.hub.private import read_private_file, write_private_file


def generate_attestation_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Create a P-256 key at ``path`` (0600) and its public key at ``path.pub``."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    try:
        write_private_file(path, pem)
    except FileExistsError as exc:
        raise KeyFileError(f"{path}: a key already exists; refusing to overwrite it") from exc
    write_public_file(
        path.with_name(path.name + ".pub"), public_key_pem(key.public_key()).encode("ascii")
    )
    return key


def load_attestation_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The P-256 key at ``path``, refusing unsafe permissions or another key type."""
    data = read_private_file(path, what="statement signing key")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise KeyFileError(f"{path}: expected an ECDSA P-256 key, got {type(key).__name__}")
    return key


def load_or_create_attestation_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The key at ``path``, created first if there is none."""
    if not path.exists():
        return generate_attestation_key(path)
    return load_attestation_key(path)
