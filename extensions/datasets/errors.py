"""Errors the kernel-side dataset readers raise."""

from __future__ import annotations

from ztlab.common.errors import UsageError, VerificationError, ZtlabError


class DatasetError(UsageError):
    """The dataset cannot be used as asked: unknown version, no registry, a bad file name."""


class RegistryUnavailable(ZtlabError):
    """The control plane's registry could not be reached or answered with an error."""


class DatasetIntegrityError(VerificationError):
    """Data does not match its signed manifest (or its manifest is not signed by a trusted key).

    ``dataset``, ``file``, ``expected`` and ``actual`` say what differs; the same facts are
    reported to the control plane's audit log.
    """

    def __init__(
        self,
        message: str,
        *,
        dataset: str,
        file: str | None = None,
        expected: str | None = None,
        actual: str | None = None,
        kind: str = "modified",
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.dataset = dataset
        self.file = file
        self.expected = expected
        self.actual = actual
        self.kind = kind
