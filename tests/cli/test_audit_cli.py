"""``ztlab audit``: append, verify, tail, export, checkpoint, public-key."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.auditlog_helpers import record_lines, write_log
from ztlab.cli.main import cli


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    write_log(path, [("alice", "login.success", {"n": n}) for n in range(5)])
    return path


def test_append_then_verify(tmp_path: Path) -> None:
    path = tmp_path / "new" / "audit.jsonl"
    code, out, err = run(
        "audit",
        "append",
        "--log",
        str(path),
        "--actor",
        "root",
        "--action",
        "break_glass.access",
        "--detail",
        '{"ticket": "INC-7"}',
    )
    assert code == 0, err
    assert out.startswith("appended record 0 ")
    assert "created a new audit log" in err
    code, out, _ = run(
        "audit", "append", "--log", str(path), "--actor", "root", "--action", "break_glass.end"
    )
    assert code == 0
    assert out.startswith("appended record 1 ")
    code, out, err = run("audit", "verify", "--log", str(path))
    assert code == 0, err
    assert out.startswith("OK: 2 records, 2 signed checkpoints; the last covers 2 records")


@pytest.mark.parametrize(
    ("detail", "message"),
    [
        (
            "{not json",
            "--detail: not valid JSON: Expecting property name enclosed in double quotes "
            "at line 1, column 2",
        ),
        ("[1, 2]", "--detail: expected a JSON object, got list"),
    ],
)
def test_append_rejects_bad_detail(tmp_path: Path, detail: str, message: str) -> None:
    code, _, err = run(
        "audit",
        "append",
        "--log",
        str(tmp_path / "a.jsonl"),
        "--actor",
        "root",
        "--action",
        "x.y",
        "--detail",
        detail,
    )
    assert code == 2
    assert message in err
    assert not (tmp_path / "a.jsonl").exists()


def test_verify_names_the_first_bad_record(log: Path) -> None:
    lines = record_lines(log)
    lines[2] = lines[2].replace(b'"n":2', b'"n":3')
    log.write_bytes(b"".join(lines))
    code, out, err = run("audit", "verify", "--log", str(log))
    assert code == 1
    assert out == ""
    assert "FAIL:" in err
    assert "record 2 (line 3) was modified" in err


def test_verify_with_the_wrong_public_key(log: Path, tmp_path: Path) -> None:
    other = tmp_path / "other" / "audit.jsonl"
    write_log(other, [("bob", "login.success", {})])
    code, _, err = run(
        "audit",
        "verify",
        "--log",
        str(log),
        "--public-key",
        str(other.with_name("audit.jsonl.pub")),
    )
    assert code == 1
    assert "checkpoint 0: checkpoint has no signature by the expected key" in err


def test_verify_bad_input_exits_2(tmp_path: Path) -> None:
    code, _, err = run(
        "audit",
        "verify",
        "--log",
        str(tmp_path / "missing.jsonl"),
        "--public-key",
        str(tmp_path / "missing.pub"),
    )
    assert code == 2
    assert "no such public key" in err


def test_a_witnessed_checkpoint_detects_rollback(log: Path, tmp_path: Path) -> None:
    code, note, _ = run("audit", "checkpoint", "--log", str(log))
    assert code == 0
    witness = tmp_path / "witness.note"
    witness.write_text(note)
    # roll both files back to an empty log: verify alone cannot tell...
    log.write_bytes(b"")
    log.with_name("audit.jsonl.checkpoints").write_bytes(b"")
    code, _out, _ = run("audit", "verify", "--log", str(log))
    assert code == 0
    # ...but the witness can
    code, _, err = run("audit", "verify", "--log", str(log), "--trusted-checkpoint", str(witness))
    assert code == 1
    assert "truncated" in err


def test_tail_and_export(log: Path, tmp_path: Path) -> None:
    code, out, _ = run("audit", "tail", "--log", str(log), "-n", "2")
    assert code == 0
    rows = out.splitlines()
    assert len(rows) == 2
    assert rows[0].split()[0] == "3"
    assert rows[1].split()[2:4] == ["alice", "login.success"]
    out_file = tmp_path / "export.jsonl"
    code, _, err = run(
        "audit", "export", "--log", str(log), "--format", "jsonl", "--out", str(out_file)
    )
    assert code == 0
    assert "exported 5 verified records" in err
    exported = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [record["detail"]["n"] for record in exported] == [0, 1, 2, 3, 4]
    assert set(exported[0]) == {"seq", "prev", "ts", "actor", "action", "detail"}


def test_export_refuses_a_tampered_log(log: Path) -> None:
    log.write_bytes(log.read_bytes().replace(b"alice", b"alicf", 1))
    code, out, err = run("audit", "export", "--log", str(log))
    assert code == 1
    assert out == ""
    assert "FAIL:" in err


def test_public_key_formats(log: Path) -> None:
    code, out, _ = run("audit", "public-key", "--log", str(log))
    assert code == 0
    assert out.startswith("-----BEGIN PUBLIC KEY-----")
    code, out, _ = run("audit", "public-key", "--log", str(log), "--format", "note")
    assert code == 0
    name, key_id, key = out.strip().split("+", 2)
    assert name == "ztlab.local/audit"
    assert len(key_id) == 8
    assert len(base64.b64decode(key)) == 33


def test_the_installed_command_verifies(log: Path) -> None:
    ztlab = Path(sys.executable).with_name("ztlab")
    result = subprocess.run(
        [str(ztlab), "audit", "verify", "--log", str(log)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK: 5 records")
