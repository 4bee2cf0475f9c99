"""Where the files that make up one audit log live, given the records file's path."""

from __future__ import annotations

from pathlib import Path


def checkpoints_path(log: Path) -> Path:
    """Signed checkpoints, kept apart from the records: ``<log>.checkpoints``."""
    return log.with_name(log.name + ".checkpoints")


def public_key_path(log: Path) -> Path:
    """The exported public key (PEM): ``<log>.pub``."""
    return log.with_name(log.name + ".pub")


def lock_path(log: Path) -> Path:
    """The writer's lock file, holding its pid: ``<log>.lock``."""
    return log.with_name(log.name + ".lock")


def quarantine_path(log: Path, offset: int, stamp: str) -> Path:
    """Where a torn tail found at ``offset`` is moved before the log is extended."""
    return log.with_name(f"{log.name}.torn-{offset}-{stamp}")
