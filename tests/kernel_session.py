"""A real IPython kernel (the secure kernelspec, through jupyter_client) for tests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from ztlab.kernels.kernelspec import KERNEL_NAME, install


@dataclass
class Outcome:
    """What one cell did: status, printed text, warnings/stderr, and the error if any."""

    status: str
    stdout: str
    stderr: str
    ename: str | None
    evalue: str | None


class Kernel:
    """Run cells in a started kernel."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def run(self, code: str, *, timeout: float = 120) -> Outcome:
        messages: list[dict[str, Any]] = []
        reply = self.client.execute_interactive(code, timeout=timeout, output_hook=messages.append)
        content = reply["content"]
        stdout = "".join(
            m["content"]["text"]
            for m in messages
            if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
        )
        stderr = "".join(
            m["content"]["text"]
            for m in messages
            if m["msg_type"] == "stream" and m["content"]["name"] == "stderr"
        )
        return Outcome(
            content["status"], stdout, stderr, content.get("ename"), content.get("evalue")
        )

    def ok(self, code: str, *, timeout: float = 120) -> str:
        """Run ``code``; fail the test unless it succeeded; its stdout."""
        outcome = self.run(code, timeout=timeout)
        assert outcome.status == "ok", f"{outcome.ename}: {outcome.evalue}\n{outcome.stderr}"
        return outcome.stdout


@contextlib.contextmanager
def secure_kernel(tmp: Path, env: dict[str, str]) -> Iterator[Kernel]:
    """Start the ``ztlab-secure`` kernel with ``env`` added to this environment."""
    path = install(tmp / "kernelspec")
    specs = KernelSpecManager(kernel_dirs=[str(path.parent.parent)])
    manager = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)
    manager.start_kernel(env={**os.environ, **env}, cwd=str(tmp))
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        yield Kernel(client)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
