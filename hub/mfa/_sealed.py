"""Private to :mod:`ztlab.hub.mfa.totp`: the store's key file, sealing and code digests.

The key file holds 32 random bytes (mode 0600, owned by the control plane's user; a file
that group or others can read is refused). Nothing uses those bytes directly: HKDF-SHA256
derives one key per purpose, so the AES-GCM key that seals TOTP secrets, the HMAC key that
digests recovery codes and the fingerprint that ties a store to its key file are unrelated.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ztlab.common.errors import KeyFileError
from ztlab.hub.private import read_private_file, write_private_file

#: length of the key file's contents, in bytes
KEY_BYTES = 32

_NONCE_BYTES = 12
_TAG_BYTES = 16
#: the key-derivation label (keeps the module's first name): changing it orphans every
#: sealed secret, so it never changes
_INFO_PREFIX = b"ztlab.hub.login.totp/v1/"


def _derive(material: bytes, purpose: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO_PREFIX + purpose)
    return hkdf.derive(material)


class SealingKey:
    """The keys derived from one key file: AES-GCM sealing, HMAC digests, a fingerprint."""

    __slots__ = ("_aead", "_digest_key", "fingerprint")

    def __init__(self, material: bytes) -> None:
        if len(material) != KEY_BYTES:
            raise ValueError(f"expected {KEY_BYTES} bytes of key material, got {len(material)}")
        self._aead = AESGCM(_derive(material, b"seal"))
        self._digest_key = _derive(material, b"recovery-code")
        #: identifies the key file without revealing anything about it
        self.fingerprint = _derive(material, b"fingerprint")

    def seal(self, plaintext: bytes, *, context: bytes) -> bytes:
        """Encrypt ``plaintext`` bound to ``context`` (AES-GCM associated data): nonce || ct."""
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, context)

    def unseal(self, blob: bytes, *, context: bytes) -> bytes | None:
        """The plaintext, or ``None`` if ``blob`` was not sealed by this key for ``context``."""
        if len(blob) < _NONCE_BYTES + _TAG_BYTES:
            return None
        try:
            return self._aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], context)
        except InvalidTag:
            return None

    def digest(self, message: bytes) -> bytes:
        """HMAC-SHA256 of ``message`` under the recovery-code key."""
        return hmac.new(self._digest_key, message, hashlib.sha256).digest()


def load_key_file(path: Path) -> bytes:
    """The key file's 32 bytes, refusing a missing, malformed or unsafe file."""
    data = read_private_file(path, what="TOTP store key")
    if len(data) != KEY_BYTES:
        raise KeyFileError(
            f"{path}: a TOTP store key holds exactly {KEY_BYTES} bytes, this file has {len(data)}"
        )
    return data


def load_or_create_key_file(path: Path) -> bytes:
    """The key file's bytes; a new random key (mode 0600, directory 0700) if there is none."""
    if not path.exists():
        material = secrets.token_bytes(KEY_BYTES)
        try:
            write_private_file(path, material)
        except FileExistsError:
            pass  # another process created it first: use theirs
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot create the TOTP store key: {exc.strerror}") from exc
        else:
            return material
    return load_key_file(path)
