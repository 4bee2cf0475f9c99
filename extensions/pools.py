"""``ztlab.pools`` in a kernel: ask the control plane for a Dask cluster, get a client.

::

    import ztlab.pools
    client = ztlab.pools.cluster("research", workers=2, gpus=1)
    client.submit(sum, [1, 2, 3]).result()
    ztlab.pools.stop(client)

The kernel asks; the control plane decides (policy, the pool's roles and quotas, GPU
leases) and starts the cluster as the user's account. The kernel makes its own key pair and
sends only a certificate signing request: the pool's authority returns a certificate that
names the user and lives at most an hour, renewed in the background while the client is
open (:class:`_Renewal`). The private key never leaves this process's private ``/tmp``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from ztlab.common.hubapi import HubAPI

#: renew when this share of a certificate's life is gone
RENEW_AT = 0.5


@dataclass(frozen=True, slots=True)
class Credentials:
    """Where the client's TLS files are (a private directory of this kernel)."""

    directory: Path
    ca: Path
    certificate: Path
    key: Path


def _csr(key: ec.EllipticCurvePrivateKey) -> str:
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(Encoding.PEM).decode()


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    tmp.replace(path)


def _credentials(key: ec.EllipticCurvePrivateKey, answer: dict[str, Any]) -> Credentials:
    directory = Path(tempfile.mkdtemp(prefix="ztlab-pool-"))
    creds = Credentials(
        directory=directory,
        ca=directory / "ca.pem",
        certificate=directory / "client.pem",
        key=directory / "client.key",
    )
    _write(creds.key, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    _write(creds.ca, answer["ca"].encode())
    _write(creds.certificate, answer["certificate"].encode())
    return creds


def _expires(answer: dict[str, Any]) -> float:
    return datetime.fromisoformat(
        answer["certificate_expires_at"].replace("Z", "+00:00")
    ).timestamp()


class _Renewal(threading.Thread):
    """Renews the client certificate at half its life while the client is open."""

    def __init__(
        self,
        api: HubAPI,
        pool: str,
        key: ec.EllipticCurvePrivateKey,
        creds: Credentials,
        client: Any,
        expires_at: float,
    ) -> None:
        super().__init__(name=f"ztlab-pool-renewal-{pool}", daemon=True)
        self.api, self.pool, self.key, self.creds = api, pool, key, creds
        self.client, self.expires_at = client, expires_at
        self.stopped = threading.Event()
        self.renewed = 0

    def run(self) -> None:
        issued_at = time.time()
        while not self.stopped.is_set():
            wait = max(5.0, (self.expires_at - issued_at) * RENEW_AT)
            if self.stopped.wait(wait) or self.client.status in ("closing", "closed"):
                return
            try:
                self.renew()
                issued_at = time.time()
            except Exception as exc:
                import logging

                logging.getLogger("ztlab.pools").warning("certificate renewal failed: %s", exc)
                issued_at = time.time() - (self.expires_at - time.time()) / RENEW_AT

    def renew(self) -> None:
        """Ask for a new certificate now and load it into the client's TLS context."""
        answer = self.api.call(
            "POST", f"/ztlab/pools/{self.pool}/certificate", {"csr": _csr(self.key)}
        )
        _write(self.creds.certificate, answer["certificate"].encode())
        self.expires_at = _expires(answer)
        context = self.client.connection_args.get("ssl_context")
        if context is not None:
            context.load_cert_chain(self.creds.certificate, self.creds.key)
        self.renewed += 1


def _client(
    api: HubAPI,
    key: ec.EllipticCurvePrivateKey,
    answer: dict[str, Any],
    info: dict[str, Any],
    address: str,
    *,
    direct: bool,
    timeout: float,
) -> Any:
    """A client of cluster ``info`` at ``address`` with the certificate in ``answer``,
    renewed in the background while it lives."""
    from distributed import Client
    from distributed.security import Security

    creds = _credentials(key, answer)
    security = Security(
        tls_ca_file=str(creds.ca),
        tls_client_cert=str(creds.certificate),
        tls_client_key=str(creds.key),
        require_encryption=True,
    )
    client = Client(address, security=security, timeout=timeout, direct_to_workers=direct)
    renewal = _Renewal(api, info["pool"], key, creds, client, _expires(answer))
    renewal.start()
    client.ztlab_cluster = info  # type: ignore[attr-defined]
    client.ztlab_renewal = renewal  # type: ignore[attr-defined]
    return client


def cluster(
    pool: str,
    workers: int = 1,
    gpus: int = 0,
    *,
    share_with: tuple[str, ...] | list[str] = (),
    wait: bool = True,
    timeout: float = 120.0,
    api: HubAPI | None = None,
) -> Any:
    """Start a Dask cluster of your own in ``pool``; a connected ``distributed.Client``.

    ``workers``: how many workers; ``gpus``: how many of them get a GPU each (dask-cuda
    workers where CUDA is present). ``share_with``: users who may connect too (where the
    pool allows sharing). ``wait``: return once every worker has joined. Refusals (policy,
    roles, quotas) raise :class:`~ztlab.common.hubapi.HubAPIError` with the control
    plane's message, which names the limit.
    """
    api = api or HubAPI.from_environment()
    key = ec.generate_private_key(ec.SECP256R1())
    answer = api.call(
        "POST",
        f"/ztlab/pools/{pool}/clusters",
        {
            "workers": workers,
            "gpus": gpus,
            "csr": _csr(key),
            "share_with": list(share_with),
            # the workers run in this kernel's environment (its packages, the user's layer)
            "environment": os.environ.get("ZTLAB_ENVIRONMENT") or None,
        },
    )
    info = answer["cluster"]
    # the owner's kernel shares the workers' network namespace: results come straight
    # from the workers (one TLS hop, not two through the scheduler); bench/pools.py
    client = _client(api, key, answer, info, info["scheduler"], direct=True, timeout=timeout)
    if wait:
        client.wait_for_workers(workers, timeout=timeout)
    return client


def connect(cluster_id: str, *, timeout: float = 60.0, api: HubAPI | None = None) -> Any:
    """A client of a running cluster you own or that is shared with you.

    The owner connects straight to the scheduler (it runs in the owner's network
    namespace); a user it is shared with goes through the hub's relay for that cluster
    (TLS end to end: the scheduler still checks the certificate).
    """
    api = api or HubAPI.from_environment()
    info: dict[str, Any] = api.call("GET", f"/ztlab/pools/clusters/{cluster_id}")
    user = os.environ.get("JUPYTERHUB_USER", "")
    owner = info["owner"] == user
    address = info["scheduler"] if owner or not info.get("relay") else info["relay"]
    key = ec.generate_private_key(ec.SECP256R1())
    pool = info["pool"]
    answer = api.call("POST", f"/ztlab/pools/{pool}/certificate", {"csr": _csr(key)})
    # only the owner reaches the workers; others go through the scheduler (via the relay)
    return _client(api, key, answer, info, address, direct=owner, timeout=timeout)


def clusters(api: HubAPI | None = None) -> list[dict[str, Any]]:
    """Your running clusters."""
    answer: dict[str, Any] = (api or HubAPI.from_environment()).call("GET", "/ztlab/pools/clusters")
    return list(answer["clusters"])


def stop(target: Any, api: HubAPI | None = None) -> dict[str, Any]:
    """Stop a cluster: a client from :func:`cluster` (closed too) or a cluster id. For a
    client of a cluster shared with you, only the client is closed."""
    cluster_id = target
    info = getattr(target, "ztlab_cluster", None)
    if info is not None:
        cluster_id = info["id"]
        renewal = getattr(target, "ztlab_renewal", None)
        if renewal is not None:
            renewal.stopped.set()
        with contextlib.suppress(Exception):
            target.close()
        if info["owner"] != os.environ.get("JUPYTERHUB_USER", info["owner"]):
            return dict(info)  # a cluster shared with you: your client is closed, it runs on
    answer: dict[str, Any] = (api or HubAPI.from_environment()).call(
        "DELETE", f"/ztlab/pools/clusters/{cluster_id}"
    )
    return answer
