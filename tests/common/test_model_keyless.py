"""Sigstore keyless signing and verification: the option's refusals, all without network.

A genuine keyless signature needs Fulcio, Rekor and an identity provider, none of which a
test may reach; what is tested here is that every way a keyless check can go wrong is
refused with a clear message, and that signing never pretends to work offline. Traffic
goes only to 127.0.0.1 (a closed port stands in for Sigstore's services).
"""

from __future__ import annotations

import base64
import datetime
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from tests.common.test_model_signing import write_keys

ZTLAB = Path(sys.executable).with_name("ztlab")
IDENTITY = ["--sigstore-identity", "alice@example.org"]
ISSUER = ["--sigstore-issuer", "https://accounts.example.org"]


def ztlab(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    # a fresh HOME: no TUF cache, so the shipped trust root is what is used
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [str(ZTLAB), "model", *args], capture_output=True, text=True, timeout=120, env=env
    )


@pytest.fixture
def model(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    root.mkdir()
    (root / "weights.bin").write_bytes(b"\x01" * 4096)
    return root


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def loopback_trust_config(tmp_path: Path) -> Path:
    """Sigstore's production trust config with every service URL on a closed local port."""
    models = __import__("sigstore.models", fromlist=["ClientTrustConfig"])
    text = models.ClientTrustConfig.production(offline=True)._inner.to_json()
    local = f"http://127.0.0.1:{closed_port()}"
    text = re.sub(r"https://[a-z0-9.-]+\.(sigstore|sigstage)\.dev", local, text)
    assert not re.search(r"https?://[^\"]*sig(store|stage)\.dev", text)
    path = tmp_path / "trust.json"
    path.write_text(text)
    return path


def identity_token(tmp_path: Path) -> Path:
    def part(value: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    now = int(time.time())
    claims = {
        "iss": "https://accounts.example.org",
        "aud": "sigstore",
        "sub": "alice",
        "email": "alice@example.org",
        "email_verified": True,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    path = tmp_path / "token"
    path.write_text(f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl")
    return path


def test_keyless_signing_never_pretends_to_work_offline(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.sig"
    done = ztlab(
        "sign",
        str(model),
        "--sigstore",
        "--identity-token",
        str(identity_token(tmp_path)),
        "--trust-config",
        str(loopback_trust_config(tmp_path)),
        "--out",
        str(out),
        home=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    assert "Sigstore keyless signing failed" in done.stderr
    assert "needs the network" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sigstore"], "needs an identity"),
        (["--sigstore", "--ambient", "--key", "k.pem"], "without a key"),
        (["--sigstore-staging", "--key", "k.pem"], "go with --sigstore"),
        ([], "give --key KEY (offline) or --sigstore"),
        (["--sigstore", "--identity-token", "missing"], "cannot read the identity token"),
    ],
)
def test_keyless_signing_usage_errors(
    model: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    done = ztlab("sign", str(model), *args, "--out", str(tmp_path / "m.sig"), home=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


def test_a_key_signed_bundle_is_not_a_keyless_signature(model: Path, tmp_path: Path) -> None:
    private, _ = write_keys(tmp_path)
    bundle = tmp_path / "m.sig"
    signed = ztlab("sign", str(model), "--key", str(private), "--out", str(bundle), home=tmp_path)
    assert signed.returncode == 0, signed.stderr
    done = ztlab("verify", str(model), "--bundle", str(bundle), *IDENTITY, *ISSUER, home=tmp_path)
    assert done.returncode == 1
    assert "not a Sigstore keyless bundle" in done.stderr
    assert "--public-key" in done.stderr


def _self_certified(tmp_path: Path, private: Path, bundle: Path) -> None:
    """Put a self-made certificate claiming alice's identity into the bundle."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sigstore-intermediate")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(minutes=10))
        .add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name("alice@example.org")]), critical=True
        )
        .add_extension(
            x509.UnrecognizedExtension(
                x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1"), b"https://accounts.example.org"
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    data = json.loads(bundle.read_text())
    der = certificate.public_bytes(Encoding.DER)
    data["verificationMaterial"] = {
        "certificate": {"rawBytes": base64.b64encode(der).decode()},
        "tlogEntries": [],
    }
    bundle.write_text(json.dumps(data))


def test_a_self_made_certificate_is_not_sigstores(model: Path, tmp_path: Path) -> None:
    private, _ = write_keys(tmp_path)
    bundle = tmp_path / "m.sig"
    signed = ztlab("sign", str(model), "--key", str(private), "--out", str(bundle), home=tmp_path)
    assert signed.returncode == 0, signed.stderr
    _self_certified(tmp_path, private, bundle)
    done = ztlab("verify", str(model), "--bundle", str(bundle), *IDENTITY, *ISSUER, home=tmp_path)
    assert done.returncode == 1, done.stdout
    assert "OK" not in done.stdout
    assert "Sigstore" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*IDENTITY], "go together"),
        ([*IDENTITY, *ISSUER, "--public-key", "p.pem"], "give one of"),
        ([], "give one of"),
    ],
)
def test_keyless_verification_usage_errors(
    model: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    bundle = tmp_path / "m.sig"
    bundle.write_text("{}")
    done = ztlab("verify", str(model), "--bundle", str(bundle), *args, home=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
