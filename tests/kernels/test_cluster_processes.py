"""A cluster's own processes (``ztlab.kernels.cluster``), run as plain processes here.

What the sandboxed end-to-end test cannot reach quickly: the users a cluster is shared with
are admitted, renewed certificates are served to new connections without a restart, and
only the control plane may collect the refusals (the owner cannot empty the record of
attempts on their cluster).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ztlab.common.poolidentity import (
    ClusterAccess,
    PeerIdentity,
    control_plane_identity,
    scheduler_identity,
    user_identity,
    worker_identity,
)
from ztlab.hub.compute.authority import PoolAuthority
from ztlab.kernels.cluster import CERTIFICATE_CHECK_SECONDS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CLUSTER = "0123456789abcdef"


@dataclass
class Running:
    directory: Path
    authority: PoolAuthority
    address: str
    port: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("cluster")
    authority = PoolAuthority(root / "ca", "research")
    directory = root / "cluster"
    directory.mkdir()
    (directory / "ca.pem").write_bytes(authority.ca_pem)
    for name, identity in (
        ("scheduler", scheduler_identity("research", CLUSTER)),
        ("worker-0", worker_identity("research", CLUSTER)),
    ):
        issued = authority.issue_with_key(identity, minutes=30)
        (directory / f"{name}.pem").write_bytes(issued.certificate)
        (directory / f"{name}.key").write_bytes(issued.key)
    port = _free_port()
    access = ClusterAccess("research", CLUSTER, "alice", frozenset({"bob"}))
    spec = {
        "access": access.as_json(),
        "scheduler": {"host": "127.0.0.1", "port": port, "dashboard_port": _free_port()},
        "workers": 1,
        "memory": 2**30,
        "threads": 1,
    }
    (directory / "cluster.json").write_text(json.dumps(spec))
    module = "ztlab.kernels.cluster"
    logs = [(root / f"{n}.log").open("wb") for n in ("scheduler", "worker")]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, "scheduler", str(directory)],
            stdout=logs[0],
            stderr=logs[0],
        )
    ]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    procs.append(
        subprocess.Popen(
            [sys.executable, "-m", module, "worker", "0", str(directory)],
            stdout=logs[1],
            stderr=logs[1],
        )
    )
    try:
        yield Running(directory, authority, f"tls://127.0.0.1:{port}", port)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
        for log in logs:
            log.close()


def _files(run: Running, holder: PeerIdentity, tmp: Path) -> tuple[Path, Path]:
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
    cert_path, key_path = (
        tmp / f"{holder.kind}-{holder.user}.pem",
        tmp / f"{holder.kind}-{holder.user}.key",
    )
    cert_path.write_bytes(issued.certificate)
    key_path.write_bytes(key_pem)
    return cert_path, key_path


def _security(run: Running, cert: Path, key: Path) -> Any:
    from distributed.security import Security

    return Security(
        tls_ca_file=str(run.directory / "ca.pem"),
        tls_client_cert=str(cert),
        tls_client_key=str(key),
        require_encryption=True,
    )


def _compute(run: Running, holder: PeerIdentity, tmp: Path) -> str:
    from distributed import Client

    cert, key = _files(run, holder, tmp)
    try:
        with Client(run.address, security=_security(run, cert, key), timeout=5) as client:
            client.wait_for_workers(1, timeout=30)
            return f"ran {client.submit(sum, [1, 2]).result(timeout=10)}"
    except Exception as exc:  # noqa: BLE001 - the refusal is what is asserted
        return f"refused: {type(exc).__name__}"


def _call(run: Running, holder: PeerIdentity, tmp: Path, op: str) -> Any:
    from distributed.core import rpc

    cert, key = _files(run, holder, tmp)
    security = _security(run, cert, key)

    async def ask() -> Any:
        async with rpc(run.address, connection_args=security.get_connection_args("client")) as r:
            return await getattr(r, op)()

    return asyncio.run(ask())


def test_the_owner_and_the_users_it_is_shared_with_compute_others_do_not(
    cluster: Running, tmp_path: Path
) -> None:
    assert _compute(cluster, user_identity("research", "alice"), tmp_path) == "ran 3"
    assert _compute(cluster, user_identity("research", "bob"), tmp_path) == "ran 3"
    assert _compute(cluster, user_identity("research", "carol"), tmp_path).startswith("refused")
    # a worker certificate of another cluster cannot join or submit
    other_worker = worker_identity("research", "fedcba9876543210")
    assert _compute(cluster, other_worker, tmp_path).startswith("refused")


def test_only_the_control_plane_collects_the_refusals(cluster: Running, tmp_path: Path) -> None:
    assert _compute(cluster, user_identity("research", "mallory"), tmp_path).startswith("refused")
    assert not _call(cluster, user_identity("research", "alice"), tmp_path, "ztlab_refusals")
    held = _call(cluster, control_plane_identity("research"), tmp_path, "ztlab_refusals")
    assert any(
        entry["holder"] == "ztlab://pool/research/user/mallory"
        and entry["reason"] == "user mallory is neither the owner (alice) nor shared with"
        for entry in held
    ), held
    assert not _call(cluster, control_plane_identity("research"), tmp_path, "ztlab_refusals")


def _served_serial(run: Running, tmp: Path) -> int:
    cert, key = _files(run, user_identity("research", "alice"), tmp)
    context = ssl.create_default_context(cafile=str(run.directory / "ca.pem"))
    context.check_hostname = False
    context.load_cert_chain(cert, key)
    with (
        socket.create_connection(("127.0.0.1", run.port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_a_renewed_scheduler_certificate_is_served_without_a_restart(
    cluster: Running, tmp_path: Path
) -> None:
    before = _served_serial(cluster, tmp_path)
    issued = cluster.authority.issue_with_key(scheduler_identity("research", CLUSTER), minutes=30)
    (cluster.directory / "scheduler.key").write_bytes(issued.key)
    (cluster.directory / "scheduler.pem").write_bytes(issued.certificate)
    deadline = time.monotonic() + CERTIFICATE_CHECK_SECONDS * 3
    served = before
    while time.monotonic() < deadline and served != issued.serial:
        time.sleep(1)
        served = _served_serial(cluster, tmp_path)
    assert served == issued.serial
    assert _compute(cluster, user_identity("research", "alice"), tmp_path) == "ran 3"
