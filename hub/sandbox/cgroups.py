"""Per-user cgroups: memory, CPU and pids limits, and a device allow-list fenced in the kernel.

Each user's server runs in a cgroup ``<parent>/<name>`` (``ztlab/ztl-alice``) that limits

* **memory**: exceeding it OOM-kills a process *in that cgroup only*; swap cannot be used
  to escape the limit (v1 ``memory.memsw.limit_in_bytes``, v2 ``memory.swap.max = 0``);
* **CPU**: a CFS quota of ``cpus`` CPUs per 100 ms period;
* **pids**: tasks (processes and threads), so a fork bomb stays inside its cgroup;
* **devices**: only :func:`base_device_rules` plus the rules passed to
  :meth:`CgroupManager.create` (for a GPU lease, :func:`gpu_device_rules`) may be opened or
  created with ``mknod``; everything else fails with ``EPERM``. This is enforced by the
  kernel (v1 ``devices`` controller, v2 a BPF device program), not by environment
  variables such as ``CUDA_VISIBLE_DEVICES``, which a user can change.

Two layouts are supported and told apart by :meth:`CgroupManager.detect` from the mount
table:

``v2``
    ``/sys/fs/cgroup`` is a cgroup2 mount whose ``cgroup.controllers`` offers ``memory``,
    ``pids`` and ``cpu``; they are enabled in ``cgroup.subtree_control`` from the root down
    to the parent. Devices are fenced by a :class:`DeviceFence` on the user's directory.
``v1``
    otherwise: ``memory``, ``cpu``, ``pids`` and ``devices`` must each be mounted as a
    cgroup v1 hierarchy (``freezer`` is used when present, to stop a fork bomb while it is
    being killed). A user's cgroup is one directory per hierarchy. A cgroup2 mount beside
    them (``/sys/fs/cgroup/unified`` on "hybrid" machines) has no controllers and is not
    used; :class:`DeviceFence` works on it all the same, which is how the v2 device path
    is tested on such machines.

The control plane (root) calls this module; the user's server never sees it. Processes
join a cgroup either from the parent (:meth:`UserCgroup.add_process`) or, with no window in
which they run unconfined, from a ``Popen`` ``preexec_fn`` (:meth:`UserCgroup.preexec`):
run that *before* dropping privileges.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ztlab.common.errors import ZtlabError
from ztlab.hub.sandbox import _devbpf

__all__ = [
    "CgroupError",
    "CgroupManager",
    "DeviceFence",
    "DeviceRule",
    "Limits",
    "UserCgroup",
    "base_device_rules",
    "gpu_device_rules",
]

#: CFS period in microseconds (both versions); the quota is ``cpus`` times this
CFS_PERIOD_US = 100_000
#: the kernel's smallest CFS quota (1 ms)
_MIN_QUOTA_US = 1_000
#: the major number of the NVIDIA driver's /dev/nvidiaN and /dev/nvidiactl
NVIDIA_MAJOR = 195
NVIDIACTL_MINOR = 255

_NAME = re.compile(r"[a-z0-9_-]{1,255}\Z")
_PARENT_PART = re.compile(r"[A-Za-z0-9_.@-]{1,255}\Z")
_V1_REQUIRED = ("memory", "cpu", "pids", "devices")
_V1_OPTIONAL = ("freezer",)
_V2_REQUIRED = ("memory", "pids", "cpu")
_KILL_TIMEOUT_S = 10.0


class CgroupError(ZtlabError):
    """A cgroup could not be detected, created, configured, joined, killed or removed."""


# --- what to limit -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Resource limits of one user's cgroup; every value must be positive.

    ``memory_bytes`` caps RAM (swap is not allowed on top), ``cpus`` is the CPU time per
    wall-clock time (``1.5`` = one and a half CPUs; at least 0.01, the kernel's 1 ms quota
    per 100 ms period), ``pids`` caps the number of tasks (processes and threads).
    """

    memory_bytes: int
    cpus: float
    pids: int

    def __post_init__(self) -> None:
        for key in ("memory_bytes", "pids"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise CgroupError(f"Limits.{key} must be a positive integer, got {value!r}")
        cpus = self.cpus
        if isinstance(cpus, bool) or not isinstance(cpus, int | float) or not math.isfinite(cpus):
            raise CgroupError(f"Limits.cpus must be a finite number, got {cpus!r}")
        if cpus * CFS_PERIOD_US < _MIN_QUOTA_US:
            raise CgroupError(
                f"Limits.cpus must be at least {_MIN_QUOTA_US / CFS_PERIOD_US} "
                f"(a 1 ms quota per 100 ms period), got {cpus!r}"
            )

    @property
    def cpu_quota_us(self) -> int:
        """The CFS quota in microseconds per :data:`CFS_PERIOD_US`."""
        return round(self.cpus * CFS_PERIOD_US)


_ACCESS_BITS = {
    "r": _devbpf.BPF_DEVCG_ACC_READ,
    "w": _devbpf.BPF_DEVCG_ACC_WRITE,
    "m": _devbpf.BPF_DEVCG_ACC_MKNOD,
}


@dataclass(frozen=True, kw_only=True)
class DeviceRule:
    """One allowed device: ``kind`` "c" (character) or "b" (block), ``major``, ``minor``
    (``None`` = every minor of that major) and ``access``, a subset of "rwm"
    (read, write, mknod)."""

    kind: Literal["c", "b"]
    major: int
    minor: int | None
    access: str = "rwm"

    def __post_init__(self) -> None:
        if self.kind not in ("c", "b"):
            raise CgroupError(f"DeviceRule.kind must be 'c' or 'b', got {self.kind!r}")
        if not _is_int(self.major) or not 0 <= self.major < 1 << 12:
            raise CgroupError(f"DeviceRule.major must be in 0..4095, got {self.major!r}")
        if self.minor is not None and (not _is_int(self.minor) or not 0 <= self.minor < 1 << 20):
            raise CgroupError(f"DeviceRule.minor must be in 0..1048575 or None, got {self.minor!r}")
        access = self.access
        if not access or set(access) - set("rwm") or len(set(access)) != len(access):
            raise CgroupError(
                f"DeviceRule.access must be a non-empty subset of 'rwm', got {access!r}"
            )

    def v1_line(self) -> str:
        """The rule as written to v1 ``devices.allow``: ``c 195:0 rwm``."""
        minor = "*" if self.minor is None else str(self.minor)
        return f"{self.kind} {self.major}:{minor} {self.access}"

    def bpf_rule(self) -> _devbpf.Rule:
        """The rule as the BPF program builder takes it."""
        dev_type = _devbpf.BPF_DEVCG_DEV_CHAR if self.kind == "c" else _devbpf.BPF_DEVCG_DEV_BLOCK
        mask = 0
        for char in self.access:
            mask |= _ACCESS_BITS[char]
        return _devbpf.Rule(dev_type, self.major, self.minor, mask)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def base_device_rules() -> list[DeviceRule]:
    """The devices every server needs, and no more.

    ``/dev/null`` 1:3, ``zero`` 1:5, ``full`` 1:7, ``random`` 1:8, ``urandom`` 1:9, ``tty``
    5:0, ``ptmx`` 5:2 and the pseudo-terminals ``pts`` 136:* (terminals in JupyterLab).
    Not ``1:*``: that major also holds ``/dev/mem`` (1:1), ``/dev/port`` (1:4) and
    ``/dev/kmsg`` (1:11), which no notebook needs and an escape would want.
    """
    return [
        DeviceRule(kind="c", major=1, minor=3),  # /dev/null
        DeviceRule(kind="c", major=1, minor=5),  # /dev/zero
        DeviceRule(kind="c", major=1, minor=7),  # /dev/full
        DeviceRule(kind="c", major=1, minor=8),  # /dev/random
        DeviceRule(kind="c", major=1, minor=9),  # /dev/urandom
        DeviceRule(kind="c", major=5, minor=0),  # /dev/tty
        DeviceRule(kind="c", major=5, minor=2),  # /dev/ptmx
        DeviceRule(kind="c", major=136, minor=None),  # /dev/pts/*
    ]


def gpu_device_rules(
    minors: Sequence[int], *, proc_devices: Path = Path("/proc/devices")
) -> list[DeviceRule]:
    """The devices a server needs to use the leased GPUs ``/dev/nvidiaN`` for N in ``minors``.

    Always ``/dev/nvidiactl`` (195:255) and each ``/dev/nvidiaN`` (195:N, N in 0..253).
    ``nvidia-uvm`` has a dynamic major, read from the "Character devices" section of
    ``proc_devices``: ``/dev/nvidia-uvm`` is its minor 0 and ``/dev/nvidia-uvm-tools`` its
    minor 1. Without the driver loaded (a GPU-less machine) that entry is absent and these
    two are skipped. ``/dev/nvidia-modeset`` (195:254) is for display, not compute, and is
    left out; so are ``/dev/nvidia-caps`` (MIG), which a MIG-aware lease must add.
    """
    rules = [DeviceRule(kind="c", major=NVIDIA_MAJOR, minor=NVIDIACTL_MINOR)]
    majors = _char_majors(proc_devices)
    uvm = majors.get("nvidia-uvm")
    if uvm is not None:
        rules.append(DeviceRule(kind="c", major=uvm, minor=0))  # /dev/nvidia-uvm
        rules.append(DeviceRule(kind="c", major=uvm, minor=1))  # /dev/nvidia-uvm-tools
    for minor in sorted(set(minors)):
        if not _is_int(minor) or not 0 <= minor <= 253:
            raise CgroupError(f"GPU minor numbers must be in 0..253 (/dev/nvidiaN), got {minor!r}")
        rules.append(DeviceRule(kind="c", major=NVIDIA_MAJOR, minor=minor))
    return rules


def _char_majors(proc_devices: Path) -> dict[str, int]:
    """Name -> major of the character devices listed in a ``/proc/devices`` file."""
    try:
        text = proc_devices.read_text()
    except OSError as exc:
        raise CgroupError(f"cannot read {proc_devices}: {exc.strerror}") from exc
    majors: dict[str, int] = {}
    section = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith(":"):
            section = stripped
            continue
        parts = stripped.split(maxsplit=1)
        if section == "Character devices:" and len(parts) == 2 and parts[0].isdigit():
            majors.setdefault(parts[1], int(parts[0]))
    return majors


def _merge_rules(*groups: Iterable[DeviceRule]) -> list[DeviceRule]:
    seen: set[DeviceRule] = set()
    merged: list[DeviceRule] = []
    for group in groups:
        for rule in group:
            if rule not in seen:
                seen.add(rule)
                merged.append(rule)
    return merged


# --- small file helpers ------------------------------------------------------------------


def _write(path: Path, value: str, *, what: str) -> None:
    """Write ``value`` to a control file in one write(2); errors name the file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise CgroupError(
            f"cannot {what}: writing {value!r} to {path} failed: {exc.strerror} "
            f"({errno.errorcode.get(exc.errno or 0, exc.errno)})"
        ) from exc


def _read(path: Path, *, what: str) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise CgroupError(f"cannot {what}: reading {path} failed: {exc.strerror}") from exc


def _keyed(text: str, key: str, path: Path) -> int:
    """The value of ``key`` in a flat-keyed control file (``oom_kill 3``)."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return int(parts[1])
    raise CgroupError(f"{path} has no {key!r} line (kernel too old?)")


def _swap_active(proc_swaps: Path = Path("/proc/swaps")) -> bool:
    try:
        return len(proc_swaps.read_text().strip().splitlines()) > 1
    except OSError:
        return False


def _require_no_swap_escape(missing: Path) -> None:
    if _swap_active():
        raise CgroupError(
            f"{missing} does not exist but swap is enabled: a user could escape the memory "
            "limit into swap",
            hint="enable swap accounting (kernel option swapaccount=1) or turn swap off",
        )


# --- the device fence (cgroup v2) -----------------------------------------------------------


class DeviceFence:
    """A kernel device allow-list on one cgroup2 directory, as a BPF device program.

    :meth:`apply` loads a ``BPF_PROG_TYPE_CGROUP_DEVICE`` program allowing exactly the given
    rules (everything else is denied) and attaches it with ``BPF_F_ALLOW_MULTI``; the
    programs it replaces are detached only after the new one is in place (the kernel allows
    an access only if every attached program does, so there is no window with fewer
    restrictions). The attachment outlives this object and the hub process; it ends with
    :meth:`clear` or when the directory is removed. Works on any cgroup2 mount, including
    the controller-less ``/sys/fs/cgroup/unified`` of a hybrid machine. Needs root (or
    CAP_BPF and CAP_SYS_ADMIN) and a kernel with ``CONFIG_CGROUP_BPF``.
    """

    def __init__(self, *, cgroup_dir: Path) -> None:
        self.cgroup_dir = cgroup_dir

    def apply(self, rules: Sequence[DeviceRule]) -> None:
        """Allow exactly ``rules`` (no base rules are added here) and deny every other device."""
        with self._dir_fd() as dir_fd:
            old = self._query(dir_fd)
            try:
                prog_fd = _devbpf.load_program([rule.bpf_rule() for rule in rules])
            except _devbpf.BpfError as exc:
                hint = exc.log.strip()[-2000:] if exc.log else None
                raise CgroupError(
                    f"cannot load the device program for {self.cgroup_dir}: {exc}",
                    hint=hint or "needs root (CAP_BPF, CAP_SYS_ADMIN) and CONFIG_CGROUP_BPF",
                ) from exc
            try:
                _devbpf.attach(dir_fd, prog_fd)
            except _devbpf.BpfError as exc:
                raise CgroupError(
                    f"cannot attach the device program to {self.cgroup_dir}: {exc}",
                    hint="is it a directory of a cgroup2 mount?",
                ) from exc
            finally:
                os.close(prog_fd)
            self._detach(dir_fd, old)

    def clear(self) -> None:
        """Detach every device program attached directly to the directory."""
        with self._dir_fd() as dir_fd:
            self._detach(dir_fd, self._query(dir_fd))

    def program_ids(self) -> list[int]:
        """The ids of the device programs attached directly to the directory."""
        with self._dir_fd() as dir_fd:
            return self._query(dir_fd)

    @contextlib.contextmanager
    def _dir_fd(self) -> Iterator[int]:
        try:
            fd = os.open(self.cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise CgroupError(
                f"cannot open cgroup directory {self.cgroup_dir}: {exc.strerror}"
            ) from exc
        try:
            yield fd
        finally:
            os.close(fd)

    def _query(self, dir_fd: int) -> list[int]:
        try:
            return _devbpf.query(dir_fd)
        except _devbpf.BpfError as exc:
            raise CgroupError(
                f"cannot list the device programs of {self.cgroup_dir}: {exc}",
                hint="is it a directory of a cgroup2 mount?",
            ) from exc

    def _detach(self, dir_fd: int, prog_ids: Sequence[int]) -> None:
        for prog_id in prog_ids:
            try:
                prog_fd = _devbpf.prog_fd_by_id(prog_id)
            except _devbpf.BpfError as exc:
                if exc.errno == errno.ENOENT:  # already gone
                    continue
                raise CgroupError(f"cannot open device program {prog_id}: {exc}") from exc
            try:
                _devbpf.detach(dir_fd, prog_fd)
            except _devbpf.BpfError as exc:
                if exc.errno != errno.ENOENT:
                    raise CgroupError(
                        f"cannot detach device program {prog_id} from {self.cgroup_dir}: {exc}"
                    ) from exc
            finally:
                os.close(prog_fd)


# --- layout detection --------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    version: Literal["v1", "v2"]
    #: v1: controller -> mount point; v2: {"unified": mount point}
    hierarchies: Mapping[str, Path]


def _unescape_mount(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _layout_from_mounts(mounts: str, root: Path) -> _Layout:
    """Choose the layout from a mount table (``/proc/self/mounts`` format)."""
    v1: dict[str, Path] = {}
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        mount_point, fstype, options = Path(_unescape_mount(parts[1])), parts[2], parts[3]
        if fstype == "cgroup2" and mount_point == root:
            return _Layout("v2", {"unified": mount_point})
        if fstype == "cgroup":
            under_root = mount_point.is_relative_to(root)
            for option in options.split(","):
                if option not in _V1_REQUIRED + _V1_OPTIONAL:
                    continue
                # the first mount of each controller, preferring those under ``root``
                if option not in v1 or (under_root and not v1[option].is_relative_to(root)):
                    v1[option] = mount_point
    missing = [name for name in _V1_REQUIRED if name not in v1]
    if not v1:
        raise CgroupError(
            f"no cgroup filesystem found: {root} is not a cgroup2 mount and no cgroup v1 "
            "controllers are mounted",
            hint=f"mount cgroup2 on {root} (mount -t cgroup2 none {root})",
        )
    if missing:
        mounted = ", ".join(sorted(v1)) or "none"
        raise CgroupError(
            f"cgroup v1 is missing controllers {', '.join(missing)} (mounted: {mounted}); "
            f"{root} is not a cgroup2 mount either",
            hint=f"mount each, e.g. mount -t cgroup -o {missing[0]} cgroup {root}/{missing[0]}",
        )
    order = _V1_REQUIRED + _V1_OPTIONAL
    return _Layout("v1", {name: v1[name] for name in order if name in v1})


# --- manager -----------------------------------------------------------------------------


class CgroupManager:
    """Creates and finds the users' cgroups under one parent (``ztlab``).

    Build it with :meth:`detect`; the constructor takes an already-chosen layout.
    """

    def __init__(
        self, *, version: Literal["v1", "v2"], hierarchies: Mapping[str, Path], parent: str
    ) -> None:
        _check_parent(parent)
        self.version: Literal["v1", "v2"] = version
        self.parent = parent
        self._hierarchies = dict(hierarchies)
        #: the parent's directory in each hierarchy (one on v2)
        self.parent_paths: tuple[Path, ...] = tuple(
            dict.fromkeys(mount / parent for mount in self._hierarchies.values())
        )

    @classmethod
    def detect(
        cls,
        *,
        parent: str = "ztlab",
        root: Path = Path("/sys/fs/cgroup"),
        mounts: Path = Path("/proc/self/mounts"),
    ) -> CgroupManager:
        """Find the layout of this machine and prepare the parent cgroup.

        "v2" if ``root`` is a cgroup2 mount offering memory, pids and cpu (enabled on the
        way down to ``parent`` in ``cgroup.subtree_control``), else "v1" if memory, cpu,
        pids and devices are mounted as v1 hierarchies. Raises :class:`CgroupError` saying
        precisely what is missing otherwise.
        """
        _check_parent(parent)
        layout = _layout_from_mounts(_read(mounts, what="read the mount table"), root)
        manager = cls(version=layout.version, hierarchies=layout.hierarchies, parent=parent)
        if layout.version == "v2":
            manager._prepare_v2(root)
        else:
            for path in manager.parent_paths:
                _mkdirs(path)
        return manager

    def _prepare_v2(self, root: Path) -> None:
        controllers = _read(root / "cgroup.controllers", what="list the cgroup2 controllers")
        available = controllers.split()
        missing = [name for name in _V2_REQUIRED if name not in available]
        if missing:
            raise CgroupError(
                f"cgroup v2 at {root} lacks controllers {', '.join(missing)} "
                f"(available: {' '.join(available) or 'none'})",
                hint="they may be bound to a cgroup v1 hierarchy, or not delegated to us",
            )
        enable = " ".join(f"+{name}" for name in _V2_REQUIRED)
        current = root
        for part in Path(self.parent).parts:
            _write(
                current / "cgroup.subtree_control", enable, what=f"enable controllers in {current}"
            )
            current = current / part
            _mkdirs(current)
        _write(current / "cgroup.subtree_control", enable, what=f"enable controllers in {current}")

    def _dirs(self, name: str) -> dict[str, Path]:
        _check_name(name)
        return {key: mount / self.parent / name for key, mount in self._hierarchies.items()}

    def create(
        self, name: str, *, limits: Limits, devices: Sequence[DeviceRule] | None = None
    ) -> UserCgroup:
        """Create (or update) the cgroup ``name`` with ``limits``.

        The devices allowed are :func:`base_device_rules` plus ``devices``. Calling it again
        re-applies the limits and device rules to the existing cgroup. If a new cgroup
        cannot be configured completely, what this call created is removed again.
        """
        dirs = self._dirs(name)
        rules = _merge_rules(base_device_rules(), devices or ())
        created: list[Path] = []
        try:
            for path in dict.fromkeys(dirs.values()):
                if not path.is_dir():
                    _mkdirs(path)
                    created.append(path)
            if self.version == "v2":
                _configure_v2(dirs["unified"], limits, rules)
            else:
                _configure_v1(dirs, limits, rules)
        except BaseException:
            for path in reversed(created):
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise
        return UserCgroup(name=name, version=self.version, dirs=dirs)

    def get(self, name: str) -> UserCgroup | None:
        """The cgroup ``name`` if its directory exists in any hierarchy, else ``None``.

        (A cgroup missing from some hierarchy fails closed: joining it raises.)
        """
        dirs = self._dirs(name)
        if not any(path.is_dir() for path in dirs.values()):
            return None
        return UserCgroup(name=name, version=self.version, dirs=dirs)

    def names(self) -> list[str]:
        """The names of the user cgroups that exist under the parent."""
        found: set[str] = set()
        for parent in self.parent_paths:
            with contextlib.suppress(FileNotFoundError):
                found.update(
                    entry.name
                    for entry in parent.iterdir()
                    if entry.is_dir() and _NAME.match(entry.name)
                )
        return sorted(found)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise CgroupError(
            f"invalid cgroup name {name!r}: use 1-255 characters from a-z, 0-9, '_' and '-'"
        )


def _check_parent(parent: str) -> None:
    parts = parent.split("/") if isinstance(parent, str) else [""]
    if not all(_PARENT_PART.match(part) and part not in (".", "..") for part in parts):
        raise CgroupError(
            f"invalid cgroup parent {parent!r}: use a relative path of names made of "
            "letters, digits, '_', '.', '@' and '-'"
        )


def _mkdirs(path: Path) -> None:
    try:
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise CgroupError(f"cannot create cgroup directory {path}: {exc.strerror}") from exc


def _v1_memory(path: Path, memory_bytes: int) -> None:
    limit = path / "memory.limit_in_bytes"
    memsw = path / "memory.memsw.limit_in_bytes"
    what = "set the memory limit"
    _write(path / "memory.oom_control", "0", what="keep the OOM killer enabled")
    if not memsw.exists():
        _require_no_swap_escape(memsw)
        _write(limit, str(memory_bytes), what=what)
        return
    # memory+swap must never be below memory: raise it first when growing, last when shrinking
    current = int(_read(memsw, what=what).strip())
    if memory_bytes > current:
        _write(memsw, str(memory_bytes), what="set the memory+swap limit")
        _write(limit, str(memory_bytes), what=what)
    else:
        _write(limit, str(memory_bytes), what=what)
        _write(memsw, str(memory_bytes), what="set the memory+swap limit")


def _configure_v1(dirs: Mapping[str, Path], limits: Limits, rules: Sequence[DeviceRule]) -> None:
    _v1_memory(dirs["memory"], limits.memory_bytes)
    cpu = dirs["cpu"]
    _write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US), what="set the CPU period")
    _write(cpu / "cpu.cfs_quota_us", str(limits.cpu_quota_us), what="set the CPU quota")
    _write(dirs["pids"] / "pids.max", str(limits.pids), what="set the pids limit")
    devices = dirs["devices"]
    _write(devices / "devices.deny", "a", what="deny all devices")
    for rule in rules:
        _write(devices / "devices.allow", rule.v1_line(), what="allow a device")
    if "freezer" in dirs:  # a kill_all that died half-way may have left it frozen
        _write(dirs["freezer"] / "freezer.state", "THAWED", what="thaw the cgroup")


def _v2_files(limits: Limits) -> dict[str, str]:
    """The cgroup v2 control files :meth:`CgroupManager.create` writes, with their values."""
    return {
        "memory.max": str(limits.memory_bytes),
        "memory.swap.max": "0",
        "cpu.max": f"{limits.cpu_quota_us} {CFS_PERIOD_US}",
        "pids.max": str(limits.pids),
    }


def _configure_v2(path: Path, limits: Limits, rules: Sequence[DeviceRule]) -> None:
    for filename, value in _v2_files(limits).items():
        target = path / filename
        if filename == "memory.swap.max" and not target.exists():
            _require_no_swap_escape(target)
            continue
        _write(target, value, what=f"set {filename}")
    DeviceFence(cgroup_dir=path).apply(rules)


# --- one user's cgroup -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class UserCgroup:
    """One user's cgroup: a directory per hierarchy (one on v2). Get it from the manager."""

    name: str
    version: Literal["v1", "v2"]
    #: controller (v1) or "unified" (v2) -> directory
    dirs: Mapping[str, Path] = field(repr=False, hash=False)

    @property
    def paths(self) -> tuple[Path, ...]:
        """The cgroup's directories, one per hierarchy (co-mounted controllers share one)."""
        return tuple(dict.fromkeys(self.dirs.values()))

    def add_process(self, pid: int) -> None:
        """Move process ``pid`` (with all its threads) into the cgroup in every hierarchy."""
        for path in self.paths:
            _write(path / "cgroup.procs", str(pid), what=f"move process {pid} into {self.name}")

    def preexec(self) -> Callable[[], None]:
        """A ``Popen(preexec_fn=...)`` that moves the child into the cgroup before ``exec``.

        It only calls os.open/os.write/os.close on paths computed here, so it is safe in
        the forked child. Put it before any privilege drop; if it fails, ``Popen`` raises
        and the program never runs outside its cgroup.
        """
        files = tuple(os.fsencode(path / "cgroup.procs") for path in self.paths)

        def join() -> None:
            pid = b"%d" % os.getpid()
            for file in files:
                fd = os.open(file, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, pid)
                finally:
                    os.close(fd)

        return join

    def fence_devices(self, devices: Sequence[DeviceRule] = ()) -> None:
        """Allow only :func:`base_device_rules` plus ``devices`` from now on (a revoked GPU
        lease closes its device this way; file descriptors already open stay open, so the
        caller also ends the processes holding them)."""
        rules = _merge_rules(base_device_rules(), devices)
        if self.version == "v2":
            DeviceFence(cgroup_dir=self.dirs["unified"]).apply(rules)
            return
        path = self.dirs["devices"]
        _write(path / "devices.deny", "a", what="deny all devices")
        for rule in rules:
            _write(path / "devices.allow", rule.v1_line(), what="allow a device")

    def procs(self) -> list[int]:
        """The processes (thread-group ids) in the cgroup, in any of its hierarchies."""
        pids: set[int] = set()
        for path in self.paths:
            try:
                text = (path / "cgroup.procs").read_text()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise CgroupError(f"cannot read {path / 'cgroup.procs'}: {exc.strerror}") from exc
            pids.update(int(line) for line in text.split())
        return sorted(pids)

    def oom_kills(self) -> int:
        """How many processes the OOM killer has killed in this cgroup."""
        if self.version == "v2":
            path = self.dirs["unified"] / "memory.events"
        else:
            path = self.dirs["memory"] / "memory.oom_control"
        return _keyed(_read(path, what="read the OOM-kill count"), "oom_kill", path)

    def kill_all(self, *, timeout: float = _KILL_TIMEOUT_S) -> None:
        """SIGKILL every process in the cgroup and wait until it is empty.

        v2: ``cgroup.kill`` (kernel 5.14+). v1: freeze (when the freezer is mounted), kill
        every pid, thaw, and repeat until empty, so a fork bomb cannot outrun it.
        """
        deadline = time.monotonic() + timeout
        if self.version == "v2" and (self.dirs["unified"] / "cgroup.kill").exists():
            kill_file = self.dirs["unified"] / "cgroup.kill"
            _write(kill_file, "1", what=f"kill the processes of {self.name}")
        while True:
            pids = self.procs()
            if not pids:
                return
            if time.monotonic() > deadline:
                raise CgroupError(
                    f"processes {pids[:10]} of cgroup {self.name} survived SIGKILL "
                    f"for {timeout:g} s"
                )
            with self._frozen():
                for pid in self.procs():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    @contextlib.contextmanager
    def _frozen(self) -> Iterator[None]:
        freezer = self.dirs.get("freezer")
        state = freezer / "freezer.state" if freezer is not None else None
        if state is None or not state.exists():
            yield
            return
        _write(state, "FROZEN", what=f"freeze {self.name}")
        try:
            for _ in range(100):  # wait up to ~1 s for FREEZING to settle, then go on anyway
                if state.read_text().strip() == "FROZEN":
                    break
                time.sleep(0.01)
            yield
        finally:
            _write(state, "THAWED", what=f"thaw {self.name}")

    def remove(self) -> None:
        """Kill every process, detach the device program (v2) and remove the directories.

        Removing a cgroup that is already gone is not an error.
        """
        if not any(path.is_dir() for path in self.paths):
            return
        self.kill_all()
        if self.version == "v2" and self.dirs["unified"].is_dir():
            DeviceFence(cgroup_dir=self.dirs["unified"]).clear()
        for path in self.paths:
            _rmtree_cgroup(path)


def _rmtree_cgroup(path: Path, *, timeout: float = 2.0) -> None:
    """rmdir ``path`` and any child cgroups, deepest first (cgroupfs needs rmdir, not unlink)."""
    if not path.is_dir():
        return
    children = [entry for entry in path.iterdir() if entry.is_dir()]
    for child in children:
        _rmtree_cgroup(child, timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            # EBUSY for a moment after the last task exits
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CgroupError(f"cannot remove cgroup directory {path}: {exc.strerror}") from exc
            time.sleep(0.01)
