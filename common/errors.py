"""One error family for zerotrust-lab.

Every error the project raises on purpose derives from :class:`ZtlabError`. Each carries
a ``message`` for the person at the keyboard (what went wrong, where, what was expected)
and optional ``details`` for logs. Library code raises; only :mod:`ztlab.cli` turns an
error into an exit status.
"""

from __future__ import annotations


class ZtlabError(Exception):
    """Base class of every error raised on purpose by zerotrust-lab.

    ``message`` is safe to show a user: it never contains a secret. ``hint`` says what to
    do about it, when there is something to do.
    """

    #: exit status the CLI uses for this kind of error
    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def diagnostics(self) -> str:
        """The user-facing text: the message, then the hint on its own line."""
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class UsageError(ZtlabError):
    """Bad input from the caller: a malformed argument, an unreadable file."""

    exit_code = 2


class ConfigError(UsageError):
    """The configuration file is missing, unreadable or invalid."""


class PolicyError(UsageError):
    """A policy file or schema is invalid, or a request does not fit the schema."""


class SecretError(ConfigError):
    """A secret reference cannot be resolved (missing variable, unreadable file)."""


class KeyFileError(UsageError):
    """A key file is missing, malformed or has unsafe permissions."""


class AuditError(ZtlabError):
    """The audit log cannot be opened or written."""


class AuditLockedError(AuditError):
    """Another writer holds the audit log."""


class VerificationError(ZtlabError):
    """Something did not verify: a signature, a digest, a Merkle root.

    Verifiers return ``None`` on success and raise this on failure.
    """
