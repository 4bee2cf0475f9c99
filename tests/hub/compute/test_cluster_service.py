"""The control plane's side of clusters, with the process runner replaced at its boundary.

The backend (what starts processes) is replaced by :class:`RecordingBackend`, which runs
nothing and remembers what it was asked; everything else is real: the policy engine with
the shipped policies, the pool authorities, the SQLite stores, the GPU lease broker.
"""

from __future__ import annotations

import concurrent.futures
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ztlab.common.config import ZtlabConfig, parse_config
from ztlab.hub.compute.backend import Cluster, ClusterRequest, ComputeBackend
from ztlab.hub.compute.service import ClusterService, Session
from ztlab.hub.compute.store import ClusterDenied, ClusterError, ClusterQuotaExceeded
from ztlab.hub.gpu.inventory import Inventory
from ztlab.hub.gpu.leases import LeaseBroker
from ztlab.hub.policy import PolicyEngine, Principal

ALICE = Principal(name="alice", roles=frozenset({"trainer"}))
BOB = Principal(name="bob", roles=frozenset({"trainer"}))
VIEWER = Principal(name="val", roles=frozenset({"viewer"}))
ADMIN = Principal(name="ada", roles=frozenset({"admin"}))


class RecordingBackend(ComputeBackend):
    """Runs nothing; records starts, renewals and stops (slowly, if asked)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.started: list[ClusterRequest] = []
        self.renewed: list[tuple[str, list[str]]] = []
        self.stopped: list[str] = []
        self.delay = delay

    @classmethod
    def open(cls, *, config: ZtlabConfig, cgroups: Any, segments: Any) -> Self:
        return cls()

    def start(self, request: ClusterRequest) -> Cluster:
        time.sleep(self.delay)
        self.started.append(request)
        return Cluster(
            id=request.id,
            owner=request.owner,
            pool=request.pool,
            host="10.0.0.2",
            port=request.port,
            dashboard_port=request.dashboard_port,
            workers=request.workers,
            started_at=time.time(),
        )

    def clusters(self, *, owner: str | None = None) -> list[Cluster]:
        return []

    def renew(self, cluster_id: str, files: Mapping[str, bytes]) -> None:
        self.renewed.append((cluster_id, sorted(files)))

    def stop(self, cluster_id: str, *, reason: str) -> None:
        self.stopped.append(cluster_id)

    def close(self) -> None:
        pass


def _csr() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM).decode()


class Recorder:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, actor: str, action: str, **detail: Any) -> None:
        self.rows.append((actor, action, detail))

    def actions(self) -> list[str]:
        return [action for _, action, _ in self.rows]


def _service(tmp_path: Path, **pool: Any) -> tuple[ClusterService, RecordingBackend, Recorder]:
    config = parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "gpu": {
                "pools": {
                    "research": {
                        "gpus": ["0", "1", "2"],
                        "roles": ["trainer"],
                        "max_clusters": 2,
                        "max_workers": 3,
                        "max_cluster_gpus": 2,
                        **pool,
                    }
                }
            },
            "roles": {"trainer": {"max_gpus": 2}},
        }
    )
    (tmp_path / "state").mkdir(mode=0o700, exist_ok=True)
    policy = PolicyEngine.defaults()
    recorder = Recorder()
    inventory = Inventory.from_config(config, nvml=None)
    leases = LeaseBroker.open(
        config=config, inventory=inventory, policy=policy, audit=_Sink(recorder)
    )
    backend = RecordingBackend()
    service = ClusterService(
        config, policy=policy, record=recorder, leases=leases, inventory=inventory, backend=backend
    )
    return service, backend, recorder


class _Sink:
    """The lease broker's audit sink, into the same recorder."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def record(self, *, actor: str, action: str, detail: Mapping[str, Any]) -> None:
        self.recorder(actor, action, **detail)

    def append(self, actor: str, action: str, detail: Mapping[str, Any]) -> Any:
        self.recorder(actor, action, **detail)


def test_a_member_gets_a_cluster_a_lease_and_a_certificate(tmp_path: Path) -> None:
    service, backend, recorder = _service(tmp_path)
    started = service.start(
        ALICE, pool="research", workers=2, gpus=1, csr=_csr(), account="ztl-alice"
    )
    (request,) = backend.started
    assert request.workers == 2
    assert request.gpus == ("0",)
    assert request.minors == (0,)
    assert sorted(request.files) == [
        "ca.pem", "scheduler.key", "scheduler.pem",
        "worker-0.key", "worker-0.pem", "worker-1.key", "worker-1.pem",
    ]  # fmt: skip
    assert request.spec["access"] == {
        "pool": "research", "cluster": request.id, "owner": "alice", "shared_with": [],
    }  # fmt: skip
    assert started.cluster.state == "running"
    assert started.cluster.address == f"tls://10.0.0.2:{request.port}"
    assert started.certificate_expires_at - time.time() <= 3600
    assert recorder.actions()[-3:] == [
        "gpu.lease.granted",
        "pool.cluster_started",
        "pool.certificate_issued",
    ]
    # the control plane's own key never goes to the cluster
    assert request.probe_certificate[1] not in request.files


def test_policy_and_pool_roles_refuse_with_the_reason(tmp_path: Path) -> None:
    service, backend, recorder = _service(tmp_path)
    with pytest.raises(ClusterDenied, match="Pool research is not open to you"):
        service.start(VIEWER, pool="research", workers=1, gpus=0, csr=_csr(), account="ztl-val")
    with pytest.raises(ClusterDenied, match="Pool research is not open to you"):
        service.start(ADMIN, pool="research", workers=1, gpus=0, csr=_csr(), account="ztl-ada")
    with pytest.raises(ClusterDenied, match="does not allow sharing"):
        service.start(
            ALICE, pool="research", workers=1, gpus=0, csr=_csr(), account="x", shared_with=[BOB]
        )
    assert not backend.started
    assert recorder.actions() == ["pool.cluster_refused"] * 3


def test_sharing_needs_the_pool_and_the_policy_for_each_user(tmp_path: Path) -> None:
    service, backend, _ = _service(tmp_path, allow_sharing=True)
    with pytest.raises(ClusterDenied, match="You cannot share with val"):
        service.start(
            ALICE, pool="research", workers=1, gpus=0, csr=_csr(), account="x", shared_with=[VIEWER]
        )
    service.start(
        ALICE, pool="research", workers=1, gpus=0, csr=_csr(), account="x", shared_with=[BOB]
    )
    assert backend.started[0].spec["access"]["shared_with"] == ["bob"]
    # bob may renew a certificate for the pool now; carol (no cluster there) may not
    service.renew_client(BOB, pool="research", csr=_csr())
    with pytest.raises(ClusterDenied, match="no running cluster in pool research"):
        service.renew_client(
            Principal(name="carol", roles=frozenset({"trainer"})), pool="research", csr=_csr()
        )


def test_quota_messages_name_the_limit_what_is_held_and_when_it_stops(tmp_path: Path) -> None:
    service, _, _ = _service(tmp_path)
    first = service.start(ALICE, pool="research", workers=2, gpus=1, csr=_csr(), account="x")
    with pytest.raises(ClusterQuotaExceeded) as workers:
        service.start(ALICE, pool="research", workers=2, gpus=0, csr=_csr(), account="x")
    assert "allows 3 workers per user (max_workers); you asked for 2" in workers.value.message
    assert f"you hold {first.cluster.id} (2 workers, 1 GPU, stops by " in workers.value.message
    service.start(ALICE, pool="research", workers=1, gpus=0, csr=_csr(), account="x")
    with pytest.raises(ClusterQuotaExceeded, match=r"allows 2 clusters per user"):
        service.start(ALICE, pool="research", workers=1, gpus=0, csr=_csr(), account="x")


def test_the_roles_gpu_quota_is_kept_by_the_lease(tmp_path: Path) -> None:
    service, _, _ = _service(tmp_path, max_cluster_gpus=3, max_workers=3)
    service.start(ALICE, pool="research", workers=2, gpus=2, csr=_csr(), account="x")
    with pytest.raises(ClusterQuotaExceeded, match="GPU"):
        service.start(ALICE, pool="research", workers=1, gpus=1, csr=_csr(), account="x")
    # the refused start left nothing behind, and was recorded as a refusal
    assert len(service.store.active(owner="alice")) == 1
    assert len(service.leases.active(user="alice")) == 1


def test_concurrent_requests_never_exceed_the_limit(tmp_path: Path) -> None:
    service, backend, _ = _service(tmp_path, max_clusters=1)
    backend.delay = 0.2  # starts overlap with the next requests' quota checks

    def ask(_: int) -> str:
        try:
            service.start(ALICE, pool="research", workers=1, gpus=1, csr=_csr(), account="x")
        except ClusterQuotaExceeded:
            return "refused"
        return "started"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(ask, range(8)))
    assert sorted(outcomes) == ["refused"] * 7 + ["started"]
    assert len(service.leases.active(user="alice")) == 1


def test_a_failed_start_releases_the_gpus_and_the_quota(tmp_path: Path) -> None:
    service, backend, recorder = _service(tmp_path)

    def fail(request: ClusterRequest) -> Cluster:
        raise ClusterError("the scheduler did not listen")

    backend.start = fail  # type: ignore[method-assign]
    with pytest.raises(ClusterError, match="did not listen"):
        service.start(ALICE, pool="research", workers=1, gpus=1, csr=_csr(), account="x")
    assert not service.store.active()
    assert not service.leases.active()
    assert "pool.cluster_failed" in recorder.actions()


def test_the_sweep_stops_lost_roles_ended_sessions_and_lifetimes_and_renews(tmp_path: Path) -> None:
    service, backend, recorder = _service(tmp_path)
    a = service.start(ALICE, pool="research", workers=1, gpus=1, csr=_csr(), account="x").cluster
    b = service.start(BOB, pool="research", workers=1, gpus=1, csr=_csr(), account="y").cluster
    sessions = {"alice": Session(roles=frozenset({"trainer"}), active=True)}
    # bob has no session: his cluster stops and his GPU is released
    assert service.sweep(sessions.get, actor="ztlab-hub") == [b.id]
    assert [lease.user for lease in service.leases.active()] == ["alice"]
    # alice keeps hers while she holds the role; her cluster's certificates are renewed
    service.store.update(service.store.get(a.id), certificates_expire_at=time.time() + 60)  # type: ignore[arg-type]
    assert service.sweep(sessions.get, actor="ztlab-hub") == []
    assert backend.renewed == [
        (a.id, ["scheduler.key", "scheduler.pem", "worker-0.key", "worker-0.pem"])
    ]
    # the identity provider takes her trainer role away
    sessions["alice"] = Session(roles=frozenset({"viewer"}), active=True)
    assert service.sweep(sessions.get, actor="ztlab-hub") == [a.id]
    stopped = [d for _, action, d in recorder.rows if action == "pool.cluster_stopped"]
    assert stopped[-1]["reason"].startswith("the owner lost the pool")
    assert not service.leases.active()
    # past its lifetime
    c = service.start(ALICE, pool="research", workers=1, gpus=0, csr=_csr(), account="x").cluster
    service.store.update(c, expires_at=time.time() - 1)
    sessions["alice"] = Session(roles=frozenset({"trainer"}), active=True)
    assert service.sweep(sessions.get, actor="ztlab-hub") == [c.id]
    reasons = [d["reason"] for _, action, d in recorder.rows if action == "pool.cluster_stopped"]
    assert reasons[-1] == "lifetime ended"


def test_reconcile_stops_clusters_of_owners_without_a_server(tmp_path: Path) -> None:
    service, backend, _ = _service(tmp_path)
    a = service.start(ALICE, pool="research", workers=1, gpus=1, csr=_csr(), account="x").cluster
    stopped = service.reconcile(set(), actor="ztlab-hub")
    assert stopped == [a.id]
    assert backend.stopped == [a.id]
    assert not service.leases.active()


def test_a_wider_authorities_folder_the_control_plane_made_is_narrowed(tmp_path: Path) -> None:
    # what the first version of the service left: compute/ca made with the umask (0755)
    (tmp_path / "state" / "compute" / "ca").mkdir(parents=True, mode=0o755)
    (tmp_path / "state" / "compute" / "ca").chmod(0o755)
    (tmp_path / "state").chmod(0o700)
    service, _, _ = _service(tmp_path)
    assert stat.S_IMODE((tmp_path / "state" / "compute" / "ca").stat().st_mode) == 0o700
    service.start(ALICE, pool="research", workers=1, gpus=0, csr=_csr(), account="x")
