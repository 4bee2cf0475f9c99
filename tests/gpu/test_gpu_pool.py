"""On a real GPU: a pool's worker runs CuPy for its owner over TLS; a stranger is refused.

Runs only where an NVIDIA GPU is present (skipped with the reason otherwise). The worker is
a dask-cuda worker where dask-cuda imports (``[gpu]`` extra), else a plain worker with the
GPU made visible to it; either way the owner's task runs on the GPU and another user's
certificate of the same pool is refused by the scheduler. The CPU path of the same code
runs in CI (tests/kernels/test_cluster_processes.py, tests/hub/test_pools_e2e.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hardware import HAS_GPU, NO_GPU_REASON
from tests.poolcluster import Running, run_as, running_cluster
from ztlab.common.poolidentity import user_identity

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason=NO_GPU_REASON)]


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_cluster(tmp_path_factory.mktemp("gpu-cluster"), gpus=["0"]) as run:
        yield run


def cupy_workload(n: int) -> str:
    """A reduction on the GPU the worker sees; the device's name and the sum."""
    import cupy

    values = cupy.arange(n, dtype=cupy.float64)
    total = float((values * 2).sum())
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    return f"{name}|{total:.0f}"


def test_the_owner_runs_cupy_on_the_gpu_over_tls(gpu_cluster: Running, tmp_path: Path) -> None:
    outcome = run_as(
        gpu_cluster, user_identity("research", "alice"), tmp_path, cupy_workload, 10**7
    )
    assert outcome.startswith("ran "), outcome + "".join(
        p.read_text()[-2000:] for p in gpu_cluster.logs
    )
    name, total = outcome.removeprefix("ran ").split("|")
    assert total == str(10**7 * (10**7 - 1))
    assert name  # e.g. "NVIDIA H100 80GB HBM3"
    print(f"pool worker GPU: {name}")


def test_another_users_certificate_is_refused(gpu_cluster: Running, tmp_path: Path) -> None:
    outcome = run_as(gpu_cluster, user_identity("research", "bob"), tmp_path, cupy_workload, 10)
    assert outcome.startswith("refused"), outcome
