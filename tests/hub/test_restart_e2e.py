"""Restart safety: the hub (and its proxy) killed with ``kill -9`` while servers hold GPUs.

Through the real hub, two users' sandboxed servers each hold a GPU lease (``mknod`` device
nodes on this GPU-less machine) and MLflow runs. Then, in order:

1. under load (kernels' reports, each answered only once its audit record is durable), the
   hub and the proxy are killed with ``SIGKILL`` and the hub is started again: the servers
   are adopted again and reachable, every lease matches a running server, MLflow answers,
   the audit log verifies and every acknowledged record is in it;
2. while the hub is down, one server dies, a stray lease and a stray sandbox process
   appear (what a crash in the middle of a spawn leaves): the restarted hub releases the
   dead server's and the stray lease and kills the stray process, and keeps the live one;
3. the proxy alone is killed: the hub starts it again and restores the routes;
4. a clean stop (``SIGTERM``, what ``ztlab down`` sends) stops the servers and releases
   their leases; the next start finds nothing left over.

A Dask cluster of sam's (a pool's CPU workers) lives through the first kill and is adopted;
when sam's server dies while the hub is down, the restarted hub stops it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.hubstack import (
    LoginStack,
    hub_token,
    nvidia_nodes,
    provider_user,
    remove_accounts,
    running_stack,
    spawn_server,
    wait_ready,
)
from ztlab.common.auditlog.paths import public_key_path
from ztlab.common.auditlog.verify import verify_log
from ztlab.common.keys import load_ed25519_public_key
from ztlab.hub.gpu.leases import LeaseStore
from ztlab.hub.sandbox.cgroups import CgroupManager, Limits

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

USERS = ("rita", "sam", "tom", "sara")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoginStack]:
    root = tmp_path_factory.mktemp("restart-stack")
    shared = Path("/tmp") / f"ztlab-restart-{os.getpid()}"
    dataset = shared / "probe"
    dataset.mkdir(parents=True, exist_ok=True)
    shared.chmod(0o755)
    (dataset / "data.csv").write_text("x\n1\n")
    extra = f"""
[gpu.pools.research]
gpus = ["0", "1"]
roles = ["trainer"]

[datasets]
storage_roots = ["{shared}"]
"""
    users = {
        "rita": provider_user("rita", "ml-trainers"),
        "sam": provider_user("sam", "ml-trainers"),
        "tom": provider_user("tom", "ml-trainers"),
        "sara": provider_user("sara", "data-stewards"),
    }
    with (
        nvidia_nodes(0, 1),
        running_stack(
            root,
            extra_config=extra,
            extra_users=users,
            pool="10.226.0.0/24",
            table="ztlab_test_restart",
            models=True,
            session_max_age=3600,
        ) as running,
    ):
        token = hub_token(running, "sara")
        registered = requests.post(
            f"{running.hub_url}/hub/api/ztlab/datasets",
            json={"ref": "probe@1", "path": str(dataset)},
            headers={"Authorization": f"token {token}"},
            timeout=60,
        )
        assert registered.status_code == 201, registered.text
        yield running
    remove_accounts(*USERS)
    subprocess.run(["rm", "-rf", str(shared)], check=False)


@pytest.fixture(scope="module")
def tokens(stack: LoginStack) -> dict[str, str]:
    return {user: hub_token(stack, user) for user in ("rita", "sam", "tom")}


@pytest.fixture(scope="module")
def servers(stack: LoginStack, tokens: dict[str, str]) -> dict[str, str]:
    for user in ("rita", "sam"):
        response = spawn_server(stack, user, tokens[user], {"gpus": 1, "pool": "research"})
        assert response.status_code in (201, 202), response.text
        wait_ready(stack, user, tokens[user])
    return tokens


def _active(stack: LoginStack) -> list[Any]:
    with LeaseStore(path=stack.state_dir / "gpu" / "leases.sqlite3") as store:
        return store.active()


def _reachable(stack: LoginStack, user: str, token: str, timeout: float = 30) -> bool:
    """The user's server answers its REST API through the proxy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            answer = requests.get(
                f"{stack.hub_url}/user/{user}/api/status",
                headers={"Authorization": f"token {token}"},
                timeout=10,
            )
            if answer.status_code == 200:
                return True
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    return False


def _mlflow_answers(stack: LoginStack, token: str, timeout: float = 90) -> bool:
    """MLflow answers through the hub (it takes some seconds to start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        search = requests.post(
            f"{stack.hub_url}/hub/api/ztlab/mlflow/api/2.0/mlflow/experiments/search",
            json={"max_results": 5},
            headers={"Authorization": f"token {token}"},
            timeout=30,
        )
        if search.status_code == 200:
            return True
        time.sleep(1)
    return False


def _mlflow_groups(stack: LoginStack) -> int:
    """How many process groups run an MLflow server over this stack's store."""
    store = str(stack.state_dir / "mlflow" / "mlflow.db")
    groups = set()
    for proc in Path("/proc").iterdir():
        try:
            if store in (proc / "cmdline").read_bytes().decode(errors="replace"):
                groups.add(os.getpgid(int(proc.name)))
        except (OSError, ValueError):
            continue
    return len(groups)


def _cullers(stack: LoginStack) -> int:
    """How many idle cullers run for this stack's hub."""
    wanted = f"--url={stack.hub_url}/hub/api"
    found = 0
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [word.decode(errors="replace") for word in argv]
        found += wanted in words and "jupyterhub_idle_culler" in words
    return found


def _proxy_pid(stack: LoginStack) -> int:
    return int((stack.state_dir / "hub" / "proxy.pid").read_text().strip())


def _verify_audit(stack: LoginStack) -> Any:
    key = load_ed25519_public_key(public_key_path(stack.audit_log))
    return verify_log(stack.audit_log, public_key=key)


class _Load:
    """Kernels' reports, sent as fast as the hub answers; each 202 is an acknowledgement."""

    def __init__(self, stack: LoginStack, token: str) -> None:
        self._url = f"{stack.hub_url}/hub/api/ztlab/datasets/probe@1/reports"
        self._token = token
        self.acknowledged: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(4)]

    def _run(self, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            nonce = f"w{worker}-{n}"
            n += 1
            try:
                answer = requests.post(
                    self._url,
                    json={"kind": "mismatch", "detail": nonce},
                    headers={"Authorization": f"token {self._token}"},
                    timeout=5,
                )
            except requests.RequestException:
                time.sleep(0.05)
                continue
            if answer.status_code == 202:
                self.acknowledged.append(nonce)

    def __enter__(self) -> _Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def _cluster(stack: LoginStack, user: str, token: str, cluster_id: str = "") -> Any:
    """Start a CPU cluster of ``user`` (no id), or the state of cluster ``cluster_id``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    headers = {"Authorization": f"token {token}"}
    if cluster_id:
        return requests.get(
            f"{stack.hub_url}/hub/api/ztlab/pools/clusters/{cluster_id}",
            headers=headers,
            timeout=60,
        ).json()
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    answer = requests.post(
        f"{stack.hub_url}/hub/api/ztlab/pools/research/clusters",
        json={
            "workers": 1,
            "gpus": 0,
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
        },
        headers=headers,
        timeout=120,
    )
    assert answer.status_code == 201, answer.text
    return answer.json()["cluster"]["id"]


def _workers_joined(stack: LoginStack, user: str, token: str, cluster_id: str) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = _cluster(stack, user, token, cluster_id).get("status") or {}
        if status.get("workers"):
            return int(status["workers"])
        time.sleep(1)
    return 0


def test_kill_9_of_hub_and_proxy_under_load(stack: LoginStack, servers: dict[str, str]) -> None:
    before = {(lease.user, lease.server): lease.gpus for lease in _active(stack)}
    assert set(before) == {("rita", ""), ("sam", "")}
    cluster = _cluster(stack, "sam", servers["sam"])
    assert _workers_joined(stack, "sam", servers["sam"], cluster) == 1
    proxy = _proxy_pid(stack)
    with _Load(stack, servers["rita"]) as load:
        time.sleep(1.5)
        assert stack.hub.kill(signal.SIGKILL) == -signal.SIGKILL
        os.kill(proxy, signal.SIGKILL)
        time.sleep(0.5)
    acknowledged = list(load.acknowledged)
    assert len(acknowledged) > 10, "the load did not get going before the kill"
    stack.hub.start()
    # the servers are adopted again and reachable through a new proxy
    for user in ("rita", "sam"):
        assert _reachable(stack, user, servers[user]), stack.hub_log.read_text()[-3000:]
    # every lease matches a running server: the same GPUs, none doubled, none orphaned
    after = {(lease.user, lease.server): lease.gpus for lease in _active(stack)}
    assert after == before
    gpus = [gpu for held in after.values() for gpu in held]
    assert len(gpus) == len(set(gpus)) == 2
    # MLflow, which the dead hub left running, was replaced and answers through the hub
    assert _mlflow_answers(stack, servers["rita"]), stack.hub_log.read_text()[-3000:]
    assert _mlflow_groups(stack) == 1, "the dead hub's MLflow was left running"
    assert _cullers(stack) == 1, "the dead hub's idle culler was left running"
    # the audit log verifies, and every acknowledged record is in it
    report = _verify_audit(stack)
    assert report.records > 0
    recorded = {r.detail.get("detail") for r in stack.records("dataset.verify.failed")}
    missing = [nonce for nonce in acknowledged if nonce not in recorded]
    assert not missing, f"{len(missing)} acknowledged records lost: {missing[:5]}"
    reconciled = stack.wait_record("control_plane.reconciled", since=report.records - 50)
    assert sorted(reconciled.detail["running"]) == ["rita/", "sam/"]
    assert reconciled.detail["leases_released"] == []
    # sam's cluster was adopted: still running, its worker still joined, asked by the new hub
    assert _cluster(stack, "sam", servers["sam"], cluster)["state"] == "running"
    assert _workers_joined(stack, "sam", servers["sam"], cluster) == 1
    assert not stack.records("pool.cluster_stopped")


def test_what_a_crash_leaves_is_mended_at_the_next_start(
    stack: LoginStack, servers: dict[str, str], tokens: dict[str, str]
) -> None:
    assert stack.hub.kill(signal.SIGKILL) == -signal.SIGKILL
    cgroups = CgroupManager.detect(parent="ztlab")
    # sam's server dies while the hub is down
    sam = cgroups.get("ztl-sam")
    assert sam is not None
    sam.kill_all()
    # a stray sandbox process of tom (who has no server), as a crash mid-spawn leaves it
    tom = cgroups.create("ztl-tom", limits=Limits(memory_bytes=2**28, cpus=1, pids=50))
    stray = subprocess.Popen(["sleep", "600"], preexec_fn=tom.preexec(), start_new_session=True)
    # ... and a lease granted for tom's server that never started
    from ztlab.common.config import load_config
    from ztlab.hub.gpu.inventory import Inventory
    from ztlab.hub.gpu.leases import LeaseBroker
    from ztlab.hub.policy import PolicyEngine

    config = load_config(stack.hub.config)
    broker = LeaseBroker(
        store_path=stack.state_dir / "gpu" / "leases.sqlite3",
        inventory=Inventory.from_config(config),
        roles=config.roles,
        policy=PolicyEngine.defaults(),
    )
    sams_lease = [lease for lease in broker.active() if lease.user == "sam"]
    # sam's GPU is still held (the hub was down when the server died): free only at restart
    assert len(sams_lease) == 1
    broker.release(sams_lease[0].id, reason="test makes room", actor="test")
    stray_lease = broker.grant(
        user="tom", roles=frozenset({"trainer"}), server="", pool="research", count=1
    )
    assert stray_lease is not None
    broker.close()
    since = stack.audit_size()
    stack.hub.start()
    # rita's server lives on with its lease; tom's stray lease and process are gone
    assert _reachable(stack, "rita", servers["rita"])
    active = _active(stack)
    assert [(lease.user, lease.server) for lease in active] == [("rita", "")]
    stray.wait(timeout=20)
    assert stray.returncode == -signal.SIGKILL
    assert tom.procs() == []
    reconciled = stack.wait_record("control_plane.reconciled", since=since)
    assert reconciled.detail["leases_released"] == [stray_lease.id]
    assert reconciled.detail["sandboxes_stopped"] == ["ztl-tom"]
    assert reconciled.detail["running"] == ["rita/"]
    # sam's cluster ended with his server: stopped at the restart, its processes gone
    # (the hub finds his server's process gone as it starts, and ends what it left)
    ended = stack.wait_record("pool.cluster_stopped", actor="ztlab-hub", since=since)
    assert ended.detail["owner"] == "sam"
    assert ended.detail["reason"] == "the owner's server ended without a stop (exit status 0)"
    assert stack.wait_record("server.stopped", actor="sam", since=since).detail["reason"] == (
        "ended without a stop (exit status 0)"
    )
    assert not [n for n in cgroups.names() if n.startswith(f"ztl-sam-{ended.detail['cluster']}")]
    released = stack.wait_record("gpu.lease.released", actor="ztlab-hub", since=since)
    assert released.detail["reason"] == "reconciled"
    # sam's server is not running, and sam can start it again (a GPU is free)
    model = requests.get(
        f"{stack.hub_url}/hub/api/users/sam",
        headers={"Authorization": f"token {tokens['sam']}"},
        timeout=30,
    ).json()
    assert not model["servers"]
    _verify_audit(stack)


def test_a_killed_proxy_is_started_again_with_its_routes(
    stack: LoginStack, servers: dict[str, str]
) -> None:
    old = _proxy_pid(stack)
    os.kill(old, signal.SIGKILL)
    # JupyterHub checks its proxy every 5 s, starts a new one and restores the routes
    assert _reachable(stack, "rita", servers["rita"], timeout=60)
    assert _proxy_pid(stack) != old


def test_a_clean_stop_ends_servers_and_leases(stack: LoginStack, servers: dict[str, str]) -> None:
    assert _active(stack), "rita's lease should still be held"
    assert stack.hub.kill(signal.SIGTERM) == 0
    assert _active(stack) == []
    rita = CgroupManager.detect(parent="ztlab").get("ztl-rita")
    assert rita is None or rita.procs() == []
    since = stack.audit_size()
    stack.hub.start()
    reconciled = stack.wait_record("control_plane.reconciled", since=since)
    assert reconciled.detail == {"running": [], "leases_released": [], "sandboxes_stopped": []}
    stopped = [r for r in stack.records("server.stopped") if r.actor == "rita"]
    assert stopped, "the clean stop did not record rita's server stopping"
    _verify_audit(stack)
