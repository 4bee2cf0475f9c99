"""The Prometheus exposition, read back with prometheus_client's own parser.

:func:`exposition` renders a representative host (two GPUs and a MIG device, processes of
several holders, accounting, alerts); the Grafana dashboard test checks the dashboard
against what it emits.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ztlab.hub.monitor.accounting import UNATTRIBUTED, Accounting
from ztlab.hub.monitor.exporter import SamplerStats, XidMemory, escape, render
from ztlab.hub.monitor.findings import ALERT_KINDS, AttributedProcess, Holder, LeaseHold
from ztlab.hub.monitor.telemetry import DeviceReading, ProcessFacts, ProcessReading, Reading

GPU0 = "GPU-00000000-0000-0000-0000-000000000000"
GPU1 = "GPU-11111111-1111-1111-1111-111111111111"
MIG = "MIG-22222222-2222-2222-2222-222222222222"
MODEL = "NVIDIA H100 80GB HBM3"
HOST = "gpu-node-1"
MIB = 1024 * 1024
Labels = dict[str, str]


def gpu(uuid: str = GPU0, index: int = 0, **values: Any) -> DeviceReading:
    return DeviceReading(
        uuid=uuid,
        index=index,
        name=values.pop("name", MODEL),
        parent=GPU1 if uuid.startswith("MIG-") else None,
        memory_total=values.pop("memory_total", 80 * 1024 * MIB),
        **values,
    )


def holder(user: str, server: str = "") -> Holder:
    return Holder(user=user, server=server, kind="server", account=f"ztl-{user}", cgroup="x")


def attributed(
    pid: int,
    who: Holder | None,
    uuid: str = GPU0,
    *,
    memory: int | None = None,
    sm: int | None = None,
    lease: str | None = None,
    pool: str | None = None,
    cmdline: tuple[str, ...] = ("python",),
) -> AttributedProcess:
    reading = ProcessReading(pid=pid, uuid=uuid, used_memory=memory, sm_util=sm)
    facts = ProcessFacts(pid=pid, uid=1000, comm="python", cmdline=cmdline, cgroup=None)
    hold = None
    if lease is not None and who is not None:
        hold = LeaseHold(lease=lease, user=who.user, server=who.server, pool=pool or "", gpu="0")
    return AttributedProcess(reading=reading, facts=facts, holder=who, lease=hold, pool=pool)


def representative() -> dict[str, Any]:
    """The arguments of a representative :func:`render` call."""
    devices = (
        gpu(
            GPU0,
            0,
            gpu_util=87,
            mem_util=40,
            fb_used=10 * 1024 * MIB + 5,
            power_w=312.5,
            energy_mj=123_456_789,
            pcie_tx=1_000_000,
            pcie_rx=2_000_000,
            nvlink_tx=30_000,
            nvlink_rx=40_000,
            temperature_c=61,
            sm_clock_mhz=1980,
            xid=(13, 79),
            ecc_mode=True,
            ecc_sbe=2,
            ecc_dbe=0,
        ),
        gpu(GPU1, 1, gpu_util=0, fb_used=0, power_w=70.0, energy_mj=5_000, temperature_c=30),
        gpu(MIG, 1, memory_total=20 * 1024 * MIB, fb_used=MIB),  # MIG: no power, no util
    )
    processes = (
        attributed(101, holder("alice"), GPU0, memory=4 << 30, sm=60, lease="L1", pool="a100"),
        attributed(102, holder("alice"), GPU0, memory=1 << 30, sm=None, lease="L1", pool="a100"),
        attributed(103, holder("bob", "big"), GPU0, memory=2 << 30, sm=20, pool="a100"),
        attributed(201, None, MIG, memory=MIB, cmdline=("xmrig", "--user", "secret-wallet")),
    )
    reading = Reading(
        t=1_700_000_000.5, devices=devices, processes=tuple(p.reading for p in processes)
    )
    accounting = Accounting()
    accounting.add(reading.t - 1, 1.0, reading, processes)
    accounting.add(reading.t, 1.0, reading, processes)
    return {
        "reading": reading,
        "processes": processes,
        "accounting": accounting,
        "alert_counts": {"miner": 2, "outside_cgroup": 1},
        "hostname": HOST,
        "sampler": SamplerStats(
            last_duration_s=0.0042, samples=17, errors=1, last_sample_t=reading.t
        ),
    }


def exposition(**changes: Any) -> str:
    """The text :func:`render` writes for :func:`representative`, with ``changes``."""
    return render(**{**representative(), **changes})


def families(text: str) -> dict[str, tuple[str, list[tuple[Labels, float]]]]:
    """Family name -> (type, [(labels, value)]), as Prometheus' parser reads them."""
    parsed = {}
    for family in text_string_to_metric_families(text):
        # prometheus_client names a counter's family without ``_total``
        name = family.name
        if family.type == "counter" and not name.startswith("DCGM_"):
            name += "_total"
        parsed[name] = (family.type, [(s.labels, s.value) for s in family.samples])
    return parsed


def values(text: str, name: str) -> dict[str, float]:
    """``UUID`` -> value of the device series ``name``."""
    return {labels["UUID"]: value for labels, value in families(text)[name][1]}


def test_device_series_carry_dcgm_names_labels_and_units() -> None:
    text = exposition()
    parsed = families(text)
    (labels, value) = parsed["DCGM_FI_DEV_GPU_UTIL"][1][0]
    assert labels == {
        "gpu": "0",
        "UUID": GPU0,
        "device": "nvidia0",
        "modelName": MODEL,
        "Hostname": HOST,
    }
    assert value == 87
    assert values(text, "DCGM_FI_DEV_FB_USED") == {GPU0: 10 * 1024, GPU1: 0, MIG: 1}
    assert values(text, "DCGM_FI_DEV_FB_FREE") == {
        GPU0: 70 * 1024 - 1,
        GPU1: 80 * 1024,
        MIG: 20 * 1024 - 1,
    }
    assert values(text, "DCGM_FI_DEV_POWER_USAGE") == {GPU0: 312.5, GPU1: 70.0}
    assert values(text, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION") == {GPU0: 123_456_789, GPU1: 5_000}
    assert values(text, "DCGM_FI_PROF_PCIE_TX_BYTES") == {GPU0: 1_000_000}
    assert values(text, "DCGM_FI_PROF_NVLINK_RX_BYTES") == {GPU0: 40_000}
    assert values(text, "DCGM_FI_DEV_SM_CLOCK") == {GPU0: 1980}
    assert values(text, "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL") == {GPU0: 2}
    assert values(text, "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL") == {GPU0: 0}
    types = {name: kind for name, (kind, _) in parsed.items()}
    assert types["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"] == "counter"
    assert types["DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"] == "counter"
    assert types["DCGM_FI_PROF_PCIE_RX_BYTES"] == "gauge"  # bytes per second, as DCGM
    assert types["DCGM_FI_DEV_XID_ERRORS"] == "gauge"
    # the MIG device has series of its own, under its parent's index
    mig = next(labels for labels, _ in parsed["DCGM_FI_DEV_FB_USED"][1] if labels["UUID"] == MIG)
    assert (mig["gpu"], mig["device"]) == ("1", "nvidia1")


def test_a_value_a_device_does_not_report_is_left_out_not_zero() -> None:
    bare = gpu(GPU0, 0)
    text = exposition(reading=Reading(t=5.0, devices=(bare,), processes=()), processes=())
    emitted = {name for name, (_, samples) in families(text).items() if name.startswith("DCGM_")}
    assert emitted == {"DCGM_FI_DEV_XID_ERRORS"}  # only the XID (0: none so far) is known
    assert "DCGM_FI_DEV_GPU_UTIL" not in text
    # a family with no sample has no HELP or TYPE either
    assert "DCGM_FI_DEV_POWER_USAGE" not in exposition(
        reading=Reading(t=5.0, devices=(gpu(MIG, 0),), processes=())
    )


def test_xid_is_the_last_error_and_stays_until_the_next() -> None:
    assert values(exposition(), "DCGM_FI_DEV_XID_ERRORS") == {GPU0: 79, GPU1: 0, MIG: 0}
    memory = XidMemory()
    first = Reading(t=1.0, devices=(gpu(GPU0, 0, xid=(48,)),), processes=())
    later = Reading(t=2.0, devices=(gpu(GPU0, 0),), processes=())
    memory.observe(first)
    memory.observe(later)
    assert memory.last() == {GPU0: 48}
    text = exposition(reading=later, processes=(), last_xid=memory.last())
    assert values(text, "DCGM_FI_DEV_XID_ERRORS") == {GPU0: 48}


def test_per_process_and_per_user_series() -> None:
    parsed = families(exposition())
    memory = {
        labels["pid"]: (labels, value)
        for labels, value in parsed["ztlab_gpu_process_memory_bytes"][1]
    }
    labels, value = memory["101"]
    assert value == 4 << 30
    assert labels == {
        "pid": "101",
        "user": "alice",
        "server": "",
        "lease": "L1",
        "pool": "a100",
        "gpu": "0",
        "UUID": GPU0,
        "Hostname": HOST,
    }
    assert memory["201"][0]["user"] == UNATTRIBUTED
    sm = {labels["pid"]: value for labels, value in parsed["ztlab_gpu_process_sm_util_percent"][1]}
    assert sm == {"101": 60, "103": 20}  # 102 and 201 report none
    count = {
        (labels["user"], labels["server"], labels["UUID"]): value
        for labels, value in parsed["ztlab_gpu_user_processes"][1]
    }
    assert count == {("alice", "", GPU0): 2, ("bob", "big", GPU0): 1, (UNATTRIBUTED, "", MIG): 1}
    assert parsed["ztlab_gpu_unattributed_processes"][1] == [({"Hostname": HOST}, 1)]


def test_no_command_line_reaches_a_label() -> None:
    assert "secret-wallet" not in exposition()
    assert "xmrig" not in exposition()


def test_accounting_counters_per_user_and_server() -> None:
    args = representative()
    parsed = families(render(**args))
    seconds = {
        (labels["user"], labels["server"]): value
        for labels, value in parsed["ztlab_gpu_user_seconds_total"][1]
    }
    expected = {key: usage.gpu_seconds for key, usage in args["accounting"].by_server().items()}
    assert seconds == pytest.approx(expected)
    # GPU0: three processes of two holders, sm 60/None/20 (not all report: equal shares)
    assert seconds[("alice", "")] == pytest.approx(1.0)
    assert seconds[(UNATTRIBUTED, "")] == pytest.approx(2.0)
    assert parsed["ztlab_gpu_user_seconds_total"][0] == "counter"
    energy = {
        labels["user"]: value for labels, value in parsed["ztlab_gpu_user_energy_joules_total"][1]
    }
    # the first tick has no counter delta yet (power x interval), the second a delta of 0
    assert energy["alice"] == pytest.approx(312.5 * 0.5)
    memory = {
        labels["user"]: value
        for labels, value in parsed["ztlab_gpu_user_memory_byte_seconds_total"][1]
    }
    assert memory["alice"] == pytest.approx((5 << 30) * 2)


def test_alerts_of_every_kind_are_counted_from_zero() -> None:
    parsed = families(exposition(alert_counts={"miner": 3, "new_kind": 1}))
    counts = {labels["kind"]: value for labels, value in parsed["ztlab_gpu_alerts_total"][1]}
    assert set(counts) == {*ALERT_KINDS, "new_kind"}
    assert counts["miner"] == 3
    assert counts["xid_error"] == 0


def test_sampler_health_and_a_monitor_without_a_reading_yet() -> None:
    parsed = families(exposition())
    assert parsed["ztlab_monitor_sample_duration_seconds"][1] == [({"Hostname": HOST}, 0.0042)]
    assert parsed["ztlab_monitor_samples_total"][0] == "counter"
    assert parsed["ztlab_monitor_samples_total"][1] == [({"Hostname": HOST}, 17)]
    assert parsed["ztlab_monitor_errors_total"][1] == [({"Hostname": HOST}, 1)]
    assert parsed["ztlab_monitor_last_sample_timestamp_seconds"][1] == [
        ({"Hostname": HOST}, 1_700_000_000.5)
    ]
    before = families(
        exposition(reading=None, processes=(), accounting=Accounting(), sampler=SamplerStats())
    )
    assert not any(name.startswith("DCGM_") for name in before)
    assert "ztlab_monitor_last_sample_timestamp_seconds" not in before
    assert "ztlab_monitor_sample_duration_seconds" not in before
    assert before["ztlab_monitor_samples_total"][1] == [({"Hostname": HOST}, 0)]
    assert before["ztlab_gpu_unattributed_processes"][1] == [({"Hostname": HOST}, 0)]


def test_the_sampler_may_be_given_as_a_mapping() -> None:
    mapping = {
        "last_sample_duration_seconds": 0.5,
        "samples_total": 3,
        "errors_total": 0,
        "last_sample_timestamp_seconds": None,
    }
    parsed = families(exposition(reading=None, processes=(), sampler=mapping))
    assert parsed["ztlab_monitor_sample_duration_seconds"][1] == [({"Hostname": HOST}, 0.5)]
    assert parsed["ztlab_monitor_samples_total"][1] == [({"Hostname": HOST}, 3)]
    assert "ztlab_monitor_last_sample_timestamp_seconds" not in parsed


ODD = ['a"b', "back\\slash", "new\nline", "ünïcode ✓", "{brace}=,", ""]


@pytest.mark.parametrize("odd", ODD)
def test_odd_user_server_model_and_host_names_round_trip(odd: str) -> None:
    who = holder(odd, odd)
    device = gpu(GPU0, 0, name=odd, gpu_util=1)
    process = attributed(7, who, GPU0, memory=1, lease=odd, pool=odd)
    reading = Reading(t=1.0, devices=(device,), processes=(process.reading,))
    accounting = Accounting()
    accounting.add(1.0, 1.0, reading, [process])
    text = exposition(
        reading=reading,
        processes=(process,),
        accounting=accounting,
        hostname=odd,
        alert_counts={odd: 1},
    )
    parsed = families(text)
    assert parsed["DCGM_FI_DEV_GPU_UTIL"][1][0][0]["modelName"] == odd
    assert parsed["DCGM_FI_DEV_GPU_UTIL"][1][0][0]["Hostname"] == odd
    ((labels, _),) = parsed["ztlab_gpu_process_memory_bytes"][1]
    assert (labels["user"], labels["server"], labels["lease"], labels["pool"]) == (odd,) * 4
    ((labels, _),) = parsed["ztlab_gpu_user_seconds_total"][1]
    assert labels["user"] == odd
    assert odd in {labels["kind"] for labels, _ in parsed["ztlab_gpu_alerts_total"][1]}
    # every sample is one line: a newline in a value cannot start a forged series
    for line in text.splitlines():
        assert line.startswith("#") or re.match(r"[A-Za-z_:][A-Za-z0-9_:]*\{", line), line


def test_escape() -> None:
    assert escape('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert escape("plain") == "plain"


def test_help_and_type_come_once_per_family_before_its_samples() -> None:
    seen: list[str] = []
    current = None
    for line in exposition().splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in seen
            seen.append(name)
        elif line.startswith("# TYPE "):
            current = line.split()[2]
            assert current == seen[-1]
        else:
            assert line.split("{", 1)[0] == current
    assert len(seen) == len(families(exposition()))


def _big_host(gpus: int = 8, per_gpu: int = 4) -> dict[str, Any]:
    devices = tuple(
        gpu(
            f"GPU-{i:08d}-0000-0000-0000-000000000000",
            i,
            gpu_util=50,
            mem_util=20,
            fb_used=MIB * 1000,
            power_w=300.0,
            energy_mj=10**9,
            pcie_tx=1,
            pcie_rx=2,
            nvlink_tx=3,
            nvlink_rx=4,
            temperature_c=60,
            sm_clock_mhz=1900,
            ecc_sbe=0,
            ecc_dbe=0,
        )
        for i in range(gpus)
    )
    processes: Sequence[AttributedProcess] = tuple(
        attributed(
            1000 + i * per_gpu + j,
            holder(f"user{(i * per_gpu + j) % 20}"),
            device.uuid,
            memory=1 << 30,
            sm=10,
            lease=f"L{i}",
            pool="p",
        )
        for i, device in enumerate(devices)
        for j in range(per_gpu)
    )
    reading = Reading(t=100.0, devices=devices, processes=tuple(p.reading for p in processes))
    accounting = Accounting()
    accounting.add(100.0, 1.0, reading, processes)
    return {
        **representative(),
        "reading": reading,
        "processes": processes,
        "accounting": accounting,
    }


def test_rendering_eight_busy_gpus_takes_under_two_milliseconds() -> None:
    args = _big_host()
    render(**args)  # warm up
    best = min(_timed(args) for _ in range(30))
    assert best < 0.002, f"render took {best * 1000:.2f} ms"


def _timed(args: dict[str, Any]) -> float:
    started = time.perf_counter()
    render(**args)
    return time.perf_counter() - started
