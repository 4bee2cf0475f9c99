"""A pool's Dask cluster over mutual TLS, against the same cluster over plain TCP.

``python -m bench pools``. The TLS cluster is set up as production sets it up: a pool CA
(:class:`~ztlab.hub.compute.authority.PoolAuthority`) issues the scheduler's and the
worker's certificates with their keys and signs the client's certificate from a CSR; the
scheduler and one worker (one thread, no nanny) run as ``python -I -m ztlab.kernels.cluster
scheduler|worker 0 DIR`` with ``cluster.json`` beside the certificates, so that every
listener checks the holder of each connection's certificate; the client connects like
``ztlab.pools`` does (``Security(..., require_encryption=True)`` to ``tls://``).

The baseline, running at the same time in the same run, has the same shape: ``dask
scheduler`` and ``dask worker --no-nanny --nthreads 1`` as two processes over ``tcp://``
with the same memory limit, and a plain ``Client``. The measurements take turns between
the clusters so that noise hits them alike, and each figure is a median:

- **task graph**: ``client.gather(client.map(neg, range(N), pure=False))`` (2,000 tiny
  tasks). Target: TLS under 1.05x the time over TCP.
- **transfer**: a 1 MB and a 100 MB ``bytes`` result (``os.urandom``: lz4 leaves it as it
  is) made once on the worker, then fetched again and again with ``Future.result()`` -- as
  a kernel's client does, through the scheduler (worker -> scheduler -> client, two
  connections) -- and once more straight from the worker (``client.gather(direct=True)``,
  one connection: the shape of a worker-to-worker transfer). Throughput over TLS against
  TCP; target: at least 0.70x (Dask measured about 0.30x for 1 MB messages in
  dask/distributed#5450).

Then the same over TLS clusters that differ only in the TLS settings, set the way a
deployment would set them -- the ``distributed.comm.tls.*`` settings through ``DASK_*``
environment variables of the scheduler and worker and in the client's ``Security``; TLS 1.3
cipher suites, which Python's ``ssl`` cannot set, in an OpenSSL configuration file
(``OPENSSL_CONF``) of the scheduler and worker, which choose the suite as the servers of
every connection that carries data. These rows report their ratio to TCP too.
"""

from __future__ import annotations

import json
import operator
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._table import Row, median

MB = 1_000_000
POOL = "bench"
CLUSTER = "be0c0001"
OWNER = "alice"
#: the worker's memory limit, far above what the measurements keep in it
MEMORY = 4 << 30
START_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class Variant:
    """TLS settings of one TLS cluster (all processes of it: scheduler, worker, client)."""

    name: str
    #: ``distributed.comm.tls.ciphers`` (an OpenSSL cipher string: TLS 1.2 and below)
    ciphers: str | None = None
    #: ``distributed.comm.tls.max-version``
    max_version: str | None = None
    #: TLS 1.3 cipher suites (OpenSSL ``Ciphersuites``) of the scheduler and worker
    suites: str | None = None
    #: extra dask config of the scheduler and worker (and the client), ``DASK_*`` style
    config: dict[str, str] = field(default_factory=dict)


PRODUCTION = Variant("production settings")
VARIANTS = [
    Variant("TLS 1.3 AES-128-GCM", suites="TLS_AES_128_GCM_SHA256"),
    Variant("TLS 1.3 CHACHA20-POLY1305", suites="TLS_CHACHA20_POLY1305_SHA256"),
    Variant("TLS 1.2 ECDHE-ECDSA-AES128-GCM", ciphers="ECDHE-ECDSA-AES128-GCM-SHA256", max_version="1.2"),
    Variant("TLS 1.2 ECDHE-ECDSA-AES256-GCM", ciphers="ECDHE-ECDSA-AES256-GCM-SHA384", max_version="1.2"),
]


@dataclass
class Cluster:
    """A running cluster and a client of it."""

    name: str
    client: Any
    cipher: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)


def _port() -> int:
    from bench.login import _port as free_port

    return free_port()


def _spawn(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "OPENSSL_"))}
    env["DASK_DISTRIBUTED__LOGGING__DISTRIBUTED"] = "warning"
    return {**env, **extra}


def _connect(
    address: str, procs: list[subprocess.Popen[bytes]], logs: list[Path], **kwargs: Any
) -> Any:
    """A client of the cluster at ``address``, once its worker has joined."""
    from distributed import Client

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited:\n{log.read_text()[-3000:]}")
        try:
            client = Client(address, timeout=5, **kwargs)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    client.wait_for_workers(1, timeout=START_TIMEOUT_S)
    return client


@contextmanager
def _tcp_cluster(root: Path) -> Iterator[Cluster]:
    """``dask scheduler`` and ``dask worker --no-nanny`` over ``tcp://``."""
    port, dashboard = _port(), _port()
    env = _env({})
    logs = [root / "tcp-scheduler.log", root / "tcp-worker.log"]
    address = f"tcp://127.0.0.1:{port}"
    procs = [
        _spawn(
            [
                sys.executable,
                "-I",
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--protocol",
                "tcp",
                "--dashboard-address",
                f"127.0.0.1:{dashboard}",
                "--idle-timeout",
                "0",
            ],
            logs[0],
            env,
        )
    ]
    try:
        procs.append(
            _spawn(
                [
                    sys.executable,
                    "-I",
                    "-m",
                    "distributed.cli.dask_worker",
                    address,
                    "--host",
                    "127.0.0.1",
                    "--no-nanny",
                    "--nthreads",
                    "1",
                    "--memory-limit",
                    str(MEMORY),
                    "--no-dashboard",
                ],
                logs[1],
                env,
            )
        )
        client = _connect(address, procs, logs)
        try:
            yield Cluster("tcp", client, procs=procs)
        finally:
            client.close()
    finally:
        _stop(procs)


def _client_credentials(authority: Any, directory: Path) -> tuple[Path, Path]:
    """The client's key and a certificate signed from its CSR, as ``ztlab.pools`` gets them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from ztlab.common.poolidentity import user_identity

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    issued = authority.sign_request(
        csr.public_bytes(serialization.Encoding.PEM), user_identity(POOL, OWNER), minutes=60
    )
    cert, key_file = directory / "client.pem", directory / "client.key"
    cert.write_bytes(issued.certificate)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return cert, key_file


@contextmanager
def _tls_cluster(root: Path, authority: Any, variant: Variant) -> Iterator[Cluster]:
    """``python -m ztlab.kernels.cluster scheduler|worker`` with the pool's certificates."""
    from distributed.security import Security

    from ztlab.common.poolidentity import ClusterAccess, scheduler_identity, worker_identity

    directory = Path(tempfile.mkdtemp(prefix="cluster-", dir=root))
    (directory / "ca.pem").write_bytes(authority.ca_pem)
    for name, holder in (
        ("scheduler", scheduler_identity(POOL, CLUSTER)),
        ("worker-0", worker_identity(POOL, CLUSTER)),
    ):
        issued = authority.issue_with_key(holder, minutes=60, addresses=("127.0.0.1",))
        (directory / f"{name}.pem").write_bytes(issued.certificate)
        (directory / f"{name}.key").write_bytes(issued.key)
        (directory / f"{name}.key").chmod(0o600)
    port, dashboard = _port(), _port()
    spec = {
        "access": ClusterAccess(POOL, CLUSTER, OWNER).as_json(),
        "scheduler": {"host": "127.0.0.1", "port": port, "dashboard_port": dashboard},
        "workers": 1,
        "memory": MEMORY,
        "threads": 1,
    }
    (directory / "cluster.json").write_text(json.dumps(spec))
    extra = dict(variant.config)
    if variant.ciphers:
        extra["DASK_DISTRIBUTED__COMM__TLS__CIPHERS"] = variant.ciphers
    if variant.max_version:
        extra["DASK_DISTRIBUTED__COMM__TLS__MAX_VERSION"] = variant.max_version
    if variant.suites:
        conf = directory / "openssl.cnf"
        conf.write_text(
            "openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n"
            "[ssl_sect]\nsystem_default = system_default_sect\n"
            f"[system_default_sect]\nCiphersuites = {variant.suites}\n"
        )
        extra["OPENSSL_CONF"] = str(conf)
    env = _env(extra)
    logs = [directory / "scheduler.log", directory / "worker.log"]
    module = [sys.executable, "-I", "-m", "ztlab.kernels.cluster"]
    procs = [_spawn([*module, "scheduler", str(directory)], logs[0], env)]
    try:
        procs.append(_spawn([*module, "worker", "0", str(directory)], logs[1], env))
        cert, key = _client_credentials(authority, directory)
        options: dict[str, Any] = {}
        if variant.ciphers:
            options["tls_ciphers"] = variant.ciphers
        if variant.max_version:
            options["tls_max_version"] = ssl.TLSVersion.TLSv1_2
        security = Security(
            tls_ca_file=str(directory / "ca.pem"),
            tls_client_cert=str(cert),
            tls_client_key=str(key),
            require_encryption=True,
            **options,
        )
        client = _connect(f"tls://127.0.0.1:{port}", procs, logs, security=security)
        try:
            yield Cluster(variant.name, client, _cipher(client, security), procs)
        finally:
            client.close()
    finally:
        _stop(procs)


def _cipher(client: Any, security: Any) -> str:
    """The protocol and cipher of a connection from ``client`` to the cluster's worker."""
    from distributed.comm import connect

    worker = next(iter(client.scheduler_info()["workers"]))

    async def ask() -> str:
        comm = await connect(worker, **security.get_connection_args("client"))
        try:
            name, protocol, _ = comm.extra_info["cipher"]
            return f"{protocol} {name}"
        finally:
            await comm.close()

    return str(client.sync(ask))


# -- measurements ---------------------------------------------------------------------------


def _graph(client: Any, tasks: int) -> Callable[[], object]:
    def action() -> object:
        return client.gather(client.map(operator.neg, range(tasks), pure=False))

    return action


def _fetch(client: Any, size: int, *, direct: bool) -> Callable[[], object]:
    from distributed import wait

    future = client.submit(os.urandom, size, pure=False)
    wait(future)

    def action() -> object:
        data = client.gather(future, direct=direct)
        assert len(data) == size
        return data

    return action


def _timed(repeats: int, clusters: list[Cluster], make: Callable[[Any], Callable[[], object]]) -> list[float]:
    """The median time of ``make(client)()`` on each cluster, taking turns after a warm-up."""
    actions = [make(cluster.client) for cluster in clusters]
    for action in actions:
        action()
    samples: list[list[float]] = [[] for _ in clusters]
    for _ in range(repeats):
        for action, times in zip(actions, samples, strict=True):
            start = time.perf_counter()
            action()
            times.append(time.perf_counter() - start)
    return [median(times) for times in samples]


def run(*, quick: bool = False) -> list[Row]:
    from ztlab.hub.compute.authority import PoolAuthority

    tasks = 500 if quick else 2000
    graph_repeats = 3 if quick else 7
    sizes = [(1 * MB, 5 if quick else 30), (100 * MB, 3 if quick else 7)]
    variants = [] if quick else VARIANTS
    with tempfile.TemporaryDirectory(prefix="ztlab-bench-pools-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        authority = PoolAuthority(root / "ca", POOL)
        tcp = stack.enter_context(_tcp_cluster(root))
        tls = [stack.enter_context(_tls_cluster(root, authority, v)) for v in [PRODUCTION, *variants]]
        clusters = [tcp, *tls]
        rows: list[Row] = []
        graph = _timed(graph_repeats, clusters, lambda c: _graph(c, tasks))
        rows += _rows(
            f"{tasks:,} tasks, one worker thread (median of {graph_repeats})",
            clusters,
            [t * 1000 for t in graph],
            "ms",
            "< 1.05x",
            lambda tls_ms, tcp_ms: tls_ms / tcp_ms,
        )
        for size, repeats in sizes:
            for direct, how in ((False, "through the scheduler"), (True, "straight from the worker")):
                times = _timed(repeats, clusters, lambda c: _fetch(c, size, direct=direct))
                rows += _rows(
                    f"{size // MB} MB result {how} (median of {repeats})",
                    clusters,
                    [size / MB / t for t in times],
                    "MB/s",
                    ">= 0.70x",
                    lambda tls_rate, tcp_rate: tls_rate / tcp_rate,
                )
    return rows


def _rows(
    what: str,
    clusters: list[Cluster],
    values: list[float],
    unit: str,
    target: str,
    ratio: Callable[[float, float], float],
) -> list[Row]:
    baseline = f"tcp:// same shape: {values[0]:,.1f} {unit}"
    rows = [
        Row(
            "pools",
            f"{what}, TLS ({clusters[1].cipher})",
            values[1],
            unit,
            target=target,
            baseline=baseline,
            ratio=ratio(values[1], values[0]),
        )
    ]
    rows += [
        Row(
            "pools",
            f"  variant: {cluster.name} ({cluster.cipher})",
            value,
            unit,
            baseline=baseline,
            ratio=ratio(value, values[0]),
        )
        for cluster, value in zip(clusters[2:], values[2:], strict=True)
    ]
    return rows
