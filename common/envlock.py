"""The environment lock (``ztlab-env-lock/1``): what a built kernel environment holds.

An environment is a folder built by the control plane (a venv whose ``site-packages``
chains to its layers, see :mod:`ztlab.hub.environments.build`). Its lock records:

- ``files``: the manifest root (:mod:`ztlab.common.manifest`, BLAKE3) of every regular file
  in the folder, with the count and total size; symbolic links (``bin/python`` and the
  like) are listed under ``links`` with their targets;
- ``layers``: each site directory the environment reads packages from besides its own (the
  kernel runtime, a given interpreter's packages), with its manifest root. Compiled
  bytecode (``*.pyc``) in a layer is not covered: the interpreters that share a layer write
  it;
- ``distributions``: every installed distribution the environment sees, name -> version;
- ``runtime``: a digest of the kernel runtime's installed distributions (their ``RECORD``
  files), so that a hub whose runtime was upgraded knows its ``base`` is out of date;
- ``digest``: SHA-256 of the canonical JSON of all the above. The digest is what lineage
  and provenance record for a kernel, a pool worker or a scheduled run.

The lock itself lies in the folder as ``ztlab-environment.json`` (outside its own
manifest) and, authoritative, in the control plane's state.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from ztlab.common.errors import UsageError

FORMAT: Final = "ztlab-env-lock/1"
#: the lock's file name inside an environment's folder
LOCK_NAME: Final = "ztlab-environment.json"


class LockError(UsageError):
    """A lock file that is not a valid ``ztlab-env-lock/1`` document."""


@dataclass(frozen=True, slots=True)
class TreeSummary:
    """A manifest's root digest and what it covers."""

    root: str
    count: int
    size: int
    #: the directory it describes (layers) or ``""`` (the environment's own folder)
    path: str = ""


@dataclass(frozen=True, slots=True)
class EnvironmentLock:
    """One build of one environment."""

    name: str
    build: str
    python: str
    requirements: str
    files: TreeSummary
    links: dict[str, str] = field(default_factory=dict)
    layers: tuple[TreeSummary, ...] = ()
    distributions: dict[str, str] = field(default_factory=dict)
    runtime: str = ""
    format: str = FORMAT

    def canonical(self) -> bytes:
        """The canonical JSON the digest is computed over."""
        body = asdict(self)
        body["layers"] = [asdict(layer) for layer in self.layers]
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        """``sha256:HEX`` of :meth:`canonical`."""
        return "sha256:" + hashlib.sha256(self.canonical()).hexdigest()

    def to_json(self) -> str:
        """The lock with its digest, as written to disk."""
        body = json.loads(self.canonical())
        body["digest"] = self.digest
        return json.dumps(body, indent=1, sort_keys=True) + "\n"


def parse_lock(text: str, *, source: str = "lock") -> EnvironmentLock:
    """Parse and check a lock; :class:`LockError` names ``source`` and what is wrong."""
    try:
        body: dict[str, Any] = json.loads(text)
    except ValueError as exc:
        raise LockError(f"{source}: not JSON ({exc})") from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise LockError(f"{source}: not a {FORMAT} document (format: {body.get('format')!r})")
    try:
        lock = EnvironmentLock(
            name=body["name"],
            build=body["build"],
            python=body["python"],
            requirements=body["requirements"],
            files=TreeSummary(**body["files"]),
            links=dict(body.get("links", {})),
            layers=tuple(TreeSummary(**layer) for layer in body.get("layers", [])),
            distributions=dict(body.get("distributions", {})),
            runtime=str(body.get("runtime", "")),
        )
    except (KeyError, TypeError) as exc:
        raise LockError(f"{source}: missing or malformed key {exc}") from exc
    stated = body.get("digest")
    if stated != lock.digest:
        raise LockError(
            f"{source}: its digest {stated!r} is not the digest of its contents ({lock.digest})",
            hint="the lock was changed after it was written",
        )
    return lock
