"""A cluster's own processes (``ztlab.kernels.cluster``), run as plain processes here.

What the sandboxed end-to-end test cannot reach quickly: the users a cluster is shared with
are admitted, renewed certificates are served to new connections without a restart, and
only the control plane may collect the refusals (the owner cannot empty the record of
attempts on their cluster).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.poolcluster import CLUSTER, Running, call, credentials, run_as, running_cluster
from ztlab.common.poolidentity import (
    control_plane_identity,
    scheduler_identity,
    user_identity,
    worker_identity,
)
from ztlab.kernels.cluster import CERTIFICATE_CHECK_SECONDS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def nanny_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """Workers in child processes, as dask-cuda runs them: set up by the module as their
    Dask preload."""
    with running_cluster(tmp_path_factory.mktemp("nanny"), nanny=True) as run:
        yield run


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_cluster(tmp_path_factory.mktemp("cluster"), shared_with=["bob"]) as run:
        yield run


def test_the_owner_and_the_users_it_is_shared_with_compute_others_do_not(
    cluster: Running, tmp_path: Path
) -> None:
    assert run_as(cluster, user_identity("research", "alice"), tmp_path) == "ran 3"
    assert run_as(cluster, user_identity("research", "bob"), tmp_path) == "ran 3"
    assert run_as(cluster, user_identity("research", "carol"), tmp_path).startswith("refused")
    # a worker certificate of another cluster cannot join or submit
    other_worker = worker_identity("research", "fedcba9876543210")
    assert run_as(cluster, other_worker, tmp_path).startswith("refused")


def test_only_the_control_plane_collects_the_refusals(cluster: Running, tmp_path: Path) -> None:
    assert run_as(cluster, user_identity("research", "mallory"), tmp_path).startswith("refused")
    assert not call(cluster, user_identity("research", "alice"), tmp_path, "ztlab_refusals")
    held = call(cluster, control_plane_identity("research"), tmp_path, "ztlab_refusals")
    assert any(
        entry["holder"] == "ztlab://pool/research/user/mallory"
        and entry["reason"] == "user mallory is neither the owner (alice) nor shared with"
        for entry in held
    ), held
    assert not call(cluster, control_plane_identity("research"), tmp_path, "ztlab_refusals")


def _served_serial(run: Running, tmp: Path) -> int:
    cert, key = credentials(run, user_identity("research", "alice"), tmp)
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
    assert run_as(cluster, user_identity("research", "alice"), tmp_path) == "ran 3"


def test_a_worker_in_a_child_process_checks_identities_and_reports_refusals(
    nanny_cluster: Running, tmp_path: Path
) -> None:
    run = nanny_cluster
    assert run_as(run, user_identity("research", "alice"), tmp_path) == "ran 3"
    plane = control_plane_identity("research")
    workers = call(run, plane, tmp_path, "identity")["workers"]
    (address,) = list(workers)
    # a stranger with a valid certificate of the pool, straight at the worker's listener
    with pytest.raises(Exception):  # noqa: B017 - closed after the handshake, as any refusal
        call(run, user_identity("research", "mallory"), tmp_path, "identity", address)
    deadline = time.monotonic() + 20
    held: list[dict[str, object]] = []
    while time.monotonic() < deadline and not held:
        time.sleep(1)
        held = [
            entry
            for entry in call(run, plane, tmp_path, "ztlab_refusals")
            if entry["holder"] == "ztlab://pool/research/user/mallory"
        ]
    assert held, "the worker's refusal did not reach its scheduler"
    assert held[0]["reason"] == "user mallory is neither the owner (alice) nor shared with"
