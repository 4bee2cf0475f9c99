"""The hub's TOTP step-up: enrollment, verification, replay protection and lockout.

When the identity provider's ``amr`` claim shows no second factor, the hub asks for a TOTP
code (RFC 6238: 6 digits, 30-second steps) or a single-use recovery code. This module is the
control plane's store behind that page; the web handlers live in
:mod:`ztlab.hub.login.handlers`.

Storage is one SQLite file (mode 0600, its directory 0700 when this module creates it; a
file that group or others can read is refused) committed on every change. TOTP secrets are
sealed with AES-GCM under a key derived from a separate key file, with the user name as
associated data, so a sealed secret copied to another user's row does not decrypt.
Recovery codes are kept only as HMAC-SHA256 digests. The store remembers, per user, the
last accepted time step (a code for that step or an earlier one is a replay), the number of
consecutive failures and the end of any lockout.

Verification, step by step (:meth:`TotpStore.verify`):

(0) the user has an active enrollment, else ``not-enrolled``;
(1) the user is not locked out, else ``locked`` (even a right code is refused);
(2) the input is a 6-digit code or a recovery code, else ``malformed``;
(3) a 6-digit code matches one of the ``valid_window`` steps either side of now, else
    ``wrong-code``; the matched step is later than the last accepted one, else ``replayed``;
(4) a recovery code matches an unused one, else ``wrong-code`` (or ``replayed`` if used);
(5) success resets the failure count and records the step (or spends the recovery code);
    a refusal at (2)-(4) counts as a failure, and ``max_failures`` in a row lock the user
    out for ``lockout_seconds``.

Every outcome is recorded through the :class:`~ztlab.common.auditlog.sink.AuditSink`, inside
the database transaction, so a sink that refuses (a failed audit log) fails the operation
closed. No audit detail or error message ever holds a secret or a code.
"""

from __future__ import annotations

import hmac
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

import pyotp
import segno

from ztlab.common.auditlog.sink import AuditSink
from ztlab.common.errors import KeyFileError, UsageError, ZtlabError
from ztlab.hub.mfa._sealed import SealingKey, load_key_file, load_or_create_key_file
from ztlab.hub.private import check_private_file, write_private_file

__all__ = [
    "DIGITS",
    "PERIOD",
    "RECOVERY_CODE_COUNT",
    "Enrollment",
    "TotpError",
    "TotpReason",
    "TotpStore",
    "TotpStoreError",
    "VerifyMethod",
]

#: why a code was refused; also the ``reason`` of the ``mfa.totp.failed`` audit record
TotpReason = Literal[
    "wrong-code",
    "replayed",
    "locked",
    "not-enrolled",
    "already-enrolled",
    "no-pending-enrollment",
    "malformed",
]

#: how a user passed the step-up
VerifyMethod = Literal["totp", "recovery"]

#: digits in a TOTP code
DIGITS: Final = 6
#: seconds per TOTP time step
PERIOD: Final = 30
#: recovery codes issued with each enrollment
RECOVERY_CODE_COUNT: Final = 10

_RECOVERY_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # RFC 4648 base32
_RECOVERY_HALF: Final = 5
_MAX_INPUT: Final = 64  # longer input is malformed without looking further
_SCHEMA_VERSION: Final = 1
_FINGERPRINT: Final = "key_fingerprint"

_SCHEMA: Final = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS totp_users (
    username TEXT PRIMARY KEY,
    secret BLOB,              -- active enrollment: AES-GCM nonce || ciphertext
    pending_secret BLOB,      -- begun, not yet confirmed: same sealing
    last_step INTEGER,        -- last accepted TOTP time step (replays are <= this)
    failures INTEGER NOT NULL DEFAULT 0,
    locked_until REAL,        -- clock() value when the lockout ends
    enrolled_at REAL,
    updated_at REAL NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS recovery_codes (
    username TEXT NOT NULL,
    digest BLOB NOT NULL,     -- HMAC-SHA256(derived key, user || normalized code)
    pending INTEGER NOT NULL, -- 1 until the enrollment is confirmed
    used_at REAL,
    PRIMARY KEY (username, digest)
) STRICT;
PRAGMA user_version = 1;
COMMIT;
"""

_MESSAGES: Final[Mapping[TotpReason, tuple[str, str | None]]] = {
    "wrong-code": (
        "That code is not right.",
        "Enter the current code from your authenticator app; check that its clock is right.",
    ),
    "replayed": (
        "That code has already been used.",
        "Wait for your authenticator app to show a new code, then enter it.",
    ),
    "locked": (
        "Too many wrong codes: two-factor sign-in is locked for this account.",
        "Try again later, or ask an administrator to unlock your account.",
    ),
    "not-enrolled": (
        "No authenticator app is enrolled for this account.",
        "Sign in again to enroll one.",
    ),
    "already-enrolled": (
        "An authenticator app is already enrolled for this account.",
        "To enroll another one, ask an administrator to reset the enrollment.",
    ),
    "no-pending-enrollment": (
        "There is no enrollment waiting for confirmation.",
        "Start the enrollment again.",
    ),
    "malformed": (
        "Enter the 6-digit code from your authenticator app, or a recovery code (XXXXX-XXXXX).",
        None,
    ),
}


class TotpError(ZtlabError):
    """A TOTP step was refused: ``message`` is for the user, ``reason`` for the audit log.

    ``retry_after`` is the number of seconds a lockout still lasts (``reason == "locked"``),
    else ``None``. Neither the message nor anything else here holds the code entered.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: TotpReason,
        retry_after: float | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.reason: TotpReason = reason
        self.retry_after = retry_after

    @classmethod
    def for_reason(cls, reason: TotpReason, *, retry_after: float | None = None) -> TotpError:
        """The standard user-facing error for ``reason``."""
        message, hint = _MESSAGES[reason]
        if retry_after is not None:
            minutes = max(1, int(-(-retry_after // 60)))
            message = f"{message} Try again in {minutes} minute{'s' if minutes != 1 else ''}."
        return cls(message, reason=reason, retry_after=retry_after, hint=hint)


class TotpStoreError(ZtlabError):
    """The TOTP store cannot be used: unsafe permissions, unreadable, tampered with, closed."""


@dataclass(frozen=True)
class Enrollment:
    """What a user needs to set up an authenticator app; shown once, never stored in clear.

    Every field is secret material, so none of them appears in ``repr``.
    """

    #: the TOTP secret, base32 (RFC 4648, no padding)
    secret: str = field(repr=False)
    #: ``otpauth://totp/ISSUER:USER?secret=...&issuer=ISSUER`` for authenticator apps
    provisioning_uri: str = field(repr=False)
    #: the provisioning URI as a QR code: an ``<svg>`` element to inline in HTML
    qr_svg: str = field(repr=False)
    #: single-use recovery codes, ``XXXXX-XXXXX``
    recovery_codes: tuple[str, ...] = field(repr=False)


@dataclass(frozen=True, slots=True)
class _UserRow:
    username: str
    secret: bytes | None
    pending_secret: bytes | None
    last_step: int | None
    failures: int
    locked_until: float | None


@dataclass(frozen=True, slots=True)
class _Refusal:
    reason: TotpReason
    counts: bool  # whether it counts as a failure toward the lockout


@dataclass(frozen=True, slots=True)
class _Outcome:
    method: VerifyMethod | None = None
    refusal: _Refusal | None = None


_MALFORMED: Final = _Refusal("malformed", counts=True)
_WRONG: Final = _Refusal("wrong-code", counts=True)
_REPLAYED: Final = _Refusal("replayed", counts=True)
_LOCKED: Final = _Refusal("locked", counts=False)


class TotpStore:
    """Per-user TOTP enrollments, recovery codes, replay counters and lockouts.

    Open one with :meth:`open`. Methods are safe to call from several threads; several
    processes may share the file (each change is one ``BEGIN IMMEDIATE`` transaction).
    """

    def __init__(
        self,
        *,
        path: Path,
        connection: sqlite3.Connection,
        key: SealingKey,
        audit: AuditSink | None,
        issuer: str,
        max_failures: int,
        lockout_seconds: float,
        valid_window: int,
        clock: Callable[[], float],
    ) -> None:
        """Use :meth:`open`; this takes an already-checked connection and key."""
        self.path = path
        self._db: sqlite3.Connection | None = connection
        self._key = key
        self._audit = audit
        self._issuer = issuer
        self._max_failures = max_failures
        self._lockout_seconds = float(lockout_seconds)
        self._valid_window = valid_window
        self._clock = clock
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        key_path: Path,
        audit: AuditSink | None = None,
        issuer: str = "zerotrust-lab",
        max_failures: int = 5,
        lockout_seconds: float = 900,
        valid_window: int = 1,
        clock: Callable[[], float] = time.time,
    ) -> TotpStore:
        """Open the store at ``path``, creating it (and ``key_path``) if missing.

        The database file is created with mode 0600 (its directory 0700 if that is new)
        before SQLite touches it; an existing file that group or others can read, or that
        another user owns, is refused. ``key_path`` is created with 32 random bytes and mode
        0600 if missing, except for a store that already holds data sealed under a key:
        then the key file must be the one the store was made with.
        """
        path = Path(path)
        key_path = Path(key_path)
        _check_settings(
            issuer=issuer,
            max_failures=max_failures,
            lockout_seconds=lockout_seconds,
            valid_window=valid_window,
        )
        _prepare_database_file(path)
        connection = _connect(path)
        try:
            _migrate(connection, path)
            key = _open_key(connection, path, key_path)
        except BaseException:
            connection.close()
            raise
        return cls(
            path=path,
            connection=connection,
            key=key,
            audit=audit,
            issuer=issuer,
            max_failures=max_failures,
            lockout_seconds=lockout_seconds,
            valid_window=valid_window,
            clock=clock,
        )

    # -- queries ----------------------------------------------------------------------

    def is_enrolled(self, user: str) -> bool:
        """Whether ``user`` has a confirmed (active) enrollment."""
        _check_name(user, "user")
        with self._lock:
            row = _select_user(self._connection(), user)
        return row is not None and row.secret is not None

    def failures(self, user: str) -> int:
        """Consecutive failures counted toward the lockout (0 once a lockout has expired)."""
        _check_name(user, "user")
        with self._lock:
            row = _select_user(self._connection(), user)
            now = self._clock()
        if row is None or _lock_expired(row, now):
            return 0
        return row.failures

    # -- enrollment -------------------------------------------------------------------

    def begin_enrollment(self, user: str) -> Enrollment:
        """Start an enrollment: a fresh secret and recovery codes, pending until confirmed.

        Replaces an enrollment still pending; refuses (``already-enrolled``) if ``user``
        has an active one. The returned :class:`Enrollment` is the only time the secret and
        the recovery codes exist in clear.
        """
        _check_name(user, "user")
        secret = pyotp.random_base32()
        codes = tuple(_new_recovery_code() for _ in range(RECOVERY_CODE_COUNT))
        with self._lock:
            now = self._clock()
            with self._transaction() as db:
                row = _select_user(db, user)
                if row is not None and row.secret is not None:
                    raise TotpError.for_reason("already-enrolled")
                sealed = self._key.seal(secret.encode("ascii"), context=_secret_context(user))
                if row is None:
                    db.execute(
                        "INSERT INTO totp_users (username, pending_secret, updated_at) "
                        "VALUES (?, ?, ?)",
                        (user, sealed, now),
                    )
                else:
                    db.execute(
                        "UPDATE totp_users SET pending_secret = ?, updated_at = ? "
                        "WHERE username = ?",
                        (sealed, now, user),
                    )
                db.execute("DELETE FROM recovery_codes WHERE username = ? AND pending = 1", (user,))
                db.executemany(
                    "INSERT INTO recovery_codes (username, digest, pending) VALUES (?, ?, 1)",
                    [(user, self._recovery_digest(user, _normalize_recovery(c))) for c in codes],
                )
                self._emit(
                    user,
                    "mfa.totp.enrollment_started",
                    {"replaced_pending": row is not None and row.pending_secret is not None},
                )
        totp = pyotp.TOTP(secret, digits=DIGITS, interval=PERIOD)
        uri = totp.provisioning_uri(name=user, issuer_name=self._issuer)
        qr_svg = str(
            segno.make(uri, error="m").svg_inline(scale=4, title="Authenticator enrollment code")
        )
        return Enrollment(secret=secret, provisioning_uri=uri, qr_svg=qr_svg, recovery_codes=codes)

    def confirm_enrollment(self, user: str, code: str) -> None:
        """Activate the pending enrollment of ``user`` if ``code`` is its current TOTP code.

        The code's time step counts as used: it cannot be replayed to :meth:`verify`. A
        wrong code leaves the enrollment pending and counts toward the lockout.
        """
        _check_name(user, "user")
        with self._lock:
            now = self._clock()
            with self._transaction() as db:
                row = self._load(db, user, now)
                outcome = self._confirm(db, row, user, code, now)
                error = self._settle(db, row, user, outcome, now, stage="enrollment")
        if error is not None:
            raise error

    # -- verification -----------------------------------------------------------------

    def verify(self, user: str, code: str) -> VerifyMethod:
        """Check a TOTP code or a recovery code; return ``"totp"`` or ``"recovery"``.

        Raises :class:`TotpError` when refused (see the module docstring for the steps).
        """
        _check_name(user, "user")
        with self._lock:
            now = self._clock()
            with self._transaction() as db:
                row = self._load(db, user, now)
                outcome = self._verify(db, row, user, code, now)
                error = self._settle(db, row, user, outcome, now, stage="verify")
        if error is not None:
            raise error
        assert outcome.method is not None
        return outcome.method

    # -- administration ---------------------------------------------------------------

    def unlock(self, user: str, *, actor: str) -> None:
        """Admin: end a lockout of ``user`` and reset the failure count."""
        _check_name(user, "user")
        _check_name(actor, "actor")
        with self._lock:
            now = self._clock()
            with self._transaction() as db:
                row = _select_user(db, user)
                was_locked = row is not None and _locked(row, now)
                if row is not None:
                    db.execute(
                        "UPDATE totp_users SET failures = 0, locked_until = NULL, updated_at = ? "
                        "WHERE username = ?",
                        (now, user),
                    )
                self._emit(
                    actor,
                    "mfa.totp.unlocked",
                    {
                        "user": user,
                        "was_locked": was_locked,
                        "failures": 0 if row is None else row.failures,
                    },
                )

    def reset(self, user: str, *, actor: str) -> None:
        """Admin: forget everything about ``user`` (enrollment, recovery codes, lockout)."""
        _check_name(user, "user")
        _check_name(actor, "actor")
        with self._lock, self._transaction() as db:
            row = _select_user(db, user)
            db.execute("DELETE FROM recovery_codes WHERE username = ?", (user,))
            db.execute("DELETE FROM totp_users WHERE username = ?", (user,))
            self._emit(
                actor,
                "mfa.totp.reset",
                {"user": user, "was_enrolled": row is not None and row.secret is not None},
            )

    def close(self) -> None:
        """Close the database; later calls raise :class:`TotpStoreError`. Idempotent."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> TotpStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise TotpStoreError(f"{self.path}: the TOTP store is closed")
        return self._db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise TotpStoreError(f"{self.path}: cannot write the TOTP store: {exc}") from exc
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        try:
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise TotpStoreError(f"{self.path}: cannot commit to the TOTP store: {exc}") from exc

    def _emit(self, actor: str, action: str, detail: Mapping[str, Any]) -> None:
        if self._audit is not None:
            self._audit.record(actor=actor, action=action, detail=detail)

    def _load(self, db: sqlite3.Connection, user: str, now: float) -> _UserRow | None:
        """The user's row; an expired lockout is cleared (and the failure count with it)."""
        row = _select_user(db, user)
        if row is not None and _lock_expired(row, now):
            db.execute(
                "UPDATE totp_users SET failures = 0, locked_until = NULL WHERE username = ?",
                (user,),
            )
            row = _UserRow(row.username, row.secret, row.pending_secret, row.last_step, 0, None)
        return row

    def _confirm(
        self, db: sqlite3.Connection, row: _UserRow | None, user: str, code: str, now: float
    ) -> _Outcome:
        if row is not None and row.secret is not None:
            return _Outcome(refusal=_Refusal("already-enrolled", counts=False))
        if row is None or row.pending_secret is None:
            return _Outcome(refusal=_Refusal("no-pending-enrollment", counts=False))
        if row.locked_until is not None:
            return _Outcome(refusal=_LOCKED)
        kind, value = _classify(code)
        if kind != "totp":
            return _Outcome(refusal=_MALFORMED)
        secret = self._unseal(row, row.pending_secret, user)
        step = self._matching_step(secret, value, now)
        if step is None:
            return _Outcome(refusal=_WRONG)
        if row.last_step is not None and step <= row.last_step:
            return _Outcome(refusal=_REPLAYED)
        db.execute(
            "UPDATE totp_users SET secret = pending_secret, pending_secret = NULL, "
            "last_step = ?, enrolled_at = ?, updated_at = ? WHERE username = ?",
            (step, now, now, user),
        )
        db.execute("DELETE FROM recovery_codes WHERE username = ? AND pending = 0", (user,))
        db.execute("UPDATE recovery_codes SET pending = 0 WHERE username = ?", (user,))
        self._emit(user, "mfa.totp.enrolled", {"recovery_codes": RECOVERY_CODE_COUNT})
        return _Outcome(method="totp")

    def _verify(
        self, db: sqlite3.Connection, row: _UserRow | None, user: str, code: str, now: float
    ) -> _Outcome:
        # (0) an active enrollment
        if row is None or row.secret is None:
            return _Outcome(refusal=_Refusal("not-enrolled", counts=False))
        # (1) no lockout
        if row.locked_until is not None:
            return _Outcome(refusal=_LOCKED)
        # (2) well-formed input
        kind, value = _classify(code)
        if kind == "malformed":
            return _Outcome(refusal=_MALFORMED)
        # (3) a TOTP code for a step after the last accepted one
        if kind == "totp":
            secret = self._unseal(row, row.secret, user)
            step = self._matching_step(secret, value, now)
            if step is None:
                return _Outcome(refusal=_WRONG)
            if row.last_step is not None and step <= row.last_step:
                return _Outcome(refusal=_REPLAYED)
            db.execute(
                "UPDATE totp_users SET last_step = ?, updated_at = ? WHERE username = ?",
                (step, now, user),
            )
            return _Outcome(method="totp")
        # (4) an unused recovery code
        digest = self._recovery_digest(user, value)
        found: tuple[bytes, float | None] | None = None
        for stored, used_at in db.execute(
            "SELECT digest, used_at FROM recovery_codes WHERE username = ? AND pending = 0",
            (user,),
        ).fetchall():
            if hmac.compare_digest(stored, digest):
                found = (stored, used_at)
        if found is None:
            return _Outcome(refusal=_WRONG)
        if found[1] is not None:
            return _Outcome(refusal=_REPLAYED)
        db.execute(
            "UPDATE recovery_codes SET used_at = ? WHERE username = ? AND digest = ?",
            (now, user, found[0]),
        )
        (left,) = db.execute(
            "SELECT count(*) FROM recovery_codes "
            "WHERE username = ? AND pending = 0 AND used_at IS NULL",
            (user,),
        ).fetchone()
        self._emit(user, "mfa.recovery_code.used", {"codes_left": int(left)})
        return _Outcome(method="recovery")

    def _settle(
        self,
        db: sqlite3.Connection,
        row: _UserRow | None,
        user: str,
        outcome: _Outcome,
        now: float,
        *,
        stage: str,
    ) -> TotpError | None:
        """(5) Count a failure or clear the count, and audit; the error to raise, if any."""
        refusal = outcome.refusal
        if refusal is None:
            if row is not None and row.failures:
                db.execute("UPDATE totp_users SET failures = 0 WHERE username = ?", (user,))
            self._emit(user, "mfa.totp.verified", {"method": outcome.method, "stage": stage})
            return None
        failures = 0 if row is None else row.failures
        if not refusal.counts or row is None:
            self._emit(
                user,
                "mfa.totp.failed",
                {"reason": refusal.reason, "failures": failures, "stage": stage},
            )
            retry_after = None
            if refusal.reason == "locked" and row is not None and row.locked_until is not None:
                retry_after = max(0.0, row.locked_until - now)
            return TotpError.for_reason(refusal.reason, retry_after=retry_after)
        failures += 1
        locked_until = now + self._lockout_seconds if failures >= self._max_failures else None
        db.execute(
            "UPDATE totp_users SET failures = ?, locked_until = ?, updated_at = ? "
            "WHERE username = ?",
            (failures, locked_until, now, user),
        )
        self._emit(
            user,
            "mfa.totp.failed",
            {"reason": refusal.reason, "failures": failures, "stage": stage},
        )
        if locked_until is None:
            return TotpError.for_reason(refusal.reason)
        self._emit(
            user,
            "mfa.totp.locked",
            {"failures": failures, "lockout_seconds": self._lockout_seconds},
        )
        # the attempt that reaches the limit is answered as a lockout
        return TotpError.for_reason("locked", retry_after=self._lockout_seconds)

    def _unseal(self, row: _UserRow, sealed: bytes, user: str) -> str:
        plaintext = self._key.unseal(sealed, context=_secret_context(user))
        if plaintext is None:
            self._emit(
                user,
                "mfa.totp.failed",
                {"reason": "undecryptable", "failures": row.failures},
            )
            raise TotpStoreError(
                f"{self.path}: the stored TOTP secret of user {user!r} does not decrypt: "
                "the row was altered or copied from another user, or the key file changed",
                hint="an administrator can reset this user's enrollment so that they re-enroll",
            )
        return plaintext.decode("ascii")

    def _matching_step(self, secret: str, code: str, now: float) -> int | None:
        """The latest time step within the window whose code is ``code`` (no early exit)."""
        totp = pyotp.TOTP(secret, digits=DIGITS, interval=PERIOD)
        current = int(now) // PERIOD
        matched: int | None = None
        for step in range(current - self._valid_window, current + self._valid_window + 1):
            if step < 0:
                continue
            if hmac.compare_digest(totp.generate_otp(step).encode(), code.encode()):
                matched = step
        return matched

    def _recovery_digest(self, user: str, normalized: str) -> bytes:
        return self._key.digest(
            b"recovery-code\x00" + user.encode("utf-8") + b"\x00" + normalized.encode("ascii")
        )


# -- helpers ----------------------------------------------------------------------------


def _check_settings(
    *, issuer: str, max_failures: int, lockout_seconds: float, valid_window: int
) -> None:
    if not issuer or ":" in issuer:
        raise UsageError(f"TOTP issuer {issuer!r}: expected a non-empty name without ':'")
    if max_failures < 1:
        raise UsageError(f"TOTP max_failures is {max_failures}: expected 1 or more")
    if lockout_seconds < 0:
        raise UsageError(f"TOTP lockout_seconds is {lockout_seconds}: expected 0 or more")
    if not 0 <= valid_window <= 10:
        raise UsageError(f"TOTP valid_window is {valid_window}: expected 0 to 10 steps")


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UsageError(f"TOTP store: expected a non-empty {what} name, got {name!r}")


def _secret_context(user: str) -> bytes:
    return b"totp-secret\x00" + user.encode("utf-8")


def _lock_expired(row: _UserRow, now: float) -> bool:
    return row.locked_until is not None and now >= row.locked_until


def _locked(row: _UserRow, now: float) -> bool:
    return row.locked_until is not None and now < row.locked_until


def _new_recovery_code() -> str:
    chars = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(2 * _RECOVERY_HALF))
    return f"{chars[:_RECOVERY_HALF]}-{chars[_RECOVERY_HALF:]}"


def _normalize_recovery(code: str) -> str:
    return code.replace("-", "").upper()


def _classify(code: str) -> tuple[Literal["totp", "recovery", "malformed"], str]:
    """Which kind of code the user typed, normalized: spaces dropped, upper case, no dash."""
    if not isinstance(code, str) or len(code) > _MAX_INPUT:
        return "malformed", ""
    compact = "".join(code.split())
    if len(compact) == DIGITS and compact.isascii() and compact.isdigit():
        return "totp", compact
    recovery = _normalize_recovery(compact)
    if len(recovery) == 2 * _RECOVERY_HALF and all(c in _RECOVERY_ALPHABET for c in recovery):
        return "recovery", recovery
    return "malformed", ""


def _select_user(db: sqlite3.Connection, user: str) -> _UserRow | None:
    found = db.execute(
        "SELECT username, secret, pending_secret, last_step, failures, locked_until "
        "FROM totp_users WHERE username = ?",
        (user,),
    ).fetchone()
    return None if found is None else _UserRow(*found)


def _prepare_database_file(path: Path) -> None:
    """Create the file 0600 (directory 0700) before SQLite opens it, or check the one there."""
    try:
        info = path.stat()
    except FileNotFoundError:
        try:
            write_private_file(path, b"")
        except FileExistsError:
            info = path.stat()  # created meanwhile by another process: check it as any other
        except OSError as exc:
            raise TotpStoreError(f"{path}: cannot create the TOTP store: {exc.strerror}") from exc
        else:
            return
    except OSError as exc:
        raise TotpStoreError(f"{path}: cannot read the TOTP store: {exc.strerror}") from exc
    check_private_file(path, info, what="TOTP store", error=TotpStoreError)


def _connect(path: Path) -> sqlite3.Connection:
    try:
        connection = sqlite3.connect(
            path, timeout=10.0, isolation_level=None, check_same_thread=False
        )
        connection.execute("PRAGMA synchronous = FULL")
        connection.execute("PRAGMA secure_delete = ON")
    except sqlite3.Error as exc:
        raise TotpStoreError(f"{path}: cannot open the TOTP store: {exc}") from exc
    return connection


def _migrate(connection: sqlite3.Connection, path: Path) -> None:
    try:
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        if version == 0:
            connection.executescript(_SCHEMA)
            (version,) = connection.execute("PRAGMA user_version").fetchone()
    except sqlite3.Error as exc:
        raise TotpStoreError(f"{path}: not a usable TOTP store: {exc}") from exc
    if version != _SCHEMA_VERSION:
        raise TotpStoreError(
            f"{path}: TOTP store schema version {version}; this version of ztlab reads "
            f"version {_SCHEMA_VERSION}"
        )


def _open_key(connection: sqlite3.Connection, path: Path, key_path: Path) -> SealingKey:
    """The store's key; the key file must match the fingerprint the store recorded."""
    found = _fingerprint(connection, path)
    if found is None:
        key = SealingKey(load_or_create_key_file(key_path))
        try:
            # INSERT OR IGNORE: a process that raced us may have recorded its key first
            connection.execute(
                "INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)",
                (_FINGERPRINT, key.fingerprint),
            )
        except sqlite3.Error as exc:
            raise TotpStoreError(f"{path}: cannot write the TOTP store: {exc}") from exc
        found = _fingerprint(connection, path)
        assert found is not None
    else:
        if not key_path.exists():
            raise KeyFileError(
                f"{key_path}: no such TOTP store key, but {path} holds secrets sealed under a "
                "key; refusing to create a new one",
                hint="restore the key file from backup, or move the store aside so that "
                "every user enrolls again",
            )
        key = SealingKey(load_key_file(key_path))
    if not hmac.compare_digest(found, key.fingerprint):
        raise KeyFileError(
            f"{key_path}: this is not the key the TOTP store {path} was created with",
            hint="restore the right key file, or move the store aside so that every user "
            "enrolls again",
        )
    return key


def _fingerprint(connection: sqlite3.Connection, path: Path) -> bytes | None:
    try:
        found = connection.execute(
            "SELECT value FROM meta WHERE name = ?", (_FINGERPRINT,)
        ).fetchone()
    except sqlite3.Error as exc:
        raise TotpStoreError(f"{path}: cannot read the TOTP store: {exc}") from exc
    return None if found is None else bytes(found[0])
