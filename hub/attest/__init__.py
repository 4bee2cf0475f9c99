"""The control plane's statement-signing key (datasets now, models later)."""

from __future__ import annotations

from ztlab.hub.attest.keys import load_or_create_attestation_key

__all__ = ["load_or_create_attestation_key"]
