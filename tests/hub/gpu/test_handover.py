"""Lease hand-over checks: a GPU whose lease ended is leased again only once it is clean.

On real SQLite files: checks off change nothing; checks on keep a released (or expired)
GPU out of every grant until the monitor clears it; a failed check holds it back; the table
survives restarts, is shared by brokers on the same file, and is added to version-1
databases when they are opened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hub.gpu.test_leases import (
    HOUR,
    START,
    Clock,
    FailingSink,
    ListSink,
    grant,
    make_config,
    open_broker,
)
from ztlab.hub.gpu import (
    Handover,
    HandoverNotFound,
    Lease,
    LeaseBroker,
    LeaseDenied,
    LeaseStore,
    PoolExhausted,
    QuotaExceeded,
)
from ztlab.hub.policy import PolicyEngine

MONITOR = "ztlab-hub"
CLEAN = "no process of the old holder on the GPU"
STILL_THERE = "processes of alice's server still run: pid 4242 (python)"


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine.defaults()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sink() -> ListSink:
    return ListSink()


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "gpu" / "leases.sqlite3"


@pytest.fixture
def broker(
    store_path: Path, engine: PolicyEngine, clock: Clock, sink: ListSink
) -> Iterator[LeaseBroker]:
    with open_broker(store_path, engine, clock=clock, sink=sink) as b:
        b.require_handover_checks(True)
        yield b


def exhausted(broker: LeaseBroker, user: str, **kw: Any) -> PoolExhausted:
    with pytest.raises(PoolExhausted) as caught:
        grant(broker, user, **kw)
    return caught.value


def waiting_text(lease: Lease) -> str:
    return (
        f"lease {lease.id} of {lease.user}'s server {lease.server!r} ended; waiting for the GPU "
        "monitor to confirm that none of its processes remain"
    )


# --- checks off: nothing changes ---------------------------------------------------------------


def test_without_checks_a_released_gpu_is_free_at_once(
    store_path: Path, engine: PolicyEngine, sink: ListSink
) -> None:
    with open_broker(store_path, engine, sink=sink) as broker:
        assert broker.handover_checks is False
        lease = grant(broker, "alice")
        broker.release(lease.id, reason="server stopped")
        assert broker.pending_handovers() == []
        assert broker.free("research") == ["0", "1"]
        assert grant(broker, "bob").gpus == ("0",)
        assert not any(a.startswith("gpu.handover.") for a in sink.actions())


def test_turning_checks_off_applies_to_leases_ending_later(broker: LeaseBroker) -> None:
    first = grant(broker, "alice")
    broker.release(first.id, reason="stopped")
    broker.require_handover_checks(False)
    assert broker.handover_checks is False
    second = grant(broker, "bob")
    broker.release(second.id, reason="stopped")
    # bob's GPU is free; alice's still waits: turning checks off frees nothing
    assert [h.gpu for h in broker.pending_handovers()] == ["0"]
    assert broker.free("research") == ["1"]


# --- checks on: released GPUs wait for the monitor ---------------------------------------------


def test_a_released_gpu_is_not_leased_until_the_monitor_clears_it(
    broker: LeaseBroker, clock: Clock, sink: ListSink
) -> None:
    alice = grant(broker, "alice", hours=5)
    clock.advance(1)
    broker.release(alice.id, reason="server stopped")
    [handover] = broker.pending_handovers()
    assert handover == Handover(
        gpu="0",
        lease=alice.id,
        user="alice",
        server="alice",
        pool="research",
        since=START + HOUR,
        state="checking",
        reason=waiting_text(alice),
    )
    assert broker.free("research") == ["1"]
    bob = grant(broker, "bob", hours=3)
    assert bob.gpus == ("1",), "the GPU in hand-over is skipped"
    refused = exhausted(broker, "carol")
    assert refused.message == (
        "pool research cannot lease 1 GPU now; free in pool research: 0 of 2 GPUs; "
        "1 GPU of pool research is waiting for its hand-over check; "
        "next lease there expires at 16:05 UTC"
    )
    assert refused.hint is not None
    assert "hand-over check passes" in refused.hint

    clock.advance(0.5)
    broker.clear_handover("0", actor=MONITOR, ecc_mode=True, checked=CLEAN, lease=alice.id)
    assert broker.pending_handovers() == []
    assert broker.free("research") == ["0"]
    assert grant(broker, "carol").gpus == ("0",)
    cleared = sink.records[-2]
    assert cleared == {
        "actor": MONITOR,
        "action": "gpu.handover.cleared",
        "detail": {
            "gpu": "0",
            "lease": alice.id,
            "user": "alice",
            "server": "alice",
            "pool": "research",
            "state": "checking",
            "since": "2026-11-26T13:05:00Z",
            "waited_seconds": 1800.0,
            "ecc_mode": True,
            "checked": CLEAN,
        },
    }
    assert sink.actions() == [
        "gpu.lease.granted",
        "gpu.lease.released",
        "gpu.lease.granted",
        "gpu.handover.cleared",
        "gpu.lease.granted",
    ]


def test_the_same_user_asking_again_is_checked_too(store_path: Path, engine: PolicyEngine) -> None:
    config = make_config({"solo": {"gpus": ["0"], "roles": ["trainer"]}})
    with open_broker(store_path, engine, config=config) as broker:
        broker.require_handover_checks(True)
        lease = grant(broker, "alice", pool="solo")
        broker.release(lease.id, reason="restart")
        refused = exhausted(broker, "alice", pool="solo")
        assert "1 GPU of pool solo is waiting for its hand-over check" in refused.message
        broker.clear_handover("0", actor=MONITOR, ecc_mode=None, checked=CLEAN)
        assert grant(broker, "alice", pool="solo").gpus == ("0",)


def test_release_server_and_expire_put_every_gpu_of_the_lease_into_checking(
    store_path: Path, engine: PolicyEngine, clock: Clock
) -> None:
    config = make_config(
        {"research": {"gpus": ["0", "1", "2", "3"], "roles": ["trainer"]}},
        roles={"trainer": {"max_gpus": 2}},
    )
    with open_broker(store_path, engine, config=config, clock=clock) as broker:
        broker.require_handover_checks(True)
        both = grant(broker, "alice", count=2)
        short = grant(broker, "bob", count=2, hours=1)
        broker.release_server(user="alice", server="alice", reason="culled")
        assert broker.free("research") == []
        clock.advance(1)
        [expired] = broker.expire()
        assert expired.id == short.id
        pending = broker.pending_handovers()
        assert [(h.gpu, h.lease, h.state) for h in pending] == [
            ("0", both.id, "checking"),
            ("1", both.id, "checking"),
            ("2", short.id, "checking"),
            ("3", short.id, "checking"),
        ]
        assert pending[2].since == START + HOUR
        refused = exhausted(broker, "carol")
        assert "4 GPUs of pool research are waiting for their hand-over check" in refused.message
        assert broker.active() == []


# --- failed checks ---------------------------------------------------------------------------


def test_a_gpu_that_fails_its_check_stays_held_back(
    broker: LeaseBroker, clock: Clock, sink: ListSink
) -> None:
    alice = grant(broker, "alice")
    grant(broker, "bob")
    broker.release(alice.id, reason="server stopped")
    for tick in range(3):  # the monitor finds alice's process on every tick
        clock.advance(0.01)
        held = broker.hold_handover("0", reason=STILL_THERE, actor=MONITOR, lease=alice.id)
        assert (held.state, held.reason) == ("held", STILL_THERE), tick
    assert broker.pending_handovers() == [held]
    assert sink.actions().count("gpu.handover.held") == 1, "audited once, not every tick"
    record = sink.records[-1]
    assert record["actor"] == MONITOR
    assert record["detail"]["state"] == "checking"
    assert record["detail"]["reason"] == STILL_THERE
    assert record["detail"]["waited_seconds"] == pytest.approx(36.0)

    # the next user is told, without alice's processes
    refused = exhausted(broker, "carol")
    assert refused.message == (
        "pool research cannot lease 1 GPU now; free in pool research: 0 of 2 GPUs; "
        "1 GPU of pool research is held back: the hand-over check found processes of the "
        "previous holder (it returns once they are gone, or when an administrator releases "
        "it); "
        "next lease there expires at 2026-11-27 12:05 UTC"
    )
    assert "4242" not in refused.message
    assert "alice" not in refused.message
    # a later reason replaces the stored one, still without a second record
    again = broker.hold_handover("0", reason="pid 4243 (python)", actor=MONITOR)
    assert again.reason == "pid 4243 (python)"
    assert sink.actions().count("gpu.handover.held") == 1

    # once the process is gone, a passing check clears it
    broker.clear_handover("0", actor=MONITOR, ecc_mode=False, checked=CLEAN, lease=alice.id)
    assert sink.records[-1]["detail"]["state"] == "held"
    assert grant(broker, "carol").gpus == ("0",)


def test_an_administrator_may_release_a_hold(broker: LeaseBroker, sink: ListSink) -> None:
    alice = grant(broker, "alice")
    broker.release(alice.id, reason="server stopped")
    broker.hold_handover("0", reason=STILL_THERE, actor=MONITOR)
    released = broker.release_hold("0", actor="root-admin")
    assert (released.gpu, released.state, released.lease) == ("0", "held", alice.id)
    assert broker.pending_handovers() == []
    assert broker.free("research") == ["0", "1"]
    record = sink.records[-1]
    assert record["actor"] == "root-admin"
    assert record["action"] == "gpu.handover.released_by_admin"
    assert record["detail"]["reason"] == STILL_THERE
    assert record["detail"]["state"] == "held"
    with pytest.raises(HandoverNotFound, match="GPU '0' is not waiting for a hand-over check"):
        broker.release_hold("0", actor="root-admin")


def test_a_check_for_one_lease_never_clears_the_next(broker: LeaseBroker, sink: ListSink) -> None:
    alice = grant(broker, "alice", count=1)
    broker.release(alice.id, reason="stopped")
    broker.release_hold("0", actor="root-admin")
    mallory = grant(broker, "mallory")
    assert mallory.gpus == ("0",)
    broker.release(mallory.id, reason="stopped")
    # a check that was made for alice's lease comes in late
    with pytest.raises(HandoverNotFound, match=f"of lease {mallory.id}, not of lease {alice.id}"):
        broker.clear_handover("0", actor=MONITOR, ecc_mode=True, checked=CLEAN, lease=alice.id)
    with pytest.raises(HandoverNotFound):
        broker.hold_handover("0", reason="x", actor=MONITOR, lease=alice.id)
    assert [(h.gpu, h.lease, h.state) for h in broker.pending_handovers()] == [
        ("0", mallory.id, "checking")
    ]
    with pytest.raises(HandoverNotFound, match="GPU '1' is not waiting"):
        broker.clear_handover("1", actor=MONITOR, ecc_mode=True, checked=CLEAN)
    assert "gpu.handover.cleared" not in sink.actions()


def test_an_audit_failure_leaves_the_hand_over_as_it_was(
    store_path: Path, engine: PolicyEngine
) -> None:
    with open_broker(store_path, engine) as setup:
        setup.require_handover_checks(True)
        lease = grant(setup, "alice")
        setup.release(lease.id, reason="stopped")
    with open_broker(store_path, engine, sink=FailingSink()) as broker:
        for attempt in (
            lambda: broker.clear_handover("0", actor=MONITOR, ecc_mode=True, checked=CLEAN),
            lambda: broker.hold_handover("0", reason=STILL_THERE, actor=MONITOR),
            lambda: broker.release_hold("0", actor="root-admin"),
        ):
            with pytest.raises(RuntimeError, match="audit log is gone"):
                attempt()
        [handover] = broker.pending_handovers()
        assert handover.state == "checking"
        assert broker.free("research") == ["1"]


def test_a_release_whose_audit_fails_starts_no_hand_over(
    store_path: Path, engine: PolicyEngine
) -> None:
    with open_broker(store_path, engine) as setup:
        lease = grant(setup, "alice")
    with open_broker(store_path, engine, sink=FailingSink()) as broker:
        broker.require_handover_checks(True)
        with pytest.raises(RuntimeError):
            broker.release(lease.id, reason="stopped")
        assert broker.active() == [lease]
        assert broker.pending_handovers() == []


# --- restarts and several brokers --------------------------------------------------------------


def test_a_restart_keeps_pending_hand_overs(store_path: Path, engine: PolicyEngine) -> None:
    with open_broker(store_path, engine) as first:
        first.require_handover_checks(True)
        alice = grant(first, "alice")
        bob = grant(first, "bob")
        first.release(alice.id, reason="stopped")
        first.release(bob.id, reason="stopped")
        first.hold_handover("1", reason=STILL_THERE, actor=MONITOR)
        before = first.pending_handovers()
    # reopened without checks (no monitor yet): what waits keeps waiting
    with open_broker(store_path, engine) as second:
        assert second.pending_handovers() == before
        assert [h.state for h in before] == ["checking", "held"]
        assert second.free("research") == []
        exhausted(second, "carol")
        second.clear_handover("0", actor=MONITOR, ecc_mode=True, checked=CLEAN, lease=alice.id)
    with LeaseStore(path=store_path) as store:
        assert [h.gpu for h in store.handovers()] == ["1"]
        assert store.handover("1") == before[1]
        assert store.handover("0") is None


def test_two_brokers_on_one_file_never_grant_a_gpu_in_hand_over(
    store_path: Path, engine: PolicyEngine
) -> None:
    sink = ListSink()
    brokers = [open_broker(store_path, engine, sink=sink) for _ in range(2)]
    try:
        for b in brokers:
            b.require_handover_checks(True)
        holders = [grant(brokers[0], "alice"), grant(brokers[1], "bob")]
        askers = [f"user{i}" for i in range(8)]
        barrier = threading.Barrier(len(askers) + len(holders))
        outcomes: list[Any] = []
        lock = threading.Lock()

        def end(i: int) -> None:
            barrier.wait()
            brokers[i].release(holders[i].id, reason="stopped")

        def ask(i: int) -> None:
            barrier.wait()
            for _ in range(5):
                try:
                    result: Any = grant(brokers[i % 2], askers[i])
                except (PoolExhausted, QuotaExceeded) as exc:
                    result = exc
                with lock:
                    outcomes.append(result)

        run_threads(
            [*(lambda i=i: end(i) for i in range(2)), *(lambda i=i: ask(i) for i in range(8))]
        )
        assert all(isinstance(o, PoolExhausted) for o in outcomes), outcomes
        assert len(outcomes) == 40
        assert sorted(h.gpu for h in brokers[1].pending_handovers()) == ["0", "1"]

        # one GPU cleared while eight users race for it: exactly one gets it
        winners: list[Lease] = []
        start = threading.Barrier(len(askers) + 1)
        cleared = threading.Event()

        def clear() -> None:
            start.wait()
            brokers[0].clear_handover("1", actor=MONITOR, ecc_mode=True, checked=CLEAN)
            cleared.set()

        def race(i: int) -> None:
            start.wait()
            while True:
                last = cleared.is_set()
                try:
                    lease = grant(brokers[i % 2], askers[i])
                except PoolExhausted:
                    if last:
                        return
                    continue
                with lock:
                    winners.append(lease)
                return

        run_threads([clear, *(lambda i=i: race(i) for i in range(8))])
        [winner] = winners
        assert winner.gpus == ("1",)
        assert [h.gpu for h in brokers[0].pending_handovers()] == ["0"]
    finally:
        for b in brokers:
            b.close()


def test_grants_follow_hand_overs_under_concurrent_ends_checks_and_grants(
    store_path: Path, engine: PolicyEngine
) -> None:
    """Four users grant and release through two brokers while a monitor clears and holds.

    The audit records are written inside each transaction, so their order is the order
    of the commits: replaying them, every grant must take only GPUs never leased or
    cleared since their last lease ended.
    """
    sink = ListSink()
    brokers = [open_broker(store_path, engine, sink=sink) for _ in range(2)]
    done = threading.Event()
    errors: list[BaseException] = []
    try:
        for b in brokers:
            b.require_handover_checks(True)

        def user(i: int) -> None:
            try:
                for _ in range(15):
                    try:
                        lease = grant(brokers[i % 2], f"u{i}")
                    except PoolExhausted:
                        continue
                    brokers[(i + 1) % 2].release(lease.id, reason="stopped")
            except BaseException as exc:
                errors.append(exc)

        def monitor() -> None:
            tick = 0
            while not done.is_set() or brokers[0].pending_handovers():
                for h in brokers[0].pending_handovers():
                    tick += 1
                    try:
                        if tick % 3 == 0 and h.state == "checking":
                            brokers[0].hold_handover(
                                h.gpu, reason=STILL_THERE, actor=MONITOR, lease=h.lease
                            )
                        else:
                            brokers[0].clear_handover(
                                h.gpu, actor=MONITOR, ecc_mode=True, checked=CLEAN, lease=h.lease
                            )
                    except HandoverNotFound:
                        pass

        watcher = threading.Thread(target=monitor)
        watcher.start()
        run_threads([lambda i=i: user(i) for i in range(4)])
        done.set()
        watcher.join(timeout=60)
        assert errors == []
        assert not watcher.is_alive()
    finally:
        for b in brokers:
            b.close()

    grantable = {"0": True, "1": True}
    grants = 0
    for record in sink.records:
        action, detail = record["action"], record["detail"]
        if action == "gpu.lease.granted":
            grants += 1
            for gpu in detail["gpus"]:
                assert grantable[gpu], f"GPU {gpu} granted while in hand-over"
                grantable[gpu] = False
        elif action == "gpu.handover.cleared":
            grantable[detail["gpu"]] = True
    assert grants >= 2, "the race did grant"
    assert sink.actions().count("gpu.handover.cleared") == sink.actions().count(
        "gpu.lease.released"
    )


def run_threads(targets: list[Any]) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)


# --- the schema: version 1 databases are migrated ---------------------------------------------

#: the schema of version 1, as ztlab wrote it before hand-over checks (frozen here on purpose)
_V1_DDL = (
    """
    CREATE TABLE IF NOT EXISTS leases (
        id TEXT PRIMARY KEY,
        username TEXT NOT NULL,
        server TEXT NOT NULL,
        pool TEXT NOT NULL,
        gpus TEXT NOT NULL,
        minors TEXT NOT NULL,
        granted_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        released_at REAL,
        release_reason TEXT
    ) STRICT
    """,
    """
    CREATE TABLE IF NOT EXISTS held (
        gpu TEXT PRIMARY KEY,
        lease_id TEXT NOT NULL REFERENCES leases (id)
    ) STRICT
    """,
    "CREATE INDEX IF NOT EXISTS leases_by_expiry ON leases (expires_at) WHERE released_at IS NULL",
    "CREATE UNIQUE INDEX IF NOT EXISTS one_lease_per_server ON leases (username, server) "
    "WHERE released_at IS NULL",
)


def make_v1_database(path: Path) -> None:
    """A version-1 lease database as the previous ztlab left it: alice holds GPU 0, bob's
    lease on GPU 1 has ended."""
    path.parent.mkdir(mode=0o700, parents=True)
    path.touch(mode=0o600)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN IMMEDIATE")
        for statement in _V1_DDL:
            conn.execute(statement)
        rows = [
            ("a1", "alice", "alice", "research", '["0"]', "[0]", START, START + 24 * HOUR, None),
            ("b1", "bob", "bob", "research", '["1"]', "[1]", START, START + HOUR, START + HOUR),
        ]
        conn.executemany(
            "INSERT INTO leases (id, username, server, pool, gpus, minors, granted_at, "
            "expires_at, released_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.execute("INSERT INTO held (gpu, lease_id) VALUES ('0', 'a1')")
        conn.execute("PRAGMA user_version=1")
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_a_version_1_database_is_migrated_and_keeps_its_leases(
    store_path: Path, engine: PolicyEngine, clock: Clock
) -> None:
    make_v1_database(store_path)
    with open_broker(store_path, engine, clock=clock) as broker:
        [alice] = broker.active()
        assert (alice.id, alice.gpus, alice.expires_at) == ("a1", ("0",), START + 24 * HOUR)
        assert broker.pending_handovers() == [], "leases ended before checks need none"
        assert broker.free("research") == ["1"]
        broker.require_handover_checks(True)
        broker.release("a1", reason="stopped")
        assert [(h.gpu, h.lease) for h in broker.pending_handovers()] == [("0", "a1")]
        assert grant(broker, "carol").gpus == ("1",)
    conn = sqlite3.connect(store_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    finally:
        conn.close()


def test_several_openers_migrate_a_version_1_database_once(store_path: Path) -> None:
    make_v1_database(store_path)
    barrier = threading.Barrier(4)
    failures: list[BaseException] = []

    def open_it() -> None:
        barrier.wait()
        try:
            LeaseStore(path=store_path).close()
        except BaseException as exc:
            failures.append(exc)

    run_threads([open_it] * 4)
    assert failures == []
    with LeaseStore(path=store_path) as store:
        assert store.held() == {"0": "a1"}
        assert store.handovers() == []


def test_a_handover_is_a_frozen_value() -> None:
    handover = Handover(
        gpu="0",
        lease="a1",
        user="alice",
        server="",
        pool="research",
        since=START,
        state="checking",
        reason="waiting",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        handover.state = "held"  # type: ignore[misc]


# --- invariants under any sequence of operations ---------------------------------------------

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("grant"), st.sampled_from(["u0", "u1", "u2"]), st.integers(1, 2)),
        st.tuples(st.just("release"), st.integers(0, 5)),
        st.tuples(st.just("tick"), st.floats(0, 12)),
        st.tuples(st.just("expire")),
        st.tuples(st.just("clear"), st.integers(0, 5)),
        st.tuples(st.just("hold"), st.integers(0, 5)),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS)
def test_a_gpu_is_leased_held_waiting_or_free_never_two_of_these(
    engine: PolicyEngine, ops: list[Any]
) -> None:
    config = make_config(
        {"research": {"gpus": ["0", "1", "2"], "roles": ["trainer"]}},
        roles={"trainer": {"max_gpus": 2, "max_server_hours": 10}},
    )
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpu" / "leases.sqlite3"
        with open_broker(path, engine, config=config, clock=clock) as broker:
            broker.require_handover_checks(True)
            for op in ops:
                apply(broker, clock, op)
                active = broker.active()
                held = {g: lease.id for lease in active for g in lease.gpus}
                pending = {h.gpu: h for h in broker.pending_handovers()}
                assert broker.store.held() == held
                assert not set(held) & set(pending)
                assert broker.free("research") == [
                    g for g in ("0", "1", "2") if g not in held and g not in pending
                ]
                for handover in pending.values():
                    ended = broker.get(handover.lease)
                    assert ended is not None
                    assert ended.released_at == handover.since
                    assert handover.gpu in ended.gpus


def apply(broker: LeaseBroker, clock: Clock, op: Any) -> None:
    """One operation of the invariant test."""
    if op[0] == "grant":
        free_before = set(broker.free("research"))
        held_before = {lease.id for lease in broker.active()}
        with contextlib.suppress(QuotaExceeded, PoolExhausted, LeaseDenied):
            lease = grant(broker, op[1], count=op[2])
            if lease.id not in held_before:  # not the server's lease asked for again
                assert set(lease.gpus) <= free_before
    elif op[0] == "release":
        active = broker.active()
        if active:
            broker.release(active[op[1] % len(active)].id, reason="test")
    elif op[0] == "tick":
        clock.advance(op[1])
    elif op[0] == "expire":
        broker.expire()
    else:
        pending = broker.pending_handovers()
        if pending:
            h = pending[op[1] % len(pending)]
            if op[0] == "clear":
                broker.clear_handover(h.gpu, actor=MONITOR, ecc_mode=None, checked=CLEAN)
            else:
                held = broker.hold_handover(h.gpu, reason=STILL_THERE, actor=MONITOR)
                assert held.state == "held"
