"""Per-user network namespaces joined to the host by a veth pair, egress off by default.

Each user's server runs in a network namespace ``ztl-USER`` (under ``/run/netns``) whose
only link is one end of a veth pair (``eth0`` inside); the other end (``ztlvXXXXXXXXXXX``,
a hash of the user name, 15 characters) stays on the host. Each pair gets a ``/30`` from
the pool (``10.213.0.0/16`` by default): ``.1`` on the host side, ``.2`` inside, and a
default route inside via the host side. Allocations are kept in a small JSON state file,
so a user keeps the same addresses across restarts. IPv6 is turned off on both ends.

One nftables table (``inet ztlab``) enforces, for every ``ztlv*`` interface:

=====================================  ===================================================
traffic                                verdict
=====================================  ===================================================
sandbox -> anything not on this host   rejected in ``prerouting`` (internet, LAN, other
                                       sandboxes, other private ranges); fails at once
sandbox -> an address of this host     rejected in ``input`` unless :meth:`allow`\\ ed for
                                       that namespace, (destination, protocol, port)
host -> sandbox                        rejected in ``output`` unless
                                       :meth:`allow_ingress`\\ ed (sandbox IP, port)
sandbox A <-> sandbox B                rejected (``prerouting``) and dropped in
                                       ``forward`` as a second fence
outside -> any pool address            dropped in ``input`` (only ``lo`` and the veths
                                       may reach the pool's host-side addresses)
=====================================  ===================================================

Replies of allowed connections pass (``ct state established,related``). Host traffic
that does not touch a ``ztlv*`` interface or the pool is not looked at: the base chains'
policy is ``accept``. ``net.ipv4.ip_forward`` is never changed (nothing is routed).

**Reaching a server** (the proxy): connect to ``Netns.sandbox_ip:PORT`` after
``allow_ingress(ns, port=PORT)``; the server listens on ``sandbox_ip`` (or ``0.0.0.0``)
inside the namespace, so every user's server can use the same fixed port.

**Reaching the hub API** (the server): ``127.0.0.1`` of the host cannot be reached from a
namespace (it is the namespace's own loopback). :meth:`NetworkSegments.setup` puts the
pool's last address, :attr:`NetworkSegments.service_ip` (``10.213.255.254``), on the
host's ``lo``; services the sandboxes need (hub API, proxy API) listen there, and each
namespace gets ``allow(ns, dest=segments.service_ip, port=8081)``. The pool guard above
keeps that address unreachable from other networks. Listening on ``0.0.0.0`` works too
but exposes the service on every host interface.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztlab.hub.sandbox.bwrap import SandboxError

__all__ = ["Netns", "NetworkSegments", "SandboxError"]

#: Host-side veth names all start with this; the firewall matches ``ztlv*``.
IF_PREFIX = "ztlv"
#: Name of the veth end inside each namespace.
SANDBOX_IF = "eth0"
NETNS_DIR = Path("/run/netns")

_USER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}\Z")
_TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}\Z")
_PROTOCOLS = frozenset({"tcp", "udp"})
_STATE_VERSION = 1


@dataclass(frozen=True)
class Netns:
    """One user's network namespace and its veth pair.

    ``name``: the namespace, under ``/run/netns`` (pass it to
    :func:`ztlab.hub.sandbox.bwrap.sandbox_argv` as ``netns``). ``host_if``/``sandbox_if``:
    the veth ends. ``host_ip``/``sandbox_ip``: their addresses, in one ``/30``.
    """

    name: str
    host_if: str
    sandbox_if: str
    host_ip: str
    sandbox_ip: str

    @property
    def path(self) -> Path:
        """The namespace's file, for ``nsenter --net=``."""
        return NETNS_DIR / self.name


def _run(argv: Sequence[str], *, input_text: str | None = None) -> str:
    """Run a system command; its stdout, or :class:`SandboxError` with its stderr."""
    try:
        result = subprocess.run(
            list(argv),
            input=input_text,
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except FileNotFoundError as exc:
        raise SandboxError(
            f"{argv[0]} is not installed",
            hint="install the Debian packages iproute2 and nftables",
            command=argv,
        ) from exc
    except subprocess.CalledProcessError as exc:
        stderr = (exc.stderr or "").strip()
        raise SandboxError(
            f"{' '.join(argv)} failed (exit {exc.returncode}): {stderr}",
            command=argv,
            stderr=stderr,
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise SandboxError(f"{' '.join(argv)} timed out", command=argv) from exc
    return result.stdout


def _succeeds(argv: Sequence[str]) -> bool:
    """Whether a probing command exits 0 (its output is ignored)."""
    try:
        return (
            subprocess.run(list(argv), capture_output=True, timeout=30, check=False).returncode == 0
        )
    except FileNotFoundError:
        return False


class NetworkSegments:
    """Create, open up and remove the users' network namespaces (run as root).

    ``pool``: an IPv4 network of at least 8 addresses; each user gets one ``/30`` of it, the
    last ``/30`` is reserved for :attr:`service_ip`. ``table``: the nftables table (family
    ``inet``) holding every rule made here. ``state_file``: the JSON file that remembers
    which ``/30`` belongs to whom (mode 0600; a ``.lock`` file beside it serialises
    concurrent callers).
    """

    def __init__(
        self, *, pool: str = "10.213.0.0/16", table: str = "ztlab", state_file: Path
    ) -> None:
        try:
            network = ipaddress.IPv4Network(pool)
        except ValueError as exc:
            raise SandboxError(f"invalid address pool {pool!r}: {exc}") from exc
        if network.prefixlen > 29:
            raise SandboxError(f"address pool {pool!r} is too small", hint="use a /29 or larger")
        if not _TABLE_NAME.match(table):
            raise SandboxError(f"invalid nftables table name {table!r}")
        self._pool = network
        self._table = table
        self._state_file = Path(state_file)

    # -- addressing -------------------------------------------------------------------

    @property
    def pool(self) -> ipaddress.IPv4Network:
        """The address pool."""
        return self._pool

    @property
    def table(self) -> str:
        """The nftables table (family ``inet``) holding every rule made here."""
        return self._table

    @property
    def service_ip(self) -> str:
        """The host address (on ``lo``) where services for the sandboxes listen."""
        return str(self._pool.broadcast_address - 1)

    @property
    def capacity(self) -> int:
        """How many namespaces fit in the pool."""
        return self._pool.num_addresses // 4 - 1

    @staticmethod
    def netns_name(user: str) -> str:
        """``ztl-USER`` for a plain name, ``ztl-HASH`` otherwise."""
        if _USER_NAME.match(user):
            return f"ztl-{user}"
        return f"ztl-{_digest(user)[:16]}"

    @staticmethod
    def host_if_name(user: str) -> str:
        """The host-side veth name: ``ztlv`` and 11 hex digits of a hash (15 characters)."""
        return f"{IF_PREFIX}{_digest(user)[:11]}"

    def _netns_for(self, user: str, index: int) -> Netns:
        base = self._pool.network_address + 4 * index
        return Netns(
            name=self.netns_name(user),
            host_if=self.host_if_name(user),
            sandbox_if=SANDBOX_IF,
            host_ip=str(base + 1),
            sandbox_ip=str(base + 2),
        )

    @contextlib.contextmanager
    def _state(self) -> Iterator[dict[str, int]]:
        """The allocations ``{user: index}``, locked; written back when the block ends."""
        self._state_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_path = self._state_file.with_name(self._state_file.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data: dict[str, Any] = {}
            if self._state_file.exists():
                try:
                    data = json.loads(self._state_file.read_text())
                except (OSError, ValueError) as exc:
                    raise SandboxError(
                        f"cannot read network state {self._state_file}: {exc}"
                    ) from exc
            if data and data.get("pool") != str(self._pool):
                raise SandboxError(
                    f"{self._state_file} allocates from {data.get('pool')}, not {self._pool}",
                    hint="run teardown with the old pool before changing it",
                )
            allocations: dict[str, int] = dict(data.get("allocations", {}))
            before = dict(allocations)
            yield allocations
            if allocations != before or not self._state_file.exists():
                payload = {
                    "version": _STATE_VERSION,
                    "pool": str(self._pool),
                    "allocations": allocations,
                }
                tmp = self._state_file.with_name(self._state_file.name + ".tmp")
                tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
                tmp.chmod(0o600)
                tmp.replace(self._state_file)
        finally:
            os.close(fd)

    def _allocate(self, allocations: dict[str, int], user: str) -> int:
        if user in allocations:
            return allocations[user]
        used = set(allocations.values())
        for index in range(self.capacity):
            if index not in used:
                allocations[user] = index
                return index
        raise SandboxError(
            f"address pool {self._pool} is full ({self.capacity} namespaces)",
            hint="configure a larger pool",
        )

    # -- firewall ---------------------------------------------------------------------

    def setup(self) -> None:
        """Create the nftables table, its sets and base chains, and the service address.

        Idempotent: the base chains are rewritten in one transaction, the allow sets (and
        what earlier :meth:`allow` calls put in them) are kept.
        """
        t = f"inet {self._table}"
        # every rule is scoped to this pool, so that networks of other pools (another
        # table on the same machine) are neither let through nor blocked by this one
        veth = f'"{IF_PREFIX}*"'
        src = f"iifname {veth} ip saddr {self._pool}"
        dst = f"oifname {veth} ip daddr {self._pool}"
        reject = [
            "meta l4proto tcp reject with tcp reset",
            "reject with icmpx type admin-prohibited",
        ]
        lines = [
            f"add table {t}",
            f"add set {t} egress_allow "
            "{ type ifname . ipv4_addr . ipv4_addr . inet_proto . inet_service ; }",
            f"add set {t} ingress_allow "
            "{ type ifname . ipv4_addr . inet_proto . inet_service ; }",
        ]
        for chain in ("prerouting", "input", "forward", "output"):
            lines += [
                f"add chain {t} {chain} "
                f"{{ type filter hook {chain} priority filter ; policy accept ; }}",
                f"flush chain {t} {chain}",
            ]
        # (1) sandbox -> anything that is not an address of this host
        lines += [f"add rule {t} prerouting {src} fib daddr type != local {r}" for r in reject]
        # (2) sandbox -> this host: replies, then allowed (namespace, dest, proto, port)
        lines += [
            f"add rule {t} input {src} ct state established,related accept",
            f"add rule {t} input {src} "
            "iifname . ip saddr . ip daddr . meta l4proto . th dport @egress_allow accept",
        ]
        lines += [f"add rule {t} input {src} {r}" for r in reject]
        # (3) the pool's host-side addresses only from lo and the veths
        lines.append(f'add rule {t} input ip daddr {self._pool} iifname != "lo" drop')
        # (4) nothing is routed to or from a sandbox
        lines += [
            f"add rule {t} forward {src} drop",
            f"add rule {t} forward {dst} drop",
        ]
        # (5) host -> sandbox: replies, then allowed (namespace, sandbox ip, proto, port)
        lines += [
            f"add rule {t} output {dst} ct state established,related accept",
            f"add rule {t} output {dst} "
            "oifname . ip daddr . meta l4proto . th dport @ingress_allow accept",
        ]
        lines += [f"add rule {t} output {dst} {r}" for r in reject]
        _run(["nft", "-f", "-"], input_text="\n".join(lines) + "\n")
        _run(["ip", "addr", "replace", f"{self.service_ip}/32", "dev", "lo"])

    def _table_exists(self) -> bool:
        return _succeeds(["nft", "list", "table", "inet", self._table])

    def _require_table(self) -> None:
        if not self._table_exists():
            raise SandboxError(
                f"nftables table inet {self._table} does not exist",
                hint="call NetworkSegments.setup() first",
            )

    # -- namespaces -------------------------------------------------------------------

    def create(self, user: str) -> Netns:
        """Create (or repair) ``user``'s namespace, veth pair, addresses and route.

        Idempotent: an existing namespace keeps its processes and addresses. The firewall
        must be set up (:meth:`setup`); nothing is allowed until :meth:`allow` and
        :meth:`allow_ingress` say so.
        """
        if not user:
            raise SandboxError("empty user name")
        self._require_table()
        with self._state() as allocations:
            ns = self._netns_for(user, self._allocate(allocations, user))
        if not ns.path.exists():
            _run(["ip", "netns", "add", ns.name])
        inside = ["ip", "-n", ns.name]
        if _succeeds(["ip", "link", "show", "dev", ns.host_if]) and not _succeeds(
            [*inside, "link", "show", "dev", ns.sandbox_if]
        ):
            _run(["ip", "link", "del", "dev", ns.host_if])  # a leftover whose peer is gone
        if not _succeeds(["ip", "link", "show", "dev", ns.host_if]):
            _run(
                [
                    "ip", "link", "add", ns.host_if, "type", "veth",
                    "peer", "name", ns.sandbox_if, "netns", ns.name,
                ]
            )  # fmt: skip
        if Path("/proc/sys/net/ipv6").exists():
            Path(f"/proc/sys/net/ipv6/conf/{ns.host_if}/disable_ipv6").write_text("1\n")
            _run(
                [
                    "ip", "netns", "exec", ns.name, "sysctl", "-q", "-w",
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                    f"net.ipv6.conf.{ns.sandbox_if}.disable_ipv6=1",
                ]
            )  # fmt: skip
        _run(["ip", "addr", "replace", f"{ns.host_ip}/30", "dev", ns.host_if])
        _run(["ip", "link", "set", "dev", ns.host_if, "up"])
        _run([*inside, "addr", "replace", f"{ns.sandbox_ip}/30", "dev", ns.sandbox_if])
        _run([*inside, "link", "set", "dev", ns.sandbox_if, "up"])
        _run([*inside, "link", "set", "dev", "lo", "up"])
        _run([*inside, "route", "replace", "default", "via", ns.host_ip])
        return ns

    def get(self, user: str) -> Netns | None:
        """``user``'s namespace as allocated, or ``None`` (nothing is created)."""
        with self._state() as allocations:
            index = allocations.get(user)
        return None if index is None else self._netns_for(user, index)

    def owner_of(self, address: str) -> str | None:
        """The user whose sandbox has ``address`` (its end of the veth pair), or ``None``.

        Read from the allocations each time: an address freed by :meth:`delete` may be
        given to another user.
        """
        with self._state() as allocations:
            for user, index in allocations.items():
                if self._netns_for(user, index).sandbox_ip == address:
                    return user
        return None

    def allow(self, ns: Netns, *, dest: str, port: int, proto: str = "tcp") -> None:
        """Let ``ns`` open connections to ``dest:port`` on this host (idempotent).

        ``dest`` must be an address of this host: :attr:`service_ip`, ``ns.host_ip`` or
        another local address; anything else is rejected before routing whatever is
        allowed here.
        """
        self._require_table()
        address = _ipv4(dest)
        element = (
            f'"{ns.host_if}" . {_ipv4(ns.sandbox_ip)} . {address} . {_proto(proto)} . {_port(port)}'
        )
        _run(["nft", "add", "element", "inet", self._table, "egress_allow", f"{{ {element} }}"])

    def allow_ingress(self, ns: Netns, *, port: int, proto: str = "tcp") -> None:
        """Let the host (the proxy) connect to ``ns.sandbox_ip:port`` (idempotent)."""
        self._require_table()
        element = f'"{ns.host_if}" . {_ipv4(ns.sandbox_ip)} . {_proto(proto)} . {_port(port)}'
        _run(["nft", "add", "element", "inet", self._table, "ingress_allow", f"{{ {element} }}"])

    def disallow(self, ns: Netns, *, dest: str, port: int, proto: str = "tcp") -> None:
        """Undo one :meth:`allow` (idempotent)."""
        if not self._table_exists():
            return
        element = (
            f'"{ns.host_if}" . {_ipv4(ns.sandbox_ip)} . {_ipv4(dest)} . {_proto(proto)} . '
            f"{_port(port)}"
        )
        _succeeds(
            ["nft", "delete", "element", "inet", self._table, "egress_allow", f"{{ {element} }}"]
        )

    def forbid_ingress(self, ns: Netns, *, port: int, proto: str = "tcp") -> None:
        """Undo one :meth:`allow_ingress` (idempotent)."""
        if not self._table_exists():
            return
        element = f'"{ns.host_if}" . {_ipv4(ns.sandbox_ip)} . {_proto(proto)} . {_port(port)}'
        _succeeds(
            ["nft", "delete", "element", "inet", self._table, "ingress_allow", f"{{ {element} }}"]
        )

    def revoke_all(self, ns: Netns) -> None:
        """Remove every :meth:`allow` and :meth:`allow_ingress` of ``ns``."""
        if not self._table_exists():
            return
        for set_name in ("egress_allow", "ingress_allow"):
            out = _run(["nft", "-j", "list", "set", "inet", self._table, set_name])
            for entry in json.loads(out).get("nftables", []):
                for elem in entry.get("set", {}).get("elem", []):
                    parts = elem.get("concat") if isinstance(elem, dict) else None
                    if not parts or parts[0] != ns.host_if:
                        continue
                    text = " . ".join(f'"{p}"' if i == 0 else str(p) for i, p in enumerate(parts))
                    _run(
                        ["nft", "delete", "element", "inet", self._table, set_name, f"{{ {text} }}"]
                    )

    def delete(self, user: str) -> None:
        """Remove ``user``'s rules, veth pair and namespace, and free its addresses.

        Idempotent. Processes still inside the namespace keep it alive (unnamed) until
        they exit: stop the server (kill its cgroup) first.
        """
        with self._state() as allocations:
            index = allocations.get(user)
            ns = self._netns_for(user, index if index is not None else 0)
            self.revoke_all(ns)
            if _succeeds(["ip", "link", "show", "dev", ns.host_if]):
                _run(["ip", "link", "del", "dev", ns.host_if])
            if ns.path.exists():
                _run(["ip", "netns", "del", ns.name])
            allocations.pop(user, None)

    def users(self) -> list[str]:
        """The users that have an allocation."""
        with self._state() as allocations:
            return sorted(allocations)

    def teardown(self) -> None:
        """Remove every namespace, rule, the table, the service address and the state file."""
        for user in self.users():
            self.delete(user)
        if self._table_exists():
            _run(["nft", "delete", "table", "inet", self._table])
        lo_addresses = _run(["ip", "-o", "-4", "addr", "show", "dev", "lo"])
        if f" {self.service_ip}/32 " in lo_addresses:
            _run(["ip", "addr", "del", f"{self.service_ip}/32", "dev", "lo"])
        for path in (
            self._state_file,
            self._state_file.with_name(self._state_file.name + ".lock"),
        ):
            path.unlink(missing_ok=True)


def _digest(user: str) -> str:
    return hashlib.sha256(user.encode()).hexdigest()


def _ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError as exc:
        raise SandboxError(f"not an IPv4 address: {value!r}") from exc


def _port(port: int) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise SandboxError(f"invalid port {port!r}")
    return port


def _proto(proto: str) -> str:
    if proto not in _PROTOCOLS:
        raise SandboxError(f"invalid protocol {proto!r}, expected one of {sorted(_PROTOCOLS)}")
    return proto
