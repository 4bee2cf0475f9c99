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

- **task graph**: ``client.gather(client.map(neg, range(1000), pure=False))``. Target:
  TLS under 1.05x the time over TCP.
- **transfer**: a 1 MB and a 100 MB ``bytes`` result (random, so that nothing could
  compress it) made once on the worker, then fetched again and again: with
  ``client.gather`` as a kernel's client does by default, through the scheduler (worker ->
  scheduler -> client: two connections), and straight from the worker (``direct=True``,
  one connection: also the shape of a worker-to-worker transfer). Throughput over TLS
  against TCP fetched the same way; target: at least 0.70x (Dask measured about 0.30x for
  1 MB messages in dask/distributed#5450). One more row compares TLS straight from the
  worker (a client made with ``direct_to_workers=True``) with TCP through the scheduler,
  plain Dask's default.

For 100 MB the same also runs on TLS clusters that differ only in the TLS settings, set as
a deployment would set them: ``distributed.comm.tls.ciphers``/``max-version`` through
``DASK_*`` environment variables of the scheduler and worker and in the client's
``Security``; TLS 1.3 cipher suites, which Python's ``ssl`` cannot set, in an OpenSSL
configuration file (``OPENSSL_CONF``) of the scheduler and worker, the servers of every
connection that carries the data. Each such row names the cipher its connections
negotiated. (The cipher barely matters: the cost is AES-GCM itself and the 16 KB TLS
records, each a separate ``SSL_read`` however large the buffer offered.)
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
    max_version: ssl.TLSVersion | None = None
    #: TLS 1.3 cipher suites (OpenSSL ``Ciphersuites``) of the scheduler and worker
    suites: str | None = None


PRODUCTION = Variant("production settings")
VARIANTS = [
    Variant("TLS 1.3 AES-128-GCM", suites="TLS_AES_128_GCM_SHA256"),
    Variant("TLS 1.3 CHACHA20-POLY1305", suites="TLS_CHACHA20_POLY1305_SHA256"),
    Variant(
        "TLS 1.2 ECDHE-ECDSA-AES128-GCM",
        ciphers="ECDHE-ECDSA-AES128-GCM-SHA256",
        max_version=ssl.TLSVersion.TLSv1_2,
    ),
    Variant(
        "TLS 1.2 ECDHE-ECDSA-AES256-GCM",
        ciphers="ECDHE-ECDSA-AES256-GCM-SHA384",
        max_version=ssl.TLSVersion.TLSv1_2,
    ),
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
    """Stop the processes one after the other, the last started first (the workers go
    before their scheduler, which they tell that they leave)."""
    for proc in reversed(procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


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
    env = dict(os.environ)
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
    extra: dict[str, str] = {}
    if variant.ciphers:
        extra["DASK_DISTRIBUTED__COMM__TLS__CIPHERS"] = variant.ciphers
    if variant.max_version:
        extra["DASK_DISTRIBUTED__COMM__TLS__MAX_VERSION"] = {
            ssl.TLSVersion.TLSv1_2: "1.2",
            ssl.TLSVersion.TLSv1_3: "1.3",
        }[variant.max_version]
    if variant.suites:
        conf = directory / "openssl.cnf"
        conf.write_text(
            "openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n"
            "[ssl_sect]\nsystem_default = system_default_sect\n"
            f"[system_default_sect]\nCiphersuites = {variant.suites}\n"
        )
        extra["OPENSSL_CONF"] = str(conf)
    env = {**os.environ, **extra}
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
            options["tls_max_version"] = variant.max_version
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
    from distributed.comm.core import connect

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


def _timed(repeats: int, actions: list[Callable[[], object]]) -> list[float]:
    """The median time of each action, the actions taking turns so that noise hits all alike."""
    samples: list[list[float]] = [[] for _ in actions]
    for _ in range(repeats):
        for action, times in zip(actions, samples, strict=True):
            start = time.perf_counter()
            action()
            times.append(time.perf_counter() - start)
    return [median(times) for times in samples]


def _graph(client: Any, tasks: int) -> Callable[[], object]:
    def action() -> object:
        return client.gather(client.map(operator.neg, range(tasks), pure=False))

    return action


def _fetchers(clusters: list[Cluster], size: int) -> list[Callable[[], object]]:
    """For each cluster, fetching a ``size``-byte result through the scheduler; then for each,
    fetching it straight from the worker. Each fetched once (the connections opened)."""
    from distributed import wait

    futures = [cluster.client.submit(os.urandom, size, pure=False) for cluster in clusters]
    wait(futures)

    def fetch(cluster: Cluster, future: Any, direct: bool) -> Callable[[], object]:
        def action() -> object:
            data = cluster.client.gather(future, direct=direct)
            assert len(data) == size
            return data

        return action

    actions = [
        fetch(cluster, future, direct)
        for direct in (False, True)
        for cluster, future in zip(clusters, futures, strict=True)
    ]
    for action in actions:
        action()
    return actions


def run(*, quick: bool = False) -> list[Row]:
    from ztlab.hub.compute.authority import PoolAuthority

    tasks, graph_repeats = (250, 3) if quick else (1000, 7)
    sizes = [(1 * MB, 30 if quick else 100), (100 * MB, 3 if quick else 7)]
    variants = [] if quick else VARIANTS
    with tempfile.TemporaryDirectory(prefix="ztlab-bench-pools-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        authority = PoolAuthority(root / "ca", POOL)
        tcp = stack.enter_context(_tcp_cluster(root))
        tls = stack.enter_context(_tls_cluster(root, authority, PRODUCTION))

        for cluster in (tcp, tls):  # warm-up
            _graph(cluster.client, 50)()
        graph = _timed(graph_repeats, [_graph(c.client, tasks) for c in (tcp, tls)])
        rows = [
            _row(
                f"{tasks:,} tiny tasks over TLS ({tls.cipher}), median of {graph_repeats}",
                graph[1] * 1000,
                graph[0] * 1000,
                "ms",
                target="< 1.05x",
            )
        ]
        for size, repeats in sizes:
            clusters = [tcp, tls]
            if size > MB:  # the variants where they could matter, started only now
                clusters += [
                    stack.enter_context(_tls_cluster(root, authority, v)) for v in variants
                ]
            rates = [size / MB / t for t in _timed(repeats, _fetchers(clusters, size))]
            through, direct = rates[: len(clusters)], rates[len(clusters) :]
            for how, measured in (("through the scheduler", through), ("from the worker", direct)):
                rows.append(
                    _row(
                        f"{size // MB} MB result {how} over TLS, median of {repeats}",
                        measured[1],
                        measured[0],
                        "MB/s",
                        target=">= 0.70x",
                    )
                )
                rows += [
                    _row(f"  variant {cluster.cipher}", rate, measured[0], "MB/s")
                    for cluster, rate in zip(clusters[2:], measured[2:], strict=True)
                ]
            rows.append(
                _row(
                    "  from the worker over TLS (direct_to_workers=True) against"
                    " Dask's default path",
                    direct[1],
                    through[0],
                    "MB/s",
                    how="through the scheduler",
                )
            )
    return rows


def _row(
    metric: str,
    value: float,
    baseline: float,
    unit: str,
    *,
    target: str = "",
    how: str = "",
) -> Row:
    """A TLS figure against the TCP cluster's (measured the same way unless ``how`` says)."""
    return Row(
        "pools",
        metric,
        value,
        unit,
        target=target,
        baseline=f"tcp:// {how or 'same shape'}: {baseline:,.1f} {unit}",
        ratio=value / baseline,
    )
