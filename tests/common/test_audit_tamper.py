"""Property: any single-byte change, deletion, insertion, swap or truncation is detected."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.auditlog_helpers import record_lines, verify, write_log
from ztlab.common.auditlog.verify import AuditVerificationError

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text(max_size=20)
)
details = st.dictionaries(st.text(min_size=1, max_size=10), json_scalars, max_size=4)
events = st.lists(
    st.tuples(
        st.sampled_from(["alice", "bob", "ztlab-hub", "carol@example.org"]),
        st.sampled_from(["policy.decision", "login.success", "gpu.lease", "break_glass.access"]),
        details,
    ),
    min_size=1,
    max_size=25,
)

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _tamper(data: bytes, draw: st.DrawFn) -> bytes:
    lines = data.splitlines(keepends=True)
    kind = draw(
        st.sampled_from(["flip", "delete", "insert", "drop_line", "dup_line", "swap", "truncate"])
    )
    if kind == "flip":
        at = draw(st.integers(0, len(data) - 1))
        value = draw(st.integers(0, 255).filter(lambda b: b != data[at]))
        return data[:at] + bytes([value]) + data[at + 1 :]
    if kind == "delete":
        at = draw(st.integers(0, len(data) - 1))
        length = draw(st.integers(1, min(64, len(data) - at)))
        return data[:at] + data[at + length :]
    if kind == "insert":
        at = draw(st.integers(0, len(data)))
        extra = draw(st.binary(min_size=1, max_size=16))
        return data[:at] + extra + data[at:]
    if kind == "drop_line":
        at = draw(st.integers(0, len(lines) - 1))
        return b"".join(lines[:at] + lines[at + 1 :])
    if kind == "dup_line":
        source = draw(st.integers(0, len(lines) - 1))
        at = draw(st.integers(0, len(lines)))
        return b"".join([*lines[:at], lines[source], *lines[at:]])
    if kind == "swap":
        if len(lines) < 2:
            return data[:-1]  # nothing to swap: truncate instead
        i = draw(st.integers(0, len(lines) - 2))
        j = draw(st.integers(i + 1, len(lines) - 1))
        lines[i], lines[j] = lines[j], lines[i]
        return b"".join(lines)
    at = draw(st.integers(0, len(data) - 1))
    return data[:at]


@SETTINGS
@given(events=events, data=st.data())
def test_any_tampering_of_the_records_is_detected(
    events: list[tuple[str, str, dict[str, object]]], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "audit.jsonl"
        write_log(log, events)
        report = verify(log)
        assert report.records == len(events) == report.covered
        original = log.read_bytes()
        tampered = _tamper(original, data.draw)
        assert tampered != original
        log.write_bytes(tampered)
        try:
            report = verify(log)
        except AuditVerificationError:
            return
        # The one change that verifies: bytes without a newline appended after the last
        # line, which is exactly what a writer killed mid-append leaves. It is reported as a
        # torn tail (and quarantined by the next writer), never taken as a record.
        assert tampered.startswith(original), "tampering went undetected"
        assert b"\n" not in tampered[len(original) :], "a complete line went undetected"
        assert report.torn_tail is not None
        assert report.records == len(events)
        assert any("torn" in warning for warning in report.warnings)


@SETTINGS
@given(events=events, data=st.data())
def test_any_byte_flip_in_a_signed_checkpoint_is_detected(
    events: list[tuple[str, str, dict[str, object]]], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "audit.jsonl"
        write_log(log, events)
        checkpoints = log.with_name(log.name + ".checkpoints")
        original = checkpoints.read_bytes()
        # every byte but the final newline (a missing newline reads as a torn, unfinished
        # checkpoint, and leaves the records it would have covered unsigned, not trusted)
        at = data.draw(st.integers(0, len(original) - 2))
        value = data.draw(st.integers(0, 255).filter(lambda b: b != original[at]))
        checkpoints.write_bytes(original[:at] + bytes([value]) + original[at + 1 :])
        with pytest.raises(AuditVerificationError):
            verify(log)


def test_the_first_bad_record_is_named(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write_log(log, [("alice", "login.success", {"n": n}) for n in range(10)])
    lines = record_lines(log)
    lines[4] = lines[4].replace(b'"n":4', b'"n":5')
    log.write_bytes(b"".join(lines))
    with pytest.raises(AuditVerificationError) as caught:
        verify(log)
    assert caught.value.record == 4
    assert "record 4 (line 5) was modified" in caught.value.message


def test_removed_and_reordered_records_are_named(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write_log(log, [("alice", "login.success", {"n": n}) for n in range(6)])
    lines = record_lines(log)
    log.write_bytes(b"".join(lines[:2] + lines[3:]))
    with pytest.raises(AuditVerificationError, match="removed, inserted or reordered") as caught:
        verify(log)
    assert caught.value.record == 2


def test_truncation_behind_the_last_checkpoint_is_detected(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write_log(log, [("alice", "login.success", {"n": n}) for n in range(6)])
    lines = record_lines(log)
    log.write_bytes(b"".join(lines[:4]))
    with pytest.raises(AuditVerificationError, match="truncated") as caught:
        verify(log)
    assert "covers 6 records but the log holds only 4" in caught.value.message


def test_modified_last_record_is_caught_by_the_signed_root(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write_log(log, [("alice", "login.success", {"n": n}) for n in range(3)])
    lines = record_lines(log)
    lines[2] = lines[2].replace(b"alice", b"mallo")
    log.write_bytes(b"".join(lines))
    with pytest.raises(
        AuditVerificationError,
        match=r"record 2 \(line 3\) was modified.*do not match signed checkpoint 0",
    ):
        verify(log)


def test_a_rewritten_tail_with_recomputed_chain_is_caught(tmp_path: Path) -> None:
    """An attacker without the key recomputes seq/prev after editing: the roots disagree."""
    from ztlab.common.auditlog.record import format_record, parse_record, record_leaf_hash

    log = tmp_path / "audit.jsonl"
    write_log(log, [("alice", "login.success", {"n": n}) for n in range(5)])
    records = [parse_record(line[:-1]) for line in record_lines(log)]
    prev = records[1].prev
    rebuilt = []
    for index, record in enumerate(records):
        actor = "mallory" if index == 1 else record.actor
        line = format_record(
            seq=record.seq,
            prev=prev if index >= 1 else record.prev,
            ts=record.ts,
            actor=actor,
            action=record.action,
            detail_json=f'{{"n":{index}}}',
        )
        if index >= 1:
            prev = record_leaf_hash(line).hex()
        rebuilt.append(line + b"\n")
    log.write_bytes(b"".join(rebuilt))
    with pytest.raises(AuditVerificationError, match="recomputed hash chain"):
        verify(log)


def test_a_signature_with_changed_unused_base64_bits_is_refused(tmp_path: Path) -> None:
    """The last base64 character before '=' carries unused bits: a decoder ignores them, so
    the flipped character decodes to the same signature. Only canonical base64 passes."""
    log = tmp_path / "audit.jsonl"
    write_log(log, [("alice", "login.success", {})])
    checkpoints = log.with_name(log.name + ".checkpoints")
    text = checkpoints.read_text()
    end = text.rindex("=\\n")  # the signature's padding, before the note's final newline
    last = text[end - 1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = alphabet[alphabet.index(last) ^ 1]  # differs only in an unused low bit
    checkpoints.write_text(text[: end - 1] + twin + text[end:])
    with pytest.raises(AuditVerificationError, match="not canonical base64"):
        verify(log)
