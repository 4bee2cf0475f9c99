"""Datasets as a kernel sees them: every byte checked against the signed manifest as it is read.

:func:`open_dataset` asks the registry for ``NAME@VERSION``, verifies the envelope's
signature with the trusted keys (:func:`~ztlab.common.attest.verify_signed_manifest`) and
returns a :class:`Dataset`. Its readers check each file in the pass that reads it:

- the file is opened without following a final link (``O_NOFOLLOW``) and must still be a
  regular file inside the dataset directory (``/proc/self/fd``);
- its bytes are read once into private memory; one thread hashes that buffer while the
  format's parser (pyarrow, pandas, cudf) reads the same buffer, so the bytes parsed are
  the bytes hashed and no byte is read from disk twice;
- on a mismatch the parsed result is dropped and :class:`DatasetIntegrityError` names the
  dataset, the file and both digests; the control plane is told (its audit log records it).

A file verified in this kernel is not hashed again while its device, inode, size, mtime
and ctime are unchanged (checked with ``fstat`` on the opened file before and after the
read): an unchanged re-read costs an ``open`` and two ``fstat`` calls.

This protects the user's code from data that changed after registration. It is not a
control on the user: code in the kernel can always read files directly (see the audit hook
in :mod:`ztlab.extensions.datasets.hooks`, which flags that, and the documentation).
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import blake3

from ztlab.common.attest import SignedManifest, parse_dataset_ref, verify_signed_manifest
from ztlab.common.manifest import Entry, ManifestError
from ztlab.common.manifest.fingerprint import FileRef, hash_files, scan
from ztlab.common.manifest.format import new_hasher
from ztlab.extensions.datasets.client import Registry, default_registry
from ztlab.extensions.datasets.errors import DatasetError, DatasetIntegrityError

T = TypeVar("T")

#: (dataset directory, path) -> (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns, digest)
_VERIFIED: dict[tuple[str, str], tuple[int, int, int, int, int, str]] = {}
_STATE = threading.local()
#: datasets opened in this kernel, by directory (read by the audit hook)
OPENED: dict[str, str] = {}
_LOGGED: set[tuple[str, str]] = set()
_PARALLEL_HASH = 1024 * 1024
_PARALLEL_READ = 8 * 1024 * 1024


def _allocate(size: int) -> Any:
    """``size`` writable bytes, not zero-filled when pyarrow can allocate them."""
    if size >= _PARALLEL_READ:
        try:
            import pyarrow
        except ImportError:
            pass
        else:
            return pyarrow.allocate_buffer(size)
    return bytearray(size)


def _fill(fd: int, view: memoryview, start: int, end: int) -> int:
    """Read ``[start, end)`` of ``fd`` into ``view``; where it stopped (EOF: early)."""
    done = start
    while done < end:
        count = os.preadv(fd, [view[done:end]], done)
        if count == 0:
            break
        done += count
    return done


def inside_reader() -> bool:
    """Whether this thread is inside a verifying reader (the audit hook stays quiet)."""
    return bool(getattr(_STATE, "reading", False))


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    before = inside_reader()
    _STATE.reading = True
    try:
        yield
    finally:
        _STATE.reading = before


def _key(info: os.stat_result) -> tuple[int, int, int, int, int]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _still_verified(cache_key: tuple[str, str], info: tuple[int, ...], digest: str) -> bool:
    """Whether this kernel verified the file and its identity and times are unchanged."""
    known = _VERIFIED.get(cache_key)
    return known is not None and known[:5] == info and known[5] == digest


def _digest(algorithm: Any, data: Any) -> str:
    if algorithm == "blake3" and len(data) >= _PARALLEL_HASH:
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    else:
        hasher = new_hasher(algorithm)
    hasher.update(data)
    return str(hasher.hexdigest())


class Dataset:
    """A verified, signed dataset version and readers that check what they read."""

    def __init__(
        self,
        signed: SignedManifest,
        directory: str,
        *,
        registry: Registry | None = None,
        url: str | None = None,
    ) -> None:
        """Use the files under ``directory``, as ``signed`` describes them."""
        self.signed = signed
        self.ref = signed.ref
        self.manifest = signed.manifest
        self.root_digest = signed.manifest.root
        self.directory = os.path.realpath(directory)
        self.url = url
        self._registry = registry
        self._entries = signed.manifest.by_path()
        if registry is not None:  # a scratch copy checked by hand is not a dataset in use
            OPENED[self.directory] = self.ref

    def __repr__(self) -> str:
        return (
            f"<Dataset {self.ref}: {len(self._entries)} files, "
            f"{self.manifest.algorithm} root {self.root_digest[:16]}..., signed by "
            f"{self.signed.registered_by} at {self.signed.registered_at}>"
        )

    @property
    def files(self) -> list[str]:
        """The files of the version, as in the manifest."""
        return list(self._entries)

    # -- checks ------------------------------------------------------------------------

    def _entry(self, file: str | os.PathLike[str]) -> Entry:
        text = os.fspath(file)
        if os.path.isabs(text):
            real = os.path.normpath(text)
            if not real.startswith(self.directory + "/"):
                raise DatasetError(f"{text} is not inside dataset {self.ref} ({self.directory})")
            text = real[len(self.directory) + 1 :]
        name = str(PurePosixPath(text))
        entry = self._entries.get(name)
        if entry is None:
            raise DatasetError(
                f"{name!r} is not a file of dataset {self.ref}",
                hint=f"its files: {', '.join(list(self._entries)[:5])}"
                + (", ..." if len(self._entries) > 5 else ""),
            )
        return entry

    def _fail(
        self,
        message: str,
        *,
        kind: str,
        file: str | None = None,
        expected: str | None = None,
        actual: str | None = None,
    ) -> DatasetIntegrityError:
        """Report the problem to the control plane, then return the error to raise."""
        error = DatasetIntegrityError(
            message,
            dataset=self.ref,
            file=file,
            expected=expected,
            actual=actual,
            kind=kind,
            hint="the data changed after it was registered; do not use it, tell the data "
            "steward (the control plane's audit log has the report)",
        )
        if self._registry is not None:
            problem = {"kind": kind, "detail": message[:1024]}
            for field, value in (("file", file), ("expected", expected), ("actual", actual)):
                if value is not None:
                    problem[field] = value
            try:
                self._registry.report(self.ref, problem)
            except Exception as exc:
                error.hint = f"{error.hint}; reporting it failed: {exc}"
        return error

    def _open(self, entry: Entry) -> tuple[int, os.stat_result]:
        path = os.path.join(self.directory, entry.path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise self._fail(
                f"{self.ref}: {entry.path} is missing (expected {entry.size} bytes, "
                f"{self.manifest.algorithm} {entry.digest})",
                kind="missing",
                file=entry.path,
                expected=entry.digest,
            ) from None
        except OSError as exc:
            raise self._fail(
                f"{self.ref}: cannot open {entry.path} safely: {exc.strerror} (a symbolic "
                "link or something else that is not the registered file)",
                kind="unsafe",
                file=entry.path,
                expected=entry.digest,
            ) from None
        info = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(info.st_mode):
            problem = "is not a regular file"
        else:
            with contextlib.suppress(OSError):
                opened = os.readlink(f"/proc/self/fd/{fd}")
                if not opened.startswith(self.directory + "/"):
                    problem = f"resolves to {opened}, outside the dataset directory"
        if problem:
            os.close(fd)
            raise self._fail(
                f"{self.ref}: {entry.path} {problem}",
                kind="unsafe",
                file=entry.path,
                expected=entry.digest,
            )
        return fd, info

    def _read_all(self, fd: int, size: int) -> memoryview:
        """The file's bytes in private memory: a copy no other process can change."""
        buffer = _allocate(size)
        view = memoryview(buffer)
        cores = os.cpu_count() or 1
        if size >= _PARALLEL_READ and cores > 1:
            # copying from the page cache is memory-bound: split it over the cores
            step = -(-size // cores)
            with ThreadPoolExecutor(max_workers=cores - 1) as pool:
                parts = [
                    pool.submit(_fill, fd, view, start, min(size, start + step))
                    for start in range(step, size, step)
                ]
                ends = [_fill(fd, view, 0, min(size, step))] + [p.result() for p in parts]
            bounds = [min(size, start + step) for start in range(0, size, step)]
            done = (
                size
                if ends == bounds
                else min(e for e, b in zip(ends, bounds, strict=True) if e < b)
            )
        else:
            done = _fill(fd, view, 0, size)
        more = os.pread(fd, 1, size) if done == size else b""
        if done == size and not more:
            return view
        # the file changed size since fstat: read what is there now, as it is
        data = bytearray(view[:done])
        view.release()
        offset = done
        while chunk := os.pread(fd, 1024 * 1024, offset):
            data += chunk
            offset += len(chunk)
        return memoryview(data)

    def _verified(
        self,
        file: str | os.PathLike[str],
        parse: Callable[[memoryview], T],
        parse_path: Callable[[str], T] | None = None,
    ) -> T:
        """Read ``file`` once, hash and parse the same bytes, return the parse if they match."""
        entry = self._entry(file)
        self.log_lineage()
        with _reading():
            fd, before = self._open(entry)
            try:
                cache_key = (self.directory, entry.path)
                if parse_path is not None and _still_verified(
                    cache_key, _key(before), entry.digest
                ):
                    result = parse_path(f"/proc/self/fd/{fd}")
                    if _key(os.fstat(fd)) == _key(before):
                        return result
                view = self._read_all(fd, before.st_size)
                after = os.fstat(fd)
                with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ztlab-verify") as pool:
                    hashing = pool.submit(_digest, self.manifest.algorithm, view)
                    parsed: T | None = None
                    failure: BaseException | None = None
                    try:
                        parsed = parse(view)
                    except Exception as exc:
                        failure = exc
                    actual = hashing.result()
                if actual != entry.digest or len(view) != entry.size:
                    raise self._fail(
                        f"{self.ref}: {entry.path} does not match its signed manifest: "
                        f"expected {entry.size} bytes, {self.manifest.algorithm} "
                        f"{entry.digest}; read {len(view)} bytes, {actual}",
                        kind="modified",
                        file=entry.path,
                        expected=entry.digest,
                        actual=actual,
                    )
                if failure is not None:
                    raise failure
                if _key(after) == _key(before):
                    _VERIFIED[cache_key] = (*_key(before), entry.digest)
                return parsed  # type: ignore[return-value]
            finally:
                os.close(fd)

    # -- readers -----------------------------------------------------------------------

    def read_bytes(self, file: str | os.PathLike[str]) -> bytes:
        """The verified bytes of ``file``."""
        return self._verified(file, bytes)

    def open(self, file: str | os.PathLike[str]) -> io.BytesIO:
        """A binary file object over the verified bytes of ``file``."""
        return io.BytesIO(self.read_bytes(file))

    def path(self, file: str | os.PathLike[str]) -> str:
        """Where ``file`` lies (for tools that insist on a path; prefer the readers)."""
        return os.path.join(self.directory, self._entry(file).path)

    def read_parquet(
        self,
        file: str | os.PathLike[str] | Sequence[str] | None = None,
        *,
        engine: str = "pandas",
        **kwargs: Any,
    ) -> Any:
        """A DataFrame from one Parquet file, several (concatenated) or all (``None``).

        ``engine="pandas"`` uses :func:`pandas.read_parquet` (pyarrow); ``engine="cudf"``
        :func:`cudf.read_parquet` on the GPU (needs cudf and an NVIDIA GPU). Other keyword
        arguments go to the reader.
        """

        def from_buffer(reader: Any, view: memoryview) -> Any:
            if reader.__module__.startswith("cudf"):
                return reader(io.BytesIO(view), **kwargs)
            import pyarrow

            return reader(pyarrow.BufferReader(pyarrow.py_buffer(view)), **kwargs)

        return self._frames(
            file, ".parquet", engine, "read_parquet", from_buffer, kwargs, map_file=True
        )

    def read_csv(
        self,
        file: str | os.PathLike[str] | Sequence[str] | None = None,
        *,
        engine: str = "pandas",
        **kwargs: Any,
    ) -> Any:
        """A DataFrame from one CSV file, several (concatenated) or all (``None``);
        ``engine`` and keyword arguments as for :meth:`read_parquet`."""

        def from_buffer(reader: Any, view: memoryview) -> Any:
            return reader(io.BytesIO(view), **kwargs)

        return self._frames(file, ".csv", engine, "read_csv", from_buffer, kwargs)

    def _frames(
        self,
        file: str | os.PathLike[str] | Sequence[str] | None,
        suffix: str,
        engine: str,
        reader_name: str,
        from_buffer: Callable[[Any, memoryview], Any],
        kwargs: dict[str, Any],
        *,
        map_file: bool = False,
    ) -> Any:
        """Read each file with ``engine``'s reader (verified), concatenated if several.

        An unchanged, already verified file is read straight from the opened file; with
        ``map_file`` through a pyarrow memory map (measured as fast as, or faster than,
        ``pandas.read_parquet(path)``; handing pyarrow ``/proc/self/fd/N`` as a path was up
        to a third slower).
        """
        if engine == "cudf":
            library = _cudf()
        elif engine == "pandas":
            import pandas

            library = pandas
        else:
            raise DatasetError(f"unknown engine {engine!r}", hint="use 'pandas' or 'cudf'")
        reader = getattr(library, reader_name)

        def from_path(path: str) -> Any:
            if not map_file:
                return reader(path, **kwargs)
            import pyarrow

            with pyarrow.memory_map(path) as source:
                return reader(source, **kwargs)

        frames = [
            self._verified(
                f,
                lambda view: from_buffer(reader, view),
                from_path if engine == "pandas" else None,
            )
            for f in self._many(file, suffix)
        ]
        return frames[0] if len(frames) == 1 else library.concat(frames, ignore_index=True)

    def _many(
        self, file: str | os.PathLike[str] | Sequence[str] | None, suffix: str
    ) -> list[str | os.PathLike[str]]:
        if file is None:
            found: list[str | os.PathLike[str]] = [p for p in self._entries if p.endswith(suffix)]
            if not found:
                raise DatasetError(f"dataset {self.ref} has no {suffix} files")
            return found
        if isinstance(file, str | os.PathLike):
            return [file]
        return list(file)

    # -- the whole tree ----------------------------------------------------------------

    def verify(self) -> None:
        """Check every file, and that no file was added, removed or replaced by a link.

        Files verified before in this kernel and unchanged (device, inode, size, mtime,
        ctime) are not hashed again. :class:`DatasetIntegrityError` lists the problems.
        """
        with _reading():
            found = scan(Path(self.directory))
            unsafe = {r.path: r.reason for r in found.refusals}
            to_hash: list[FileRef] = []
            keys: dict[str, tuple[int, int, int, int, int]] = {}
            for ref in found.files:
                entry = self._entries.get(ref.path)
                try:
                    info = os.stat(ref.open_path, follow_symlinks=False)
                except OSError as exc:
                    unsafe[ref.path] = f"cannot stat: {exc.strerror}"
                    continue
                keys[ref.path] = _key(info)
                if entry is not None and _still_verified(
                    (self.directory, ref.path), keys[ref.path], entry.digest
                ):
                    continue
                to_hash.append(ref)

            def unreadable(ref: FileRef, error: ManifestError) -> None:
                unsafe[ref.path] = error.message

            # chunked reads, not memory maps: a file truncated while mapped would kill the
            # kernel with SIGBUS
            hashed = hash_files(
                to_hash, found.root, self.manifest.algorithm, on_error=unreadable, mmap=False
            )
        present = {ref.path for ref in found.files} | set(unsafe)
        problems: list[tuple[str, str, str | None, str | None]] = []
        for path, (size, digest) in sorted(hashed.items()):
            entry = self._entries.get(path)
            if entry is None:
                problems.append(("extra", f"{path}: not in the manifest", None, digest))
            elif (size, digest) != (entry.size, entry.digest):
                problems.append(
                    (
                        "modified",
                        f"{path}: expected {entry.size} bytes {entry.digest}, "
                        f"found {size} bytes {digest}",
                        entry.digest,
                        digest,
                    )
                )
            else:
                _VERIFIED[(self.directory, path)] = (*keys[path], entry.digest)
        for path, reason in sorted(unsafe.items()):
            entry = self._entries.get(path)
            problems.append(("unsafe", f"{path}: {reason}", entry.digest if entry else None, None))
        for path, entry in self._entries.items():
            if path not in present:
                problems.append(("missing", f"{path}: missing", entry.digest, None))
        if problems:
            first = problems[0]
            shown = "\n".join(f"  {kind}: {text}" for kind, text, _, _ in problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise self._fail(
                f"{self.ref}: {len(problems)} file(s) do not match the signed manifest:\n"
                f"{shown}{more}",
                kind=first[0],
                file=first[1].split(":", 1)[0],
                expected=first[2],
                actual=first[3],
            )

    # -- lineage -----------------------------------------------------------------------

    def log_lineage(self, context: str = "training") -> bool:
        """Add this version to the active MLflow run's inputs, once per run.

        Only when the user's code imported MLflow and a run is active; the input's digest
        is the first 32 hex digits of our root digest (MLflow's column holds 36 characters)
        and its tags carry the whole root, the algorithm and the signing key id.
        """
        mlflow = sys.modules.get("mlflow")
        if mlflow is None:
            return False
        run = mlflow.active_run()
        if run is None:
            return False
        key = (run.info.run_id, self.ref)
        if key in _LOGGED:
            return False
        import importlib

        sources: Any = importlib.import_module("mlflow.data.sources")
        meta: Any = importlib.import_module("mlflow.data.meta_dataset")
        with _reading():
            source = (
                sources.HTTPDatasetSource(self.url)
                if self.url
                else sources.LocalArtifactDatasetSource(self.directory)
            )
            mlflow.log_input(
                meta.MetaDataset(source=source, name=self.ref, digest=self.root_digest[:32]),
                context=context,
                tags={
                    "ztlab.dataset": self.ref,
                    "ztlab.root": self.root_digest,
                    "ztlab.algorithm": self.manifest.algorithm,
                    "ztlab.keyid": self.signed.keyid,
                },
            )
        _LOGGED.add(key)
        return True


def _cudf() -> Any:
    try:
        import cudf
    except ImportError as exc:
        raise DatasetError(
            "engine='cudf' needs cudf, which is not installed here",
            hint="install zerotrust-lab[gpu] on a machine with an NVIDIA GPU, or use "
            "engine='pandas'",
        ) from exc
    return cudf


def open_dataset(ref: str, *, registry: Registry | None = None) -> Dataset:
    """Fetch ``NAME@VERSION``'s signed manifest, verify its signature, return the dataset.

    :class:`DatasetIntegrityError` if no trusted key signed it or it is for another version;
    :class:`DatasetError` for an unknown version or one the policy does not let you read.
    """
    from ztlab.common.errors import VerificationError

    parse_dataset_ref(ref)
    registry = registry or default_registry()
    candidate = registry.fetch(ref)
    try:
        signed = verify_signed_manifest(
            candidate.envelope, registry.trusted_keys(), expected_ref=ref
        )
    except VerificationError as exc:
        error = DatasetIntegrityError(
            f"the manifest of {ref} is not trustworthy: {exc.message}",
            dataset=ref,
            kind="signature",
            hint=exc.hint,
        )
        with contextlib.suppress(Exception):
            registry.report(ref, {"kind": "signature", "detail": exc.message[:1024]})
        raise error from exc
    if not os.path.isdir(candidate.location):
        raise DatasetError(
            f"the files of {ref} are not at {candidate.location}",
            hint="restart your server to mount datasets registered since it started",
        )
    dataset = Dataset(signed, candidate.location, registry=registry, url=candidate.url)
    dataset.log_lineage()
    return dataset
