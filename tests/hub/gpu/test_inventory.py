"""The GPU inventory and the NVML boundary: replayed traces, resolution to device minors."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from tests.hardware import HAS_GPU, NO_GPU_REASON
from ztlab.common.config import ZtlabConfig, parse_config
from ztlab.common.errors import ConfigError, UsageError
from ztlab.hub.gpu import (
    Gpu,
    Inventory,
    InventoryError,
    NvmlError,
    NvmlUnavailableError,
    RealNvml,
    ReplayedNvml,
    TraceError,
    UnknownGpuError,
    UnknownPoolError,
    Utilization,
    discover,
    record_trace,
)
from ztlab.hub.gpu.nvml import GpuDevice, GpuProcess, normalize_uuid

TRACES = Path(__file__).resolve().parents[2] / "data" / "nvml"
H100_TRACE = TRACES / "h100-one-process.json"
A100_TRACE = TRACES / "a100-mig.json"

# The devices of the recorded traces.
H100 = "GPU-faa67c11-a40d-4772-a611-b24107474fa1"
A100_0 = "GPU-2b280bd0-c330-4382-aa0c-f03e01bdcffb"  # index 0, /dev/nvidia1, MIG mode
A100_1 = "GPU-85e450e0-abb5-4177-a12d-0bdceb9d5cf6"  # index 1, /dev/nvidia0
MIG_1 = "MIG-43b5d0de-0d4d-4be8-8fdd-d6066702f18f"  # GPU instance 1 of A100_0
MIG_2 = "MIG-f36d40f3-0f11-478a-ae80-dfdd2df9f189"  # GPU instance 2 of A100_0
MiB = 1024 * 1024


def config(pools: Mapping[str, list[str]]) -> ZtlabConfig:
    return parse_config(
        {
            "gpu": {
                "pools": {
                    name: {"gpus": gpus, "roles": ["trainer"]} for name, gpus in pools.items()
                }
            }
        }
    )


def inventory(pools: Mapping[str, list[str]], trace: Path | None = None) -> Inventory:
    nvml = ReplayedNvml.from_file(trace) if trace is not None else None
    return Inventory.from_config(config(pools), nvml=nvml)


# --- replayed NVML traces ------------------------------------------------------------------


def test_h100_trace_replays_one_process_over_time() -> None:
    nvml = ReplayedNvml.from_file(H100_TRACE)
    [device] = nvml.devices()
    assert device == GpuDevice(
        index=0,
        uuid=H100,
        name="NVIDIA H100 80GB HBM3",
        memory_total=81559 * MiB,
        minor_number=0,
    )
    seen: list[tuple[float, list[GpuProcess], Utilization | None]] = []
    while True:
        seen.append((nvml.time, nvml.processes(H100), nvml.utilization(H100)))
        if not nvml.advance():
            break
    assert len(nvml) == len(seen) == 5
    assert [t for t, _, _ in seen] == [0.0, 5.0, 10.0, 15.0, 20.0]
    assert [len(p) for _, p, _ in seen] == [0, 1, 1, 1, 0]
    assert seen[2][1] == [GpuProcess(pid=48213, used_memory=63790 * MiB)]
    assert seen[2][2] == Utilization(gpu=98, memory=71)
    assert seen[4][2] == (0, 0)
    assert not nvml.advance(), "the last snapshot stays current"
    assert nvml.position == 4
    nvml.rewind()
    assert nvml.position == 0
    assert nvml.processes(H100) == []


def test_a100_trace_has_mig_devices_with_their_own_processes() -> None:
    nvml = ReplayedNvml.from_file(A100_TRACE)
    first, second = nvml.devices()
    assert (first.index, first.uuid, first.minor_number) == (0, A100_0, 1)
    assert (second.index, second.uuid, second.minor_number) == (1, A100_1, 0)
    assert [(m.uuid, m.gpu_instance_id, m.compute_instance_id) for m in first.mig] == [
        (MIG_1, 1, 0),
        (MIG_2, 2, 0),
    ]
    assert second.mig == ()
    assert nvml.processes(MIG_1) == [GpuProcess(pid=7311, used_memory=6144 * MiB)]
    assert nvml.processes(MIG_2) == []
    assert nvml.utilization(MIG_1) is None, "NVML reports no utilization for MIG devices"
    assert nvml.utilization(A100_1) == (0, 0)
    assert nvml.advance()
    assert nvml.processes(MIG_2) == [GpuProcess(pid=9020, used_memory=None)]
    assert nvml.advance()
    assert nvml.processes(MIG_1) == []
    assert nvml.processes(A100_1)[0].pid == 10455
    assert nvml.utilization(A100_1) == Utilization(gpu=93, memory=58)


@pytest.mark.parametrize("trace", sorted(TRACES.glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_trace_replays(trace: Path) -> None:
    nvml = ReplayedNvml.from_file(trace)
    assert nvml.devices()
    while nvml.advance():
        for device in nvml.devices():
            for uuid in (device.uuid, *(m.uuid for m in device.mig)):
                assert all(p.pid > 0 for p in nvml.processes(uuid))


def test_a_trace_recorded_on_a_real_h200_replays() -> None:
    nvml = ReplayedNvml.from_file(TRACES / "h200-torch.json")
    [device] = nvml.devices()
    assert (device.name, device.minor_number, device.mig) == ("NVIDIA H200", 0, ())
    busy = []
    while True:
        running = nvml.processes(device.uuid)
        if running:
            busy.append(nvml.time)
            assert [p.used_memory for p in running] == [7146 * MiB]
        if not nvml.advance():
            break
    assert len(nvml) == 16
    assert busy
    assert 6 < busy[0] < 8
    assert 13 < busy[-1] < 15
    assert nvml.processes(device.uuid) == []
    inv = Inventory.from_config(config({"h200": ["0"]}), nvml=nvml)
    assert inv.minor("0") == 0
    assert inv.gpu("0").uuid == device.uuid


def test_replay_accepts_any_spelling_of_a_uuid_and_refuses_unknown_ones() -> None:
    nvml = ReplayedNvml.from_file(H100_TRACE)
    assert nvml.advance()
    assert nvml.processes(H100.upper().replace("GPU-", "gpu-"))[0].pid == 48213
    with pytest.raises(NvmlError, match=r"no GPU or MIG device 'GPU-0{8}-"):
        nvml.processes("GPU-00000000-0000-0000-0000-000000000000")
    assert normalize_uuid(" MIG-ABCDEF01-2345-6789-abcd-ef0123456789 ") == (
        "MIG-abcdef01-2345-6789-abcd-ef0123456789"
    )
    assert normalize_uuid("not a uuid") == "not a uuid"


def _trace(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(H100_TRACE.read_text(encoding="utf-8"))
    data.update(changes)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_trace(format="nvml/0"), r"format: expected \"ztlab-nvml-trace/1\", got \"nvml/0\""),
        (_trace(snapshots=[]), r"expected at least one snapshot"),
        (_trace(extra=1), r"trace: unknown key 'extra'"),
        (
            _trace(
                snapshots=[
                    {"t": 0, "processes": {"GPU-" + "1" * 8 + "-1111-1111-1111-" + "1" * 12: []}}
                ]
            ),
            r"snapshots\[0\]\.processes: 'GPU-1{8}-.*' is not a device of the trace",
        ),
        (
            _trace(snapshots=[{"t": 0, "processes": {H100: [{"pid": 0, "used_memory": 1}]}}]),
            rf"snapshots\[0\]\.processes\.{H100}\[0\]\.pid: expected an integer >= 1, got 0",
        ),
        (
            _trace(snapshots=[{"t": 0, "utilization": {H100: {"gpu": 101, "memory": 0}}}]),
            r"utilization\..*\.gpu: expected an integer <= 100, got 101",
        ),
        (_trace(snapshots=[{"t": 5}, {"t": 1}]), r"expected snapshots in order of t"),
        (
            _trace(
                devices=[
                    {"index": 0, "uuid": "GPU-x", "name": "x", "memory_total": 1, "minor_number": 0}
                ]
            ),
            r"devices\[0\]\.uuid: expected a UUID \"GPU-<uuid>\", got \"GPU-x\"",
        ),
        (
            _trace(devices=[{"index": 0, "uuid": H100, "name": "x", "memory_total": 1}]),
            r"devices\[0\]: missing key 'minor_number'",
        ),
    ],
)
def test_malformed_traces_are_refused_naming_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(TraceError, match=message) as caught:
        ReplayedNvml.from_dict(data, source="t.json")
    assert caught.value.message.startswith("t.json: ")
    assert isinstance(caught.value, UsageError)


def test_unreadable_or_non_json_trace_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read the NVML trace"):
        ReplayedNvml.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format":\n  oops}', encoding="utf-8")
    with pytest.raises(TraceError, match=r"bad\.json: line 2, column 3: not JSON"):
        ReplayedNvml.from_file(bad)
    bad.write_text("[]", encoding="utf-8")
    with pytest.raises(TraceError, match="expected a JSON object, got list"):
        ReplayedNvml.from_file(bad)


def test_record_trace_round_trips_through_replay() -> None:
    source = ReplayedNvml.from_file(A100_TRACE)
    ticks = iter(range(100))

    def sleep(_seconds: float) -> None:
        source.advance()

    trace = record_trace(
        source,
        samples=3,
        interval=10.0,
        description="re-recorded",
        sleep=sleep,
        clock=lambda: float(next(ticks)) * 10.0,
    )
    assert trace["description"] == "re-recorded"
    copy = ReplayedNvml.from_dict(json.loads(json.dumps(trace)))
    source.rewind()
    assert copy.devices() == source.devices()
    for _ in range(3):
        for device in source.devices():
            for uuid in (device.uuid, *(m.uuid for m in device.mig)):
                assert copy.processes(uuid) == source.processes(uuid)
                assert copy.utilization(uuid) == source.utilization(uuid)
        copy.advance()
        source.advance()
    with pytest.raises(UsageError, match="samples must be at least 1"):
        record_trace(source, samples=0, interval=1.0)


# --- RealNvml through pynvml -----------------------------------------------------------------


def fake_pynvml(trace: ReplayedNvml, *, init_error: str | None = None) -> ModuleType:
    """A stand-in for the ``pynvml`` module answering from a trace, as the driver would."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    class NVMLError_NotFound(NVMLError):
        pass

    devices = trace.devices()
    module = ModuleType("pynvml")
    calls: list[str] = []

    def api(function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            calls.append(function.__name__)
            return function(*args)

        setattr(module, function.__name__, wrapper)
        return wrapper

    @api
    def nvmlInit() -> None:
        if init_error:
            raise NVMLError(init_error)

    @api
    def nvmlShutdown() -> None:
        pass

    @api
    def nvmlDeviceGetCount() -> int:
        return len(devices)

    @api
    def nvmlDeviceGetHandleByIndex(index: int) -> tuple[Any, ...]:
        return ("gpu", devices[index])

    @api
    def nvmlDeviceGetUUID(handle: tuple[Any, ...]) -> str | bytes:
        # Old pynvml releases return bytes: the GPU's UUID comes back as bytes here.
        uuid = str(handle[-1].uuid)
        return uuid.upper().encode() if handle[0] == "gpu" else uuid

    @api
    def nvmlDeviceGetName(handle: tuple[Any, ...]) -> str:
        return str(handle[1].name)

    @api
    def nvmlDeviceGetMemoryInfo(handle: tuple[Any, ...]) -> SimpleNamespace:
        return SimpleNamespace(total=handle[-1].memory_total, used=0, free=handle[-1].memory_total)

    @api
    def nvmlDeviceGetMinorNumber(handle: tuple[Any, ...]) -> int:
        if handle[0] != "gpu":
            raise NVMLError_NotSupported("Not Supported")
        return int(handle[1].minor_number)

    @api
    def nvmlDeviceGetMigMode(handle: tuple[Any, ...]) -> list[int]:
        if not handle[1].mig:
            raise NVMLError_NotSupported("Not Supported")
        return [1, 1]

    @api
    def nvmlDeviceGetMaxMigDeviceCount(handle: tuple[Any, ...]) -> int:
        return 7

    @api
    def nvmlDeviceGetMigDeviceHandleByIndex(handle: tuple[Any, ...], index: int) -> tuple[Any, ...]:
        if index >= len(handle[1].mig):
            raise NVMLError_NotFound("Not Found")
        return ("mig", handle[1], handle[1].mig[index])

    @api
    def nvmlDeviceGetGpuInstanceId(handle: tuple[Any, ...]) -> int:
        return int(handle[2].gpu_instance_id)

    @api
    def nvmlDeviceGetComputeInstanceId(handle: tuple[Any, ...]) -> int:
        return int(handle[2].compute_instance_id)

    @api
    def nvmlDeviceGetComputeRunningProcesses(handle: tuple[Any, ...]) -> list[SimpleNamespace]:
        return [
            SimpleNamespace(pid=p.pid, usedGpuMemory=p.used_memory)
            for p in trace.processes(handle[-1].uuid)
        ]

    @api
    def nvmlDeviceGetGraphicsRunningProcesses(handle: tuple[Any, ...]) -> list[SimpleNamespace]:
        # A display server, and the compute process seen again without its memory.
        listed = [SimpleNamespace(pid=1888, usedGpuMemory=4 * MiB)]
        listed += [
            SimpleNamespace(pid=p.pid, usedGpuMemory=None) for p in trace.processes(handle[-1].uuid)
        ]
        return listed if handle[0] == "gpu" and handle[1].index == 1 else listed[1:]

    @api
    def nvmlDeviceGetUtilizationRates(handle: tuple[Any, ...]) -> SimpleNamespace:
        if handle[0] != "gpu" or handle[1].mig:
            raise NVMLError_NotSupported("Not Supported")
        rates = trace.utilization(handle[1].uuid)
        assert rates is not None
        return SimpleNamespace(gpu=rates.gpu, memory=rates.memory)

    module.NVMLError = NVMLError  # type: ignore[attr-defined]
    module.NVMLError_NotSupported = NVMLError_NotSupported  # type: ignore[attr-defined]
    module.NVMLError_NotFound = NVMLError_NotFound  # type: ignore[attr-defined]
    module.NVML_DEVICE_MIG_ENABLE = 1  # type: ignore[attr-defined]
    module.calls = calls  # type: ignore[attr-defined]
    return module


def test_real_nvml_translates_pynvml_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    trace = ReplayedNvml.from_file(A100_TRACE)
    fake = fake_pynvml(trace)
    monkeypatch.setitem(__import__("sys").modules, "pynvml", fake)
    with RealNvml() as nvml:
        assert nvml.devices() == trace.devices()
        assert nvml.processes(MIG_1) == [GpuProcess(pid=7311, used_memory=6144 * MiB)]
        assert nvml.utilization(MIG_1) is None
        assert nvml.utilization(A100_0) is None, "a GPU in MIG mode reports no utilization"
        trace.advance()
        trace.advance()
        assert nvml.processes(A100_1.upper()) == [
            GpuProcess(pid=1888, used_memory=4 * MiB),
            GpuProcess(pid=10455, used_memory=30210 * MiB),
        ]
        assert nvml.utilization(A100_1) == Utilization(gpu=93, memory=58)
        with pytest.raises(NvmlError, match="NVML has no GPU or MIG device"):
            nvml.processes("MIG-00000000-0000-0000-0000-000000000000")
        inv = Inventory.from_config(config({"research": ["1", MIG_2]}), nvml=nvml)
        assert [(g.uuid, g.minor) for g in inv.pool("research")] == [(A100_1, 0), (MIG_2, 1)]
    assert fake.calls[-1] == "nvmlShutdown"
    with pytest.raises(NvmlError, match="NVML was shut down"):
        nvml.devices()


def test_real_nvml_without_pynvml_or_driver_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    modules = __import__("sys").modules
    monkeypatch.setitem(modules, "pynvml", None)  # makes "import pynvml" fail
    with pytest.raises(NvmlUnavailableError, match="pynvml is not installed") as caught:
        RealNvml()
    assert caught.value.hint is not None
    assert "zerotrust-lab[gpu]" in caught.value.hint
    assert discover() is None

    monkeypatch.setitem(
        modules,
        "pynvml",
        fake_pynvml(ReplayedNvml.from_file(H100_TRACE), init_error="Driver Not Loaded"),
    )
    with pytest.raises(NvmlUnavailableError, match="nvmlInit failed: Driver Not Loaded"):
        RealNvml()
    assert discover() is None

    monkeypatch.setitem(modules, "pynvml", fake_pynvml(ReplayedNvml.from_file(H100_TRACE)))
    found = discover()
    assert isinstance(found, RealNvml)
    assert [d.uuid for d in found.devices()] == [H100]
    found.close()
    found.close()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason=NO_GPU_REASON)
def test_real_nvml_on_this_machine() -> None:
    """Where a GPU is present NVML must be usable: a missing [gpu] extra fails, not skips."""
    nvml = discover()
    assert nvml is not None, "a GPU is present but NVML did not start: install zerotrust-lab[gpu]"
    assert isinstance(nvml, RealNvml)
    with nvml:
        devices = nvml.devices()
        assert devices, "NVML started but lists no GPU"
        for device in devices:
            assert device.uuid.startswith("GPU-")
            assert device.memory_total > 0
            assert Path(f"/dev/nvidia{device.minor_number}").exists()
            for process in nvml.processes(device.uuid):
                assert process.pid > 0
            if not device.mig:
                rates = nvml.utilization(device.uuid)
                assert rates is not None
                assert 0 <= rates.gpu <= 100
        whole = [d.uuid for d in devices if not d.mig]
        migs = [m.uuid for d in devices for m in d.mig]
        inv = Inventory.from_config(config({"all": whole + migs}), nvml=nvml)
        assert [g.minor for g in inv] == [
            *(d.minor_number for d in devices if not d.mig),
            *(d.minor_number for d in devices for _ in d.mig),
        ]


# --- the inventory ---------------------------------------------------------------------------


def test_without_nvml_an_index_is_its_minor_and_a_uuid_is_unresolved() -> None:
    inv = inventory({"research": ["0", "1"], "shared": [H100, MIG_1]})
    assert not inv.resolved_with_nvml
    assert inv.pool_names == ("research", "shared")
    assert inv.pool("research") == (
        Gpu(id="0", uuid=None, minor=0, pool="research"),
        Gpu(id="1", uuid=None, minor=1, pool="research"),
    )
    assert inv.minor("1") == 1
    assert inv.gpu("1").device_node == "/dev/nvidia1"
    assert inv.gpu(H100) == Gpu(id=H100, uuid=H100, minor=None, pool="shared")
    assert inv.gpu(MIG_1).is_mig
    assert not inv.gpu("0").is_mig
    assert inv.gpu(MIG_1).device_node is None
    with pytest.raises(
        InventoryError, match=rf'GPU "{H100}" of pool shared cannot be leased'
    ) as caught:
        inv.minor(H100)
    assert "NVML is not available" in caught.value.message
    assert caught.value.hint is not None
    assert len(inv) == 4
    assert [g.id for g in inv] == ["0", "1", H100, MIG_1]
    assert "0" in inv
    assert "7" not in inv
    assert inv.pool_roles("research") == frozenset({"trainer"})


def test_nvml_resolves_index_uuid_and_mig_to_minors() -> None:
    a100 = inventory(
        {"whole": ["1"], "mig": [MIG_1, MIG_2.upper().replace("MIG-", "mig-")]}, A100_TRACE
    )
    assert a100.resolved_with_nvml
    # index 1 is /dev/nvidia0 on this host: the index is not the minor
    assert a100.pool("whole") == (Gpu(id="1", uuid=A100_1, minor=0, pool="whole"),)
    # MIG devices live on their parent's device node
    assert a100.pool("mig") == (
        Gpu(id=MIG_1, uuid=MIG_1, minor=1, pool="mig"),
        Gpu(id=MIG_2, uuid=MIG_2, minor=1, pool="mig"),
    )
    by_uuid = inventory({"p": [A100_1]}, A100_TRACE)
    assert by_uuid.minor(A100_1) == 0
    legacy = inventory({"p": [f"MIG-{A100_0}/2/0"]}, A100_TRACE)
    [gpu] = legacy.pool("p")
    assert (gpu.uuid, gpu.minor, gpu.is_mig) == (MIG_2, 1, True)
    h100 = inventory({"p": ["0"]}, H100_TRACE)
    assert h100.gpu("0") == Gpu(id="0", uuid=H100, minor=0, pool="p")


def test_a_configured_gpu_missing_from_nvml_stops_start_up() -> None:
    with pytest.raises(InventoryError) as caught:
        inventory({"research": ["0", "3"]}, H100_TRACE)
    message = caught.value.message
    assert message.startswith(
        "the configured GPUs do not match this machine: gpu.pools.research.gpus[1]: "
    )
    assert 'GPU "3" is not on this machine: no GPU has index 3' in message
    assert f"NVML sees 0: {H100} (NVIDIA H100 80GB HBM3, /dev/nvidia0)" in message
    assert isinstance(caught.value, ConfigError)

    missing = "GPU-00000000-1111-2222-3333-444444444444"
    with pytest.raises(InventoryError) as caught:
        inventory(
            {"a": [missing], "b": ["MIG-00000000-1111-2222-3333-444444444444", "1"]}, A100_TRACE
        )
    message = caught.value.message
    assert "2 problems" in message
    assert f'  gpu.pools.a.gpus[0]: GPU "{missing}" is not on this machine' in message
    assert '  gpu.pools.b.gpus[0]: MIG device "MIG-00000000-' in message
    assert f"MIG {MIG_1}, {MIG_2}" in message

    with pytest.raises(InventoryError, match=r"GPU instance 5 with compute instance 0"):
        inventory({"p": [f"MIG-{A100_0}/5/0"]}, A100_TRACE)
    with pytest.raises(InventoryError, match=r"no GPU has UUID GPU-0"):
        inventory({"p": [f"MIG-{missing}/1/0"]}, A100_TRACE)


def test_one_device_listed_twice_or_whole_while_in_mig_mode_is_refused() -> None:
    with pytest.raises(InventoryError) as caught:
        inventory({"a": ["1"], "b": [A100_1]}, A100_TRACE)
    assert (
        f'gpu.pools.b.gpus[0]: GPU "{A100_1}" is {A100_1}, already listed at gpu.pools.a.gpus[0]'
        in (caught.value.message)
    )
    with pytest.raises(InventoryError) as caught:
        inventory({"a": [MIG_1], "b": ["0"]}, A100_TRACE)
    message = caught.value.message
    assert f'gpu.pools.b.gpus[0]: GPU "0" ({A100_0}) is in MIG mode' in message
    assert f"expected its MIG devices instead: {MIG_1}, {MIG_2}" in message
    assert "one of its MIG devices is listed at gpu.pools.a.gpus[0]" in message
    with pytest.raises(InventoryError, match=r"listed whole at gpu.pools.a.gpus\[0\]"):
        inventory({"a": [A100_0], "b": [MIG_2]}, A100_TRACE)


def test_unknown_pools_and_gpus_are_usage_errors() -> None:
    inv = inventory({"research": ["0"]})
    with pytest.raises(
        UnknownPoolError, match="there is no GPU pool named 'nope'; pools: research"
    ):
        inv.pool("nope")
    with pytest.raises(UnknownPoolError):
        inv.pool_roles("nope")
    with pytest.raises(UnknownGpuError, match="no GPU pool lists a GPU '5'"):
        inv.gpu("5")
    empty = Inventory.from_config(ZtlabConfig().gpu)
    assert len(empty) == 0
    with pytest.raises(UnknownPoolError, match="pools: none are configured"):
        empty.pool("research")
