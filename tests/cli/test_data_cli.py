"""``ztlab data``: fingerprint and verify, exit statuses 0 / 1 / 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import blake3
import pytest
from click.testing import CliRunner

from ztlab.cli.data import data_group


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(data_group, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    for index in range(20):
        (root / "sub" / f"f{index}.txt").write_bytes(f"file {index}\n".encode())
    (root / "big.bin").write_bytes(bytes(range(256)) * 20_000)
    return root


@pytest.fixture
def manifest(dataset: Path, tmp_path: Path) -> Path:
    out = tmp_path / "manifest.json"
    code, stdout, stderr = run("fingerprint", str(dataset), "--out", str(out))
    assert code == 0, stderr
    assert stdout.startswith(f"wrote {out}: 21 files, 5,120,")
    return out


def test_fingerprint_then_verify(dataset: Path, manifest: Path) -> None:
    data = json.loads(manifest.read_text(encoding="utf-8"))
    assert data["format"] == "ztlab-manifest/1"
    assert data["algorithm"] == "blake3"
    code, stdout, _ = run("verify", str(dataset), "--manifest", str(manifest))
    assert code == 0
    assert stdout.startswith(f"OK: 21 files match the manifest (blake3 root {data['root']})")


def test_sha256_and_progress(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "sha.json"
    code, stdout, _ = run(
        "fingerprint", str(dataset), "--out", str(out), "--algorithm", "sha256", "--progress"
    )
    assert code == 0
    assert "sha256 root" in stdout
    code, _, _ = run("verify", str(dataset), "--manifest", str(out), "--progress")
    assert code == 0


def test_differences_exit_1_with_expected_and_actual_digests(dataset: Path, manifest: Path) -> None:
    old = (dataset / "sub" / "f1.txt").read_bytes()
    (dataset / "sub" / "f1.txt").write_bytes(b"tampered\n")
    (dataset / "sub" / "f2.txt").unlink()
    (dataset / "added.txt").write_bytes(b"new")
    (dataset / "link").symlink_to("/etc/passwd")
    code, stdout, _ = run("verify", str(dataset), "--manifest", str(manifest))
    assert code == 1
    expected = blake3.blake3(old).hexdigest()
    actual = blake3.blake3(b"tampered\n").hexdigest()
    assert f"modified: sub/f1.txt\n  expected blake3:{expected} (7 bytes)\n" in stdout
    assert f"  actual   blake3:{actual} (9 bytes)\n" in stdout
    assert "missing: sub/f2.txt\n  expected blake3:" in stdout
    assert f"extra: added.txt\n  actual   blake3:{blake3.blake3(b'new').hexdigest()}" in stdout
    assert "refused: link: symbolic link (to /etc/passwd)" in stdout
    assert "FAILED: 4 difference(s): 1 modified, 1 missing, 1 extra, 1 refused" in stdout


def test_manifest_inside_the_directory_is_skipped(dataset: Path) -> None:
    out = dataset / "MANIFEST.json"
    assert run("fingerprint", str(dataset), "--out", str(out))[0] == 0
    assert "MANIFEST.json" not in out.read_text(encoding="utf-8")
    assert run("verify", str(dataset), "--manifest", str(out))[0] == 0


def test_bad_input_exits_2(dataset: Path, manifest: Path, tmp_path: Path) -> None:
    code, _, stderr = run("verify", str(dataset), "--manifest", str(tmp_path / "absent.json"))
    assert code == 2
    assert "error: cannot read the manifest" in stderr
    data = json.loads(manifest.read_text(encoding="utf-8"))
    data["entries"][0]["path"] = "../../etc/passwd"
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data), encoding="utf-8")
    code, _, stderr = run("verify", str(dataset), "--manifest", str(edited))
    assert code == 2
    assert "unsafe path '../../etc/passwd'" in stderr
    (dataset / "link").symlink_to("/etc/passwd")
    code, _, stderr = run("fingerprint", str(dataset), "--out", str(tmp_path / "m2.json"))
    assert code == 2
    assert "link: symbolic link (to /etc/passwd)" in stderr
    assert "--allow-symlinks" in stderr
    assert not (tmp_path / "m2.json").exists()
    code, _, _ = run("fingerprint", str(tmp_path / "absent"), "--out", str(tmp_path / "m3.json"))
    assert code == 2
    code, _, _ = run("fingerprint", str(dataset), "--out", "x", "--algorithm", "md5")
    assert code == 2


def test_real_subprocess(dataset: Path, manifest: Path) -> None:
    program = "from ztlab.cli.data import data_group; data_group(prog_name='ztlab data')"
    command = [sys.executable, "-c", program, "verify", str(dataset), "--manifest", str(manifest)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK: 21 files")
    with (dataset / "big.bin").open("ab") as handle:
        handle.write(b"!")
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 1
    assert "modified: big.bin" in done.stdout


def _key(path: Path, curve: str = "p256") -> Path:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    key = (
        ed25519.Ed25519PrivateKey.generate()
        if curve == "ed25519"
        else (ec.generate_private_key(ec.SECP256R1()))
    )
    path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    path.chmod(0o600)
    path.with_suffix(".pub").write_bytes(
        key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    return path


@pytest.mark.parametrize("curve", ["p256", "ed25519"])
def test_sign_then_verify_signed(dataset: Path, manifest: Path, tmp_path: Path, curve: str) -> None:
    key = _key(tmp_path / "key.pem", curve)
    signed = tmp_path / "signed.json"
    code, stdout, stderr = run(
        "sign",
        str(manifest),
        "--ref",
        "demo@1",
        "--key",
        str(key),
        "--source",
        str(dataset),
        "--by",
        "carol",
        "--out",
        str(signed),
    )
    assert code == 0, stderr
    pub = str(key.with_suffix(".pub"))
    code, stdout, _ = run("verify", str(dataset), "--signed", str(signed), "--public-key", pub)
    assert code == 0
    assert "signature OK: demo@1" in stdout
    assert "registered by carol" in stdout
    # another key, another version, a loose key file, both --manifest and --signed
    other = _key(tmp_path / "other.pem")
    code, _, stderr = run(
        "verify",
        str(dataset),
        "--signed",
        str(signed),
        "--public-key",
        str(other.with_suffix(".pub")),
    )
    assert code == 1
    assert "no signature on the envelope verifies" in stderr
    code, _, stderr = run(
        "verify", str(dataset), "--signed", str(signed), "--public-key", pub, "--ref", "demo@2"
    )
    assert code == 1
    assert "not demo@2" in stderr
    key.chmod(0o644)
    code, _, stderr = run(
        "sign",
        str(manifest),
        "--ref",
        "demo@1",
        "--key",
        str(key),
        "--source",
        str(dataset),
        "--out",
        str(signed),
    )
    assert code == 2
    assert "0600" in stderr
    code, _, stderr = run(
        "verify", str(dataset), "--manifest", str(manifest), "--signed", str(signed)
    )
    assert code == 2
