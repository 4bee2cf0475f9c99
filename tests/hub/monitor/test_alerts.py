"""The alert store: adding, listing, acknowledging, counting, on real SQLite files."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from ztlab.common.errors import UsageError
from ztlab.hub.monitor.alerts import AlertStore, AlertStoreError, StoredAlert
from ztlab.hub.monitor.findings import Alert, Holder, LeaseHold

GPU = "GPU-faa67c11-a40d-4772-a611-b24107474fa1"
T0 = 1_800_000_000.0

ALICE = Holder(user="alice", server="", kind="server", account="ztl-alice", cgroup="ztl-alice")
BOBS_LEASE = LeaseHold(lease="L-bob", user="bob", server="gpu", pool="research", gpu="0")


def _alert(kind: str = "miner", *, t: float = T0, **kw: object) -> Alert:
    fields: dict[str, object] = {
        "kind": kind,
        "severity": "critical",
        "message": f"{kind} on {GPU}",
        "uuid": GPU,
        "pid": 4242,
        "holder": ALICE,
        "lease": None,
        "t": t,
        "evidence": {"comm": "xmrig", "sm": 99.5},
    }
    fields.update(kw)
    return Alert(**fields)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = T0 + 100

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "monitor" / "alerts.sqlite"


def test_add_keeps_every_field(path: Path) -> None:
    with AlertStore.open(path) as store:
        stored = store.add(
            _alert(lease=BOBS_LEASE, evidence={"comm": "xmrig", "ports": [3333]}),
            ["notify", "stop_server"],
        )
        assert stored == StoredAlert(
            id=stored.id,
            kind="miner",
            severity="critical",
            message=f"miner on {GPU}",
            uuid=GPU,
            pid=4242,
            user="alice",
            server="",
            lease="L-bob",
            t=T0,
            evidence={"comm": "xmrig", "ports": [3333]},
            responses=("notify", "stop_server"),
        )
        assert stored.open
        assert store.get(stored.id) == stored
        assert stored.to_json()["responses"] == ["notify", "stop_server"]


def test_subject_is_the_lease_holder_when_no_holder_runs_it(path: Path) -> None:
    with AlertStore.open(path) as store:
        leased = store.add(_alert("outside_cgroup", holder=None, lease=BOBS_LEASE), [])
        nobody = store.add(_alert("xid_error", holder=None, pid=None), [])
    assert (leased.user, leased.server, leased.lease) == ("bob", "gpu", "L-bob")
    assert (nobody.user, nobody.server, nobody.lease, nobody.pid) == (None, None, None, None)


def test_files_are_private_and_wide_ones_refused(path: Path, tmp_path: Path) -> None:
    AlertStore.open(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    path.chmod(0o644)
    with pytest.raises(AlertStoreError, match="readable or writable by group/others"):
        AlertStore.open(path)
    wide = tmp_path / "wide"
    wide.mkdir(mode=0o755)
    wide.chmod(0o755)
    with pytest.raises(AlertStoreError, match="alert directory"):
        AlertStore.open(wide / "alerts.sqlite")


def test_wal_and_full_sync(path: Path) -> None:
    with AlertStore.open(path) as store:
        conn = store._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_survives_close_and_reopen(path: Path) -> None:
    clock = Clock()
    store = AlertStore.open(path, clock=clock)
    first = store.add(_alert("miner"), ["notify"])
    second = store.add(_alert("baseline", severity="warning"), ["notify"])
    store.set_outcome(first.id, "notify", "done")
    store.acknowledge(second.id, by="root")
    store.close()
    with AlertStore.open(path) as again:
        assert again.get(first.id).outcomes == {"notify": "done"}
        assert again.get(second.id).acknowledged_by == "root"
        assert again.get(second.id).acknowledged_at == clock.now
        assert [a.id for a in again.list()] == [second.id, first.id]
        assert again.counts() == {"miner": 1, "baseline": 1}
        third = again.add(_alert("miner"), [])
        assert third.id > second.id
        assert again.counts() == {"miner": 2, "baseline": 1}


def test_list_filters_newest_first(path: Path) -> None:
    with AlertStore.open(path) as store:
        old = store.add(_alert("miner", t=T0), [])
        bobs = store.add(_alert("baseline", t=T0 + 10, holder=None, lease=BOBS_LEASE), ["notify"])
        new = store.add(_alert("idle_full_load", t=T0 + 20), [])
        store.acknowledge(new.id, by="root")
        ids = lambda alerts: [a.id for a in alerts]  # noqa: E731
        assert ids(store.list()) == [new.id, bobs.id, old.id]
        assert ids(store.list(open_only=True)) == [bobs.id, old.id]
        assert ids(store.list(since=T0 + 10)) == [new.id, bobs.id]
        assert ids(store.list(user="bob")) == [bobs.id]
        assert ids(store.list(user="alice", open_only=True)) == [old.id]
        assert ids(store.list(limit=1)) == [new.id]
        assert store.list(user="mallory") == []
        for bad in (0, -1, True):
            with pytest.raises(UsageError, match="limit must be a positive whole number"):
                store.list(limit=bad)


def test_acknowledge(path: Path) -> None:
    clock = Clock()
    with AlertStore.open(path, clock=clock) as store:
        stored = store.add(_alert(), ["notify"])
        done = store.acknowledge(stored.id, by="root")
        assert (done.acknowledged_by, done.acknowledged_at, done.open) == ("root", clock.now, False)
        # a second acknowledgement leaves the first one's name and time
        clock.now += 60
        again = store.acknowledge(stored.id, by="other-admin")
        assert (again.acknowledged_by, again.acknowledged_at) == ("root", done.acknowledged_at)
        with pytest.raises(UsageError, match="no alert with id 999") as exc:
            store.acknowledge(999, by="root")
        assert exc.value.hint
        with pytest.raises(UsageError, match="no alert with id 999"):
            store.get(999)
        with pytest.raises(UsageError, match="needs the name of the admin"):
            store.acknowledge(stored.id, by="")


def test_counts_are_totals_since_creation(path: Path) -> None:
    with AlertStore.open(path) as store:
        assert store.counts() == {}
        for kind in ("miner", "miner", "xid_error", "ecc_error", "miner"):
            store.add(_alert(kind), [])
        assert store.counts() == {"ecc_error": 1, "miner": 3, "xid_error": 1}


def test_evidence_that_is_not_json_is_kept_as_text(path: Path) -> None:
    with AlertStore.open(path) as store:
        stored = store.add(_alert(evidence={"path": Path("/proc/1"), "n": 1}), [])
    assert stored.evidence == {"path": "/proc/1", "n": 1}


def test_a_file_that_is_not_a_database_is_refused(path: Path) -> None:
    path.parent.mkdir(mode=0o700)
    path.write_bytes(b"this is not sqlite, just some text long enough" * 20)
    path.chmod(0o600)
    with pytest.raises(AlertStoreError, match="not a usable alert database"):
        AlertStore.open(path)


def test_a_newer_schema_is_refused(path: Path) -> None:
    AlertStore.open(path).close()
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=7")
    conn.commit()
    conn.close()
    with pytest.raises(AlertStoreError, match="schema version 7"):
        AlertStore.open(path)
