"""What the host says about a GPU process: account, names, cgroup and libraries from /proc.

:func:`read_process` reads ``/proc/PID`` once; :class:`ProcessFactsCache` is what a sampling
loop uses: the cheap facts (``status``, ``comm``, ``cmdline``, ``cgroup``) are read at every
call, since a process can change its uid, name and arguments and be moved to another cgroup,
while the libraries (``/proc/PID/maps``, costly on a large process) are kept per process, by
PID *and* start time, so a reused PID never gets another process's facts, and read again
after ``libraries_ttl`` seconds (a process can ``dlopen`` more later).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from ztlab.hub.monitor.telemetry import ProcessFacts

__all__ = [
    "PROC",
    "ProcessFactsCache",
    "libraries_of",
    "read_process",
    "start_time",
]

#: where the kernel shows processes
PROC: Final = Path("/proc")


class _Gone(Exception):
    """The process exited (or its /proc entry cannot be read) while it was being read."""


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise _Gone(str(path)) from exc


def _read_text(path: Path) -> str:
    return _read_bytes(path).decode("utf-8", "replace")


def start_time(pid: int, *, proc: Path = PROC) -> int | None:
    """Field 22 of ``/proc/PID/stat`` (clock ticks after boot); ``None`` if the process is gone.

    With the pid it names one process for good: a reused pid has a later start time.
    """
    try:
        stat = _read_text(proc / str(pid) / "stat")
    except (_Gone, OSError):
        return None
    # "pid (comm) state ...": comm may hold spaces and parentheses; fields go on after the last ")"
    _, _, rest = stat.rpartition(")")
    fields = rest.split()
    try:
        return int(fields[22 - 3])
    except (IndexError, ValueError):
        return None


def _uid(status: str) -> int | None:
    for line in status.splitlines():
        if line.startswith("Uid:"):
            values = line.split()[1:]
            if values and values[0].isdigit():
                return int(values[0])
    return None


def _cmdline(data: bytes) -> tuple[str, ...]:
    if not data:
        return ()  # a kernel thread (or a zombie)
    parts = data.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    return tuple(part.decode("utf-8", "replace") for part in parts)


def _cgroup(text: str, controller: str) -> str | None:
    """The path of the v1 hierarchy holding ``controller``, else the v2 (``0::``) path."""
    unified: str | None = None
    for line in text.splitlines():
        hierarchy, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not sep or not sep2:
            continue
        if controller in controllers.split(","):
            return path
        if hierarchy == "0" and controllers == "":
            unified = path
    return unified


def _is_library(name: str) -> bool:
    return name.endswith(".so") or ".so." in name


def libraries_of(pid: int, *, proc: Path = PROC) -> tuple[str, ...]:
    """Sorted unique file names of the shared libraries ``pid`` has mapped.

    ``()`` where ``/proc/PID/maps`` cannot be read: the process is gone, or it is another
    user's and this one may not trace it.
    """
    try:
        maps = _read_text(proc / str(pid) / "maps")
    except (_Gone, OSError):
        return ()
    found: set[str] = set()
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        path = parts[5].removesuffix(" (deleted)")
        name = path.rpartition("/")[2]
        if _is_library(name):
            found.add(name)
    return tuple(sorted(found))


def _read_cheap(pid: int, proc: Path, cgroup_controller: str) -> ProcessFacts:
    """Every fact but the libraries; raises :class:`_Gone`."""
    base = proc / str(pid)
    try:
        status = _read_text(base / "status")
        comm = _read_text(base / "comm").removesuffix("\n")
    except PermissionError as exc:
        raise _Gone(str(base)) from exc
    try:
        cmdline = _cmdline(_read_bytes(base / "cmdline"))
    except PermissionError:
        cmdline = ()
    try:
        cgroup = _cgroup(_read_text(base / "cgroup"), cgroup_controller)
    except PermissionError:
        cgroup = None
    return ProcessFacts(
        pid=pid, uid=_uid(status), comm=comm, cmdline=cmdline, cgroup=cgroup, libraries=()
    )


def read_process(
    pid: int, *, proc: Path = PROC, cgroup_controller: str = "devices"
) -> ProcessFacts | None:
    """What ``/proc/PID`` says about ``pid``; ``None`` when the process is gone.

    ``uid`` is the real uid (``status``), ``cmdline`` empty for a kernel thread, ``cgroup`` the
    path of the v1 hierarchy of ``cgroup_controller`` or else the v2 one, ``libraries`` the
    sorted unique file names of mapped shared objects (``maps``).
    """
    try:
        facts = _read_cheap(pid, proc, cgroup_controller)
    except (_Gone, OSError):
        return None
    return replace(facts, libraries=libraries_of(pid, proc=proc))


@dataclass(slots=True)
class _Entry:
    started: int
    libraries: tuple[str, ...]
    read_at: float


class ProcessFactsCache:
    """Facts per process for a sampling loop, keyed by PID and start time.

    :meth:`get` re-reads the cheap facts every time and the libraries at most every
    ``libraries_ttl`` seconds; a PID whose start time changed (it was reused) is read afresh.
    Call :meth:`prune` with the PIDs still of interest to forget the rest. Thread-safe.
    """

    def __init__(
        self,
        *,
        proc: Path = PROC,
        cgroup_controller: str = "devices",
        libraries_ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Read processes under ``proc``."""
        self._proc = proc
        self._controller = cgroup_controller
        self._ttl = libraries_ttl
        self._clock = clock
        self._entries: dict[int, _Entry] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """The number of processes cached."""
        return len(self._entries)

    def get(self, pid: int) -> ProcessFacts | None:
        """The facts of ``pid`` now; ``None`` when it is gone."""
        started = start_time(pid, proc=self._proc)
        if started is None:
            self._forget(pid)
            return None
        try:
            facts = _read_cheap(pid, self._proc, self._controller)
        except (_Gone, OSError):
            self._forget(pid)
            return None
        now = self._clock()
        with self._lock:
            entry = self._entries.get(pid)
        if entry is None or entry.started != started or now - entry.read_at >= self._ttl:
            entry = _Entry(
                started=started, libraries=libraries_of(pid, proc=self._proc), read_at=now
            )
        if start_time(pid, proc=self._proc) != started:
            # the pid was reused while it was read: these facts may mix two processes
            self._forget(pid)
            return None
        with self._lock:
            self._entries[pid] = entry
        return replace(facts, libraries=entry.libraries)

    def prune(self, live_pids: Iterable[int]) -> None:
        """Forget every process not in ``live_pids``."""
        keep = set(live_pids)
        with self._lock:
            for pid in [p for p in self._entries if p not in keep]:
                del self._entries[pid]

    def _forget(self, pid: int) -> None:
        with self._lock:
            self._entries.pop(pid, None)
