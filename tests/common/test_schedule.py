"""Schedules: cron expressions in a time zone, parameters, and every field's checks."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from ztlab.common.schedule import ScheduleError, ScheduleSpec, fire_times


def _at(text: str, zone: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()


def _utc(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M")


def test_a_daily_schedule_fires_once_a_day_at_its_local_time() -> None:
    times = fire_times(
        "0 2 * * *", "Europe/Berlin", _at("2026-01-10 00:00"), _at("2026-01-13 00:00")
    )
    assert [_utc(t) for t in times] == ["2026-01-10 01:00", "2026-01-11 01:00", "2026-01-12 01:00"]


def test_a_time_the_spring_change_skips_fires_once_right_after_the_gap() -> None:
    # 2026-03-29: clocks in Berlin jump from 02:00 to 03:00; 02:30 does not exist that day
    times = fire_times(
        "30 2 * * *", "Europe/Berlin", _at("2026-03-28 00:00"), _at("2026-03-31 00:00")
    )
    local = [
        datetime.fromtimestamp(t, ZoneInfo("Europe/Berlin")).strftime("%d %H:%M") for t in times
    ]
    assert local == ["28 02:30", "29 03:00", "30 02:30"]


def test_a_time_that_happens_twice_on_the_autumn_change_fires_once() -> None:
    # 2026-10-25: 02:00-03:00 happens twice in Berlin
    times = fire_times(
        "30 2 * * *", "Europe/Berlin", _at("2026-10-24 12:00"), _at("2026-10-26 12:00")
    )
    days = [datetime.fromtimestamp(t, ZoneInfo("Europe/Berlin")).day for t in times]
    assert days == [25, 26]


def test_fire_times_are_strictly_after_the_start_and_up_to_the_end() -> None:
    start = _at("2026-01-01 00:00")
    times = fire_times("*/15 * * * *", "UTC", start, start + 3600)
    assert [t - start for t in times] == [900, 1800, 2700, 3600]


def test_a_sixth_field_gives_seconds() -> None:
    start = _at("2026-01-01 00:00")
    assert [t - start for t in fire_times("* * * * * */20", "UTC", start, start + 60)] == [
        20,
        40,
        60,
    ]


def test_a_spec_round_trips_and_backs_off_exponentially() -> None:
    spec = ScheduleSpec.parse(
        {
            "name": "nightly",
            "cron": "0  2 * *   *",
            "timezone": "America/New_York",
            "parameters": {"epochs": 3, "rate": 0.1, "tags": ["a"], "opts": {"x": True}},
            "retries": 2,
            "retry_backoff_seconds": 30,
            "concurrency": "queue",
            "missed": "all",
        }
    )
    assert spec.cron == "0 2 * * *"
    assert ScheduleSpec.parse(spec.to_json()) == spec
    assert [spec.backoff(a) for a in (2, 3, 4)] == [30.0, 60.0, 120.0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cron": "0 2 * *"}, "five-field"),
        ({"cron": "0 2 * * * * *"}, "five-field"),
        ({"cron": "61 2 * * *"}, "not a valid cron"),
        ({"timezone": "Mars/Olympus"}, "not a time zone"),
        ({"name": "Nightly Run"}, "not a schedule name"),
        ({"parameters": {"1bad": 1}}, "not a parameter name"),
        ({"parameters": {"x": object()}}, "not a string, number"),
        ({"retries": -1}, "schedule.retries"),
        ({"retries": True}, "schedule.retries"),
        ({"gpus": 65}, "schedule.gpus"),
        ({"concurrency": "parallel"}, "schedule.concurrency"),
        ({"missed": "some"}, "schedule.missed"),
        ({"surprise": 1}, "unknown key"),
    ],
)
def test_every_bad_field_is_refused_naming_it(change: dict[str, object], message: str) -> None:
    data: dict[str, object] = {"name": "nightly", "cron": "0 2 * * *", **change}
    with pytest.raises(ScheduleError) as raised:
        ScheduleSpec.parse(data)
    assert message in raised.value.message
