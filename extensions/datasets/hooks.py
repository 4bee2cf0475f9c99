"""A Python audit hook that flags reads of dataset files that bypass the verifying readers.

Installed by the secure kernel's extension. When Python code opens a file under the
directory of a dataset opened in this kernel (or under ``$ZTLAB_DATASETS_MOUNT``) without
going through :class:`~ztlab.extensions.datasets.verified.Dataset`, the hook warns
(:class:`UnverifiedReadWarning`, once per file) and tells the control plane, which records
``dataset.read.unverified`` in the audit log.

It sees what CPython announces as the ``open`` audit event (``open()``, ``io.open``,
``os.open`` and what is built on them: ``pandas.read_csv(path)``, ``numpy.load``...). It does
not see files opened by native code (pyarrow's own file system, cudf, C extensions), and code
in the kernel can read the raw device or call ``open(2)`` through ``ctypes``. It is a
tripwire for mistakes, not a barrier: the barrier is the read-only mount.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import warnings
from typing import Any

from ztlab.extensions.datasets import verified


class UnverifiedReadWarning(UserWarning):
    """A dataset file was opened without verification."""


_installed = False
_flagged: set[str] = set()
_reports: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()


_roots_cache: tuple[tuple[int, str | None], tuple[str, ...]] = ((0, None), ())


def _roots() -> tuple[str, ...]:
    """Directories whose files are dataset files (rebuilt only when they change: the hook
    runs on every ``open`` in the kernel)."""
    global _roots_cache  # one cache for the process-wide hook
    mount = os.environ.get("ZTLAB_DATASETS_MOUNT")
    key = (len(verified.OPENED), mount)
    if _roots_cache[0] == key:
        return _roots_cache[1]
    roots = [d + "/" for d in verified.OPENED]
    if mount:
        roots.append(mount.rstrip("/") + "/")
    _roots_cache = (key, tuple(roots))
    return _roots_cache[1]


def _owner(path: str) -> str | None:
    for directory, ref in verified.OPENED.items():
        if path.startswith(directory + "/"):
            return ref
    mount = os.environ.get("ZTLAB_DATASETS_MOUNT", "").rstrip("/")
    if mount and path.startswith(mount + "/"):
        return path[len(mount) + 1 :].split("/", 1)[0]
    return None


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event != "open" or verified.inside_reader():
        return
    path = args[0] if args else None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, str):
        return
    roots = _roots()
    if not roots:
        return
    if not os.path.isabs(path):
        path = os.path.abspath(path)
    if not path.startswith(roots) or path in _flagged:
        return
    _flagged.add(path)
    ref = _owner(path) or "?"
    warnings.warn(
        f"{path} (dataset {ref}) was opened without verification; read it with "
        "ztlab.datasets.open(...).read_* so that it is checked against its signed manifest",
        UnverifiedReadWarning,
        stacklevel=3,
    )
    _reports.put((ref, path))
    _start_reporter()


_reporter: threading.Thread | None = None


def _report_loop() -> None:
    from ztlab.extensions.datasets.client import default_registry

    while True:
        ref, path = _reports.get()
        verified._STATE.reading = True  # this thread's own opens are not flagged
        try:
            registry = default_registry()
            registry.report(ref, {"kind": "unverified-open", "file": path[-1024:]})
        except Exception:  # noqa: S110 - a tripwire must never break the user's code
            pass


def _start_reporter() -> None:
    global _reporter
    if _reporter is None:
        _reporter = threading.Thread(target=_report_loop, name="ztlab-report", daemon=True)
        _reporter.start()


def install() -> bool:
    """Install the hook once per process (audit hooks cannot be removed)."""
    global _installed
    if _installed:
        return False
    sys.addaudithook(_hook)
    _installed = True
    return True
