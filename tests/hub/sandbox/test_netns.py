"""Per-user network namespaces, for real: veth pairs, addresses and the nftables fence.

Every address used is inside the test's own pool (10.216.240.0/24) except 10.99.0.1, which
has no host and is only used to show that a sandbox cannot route anywhere. The namespaces,
interfaces, table and service address are removed at the end, also when a test fails.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ztlab.hub.sandbox.netns import Netns, NetworkSegments, SandboxError

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces are managed by root"),
    pytest.mark.skipif(
        not (shutil.which("ip") and shutil.which("nft")),
        reason="needs iproute2 and nftables (apt-get install nftables)",
    ),
]

POOL = "10.216.240.0/24"
#: timeout of every probing connection; a blocked one must fail well within 2 s
CONNECT_TIMEOUT = 1.0

#: connect to argv[1]:argv[2]; exit 0 when the TCP handshake completes, 1 otherwise
CONNECT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
except OSError as exc:
    print(type(exc).__name__, exc)
    sys.exit(1)
"""

#: listen on argv[1] at each port of argv[2:], print "ready", accept until killed
SERVE = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in sys.argv[2:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(port)))
    s.listen(16)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept()
        conn.close()
"""


@dataclass
class Net:
    segments: NetworkSegments
    a: Netns
    b: Netns
    state_file: Path
    servers: list[subprocess.Popen[str]]
    listeners: list[socket.socket]


def _leftovers(segments: NetworkSegments, users: list[str]) -> None:
    """Remove whatever a failed run may have left, by name (never another's objects)."""
    for user in users:
        subprocess.run(["ip", "link", "del", segments.host_if_name(user)], capture_output=True)
        subprocess.run(["ip", "netns", "del", segments.netns_name(user)], capture_output=True)


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    tag = f"{os.getpid() % 100000}"
    users = [f"ta{tag}", f"tb{tag}"]
    state_dir = Path(tempfile.mkdtemp(prefix="ztl-netns-"))
    state_file = state_dir / "netns.json"
    segments = NetworkSegments(pool=POOL, table=f"ztlab_test{tag}", state_file=state_file)
    servers: list[subprocess.Popen[str]] = []
    listeners: list[socket.socket] = []
    forward_before = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    try:
        segments.setup()
        a = segments.create(users[0])
        b = segments.create(users[1])
        yield Net(segments, a, b, state_file, servers, listeners)
    finally:
        for proc in servers:
            proc.kill()
            proc.wait(timeout=10)
        for sock in listeners:
            sock.close()
        with contextlib.suppress(SandboxError):
            segments.teardown()
        _leftovers(segments, users)
        subprocess.run(["nft", "delete", "table", "inet", segments.table], capture_output=True)
        subprocess.run(
            ["ip", "addr", "del", f"{segments.service_ip}/32", "dev", "lo"], capture_output=True
        )
        shutil.rmtree(state_dir, ignore_errors=True)
        assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == forward_before


def reachable(ns: Netns | None, ip: str, port: int) -> bool:
    """Whether a TCP connection from ``ns`` (``None``: the host) to ``ip:port`` opens."""
    if ns is None:
        try:
            socket.create_connection((ip, port), timeout=CONNECT_TIMEOUT).close()
        except OSError:
            return False
        return True
    done = subprocess.run(
        ["ip", "netns", "exec", ns.name, sys.executable, "-c", CONNECT, ip, str(port),
         str(CONNECT_TIMEOUT)],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )  # fmt: skip
    return done.returncode == 0


def serve_in(net: Net, ns: Netns, *ports: int) -> None:
    """Start a TCP server inside ``ns`` on ``ns.sandbox_ip`` at ``ports``."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns.name, sys.executable, "-c", SERVE, ns.sandbox_ip,
         *map(str, ports)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    net.servers.append(proc)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"


def listen_on_host(net: Net, ip: str, port: int) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ip, port))
    sock.listen(16)
    net.listeners.append(sock)


def test_namespaces_get_their_own_addresses_and_names(net: Net) -> None:
    a, b = net.a, net.b
    assert a.sandbox_if == b.sandbox_if == "eth0"
    for ns in (a, b):
        assert len(ns.host_if) <= 15
        assert ns.host_if.startswith("ztlv")
        assert ns.path.exists()
        assert ipaddress.ip_address(ns.sandbox_ip) in net.segments.pool
    assert {a.host_ip, a.sandbox_ip}.isdisjoint({b.host_ip, b.sandbox_ip})
    inside = subprocess.run(
        ["ip", "-n", a.name, "-j", "addr"], capture_output=True, text=True, check=True
    )
    addresses = {
        (link["ifname"], info["local"])
        for link in json.loads(inside.stdout)
        for info in link.get("addr_info", [])
    }
    assert addresses == {("lo", "127.0.0.1"), ("eth0", a.sandbox_ip)}  # no IPv6
    # idempotent, and remembered by a second instance reading the same state file
    assert net.segments.create(a.name[4:]) == a
    again = NetworkSegments(pool=POOL, table=net.segments.table, state_file=net.state_file)
    assert again.get(a.name[4:]) == a


def test_an_address_names_its_user_until_it_is_freed(net: Net) -> None:
    a, b = net.a, net.b
    assert net.segments.owner_of(a.sandbox_ip) == a.name[4:]
    assert net.segments.owner_of(b.sandbox_ip) == b.name[4:]
    assert net.segments.owner_of(a.host_ip) is None  # the host's end is nobody's sandbox
    assert net.segments.owner_of(net.segments.service_ip) is None
    third = f"tc{os.getpid() % 100000}"
    c = net.segments.create(third)
    try:
        assert net.segments.owner_of(c.sandbox_ip) == third
    finally:
        net.segments.delete(third)
    assert net.segments.owner_of(c.sandbox_ip) is None


def test_host_reaches_a_server_only_on_an_allowed_port(net: Net) -> None:
    serve_in(net, net.a, 18080, 18081)
    assert not reachable(None, net.a.sandbox_ip, 18080)
    net.segments.allow_ingress(net.a, port=18080)
    net.segments.allow_ingress(net.a, port=18080)  # idempotent
    assert reachable(None, net.a.sandbox_ip, 18080)
    assert not reachable(None, net.a.sandbox_ip, 18081)


def test_a_second_network_with_its_own_pool_does_not_interfere(net: Net, tmp_path: Path) -> None:
    """Two hubs on one machine (two tables, disjoint pools) leave each other's rules alone."""
    serve_in(net, net.a, 18082)
    net.segments.allow_ingress(net.a, port=18082)
    other = NetworkSegments(
        pool="10.216.242.0/28", table=f"ztlab_o{os.getpid()}", state_file=tmp_path / "o.json"
    )
    other.setup()
    try:
        assert reachable(None, net.a.sandbox_ip, 18082)
    finally:
        other.teardown()


def test_one_sandbox_cannot_reach_another(net: Net) -> None:
    serve_in(net, net.a, 18090)
    net.segments.allow_ingress(net.a, port=18090)
    assert reachable(None, net.a.sandbox_ip, 18090)
    started = time.monotonic()
    assert not reachable(net.b, net.a.sandbox_ip, 18090)
    assert not reachable(net.b, net.a.host_ip, 18090)
    assert time.monotonic() - started < 4  # both failed fast (rejected, not timed out)


def test_sandbox_reaches_a_host_service_only_once_allowed(net: Net) -> None:
    listen_on_host(net, net.a.host_ip, 18100)
    listen_on_host(net, net.a.host_ip, 18101)
    assert not reachable(net.a, net.a.host_ip, 18100)
    net.segments.allow(net.a, dest=net.a.host_ip, port=18100)
    assert reachable(net.a, net.a.host_ip, 18100)
    assert not reachable(net.a, net.a.host_ip, 18101)
    assert not reachable(net.b, net.a.host_ip, 18100)  # the exception is A's alone


def test_the_service_address_serves_every_allowed_sandbox(net: Net) -> None:
    service = net.segments.service_ip
    assert service == "10.216.240.254"
    listen_on_host(net, service, 18110)
    assert reachable(None, service, 18110)  # the host itself (the hub, over lo)
    assert not reachable(net.a, service, 18110)
    net.segments.allow(net.a, dest=service, port=18110)
    assert reachable(net.a, service, 18110)
    assert not reachable(net.b, service, 18110)


def test_nothing_else_is_reachable_from_a_sandbox(net: Net) -> None:
    started = time.monotonic()
    assert not reachable(net.a, "10.99.0.1", 80)
    assert time.monotonic() - started < 2
    assert not reachable(net.a, net.b.sandbox_ip, 18080)


def test_bad_arguments_are_refused(net: Net) -> None:
    with pytest.raises(SandboxError):
        net.segments.allow(net.a, dest="hub.example", port=8081)
    with pytest.raises(SandboxError):
        net.segments.allow(net.a, dest=net.a.host_ip, port=70000)
    with pytest.raises(SandboxError):
        net.segments.allow_ingress(net.a, port=8888, proto="icmp")
    with pytest.raises(SandboxError):
        NetworkSegments(pool="10.213.0.0/30", state_file=net.state_file)
    with pytest.raises(SandboxError):
        NetworkSegments(pool=POOL, table="bad table", state_file=net.state_file)
    with pytest.raises(SandboxError, match="allocates from"):
        NetworkSegments(pool="10.213.241.0/24", state_file=net.state_file).get("x")


def test_names_fit_interface_limits() -> None:
    long_name = "someone.with+an@odd-and-very-long-name-" * 3
    assert len(NetworkSegments.host_if_name(long_name)) == 15
    assert NetworkSegments.netns_name("alice") == "ztl-alice"
    assert NetworkSegments.netns_name(long_name).startswith("ztl-")
    assert "/" not in NetworkSegments.netns_name("../../etc")
    assert NetworkSegments.host_if_name("alice") != NetworkSegments.host_if_name("bob")


def test_delete_removes_namespace_interfaces_and_rules(net: Net) -> None:
    user = net.b.name[4:]
    net.segments.allow_ingress(net.b, port=18120)
    net.segments.delete(user)
    net.segments.delete(user)  # idempotent
    assert not net.b.path.exists()
    link = subprocess.run(["ip", "link", "show", "dev", net.b.host_if], capture_output=True)
    assert link.returncode != 0
    rules = subprocess.run(
        ["nft", "list", "table", "inet", net.segments.table],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert net.b.host_if not in rules
    assert net.a.host_if in rules
    assert user not in net.segments.users()


def test_teardown_removes_everything() -> None:
    tag = f"{os.getpid() % 100000}"
    with tempfile.TemporaryDirectory(prefix="ztl-netns-") as tmp:
        state = Path(tmp) / "state.json"
        segments = NetworkSegments(pool="10.216.241.0/28", table=f"ztlab_td{tag}", state_file=state)
        try:
            segments.setup()
            segments.setup()  # idempotent
            ns = segments.create(f"tc{tag}")
            segments.allow(ns, dest=segments.service_ip, port=8081)
            assert segments.capacity == 3
            segments.teardown()
            table = subprocess.run(
                ["nft", "list", "table", "inet", f"ztlab_td{tag}"], capture_output=True
            )
            assert table.returncode != 0
            assert not ns.path.exists()
            lo = subprocess.run(
                ["ip", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True
            )
            assert segments.service_ip not in lo.stdout
            assert not state.exists()
        finally:
            with contextlib.suppress(SandboxError):
                segments.teardown()
            _leftovers(segments, [f"tc{tag}"])
