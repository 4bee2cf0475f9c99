"""On a real GPU: the ``gpu`` environment, built on the machine's own PyTorch and CuPy, used
inside a sandbox that holds one leased GPU.

A GPU machine here is offline and only small wheels travel to it, so the environment is
built with ``--layer-on`` the interpreter that has PyTorch and CuPy (``ZTLAB_GPU_PYTHON``,
default: this one): the build installs nothing the layer already has, and the lock covers
the layer as it does any build. Requirements of the shipped definition that the machine
lacks (Dask, dask-cuda without a mirror) are printed, not installed. The environment's
interpreter then runs in a sandbox whose device cgroup opens only the leased GPU, with no
``CUDA_VISIBLE_DEVICES``: the fence alone decides what CUDA sees.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.gpu.test_gpu_lease import BWRAP, _device_nodes, accounts, lease_broker
from tests.hardware import HAS_GPU, NO_GPU_REASON
from ztlab.hub.environments.build import BuildPlan, build, check, layer_sites
from ztlab.hub.environments.service import shipped_requirements
from ztlab.hub.sandbox.bwrap import SandboxSpec, sandbox_argv
from ztlab.hub.sandbox.cgroups import CgroupManager, Limits, base_device_rules, gpu_device_rules

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason=NO_GPU_REASON)]

__all__ = ["accounts"]  # the fixture, shared with the lease check

PROBE = """
import torch, cupy
print("cuda", torch.cuda.is_available())
print("count", torch.cuda.device_count())
a = torch.randn(2048, 2048, device="cuda")
b = (a @ a).sum().item()
torch.cuda.synchronize()
print("matmul", b == b)
double = cupy.ElementwiseKernel("float32 x", "float32 y", "y = x * 2", "double")
print("cupy", float(double(cupy.arange(10, dtype=cupy.float32)).sum()))
print("uuid", str(getattr(torch.cuda.get_device_properties(0), "uuid", "")))
"""


def _present(requirements: str, python: str) -> tuple[str, list[str]]:
    """The requirements ``python`` already satisfies (by name), and the others."""
    from packaging.requirements import Requirement

    script = "import importlib.metadata as m\nfor d in m.distributions(): print(d.metadata['Name'])"
    names = (
        subprocess.run([python, "-I", "-c", script], capture_output=True, text=True, check=True)
        .stdout.lower()
        .split()
    )
    have, lack = [], []
    for line in requirements.splitlines():
        text = line.split("#")[0].strip()
        if not text:
            continue
        name = Requirement(text).name.lower()
        (have if name in names else lack).append(name if name in names else text)
    return "".join(f"{n}\n" for n in have), lack


def test_gpu_environment_in_a_sandbox_with_one_leased_gpu(
    accounts: dict[str, pwd.struct_passwd], tmp_path: Path
) -> None:
    python = os.environ.get("ZTLAB_GPU_PYTHON", sys.executable)
    requirements, lacking = _present(shipped_requirements("gpu"), python)
    print(f"\nlayering on {python}; already there: {requirements.split()}; not here: {lacking}")
    root = Path(tempfile.mkdtemp(prefix="ztlab-gpu-envs-"))
    root.chmod(0o755)
    plan = BuildPlan(
        name="gpu",
        build="1",
        requirements=requirements,
        root=root,
        index_url="http://127.0.0.1:9/simple/",  # nothing to fetch: the layer has it
        layer_on=python,
    )
    try:
        built = build(plan, log=print)
        print("lock digest", built.lock.digest)
        assert built.lock.distributions.get("torch")
        _, device, broker, _ = lease_broker(tmp_path)
        lease = broker.grant(
            user="alice", roles=frozenset({"trainer"}), server="", pool="research", count=1
        )
        minor = lease.minors[0]
        manager = CgroupManager.detect(parent="ztlab-gpu-env-check")
        cgroup = manager.create(
            "alice",
            limits=Limits(memory_bytes=16 << 30, cpus=4, pids=512),
            devices=base_device_rules() + gpu_device_rules([minor]),
        )
        alice = accounts["ztl-gpu-alice"]
        binds = {str(plan.path): plan.path}
        binds.update({str(site): site for site in layer_sites(python)})
        spec = SandboxSpec(
            uid=alice.pw_uid,
            gid=alice.pw_gid,
            home=Path(alice.pw_dir),
            devices=_device_nodes(minor),
            binds=binds,
            env={"HOME": alice.pw_dir, "PATH": "/usr/bin:/bin"},
        )
        try:
            argv = sandbox_argv(spec, [str(plan.path / "bin" / "python"), "-c", PROBE], bwrap=BWRAP)
            result = subprocess.run(
                argv,
                preexec_fn=cgroup.preexec(),
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        finally:
            broker.release(lease.id, reason="check done")
            cgroup.remove()
        print(result.stdout, result.stderr[-2000:])
        lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
        assert lines.get("cuda") == "True", result.stderr
        assert lines.get("count") == "1"  # no other GPU is visible
        assert lines.get("matmul") == "True"
        assert lines.get("cupy") == "90.0"
        if lines.get("uuid"):
            assert lines["uuid"].removeprefix("GPU-") in device.uuid
        assert check(plan.path, built.lock, built.files, built.layers) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)
