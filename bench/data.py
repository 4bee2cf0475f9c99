"""Datasets: fingerprint throughput, verified reads in the kernel, and re-verification.

Fingerprinting, against ``b3sum`` and ``sha256sum``:

A generated dataset (about 1 GiB, 256 MiB with ``--quick``): one eighth in small files of
4-60 KiB, the rest in large files. The page cache is warmed first, so the figures measure
hashing, not the disk. Baselines in the same run over the same files: ``b3sum`` with every
core (``--num-threads $(nproc)``) and coreutils ``sha256sum``. Each figure is the best of
five runs, the four commands interleaved.

Verified ``read_parquet`` (the kernel's reader) against plain ``pandas.read_parquet`` on
the same file of about 1 GiB (256 MiB with ``--quick``), page cache warm: the first read
(hash and parse in one pass; the verified-file cache emptied before each sample) and an
unchanged re-read (cache kept). Best of five, interleaved.

Re-verification of an unchanged 10,000-file dataset (``Dataset.verify()`` after a first
full verification in the same process): walk, ``stat`` each file, compare with the
verified-file cache, hash nothing.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._table import Row, best_of
from ztlab.common.manifest import Manifest, fingerprint

MIB = 1024 * 1024


def _generate(root: Path, total: int, large_size: int) -> list[str]:
    rng = random.Random(1)
    paths: list[str] = []
    small_budget = total // 8
    index = 0
    while small_budget > 0:
        size = rng.randrange(4 * 1024, 60 * 1024)
        rel = f"small/{index % 32:02d}/{index:06d}.bin"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rng.randbytes(size))
        paths.append(rel)
        small_budget -= size
        index += 1
    remaining = total - total // 8
    index = 0
    while remaining > 0:
        size = min(large_size, remaining)
        rel = f"large/{index:03d}.bin"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        with (root / rel).open("wb") as handle:
            for start in range(0, size, 8 * MIB):
                handle.write(os.urandom(min(8 * MIB, size - start)))
        paths.append(rel)
        remaining -= size
        index += 1
    return paths


def _tool(root: Path, command: list[str], paths: list[str]) -> Callable[[], object]:
    def run() -> object:
        return subprocess.run([*command, *paths], cwd=root, check=True, stdout=subprocess.DEVNULL)

    return run


def run(*, quick: bool = False) -> list[Row]:
    return run_fingerprint(quick=quick) + run_reads(quick=quick)


def run_fingerprint(*, quick: bool = False) -> list[Row]:
    total = (256 if quick else 1024) * MIB
    repeats = 5
    cores = os.cpu_count() or 1
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        root = Path(tmp) / "dataset"
        root.mkdir()
        paths = _generate(root, total, 64 * MIB)
        size = sum((root / rel).stat().st_size for rel in paths)
        small = sum(1 for rel in paths if rel.startswith("small/"))
        for rel in paths:  # warm the page cache
            (root / rel).read_bytes()
        label = f"{len(paths):,} files ({small:,} small), {size / MIB:,.0f} MiB"

        actions: dict[str, Callable[[], object]] = {
            "blake3": lambda: fingerprint(root),
            "sha256": lambda: fingerprint(root, algorithm="sha256"),
        }
        b3sum, sha256sum = shutil.which("b3sum"), shutil.which("sha256sum")
        if b3sum:
            actions["b3sum"] = _tool(root, [b3sum, "--num-threads", str(cores)], paths)
        if sha256sum:
            actions["sha256sum"] = _tool(root, [sha256sum], paths)
        rate = {name: size / seconds / 1e9 for name, seconds in best_of(repeats, actions).items()}
        rows.append(
            Row(
                "data",
                f"fingerprint BLAKE3, {label}",
                rate["blake3"],
                "GB/s",
                target=">= 0.9x b3sum",
                baseline=f"b3sum, {cores} threads: {rate['b3sum']:.2f} GB/s"
                if b3sum
                else "no b3sum",
                ratio=rate["blake3"] / rate["b3sum"] if b3sum else None,
            )
        )
        rows.append(
            Row(
                "data",
                f"fingerprint SHA-256, {label}",
                rate["sha256"],
                "GB/s",
                baseline=f"sha256sum: {rate['sha256sum']:.2f} GB/s"
                if sha256sum
                else "no sha256sum",
                ratio=rate["sha256"] / rate["sha256sum"] if sha256sum else None,
            )
        )
    return rows


def _dataset(root: Path, manifest: Manifest, ref: str) -> object:
    """A kernel-side Dataset for ``root`` (manifest signed with a throwaway key)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from ztlab.common.attest import key_id, sign_manifest, verify_signed_manifest
    from ztlab.extensions.datasets.verified import Dataset

    key = ec.generate_private_key(ec.SECP256R1())
    envelope = sign_manifest(manifest, ref, key, registered_by="bench", source=str(root))
    signed = verify_signed_manifest(envelope, {key_id(key.public_key()): key.public_key()})
    return Dataset(signed, str(root))


def _parquet(path: Path, target: int) -> None:
    """A training table of about ``target`` bytes: float features, int labels, a category."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(1)
    rows = target // (12 * 8 + 8 + 2)
    frame = pd.DataFrame({f"f{i:02d}": rng.normal(size=rows) for i in range(12)})
    frame["label"] = rng.integers(0, 10, size=rows)
    frame["split"] = pd.Categorical(rng.choice(["train", "val", "test"], size=rows))
    frame.to_parquet(path, row_group_size=1_000_000)


def run_reads(*, quick: bool = False) -> list[Row]:
    import pandas as pd

    from ztlab.extensions.datasets import verified

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        root = Path(tmp) / "table"
        root.mkdir()
        path = root / "train.parquet"
        _parquet(path, (256 if quick else 1024) * MIB)
        size = path.stat().st_size
        path.read_bytes()  # warm the page cache
        dataset: Any = _dataset(root, fingerprint(root), "table@1")

        def first() -> object:
            verified._VERIFIED.clear()
            return dataset.read_parquet("train.parquet")

        dataset.read_parquet("train.parquet")
        best = best_of(
            5,
            {
                "plain": lambda: pd.read_parquet(path),
                "first": first,
                "again": lambda: dataset.read_parquet("train.parquet"),
            },
        )
        label = f"{size / MIB:,.0f} MiB Parquet"
        plain = f"pandas.read_parquet: {best['plain']:.3f} s"
        rows.append(
            Row(
                "data",
                f"verified read_parquet, first read ({label})",
                best["first"],
                "s",
                target="<= 1.15x",
                baseline=plain,
                ratio=best["first"] / best["plain"],
            )
        )
        rows.append(
            Row(
                "data",
                f"verified read_parquet, unchanged re-read ({label})",
                best["again"],
                "s",
                target="<= 1.02x",
                baseline=plain,
                ratio=best["again"] / best["plain"],
            )
        )

    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        root = Path(tmp) / "many"
        rng = random.Random(2)
        for index in range(10_000):
            rel = root / f"{index % 100:02d}" / f"{index:05d}.bin"
            rel.parent.mkdir(parents=True, exist_ok=True)
            rel.write_bytes(rng.randbytes(rng.randrange(256, 4096)))
        dataset = _dataset(root, fingerprint(root), "many@1")
        start = time.perf_counter()
        dataset.verify()
        full = time.perf_counter() - start
        again = best_of(5, {"again": dataset.verify})["again"]
        rows.append(
            Row(
                "data",
                "re-verify unchanged 10,000-file dataset",
                again,
                "s",
                target="< 1 s",
                baseline=f"first verify (hash all): {full:.3f} s",
                ratio=again / full,
            )
        )
    return rows
