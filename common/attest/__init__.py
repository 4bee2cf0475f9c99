"""Signed statements shared by datasets and models: DSSE envelopes holding in-toto statements.

The control plane signs; anyone holding its public key verifies. This package is pure (no
key storage, no network): :mod:`~ztlab.common.attest.dsse` is the envelope and its
pre-authentication encoding, :mod:`~ztlab.common.keys` loads and names public keys,
:mod:`~ztlab.common.attest.statement` is the in-toto statement and
:mod:`~ztlab.common.attest.dataset` the signed dataset manifest built on both.
"""

from __future__ import annotations

from ztlab.common.attest.dataset import (
    DATASET_PREDICATE,
    SignedManifest,
    parse_dataset_ref,
    sign_manifest,
    verify_signed_manifest,
)
from ztlab.common.attest.dsse import (
    IN_TOTO_PAYLOAD_TYPE,
    Envelope,
    SignatureError,
    pae,
    sign_envelope,
    verify_envelope,
)
from ztlab.common.attest.statement import STATEMENT_TYPE, Statement, Subject
from ztlab.common.keys import (
    PrivateKey,
    PublicKey,
    key_id,
    load_public_key,
    load_public_keys,
    public_key_from_pem,
    public_key_pem,
)

__all__ = [
    "DATASET_PREDICATE",
    "IN_TOTO_PAYLOAD_TYPE",
    "STATEMENT_TYPE",
    "Envelope",
    "PrivateKey",
    "PublicKey",
    "SignatureError",
    "SignedManifest",
    "Statement",
    "Subject",
    "key_id",
    "load_public_key",
    "load_public_keys",
    "pae",
    "parse_dataset_ref",
    "public_key_from_pem",
    "public_key_pem",
    "sign_envelope",
    "sign_manifest",
    "verify_envelope",
    "verify_signed_manifest",
]
