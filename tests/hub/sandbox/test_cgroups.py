"""Per-user cgroups, for real: limits, OOM, fork bombs, CPU quota and kernel device fences.

Everything here runs against the machine's own cgroup filesystems (as root) and removes what
it creates, also when a test fails. The v1 tests run where the machine is v1 or hybrid; the
BPF device fence is tested on whatever cgroup2 mount there is (``/sys/fs/cgroup/unified``
on a hybrid machine, ``/sys/fs/cgroup`` on a pure v2 one).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ztlab.hub.sandbox.cgroups import (
    CgroupError,
    CgroupManager,
    DeviceFence,
    DeviceRule,
    Limits,
    UserCgroup,
    _layout_from_mounts,
    _v2_files,
    base_device_rules,
    gpu_device_rules,
)

MiB = 1 << 20
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups are managed by root")

#: open or mknod the paths given as "rw:PATH", "r:PATH", "mknod:MAJOR:MINOR:PATH";
#: print {arg: errno or 0}
PROBE = r"""
import json, os, stat, sys
result = {}
for arg in sys.argv[1:]:
    op, _, rest = arg.partition(":")
    try:
        if op == "rw":
            os.close(os.open(rest, os.O_RDWR))
        elif op == "r":
            os.close(os.open(rest, os.O_RDONLY))
        else:
            major, minor, path = rest.split(":", 2)
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(int(major), int(minor)))
        result[arg] = 0
    except OSError as exc:
        result[arg] = exc.errno
print(json.dumps(result))
"""


def probe(*args: str, preexec: Callable[[], object] | None = None) -> dict[str, int]:
    """Run PROBE in a fresh child (in a cgroup when ``preexec`` is given); errno per arg."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        preexec_fn=preexec,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    result: dict[str, int] = json.loads(done.stdout)
    return result


def cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return Path(parts[1])
    return None


def control(cg: UserCgroup, controller: str, filename: str) -> Path:
    """A control file of ``cg`` on either version."""
    return cg.dirs["unified" if cg.version == "v2" else controller] / filename


def read(path: Path) -> str:
    return path.read_text().strip()


@pytest.fixture
def manager() -> Iterator[CgroupManager]:
    """A manager with a parent of its own; every cgroup under it is removed afterwards."""
    mgr = CgroupManager.detect(parent=f"ztlab-test-{os.getpid()}")
    try:
        yield mgr
    finally:
        for name in mgr.names():
            cg = mgr.get(name)
            if cg is not None:
                cg.remove()
        for path in mgr.parent_paths:
            with contextlib.suppress(FileNotFoundError):
                path.rmdir()


@pytest.fixture
def v1_manager(manager: CgroupManager) -> CgroupManager:
    if manager.version != "v1":
        pytest.skip("needs cgroup v1 controllers (this machine's cgroups are v2)")
    return manager


@dataclass(frozen=True)
class GpuNodes:
    """Device nodes like the NVIDIA driver's in a tmp dir: nvidia0..3 (195:N), nvidiactl."""

    paths: dict[str, Path]
    #: errno (0: opened) of "rw:PATH" and "r:PATH" outside any cgroup of ours
    outside: dict[str, int]

    def rw(self, name: str) -> str:
        return f"rw:{self.paths[name]}"

    def r(self, name: str) -> str:
        return f"r:{self.paths[name]}"

    def expect(self, allowed: set[str], denied: set[str]) -> dict[str, int]:
        """What a fenced probe of ``allowed | denied`` returns: as outside, or EPERM."""
        return {arg: self.outside[arg] for arg in allowed} | dict.fromkeys(denied, errno.EPERM)


def nvidia_driver_loaded() -> bool:
    return any(
        line.split()[:1] == [str(195)] for line in Path("/proc/devices").read_text().splitlines()
    )


@pytest.fixture
def gpu_nodes(tmp_path: Path) -> GpuNodes:
    """Where no NVIDIA driver is loaded, opening any of them fails with ENXIO; where one
    is (a GPU machine), nvidiaN of a present GPU opens and the others fail with ENODEV."""
    if os.statvfs(tmp_path).f_flag & os.ST_NODEV:
        pytest.skip(f"needs a filesystem that allows device nodes ({tmp_path} is mounted nodev)")
    paths = {f"nvidia{n}": tmp_path / f"nvidia{n}" for n in range(4)}
    paths["nvidiactl"] = tmp_path / "nvidiactl"
    for name, path in paths.items():
        minor = 255 if name == "nvidiactl" else int(name.removeprefix("nvidia"))
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(195, minor))
    outside = probe(*(f"{mode}:{path}" for path in paths.values() for mode in ("rw", "r")))
    if nvidia_driver_loaded():
        assert errno.EPERM not in outside.values()
    else:
        assert set(outside.values()) == {errno.ENXIO}
    return GpuNodes(paths=paths, outside=outside)


@pytest.fixture
def cgroup2_dir() -> Iterator[Path]:
    """An empty cgroup on the machine's cgroup2 mount, emptied and removed afterwards."""
    mount = cgroup2_mount()
    if mount is None:
        pytest.skip("needs a cgroup2 mount (none on this machine)")
    parent = mount / f"ztlab-test-{os.getpid()}"
    path = parent / "fence"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        for _ in range(500):
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            time.sleep(0.01)
        DeviceFence(cgroup_dir=path).clear()
        path.rmdir()
        parent.rmdir()


# --- values and validation (no root needed) ----------------------------------------------


def test_limits_and_rules_are_validated() -> None:
    with pytest.raises(CgroupError, match="memory_bytes"):
        Limits(memory_bytes=0, cpus=1, pids=10)
    with pytest.raises(CgroupError, match=r"at least 0\.01"):
        Limits(memory_bytes=MiB, cpus=0.001, pids=10)
    with pytest.raises(CgroupError, match="finite"):
        Limits(memory_bytes=MiB, cpus=float("inf"), pids=10)
    with pytest.raises(CgroupError, match="pids"):
        Limits(memory_bytes=MiB, cpus=1, pids=-1)
    assert Limits(memory_bytes=MiB, cpus=1.5, pids=1).cpu_quota_us == 150_000
    with pytest.raises(CgroupError, match="access"):
        DeviceRule(kind="c", major=195, minor=0, access="rwx")
    with pytest.raises(CgroupError, match="major"):
        DeviceRule(kind="c", major=5000, minor=0)
    assert DeviceRule(kind="c", major=136, minor=None).v1_line() == "c 136:* rwm"
    mgr = CgroupManager(version="v1", hierarchies={}, parent="ztlab")
    for bad in ("Alice", "../etc", "", "a/b", "a.b"):
        with pytest.raises(CgroupError, match="invalid cgroup name"):
            mgr.get(bad)
    with pytest.raises(CgroupError, match="invalid cgroup parent"):
        CgroupManager(version="v1", hierarchies={}, parent="../escape")


def test_base_rules_are_minimal() -> None:
    lines = {rule.v1_line() for rule in base_device_rules()}
    assert lines == {
        "c 1:3 rwm",
        "c 1:5 rwm",
        "c 1:7 rwm",
        "c 1:8 rwm",
        "c 1:9 rwm",
        "c 5:0 rwm",
        "c 5:2 rwm",
        "c 136:* rwm",
    }


def test_gpu_rules_read_the_uvm_major_from_proc_devices(tmp_path: Path) -> None:
    proc_devices = tmp_path / "devices"
    proc_devices.write_text(
        "Character devices:\n  1 mem\n195 nvidia-frontend\n510 nvidia-uvm\n"
        "\nBlock devices:\n  7 loop\n511 nvidia-uvm\n"
    )
    lines = [r.v1_line() for r in gpu_device_rules([2, 0, 2], proc_devices=proc_devices)]
    assert lines == ["c 195:255 rwm", "c 510:0 rwm", "c 510:1 rwm", "c 195:0 rwm", "c 195:2 rwm"]

    proc_devices.write_text("Character devices:\n  1 mem\n\nBlock devices:\n  7 loop\n")
    lines = [r.v1_line() for r in gpu_device_rules([1], proc_devices=proc_devices)]
    assert lines == ["c 195:255 rwm", "c 195:1 rwm"]  # no driver: no uvm
    with pytest.raises(CgroupError, match=r"0\.\.253"):
        gpu_device_rules([255], proc_devices=proc_devices)
    with pytest.raises(CgroupError, match="cannot read"):
        gpu_device_rules([0], proc_devices=tmp_path / "missing")


HYBRID = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/devices cgroup rw,relatime,devices 0 0
cgroup /sys/fs/cgroup/freezer cgroup rw,relatime,freezer 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""


def test_layout_is_chosen_from_the_mount_table() -> None:
    root = Path("/sys/fs/cgroup")
    pure = _layout_from_mounts("cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev 0 0\n", root)
    assert pure.version == "v2"
    assert pure.hierarchies == {"unified": root}

    hybrid = _layout_from_mounts(HYBRID, root)
    assert hybrid.version == "v1"
    assert hybrid.hierarchies["memory"] == root / "memory"
    assert hybrid.hierarchies["freezer"] == root / "freezer"

    comounted = HYBRID.replace(
        "cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu",
        "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct",
    )
    assert _layout_from_mounts(comounted, root).hierarchies["cpu"] == root / "cpu,cpuacct"

    no_pids = "\n".join(line for line in HYBRID.splitlines() if "pids" not in line)
    with pytest.raises(CgroupError, match=r"missing controllers pids \(mounted: cpu, devices"):
        _layout_from_mounts(no_pids, root)
    with pytest.raises(CgroupError, match="no cgroup filesystem"):
        _layout_from_mounts("proc /proc proc rw 0 0\n", root)


def test_v2_control_file_values() -> None:
    files = _v2_files(Limits(memory_bytes=64 * MiB, cpus=1.5, pids=50))
    assert files == {
        "memory.max": str(64 * MiB),
        "memory.swap.max": "0",
        "cpu.max": "150000 100000",
        "pids.max": "50",
    }


# --- on this machine ---------------------------------------------------------------------


@needs_root
def test_detect_matches_this_machine(manager: CgroupManager) -> None:
    mounts = Path("/proc/self/mounts").read_text()
    pure_v2 = any(
        line.split()[1:3] == ["/sys/fs/cgroup", "cgroup2"] for line in mounts.splitlines()
    )
    assert manager.version == ("v2" if pure_v2 else "v1")
    assert manager.parent_paths
    assert all(path.is_dir() for path in manager.parent_paths)
    if manager.version == "v2":
        enabled = read(manager.parent_paths[0] / "cgroup.subtree_control").split()
        assert {"memory", "pids", "cpu"} <= set(enabled)


@needs_root
def test_limits_are_written_and_create_is_idempotent(manager: CgroupManager) -> None:
    cg = manager.create("alice", limits=Limits(memory_bytes=64 * MiB, cpus=1.5, pids=50))
    assert manager.get("alice") == cg
    assert manager.get("bob") is None
    assert manager.names() == ["alice"]
    if cg.version == "v1":
        memory = cg.dirs["memory"]
        assert read(memory / "memory.limit_in_bytes") == str(64 * MiB)
        if (memory / "memory.memsw.limit_in_bytes").exists():
            assert read(memory / "memory.memsw.limit_in_bytes") == str(64 * MiB)
        assert "oom_kill_disable 0" in read(memory / "memory.oom_control")
        assert read(cg.dirs["cpu"] / "cpu.cfs_period_us") == "100000"
        assert read(cg.dirs["cpu"] / "cpu.cfs_quota_us") == "150000"
        allowed = set(read(cg.dirs["devices"] / "devices.list").splitlines())
        assert allowed == {rule.v1_line() for rule in base_device_rules()}
    else:
        unified = cg.dirs["unified"]
        assert read(unified / "memory.max") == str(64 * MiB)
        assert read(unified / "cpu.max") == "150000 100000"
        assert len(DeviceFence(cgroup_dir=unified).program_ids()) == 1
    assert read(control(cg, "pids", "pids.max")) == "50"

    # again, larger (memory+swap must be raised first on v1), then smaller
    for memory_bytes in (128 * MiB, 32 * MiB):
        again = manager.create("alice", limits=Limits(memory_bytes=memory_bytes, cpus=0.5, pids=20))
        assert again.paths == cg.paths
        limit_file = "memory.limit_in_bytes" if cg.version == "v1" else "memory.max"
        assert read(control(cg, "memory", limit_file)) == str(memory_bytes)
        assert read(control(cg, "pids", "pids.max")) == "20"
    if cg.version == "v2":
        assert len(DeviceFence(cgroup_dir=cg.dirs["unified"]).program_ids()) == 1


@needs_root
def test_preexec_and_add_process_put_processes_in_every_hierarchy(
    manager: CgroupManager,
) -> None:
    cg = manager.create("carol", limits=Limits(memory_bytes=256 * MiB, cpus=1, pids=20))
    inside = subprocess.Popen(["sleep", "30"], preexec_fn=cg.preexec())
    outside = subprocess.Popen(["sleep", "30"])
    try:
        assert cg.procs() == [inside.pid]
        cg.add_process(outside.pid)
        assert cg.procs() == sorted([inside.pid, outside.pid])
        membership = Path(f"/proc/{outside.pid}/cgroup").read_text()
        expected = f"/{manager.parent}/carol"
        lines = [line for line in membership.splitlines() if line.endswith(expected)]
        assert len(lines) >= (1 if cg.version == "v2" else 4)
        with pytest.raises(CgroupError, match=r"cgroup\.procs"):
            cg.add_process(2**22 + 1)  # no such process
    finally:
        cg.kill_all()
    assert inside.wait(timeout=5) == -9
    assert outside.wait(timeout=5) == -9


@needs_root
def test_remove_kills_and_leaves_no_directories(manager: CgroupManager) -> None:
    cg = manager.create("dave", limits=Limits(memory_bytes=128 * MiB, cpus=1, pids=20))
    child = subprocess.Popen(["sleep", "30"], preexec_fn=cg.preexec())
    cg.remove()
    assert child.wait(timeout=5) == -9
    assert not any(path.exists() for path in cg.paths)
    assert manager.get("dave") is None
    assert manager.names() == []
    cg.remove()  # already gone: fine
    # a stale handle fails closed: the child never runs outside its cgroup
    with pytest.raises(subprocess.SubprocessError, match="preexec_fn"):
        subprocess.Popen(["true"], preexec_fn=cg.preexec())


@needs_root
@pytest.mark.slow
def test_memory_limit_oom_kills_only_the_process_inside(manager: CgroupManager) -> None:
    cg = manager.create("erin", limits=Limits(memory_bytes=64 * MiB, cpus=1, pids=20))
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    hog = subprocess.Popen(
        [sys.executable, "-c", "import time; b = b'x' * (256 << 20); time.sleep(30)"],
        preexec_fn=cg.preexec(),
    )
    try:
        assert hog.wait(timeout=20) == -9
        assert sibling.poll() is None
        assert cg.oom_kills() >= 1
    finally:
        sibling.kill()
        sibling.wait()
        hog.kill()
        hog.wait()


BOMB = r"""
import errno, os, sys, time
deadline = time.monotonic() + float(sys.argv[1])
root = os.getpid()
eagain = 0
while time.monotonic() < deadline:
    try:
        os.fork()
    except OSError as exc:
        if exc.errno != errno.EAGAIN:
            raise
        eagain += 1
        time.sleep(0.005)
if os.getpid() == root:
    print(eagain, flush=True)
time.sleep(30)
"""


@needs_root
@pytest.mark.slow
def test_a_fork_bomb_stays_under_pids_max_and_kill_all_ends_it(manager: CgroupManager) -> None:
    limit = 16
    cg = manager.create("frank", limits=Limits(memory_bytes=512 * MiB, cpus=1, pids=limit))
    bomb = subprocess.Popen(
        [sys.executable, "-c", BOMB, "1.5"],
        preexec_fn=cg.preexec(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert bomb.stdout is not None
    try:
        most = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            most = max(most, len(cg.procs()), int(read(control(cg, "pids", "pids.current"))))
            if select.select([bomb.stdout], [], [], 0.01)[0]:
                break
        eagain = int(bomb.stdout.readline())
        assert eagain > 0, "no fork ever failed"
        assert 1 < most <= limit
        assert len(cg.procs()) <= limit
        cg.kill_all()
        assert cg.procs() == []
        assert bomb.wait(timeout=5) == -9
    finally:
        cg.kill_all()
        bomb.kill()
        bomb.wait()


SPIN = r"""
import time
end = time.monotonic() + 1.0
while time.monotonic() < end:
    pass
print(time.process_time())
"""


@needs_root
@pytest.mark.slow
def test_cpu_quota_throttles(manager: CgroupManager) -> None:
    cg = manager.create("grace", limits=Limits(memory_bytes=128 * MiB, cpus=0.2, pids=20))
    if cg.version == "v1":
        assert read(cg.dirs["cpu"] / "cpu.cfs_quota_us") == "20000"
    done = subprocess.run(
        [sys.executable, "-c", SPIN],
        preexec_fn=cg.preexec(),
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    used = float(done.stdout)
    assert 0.05 < used < 0.5, f"spinning 1 s wall at 0.2 CPUs used {used:.2f} s CPU"


def _assert_fenced(nodes: GpuNodes, tmp: Path, preexec: Callable[[], object]) -> None:
    """Only nvidia0 and nvidiactl of the GPU nodes open, and only 195:0 can be made."""
    allowed = {nodes.rw("nvidia0"), nodes.rw("nvidiactl")}
    denied = {nodes.rw("nvidia1"), nodes.rw("nvidia3")}
    made0, made1 = f"mknod:195:0:{tmp / 'made0'}", f"mknod:195:1:{tmp / 'made1'}"
    result = probe(
        *allowed, *denied, "rw:/dev/null", "r:/dev/urandom", made0, made1, preexec=preexec
    )
    assert result == nodes.expect(allowed, denied) | {
        "rw:/dev/null": 0,
        "r:/dev/urandom": 0,
        made0: 0,
        made1: errno.EPERM,
    }
    assert not (tmp / "made1").exists()
    (tmp / "made0").unlink()
    if not nvidia_driver_loaded():  # the exact errnos on a GPU-less machine
        assert result[nodes.rw("nvidia0")] == errno.ENXIO
        assert result[nodes.rw("nvidia1")] == errno.EPERM


@needs_root
def test_only_the_leased_gpus_can_be_opened(
    manager: CgroupManager, gpu_nodes: GpuNodes, tmp_path: Path
) -> None:
    """v1: the devices controller (v2 machines: the BPF fence, through the same API)."""
    limits = Limits(memory_bytes=256 * MiB, cpus=1, pids=20)
    cg = manager.create("heidi", limits=limits, devices=gpu_device_rules([0]))
    if cg.version == "v1":
        listed = set(read(cg.dirs["devices"] / "devices.list").splitlines())
        assert {"c 195:0 rwm", "c 195:255 rwm"} <= listed
        assert "c 195:1 rwm" not in listed
    _assert_fenced(gpu_nodes, tmp_path, cg.preexec())


@needs_root
def test_bpf_fence_on_cgroup2(cgroup2_dir: Path, gpu_nodes: GpuNodes, tmp_path: Path) -> None:
    """The v2 path: a BPF device program on a cgroup2 directory is the only fence here."""
    fence = DeviceFence(cgroup_dir=cgroup2_dir)

    def join() -> None:
        fd = os.open(cgroup2_dir / "cgroup.procs", os.O_WRONLY)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)

    fence.apply(
        [
            *base_device_rules(),
            DeviceRule(kind="c", major=195, minor=0),
            DeviceRule(kind="c", major=195, minor=255),
        ]
    )
    assert len(fence.program_ids()) == 1
    _assert_fenced(gpu_nodes, tmp_path, join)

    # replace: now only nvidia1, and nvidiactl read-only
    fence.apply(
        [
            *base_device_rules(),
            DeviceRule(kind="c", major=195, minor=1),
            DeviceRule(kind="c", major=195, minor=255, access="r"),
        ]
    )
    assert len(fence.program_ids()) == 1
    allowed = {gpu_nodes.rw("nvidia1"), gpu_nodes.r("nvidiactl")}
    denied = {gpu_nodes.rw("nvidia0"), gpu_nodes.rw("nvidiactl")}
    assert probe(*allowed, *denied, preexec=join) == gpu_nodes.expect(allowed, denied)

    fence.clear()
    assert fence.program_ids() == []
    every = {gpu_nodes.rw(name) for name in gpu_nodes.paths}
    assert probe(*every, preexec=join) == gpu_nodes.expect(every, set())


@needs_root
def test_fence_on_a_directory_that_is_not_cgroup2_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match=str(tmp_path)) as caught:
        DeviceFence(cgroup_dir=tmp_path).apply(base_device_rules())
    assert "cgroup2" in (caught.value.hint or "")
