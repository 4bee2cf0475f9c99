"""The process sandbox around a user's server: ``setpriv`` then ``bubblewrap``.

:func:`sandbox_argv` turns a :class:`SandboxSpec` into the command line the hub (root)
starts. The chain is::

    [nsenter --net=/run/netns/NAME]     join the user's network namespace (root only)
    setpriv --reuid --regid ...         drop to the user's account: no groups, no caps,
                                        no_new_privs (setuid binaries cannot elevate)
    bwrap ...                           new user, mount, PID, IPC, UTS, cgroup namespaces
    -- COMMAND

``bwrap`` runs unprivileged (Debian's is not setuid) and builds the sandbox's root from
an **allow-list**: the root is an empty tmpfs, remounted read-only at the end, holding

* the system paths of :attr:`SandboxSpec.readonly_paths` bound read-only (symlinks such
  as ``/bin -> usr/bin`` are recreated as symlinks); anything not listed (``/home``,
  ``/root``, ``/run``, ``/var``, ``/srv``, the hub's state) simply does not exist inside;
* :attr:`SandboxSpec.hidden` covered by an empty tmpfs, for secrets that live *under* a
  read-only path (``/etc/ztlab``, a state directory under ``/opt``);
* a private ``/tmp``, ``/var/tmp``, ``/run`` and ``/dev/shm`` (tmpfs), a new ``/proc``
  (PID namespace: only the sandbox's processes) and a minimal ``/dev`` (null, zero, full,
  random, urandom, tty, pts) plus :attr:`SandboxSpec.devices`;
* the user's home, read-write at its own path (no other home is visible), and each
  dataset read-only at its path inside.

Mounts are ordered by depth, so a path always lands on top of its parent whatever order
the spec lists them in. The environment is cleared: the server sees only
:attr:`SandboxSpec.env`.

Without ``netns`` the sandbox gets a network namespace of its own with only loopback
(``--unshare-net``); ``host_network=True`` keeps the caller's network (tests, debugging).

Stopping: ``bwrap`` stays the parent of the sandbox, is the process the caller sees, and
does not forward signals; the spawner stops a sandbox by killing its cgroup. With
``command_is_init`` the command is the sandbox's PID 1, so the sandbox ends when the command
exits, however it exits (nothing it started can stay behind to take over its address);
with ``die_with_parent`` the sandbox also dies when the hub process that started it exits.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TypeAlias

from ztlab.common.errors import ZtlabError

__all__ = [
    "DEFAULT_HIDDEN",
    "DEFAULT_READONLY_PATHS",
    "DeviceBind",
    "SandboxError",
    "SandboxSpec",
    "redact_argv",
    "sandbox_argv",
]

#: System paths bound read-only by default; those missing on the host are skipped and
#: symlinks (merged ``/usr``) are recreated as symlinks. Not ``/opt``: other software and
#: its files live there; the spawner adds the one venv the server runs from.
DEFAULT_READONLY_PATHS: tuple[Path, ...] = tuple(
    Path(p)
    for p in (
        "/usr",
        "/bin",
        "/sbin",
        "/lib",
        "/lib32",
        "/lib64",
        "/libx32",
        "/etc",
        "/sys",
    )
)

#: Paths covered by an empty tmpfs when they exist on the host: the hub's configuration
#: and state. Anything outside the read-only paths is invisible anyway.
DEFAULT_HIDDEN: tuple[Path, ...] = (Path("/etc/ztlab"), Path("/var/lib/ztlab"))

_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_NETNS_NAME = re.compile(r"[A-Za-z0-9_.-]+\Z")
_SECRET_OPTIONS = frozenset({"--setenv"})

#: A device node to expose: a host path bound at the same path, or ``(host, inside)``.
DeviceBind: TypeAlias = Path | tuple[Path, Path]

#: where the environment passed by descriptor lands inside the sandbox (private /run)
ENV_FILE = "/run/ztlab-env"


class SandboxError(ZtlabError):
    """A sandbox could not be described or set up (bad spec, failing system command).

    ``command`` is the failing command line (values of ``--setenv`` masked) and ``stderr``
    what it printed, when a command failed.
    """

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        command: Sequence[str] = (),
        stderr: str = "",
    ) -> None:
        super().__init__(message, hint=hint)
        self.command = list(command)
        self.stderr = stderr


def redact_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of each ``--setenv NAME VALUE`` replaced by ``***``."""
    out = list(argv)
    i = 0
    while i < len(out):
        if out[i] in _SECRET_OPTIONS and i + 2 < len(out):
            out[i + 2] = "***"
            i += 3
            continue
        i += 1
    return out


def _absolute(path: Path | str, what: str) -> Path:
    """``path`` as an absolute, normalised :class:`Path`; refuse ``..`` and relative paths."""
    pure = PurePosixPath(path)
    if not pure.is_absolute() or ".." in pure.parts:
        raise SandboxError(
            f"{what} must be an absolute path without '..', got {str(path)!r}",
            hint="paths in a sandbox spec are absolute host or sandbox paths",
        )
    return Path(os.path.normpath(pure))


def _is_under(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


@dataclass(frozen=True)
class SandboxSpec:
    """What one user's sandbox contains and who runs in it.

    ``uid``/``gid``: the user's dedicated account (never 0). ``home``: the private home,
    bound read-write at the same path (mode 0700, owned by the account). ``datasets``:
    path inside -> host path, bound read-only. ``binds``: other folders bound read-only
    (path inside -> host path: the kernel environments the user may use). ``writable``:
    folders bound read-write (path inside -> host path: a run's own input and output
    folder, made by the control plane and owned by the account). ``devices``:
    device nodes exposed with ``--dev-bind`` (a :class:`~pathlib.Path` for the same path
    inside, or a ``(host, inside)`` pair); access is fenced by the cgroup device rules as well.
    ``env``: the server's whole environment. ``readonly_paths``: the system visible
    read-only. ``hidden``: paths covered by an empty tmpfs (state, configuration).
    ``hostname``: the sandbox's host name (its own UTS namespace).
    """

    uid: int
    gid: int
    home: Path
    datasets: Mapping[str, Path] = field(default_factory=dict)
    binds: Mapping[str, Path] = field(default_factory=dict)
    writable: Mapping[str, Path] = field(default_factory=dict)
    devices: Sequence[DeviceBind] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    readonly_paths: Sequence[Path] = DEFAULT_READONLY_PATHS
    hidden: Sequence[Path] = DEFAULT_HIDDEN
    hostname: str = "ztlab"

    def __post_init__(self) -> None:
        if self.uid <= 0 or self.gid <= 0:
            raise SandboxError(
                f"refusing to run a sandbox as uid {self.uid} gid {self.gid}",
                hint="each user's server runs as its own unprivileged account",
            )
        home = _absolute(self.home, "home")
        system = [_absolute(p, "read-only path") for p in self.readonly_paths]
        if home == Path("/") or any(_is_under(p, home) for p in system):
            raise SandboxError(f"home {str(home)!r} would cover system paths")
        if not _HOSTNAME.match(self.hostname):
            raise SandboxError(f"invalid sandbox hostname {self.hostname!r}")
        for inside in self.datasets:
            if _absolute(inside, "dataset path inside the sandbox") == Path("/"):
                raise SandboxError("a dataset cannot be mounted at '/'")
        for name in self.env:
            if not name or "=" in name or "\0" in name:
                raise SandboxError(f"invalid environment variable name {name!r}")


def _device_pair(device: DeviceBind) -> tuple[Path, Path]:
    if isinstance(device, tuple):
        host, inside = device
    else:
        host = inside = device
    host_path = _absolute(host, "device")
    inside_path = _absolute(inside, "device path inside the sandbox")
    if not _is_under(inside_path, Path("/dev")) or inside_path == Path("/dev"):
        raise SandboxError(f"devices are exposed under /dev, got {str(inside_path)!r}")
    if not (host_path.is_char_device() or host_path.is_block_device()):
        raise SandboxError(f"{str(host_path)!r} is not a device node")
    return host_path, inside_path


#: Fresh, private tmpfs mounts inside the sandbox (not the host's directories).
_PRIVATE_TMPFS = ("/tmp", "/var/tmp", "/run", "/dev/shm")  # noqa: S108

# Priorities among mounts at the same depth: the system first, then what covers it.
_SYSTEM, _PRIVATE, _HIDDEN, _HOME, _DATASET, _DEVICE = range(6)


def _mounts(spec: SandboxSpec) -> list[str]:
    """The ``bwrap`` filesystem options, parents before children."""
    ops: list[tuple[int, int, list[str]]] = []

    def add(dest: Path, prio: int, args: list[str]) -> None:
        ops.append((len(dest.parts), prio, args))

    for raw in spec.readonly_paths:
        path = _absolute(raw, "read-only path")
        if path.is_symlink():
            add(path, _SYSTEM, ["--symlink", str(path.readlink()), str(path)])
        elif path.exists():
            add(path, _SYSTEM, ["--ro-bind", str(path), str(path)])
    add(Path("/proc"), _PRIVATE, ["--proc", "/proc"])
    add(Path("/dev"), _PRIVATE, ["--dev", "/dev"])
    for private in _PRIVATE_TMPFS:
        add(Path(private), _PRIVATE, ["--tmpfs", private])
    home = _absolute(spec.home, "home")
    bound = [Path(args[-1]) for _, _, args in ops if args[0] == "--ro-bind"]
    bound += [home, *(_absolute(inside, "dataset") for inside in spec.datasets)]
    bound += [_absolute(inside, "bind") for inside in [*spec.binds, *spec.writable]]
    for raw in spec.hidden:
        path = _absolute(raw, "hidden path")
        for target in {path, path.resolve()}:
            if target.is_symlink() or not target.exists():
                continue
            if not any(_is_under(target, b) for b in bound):
                continue  # not bound into the sandbox: invisible already
            if target.is_dir():
                add(target, _HIDDEN, ["--tmpfs", str(target)])
            else:
                add(target, _HIDDEN, ["--ro-bind", "/dev/null", str(target)])
    add(home, _HOME, ["--bind", str(home), str(home)])
    for inside, host in sorted(spec.datasets.items()):
        dest = _absolute(inside, "dataset path inside the sandbox")
        add(dest, _DATASET, ["--ro-bind", str(_absolute(host, "dataset")), str(dest)])
    for inside, host in sorted(spec.binds.items()):
        dest = _absolute(inside, "bind path inside the sandbox")
        add(dest, _DATASET, ["--ro-bind", str(_absolute(host, "bind")), str(dest)])
    for inside, host in sorted(spec.writable.items()):
        dest = _absolute(inside, "writable path inside the sandbox")
        add(dest, _DATASET, ["--bind", str(_absolute(host, "writable folder")), str(dest)])
    for device in spec.devices:
        host_dev, inside_dev = _device_pair(device)
        add(inside_dev, _DEVICE, ["--dev-bind", str(host_dev), str(inside_dev)])
    ops.sort(key=lambda op: (op[0], op[1]))
    return [arg for _, _, args in ops for arg in args]


def sandbox_argv(
    spec: SandboxSpec,
    command: Sequence[str],
    *,
    netns: str | None = None,
    bwrap: str = "bwrap",
    host_network: bool = False,
    die_with_parent: bool = True,
    nsenter: str = "nsenter",
    setpriv: str = "setpriv",
    env_fd: int | None = None,
    command_is_init: bool = False,
) -> list[str]:
    """The command line that runs ``command`` as ``spec.uid`` inside the sandbox.

    Run it as root (the hub); put the process into the user's cgroup from a ``preexec_fn``
    first, so the whole chain is limited. ``netns`` is a name under ``/run/netns`` (see
    :class:`ztlab.hub.sandbox.netns.NetworkSegments`) or an absolute path; without it the
    sandbox gets a private loopback-only network unless ``host_network`` is true.

    Values in ``spec.env`` appear on the ``bwrap`` command line, readable in
    ``/proc/PID/cmdline`` by users *on the host* (not from other sandboxes: each has its
    own PID namespace). Mount the host's ``/proc`` with ``hidepid=2`` or pass tokens in a
    file when host users are not trusted.

    ``env_fd`` keeps secrets off every command line: the caller passes (with Popen's
    ``pass_fds``) a descriptor to read the environment from, as ``NAME=VALUE`` shell
    assignments (see :func:`env_file_content`); bubblewrap copies it into a 0600 file in the
    sandbox's private ``/run``, and a shell there exports it, deletes it and execs
    ``command``.

    ``command_is_init`` makes ``command`` the sandbox's PID 1 (``--as-pid-1``): the sandbox
    ends when it exits, whatever it started (a server's kernels, daemons they started).
    Without it bwrap's own init is PID 1 and outlives the command while other processes
    of the sandbox run. Orphans are then re-parented to the command, which may not reap
    them (they stay zombies, counted in the cgroup's ``pids.max``, until it exits).

    Files are checked at call time: read-only and hidden paths missing on the host are
    skipped; devices must exist. Raises :class:`SandboxError` on a bad spec.
    """
    if not command:
        raise SandboxError("no command to run in the sandbox")
    if netns is not None and host_network:
        raise SandboxError("netns and host_network are exclusive")
    argv: list[str] = []
    if netns is not None:
        if netns.startswith("/"):
            ns_path = str(_absolute(netns, "network namespace"))
        elif _NETNS_NAME.match(netns) and netns not in {".", ".."}:
            ns_path = f"/run/netns/{netns}"
        else:
            raise SandboxError(f"invalid network namespace name {netns!r}")
        argv += [nsenter, f"--net={ns_path}"]
    argv += [
        setpriv,
        f"--reuid={spec.uid}",
        f"--regid={spec.gid}",
        "--clear-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ]
    argv += [
        bwrap,
        "--unshare-user",
        "--disable-userns",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
    ]
    if netns is None and not host_network:
        argv.append("--unshare-net")
    if die_with_parent:
        argv.append("--die-with-parent")
    if command_is_init:
        # the command is PID 1 of the sandbox: when it exits, the kernel kills every other
        # process in the sandbox (bwrap's own init would keep them, and their listeners)
        argv.append("--as-pid-1")
    argv += ["--new-session", "--cap-drop", "ALL", "--hostname", spec.hostname]
    argv += _mounts(spec)
    if env_fd is not None:
        argv += ["--perms", "0600", "--file", str(env_fd), ENV_FILE]
    argv += ["--remount-ro", "/", "--chdir", str(_absolute(spec.home, "home")), "--clearenv"]
    for name, value in sorted(spec.env.items()):
        argv += ["--setenv", name, value]
    if env_fd is not None:
        script = f'set -a; . {ENV_FILE}; set +a; rm -f {ENV_FILE}; exec "$@"'
        command = ["/bin/sh", "-c", script, "ztlab-sandbox", *command]
    argv += ["--", *command]
    return argv


def env_file_content(env: Mapping[str, str]) -> bytes:
    """The environment as shell assignments, for :func:`sandbox_argv`'s ``env_fd``."""
    lines = []
    for name, value in sorted(env.items()):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise SandboxError(f"invalid environment variable name {name!r}")
        lines.append(f"{name}={shlex.quote(value)}\n")
    return "".join(lines).encode()
