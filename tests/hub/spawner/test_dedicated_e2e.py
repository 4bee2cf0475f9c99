"""With ``[sandbox] enabled = false``: the server still runs as its own account, over TLS."""

from __future__ import annotations

import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hubstack import (
    LoginStack,
    hub_token,
    provider_user,
    remove_accounts,
    running_stack,
    spawn_server,
    wait_ready,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoginStack]:
    with running_stack(
        tmp_path_factory.mktemp("dedicated-stack"),
        extra_config="enabled = false\n",
        extra_users={"olga": provider_user("olga", "ml-trainers")},
        pool="10.220.0.0/16",
        table="ztlab_test_dedicated",
    ) as running:
        yield running
    remove_accounts("olga")


def test_the_dedicated_spawner_runs_the_server_as_its_account(stack: LoginStack) -> None:
    token = hub_token(stack, "olga")
    response = spawn_server(stack, "olga", token, {})
    assert response.status_code in (201, 202), response.text
    wait_ready(stack, "olga", token)
    entry = pwd.getpwnam("ztl-olga")
    assert entry.pw_uid != 0
    certs = Path(entry.pw_dir) / ".jupyterhub" / "jupyterhub-certs"
    assert sorted(p.stat().st_uid for p in certs.iterdir()) == [entry.pw_uid] * 3
    running = subprocess.run(
        ["pgrep", "-u", "ztl-olga", "-f", "jupyterhub.singleuser"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert running.stdout.strip()
    assert stack.wait_record("policy.decision", actor="olga").detail["allowed"] is True
