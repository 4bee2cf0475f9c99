"""Signed models in the OpenSSF model-signing format (v1.x), so upstream tools verify ours.

A signature is a Sigstore bundle (``application/vnd.dev.sigstore.bundle.v0.3+json``)
holding a DSSE envelope whose payload is an in-toto statement::

    {"_type": "https://in-toto.io/Statement/v1",
     "subject": [{"name": "<model directory name>", "digest": {"sha256": "<root>"}}],
     "predicateType": "https://model_signing/signature/v1.0",
     "predicate": {
       "serialization": {"method": "files", "hash_type": "sha256" | "blake3",
                         "allow_symlinks": false, "ignore_paths": [".git", ...]},
       "resources": [{"name": "weights.bin", "algorithm": "sha256", "digest": "<hex>"}, ...],
       "ztlab": { ... optional: trainer, run, dataset roots (ignored by upstream) ... }}}

``resources`` lists every regular file of the model directory by POSIX path, in path
component order; ``root`` is SHA-256 over the concatenated raw digests in that order. The
signature is ECDSA (DER) over the DSSE pre-authentication encoding with the curve's hash;
``verificationMaterial.publicKey.hint`` is the SHA-256 of the public key's PEM text.

Upstream trusts the signer's ``ignore_paths`` when verifying, so a bundle can declare a
file "ignored" and leave it unsigned. :func:`verify_model` accepts only the git paths
model-signing ignores by default and the bundle's own file; anything else is refused.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ztlab.common.attest.dsse import (
    IN_TOTO_PAYLOAD_TYPE,
    Envelope,
    SignatureError,
    sign_envelope,
    verify_envelope,
)
from ztlab.common.attest.statement import Statement, Subject
from ztlab.common.keys import PrivateKey, PublicKey, public_key_pem
from ztlab.common.manifest.fingerprint import Refusal, UnsafeTreeError, hash_files, scan
from ztlab.common.manifest.format import Algorithm, check_algorithm

MODEL_PREDICATE = "https://model_signing/signature/v1.0"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
#: what model-signing leaves out of a model by default (and records as ignored)
GIT_PATHS: tuple[str, ...] = (".git", ".gitattributes", ".github", ".gitignore")


@dataclass(frozen=True)
class ModelSignature:
    """A verified model bundle: who signed, the file digests, our extra predicate fields."""

    keyid: str
    algorithm: str
    resources: dict[str, str]
    root: str
    extra: dict[str, Any]


@dataclass
class ModelCheck:
    """How a model directory compares with its signed file list."""

    signature: ModelSignature
    modified: list[tuple[str, str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every signed file is there, unchanged, and nothing else is."""
        return not (self.modified or self.missing or self.extra or self.refused)


def _order(path: str) -> tuple[str, ...]:
    return PurePosixPath(path).parts


def _exclusions(root: Path, bundle: Path | None) -> tuple[set[str], list[str]]:
    """Paths skipped in the walk, and the ``ignore_paths`` recorded in the statement."""
    ignore = list(GIT_PATHS)
    if bundle is not None:
        try:
            inside = bundle.resolve().relative_to(root.resolve())
        except ValueError:
            pass
        else:
            ignore.append(inside.as_posix())
    return set(ignore), ignore


def model_digests(
    root: Path, algorithm: Algorithm, *, bundle: Path | None = None, mmap: bool = True
) -> tuple[dict[str, str], list[Refusal]]:
    """``{path: hex digest}`` of the model's regular files (git paths and ``bundle`` left
    out), and what the walk refused (links, devices). ``mmap=False`` in long-lived
    processes (see :func:`~ztlab.common.manifest.fingerprint.hash_files`)."""
    exclude, _ = _exclusions(root, bundle)
    found = scan(root, exclude=exclude)
    hashed = hash_files(found.files, found.root, algorithm, mmap=mmap)
    return {path: digest for path, (_, digest) in hashed.items()}, found.refusals


def _root(digests: list[str]) -> str:
    return hashlib.sha256(b"".join(bytes.fromhex(d) for d in digests)).hexdigest()


def sign_model(
    root: Path,
    key: PrivateKey,
    *,
    algorithm: Algorithm = "sha256",
    bundle_path: Path | None = None,
    extra: Mapping[str, Any] | None = None,
    certificates: list[bytes] | None = None,
    mmap: bool = True,
) -> dict[str, Any]:
    """The bundle (a JSON-able dict) signing every regular file under ``root``.

    :class:`~ztlab.common.manifest.UnsafeTreeError` if the directory holds links or devices.
    ``extra`` goes into ``predicate.ztlab`` (upstream verifiers ignore it).
    """
    algorithm = check_algorithm(algorithm)
    digests, refusals = model_digests(root, algorithm, bundle=bundle_path, mmap=mmap)
    if refusals:
        raise UnsafeTreeError(refusals)
    names = sorted(digests, key=_order)
    _, ignore = _exclusions(root, bundle_path)
    predicate: dict[str, Any] = {
        "serialization": {
            "method": "files",
            "hash_type": algorithm,
            "allow_symlinks": False,
            "ignore_paths": ignore,
        },
        "resources": [{"name": n, "algorithm": algorithm, "digest": digests[n]} for n in names],
    }
    if extra:
        predicate["ztlab"] = dict(extra)
    statement = Statement(
        subjects=(Subject(root.resolve().name, {"sha256": _root([digests[n] for n in names])}),),
        predicate_type=MODEL_PREDICATE,
        predicate=predicate,
    )
    envelope = sign_envelope(statement.to_bytes(), key, payload_type=IN_TOTO_PAYLOAD_TYPE)
    material: dict[str, Any]
    if certificates:
        # an organisation's chain: the leaf (whose key signs) first, then intermediates
        material = {
            "x509CertificateChain": {
                "certificates": [
                    {"rawBytes": base64.b64encode(der).decode("ascii")} for der in certificates
                ]
            },
            "tlogEntries": [],
        }
    else:
        pem = public_key_pem(key.public_key()).encode("ascii")
        material = {"publicKey": {"hint": hashlib.sha256(pem).hexdigest()}, "tlogEntries": []}
    return {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": material,
        "dsseEnvelope": envelope.to_dict(),
    }


def parse_bundle(text: str | bytes, *, source: str = "bundle") -> Envelope:
    """The DSSE envelope of a model-signing bundle; :class:`SignatureError` if malformed."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SignatureError(f"{source} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("mediaType") != BUNDLE_MEDIA_TYPE:
        raise SignatureError(f"{source} is not a Sigstore bundle v0.3 ({BUNDLE_MEDIA_TYPE})")
    return Envelope.from_dict(data.get("dsseEnvelope"), source=f"{source}: dsseEnvelope")


def bundle_certificates(text: str | bytes) -> list[bytes]:
    """The DER certificates of a certificate-mode bundle (leaf first); empty for key mode."""
    data = json.loads(text)
    chain = (data.get("verificationMaterial") or {}).get("x509CertificateChain") or {}
    return [base64.b64decode(c["rawBytes"]) for c in chain.get("certificates", [])]


def chain_signer(certificates: list[bytes], roots_pem: bytes) -> dict[str, PublicKey]:
    """The leaf's key, as the trusted key, if the bundle's chain leads to one of ``roots``.

    The chain is checked with ``cryptography``'s X.509 path validation at the leaf's
    ``notBefore`` (as model-signing does, so that a signature outlives its certificate);
    the leaf must allow signing: key usage ``digitalSignature`` or extended key usage
    ``codeSigning``. Only the roots given are trusted, never a system store.
    """
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID
    from cryptography.x509.verification import (
        ExtensionPolicy,
        PolicyBuilder,
        Store,
        VerificationError,
    )

    from ztlab.common.keys import key_id

    if not certificates:
        raise SignatureError("the bundle has no certificate chain (it was signed with a key)")
    try:
        leaf = x509.load_der_x509_certificate(certificates[0])
        intermediates = [x509.load_der_x509_certificate(c) for c in certificates[1:]]
        roots = x509.load_pem_x509_certificates(roots_pem)
    except ValueError as exc:
        raise SignatureError(f"a certificate cannot be read: {exc}") from exc
    verifier = (
        PolicyBuilder()
        .store(Store(roots))
        .time(leaf.not_valid_before_utc)
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all()
        )
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        raise SignatureError(
            f"the signing certificate does not chain to a trusted root: {exc}"
        ) from exc
    usable = False
    with contextlib.suppress(x509.ExtensionNotFound):
        usable = leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    with contextlib.suppress(x509.ExtensionNotFound):
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        usable = usable or ExtendedKeyUsageOID.CODE_SIGNING in eku
    if not usable:
        raise SignatureError(
            "the signing certificate is not for signing (no digitalSignature key usage and "
            "no codeSigning extended key usage)"
        )
    key = leaf.public_key()
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SignatureError("the signing certificate's key is not an elliptic-curve key")
    return {key_id(key): key}


def verify_signature(envelope: Envelope, trusted: dict[str, PublicKey]) -> ModelSignature:
    """Check the signature and the statement (not the files)."""
    keyid = verify_envelope(envelope, trusted, payload_type=IN_TOTO_PAYLOAD_TYPE)
    statement = Statement.from_bytes(envelope.payload)
    if statement.predicate_type != MODEL_PREDICATE:
        raise SignatureError(
            f"the statement is a {statement.predicate_type!r}, not a model signature"
        )
    predicate = statement.predicate
    serialization = predicate.get("serialization")
    resources = predicate.get("resources")
    if not isinstance(serialization, dict) or not isinstance(resources, list):
        raise SignatureError("the model statement lacks serialization or resources")
    if serialization.get("method") != "files":
        raise SignatureError(
            f"serialization method {serialization.get('method')!r} is not supported",
            hint="ztlab verifies whole-file ('files') signatures; re-sign without shards",
        )
    algorithm = serialization.get("hash_type")
    if algorithm not in ("sha256", "blake3"):
        raise SignatureError(f"hash type {algorithm!r} is not supported (sha256 or blake3)")
    if serialization.get("allow_symlinks") not in (False, None):
        raise SignatureError("signatures that follow symbolic links are not accepted")
    listed: dict[str, str] = {}
    for item in resources:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("name"), str)
            or item.get("algorithm") != algorithm
            or not isinstance(item.get("digest"), str)
        ):
            raise SignatureError(f"malformed resource in the model statement: {item!r}")
        if item["name"] in listed:
            raise SignatureError(f"{item['name']!r} is listed twice in the model statement")
        listed[item["name"]] = item["digest"]
    if len(statement.subjects) != 1:
        raise SignatureError("the model statement must have exactly one subject")
    root = _root(list(listed.values()))
    if statement.subjects[0].digest.get("sha256") != root:
        raise SignatureError("the model statement's subject digest is not the root of its files")
    extra = predicate.get("ztlab")
    return ModelSignature(
        keyid=keyid,
        algorithm=str(algorithm),
        resources=listed,
        root=root,
        extra=dict(extra) if isinstance(extra, dict) else {},
    )


def _check_ignored(envelope: Envelope, allowed: Collection[str]) -> None:
    predicate = json.loads(envelope.payload)["predicate"]
    ignored = predicate["serialization"].get("ignore_paths") or []
    if not isinstance(ignored, list) or not all(isinstance(p, str) for p in ignored):
        raise SignatureError("ignore_paths in the model statement must be a list of paths")
    unexpected = sorted({str(PurePosixPath(p)) for p in ignored} - set(allowed))
    if unexpected:
        raise SignatureError(
            f"the signature declares files it does not cover: {', '.join(unexpected)}",
            hint="a signer cannot exempt model files from verification; sign them all",
        )


def verify_model(
    root: Path,
    envelope: Envelope,
    trusted: dict[str, PublicKey],
    *,
    bundle_path: Path | None = None,
    mmap: bool = True,
) -> ModelCheck:
    """Check the signature, then hash the directory and compare with the signed files."""
    signature = verify_signature(envelope, trusted)
    exclude, _ = _exclusions(root, bundle_path)
    _check_ignored(envelope, exclude)
    algorithm = check_algorithm(signature.algorithm)
    actual, refusals = model_digests(root, algorithm, bundle=bundle_path, mmap=mmap)
    check = ModelCheck(signature=signature, refused=refusals)
    for name, digest in signature.resources.items():
        if name not in actual:
            if not any(r.path == name for r in refusals):
                check.missing.append(name)
        elif actual[name] != digest:
            check.modified.append((name, digest, actual[name]))
    check.extra = sorted(set(actual) - set(signature.resources), key=_order)
    return check
