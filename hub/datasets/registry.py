"""Registered dataset versions: fingerprinted and signed by the control plane, immutable.

Registering ``NAME@VERSION`` from a storage path goes through fixed steps:

(1) the policy decision ``register_dataset`` on ``dataset:NAME@VERSION`` (audited by the
    policy engine; a denial raises :class:`RegistryDenied` with the policy's reason);
(2) the path must resolve, links followed, to a directory inside one of the configured
    ``storage_roots`` (:class:`RegistryError` otherwise), and the version must be new
    (:class:`DatasetExists`);
(3) the control plane fingerprints the directory itself (the caller's claims about its
    content are never used; links, devices and the like are refused);
(4) the manifest is signed with the control plane's key into a DSSE envelope holding an
    in-toto statement (:mod:`ztlab.common.attest.dataset`);
(5) the version is inserted, durably, into the registry database; ``UPDATE`` and
    ``DELETE`` are refused by triggers, so versions are immutable in the database itself,
    and a concurrent registration of the same version loses on the primary key;
(6) ``dataset.register`` is recorded in the audit log.

Reading a version (:meth:`DatasetRegistry.get`) is the policy decision ``read_dataset``
(audited). Listing shows only the versions the caller may read. Problems a kernel reports
(:meth:`DatasetRegistry.report`) are recorded as ``dataset.verify.failed``; they are the
kernel's claims, recorded with the kernel's user as actor, and change nothing else.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ztlab.common.attest import Envelope, PrivateKey, key_id, parse_dataset_ref, sign_manifest
from ztlab.common.auditlog.sink import AuditSink
from ztlab.common.errors import UsageError, ZtlabError
from ztlab.common.manifest import ProgressCallback, fingerprint
from ztlab.hub.policy import PolicyEngine, Principal
from ztlab.hub.private import private_directory, private_file


class RegistryError(UsageError):
    """A registration or lookup that cannot be done as asked (bad path, bad name)."""

    status = 400


class RegistryDenied(ZtlabError):
    """The policy does not allow this user this dataset action."""

    status = 403


class DatasetNotFound(ZtlabError):
    """No such dataset version is registered (or the caller may not see it)."""

    status = 404


class DatasetExists(ZtlabError):
    """The dataset version is already registered; versions are immutable."""

    status = 409


@dataclass(frozen=True)
class RegisteredDataset:
    """One registered version and its signed manifest (the envelope's JSON text)."""

    name: str
    version: str
    source: str
    algorithm: str
    root: str
    files: int
    bytes: int
    registered_by: str
    registered_at: str
    keyid: str
    envelope: str

    @property
    def ref(self) -> str:
        """``NAME@VERSION``."""
        return f"{self.name}@{self.version}"

    def summary(self) -> dict[str, Any]:
        """Everything but the envelope, as JSON-able values."""
        return {
            "name": self.name,
            "version": self.version,
            "ref": self.ref,
            "source": self.source,
            "algorithm": self.algorithm,
            "root": self.root,
            "files": self.files,
            "bytes": self.bytes,
            "registered_by": self.registered_by,
            "registered_at": self.registered_at,
            "keyid": self.keyid,
        }


_DDL: Final = (
    """
    CREATE TABLE IF NOT EXISTS dataset_versions (
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        source TEXT NOT NULL,
        algorithm TEXT NOT NULL,
        root TEXT NOT NULL,
        files INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        registered_by TEXT NOT NULL,
        registered_at TEXT NOT NULL,
        keyid TEXT NOT NULL,
        envelope TEXT NOT NULL,
        PRIMARY KEY (name, version)
    )
    """,
    """
    CREATE TRIGGER IF NOT EXISTS dataset_versions_immutable
    BEFORE UPDATE ON dataset_versions
    BEGIN SELECT RAISE(ABORT, 'dataset versions are immutable'); END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS dataset_versions_kept
    BEFORE DELETE ON dataset_versions
    BEGIN SELECT RAISE(ABORT, 'dataset versions are immutable'); END
    """,
    # INSERT OR REPLACE deletes the old row without firing DELETE triggers (unless
    # recursive_triggers is on), so an insert of an existing version is refused too.
    """
    CREATE TRIGGER IF NOT EXISTS dataset_versions_not_replaced
    BEFORE INSERT ON dataset_versions
    WHEN EXISTS (
        SELECT 1 FROM dataset_versions WHERE name = NEW.name AND version = NEW.version
    )
    BEGIN SELECT RAISE(ABORT, 'dataset versions are immutable'); END
    """,
)

_COLUMNS: Final = (
    "name, version, source, algorithm, root, files, bytes, registered_by, registered_at, "
    "keyid, envelope"
)


class DatasetRegistry:
    """The registry database plus what registration needs: key, policy, audit, roots."""

    def __init__(
        self,
        *,
        path: Path,
        key: PrivateKey,
        policy: PolicyEngine,
        audit: AuditSink,
        storage_roots: Sequence[Path],
    ) -> None:
        """Open (creating if needed) the registry database at ``path``."""
        private_directory(path.parent, what="dataset registry's directory", error=RegistryError)
        private_file(path, what="dataset registry", error=RegistryError)
        self._path = path
        self._key = key
        self.keyid = key_id(key.public_key())
        self._policy = policy
        self._quiet_policy = policy.with_audit(None)
        self._audit = audit
        self._roots = [os.path.realpath(root) for root in storage_roots]
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        for statement in _DDL:
            self._conn.execute(statement)

    @property
    def public_key(self) -> Any:
        """The public half of the signing key."""
        return self._key.public_key()

    def close(self) -> None:
        """Close the database."""
        self._conn.close()

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            yield self._conn.cursor()

    # -- registration ------------------------------------------------------------------

    def source_path(self, source: str) -> Path:
        """``source`` resolved, if it is a directory inside a storage root."""
        if not Path(source).is_absolute():
            raise RegistryError(f"the dataset path {source!r} is not absolute")
        resolved = os.path.realpath(source)
        inside = [
            r for r in self._roots if resolved == r or resolved.startswith(r.rstrip("/") + "/")
        ]
        if not inside:
            raise RegistryError(
                f"{source} is outside the dataset storage roots",
                hint="datasets are registered from "
                + (", ".join(self._roots) or "nowhere (set datasets.storage_roots)"),
            )
        if not Path(resolved).is_dir():
            raise RegistryError(f"{source} is not a directory")
        return Path(resolved)

    def register(
        self,
        principal: Principal,
        ref: str,
        source: str,
        *,
        progress: ProgressCallback | None = None,
    ) -> RegisteredDataset:
        """Fingerprint ``source``, sign and store it as ``ref`` (see the module docstring)."""
        name, version = parse_dataset_ref(ref)
        decision = self._policy.authorize(principal, "register_dataset", f"dataset:{ref}")
        if not decision.allowed:
            raise RegistryDenied(f"{principal.name} may not register {ref}: {decision.reason}")
        directory = self.source_path(source)
        existing = self._find(name, version)
        if existing is not None:
            raise DatasetExists(
                f"{ref} is already registered (root {existing.root[:16]}..., by "
                f"{existing.registered_by} at {existing.registered_at})",
                hint="versions are immutable: register the changed data as a new version",
            )
        # no memory maps in the hub: a file truncated while mapped would SIGBUS the process
        manifest = fingerprint(directory, progress=progress, mmap=False)
        envelope = sign_manifest(
            manifest, ref, self._key, registered_by=principal.name, source=str(directory)
        )
        from ztlab.common.attest import verify_signed_manifest

        signed = verify_signed_manifest(envelope, {self.keyid: self._key.public_key()})
        row = RegisteredDataset(
            name=name,
            version=version,
            source=str(directory),
            algorithm=manifest.algorithm,
            root=manifest.root,
            files=len(manifest.entries),
            bytes=manifest.total_size,
            registered_by=principal.name,
            registered_at=signed.registered_at,
            keyid=self.keyid,
            envelope=envelope.to_json(),
        )
        try:
            with self._cursor() as cursor:
                cursor.execute(
                    f"INSERT INTO dataset_versions ({_COLUMNS}) VALUES "  # noqa: S608
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        row.name,
                        row.version,
                        row.source,
                        row.algorithm,
                        row.root,
                        row.files,
                        row.bytes,
                        row.registered_by,
                        row.registered_at,
                        row.keyid,
                        row.envelope,
                    ),
                )
        except sqlite3.IntegrityError as exc:
            raise DatasetExists(
                f"{ref} was registered by someone else meanwhile",
                hint="versions are immutable: register the changed data as a new version",
            ) from exc
        self._audit.record(
            actor=principal.name,
            action="dataset.register",
            detail={
                "dataset": ref,
                "root": row.root,
                "algorithm": row.algorithm,
                "files": row.files,
                "bytes": row.bytes,
                "source": row.source,
                "keyid": row.keyid,
            },
        )
        return row

    # -- reading -----------------------------------------------------------------------

    def _find(self, name: str, version: str) -> RegisteredDataset | None:
        with self._cursor() as cursor:
            found = cursor.execute(
                f"SELECT {_COLUMNS} FROM dataset_versions WHERE name = ? AND version = ?",  # noqa: S608
                (name, version),
            ).fetchone()
        return RegisteredDataset(*found) if found else None

    def get(self, principal: Principal, ref: str) -> RegisteredDataset:
        """The version ``ref``, if the policy lets ``principal`` read it (decision audited)."""
        name, version = parse_dataset_ref(ref)
        # the decision first, so that a caller who may not read cannot learn what exists
        decision = self._policy.authorize(principal, "read_dataset", f"dataset:{ref}")
        if not decision.allowed:
            raise RegistryDenied(f"{principal.name} may not read {ref}: {decision.reason}")
        found = self._find(name, version)
        if found is None:
            raise DatasetNotFound(f"no dataset version {ref} is registered")
        return found

    def all_versions(self) -> list[RegisteredDataset]:
        """Every registered version, by name and registration time (no policy applied)."""
        with self._cursor() as cursor:
            rows = cursor.execute(
                f"SELECT {_COLUMNS} FROM dataset_versions ORDER BY name, registered_at, version"  # noqa: S608
            ).fetchall()
        return [RegisteredDataset(*row) for row in rows]

    def readable(self, principal: Principal) -> list[RegisteredDataset]:
        """The versions ``principal`` may read (listing decisions are not audited)."""
        return [
            row
            for row in self.all_versions()
            if self._quiet_policy.authorize(principal, "read_dataset", f"dataset:{row.ref}").allowed
        ]

    def report(self, principal: Principal, ref: str, problem: Mapping[str, Any]) -> None:
        """Record a verification failure a kernel reports (after checking it may read it)."""
        found = self.get(principal, ref)
        allowed = {"kind", "file", "expected", "actual", "detail"}
        unknown = set(problem) - allowed
        if unknown:
            raise RegistryError(
                f"unknown keys in the report: {', '.join(sorted(unknown))}",
                hint=f"expected some of {', '.join(sorted(allowed))}",
            )
        detail: dict[str, Any] = {"dataset": found.ref, "root": found.root}
        for key in sorted(allowed & set(problem)):
            value = problem[key]
            if not isinstance(value, str) or len(value) > 1024:
                raise RegistryError(
                    f"report key {key!r} must be a string of at most 1024 characters"
                )
            detail[key] = value
        detail["reported_by"] = "kernel"
        unverified = problem.get("kind") == "unverified-open"
        action = "dataset.read.unverified" if unverified else "dataset.verify.failed"
        self._audit.record(actor=principal.name, action=action, detail=detail)

    def envelope(self, row: RegisteredDataset) -> Envelope:
        """The stored envelope, parsed."""
        return Envelope.from_json(row.envelope, source=f"the stored envelope of {row.ref}")
