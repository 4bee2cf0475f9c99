"""Environment definitions and their builds, in ``<state_dir>/environments`` (0700).

``registry.sqlite`` holds each definition (its requirements, what it layers on, whether it
is retired) and each build (status, digest, who built it, the error of a failed one). Each
finished build keeps its lock and manifests beside it, in ``NAME/BUILD/``: the copy of the
lock inside the build's folder is for reading; this one is what verification trusts.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztlab.common.envlock import EnvironmentLock, parse_lock
from ztlab.common.errors import ZtlabError
from ztlab.common.manifest import Manifest, parse_manifest
from ztlab.hub.private import state_database, state_directory, state_file
from ztlab.hub.timestamps import utc_iso

_SCHEMA = """
CREATE TABLE IF NOT EXISTS environments (
  name TEXT PRIMARY KEY,
  requirements TEXT NOT NULL,
  layer_on TEXT,
  description TEXT NOT NULL DEFAULT '',
  defined_by TEXT NOT NULL,
  defined_at REAL NOT NULL,
  retired_by TEXT,
  retired_at REAL
);
CREATE TABLE IF NOT EXISTS builds (
  name TEXT NOT NULL,
  build INTEGER NOT NULL,
  path TEXT NOT NULL,
  status TEXT NOT NULL,
  digest TEXT,
  built_by TEXT NOT NULL,
  started_at REAL NOT NULL,
  finished_at REAL,
  error TEXT,
  PRIMARY KEY (name, build)
);
"""


class EnvironmentNotFound(ZtlabError):
    """No environment (or build) by that name."""

    status = 404


@dataclass(frozen=True, slots=True)
class Definition:
    """An environment as an admin defined it."""

    name: str
    requirements: str
    layer_on: str | None
    description: str
    defined_by: str
    defined_at: float
    retired_by: str | None
    retired_at: float | None

    @property
    def retired(self) -> bool:
        """Retired: no new server gets it; running kernels keep it."""
        return self.retired_at is not None


@dataclass(frozen=True, slots=True)
class BuildRow:
    """One build of an environment."""

    name: str
    build: int
    path: str
    status: str
    digest: str | None
    built_by: str
    started_at: float
    finished_at: float | None
    error: str | None

    def as_json(self) -> dict[str, Any]:
        """The build as the API returns it."""
        return {
            "name": self.name,
            "build": self.build,
            "path": self.path,
            "status": self.status,
            "digest": self.digest,
            "built_by": self.built_by,
            "started_at": utc_iso(self.started_at),
            "finished_at": utc_iso(self.finished_at) if self.finished_at else None,
            "error": self.error,
        }


class EnvironmentRegistry:
    """The store of definitions, builds and locks (thread-safe)."""

    def __init__(self, folder: Path) -> None:
        self.folder = state_directory(folder)
        self._db = state_database(folder / "registry.sqlite", _SCHEMA)
        self._lock = threading.Lock()

    def define(
        self, name: str, requirements: str, *, layer_on: str | None, description: str, by: str
    ) -> Definition:
        """Add or replace a definition (a retired one comes back)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO environments "
                "(name, requirements, layer_on, description, defined_by, defined_at) "
                "VALUES (?,?,?,?,?,?)",
                (name, requirements, layer_on, description, by, time.time()),
            )
        return self.definition(name)

    def definition(self, name: str) -> Definition:
        """One definition, or :class:`EnvironmentNotFound`."""
        with self._lock:
            row = self._db.execute("SELECT * FROM environments WHERE name=?", (name,)).fetchone()
        if row is None:
            raise EnvironmentNotFound(
                f"there is no environment {name!r}", hint="`ztlab env list` shows them"
            )
        return Definition(*row)

    def definitions(self) -> list[Definition]:
        """Every definition, by name."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM environments ORDER BY name").fetchall()
        return [Definition(*row) for row in rows]

    def retire(self, name: str, *, by: str) -> Definition:
        """Mark a definition retired."""
        self.definition(name)
        with self._lock:
            self._db.execute(
                "UPDATE environments SET retired_by=?, retired_at=? WHERE name=?",
                (by, time.time(), name),
            )
        return self.definition(name)

    def start_build(self, name: str, *, root: Path, by: str) -> BuildRow:
        """A new build number and its row (status ``building``)."""
        # folders another registry left (a state directory started afresh, a second hub on
        # the same root) are never reused nor overwritten
        taken = [int(p.name) for p in (root / name).glob("*") if p.name.isdigit()]
        with self._lock:
            (last,) = self._db.execute(
                "SELECT COALESCE(MAX(build), 0) FROM builds WHERE name=?", (name,)
            ).fetchone()
            build = max([int(last), *taken]) + 1
            path = root / name / str(build)
            self._db.execute(
                "INSERT INTO builds (name, build, path, status, built_by, started_at) "
                "VALUES (?,?,?,?,?,?)",
                (name, build, str(path), "building", by, time.time()),
            )
        return self.build(name, build)

    def finish_build(
        self,
        name: str,
        build: int,
        *,
        lock: EnvironmentLock | None = None,
        manifests: tuple[Manifest, ...] = (),
        error: str | None = None,
    ) -> BuildRow:
        """Record a build's end: ready with its lock and manifests, or failed."""
        if lock is not None:
            folder = state_directory(self.folder / name / str(build))
            state_file(folder / "lock.json", content=lock.to_json().encode())
            for index, manifest in enumerate(manifests):
                state_file(folder / f"manifest-{index}.json", content=manifest.to_json().encode())
        with self._lock:
            self._db.execute(
                "UPDATE builds SET status=?, digest=?, finished_at=?, error=? "
                "WHERE name=? AND build=?",
                (
                    "ready" if lock is not None else "failed",
                    lock.digest if lock is not None else None,
                    time.time(),
                    error,
                    name,
                    build,
                ),
            )
        return self.build(name, build)

    def build(self, name: str, build: int) -> BuildRow:
        """One build, or :class:`EnvironmentNotFound`."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM builds WHERE name=? AND build=?", (name, build)
            ).fetchone()
        if row is None:
            raise EnvironmentNotFound(f"environment {name!r} has no build {build}")
        return BuildRow(*row)

    def builds(self, name: str) -> list[BuildRow]:
        """Every build of ``name``, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM builds WHERE name=? ORDER BY build DESC", (name,)
            ).fetchall()
        return [BuildRow(*row) for row in rows]

    def current(self, name: str) -> BuildRow | None:
        """The newest ready build of ``name``."""
        return next((row for row in self.builds(name) if row.status == "ready"), None)

    def locked(self, row: BuildRow) -> tuple[EnvironmentLock, Manifest, tuple[Manifest, ...]]:
        """A ready build's lock and manifests, from the control plane's copy."""
        folder = self.folder / row.name / str(row.build)
        lock = parse_lock((folder / "lock.json").read_text(), source=str(folder / "lock.json"))
        manifests = [
            parse_manifest(path.read_text(), source=str(path))
            for path in sorted(folder.glob("manifest-*.json"), key=lambda p: int(p.stem[9:]))
        ]
        return lock, manifests[0], tuple(manifests[1:])

    def interrupted(self) -> list[BuildRow]:
        """Builds a stopped hub left ``building`` (marked failed by the service)."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM builds WHERE status='building'").fetchall()
        return [BuildRow(*row) for row in rows]

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
