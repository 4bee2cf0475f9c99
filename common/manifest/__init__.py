"""Dataset manifests: fingerprint a directory of files, then verify it later.

The manifest format (``ztlab-manifest/1``) and its root digest are defined in
:mod:`ztlab.common.manifest.format`; walking and hashing in
:mod:`ztlab.common.manifest.fingerprint`; comparison in :mod:`ztlab.common.manifest.verify`.
"""

from __future__ import annotations

from ztlab.common.manifest.fingerprint import (
    LARGE_FILE,
    ProgressCallback,
    Refusal,
    UnsafeTreeError,
    fingerprint,
)
from ztlab.common.manifest.format import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    FORMAT,
    Algorithm,
    Entry,
    Manifest,
    ManifestError,
    load_manifest,
    parse_manifest,
    root_digest,
)
from ztlab.common.manifest.verify import Modified, Unsafe, VerifyResult, verify

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "FORMAT",
    "LARGE_FILE",
    "Algorithm",
    "Entry",
    "Manifest",
    "ManifestError",
    "Modified",
    "ProgressCallback",
    "Refusal",
    "Unsafe",
    "UnsafeTreeError",
    "VerifyResult",
    "fingerprint",
    "load_manifest",
    "parse_manifest",
    "root_digest",
    "verify",
]
