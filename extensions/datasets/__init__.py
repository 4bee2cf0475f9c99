"""Verified datasets in the kernel: ``ztlab.datasets.open("NAME@VERSION")``.

See :mod:`ztlab.extensions.datasets.verified` for what is checked and when,
:mod:`ztlab.extensions.datasets.client` for where signed manifests come from and
:mod:`ztlab.extensions.datasets.hooks` for the audit hook that flags unverified reads.
"""

from __future__ import annotations

from ztlab.extensions.datasets.errors import (
    DatasetError,
    DatasetIntegrityError,
    RegistryUnavailable,
)
from ztlab.extensions.datasets.hooks import UnverifiedReadWarning
from ztlab.extensions.datasets.verified import Dataset, open_dataset

open = open_dataset

__all__ = [
    "Dataset",
    "DatasetError",
    "DatasetIntegrityError",
    "RegistryUnavailable",
    "UnverifiedReadWarning",
    "open",
    "open_dataset",
]
