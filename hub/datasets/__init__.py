"""The dataset registry: immutable, signed dataset versions, read through policy."""

from __future__ import annotations

from ztlab.hub.datasets.registry import (
    DatasetExists,
    DatasetNotFound,
    DatasetRegistry,
    RegisteredDataset,
    RegistryDenied,
    RegistryError,
)

__all__ = [
    "DatasetExists",
    "DatasetNotFound",
    "DatasetRegistry",
    "RegisteredDataset",
    "RegistryDenied",
    "RegistryError",
]
