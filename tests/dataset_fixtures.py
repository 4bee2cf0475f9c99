"""Generated datasets for the manifest, registry and kernel-reader tests."""

from __future__ import annotations

import random
from pathlib import Path

SMALL_FILES = 300
LARGE_SIZE = 5 * 1024 * 1024  # above LARGE_FILE: hashed with update_mmap and every core


def make_dataset(root: Path, *, seed: int = 7, small: int = SMALL_FILES, large: int = 3) -> None:
    """``small`` small files in nested directories, plus ``large`` files of a few MB."""
    rng = random.Random(seed)
    for index in range(small):
        path = root / f"shard-{index % 7}" / f"sub-{index % 3}" / f"item-{index:04d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randrange(0, 4096)))
    (root / "empty.txt").write_bytes(b"")
    (root / "name with spaces é.txt").write_bytes(b"unicode name")
    for index in range(large):
        (root / f"large-{index}.bin").write_bytes(rng.randbytes(LARGE_SIZE + index * 1000))


def add_tables(root: Path, *, rows: int = 5000, seed: int = 3) -> None:
    """A Parquet and a CSV table with numeric features, a string column and a label."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "x1": rng.normal(size=rows),
            "x2": rng.normal(size=rows),
            "kind": [f"k{i % 5}" for i in range(rows)],
            "label": rng.integers(0, 2, size=rows),
        }
    )
    (root / "tables").mkdir(parents=True, exist_ok=True)
    frame.to_parquet(root / "tables" / "train.parquet")
    frame.head(500).to_csv(root / "tables" / "labels.csv", index=False)
