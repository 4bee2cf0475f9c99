"""Signed dataset manifests: a ``ztlab-manifest/1`` manifest inside a signed in-toto statement.

The statement (predicate type :data:`DATASET_PREDICATE`)::

    {"_type": "https://in-toto.io/Statement/v1",
     "subject": [{"name": "mnist@3", "digest": {"blake3": "<manifest root>"}}],
     "predicateType": "https://zerotrust-lab.dev/attestations/dataset-manifest/v1",
     "predicate": {
       "dataset": {"name": "mnist", "version": "3"},
       "manifest": { ... the whole ztlab-manifest/1 object ... },
       "registeredBy": "carol",
       "registeredAt": "2026-11-26T17:40:00Z",
       "source": "/srv/datasets/mnist/3"}}

is the payload of a DSSE envelope (``application/vnd.in-toto+json``) signed by the control
plane. Models are signed the same way (DSSE, in-toto), so one key and one verifier serve both.
:func:`verify_signed_manifest` accepts an envelope only if a trusted key signed it, the
subject names exactly the dataset version asked for and its digest is the manifest's root,
and the manifest itself is well formed (its root recomputed from its entries).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from ztlab.common.attest.dsse import (
    IN_TOTO_PAYLOAD_TYPE,
    Envelope,
    SignatureError,
    sign_envelope,
    verify_envelope,
)
from ztlab.common.attest.statement import Statement, Subject
from ztlab.common.errors import UsageError
from ztlab.common.keys import PrivateKey, PublicKey
from ztlab.common.manifest import Manifest, ManifestError, parse_manifest

DATASET_PREDICATE = "https://zerotrust-lab.dev/attestations/dataset-manifest/v1"

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def parse_dataset_ref(ref: str) -> tuple[str, str]:
    """``"NAME@VERSION"`` -> ``(name, version)``; :class:`UsageError` when malformed."""
    name, at, version = ref.partition("@")
    if not at or not _NAME.fullmatch(name) or not _VERSION.fullmatch(version):
        raise UsageError(
            f"bad dataset reference {ref!r}",
            hint="expected NAME@VERSION: NAME lowercase letters, digits, '_', '.', '-' "
            "(up to 64); VERSION letters, digits, '_', '.', '-' (e.g. mnist@3)",
        )
    return name, version


@dataclass(frozen=True)
class SignedManifest:
    """A verified, signed dataset manifest and what the statement says about it."""

    name: str
    version: str
    manifest: Manifest
    keyid: str
    registered_by: str
    registered_at: str
    source: str

    @property
    def ref(self) -> str:
        """``NAME@VERSION``."""
        return f"{self.name}@{self.version}"


def sign_manifest(
    manifest: Manifest,
    ref: str,
    key: PrivateKey,
    *,
    registered_by: str,
    source: str,
    registered_at: str | None = None,
) -> Envelope:
    """The envelope signing ``manifest`` as dataset version ``ref`` with ``key``."""
    import json

    name, version = parse_dataset_ref(ref)
    when = registered_at or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    statement = Statement(
        subjects=(Subject(f"{name}@{version}", {manifest.algorithm: manifest.root}),),
        predicate_type=DATASET_PREDICATE,
        predicate={
            "dataset": {"name": name, "version": version},
            "manifest": json.loads(manifest.to_json()),
            "registeredBy": registered_by,
            "registeredAt": when,
            "source": source,
        },
    )
    return sign_envelope(statement.to_bytes(), key, payload_type=IN_TOTO_PAYLOAD_TYPE)


def verify_signed_manifest(
    envelope: Envelope, trusted: dict[str, PublicKey], *, expected_ref: str | None = None
) -> SignedManifest:
    """Verify the signature, then the statement; :class:`SignatureError` on any problem."""
    import json

    keyid = verify_envelope(envelope, trusted, payload_type=IN_TOTO_PAYLOAD_TYPE)
    statement = Statement.from_bytes(envelope.payload)
    if statement.predicate_type != DATASET_PREDICATE:
        raise SignatureError(
            f"the statement is a {statement.predicate_type!r}, not a dataset manifest"
        )
    predicate = statement.predicate
    dataset = predicate.get("dataset")
    if (
        not isinstance(dataset, dict)
        or not isinstance(dataset.get("name"), str)
        or not isinstance(dataset.get("version"), str)
    ):
        raise SignatureError("the statement does not name its dataset (name and version)")
    ref = f"{dataset.get('name')}@{dataset.get('version')}"
    try:
        name, version = parse_dataset_ref(ref)
        manifest = parse_manifest(json.dumps(predicate.get("manifest")), source="signed manifest")
    except (UsageError, ManifestError) as exc:
        raise SignatureError(f"the signed manifest is malformed: {exc.message}") from exc
    if len(statement.subjects) != 1 or statement.subjects[0].name != ref:
        raise SignatureError(f"the statement's subject is not the dataset {ref}")
    if statement.subjects[0].digest != {manifest.algorithm: manifest.root}:
        raise SignatureError(f"the statement's subject digest is not the manifest root of {ref}")
    if expected_ref is not None and ref != expected_ref:
        raise SignatureError(
            f"the signed manifest is for {ref}, not {expected_ref}",
            hint="a manifest signed for one dataset version cannot stand in for another",
        )
    fields = {k: predicate.get(k) for k in ("registeredBy", "registeredAt", "source")}
    if not all(isinstance(v, str) for v in fields.values()):
        raise SignatureError("the signed manifest lacks registeredBy, registeredAt or source")
    return SignedManifest(
        name=name,
        version=version,
        manifest=manifest,
        keyid=keyid,
        registered_by=str(fields["registeredBy"]),
        registered_at=str(fields["registeredAt"]),
        source=str(fields["source"]),
    )
