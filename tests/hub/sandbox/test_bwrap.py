"""The bubblewrap sandbox, for real: two throwaway Unix accounts, commands run inside as one.

Each test starts the argv of :func:`sandbox_argv` as root, like the hub does, and looks at
what the sandboxed command sees. The accounts, their homes and any process a test starts
are removed at the end, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from ztlab.hub.sandbox.bwrap import (
    DEFAULT_READONLY_PATHS,
    SandboxError,
    SandboxSpec,
    redact_argv,
    sandbox_argv,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="creates Unix accounts; needs root"),
    pytest.mark.skipif(
        not all(shutil.which(tool) for tool in ("bwrap", "setpriv", "nsenter", "useradd")),
        reason="needs bubblewrap, util-linux and passwd (apt-get install bubblewrap)",
    ),
]

PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class Account:
    name: str
    uid: int
    gid: int
    home: Path


@dataclass
class Lab:
    base: Path
    a: Account
    b: Account
    dataset: Path
    fake_opt: Path
    device: Path
    started: list[subprocess.Popen[bytes]]

    def spec(self, **changes: Any) -> SandboxSpec:
        """A's sandbox: its home, one dataset, the fake GPU node, a small environment."""
        spec = SandboxSpec(
            uid=self.a.uid,
            gid=self.a.gid,
            home=self.a.home,
            datasets={"/data/ds1": self.dataset},
            devices=[(self.device, Path("/dev/nvidia0"))],
            env={"PATH": PATH, "HOME": str(self.a.home), "ZTL_TEST": "yes"},
            readonly_paths=(*DEFAULT_READONLY_PATHS, self.fake_opt),
            hidden=(self.fake_opt / "state",),
            hostname="ztl-test-box",
        )
        return replace(spec, **changes)


def _add_account(name: str, home: Path) -> Account:
    subprocess.run(
        [
            "useradd", "--system", "--user-group", "--home-dir", str(home),
            "--create-home", "--shell", "/usr/sbin/nologin", name,
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    entry = pwd.getpwnam(name)
    home.chmod(0o700)
    return Account(name=name, uid=entry.pw_uid, gid=entry.pw_gid, home=home)


def _live_pids(uid: int) -> list[int]:
    """The processes of ``uid`` (a zombie left for the host's init to reap is not one)."""
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError):
            if not entry.name.isdigit() or entry.stat().st_uid != uid:
                continue
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
            if state != "Z":
                pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    base = Path(tempfile.mkdtemp(prefix="ztl-bwrap-", dir="/tmp"))
    base.chmod(0o711)  # the accounts may traverse it to reach their homes
    suffix = f"{os.getpid() % 100000}"
    names = [f"ztl-t-a{suffix}", f"ztl-t-b{suffix}"]
    accounts: list[Account] = []
    started: list[subprocess.Popen[bytes]] = []
    try:
        for name, tag in zip(names, "ab", strict=True):
            accounts.append(_add_account(name, base / f"home-{tag}"))
        a, b = accounts
        (b.home / "secret.txt").write_text("b's secret\n")
        os.chown(b.home / "secret.txt", b.uid, b.gid)
        # a dataset A could write to if it were not bound read-only
        dataset = base / "dataset"
        dataset.mkdir()
        (dataset / "rows.csv").write_text("x,y\n1,2\n")
        for path in (dataset, dataset / "rows.csv"):
            os.chown(path, a.uid, a.gid)
        # a read-only "system" path holding a state directory that must be hidden
        fake_opt = base / "opt"
        (fake_opt / "state").mkdir(parents=True)
        (fake_opt / "state" / "hub.sqlite").write_text("hub state\n")
        (fake_opt / "visible.txt").write_text("shared tool\n")
        fake_opt.chmod(0o755)
        # a fake GPU node (char 195:0) outside /dev, exposed as /dev/nvidia0
        devdir = base / "dev"
        devdir.mkdir(mode=0o755)
        device = devdir / "nvidia0"
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(195, 0))
        yield Lab(base, a, b, dataset, fake_opt, device, started)
    finally:
        for proc in started:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for account in accounts:
            for pid in _live_pids(account.uid):  # what our sandboxes left, by pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for name in names:
            subprocess.run(["userdel", name], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def run_in(
    spec: SandboxSpec,
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in the sandbox as the hub would (root, argv list)."""
    return subprocess.run(
        sandbox_argv(spec, command, **kwargs),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=dict(env) if env is not None else None,
    )


def sh(spec: SandboxSpec, script: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run_in(spec, ["/bin/sh", "-c", script], **kwargs)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    return done.stdout


def test_runs_as_the_users_account_with_no_other_group(lab: Lab) -> None:
    out = ok(sh(lab.spec(), "id -u; id -g; id -G")).split()
    assert out == [str(lab.a.uid), str(lab.a.gid), str(lab.a.gid)]


def test_own_home_is_writable_and_the_working_directory(lab: Lab) -> None:
    out = ok(sh(lab.spec(), "pwd; echo hello > notes.txt && cat notes.txt"))
    assert out.split() == [str(lab.a.home), "hello"]
    written = lab.a.home / "notes.txt"
    assert written.read_text() == "hello\n"
    assert written.stat().st_uid == lab.a.uid


def test_another_users_home_is_not_visible(lab: Lab) -> None:
    done = sh(lab.spec(), f"ls -A {lab.b.home}; cat {lab.b.home}/secret.txt")
    assert done.returncode != 0
    assert "secret" not in done.stdout
    assert "No such file or directory" in done.stderr
    # neither is the host's /home, /root or /var
    listing = ok(sh(lab.spec(), "ls -A /"))
    assert not {"home", "root", "srv", "boot", "mnt"} & set(listing.split())
    ok(sh(lab.spec(), "test ! -e /var/lib && test ! -e /home"))


@pytest.mark.parametrize("target", ["/x", "/usr/x", "/etc/x", "OPT/x"])
def test_the_system_is_read_only(lab: Lab, target: str) -> None:
    done = sh(lab.spec(), f"touch {target.replace('OPT', str(lab.fake_opt))}")
    assert done.returncode != 0
    assert "Read-only file system" in done.stderr


def test_opt_is_not_bound_by_default(lab: Lab) -> None:
    """Other software under /opt is not the sandbox's: only paths the spawner adds (the venv
    the server runs from) are there."""
    if not Path("/opt").is_dir():
        pytest.skip("needs a host /opt")
    assert Path("/opt") not in DEFAULT_READONLY_PATHS
    done = sh(lab.spec(readonly_paths=DEFAULT_READONLY_PATHS), "ls -A /opt")
    assert done.returncode != 0
    assert "No such file or directory" in done.stderr


def test_datasets_are_readable_but_not_writable(lab: Lab) -> None:
    assert ok(sh(lab.spec(), "cat /data/ds1/rows.csv")) == "x,y\n1,2\n"
    for script in (
        "touch /data/ds1/new",
        "echo 3,4 >> /data/ds1/rows.csv",
        "rm /data/ds1/rows.csv",
    ):
        done = sh(lab.spec(), script)
        assert done.returncode != 0, script
        assert "Read-only file system" in done.stderr, (script, done.stderr)
    assert (lab.dataset / "rows.csv").read_text() == "x,y\n1,2\n"


def test_tmp_is_private(lab: Lab) -> None:
    outside = Path(tempfile.mkstemp(prefix="ztl-outside-", dir="/tmp")[1])
    inside = Path(f"/tmp/ztl-inside-{os.getpid()}")
    try:
        out = ok(sh(lab.spec(), f"test -e {outside} && echo seen; touch {inside}; ls -A /tmp"))
        assert "seen" not in out
        assert not inside.exists()
        for shared in ("/dev/shm", "/var/tmp", "/run"):
            ok(
                sh(
                    lab.spec(),
                    f'touch {shared}/probe && test -z "$(ls -A {shared} | grep -v probe)"',
                )
            )
    finally:
        outside.unlink()


def test_processes_of_others_are_invisible(lab: Lab) -> None:
    sleeper = subprocess.Popen(
        ["setpriv", f"--reuid={lab.b.uid}", f"--regid={lab.b.gid}", "--clear-groups", "sleep", "60"]
    )
    lab.started.append(sleeper)
    out = ok(sh(lab.spec(), "echo $$; for p in /proc/[0-9]*; do echo ${p#/proc/}; done"))
    own, *pids = (int(word) for word in out.split())
    assert own <= 3
    assert max(pids) < 10  # only the sandbox's own few processes
    cmdlines = ok(sh(lab.spec(), "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"))
    assert "sleep" not in cmdlines
    sleeper.kill()
    sleeper.wait(timeout=10)


def test_hostname_is_the_configured_one(lab: Lab) -> None:
    assert ok(run_in(lab.spec(), ["cat", "/proc/sys/kernel/hostname"])).strip() == "ztl-test-box"


def test_hidden_state_is_empty_inside(lab: Lab) -> None:
    out = ok(sh(lab.spec(), f"ls -A {lab.fake_opt}; echo --; ls -A {lab.fake_opt}/state"))
    assert out.split() == ["state", "visible.txt", "--"]
    ok(sh(lab.spec(), "test ! -e /run/netns && test ! -e /var/lib/ztlab"))


def test_no_privileges_can_be_gained(lab: Lab) -> None:
    status = dict(
        line.split(":\t", 1)
        for line in ok(run_in(lab.spec(), ["cat", "/proc/self/status"])).splitlines()
    )
    assert status["NoNewPrivs"].strip() == "1"
    for caps in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"):
        assert int(status[caps], 16) == 0, caps
    assert status["Seccomp"].strip() in {"0", "2"}
    # no new user namespace (and so no fresh set of capabilities) can be made inside
    done = run_in(lab.spec(), ["unshare", "--user", "--map-root-user", "true"])
    assert done.returncode != 0
    # a setuid-root binary does not run as root
    done = run_in(lab.spec(), ["su", "-c", "id -u", "root"])
    assert done.returncode != 0


def test_only_the_exposed_devices_exist(lab: Lab) -> None:
    ok(sh(lab.spec(), "test -c /dev/nvidia0 && test ! -e /dev/nvidia1 && test ! -e /dev/sda"))
    out = ok(run_in(lab.spec(), ["stat", "-c", "%t:%T", "/dev/nvidia0"]))
    assert out.strip() == "c3:0"  # 195:0 in hex
    assert "nvidia0" not in ok(run_in(lab.spec(devices=()), ["ls", "/dev"]))


def test_environment_is_cleared_except_what_was_set(lab: Lab) -> None:
    host_env = {"PATH": PATH, "HUB_SECRET": "must-not-leak", "JUPYTERHUB_API_TOKEN": "x"}
    out = ok(run_in(lab.spec(), ["/usr/bin/env"], env=host_env))
    assert sorted(out.splitlines()) == [
        f"HOME={lab.a.home}",
        f"PATH={PATH}",
        f"PWD={lab.a.home}",  # bwrap sets it with --chdir
        "ZTL_TEST=yes",
    ]


def test_network_is_loopback_only_without_a_namespace(lab: Lab) -> None:
    interfaces = ok(run_in(lab.spec(), ["cat", "/proc/net/dev"]))
    names = {line.split(":")[0].strip() for line in interfaces.splitlines()[2:]}
    assert names == {"lo"}


def test_joins_the_given_network_namespace(lab: Lab) -> None:
    name = f"ztl-tbw{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(
            ["ip", "-n", name, "link", "add", "ztltest0", "type", "veth", "peer", "ztltest1"],
            check=True,
            capture_output=True,
        )
        argv = sandbox_argv(lab.spec(), ["cat", "/proc/net/dev"], netns=name)
        assert argv[:2] == ["nsenter", f"--net=/run/netns/{name}"]
        assert "--unshare-net" not in argv
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
        names = {line.split(":")[0].strip() for line in done.stdout.splitlines()[2:]}
        assert names == {"lo", "ztltest0", "ztltest1"}
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def test_stopping_bwrap_kills_the_whole_sandbox(lab: Lab) -> None:
    argv = sandbox_argv(lab.spec(), ["/bin/sh", "-c", "sleep 60 & sleep 60 & wait"])
    proc = subprocess.Popen(argv)
    lab.started.append(proc)

    # running: bwrap (outside), bwrap (pid 1 inside), sh and two sleeps
    deadline = time.monotonic() + 10
    while len(_live_pids(lab.a.uid)) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_live_pids(lab.a.uid)) == 5
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 5
    while _live_pids(lab.a.uid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _live_pids(lab.a.uid) == []


def test_argv_chain_and_redaction(lab: Lab) -> None:
    spec = lab.spec(env={"JUPYTERHUB_API_TOKEN": "s3cret"})
    argv = sandbox_argv(spec, ["jupyterhub-singleuser"], bwrap="/usr/bin/bwrap")
    assert argv[0] == "setpriv"
    assert {"--no-new-privs", "--clear-groups", f"--reuid={lab.a.uid}"} <= set(argv)
    assert argv[argv.index("--") + 1] == "/usr/bin/bwrap"
    assert argv[-2:] == ["--", "jupyterhub-singleuser"]
    assert "s3cret" in argv
    assert "s3cret" not in redact_argv(argv)


@pytest.mark.parametrize(
    "changes",
    [
        {"uid": 0},
        {"gid": 0},
        {"home": Path("relative/home")},
        {"home": Path("/")},
        {"home": Path("/usr")},
        {"datasets": {"data": Path("/srv/data")}},
        {"datasets": {"/data/../etc": Path("/srv/data")}},
        {"hostname": "bad host"},
        {"env": {"A=B": "c"}},
    ],
)
def test_bad_specs_are_refused(lab: Lab, changes: dict[str, Any]) -> None:
    with pytest.raises(SandboxError):
        sandbox_argv(lab.spec(**changes), ["true"])


def test_bad_devices_and_namespaces_are_refused(lab: Lab) -> None:
    with pytest.raises(SandboxError, match="not a device"):
        sandbox_argv(lab.spec(devices=[(lab.dataset / "rows.csv", Path("/dev/x"))]), ["true"])
    with pytest.raises(SandboxError, match="under /dev"):
        sandbox_argv(lab.spec(devices=[(lab.device, Path("/etc/nvidia0"))]), ["true"])
    with pytest.raises(SandboxError, match="network namespace"):
        sandbox_argv(lab.spec(), ["true"], netns="../../etc")
    with pytest.raises(SandboxError):
        sandbox_argv(lab.spec(), [])


def test_environment_by_descriptor_stays_off_the_command_line(lab: Lab) -> None:
    """Secrets passed with env_fd reach the sandboxed process but no command line."""
    from ztlab.hub.sandbox.bwrap import env_file_content

    secret = "token-s3cret-value"
    spec = SandboxSpec(uid=lab.a.uid, gid=lab.a.gid, home=lab.a.home)
    read_end, write_end = os.pipe()
    os.write(write_end, env_file_content({"JUPYTERHUB_API_TOKEN": secret, "A": "b c"}))
    os.close(write_end)
    argv = sandbox_argv(
        spec,
        [
            "/bin/sh",
            "-c",
            'echo "$JUPYTERHUB_API_TOKEN|$A"; echo --; ls -a /run; echo --; cat /proc/1/cmdline',
        ],
        env_fd=read_end,
    )
    assert all(secret not in arg for arg in argv)
    try:
        result = subprocess.run(
            argv, pass_fds=(read_end,), capture_output=True, text=True, timeout=30, check=False
        )
    finally:
        os.close(read_end)
    value, listing, cmdline = result.stdout.split("--\n")
    assert value == f"{secret}|b c\n", result.stderr
    assert "ztlab-env" not in listing  # deleted once read
    assert secret not in cmdline
