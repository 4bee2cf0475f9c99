"""The GPU monitor in a real hub: a replayed trace naming a real sandboxed server's processes.

The hub runs with ``[gpu.monitor] source = "replay"``: the monitor replays the trace file
the test writes (and starts over whenever the file changes), so the trace can name the PIDs
of a server after it started. Everything after NVML is real: the cgroups the spawner made,
the leases, the policy deciding the responses, the hub stopping the server, the audit log,
the scrape token and the Prometheus endpoint.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.hubstack import (
    LoginStack,
    hub_token,
    nvidia_nodes,
    provider_user,
    remove_accounts,
    running_stack,
    spawn_server,
    stop_server,
    wait_ready,
)
from ztlab.hub.sandbox.cgroups import CgroupManager

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

USERS = ("mona", "nils", "olga", "ada")
GPU0 = "GPU-00000000-0000-4000-8000-000000000000"
GPU1 = "GPU-11111111-1111-4111-8111-111111111111"
INTERVAL = 0.5

CONFIG = """
[gpu.pools.research]
gpus = ["0", "1"]
roles = ["trainer"]

[gpu.monitor]
source = "replay"
trace = "{trace}"
interval_seconds = {interval}
"""


def _device(index: int, uuid: str) -> dict[str, Any]:
    return {
        "index": index,
        "uuid": uuid,
        "name": "NVIDIA H100 80GB HBM3",
        "memory_total": 85520809984,
        "minor_number": index,
    }


def write_trace(trace: Path, processes: dict[str, list[dict[str, Any]]], util: int = 97) -> None:
    """Write a one-snapshot trace of GPUs 0 and 1 with ``processes`` on them (atomically):
    a replaying monitor reads it from now on."""
    document = {
        "format": "ztlab-nvml-trace/1",
        "devices": [_device(0, GPU0), _device(1, GPU1)],
        "snapshots": [
            {
                "t": 0,
                "processes": processes,
                "utilization": {
                    uuid: {"gpu": util if processes.get(uuid) else 0, "memory": 30}
                    for uuid in (GPU0, GPU1)
                },
                "devices": {
                    GPU0: {"power_w": 450.0, "energy_mj": 1000, "ecc_mode": True},
                    GPU1: {"power_w": 70.0, "energy_mj": 500, "ecc_mode": True},
                },
            }
        ],
    }
    temporary = trace.with_suffix(".tmp")
    temporary.write_text(json.dumps(document), encoding="utf-8")
    temporary.replace(trace)


@dataclass
class MonitorStack:
    stack: LoginStack
    tokens: dict[str, str]
    trace: Path
    scrape_token: str

    def api(self, user: str, method: str, path: str) -> requests.Response:
        return requests.request(
            method,
            f"{self.stack.hub_url}/hub/api/ztlab{path}",
            headers={"Authorization": f"token {self.tokens[user]}"},
            timeout=60,
        )

    def replay(self, processes: dict[str, list[dict[str, Any]]], util: int = 97) -> None:
        """The monitor replays ``processes`` from now on (:func:`write_trace`)."""
        write_trace(self.trace, processes, util=util)

    def records(self, action: str, since: int = 0) -> list[dict[str, Any]]:
        return self.stack.details(action, since)

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = check()
            if found:
                return found
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")


def server_pids(user: str) -> list[int]:
    """The processes in ``user``'s sandbox cgroup (the spawner put them there)."""
    cgroup = CgroupManager.detect(parent="ztlab").get(f"ztl-{user}")
    assert cgroup is not None, f"no cgroup for {user}"
    return sorted(cgroup.procs())


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MonitorStack]:
    root = tmp_path_factory.mktemp("monitor")
    trace = root / "trace.json"
    remove_accounts(*USERS)
    try:
        with (
            nvidia_nodes(0, 1),
            running_stack(
                root,
                extra_config=CONFIG.format(trace=trace, interval=INTERVAL),
                extra_users={
                    "mona": provider_user("mona", "ml-trainers"),
                    "nils": provider_user("nils", "ml-trainers"),
                    "olga": provider_user("olga", "ml-trainers"),
                    "ada": provider_user("ada", "ztlab-admins"),
                },
                pool="10.233.0.0/16",
                table="ztlab_test_monitor",
            ) as stack,
        ):
            tokens = {user: hub_token(stack, user) for user in USERS}
            token_file = root / "state" / "monitor" / "scrape-token"
            assert token_file.stat().st_mode & 0o077 == 0, "the scrape token is private"
            yield MonitorStack(stack, tokens, trace, token_file.read_text().strip())
            for user in USERS:
                stop_server(stack, user, tokens[user])
    finally:
        remove_accounts(*USERS)


def _start_with_gpu(m: MonitorStack, user: str) -> None:
    answer = spawn_server(m.stack, user, m.tokens[user], {"gpus": 1, "pool": "research"})
    assert answer.status_code in (201, 202), answer.text
    wait_ready(m.stack, user, m.tokens[user])


def _metrics(m: MonitorStack, token: str | None) -> requests.Response:
    headers = {"Authorization": f"token {token}"} if token else {}
    return requests.get(f"{m.stack.hub_url}/hub/api/ztlab/metrics", headers=headers, timeout=30)


def _page(m: MonitorStack, user: str) -> requests.Response:
    session = m.stack.session()
    assert m.stack.login(session, user).status_code == 200
    return session.get(f"{m.stack.hub_url}/hub/ztlab/monitor", timeout=30)


def test_a_real_servers_process_is_attributed_and_scraped(monitored: MonitorStack) -> None:
    m = monitored
    _start_with_gpu(m, "mona")
    pid = server_pids("mona")[0]
    m.replay({GPU0: [{"pid": pid, "used_memory": 2 << 30, "sm": 90}]})

    def attributed() -> list[dict[str, Any]]:
        rows = m.api("ada", "GET", "/monitor/now").json()["processes"]
        return [r for r in rows if r["pid"] == pid and r["user"] == "mona"]

    row = m.wait("the server's process attributed to mona", attributed)[0]
    assert row["gpu"] == GPU0
    assert row["server"] == ""
    assert row["lease"]
    # accounted to her, and only to her
    usage = m.wait(
        "GPU-seconds for mona",
        lambda: m.api("mona", "GET", "/monitor/usage").json()["usage"].get("mona"),
    )
    assert usage["gpu_seconds"] > 0
    assert set(m.api("mona", "GET", "/monitor/usage?all=1").json()["usage"]) <= {"mona"}
    # the scrape token reads DCGM-named series and per-user series
    answer = _metrics(m, m.scrape_token)
    assert answer.status_code == 200, answer.text
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    util = [s for s in families["DCGM_FI_DEV_GPU_UTIL"].samples if s.labels["UUID"] == GPU0]
    assert util
    assert util[0].value == 97
    assert util[0].labels["gpu"] == "0"
    users = {
        s.labels.get("user")
        for f in families.values()
        for s in f.samples
        if s.name.startswith("ztlab_gpu_user_seconds")
    }
    assert "mona" in users
    # no credentials, a user's token and a forged token are refused
    assert _metrics(m, None).status_code == 403
    assert _metrics(m, m.tokens["nils"]).status_code == 403
    assert _metrics(m, "0" * 64).status_code == 403
    assert m.api("mona", "GET", "/monitor/alerts").status_code == 403
    assert _metrics(m, m.tokens["ada"]).status_code == 200  # admins may read them
    assert not m.records("gpu.alert"), "a leased process raised an alert"


def test_an_unleased_process_stops_the_server_as_the_policy_says(
    monitored: MonitorStack,
) -> None:
    m = monitored
    _start_with_gpu(m, "nils")
    since = m.stack.audit_size()
    pids = server_pids("nils")
    lease = [r for r in m.records("gpu.lease.granted") if r.get("user") == "nils"][-1]
    leased = lease["gpus"][0]
    other = GPU1 if leased == "0" else GPU0
    # his process shows up on the GPU he holds no lease for
    m.replay({other: [{"pid": pids[0], "used_memory": 1 << 30, "sm": 99}]})
    alert = m.wait(
        "the unleased_process alert",
        lambda: [a for a in m.records("gpu.alert", since) if a["kind"] == "unleased_process"],
    )[0]
    assert alert["user"] == "nils"
    assert alert["pid"] == pids[0]
    assert "stop_server" in alert["responses"]

    def stopped() -> bool:
        model = requests.get(
            f"{m.stack.hub_url}/hub/api/users/nils",
            headers={"Authorization": f"token {m.tokens['nils']}"},
            timeout=30,
        ).json()
        return not (model.get("servers") or {})

    m.wait("his server stopped", stopped, timeout=60)
    assert [r for r in m.records("server.stopped", since) if r["actor"] == "nils"]
    m.replay({})  # NVML lists no process that has ended
    done = m.wait(
        "the stop_server response recorded",
        lambda: [
            r
            for r in m.records("gpu.alert_response", since)
            if r["response"] == "stop_server" and r["outcome"] == "done"
        ],
    )
    assert done
    released = [r for r in m.records("gpu.lease.released", since) if r.get("user") == "nils"]
    assert released, "his lease ended with his server"
    # the admin sees the alert on the monitor page (users may not) and through the API
    page = _page(m, "ada")
    assert page.status_code == 200
    assert "unleased_process" in page.text
    assert _page(m, "nils").status_code == 403
    rows = m.api("ada", "GET", "/monitor/alerts?open=1").json()["alerts"]
    mine = [r for r in rows if r["kind"] == "unleased_process" and r["user"] == "nils"]
    assert mine
    assert m.api("ada", "POST", f"/monitor/alerts/{mine[0]['id']}/acknowledge").status_code == 200
    # the GPU he held passes its hand-over check once none of his processes is on it
    cleared = m.wait("the hand-over check", lambda: m.records("gpu.handover.cleared", since))
    assert any(r["gpu"] == leased for r in cleared)


def test_a_process_outside_every_sandbox_is_an_alert(monitored: MonitorStack) -> None:
    m = monitored
    since = m.stack.audit_size()
    # this test's own process: root, in no ztlab cgroup
    m.replay({GPU1: [{"pid": os.getpid(), "used_memory": 1 << 30, "sm": 50}]})
    alert = m.wait(
        "the outside_cgroup alert",
        lambda: [a for a in m.records("gpu.alert", since) if a["kind"] == "outside_cgroup"],
    )[0]
    assert alert["pid"] == os.getpid()
    assert not alert.get("user")
    assert "stop_server" not in alert["responses"]
    m.replay({})


def test_a_miner_in_a_sandbox_ends_the_server_and_nothing_of_it_stays(
    monitored: MonitorStack,
) -> None:
    m = monitored
    _start_with_gpu(m, "olga")
    since = m.stack.audit_size()
    pids = server_pids("olga")
    lease = [r for r in m.records("gpu.lease.granted") if r.get("user") == "olga"][-1]
    gpu = GPU0 if lease["gpus"][0] == "0" else GPU1
    miner = {
        "pid": 999_999,  # a synthetic process that says it runs in her sandbox
        "used_memory": 2 << 30,
        "sm": 97,
        "proc": {
            "uid": 0,
            "comm": "xmrig",
            "cmdline": ["./xmrig", "-o", "stratum+tcp://pool.example:3333"],
            "cgroup": "/ztlab/ztl-olga",
            "libraries": ["libxmrig-cuda.so"],
        },
    }
    # her server's own processes are on her GPU too: revoking the lease ends them
    m.replay({gpu: [*({"pid": pid, "used_memory": 1 << 30} for pid in pids), miner]})
    alert = m.wait(
        "the miner alert",
        lambda: [a for a in m.records("gpu.alert", since) if a["kind"] == "miner"],
    )[0]
    assert alert["user"] == "olga"
    assert alert["responses"] == ["notify", "stop_server", "revoke_lease"]
    outcomes = m.wait(
        "the responses carried out",
        lambda: (
            {
                r["response"]: r["outcome"]
                for r in m.records("gpu.alert_response", since)
                if r["alert"] == alert["alert"]
            }
            if len(
                [r for r in m.records("gpu.alert_response", since) if r["alert"] == alert["alert"]]
            )
            == 3
            else None
        ),
    )
    assert outcomes == {"notify": "done", "stop_server": "done", "revoke_lease": "done"}
    m.replay({})
    # the hub stopped her server: nothing runs in her sandbox, her lease is gone
    m.wait("her sandbox empty", lambda: not server_pids("olga"), timeout=30)
    assert [r for r in m.records("server.stopped", since) if r["actor"] == "olga"]
    assert [r for r in m.records("gpu.lease.released", since) if r.get("user") == "olga"]


def test_a_server_whose_process_was_killed_leaves_nothing_behind(
    monitored: MonitorStack,
) -> None:
    m = monitored
    _start_with_gpu(m, "olga")
    since = m.stack.audit_size()
    before = server_pids("olga")
    os.kill(before[0], signal.SIGKILL)  # the spawner's process (bubblewrap), not a stop
    # the hub's poll finds it gone and ends the sandbox it leaves behind
    m.wait("her sandbox empty", lambda: not server_pids("olga"), timeout=45)
    stopped = m.wait(
        "server.stopped",
        lambda: [r for r in m.records("server.stopped", since) if r["actor"] == "olga"],
    )
    assert stopped[0]["reason"] == "ended without a stop (exit status -9)"
    assert stopped[0]["leases_released"]


def test_ztlab_monitor_commands(monitored: MonitorStack, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ztlab.cli.main import cli

    m = monitored

    def run(user: str, *args: str) -> Any:
        token = tmp_path / user
        token.write_text(m.tokens[user])
        hub = ["--hub-url", f"{m.stack.hub_url}/hub/api", "--token-file", str(token)]
        return CliRunner().invoke(cli, ["monitor", *args, *hub])

    alerts = run("ada", "alerts")
    assert alerts.exit_code == 0, alerts.output
    assert "unleased_process" in alerts.output
    assert "responses: notify, stop_server, revoke_lease" in alerts.output
    assert "acknowledged by ada" in alerts.output
    usage = run("mona", "usage")
    assert usage.exit_code == 0, usage.output
    assert usage.output.startswith("mona ")
    assert "GPU-hours" in usage.output
    refused = run("mona", "alerts")
    assert refused.exit_code == 2
    assert "Only admins" in refused.output
    handovers = run("ada", "handovers")
    assert handovers.exit_code == 0, handovers.output
    # the scrape job names the endpoint and the token file, never the token
    scrape = CliRunner().invoke(
        cli, ["monitor", "scrape-config", "--config", str(m.stack.hub.config)]
    )
    assert scrape.exit_code == 0, scrape.output
    assert "metrics_path: /hub/api/ztlab/metrics" in scrape.output
    assert f"credentials_file: {m.stack.state_dir / 'monitor' / 'scrape-token'}" in scrape.output
    assert m.scrape_token not in scrape.output
