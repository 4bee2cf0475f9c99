"""One control plane per hub: built once from ztlab.toml, shared by everything in the hub.

The hub is initialised for real (JupyterHub's own start-up, the entry points, the hub
database, the handlers) in this process, without serving; the wiring is then read off it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyterhub import orm
from jupyterhub.crypto import CryptKeeper
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

from tests.hubstack import free_port
from ztlab.common.auditlog.events import CATALOGUE
from ztlab.common.config import load_config
from ztlab.hub.api.datasets import DatasetsHandler
from ztlab.hub.app import ZtlabHub
from ztlab.hub.controlplane import ControlPlane, ControlPlaneMissing, control_plane
from ztlab.hub.login.authenticator import MFAOAuthenticator
from ztlab.hub.pages.approvals import ModelsPage
from ztlab.hub.sandbox.netns import NetworkSegments
from ztlab.hub.settings import jupyterhub_settings
from ztlab.hub.spawner.sandbox import SandboxSpawner

ROOT = Path(__file__).resolve().parents[2]
POOL, TABLE = "10.219.0.0/24", "ztlab_test_wiring"


class _Connection:
    """What tornado's RequestHandler asks of a connection when it is made."""

    context: Any = None

    def set_close_callback(self, callback: Any) -> None:
        pass


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[ZtlabHub]:
    secret = tmp_path / "client-secret"
    secret.write_text("wiring-client-secret-0123456789abcdef")
    secret.chmod(0o600)
    path = tmp_path / "ztlab.toml"
    path.write_text(
        f"""
state_dir = "{tmp_path / "state"}"
[hub]
bind_url = "http://127.0.0.1:{free_port()}"
api_url = "http://127.0.0.1:{free_port()}"
proxy_api_url = "http://127.0.0.1:{free_port()}"
[login]
issuer = "http://127.0.0.1:9"
[models]
enabled = false
[packages]
enabled = false
[sandbox]
address_pool = "{POOL}"
firewall_table = "{TABLE}"
[secrets]
oidc_client_secret = {{ file = "{secret}" }}
"""
    )
    plane = ControlPlane.open(load_config(path), source=str(path))
    # JupyterHub's singletons (its app, its CryptKeeper) are set up as `ztlab hub` does
    settings = jupyterhub_settings(plane, source=str(path))
    app = ZtlabHub.instance(control_plane=plane, ztlab_settings=settings)
    try:
        asyncio.run(app.initialize([]))
        yield app
    finally:
        ZtlabHub.clear_instance()
        CryptKeeper.clear_instance()
        plane.close()
        NetworkSegments(
            pool=POOL, table=TABLE, state_file=tmp_path / "state" / "sandbox" / "netns.json"
        ).teardown()


def _handler(app: ZtlabHub, cls: type[Any], uri: str) -> Any:
    request = HTTPServerRequest(
        start_line=RequestStartLine("GET", uri, "HTTP/1.1"),
        headers=HTTPHeaders({"Host": "127.0.0.1"}),
        connection=_Connection(),
    )
    return cls(app.tornado_application, request)


def test_one_control_plane_serves_authenticator_spawners_and_handlers(hub: ZtlabHub) -> None:
    plane = hub.control_plane
    assert isinstance(plane, ControlPlane)
    # JupyterHub found our classes through their entry points ("ztlab-mfa", "ztlab-sandbox")
    assert type(hub.authenticator) is MFAOAuthenticator
    assert hub.spawner_class is SandboxSpawner
    assert hub.authenticator.plane is plane
    orm_user = orm.User(name="wendy")
    hub.db.add(orm_user)
    hub.db.commit()
    user = hub.users[orm_user]
    assert isinstance(user.spawner, SandboxSpawner)
    assert user.spawner.plane is plane
    # the control plane's handlers are mounted under /hub and reach the same plane
    patterns = [rule[0] for rule in hub.handlers]
    assert "/hub/api/ztlab/datasets" in patterns
    assert "/hub/ztlab/models" in patterns
    assert _handler(hub, DatasetsHandler, "/hub/api/ztlab/datasets").plane is plane
    assert _handler(hub, ModelsPage, "/hub/ztlab/models").plane is plane
    # each service exists once, owned by the plane
    assert plane.datasets is _handler(hub, DatasetsHandler, "/").registry
    assert plane.sandbox is not None
    assert plane.services == ["audit", "policy", "totp", "datasets", "sandbox", "runs"]


def test_the_plane_opened_and_reconciled_on_record(hub: ZtlabHub) -> None:
    plane = hub.control_plane
    assert plane is not None
    plane.audit.flush().result(10)
    lines = plane.config.audit_log_path.read_text().splitlines()
    actions = [line.split('"action":"')[1].split('"')[0] for line in lines]
    assert actions[0] == "control_plane.started"
    assert "control_plane.reconciled" in actions


def test_no_control_plane_is_a_clear_error() -> None:
    with pytest.raises(ControlPlaneMissing, match="no zerotrust-lab control plane") as caught:
        control_plane({})
    assert caught.value.hint is not None
    assert "ztlab hub" in caught.value.hint


SERVICE_ATTRIBUTES = re.compile(
    r"authenticator\.(audit|policy|totp|model_service|dataset_registry|plane|record)\b"
    r"|getattr\(\s*self\.authenticator"
)


def test_nothing_outside_the_login_reaches_services_through_the_authenticator() -> None:
    offenders = []
    for path in sorted((ROOT / "hub").rglob("*.py")):
        if path.parent.name == "login":
            continue  # the login's own handlers ask their authenticator to record
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if SERVICE_ATTRIBUTES.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_configuration_file_is_read_once() -> None:
    readers = []
    for path in sorted(ROOT.glob("hub/**/*.py")):
        text = path.read_text()
        if "load_config(" in text:
            readers.append(str(path.relative_to(ROOT)))
    assert readers == ["hub/app.py"]


def test_every_recorded_action_in_the_code_is_catalogued() -> None:
    """Literal action names at the writers' call sites are all in the catalogue (the
    end-to-end stacks check every record they write, too)."""
    call = re.compile(
        r"""(?:record|_emit|_record|append)\(\s*[^,()]*,\s*["']([a-z_]+\.[a-z_.]+)["']"""
    )
    keyword = re.compile(r"""action=["']([a-z_]+\.[a-z_.]+)["']""")
    found: set[str] = set()
    for folder in ("hub", "dev"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            found.update(call.findall(text))
            found.update(keyword.findall(text))
    assert found, "the scan found no call sites: the patterns are out of date"
    missing = sorted(found - set(CATALOGUE))
    assert not missing, f"actions recorded but not catalogued: {missing}"
