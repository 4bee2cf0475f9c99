"""Make the signed example dataset ``demo@1`` for trying the kernel side without a hub.

Usage: ``python binder/make_demo_dataset.py DIR`` (``binder/postBuild`` runs it with
``DIR=$HOME/ztlab-demo``). It writes::

    DIR/data/train.parquet     1,500 rows: four numeric features and a binary label
    DIR/data/test.parquet        500 rows, same columns
    DIR/data/labels.csv        what the label values mean
    DIR/registry/demo@1.dsse.json   the manifest of DIR/data, signed as demo@1
    DIR/registry/trusted-keys.pem   the public key that signed it

The tables are the same on every run (a fixed seed); the signing key is fresh each time
and only ever held in memory, so nothing here can sign anything else. Point a kernel at
the registry with ``ZTLAB_LOCAL_REGISTRY=DIR/registry`` (``binder/start`` does).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REF = "demo@1"
ROWS = 2000
TRAIN_ROWS = 1500
SEED = 20240601


def write_tables(data: Path) -> list[Path]:
    """The deterministic example tables under ``data``; the files written."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(SEED)
    features = rng.normal(size=(ROWS, 4)).round(6)
    weights = np.array([1.5, -2.0, 0.75, 0.0])
    chance = 1.0 / (1.0 + np.exp(-(features @ weights + 0.25)))
    label = (rng.random(ROWS) < chance).astype("int8")
    frame = pd.DataFrame(features, columns=["x1", "x2", "x3", "x4"])
    frame["label"] = label
    data.mkdir(parents=True, exist_ok=True)
    written = [data / "train.parquet", data / "test.parquet", data / "labels.csv"]
    frame.iloc[:TRAIN_ROWS].reset_index(drop=True).to_parquet(written[0], index=False)
    frame.iloc[TRAIN_ROWS:].reset_index(drop=True).to_parquet(written[1], index=False)
    pd.DataFrame({"label": [0, 1], "name": ["negative", "positive"]}).to_csv(
        written[2], index=False
    )
    return written


def sign(data: Path, registry: Path) -> tuple[Path, Path, str]:
    """Sign the manifest of ``data`` as :data:`REF` with a fresh P-256 key held in memory.

    Returns the envelope's path, the trusted-keys path and the manifest's root digest.
    """
    from cryptography.hazmat.primitives.asymmetric import ec

    from ztlab.common.attest import public_key_pem, sign_manifest
    from ztlab.common.manifest import fingerprint

    key = ec.generate_private_key(ec.SECP256R1())
    manifest = fingerprint(data)
    envelope = sign_manifest(
        manifest,
        REF,
        key,
        registered_by="binder/make_demo_dataset.py",
        source=os.path.realpath(data),
    )
    registry.mkdir(parents=True, exist_ok=True)
    signed = registry / f"{REF}.dsse.json"
    signed.write_text(envelope.to_json(), encoding="utf-8")
    keys = registry / "trusted-keys.pem"
    keys.write_text(public_key_pem(key.public_key()), encoding="ascii")
    return signed, keys, manifest.root


def main(argv: list[str] | None = None) -> int:
    """Make the dataset under the directory named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("directory", type=Path, help="where to write data/ and registry/")
    args = parser.parse_args(argv)
    root: Path = args.directory.expanduser().resolve()
    data, registry = root / "data", root / "registry"
    for path in write_tables(data):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    signed, keys, digest = sign(data, registry)
    print(f"signed {data} as {REF}: {signed}")
    print(f"  root {digest}")
    print(f"trusted key: {keys} (the private key was not saved)")
    print(f'use it with: export ZTLAB_LOCAL_REGISTRY="{registry}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
