"""Users' Dask clusters in GPU pools, through the real hub, real schedulers and workers.

One hub with two pools (``research``: GPUs 0 and 1; ``other``: GPU 2, as ``mknod`` nodes
with NVIDIA's major 195). Trainers start clusters from their sandboxed kernels with
``ztlab.pools.cluster``; the workers are CPU workers here, each still leased and fenced to
its GPU. The attacks are run against a real scheduler: plain TCP, another pool's
certificate, another user's certificate, an expired one, another user's kernel, a second
cluster past the quota (also from concurrent requests), a viewer.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.hub.spawner.kernel_client import Execution, KernelSession
from tests.hubstack import (
    LoginStack,
    ensure_server,
    hub_token,
    nvidia_nodes,
    provider_user,
    remove_accounts,
    running_stack,
    stop_server,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

USERS = ("paula", "quinn", "uma", "ada")

POOLS = """
[gpu.pools.research]
gpus = ["0", "1"]
roles = ["trainer"]
max_clusters = 1
max_workers = 2
max_cluster_gpus = 1
worker_memory = "1G"
cluster_hours = 1

[gpu.pools.other]
gpus = ["2"]
roles = ["trainer"]

[gpu.pools.team]
gpus = ["3"]
roles = ["trainer"]
allow_sharing = true
"""


@dataclass
class PoolStack:
    stack: LoginStack
    tokens: dict[str, str]

    def api(self, user: str, method: str, path: str, body: object = None) -> requests.Response:
        return requests.request(
            method,
            f"{self.stack.hub_url}/hub/api/ztlab{path}",
            json=body,
            headers={"Authorization": f"token {self.tokens[user]}"},
            timeout=120,
        )

    def server(self, user: str) -> None:
        ensure_server(self.stack, user, self.tokens[user])

    @contextlib.contextmanager
    def kernel(self, user: str) -> Iterator[KernelSession]:
        """A kernel in ``user``'s server (started if need be), shut down after."""
        self.server(user)
        session = KernelSession(self.stack.hub_url, user, self.tokens[user])
        try:
            yield session
        finally:
            session.close()

    def run(self, user: str, code: str, timeout: float = 60) -> Execution:
        """``code`` in a new kernel of ``user``'s."""
        with self.kernel(user) as kernel:
            return kernel.execute(code, timeout=timeout)

    def reaches(self, user: str, address: str) -> str:
        """Whether a TCP connection from ``user``'s kernel to ``address`` opens:
        ``REACHED`` or ``BLOCKED ERROR``."""
        host, port = address.removeprefix("tls://").rsplit(":", 1)
        result = self.run(
            user,
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(({host!r}, {port}), timeout=5).close()\n"
            "    print('REACHED')\n"
            "except OSError as exc:\n"
            "    print('BLOCKED', type(exc).__name__)\n",
            timeout=30,
        )
        return result.stdout.strip()

    def records(self, action: str, since: int = 0) -> list[dict[str, object]]:
        return self.stack.details(action, since)


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolStack]:
    root = tmp_path_factory.mktemp("pools")
    remove_accounts(*USERS)
    try:
        with (
            nvidia_nodes(0, 1, 2, 3),
            running_stack(
                root,
                extra_config=POOLS,
                extra_users={
                    "paula": provider_user("paula", "ml-trainers"),
                    "quinn": provider_user("quinn", "ml-trainers"),
                    "uma": provider_user("uma", "viewers"),
                    "ada": provider_user("ada", "ztlab-admins"),
                },
                pool="10.232.0.0/16",
                table="ztlab_test_pools",
            ) as stack,
        ):
            tokens = {user: hub_token(stack, user) for user in USERS}
            yield PoolStack(stack, tokens)
            for user in USERS:
                stop_server(stack, user, tokens[user])
    finally:
        remove_accounts(*USERS)


def _csr() -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return key, request.public_bytes(serialization.Encoding.PEM).decode()


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


START = """
import os, ztlab.pools
client = ztlab.pools.cluster("research", workers={workers}, gpus={gpus}, timeout=90)
print("CLUSTER", client.ztlab_cluster["id"], client.ztlab_cluster["scheduler"])
"""

ON_WORKERS = """
def probe():
    import errno, os
    out = {"uid": os.getuid(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    for minor in range(3):
        try:
            os.close(os.open(f"/dev/nvidia{minor}", os.O_RDWR))
            out[minor] = 0
        except OSError as exc:
            out[minor] = exc.errno
    return out
import json
print("PROBE", json.dumps(client.run(probe)))
print("SUM", client.submit(sum, range(10)).result())
"""


def test_a_member_computes_on_a_cluster_of_their_own_fenced_to_its_gpu(
    pools: PoolStack,
) -> None:
    since = len(pools.stack.records())
    with pools.kernel("paula") as kernel:
        started = kernel.execute(START.format(workers=1, gpus=1), timeout=180)
        assert "CLUSTER" in started.stdout, started.stdout + started.stderr
        ran = kernel.execute(ON_WORKERS, timeout=60)
    assert "SUM 45" in ran.stdout, ran.stdout + ran.stderr
    probes = json.loads(ran.stdout.split("PROBE ", 1)[1].splitlines()[0])
    (probe,) = probes.values()
    import pwd

    assert probe["uid"] == pwd.getpwnam("ztl-paula").pw_uid  # the owner's account, not root
    started_record = pools.records("pool.cluster_started", since)[0]
    leased = int(started_record["gpus"][0])
    other = 1 - leased
    assert probe["cuda"] == str(leased)
    # the leased GPU opens as far as a driver-less node can (ENXIO); the other GPU of the
    # pool is not in the worker's sandbox (ENOENT), nor is the other pool's
    assert probe[str(leased)] == 6
    assert probe[str(other)] == 2
    assert probe["2"] == 2
    assert started_record["actor"] == "paula"
    issued = pools.records("pool.certificate_issued", since)
    assert issued[0]["holder"] == "ztlab://pool/research/user/paula"


def _paula_cluster(pools: PoolStack) -> dict[str, object]:
    rows = pools.api("paula", "GET", "/pools/clusters").json()["clusters"]
    owned = [r for r in rows if r["owner"] == "paula"]
    assert owned, "paula's cluster is not running"
    return dict(owned[0])


def test_the_dashboard_is_served_through_the_hub_to_its_owner_only(pools: PoolStack) -> None:
    cluster = _paula_cluster(pools)
    url = f"{pools.stack.hub_url}/hub/pools/clusters/{cluster['id']}/dashboard/health"

    def get(user: str | None) -> requests.Response:
        headers = {"Authorization": f"token {pools.tokens[user]}"} if user else {}
        return requests.get(url, headers=headers, timeout=30, allow_redirects=False)

    owner = get("paula")
    assert owner.status_code == 200, owner.text
    assert owner.text == "ok"
    assert get("quinn").status_code == 404  # not his: as if it did not exist
    assert get(None).status_code == 403


def test_ztlab_pools_status_shows_the_workers_the_scheduler_reports(
    pools: PoolStack, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from ztlab.cli.main import cli

    cluster = _paula_cluster(pools)
    token = tmp_path / "token"
    token.write_text(pools.tokens["paula"])
    hub = ["--hub-url", f"{pools.stack.hub_url}/hub/api", "--token-file", str(token)]
    listed = CliRunner().invoke(cli, ["pools", "list", *hub])
    assert listed.exit_code == 0, listed.output
    assert "research: 2 GPUs, open to you (roles: trainer)" in listed.output
    assert "clusters 1/1, workers 1/2, GPUs 1/1" in listed.output
    status = CliRunner().invoke(cli, ["pools", "status", str(cluster["id"]), *hub])
    assert status.exit_code == 0, status.output
    assert f"cluster {cluster['id']} of paula in pool research: running" in status.output
    assert "1 worker joined, 1 thread, 1G memory, 1 GPU worker" in status.output
    stranger = tmp_path / "quinn"
    stranger.write_text(pools.tokens["quinn"])
    refused = CliRunner().invoke(
        cli,
        ["pools", "stop", str(cluster["id"]), "--hub-url", hub[1], "--token-file", str(stranger)],
    )
    assert refused.exit_code == 2
    assert f"You have no cluster '{cluster['id']}'" in refused.output


def _connect(address: str, ca: bytes, cert: bytes, key: bytes, tmp: Path) -> str:
    """Run a task on ``address`` with these credentials; what happened."""
    from distributed import Client
    from distributed.security import Security

    for name, data in (("ca.pem", ca), ("c.pem", cert), ("c.key", key)):
        (tmp / name).write_bytes(data)
    security = Security(
        tls_ca_file=str(tmp / "ca.pem"),
        tls_client_cert=str(tmp / "c.pem"),
        tls_client_key=str(tmp / "c.key"),
        require_encryption=True,
    )
    try:
        with Client(address, security=security, timeout=5) as client:
            return f"ran {client.submit(sum, [1, 2]).result(timeout=5)}"
    except Exception as exc:
        return f"refused: {type(exc).__name__}"


def test_strangers_certificates_are_refused_and_audited(pools: PoolStack, tmp_path: Path) -> None:
    from distributed import Client

    from ztlab.hub.compute.authority import PoolAuthority

    cluster = _paula_cluster(pools)
    address = str(cluster["scheduler"])
    state = pools.stack.state_dir
    research = PoolAuthority(state / "compute" / "ca" / "research", "research")
    since = len(pools.stack.records())

    # quinn, a trainer with a cluster of his own, holds a valid research certificate
    pools.server("quinn")
    key, csr = _csr()
    answer = pools.api(
        "quinn", "POST", "/pools/research/clusters", {"workers": 1, "gpus": 0, "csr": csr}
    )
    assert answer.status_code == 201, answer.text
    quinn = answer.json()
    ca = quinn["ca"].encode()
    assert _connect(address, ca, quinn["certificate"].encode(), _pem(key), tmp_path).startswith(
        "refused"
    )

    # a certificate from another pool's authority, naming paula
    other = PoolAuthority(tmp_path / "other-ca", "research")  # same name, another key
    key2, csr2 = _csr()
    from ztlab.common.poolidentity import user_identity

    forged = other.sign_request(csr2, user_identity("research", "paula"), minutes=10)
    assert _connect(address, other.ca_pem, forged.certificate, _pem(key2), tmp_path).startswith(
        "refused"
    )

    # an expired certificate from the right authority, naming paula
    ca_key = serialization.load_pem_private_key(
        (state / "compute" / "ca" / "research" / "ca.key").read_bytes(), password=None
    )
    key3 = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    expired = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "paula")]))
        .issuer_name(x509.load_pem_x509_certificate(research.ca_pem).subject)
        .public_key(key3.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=2))
        .not_valid_after(now - datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("ztlab://pool/research/user/paula")]
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    assert _connect(
        address,
        research.ca_pem,
        expired.public_bytes(serialization.Encoding.PEM),
        _pem(key3),
        tmp_path,
    ).startswith("refused")

    # plain TCP
    try:
        with Client(address.replace("tls://", "tcp://"), timeout=5) as client:
            outcome = f"ran {client.submit(sum, [1]).result(timeout=5)}"
    except Exception as exc:
        outcome = f"refused: {type(exc).__name__}"
    assert outcome.startswith("refused")

    deadline = time.monotonic() + 45  # the hub collects refusals every 10 s
    reasons: set[str] = set()
    refused: list[dict[str, object]] = []
    while time.monotonic() < deadline and len(reasons) < 4:
        refused = pools.records("pool.connection_refused", since)
        reasons = {str(r["reason"]) for r in refused}
    assert {r["actor"] for r in refused} == {f"cluster {cluster['id']}"}
    assert any("user quinn is neither the owner (paula)" in r for r in reasons), reasons
    assert "the certificate is not from this pool's authority" in reasons
    assert "the client certificate has expired" in reasons
    assert "not a TLS connection (plain TCP)" in reasons
    holders = {r["holder"] for r in refused}
    assert "ztlab://pool/research/user/quinn" in holders


def test_another_users_kernel_cannot_reach_the_scheduler(pools: PoolStack) -> None:
    address = str(_paula_cluster(pools)["scheduler"])
    assert pools.reaches("quinn", address).startswith("BLOCKED")


def test_a_shared_cluster_is_reached_through_the_hub_by_the_named_user_only(
    pools: PoolStack,
) -> None:
    started = pools.run(
        "quinn",
        "import ztlab.pools\n"
        "team = ztlab.pools.cluster('team', workers=1, share_with=['paula'], timeout=90)\n"
        "print('CLUSTER', team.ztlab_cluster['id'])\n",
        timeout=180,
    )
    assert "CLUSTER" in started.stdout, started.stdout + started.stderr
    cluster_id = started.stdout.split("CLUSTER", 1)[1].split()[0]
    relay = pools.api("quinn", "GET", f"/pools/clusters/{cluster_id}").json()["relay"]
    assert relay
    assert relay.startswith("tls://10.232.255.254:")

    ran = pools.run(
        "paula",
        "import ztlab.pools\n"
        f"c = ztlab.pools.connect({cluster_id!r})\n"
        "print('SUM', c.submit(sum, [1, 2, 3]).result())\n"
        "ztlab.pools.stop(c)\n",
        timeout=120,
    )
    assert "SUM 6" in ran.stdout, ran.stdout + ran.stderr
    # paula's stop closed her client only: quinn's cluster runs on
    assert pools.api("quinn", "GET", f"/pools/clusters/{cluster_id}").json()["state"] == "running"

    # uma is not shared with: the firewall keeps her namespace off the relay's port
    host, port = relay.removeprefix("tls://").rsplit(":", 1)
    assert pools.reaches("uma", relay).startswith("BLOCKED")
    # and the relay itself admits no address but the shared users' (here: the host's own)
    import socket

    since = len(pools.stack.records())
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.settimeout(5)
        assert raw.recv(1) == b""  # closed at once
    refused = pools.records("pool.connection_refused", since)
    assert refused
    assert refused[0]["reason"] == (
        "the relay admits only the users the cluster is shared with, "
        "not an address outside the users' sandboxes"
    )


def test_quota_message_names_the_limit_and_concurrent_requests_never_exceed_it(
    pools: PoolStack,
) -> None:
    pools.server("paula")
    since = len(pools.stack.records())

    def ask() -> requests.Response:
        _, csr = _csr()
        return pools.api("paula", "POST", "/pools/research/clusters", {"workers": 1, "csr": csr})

    with concurrent.futures.ThreadPoolExecutor(4) as executor:
        answers = list(executor.map(lambda _: ask(), range(4)))
    assert {a.status_code for a in answers} == {409}, [a.text for a in answers]
    message = answers[0].json()["message"]
    assert "Pool research allows 1 cluster per user (max_clusters)" in message
    cluster = _paula_cluster(pools)
    assert f"you hold {cluster['id']} (1 worker, 1 GPU, stops by " in message
    rows = pools.api("paula", "GET", "/pools/clusters").json()["clusters"]
    assert [r["id"] for r in rows if r["owner"] == "paula"] == [cluster["id"]]
    assert len(pools.records("pool.cluster_refused", since)) == 4


def test_a_non_member_is_refused_and_audited(pools: PoolStack) -> None:
    pools.server("uma")
    since = len(pools.stack.records())
    result = pools.run(
        "uma",
        "import ztlab.pools\n"
        "try:\n"
        "    ztlab.pools.cluster('research')\n"
        "except Exception as exc:\n"
        "    print('REFUSED', type(exc).__name__, exc)\n",
        timeout=60,
    )
    assert "REFUSED HubAPIError" in result.stdout, result.stdout + result.stderr
    assert "Pool research is not open to you" in result.stdout
    refused = pools.records("pool.cluster_refused", since)
    assert [r["actor"] for r in refused] == ["uma"]


def test_the_client_certificate_is_renewed_while_the_client_lives(pools: PoolStack) -> None:
    since = len(pools.stack.records())
    result = pools.run(
        "paula",
        "import ztlab.pools\n"
        "rows = [c for c in ztlab.pools.clusters() if c['owner'] == 'paula']\n"
        "client = ztlab.pools.connect(rows[0]['id'])\n"
        "renewal = client.ztlab_renewal\n"
        "before = renewal.expires_at\n"
        "renewal.renew()\n"
        "print('RENEWED', renewal.renewed, renewal.expires_at >= before)\n"
        "print('SUM', client.submit(sum, [4, 5]).result())\n"
        "client.close()\n",
        timeout=120,
    )
    assert "RENEWED 1 True" in result.stdout, result.stdout + result.stderr
    assert "SUM 9" in result.stdout
    issued = pools.records("pool.certificate_issued", since)
    # connect's certificate and the renewal's: neither is tied to a new cluster
    assert [(r["actor"], r["cluster"]) for r in issued] == [("paula", ""), ("paula", "")]


def test_an_admin_sees_every_cluster_and_may_stop_any_but_starts_none(pools: PoolStack) -> None:
    rows = pools.api("ada", "GET", "/pools/clusters").json()["clusters"]
    owners = {r["owner"] for r in rows}
    assert {"paula", "quinn"} <= owners
    _, csr = _csr()
    refused = pools.api("ada", "POST", "/pools/research/clusters", {"workers": 1, "csr": csr})
    assert refused.status_code == 403  # the guardrail: admins do not compute
    assert "Pool research is not open to you" in refused.json()["message"]
    team = next(r for r in rows if r["owner"] == "quinn" and r["pool"] == "team")
    stopped = pools.api("ada", "DELETE", f"/pools/clusters/{team['id']}")
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["stop_reason"] == "stopped by ada"
    # quinn's other cluster (research) runs on; the relay of the team cluster is gone
    left = pools.api("quinn", "GET", "/pools/clusters").json()["clusters"]
    assert [r["pool"] for r in left if r["owner"] == "quinn"] == ["research"]


def test_stopping_ends_the_processes_and_releases_the_gpu(pools: PoolStack) -> None:
    import socket

    cluster = _paula_cluster(pools)
    since = len(pools.stack.records())
    # a refusal just before the stop is collected from the scheduler before it goes
    host, port = str(cluster["scheduler"]).removeprefix("tls://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(b"not tls\n")
    result = pools.run(
        "paula",
        f"import ztlab.pools\nprint('STOPPED', ztlab.pools.stop({cluster['id']!r})['state'])",
        timeout=60,
    )
    assert "STOPPED stopped" in result.stdout, result.stdout + result.stderr
    stopped = pools.records("pool.cluster_stopped", since)
    assert stopped[0]["reason"] == "stopped by paula"
    refused = pools.records("pool.connection_refused", since)
    assert [r["reason"] for r in refused] == ["not a TLS connection (plain TCP)"]
    assert stopped[0]["leases_released"]
    assert pools.records("gpu.lease.released", since)
    from ztlab.hub.sandbox.cgroups import CgroupManager

    cgroups = CgroupManager.detect(parent="ztlab")
    left = [n for n in cgroups.names() if str(cluster["id"]) in n]
    assert not left
    assert not Path(f"/run/ztlab/clusters/{cluster['id']}").exists()


def test_the_owners_server_stopping_ends_their_cluster(pools: PoolStack) -> None:
    rows = [
        r
        for r in pools.api("quinn", "GET", "/pools/clusters").json()["clusters"]
        if r["owner"] == "quinn"
    ]
    assert len(rows) == 1, "quinn's research cluster should run (ada stopped his team one)"
    since = len(pools.stack.records())
    stop_server(pools.stack, "quinn", pools.tokens["quinn"])
    stopped = pools.records("pool.cluster_stopped", since)
    assert sorted(r["cluster"] for r in stopped) == sorted(r["id"] for r in rows)
    assert stopped[0]["reason"].startswith("the owner's server")
    assert not pools.api("quinn", "GET", "/pools/clusters").json()["clusters"]
