"""The run database: fires made exactly once, missed-run and concurrency policies, claims."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest

from ztlab.common.schedule import ScheduleSpec
from ztlab.hub.runs.store import RunStore, RunStoreError

T0 = 1_780_000_000.0  # a Tuesday, 2026-05-26 20:26:40 UTC


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _store(tmp_path: Path, clock: Clock) -> RunStore:
    return RunStore(tmp_path / "runs" / "runs.sqlite", clock=clock)


def _spec(**fields: object) -> ScheduleSpec:
    return ScheduleSpec.parse({"name": "every-minute", "cron": "* * * * *", **fields})


def _add(store: RunStore, spec: ScheduleSpec, owner: str = "alice") -> None:
    store.add_schedule(
        owner, spec, notebook_name="train.ipynb", notebook_sha256="a" * 64, source="api",
        created_by=owner,
    )  # fmt: skip


def test_the_database_is_private(tmp_path: Path) -> None:
    store = _store(tmp_path, Clock())
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700


def test_a_schedule_fires_each_minute_once(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    _add(store, _spec(concurrency="queue"))
    assert store.fire_due(clock.now, on_time_seconds=300) == []
    clock.now += 61
    first = store.fire_due(clock.now, on_time_seconds=300)
    assert [r.status for r in first] == ["queued"]
    assert store.fire_due(clock.now, on_time_seconds=300) == []  # the same moment: nothing
    clock.now += 60
    second = store.fire_due(clock.now, on_time_seconds=300)
    assert len(second) == 1
    assert second[0].scheduled_for != first[0].scheduled_for


def test_two_schedulers_on_one_file_never_make_the_same_fire_twice(tmp_path: Path) -> None:
    clock = Clock()
    stores = [_store(tmp_path, clock) for _ in range(2)]
    _add(stores[0], _spec(concurrency="queue"))
    clock.now += 600
    made: list[str] = []
    barrier = threading.Barrier(2)

    def fire(store: RunStore) -> None:
        barrier.wait()
        made.extend(r.id for r in store.fire_due(clock.now, on_time_seconds=86_400))

    threads = [threading.Thread(target=fire, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    runs = stores[0].runs()
    assert len(made) == len(runs) == 10  # ten minutes, each fired by exactly one of them
    assert len({r.scheduled_for for r in runs}) == 10


@pytest.mark.parametrize("missed", ["latest", "all", "skip"])
def test_fires_missed_while_down_follow_the_missed_policy(tmp_path: Path, missed: str) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    _add(store, _spec(missed=missed, concurrency="queue"))
    clock.now += 3600 + 600  # seventy minutes of fires; only the last five are on time
    made = store.fire_due(clock.now, on_time_seconds=300)
    assert len(made) == 70
    on_time = [r for r in made if (r.scheduled_for or 0) > clock.now - 300]
    late = [r for r in made if (r.scheduled_for or 0) <= clock.now - 300]
    assert len(on_time) == 5
    assert all(r.status == "queued" for r in on_time)  # on time: queued whatever the policy
    expected = "queued" if missed == "all" else "missed"  # latest: the on-time ones suffice
    assert {r.status for r in late} == {expected}
    assert all("missed policy" in r.message for r in made if r.status == "missed")


def test_a_missed_fire_with_latest_runs_the_last_one_when_none_is_on_time(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    _add(store, _spec(cron="0 * * * *", missed="latest"))
    clock.now += 5 * 3600 + 1000  # five hourly fires missed, none within 300 s of now
    made = store.fire_due(clock.now, on_time_seconds=300)
    assert [r.status for r in made] == ["missed"] * 4 + ["queued"]
    assert made[-1].scheduled_for == max(r.scheduled_for or 0 for r in made)


def test_skip_concurrency_records_a_fire_while_the_previous_run_is_active(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    _add(store, _spec(concurrency="skip"))
    clock.now += 61
    (first,) = store.fire_due(clock.now, on_time_seconds=300)
    assert store.claim(first.id) is not None
    clock.now += 60
    (second,) = store.fire_due(clock.now, on_time_seconds=300)
    assert second.status == "skipped"
    assert first.id in second.message


def test_queue_concurrency_waits_for_the_previous_run(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    _add(store, _spec(concurrency="queue"))
    clock.now += 61
    (first,) = store.fire_due(clock.now, on_time_seconds=300)
    assert [r.id for r in store.claimable(clock.now)] == [first.id]
    assert store.claim(first.id) is not None
    clock.now += 60
    (second,) = store.fire_due(clock.now, on_time_seconds=300)
    assert second.status == "queued"
    assert store.claimable(clock.now) == []  # the first still runs
    store.update(first.id, expect=("starting",), status="succeeded")
    assert [r.id for r in store.claimable(clock.now)] == [second.id]


def test_a_run_is_claimed_once(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    run = store.submit(
        owner="alice", actor="alice", notebook_name="n.ipynb", notebook_sha256="b" * 64,
        parameters={"x": 1}, pool=None, gpus=0,
    )  # fmt: skip
    assert store.claim(run.id) is not None
    assert store.claim(run.id) is None
    assert store.update(run.id, expect=("queued",), status="cancelled") is None  # not queued


def test_a_retry_is_a_new_attempt_of_the_same_fire_after_its_backoff(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    _add(store, _spec(retries=2))
    clock.now += 61
    (run,) = store.fire_due(clock.now, on_time_seconds=300)
    store.claim(run.id)
    failed = store.update(run.id, expect=("starting",), status="failed", message="cell 2")
    assert failed is not None
    assert failed.finished_at == clock.now
    retry = store.retry(failed, delay=30)
    assert (retry.attempt, retry.scheduled_for, retry.status) == (2, run.scheduled_for, "queued")
    assert store.claimable(clock.now) == []
    clock.now += 30
    assert [r.id for r in store.claimable(clock.now)] == [retry.id]


def test_runs_left_active_by_a_dead_scheduler_are_found_by_the_next(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    run = store.submit(
        owner="alice", actor="alice", notebook_name="n.ipynb", notebook_sha256="b" * 64,
        parameters={}, pool=None, gpus=0,
    )  # fmt: skip
    store.claim(run.id)
    store.update(run.id, expect=("starting",), status="running")
    store.close()
    again = _store(tmp_path, clock)
    assert [r.id for r in again.left_active()] == [run.id]


def test_pausing_skips_fires_and_resuming_starts_from_now(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    _add(store, _spec())
    record = store.schedule("alice", "every-minute")
    assert record is not None
    store.set_paused(record, True)
    clock.now += 3600
    assert store.fire_due(clock.now, on_time_seconds=300) == []
    store.set_paused(record, False)
    assert store.fire_due(clock.now, on_time_seconds=300) == []
    clock.now += 60
    assert len(store.fire_due(clock.now, on_time_seconds=300)) == 1


def test_a_duplicate_schedule_name_is_refused_and_removal_cancels_queued_runs(
    tmp_path: Path,
) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    _add(store, _spec(concurrency="queue"))
    with pytest.raises(RunStoreError, match="already"):
        _add(store, _spec())
    _add(store, _spec(), owner="bob")  # names are per owner
    clock.now += 61
    store.fire_due(clock.now, on_time_seconds=300)
    record = store.schedule("alice", "every-minute")
    assert record is not None
    cancelled = store.remove_schedule(record)
    assert len(cancelled) == 1
    run = store.get(cancelled[0])
    assert run is not None
    assert run.status == "cancelled"
    assert store.schedule("alice", "every-minute") is None
