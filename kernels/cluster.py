"""The processes of one user's Dask cluster: its scheduler and its workers.

The control plane starts them (:mod:`ztlab.hub.compute.local`) as the owner's account, in
the owner's network namespace, each in its own cgroup (a worker's device fence opens only
its GPU), with a directory that only that account may read bound at ``/cluster``:

- ``cluster.json`` -- the spec: who the cluster admits (:class:`ClusterAccess`), the
  scheduler's address, the workers' GPUs, memory and threads, where to report refusals;
- ``ca.pem`` -- the pool's CA certificate; ``scheduler.pem``/``.key`` and
  ``worker-N.pem``/``.key`` -- certificates that live at most an hour, renewed by the
  control plane in place (:func:`watch_certificates` loads them into the running TLS
  contexts);

Refused connections are kept (:class:`Refusals`) until the control plane collects them
from the scheduler (``ztlab_refusals``) and records them in the audit log.

Every listener of the cluster is an :class:`IdentityTLSListener`: after the TLS handshake
(which already refuses plain TCP, another pool's certificates and expired ones), the
certificate's holder must be admitted by :meth:`ClusterAccess.refusal`. The owner can change
these processes -- they run as the owner -- which can only open the owner's own cluster;
other users cannot reach the owner's network namespace at all (the control plane's firewall).

Run as ``python -I -m ztlab.kernels.cluster scheduler|worker INDEX [/cluster]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from ztlab.common.poolidentity import ClusterAccess, PeerIdentity, identity_of, parse_uri

#: where the control plane binds the cluster's directory
CLUSTER_DIR: Final = Path("/cluster")
#: seconds between looks at the certificate files
CERTIFICATE_CHECK_SECONDS: Final = 10.0
#: the same refusal (peer address and reason) is listed at most once this often
REPORT_INTERVAL_SECONDS: Final = 10.0

_log = logging.getLogger("ztlab.cluster")


class Refusals:
    """Refused connections, kept until the control plane collects them.

    The scheduler answers the control plane's ``ztlab_refusals`` call with what it holds
    (its own and what its workers sent with ``ztlab_report``); the hub records each in the
    audit log. The same peer address and reason within :data:`REPORT_INTERVAL_SECONDS` is
    counted, not repeated.
    """

    def __init__(self, maxlen: int = 1000) -> None:
        self._held: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self._last: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()

    def __call__(self, *, peer: str, reason: str, holder: PeerIdentity | None) -> None:
        host = peer.rsplit(":", 1)[0]
        now = time.time()
        with self._lock:
            last = self._last.get((host, reason))
            if (
                last is not None
                and now - last["at"] < REPORT_INTERVAL_SECONDS
                and last in self._held
            ):
                last["count"] += 1
                return
            entry = {
                "peer": peer,
                "reason": reason,
                "holder": holder.uri if holder else None,
                "at": now,
                "count": 1,
            }
            self._last[(host, reason)] = entry
            self._held.append(entry)

    def add(self, entries: list[dict[str, Any]]) -> None:
        """What a worker sent."""
        with self._lock:
            for entry in entries[: self._held.maxlen]:
                if isinstance(entry, dict):
                    self._held.append(
                        {k: entry.get(k) for k in ("peer", "reason", "holder", "at", "count")}
                    )

    def drain(self) -> list[dict[str, Any]]:
        """Everything held, once."""
        with self._lock:
            held = list(self._held)
            self._held.clear()
            self._last.clear()
        return held


def identity_backend(access: ClusterAccess, report: Callable[..., None]) -> Any:
    """A ``tls://`` comm backend whose listeners admit only whom ``access`` admits."""
    from distributed.comm.tcp import TLSBackend, TLSListener

    class IdentityTLSListener(TLSListener):
        """Distributed's TLS listener, then the holder check on every connection."""

        async def _prepare_stream(self, stream: Any, address: str) -> Any:
            try:
                await stream.wait_for_handshake()
            except OSError as exc:
                reason = _handshake_reason(exc)
                _log.warning("refused %s: %s", address, reason)
                report(peer=address, reason=reason, holder=None)
                return None
            der = stream.socket.getpeercert(binary_form=True) if stream.socket else None
            holder = identity_of(der) if der else None
            refusal = access.refusal(holder)
            if refusal is not None:
                _log.warning("refused %s (%s): %s", address, holder, refusal)
                report(peer=address, reason=refusal, holder=holder)
                stream.close()
                return None
            return stream

    class IdentityTLSBackend(TLSBackend):
        _listener_class = IdentityTLSListener

    return IdentityTLSBackend()


def _handshake_reason(exc: OSError) -> str:
    real = getattr(exc, "real_error", None) or exc
    text = str(real)
    if isinstance(real, ssl.SSLError):
        reason = getattr(real, "reason", None) or ""
        if "CERTIFICATE_EXPIRED" in reason or "certificate has expired" in text:
            return "the client certificate has expired"
        if "WRONG_VERSION_NUMBER" in reason or "HTTP_REQUEST" in reason:
            return "not a TLS connection (plain TCP)"
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason:
            return "no client certificate"
        if any(
            mark in reason
            for mark in (
                "CERTIFICATE_VERIFY_FAILED",
                "UNKNOWN_CA",
                "DECRYPT_ERROR",
                "BAD_SIGNATURE",
            )
        ):
            return "the certificate is not from this pool's authority"
        return f"TLS handshake failed: {reason or text}"
    return f"TLS handshake failed: {text or type(real).__name__}"


def _peer_kind(comm: Any) -> str | None:
    """What the certificate of the peer of ``comm`` names (it was admitted already)."""
    peercert = (getattr(comm, "extra_info", None) or {}).get("peercert") or {}
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "URI":
            identity = parse_uri(value)
            if identity is not None:
                return identity.kind
    return None


def install(access: ClusterAccess, report: Callable[..., None]) -> None:
    """Make every ``tls://`` listener of this process check the peer's identity."""
    from distributed.comm import registry

    registry.backends["tls"] = identity_backend(access, report)


def load_spec(directory: Path) -> dict[str, Any]:
    """The cluster's spec, checked enough to fail with a clear message."""
    path = directory / "cluster.json"
    try:
        spec: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"ztlab cluster: cannot read {path}: {exc}") from exc
    for key in ("access", "scheduler", "workers"):
        if key not in spec:
            raise SystemExit(f"ztlab cluster: {path} lacks {key!r}")
    return spec


def watch_certificates(contexts: list[ssl.SSLContext], cert: Path, key: Path) -> asyncio.Task[None]:
    """Load renewed certificate files into ``contexts`` (new connections use them)."""

    async def watch() -> None:
        seen = cert.stat().st_mtime_ns
        while True:
            await asyncio.sleep(CERTIFICATE_CHECK_SECONDS)
            try:
                mtime = cert.stat().st_mtime_ns
                if mtime != seen:
                    for context in contexts:
                        context.load_cert_chain(cert, key)
                    seen = mtime
                    _log.info("loaded the renewed certificate %s", cert)
            except (OSError, ssl.SSLError) as exc:  # half-written: try again next time
                _log.warning("cannot load %s yet: %s", cert, exc)

    return asyncio.get_running_loop().create_task(watch())


def _contexts(server: Any) -> list[ssl.SSLContext]:
    found = [server.connection_args.get("ssl_context")]
    found += [
        getattr(listener, "server_args", {}).get("ssl_options") for listener in server.listeners
    ]
    return [c for c in found if isinstance(c, ssl.SSLContext)]


async def run_scheduler(directory: Path, spec: dict[str, Any]) -> None:
    """The scheduler, until it is told to stop."""
    from distributed import Scheduler
    from distributed.security import Security

    access = ClusterAccess.from_json(spec["access"], source=str(directory / "cluster.json"))
    refusals = Refusals()
    install(access, refusals)
    cert, key = directory / "scheduler.pem", directory / "scheduler.key"
    security = Security(
        tls_ca_file=str(directory / "ca.pem"),
        tls_scheduler_cert=str(cert),
        tls_scheduler_key=str(key),
        require_encryption=True,
    )
    host, port = spec["scheduler"]["host"], int(spec["scheduler"]["port"])
    scheduler = Scheduler(
        host=host,
        port=port,
        protocol="tls",
        security=security,
        dashboard_address=f"{host}:{int(spec['scheduler']['dashboard_port'])}",
        http_prefix=spec["scheduler"].get("http_prefix", "/"),
        idle_timeout=None,
    )

    def drain(comm: Any) -> list[dict[str, Any]]:
        """For the control plane only: the refusals held (and forget them)."""
        return refusals.drain() if _peer_kind(comm) == "control-plane" else []

    def report(comm: Any, entries: Any = ()) -> None:
        """From this cluster's workers only: their refusals."""
        if _peer_kind(comm) == "worker" and isinstance(entries, list | tuple):
            refusals.add(list(entries))

    scheduler.handlers["ztlab_refusals"] = drain
    scheduler.handlers["ztlab_report"] = report
    await scheduler
    watcher = watch_certificates(_contexts(scheduler), cert, key)
    await _until_signalled()
    watcher.cancel()
    await scheduler.close()


def worker_security(directory: Path, index: int) -> Any:
    """Worker ``index``'s ``Security`` (its own certificate, the pool's CA)."""
    from distributed.security import Security

    return Security(
        tls_ca_file=str(directory / "ca.pem"),
        tls_worker_cert=str(directory / f"worker-{index}.pem"),
        tls_worker_key=str(directory / f"worker-{index}.key"),
        require_encryption=True,
    )


async def run_worker(
    directory: Path, spec: dict[str, Any], index: int, *, nanny: bool = False
) -> None:
    """Worker ``index``: a dask-cuda worker on its GPU when dask-cuda imports, else a Dask
    worker (in this process, or with ``nanny`` in a child process, as dask-cuda runs it).

    A worker in a child process sets itself up with this module as its Dask *preload*
    (:func:`dask_setup`): the identity check on its listener, certificate renewal and the
    forwarding of refusals happen there, where its connections are.
    """
    from distributed import Nanny, Worker

    access = ClusterAccess.from_json(spec["access"], source=str(directory / "cluster.json"))
    scheduler = f"tls://{spec['scheduler']['host']}:{int(spec['scheduler']['port'])}"
    gpus: list[str] = list(spec.get("gpus", []))
    gpu = gpus[index] if index < len(gpus) else None
    options: dict[str, Any] = {
        "security": worker_security(directory, index),
        "host": spec["scheduler"]["host"],
        "name": f"{access.cluster}-{index}",
        "nthreads": int(spec.get("threads", 1)),
        "memory_limit": int(spec.get("memory", 0)) or "auto",
        "dashboard": False,
        "resources": {"GPU": 1} if gpu is not None else None,
    }
    # what a worker in a child process reads in its preload (children inherit it)
    os.environ[DIRECTORY_VARIABLE] = str(directory)
    os.environ[INDEX_VARIABLE] = str(index)
    install(access, _PROCESS_REFUSALS)  # this process's listeners (a nanny's too)
    worker = _cuda_worker(scheduler, options) if gpu is not None else None
    if worker is None and nanny:
        worker = Nanny(scheduler, preload=[PRELOAD], protocol="tls", **options)
    if worker is None:
        worker = Worker(scheduler, protocol="tls", **options)
    await worker
    tasks = _set_up_worker(worker, directory, index) if isinstance(worker, Worker) else []
    await _until_signalled(worker)
    for task in tasks:
        task.cancel()
    await worker.close()


#: this module, as a Dask preload of workers in child processes (dask-cuda's nannies)
PRELOAD: Final = "ztlab.kernels.cluster"
#: where a worker in a child process finds its cluster directory and its index
DIRECTORY_VARIABLE: Final = "ZTLAB_CLUSTER_DIR"
INDEX_VARIABLE: Final = "ZTLAB_CLUSTER_WORKER"
#: the refusals of this process's listeners
_PROCESS_REFUSALS = Refusals()


def _set_up_worker(worker: Any, directory: Path, index: int) -> list[asyncio.Task[None]]:
    """Certificate renewal and refusal forwarding for a worker of this process."""
    cert, key = directory / f"worker-{index}.pem", directory / f"worker-{index}.key"
    loop = asyncio.get_running_loop()
    return [
        watch_certificates(_contexts(worker), cert, key),
        loop.create_task(_forward(worker, _PROCESS_REFUSALS)),
    ]


def _preload_install() -> None:
    """Imported as a worker's preload (before the worker listens): the identity check."""
    folder = os.environ.get(DIRECTORY_VARIABLE)
    if folder is None:
        return
    spec = load_spec(Path(folder))
    access = ClusterAccess.from_json(spec["access"], source=f"{folder}/cluster.json")
    install(access, _PROCESS_REFUSALS)


async def dask_setup(worker: Any) -> None:
    """Dask's preload hook, in the worker's own process: renewal and refusal forwarding."""
    folder, index = os.environ.get(DIRECTORY_VARIABLE), os.environ.get(INDEX_VARIABLE)
    if folder is not None and index is not None:
        worker._ztlab_tasks = _set_up_worker(worker, Path(folder), int(index))


def _cuda_worker(scheduler: str, options: dict[str, Any]) -> Any:
    """A dask-cuda worker for the leased GPU, or ``None`` where dask-cuda does not import
    (the worker then runs on the CPU with the GPU still leased and fenced). dask-cuda runs
    its worker in a child process (a nanny): this module is its preload."""
    try:
        from dask_cuda import CUDAWorker
    except Exception as exc:
        _log.warning("dask-cuda is not usable here (%s): a CPU worker runs instead", exc)
        return None
    return CUDAWorker(
        scheduler,
        security=options["security"],
        host=options["host"],
        name=options["name"],
        nthreads=options["nthreads"],
        memory_limit=options["memory_limit"],
        dashboard=False,
        resources=options["resources"],
        preload=[PRELOAD],
    )


async def _forward(worker: Any, refusals: Refusals) -> None:
    """Send the worker's refusals to its scheduler, which the control plane asks."""
    while True:
        await asyncio.sleep(2.0)
        held = refusals.drain()
        if not held:
            continue
        try:
            await worker.scheduler.ztlab_report(entries=held)
        except Exception as exc:
            refusals.add(held)
            _log.warning("cannot pass refusals to the scheduler: %s", exc)


async def _until_signalled(server: Any = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    while not stop.is_set():
        status = str(getattr(server, "status", ""))
        if status in ("Status.closed", "Status.closing", "Status.failed"):
            return
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except TimeoutError:
            continue


def main(argv: list[str] | None = None) -> int:
    """``scheduler [DIR]`` or ``worker INDEX [DIR]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args or args[0] not in ("scheduler", "worker"):
        print(
            "usage: python -m ztlab.kernels.cluster scheduler|worker INDEX [DIR]", file=sys.stderr
        )
        return 2
    role = args.pop(0)
    nanny = "--nanny" in args  # a worker in a child process, as dask-cuda runs one
    args = [a for a in args if a != "--nanny"]
    index = int(args.pop(0)) if role == "worker" else 0
    directory = Path(args[0]) if args else CLUSTER_DIR
    spec = load_spec(directory)
    os.umask(0o077)
    if role == "scheduler":
        asyncio.run(run_scheduler(directory, spec))
    else:
        asyncio.run(run_worker(directory, spec, index, nanny=nanny))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
_preload_install()  # as a worker's preload; a no-op anywhere else
