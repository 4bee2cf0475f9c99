"""Proxy: what the enforcement point adds to a request, against configurable-http-proxy.

One ``ztlab hub`` (sandboxed servers, Traefik with the hub's ``forwardAuth`` in front of
them) runs a few trainers' servers. Beside it, in the same run, a configurable-http-proxy
is started alone with routes to the very same servers (over the same internal TLS, with the
same proxy-client certificate): that is what a stock JupyterHub puts in front of a server,
forwarding whatever arrives. The same requests, with the same token, go three ways, taking
turns so that noise hits all alike:

- straight to the server (its own address in its network namespace): the floor;
- through configurable-http-proxy alone: the baseline;
- through the hub's public address: Traefik, the hub's decision, then the server.

Measured: a 100 KB GET (``/files/``, which the hub also checks against the role's raw-file
rule), a kernel round trip over the WebSocket (``execute_request`` of ``1+1`` to its
``execute_reply``), and many kernel WebSockets held open at once, each doing a round trip
every few seconds, through each proxy in turn. "Added" is the proxy's percentile minus the
baseline's at the same percentile.

Five servers share the held sockets (each server holds four ZeroMQ sockets per kernel
WebSocket, and ZeroMQ allows about a thousand per process), five kernels each.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from bench._table import Row, percentile
from bench.login import _port, _start, _stop
from bench.login import _ztlab_hub as login_ztlab_hub
from bench.spawn import POOL, TABLE, Hub, _api_session, _cleanup, _idp_user, _spawn_to_ready
from ztlab.common.installed import npm_command
from ztlab.dev.idp.launcher import DevIdP

SECRET = "bench-client-secret-0123456789abcdef"
SERVER_PORT = 8888  # SandboxSpawner.server_port
SIZE = 100 * 1024
KERNELS_PER_SERVER = 5
ROUND_TRIP_EVERY_S = 5.0


@dataclass
class Server:
    """One user's running server, as the three paths reach it."""

    user: str
    token: str
    address: str  # https://SANDBOX_IP:8888
    kernels: list[str] = field(default_factory=list)


@dataclass
class Paths:
    """Base URLs of the three ways to a server, and what the direct way needs for TLS."""

    hub: str
    chp: str
    ca: str
    cert: str
    key: str

    def base(self, way: str, server: Server) -> str:
        root = {"direct": server.address, "chp": self.chp, "ztlab": self.hub}[way]
        return f"{root}/user/{server.user}"

    def session(self, way: str, server: Server) -> requests.Session:
        session = requests.Session()
        session.headers["Authorization"] = f"token {server.token}"
        session.trust_env = False  # REQUESTS_CA_BUNDLE would replace ``verify``
        if way == "direct":
            session.cert = (self.cert, self.key)
            session.verify = self.ca
        return session

    def ws_request(self, way: str, server: Server, kernel: str) -> HTTPRequest:
        url = self.base(way, server).replace("http", "ws", 1)
        tls: dict[str, Any] = {}
        if way == "direct":
            tls = {"ca_certs": self.ca, "client_cert": self.cert, "client_key": self.key}
        return HTTPRequest(
            f"{url}/api/kernels/{kernel}/channels?session_id={uuid.uuid4().hex}",
            headers={"Authorization": f"token {server.token}"},
            connect_timeout=60,
            request_timeout=60,
            **tls,
        )


WAYS = ("direct", "chp", "ztlab")


# -- kernels over the WebSocket ----------------------------------------------------------


def _message(msg_type: str, content: dict[str, Any], session: str) -> tuple[str, str]:
    msg_id = uuid.uuid4().hex
    header = {
        "msg_id": msg_id,
        "msg_type": msg_type,
        "session": session,
        "username": "bench",
        "date": "2026-01-01T00:00:00Z",
        "version": "5.3",
    }
    body = {
        "header": header,
        "parent_header": {},
        "metadata": {},
        "content": content,
        "channel": "shell",
        "buffers": [],
    }
    return msg_id, json.dumps(body)


EXECUTE = {"code": "1+1", "silent": False, "store_history": False, "allow_stdin": False}


async def _round_trip(socket: WebSocketClientConnection, session: str, timeout: float) -> float:
    """Seconds from sending ``1+1`` to its ``execute_reply`` (other messages are skipped)."""
    msg_id, text = _message("execute_request", EXECUTE, session)
    start = time.perf_counter()
    await socket.write_message(text)
    while True:
        raw = await asyncio.wait_for(socket.read_message(), timeout)
        if raw is None:
            raise ConnectionError(f"closed: {socket.close_code} {socket.close_reason}")
        message = json.loads(raw)
        if (
            message.get("channel") == "shell"
            and message.get("parent_header", {}).get("msg_id") == msg_id
        ):
            return time.perf_counter() - start


async def _round_trips(paths: Paths, server: Server, count: int) -> dict[str, list[float]]:
    """``count`` round trips per way, each way on its own kernel, the ways taking turns."""
    sockets = {
        way: await websocket_connect(paths.ws_request(way, server, server.kernels[i]))
        for i, way in enumerate(WAYS)
    }
    session = uuid.uuid4().hex
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    try:
        for way in WAYS:  # warm-up: the kernel's first execution is slower
            await _round_trip(sockets[way], session, 60)
        for _ in range(count):
            for way in WAYS:
                times[way].append(await _round_trip(sockets[way], session, 60))
    finally:
        for socket in sockets.values():
            socket.close()
    return times


@dataclass
class Held:
    """What happened to the sockets held open through one proxy."""

    opened: int = 0
    errors: list[str] = field(default_factory=list)
    connect: list[float] = field(default_factory=list)
    trips: list[float] = field(default_factory=list)


async def _hold(paths: Paths, way: str, servers: list[Server], count: int, hold_s: float) -> Held:
    """``count`` kernel WebSockets at once through ``way``, held ``hold_s`` seconds, each
    doing a round trip every few seconds; errors counted, not raised."""
    held = Held()
    targets = [(s, k) for s in servers for k in s.kernels]
    session = uuid.uuid4().hex

    async def one(index: int) -> None:
        server, kernel = targets[index % len(targets)]
        start = time.perf_counter()
        try:
            socket = await websocket_connect(paths.ws_request(way, server, kernel))
        except Exception as exc:
            held.errors.append(f"connect: {exc}")
            return
        held.connect.append(time.perf_counter() - start)
        held.opened += 1
        try:
            ends = time.monotonic() + hold_s
            # spread the round trips over the interval
            await asyncio.sleep(ROUND_TRIP_EVERY_S * index / count)
            while time.monotonic() < ends:
                held.trips.append(await _round_trip(socket, session, 30))
                await asyncio.sleep(ROUND_TRIP_EVERY_S)
            held.trips.append(await _round_trip(socket, session, 30))  # still open at the end
        except Exception as exc:
            held.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            socket.close()

    await asyncio.gather(*(one(i) for i in range(count)))
    return held


# -- the set-up ---------------------------------------------------------------------------


def _chp(root: Path, tls: tuple[str, str, str]) -> tuple[subprocess.Popen[bytes], str, str]:
    """configurable-http-proxy alone, reaching servers over the same internal TLS."""
    ca, cert, key = tls
    port, api_port = _port(), _port()
    token = secrets.token_hex(16)
    chp = npm_command("configurable-http-proxy", "configurable-http-proxy")
    argv = [
        str(chp),
        "--ip=127.0.0.1",
        f"--port={port}",
        "--api-ip=127.0.0.1",
        f"--api-port={api_port}",
        f"--client-ssl-key={key}",
        f"--client-ssl-cert={cert}",
        f"--client-ssl-ca={ca}",
        "--log-level=warn",
    ]
    env = {**os.environ, "CONFIGPROXY_AUTH_TOKEN": token}
    proc = _start(
        argv,
        root / "chp.log",
        f"http://127.0.0.1:{api_port}/api/routes",
        env=env,
        headers={"Authorization": f"token {token}"},
    )
    return proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{api_port}|{token}"


def _chp_route(api: str, user: str, target: str) -> None:
    url, token = api.split("|")
    response = requests.post(
        f"{url}/api/routes/user/{user}",
        json={"target": target},
        headers={"Authorization": f"token {token}"},
        timeout=30,
    )
    response.raise_for_status()


def _sandbox_ip(state: Path, user: str) -> str:
    from ztlab.hub.sandbox.netns import NetworkSegments

    segments = NetworkSegments(pool=POOL, table=TABLE, state_file=state / "sandbox" / "netns.json")
    netns = segments.get(user)
    if netns is None:
        raise RuntimeError(f"{user} has no network namespace in {state}")
    return netns.sandbox_ip


def _token(api: requests.Session) -> str:
    header = str(api.headers["Authorization"])
    return header.split(" ", 1)[1]


def _blob(user: str) -> None:
    entry = pwd.getpwnam(f"ztl-{user}")
    blob = Path(entry.pw_dir) / "blob.bin"
    blob.write_bytes(os.urandom(SIZE))
    os.chown(blob, entry.pw_uid, entry.pw_gid)


def _start_kernels(hub: str, server: Server, count: int) -> None:
    api = requests.Session()
    api.headers["Authorization"] = f"token {server.token}"
    for _ in range(count):
        response = api.post(f"{hub}/user/{server.user}/api/kernels", json={}, timeout=120)
        response.raise_for_status()
        server.kernels.append(response.json()["id"])


def _gets(paths: Paths, server: Server, count: int) -> dict[str, list[float]]:
    sessions = {way: paths.session(way, server) for way in WAYS}
    urls = {way: f"{paths.base(way, server)}/files/blob.bin" for way in WAYS}
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for way in WAYS:  # warm-up: connections, the server's token check, the hub's cache
        for _ in range(5):
            _get(sessions[way], urls[way])
    for _ in range(count):
        for way in WAYS:
            start = time.perf_counter()
            _get(sessions[way], urls[way])
            times[way].append(time.perf_counter() - start)
    return times


def _get(session: requests.Session, url: str) -> None:
    response = session.get(url, timeout=60, allow_redirects=False)
    if response.status_code != 200 or len(response.content) != SIZE:
        raise RuntimeError(f"GET {url}: {response.status_code} {response.text[:200]}")


# -- the suite ----------------------------------------------------------------------------


def run(*, quick: bool = False) -> list[Row]:
    gets = 100 if quick else 1000
    trips = 50 if quick else 500
    sockets = 50 if quick else 500
    hold_s = 5.0 if quick else 60.0
    users = [f"zbpx{i}" for i in range(5)]
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        root = Path(tmp)
        root.chmod(0o700)
        hub = Hub("ztlab", f"http://127.0.0.1:{_port()}", root / "ztlab")
        idp = DevIdP(
            users={u: _idp_user(u) for u in users},
            clients=[
                {
                    "client_id": "ztlab-hub",
                    "client_secret": SECRET,
                    "redirect_uris": [f"{hub.url}/hub/oauth_callback"],
                }
            ],
            state_dir=root / "idp",
        )
        idp.start()
        try:
            with _cleanup([hub], hub.root / "state", users, []):
                hub.proc = login_ztlab_hub(
                    hub.root,
                    hub.url,
                    idp.issuer,
                    extra=f"""
                    [sandbox]
                    enabled = true
                    address_pool = "{POOL}"
                    firewall_table = "{TABLE}"
                    """,
                )
                certs = hub.root / "state" / "hub" / "internal-ssl"
                tls = (
                    str(certs / "proxy-client-ca_trust.crt"),
                    str(certs / "proxy-client" / "proxy-client.crt"),
                    str(certs / "proxy-client" / "proxy-client.key"),
                )
                chp, chp_url, chp_api = _chp(hub.root, tls)
                paths = Paths(hub=hub.url, chp=chp_url, ca=tls[0], cert=tls[1], key=tls[2])
                try:
                    rows = _measure(hub, paths, chp_api, users, gets, trips, sockets, hold_s)
                finally:
                    _stop(chp)
        finally:
            idp.stop()
    return rows


def _measure(
    hub: Hub,
    paths: Paths,
    chp_api: str,
    users: list[str],
    gets: int,
    trips: int,
    sockets: int,
    hold_s: float,
) -> list[Row]:
    servers: list[Server] = []
    for user in users:
        api = _api_session(hub, user)
        _spawn_to_ready(api, hub, user)
        address = f"https://{_sandbox_ip(hub.root / 'state', user)}:{SERVER_PORT}"
        server = Server(user, _token(api), address)
        _chp_route(chp_api, user, address)
        _start_kernels(hub.url, server, KERNELS_PER_SERVER)
        servers.append(server)
    _blob(servers[0].user)
    print(f"  {gets} GETs of 100 KB per way ...", file=sys.stderr, flush=True)
    get_times = _gets(paths, servers[0], gets)
    print(f"  {trips} kernel round trips per way ...", file=sys.stderr, flush=True)
    trip_times = asyncio.run(_round_trips(paths, servers[0], trips))
    held: dict[str, Held] = {}
    for way in ("chp", "ztlab"):
        print(
            f"  {sockets} kernel WebSockets through {way}, held {hold_s:g} s ...",
            file=sys.stderr,
            flush=True,
        )
        held[way] = asyncio.run(_hold(paths, way, servers, sockets, hold_s))
    return _rows(get_times, trip_times, held, sockets, hold_s)


def _ms(samples: list[float], fraction: float) -> float:
    return percentile(samples, fraction) * 1000


def _rows(
    gets: dict[str, list[float]],
    trips: dict[str, list[float]],
    held: dict[str, Held],
    sockets: int,
    hold_s: float,
) -> list[Row]:
    rows: list[Row] = []
    for what, times, targets in (
        ("100 KB GET", gets, {0.5: "< 2 ms", 0.99: "< 10 ms"}),
        ("kernel round trip (1+1)", trips, {0.5: "< 1 ms"}),
    ):
        for fraction, label in ((0.5, "p50"), (0.99, "p99")):
            base = _ms(times["chp"], fraction)
            ours = _ms(times["ztlab"], fraction)
            rows += [
                Row(
                    "proxy",
                    f"{what} {label}, straight to the server",
                    _ms(times["direct"], fraction),
                    "ms",
                ),
                Row("proxy", f"{what} {label}, configurable-http-proxy", base, "ms"),
                Row(
                    "proxy",
                    f"{what} {label}, ztlab enforcement point",
                    ours,
                    "ms",
                    baseline="configurable-http-proxy",
                    ratio=ours / base if base else None,
                ),
                Row(
                    "proxy",
                    f"{what} {label}, added over configurable-http-proxy",
                    ours - base,
                    "ms",
                    target=targets.get(fraction, ""),
                ),
            ]
    for way, label in (("chp", "configurable-http-proxy"), ("ztlab", "ztlab enforcement point")):
        result = held[way]
        name = f"{sockets} kernel WebSockets held {hold_s:g} s, {label}"
        rows.append(Row("proxy", f"{name}: open", result.opened, "sockets", target=f"= {sockets}"))
        rows.append(Row("proxy", f"{name}: errors", len(result.errors), "", target="0"))
        if result.connect:
            rows.append(Row("proxy", f"{name}: connect p99", _ms(result.connect, 0.99), "ms"))
        if result.trips:
            for fraction, pct in ((0.5, "p50"), (0.99, "p99")):
                value = _ms(result.trips, fraction)
                rows.append(Row("proxy", f"{name}: round trip {pct}", value, "ms"))
        for error in sorted(set(result.errors))[:5]:
            print(f"bench proxy ({label}): {error}", file=sys.stderr)
    return rows
