"""A schedule of notebook runs: what the command line sends and the control plane keeps.

A :class:`ScheduleSpec` is pure data, checked on construction (:meth:`ScheduleSpec.parse`):
a name, a five-field cron expression (a sixth, optional, gives seconds) read in an IANA
time zone, the notebook's parameters,
the GPU pool and count, retries with exponential back-off, what to do when the previous
run still runs (``concurrency``: ``skip`` or ``queue``) and what to do with fire times
missed while the hub was down (``missed``: ``skip``, ``latest`` or ``all``).

:func:`fire_times` lists the moments a cron expression fires between two instants, in
UTC, with daylight-saving changes handled as cron does: a time the spring change skips
fires at the first moment after the gap (03:00 for 02:30 in Berlin), a fixed time in the
hour the autumn change repeats fires once, and a schedule that runs every N minutes keeps
running through the repeated hour.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ztlab.common.errors import UsageError

__all__ = [
    "CONCURRENCY",
    "MISSED",
    "ScheduleError",
    "ScheduleSpec",
    "check_cron",
    "check_notebook",
    "check_parameters",
    "check_timezone",
    "fire_times",
]

#: what a fire does while the schedule's previous run still runs
CONCURRENCY: Final = ("skip", "queue")
#: what happens to fire times missed while the scheduler was not running
MISSED: Final = ("skip", "latest", "all")
#: schedule names: what a path segment, a Cedar entity id and a cgroup name all accept
_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")
#: parameter names papermill injects as Python variables
_PARAMETER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
#: most fire times :func:`fire_times` lists at once (a minutely schedule, a week down)
MAX_FIRES: Final = 20_000


class ScheduleError(UsageError):
    """A schedule, cron expression, time zone or parameter that is not valid."""


def check_name(name: Any, *, where: str = "name") -> str:
    """A schedule's name: lower-case letters, digits, ``-`` and ``_``, up to 63."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ScheduleError(
            f"{where}: {name!r} is not a schedule name",
            hint="use 1 to 63 lower-case letters, digits, '-' and '_', starting with a "
            "letter or digit (e.g. 'nightly-train')",
        )
    return name


def check_timezone(value: Any, *, where: str = "timezone") -> str:
    """An IANA time-zone name that this machine's zone database knows."""
    if not isinstance(value, str) or not value:
        raise ScheduleError(f"{where}: expected an IANA time-zone name, got {value!r}")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ScheduleError(
            f"{where}: {value!r} is not a time zone this machine knows",
            hint="use an IANA name such as 'UTC', 'Europe/Berlin' or 'America/New_York'",
        ) from exc
    return value


def check_cron(value: Any, *, where: str = "cron") -> str:
    """A five-field cron expression (minute hour day-of-month month day-of-week), with an
    optional sixth field for seconds (croniter's convention)."""
    from croniter import croniter

    if not isinstance(value, str) or len(value.split()) not in (5, 6):
        raise ScheduleError(
            f"{where}: {value!r} is not a five-field cron expression",
            hint="write minute hour day-of-month month day-of-week, e.g. '0 2 * * *' "
            "(02:00 every day) or '*/15 9-17 * * mon-fri'; an optional sixth field gives "
            "seconds ('* * * * * */20': every 20 seconds)",
        )
    expression = " ".join(value.split())
    if not croniter.is_valid(expression):
        raise ScheduleError(
            f"{where}: {value!r} is not a valid cron expression",
            hint="each field takes numbers, ranges (1-5), lists (1,3), steps (*/10) or "
            "names (mon, jan); see `man 5 crontab`",
        )
    return expression


def check_notebook(data: bytes, *, where: str) -> None:
    """``data`` is a Jupyter notebook (a JSON object with a list of cells)."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ScheduleError(f"{where}: not a notebook (not JSON: {exc})") from exc
    if not isinstance(document, dict) or not isinstance(document.get("cells"), list):
        raise ScheduleError(f"{where}: not a notebook (no list of cells)")


def check_parameters(value: Any, *, where: str = "parameters") -> dict[str, Any]:
    """Papermill parameters: identifier -> JSON scalar, list or object."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ScheduleError(f"{where}: expected a table of name = value, got {value!r}")
    checked: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _PARAMETER.match(key):
            raise ScheduleError(
                f"{where}: {key!r} is not a parameter name",
                hint="parameters are Python identifiers (letters, digits, '_')",
            )
        if not _json_value(item):
            raise ScheduleError(
                f"{where}.{key}: {item!r} is not a string, number, boolean, list or table"
            )
        checked[key] = item
    return checked


def _json_value(value: Any, depth: int = 0) -> bool:
    if depth > 8:
        return False
    if value is None or isinstance(value, str | bool | int | float):
        return True
    if isinstance(value, list):
        return all(_json_value(v, depth + 1) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _json_value(v, depth + 1) for k, v in value.items())
    return False


def _count(value: Any, where: str, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ScheduleError(f"{where}: expected a whole number from {low} to {high}, got {value!r}")
    return value


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ScheduleError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")
    return str(value)


@dataclass(frozen=True)
class ScheduleSpec:
    """One schedule; build with :meth:`parse` (which checks every field)."""

    name: str
    cron: str
    timezone: str = "UTC"
    parameters: Mapping[str, Any] = field(default_factory=dict)
    pool: str | None = None
    gpus: int = 0
    #: runs after a failure (0: none)
    retries: int = 0
    #: seconds before the first retry; each further retry waits twice as long
    retry_backoff_seconds: int = 60
    concurrency: Literal["skip", "queue"] = "skip"
    missed: Literal["skip", "latest", "all"] = "latest"

    #: the keys :meth:`parse` accepts (besides the notebook, which travels apart)
    KEYS: tuple[str, ...] = (
        "name",
        "cron",
        "timezone",
        "parameters",
        "pool",
        "gpus",
        "retries",
        "retry_backoff_seconds",
        "concurrency",
        "missed",
    )

    @classmethod
    def parse(cls, data: Mapping[str, Any], *, where: str = "schedule") -> ScheduleSpec:
        """Check every field of ``data``; errors name ``where`` and the key."""
        unknown = sorted(set(data) - set(cls.KEYS))
        if unknown:
            raise ScheduleError(
                f"{where}: unknown key(s) {', '.join(unknown)}",
                hint=f"a schedule takes {', '.join(cls.KEYS)}",
            )
        if "cron" not in data or "name" not in data:
            raise ScheduleError(f"{where}: needs a name and a cron expression")
        pool = data.get("pool")
        if pool is not None and (not isinstance(pool, str) or not pool):
            raise ScheduleError(f"{where}.pool: expected a pool name, got {pool!r}")
        gpus = _count(data.get("gpus", 0), f"{where}.gpus", low=0, high=64)
        if gpus and pool is None:
            pool = None  # the control plane picks the only pool, or refuses
        return cls(
            name=check_name(data["name"], where=f"{where}.name"),
            cron=check_cron(data["cron"], where=f"{where}.cron"),
            timezone=check_timezone(data.get("timezone", "UTC"), where=f"{where}.timezone"),
            parameters=check_parameters(data.get("parameters"), where=f"{where}.parameters"),
            pool=pool,
            gpus=gpus,
            retries=_count(data.get("retries", 0), f"{where}.retries", low=0, high=10),
            retry_backoff_seconds=_count(
                data.get("retry_backoff_seconds", 60),
                f"{where}.retry_backoff_seconds",
                low=0,
                high=86_400,
            ),
            concurrency=_choice(  # type: ignore[arg-type]
                data.get("concurrency", "skip"), f"{where}.concurrency", CONCURRENCY
            ),
            missed=_choice(data.get("missed", "latest"), f"{where}.missed", MISSED),  # type: ignore[arg-type]
        )

    def to_json(self) -> dict[str, Any]:
        """The fields as :meth:`parse` reads them."""
        return {
            "name": self.name,
            "cron": self.cron,
            "timezone": self.timezone,
            "parameters": dict(self.parameters),
            "pool": self.pool,
            "gpus": self.gpus,
            "retries": self.retries,
            "retry_backoff_seconds": self.retry_backoff_seconds,
            "concurrency": self.concurrency,
            "missed": self.missed,
        }

    def next_after(self, moment: float) -> float:
        """The first fire time after ``moment`` (POSIX seconds)."""
        return next(_fires(self.cron, self.timezone, moment))

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` (2 is the first retry)."""
        return float(self.retry_backoff_seconds * 2 ** max(0, attempt - 2))


def _fires(cron: str, timezone: str, after: float) -> Iterator[float]:
    from croniter import croniter

    zone = ZoneInfo(timezone)
    start = datetime.fromtimestamp(after, UTC).astimezone(zone)
    it = croniter(cron, start)
    last = after
    last_wall: datetime | None = None
    while True:
        moment = float(it.get_next(float))
        wall = datetime.fromtimestamp(moment, zone).replace(tzinfo=None)
        if moment <= last or wall == last_wall:  # a wall-clock time that happens twice
            continue
        last, last_wall = moment, wall
        yield moment


def fire_times(cron: str, timezone: str, after: float, until: float) -> list[float]:
    """Fire times in ``(after, until]`` (POSIX seconds), at most :data:`MAX_FIRES`."""
    found: list[float] = []
    for moment in _fires(cron, timezone, after):
        if moment > until or len(found) >= MAX_FIRES:
            break
        found.append(moment)
    return found
