"""The secure kernelspec: the default kernel inside each user's sandbox.

``ztlab-secure`` starts IPython with the ztlab extension preloaded (``ztlab.extensions``).
The kernel inherits its server's environment, which carries the GPU lease
(``CUDA_VISIBLE_DEVICES``, ``ZTLAB_GPU_LEASE``); the fence itself is the sandbox's device
cgroup, so unsetting the variable reaches no other GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

KERNEL_NAME = "ztlab-secure"


def kernelspec(python: str | None = None) -> dict[str, Any]:
    """The ``kernel.json`` contents for the interpreter ``python`` (default: this one)."""
    return {
        "argv": [
            python or sys.executable,
            "-m",
            "ipykernel_launcher",
            "-f",
            "{connection_file}",
            "--IPKernelApp.extensions=['ztlab.extensions']",
        ],
        "display_name": "Python 3 (zerotrust-lab)",
        "language": "python",
        "metadata": {"debugger": False, "ztlab": {"secure": True}},
    }


def install(prefix: Path, *, python: str | None = None) -> Path:
    """Write the kernelspec under ``PREFIX/share/jupyter/kernels/ztlab-secure``."""
    folder = prefix / "share" / "jupyter" / "kernels" / KERNEL_NAME
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "kernel.json"
    path.write_text(json.dumps(kernelspec(python), indent=1) + "\n")
    path.chmod(0o644)
    return path
