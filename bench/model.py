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
from typing import Any

from bench._table import Row, best_of

MIB = 1024 * 1024


def _command(*args: str) -> Callable[[], object]:
    def run() -> object:
        return subprocess.run(args, check=True, capture_output=True)

    return run


def run(*, quick: bool = False) -> list[Row]:
    return run_signing(quick=quick) + run_approval(quick=quick)


def run_signing(*, quick: bool = False) -> list[Row]:
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
        sign = best_of(
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
        verify = best_of(
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


def run_approval(*, quick: bool = False) -> list[Row]:
    """Sign and approve a registered version against a real MLflow server, in process.

    The control plane's side of the round trip (policy, re-verifying the artifacts as they
    are now, re-checking lineage against the dataset registry, setting the alias through
    MLflow's REST API, recording and auditing), against MLflow's own alias update alone.
    The hub's HTTP hop is not included (a few ms, see the login suite).
    """
    import mlflow
    import numpy as np
    import pandas as pd

    from ztlab.common.keys import key_id
    from ztlab.hub.audit import AuditLog
    from ztlab.hub.datasets import DatasetRegistry
    from ztlab.hub.keys import load_or_create_attestation_key
    from ztlab.hub.models.mlflow import (
        MlflowREST,
        proxy_key,
        server_command,
        server_environment,
    )
    from ztlab.hub.models.service import ModelService
    from ztlab.hub.policy import PolicyEngine, Principal

    weights_size = (64 if quick else 256) * MIB
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        root = Path(tmp)
        store = root / "mlflow"
        store.mkdir(mode=0o700)
        port = _free_port()
        server = subprocess.Popen(
            server_command(store, port),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **server_environment(store)},
        )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait(url, server)
            audit = AuditLog.open(root / "audit" / "audit.jsonl", key_path=root / "audit.key")
            policy = PolicyEngine.defaults(audit=audit)
            key = load_or_create_attestation_key(root / "keys" / "attest.key")
            data = root / "datasets" / "table" / "1"
            data.mkdir(parents=True)
            pd.DataFrame({"x": np.arange(1000)}).to_parquet(data / "t.parquet")
            datasets = DatasetRegistry(
                path=root / "registry" / "r.sqlite",
                key=key,
                policy=policy,
                audit=audit,
                storage_roots=[root / "datasets"],
            )
            alice = Principal(name="alice", roles=frozenset({"trainer"}))
            paul = Principal(name="paul", roles=frozenset({"approver"}))
            steward = Principal(name="sam", roles=frozenset({"data-steward"}))
            registered = datasets.register(steward, "table@1", str(data))
            service = ModelService(
                store=store,
                mlflow=MlflowREST(url, key=proxy_key(store)),
                key=key,
                policy=policy,
                audit=audit,
                datasets=datasets,
                protected_aliases=["production"],
            )
            service.remember_roles("alice", alice.roles)
            service.introduce("alice", writer=True)
            weights = root / "weights.bin"
            with weights.open("wb") as handle:
                for _ in range(0, weights_size, 16 * MIB):
                    handle.write(os.urandom(16 * MIB))

            class Identity(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined,misc]
                def predict(self, context: object, model_input: object) -> object:
                    return model_input

            _train_as(MlflowREST(url, key=proxy_key(store), user="alice").headers)
            mlflow.set_tracking_uri(url)
            with mlflow.start_run() as run:
                import importlib

                meta: Any = importlib.import_module("mlflow.data.meta_dataset")
                sources: Any = importlib.import_module("mlflow.data.sources")
                mlflow.log_input(
                    meta.MetaDataset(sources.LocalArtifactDatasetSource(str(data)), name="table@1"),
                    tags={"ztlab.dataset": "table@1", "ztlab.root": registered.root},
                )
                mlflow.pyfunc.log_model(
                    name="model",
                    python_model=Identity(),
                    artifacts={"weights": str(weights)},
                    registered_model_name="bench",
                )
            service.record_run(run.info.run_id, "alice")
            start = time.perf_counter()
            service.sign(alice, "bench", "1")
            signing = time.perf_counter() - start
            rest = MlflowREST(url, key=proxy_key(store))
            best = best_of(
                5,
                {
                    "approve": lambda: service.approve(paul, "bench", "1", "bench", "production"),
                    "alias": lambda: rest.set_alias("bench", "staging", "1"),
                },
            )
            audit.close()
            assert key_id(key.public_key()) == service.keyid
        finally:
            server.terminate()
            server.wait(timeout=30)
    label = f"{weights_size / MIB:,.0f} MiB model"
    rows.append(
        Row(
            "model",
            f"approval round trip ({label}: policy, re-verify, lineage, alias, audit)",
            best["approve"],
            "s",
            baseline=f"MLflow alias update alone: {best['alias'] * 1000:.1f} ms",
            ratio=best["approve"] / best["alias"],
        )
    )
    rows.append(Row("model", f"signing service, sign a registered version ({label})", signing, "s"))
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(url: str, server: subprocess.Popen[bytes]) -> None:
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"MLflow exited with status {server.returncode} before it started")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"MLflow did not start at {url}")


def _train_as(headers: dict[str, str]) -> None:
    """Make this process's MLflow client send ``headers`` (what the hub's proxy adds)."""
    import importlib

    registry: Any = importlib.import_module("mlflow.tracking.request_header.registry")

    class HubIdentity:
        def in_context(self) -> bool:
            return True

        def request_headers(self) -> dict[str, str]:
            return dict(headers)

    registry._request_header_provider_registry.register(HubIdentity)
