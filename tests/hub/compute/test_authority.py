"""A pool's certificate authority: one holder per certificate, an hour at most, its key private."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ztlab.common.errors import UsageError
from ztlab.common.poolidentity import identity_of, scheduler_identity, user_identity
from ztlab.hub.compute.authority import CertificateRequestError, PoolAuthority


def _csr(key: object = None, name: str = "root") -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("ztlab://pool/research/user/admin")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return request.public_bytes(serialization.Encoding.PEM).decode()


def test_the_ca_key_is_private_and_kept_across_restarts(tmp_path: Path) -> None:
    first = PoolAuthority(tmp_path / "research", "research")
    key = tmp_path / "research" / "ca.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "research").stat().st_mode) == 0o700
    again = PoolAuthority(tmp_path / "research", "research")
    assert again.ca_pem == first.ca_pem


def test_a_request_cannot_name_anyone_the_authority_writes_the_holder(tmp_path: Path) -> None:
    authority = PoolAuthority(tmp_path / "ca", "research")
    issued = authority.sign_request(_csr(), user_identity("research", "alice"), minutes=60)
    certificate = x509.load_pem_x509_certificate(issued.certificate)
    assert identity_of(certificate.public_bytes(serialization.Encoding.DER)) == user_identity(
        "research", "alice"
    )
    life = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert life.total_seconds() <= 62 * 60  # 60 minutes, backdated 2 for clock skew
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.ExtendedKeyUsageOID.SERVER_AUTH not in usages  # a client cannot serve


def test_lifetimes_past_an_hour_are_refused(tmp_path: Path) -> None:
    authority = PoolAuthority(tmp_path / "ca", "research")
    with pytest.raises(UsageError, match="1-60 minutes"):
        authority.sign_request(_csr(), user_identity("research", "alice"), minutes=61)
    with pytest.raises(UsageError, match="cannot name"):
        authority.sign_request(_csr(), user_identity("other", "alice"), minutes=10)


def test_bad_requests_are_refused_with_what_was_wrong(tmp_path: Path) -> None:
    authority = PoolAuthority(tmp_path / "ca", "research")
    alice = user_identity("research", "alice")
    with pytest.raises(CertificateRequestError, match="not a PEM CSR"):
        authority.sign_request("hello", alice, minutes=10)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(CertificateRequestError, match="1024 bits"):
        authority.sign_request(_csr(weak), alice, minutes=10)
    tampered = _csr().replace("MII", "MIJ", 1)
    with pytest.raises(CertificateRequestError):
        authority.sign_request(tampered, alice, minutes=10)


def test_scheduler_certificates_come_with_their_key_and_serve(tmp_path: Path) -> None:
    authority = PoolAuthority(tmp_path / "ca", "research")
    issued = authority.issue_with_key(scheduler_identity("research", "0123456789abcdef"), minutes=5)
    key = serialization.load_pem_private_key(issued.key, password=None)
    certificate = x509.load_pem_x509_certificate(issued.certificate)
    assert certificate.public_key() == key.public_key()
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.ExtendedKeyUsageOID.SERVER_AUTH in usages
    ca = x509.load_pem_x509_certificate(authority.ca_pem)
    certificate.verify_directly_issued_by(ca)
