"""A spawn that fails at each stage says why, in the REST API and in a real browser.

Through the real hub (sandboxed servers, a GPU pool of one ``mknod`` device node):

- **decide**: ``nora``'s provider group maps to a role no policy lets start a server;
- **lease**: ``hal`` asks for the pool's only GPU while ``gina`` holds it;
- **start**: ``ivy`` is a viewer, and viewers get 40 MiB here: too little for a server;
- **sandbox**: the sandbox address pool holds three network namespaces and ``jude`` would
  be the fourth.

Each failure is answered with its message (never a bare 500), recorded as
``server.spawn_failed`` with its stage, and leaves no lease and no process behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyotp
import pytest
import requests

from tests.hubstack import (
    LoginStack,
    browser_page,
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

ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"
USERS = ("nora", "gina", "hal", "ivy", "jude")

EXPECTED = {
    "nora": ("decide", 403, "Your server may not start: denied by default"),
    "hal": ("lease", 409, "GPU"),
    "ivy": ("start", 500, "stopped by its memory limit (40 MiB) while starting"),
    "jude": ("sandbox", 500, "address pool 10.216.0.0/28 is full"),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoginStack]:
    extra = """
[roles.auditor]
description = "reads reports; no policy lets it start a server"

[roles.viewer]
memory = "40M"  # too little for a server to start

[gpu.pools.solo]
gpus = ["0"]
roles = ["trainer"]
"""
    users = {
        "nora": provider_user("nora", "auditors"),
        "gina": provider_user("gina", "ml-trainers"),
        "hal": provider_user("hal", "ml-trainers"),
        "ivy": provider_user("ivy", "viewers"),
        "jude": provider_user("jude", "ml-trainers"),
    }
    with (
        nvidia_nodes(0),
        running_stack(
            tmp_path_factory.mktemp("failures-stack"),
            extra_config=extra,
            extra_users=users,
            pool="10.216.0.0/28",  # three network namespaces, the last /30 is the hub's
            table="ztlab_test_fail",
            session_max_age=600,
            extra_groups={"auditors": ["auditor"]},
        ) as running,
    ):
        yield running
    remove_accounts(*USERS)


@pytest.fixture(scope="module")
def tokens(stack: LoginStack) -> dict[str, str]:
    return {user: hub_token(stack, user) for user in USERS}


@pytest.fixture(scope="module")
def gina_holds_the_gpu(stack: LoginStack, tokens: dict[str, str]) -> None:
    response = spawn_server(stack, "gina", tokens["gina"], {"gpus": 1, "pool": "solo"})
    assert response.status_code in (201, 202), response.text
    wait_ready(stack, "gina", tokens["gina"])


def _leases(stack: LoginStack) -> list[Any]:
    from ztlab.hub.gpu.leases import LeaseStore

    with LeaseStore(path=stack.state_dir / "gpu" / "leases.sqlite3") as store:
        return store.active()


def _failure(stack: LoginStack, user: str, since: int) -> Any:
    return stack.wait_record("server.spawn_failed", actor=user, since=since)


@pytest.mark.parametrize("user", ["nora", "hal", "ivy", "jude"])
def test_the_api_answers_each_failure_with_its_stage_and_message(
    stack: LoginStack, tokens: dict[str, str], gina_holds_the_gpu: None, user: str
) -> None:
    stage, status, words = EXPECTED[user]
    since = stack.audit_size()
    options = {"gpus": 1, "pool": "solo"} if user == "hal" else {"gpus": 0}
    response = spawn_server(stack, user, tokens[user], options)
    assert response.status_code == status, response.text
    message = response.json()["message"]
    assert words in message, message
    assert "Internal Server Error" not in message
    record = _failure(stack, user, since)
    assert record.detail["stage"] == stage
    assert words in record.detail["reason"]
    # nothing is left behind: gina's is the only lease, and the user's cgroup is empty
    assert [(lease.user, lease.pool) for lease in _leases(stack)] == [("gina", "solo")]
    cgroup = CgroupManager.detect(parent="ztlab").get(f"ztl-{user}")
    assert cgroup is None or cgroup.procs() == []


def test_the_lease_refusal_names_the_pool_and_its_holder_count(
    stack: LoginStack, tokens: dict[str, str], gina_holds_the_gpu: None
) -> None:
    response = spawn_server(stack, "hal", tokens["hal"], {"gpus": 1, "pool": "solo"})
    message = response.json()["message"]
    assert "solo" in message
    assert "0 of 1" in message or "free" in message, message


def _browser_spawn(stack: LoginStack, user: str, gpus: int) -> str:
    """Sign in as ``user`` in chromium, submit the spawn form; the page's text after."""
    ARTIFACTS.mkdir(exist_ok=True)
    with browser_page(stack, user) as page:
        page.locator("button[type=submit], input[type=submit]").first.click()
        # a new browser since the API's sign-in: the hub asks for its own TOTP (enroll)
        page.wait_for_selector("#mfa-secret")
        secret = page.inner_text("#mfa-secret").strip()
        page.fill("#mfa-code", pyotp.TOTP(secret).now())
        page.click("#mfa-submit")
        page.wait_for_url("**/hub/home**")
        page.goto(f"{stack.hub_url}/hub/spawn")
        page.wait_for_selector("#spawn_form")
        page.fill("#gpus", str(gpus))
        page.locator("#spawn_form [type=submit]").click()
        words = EXPECTED[user][2]
        page.wait_for_function(
            "words => !!document.body && document.body.innerText.includes(words)",
            arg=words,
            timeout=90_000,
        )
        page.screenshot(path=str(ARTIFACTS / f"spawn-failed-{EXPECTED[user][0]}.png"))
        return str(page.inner_text("body"))


@pytest.mark.browser
@pytest.mark.parametrize("user", ["nora", "hal", "ivy", "jude"])
def test_the_browser_shows_each_failure(
    stack: LoginStack, tokens: dict[str, str], gina_holds_the_gpu: None, user: str
) -> None:
    text = _browser_spawn(stack, user, gpus=1 if user == "hal" else 0)
    assert EXPECTED[user][2] in text
    assert "500 : Internal Server Error" not in text


def test_gina_still_holds_her_gpu_and_server(
    stack: LoginStack, tokens: dict[str, str], gina_holds_the_gpu: None
) -> None:
    model = requests.get(
        f"{stack.hub_url}/hub/api/users/gina",
        headers={"Authorization": f"token {tokens['gina']}"},
        timeout=30,
    ).json()
    assert model["servers"][""]["ready"] is True
    assert [lease.user for lease in _leases(stack)] == ["gina"]
