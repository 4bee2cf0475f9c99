"""On a real GPU: the monitor's real NVML sampler attributes a sandboxed CuPy process to its
user, and a process outside every lease raises its alert within 2 s.

Runs only where an NVIDIA GPU is present (skipped with the reason otherwise); everything
after NVML is tested in CI on replayed traces (tests/hub/monitor/, test_monitor_e2e.py).
One command on a GPU machine: ``make gpu-check`` (or tests/gpu/run-on-device.sh).
"""

from __future__ import annotations

import pwd
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.gpu.test_gpu_lease import BWRAP, _device_nodes, _spec, accounts  # noqa: F401
from tests.hardware import HAS_GPU, NO_GPU_REASON
from ztlab.common.config import parse_config
from ztlab.hub.gpu import Inventory, LeaseBroker
from ztlab.hub.gpu.nvml import RealNvml
from ztlab.hub.monitor.accounting import Accounting
from ztlab.hub.monitor.alerts import AlertStore
from ztlab.hub.monitor.detectors import Detectors
from ztlab.hub.monitor.service import GpuMonitor
from ztlab.hub.monitor.sources import NvmlTelemetry
from ztlab.hub.policy import PolicyEngine
from ztlab.hub.sandbox.bwrap import sandbox_argv
from ztlab.hub.sandbox.cgroups import CgroupManager, Limits, base_device_rules, gpu_device_rules

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason=NO_GPU_REASON)]

PARENT = "ztlab-gpu-check"
HOLD = (
    "import cupy, time\n"
    "x = cupy.ones(1 << 26, dtype=cupy.float32)\n"
    "print('ready', flush=True)\n"
    "end = time.time() + 60\n"
    "while time.time() < end:\n"
    "    x = x * 1.0001\n"
    "    cupy.cuda.Device().synchronize()\n"
)


class Records:
    def __init__(self) -> None:
        self.rows: list[tuple[float, str, dict[str, Any]]] = []

    def record(self, *, actor: str, action: str, detail: Any) -> None:
        self.rows.append((time.time(), action, dict(detail)))

    def __call__(self, actor: str, action: str, **detail: Any) -> None:
        self.rows.append((time.time(), action, detail))

    def alerts(self, kind: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, d) for t, a, d in self.rows if a == "gpu.alert" and d["kind"] == kind]


def _start(argv: list[str], preexec: Any = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        argv, preexec_fn=preexec, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready"), proc.stderr.read() if proc.stderr else ""
    return proc


def test_real_sampler_attributes_and_alerts(
    accounts: dict[str, pwd.struct_passwd],  # noqa: F811
    tmp_path: Path,
) -> None:
    nvml = RealNvml()
    device = nvml.devices()[0]
    config = parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "gpu": {"pools": {"research": {"gpus": [device.uuid], "roles": ["trainer"]}}},
        }
    )
    records = Records()
    policy = PolicyEngine.defaults(audit=records)
    inventory = Inventory.from_config(config, nvml=nvml)
    broker = LeaseBroker(
        store_path=tmp_path / "state" / "gpu" / "leases.sqlite3",
        inventory=inventory,
        roles=config.roles,
        policy=policy,
        audit=records,
    )
    lease = broker.grant(
        user="alice", roles=frozenset({"trainer"}), server="", pool="research", count=1
    )
    assert lease is not None
    minor = lease.minors[0]
    manager = CgroupManager.detect(parent=PARENT)
    limits = Limits(memory_bytes=16 << 30, cpus=4, pids=512)
    alice_cg = manager.create(
        "ztl-gpu-alice", limits=limits, devices=base_device_rules() + gpu_device_rules([minor])
    )
    monitor = GpuMonitor(
        source=NvmlTelemetry(nvml),
        interval=1.0,
        inventory=inventory,
        leases=broker,
        cgroups=manager,
        detectors=Detectors(interval=1.0),
        accounting=Accounting.open(tmp_path / "state" / "monitor" / "accounting.sqlite"),
        alerts=AlertStore.open(tmp_path / "state" / "monitor" / "alerts.sqlite"),
        policy=policy,
        record=records,
        cgroup_parent=PARENT,
    )
    stopped: list[Any] = []
    monitor.stop_holder = stopped.append
    monitor.set_directory(
        accounts={"ztl-gpu-alice": "alice", "ztl-gpu-bob": "bob"},
        activity={},
        roles={"alice": frozenset({"trainer"}), "bob": frozenset({"trainer"})},
    )
    alice = accounts["ztl-gpu-alice"]
    started: list[subprocess.Popen[str]] = []
    try:
        # 1. alice's sandboxed CuPy process on her leased GPU is hers, under her lease
        argv = sandbox_argv(
            _spec(alice, _device_nodes(minor), {"CUDA_VISIBLE_DEVICES": device.uuid}),
            [sys.executable, "-c", HOLD],
            bwrap=BWRAP,
        )
        started.append(_start(argv, alice_cg.preexec()))
        monitor.start()
        deadline = time.monotonic() + 20
        mine: list[Any] = []
        while time.monotonic() < deadline and not mine:
            latest = monitor.latest
            mine = [
                p
                for p in (latest.processes if latest else ())
                if p.holder is not None and p.holder.user == "alice" and p.leased_to_holder
            ]
            time.sleep(0.2)
        print(f"\nattributed: {mine}")
        assert mine, f"alice's process was not attributed: {monitor.latest}"
        assert mine[0].reading.pid in alice_cg.procs()
        assert not records.alerts("unleased_process")
        assert not records.alerts("outside_cgroup")
        # 2. a process outside every lease and every ztlab cgroup (root, on the host)
        appeared = time.time()
        started.append(_start([sys.executable, "-c", HOLD]))
        ready = time.time()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not records.alerts("outside_cgroup"):
            time.sleep(0.05)
        alerts = records.alerts("outside_cgroup")
        assert alerts, "no outside_cgroup alert for a process outside every lease"
        latency = alerts[0][0] - ready
        print(
            f"outside_cgroup alert {latency:.2f} s after the process had its CUDA context "
            f"({alerts[0][0] - appeared:.2f} s after it started): {alerts[0][1]['message']}"
        )
        assert alerts[0][1]["pid"] == started[-1].pid
        assert latency < 2.0
        usage = monitor.accounting.usage()
        print(f"usage: {dict(usage)}")
        assert usage["alice"].gpu_seconds > 0
        metrics = monitor.metrics()
        assert f'UUID="{device.uuid}"' in metrics
        assert "DCGM_FI_DEV_POWER_USAGE" in metrics
    finally:
        for proc in started:
            proc.kill()
            proc.wait(30)
        monitor.close()
        broker.close()
        alice_cg.kill_all()
        alice_cg.remove()
        nvml.close()
