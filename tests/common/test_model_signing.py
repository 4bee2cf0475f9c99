"""Signed models in the model-signing format: tamper detection, attacks, and interop with
the upstream ``model_signing`` command and Python API (both ways)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from ztlab.common.attest import SignatureError, key_id, sign_envelope
from ztlab.common.attest.dsse import IN_TOTO_PAYLOAD_TYPE, Envelope
from ztlab.common.attest.model import parse_bundle, sign_model, verify_model

UPSTREAM = Path(sys.executable).with_name("model_signing")
KEY = ec.generate_private_key(ec.SECP256R1())


def trusted(key: ec.EllipticCurvePrivateKey = KEY) -> dict[str, ec.EllipticCurvePublicKey]:
    return {key_id(key.public_key()): key.public_key()}


def write_keys(tmp: Path, key: ec.EllipticCurvePrivateKey = KEY) -> tuple[Path, Path]:
    private, public = tmp / "key.pem", tmp / "pub.pem"
    private.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


@pytest.fixture
def model(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "weights.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    (root / "config.json").write_text('{"layers": 2}')
    (root / "sub" / "tokenizer.txt").write_text("a b c")
    (root / "sub" / "deeper" / "x").write_bytes(b"")
    (root / "sub-file").write_text("ordering: 'sub-file' sorts after 'sub/...' by component")
    (root / ".git" / "HEAD").write_text("ref: main")
    return root


def signed(model: Path, **kwargs: object) -> Envelope:
    bundle = sign_model(model, KEY, **kwargs)  # type: ignore[arg-type]
    return parse_bundle(json.dumps(bundle))


@pytest.mark.parametrize("algorithm", ["sha256", "blake3"])
def test_round_trip(model: Path, algorithm: str) -> None:
    check = verify_model(model, signed(model, algorithm=algorithm), trusted())
    assert check.ok
    assert set(check.signature.resources) == {
        "weights.bin",
        "config.json",
        "sub/tokenizer.txt",
        "sub/deeper/x",
        "sub-file",
    }


def test_every_kind_of_change_is_listed(model: Path) -> None:
    envelope = signed(model)
    with (model / "weights.bin").open("r+b") as handle:
        handle.seek(3_000_000)
        byte = handle.read(1)
        handle.seek(3_000_000)
        handle.write(bytes([byte[0] ^ 1]))
    (model / "config.json").unlink()
    (model / "sub" / "tokenizer.txt").rename(model / "sub" / "renamed.txt")
    (model / "added.py").write_text("import os")
    (model / "link").symlink_to("/etc/passwd")
    (model / ".git" / "HEAD").write_text("changed: git files are not part of a model")
    check = verify_model(model, envelope, trusted())
    assert [m[0] for m in check.modified] == ["weights.bin"]
    assert sorted(check.missing) == ["config.json", "sub/tokenizer.txt"]
    assert check.extra == ["added.py", "sub/renamed.txt"]
    assert [r.path for r in check.refused] == ["link"]
    assert not check.ok


def test_a_bundle_from_another_key_is_refused(model: Path) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    bundle = sign_model(model, other)
    with pytest.raises(SignatureError):
        verify_model(model, parse_bundle(json.dumps(bundle)), trusted())


def _resign(envelope: Envelope, change: object) -> Envelope:
    statement = json.loads(envelope.payload)
    change(statement)  # type: ignore[operator]
    payload = json.dumps(statement).encode()
    return sign_envelope(payload, KEY, payload_type=IN_TOTO_PAYLOAD_TYPE)


def test_a_signature_that_exempts_a_file_is_refused(model: Path) -> None:
    """Upstream trusts the signer's ignore_paths; a signed exemption would hide a file."""

    def exempt(statement: dict[str, object]) -> None:
        predicate = statement["predicate"]
        assert isinstance(predicate, dict)
        predicate["serialization"]["ignore_paths"].append("weights.bin")
        predicate["resources"] = [r for r in predicate["resources"] if r["name"] != "weights.bin"]
        import hashlib

        root = hashlib.sha256(
            b"".join(bytes.fromhex(r["digest"]) for r in predicate["resources"])
        ).hexdigest()
        statement["subject"][0]["digest"]["sha256"] = root  # type: ignore[index]

    envelope = _resign(signed(model), exempt)
    with pytest.raises(SignatureError, match=r"does not cover: weights\.bin"):
        verify_model(model, envelope, trusted())


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s["subject"][0]["digest"].update(sha256="0" * 64),
        lambda s: s["predicate"]["serialization"].update(method="shards"),
        lambda s: s["predicate"]["serialization"].update(allow_symlinks=True),
        lambda s: s["predicate"]["resources"].append(dict(s["predicate"]["resources"][0])),
        lambda s: s.update(predicateType="https://example.org/other"),
    ],
    ids=["wrong-root", "shards", "symlinks", "duplicate", "predicate-type"],
)
def test_malformed_statements_are_refused(model: Path, change: object) -> None:
    with pytest.raises(SignatureError):
        verify_model(model, _resign(signed(model), change), trusted())


def test_a_flipped_payload_byte_is_refused(model: Path) -> None:
    envelope = signed(model)
    payload = bytearray(envelope.payload)
    payload[len(payload) // 2] ^= 1
    with pytest.raises(SignatureError):
        verify_model(
            model, Envelope(envelope.payload_type, bytes(payload), envelope.signatures), trusted()
        )


# -- interop with the upstream model_signing (1.1.x) -----------------------------------------


def upstream(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(UPSTREAM), *args], capture_output=True, text=True, timeout=120)


def test_upstream_cli_verifies_our_bundle_and_catches_tampering(
    model: Path, tmp_path: Path
) -> None:
    _, public = write_keys(tmp_path)
    bundle = tmp_path / "ours.sig"
    bundle.write_text(json.dumps(sign_model(model, KEY, bundle_path=bundle)))
    done = upstream(
        "verify", "key", str(model), "--signature", str(bundle), "--public_key", str(public)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Verification succeeded" in done.stdout
    (model / "config.json").write_text('{"layers": 3}')
    done = upstream(
        "verify", "key", str(model), "--signature", str(bundle), "--public_key", str(public)
    )
    assert done.returncode != 0


def test_we_verify_the_upstream_cli_bundle_and_catch_tampering(model: Path, tmp_path: Path) -> None:
    private, _ = write_keys(tmp_path)
    bundle = tmp_path / "theirs.sig"
    done = upstream(
        "sign", "key", str(model), "--private_key", str(private), "--signature", str(bundle)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    envelope = parse_bundle(bundle.read_text())
    assert verify_model(model, envelope, trusted(), bundle_path=bundle).ok
    (model / "sub" / "tokenizer.txt").write_text("a b d")
    check = verify_model(model, envelope, trusted(), bundle_path=bundle)
    assert [m[0] for m in check.modified] == ["sub/tokenizer.txt"]
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(SignatureError):
        verify_model(model, envelope, trusted(other), bundle_path=bundle)


def test_blake3_interop_with_the_upstream_python_api(model: Path, tmp_path: Path) -> None:
    """The upstream CLI cannot choose BLAKE3; its Python API can, both ways."""
    private, public = write_keys(tmp_path)
    ours, theirs = tmp_path / "ours.sig", tmp_path / "theirs.sig"
    ours.write_text(json.dumps(sign_model(model, KEY, algorithm="blake3", bundle_path=ours)))
    code = f"""
from model_signing import hashing, signing, verifying
hc = hashing.Config().use_file_serialization(hashing_algorithm="blake3")
verifier = verifying.Config().use_elliptic_key_verifier(public_key={str(public)!r})
verifier.set_hashing_config(hc).verify({str(model)!r}, {str(ours)!r})
signer = signing.Config().use_elliptic_key_signer(private_key={str(private)!r})
signer.set_hashing_config(hc).sign({str(model)!r}, {str(theirs)!r})
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr
    check = verify_model(model, parse_bundle(theirs.read_text()), trusted(), bundle_path=theirs)
    assert check.ok
    assert check.signature.algorithm == "blake3"


def test_the_command_line(model: Path, tmp_path: Path) -> None:
    private, public = write_keys(tmp_path)
    ztlab = Path(sys.executable).with_name("ztlab")
    bundle = tmp_path / "m.sig"
    done = subprocess.run(
        [str(ztlab), "model", "sign", str(model), "--key", str(private), "--out", str(bundle)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    verify = [str(ztlab), "model", "verify", str(model), "--bundle", str(bundle)]
    verify += ["--public-key", str(public)]
    assert subprocess.run(verify, capture_output=True).returncode == 0
    (model / "extra.txt").write_text("x")
    failed = subprocess.run(verify, capture_output=True, text=True)
    assert failed.returncode == 1
    assert "extra: extra.txt" in failed.stdout
    data = json.loads(bundle.read_text())
    data["dsseEnvelope"]["payload"] = base64.b64encode(b"{}").decode()
    bundle.write_text(json.dumps(data))
    assert subprocess.run(verify, capture_output=True).returncode == 1
    loose = tmp_path / "loose.pem"
    loose.write_bytes(private.read_bytes())
    loose.chmod(0o644)
    refused = subprocess.run(
        [str(ztlab), "model", "sign", str(model), "--key", str(loose), "--out", str(bundle)],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2
    assert "0600" in refused.stderr


# -- organisation certificate chains ---------------------------------------------------------


def _pki(tmp: Path, *, leaf_usage: str = "codesigning") -> dict[str, Path]:
    """A root -> intermediate -> leaf chain (P-256), written as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
        *,
        ca: bool,
        usage: str = "",
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        issuer_name = (
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer[0])]) if issuer else name
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )
        if issuer:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
                critical=False,
            )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
        elif usage == "codesigning":
            builder = builder.add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                critical=True,
            ).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
            )
        elif usage == "server":
            builder = builder.add_extension(
                x509.KeyUsage(False, False, True, False, False, False, False, False, False),
                critical=True,
            ).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        return builder.sign((issuer[1] if issuer else key), hashes.SHA256())

    root_key, int_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    leaf_key = KEY
    root = cert("ZT Lab Root CA", root_key, None, ca=True)
    inter = cert("ZT Lab Models CA", int_key, ("ZT Lab Root CA", root_key), ca=True)
    leaf = cert("model signer", leaf_key, ("ZT Lab Models CA", int_key), ca=False, usage=leaf_usage)
    out = {}
    for name, value in (("root", root), ("inter", inter), ("leaf", leaf)):
        out[name] = tmp / f"{name}.pem"
        out[name].write_bytes(value.public_bytes(Encoding.PEM))
    out["key"], _ = write_keys(tmp)
    return out


def test_certificate_chain_signing_interoperates(model: Path, tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    ztlab = str(Path(sys.executable).with_name("ztlab"))
    ours = tmp_path / "ours.sig"
    signed = subprocess.run(
        [
            ztlab,
            "model",
            "sign",
            str(model),
            "--key",
            str(pki["key"]),
            "--out",
            str(ours),
            "--certificate",
            str(pki["leaf"]),
            "--certificate-chain",
            str(pki["inter"]),
        ],
        capture_output=True,
        text=True,
    )
    assert signed.returncode == 0, signed.stderr
    ours_verify = [ztlab, "model", "verify", str(model), "--bundle", str(ours)]
    done = subprocess.run(
        [*ours_verify, "--certificate-chain", str(pki["root"])], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    done = upstream(
        "verify",
        "certificate",
        str(model),
        "--signature",
        str(ours),
        "--certificate_chain",
        str(pki["root"]),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    theirs = tmp_path / "theirs.sig"
    done = upstream(
        "sign",
        "certificate",
        str(model),
        "--private_key",
        str(pki["key"]),
        "--signing_certificate",
        str(pki["leaf"]),
        "--certificate_chain",
        str(pki["inter"]),
        "--signature",
        str(theirs),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run(
        [
            ztlab,
            "model",
            "verify",
            str(model),
            "--bundle",
            str(theirs),
            "--certificate-chain",
            str(pki["root"]),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # another organisation's root is not trusted
    (tmp_path / "other").mkdir()
    other = _pki(tmp_path / "other")
    refused = subprocess.run(
        [*ours_verify, "--certificate-chain", str(other["root"])], capture_output=True, text=True
    )
    assert refused.returncode == 1
    assert "does not chain to a trusted root" in refused.stderr


def test_a_certificate_not_meant_for_signing_is_refused(model: Path, tmp_path: Path) -> None:
    from ztlab.common.attest.model import bundle_certificates, chain_signer

    pki = _pki(tmp_path, leaf_usage="server")
    from cryptography import x509

    chain = [
        x509.load_pem_x509_certificate(pki[n].read_bytes()).public_bytes(Encoding.DER)
        for n in ("leaf", "inter")
    ]
    bundle = json.dumps(sign_model(model, KEY, certificates=chain))
    with pytest.raises(SignatureError, match="not for signing"):
        chain_signer(bundle_certificates(bundle), pki["root"].read_bytes())
