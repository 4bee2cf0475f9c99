"""Background processes the control plane runs, tracked by pid files.

The hub runs MLflow this way, and ``ztlab up`` the development IdP and the hub itself. Each
process runs in its own session (so that stopping it stops its children too), logs to
``<state_dir>/logs/NAME.log`` and records its pid and start time in
``<state_dir>/run/NAME.pid``. The start time guards against a pid the kernel handed to an
unrelated process after a crash or a reboot: such a pid file is stale, never a target.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ztlab.common.errors import UsageError, ZtlabError


class ProcessError(ZtlabError):
    """A background process could not be started or did not become ready."""


@dataclass
class ManagedProcess:
    """One named background process under ``state_dir``."""

    name: str
    state_dir: Path
    #: the process this object started (``None`` for one found through its pid file)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "run" / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "logs" / f"{self.name}.log"

    def pid(self) -> int | None:
        """The pid if the process is alive, else ``None`` (a stale pid file is removed)."""
        try:
            fields = self.pid_file.read_text().split()
            pid = int(fields[0])
            started = int(fields[1]) if len(fields) > 1 else None
        except (FileNotFoundError, ValueError, IndexError):
            return None
        if not _alive(pid) or (started is not None and _start_time(pid) != started):
            self.pid_file.unlink(missing_ok=True)
            return None
        return pid

    def start(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> int:
        """Start ``argv`` in the background unless it already runs; return its pid."""
        running = self.pid()
        if running is not None:
            return running
        for folder in (self.pid_file.parent, self.log_file.parent):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        finally:
            os.close(fd)
        fd = os.open(self.pid_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{proc.pid} {_start_time(proc.pid)}\n")
        self.process = proc
        return proc.pid

    def running(self) -> bool:
        """Whether the process is alive (started by this object or found by its pid file)."""
        return self.pid() is not None

    def exit_status(self) -> int | None:
        """How the process this object started ended (``None``: running, or not ours)."""
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float = 20) -> bool:
        """Stop the process and its session (TERM, then KILL); True if one was running."""
        pid = self.pid()
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True

    def log_tail(self, lines: int = 30) -> str:
        """The end of the process's log, for error messages."""
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class LocalService:
    """A service process of the control plane on ``127.0.0.1:port`` (MLflow, devpi-server):
    started in its own session with a pid file, stopped with the hub, started again if it
    exits. Subclasses name it (:attr:`name`, the configuration key of its port) and start it.
    """

    #: the process's name under ``<state_dir>/run`` and ``<state_dir>/logs``
    name: ClassVar[str]
    #: the configuration key of its port, for messages
    port_key: ClassVar[str]

    def __init__(self, port: int, state_dir: Path, *, config_source: str) -> None:
        self.port = port
        self._source = config_source
        self._process = ManagedProcess(self.name, state_dir)

    @property
    def url(self) -> str:
        """Where the service listens (127.0.0.1 only)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        """The service's log."""
        return self._process.log_file

    def prepare(self) -> None:
        """Stop what an earlier hub left; refuse a port another process holds.

        The hub calls this before it changes anything on the machine, so a taken port
        leaves nothing behind.
        """
        self._process.stop()
        check_port_free(self.port, key=self.port_key, source=self._source)

    def running(self) -> bool:
        """Whether the service's process is alive."""
        return self._process.running()

    def exit_status(self) -> int | None:
        """How the process this object started ended (``None``: running, or not ours)."""
        return self._process.exit_status()

    def stop(self) -> None:
        """Stop the service and its children."""
        self._process.stop()


def check_port_free(port: int, *, key: str, source: str) -> None:
    """Refuse to start a service when another process holds ``port`` on 127.0.0.1 (the
    service would fail to bind and be started again forever); ``key`` names the setting."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise UsageError(
                f"{source}: {key}: port {port} on 127.0.0.1 is in use by another process",
                hint=f"stop it (`ss -ltnp 'sport = :{port}'` names it) or set {key} to a free port",
            ) from exc


def _start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def die_with_parent(parent: int) -> None:
    """Ask the kernel to end this process (SIGTERM) when ``parent`` does; if ``parent`` is
    already gone, end now. Survives ``exec``, so a wrapper can set it for a program it runs."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: Sequence[str]) -> None:
    """``python -m ztlab.hub.processes PARENT_PID -- COMMAND ...``: run COMMAND so that it
    ends with the process PARENT_PID (the hub), even when that is killed with SIGKILL."""
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        raise SystemExit("usage: python -m ztlab.hub.processes PARENT_PID -- COMMAND ...")
    die_with_parent(int(argv[0]))
    # a service stops on SIGINT (JupyterHub's first signal), even if its parent ignored it
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.execv(argv[2], list(argv[2:]))  # noqa: S606 - the hub's own service command


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
