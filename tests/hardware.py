"""What this machine has, for tests that need hardware (one predicate, used everywhere)."""

from __future__ import annotations

import shutil
from pathlib import Path

#: an NVIDIA GPU with its driver: the control device and nvidia-smi
HAS_GPU = Path("/dev/nvidiactl").exists() and shutil.which("nvidia-smi") is not None
NO_GPU_REASON = "needs an NVIDIA GPU (/dev/nvidiactl, nvidia-smi)"
