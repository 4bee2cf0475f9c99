"""Checking a dataset directory against a manifest.

:func:`verify` walks the directory exactly as fingerprinting does (never following a link
out of the root), hashes every regular file with the manifest's algorithm and returns a
:class:`VerifyResult`. A mismatch is an answer, not an error: only bad input (an unreadable
or malformed manifest, a root that is not a directory) raises :class:`ManifestError`.

The steps:

1. Walk the root; a link, device, FIFO, socket or undecodable name becomes a refusal.
2. Hash every regular file found (a file that cannot be read becomes a refusal).
3. Compare with the manifest: a listed path that was hashed with another size or digest is
   *modified*; a listed path that is neither hashed nor refused is *missing*; a hashed path
   that is not listed is *extra*.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from ztlab.common.manifest.fingerprint import (
    LARGE_FILE,
    FileRef,
    ProgressCallback,
    Refusal,
    hash_files,
    scan,
)
from ztlab.common.manifest.format import Entry, Manifest, ManifestError


@dataclass(frozen=True)
class Modified:
    """A file whose content differs from the manifest."""

    path: str
    expected_size: int
    actual_size: int
    expected_digest: str
    actual_digest: str


@dataclass(frozen=True)
class Unsafe:
    """A path that was not hashed (a link, a device, an unreadable file), and why.

    ``expected`` is the manifest's entry when the path is listed there.
    """

    path: str
    reason: str
    expected: Entry | None = None


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of :func:`verify`; ``ok`` when the directory matches the manifest."""

    algorithm: str
    root: str
    checked: int
    modified: list[Modified] = field(default_factory=list)
    missing: list[Entry] = field(default_factory=list)
    extra: list[Entry] = field(default_factory=list)
    unsafe: list[Unsafe] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every listed file is present and unchanged, and nothing else is there."""
        return not (self.modified or self.missing or self.extra or self.unsafe)

    @property
    def problems(self) -> int:
        """How many paths differ."""
        return len(self.modified) + len(self.missing) + len(self.extra) + len(self.unsafe)


def verify(
    root: Path,
    manifest: Manifest,
    *,
    allow_symlinks: bool = False,
    exclude: Collection[str] = (),
    workers: int | None = None,
    large_file_threshold: int = LARGE_FILE,
    progress: ProgressCallback | None = None,
) -> VerifyResult:
    """Compare the regular files under ``root`` with ``manifest`` (see the module docstring).

    ``exclude`` lists paths to skip (the manifest file itself, when it lies in ``root``).
    """
    expected = manifest.by_path()
    # (1) walk
    found = scan(root, allow_symlinks=allow_symlinks, exclude=exclude)
    unsafe = {r.path: r.reason for r in found.refusals}

    # (2) hash
    def unreadable(ref: FileRef, error: ManifestError) -> None:
        unsafe[ref.path] = error.message

    actual = hash_files(
        found.files,
        found.root,
        manifest.algorithm,
        workers=workers,
        large_file_threshold=large_file_threshold,
        progress=progress,
        on_error=unreadable,
    )
    # (3) compare
    modified = [
        Modified(path, entry.size, actual[path][0], entry.digest, actual[path][1])
        for path, entry in expected.items()
        if path in actual and actual[path] != (entry.size, entry.digest)
    ]
    missing = [
        entry for path, entry in expected.items() if path not in actual and path not in unsafe
    ]
    extra = [
        Entry(path, size, digest)
        for path, (size, digest) in sorted(actual.items())
        if path not in expected
    ]
    refused = [Unsafe(path, reason, expected.get(path)) for path, reason in sorted(unsafe.items())]
    return VerifyResult(
        algorithm=manifest.algorithm,
        root=manifest.root,
        checked=len(actual),
        modified=modified,
        missing=missing,
        extra=extra,
        unsafe=refused,
    )


__all__ = ["Modified", "Refusal", "Unsafe", "VerifyResult", "verify"]
