"""Rolling robust baselines of a user's GPU usage: median, MAD and peaks over a window.

The baseline detector (:mod:`ztlab.hub.monitor.detectors`) compares each user's GPU
utilization, power and PCIe volume with what that user normally does. Keeping 24 hours of
1 Hz samples and sorting them every tick would cost far too much, so a :class:`RollingSeries`
keeps per-minute aggregates (count, sum, sum of squares, maximum) in a deque and recomputes its
:class:`BaselineStats` only after a share of the window changed (every minute while it is
young, every 6 minutes in a full day): O(1) per sample.

What a baseline says (:class:`BaselineStats`):

- ``center``: the median of the per-minute means;
- ``scale``: the larger of the robust spread between minutes (1.4826 * MAD of the per-minute
  means), the typical spread within a minute (the median of the per-minute standard
  deviations: single samples are noisier than minute means) and a floor per metric (absolute
  and relative to ``center``), so that a flat baseline does not turn every wiggle into an
  outlier;
- ``peak``: the level the per-minute maxima reach in at least 2 % of the minutes, and in at
  least two of them (:func:`recurring_peak`). Recurring bursts, such as checkpoint writes
  every half hour, belong to a user's normal; a one-off event does not, so one anomaly does
  not teach the baseline to accept itself.

A value is anomalous above :meth:`BaselineStats.limit`: ``center`` plus the larger of
``threshold * scale`` and the usual peak's height above the center plus :data:`PEAK_MARGIN`
(a burst 25 % higher than the usual ones is still normal). Only upward deviations matter.

A :class:`BaselineBook` holds one series per (user, metric) and a generic one per metric
pooled over all users: a user with fewer than ``min_minutes`` minutes of data in the window is
judged by the generic baseline, and while even that has too few, by the built-in defaults
of :data:`METRICS` (loose on purpose: only far-out values pass them).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

__all__ = [
    "GENERIC",
    "METRICS",
    "PEAK_MARGIN",
    "PEAK_REPEATS",
    "PEAK_SHARE",
    "PRUNE_SECONDS",
    "RECOMPUTE_SHARE",
    "BaselineBook",
    "BaselineStats",
    "Limit",
    "MetricSpec",
    "RollingSeries",
    "mad",
    "median",
    "quantile",
    "recurring_peak",
]

#: the MAD of a normal distribution times this is its standard deviation
MAD_TO_SIGMA: Final = 1.4826
#: the share of minutes whose maxima must reach a level for it to be a usual peak
PEAK_SHARE: Final = 0.02
#: and the fewest minutes that must reach it
PEAK_REPEATS: Final = 2
#: how much higher than the usual peak (above the center) a burst may be (a fraction)
PEAK_MARGIN: Final = 0.25
#: statistics are recomputed once 1/RECOMPUTE_SHARE of the window's minutes changed
RECOMPUTE_SHARE: Final = 120
#: how often series whose window emptied are dropped (seconds)
PRUNE_SECONDS: Final = 3600.0
#: the pseudo-user whose series pool every user's samples (the generic baseline)
GENERIC: Final = "*"


def median(ordered: Sequence[float]) -> float:
    """The median of ``ordered`` (sorted ascending, not empty)."""
    n = len(ordered)
    middle = n // 2
    if n % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2.0


def mad(values: Sequence[float], center: float) -> float:
    """The median absolute deviation of ``values`` (not empty) from ``center``."""
    return median(sorted(abs(value - center) for value in values))


def quantile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1, linear interpolation) of ``ordered`` (sorted, not empty)."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def recurring_peak(ordered: Sequence[float]) -> float:
    """The highest level ``ordered`` (sorted, not empty) reaches in :data:`PEAK_SHARE` of its
    values and in at least :data:`PEAK_REPEATS` of them (the lowest value if it has fewer)."""
    repeats = max(PEAK_REPEATS, math.ceil(PEAK_SHARE * len(ordered)))
    return ordered[max(len(ordered) - repeats, 0)]


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricSpec:
    """One metric the baseline detector watches, its scale floors and built-in defaults."""

    name: str
    #: the unit, for messages
    unit: str
    #: the smallest scale, absolute (in ``unit``)
    floor: float
    #: the smallest scale relative to the center (a fraction)
    floor_relative: float
    #: the built-in generic baseline, used while no data is there
    default_center: float
    default_scale: float


#: the metrics, by name: utilization (%), power (W), PCIe transmit + receive (bytes/s)
METRICS: Final[Mapping[str, MetricSpec]] = {
    "gpu_util": MetricSpec(
        name="gpu_util",
        unit="%",
        floor=2.5,
        floor_relative=0.0,
        default_center=50.0,
        default_scale=10.0,
    ),
    "power_w": MetricSpec(
        name="power_w",
        unit="W",
        floor=10.0,
        floor_relative=0.05,
        default_center=200.0,
        default_scale=75.0,
    ),
    "pcie_bytes": MetricSpec(
        name="pcie_bytes",
        unit="B/s",
        floor=64 * 2**20,
        floor_relative=0.10,
        default_center=4e9,
        default_scale=4e9,
    ),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class BaselineStats:
    """A baseline at one moment (see the module docstring for what each number is)."""

    center: float
    scale: float
    peak: float
    #: samples and minutes it was computed from (0 for the built-in defaults)
    samples: int
    minutes: int

    def limit(self, threshold: float) -> float:
        """The value above which a sample is anomalous."""
        burst = max(self.peak - self.center, 0.0) * (1.0 + PEAK_MARGIN)
        return self.center + max(threshold * self.scale, burst)


class _Minute:
    """The running aggregate of the minute being filled."""

    __slots__ = ("count", "index", "peak", "sum", "sum_squares")

    def __init__(self, index: int, value: float) -> None:
        self.index = index
        self.count = 1
        self.sum = value
        self.sum_squares = value * value
        self.peak = value

    def add(self, value: float) -> None:
        self.count += 1
        self.sum += value
        self.sum_squares += value * value
        if value > self.peak:
            self.peak = value

    def closed(self) -> _Closed:
        """The minute's summary once it is over."""
        mean = self.sum / self.count
        deviation = math.sqrt(max(self.sum_squares / self.count - mean * mean, 0.0))
        return _Closed(self.index, self.count, mean, deviation, self.peak)


class _Closed(NamedTuple):
    """A closed minute: its index, samples, mean, standard deviation and maximum."""

    minute: int
    samples: int
    mean: float
    deviation: float
    peak: float


class RollingSeries:
    """One metric's samples over a rolling window, as per-minute aggregates.

    :meth:`stats` describes the closed minutes of the window (the current one is still
    filling). It is recomputed once the minutes closed or dropped from the window since the
    last time reach ``1 / RECOMPUTE_SHARE`` of the window (at least one): every minute while
    the window is young, every 6 minutes in a full day (a minute closes and one is dropped
    each minute). Sorting the window every few minutes keeps the cost per sample constant.
    """

    __slots__ = (
        "_bucket",
        "_changes",
        "_closed",
        "_closed_samples",
        "_open",
        "_spec",
        "_stats",
        "_window",
    )

    def __init__(self, *, spec: MetricSpec, window_seconds: float, bucket_seconds: float = 60.0):
        """A series of ``spec``'s metric keeping ``window_seconds`` of history."""
        self._spec = spec
        self._bucket = bucket_seconds
        self._window = max(1, math.ceil(window_seconds / bucket_seconds))
        self._closed: deque[_Closed] = deque()
        self._closed_samples = 0
        self._open: _Minute | None = None
        self._stats: BaselineStats | None = None
        #: minutes closed or dropped since :attr:`_stats` was computed
        self._changes = 0

    @property
    def samples(self) -> int:
        """Samples in the window (the current minute's included)."""
        return self._closed_samples + (self._open.count if self._open is not None else 0)

    def add(self, t: float, value: float) -> None:
        """Record ``value`` sampled at ``t`` (a sample from an earlier minute joins the last)."""
        index = int(t // self._bucket)
        current = self._open
        if current is not None and current.index >= index:
            current.add(value)
            return
        if current is not None:
            self._close(current)
        self._open = _Minute(index, value)
        self._expire(index)

    def _close(self, minute: _Minute) -> None:
        self._closed.append(minute.closed())
        self._closed_samples += minute.count
        self._changes += 1
        self._open = None

    def _expire(self, index: int) -> None:
        """Drop the minutes that left the window ending at minute ``index``."""
        closed = self._closed
        oldest = index - self._window
        while closed and closed[0].minute < oldest:
            self._closed_samples -= closed.popleft().samples
            self._changes += 1
        if self._open is not None and self._open.index < oldest:
            self._open = None

    def stats(self, t: float) -> BaselineStats | None:
        """The baseline at ``t`` from the closed minutes; ``None`` while there are none."""
        index = int(t // self._bucket)
        if self._open is not None and self._open.index < index:
            self._close(self._open)
        self._expire(index)
        if not self._closed:
            self._stats = None
        elif self._stats is None or self._changes >= max(1, len(self._closed) // RECOMPUTE_SHARE):
            self._stats = self._compute()
            self._changes = 0
        return self._stats

    def _compute(self) -> BaselineStats:
        closed = self._closed
        means = sorted([minute.mean for minute in closed])
        center = median(means)
        spread = MAD_TO_SIGMA * median(sorted([abs(mean - center) for mean in means]))
        within = median(sorted([minute.deviation for minute in closed]))
        floor = max(self._spec.floor, self._spec.floor_relative * abs(center))
        peak = recurring_peak(sorted([minute.peak for minute in closed]))
        return BaselineStats(
            center=center,
            scale=max(spread, within, floor),
            peak=peak,
            samples=self._closed_samples,
            minutes=len(closed),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Limit:
    """What a sample is compared with, and which baseline gave it."""

    value: float
    source: Literal["user", "generic", "builtin"]
    stats: BaselineStats


class BaselineBook:
    """Every user's baselines and the generic ones, by metric (see the module docstring)."""

    def __init__(
        self,
        *,
        window_hours: float = 24.0,
        min_minutes: int = 120,
        threshold: float = 8.0,
        metrics: Mapping[str, MetricSpec] = METRICS,
    ) -> None:
        """Baselines over ``window_hours``; a user's own once it has ``min_minutes`` of data.

        History is counted in minutes with samples, not in samples: a user on eight GPUs
        has no more history than one on a single GPU for the same time.
        """
        self._window = window_hours * 3600.0
        self._min_minutes = min_minutes
        self._threshold = threshold
        self._metrics = dict(metrics)
        self._series: dict[tuple[str, str], RollingSeries] = {}
        self._next_prune = -math.inf
        self._builtin = {
            name: BaselineStats(
                center=spec.default_center,
                scale=spec.default_scale,
                peak=0.0,
                samples=0,
                minutes=0,
            )
            for name, spec in self._metrics.items()
        }

    @property
    def metrics(self) -> Mapping[str, MetricSpec]:
        """The metrics watched, by name."""
        return self._metrics

    def series(self, user: str, metric: str) -> RollingSeries:
        """The series of ``user`` (or :data:`GENERIC`) for ``metric``, made on first use."""
        key = (user, metric)
        found = self._series.get(key)
        if found is None:
            found = RollingSeries(spec=self._metrics[metric], window_seconds=self._window)
            self._series[key] = found
        return found

    def add(self, user: str, metric: str, t: float, value: float) -> None:
        """Record a sample of ``user``'s ``metric`` (also into the generic baseline)."""
        self.series(user, metric).add(t, value)
        self.series(GENERIC, metric).add(t, value)
        if t >= self._next_prune:
            self.prune(t)

    def prune(self, t: float) -> None:
        """Forget the series with nothing left in their window at ``t`` (users gone)."""
        self._next_prune = t + PRUNE_SECONDS
        for key, series in list(self._series.items()):
            if series.stats(t) is None and series.samples == 0:
                del self._series[key]

    def __len__(self) -> int:
        """How many series are kept."""
        return len(self._series)

    def limit(self, user: str, metric: str, t: float) -> Limit:
        """The limit ``user``'s ``metric`` is held to at ``t``: own, generic or built-in."""
        own = self.series(user, metric).stats(t)
        if own is not None and own.minutes >= self._min_minutes:
            return Limit(value=own.limit(self._threshold), source="user", stats=own)
        generic = self.series(GENERIC, metric).stats(t)
        if generic is not None and generic.minutes >= self._min_minutes:
            return Limit(value=generic.limit(self._threshold), source="generic", stats=generic)
        builtin = self._builtin[metric]
        return Limit(value=builtin.limit(self._threshold), source="builtin", stats=builtin)
