"""Rolling robust baselines: the statistics, the per-minute window, the generic fallbacks."""

from __future__ import annotations

import random

import pytest

from ztlab.hub.monitor import baseline as baseline_module
from ztlab.hub.monitor.baseline import (
    GENERIC,
    MAD_TO_SIGMA,
    METRICS,
    PEAK_MARGIN,
    BaselineBook,
    MetricSpec,
    RollingSeries,
    mad,
    median,
    quantile,
    recurring_peak,
)

START = 1_767_225_600.0  # a minute boundary
SPEC = MetricSpec(
    name="power_w", unit="W", floor=1.0, floor_relative=0.0, default_center=0, default_scale=1
)


def fill(
    series: RollingSeries, values_per_minute: list[list[float]], start: float = START
) -> float:
    """Feed one list of samples per minute (1 Hz); return the time after the last minute."""
    for minute, values in enumerate(values_per_minute):
        for second, value in enumerate(values):
            series.add(start + minute * 60 + second, value)
    return start + len(values_per_minute) * 60


def test_median_mad_quantile() -> None:
    assert median([1.0, 2.0, 9.0]) == 2.0
    assert median([1.0, 2.0, 4.0, 9.0]) == 3.0
    assert mad([1.0, 2.0, 3.0, 4.0, 100.0], 3.0) == 1.0  # the outlier does not move it
    assert quantile([0.0, 10.0], 0.5) == 5.0
    assert quantile([1.0, 2.0, 3.0], 1.0) == 3.0
    assert quantile([7.0], 0.3) == 7.0


def test_recurring_peak_ignores_one_off_maxima() -> None:
    ordered = sorted([1.0] * 98 + [50.0])
    assert recurring_peak(ordered) == 1.0  # reached once: not a usual peak
    ordered = sorted([1.0] * 97 + [50.0, 60.0])
    assert recurring_peak(ordered) == 50.0  # reached in two minutes: usual
    many = sorted([1.0] * 1000 + [40.0] * 10)
    assert recurring_peak(many) == 1.0  # 10 of 1010 minutes is under 2 %
    many = sorted([1.0] * 1000 + [40.0] * 30)
    assert recurring_peak(many) == 40.0
    assert recurring_peak([3.0]) == 3.0


def test_series_has_no_stats_before_a_minute_closes() -> None:
    series = RollingSeries(spec=SPEC, window_seconds=3600)
    for second in range(59):
        series.add(START + second, 100.0)
    assert series.stats(START + 59) is None
    assert series.samples == 59
    stats = series.stats(START + 60)
    assert stats is not None
    assert stats.center == 100.0
    assert stats.samples == 59
    assert stats.minutes == 1


def test_series_center_and_scale_are_robust() -> None:
    series = RollingSeries(spec=SPEC, window_seconds=3600)
    rng = random.Random(3)
    minutes = [[200.0 + rng.gauss(0, 5) for _ in range(60)] for _ in range(30)]
    minutes[10] = [5000.0] * 60  # one wild minute
    end = fill(series, minutes)
    stats = series.stats(end)
    assert stats is not None
    assert 197 < stats.center < 203
    # the within-minute spread (about 5) dominates the spread of the minute means
    assert 4 < stats.scale < 6
    assert stats.peak < 230  # the wild minute is a one-off
    assert stats.limit(8.0) == pytest.approx(stats.center + 8.0 * stats.scale)


def test_scale_floor_keeps_a_flat_baseline_from_flagging_wiggles() -> None:
    spec = MetricSpec(
        name="x", unit="", floor=2.0, floor_relative=0.10, default_center=0, default_scale=1
    )
    series = RollingSeries(spec=spec, window_seconds=3600)
    end = fill(series, [[50.0] * 60 for _ in range(20)])
    stats = series.stats(end)
    assert stats is not None
    assert stats.scale == 5.0  # 10 % of the center beats the absolute floor of 2
    assert stats.limit(8.0) == 90.0
    series = RollingSeries(spec=spec, window_seconds=3600)
    end = fill(series, [[1.0] * 60 for _ in range(20)])
    stats = series.stats(end)
    assert stats is not None
    assert stats.scale == 2.0


def test_recurring_bursts_raise_the_limit_one_off_bursts_do_not() -> None:
    def minutes(bursts: list[int]) -> list[list[float]]:
        values = [[100.0] * 60 for _ in range(60)]
        for minute in bursts:
            values[minute][10:15] = [1000.0] * 5
        return values

    series = RollingSeries(spec=SPEC, window_seconds=7200)
    end = fill(series, minutes([30]))
    one_off = series.stats(end)
    assert one_off is not None
    assert one_off.limit(8.0) < 200
    series = RollingSeries(spec=SPEC, window_seconds=7200)
    end = fill(series, minutes([0, 30]))
    recurring = series.stats(end)
    assert recurring is not None
    assert recurring.limit(8.0) == pytest.approx(100.0 + 900.0 * (1 + PEAK_MARGIN))


def test_window_expiry_forgets_old_minutes() -> None:
    series = RollingSeries(spec=SPEC, window_seconds=600)  # 10 minutes
    end = fill(series, [[500.0] * 60 for _ in range(10)])
    old = series.stats(end)
    assert old is not None
    assert old.center == 500.0
    end = fill(series, [[100.0] * 60 for _ in range(10)], start=end)
    new = series.stats(end)
    assert new is not None
    assert new.center == 100.0
    assert new.minutes == 10
    assert series.samples <= 11 * 60
    # with no new samples, the window empties as time passes
    later = end + 3600
    assert series.stats(later) is None
    assert series.samples == 0


def test_stats_are_recomputed_rarely_in_a_full_window(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    compute = RollingSeries._compute

    def counting(self: RollingSeries) -> object:
        calls.append(1)
        return compute(self)

    monkeypatch.setattr(RollingSeries, "_compute", counting)
    series = RollingSeries(spec=SPEC, window_seconds=24 * 3600)
    day = 24 * 3600
    for second in range(2 * day):  # two days at 1 Hz, asked every second
        series.add(START + second, float(second % 7))
        series.stats(START + second)
        if second == 120 * 60:
            assert len(calls) == 120  # every minute while the window is young
        if second == day:
            first_day = len(calls)
    second_day = len(calls) - first_day
    # a full window: a minute closes and one leaves each minute, recomputed every 6 minutes
    assert 1440 // 6 - 2 <= second_day <= 1440 // 6 + 2
    # the same minute gives the same object: nothing was sorted again
    assert series.stats(START + 2 * day - 1) is series.stats(START + 2 * day - 2)
    assert series.samples == day + 60  # 1440 closed minutes and the current one


def test_late_stats_call_sees_every_closed_minute() -> None:
    series = RollingSeries(spec=SPEC, window_seconds=3600)
    fill(series, [[10.0] * 60, [30.0] * 60])
    stats = series.stats(START + 60 * 10)
    assert stats is not None
    assert stats.minutes == 2
    assert stats.center == 20.0


def test_book_uses_builtin_then_generic_then_own_baseline() -> None:
    book = BaselineBook(window_hours=24, min_minutes=10, threshold=8.0)
    builtin = book.limit("alice", "power_w", START)
    assert builtin.source == "builtin"
    spec = METRICS["power_w"]
    assert builtin.value == spec.default_center + 8.0 * spec.default_scale
    # bob's ten minutes build a generic baseline
    for second in range(601):
        book.add("bob", "power_w", START + second, 300.0)
    for_new_user = book.limit("carol", "power_w", START + 660)
    assert for_new_user.source == "generic"
    assert for_new_user.stats.center == 300.0
    # carol's own, once she has enough samples
    for second in range(660, 660 + 700):
        book.add("carol", "power_w", START + second, 100.0)
    own = book.limit("carol", "power_w", START + 660 + 720)
    assert own.source == "user"
    assert own.stats.center == 100.0
    assert own.value < for_new_user.value
    generic = book.series(GENERIC, "power_w").stats(START + 660 + 720)
    assert generic is not None
    assert generic.samples == 601 + 700


def test_series_of_users_gone_for_a_window_are_dropped() -> None:
    book = BaselineBook(window_hours=1, min_minutes=10)
    for second in range(600):
        book.add("alice", "power_w", START + second, 100.0)
    assert len(book) == 2  # alice's and the generic one
    for second in range(3 * 3600, 3 * 3600 + 120):
        book.add("bob", "power_w", START + second, 100.0)
    assert len(book) == 2  # bob's and the generic one: alice's window is empty
    assert book.limit("alice", "power_w", START + 3 * 3600 + 120).source == "builtin"


def test_builtin_defaults_do_not_flag_a_full_training() -> None:
    book = BaselineBook()
    assert book.limit("new", "gpu_util", START).value > 100
    assert book.limit("new", "power_w", START).value > 700  # an H100 at full power
    assert book.limit("new", "pcie_bytes", START).value > 25e9  # a checkpoint write


def test_robust_scale_constant() -> None:
    rng = random.Random(5)
    values = [rng.gauss(0.0, 10.0) for _ in range(20000)]
    center = median(sorted(values))
    assert MAD_TO_SIGMA * mad(values, center) == pytest.approx(10.0, rel=0.05)


def test_module_names_are_exported() -> None:
    for name in baseline_module.__all__:
        assert hasattr(baseline_module, name)
