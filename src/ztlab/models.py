"""``ztlab.models``: sign registered model versions and load approved ones, verified."""

from __future__ import annotations

from ztlab.extensions.models import ModelIntegrityError, ModelRefused, load, sign

__all__ = ["ModelIntegrityError", "ModelRefused", "load", "sign"]
