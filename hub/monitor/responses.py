"""What happens when the GPU monitor raises an alert: recorded always, the rest as policy says.

:meth:`Responder.respond` runs fixed steps for each alert, in order:

(1) **decide**: for each response in :data:`RESPONSES` that can apply to the alert, ask the
    policy decision point ``respond_to_alert`` on ``alert:KIND`` with the context
    ``{response, severity, pool}``. The principal is the alert's *subject*: the holder of
    the process with that user's roles, or, when no ztlab holder runs it (a process outside
    every ztlab cgroup, a device error), the holder of the device's lease, or else
    :data:`UNATTRIBUTED` with no roles. ``stop_server`` cannot apply without a holder, nor
    ``revoke_lease`` without a lease: those are not asked about.
(2) **store** the alert with the permitted responses
    (:class:`~ztlab.hub.monitor.alerts.AlertStore`);
(3) **record** it in the audit log (``gpu.alert``), with each response's decision reason:
    every alert is recorded, whatever the policy says;
(4) **carry out** the permitted responses in the order of :data:`RESPONSES`, each recorded
    (``gpu.alert_response``, outcome ``done`` or ``failed``) and noted in the store. A
    failure is caught and recorded; the other responses still run, and ``respond`` never
    raises.

The responses: ``notify`` hands the alert to the :class:`Notifier` (a webhook; admins see
stored alerts in any case), ``stop_server`` stops the holder's server, pool cluster or run,
and ``revoke_lease`` ends the device's lease and closes its device fence. What stopping
and revoking mean is the caller's (the monitor service's) to say: the responder is given
the two functions.

:class:`Notifier` POSTs an Alertmanager-webhook-like JSON document to an ``http(s)`` URL
from a background thread with a bounded queue (the oldest waiting alert is dropped, with
a warning, when it is full) and retries with back-off, so the sampler never waits on it.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

from ztlab.common.errors import ConfigError, ZtlabError
from ztlab.hub.monitor.alerts import AlertStore, StoredAlert, subject_of
from ztlab.hub.monitor.findings import Alert, Holder, LeaseHold
from ztlab.hub.policy import PolicyEngine, Principal
from ztlab.hub.timestamps import utc_iso

__all__ = [
    "AUDIT_ALERT",
    "AUDIT_RESPONSE",
    "POLICY_ACTION",
    "RESPONSES",
    "SYSTEM_ACTOR",
    "UNATTRIBUTED",
    "Notifier",
    "Responder",
    "webhook_document",
]

#: every response, in the order they are carried out
RESPONSES: Final = ("notify", "stop_server", "revoke_lease")
#: the policy action asked about each response
POLICY_ACTION: Final = "respond_to_alert"
#: the principal of an alert that is no user's (no ztlab holder, no lease)
UNATTRIBUTED: Final = "ztlab-unattributed"
#: the audit actor of the monitor's records
SYSTEM_ACTOR: Final = "ztlab-hub"
#: audit action: an alert was raised (always recorded)
AUDIT_ALERT: Final = "gpu.alert"
#: audit action: a response to an alert was carried out (or failed)
AUDIT_RESPONSE: Final = "gpu.alert_response"

_log = logging.getLogger(__name__)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, ZtlabError):
        return exc.message
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _holder_target(holder: Holder) -> str:
    return f"{holder.kind}:{holder.user}/{holder.server}"


def _pool_of(alert: Alert) -> str | None:
    if alert.lease is not None and alert.lease.pool:
        return alert.lease.pool
    pool = alert.evidence.get("pool")
    return pool if isinstance(pool, str) and pool else None


class Responder:
    """Decides, stores, records and carries out the responses to alerts (module docstring)."""

    def __init__(
        self,
        *,
        policy: PolicyEngine,
        roles_of: Callable[[str], frozenset[str]],
        store: AlertStore,
        record: Callable[..., None],
        stop_server: Callable[[Holder], None],
        revoke_lease: Callable[[LeaseHold], None],
        notifier: Notifier | None = None,
    ) -> None:
        """``roles_of`` gives a user's roles; ``record(actor, action, **detail)`` writes an
        audit event; ``stop_server`` and ``revoke_lease`` carry out those responses (an
        exception from either is recorded as the response's failure)."""
        self._policy = policy
        self._roles_of = roles_of
        self._store = store
        self._record = record
        self._stop_server = stop_server
        self._revoke_lease = revoke_lease
        self._notifier = notifier

    def subject(self, alert: Alert) -> Principal:
        """The principal the policy decides the responses for (see the module docstring)."""
        user, _ = subject_of(alert)
        if user is None:
            return Principal(name=UNATTRIBUTED, roles=frozenset())
        try:
            roles = frozenset(self._roles_of(user))
        except Exception:
            _log.exception("GPU alert: cannot look up the roles of %s; deciding with none", user)
            roles = frozenset()
        return Principal(name=user, roles=roles)

    def respond(self, alert: Alert) -> list[str]:
        """Decide, store, record and carry out; the responses set out on, in order."""
        decisions = self._decide(alert)
        taken = [response for response, (allowed, _) in decisions.items() if allowed]
        stored = self._store_alert(alert, taken)
        alert_id = stored.id if stored is not None else None
        self._audit(
            AUDIT_ALERT,
            alert=alert_id,
            kind=alert.kind,
            severity=alert.severity,
            message=alert.message,
            uuid=alert.uuid,
            pid=alert.pid,
            user=alert.holder.user if alert.holder is not None else None,
            server=alert.holder.server if alert.holder is not None else None,
            lease=alert.lease.lease if alert.lease is not None else None,
            pool=_pool_of(alert),
            subject=self._subject_name(alert),
            evidence=dict(alert.evidence),
            responses=list(taken),
            decisions={response: reason for response, (_, reason) in decisions.items()},
        )
        for response in taken:
            self._carry_out(alert, alert_id, response)
        return taken

    # -- (1) decide -------------------------------------------------------------------------

    def _subject_name(self, alert: Alert) -> str:
        user, _ = subject_of(alert)
        return user if user is not None else UNATTRIBUTED

    def _decide(self, alert: Alert) -> dict[str, tuple[bool, str]]:
        """Response -> (permitted, the decision's reason), for every response."""
        try:
            principal: Principal | None = self.subject(alert)
            problem = ""
        except Exception as exc:  # a user name the policy cannot represent
            principal, problem = None, _error_text(exc)
        context: dict[str, Any] = {"severity": alert.severity}
        pool = _pool_of(alert)
        if pool is not None:
            context["pool"] = pool
        decisions: dict[str, tuple[bool, str]] = {}
        for response in RESPONSES:
            if response == "stop_server" and alert.holder is None:
                decisions[response] = (False, "not applicable: no ztlab holder runs the process")
            elif response == "revoke_lease" and alert.lease is None:
                decisions[response] = (False, "not applicable: the device is not leased")
            elif principal is None:
                decisions[response] = (False, f"not decided: {problem}")
            else:
                decisions[response] = self._ask(principal, alert, response, context)
        return decisions

    def _ask(
        self, principal: Principal, alert: Alert, response: str, context: Mapping[str, Any]
    ) -> tuple[bool, str]:
        try:
            decision = self._policy.authorize(
                principal, POLICY_ACTION, f"alert:{alert.kind}", {**context, "response": response}
            )
        except Exception as exc:
            _log.exception("GPU alert: the policy could not decide %s on %s", response, alert.kind)
            return False, f"not decided: {_error_text(exc)}"
        return decision.allowed, decision.reason

    # -- (2) store, (3) record ----------------------------------------------------------------

    def _store_alert(self, alert: Alert, taken: Sequence[str]) -> StoredAlert | None:
        try:
            return self._store.add(alert, taken)
        except Exception:
            _log.exception("GPU alert: cannot store %s (%s)", alert.kind, alert.message)
            return None

    def _audit(self, action: str, **detail: Any) -> None:
        try:
            self._record(SYSTEM_ACTOR, action, **detail)
        except Exception:
            _log.exception("GPU alert: cannot record %s %s", action, detail)

    # -- (4) carry out -------------------------------------------------------------------------

    def _carry_out(self, alert: Alert, alert_id: int | None, response: str) -> None:
        target = ""
        error: str | None = None
        try:
            if response == "notify":
                target = "webhook" if self._notifier is not None else "alert store"
                if self._notifier is not None:
                    self._notifier.send(alert, alert_id=alert_id)
            elif response == "stop_server":
                assert alert.holder is not None
                target = _holder_target(alert.holder)
                self._stop_server(alert.holder)
            else:
                assert alert.lease is not None
                target = f"lease:{alert.lease.lease} (GPU {alert.lease.gpu})"
                self._revoke_lease(alert.lease)
        except Exception as exc:
            error = _error_text(exc)
            _log.warning("GPU alert %s: %s on %s failed: %s", alert.kind, response, target, error)
        detail: dict[str, Any] = {
            "alert": alert_id,
            "kind": alert.kind,
            "response": response,
            "outcome": "done" if error is None else "failed",
            "target": target,
        }
        if error is not None:
            detail["error"] = error
        self._audit(AUDIT_RESPONSE, **detail)
        if alert_id is not None:
            try:
                self._store.set_outcome(
                    alert_id, response, "done" if error is None else f"failed: {error}"
                )
            except Exception:
                _log.exception("GPU alert %s: cannot note the outcome of %s", alert_id, response)


# --------------------------------------------------------------------------------------------
# The webhook
# --------------------------------------------------------------------------------------------


def webhook_document(alert: Alert, *, alert_id: int | None = None) -> dict[str, Any]:
    """The JSON document posted for ``alert`` (shaped like Alertmanager's webhook)."""
    user, _ = subject_of(alert)
    labels = {
        "alertname": "ztlab_gpu_alert",
        "kind": alert.kind,
        "severity": alert.severity,
        "user": user or "",
        "uuid": alert.uuid,
    }
    if alert_id is not None:
        labels["alert_id"] = str(alert_id)
    return {
        "version": "4",
        "status": "firing",
        "alerts": [
            {
                "status": "firing",
                "labels": labels,
                "annotations": {"message": alert.message},
                "startsAt": utc_iso(alert.t),
            }
        ],
    }


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A webhook answers where it is posted to; a redirect is a failure, not a new target."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Notifier:
    """Posts alerts to a webhook from a background thread (see the module docstring).

    ``attempts`` tries per alert (the first, then retries after ``backoff``, ``2*backoff``,
    ... seconds); ``queue_size`` alerts may wait, beyond which the oldest is dropped with a
    warning. Counters: :attr:`sent`, :attr:`failed` (given up on), :attr:`dropped`.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        queue_size: int = 100,
        attempts: int = 3,
        backoff: float = 1.0,
    ) -> None:
        """Check ``url`` (``http://`` or ``https://`` with a host: :class:`ConfigError`
        otherwise); nothing is sent, and no thread started, until :meth:`send`."""
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            scheme = f"a {parts.scheme}: URL" if parts is not None and parts.scheme else "no URL"
            raise ConfigError(
                f"the alert notification URL must be an http:// or https:// URL with a host, "
                f"got {scheme}",
                hint="set gpu.monitor.notify_url to the webhook's http(s) address",
            )
        if queue_size < 1 or attempts < 1 or timeout <= 0 or backoff < 0:
            raise ConfigError(
                "the alert notifier needs queue_size >= 1, attempts >= 1, timeout > 0 and "
                f"backoff >= 0, got {queue_size}, {attempts}, {timeout}, {backoff}"
            )
        self._url = url
        #: the webhook's host, for logs (the URL's path may hold a token)
        self.host = parts.hostname + (f":{parts.port}" if parts.port else "")
        self._timeout = timeout
        self._attempts = attempts
        self._backoff = backoff
        self._queue: collections.deque[bytes] = collections.deque()
        self._queue_size = queue_size
        self._cond = threading.Condition()
        self._busy = False
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._opener = urllib.request.build_opener(_NoRedirect())
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    def send(self, alert: Alert, *, alert_id: int | None = None) -> None:
        """Queue ``alert`` for posting and return at once."""
        body = json.dumps(webhook_document(alert, alert_id=alert_id)).encode()
        with self._cond:
            if self._closed.is_set():
                raise ZtlabError("the alert notifier is closed")
            if len(self._queue) >= self._queue_size:
                self._queue.popleft()
                self.dropped += 1
                _log.warning(
                    "alert webhook %s: %d alerts wait already; dropped the oldest",
                    self.host,
                    self._queue_size,
                )
            self._queue.append(body)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="ztlab-alert-notifier", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until every queued alert was sent or given up on; ``False`` on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (alerts still waiting are not sent)."""
        with self._cond:
            self._closed.set()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._closed.is_set())
                if self._closed.is_set():
                    return
                body = self._queue.popleft()
                self._busy = True
            try:
                self._deliver(body)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _deliver(self, body: bytes) -> None:
        problem = ""
        for attempt in range(self._attempts):
            if attempt and self._closed.wait(self._backoff * 2 ** (attempt - 1)):
                return
            problem = self._post(body)
            if not problem:
                self.sent += 1
                return
        self.failed += 1
        _log.warning(
            "alert webhook %s: gave up after %d attempts: %s", self.host, self._attempts, problem
        )

    def _post(self, body: bytes) -> str:
        """Post once; ``""`` on a 2xx answer, else what went wrong."""
        request = urllib.request.Request(  # noqa: S310 - http(s) only, checked in __init__
            self._url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "ztlab-gpu-monitor"},
        )
        try:
            with self._opener.open(request, timeout=self._timeout) as answer:
                status = int(answer.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            return f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            return _error_text(exc)
        return "" if 200 <= status < 300 else f"HTTP {status}"
