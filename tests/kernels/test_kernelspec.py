"""The secure kernelspec in a real kernel (jupyter_client): extension preloaded, lease seen."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from ztlab.kernels.kernelspec import KERNEL_NAME, install


def test_the_secure_kernel_preloads_the_extension(tmp_path: Path) -> None:
    path = install(tmp_path)
    assert path.parent.name == KERNEL_NAME
    specs = KernelSpecManager(kernel_dirs=[str(path.parent.parent)])
    manager = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)
    env = dict(
        os.environ,
        CUDA_VISIBLE_DEVICES="0",
        ZTLAB_GPU_LEASE="lease-1",
        ZTLAB_GPU_POOL="research",
        JUPYTERHUB_USER="alice",
    )
    manager.start_kernel(env=env)
    client = manager.client()
    client.start_channels()
    outputs: list[dict[str, Any]] = []
    try:
        client.wait_for_ready(timeout=60)
        reply = client.execute_interactive(
            "print(ztlab_session.user, ztlab_session.lease, ztlab_session.gpus, "
            "ztlab_session.pool)",
            timeout=30,
            output_hook=outputs.append,
        )
        assert reply["content"]["status"] == "ok"
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    text = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
    assert text.strip() == "alice lease-1 ('0',) research"
