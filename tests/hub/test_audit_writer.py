"""The control plane's audit writer: durability, checkpoints, locking, recovery, modes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.auditlog_helpers import record_lines, verify, write_log
from ztlab.common.auditlog.record import parse_record
from ztlab.common.errors import AuditError, AuditLockedError, KeyFileError, UsageError
from ztlab.hub.audit import AuditLog


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_an_append_is_on_disk_when_acknowledged(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    with AuditLog.open(log_path, checkpoint_interval=60) as log:
        receipt = log.append("alice", "break_glass.access", {"reason": "incident 42"})
        # read through a separate file handle, before close
        lines = record_lines(log_path)
        assert len(lines) == 1
        record = parse_record(lines[0][:-1])
        assert (record.seq, record.actor, record.action) == (0, "alice", "break_glass.access")
        assert record.detail == {"reason": "incident 42"}
        assert receipt.seq == 0
        assert receipt.ts == record.ts
    report = verify(log_path)
    assert (report.records, report.covered, report.checkpoints) == (1, 1, 1)


def test_files_are_readable_by_the_control_plane_only(tmp_path: Path) -> None:
    log_path = tmp_path / "state" / "audit.jsonl"
    write_log(log_path, [("alice", "login.success", {})])
    assert _mode(log_path.parent) == 0o700
    assert _mode(log_path) == 0o600
    assert _mode(log_path.with_name("audit.jsonl.checkpoints")) == 0o600
    assert _mode(log_path.with_name("audit.jsonl.key")) == 0o600
    assert _mode(log_path.with_name("audit.jsonl.pub")) == 0o644


def test_checkpoints_are_signed_while_records_arrive(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    with AuditLog.open(log_path, checkpoint_interval=0.2) as log:
        log.append("alice", "login.success")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if verify(log_path).covered == 1:
                break
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint was signed within 10 s with a 0.2 s interval")
        log.append("alice", "login.success")
    assert verify(log_path).checkpoints >= 2


def test_explicit_checkpoint_and_no_empty_checkpoints(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    with AuditLog.open(log_path, checkpoint_interval=60) as log:
        log.append("alice", "login.success")
        checkpoint = log.checkpoint().result(10)
        assert checkpoint is not None
        assert checkpoint.size == 1
        assert log.checkpoint().result(10) is None  # nothing new to sign
    assert verify(log_path).checkpoints == 1


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    with AuditLog.open(log_path), pytest.raises(AuditLockedError, match=f"pid {os.getpid()}"):
        AuditLog.open(log_path)


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, [("alice", "login.success", {"n": 1})])
    write_log(log_path, [("bob", "login.success", {"n": 2})])
    report = verify(log_path)
    assert (report.records, report.covered, report.checkpoints) == (2, 2, 2)


def test_a_tampered_log_is_not_extended(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, [("alice", "login.success", {"n": n}) for n in range(3)])
    data = log_path.read_bytes()
    log_path.write_bytes(data.replace(b'"n":1', b'"n":7'))
    with pytest.raises(AuditError, match="does not verify, so it will not be extended"):
        AuditLog.open(log_path)
    assert log_path.read_bytes() == data.replace(b'"n":1', b'"n":7')


def test_a_torn_tail_is_reported_then_quarantined(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, [("alice", "login.success", {"n": n}) for n in range(3)])
    torn = b'{"seq":3,"prev":"ab'
    with log_path.open("ab") as handle:
        handle.write(torn)
    report = verify(log_path)  # still verifies, but says so
    assert report.records == 3
    assert report.torn_tail is not None
    assert any("torn" in warning for warning in report.warnings)
    with AuditLog.open(log_path) as log:
        (quarantine,) = log.recovery.quarantined
        assert quarantine.read_bytes() == torn
        assert _mode(quarantine) == 0o600
    report = verify(log_path)
    assert report.torn_tail is None
    last = parse_record(record_lines(log_path)[-1][:-1])
    assert last.action == "audit.torn_tail_quarantined"
    assert last.detail["bytes"] == len(torn)


def test_unsafe_key_permissions_are_refused(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, [("alice", "login.success", {})])
    key = log_path.with_name("audit.jsonl.key")
    key.chmod(0o644)
    with pytest.raises(KeyFileError, match="mode 0644"):
        AuditLog.open(log_path)


def test_another_key_cannot_sign_an_existing_log(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, [("alice", "login.success", {})])
    with pytest.raises(AuditError, match="not the signing key's"):
        AuditLog.open(log_path, key_path=tmp_path / "other.key")


def test_concurrent_appends_get_distinct_sequence_numbers(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    seqs: list[int] = []
    lock = threading.Lock()
    with AuditLog.open(log_path, checkpoint_interval=0.05) as log:

        def worker(name: str) -> None:
            for n in range(150):
                receipt = log.append(name, "test.event", {"n": n})
                with lock:
                    seqs.append(receipt.seq)

        threads = [threading.Thread(target=worker, args=(f"user{i}",)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(seqs) == list(range(8 * 150))
    assert verify(log_path).records == 8 * 150


def test_bad_events_are_refused_before_queueing(tmp_path: Path) -> None:
    with AuditLog.open(tmp_path / "audit.jsonl") as log:
        with pytest.raises(UsageError, match="dotted lower-case name"):
            log.append("alice", "Not An Action")
        with pytest.raises(UsageError, match="non-empty string"):
            log.append("", "login.success")
        with pytest.raises(UsageError, match="not JSON-serialisable"):
            log.append("alice", "login.success", {"x": object()})
        assert log.size == 0
    with pytest.raises(AuditError, match="closed"):
        log.append("alice", "login.success")


def test_a_failed_write_fails_closed(tmp_path: Path) -> None:
    """A real write error (file size limit) rejects the batch and every later append."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from ztlab.hub.audit import AuditLog
        from ztlab.common.errors import AuditError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        log = AuditLog.open({str(tmp_path / "audit.jsonl")!r}, checkpoint_interval=60)
        log.append("alice", "login.success")
        log.checkpoint().result()
        size = __import__("os").path.getsize({str(tmp_path / "audit.jsonl")!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, size + 100))
        try:
            log.append("alice", "big.event", {{"pad": "x" * 500}})
        except AuditError as exc:
            print("first:", exc.message)
        try:
            log.append("alice", "login.success")
        except AuditError as exc:
            print("later:", exc.message)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert "first:" in result.stdout, result.stderr
    assert "refuses further appends" in result.stdout
    assert "later:" in result.stdout
    report = verify(tmp_path / "audit.jsonl")
    assert report.records == 1


def test_the_writer_is_an_audit_sink(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    with AuditLog.open(log_path) as log:
        log.record(actor="alice", action="policy.decision", detail={"allowed": False})
    (line,) = record_lines(log_path)
    assert json.loads(line)["detail"] == {"allowed": False}
