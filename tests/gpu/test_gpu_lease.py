"""On a real GPU: a lease, the device fence against a second sandbox, and NVML's view.

Runs only where an NVIDIA GPU is present (skipped with the reason otherwise); the CPU path
of the same code is tested in CI with replayed NVML traces and ``mknod`` device nodes.
One command on a GPU machine: ``make gpu-check`` (see docs/isolation.md).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hardware import HAS_GPU, NO_GPU_REASON
from ztlab.common.config import parse_config
from ztlab.hub.gpu import Inventory, LeaseBroker, LeaseDenied
from ztlab.hub.gpu.nvml import RealNvml
from ztlab.hub.policy import PolicyEngine
from ztlab.hub.sandbox.bwrap import SandboxSpec, sandbox_argv
from ztlab.hub.sandbox.cgroups import (
    CgroupManager,
    Limits,
    base_device_rules,
    gpu_device_rules,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason=NO_GPU_REASON)]

BWRAP = os.environ.get("ZTLAB_BWRAP", "bwrap")


class Records:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, dict[str, Any]]] = []

    def record(self, *, actor: str, action: str, detail: Any) -> None:
        self.rows.append((actor, action, dict(detail)))


@pytest.fixture
def accounts() -> Iterator[dict[str, pwd.struct_passwd]]:
    base = Path(tempfile.mkdtemp(prefix="ztl-gpu-"))
    base.chmod(0o755)
    made = {}
    for name in ("ztl-gpu-alice", "ztl-gpu-bob"):
        subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--create-home",
                "--home-dir",
                str(base / name),
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
            check=True,
        )
        made[name] = pwd.getpwnam(name)
    yield made
    for name in made:
        subprocess.run(["pkill", "-KILL", "-u", name], check=False)
        subprocess.run(["userdel", name], check=False)
    shutil.rmtree(base, ignore_errors=True)


def _device_nodes(minor: int) -> list[Path]:
    nodes = [
        Path(f"/dev/nvidia{minor}"),
        Path("/dev/nvidiactl"),
        Path("/dev/nvidia-uvm"),
        Path("/dev/nvidia-uvm-tools"),
    ]
    return [n for n in nodes if n.exists()]


def _spec(account: pwd.struct_passwd, devices: list[Path], env: dict[str, str]) -> SandboxSpec:
    base_env = {"HOME": account.pw_dir, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    return SandboxSpec(
        uid=account.pw_uid,
        gid=account.pw_gid,
        home=Path(account.pw_dir),
        devices=devices,
        env={**base_env, **env},
    )


def lease_broker(tmp_path: Path) -> tuple[RealNvml, Any, LeaseBroker, Records]:
    """NVML, the first GPU, and a lease broker with one pool ``research`` holding it."""
    nvml = RealNvml()
    device = nvml.devices()[0]
    config = parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "gpu": {"pools": {"research": {"gpus": [device.uuid], "roles": ["trainer"]}}},
        }
    )
    records = Records()
    broker = LeaseBroker(
        store_path=tmp_path / "state" / "gpu" / "leases.sqlite3",
        inventory=Inventory.from_config(config, nvml=nvml),
        roles=config.roles,
        policy=PolicyEngine.defaults(audit=records),
        audit=records,
    )
    return nvml, device, broker, records


def test_lease_fence_and_nvml(accounts: dict[str, pwd.struct_passwd], tmp_path: Path) -> None:
    nvml, device, broker, records = lease_broker(tmp_path)
    print(f"\nGPU: {device.name} {device.uuid} /dev/nvidia{device.minor_number}")
    # 1. a real lease on the real GPU, after a policy decision; a viewer is refused
    lease = broker.grant(
        user="alice", roles=frozenset({"trainer"}), server="", pool="research", count=1
    )
    assert lease is not None
    print(f"lease {lease.id}: GPUs {lease.gpus} minors {lease.minors} until {lease.expires_at}")
    with pytest.raises(LeaseDenied):
        broker.grant(user="bob", roles=frozenset({"viewer"}), server="", pool="research", count=1)
    minor = lease.minors[0]
    manager = CgroupManager.detect(parent="ztlab-gpu-check")
    limits = Limits(memory_bytes=16 << 30, cpus=4, pids=512)
    alice_cg = manager.create(
        "alice", limits=limits, devices=base_device_rules() + gpu_device_rules([minor])
    )
    bob_cg = manager.create("bob", limits=limits, devices=base_device_rules())
    alice, bob = accounts["ztl-gpu-alice"], accounts["ztl-gpu-bob"]
    holder = None
    try:
        # 2. alice's sandbox holds GPU memory on the leased GPU
        code = (
            "import torch, time\n"
            "x = torch.ones(1 << 28, device='cuda')\n"
            "print('ready', torch.cuda.get_device_name(0), flush=True)\n"
            "time.sleep(60)\n"
        )
        argv = sandbox_argv(
            _spec(alice, _device_nodes(minor), {"CUDA_VISIBLE_DEVICES": device.uuid}),
            [sys.executable, "-c", code],
            bwrap=BWRAP,
        )
        holder = subprocess.Popen(
            argv,
            preexec_fn=alice_cg.preexec(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line.startswith("ready"), holder.stderr.read() if holder.stderr else ""
        print(f"alice's sandbox: {line.strip()}")
        # 3. NVML reports the leased process, and it is alice's (in her cgroup)
        deadline = time.monotonic() + 30
        seen: set[int] = set()
        while time.monotonic() < deadline and not (seen & set(alice_cg.procs())):
            seen = {p.pid for p in nvml.processes(device.uuid)}
            time.sleep(0.5)
        print(
            f"NVML processes on {device.uuid}: {sorted(seen)}; alice's cgroup: "
            f"{sorted(alice_cg.procs())}"
        )
        assert seen & set(alice_cg.procs())
        # 4. bob's sandbox has the same device nodes bound but the fence refuses them,
        #    with or without CUDA_VISIBLE_DEVICES
        probe = (
            "import os\n"
            f"try:\n    os.close(os.open('/dev/nvidia{minor}', os.O_RDWR)); print('opened')\n"
            "except OSError as exc:\n    print('errno', exc.errno)\n"
            "import torch\nprint('cuda', torch.cuda.is_available())\n"
        )
        for env in ({}, {"CUDA_VISIBLE_DEVICES": device.uuid}):
            argv = sandbox_argv(
                _spec(bob, _device_nodes(minor), env), [sys.executable, "-c", probe], bwrap=BWRAP
            )
            result = subprocess.run(
                argv,
                preexec_fn=bob_cg.preexec(),
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            print(f"bob's sandbox {env or '(no CUDA_VISIBLE_DEVICES)'}: {result.stdout.strip()!r}")
            assert result.stdout.splitlines() == ["errno 1", "cuda False"], result.stderr
    finally:
        if holder is not None:
            holder.kill()
            holder.wait(30)
        broker.release(lease.id, reason="check done")
        alice_cg.remove()
        bob_cg.remove()
    actions = [action for _, action, _ in records.rows]
    assert "gpu.lease.granted" in actions
    assert "gpu.lease.released" in actions
    print("audited:", actions)
