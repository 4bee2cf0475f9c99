"""Signed statements: DSSE envelopes, key ids, in-toto statements and signed dataset manifests.

Every refusal is checked against a positive control built the same way, so a test fails if
the attack is accepted, and also if the honest envelope stops verifying.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from ztlab.common.attest import (
    DATASET_PREDICATE,
    IN_TOTO_PAYLOAD_TYPE,
    STATEMENT_TYPE,
    Envelope,
    PrivateKey,
    PublicKey,
    SignatureError,
    SignedManifest,
    Statement,
    Subject,
    key_id,
    load_public_keys,
    pae,
    parse_dataset_ref,
    public_key_from_pem,
    public_key_pem,
    sign_envelope,
    sign_manifest,
    verify_envelope,
    verify_signed_manifest,
)
from ztlab.common.attest.dsse import Signature
from ztlab.common.errors import KeyFileError, UsageError, VerificationError
from ztlab.common.manifest import Entry, Manifest

KEYS: dict[str, PrivateKey] = {
    "p256": ec.generate_private_key(ec.SECP256R1()),
    "p384": ec.generate_private_key(ec.SECP384R1()),
    "ed25519": Ed25519PrivateKey.generate(),
}
"""Module-level keys (hypothesis refuses function-scoped fixtures in ``@given`` tests)."""

ATTACKER: PrivateKey = ec.generate_private_key(ec.SECP256R1())

B64_ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"

REF = "mnist@3"
WHEN = "2026-11-26T17:40:00Z"
SOURCE = "/srv/datasets/mnist/3"


def _manifest() -> Manifest:
    return Manifest.build(
        "blake3",
        [
            Entry("train/images.bin", 47040016, "ab" * 32),
            Entry("train/labels.bin", 60008, "cd" * 32),
            Entry("README", 12, "0f" * 32),
        ],
    )


def _trusted(key: PrivateKey) -> dict[str, PublicKey]:
    public = key.public_key()
    return {key_id(public): public}


def _signed(key: PrivateKey, ref: str = REF, manifest: Manifest | None = None) -> Envelope:
    return sign_manifest(
        manifest or _manifest(),
        ref,
        key,
        registered_by="carol",
        source=SOURCE,
        registered_at=WHEN,
    )


def _statement(key: PrivateKey) -> dict[str, Any]:
    """The JSON statement an honest ``sign_manifest`` produces, as a mutable dict."""
    data = json.loads(_signed(key).payload)
    assert isinstance(data, dict)
    return data


def _sign_statement(data: object, key: PrivateKey) -> Envelope:
    """A validly signed envelope around arbitrary statement JSON (the signer is trusted)."""
    payload = json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return sign_envelope(payload, key, payload_type=IN_TOTO_PAYLOAD_TYPE)


def _reparse(envelope: Envelope) -> Envelope:
    return Envelope.from_json(envelope.to_json())


def _noncanonical(value: str) -> str:
    """The same bytes, base64-encoded with an unused low bit of the last character set."""
    stripped = value.rstrip("=")
    padding = len(value) - len(stripped)
    assert padding, "only a padded encoding has unused bits"
    changed = B64_ALPHABET[B64_ALPHABET.index(stripped[-1]) ^ 1]
    result = stripped[:-1] + changed + "=" * padding
    assert result != value
    assert base64.b64decode(result) == base64.b64decode(value)
    return result


# -- pre-authentication encoding ---------------------------------------------------------


def test_pae_matches_the_dsse_v1_spec_example() -> None:
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_utf8_bytes_and_handles_empty_fields() -> None:
    assert pae("", b"") == b"DSSEv1 0  0 "
    assert pae("t\u00e9", b"\x00\xff") == b"DSSEv1 3 t\xc3\xa9 2 \x00\xff"
    # the length prefix keeps type and body apart: moving a space changes the encoding
    assert pae("a b", b"c") != pae("a", b"b c")


# -- keys --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_key_id_is_sha256_of_der_spki(kind: str) -> None:
    public = KEYS[kind].public_key()
    der = public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert key_id(public) == hashlib.sha256(der).hexdigest()
    assert len(key_id(public)) == 64
    # the same key read back from PEM has the same id
    assert key_id(public_key_from_pem(public_key_pem(public))) == key_id(public)


def test_key_ids_differ_between_keys() -> None:
    ids = {key_id(key.public_key()) for key in [*KEYS.values(), ATTACKER]}
    assert len(ids) == len(KEYS) + 1


def test_load_public_keys_maps_key_ids(tmp_path: Path) -> None:
    paths = []
    for kind, key in KEYS.items():
        path = tmp_path / f"{kind}.pub"
        path.write_text(public_key_pem(key.public_key()))
        paths.append(path)
    trusted = load_public_keys(paths)
    assert set(trusted) == {key_id(key.public_key()) for key in KEYS.values()}
    envelope = _signed(KEYS["p384"])
    assert verify_envelope(envelope, trusted, payload_type=IN_TOTO_PAYLOAD_TYPE) == key_id(
        KEYS["p384"].public_key()
    )


def test_public_key_from_pem_refuses_other_key_types() -> None:
    p521 = ec.generate_private_key(ec.SECP521R1()).public_key()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    for key in (p521, rsa_key):
        pem = key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        with pytest.raises(KeyFileError):
            public_key_from_pem(pem)
    with pytest.raises(KeyFileError):
        public_key_from_pem(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")


# -- dataset references ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [("mnist@3", ("mnist", "3")), ("imagenet-1k@2024.01_rc-1", ("imagenet-1k", "2024.01_rc-1"))],
)
def test_parse_dataset_ref_accepts(ref: str, expected: tuple[str, str]) -> None:
    assert parse_dataset_ref(ref) == expected


@pytest.mark.parametrize(
    "ref", ["", "mnist", "MNIST@3", "a@", "@1", "../x@1", "a@b@c", "a@../1", "a@1\n", "a b@1"]
)
def test_parse_dataset_ref_rejects(ref: str) -> None:
    with pytest.raises(UsageError):
        parse_dataset_ref(ref)


# -- round trip --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_sign_verify_round_trip(kind: str) -> None:
    key = KEYS[kind]
    manifest = _manifest()
    envelope = _reparse(_signed(key, manifest=manifest))
    signed = verify_signed_manifest(envelope, _trusted(key), expected_ref=REF)
    assert signed == SignedManifest(
        name="mnist",
        version="3",
        manifest=manifest,
        keyid=key_id(key.public_key()),
        registered_by="carol",
        registered_at=WHEN,
        source=SOURCE,
    )
    assert signed.ref == REF


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_signature_is_over_pae_with_the_curve_hash(kind: str) -> None:
    """Interoperability: the signature verifies with the primitive DSSE names, directly."""
    key = KEYS[kind]
    envelope = _signed(key)
    public = key.public_key()
    (signature,) = envelope.signatures
    assert signature.keyid == key_id(public)
    message = pae(IN_TOTO_PAYLOAD_TYPE, envelope.payload)
    if isinstance(public, Ed25519PublicKey):
        public.verify(signature.sig, message)
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        digest = hashes.SHA384() if kind == "p384" else hashes.SHA256()
        public.verify(signature.sig, message, ec.ECDSA(digest))


def test_statement_bytes_are_deterministic_and_parse_back() -> None:
    statement = Statement(
        subjects=(Subject("mnist@3", {"blake3": "ab" * 32}),),
        predicate_type=DATASET_PREDICATE,
        predicate={"b": 1, "a": "\u00e9"},
    )
    raw = statement.to_bytes()
    assert raw == statement.to_bytes()
    assert b" " not in raw
    assert json.loads(raw)["_type"] == STATEMENT_TYPE
    assert Statement.from_bytes(raw) == statement


def test_envelope_json_shape() -> None:
    envelope = _signed(KEYS["p256"])
    data = json.loads(envelope.to_json())
    assert set(data) == {"payload", "payloadType", "signatures"}
    assert data["payloadType"] == IN_TOTO_PAYLOAD_TYPE
    assert base64.b64decode(data["payload"]) == envelope.payload
    assert data["signatures"][0]["keyid"] == key_id(KEYS["p256"].public_key())


def test_a_trusted_signature_among_others_is_found() -> None:
    key = KEYS["p256"]
    honest = _signed(key)
    forged = sign_envelope(honest.payload, ATTACKER, payload_type=IN_TOTO_PAYLOAD_TYPE)
    both = Envelope(honest.payload_type, honest.payload, forged.signatures + honest.signatures)
    assert verify_signed_manifest(both, _trusted(key)).keyid == key_id(key.public_key())


def test_an_empty_keyid_hint_does_not_matter() -> None:
    key = KEYS["ed25519"]
    honest = _signed(key)
    data = json.loads(honest.to_json())
    del data["signatures"][0]["keyid"]
    envelope = Envelope.from_dict(data)
    trusted = {**_trusted(ATTACKER), **_trusted(key)}
    assert verify_envelope(envelope, trusted, payload_type=IN_TOTO_PAYLOAD_TYPE) == key_id(
        key.public_key()
    )


# -- attacks on the envelope -------------------------------------------------------------


def test_flipped_payload_byte_is_refused() -> None:
    key = KEYS["p256"]
    honest = _signed(key)
    verify_signed_manifest(honest, _trusted(key))
    payload = bytearray(honest.payload)
    payload[len(payload) // 2] ^= 0x01
    tampered = Envelope(honest.payload_type, bytes(payload), honest.signatures)
    with pytest.raises(SignatureError):
        verify_signed_manifest(_reparse(tampered), _trusted(key))


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_flipped_signature_byte_is_refused(kind: str) -> None:
    key = KEYS[kind]
    honest = _signed(key)
    (signature,) = honest.signatures
    for index in (0, len(signature.sig) // 2, len(signature.sig) - 1):
        sig = bytearray(signature.sig)
        sig[index] ^= 0x80
        tampered = Envelope(
            honest.payload_type, honest.payload, (Signature(signature.keyid, bytes(sig)),)
        )
        with pytest.raises(SignatureError):
            verify_signed_manifest(_reparse(tampered), _trusted(key))


def test_non_canonical_base64_signature_is_refused() -> None:
    key = KEYS["ed25519"]  # 64-byte signatures: always padded, so there are unused bits
    data = json.loads(_signed(key).to_json())
    Envelope.from_dict(data)
    data["signatures"][0]["sig"] = _noncanonical(data["signatures"][0]["sig"])
    with pytest.raises(SignatureError, match="canonical"):
        Envelope.from_dict(data)


def test_non_canonical_base64_payload_is_refused() -> None:
    key = KEYS["p256"]
    payload = b"hello world"  # 11 bytes: one padding character, two unused bits
    data = json.loads(sign_envelope(payload, key, payload_type=IN_TOTO_PAYLOAD_TYPE).to_json())
    assert Envelope.from_dict(data).payload == payload
    data["payload"] = _noncanonical(data["payload"])
    with pytest.raises(SignatureError, match="canonical"):
        Envelope.from_json(json.dumps(data))


@pytest.mark.parametrize("bad", ["aGVsbG8=\n", "aGVs bG8=", "aGVsbG8", "aGVsbG8*", "=aGVsbG8"])
def test_invalid_base64_is_refused(bad: str) -> None:
    data = json.loads(_signed(KEYS["p256"]).to_json())
    data["payload"] = bad
    with pytest.raises(SignatureError):
        Envelope.from_dict(data)


def test_envelope_signed_by_an_untrusted_key_is_refused() -> None:
    envelope = _signed(ATTACKER)
    with pytest.raises(SignatureError, match="no signature"):
        verify_signed_manifest(envelope, _trusted(KEYS["p256"]))


def test_empty_trusted_set_is_refused() -> None:
    envelope = _signed(KEYS["p256"])
    with pytest.raises(SignatureError):
        verify_envelope(envelope, {}, payload_type=IN_TOTO_PAYLOAD_TYPE)
    with pytest.raises(SignatureError):
        verify_signed_manifest(envelope, {})


def test_wrong_payload_type_is_refused() -> None:
    key = KEYS["p256"]
    other = sign_envelope(_signed(key).payload, key, payload_type="application/json")
    with pytest.raises(SignatureError, match="expected"):
        verify_envelope(other, _trusted(key), payload_type=IN_TOTO_PAYLOAD_TYPE)
    with pytest.raises(SignatureError):
        verify_signed_manifest(other, _trusted(key))


def test_payload_type_is_bound_by_the_signature() -> None:
    """Relabelling a signed envelope's type breaks its signature (PAE covers the type)."""
    key = KEYS["p256"]
    honest = _signed(key)
    relabelled = Envelope("application/json", honest.payload, honest.signatures)
    with pytest.raises(SignatureError):
        verify_envelope(relabelled, _trusted(key), payload_type="application/json")


def test_statement_re_signed_by_an_attacker_is_refused() -> None:
    key = KEYS["p256"]
    honest = _signed(key)
    resigned = sign_envelope(honest.payload, ATTACKER, payload_type=IN_TOTO_PAYLOAD_TYPE)
    assert resigned.payload == honest.payload
    with pytest.raises(SignatureError):
        verify_signed_manifest(resigned, _trusted(key))


def test_spoofed_keyid_hint_with_another_keys_signature_is_refused() -> None:
    key = KEYS["p256"]
    trusted_id = key_id(key.public_key())
    forged = sign_envelope(_signed(key).payload, ATTACKER, payload_type=IN_TOTO_PAYLOAD_TYPE)
    (signature,) = forged.signatures
    spoofed = Envelope(forged.payload_type, forged.payload, (Signature(trusted_id, signature.sig),))
    with pytest.raises(SignatureError):
        verify_signed_manifest(_reparse(spoofed), _trusted(key))
    # even when the attacker's key is trusted too, the hint pins the key tried
    both = {**_trusted(key), **_trusted(ATTACKER)}
    with pytest.raises(SignatureError):
        verify_envelope(spoofed, both, payload_type=IN_TOTO_PAYLOAD_TYPE)


# -- attacks on the statement (validly signed by the trusted key) ------------------------


def _set(path: tuple[str | int, ...], value: object) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        target: Any = data
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value

    return mutate


def _delete(path: tuple[str | int, ...]) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        target: Any = data
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]

    return mutate


def _extra_subject(data: dict[str, Any]) -> None:
    data["subject"].append({"name": "cifar@1", "digest": {"blake3": "00" * 32}})


def _entry_changed(data: dict[str, Any]) -> None:
    data["predicate"]["manifest"]["entries"][0]["size"] += 1


def _manifest_root_swapped(data: dict[str, Any]) -> None:
    """Root and subject both point at another manifest, entries unchanged."""
    other = Manifest.build("blake3", [Entry("x", 1, "11" * 32)]).root
    data["predicate"]["manifest"]["root"] = other
    data["subject"][0]["digest"] = {"blake3": other}


def _statement_for_other_version(data: dict[str, Any]) -> None:
    data["predicate"]["dataset"]["version"] = "4"


STATEMENT_ATTACKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "subject-name-differs": _set(("subject", 0, "name"), "cifar@3"),
    "subject-name-other-version": _set(("subject", 0, "name"), "mnist@4"),
    "dataset-name-differs": _set(("predicate", "dataset", "name"), "cifar"),
    "dataset-version-differs": _statement_for_other_version,
    "subject-digest-not-root": _set(("subject", 0, "digest"), {"blake3": "00" * 32}),
    "subject-digest-other-algorithm": _set(("subject", 0, "digest"), {"sha256": "00" * 32}),
    "subject-digest-extra-algorithm": lambda d: d["subject"][0]["digest"].update(
        {"sha256": "00" * 32}
    ),
    "two-subjects": _extra_subject,
    "manifest-entry-changed": _entry_changed,
    "manifest-root-not-of-entries": _manifest_root_swapped,
    "manifest-extra-key": _set(("predicate", "manifest", "signedBy"), "root"),
    "manifest-missing": _delete(("predicate", "manifest")),
    "other-predicate-type": _set(("predicateType",), "https://slsa.dev/provenance/v1"),
    "other-statement-type": _set(("_type",), "https://in-toto.io/Statement/v0.1"),
    "no-type": _delete(("_type",)),
    "no-subject": _set(("subject",), []),
    "subject-not-list": _set(("subject",), {"name": REF}),
    "subject-name-not-string": _set(("subject", 0, "name"), 3),
    "subject-digest-value-not-string": _set(("subject", 0, "digest"), {"blake3": 1}),
    "no-predicate": _delete(("predicate",)),
    "predicate-not-object": _set(("predicate",), []),
    "no-dataset": _delete(("predicate", "dataset")),
    "dataset-not-object": _set(("predicate", "dataset"), REF),
    "dataset-name-invalid": _set(("predicate", "dataset", "name"), "../mnist"),
    "no-registered-by": _delete(("predicate", "registeredBy")),
    "registered-at-not-string": _set(("predicate", "registeredAt"), 1764178800),
    "source-not-string": _set(("predicate", "source"), None),
}


def test_unmodified_statement_resigned_verifies() -> None:
    """The control for the statement attacks: re-serialising alone breaks nothing."""
    key = KEYS["p256"]
    signed = verify_signed_manifest(_sign_statement(_statement(key), key), _trusted(key))
    assert signed.ref == REF
    assert signed.manifest == _manifest()


@pytest.mark.parametrize("attack", sorted(STATEMENT_ATTACKS))
def test_statement_attack_is_refused(attack: str) -> None:
    key = KEYS["p256"]
    data = copy.deepcopy(_statement(key))
    STATEMENT_ATTACKS[attack](data)
    assert data != _statement(key)
    with pytest.raises(SignatureError):
        verify_signed_manifest(_sign_statement(data, key), _trusted(key))


@pytest.mark.parametrize(
    "payload", [b"", b"not json", b"\xff\xfe", b"[]", b"null", b'"statement"', b"{}"]
)
def test_malformed_signed_payload_is_refused(payload: bytes) -> None:
    key = KEYS["p256"]
    envelope = sign_envelope(payload, key, payload_type=IN_TOTO_PAYLOAD_TYPE)
    with pytest.raises(SignatureError):
        verify_signed_manifest(envelope, _trusted(key))


def test_manifest_for_one_version_cannot_stand_in_for_another() -> None:
    key = KEYS["p256"]
    envelope = _signed(key, "mnist@3")
    assert verify_signed_manifest(envelope, _trusted(key), expected_ref="mnist@3").ref == REF
    for other in ("mnist@4", "cifar@3", "mnist@3.0"):
        with pytest.raises(SignatureError, match="not " + other.replace(".", r"\.")):
            verify_signed_manifest(envelope, _trusted(key), expected_ref=other)


# -- malformed envelopes -----------------------------------------------------------------


def _envelope_dict() -> dict[str, Any]:
    data = json.loads(_signed(KEYS["p256"]).to_json())
    assert isinstance(data, dict)
    return data


ENVELOPE_DAMAGE: dict[str, Callable[[dict[str, Any]], None]] = {
    "no-payload": _delete(("payload",)),
    "no-payload-type": _delete(("payloadType",)),
    "no-signatures": _delete(("signatures",)),
    "empty-signatures": _set(("signatures",), []),
    "signatures-not-list": _set(("signatures",), {"keyid": "", "sig": ""}),
    "signature-not-object": _set(("signatures", 0), "sig"),
    "sig-missing": _delete(("signatures", 0, "sig")),
    "sig-not-string": _set(("signatures", 0, "sig"), 12),
    "keyid-not-string": _set(("signatures", 0, "keyid"), 12),
    "payload-not-string": _set(("payload",), ["eyJ9"]),
    "payload-type-not-string": _set(("payloadType",), None),
}


@pytest.mark.parametrize("damage", sorted(ENVELOPE_DAMAGE))
def test_malformed_envelope_is_refused(damage: str) -> None:
    data = _envelope_dict()
    Envelope.from_dict(copy.deepcopy(data))
    ENVELOPE_DAMAGE[damage](data)
    with pytest.raises(SignatureError):
        Envelope.from_json(json.dumps(data))


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '"envelope"', b"\xff\xfe{"])
def test_envelope_that_is_not_a_json_object_is_refused(text: str | bytes) -> None:
    with pytest.raises(SignatureError):
        Envelope.from_json(text)


def test_signature_error_is_a_verification_error() -> None:
    assert issubclass(SignatureError, VerificationError)


# -- property: any single bit flip is refused --------------------------------------------


def _flip(value: str, bit: int) -> str:
    raw = bytearray(base64.b64decode(value, validate=True))
    raw[(bit // 8) % len(raw)] ^= 1 << (bit % 8)
    return base64.b64encode(bytes(raw)).decode("ascii")


@pytest.mark.parametrize("kind", sorted(KEYS))
@settings(max_examples=100, deadline=None)
@given(field=st.sampled_from(["payload", "sig"]), bit=st.integers(min_value=0, max_value=2**20))
def test_any_single_bit_flip_is_refused(kind: str, field: str, bit: int) -> None:
    key = KEYS[kind]
    data = json.loads(_signed(key).to_json())
    if field == "payload":
        data["payload"] = _flip(data["payload"], bit)
    else:
        data["signatures"][0]["sig"] = _flip(data["signatures"][0]["sig"], bit)
    with pytest.raises(SignatureError):
        verify_signed_manifest(Envelope.from_json(json.dumps(data)), _trusted(key))
