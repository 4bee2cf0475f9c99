"""Dead Simple Signing Envelopes (DSSE v1), the envelope in-toto and Sigstore bundles use.

An envelope is JSON::

    {"payload": "<base64>", "payloadType": "application/vnd.in-toto+json",
     "signatures": [{"keyid": "<hex sha256 of the SPKI>", "sig": "<base64>"}]}

Each signature is over the pre-authentication encoding (:func:`pae`), never over the raw
payload, so a signature cannot be lifted onto another payload type. ECDSA signatures are
DER-encoded over SHA-256 (P-256) or SHA-384 (P-384), as model-signing and sigstore do;
Ed25519 signs the encoding directly.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ztlab.common.errors import VerificationError
from ztlab.common.keys import PrivateKey, PublicKey, key_id

IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"


class SignatureError(VerificationError):
    """An envelope is malformed, or no signature on it verifies with a trusted key."""


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSEv1 pre-authentication encoding: ``DSSEv1 LEN(type) type LEN(body) body``."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


@dataclass(frozen=True)
class Signature:
    """One signature: the signing key's id and the raw signature bytes."""

    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    """A parsed envelope; :meth:`to_json` writes it back unchanged in meaning."""

    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]

    def to_dict(self) -> dict[str, Any]:
        """The envelope as a JSON-able dict."""
        return {
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "payloadType": self.payload_type,
            "signatures": [
                {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")}
                for s in self.signatures
            ],
        }

    def to_json(self) -> str:
        """Compact JSON text ending in a newline."""
        return json.dumps(self.to_dict(), separators=(",", ":")) + "\n"

    @classmethod
    def from_dict(cls, data: object, *, source: str = "envelope") -> Envelope:
        """Check and parse an envelope dict; :class:`SignatureError` on any problem."""
        if not isinstance(data, dict):
            raise SignatureError(f"{source} is not a JSON object")
        missing = {"payload", "payloadType", "signatures"} - set(data)
        if missing:
            raise SignatureError(f"{source} lacks {', '.join(sorted(missing))}")
        if not isinstance(data["payloadType"], str):
            raise SignatureError(f"{source}: payloadType must be a string")
        payload = _b64(data["payload"], f"{source}: payload")
        raw_sigs = data["signatures"]
        if not isinstance(raw_sigs, list) or not raw_sigs:
            raise SignatureError(f"{source} has no signatures")
        signatures = []
        for index, raw in enumerate(raw_sigs):
            if not isinstance(raw, dict) or not isinstance(raw.get("keyid", ""), str):
                raise SignatureError(f"{source}: signature {index} is malformed")
            signatures.append(
                Signature(str(raw.get("keyid", "")), _b64(raw.get("sig"), f"{source}: sig {index}"))
            )
        return cls(str(data["payloadType"]), payload, tuple(signatures))

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "envelope") -> Envelope:
        """Parse envelope JSON text."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SignatureError(f"{source} is not valid JSON: {exc}") from exc
        return cls.from_dict(data, source=source)


def _b64(value: object, what: str) -> bytes:
    """Strict, canonical base64 (a changed unused bit is a different string, refused)."""
    if not isinstance(value, str):
        raise SignatureError(f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{what} is not valid base64") from exc
    if base64.b64encode(raw).decode("ascii") != value:
        raise SignatureError(f"{what} is not canonical base64")
    return raw


def _sign(key: PrivateKey, message: bytes) -> bytes:
    if isinstance(key, Ed25519PrivateKey):
        return key.sign(message)
    digest = hashes.SHA384() if key.curve.key_size > 256 else hashes.SHA256()
    return key.sign(message, ec.ECDSA(digest))


def _verify(key: PublicKey, sig: bytes, message: bytes) -> bool:
    try:
        if isinstance(key, Ed25519PublicKey):
            key.verify(sig, message)
        else:
            digest = hashes.SHA384() if key.curve.key_size > 256 else hashes.SHA256()
            key.verify(sig, message, ec.ECDSA(digest))
    except InvalidSignature:
        return False
    return True


def sign_envelope(payload: bytes, key: PrivateKey, *, payload_type: str) -> Envelope:
    """Sign ``payload`` with ``key`` into a one-signature envelope."""
    sig = _sign(key, pae(payload_type, payload))
    return Envelope(payload_type, payload, (Signature(key_id(key.public_key()), sig),))


def verify_envelope(envelope: Envelope, trusted: dict[str, PublicKey], *, payload_type: str) -> str:
    """The key id of a trusted key whose signature on ``envelope`` verifies.

    :class:`SignatureError` when the payload type is not ``payload_type`` or no signature
    verifies with a key in ``trusted`` (keyed by :func:`~ztlab.common.keys.key_id`).
    A signature whose ``keyid`` names no trusted key is tried against every trusted key,
    so an empty or wrong hint does not matter, only the signature does.
    """
    if envelope.payload_type != payload_type:
        raise SignatureError(
            f"the envelope holds {envelope.payload_type!r}, expected {payload_type!r}"
        )
    if not trusted:
        raise SignatureError("no trusted public key to verify the envelope with")
    message = pae(envelope.payload_type, envelope.payload)
    for signature in envelope.signatures:
        candidates = (
            [(signature.keyid, trusted[signature.keyid])]
            if signature.keyid in trusted
            else list(trusted.items())
        )
        for kid, key in candidates:
            if _verify(key, signature.sig, message):
                return kid
    hints = ", ".join(s.keyid[:16] or "(none)" for s in envelope.signatures)
    raise SignatureError(
        "no signature on the envelope verifies with a trusted key",
        hint=f"signed by key id(s) {hints}; trusted: " + ", ".join(k[:16] for k in sorted(trusted)),
    )
