"""A certificate authority per pool, held by the control plane only.

Each pool has its own ECDSA P-256 CA key (``<state_dir>/compute/ca/POOL/ca.key``, 0600 in a
0700 directory) and a self-signed CA certificate beside it. The CA certifies nothing but
that pool: a client, scheduler or worker of another pool fails the TLS handshake.

What it issues names one holder in a subject-alternative-name URI
(:mod:`ztlab.common.poolidentity`) and lives at most :data:`MAX_MINUTES` minutes:

- **client certificates** are signed from a certificate signing request (the kernel
  keeps its private key; the authority takes only the public key out of the request and
  writes the subject itself, so a request cannot name anyone else);
- **scheduler and worker certificates** come with their keys (made here, handed only to
  the cluster's own processes, in a directory only the owner's account may read).

Nothing here decides who gets a certificate: :class:`~ztlab.hub.compute.service.ClusterService`
asks the policy first.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztlab.common.errors import KeyFileError, UsageError
from ztlab.common.poolidentity import PeerIdentity
from ztlab.hub.keys import write_public_file
from ztlab.hub.private import private_directory, read_private_file, write_private_file

#: the longest any certificate of a pool lives
MAX_MINUTES: Final = 60
#: how long a pool's CA certificate is valid (it is re-made when it nears the end)
CA_DAYS: Final = 365
#: certificates are valid from this long before they are issued (clock skew)
_BACKDATE = datetime.timedelta(minutes=2)


class CertificateRequestError(UsageError):
    """A certificate signing request the authority will not sign."""


@dataclass(frozen=True, slots=True)
class Issued:
    """One certificate (PEM) with its serial number and expiry (POSIX seconds)."""

    certificate: bytes
    serial: int
    expires_at: float
    #: the private key (PEM), for scheduler and worker certificates only
    key: bytes = b""


class PoolAuthority:
    """The CA of one pool: issue certificates that name one holder for at most an hour."""

    def __init__(self, directory: Path, pool: str) -> None:
        """Open (or create) the CA in ``directory`` (made 0700)."""
        self.pool = pool
        self.directory = private_directory(directory, what="pool authority directory")
        self._lock = threading.Lock()
        self._key, self._certificate = self._load_or_create()

    @property
    def ca_pem(self) -> bytes:
        """The CA certificate every holder trusts (PEM)."""
        return self._certificate.public_bytes(Encoding.PEM)

    def _load_or_create(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key_path, cert_path = self.directory / "ca.key", self.directory / "ca.pem"
        if key_path.exists():
            raw = read_private_file(key_path, what=f"CA key of pool {self.pool}")
            key = load_pem_private_key(raw, password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise KeyFileError(f"{key_path}: the CA key of pool {self.pool} is not ECDSA")
            try:
                certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
            except (OSError, ValueError) as exc:
                raise KeyFileError(
                    f"{cert_path}: cannot read the CA certificate of pool {self.pool}: {exc}",
                    hint=f"remove {self.directory} to make a new authority (clusters restart)",
                ) from exc
            remaining = certificate.not_valid_after_utc - _now()
            if certificate.public_key() == key.public_key() and remaining.days >= 7:
                return key, certificate
            key_path.unlink()  # expiring (or not this key's): a new authority
        key = ec.generate_private_key(ec.SECP256R1())
        write_private_file(
            key_path, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        )
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "zerotrust-lab"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"ztlab pool {self.pool} CA"),
            ]
        )
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        cert_path.unlink(missing_ok=True)
        write_public_file(cert_path, certificate.public_bytes(Encoding.PEM))
        return key, certificate

    # -- issuing -----------------------------------------------------------------------

    def sign_request(self, csr_pem: bytes | str, holder: PeerIdentity, *, minutes: int) -> Issued:
        """A client certificate for ``holder`` from a PEM certificate signing request.

        Only the request's public key is used (an ECDSA P-256 or P-384 key, or RSA of at
        least 2048 bits) and its self-signature checked; its subject and extensions are
        ignored.
        """
        data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        try:
            request = x509.load_pem_x509_csr(data)
        except ValueError as exc:
            raise CertificateRequestError(
                f"the certificate signing request is not a PEM CSR: {exc}",
                hint="ztlab.pools makes one for you; pass its PEM text unchanged",
            ) from exc
        if not request.is_signature_valid:
            raise CertificateRequestError(
                "the certificate signing request's signature does not match its key"
            )
        public = request.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            if public.curve.name not in ("secp256r1", "secp384r1"):
                raise CertificateRequestError(
                    f"the request's key is on curve {public.curve.name}; use P-256 or P-384"
                )
        elif isinstance(public, rsa.RSAPublicKey):
            if public.key_size < 2048:
                raise CertificateRequestError(
                    f"the request's RSA key has {public.key_size} bits; at least 2048 are needed"
                )
        else:
            raise CertificateRequestError("the request's key must be ECDSA (P-256/P-384) or RSA")
        return self._issue(public, holder, minutes=minutes, server=False)

    def issue_with_key(
        self, holder: PeerIdentity, *, minutes: int, addresses: tuple[str, ...] = ()
    ) -> Issued:
        """A key and certificate for a scheduler or worker (server and client use)."""
        key = ec.generate_private_key(ec.SECP256R1())
        issued = self._issue(
            key.public_key(), holder, minutes=minutes, server=True, addresses=addresses
        )
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        return Issued(
            certificate=issued.certificate,
            serial=issued.serial,
            expires_at=issued.expires_at,
            key=pem,
        )

    def _issue(
        self,
        public: CertificatePublicKeyTypes,
        holder: PeerIdentity,
        *,
        minutes: int,
        server: bool,
        addresses: tuple[str, ...] = (),
    ) -> Issued:
        if holder.pool != self.pool:
            raise UsageError(f"the authority of pool {self.pool} cannot name {holder}")
        if not 1 <= minutes <= MAX_MINUTES:
            raise UsageError(f"certificates live 1-{MAX_MINUTES} minutes, not {minutes}")
        now = _now()
        expires = min(
            now + datetime.timedelta(minutes=minutes), self._certificate.not_valid_after_utc
        )
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(holder.uri)]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        serial = int.from_bytes(secrets.token_bytes(16), "big") >> 1
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, holder.uri[:64])]))
            .issuer_name(self._certificate.subject)
            .public_key(public)
            .serial_number(serial)
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(expires)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        with self._lock:
            certificate = builder.sign(self._key, hashes.SHA256())
        return Issued(
            certificate=certificate.public_bytes(Encoding.PEM),
            serial=serial,
            expires_at=expires.timestamp(),
        )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
