"""GPU leases: policy, quotas, lifetimes, expiry, restarts and races, on real SQLite files."""

from __future__ import annotations

import contextlib
import multiprocessing
import stat
import tempfile
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztlab.common.config import ZtlabConfig, parse_config
from ztlab.common.errors import UsageError
from ztlab.hub.gpu import (
    Inventory,
    InventoryError,
    Lease,
    LeaseBroker,
    LeaseDenied,
    LeaseNotFound,
    LeaseStore,
    LeaseStoreError,
    PoolExhausted,
    QuotaExceeded,
    ReplayedNvml,
)
from ztlab.hub.policy import PolicyEngine

TRACES = Path(__file__).resolve().parents[2] / "data" / "nvml"
MIG_1 = "MIG-43b5d0de-0d4d-4be8-8fdd-d6066702f18f"
MIG_2 = "MIG-f36d40f3-0f11-478a-ae80-dfdd2df9f189"
H100 = "GPU-faa67c11-a40d-4772-a611-b24107474fa1"

#: 2026-11-26 12:05 UTC
START = datetime(2026, 11, 26, 12, 5, tzinfo=UTC).timestamp()
TRAINER = frozenset({"trainer"})
HOUR = 3600.0


class Clock:
    """A settable clock."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, hours: float) -> None:
        self.now += hours * HOUR


class ListSink:
    """An :class:`AuditSink` that keeps what it is given."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def record(self, *, actor: str, action: str, detail: Mapping[str, Any]) -> None:
        with self.lock:
            self.records.append({"actor": actor, "action": action, "detail": dict(detail)})

    def actions(self) -> list[str]:
        return [r["action"] for r in self.records]


class FailingSink:
    """An audit log that has failed: enforcement must fail closed."""

    def record(self, *, actor: str, action: str, detail: Mapping[str, Any]) -> None:
        raise RuntimeError("audit log is gone")


def make_config(
    pools: Mapping[str, Mapping[str, Any]] | None = None,
    roles: Mapping[str, Mapping[str, Any]] | None = None,
) -> ZtlabConfig:
    data: dict[str, Any] = {
        "gpu": {"pools": pools or {"research": {"gpus": ["0", "1"], "roles": ["trainer"]}}}
    }
    if roles:
        data["roles"] = roles
    return parse_config(data)


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


def open_broker(
    store_path: Path,
    engine: PolicyEngine,
    *,
    config: ZtlabConfig | None = None,
    clock: Clock | None = None,
    sink: Any = None,
    inventory: Inventory | None = None,
) -> LeaseBroker:
    config = config or make_config()
    return LeaseBroker(
        store_path=store_path,
        inventory=inventory or Inventory.from_config(config),
        roles=config.roles,
        policy=engine,
        audit=sink,
        clock=clock or Clock(),
    )


@pytest.fixture
def broker(
    store_path: Path, engine: PolicyEngine, clock: Clock, sink: ListSink
) -> Iterator[LeaseBroker]:
    with open_broker(store_path, engine, clock=clock, sink=sink) as b:
        yield b


def grant(broker: LeaseBroker, user: str, **kw: Any) -> Lease:
    args: dict[str, Any] = {"roles": TRAINER, "server": user, "pool": "research", "count": 1}
    args.update(kw)
    lease = broker.grant(user=user, **args)
    assert lease is not None
    return lease


# --- granting --------------------------------------------------------------------------------


def test_a_trainer_gets_a_lease_naming_gpus_and_minors(
    broker: LeaseBroker, sink: ListSink, store_path: Path
) -> None:
    lease = grant(broker, "alice")
    assert lease.user == "alice"
    assert lease.server == "alice"
    assert lease.pool == "research"
    assert lease.gpus == ("0",)
    assert lease.minors == (0,)
    assert lease.granted_at == START
    assert lease.expires_at == START + 24 * HOUR, "trainer's max_server_hours is 24"
    assert lease.released_at is None
    assert lease.active
    assert broker.active() == [lease]
    assert broker.active(user="alice", pool="research") == [lease]
    assert broker.active(user="bob") == []
    assert broker.get(lease.id) == lease
    assert broker.free("research") == ["1"]
    [record] = sink.records
    assert record["actor"] == "alice"
    assert record["action"] == "gpu.lease.granted"
    detail = record["detail"]
    assert detail["lease"] == lease.id
    assert detail["gpus"] == ["0"]
    assert detail["minors"] == [0]
    assert detail["expires_at"] == "2026-11-27T12:05:00Z"
    assert detail["hours"] == 24.0
    assert detail["policy_id"] == "trainer-lease-gpu"
    # the store is private
    assert stat.S_IMODE(store_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store_path.parent.stat().st_mode) == 0o700


@pytest.mark.parametrize("role", ["viewer", "approver", "data-steward"])
def test_roles_other_than_trainer_are_denied_by_policy(
    broker: LeaseBroker, sink: ListSink, role: str
) -> None:
    with pytest.raises(LeaseDenied) as caught:
        broker.grant(user="vic", roles=frozenset({role}), server="vic", pool="research", count=1)
    assert caught.value.message == (
        f"GPU lease on pool research denied: denied by default: no policy permits roles "
        f"[{role}] to lease_gpu on pool:research"
    )
    assert broker.active() == []
    assert sink.records == []


def test_admins_do_not_compute_unless_also_trainers(broker: LeaseBroker) -> None:
    with pytest.raises(LeaseDenied, match="forbidden by policy 'admins-do-not-compute'"):
        broker.grant(
            user="root", roles=frozenset({"admin"}), server="root", pool="research", count=1
        )
    lease = grant(broker, "ada", roles=frozenset({"admin", "trainer"}))
    assert lease.gpus == ("0",)


def test_asking_for_no_gpu_gets_no_lease(broker: LeaseBroker, sink: ListSink) -> None:
    assert (
        broker.grant(user="vic", roles=frozenset({"viewer"}), server="v", pool="x", count=0) is None
    )
    assert broker.active() == []
    assert sink.records == []


def test_the_pool_must_be_open_to_one_of_the_users_roles(
    store_path: Path, engine: PolicyEngine
) -> None:
    config = make_config(
        {
            "research": {"gpus": ["0"], "roles": ["trainer"]},
            "reviews": {"gpus": ["1"], "roles": ["approver"]},
            "closed": {"gpus": ["2"], "roles": []},
        }
    )
    with open_broker(store_path, engine, config=config) as broker:
        with pytest.raises(LeaseDenied) as caught:
            grant(broker, "alice", pool="reviews")
        assert caught.value.message == (
            "GPU lease on pool reviews denied: the pool is open to approver, and you hold trainer"
        )
        with pytest.raises(LeaseDenied, match="open to no role"):
            grant(broker, "alice", pool="closed")
        with pytest.raises(LeaseDenied, match="there is no GPU pool named 'nope'; pools: research"):
            grant(broker, "alice", pool="nope")
        assert grant(broker, "alice").gpus == ("0",)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"count": -1}, "count must be a whole number of GPUs >= 0, got -1"),
        ({"count": 1.5}, "count must be a whole number"),
        ({"count": True}, "count must be a whole number"),
        ({"hours": 0}, "hours must be a number > 0"),
        ({"hours": -2.0}, "hours must be a number > 0"),
        ({"hours": float("nan")}, "hours must be a number > 0"),
    ],
)
def test_bad_requests_are_usage_errors(
    broker: LeaseBroker, kw: dict[str, Any], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        grant(broker, "alice", **kw)


# --- quotas, exhaustion and the messages users see -------------------------------------------


def test_a_second_lease_over_the_quota_names_the_limit_and_the_lease(
    broker: LeaseBroker, sink: ListSink
) -> None:
    first = grant(broker, "alice", hours=2)  # until 14:05 UTC
    grant(broker, "bob", hours=3)
    with pytest.raises(QuotaExceeded) as caught:
        grant(broker, "alice", server="alice-2")
    assert caught.value.message == (
        f"role trainer may hold at most 1 GPU and you hold 1 (lease {first.id} on pool "
        "research); free in pool research: 0 of 2 GPUs; next lease there expires at 14:05 UTC"
    )
    assert caught.value.hint == "stop a server that holds GPUs, or ask for fewer"
    assert len(broker.active()) == 2
    assert sink.actions() == ["gpu.lease.granted"] * 2


def test_quota_messages_for_larger_quotas(store_path: Path, engine: PolicyEngine) -> None:
    config = make_config(
        {"research": {"gpus": ["0", "1", "2", "3"], "roles": ["trainer"]}},
        roles={"trainer": {"max_gpus": 2}, "student": {"max_gpus": 0}},
    )
    with open_broker(store_path, engine, config=config) as broker:
        with pytest.raises(QuotaExceeded) as caught:
            grant(broker, "alice", count=3)
        assert caught.value.message.startswith(
            "role trainer may hold at most 2 GPUs and you asked for 3; "
            "free in pool research: 4 of 4 GPUs"
        )
        held = grant(broker, "alice")
        with pytest.raises(QuotaExceeded) as caught:
            grant(broker, "alice", server="other", count=2)
        assert caught.value.message.startswith(
            f"role trainer may hold at most 2 GPUs and you hold 1 (lease {held.id} on pool "
            "research); you may ask for 1 more, not 2; free in pool research: 3 of 4 GPUs; "
            "next lease there expires at 2026-11-27 12:05 UTC"
        )
        assert grant(broker, "alice", server="other").gpus == ("1",)
        # the most generous role counts; a role without GPUs adds nothing
        roles = frozenset({"trainer", "student"})
        assert grant(broker, "bob", roles=roles, count=2).gpus == ("2", "3")


def test_an_exhausted_pool_says_what_is_free_and_when_the_next_lease_ends(
    broker: LeaseBroker, clock: Clock
) -> None:
    grant(broker, "alice", hours=5)  # 17:05
    grant(broker, "bob", hours=3)  # 15:05
    with pytest.raises(PoolExhausted) as caught:
        grant(broker, "carol")
    assert caught.value.message == (
        "pool research cannot lease 1 GPU now; free in pool research: 0 of 2 GPUs; "
        "next lease there expires at 15:05 UTC"
    )
    assert caught.value.hint is not None
    # past its expiry, a lease holds its GPUs until expire() releases them
    clock.advance(4)
    with pytest.raises(PoolExhausted) as caught:
        grant(broker, "carol")
    assert caught.value.message.endswith(
        "a lease there expired at 15:05 UTC and will be released soon"
    )
    [expired] = broker.expire()
    assert expired.user == "bob"
    assert grant(broker, "carol").gpus == ("1",)


def test_asking_for_more_gpus_than_the_pool_has(store_path: Path, engine: PolicyEngine) -> None:
    config = make_config(roles={"trainer": {"max_gpus": 8}})
    with open_broker(store_path, engine, config=config) as broker:
        with pytest.raises(
            PoolExhausted, match="pool research has 2 GPUs in all and you asked for 3"
        ):
            grant(broker, "alice", count=3)
        assert grant(broker, "alice", count=2).gpus == ("0", "1")


# --- lifetimes and expiry --------------------------------------------------------------------


def test_lifetime_is_capped_by_max_server_hours(store_path: Path, engine: PolicyEngine) -> None:
    config = make_config(
        {"research": {"gpus": ["0", "1", "2"], "roles": ["trainer"]}},
        roles={"long-runs": {"max_server_hours": 48}},
    )
    with open_broker(store_path, engine, config=config) as broker:
        assert grant(broker, "a", hours=100).expires_at == START + 24 * HOUR
        assert grant(broker, "b", hours=1.5).expires_at == START + 1.5 * HOUR
        both = frozenset({"trainer", "long-runs"})
        assert grant(broker, "c", roles=both).expires_at == START + 48 * HOUR


def test_expired_leases_are_released_and_their_gpus_free_again(
    broker: LeaseBroker, clock: Clock, sink: ListSink
) -> None:
    short = grant(broker, "alice", hours=1)
    long = grant(broker, "bob", hours=10)
    clock.advance(0.5)
    assert broker.expire() == []
    clock.advance(0.5)  # exactly at expires_at
    [expired] = broker.expire()
    assert expired.id == short.id
    assert expired.released_at == START + HOUR
    assert not expired.active
    assert broker.get(short.id) == expired
    assert broker.active() == [long]
    assert broker.free("research") == ["0"]
    assert broker.expire() == []
    record = sink.records[-1]
    assert record["actor"] == "ztlab-hub"
    assert record["action"] == "gpu.lease.expired"
    assert record["detail"]["lease"] == short.id
    assert record["detail"]["held_seconds"] == HOUR
    assert record["detail"]["reason"] == "expired"
    assert grant(broker, "carol").gpus == ("0",)


# --- release ---------------------------------------------------------------------------------


def test_release_is_idempotent_and_audited_once(
    broker: LeaseBroker, clock: Clock, sink: ListSink
) -> None:
    lease = grant(broker, "alice")
    clock.advance(2)
    broker.release(lease.id, reason="server stopped")
    broker.release(lease.id, reason="server stopped")
    assert broker.active() == []
    assert broker.free("research") == ["0", "1"]
    assert sink.actions() == ["gpu.lease.granted", "gpu.lease.released"]
    released = sink.records[-1]
    assert released["actor"] == "alice"
    assert released["detail"]["reason"] == "server stopped"
    assert released["detail"]["held_seconds"] == 2 * HOUR
    stored = broker.get(lease.id)
    assert stored is not None
    assert stored.released_at == START + 2 * HOUR
    with pytest.raises(LeaseNotFound, match="there is no GPU lease 'nope'"):
        broker.release("nope", reason="x")


def test_release_server_releases_that_servers_lease_only(
    broker: LeaseBroker, sink: ListSink
) -> None:
    mine = grant(broker, "alice")
    theirs = grant(broker, "bob")
    [released] = broker.release_server(user="alice", server="alice", reason="culled")
    assert released.id == mine.id
    assert released.released_at is not None
    assert broker.release_server(user="alice", server="alice", reason="culled") == []
    assert broker.active() == [theirs]
    assert sink.records[-1]["detail"]["reason"] == "culled"


def test_a_server_holds_one_lease_and_asking_again_returns_it(
    broker: LeaseBroker, sink: ListSink
) -> None:
    lease = grant(broker, "alice")
    assert grant(broker, "alice") == lease, "the same request again is the same lease"
    assert sink.actions() == ["gpu.lease.granted"]
    with pytest.raises(LeaseDenied) as caught:
        grant(broker, "alice", hours=1, count=2)
    assert caught.value.message == (
        f"server 'alice' already has GPU lease {lease.id}, which holds 1 GPU of pool "
        "research until 2026-11-27 12:05 UTC; a server holds one lease at a time"
    )


def test_an_audit_failure_leaves_no_lease(store_path: Path, engine: PolicyEngine) -> None:
    with open_broker(store_path, engine, sink=FailingSink()) as broker:
        with pytest.raises(RuntimeError, match="audit log is gone"):
            grant(broker, "alice")
        assert broker.active() == []
        assert broker.free("research") == ["0", "1"]


# --- inventory at lease time -----------------------------------------------------------------


def test_a_gpu_with_unknown_minor_cannot_be_leased(store_path: Path, engine: PolicyEngine) -> None:
    config = make_config({"research": {"gpus": [H100], "roles": ["trainer"]}})
    with open_broker(store_path, engine, config=config) as broker:
        with pytest.raises(
            InventoryError, match=rf'GPU "{H100}" of pool research cannot be leased'
        ):
            grant(broker, "alice")
        assert broker.active() == []


def test_mig_devices_are_leased_with_their_parents_minor(
    store_path: Path, engine: PolicyEngine
) -> None:
    config = make_config(
        {"research": {"gpus": [MIG_1, MIG_2, "1"], "roles": ["trainer"]}},
        roles={"trainer": {"max_gpus": 3}},
    )
    inventory = Inventory.from_config(config, nvml=ReplayedNvml.from_file(TRACES / "a100-mig.json"))
    with open_broker(store_path, engine, config=config, inventory=inventory) as broker:
        first = grant(broker, "alice")
        assert (first.gpus, first.minors) == ((MIG_1,), (1,))
        rest = grant(broker, "bob", count=2)
        # MIG_2 shares /dev/nvidia1 with MIG_1; index 1 is /dev/nvidia0 on this host
        assert (rest.gpus, rest.minors) == ((MIG_2, "1"), (1, 0))


# --- the store: restarts, permissions --------------------------------------------------------


def test_a_restart_keeps_active_leases_and_never_reuses_their_gpus(
    store_path: Path, engine: PolicyEngine
) -> None:
    with open_broker(store_path, engine) as first:
        alice = grant(first, "alice")
        gone = grant(first, "bob")
        first.release(gone.id, reason="stopped")
    with open_broker(store_path, engine) as second:
        assert second.active() == [alice]
        assert grant(second, "alice") == alice, "the restarted hub asking again doubles nothing"
        carol = grant(second, "carol")
        assert carol.gpus == ("1",)
        with pytest.raises(PoolExhausted):
            grant(second, "dave")
    with LeaseStore(path=store_path) as store:
        assert [lease.user for lease in store.active()] == ["alice", "carol"]
        assert store.held() == {"0": alice.id, "1": carol.id}


def test_the_store_refuses_files_others_can_read(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    with pytest.raises(
        LeaseStoreError, match=r"readable or writable by group/others \(mode 0755\); expected 0700"
    ):
        LeaseStore(path=loose / "leases.sqlite3")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    db = private / "leases.sqlite3"
    db.touch(mode=0o644)
    db.chmod(0o644)
    with pytest.raises(LeaseStoreError, match=r"mode 0644\); expected 0600") as caught:
        LeaseStore(path=db)
    assert caught.value.hint == f"chmod 600 {db}"
    db.chmod(0o600)
    db.write_bytes(b"this is not a database, just sixteen+ bytes of text")
    with pytest.raises(LeaseStoreError, match="not a usable GPU lease database"):
        LeaseStore(path=db)


def test_the_store_uses_wal_and_refuses_newer_schemas(store_path: Path) -> None:
    with LeaseStore(path=store_path) as store, store.transaction() as tx:
        assert tx.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tx.execute("PRAGMA user_version=99")
    with pytest.raises(LeaseStoreError, match="schema version 99"):
        LeaseStore(path=store_path)


# --- races -----------------------------------------------------------------------------------


def race(brokers: list[LeaseBroker], users: list[str]) -> list[Lease | Exception]:
    """Every user asks for one GPU at once, each through brokers[i % len(brokers)]."""
    barrier = threading.Barrier(len(users))
    results: list[Lease | Exception] = [Exception("not run")] * len(users)

    def ask(i: int) -> None:
        barrier.wait()
        try:
            results[i] = grant(brokers[i % len(brokers)], users[i])
        except (PoolExhausted, QuotaExceeded) as exc:
            results[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(users))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def check_two_winners(results: list[Lease | Exception]) -> None:
    leases = [r for r in results if isinstance(r, Lease)]
    assert len(leases) == 2, results
    assert sorted(g for lease in leases for g in lease.gpus) == ["0", "1"]
    assert all(isinstance(r, PoolExhausted) for r in results if not isinstance(r, Lease)), results


def test_eight_threads_with_their_own_brokers_race_for_two_gpus(
    store_path: Path, engine: PolicyEngine
) -> None:
    brokers = [open_broker(store_path, engine, clock=Clock()) for _ in range(8)]
    try:
        results = race(brokers, [f"user{i}" for i in range(8)])
        check_two_winners(results)
        assert len(brokers[0].active()) == 2
    finally:
        for b in brokers:
            b.close()


def test_eight_threads_sharing_one_broker_race_for_two_gpus(broker: LeaseBroker) -> None:
    check_two_winners(race([broker], [f"user{i}" for i in range(8)]))
    assert len(broker.active()) == 2


def _race_in_process(path: str, prefix: str, barrier: Any) -> None:
    """Runs in a child process: four threads of a fresh broker race for the pool."""
    broker = open_broker(Path(path), PolicyEngine.defaults())
    try:
        barrier.wait(timeout=60)
        results = race([broker], [f"{prefix}{i}" for i in range(4)])
        for result in results:
            if not isinstance(result, Lease | PoolExhausted):
                raise AssertionError(f"unexpected result {result!r}")
    finally:
        broker.close()


def test_two_processes_race_for_two_gpus(store_path: Path, engine: PolicyEngine) -> None:
    LeaseStore(path=store_path).close()
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    processes = [
        context.Process(target=_race_in_process, args=(str(store_path), f"p{n}-", barrier))
        for n in range(2)
    ]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]
    with LeaseStore(path=store_path) as store:
        leases = store.active()
        assert len(leases) == 2
        assert sorted(g for lease in leases for g in lease.gpus) == ["0", "1"]
        assert set(store.held()) == {"0", "1"}


# --- invariants under any sequence of operations ---------------------------------------------

_USERS = ["u0", "u1", "u2", "u3"]
_OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("grant"),
            st.sampled_from(_USERS),
            st.sampled_from(["s1", "s2"]),
            st.sampled_from(["research", "other"]),
            st.integers(0, 3),
            st.one_of(st.none(), st.floats(0.1, 30)),
        ),
        st.tuples(st.just("release"), st.integers(0, 10)),
        st.tuples(st.just("tick"), st.floats(0, 12)),
        st.tuples(st.just("expire")),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS)
def test_no_gpu_is_ever_in_two_leases_and_quotas_hold(engine: PolicyEngine, ops: list[Any]) -> None:
    config = make_config(
        {
            "research": {"gpus": ["0", "1", "2"], "roles": ["trainer"]},
            "other": {"gpus": ["3"], "roles": ["trainer"]},
        },
        roles={"trainer": {"max_gpus": 2, "max_server_hours": 10}},
    )
    clock = Clock()
    sink = ListSink()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpu" / "leases.sqlite3"
        with open_broker(path, engine, config=config, clock=clock, sink=sink) as broker:
            for op in ops:
                if op[0] == "grant":
                    _, user, server, pool, count, hours = op
                    with contextlib.suppress(QuotaExceeded, PoolExhausted, LeaseDenied):
                        broker.grant(
                            user=user,
                            roles=TRAINER,
                            server=server,
                            pool=pool,
                            count=count,
                            hours=hours,
                        )
                elif op[0] == "release":
                    active = broker.active()
                    if active:
                        broker.release(active[op[1] % len(active)].id, reason="test")
                elif op[0] == "tick":
                    clock.advance(op[1])
                else:
                    for lease in broker.expire():
                        assert lease.expires_at <= clock.now
                active = broker.active()
                held = [g for lease in active for g in lease.gpus]
                assert len(held) == len(set(held))
                assert broker.store.held() == {g: lease.id for lease in active for g in lease.gpus}
                for pool in ("research", "other"):
                    ids = [g.id for g in broker.inventory.pool(pool)]
                    assert broker.free(pool) == [g for g in ids if g not in held]
                for user in _USERS:
                    assert sum(len(lease.gpus) for lease in active if lease.user == user) <= 2
                for lease in active:
                    assert lease.minors == tuple(int(g) for g in lease.gpus)
                    assert lease.expires_at - lease.granted_at <= 10 * HOUR
                assert len({(lease.user, lease.server) for lease in active}) == len(active)
            granted = sink.actions().count("gpu.lease.granted")
            ended = sink.actions().count("gpu.lease.released") + sink.actions().count(
                "gpu.lease.expired"
            )
            assert granted - ended == len(broker.active())
