"""Reading a signing key file for the offline ``sign`` commands."""

from __future__ import annotations

from pathlib import Path

from ztlab.common.attest import PrivateKey
from ztlab.common.errors import UsageError


def load_signing_key(path: Path, *, ed25519: bool) -> PrivateKey:
    """An unencrypted PEM key of mode 0600 owned by this user: ECDSA P-256/P-384, or also
    Ed25519 when ``ed25519``; :class:`UsageError` (exit 2) for anything else."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from ztlab.hub.private import read_private_file

    data = read_private_file(path, what="signing key")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{path}: not an unencrypted PEM private key: {exc}") from exc
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in (
        "secp256r1",
        "secp384r1",
    ):
        return key
    if ed25519 and isinstance(key, Ed25519PrivateKey):
        return key
    allowed = "ECDSA P-256/P-384" + (" or Ed25519" if ed25519 else "")
    raise UsageError(f"{path}: expected an {allowed} key, got {type(key).__name__}")
