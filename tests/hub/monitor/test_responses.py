"""Responses to alerts: decided by the real default policies, recorded, carried out; the webhook
posted to a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import http.server
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ztlab.common.errors import ConfigError
from ztlab.hub.monitor.alerts import AlertStore
from ztlab.hub.monitor.findings import Alert, Holder, LeaseHold
from ztlab.hub.monitor.responses import (
    AUDIT_ALERT,
    AUDIT_RESPONSE,
    UNATTRIBUTED,
    Notifier,
    Responder,
    webhook_document,
)
from ztlab.hub.policy import PolicyEngine, Principal, default_policy_files

GPU = "GPU-faa67c11-a40d-4772-a611-b24107474fa1"
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z

ALICE = Holder(user="alice", server="", kind="server", account="ztl-alice", cgroup="ztl-alice")
ROOT = Holder(user="root", server="", kind="server", account="ztl-root", cgroup="ztl-root")
BOBS_LEASE = LeaseHold(lease="L-bob", user="bob", server="gpu", pool="research", gpu="0")
ROLES = {
    "alice": frozenset({"trainer"}),
    "bob": frozenset({"trainer"}),
    "root": frozenset({"admin"}),
}


def _alert(kind: str, **kw: Any) -> Alert:
    fields: dict[str, Any] = {
        "kind": kind,
        "severity": "critical",
        "message": f"{kind}: pid 4242 of alice on GPU 0 ({GPU})",
        "uuid": GPU,
        "pid": 4242,
        "holder": ALICE,
        "lease": BOBS_LEASE,
        "t": T0,
        "evidence": {"comm": "python"},
    }
    fields.update(kw)
    return Alert(**fields)


# --------------------------------------------------------------------------------------------
# the responder
# --------------------------------------------------------------------------------------------


class Harness:
    """A responder on the real policies and a real store, with recording fakes around it."""

    def __init__(self, tmp_path: Path, policy: PolicyEngine, notifier: Notifier | None = None):
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.done: list[tuple[str, Any]] = []
        self.stop_error: Exception | None = None
        self.store = AlertStore.open(tmp_path / "monitor" / "alerts.sqlite")
        self.responder = Responder(
            policy=policy,
            roles_of=lambda user: ROLES.get(user, frozenset()),
            store=self.store,
            record=self.record,
            stop_server=self.stop_server,
            revoke_lease=lambda lease: self.done.append(("revoke_lease", lease)),
            notifier=notifier,
        )

    def record(self, actor: str, action: str, **detail: Any) -> None:
        self.events.append((actor, action, detail))

    def stop_server(self, holder: Holder) -> None:
        if self.stop_error is not None:
            raise self.stop_error
        self.done.append(("stop_server", holder))

    def actions(self) -> list[str]:
        return [action for _, action, _ in self.events]

    def detail(self, action: str, response: str | None = None) -> dict[str, Any]:
        found = [
            d for _, a, d in self.events if a == action and d.get("response", response) == response
        ]
        assert len(found) == 1, (action, response, self.events)
        return found[0]


@pytest.fixture(scope="module")
def defaults() -> PolicyEngine:
    return PolicyEngine.defaults()


@pytest.fixture
def harness(tmp_path: Path, defaults: PolicyEngine) -> Iterator[Harness]:
    h = Harness(tmp_path, defaults)
    yield h
    h.store.close()


def test_a_trainers_unleased_process_is_stopped_and_the_lease_revoked(harness: Harness) -> None:
    alert = _alert("unleased_process")
    assert harness.responder.respond(alert) == ["notify", "stop_server", "revoke_lease"]
    assert harness.done == [("stop_server", ALICE), ("revoke_lease", BOBS_LEASE)]
    # the alert is recorded first, then each response as it is carried out
    assert harness.actions() == [AUDIT_ALERT, AUDIT_RESPONSE, AUDIT_RESPONSE, AUDIT_RESPONSE]
    assert {actor for actor, _, _ in harness.events} == {"ztlab-hub"}
    (stored,) = harness.store.list()
    raised = harness.detail(AUDIT_ALERT)
    assert raised == {
        "alert": stored.id,
        "kind": "unleased_process",
        "severity": "critical",
        "message": alert.message,
        "uuid": GPU,
        "pid": 4242,
        "user": "alice",
        "server": "",
        "lease": "L-bob",
        "pool": "research",
        "subject": "alice",
        "evidence": {"comm": "python"},
        "responses": ["notify", "stop_server", "revoke_lease"],
        "decisions": {
            "notify": "permitted by policy 'alert-notify': admins are told of every GPU alert",
            "stop_server": raised["decisions"]["stop_server"],
            "revoke_lease": raised["decisions"]["revoke_lease"],
        },
    }
    assert raised["decisions"]["stop_server"].startswith(
        "permitted by policy 'alert-stop-intruder': "
    )
    assert raised["decisions"]["revoke_lease"].startswith(
        "permitted by policy 'alert-revoke-broken-lease': "
    )
    assert harness.detail(AUDIT_RESPONSE, "stop_server") == {
        "alert": stored.id,
        "kind": "unleased_process",
        "response": "stop_server",
        "outcome": "done",
        "target": "server:alice/",
    }
    assert harness.detail(AUDIT_RESPONSE, "revoke_lease")["target"] == "lease:L-bob (GPU 0)"
    assert harness.detail(AUDIT_RESPONSE, "notify")["target"] == "alert store"
    assert stored.responses == ("notify", "stop_server", "revoke_lease")
    assert stored.outcomes == {"notify": "done", "stop_server": "done", "revoke_lease": "done"}


def test_a_kind_the_policy_only_notifies_about(harness: Harness) -> None:
    assert harness.responder.respond(_alert("baseline", severity="warning")) == ["notify"]
    assert harness.done == []
    decisions = harness.detail(AUDIT_ALERT)["decisions"]
    assert decisions["stop_server"] == (
        "denied by default: no policy permits roles [trainer] to respond_to_alert on alert:baseline"
    )
    assert decisions["revoke_lease"].startswith("denied by default: ")
    assert harness.actions() == [AUDIT_ALERT, AUDIT_RESPONSE]
    assert harness.store.list()[0].responses == ("notify",)


def test_an_admins_own_miner_is_stopped_too(harness: Harness) -> None:
    lease = LeaseHold(lease="L-root", user="root", server="", pool="research", gpu="0")
    taken = harness.responder.respond(_alert("miner", holder=ROOT, lease=lease))
    assert taken == ["notify", "stop_server", "revoke_lease"]
    assert harness.done == [("stop_server", ROOT), ("revoke_lease", lease)]


def test_outside_cgroup_is_decided_for_the_lease_holder(harness: Harness) -> None:
    taken = harness.responder.respond(_alert("outside_cgroup", holder=None))
    # nothing to stop: no ztlab holder runs it; bob keeps his lease (the host's process is
    # the admins' to look at), and they are told
    assert taken == ["notify"]
    assert harness.done == []
    raised = harness.detail(AUDIT_ALERT)
    assert raised["decisions"]["revoke_lease"].startswith("denied by default")
    assert (raised["subject"], raised["user"], raised["server"]) == ("bob", None, None)
    assert raised["decisions"]["stop_server"] == (
        "not applicable: no ztlab holder runs the process"
    )
    assert harness.store.list(user="bob")[0].kind == "outside_cgroup"


def test_an_alert_of_nobody_is_decided_for_the_unattributed_principal(harness: Harness) -> None:
    taken = harness.responder.respond(_alert("xid_error", holder=None, lease=None, pid=None))
    assert taken == ["notify"]
    raised = harness.detail(AUDIT_ALERT)
    assert raised["subject"] == UNATTRIBUTED
    assert raised["decisions"]["revoke_lease"] == "not applicable: the device is not leased"
    assert harness.responder.subject(_alert("xid_error", holder=None, lease=None)) == Principal(
        name=UNATTRIBUTED, roles=frozenset()
    )


def test_the_subject_has_the_holders_roles(harness: Harness) -> None:
    assert harness.responder.subject(_alert("miner", holder=ROOT)).roles == {"admin"}
    assert harness.responder.subject(_alert("miner", holder=None)) == Principal(
        name="bob", roles=frozenset({"trainer"})
    )


def _policy_dir(tmp_path: Path, extra: str) -> PolicyEngine:
    directory = tmp_path / "policies"
    directory.mkdir()
    for name, text in default_policy_files().items():
        (directory / name).write_text(text, encoding="utf-8")
    (directory / "local.cedar").write_text(extra, encoding="utf-8")
    return PolicyEngine.from_directory(directory)


def test_the_policy_decides_not_the_code(tmp_path: Path) -> None:
    """A local policy that spares admins' servers, and revokes only in pool research."""
    policy = _policy_dir(
        tmp_path,
        '@id("spare-admin-servers")\n@reason("admins\' servers are stopped by hand here")\n'
        'forbid (principal in Ztlab::Role::"admin", '
        'action == Ztlab::Action::"respond_to_alert", resource)\n'
        'when { context.response == "stop_server" };\n'
        '@id("revoke-only-in-research")\n@reason("only research GPUs are revoked")\n'
        'forbid (principal, action == Ztlab::Action::"respond_to_alert", resource)\n'
        'when { context.response == "revoke_lease" && '
        '!(context has pool && context.pool == "research") };\n',
    )
    h = Harness(tmp_path, policy)
    root_lease = LeaseHold(lease="L-root", user="root", server="", pool="research", gpu="0")
    assert h.responder.respond(_alert("miner", holder=ROOT, lease=root_lease)) == [
        "notify",
        "revoke_lease",
    ]
    assert h.done == [("revoke_lease", root_lease)]
    assert h.detail(AUDIT_ALERT)["decisions"]["stop_server"].startswith(
        "forbidden by policy 'spare-admin-servers': "
    )
    # a trainer's miner is still stopped; outside pool research its lease is not revoked
    h.done.clear()
    other = LeaseHold(lease="L-2", user="alice", server="", pool="scratch", gpu="1")
    assert h.responder.respond(_alert("miner", lease=other)) == ["notify", "stop_server"]
    assert h.done == [("stop_server", ALICE)]
    h.store.close()


def test_a_failing_stop_is_recorded_and_the_rest_still_happens(harness: Harness) -> None:
    harness.stop_error = RuntimeError("the spawner did not answer")
    taken = harness.responder.respond(_alert("unleased_process"))
    assert taken == ["notify", "stop_server", "revoke_lease"]
    assert harness.done == [("revoke_lease", BOBS_LEASE)]
    assert harness.detail(AUDIT_RESPONSE, "stop_server") == {
        "alert": harness.store.list()[0].id,
        "kind": "unleased_process",
        "response": "stop_server",
        "outcome": "failed",
        "error": "RuntimeError: the spawner did not answer",
        "target": "server:alice/",
    }
    assert harness.detail(AUDIT_RESPONSE, "revoke_lease")["outcome"] == "done"
    assert harness.store.list()[0].outcomes == {
        "notify": "done",
        "stop_server": "failed: RuntimeError: the spawner did not answer",
        "revoke_lease": "done",
    }


def test_nothing_raises_out_of_respond(tmp_path: Path, defaults: PolicyEngine) -> None:
    h = Harness(tmp_path, defaults)

    def broken_record(actor: str, action: str, **detail: Any) -> None:
        raise OSError("audit log unavailable")

    def broken_roles(user: str) -> frozenset[str]:
        raise KeyError(user)

    h.responder._record = broken_record
    h.responder._roles_of = broken_roles
    h.store.close()  # the store cannot be written either
    # roles unknown (decided with none), store closed, audit failing: the responses still run
    assert h.responder.respond(_alert("miner")) == ["notify", "stop_server", "revoke_lease"]
    assert h.done == [("stop_server", ALICE), ("revoke_lease", BOBS_LEASE)]


def test_a_policy_error_denies_and_is_recorded(harness: Harness) -> None:
    # a user name the policy cannot represent (a space): decided as nothing permitted
    odd = Holder(user="al ice", server="", kind="server", account="x", cgroup="x")
    assert harness.responder.respond(_alert("miner", holder=odd)) == []
    assert harness.done == []
    decisions = harness.detail(AUDIT_ALERT)["decisions"]
    assert decisions["notify"].startswith("not decided: invalid principal name 'al ice'")
    assert harness.store.list()[0].responses == ()


# --------------------------------------------------------------------------------------------
# the webhook
# --------------------------------------------------------------------------------------------


class Endpoint:
    """A real HTTP server on 127.0.0.1 answering each POST as ``answer`` says."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.statuses: list[int] = []  # answers to give, in order; then 200
        self.gate = threading.Event()
        self.gate.set()
        self.redirect_to: str | None = None
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                endpoint.gate.wait(10)
                endpoint.bodies.append(json.loads(body))
                endpoint.headers.append(dict(self.headers))
                if endpoint.redirect_to is not None:
                    self.send_response(307)
                    self.send_header("Location", endpoint.redirect_to)
                else:
                    self.send_response(endpoint.statuses.pop(0) if endpoint.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/s3cret-token"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    e = Endpoint()
    yield e
    e.close()


@pytest.fixture
def notifiers() -> Iterator[Callable[..., Notifier]]:
    made: list[Notifier] = []

    def make(url: str, **kw: Any) -> Notifier:
        n = Notifier(url, **kw)
        made.append(n)
        return n

    yield make
    for n in made:
        n.close(timeout=2)


def test_webhook_document() -> None:
    doc = webhook_document(_alert("miner"), alert_id=7)
    assert doc == {
        "version": "4",
        "status": "firing",
        "alerts": [
            {
                "status": "firing",
                "labels": {
                    "alertname": "ztlab_gpu_alert",
                    "kind": "miner",
                    "severity": "critical",
                    "user": "alice",
                    "uuid": GPU,
                    "alert_id": "7",
                },
                "annotations": {"message": _alert("miner").message},
                "startsAt": "2027-01-15T08:00:00Z",
            }
        ],
    }
    nobody = webhook_document(_alert("xid_error", holder=None, lease=None))
    assert nobody["alerts"][0]["labels"]["user"] == ""
    assert "alert_id" not in nobody["alerts"][0]["labels"]


def test_notify_posts_to_the_webhook(
    tmp_path: Path, defaults: PolicyEngine, endpoint: Endpoint, notifiers: Callable[..., Notifier]
) -> None:
    notifier = notifiers(endpoint.url)
    h = Harness(tmp_path, defaults, notifier=notifier)
    h.responder.respond(_alert("baseline", severity="warning"))
    assert notifier.flush(5)
    (body,) = endpoint.bodies
    assert body["alerts"][0]["labels"]["kind"] == "baseline"
    assert body["alerts"][0]["labels"]["alert_id"] == str(h.store.list()[0].id)
    assert endpoint.headers[0]["Content-Type"] == "application/json"
    assert h.detail(AUDIT_RESPONSE, "notify")["target"] == "webhook"
    assert (notifier.sent, notifier.failed, notifier.dropped) == (1, 0, 0)
    h.store.close()


def test_a_failing_endpoint_is_retried_with_backoff(
    endpoint: Endpoint, notifiers: Callable[..., Notifier]
) -> None:
    notifier = notifiers(endpoint.url, attempts=3, backoff=0.01)
    endpoint.statuses = [500, 503]
    notifier.send(_alert("miner"))
    assert notifier.flush(5)
    assert len(endpoint.bodies) == 3
    assert (notifier.sent, notifier.failed) == (1, 0)


def test_an_endpoint_that_keeps_failing_is_given_up_on(
    endpoint: Endpoint, notifiers: Callable[..., Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    notifier = notifiers(endpoint.url, attempts=2, backoff=0.01)
    endpoint.statuses = [500] * 10
    with caplog.at_level(logging.WARNING, logger="ztlab.hub.monitor.responses"):
        notifier.send(_alert("miner"))
        assert notifier.flush(5)
    assert len(endpoint.bodies) == 2
    assert (notifier.sent, notifier.failed) == (0, 1)
    assert "gave up after 2 attempts: HTTP 500" in caplog.text
    # the URL's path may hold a token: logs name the host only
    assert "s3cret-token" not in caplog.text


def test_an_unreachable_endpoint_fails_without_blocking(
    notifiers: Callable[..., Notifier],
) -> None:
    # a port nobody listens on (bound, then closed)
    closed = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()
    notifier = notifiers(f"http://127.0.0.1:{port}/", attempts=2, backoff=0.01, timeout=1)
    notifier.send(_alert("miner"))  # returns at once
    assert notifier.flush(5)
    assert notifier.failed == 1


def test_a_redirect_is_not_followed(endpoint: Endpoint, notifiers: Callable[..., Notifier]) -> None:
    elsewhere = Endpoint()
    try:
        endpoint.redirect_to = elsewhere.url
        notifier = notifiers(endpoint.url, attempts=1)
        notifier.send(_alert("miner"))
        assert notifier.flush(5)
        assert notifier.failed == 1
        assert elsewhere.bodies == []
    finally:
        elsewhere.close()


def test_a_full_queue_drops_the_oldest(
    endpoint: Endpoint, notifiers: Callable[..., Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    notifier = notifiers(endpoint.url, queue_size=2)
    endpoint.gate.clear()  # the endpoint holds the first post until told
    notifier.send(_alert("miner", message="first"))
    assert not notifier.flush(0.2)  # in flight, held by the endpoint
    with caplog.at_level(logging.WARNING, logger="ztlab.hub.monitor.responses"):
        for message in ("second", "third", "fourth"):
            notifier.send(_alert("miner", message=message))
    assert notifier.dropped == 1
    assert "dropped the oldest" in caplog.text
    endpoint.gate.set()
    assert notifier.flush(5)
    posted = [b["alerts"][0]["annotations"]["message"] for b in endpoint.bodies]
    assert posted == ["first", "third", "fourth"]


def test_send_never_waits_on_the_endpoint(
    endpoint: Endpoint, notifiers: Callable[..., Notifier]
) -> None:
    notifier = notifiers(endpoint.url)
    endpoint.gate.clear()
    finished = threading.Event()

    def send_many() -> None:
        for _ in range(5):
            notifier.send(_alert("miner"))
        finished.set()

    threading.Thread(target=send_many, daemon=True).start()
    assert finished.wait(2)
    endpoint.gate.set()
    assert notifier.flush(5)
    assert notifier.sent == 5


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.org/hook",
        "example.org/hook",
        "http:///no-host",
        "",
        "javascript:alert(1)",
    ],
)
def test_only_http_urls(url: str) -> None:
    with pytest.raises(ConfigError, match="must be an http:// or https:// URL with a host"):
        Notifier(url)


def test_a_closed_notifier_is_a_failed_notify(
    tmp_path: Path, defaults: PolicyEngine, endpoint: Endpoint
) -> None:
    notifier = Notifier(endpoint.url)
    notifier.close()
    h = Harness(tmp_path, defaults, notifier=notifier)
    assert h.responder.respond(_alert("baseline")) == ["notify"]
    assert h.detail(AUDIT_RESPONSE, "notify")["outcome"] == "failed"
    h.store.close()
