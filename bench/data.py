"""Dataset manifests: fingerprint throughput against ``b3sum`` and ``sha256sum``.

A generated dataset (about 1 GiB, 256 MiB with ``--quick``): one eighth in small files of
4-60 KiB, the rest in large files. The page cache is warmed first, so the figures measure
hashing, not the disk. Baselines in the same run over the same files: ``b3sum`` with every
core (``--num-threads $(nproc)``) and coreutils ``sha256sum``. Each figure is the best of
five runs, the four commands interleaved.
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

from bench._table import Row
from ztlab.common.manifest import fingerprint

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


def _best(repeats: int, actions: dict[str, Callable[[], object]]) -> dict[str, float]:
    """The best time of each action, the actions interleaved so that noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            start = time.perf_counter()
            action()
            times[name].append(time.perf_counter() - start)
    return {name: min(samples) for name, samples in times.items()}


def _tool(root: Path, command: list[str], paths: list[str]) -> Callable[[], object]:
    def run() -> object:
        return subprocess.run([*command, *paths], cwd=root, check=True, stdout=subprocess.DEVNULL)

    return run


def run(*, quick: bool = False) -> list[Row]:
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
        rate = {name: size / seconds / 1e9 for name, seconds in _best(repeats, actions).items()}
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
