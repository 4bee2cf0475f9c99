"""``ztlab.datasets``: verified datasets for notebooks (the kernel side's public name).

>>> import ztlab.datasets
>>> mnist = ztlab.datasets.open("mnist@3")       # doctest: +SKIP
>>> frame = mnist.read_parquet("train.parquet")  # doctest: +SKIP
"""

from __future__ import annotations

from ztlab.extensions.datasets import (
    Dataset,
    DatasetError,
    DatasetIntegrityError,
    RegistryUnavailable,
    UnverifiedReadWarning,
    open,
    open_dataset,
)

__all__ = [
    "Dataset",
    "DatasetError",
    "DatasetIntegrityError",
    "RegistryUnavailable",
    "UnverifiedReadWarning",
    "open",
    "open_dataset",
]
