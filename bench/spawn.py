"""Spawn: POST to ready for ``SandboxSpawner``, and many users' first spawns at once.

Three hubs run side by side against the same development provider, and each spawn is
timed from ``POST /hub/api/users/NAME/server`` to the first ``ready: true`` in
``GET /hub/api/users/NAME`` (polled every 50 ms); the server is then stopped and the next
one started, the hubs taking turns so that all see the same machine state:

- ours with ``[sandbox] enabled = true``: ``SandboxSpawner`` (policy decision, account,
  cgroup, network namespace, bubblewrap);
- ours, the same ``ztlab.toml`` with ``enabled = false``: ``DedicatedUserSpawner``
  (JupyterHub's ``LocalProcessSpawner`` as the user's own account, after a policy decision);
- the baseline: a plain JupyterHub with ``LocalProcessSpawner`` and ``GenericOAuthenticator``,
  its users pre-made as Unix accounts of the same names.

Each user's first spawn (which creates the account, cgroup and namespace) is a warm-up,
reported apart. "Ready" comes when the hub's own check reaches the server, and the hub
checks with random waits (up to 0.2, 0.4, 0.8 ... s), so most of the spread is the hub's;
the same spawns are also timed up to the server's "listening at" log line, which is where
the spawners differ. Then many new users of the sandbox hub spawn at once. Everything the run
made -- accounts, processes, network namespaces, cgroups -- is removed at the end.

The concurrent burst is compared with as many first spawns at once on the plain hub (its
users' Unix accounts made beforehand, as it needs), run right after in the same run.
"""

from __future__ import annotations

import contextlib
import pwd
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path

import requests

from bench._table import Row, percentile
from bench.login import _plain_hub as login_plain_hub
from bench.login import _port, _stop
from bench.login import _ztlab_hub as login_ztlab_hub
from ztlab.dev.idp.flow import idp_login
from ztlab.dev.idp.launcher import DevIdP

SECRET = "bench-client-secret-0123456789abcdef"
POOL = "10.215.0.0/16"  # not the tests' pools (10.213/16 default, 10.214/16 end to end)
TABLE = "ztlab_bench"  # our own nftables table ([sandbox] firewall_table)
POLL_S = 0.05
CONCURRENT_POLL_S = 0.25  # 20 pollers at 50 ms would load the hub they measure
TIMEOUT_S = 120.0


def _idp_user(name: str) -> dict[str, object]:
    return {
        "password": f"{name}-password",
        "email": f"{name}@example.org",
        "name": name,
        "groups": ["ml-trainers"],
        "amr": ["pwd", "otp"],  # MFA at the provider: no TOTP step-up at the hub
        "acr": "urn:ztlab:mfa",
        "disabled": False,
    }


@dataclass
class Hub:
    label: str
    url: str
    root: Path
    proc: subprocess.Popen[bytes] | None = None


def _ztlab_hub(root: Path, url: str, issuer: str, *, sandbox: bool) -> subprocess.Popen[bytes]:
    """``ztlab hub`` from a ztlab.toml that differs between the two only in ``enabled``."""
    return login_ztlab_hub(
        root,
        url,
        issuer,
        extra=f"""
        [sandbox]
        enabled = {"true" if sandbox else "false"}
        address_pool = "{POOL}"
        firewall_table = "{TABLE}"
        """,
    )


def _plain_hub(root: Path, url: str, idp: DevIdP) -> subprocess.Popen[bytes]:
    """The login suite's plain hub, its servers started as ours are (command, URL, timeout)."""
    singleuser = Path(sys.executable).with_name("jupyterhub-singleuser")
    return login_plain_hub(
        root,
        url,
        idp,
        extra=f"""
        c.JupyterHub.spawner_class = "localprocess"
        c.Spawner.cmd = ["{singleuser}"]
        c.Spawner.default_url = "/lab"
        c.Spawner.http_timeout = 60
        """,
    )


# -- the hub API, as a user --------------------------------------------------------------------


def _api_session(hub: Hub, user: str) -> requests.Session:
    """Log in at the provider, make an API token, and return a session that sends it."""
    browser = requests.Session()
    response = idp_login(
        browser,
        f"{hub.url}/hub/oauth_login",
        username=user,
        password=f"{user}-password",
        follow_redirects=True,
    )
    if response.status_code != 200 or not response.url.endswith("/hub/home"):
        raise RuntimeError(f"{hub.label}: login of {user} ended at {response.url}")
    made = browser.post(
        f"{hub.url}/hub/api/users/{user}/tokens",
        json={"note": "bench spawn", "expires_in": 3600},
        headers={"X-XSRFToken": browser.cookies.get("_xsrf") or ""},
        timeout=30,
    )
    if made.status_code != 201:
        raise RuntimeError(f"{hub.label}: token for {user}: {made.status_code} {made.text}")
    api = requests.Session()
    api.headers["Authorization"] = f"token {made.json()['token']}"
    return api


def _model(api: requests.Session, hub: Hub, user: str) -> dict[str, object]:
    response = api.get(f"{hub.url}/hub/api/users/{user}", timeout=30)
    response.raise_for_status()
    model: dict[str, object] = response.json()
    return model


def _server(model: dict[str, object]) -> dict[str, object] | None:
    servers = model.get("servers")
    if isinstance(servers, dict):
        server = servers.get("")
        if isinstance(server, dict):
            return server
    return None


def _spawn_to_ready(api: requests.Session, hub: Hub, user: str, *, poll: float = POLL_S) -> float:
    """Seconds from the POST to the first ``ready: true``."""
    start = time.perf_counter()
    response = api.post(f"{hub.url}/hub/api/users/{user}/server", json={}, timeout=TIMEOUT_S)
    if response.status_code not in (201, 202):
        raise RuntimeError(f"{hub.label}: spawn of {user}: {response.status_code} {response.text}")
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        model = _model(api, hub, user)
        server = _server(model)
        if server is not None and server.get("ready"):
            return time.perf_counter() - start
        if server is None and not model.get("pending"):
            raise RuntimeError(f"{hub.label}: {user}'s server stopped while starting: {model}")
        time.sleep(poll)
    raise RuntimeError(f"{hub.label}: {user}'s server was not ready in {TIMEOUT_S:g} s")


_LISTENING = r"\[I (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) ServerApp\] https?://\S+/user/%s/"


def _listening(hub: Hub, user: str, offset: int, posted_at: float) -> float | None:
    """Seconds from the POST to the server's own "listening at" log line (in the hub's log,
    or for a sandboxed server in its own log under the state directory), i.e. spawn-to-ready
    without the hub's jittered wait for it."""
    own = hub.root / "state" / "logs" / "servers" / f"ztl-{user}.log"
    if own.exists() and own.stat().st_mtime >= posted_at - 1:
        text = own.read_text(errors="replace")
    else:
        with (hub.root / "hub.log").open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    found = re.search(_LISTENING % re.escape(user), text)
    if found is None:
        return None
    stamp = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
    return stamp - posted_at


def _stop_server(api: requests.Session, hub: Hub, user: str) -> None:
    response = api.delete(f"{hub.url}/hub/api/users/{user}/server", timeout=TIMEOUT_S)
    if response.status_code not in (202, 204):
        raise RuntimeError(f"{hub.label}: stop of {user}: {response.status_code} {response.text}")
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        model = _model(api, hub, user)
        if _server(model) is None and not model.get("pending"):
            return
        time.sleep(POLL_S)
    raise RuntimeError(f"{hub.label}: {user}'s server did not stop in {TIMEOUT_S:g} s")


# -- accounts and what the sandbox leaves on the host --------------------------------------------


def _make_unix_user(name: str) -> None:
    with contextlib.suppress(KeyError):
        pwd.getpwnam(name)
        return
    subprocess.run(
        ["useradd", "--create-home", "--shell", "/usr/sbin/nologin", "--user-group", name],
        check=True,
        capture_output=True,
    )


def _remove_unix_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return
    subprocess.run(["pkill", "-KILL", "-u", name], check=False, capture_output=True)
    for _ in range(50):  # userdel refuses while the account still has processes
        done = subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)
        if done.returncode in (0, 6):  # 6: no such user
            return
        time.sleep(0.1)
        subprocess.run(["pkill", "-KILL", "-u", name], check=False, capture_output=True)
    print(f"bench spawn: could not remove account {name}: {done.stderr!r}", file=sys.stderr)


def _cgroup_parents() -> set[Path]:
    root = Path("/sys/fs/cgroup")
    return {p for p in [root / "ztlab", *root.glob("*/ztlab")] if p.is_dir()}


def _nft_table_exists() -> bool:
    done = subprocess.run(["nft", "list", "table", "inet", TABLE], capture_output=True, check=False)
    return done.returncode == 0


def _clean_sandbox(
    state: Path, users: list[str], *, cgroup_parents: set[Path], table: bool
) -> None:
    """Remove the cgroups, network namespaces, service address and table the run made."""
    from ztlab.hub.sandbox.cgroups import CgroupManager
    from ztlab.hub.sandbox.netns import NetworkSegments

    accounts = [f"ztl-{u}" for u in users]
    with contextlib.suppress(Exception):
        cgroups = CgroupManager.detect(parent="ztlab")
        for account in accounts:
            cgroup = cgroups.get(account)
            if cgroup is not None:
                try:
                    cgroup.remove()
                except Exception as exc:  # keep cleaning the others
                    print(f"bench spawn: cgroup {account}: {exc}", file=sys.stderr)
        for parent in cgroups.parent_paths:  # the parent too, when this run made it
            if parent not in cgroup_parents:
                with contextlib.suppress(OSError):
                    parent.rmdir()
    segments = NetworkSegments(pool=POOL, table=TABLE, state_file=state / "sandbox" / "netns.json")
    known = set(users)
    with contextlib.suppress(Exception):
        known |= set(segments.users())
    for user in sorted(known):
        try:
            segments.delete(user)
        except Exception as exc:
            print(f"bench spawn: network namespace of {user}: {exc}", file=sys.stderr)
    lo = subprocess.run(
        ["ip", "-o", "-4", "addr", "show", "dev", "lo"], capture_output=True, text=True, check=False
    ).stdout
    if f" {segments.service_ip}/32 " in lo:
        subprocess.run(["ip", "addr", "del", f"{segments.service_ip}/32", "dev", "lo"], check=False)
    if not table and _nft_table_exists():  # the firewall table, when this run made it
        subprocess.run(["nft", "delete", "table", "inet", TABLE], check=False)


@contextlib.contextmanager
def _cleanup(
    hubs: list[Hub], sandbox_state: Path, sandbox_users: list[str], other_accounts: list[str]
) -> Iterator[None]:
    cgroup_parents = _cgroup_parents()
    table = _nft_table_exists()
    try:
        yield
    finally:
        for hub in hubs:
            if hub.proc is not None:
                _stop(hub.proc)
        for account in [f"ztl-{u}" for u in sandbox_users] + other_accounts:
            subprocess.run(["pkill", "-KILL", "-u", account], check=False, capture_output=True)
        _clean_sandbox(sandbox_state, sandbox_users, cgroup_parents=cgroup_parents, table=table)
        for account in [f"ztl-{u}" for u in sandbox_users] + other_accounts:
            _remove_unix_user(account)


# -- the suite -----------------------------------------------------------------------------------


def _concurrent(hub: Hub, users: list[str]) -> tuple[list[float], list[str], float]:
    """All of ``users`` spawn at once (tokens made first); times, errors and wall time."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        apis = dict(zip(users, pool.map(partial(_api_session, hub), users), strict=True))
    errors: list[str] = []
    barrier = threading.Barrier(len(users))

    def one(user: str) -> float:
        barrier.wait()
        try:
            return _spawn_to_ready(apis[user], hub, user, poll=CONCURRENT_POLL_S)
        except Exception as exc:  # counted, not raised: the figure is the error count
            errors.append(f"{user}: {exc}")
            return float("nan")

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(users)) as pool:
        times = list(pool.map(one, users))
    wall = time.perf_counter() - start
    with ThreadPoolExecutor(max_workers=len(users)) as pool:
        for user, error in zip(
            users, pool.map(lambda u: _try_stop(apis[u], hub, u), users), strict=True
        ):
            if error:
                print(f"bench spawn: stopping {user}: {error}", file=sys.stderr)
    return [t for t in times if t == t], errors, wall


def _try_stop(api: requests.Session, hub: Hub, user: str) -> str:
    try:
        _stop_server(api, hub, user)
    except Exception as exc:
        return str(exc)
    return ""


def run(*, quick: bool = False) -> list[Row]:
    rounds = 2 if quick else 5
    per_hub = 2  # users per hub in the sequential part
    burst = 10 if quick else 20
    names = {
        "sandbox": [f"zbsa{i}" for i in range(per_hub)],
        "dedicated": [f"zbda{i}" for i in range(per_hub)],
        "plain": [f"zbpa{i}" for i in range(per_hub)],
    }
    burst_users = [f"zbca{i:02d}" for i in range(burst)]
    plain_burst = [f"zbcp{i:02d}" for i in range(burst)]
    idp_users = [u for group in names.values() for u in group] + burst_users + plain_burst
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        root = Path(tmp)
        root.chmod(0o700)
        hubs = {
            "sandbox": Hub("SandboxSpawner", f"http://127.0.0.1:{_port()}", root / "sandbox"),
            "dedicated": Hub(
                "DedicatedUserSpawner", f"http://127.0.0.1:{_port()}", root / "dedicated"
            ),
            "plain": Hub("LocalProcessSpawner", f"http://127.0.0.1:{_port()}", root / "plain"),
        }
        idp = DevIdP(
            users={u: _idp_user(u) for u in idp_users},
            clients=[
                {
                    "client_id": "ztlab-hub",
                    "client_secret": SECRET,
                    "redirect_uris": [
                        f"{hubs['sandbox'].url}/hub/oauth_callback",
                        f"{hubs['dedicated'].url}/hub/oauth_callback",
                    ],
                },
                {
                    "client_id": "plain-hub",
                    "client_secret": SECRET,
                    "redirect_uris": [f"{hubs['plain'].url}/hub/oauth_callback"],
                },
            ],
            state_dir=root / "idp",
        )
        idp.start()
        sandbox_users = names["sandbox"] + burst_users
        try:
            with _cleanup(
                list(hubs.values()),
                hubs["sandbox"].root / "state",
                sandbox_users,
                [f"ztl-{u}" for u in names["dedicated"]] + names["plain"] + plain_burst,
            ):
                for user in names["plain"] + plain_burst:
                    _make_unix_user(user)
                for key in ("sandbox", "dedicated"):
                    hubs[key].proc = _ztlab_hub(
                        hubs[key].root, hubs[key].url, idp.issuer, sandbox=key == "sandbox"
                    )
                hubs["plain"].proc = _plain_hub(hubs["plain"].root, hubs["plain"].url, idp)
                try:
                    rows = _measure(hubs, names, rounds, burst_users, plain_burst)
                except Exception:
                    for hub in hubs.values():
                        log = hub.root / "hub.log"
                        if log.exists():
                            lines = log.read_text(errors="replace").splitlines()
                            quiet = [x for x in lines if " GET /hub/api/users/" not in x]
                            tail = "\n".join(quiet[-60:])
                            print(f"--- {hub.label} hub log ---\n{tail}", file=sys.stderr)
                    raise
        finally:
            idp.stop()
    return rows


def _measure(
    hubs: dict[str, Hub],
    names: dict[str, list[str]],
    rounds: int,
    burst_users: list[str],
    plain_burst: list[str],
) -> list[Row]:
    apis = {(key, u): _api_session(hubs[key], u) for key, users in names.items() for u in users}
    keys = list(hubs)
    first: dict[str, list[float]] = {key: [] for key in keys}
    samples: dict[str, list[float]] = {key: [] for key in keys}
    listening: dict[str, list[float]] = {key: [] for key in keys}
    per_hub = len(names["plain"])
    for turn in range(rounds + 1):  # turn 0: each user's first spawn, reported apart
        for index in range(per_hub):
            order = keys[turn % len(keys) :] + keys[: turn % len(keys)]
            for key in order:  # interleaved, so that all see the same machine state
                user = names[key][index]
                api = apis[(key, user)]
                offset, posted_at = (hubs[key].root / "hub.log").stat().st_size, time.time()
                elapsed = _spawn_to_ready(api, hubs[key], user)
                (first if turn == 0 else samples)[key].append(elapsed)
                up = _listening(hubs[key], user, offset, posted_at)
                if turn and up is not None and 0 < up <= elapsed:
                    listening[key].append(up)
                _stop_server(api, hubs[key], user)

    return [
        *_rows(hubs, samples, listening, first),
        *_burst(hubs["sandbox"], burst_users, hubs["plain"], plain_burst),
    ]


def _rows(
    hubs: dict[str, Hub],
    samples: dict[str, list[float]],
    listening: dict[str, list[float]],
    first: dict[str, list[float]],
) -> list[Row]:
    def p50(values: list[float]) -> float:
        return percentile(values, 0.5)

    def p95(values: list[float]) -> float:
        return percentile(values, 0.95)

    plain, label = samples["plain"], {key: hub.label for key, hub in hubs.items()}
    rows: list[Row] = []
    for key in ("sandbox", "dedicated"):
        rows += [
            Row(
                "spawn",
                f"{label[key]} spawn-to-ready p50",
                p50(samples[key]),
                "s",
                target="overhead < 0.3 s" if key == "sandbox" else "",
                baseline=f"plain LocalProcessSpawner: {p50(plain):.3f} s",
                ratio=p50(samples[key]) / p50(plain),
            ),
            Row(
                "spawn",
                f"{label[key]} spawn-to-ready p95",
                p95(samples[key]),
                "s",
                baseline=f"plain p95: {p95(plain):.3f} s",
                ratio=p95(samples[key]) / p95(plain),
            ),
        ]
    rows += [
        Row("spawn", "LocalProcessSpawner (plain hub) spawn-to-ready p50", p50(plain), "s"),
        Row("spawn", "LocalProcessSpawner (plain hub) spawn-to-ready p95", p95(plain), "s"),
        Row(
            "spawn",
            "SandboxSpawner overhead p50 (sandbox - plain)",
            p50(samples["sandbox"]) - p50(plain),
            "s",
            target="< 0.3 s",
        ),
        Row(
            "spawn",
            "DedicatedUserSpawner overhead p50 (dedicated - plain)",
            p50(samples["dedicated"]) - p50(plain),
            "s",
        ),
    ]
    # the same spawns, up to the server's "listening" line: without the hub's wait for the
    # server (polls with random waits up to 0.2, 0.4, 0.8 ... s), which dominates the spread
    if all(listening.values()):
        base = p50(listening["plain"])
        for key in ("sandbox", "dedicated"):
            rows.append(
                Row(
                    "spawn",
                    f"{label[key]} POST-to-listening p50",
                    p50(listening[key]),
                    "s",
                    baseline=f"plain: {base:.3f} s",
                    ratio=p50(listening[key]) / base,
                )
            )
        rows.append(
            Row(
                "spawn",
                "SandboxSpawner overhead to listening p50",
                p50(listening["sandbox"]) - base,
                "s",
                target="< 0.3 s",
            )
        )
    rows.append(
        Row(
            "spawn",
            "SandboxSpawner first spawn p50 (new account, cgroup, netns)",
            p50(first["sandbox"]),
            "s",
            baseline=f"plain first spawn: {p50(first['plain']):.3f} s",
            ratio=p50(first["sandbox"]) / p50(first["plain"]),
        )
    )
    return rows


def _burst(hub: Hub, users: list[str], plain: Hub, plain_users: list[str]) -> list[Row]:
    """Many first spawns at once on the sandbox hub, then as many on the plain hub."""
    times, errors, wall = _concurrent(hub, users)
    plain_times, plain_errors, plain_wall = _concurrent(plain, plain_users)
    count = len(users)
    rows = [
        Row(
            "spawn",
            f"{count} concurrent first spawns (sandbox): errors",
            len(errors),
            "",
            target="0",
        ),
        Row(
            "spawn",
            f"{count} concurrent first spawns (sandbox): wall time",
            wall,
            "s",
            target="<= 1.5x plain",
            baseline=f"{count} plain LocalProcessSpawner at once: {plain_wall:.1f} s",
            ratio=wall / plain_wall,
        ),
        Row(
            "spawn",
            f"{count} concurrent first spawns (sandbox): p95 per spawn",
            percentile(times or [0.0], 0.95),
            "s",
            baseline=f"plain p95: {percentile(plain_times or [0.0], 0.95):.2f} s",
        ),
    ]
    for label, failed in (("sandbox", errors), ("plain", plain_errors)):
        if failed:
            print(f"{label}: " + "\n".join(failed[:5]), file=sys.stderr)
    return rows
