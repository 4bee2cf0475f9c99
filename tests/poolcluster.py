"""A cluster's scheduler and workers as plain processes (no sandbox), for tests and checks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ztlab.common.poolidentity import (
    ClusterAccess,
    PeerIdentity,
    scheduler_identity,
    worker_identity,
)
from ztlab.hub.compute.authority import PoolAuthority

CLUSTER = "0123456789abcdef"


@dataclass
class Running:
    directory: Path
    authority: PoolAuthority
    address: str
    port: int
    logs: list[Path]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_cluster(
    root: Path,
    *,
    owner: str = "alice",
    shared_with: Sequence[str] = (),
    gpus: Sequence[str] = (),
    nanny: bool = False,
) -> Iterator[Running]:
    """A scheduler and ``max(1, len(gpus))`` workers of pool ``research``, owned by ``owner``
    (``nanny``: each worker in a child process, as dask-cuda runs them)."""
    authority = PoolAuthority(root / "ca", "research")
    directory = root / "cluster"
    directory.mkdir()
    workers = max(1, len(gpus))
    (directory / "ca.pem").write_bytes(authority.ca_pem)
    names = [("scheduler", scheduler_identity("research", CLUSTER))]
    names += [(f"worker-{i}", worker_identity("research", CLUSTER)) for i in range(workers)]
    for name, identity in names:
        issued = authority.issue_with_key(identity, minutes=30)
        (directory / f"{name}.pem").write_bytes(issued.certificate)
        (directory / f"{name}.key").write_bytes(issued.key)
    port = _free_port()
    access = ClusterAccess("research", CLUSTER, owner, frozenset(shared_with))
    spec = {
        "access": access.as_json(),
        "scheduler": {"host": "127.0.0.1", "port": port, "dashboard_port": _free_port()},
        "workers": workers,
        "gpus": list(gpus),
        "memory": 2**30,
        "threads": 1,
    }
    (directory / "cluster.json").write_text(json.dumps(spec))
    module = "ztlab.kernels.cluster"
    logs = [root / "scheduler.log", *(root / f"worker-{i}.log" for i in range(workers))]
    procs = []

    def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        with log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", module, *args, str(directory)],
                    stdout=out,
                    stderr=out,
                    env=env,
                )
            )

    start(["scheduler"], logs[0])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    for index in range(workers):
        env = dict(os.environ)
        if index < len(gpus):
            env["CUDA_VISIBLE_DEVICES"] = gpus[index]
        start(["worker", *(["--nanny"] if nanny else []), str(index)], logs[index + 1], env)
    try:
        yield Running(directory, authority, f"tls://127.0.0.1:{port}", port, logs)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def credentials(run: Running, holder: PeerIdentity, tmp: Path) -> tuple[Path, Path]:
    """A certificate for ``holder`` (from a CSR for users, with a key for processes)."""
    key = ec.generate_private_key(ec.SECP256R1())
    if holder.kind == "user":
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .sign(key, hashes.SHA256())
        )
        issued = run.authority.sign_request(
            csr.public_bytes(serialization.Encoding.PEM), holder, minutes=10
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    else:
        issued = run.authority.issue_with_key(holder, minutes=10)
        key_pem = issued.key
    stem = f"{holder.kind}-{holder.user or holder.cluster}"
    cert_path, key_path = tmp / f"{stem}.pem", tmp / f"{stem}.key"
    cert_path.write_bytes(issued.certificate)
    key_path.write_bytes(key_pem)
    return cert_path, key_path


def security(run: Running, cert: Path, key: Path) -> Any:
    """A client's ``distributed.security.Security`` with these files."""
    from distributed.security import Security

    return Security(
        tls_ca_file=str(run.directory / "ca.pem"),
        tls_client_cert=str(cert),
        tls_client_key=str(key),
        require_encryption=True,
    )


def run_as(
    run: Running, holder: PeerIdentity, tmp: Path, function: Any = sum, arg: Any = (1, 2)
) -> str:
    """``function(arg)`` on the cluster as ``holder``: ``ran RESULT`` or ``refused: ...``."""
    from distributed import Client

    cert, key = credentials(run, holder, tmp)
    try:
        with Client(run.address, security=security(run, cert, key), timeout=5) as client:
            client.wait_for_workers(1, timeout=60)
            return f"ran {client.submit(function, arg).result(timeout=60)}"
    except Exception as exc:
        return f"refused: {type(exc).__name__}"


def call(run: Running, holder: PeerIdentity, tmp: Path, op: str, address: str = "") -> Any:
    """The answer of the scheduler (or the server at ``address``) to ``op`` for ``holder``."""
    from distributed.core import rpc

    cert, key = credentials(run, holder, tmp)
    connection = security(run, cert, key).get_connection_args("client")

    async def ask() -> Any:
        async with rpc(address or run.address, connection_args=connection, timeout=10) as server:
            return await getattr(server, op)()

    return asyncio.run(ask())
