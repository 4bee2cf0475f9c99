"""The dataset manifest, format ``ztlab-manifest/1``.

A manifest is one UTF-8 JSON object::

    {
      "format": "ztlab-manifest/1",
      "algorithm": "blake3",            # or "sha256"
      "root": "<64 lowercase hex>",
      "entries": [
        {"path": "images/cat.png", "size": 1234, "digest": "<64 lowercase hex>"},
        ...
      ]
    }

No other keys are allowed, at the top level or in an entry.

``path``
    The file's path relative to the dataset directory, ``/``-separated, in Unicode (the
    file name's UTF-8 bytes; names that are not valid UTF-8 are refused). It is never
    absolute, never empty, has no empty, ``.`` or ``..`` component and no NUL. Only regular
    files are listed; directories are implied and empty directories are not recorded.
``size``
    The file's length in bytes.
``digest``
    The hex digest of the file's bytes: BLAKE3 (32-byte output) or SHA-256.
``entries``
    Sorted by ``path`` in code-point order (the same as the byte order of the UTF-8 encoding);
    paths are unique.
``root``
    The digest, with the manifest's ``algorithm``, of these bytes::

        b"ztlab-manifest/1\\n" + algorithm.encode("ascii") + b"\\n"
        + for each entry, in order:
            json.dumps([path, size, digest], ensure_ascii=True, separators=(",", ":"))
                .encode("ascii") + b"\\n"

    i.e. a header line naming the format, a line naming the algorithm, then one canonical
    JSON array ``["path",size,"digest"]`` per line. The JSON escaping makes a path holding a
    newline or quote unambiguous, so the root commits to the full, ordered entry list: sign
    or publish the root and the manifest is pinned.

Reading a manifest (:func:`parse_manifest`) checks all of the above and that ``root`` matches
the entries; any violation raises :class:`ManifestError` (bad input, exit status 2).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import blake3

from ztlab.common.errors import UsageError

FORMAT = "ztlab-manifest/1"
Algorithm = Literal["blake3", "sha256"]
ALGORITHMS: tuple[Algorithm, ...] = ("blake3", "sha256")
DEFAULT_ALGORITHM: Algorithm = "blake3"

_HEX64 = re.compile(r"[0-9a-f]{64}")


class ManifestError(UsageError):
    """A manifest is malformed, or a path or dataset cannot be described safely."""


@dataclass(frozen=True, order=True)
class Entry:
    """One regular file of the dataset: relative path, size in bytes, hex digest."""

    path: str
    size: int
    digest: str


@dataclass(frozen=True)
class Manifest:
    """A parsed or freshly computed manifest; ``entries`` are sorted and unique by path."""

    algorithm: Algorithm
    entries: tuple[Entry, ...]
    root: str

    @classmethod
    def build(cls, algorithm: Algorithm, entries: Iterable[Entry]) -> Manifest:
        """Sort ``entries``, check them and compute the root digest."""
        algorithm = check_algorithm(algorithm)
        ordered = tuple(sorted(entries, key=lambda entry: entry.path))
        for entry in ordered:
            _check_entry(entry)
        _check_unique(ordered)
        return cls(algorithm=algorithm, entries=ordered, root=root_digest(algorithm, ordered))

    @property
    def total_size(self) -> int:
        """The sum of the entries' sizes, in bytes."""
        return sum(entry.size for entry in self.entries)

    def by_path(self) -> dict[str, Entry]:
        """The entries keyed by path."""
        return {entry.path: entry for entry in self.entries}

    def to_json(self) -> str:
        """The manifest as JSON text: deterministic, one entry per line, ending in a newline."""
        lines = [
            "{",
            f'  "format": {json.dumps(FORMAT)},',
            f'  "algorithm": {json.dumps(self.algorithm)},',
            f'  "root": {json.dumps(self.root)},',
            '  "entries": [',
        ]
        for index, entry in enumerate(self.entries):
            item = json.dumps(
                {"path": entry.path, "size": entry.size, "digest": entry.digest},
                ensure_ascii=False,
            )
            lines.append(f"    {item}" + ("," if index < len(self.entries) - 1 else ""))
        lines += ["  ]", "}"]
        return "\n".join(lines) + "\n"

    def write(self, path: Path) -> None:
        """Write the manifest to ``path`` atomically (a temporary file, then a rename)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(self.to_json(), encoding="utf-8")
            tmp.replace(path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ManifestError(f"cannot write the manifest {path}: {exc.strerror}") from exc


def check_algorithm(name: str) -> Algorithm:
    """``name`` as an :data:`Algorithm`, or :class:`ManifestError`."""
    if name not in ALGORITHMS:
        raise ManifestError(
            f"unknown digest algorithm {name!r}", hint=f"use one of {', '.join(ALGORITHMS)}"
        )
    return name


def new_hasher(algorithm: Algorithm, *, threads: int = 1) -> Any:
    """A fresh hash object (``update``/``hexdigest``) for ``algorithm``."""
    if algorithm == "blake3":
        return blake3.blake3(max_threads=threads)
    import hashlib  # here: OpenSSL costs a few ms to load, and BLAKE3 is the default

    return hashlib.sha256()


def root_digest(algorithm: Algorithm, entries: Sequence[Entry]) -> str:
    """The root digest over the sorted ``entries`` (see the module docstring)."""
    hasher = new_hasher(algorithm)
    hasher.update(FORMAT.encode("ascii") + b"\n" + algorithm.encode("ascii") + b"\n")
    for entry in entries:
        line = json.dumps([entry.path, entry.size, entry.digest], separators=(",", ":"))
        hasher.update(line.encode("ascii") + b"\n")
    return cast(str, hasher.hexdigest())


def check_relative_path(path: str) -> str:
    """``path`` if it is a normalised relative manifest path, else :class:`ManifestError`."""
    problem = _path_problem(path)
    if problem:
        raise ManifestError(f"unsafe path {path!r} in the manifest: {problem}")
    return path


def _path_problem(path: str) -> str | None:
    if not path:
        return "empty path"
    if "\x00" in path:
        return "contains NUL"
    if path.startswith("/"):
        return "absolute path"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8"
    for part in path.split("/"):
        if part in (".", ".."):
            return f"contains a {part!r} component"
        if not part:
            return "contains an empty component"
    return None


def _check_entry(entry: Entry) -> None:
    check_relative_path(entry.path)
    if isinstance(entry.size, bool) or not isinstance(entry.size, int) or entry.size < 0:
        raise ManifestError(f"bad size {entry.size!r} for {entry.path!r} in the manifest")
    if not isinstance(entry.digest, str) or not _HEX64.fullmatch(entry.digest):
        raise ManifestError(
            f"bad digest {entry.digest!r} for {entry.path!r} in the manifest",
            hint="expected 64 lowercase hex digits",
        )


def _check_unique(entries: Sequence[Entry]) -> None:
    for before, after in itertools.pairwise(entries):
        if before.path == after.path:
            raise ManifestError(f"path {before.path!r} is listed twice in the manifest")


def parse_manifest(text: str, *, source: str = "manifest") -> Manifest:
    """Parse and check manifest JSON text; :class:`ManifestError` on any problem."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{source} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{source} is not a JSON object")
    expected = {"format", "algorithm", "root", "entries"}
    if set(data) != expected:
        raise ManifestError(
            f"{source} has keys {sorted(data)}; expected exactly {sorted(expected)}"
        )
    if data["format"] != FORMAT:
        raise ManifestError(
            f"{source} has format {data['format']!r}; this version reads {FORMAT!r}"
        )
    if not isinstance(data["algorithm"], str):
        raise ManifestError(f"{source}: algorithm must be a string")
    algorithm = check_algorithm(data["algorithm"])
    raw_entries = data["entries"]
    if not isinstance(raw_entries, list):
        raise ManifestError(f"{source}: entries must be a list")
    entries: list[Entry] = []
    for index, raw in enumerate(raw_entries):
        if not isinstance(raw, dict) or set(raw) != {"path", "size", "digest"}:
            raise ManifestError(
                f"{source}: entry {index} must be an object with exactly path, size, digest"
            )
        if not isinstance(raw["path"], str):
            raise ManifestError(f"{source}: entry {index} has a non-string path")
        entry = Entry(path=raw["path"], size=raw["size"], digest=raw["digest"])
        _check_entry(entry)
        entries.append(entry)
    ordered = tuple(entries)
    if list(ordered) != sorted(ordered, key=lambda entry: entry.path):
        raise ManifestError(f"{source}: entries are not sorted by path")
    _check_unique(ordered)
    root = data["root"]
    if not isinstance(root, str) or not _HEX64.fullmatch(root):
        raise ManifestError(f"{source}: bad root digest {root!r}")
    if root != root_digest(algorithm, ordered):
        raise ManifestError(
            f"{source}: the root digest does not match its entries",
            hint="the manifest was edited or corrupted; fingerprint the dataset again",
        )
    return Manifest(algorithm=algorithm, entries=ordered, root=root)


def load_manifest(path: Path) -> Manifest:
    """Read and parse the manifest file at ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ManifestError(f"cannot read the manifest {path}: {reason}") from exc
    return parse_manifest(text, source=f"manifest {path}")
