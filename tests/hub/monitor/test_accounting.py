"""GPU accounting: shares of busy devices, energy, memory, stalls, and the persisted totals.

The invariant every trace must keep: the GPU-seconds accounted to users (the unattributed
included) add up to the busy device-seconds of the trace, computed independently here.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

import pytest

from ztlab.common.errors import ConfigError
from ztlab.hub.monitor.accounting import UNATTRIBUTED, Accounting, Usage, utc_day
from ztlab.hub.monitor.findings import AttributedProcess, Holder
from ztlab.hub.monitor.telemetry import DeviceReading, ProcessReading, Reading

GPU0 = "GPU-00000000-0000-0000-0000-000000000000"
GPU1 = "GPU-11111111-1111-1111-1111-111111111111"
MIG = "MIG-22222222-2222-2222-2222-222222222222"
NOBODY = 65534
ROOT = Path(__file__).resolve().parents[3]


def device(uuid: str = GPU0, **values: object) -> DeviceReading:
    return DeviceReading(
        uuid=uuid,
        index=0 if uuid != GPU1 else 1,
        name="NVIDIA H100 80GB HBM3",
        parent=GPU0 if uuid.startswith("MIG-") else None,
        memory_total=80 << 30,
        **values,  # type: ignore[arg-type]
    )


def holder(user: str, server: str = "") -> Holder:
    return Holder(user=user, server=server, kind="server", account=f"ztl-{user}", cgroup="x")


def proc(
    pid: int,
    who: Holder | None,
    uuid: str = GPU0,
    *,
    memory: int | None = None,
    sm: int | None = None,
) -> AttributedProcess:
    reading = ProcessReading(pid=pid, uuid=uuid, used_memory=memory, sm_util=sm)
    return AttributedProcess(reading=reading, facts=None, holder=who, lease=None, pool=None)


def tick(
    acc: Accounting,
    t: float,
    processes: Sequence[AttributedProcess],
    devices: Sequence[DeviceReading] = (),
    interval: float = 1.0,
) -> None:
    devices = tuple(devices) or (device(),)
    reading = Reading(t=t, devices=devices, processes=tuple(p.reading for p in processes))
    acc.add(t, interval, reading, processes)


ALICE, BOB = holder("alice"), holder("bob")


def test_an_exclusive_device_is_its_holders_for_every_busy_second() -> None:
    acc = Accounting()
    for t in range(10):
        tick(acc, 1000.0 + t, [proc(1, ALICE)])
    tick(acc, 1010.0, [])  # idle: nobody's
    assert acc.usage() == {"alice": Usage(gpu_seconds=10.0, samples=10)}
    assert acc.busy_gpu_seconds == 10.0


def test_a_shared_device_is_split_between_holders_not_processes() -> None:
    acc = Accounting()
    tick(acc, 0.0, [proc(1, ALICE), proc(2, ALICE), proc(3, BOB)])
    usage = acc.usage()
    assert usage["alice"].gpu_seconds == pytest.approx(0.5)
    assert usage["bob"].gpu_seconds == pytest.approx(0.5)


def test_sm_utilization_splits_when_every_process_reports_it() -> None:
    acc = Accounting()
    tick(acc, 0.0, [proc(1, ALICE, sm=30), proc(2, BOB, sm=10)])
    assert acc.usage()["alice"].gpu_seconds == pytest.approx(0.75)
    assert acc.usage()["bob"].gpu_seconds == pytest.approx(0.25)
    # one process without a figure, or all at zero: equal shares
    for pair in ([proc(1, ALICE, sm=30), proc(2, BOB)], [proc(1, ALICE, sm=0), proc(2, BOB, sm=0)]):
        acc = Accounting()
        tick(acc, 0.0, pair)
        assert acc.usage()["alice"].gpu_seconds == pytest.approx(0.5)


def test_processes_without_a_holder_are_accounted_as_unattributed() -> None:
    acc = Accounting()
    tick(acc, 0.0, [proc(1, None), proc(2, ALICE)])
    assert acc.usage()[UNATTRIBUTED].gpu_seconds == pytest.approx(0.5)
    assert acc.by_server()[(UNATTRIBUTED, "")].gpu_seconds == pytest.approx(0.5)


def test_a_stall_counts_at_most_five_intervals() -> None:
    acc = Accounting()
    tick(acc, 0.0, [proc(1, ALICE)], interval=2.0)
    tick(acc, 3600.0, [proc(1, ALICE)], interval=2.0)  # an hour later
    assert acc.usage()["alice"].gpu_seconds == pytest.approx(2.0 + 10.0)
    # jitter is counted as it happened, and a clock stepping back counts one interval
    tick(acc, 3602.5, [proc(1, ALICE)], interval=2.0)
    tick(acc, 3000.0, [proc(1, ALICE)], interval=2.0)
    assert acc.usage()["alice"].gpu_seconds == pytest.approx(12.0 + 2.5 + 2.0)


def test_energy_is_the_counter_delta_split_in_the_same_shares() -> None:
    acc = Accounting()
    both = [proc(1, ALICE, sm=75), proc(2, BOB, sm=25)]
    # first reading: no delta yet, so power times the interval (100 W * 1 s)
    tick(acc, 0.0, both, [device(energy_mj=1_000_000, power_w=100.0)])
    tick(acc, 1.0, both, [device(energy_mj=1_400_000, power_w=100.0)])  # 400 J
    assert acc.usage()["alice"].energy_joules == pytest.approx(0.75 * (100 + 400))
    assert acc.usage()["bob"].energy_joules == pytest.approx(0.25 * (100 + 400))
    # a counter that went back (driver reloaded) counts nothing, then counts from there
    tick(acc, 2.0, both, [device(energy_mj=5_000, power_w=100.0)])
    tick(acc, 3.0, both, [device(energy_mj=205_000, power_w=100.0)])
    assert acc.usage()["alice"].energy_joules == pytest.approx(0.75 * (500 + 200))


def test_energy_of_idle_ticks_is_nobodys_and_not_carried_into_a_busy_one() -> None:
    acc = Accounting()
    tick(acc, 0.0, [], [device(energy_mj=0)])
    tick(acc, 1.0, [], [device(energy_mj=900_000)])  # 900 J while idle
    tick(acc, 2.0, [proc(1, ALICE)], [device(energy_mj=1_000_000)])
    assert acc.usage()["alice"].energy_joules == pytest.approx(100.0)


def test_energy_without_a_counter_uses_power_and_mig_devices_without_either_count_none() -> None:
    acc = Accounting()
    tick(acc, 0.0, [proc(1, ALICE)], [device(power_w=250.0)])
    tick(acc, 2.0, [proc(1, ALICE)], [device(power_w=250.0)])
    assert acc.usage()["alice"].energy_joules == pytest.approx(250.0 * 3)
    acc = Accounting()
    tick(acc, 0.0, [proc(1, BOB, MIG)], [device(MIG)])
    assert acc.usage()["bob"] == Usage(gpu_seconds=1.0, samples=1)


def test_energy_over_a_stall_is_cut_to_the_counted_interval() -> None:
    acc = Accounting()
    tick(acc, 0.0, [proc(1, ALICE)], [device(energy_mj=0)])
    tick(acc, 100.0, [proc(1, ALICE)], [device(energy_mj=100_000_000)])  # 1 kW for 100 s
    # 5 of the 100 seconds are counted, and 5/100 of their energy
    assert acc.usage()["alice"].gpu_seconds == pytest.approx(1.0 + 5.0)
    assert acc.usage()["alice"].energy_joules == pytest.approx(5_000.0)


def test_memory_byte_seconds_are_per_process() -> None:
    acc = Accounting()
    tick(acc, 0.0, [proc(1, ALICE, memory=1000), proc(2, ALICE, memory=500), proc(3, BOB)])
    tick(acc, 3.0, [proc(1, ALICE, memory=1000)])
    assert acc.usage()["alice"].memory_byte_seconds == pytest.approx(1500 + 3000)
    assert acc.usage()["bob"].memory_byte_seconds == 0.0


def test_totals_per_user_and_per_server() -> None:
    acc = Accounting()
    tick(
        acc,
        0.0,
        [proc(1, ALICE), proc(2, holder("alice", "big"), GPU1)],
        [device(), device(GPU1)],
    )
    assert acc.usage("alice") == {"alice": Usage(gpu_seconds=2.0, samples=2)}
    assert acc.usage("bob") == {}
    assert acc.by_server() == {
        ("alice", ""): Usage(gpu_seconds=1.0, samples=1),
        ("alice", "big"): Usage(gpu_seconds=1.0, samples=1),
    }


def _busy_seconds(ticks: list[tuple[float, int]], nominal: float) -> float:
    """The busy device-seconds of a trace: per tick, the busy devices times the interval."""
    total, previous = 0.0, None
    for t, busy in ticks:
        span = nominal if previous is None else min(t - previous, 5 * nominal)
        total += busy * span
        previous = t
    return total


@pytest.mark.parametrize("seed", range(5))
def test_attribution_covers_every_gpu_second(seed: int) -> None:
    rng = random.Random(seed)
    people = [holder("alice"), holder("alice", "big"), holder("bob"), holder('c"a\\rol'), None]
    devices = [device(GPU0, energy_mj=0), device(GPU1, power_w=300.0), device(MIG)]
    acc = Accounting()
    t, ticks = 1_700_000_000.0, []
    for _ in range(300):
        t += rng.choice([1.0, 1.0, 1.1, 0.9, 40.0])  # jitter and the odd stall
        processes = [
            proc(
                rng.randrange(1, 10_000),
                rng.choice(people),
                rng.choice([d.uuid for d in devices]),
                memory=rng.choice([None, 1 << 30]),
                sm=rng.choice([None, 0, 5, 50, 100]),
            )
            for _ in range(rng.randrange(0, 6))
        ]
        tick(acc, t, processes, devices)
        ticks.append((t, len({p.reading.uuid for p in processes})))
    busy = _busy_seconds(ticks, 1.0)
    assert busy > 0
    assert acc.busy_gpu_seconds == pytest.approx(busy)
    assert sum(u.gpu_seconds for u in acc.usage().values()) == pytest.approx(busy)
    assert sum(u.gpu_seconds for u in acc.by_server().values()) == pytest.approx(busy)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_totals_survive_a_restart_per_user_server_and_utc_day(tmp_path: Path) -> None:
    path = tmp_path / "state" / "monitor" / "accounting.sqlite"
    acc = Accounting.open(path)
    midnight = 1_700_006_400.0  # 2023-11-15T00:00:00Z
    tick(acc, midnight - 1.0, [proc(1, ALICE, memory=10)])
    tick(acc, midnight, [proc(1, ALICE, memory=10), proc(2, BOB, GPU1)], [device(), device(GPU1)])
    acc.close()
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    again = Accounting.open(path)
    assert again.usage() == {
        "alice": Usage(gpu_seconds=2.0, memory_byte_seconds=20.0, samples=2),
        "bob": Usage(gpu_seconds=1.0, samples=1),
    }
    assert again.busy_gpu_seconds == pytest.approx(3.0)
    assert [(d.user, d.day, d.usage.gpu_seconds) for d in again.days()] == [
        ("alice", "2023-11-14", 1.0),
        ("alice", "2023-11-15", 1.0),
        ("bob", "2023-11-15", 1.0),
    ]
    assert [d.day for d in again.days(user="bob")] == [utc_day(midnight)]
    # it goes on from the stored totals
    tick(again, midnight + 1.0, [proc(2, BOB, GPU1)], [device(), device(GPU1)])
    again.close()
    assert Accounting.open(path).usage("bob")["bob"].gpu_seconds == pytest.approx(2.0)


def test_ticks_are_written_every_flush_interval_not_every_tick(tmp_path: Path) -> None:
    path = tmp_path / "accounting.sqlite"
    clock = Clock()
    acc = Accounting.open(path, flush_interval=10.0, clock=clock)

    def stored() -> float:
        with closing(sqlite3.connect(path)) as db:
            row = db.execute("SELECT COALESCE(SUM(gpu_seconds), 0) FROM gpu_usage").fetchone()
        return float(row[0])

    for second in range(25):
        clock.now = float(second)
        tick(acc, 1000.0 + second, [proc(1, ALICE)])
    assert stored() == 21.0  # flushed at 10 s (11 ticks) and 20 s (21 ticks)
    acc.flush()
    assert stored() == 25.0


def test_a_kill_loses_at_most_the_last_flush_interval(tmp_path: Path) -> None:
    path = tmp_path / "accounting.sqlite"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from tests.hub.monitor.test_accounting import ALICE, Clock, proc, tick
        from ztlab.hub.monitor.accounting import Accounting
        clock = Clock()
        acc = Accounting.open(Path({str(path)!r}), flush_interval=10.0, clock=clock)
        for second in range(35):
            clock.now = float(second)
            tick(acc, 1000.0 + second, [proc(1, ALICE)])
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, check=False, cwd=ROOT
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    survived = Accounting.open(path).usage()["alice"].gpu_seconds
    assert 35.0 - 10.0 <= survived < 35.0
    assert survived == 31.0  # the flush at 30 s


def test_a_loose_database_is_narrowed(tmp_path: Path) -> None:
    folder = tmp_path / "monitor"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    path = folder / "accounting.sqlite"
    Accounting.open(path).close()
    path.chmod(0o644)
    Accounting.open(path).close()
    assert mode(path) == 0o600
    assert mode(folder) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="hands the database to another user; needs root")
def test_a_database_another_user_owns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "monitor" / "accounting.sqlite"
    Accounting.open(path).close()
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"owned by uid {NOBODY}"):
        Accounting.open(path)


def test_a_file_that_is_not_a_database_is_refused_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "accounting.sqlite"
    path.write_bytes(b"not a database, just text " * 100)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=f"{path}: cannot open the GPU accounting database"):
        Accounting.open(path)
