"""Start one process in a sandbox: as its account, in its cgroup and network namespace.

What the spawner does for a user's server and the local compute backend for each process
of a user's cluster: the whole ``nsenter``/``setpriv``/``bwrap`` chain
(:func:`~ztlab.hub.sandbox.bwrap.sandbox_argv`) joins the cgroup before it execs anything,
its environment comes through a pipe (no secret on a command line), and its output goes to
a log only the control plane may read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ztlab.hub.private import private_directory
from ztlab.hub.sandbox.bwrap import SandboxError, env_file_content, sandbox_argv

if TYPE_CHECKING:
    from ztlab.common.config import ZtlabConfig
    from ztlab.hub.sandbox.bwrap import SandboxSpec
    from ztlab.hub.sandbox.cgroups import UserCgroup


def sandbox_tools(bwrap: str) -> dict[str, str]:
    """``bwrap``, ``nsenter`` and ``setpriv`` resolved to paths; :class:`SandboxError`
    naming the Debian package of a missing one."""
    found: dict[str, str] = {}
    for name, program in (("bwrap", bwrap), ("nsenter", "nsenter"), ("setpriv", "setpriv")):
        path = shutil.which(program)
        if path is None:
            package = "bubblewrap" if name == "bwrap" else "util-linux"
            raise SandboxError(
                f"{program} is not installed on this hub",
                hint=f"install the Debian package {package} (`make up` does) or set "
                "[sandbox] bwrap to its path",
            )
        found[name] = path
    return found


#: what the NVIDIA driver needs besides each GPU's own node (given with any GPU)
NVIDIA_SHARED_NODES = (
    Path("/dev/nvidiactl"),
    Path("/dev/nvidia-uvm"),
    Path("/dev/nvidia-uvm-tools"),
)


def gpu_device_nodes(minors: Sequence[int]) -> list[Path]:
    """The device nodes a sandbox with the GPUs ``minors`` is given: ``/dev/nvidiaN`` for
    each and the driver's shared nodes (none without a GPU), those that exist."""
    if not minors:
        return []
    wanted = [Path(f"/dev/nvidia{minor}") for minor in minors] + list(NVIDIA_SHARED_NODES)
    return [path for path in wanted if path.exists()]


def hidden_from_users(config: ZtlabConfig) -> list[Path]:
    """What no user's sandbox sees: the control plane's state, its configuration, the
    cgroup tree (other users' names, processes and usage) and the environments' root (the
    granted builds are bound over it)."""
    return [
        config.state_dir,
        Path("/etc/ztlab"),
        Path("/sys/fs/cgroup"),
        config.environments.root,
    ]


def readonly_paths(system: Sequence[Path]) -> tuple[Path, ...]:
    """The system, plus the venv (which holds ztlab itself) where it lives outside it."""
    venv = Path(sys.prefix).resolve()
    if any(venv == p or venv.is_relative_to(p) for p in system):
        return tuple(system)
    return (*system, venv)


def start_sandboxed(
    *,
    spec: SandboxSpec,
    command: Sequence[str],
    env: Mapping[str, str],
    netns: str,
    cgroup: UserCgroup,
    log: Path,
    tools: Mapping[str, str],
) -> subprocess.Popen[bytes]:
    """Start ``command`` in its sandbox; its output in ``log`` (0600, control plane)."""
    private_directory(log.parent, what="log directory")
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    read_end, write_end = os.pipe()
    try:
        try:
            os.write(write_end, env_file_content(env))
        finally:
            os.close(write_end)
        argv = sandbox_argv(
            spec,
            list(command),
            netns=netns,
            env_fd=read_end,
            die_with_parent=False,  # sandboxed processes outlive a hub restart
            command_is_init=True,  # ... but not their own main process
            bwrap=tools["bwrap"],
            nsenter=tools["nsenter"],
            setpriv=tools["setpriv"],
        )
        # the child joins the cgroup before it execs anything (needs root)
        return subprocess.Popen(
            argv,
            preexec_fn=cgroup.preexec(),
            pass_fds=(read_end,),
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            start_new_session=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
    finally:
        os.close(read_end)
        os.close(log_fd)
