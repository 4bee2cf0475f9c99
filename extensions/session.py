"""What the kernel knows about its sandbox: read from the environment the spawner set.

Informational only: the values come from the control plane at spawn time, and changing
them changes nothing (the GPU fence is a device cgroup, not this environment).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class SessionInfo:
    """The user's lease as the spawner described it."""

    user: str
    lease: str | None
    gpus: tuple[str, ...]
    pool: str | None


def session_info() -> SessionInfo:
    """Read the session from the environment (``ZTLAB_*``, ``CUDA_VISIBLE_DEVICES``)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return SessionInfo(
        user=os.environ.get("JUPYTERHUB_USER", os.environ.get("USER", "")),
        lease=os.environ.get("ZTLAB_GPU_LEASE") or None,
        gpus=tuple(g for g in visible.split(",") if g),
        pool=os.environ.get("ZTLAB_GPU_POOL") or None,
    )
