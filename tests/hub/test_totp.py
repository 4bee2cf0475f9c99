"""The hub's TOTP step-up store: real SQLite files, real pyotp codes, a clock we move."""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import stat
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyotp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztlab.common.errors import KeyFileError, UsageError, ZtlabError
from ztlab.hub.mfa.totp import (
    RECOVERY_CODE_COUNT,
    Enrollment,
    TotpError,
    TotpStore,
    TotpStoreError,
)

#: a time 10 s into a 30 s step, so that moving by less than 20 s stays in the same step
T0 = 1_700_000_010.0


class ManualClock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ListSink:
    """An AuditSink that keeps every record in a list."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def record(self, *, actor: str, action: str, detail: Mapping[str, Any]) -> None:
        self.records.append({"actor": actor, "action": action, "detail": dict(detail)})

    def actions(self) -> list[str]:
        return [r["action"] for r in self.records]

    def last(self, action: str) -> dict[str, Any]:
        return [r for r in self.records if r["action"] == action][-1]


class Lab:
    """A store in a fresh directory, with its clock and audit sink."""

    def __init__(self, tmp_path: Path, **options: Any) -> None:
        self.dir = tmp_path / "state"
        self.db_path = self.dir / "totp.db"
        self.key_path = tmp_path / "keys" / "totp.key"
        self.clock = ManualClock()
        self.sink = ListSink()
        self.options = options
        self.store = self.open()

    def open(self) -> TotpStore:
        return TotpStore.open(
            self.db_path,
            key_path=self.key_path,
            audit=self.sink,
            clock=self.clock,
            **self.options,
        )

    def reopen(self) -> TotpStore:
        self.store.close()
        self.store = self.open()
        return self.store

    def enroll(self, user: str = "alice") -> Enrollment:
        """Begin and confirm an enrollment at the current time; the clock then moves a step."""
        enrollment = self.store.begin_enrollment(user)
        self.store.confirm_enrollment(user, self.code(enrollment))
        self.clock.advance(30)
        return enrollment

    def code(self, enrollment: Enrollment, offset_steps: int = 0) -> str:
        return pyotp.TOTP(enrollment.secret).at(self.clock.now, counter_offset=offset_steps)

    def sql(self, statement: str, *args: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db_path) as db:
            return db.execute(statement, args).fetchall()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    yield lab
    lab.store.close()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _refused(store: TotpStore, user: str, code: str) -> TotpError:
    with pytest.raises(TotpError) as info:
        store.verify(user, code)
    return info.value


def _wrong_code(enrollment: Enrollment, clock: ManualClock, window: int = 1) -> str:
    """A 6-digit code that no step within the window accepts."""
    totp = pyotp.TOTP(enrollment.secret)
    valid = {totp.at(clock.now, counter_offset=k) for k in range(-window, window + 1)}
    return next(f"{n:06d}" for n in range(1_000_000) if f"{n:06d}" not in valid)


# -- enrollment ---------------------------------------------------------------------------


def test_enrollment_is_pending_until_confirmed(lab: Lab) -> None:
    enrollment = lab.store.begin_enrollment("alice")

    assert re.fullmatch(r"[A-Z2-7]{32}", enrollment.secret)
    uri = pyotp.parse_uri(enrollment.provisioning_uri)
    assert isinstance(uri, pyotp.TOTP)
    assert uri.secret == enrollment.secret
    assert (uri.digits, uri.interval, uri.issuer, uri.name) == (6, 30, "zerotrust-lab", "alice")
    assert enrollment.provisioning_uri.startswith("otpauth://totp/zerotrust-lab:alice?secret=")
    assert "issuer=zerotrust-lab" in enrollment.provisioning_uri
    assert enrollment.qr_svg.startswith("<svg")
    assert enrollment.qr_svg.rstrip().endswith("</svg>")
    assert len(enrollment.recovery_codes) == RECOVERY_CODE_COUNT == 10
    assert len(set(enrollment.recovery_codes)) == 10
    assert all(re.fullmatch(r"[A-Z2-7]{5}-[A-Z2-7]{5}", c) for c in enrollment.recovery_codes)
    assert not lab.store.is_enrolled("alice")
    assert _refused(lab.store, "alice", lab.code(enrollment)).reason == "not-enrolled"
    # recovery codes of a pending enrollment do not work either
    assert _refused(lab.store, "alice", enrollment.recovery_codes[0]).reason == "not-enrolled"

    lab.store.confirm_enrollment("alice", lab.code(enrollment))

    assert lab.store.is_enrolled("alice")
    assert lab.sink.actions() == [
        "mfa.totp.enrollment_started",
        "mfa.totp.failed",
        "mfa.totp.failed",
        "mfa.totp.enrolled",
        "mfa.totp.verified",
    ]
    assert lab.sink.records[1]["detail"] == {
        "reason": "not-enrolled",
        "failures": 0,
        "stage": "verify",
    }


def test_enrollment_repr_hides_the_secrets(lab: Lab) -> None:
    enrollment = lab.store.begin_enrollment("alice")
    text = repr(enrollment)
    assert enrollment.secret not in text
    assert not any(code in text for code in enrollment.recovery_codes)


def test_beginning_again_replaces_a_pending_enrollment(lab: Lab) -> None:
    first = lab.store.begin_enrollment("alice")
    second = lab.store.begin_enrollment("alice")
    assert first.secret != second.secret
    assert lab.sink.last("mfa.totp.enrollment_started")["detail"] == {"replaced_pending": True}

    with pytest.raises(TotpError) as info:
        lab.store.confirm_enrollment("alice", lab.code(first))
    assert info.value.reason == "wrong-code"
    lab.store.confirm_enrollment("alice", lab.code(second))
    assert lab.store.is_enrolled("alice")
    # only the second enrollment's recovery codes exist
    assert _refused(lab.store, "alice", first.recovery_codes[0]).reason == "wrong-code"
    assert lab.store.verify("alice", second.recovery_codes[0]) == "recovery"
    assert lab.sql("SELECT count(*) FROM recovery_codes") == [(10,)]


def test_an_active_enrollment_is_not_replaced(lab: Lab) -> None:
    enrollment = lab.enroll()
    with pytest.raises(TotpError) as info:
        lab.store.begin_enrollment("alice")
    assert info.value.reason == "already-enrolled"
    with pytest.raises(TotpError) as info:
        lab.store.confirm_enrollment("alice", lab.code(enrollment))
    assert info.value.reason == "already-enrolled"
    assert lab.store.verify("alice", lab.code(enrollment)) == "totp"


def test_confirming_with_a_wrong_code_keeps_it_pending(lab: Lab) -> None:
    enrollment = lab.store.begin_enrollment("alice")
    with pytest.raises(TotpError) as info:
        lab.store.confirm_enrollment("alice", _wrong_code(enrollment, lab.clock))
    assert info.value.reason == "wrong-code"
    assert not lab.store.is_enrolled("alice")
    assert lab.store.failures("alice") == 1

    lab.store.confirm_enrollment("alice", lab.code(enrollment))
    assert lab.store.is_enrolled("alice")
    assert lab.store.failures("alice") == 0


def test_confirming_needs_a_totp_code_and_a_pending_enrollment(lab: Lab) -> None:
    with pytest.raises(TotpError) as info:
        lab.store.confirm_enrollment("alice", "123456")
    assert info.value.reason == "no-pending-enrollment"
    enrollment = lab.store.begin_enrollment("alice")
    with pytest.raises(TotpError) as info:
        lab.store.confirm_enrollment("alice", enrollment.recovery_codes[0])
    assert info.value.reason == "malformed"


def test_the_confirmation_step_cannot_be_replayed(lab: Lab) -> None:
    enrollment = lab.store.begin_enrollment("alice")
    code = lab.code(enrollment)
    lab.store.confirm_enrollment("alice", code)
    assert _refused(lab.store, "alice", code).reason == "replayed"
    lab.clock.advance(30)
    assert lab.store.verify("alice", lab.code(enrollment)) == "totp"


# -- verification -------------------------------------------------------------------------


def test_the_right_code_verifies(lab: Lab) -> None:
    enrollment = lab.enroll()
    assert lab.store.verify("alice", lab.code(enrollment)) == "totp"
    assert lab.store.failures("alice") == 0
    assert lab.sink.last("mfa.totp.verified") == {
        "actor": "alice",
        "action": "mfa.totp.verified",
        "detail": {"method": "totp", "stage": "verify"},
    }


def test_spaces_in_a_code_are_ignored(lab: Lab) -> None:
    enrollment = lab.enroll()
    code = lab.code(enrollment)
    assert lab.store.verify("alice", f" {code[:3]} {code[3:]}\n") == "totp"


def test_a_replayed_code_is_refused(lab: Lab) -> None:
    enrollment = lab.enroll()
    code = lab.code(enrollment)
    assert lab.store.verify("alice", code) == "totp"
    lab.clock.advance(5)  # same step
    error = _refused(lab.store, "alice", code)
    assert error.reason == "replayed"
    assert error.retry_after is None
    assert lab.store.failures("alice") == 1
    assert lab.sink.last("mfa.totp.failed")["detail"] == {
        "reason": "replayed",
        "failures": 1,
        "stage": "verify",
    }


def test_an_older_step_within_the_window_is_refused_after_a_newer_one(lab: Lab) -> None:
    enrollment = lab.enroll()
    older, newer = lab.code(enrollment, -1), lab.code(enrollment, +1)
    assert lab.store.verify("alice", newer) == "totp"
    assert _refused(lab.store, "alice", lab.code(enrollment)).reason == "replayed"
    if older not in (newer, lab.code(enrollment)):
        assert _refused(lab.store, "alice", older).reason == "replayed"


def test_the_window_allows_one_step_of_drift_and_no_more(lab: Lab) -> None:
    enrollment = lab.enroll()
    lab.clock.advance(30)  # the confirmation step is now two steps back
    two_back = lab.code(enrollment, -2)
    valid = {lab.code(enrollment, k) for k in (-1, 0, 1)}
    if two_back not in valid:
        assert _refused(lab.store, "alice", two_back).reason == "wrong-code"
    assert lab.store.verify("alice", lab.code(enrollment, -1)) == "totp"


def test_a_zero_window_accepts_only_the_current_step(tmp_path: Path) -> None:
    lab = Lab(tmp_path, valid_window=0)
    enrollment = lab.enroll()
    previous = lab.code(enrollment, -1)
    if previous != lab.code(enrollment):
        assert _refused(lab.store, "alice", previous).reason == "wrong-code"
    assert lab.store.verify("alice", lab.code(enrollment)) == "totp"
    lab.store.close()


def test_a_wrong_code_is_refused_and_counted(lab: Lab) -> None:
    enrollment = lab.enroll()
    error = _refused(lab.store, "alice", _wrong_code(enrollment, lab.clock))
    assert error.reason == "wrong-code"
    assert error.message == "That code is not right."
    assert lab.store.failures("alice") == 1
    assert lab.store.verify("alice", lab.code(enrollment)) == "totp"
    assert lab.store.failures("alice") == 0


@pytest.mark.parametrize(
    "code",
    ["", " ", "12345", "1234567", "abcdef", "12a456", "12-456", "١٢٣٤٥٦", "123456" * 20, "ABCD"],
)
def test_malformed_input_is_refused_and_counted(lab: Lab, code: str) -> None:
    lab.enroll()
    error = _refused(lab.store, "alice", code)
    assert error.reason == "malformed"
    assert lab.store.failures("alice") == 1


def test_an_unknown_user_is_not_enrolled(lab: Lab) -> None:
    assert not lab.store.is_enrolled("nobody")
    assert _refused(lab.store, "nobody", "123456").reason == "not-enrolled"
    assert lab.store.failures("nobody") == 0


def test_empty_user_names_are_refused(lab: Lab) -> None:
    with pytest.raises(UsageError):
        lab.store.verify("", "123456")
    with pytest.raises(UsageError):
        lab.store.unlock("alice", actor="")


# -- lockout ------------------------------------------------------------------------------


def _lock_out(lab: Lab, enrollment: Enrollment, user: str = "alice") -> TotpError:
    wrong = _wrong_code(enrollment, lab.clock)
    for n in range(1, 5):
        assert _refused(lab.store, user, wrong).reason == "wrong-code"
        assert lab.store.failures(user) == n
    return _refused(lab.store, user, wrong)


def test_max_failures_lock_the_account_until_the_lockout_ends(lab: Lab) -> None:
    enrollment = lab.enroll()
    error = _lock_out(lab, enrollment)
    assert error.reason == "locked"
    assert error.retry_after == 900
    assert "15 minutes" in error.message
    assert lab.sink.last("mfa.totp.locked")["detail"] == {"failures": 5, "lockout_seconds": 900}
    assert lab.sink.last("mfa.totp.failed")["detail"]["reason"] == "wrong-code"

    lab.clock.advance(100)
    error = _refused(lab.store, "alice", lab.code(enrollment))  # right code, still locked
    assert error.reason == "locked"
    assert error.retry_after == pytest.approx(800)
    assert lab.store.failures("alice") == 5  # attempts while locked are refused, not counted

    lab.clock.advance(800)
    assert lab.store.failures("alice") == 0
    assert lab.store.verify("alice", lab.code(enrollment)) == "totp"


def test_a_recovery_code_is_refused_while_locked(lab: Lab) -> None:
    enrollment = lab.enroll()
    _lock_out(lab, enrollment)
    assert _refused(lab.store, "alice", enrollment.recovery_codes[0]).reason == "locked"
    lab.clock.advance(900)
    assert lab.store.verify("alice", enrollment.recovery_codes[0]) == "recovery"


def test_replays_and_malformed_input_count_toward_the_lockout(tmp_path: Path) -> None:
    lab = Lab(tmp_path, max_failures=3, lockout_seconds=60)
    enrollment = lab.enroll()
    code = lab.code(enrollment)
    lab.store.verify("alice", code)
    assert _refused(lab.store, "alice", code).reason == "replayed"
    assert _refused(lab.store, "alice", "nope").reason == "malformed"
    error = _refused(lab.store, "alice", code)
    assert (error.reason, error.retry_after) == ("locked", 60)
    assert "1 minute." in error.message
    lab.store.close()


def test_an_admin_unlocks_a_locked_account(lab: Lab) -> None:
    enrollment = lab.enroll()
    _lock_out(lab, enrollment)
    lab.store.unlock("alice", actor="root-admin")
    assert lab.store.failures("alice") == 0
    assert lab.store.verify("alice", lab.code(enrollment)) == "totp"
    assert lab.sink.last("mfa.totp.unlocked") == {
        "actor": "root-admin",
        "action": "mfa.totp.unlocked",
        "detail": {"user": "alice", "was_locked": True, "failures": 5},
    }


def test_confirmation_attempts_are_locked_out_too(lab: Lab) -> None:
    enrollment = lab.store.begin_enrollment("alice")
    wrong = _wrong_code(enrollment, lab.clock)
    for _ in range(4):
        with pytest.raises(TotpError):
            lab.store.confirm_enrollment("alice", wrong)
    with pytest.raises(TotpError) as info:
        lab.store.confirm_enrollment("alice", wrong)
    assert info.value.reason == "locked"
    with pytest.raises(TotpError) as info:
        lab.store.confirm_enrollment("alice", lab.code(enrollment))
    assert info.value.reason == "locked"
    assert not lab.store.is_enrolled("alice")


# -- recovery codes -----------------------------------------------------------------------


def test_a_recovery_code_works_once(lab: Lab) -> None:
    enrollment = lab.enroll()
    code = enrollment.recovery_codes[3]
    assert lab.store.verify("alice", code) == "recovery"
    assert lab.sink.last("mfa.recovery_code.used")["detail"] == {"codes_left": 9}
    assert lab.sink.last("mfa.totp.verified")["detail"] == {"method": "recovery", "stage": "verify"}
    assert _refused(lab.store, "alice", code).reason == "replayed"
    assert lab.store.failures("alice") == 1


def test_recovery_codes_accept_lower_case_and_no_dash(lab: Lab) -> None:
    enrollment = lab.enroll()
    first, second, third = enrollment.recovery_codes[:3]
    assert lab.store.verify("alice", first.lower()) == "recovery"
    assert lab.store.verify("alice", second.replace("-", "")) == "recovery"
    assert lab.store.verify("alice", f"  {third.replace('-', ' ').lower()} ") == "recovery"
    assert lab.sink.last("mfa.recovery_code.used")["detail"] == {"codes_left": 7}
    assert _refused(lab.store, "alice", first.replace("-", "").lower()).reason == "replayed"


def test_a_wrong_recovery_code_is_refused(lab: Lab) -> None:
    enrollment = lab.enroll()
    wrong = "AAAAA-AAAAA"
    assert wrong not in enrollment.recovery_codes
    assert _refused(lab.store, "alice", wrong).reason == "wrong-code"


def test_recovery_codes_are_bound_to_their_user(lab: Lab) -> None:
    alice = lab.enroll("alice")
    lab.enroll("bob")
    assert _refused(lab.store, "bob", alice.recovery_codes[0]).reason == "wrong-code"


def test_every_recovery_code_works_and_then_none(lab: Lab) -> None:
    enrollment = lab.enroll()
    for n, code in enumerate(enrollment.recovery_codes, start=1):
        assert lab.store.verify("alice", code) == "recovery"
        assert lab.sink.last("mfa.recovery_code.used")["detail"] == {"codes_left": 10 - n}
    assert lab.store.verify("alice", lab.code(enrollment)) == "totp"


# -- administration -----------------------------------------------------------------------


def test_reset_forgets_the_enrollment(lab: Lab) -> None:
    old = lab.enroll()
    lab.store.reset("alice", actor="root-admin")
    assert not lab.store.is_enrolled("alice")
    assert _refused(lab.store, "alice", lab.code(old)).reason == "not-enrolled"
    assert lab.sql("SELECT count(*) FROM recovery_codes") == [(0,)]
    assert lab.sink.last("mfa.totp.reset") == {
        "actor": "root-admin",
        "action": "mfa.totp.reset",
        "detail": {"user": "alice", "was_enrolled": True},
    }
    new = lab.enroll()
    assert new.secret != old.secret
    assert lab.store.verify("alice", lab.code(new)) == "totp"


# -- files and keys -----------------------------------------------------------------------


def test_files_are_private(lab: Lab) -> None:
    lab.enroll()
    assert _mode(lab.db_path) == 0o600
    assert _mode(lab.dir) == 0o700
    assert _mode(lab.key_path) == 0o600
    assert _mode(lab.key_path.parent) == 0o700
    assert lab.key_path.stat().st_size == 32
    for path in lab.dir.iterdir():  # journals, if any are left, too
        assert _mode(path) == 0o600, path


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_database_readable_by_others_is_refused(lab: Lab, mode: int) -> None:
    lab.store.close()
    lab.db_path.chmod(mode)
    with pytest.raises(TotpStoreError) as info:
        lab.open()
    assert str(lab.db_path) in info.value.message
    assert f"{mode:04o}" in info.value.message
    assert isinstance(info.value, ZtlabError)


def test_a_key_file_readable_by_others_is_refused(lab: Lab) -> None:
    lab.store.close()
    lab.key_path.chmod(0o644)
    with pytest.raises(KeyFileError) as info:
        lab.open()
    assert str(lab.key_path) in info.value.message
    assert "0644" in info.value.message


def test_a_fresh_store_refuses_an_unsafe_existing_key_file(tmp_path: Path) -> None:
    key_path = tmp_path / "totp.key"
    key_path.write_bytes(bytes(32))
    key_path.chmod(0o640)
    with pytest.raises(KeyFileError):
        TotpStore.open(tmp_path / "db" / "totp.db", key_path=key_path)


def test_a_key_file_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    key_path = tmp_path / "totp.key"
    key_path.write_bytes(b"short")
    key_path.chmod(0o600)
    with pytest.raises(KeyFileError) as info:
        TotpStore.open(tmp_path / "db" / "totp.db", key_path=key_path)
    assert "32 bytes" in info.value.message


def test_another_key_is_refused_for_an_existing_store(lab: Lab) -> None:
    lab.enroll()
    lab.store.close()
    lab.key_path.unlink()
    lab.key_path.write_bytes(b"k" * 32)
    lab.key_path.chmod(0o600)
    with pytest.raises(KeyFileError) as info:
        lab.open()
    assert "not the key" in info.value.message


def test_a_lost_key_is_not_silently_replaced(lab: Lab) -> None:
    lab.enroll()
    lab.store.close()
    lab.key_path.unlink()
    with pytest.raises(KeyFileError) as info:
        lab.open()
    assert "refusing to create a new one" in info.value.message
    assert not lab.key_path.exists()


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    db_path = tmp_path / "totp.db"
    db_path.write_bytes(b"not a database, but long enough to look like a header..." * 4)
    db_path.chmod(0o600)
    with pytest.raises(TotpStoreError):
        TotpStore.open(db_path, key_path=tmp_path / "totp.key")


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        TotpStore.open(tmp_path / "a.db", key_path=tmp_path / "k", max_failures=0)
    with pytest.raises(UsageError):
        TotpStore.open(tmp_path / "a.db", key_path=tmp_path / "k", valid_window=-1)
    with pytest.raises(UsageError):
        TotpStore.open(tmp_path / "a.db", key_path=tmp_path / "k", issuer="a:b")


def test_a_closed_store_refuses_calls(lab: Lab) -> None:
    lab.store.close()
    lab.store.close()
    with pytest.raises(TotpStoreError):
        lab.store.is_enrolled("alice")


# -- secrets at rest and in the audit log -------------------------------------------------


def test_a_secret_copied_to_another_user_does_not_decrypt(lab: Lab) -> None:
    alice = lab.enroll("alice")
    bob = lab.enroll("bob")
    lab.sql(
        "UPDATE totp_users SET secret = (SELECT secret FROM totp_users WHERE username = 'alice') "
        "WHERE username = 'bob'"
    )
    for code in (lab.code(alice), lab.code(bob)):
        with pytest.raises(TotpStoreError) as info:
            lab.store.verify("bob", code)
        assert "does not decrypt" in info.value.message
        assert code not in info.value.message
    assert lab.sink.last("mfa.totp.failed")["detail"]["reason"] == "undecryptable"
    assert lab.store.verify("alice", lab.code(alice)) == "totp"


def test_a_tampered_secret_does_not_decrypt(lab: Lab) -> None:
    enrollment = lab.enroll()
    (sealed,) = lab.sql("SELECT secret FROM totp_users WHERE username = 'alice'")[0]
    tampered = bytes(sealed[:-1]) + bytes([sealed[-1] ^ 1])
    lab.sql("UPDATE totp_users SET secret = ? WHERE username = 'alice'", tampered)
    with pytest.raises(TotpStoreError):
        lab.store.verify("alice", lab.code(enrollment))


def _secret_forms(enrollment: Enrollment) -> list[bytes]:
    forms = [enrollment.secret.encode(), enrollment.secret.lower().encode()]
    forms.append(base64.b32decode(enrollment.secret))
    for code in enrollment.recovery_codes:
        forms += [code.encode(), code.replace("-", "").encode(), code.lower().encode()]
    return forms


def test_nothing_secret_is_stored_in_clear(lab: Lab) -> None:
    active = lab.enroll("alice")
    pending = lab.store.begin_enrollment("bob")
    lab.store.verify("alice", active.recovery_codes[0])
    lab.store.close()
    raw = b"".join(path.read_bytes() for path in lab.dir.iterdir())
    for enrollment in (active, pending):
        for form in _secret_forms(enrollment):
            assert form not in raw
    lab.store = lab.open()


def test_nothing_secret_reaches_the_audit_log_or_an_error(lab: Lab) -> None:
    enrollment = lab.store.begin_enrollment("alice")
    codes_typed = [_wrong_code(enrollment, lab.clock), lab.code(enrollment)]
    messages: list[str] = []
    for code in codes_typed:
        try:
            lab.store.confirm_enrollment("alice", code)
        except TotpError as exc:
            messages.append(exc.diagnostics())
    lab.clock.advance(30)
    typed = [
        lab.code(enrollment),
        lab.code(enrollment),  # a replay
        enrollment.recovery_codes[0],
        enrollment.recovery_codes[0],  # a used recovery code
        enrollment.recovery_codes[1].lower(),
        _wrong_code(enrollment, lab.clock),
        "garbage",
    ]
    codes_typed += typed
    for code in typed * 2:  # the second round runs into the lockout
        try:
            lab.store.verify("alice", code)
        except TotpError as exc:
            messages.append(exc.diagnostics())
    lab.store.unlock("alice", actor="admin")
    lab.store.reset("alice", actor="admin")

    assert {r["action"] for r in lab.sink.records} == {
        "mfa.totp.enrollment_started",
        "mfa.totp.enrolled",
        "mfa.totp.verified",
        "mfa.totp.failed",
        "mfa.totp.locked",
        "mfa.recovery_code.used",
        "mfa.totp.unlocked",
        "mfa.totp.reset",
    }
    audit_text = json.dumps(lab.sink.records)
    secrets = [form.decode("latin-1") for form in _secret_forms(enrollment)]
    for text in [audit_text, *messages]:
        for secret in secrets + [c for c in codes_typed if c != "garbage"]:
            assert secret not in text
    known = {
        "reason",
        "failures",
        "stage",
        "method",
        "codes_left",
        "replaced_pending",
        "recovery_codes",
        "lockout_seconds",
        "user",
        "was_locked",
        "was_enrolled",
    }
    assert all(set(r["detail"]) <= known for r in lab.sink.records)


# -- persistence --------------------------------------------------------------------------


def test_state_survives_close_and_reopen(lab: Lab) -> None:
    alice = lab.enroll("alice")
    pending = lab.store.begin_enrollment("bob")
    carol = lab.enroll("carol")
    code = lab.code(alice)
    lab.store.verify("alice", code)
    wrong = _wrong_code(carol, lab.clock)
    for _ in range(2):
        _refused(lab.store, "carol", wrong)

    store = lab.reopen()
    assert store.is_enrolled("alice")
    assert store.is_enrolled("carol")
    assert not store.is_enrolled("bob")
    assert _refused(store, "alice", code).reason == "replayed"  # the last step survived
    assert store.failures("carol") == 2
    store.confirm_enrollment("bob", lab.code(pending))  # pending survived
    for _ in range(3):
        _refused(store, "carol", wrong)

    store = lab.reopen()
    error = _refused(store, "carol", lab.code(carol))
    assert (error.reason, error.retry_after) == ("locked", 900)
    assert store.failures("carol") == 5
    lab.clock.advance(900)
    store = lab.reopen()
    assert store.verify("carol", lab.code(carol)) == "totp"


def test_two_stores_on_one_file_accept_a_code_once(lab: Lab) -> None:
    enrollment = lab.enroll()
    code = lab.code(enrollment)
    stores = [lab.open() for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    results: list[str] = []

    def attempt(store: TotpStore) -> None:
        barrier.wait()
        try:
            results.append(store.verify("alice", code))
        except TotpError as exc:
            results.append(exc.reason)

    threads = [threading.Thread(target=attempt, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    assert sorted(results) == ["replayed"] * 3 + ["totp"]


# -- property tests -----------------------------------------------------------------------


# one store for all examples of a test: only its failure count grows between them
_PROPERTY_SETTINGS: dict[str, Any] = {
    "max_examples": 300,
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture],
}


@pytest.fixture
def enrolled(tmp_path: Path) -> Iterator[tuple[Lab, set[str]]]:
    lab = Lab(tmp_path, max_failures=1_000_000_000)
    enrollment = lab.enroll()
    totp = pyotp.TOTP(enrollment.secret)
    valid = {totp.at(lab.clock.now, counter_offset=k) for k in (-1, 0, 1)}
    yield lab, valid
    lab.store.close()


@settings(**_PROPERTY_SETTINGS)
@given(code=st.integers(min_value=0, max_value=999_999).map(lambda n: f"{n:06d}"))
def test_random_six_digit_codes_are_refused(enrolled: tuple[Lab, set[str]], code: str) -> None:
    lab, valid = enrolled
    if code in valid:
        return
    assert _refused(lab.store, "alice", code).reason == "wrong-code"


@settings(**_PROPERTY_SETTINGS)
@given(code=st.text(max_size=80))
def test_arbitrary_text_is_refused_with_a_totp_error(
    enrolled: tuple[Lab, set[str]], code: str
) -> None:
    lab, valid = enrolled
    if "".join(code.split()) in valid:
        return
    error = _refused(lab.store, "alice", code)
    assert error.reason in {"wrong-code", "malformed"}
