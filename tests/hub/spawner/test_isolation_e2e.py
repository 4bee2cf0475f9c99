"""Isolation, end to end: two users' servers spawned through the real hub, and the attacks.

Each attack runs as code in the attacker's own kernel (REST + websocket through the proxy,
as the browser does). GPUs are fenced by the device cgroup; on this GPU-less machine the
device nodes are made with ``mknod`` and NVIDIA's major number 195.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.hub.spawner.kernel_client import KernelSession
from tests.hubstack import (
    LoginStack,
    hub_token,
    nvidia_nodes,
    provider_user,
    remove_accounts,
    running_stack,
    spawn_server,
    wait_ready,
)
from ztlab.hub.sandbox.cgroups import CgroupManager

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

USERS = ("ivan", "judy", "kim")
MEMORY_LIMIT_MB = 400


@dataclass
class Server:
    user: str
    token: str
    kernel: KernelSession | None = None

    @property
    def account(self) -> str:
        return f"ztl-{self.user}"

    def run(self, code: str, timeout: float = 60) -> str:
        assert self.kernel is not None
        result = self.kernel.execute(textwrap.dedent(code), timeout=timeout)
        assert result.status == "ok", f"{result.error}\n{result.stderr}"
        return result.stdout.strip()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoginStack]:
    root = tmp_path_factory.mktemp("sandbox-stack")
    # datasets live where the users' accounts can reach them (pytest's tmp is root-only)
    shared = Path(tempfile.mkdtemp(prefix="ztlab-datasets-"))
    shared.chmod(0o755)
    dataset = shared / "mnist"
    dataset.mkdir(mode=0o755)
    (dataset / "train.csv").write_text("x,y\n1,2\n")
    extra = f"""pids_max = 200
[sandbox.datasets]
mnist = "{dataset}"

[roles.trainer]
memory = "{MEMORY_LIMIT_MB}M"
max_gpus = 1

[gpu.pools.research]
gpus = ["0", "1"]
roles = ["trainer"]

[datasets]
storage_roots = ["{shared}"]
"""
    steward = provider_user("sara", "data-stewards")
    with (
        nvidia_nodes(0, 1),
        running_stack(  # two GPUs' device nodes on a GPU-less machine
            root,
            extra_config=extra,
            extra_users={**{u: provider_user(u, "ml-trainers") for u in USERS}, "sara": steward},
            pool="10.214.0.0/16",
            table="ztlab_test_iso",
        ) as running,
    ):
        # a registered version, before any server starts (mounts are granted at spawn)
        registered = requests.post(
            f"{running.hub_url}/hub/api/ztlab/datasets",
            json={"ref": "mnist@1", "path": str(dataset)},
            headers={"Authorization": f"token {hub_token(running, 'sara')}"},
            timeout=60,
        )
        assert registered.status_code == 201, registered.text
        yield running
    shutil.rmtree(shared, ignore_errors=True)
    remove_accounts(*USERS)


@pytest.fixture(scope="module")
def servers(stack: LoginStack) -> Iterator[dict[str, Server]]:
    running: dict[str, Server] = {}
    for user, gpus in (("ivan", 1), ("judy", 1)):
        server = Server(user=user, token=hub_token(stack, user))
        response = spawn_server(stack, user, server.token, {"gpus": gpus, "pool": "research"})
        assert response.status_code in (201, 202), response.text
        wait_ready(stack, user, server.token)
        server.kernel = KernelSession(stack.hub_url, user, server.token)
        running[user] = server
    yield running
    for server in running.values():
        if server.kernel is not None:
            server.kernel.close()


def _lease_gpu(server: Server) -> str:
    return server.run("import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'))")


def test_each_server_runs_as_its_own_account_in_its_own_namespaces(
    servers: dict[str, Server],
) -> None:
    for name, server in servers.items():
        uid = pwd.getpwnam(server.account).pw_uid
        out = server.run("""
            import os, socket
            print(os.getuid(), socket.gethostname(), len([p for p in os.listdir('/proc')
                  if p.isdigit()]), open('/proc/self/status').read().count('NoNewPrivs:\\t1'))
        """)
        got_uid, host, processes, no_new_privs = out.split()
        assert int(got_uid) == uid != 0, name
        assert host == "ztlab"
        assert int(processes) < 15  # its own PID namespace: only its server and kernel
        assert no_new_privs == "1"


def test_cannot_read_or_write_the_other_users_home(servers: dict[str, Server]) -> None:
    judy = pwd.getpwnam("ztl-judy")
    secret = Path(judy.pw_dir) / "secret.txt"
    secret.write_text("judy's notes")
    os.chown(secret, judy.pw_uid, judy.pw_gid)
    secret.chmod(0o600)
    out = servers["ivan"].run(f"""
        import os
        results = []
        for attempt in (lambda: open({str(secret)!r}).read(),
                        lambda: open({str(Path(judy.pw_dir) / "planted")!r}, 'w').write('x'),
                        lambda: os.listdir('/home')):
            try:
                results.append(('ok', attempt()))
            except OSError as exc:
                results.append(('refused', exc.errno))
        print(results)
    """)
    assert "judy's notes" not in out
    assert out.count("'refused'") >= 2, out
    assert "ztl-judy" not in out
    assert not (Path(judy.pw_dir) / "planted").exists()


def test_cannot_see_the_other_users_processes(servers: dict[str, Server]) -> None:
    judy_uid = pwd.getpwnam("ztl-judy").pw_uid
    out = servers["ivan"].run("""
        import os
        uids = set()
        for pid in [p for p in os.listdir('/proc') if p.isdigit()]:
            try:
                uids.add(os.stat(f'/proc/{pid}').st_uid)
            except FileNotFoundError:
                pass
        print(sorted(uids))
    """)
    assert str(judy_uid) not in out


def test_cannot_connect_to_the_other_users_server_or_other_addresses(
    servers: dict[str, Server],
    stack: LoginStack,
) -> None:
    state = stack.state_dir / "sandbox" / "netns.json"
    assert state.exists()
    judy_ip = _sandbox_ip("judy")
    out = servers["ivan"].run(f"""
        import socket
        def attempt(host, port):
            s = socket.socket(); s.settimeout(3)
            try:
                s.connect((host, port)); return 'connected'
            except OSError as exc:
                return type(exc).__name__
            finally:
                s.close()
        print(attempt({judy_ip!r}, 8888), attempt({judy_ip!r}, 22),
              attempt('10.99.0.1', 80), attempt('127.0.0.1', 1))
    """)
    assert "connected" not in out, out


def _sandbox_ip(user: str) -> str:
    out = subprocess.run(
        ["ip", "netns", "exec", f"ztl-{user}", "ip", "-4", "-o", "addr", "show", "eth0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split("inet ", 1)[1].split("/", 1)[0]


def test_datasets_are_read_only(servers: dict[str, Server]) -> None:
    out = servers["ivan"].run("""
        print(open('/datasets/mnist/train.csv').read().splitlines()[0])
        try:
            open('/datasets/mnist/poison.csv', 'w').write('x')
            print('written')
        except OSError as exc:
            print('refused', exc.errno)
    """)
    assert out.splitlines() == ["x,y", "refused 30"]  # EROFS


def test_registered_dataset_is_mounted_and_verified_in_the_sandbox(
    servers: dict[str, Server], stack: LoginStack
) -> None:
    """Through the hub API over internal TLS, with the key the spawner pinned."""
    ivan = servers["ivan"]
    out = ivan.run("""
        import os, ztlab.datasets as zd
        ds = zd.open('mnist@1')
        print(ds.directory, ds.read_csv('train.csv').shape, bool(os.environ['ZTLAB_TRUSTED_KEYS']))
        print(os.environ['JUPYTERHUB_API_URL'].startswith('https://'))
    """)
    assert out.splitlines() == ["/datasets/mnist@1 (1, 2) True", "True"]
    since = stack.audit_size()
    source = Path(stack.records("dataset.register")[0].detail["source"]) / "train.csv"
    original = source.read_text()
    try:
        source.write_text("x,y\n1,3\n")  # poisoned on the host after registration
        out = ivan.run("""
            try:
                ds.read_csv('train.csv')
            except zd.DatasetIntegrityError as exc:
                print('refused', exc.file)
        """)
        assert out == "refused train.csv"
        record = stack.wait_record("dataset.verify.failed", actor="ivan", since=since)
        assert record.detail["dataset"] == "mnist@1"
    finally:
        source.write_text(original)


def test_gpu_fence_is_in_the_kernel_not_the_environment(servers: dict[str, Server]) -> None:
    ivan = servers["ivan"]
    leased = _lease_gpu(ivan)
    assert leased in ("0", "1")
    other = "1" if leased == "0" else "0"
    # inside: only the leased GPU's node exists, and unsetting the variable changes nothing
    out = ivan.run(f"""
        import os
        os.environ.pop('CUDA_VISIBLE_DEVICES', None)
        for node in ('/dev/nvidia{leased}', '/dev/nvidia{other}'):
            try:
                os.close(os.open(node, os.O_RDWR))
                print(node, 'opened')
            except OSError as exc:
                print(node, exc.errno)
    """)
    assert out.splitlines() == [
        f"/dev/nvidia{leased} 6",  # ENXIO: allowed by the fence, and no driver on this machine
        f"/dev/nvidia{other} 2",  # ENOENT: not in the sandbox at all
    ]
    # and the kernel itself refuses the other GPU to anything in ivan's cgroup, even a
    # process that could see the node
    from ztlab.hub.sandbox.cgroups import CgroupManager

    cgroup = CgroupManager.detect(parent="ztlab").get(ivan.account)
    assert cgroup is not None
    entry = pwd.getpwnam(ivan.account)
    probe = (
        "import os\n"
        f"for node in ('/dev/nvidia{leased}', '/dev/nvidia{other}'):\n"
        "    try:\n        os.close(os.open(node, os.O_RDWR)); print(node, 'opened')\n"
        "    except OSError as exc:\n        print(node, exc.errno)\n"
    )
    result = subprocess.run(
        [
            "setpriv",
            f"--reuid={entry.pw_uid}",
            f"--regid={entry.pw_gid}",
            "--clear-groups",
            sys.executable,
            "-c",
            probe,
        ],
        preexec_fn=cgroup.preexec(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.stdout.splitlines() == [
        f"/dev/nvidia{leased} 6",
        f"/dev/nvidia{other} 1",  # EPERM: the device cgroup, not a file permission
    ], result.stderr


def test_fork_bomb_stays_inside_its_pids_limit(
    servers: dict[str, Server], stack: LoginStack
) -> None:
    ivan = servers["ivan"]
    bomb = textwrap.dedent("""
        import os, time, signal
        children = []
        try:
            for _ in range(5000):
                pid = os.fork()
                if pid == 0:
                    time.sleep(10)
                    os._exit(0)
                children.append(pid)
            result = 'unstopped %d' % len(children)
        except OSError as exc:
            result = 'stopped %d %d' % (exc.errno, len(children))
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        for pid in children:
            os.waitpid(pid, 0)
        open(os.path.expanduser('~/bomb.txt'), 'w').write(result)
    """)
    # started from the kernel, in the background: while it runs, the server itself cannot
    # start threads either (same pids limit), so its answer is read afterwards
    ivan.run(f"""
        import subprocess, sys, os
        try:
            os.remove(os.path.expanduser('~/bomb.txt'))
        except FileNotFoundError:
            pass
        subprocess.Popen([sys.executable, '-c', {bomb!r}], start_new_session=True)
    """)
    home = Path(pwd.getpwnam(ivan.account).pw_dir)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (home / "bomb.txt").exists():
        time.sleep(0.5)
    word, errno, count = (home / "bomb.txt").read_text().split()
    assert word == "stopped"
    assert errno == "11"  # EAGAIN
    assert int(count) < 200
    # the other user, the hub and ivan's own kernel keep working
    assert servers["judy"].run("print(6 * 7)") == "42"
    assert requests.get(f"{stack.hub_url}/hub/health", timeout=10).status_code == 200
    assert ivan.run("print(2 + 2)") == "4"


def test_exceeding_memory_kills_only_the_offender(
    servers: dict[str, Server], stack: LoginStack
) -> None:
    ivan = servers["ivan"]
    assert ivan.kernel is not None
    result = ivan.kernel.execute(
        f"blocks = [bytearray(64 << 20) for _ in range({MEMORY_LIMIT_MB * 2 // 64})]\n"
        "print('survived')",
        timeout=90,
    )
    assert "survived" not in result.stdout
    assert result.status in ("restarting", "dead"), result
    # the hub, the other user, and ivan's own server keep working
    assert servers["judy"].run("print(6 * 7)") == "42"
    assert requests.get(f"{stack.hub_url}/hub/health", timeout=10).status_code == 200
    model = requests.get(
        f"{stack.hub_url}/hub/api/users/ivan",
        headers={"Authorization": f"token {ivan.token}"},
        timeout=30,
    ).json()
    assert model["servers"][""]["ready"]
    oom = _oom_kills("ztl-ivan")
    assert oom >= 1


def _oom_kills(account: str) -> int:
    from ztlab.hub.sandbox.cgroups import CgroupManager

    cgroup = CgroupManager.detect(parent="ztlab").get(account)
    assert cgroup is not None
    return cgroup.oom_kills()


def test_quota_and_pool_exhaustion_are_clear(servers: dict[str, Server], stack: LoginStack) -> None:
    token = hub_token(stack, "kim")
    response = spawn_server(stack, "kim", token, {"gpus": 2, "pool": "research"})
    assert response.status_code >= 400
    assert "at most 1 GPU" in response.text or "has 2 GPUs in all" in response.text
    response = spawn_server(stack, "kim", token, {"gpus": 1, "pool": "research"})
    assert response.status_code >= 400
    assert "free in pool research: 0 of 2 GPUs" in response.text, response.text
    assert stack.wait_record("policy.decision", actor="kim")


def test_stopping_a_server_releases_its_lease(
    servers: dict[str, Server], stack: LoginStack
) -> None:
    judy = servers["judy"]
    assert judy.kernel is not None
    judy.kernel.close()
    judy.kernel = None
    response = requests.delete(
        f"{stack.hub_url}/hub/api/users/judy/server",
        headers={"Authorization": f"token {judy.token}"},
        timeout=60,
    )
    assert response.status_code in (202, 204)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _active_leases(stack, "judy"):
        time.sleep(0.5)
    assert _active_leases(stack, "judy") == 0
    assert stack.wait_record("gpu.lease.released", actor="judy")


def _active_leases(stack: LoginStack, user: str) -> int:
    db = stack.state_dir / "gpu" / "leases.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FROM leases WHERE username = ? AND released_at IS NULL", (user,)
        ).fetchone()
    return int(row[0])


def test_a_server_past_its_lease_is_stopped(servers: dict[str, Server], stack: LoginStack) -> None:
    """kim leases the GPU judy gave back, for 0.003 hours (about 11 s)."""
    token = hub_token(stack, "kim")
    response = spawn_server(stack, "kim", token, {"gpus": 1, "pool": "research", "hours": 0.003})
    assert response.status_code in (201, 202), response.text
    wait_ready(stack, "kim", token)
    assert _active_leases(stack, "kim") == 1
    deadline = time.monotonic() + 60  # lease 11 s, and the hub polls every 10 s
    stopped = False
    while time.monotonic() < deadline and not stopped:
        model = requests.get(
            f"{stack.hub_url}/hub/api/users/kim",
            headers={"Authorization": f"token {token}"},
            timeout=30,
        ).json()
        stopped = not model.get("servers")
        time.sleep(1)
    assert stopped, "the server outlived its lease"
    assert _active_leases(stack, "kim") == 0
    assert stack.wait_record("server.lease_expired", actor="kim")
    assert not CgroupManager.detect(parent="ztlab").get("ztl-kim").procs()


def _tls_request_without_client_certificate(ip: str) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we only want to see that *our* side is refused
    with (
        socket.create_connection((ip, 8888), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"GET /user/ivan/api HTTP/1.1\r\nHost: x\r\n\r\n")
        return tls.recv(100)


def test_servers_accept_only_mutual_tls(servers: dict[str, Server]) -> None:
    """Internal TLS: a host process without a hub-issued client certificate gets nothing."""
    ip = _sandbox_ip("ivan")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://{ip}:8888/user/ivan/api", timeout=5)
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        _tls_request_without_client_certificate(ip)
