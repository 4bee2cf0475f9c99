"""Where the monitor's readings come from: the trace extensions, replays, the watched trace
file and real NVML (through a stand-in ``pynvml``)."""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from tests.hub.gpu.test_inventory import (
    A100_0,
    A100_1,
    A100_TRACE,
    H100,
    H100_TRACE,
    MIG_1,
    MIG_2,
    MiB,
    fake_pynvml,
)
from ztlab.common.errors import UsageError
from ztlab.hub.gpu.nvml import (
    DeviceTelemetry,
    GpuProcess,
    RealNvml,
    ReplayedNvml,
    TraceError,
    TraceProcessFacts,
    record_trace,
)
from ztlab.hub.monitor.sources import (
    RETRY_FAILED_S,
    NvmlTelemetry,
    ReplayedTelemetry,
    WatchedTrace,
    record_telemetry,
    snapshot_reading,
)
from ztlab.hub.monitor.telemetry import DeviceReading, ProcessFacts, ProcessReading, Reading

ALICE_FACTS = {
    "comm": "python3",
    "uid": 1001,
    "cmdline": ["python3", "train.py", "--epochs", "3"],
    "cgroup": "/ztlab/ztl-alice",
    "libraries": ["libcuda.so.1", "libcudart.so.12"],
}
GPU1_TELEMETRY = {
    "fb_used": 31000 * MiB,
    "power_w": 312.5,
    "energy_mj": 912_345_678,
    "pcie_tx": 4096 * 1024,
    "pcie_rx": 8192 * 1024,
    "nvlink_tx": 0,
    "nvlink_rx": 0,
    "temperature_c": 61,
    "sm_clock_mhz": 1410,
    "xid": [79],
    "ecc_mode": True,
    "ecc_sbe": 3,
    "ecc_dbe": 1,
}


def consistent_trace() -> dict[str, Any]:
    """The A100 trace with the same telemetry fields in every snapshot, as a driver reports."""
    data: dict[str, Any] = json.loads(A100_TRACE.read_text(encoding="utf-8"))
    for i, snapshot in enumerate(data["snapshots"]):
        whole = {
            "power_w": 80.5 + i,
            "energy_mj": 1000 + i,
            "pcie_tx": 1024 * (i + 1),
            "pcie_rx": 2048 * (i + 3),
            "temperature_c": 30 + i,
            "sm_clock_mhz": 1400 + i,
            "ecc_mode": i != 1,
            "ecc_sbe": i,
            "ecc_dbe": 0,
        }
        snapshot["devices"] = {
            A100_0: {"fb_used": 9000 * MiB + i, **whole},
            MIG_1: {"fb_used": 6000 * MiB + i},
            MIG_2: {"fb_used": 3000 * MiB + i},
            A100_1: {"fb_used": i * MiB, **whole, "temperature_c": 40 + i},
        }
    return data


def telemetry_trace() -> dict[str, Any]:
    """The A100 trace with every optional key: telemetry, per-process SM and /proc facts."""
    data: dict[str, Any] = json.loads(A100_TRACE.read_text(encoding="utf-8"))
    first, _second, third = data["snapshots"]
    first["processes"][MIG_1][0].update({"sm": 40, "proc": copy.deepcopy(ALICE_FACTS)})
    first["devices"] = {
        A100_0: {"fb_used": 7000 * MiB, "power_w": 90, "temperature_c": 35, "ecc_mode": False},
        MIG_1: {"fb_used": 6200 * MiB},
        MIG_2: {"fb_used": 0, "power_w": None},
        A100_1: {"fb_used": 0, "ecc_mode": True, "ecc_sbe": 0, "ecc_dbe": 0},
    }
    third["processes"][A100_1][0].update({"sm": 99, "proc": {"comm": "xmrig"}})
    third["devices"] = {A100_1: copy.deepcopy(GPU1_TELEMETRY)}
    return data


# --- the trace format's optional keys --------------------------------------------------------


def test_trace_keeps_telemetry_sm_and_process_facts() -> None:
    trace = ReplayedNvml.from_dict(telemetry_trace())
    assert trace.processes(MIG_1) == [
        GpuProcess(
            pid=7311,
            used_memory=6144 * MiB,
            sm_util=40,
            facts=TraceProcessFacts(
                comm="python3",
                uid=1001,
                cmdline=("python3", "train.py", "--epochs", "3"),
                cgroup="/ztlab/ztl-alice",
                libraries=("libcuda.so.1", "libcudart.so.12"),
            ),
        )
    ]
    assert trace.telemetry(A100_0) == DeviceTelemetry(
        fb_used=7000 * MiB, power_w=90.0, temperature_c=35, ecc_mode=False
    )
    assert trace.telemetry(MIG_2) == DeviceTelemetry(fb_used=0)
    assert trace.advance()
    assert trace.telemetry(A100_1) is None, "a snapshot without devices records none"
    assert trace.processes(MIG_1)[0].sm_util is None
    assert trace.advance()
    [xmrig] = trace.processes(A100_1)
    assert xmrig.facts == TraceProcessFacts(comm="xmrig")
    assert trace.snapshot.telemetry[A100_1] == DeviceTelemetry(
        **{**GPU1_TELEMETRY, "xid": (79,), "power_w": 312.5}
    )


def _broken(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = telemetry_trace()
    change(data)
    return data


def _first(data: dict[str, Any]) -> dict[str, Any]:
    snapshot: dict[str, Any] = data["snapshots"][0]
    return snapshot


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            _broken(lambda d: _first(d)["devices"][A100_1].update(watts=3)),
            rf"snapshots\[0\]\.devices\.{A100_1}: unknown key 'watts'",
        ),
        (
            _broken(lambda d: _first(d)["devices"].update({H100: {}})),
            r"snapshots\[0\]\.devices: 'GPU-faa67c11-.*' is not a device of the trace",
        ),
        (
            _broken(lambda d: _first(d)["devices"][A100_0].update(power_w=-1)),
            rf"devices\.{A100_0}\.power_w: expected a number of watts >= 0, got -1",
        ),
        (
            _broken(lambda d: _first(d)["devices"][A100_0].update(power_w=True)),
            rf"devices\.{A100_0}\.power_w: expected a number of watts >= 0, got true",
        ),
        (
            _broken(lambda d: _first(d)["devices"][A100_0].update(ecc_mode="yes")),
            rf"devices\.{A100_0}\.ecc_mode: expected true, false or null, got \"yes\"",
        ),
        (
            _broken(lambda d: _first(d)["devices"][A100_0].update(xid=[79, -1])),
            rf"devices\.{A100_0}\.xid\[1\]: expected an integer >= 0, got -1",
        ),
        (
            _broken(lambda d: _first(d)["devices"][A100_0].update(fb_used=1.5)),
            rf"devices\.{A100_0}\.fb_used: expected an integer >= 0, got 1.5",
        ),
        (
            _broken(lambda d: _first(d)["devices"].update({A100_0: []})),
            rf"snapshots\[0\]\.devices\.{A100_0}: expected an object, got list",
        ),
        (
            _broken(lambda d: _first(d)["processes"][MIG_1][0].update(sm=101)),
            rf"processes\.{MIG_1}\[0\]\.sm: expected an integer <= 100, got 101",
        ),
        (
            _broken(lambda d: _first(d)["processes"][MIG_1][0].update(proc={"uid": 1})),
            rf"processes\.{MIG_1}\[0\]\.proc: missing key 'comm'",
        ),
        (
            _broken(lambda d: _first(d)["processes"][MIG_1][0]["proc"].update(cmdline=["a", 1])),
            rf"processes\.{MIG_1}\[0\]\.proc\.cmdline\[1\]: expected a string, got 1",
        ),
        (
            _broken(lambda d: _first(d)["processes"][MIG_1][0]["proc"].update(exe="/bin/x")),
            rf"processes\.{MIG_1}\[0\]\.proc: unknown key 'exe'",
        ),
        (
            _broken(lambda d: _first(d)["processes"][MIG_1][0].update(cpu=3)),
            rf"processes\.{MIG_1}\[0\]: unknown key 'cpu'",
        ),
        (
            _broken(lambda d: _first(d).update(telemetry={})),
            r"snapshots\[0\]: unknown key 'telemetry'",
        ),
    ],
)
def test_malformed_optional_keys_are_refused_naming_the_key(
    data: dict[str, Any], message: str
) -> None:
    with pytest.raises(TraceError, match=message) as caught:
        ReplayedNvml.from_dict(data, source="t.json")
    assert caught.value.message.startswith("t.json: ")


def test_record_trace_writes_the_optional_keys_and_they_replay() -> None:
    source = ReplayedNvml.from_dict(telemetry_trace())
    trace = record_trace(source, samples=3, interval=1.0, sleep=lambda _s: source.advance())
    assert trace["snapshots"][0]["processes"][MIG_1][0]["proc"] == ALICE_FACTS
    assert "devices" not in trace["snapshots"][1], "no telemetry, no key"
    copy_ = ReplayedNvml.from_dict(json.loads(json.dumps(trace)))
    source.rewind()
    for _ in range(3):
        for device in source.devices():
            for uuid in (device.uuid, *(m.uuid for m in device.mig)):
                assert copy_.processes(uuid) == source.processes(uuid)
                assert copy_.telemetry(uuid) == source.telemetry(uuid)
        copy_.advance()
        source.advance()


# --- replayed telemetry ----------------------------------------------------------------------


def test_replayed_telemetry_reads_every_device_and_process_then_stays_at_the_end() -> None:
    ticks = iter([100.0, 101.0, 102.0, 103.0])
    source = ReplayedTelemetry(ReplayedNvml.from_dict(telemetry_trace()), clock=lambda: next(ticks))
    first = source.read()
    assert first.t == 100.0
    assert [(d.uuid, d.index, d.parent) for d in first.devices] == [
        (A100_0, 0, None),
        (MIG_1, 0, A100_0),
        (MIG_2, 0, A100_0),
        (A100_1, 1, None),
    ]
    gpu0 = first.device(A100_0)
    assert gpu0 == DeviceReading(
        uuid=A100_0,
        index=0,
        name="NVIDIA A100-SXM4-40GB",
        parent=None,
        memory_total=40960 * MiB,
        fb_used=7000 * MiB,
        power_w=90.0,
        temperature_c=35,
        ecc_mode=False,
    )
    assert first.device(MIG_1) is not None
    assert first.device(MIG_1).memory_total == 19968 * MiB  # type: ignore[union-attr]
    assert first.processes == (
        ProcessReading(
            pid=7311,
            uuid=MIG_1,
            used_memory=6144 * MiB,
            sm_util=40,
            facts=ProcessFacts(
                pid=7311,
                uid=1001,
                comm="python3",
                cmdline=("python3", "train.py", "--epochs", "3"),
                cgroup="/ztlab/ztl-alice",
                libraries=("libcuda.so.1", "libcudart.so.12"),
            ),
        ),
    )

    second = source.read()
    # no telemetry in this snapshot: memory in use is what the processes use, never a guess
    assert [(d.uuid, d.fb_used, d.gpu_util) for d in second.devices] == [
        (A100_0, 11520 * MiB, None),
        (MIG_1, 11520 * MiB, None),
        (MIG_2, 0, None),
        (A100_1, 0, 0),
    ]
    assert [(p.pid, p.uuid, p.used_memory, p.facts) for p in second.processes] == [
        (7311, MIG_1, 11520 * MiB, None),
        (9020, MIG_2, None, None),
    ]

    third = source.read()
    gpu1 = third.device(A100_1)
    assert gpu1 is not None
    assert (gpu1.gpu_util, gpu1.mem_util, gpu1.xid, gpu1.pcie_rx, gpu1.ecc_dbe) == (
        93,
        58,
        (79,),
        8192 * 1024,
        1,
    )
    [xmrig] = [p for p in third.processes if p.uuid == A100_1]
    assert xmrig.facts == ProcessFacts(
        pid=10455, uid=None, comm="xmrig", cmdline=(), cgroup=None, libraries=()
    )
    assert xmrig.sm_util == 99
    again = source.read()
    assert again.t == 103.0
    assert again.devices == third.devices, "the last snapshot stays current"
    source.close()


def test_replayed_telemetry_loops_when_asked_and_reads_files() -> None:
    source = ReplayedTelemetry.from_file(H100_TRACE, clock=lambda: 5.0, loop=True)
    used = [sum(p.used_memory or 0 for p in source.read().processes) for _ in range(7)]
    assert used[0] == 0
    assert used[1] > 0
    assert used[4] == 0
    assert used[5:] == used[:2], "after the last snapshot it starts over"
    with pytest.raises(TraceError, match="cannot read the NVML trace"):
        ReplayedTelemetry.from_file(H100_TRACE.with_name("missing.json"))


def test_snapshot_reading_of_a_mig_gpu_counts_its_instances_memory() -> None:
    trace = ReplayedNvml.from_file(A100_TRACE)
    trace.advance()
    reading = snapshot_reading(trace.devices(), trace.snapshot, t=1.0)
    assert reading.device(A100_0).fb_used == 11520 * MiB  # type: ignore[union-attr]


# --- a watched trace file --------------------------------------------------------------------


def write_atomically(path: Path, data: object) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    temporary.replace(path)


def pids(reading: Reading) -> list[int]:
    return [p.pid for p in reading.processes]


def test_watched_trace_replays_and_starts_over_when_the_file_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "trace.json"
    watched = WatchedTrace(path, clock=lambda: 42.0)
    assert watched.read() == Reading(t=42.0, devices=(), processes=())

    data = json.loads(H100_TRACE.read_text(encoding="utf-8"))
    data["snapshots"][1]["processes"][H100][0]["pid"] = os.getpid()
    write_atomically(path, data)
    assert [d.uuid for d in watched.read().devices] == [H100]
    assert pids(watched.read()) == [os.getpid()]
    for _ in range(5):
        last = watched.read()
    assert pids(last) == [], "at the end it stays at the last snapshot"

    changed = copy.deepcopy(data)
    changed["snapshots"][0]["processes"] = {H100: [{"pid": 4242, "used_memory": 1}]}
    write_atomically(path, changed)
    assert pids(watched.read()) == [4242], "a new file starts from its first snapshot"
    assert pids(watched.read()) == [os.getpid()]

    with caplog.at_level(logging.ERROR, logger="ztlab.hub.monitor.sources"):
        write_atomically(path, '{"format": "ztlab-nvml-trace/1", "devices": [], "snap')
        for _ in range(3):
            assert watched.read().devices == ()
    assert watched.error is not None
    assert str(path) in watched.error.message
    assert len([r for r in caplog.records if "cannot replay" in r.getMessage()]) == 1

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="ztlab.hub.monitor.sources"):
        write_atomically(path, {**data, "snapshots": [{"t": 0, "bogus": 1}]})
        assert watched.read().devices == ()
        assert watched.read().devices == ()
    assert "snapshots[0]: unknown key 'bogus'" in caplog.text
    assert len(caplog.records) == 1, "logged once per change"

    write_atomically(path, data)
    assert [d.uuid for d in watched.read().devices] == [H100]
    assert watched.error is None

    path.unlink()
    assert watched.read().devices == ()
    write_atomically(path, data)
    assert [d.uuid for d in watched.read().devices] == [H100], "back when the file is back"
    watched.close()


def test_watched_trace_sees_a_rewrite_in_place_of_another_size(tmp_path: Path) -> None:
    path = tmp_path / "trace.json"
    data = json.loads(H100_TRACE.read_text(encoding="utf-8"))
    path.write_text(json.dumps(data), encoding="utf-8")
    watched = WatchedTrace(path)
    watched.read()
    assert pids(watched.read()) == [48213]
    data["snapshots"][1]["processes"][H100][0]["pid"] = 7
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    watched.read()
    assert pids(watched.read()) == [7]


# --- real NVML through a stand-in pynvml ----------------------------------------------------

XID_TYPE = 0x8


class Clock:
    """A monotonic clock a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def telemetry_pynvml(trace: ReplayedNvml) -> ModuleType:
    """The inventory tests' stand-in ``pynvml``, with the monitor's calls answering from the
    trace's telemetry, queued XID events, process-utilization samples and NVLink counters."""
    fake = fake_pynvml(trace)
    calls: list[str] = fake.calls  # type: ignore[attr-defined]
    NVMLError: type[Exception] = fake.NVMLError  # type: ignore[attr-defined]
    NotSupported: type[Exception] = fake.NVMLError_NotSupported  # type: ignore[attr-defined]
    NotFound: type[Exception] = fake.NVMLError_NotFound  # type: ignore[attr-defined]

    class NVMLError_Timeout(NVMLError):
        pass

    state = SimpleNamespace(
        events=[],  # queued nvmlEventData
        samples={},  # uuid -> [process utilization samples]
        cursors=[],  # (uuid, lastSeenTimeStamp) of each nvmlDeviceGetProcessUtilization
        nvlink={},  # uuid -> (timestamp us, tx KiB, rx KiB)
        failing=set(),  # calls that fail with a plain NVMLError
        registered=[],
        freed=[],
    )

    def api(function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            calls.append(function.__name__)
            if function.__name__ in state.failing:
                raise NVMLError("Unknown Error")
            return function(*args)

        setattr(fake, function.__name__, wrapper)
        return wrapper

    def may_fail(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            if name in state.failing:
                calls.append(name)
                raise NVMLError("Unknown Error")
            return function(*args)

        return wrapper

    for name in [n for n in vars(fake) if n.startswith("nvml")]:
        setattr(fake, name, may_fail(name, getattr(fake, name)))

    def reported(handle: tuple[Any, ...], name: str) -> Any:
        recorded = trace.telemetry(handle[-1].uuid)
        value = None if recorded is None else getattr(recorded, name)
        if value is None:
            raise NotSupported("Not Supported")
        return value

    running = fake.nvmlDeviceGetComputeRunningProcesses

    @api
    def nvmlDeviceGetComputeRunningProcesses(handle: tuple[Any, ...]) -> list[Any]:
        listed = list(running(handle))
        if handle[0] == "gpu":  # a GPU in MIG mode lists its instances' processes too
            for mig in handle[1].mig:
                listed += running(("mig", handle[1], mig))
        return listed

    @api
    def nvmlDeviceGetMemoryInfo(handle: tuple[Any, ...]) -> SimpleNamespace:
        # always answered, as by a driver: without a recorded fb_used, what the replay takes
        uuid = handle[-1].uuid
        replayed = snapshot_reading(trace.devices(), trace.snapshot, t=0).device(uuid)
        assert replayed is not None
        return SimpleNamespace(total=handle[-1].memory_total, used=replayed.fb_used, free=0)

    @api
    def nvmlDeviceGetPowerUsage(handle: tuple[Any, ...]) -> int:
        return round(reported(handle, "power_w") * 1000)

    @api
    def nvmlDeviceGetTotalEnergyConsumption(handle: tuple[Any, ...]) -> int:
        return int(reported(handle, "energy_mj"))

    @api
    def nvmlDeviceGetPcieThroughput(handle: tuple[Any, ...], counter: int) -> int:
        name = {fake.NVML_PCIE_UTIL_TX_BYTES: "pcie_tx", fake.NVML_PCIE_UTIL_RX_BYTES: "pcie_rx"}  # type: ignore[attr-defined]
        return int(reported(handle, name[counter])) // 1024

    @api
    def nvmlDeviceGetTemperature(handle: tuple[Any, ...], sensor: int) -> int:
        assert sensor == fake.NVML_TEMPERATURE_GPU  # type: ignore[attr-defined]
        return int(reported(handle, "temperature_c"))

    @api
    def nvmlDeviceGetClockInfo(handle: tuple[Any, ...], clock: int) -> int:
        assert clock == fake.NVML_CLOCK_SM  # type: ignore[attr-defined]
        return int(reported(handle, "sm_clock_mhz"))

    @api
    def nvmlDeviceGetEccMode(handle: tuple[Any, ...]) -> list[int]:
        mode = int(reported(handle, "ecc_mode"))
        return [mode, mode]

    @api
    def nvmlDeviceGetTotalEccErrors(handle: tuple[Any, ...], kind: int, counter: int) -> int:
        assert counter == fake.NVML_VOLATILE_ECC  # type: ignore[attr-defined]
        return int(reported(handle, "ecc_sbe" if kind == 0 else "ecc_dbe"))

    @api
    def nvmlDeviceGetFieldValues(handle: tuple[Any, ...], ids: list[Any]) -> list[Any]:
        counters = state.nvlink.get(handle[-1].uuid)
        values = []
        for (field, scope), index in zip(ids, (1, 2), strict=True):
            assert scope == 0xFFFFFFFF, "all links together"
            assert field in (138, 139)
            values.append(
                SimpleNamespace(
                    nvmlReturn=3 if counters is None else 0,
                    valueType=3,
                    timestamp=0 if counters is None else counters[0],
                    value=SimpleNamespace(ullVal=0 if counters is None else counters[index]),
                )
            )
        return values

    @api
    def nvmlEventSetCreate() -> str:
        return "event-set"

    @api
    def nvmlDeviceRegisterEvents(handle: tuple[Any, ...], types: int, events: str) -> None:
        assert (types, events) == (XID_TYPE, "event-set")
        state.registered.append(handle[-1].uuid)

    @api
    def nvmlEventSetWait_v2(events: str, timeout_ms: int) -> Any:
        assert (events, timeout_ms) == ("event-set", 0), "draining never blocks"
        if not state.events:
            raise NVMLError_Timeout("Timeout")
        return state.events.pop(0)

    @api
    def nvmlEventSetFree(events: str) -> None:
        state.freed.append(events)

    @api
    def nvmlDeviceGetProcessUtilization(handle: tuple[Any, ...], since: int) -> list[Any]:
        uuid = handle[-1].uuid
        state.cursors.append((uuid, since))
        if handle[0] == "mig":
            raise NotSupported("Not Supported")
        found = [s for s in state.samples.get(uuid, []) if s.timeStamp > since]
        if not found:
            raise NotFound("Not Found")
        return found

    fake.NVMLError_Timeout = NVMLError_Timeout  # type: ignore[attr-defined]
    fake.NVML_PCIE_UTIL_TX_BYTES = 0  # type: ignore[attr-defined]
    fake.NVML_PCIE_UTIL_RX_BYTES = 1  # type: ignore[attr-defined]
    fake.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    fake.NVML_CLOCK_SM = 1  # type: ignore[attr-defined]
    fake.NVML_FEATURE_ENABLED = 1  # type: ignore[attr-defined]
    fake.NVML_MEMORY_ERROR_TYPE_CORRECTED = 0  # type: ignore[attr-defined]
    fake.NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1  # type: ignore[attr-defined]
    fake.NVML_VOLATILE_ECC = 0  # type: ignore[attr-defined]
    fake.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX = 138  # type: ignore[attr-defined]
    fake.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 139  # type: ignore[attr-defined]
    fake.nvmlEventTypeXidCriticalError = XID_TYPE  # type: ignore[attr-defined]
    fake.state = state  # type: ignore[attr-defined]
    return fake


def sample(pid: int, sm: int, at: int) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, timeStamp=at, smUtil=sm, memUtil=0, encUtil=0, decUtil=0)


def xid_event(device: Any, code: int) -> SimpleNamespace:
    return SimpleNamespace(
        device=("gpu", device),
        eventType=XID_TYPE,
        eventData=code,
        gpuInstanceId=0xFFFFFFFF,
        computeInstanceId=0xFFFFFFFF,
    )


@pytest.fixture
def nvml_world(monkeypatch: pytest.MonkeyPatch) -> tuple[ReplayedNvml, ModuleType]:
    trace = ReplayedNvml.from_dict(telemetry_trace())
    fake = telemetry_pynvml(trace)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return trace, fake


def install(monkeypatch: pytest.MonkeyPatch, data: dict[str, Any]) -> tuple[ReplayedNvml, Any]:
    trace = ReplayedNvml.from_dict(data)
    fake = telemetry_pynvml(trace)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return trace, fake


def counts(fake: ModuleType, name: str) -> int:
    return fake.calls.count(name)  # type: ignore[attr-defined,no-any-return]


def test_nvml_telemetry_reads_what_the_replay_of_the_same_trace_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trace, fake = install(monkeypatch, consistent_trace())
    with NvmlTelemetry(clock=lambda: 7.0) as source:
        for _ in range(3):
            got = source.read()
            expected = snapshot_reading(trace.devices(), trace.snapshot, t=7.0)
            fields = ("gpu_util", "mem_util", "fb_used", "power_w", "energy_mj", "pcie_tx")
            fields += ("pcie_rx", "temperature_c", "sm_clock_mhz", "ecc_mode", "ecc_sbe")
            fields += ("ecc_dbe", "uuid", "index", "name", "parent", "memory_total")
            for mine, theirs in zip(got.devices, expected.devices, strict=True):
                assert {f: getattr(mine, f) for f in fields} == {
                    f: getattr(theirs, f) for f in fields
                }
            # pid 1888 is the stand-in's display server on GPU 1; MIG processes appear once
            assert sorted((p.pid, p.uuid, p.used_memory) for p in got.processes) == sorted(
                [(p.pid, p.uuid, p.used_memory) for p in expected.processes]
                + [(1888, A100_1, 4 * MiB)]
            )
            assert got.t == 7.0
            trace.advance()
    assert fake.state.freed == ["event-set"]  # type: ignore[attr-defined]
    assert fake.calls[-1] == "nvmlShutdown", "an NVML it built is shut down"  # type: ignore[attr-defined]


def test_unsupported_calls_are_not_repeated_and_failures_are_retried_later(
    nvml_world: tuple[ReplayedNvml, ModuleType],
) -> None:
    _trace, fake = nvml_world
    clock = Clock()
    source = NvmlTelemetry(monotonic=clock)
    source.read()
    # the first snapshot reports no power on MIG_1 and A100_1: asked once, then never again
    assert counts(fake, "nvmlDeviceGetPowerUsage") == 4
    assert counts(fake, "nvmlDeviceGetUtilizationRates") == 2, "never asked of a MIG device"
    fake.state.failing.add("nvmlDeviceGetTemperature")  # type: ignore[attr-defined]
    reading = source.read()
    assert counts(fake, "nvmlDeviceGetPowerUsage") == 5, "only A100_0 reports power"
    assert counts(fake, "nvmlDeviceGetTemperature") == 5
    assert reading.device(A100_0).temperature_c is None  # type: ignore[union-attr]
    assert reading.device(A100_0).power_w == 90.0, "the rest of the reading goes on"  # type: ignore[union-attr]
    fake.state.failing.clear()  # type: ignore[attr-defined]
    clock.now += RETRY_FAILED_S - 1
    assert source.read().device(A100_0).temperature_c is None  # type: ignore[union-attr]
    assert counts(fake, "nvmlDeviceGetTemperature") == 5, "not retried every tick"
    clock.now += 1
    assert source.read().device(A100_0).temperature_c == 35  # type: ignore[union-attr]
    source.close()


def test_xid_events_are_drained_into_the_reading_of_their_gpu(
    nvml_world: tuple[ReplayedNvml, ModuleType],
) -> None:
    trace, fake = nvml_world
    gpu0, gpu1 = trace.devices()
    source = NvmlTelemetry()
    assert all(d.xid == () for d in source.read().devices)
    assert fake.state.registered == [A100_0, A100_1], "every GPU registered once"  # type: ignore[attr-defined]
    fake.state.events += [xid_event(gpu1, 79), xid_event(gpu0, 13), xid_event(gpu1, 48)]  # type: ignore[attr-defined]
    fake.state.events.append(  # type: ignore[attr-defined]
        SimpleNamespace(device=("gpu", gpu0), eventType=0x1, eventData=0)
    )
    reading = source.read()
    assert reading.device(A100_1).xid == (79, 48)  # type: ignore[union-attr]
    assert reading.device(A100_0).xid == (13,)  # type: ignore[union-attr]
    assert reading.device(MIG_1).xid == ()  # type: ignore[union-attr]
    assert fake.state.events == []  # type: ignore[attr-defined]
    assert all(d.xid == () for d in source.read().devices), "each XID is reported once"
    assert fake.state.registered == [A100_0, A100_1]  # type: ignore[attr-defined]
    source.close()


def test_process_sm_utilization_keeps_a_cursor_per_device(
    nvml_world: tuple[ReplayedNvml, ModuleType],
) -> None:
    trace, fake = nvml_world
    trace.advance()
    trace.advance()  # pid 10455 runs on A100_1
    state = fake.state  # type: ignore[attr-defined]
    state.samples[A100_1] = [sample(10455, 90, 100), sample(10455, 96, 200), sample(1888, 1, 150)]
    source = NvmlTelemetry()
    first = {p.pid: p.sm_util for p in source.read().processes}
    assert first[10455] == 93, "the mean over the samples since the last reading"
    assert first[1888] == 1
    assert first[9020] is None, "a MIG device reports no process utilization"
    state.samples[A100_1].append(sample(10455, 100, 300))
    second = {p.pid: p.sm_util for p in source.read().processes}
    assert second[10455] == 100
    assert second[1888] is None, "no new sample: unknown, not idle"
    third = {p.pid: p.sm_util for p in source.read().processes}
    assert third[10455] is None, "NVML found no sample since the cursor"
    assert [since for uuid, since in state.cursors if uuid == A100_1] == [0, 200, 300]
    assert [since for uuid, since in state.cursors if uuid == MIG_2] == [0], "unsupported once"
    source.close()


def test_nvlink_rates_come_from_the_counters(nvml_world: tuple[ReplayedNvml, ModuleType]) -> None:
    _trace, fake = nvml_world
    state = fake.state  # type: ignore[attr-defined]
    state.nvlink[A100_1] = (1_000_000, 100, 50)
    source = NvmlTelemetry()
    first = source.read()
    assert first.device(A100_1).nvlink_tx is None, "one counter reading is no rate"  # type: ignore[union-attr]
    assert first.device(A100_0).nvlink_tx is None  # type: ignore[union-attr]
    state.nvlink[A100_1] = (3_000_000, 100 + 2 * 1024, 50 + 4 * 1024)
    second = source.read()
    assert (second.device(A100_1).nvlink_tx, second.device(A100_1).nvlink_rx) == (  # type: ignore[union-attr]
        1024 * 1024,
        2 * 1024 * 1024,
    )
    before = counts(fake, "nvmlDeviceGetFieldValues")
    source.read()
    assert counts(fake, "nvmlDeviceGetFieldValues") == before + 1, "only A100_1 has NVLink"
    source.close()


def test_a_given_nvml_is_not_shut_down_and_a_closed_source_refuses_to_read(
    nvml_world: tuple[ReplayedNvml, ModuleType],
) -> None:
    _trace, fake = nvml_world
    nvml = RealNvml()
    source = NvmlTelemetry(nvml)
    source.read()
    source.close()
    source.close()
    assert "nvmlShutdown" not in fake.calls  # type: ignore[attr-defined]
    assert [d.uuid for d in nvml.devices()] == [A100_0, A100_1]
    with pytest.raises(Exception, match="closed"):
        source.read()
    nvml.close()


def test_a_device_whose_processes_cannot_be_listed_does_not_blind_the_others(
    nvml_world: tuple[ReplayedNvml, ModuleType], caplog: pytest.LogCaptureFixture
) -> None:
    trace, fake = nvml_world
    trace.advance()
    trace.advance()
    source = NvmlTelemetry()
    fake.state.failing.add("nvmlDeviceGetGraphicsRunningProcesses")  # type: ignore[attr-defined]
    with caplog.at_level(logging.ERROR, logger="ztlab.hub.monitor.sources"):
        reading = source.read()
        source.read()
    assert reading.processes == ()
    assert len(reading.devices) == 4
    assert len([r for r in caplog.records if "cannot list the processes" in r.message]) == 4
    fake.state.failing.clear()  # type: ignore[attr-defined]
    assert 10455 in [p.pid for p in source.read().processes]
    source.close()


def test_record_telemetry_keeps_what_the_monitor_reads_with_process_facts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install(monkeypatch, consistent_trace())
    seen: list[int] = []

    def facts(pid: int) -> ProcessFacts:
        seen.append(pid)
        return ProcessFacts(
            pid=pid, uid=1001, comm="python", cmdline=("python", "train.py"),
            cgroup="/ztlab/ztl-alice", libraries=("libcuda.so.1",),
        )  # fmt: skip

    with RealNvml() as nvml:
        recorded = record_telemetry(
            nvml, samples=3, interval=1.0, description="fake", facts=facts, sleep=lambda s: None
        )
        with NvmlTelemetry(nvml, clock=lambda: 0.0) as live:
            direct = live.read()
    assert recorded["description"] == "fake"
    assert len(recorded["snapshots"]) == 3
    assert seen, "process facts were asked for"
    # the recording replays: the same devices, telemetry and processes, with their facts
    replayed = ReplayedTelemetry(ReplayedNvml.from_dict(recorded), clock=lambda: 0.0).read()
    fields = ("uuid", "gpu_util", "fb_used", "power_w", "energy_mj", "pcie_tx", "ecc_mode")
    assert [[getattr(d, f) for f in fields] for d in replayed.devices] == [
        [getattr(d, f) for f in fields] for d in direct.devices
    ]
    assert [(p.pid, p.uuid) for p in replayed.processes] == [
        (p.pid, p.uuid) for p in direct.processes
    ]
    assert all(
        p.facts is not None and p.facts.cgroup == "/ztlab/ztl-alice" for p in replayed.processes
    )
    with pytest.raises(UsageError, match="at least 1"):
        record_telemetry(nvml, samples=0, interval=1.0)
