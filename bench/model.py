"""Model signing: sign and verify a model directory against the upstream ``model_signing``.

A generated model of 2 GiB (512 MiB with ``--quick``) in four files, page cache warm. Each
figure is the best of three runs of the whole command (interpreter start included on
both sides), the commands interleaved: upstream ``model_signing sign/verify key`` (SHA-256,
the only hash its CLI offers) against ``ztlab model sign/verify`` with SHA-256 (the same
bundle, verifiable by upstream) and with BLAKE3.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench._table import Row

MIB = 1024 * 1024


def _best(repeats: int, actions: dict[str, Callable[[], object]]) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            start = time.perf_counter()
            action()
            times[name].append(time.perf_counter() - start)
    return {name: min(samples) for name, samples in times.items()}


def _command(*args: str) -> Callable[[], object]:
    def run() -> object:
        return subprocess.run(args, check=True, capture_output=True)

    return run


def run(*, quick: bool = False) -> list[Row]:
    total = (512 if quick else 2048) * MIB
    bindir = Path(sys.executable).parent
    upstream, ztlab = str(bindir / "model_signing"), str(bindir / "ztlab")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        root = Path(tmp)
        model = root / "model"
        model.mkdir()
        for index in range(4):
            with (model / f"shard-{index}.safetensors").open("wb") as handle:
                for _ in range(0, total // 4, 16 * MIB):
                    handle.write(os.urandom(16 * MIB))
        (model / "config.json").write_text('{"layers": 48}')
        for path in model.iterdir():
            path.read_bytes()  # warm the page cache
        key, pub = root / "key.pem", root / "pub.pem"
        subprocess.run(
            "openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt"
            f" -out {key} && openssl ec -in {key} -pubout -out {pub}",
            shell=True,
            check=True,
            capture_output=True,
        )
        key.chmod(0o600)
        up, ours, ours3 = root / "up.sig", root / "ours.sig", root / "ours-b3.sig"
        sign = _best(
            3,
            {
                "upstream": _command(
                    upstream,
                    "sign",
                    "key",
                    str(model),
                    "--private_key",
                    str(key),
                    "--signature",
                    str(up),
                ),
                "sha256": _command(
                    ztlab, "model", "sign", str(model), "--key", str(key), "--out", str(ours)
                ),
                "blake3": _command(
                    ztlab,
                    "model",
                    "sign",
                    str(model),
                    "--key",
                    str(key),
                    "--out",
                    str(ours3),
                    "--hash",
                    "blake3",
                ),
            },
        )
        verify = _best(
            3,
            {
                "upstream": _command(
                    upstream,
                    "verify",
                    "key",
                    str(model),
                    "--signature",
                    str(up),
                    "--public_key",
                    str(pub),
                ),
                "sha256": _command(
                    ztlab,
                    "model",
                    "verify",
                    str(model),
                    "--bundle",
                    str(ours),
                    "--public-key",
                    str(pub),
                ),
                "blake3": _command(
                    ztlab,
                    "model",
                    "verify",
                    str(model),
                    "--bundle",
                    str(ours3),
                    "--public-key",
                    str(pub),
                ),
            },
        )
    label = f"{total / MIB / 1024:g} GiB model"
    for what, best in (("sign", sign), ("verify", verify)):
        base = f"model_signing {what} key (sha256): {best['upstream']:.2f} s"
        for algorithm in ("sha256", "blake3"):
            rows.append(
                Row(
                    "model",
                    f"ztlab model {what}, {algorithm}, {label}",
                    best[algorithm],
                    "s",
                    target="<= 1.0x upstream",
                    baseline=base,
                    ratio=best[algorithm] / best["upstream"],
                )
            )
    return rows
