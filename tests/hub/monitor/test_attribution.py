"""Attribution: a process's cgroup names its holder; the device's lease says if it may."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ztlab.common.config import parse_config
from ztlab.hub.gpu import Inventory
from ztlab.hub.gpu.backend import Lease
from ztlab.hub.monitor.attribution import Attributor, LeaseView, cgroup_name
from ztlab.hub.monitor.findings import Holder
from ztlab.hub.monitor.procfacts import read_process
from ztlab.hub.monitor.telemetry import DeviceReading, ProcessFacts, ProcessReading

GPU0 = "GPU-00000000-0000-4000-8000-000000000000"
GPU1 = "GPU-11111111-1111-4111-8111-111111111111"
ACCOUNTS = {"ztl-alice": "alice", "ztl-bob": "bob", "ztl-9f2c": "a-very-long-user-name"}
CLUSTER = "0123456789abcdef"


def facts(cgroup: str | None, pid: int = 4242) -> ProcessFacts:
    return ProcessFacts(pid=pid, uid=1001, comm="python", cmdline=("python",), cgroup=cgroup)


def attributor(accounts: dict[str, str] | None = None) -> Attributor:
    table = ACCOUNTS if accounts is None else accounts
    return Attributor(accounts=lambda: table, facts=lambda pid: None)


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/ztlab/ztl-alice", "ztl-alice"),
        ("/machine.slice/ztlab/ztl-alice", "ztl-alice"),
        ("/ztlab", None),
        ("/ztlab/ztl-alice/child", None),  # deeper than the control plane makes them
        ("/user.slice/user-0.slice/session-1.scope", None),
        ("/ztlabx/ztl-alice", None),
        ("", None),
        (None, None),
    ],
)
def test_cgroup_name(path: str | None, name: str | None) -> None:
    assert cgroup_name(path, "ztlab") == name


def test_a_multi_part_parent() -> None:
    assert cgroup_name("/system.slice/ztlab/ztl-bob", "system.slice/ztlab") == "ztl-bob"
    assert cgroup_name("/ztlab/ztl-bob", "system.slice/ztlab") is None


@pytest.mark.parametrize(
    ("cgroup", "user", "server", "kind", "account"),
    [
        ("ztl-alice", "alice", "", "server", "ztl-alice"),
        (f"ztl-alice-{CLUSTER}-s", "alice", f"cluster-{CLUSTER}", "cluster", "ztl-alice"),
        (f"ztl-bob-{CLUSTER}-3", "bob", f"cluster-{CLUSTER}", "cluster", "ztl-bob"),
        ("ztl-alice-run-7f3a", "alice", "run-7f3a", "run", "ztl-alice"),
        ("ztl-9f2c", "a-very-long-user-name", "", "server", "ztl-9f2c"),
    ],
)
def test_the_cgroup_names_the_holder(
    cgroup: str, user: str, server: str, kind: str, account: str
) -> None:
    expected = Holder(user=user, server=server, kind=kind, account=account, cgroup=cgroup)
    assert attributor().holder(facts(f"/ztlab/{cgroup}"), ACCOUNTS) == expected


@pytest.mark.parametrize(
    "cgroup",
    [
        "/ztlab/ztl-mallory",  # an account no hub user has
        f"/ztlab/ztl-mallory-{CLUSTER}-0",
        f"/ztlab/ztl-alice-{CLUSTER[:15]}-0",  # not a cluster id
        "/ztlab/ztl-alice-run-",
        "/user.slice/ztl-alice",  # the name alone is not enough: it must be under ztlab
        None,
    ],
)
def test_anything_else_has_no_holder(cgroup: str | None) -> None:
    assert attributor().holder(facts(cgroup), ACCOUNTS) is None


def test_a_process_gone_before_it_was_read_has_no_holder() -> None:
    assert attributor().holder(None, ACCOUNTS) is None


def test_facts_come_from_proc_unless_the_trace_carries_them() -> None:
    asked: list[int] = []

    def from_proc(pid: int) -> ProcessFacts | None:
        asked.append(pid)
        return facts("/ztlab/ztl-bob", pid=pid)

    view = LeaseView(inventory=None, leases=(), devices=())
    found = Attributor(accounts=lambda: ACCOUNTS, facts=from_proc).attribute(
        [
            ProcessReading(pid=10, uuid=GPU0, used_memory=1),
            ProcessReading(pid=11, uuid=GPU0, used_memory=1, facts=facts("/ztlab/ztl-alice", 11)),
        ],
        view,
    )
    assert asked == [10]
    assert [p.holder.user for p in found if p.holder] == ["bob", "alice"]


def test_this_process_is_outside_every_ztlab_cgroup() -> None:
    mine = read_process(os.getpid())
    assert mine is not None
    assert attributor().holder(mine, ACCOUNTS) is None


def _devices() -> list[DeviceReading]:
    return [
        DeviceReading(uuid=GPU0, index=0, name="H100", parent=None, memory_total=1),
        DeviceReading(uuid=GPU1, index=1, name="H100", parent=None, memory_total=1),
    ]


def _lease(gpus: tuple[str, ...], user: str = "alice", server: str = "") -> Lease:
    return Lease(
        id="L1",
        user=user,
        server=server,
        pool="research",
        gpus=gpus,
        minors=tuple(int(g) if g.isdigit() else 0 for g in gpus),
        granted_at=0.0,
        expires_at=1e12,
    )


def test_leases_are_matched_by_index_without_nvml(tmp_path: Path) -> None:
    config = parse_config(
        {
            "state_dir": str(tmp_path),
            "gpu": {"pools": {"research": {"gpus": ["1"], "roles": ["trainer"]}}},
        }
    )
    view = LeaseView(
        inventory=Inventory.from_config(config, nvml=None),
        leases=[_lease(("1",))],
        devices=_devices(),
    )
    assert dict(view.pool_devices) == {GPU1: "research"}  # GPU 0 is in no pool
    hold = view.lease(GPU1)
    assert hold is not None
    assert (hold.user, hold.server, hold.gpu) == ("alice", "", "1")
    assert view.lease(GPU0) is None
    assert view.uuid_of("1") == GPU1
    assert view.gpu_id(GPU1) == "1"


def test_leased_to_holder_is_the_lease_of_that_very_holder(tmp_path: Path) -> None:
    config = parse_config(
        {
            "state_dir": str(tmp_path),
            "gpu": {"pools": {"research": {"gpus": ["0", "1"], "roles": ["trainer"]}}},
        }
    )
    inventory = Inventory.from_config(config, nvml=None)
    view = LeaseView(
        inventory=inventory,
        leases=[_lease(("0",), server=f"cluster-{CLUSTER}")],
        devices=_devices(),
    )
    cgroups = {
        (1, GPU0): f"ztl-alice-{CLUSTER}-0",
        (2, GPU0): "ztl-alice",
        (3, GPU1): f"ztl-alice-{CLUSTER}-1",
        (4, GPU0): "ztl-bob",
    }
    found = attributor().attribute(
        [
            ProcessReading(pid=pid, uuid=uuid, used_memory=1, facts=facts(f"/ztlab/{name}", pid))
            for (pid, uuid), name in cgroups.items()
        ],
        view,
    )
    # her cluster's worker on its own GPU is fine; her server, her cluster on a GPU the
    # lease does not hold, and bob are not
    assert [p.leased_to_holder for p in found] == [True, False, False, False]
    assert [p.pool for p in found] == ["research"] * 4
