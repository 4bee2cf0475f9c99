"""GPU accounting: the GPU-seconds, energy and memory each user's processes used.

:class:`Accounting` is fed one tick at a time (:meth:`Accounting.add`) with the reading and
its attributed processes, and keeps totals per user and per ``(user, server)``:

* **GPU-seconds.** A device with at least one process is busy for the tick's interval; that
  interval is split between the holders of its processes: equally, or by the processes' own
  SM utilization when every process on the device reports one and they sum above zero.
  Processes that no ztlab holder owns are accounted to :data:`UNATTRIBUTED`, so the
  accounted GPU-seconds always add up to the busy GPU-seconds (every GPU-second is someone's).
  A MIG device counts as a device of its own: a GPU split into two busy MIG devices is two
  busy device-seconds per second.
* **Energy.** The delta of the device's energy counter (``energy_mj``) since its previous
  reading, split in the same shares; a counter that went backwards (driver reload) counts
  zero. Without a counter, ``power_w`` times the interval; without either (MIG devices),
  nothing.
* **Memory byte-seconds.** Each process's ``used_memory`` times the interval, to its holder.

The interval of a tick is the time since the previous tick, capped at five nominal intervals,
so a stalled sampler does not invent hours of use; the first tick counts one nominal interval.

:meth:`Accounting.open` keeps the totals per ``(user, server, UTC day)`` in a SQLite database
(file 0600 in a 0700 directory). The per-tick path stays in memory; the changed days are
written every ``flush_interval`` seconds (10 by default) and at :meth:`~Accounting.close`, so
a ``kill -9`` loses at most the last ``flush_interval`` seconds of accounting, never what an
earlier flush wrote.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from ztlab.common.errors import ConfigError
from ztlab.hub.monitor.findings import AttributedProcess
from ztlab.hub.monitor.telemetry import DeviceReading, Reading
from ztlab.hub.private import state_database, state_directory, state_file

__all__ = [
    "UNATTRIBUTED",
    "Accounting",
    "DayUsage",
    "Usage",
    "utc_day",
]

_log = logging.getLogger(__name__)

#: the user processes without a ztlab holder are accounted to
UNATTRIBUTED: Final = "(unattributed)"
#: a tick counts at most this many nominal intervals
STALL_FACTOR: Final = 5.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gpu_usage (
    user TEXT NOT NULL,
    server TEXT NOT NULL,
    day TEXT NOT NULL,
    gpu_seconds REAL NOT NULL,
    energy_joules REAL NOT NULL,
    memory_byte_seconds REAL NOT NULL,
    samples INTEGER NOT NULL,
    PRIMARY KEY (user, server, day)
);
"""

#: (user, server)
Key = tuple[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """What one user (or one user's server) used: totals since accounting began."""

    #: device-seconds its processes held a busy device (shared devices: its share)
    gpu_seconds: float = 0.0
    #: joules of the devices' energy, in the same shares
    energy_joules: float = 0.0
    #: bytes of GPU memory times seconds
    memory_byte_seconds: float = 0.0
    #: ticks in which it had at least one GPU process
    samples: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            gpu_seconds=self.gpu_seconds + other.gpu_seconds,
            energy_joules=self.energy_joules + other.energy_joules,
            memory_byte_seconds=self.memory_byte_seconds + other.memory_byte_seconds,
            samples=self.samples + other.samples,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DayUsage:
    """What one user's server used on one UTC day (``YYYY-MM-DD``)."""

    user: str
    server: str
    day: str
    usage: Usage


class _Tally:
    """A mutable :class:`Usage` for the per-tick path."""

    __slots__ = ("energy_joules", "gpu_seconds", "memory_byte_seconds", "samples")

    def __init__(self, usage: Usage | None = None) -> None:
        usage = usage or Usage()
        self.gpu_seconds = usage.gpu_seconds
        self.energy_joules = usage.energy_joules
        self.memory_byte_seconds = usage.memory_byte_seconds
        self.samples = usage.samples

    def add(self, gpu_seconds: float, energy: float, memory: float, samples: int) -> None:
        self.gpu_seconds += gpu_seconds
        self.energy_joules += energy
        self.memory_byte_seconds += memory
        self.samples += samples

    def frozen(self) -> Usage:
        return Usage(
            gpu_seconds=self.gpu_seconds,
            energy_joules=self.energy_joules,
            memory_byte_seconds=self.memory_byte_seconds,
            samples=self.samples,
        )


def _key(process: AttributedProcess) -> Key:
    holder = process.holder
    return (holder.user, holder.server) if holder is not None else (UNATTRIBUTED, "")


def _shares(processes: Sequence[AttributedProcess]) -> dict[Key, float]:
    """How one device's tick is split between its processes' holders (shares sum to 1)."""
    utils = [p.reading.sm_util for p in processes]
    total = sum(u for u in utils if u is not None)
    shares: dict[Key, float] = {}
    if total > 0 and all(u is not None for u in utils):
        for process, util in zip(processes, utils, strict=True):
            key = _key(process)
            shares[key] = shares.get(key, 0.0) + (util or 0) / total
        return shares
    holders = {_key(p) for p in processes}
    return dict.fromkeys(holders, 1.0 / len(holders))


def utc_day(t: float) -> str:
    """The UTC day of POSIX time ``t``, ``YYYY-MM-DD``."""
    return datetime.fromtimestamp(t, UTC).date().isoformat()


class Accounting:
    """Per-user GPU accounting, fed tick by tick; optionally persisted (:meth:`open`).

    Thread-safe: the sampler adds while the exporter reads.
    """

    def __init__(
        self,
        *,
        flush_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        db: sqlite3.Connection | None = None,
    ) -> None:
        self._lock = threading.Lock()
        #: held while writing, so that a flush from the sampler and one from close never mix
        self._write_lock = threading.Lock()
        self._db = db
        self._flush_interval = flush_interval
        self._clock = clock
        self._last_flush = clock()
        self._totals: dict[Key, _Tally] = {}
        self._days: dict[tuple[str, str, str], _Tally] = {}
        self._dirty: set[tuple[str, str, str]] = set()
        self._busy = 0.0
        self._last_t: float | None = None
        #: uuid -> (t, energy_mj) of the device's previous reading with a counter
        self._energy: dict[str, tuple[float, int]] = {}
        if db is not None:
            self._load(db)

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        flush_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> Accounting:
        """Accounting kept in the SQLite database ``path`` (created 0600 in a 0700 directory),
        starting from the totals it already holds.

        An existing database (or journal) group or others can reach is narrowed to 0600;
        one another user owns is refused (:class:`~ztlab.common.errors.ConfigError`).
        """
        state_directory(path.parent)
        for existing in (path, *(path.with_name(path.name + end) for end in ("-wal", "-shm"))):
            if existing.exists():
                state_file(existing)
        try:
            db = state_database(path, _SCHEMA)
        except sqlite3.Error as exc:
            raise ConfigError(
                f"{path}: cannot open the GPU accounting database: {exc}",
                hint="move the file aside if it is not a SQLite database",
            ) from exc
        return cls(flush_interval=flush_interval, clock=clock, db=db)

    def _load(self, db: sqlite3.Connection) -> None:
        rows = db.execute(
            "SELECT user, server, day, gpu_seconds, energy_joules, memory_byte_seconds, samples"
            " FROM gpu_usage"
        ).fetchall()
        for user, server, day, gpu_seconds, energy, memory, samples in rows:
            usage = Usage(
                gpu_seconds=gpu_seconds,
                energy_joules=energy,
                memory_byte_seconds=memory,
                samples=samples,
            )
            self._days[(user, server, day)] = _Tally(usage)
            self._totals.setdefault((user, server), _Tally()).add(
                gpu_seconds, energy, memory, samples
            )
            self._busy += gpu_seconds

    # -- the per-tick path ---------------------------------------------------------------------

    def _interval(self, t: float, nominal: float) -> float:
        if self._last_t is None:
            return nominal
        elapsed = t - self._last_t
        if elapsed < 0:  # the clock stepped back: count one nominal interval
            return nominal
        return min(elapsed, STALL_FACTOR * nominal)

    def _energy_joules(self, device: DeviceReading | None, t: float, interval: float) -> float:
        """Joules ``device`` used over this tick (updates the counter it remembers)."""
        if device is None:
            return 0.0
        if device.energy_mj is not None:
            previous = self._energy.get(device.uuid)
            self._energy[device.uuid] = (t, device.energy_mj)
            if previous is not None:
                then, counter = previous
                delta = max(device.energy_mj - counter, 0) / 1000.0
                span = t - then
                # a device missing from some ticks, or a stall: only this tick's share
                return delta * min(1.0, interval / span) if span > 0 else 0.0
        if device.power_w is not None:
            return device.power_w * interval
        return 0.0

    def add(
        self,
        t: float,
        interval: float,
        reading: Reading,
        processes: Sequence[AttributedProcess],
    ) -> None:
        """Account one tick at POSIX time ``t``; ``interval`` is the nominal sampling interval."""
        by_device: dict[str, list[AttributedProcess]] = {}
        for process in processes:
            by_device.setdefault(process.reading.uuid, []).append(process)
        devices = {device.uuid: device for device in reading.devices}
        day = utc_day(t)
        with self._lock:
            span = self._interval(t, interval)
            self._last_t = t
            tick: dict[Key, list[float]] = {}
            for uuid, device in devices.items():
                if uuid not in by_device:
                    self._energy_joules(device, t, span)  # keep the counter current
            for uuid, on_device in by_device.items():
                energy = self._energy_joules(devices.get(uuid), t, span)
                self._busy += span
                for key, share in _shares(on_device).items():
                    sums = tick.setdefault(key, [0.0, 0.0, 0.0])
                    sums[0] += span * share
                    sums[1] += energy * share
                for process in on_device:
                    used = process.reading.used_memory
                    if used is not None:
                        tick.setdefault(_key(process), [0.0, 0.0, 0.0])[2] += used * span
            for (user, server), (gpu, energy, memory) in tick.items():
                self._totals.setdefault((user, server), _Tally()).add(gpu, energy, memory, 1)
                self._days.setdefault((user, server, day), _Tally()).add(gpu, energy, memory, 1)
                self._dirty.add((user, server, day))
        if self._db is not None and self._clock() - self._last_flush >= self._flush_interval:
            self.flush()

    # -- reading -------------------------------------------------------------------------------

    @property
    def busy_gpu_seconds(self) -> float:
        """Device-seconds during which a device had at least one process."""
        with self._lock:
            return self._busy

    def usage(self, user: str | None = None) -> Mapping[str, Usage]:
        """Totals per user (all servers together); only ``user``'s when given."""
        result: dict[str, Usage] = {}
        with self._lock:
            for (owner, _server), tally in self._totals.items():
                if user is None or owner == user:
                    result[owner] = result.get(owner, Usage()) + tally.frozen()
        return result

    def by_server(self) -> Mapping[Key, Usage]:
        """Totals per ``(user, server)`` (``server`` ``""``: the default server)."""
        with self._lock:
            return {key: tally.frozen() for key, tally in self._totals.items()}

    def days(self, *, user: str | None = None) -> list[DayUsage]:
        """Totals per ``(user, server, UTC day)``, oldest day first; only ``user``'s if given."""
        with self._lock:
            rows = [
                DayUsage(user=owner, server=server, day=day, usage=tally.frozen())
                for (owner, server, day), tally in self._days.items()
                if user is None or owner == user
            ]
        return sorted(rows, key=lambda row: (row.day, row.user, row.server))

    # -- persistence ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Write the days changed since the last flush (no-op without a database).

        A failed write is logged and retried at the next flush; nothing is dropped.
        """
        with self._write_lock:
            self._flush()

    def _flush(self) -> None:
        if self._db is None:
            return
        with self._lock:
            self._last_flush = self._clock()
            rows = [
                (*key, t.gpu_seconds, t.energy_joules, t.memory_byte_seconds, t.samples)
                for key in self._dirty
                for t in (self._days[key],)
            ]
            self._dirty.clear()
        if not rows:
            return
        try:
            with self._db:  # one transaction
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT OR REPLACE INTO gpu_usage (user, server, day, gpu_seconds,"
                    " energy_joules, memory_byte_seconds, samples) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
        except sqlite3.Error as exc:
            _log.error("GPU accounting: cannot write %d rows (retried): %s", len(rows), exc)
            with self._lock:
                self._dirty.update((user, server, day) for user, server, day, *_ in rows)

    def close(self) -> None:
        """Flush and close the database."""
        with self._write_lock:
            self._flush()
            if self._db is not None:
                self._db.close()
                self._db = None
