"""Process facts from /proc: a fake tree for every case, and this test's own process."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from ztlab.hub.monitor import procfacts
from ztlab.hub.monitor.procfacts import ProcessFactsCache, read_process, start_time
from ztlab.hub.monitor.telemetry import ProcessFacts

ALICE_CGROUP = """\
12:pids:/user.slice/user-1001.slice
7:cpu,cpuacct:/ztlab/ztl-alice
5:devices:/ztlab/ztl-alice
1:name=systemd:/user.slice
0::/user.slice/user-1001.slice/session-3.scope
"""
ALICE_MAPS = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 131 /usr/bin/python3.11
7f0000000000-7f0000001000 r--p 00000000 08:01 200 /usr/lib/x86_64-linux-gnu/libcuda.so.535.104.05
7f0000001000-7f0000002000 r-xp 00001000 08:01 200 /usr/lib/x86_64-linux-gnu/libcuda.so.535.104.05
7f0000002000-7f0000003000 r--p 00000000 08:01 201 /opt/my libs/libnvidia-ml.so.1
7f0000003000-7f0000004000 r--p 00000000 08:01 202 /tmp/.x/libminer.so (deleted)
7f0000004000-7f0000005000 r--p 00000000 08:01 203 /home/alice/data.sonic
7f0000005000-7f0000006000 rw-p 00000000 00:05 5 /dev/nvidia0
7f0000006000-7f0000007000 rw-p 00000000 00:00 0 [heap]
7f0000007000-7f0000008000 rw-p 00000000 00:00 0
7f0000008000-7f0000009000 r--p 00000000 08:01 204 /usr/lib/py/_ssl.cpython-311-x86_64-linux-gnu.so
"""


def fake_process(
    proc: Path,
    pid: int,
    *,
    started: int = 5000,
    uids: Sequence[int] = (1001, 1001, 1001, 1001),
    comm: str = "python3",
    cmdline: bytes = b"python3\0train.py\0--epochs\x003\0",
    cgroup: str = ALICE_CGROUP,
    maps: str = ALICE_MAPS,
) -> Path:
    """Write ``/proc/PID`` for a made-up process under ``proc``."""
    base = proc / str(pid)
    base.mkdir(parents=True, exist_ok=True)
    rest = ["S", "1", str(pid), str(pid), "0", "-1", "4194560"] + ["0"] * 12 + [str(started)]
    rest += ["0"] * 30
    (base / "stat").write_text(f"{pid} ({comm}) {' '.join(rest)}\n", encoding="utf-8")
    (base / "status").write_text(
        f"Name:\t{comm}\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t{pid}\n"
        f"Uid:\t{chr(9).join(map(str, uids))}\nGid:\t1001\t1001\t1001\t1001\n",
        encoding="utf-8",
    )
    (base / "comm").write_text(comm + "\n", encoding="utf-8")
    (base / "cmdline").write_bytes(cmdline)
    (base / "cgroup").write_text(cgroup, encoding="utf-8")
    (base / "maps").write_text(maps, encoding="utf-8")
    return base


ALICE = ProcessFacts(
    pid=4242,
    uid=1001,
    comm="python3",
    cmdline=("python3", "train.py", "--epochs", "3"),
    cgroup="/ztlab/ztl-alice",
    libraries=(
        "_ssl.cpython-311-x86_64-linux-gnu.so",
        "libcuda.so.535.104.05",
        "libminer.so",
        "libnvidia-ml.so.1",
    ),
)


def test_read_process_reads_uid_names_cgroup_and_libraries(tmp_path: Path) -> None:
    fake_process(tmp_path, 4242)
    assert read_process(4242, proc=tmp_path) == ALICE
    assert start_time(4242, proc=tmp_path) == 5000


def test_the_real_uid_counts_not_the_effective_one(tmp_path: Path) -> None:
    fake_process(tmp_path, 7, uids=(1002, 0, 0, 0))  # a setuid-root program run by bob
    facts = read_process(7, proc=tmp_path)
    assert facts is not None
    assert facts.uid == 1002


@pytest.mark.parametrize(
    ("cgroup", "controller", "expected"),
    [
        (ALICE_CGROUP, "devices", "/ztlab/ztl-alice"),
        (ALICE_CGROUP, "cpu", "/ztlab/ztl-alice"),
        (ALICE_CGROUP, "cpuacct", "/ztlab/ztl-alice"),
        (ALICE_CGROUP, "memory", "/user.slice/user-1001.slice/session-3.scope"),
        ("0::/ztlab/ztl-bob-1-0\n", "devices", "/ztlab/ztl-bob-1-0"),
        ("3:devices:/\n", "devices", "/"),
        ("", "devices", None),
        ("garbage\n1:name=systemd:/x\n", "devices", None),
    ],
)
def test_the_cgroup_is_the_controllers_v1_path_else_the_v2_one(
    tmp_path: Path, cgroup: str, controller: str, expected: str | None
) -> None:
    fake_process(tmp_path, 10, cgroup=cgroup)
    facts = read_process(10, proc=tmp_path, cgroup_controller=controller)
    assert facts is not None
    assert facts.cgroup == expected


def test_a_name_with_spaces_and_parentheses_does_not_confuse_the_start_time(
    tmp_path: Path,
) -> None:
    fake_process(tmp_path, 11, comm="x) 1 2 3 (y", started=777)
    assert start_time(11, proc=tmp_path) == 777
    facts = read_process(11, proc=tmp_path)
    assert facts is not None
    assert facts.comm == "x) 1 2 3 (y"


def test_kernel_threads_gone_and_half_gone_processes(tmp_path: Path) -> None:
    fake_process(tmp_path, 2, comm="kthreadd", cmdline=b"", maps="")
    kthread = read_process(2, proc=tmp_path)
    assert kthread is not None
    assert (kthread.comm, kthread.cmdline, kthread.libraries) == ("kthreadd", (), ())
    assert read_process(99, proc=tmp_path) is None
    assert start_time(99, proc=tmp_path) is None
    (fake_process(tmp_path, 12) / "status").unlink()  # exited while being read
    assert read_process(12, proc=tmp_path) is None
    (fake_process(tmp_path, 13) / "maps").unlink()
    facts = read_process(13, proc=tmp_path)
    assert facts is not None
    assert facts.libraries == (), "maps unreadable: no libraries, the rest stands"
    (fake_process(tmp_path, 14) / "stat").write_text("14 (x) S\n", encoding="utf-8")
    assert start_time(14, proc=tmp_path) is None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_cache_keeps_libraries_but_reads_the_cheap_facts_every_time(tmp_path: Path) -> None:
    clock = Clock()
    cache = ProcessFactsCache(proc=tmp_path, libraries_ttl=60.0, clock=clock)
    fake_process(tmp_path, 4242)
    assert cache.get(4242) == ALICE
    # the same process loads another library, renames itself and moves to another cgroup
    fake_process(
        tmp_path,
        4242,
        comm="notaminer",
        cgroup="5:devices:/ztlab/ztl-bob\n",
        maps=ALICE_MAPS + "7f1-7f2 r--p 0 08:01 9 /usr/lib/libxmrig.so\n",
    )
    facts = cache.get(4242)
    assert facts is not None
    assert (facts.comm, facts.cgroup) == ("notaminer", "/ztlab/ztl-bob"), "read every time"
    assert facts.libraries == ALICE.libraries, "maps is not read again before the TTL"
    clock.now = 60.0
    facts = cache.get(4242)
    assert facts is not None
    assert "libxmrig.so" in facts.libraries, "read again after the TTL"


def test_a_reused_pid_never_gets_the_previous_processs_facts(tmp_path: Path) -> None:
    cache = ProcessFactsCache(proc=tmp_path, clock=Clock())
    fake_process(tmp_path, 4242, started=5000)
    assert cache.get(4242) == ALICE
    # alice's process exits; bob's miner gets the same PID (a later start time)
    fake_process(
        tmp_path,
        4242,
        started=9000,
        uids=(1002, 1002, 1002, 1002),
        comm="xmrig",
        cmdline=b"./xmrig\0",
        cgroup="0::/user.slice/user-1002.slice\n",
        maps="7f1-7f2 r--p 0 08:01 9 /tmp/libxmrig-cuda.so\n",
    )
    assert cache.get(4242) == ProcessFacts(
        pid=4242,
        uid=1002,
        comm="xmrig",
        cmdline=("./xmrig",),
        cgroup="/user.slice/user-1002.slice",
        libraries=("libxmrig-cuda.so",),
    )


def test_a_pid_reused_while_it_is_read_gives_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = ProcessFactsCache(proc=tmp_path, clock=Clock())
    fake_process(tmp_path, 4242, started=5000)
    original = procfacts.libraries_of

    def swapped(pid: int, *, proc: Path) -> tuple[str, ...]:
        found = original(pid, proc=proc)
        fake_process(tmp_path, 4242, started=9000, comm="xmrig")  # the PID changed hands
        return found

    monkeypatch.setattr(procfacts, "libraries_of", swapped)
    assert cache.get(4242) is None, "facts that may mix two processes are not returned"
    assert len(cache) == 0
    monkeypatch.setattr(procfacts, "libraries_of", original)
    facts = cache.get(4242)
    assert facts is not None
    assert facts.comm == "xmrig"


def test_prune_and_gone_processes_leave_the_cache(tmp_path: Path) -> None:
    cache = ProcessFactsCache(proc=tmp_path, clock=Clock())
    for pid in (10, 11, 12):
        fake_process(tmp_path, pid)
        assert cache.get(pid) is not None
    assert len(cache) == 3
    cache.prune([10, 12, 99])
    assert len(cache) == 2
    for name in ("stat", "status", "comm", "cmdline", "cgroup", "maps"):
        (tmp_path / "12" / name).unlink()
    (tmp_path / "12").rmdir()
    assert cache.get(12) is None
    assert len(cache) == 1
    assert cache.get(12345) is None


def test_this_process_as_the_kernel_shows_it() -> None:
    pid = os.getpid()
    facts = read_process(pid)
    assert facts is not None
    assert facts.pid == pid
    assert facts.uid == os.getuid()
    assert facts.comm == Path(f"/proc/{pid}/comm").read_text(encoding="utf-8").strip()
    assert facts.cmdline
    assert "python" in Path(facts.cmdline[0]).name or "pytest" in " ".join(facts.cmdline)
    assert any(name.startswith("libc.so") for name in facts.libraries), facts.libraries
    assert list(facts.libraries) == sorted(set(facts.libraries))
    assert all("/" not in name for name in facts.libraries)
    cgroup = Path(f"/proc/{pid}/cgroup").read_text(encoding="utf-8")
    assert facts.cgroup is not None
    assert facts.cgroup in cgroup
    started = start_time(pid)
    assert started is not None
    assert started > 0
    cached = ProcessFactsCache().get(pid)
    assert cached is not None
    assert (cached.uid, cached.comm, cached.cgroup) == (facts.uid, facts.comm, facts.cgroup)
