"""The audit log's Ed25519 signing key: created, stored and loaded by the control plane only.

The private key is a PKCS#8 PEM file of mode 0600 owned by the control plane's user; a key
file that group or others can read is refused, not used. The public key is exported as PEM.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from ztlab.common.errors import KeyFileError, ZtlabError


def write_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (failing if it exists), write and fsync it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


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


def check_private_file(
    path: Path, info: os.stat_result, *, what: str, error: type[ZtlabError] = KeyFileError
) -> None:
    """Refuse a file that is not regular, that group/others may access, or that another
    user owns; ``what`` names it in the message, ``error`` is the exception to raise."""
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path}: the {what} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise error(
            f"{path}: {what} is readable or writable by group/others (mode {mode:04o}); "
            "expected 0600",
            hint=f"chmod 600 {path}",
        )
    if info.st_uid != os.geteuid():
        raise error(
            f"{path}: {what} is owned by uid {info.st_uid}, not by this control-plane "
            f"user (uid {os.geteuid()})"
        )


def read_private_key_file(path: Path, *, what: str) -> bytes:
    """The bytes of a key file only the control plane may read; refuse anything else.

    ``what`` names the key in messages ("signing key"). The file must exist, be a regular
    file, have no group/other permission bits and belong to this process's user.
    """
    try:
        info = path.stat()
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path}: no such {what}") from exc
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the {what}: {exc.strerror}") from exc
    check_private_file(path, info, what=what)
    return data


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the Ed25519 private key at ``path``, refusing unsafe permissions."""
    data = read_private_key_file(path, what="signing key")
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
