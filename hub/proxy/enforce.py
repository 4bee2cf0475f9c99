"""The policy enforcement point in front of every user's server (NIST SP 800-207's PEP).

Traefik asks :class:`EnforceHandler` (``/hub/ztlab/enforce``) before it forwards any request
to ``/user/NAME/...``, HTTP or WebSocket; nothing reaches a server without a yes from here.
The decision, step by step (:meth:`Enforcer.decide`):

(0) the request is for a user's server (``/user/OWNER/...``), its route classified
    (:mod:`ztlab.hub.proxy.routes`); anything else is refused;
(1) the caller is authenticated by the hub, never by the server: a hub API token
    (``Authorization: token|bearer``, or ``?token=`` for a browser's WebSocket), or the
    enforcement point's own session cookie, which the hub signs and scopes to the server's path
    (:class:`SessionHandler` sets it after the hub's own sign-in); neither means: a browser
    is sent to sign in, an API client gets 401;
(2) a token must hold the hub's scope to reach this server (``access:servers``, or
    filtered to this user or server); a session must still be the user's current one
    (the hub's ``cookie_id``, which sign-out rotates) and younger than the MFA session's
    maximum age;
(3) the policy engine decides ``access_server`` on ``server:OWNER`` with the route's class
    and the request's method: a user reaches their own server only, unless a policy says
    otherwise;
(4) the answer is cached for a few seconds per credential, server and route class, so a
    JupyterLab session costs the hub one decision per few seconds, not one per request;
(5) a read on a raw-file route (``files``) must pass the caller's raw-file rule
    (:mod:`ztlab.hub.proxy.rules`): allowed, refused, or allowed up to a size, checked
    against the file as the server sees it (:mod:`ztlab.hub.proxy.files`); never cached.

Refusals are always recorded (``proxy.refused``); allowed requests are summed up per minute
(``proxy.access.summary``). The server's own authentication stays as a second line.
"""

from __future__ import annotations

import hashlib
import html
import json
import time
from collections import Counter
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final, Literal
from urllib.parse import parse_qs, quote, urlsplit

from jupyterhub import orm, scopes
from jupyterhub.handlers.base import BaseHandler
from tornado import web

from ztlab.hub.controlplane import ControlPlane
from ztlab.hub.identity import granted_roles
from ztlab.hub.policy import Principal
from ztlab.hub.proxy.files import ServerFiles, UnresolvablePath
from ztlab.hub.proxy.routes import Target, parse_target
from ztlab.hub.proxy.rules import RULED_METHODS, file_rule, refusal
from ztlab.hub.proxy.traefik import SESSION_COOKIE

#: the audit actor of a request that brought no (valid) credential
ANONYMOUS: Final = "anonymous"

Outcome = Literal["allow", "sign-in", "refuse"]


@dataclass(frozen=True, slots=True)
class Decision:
    """The enforcement point's answer for one credential, server and route class."""

    outcome: Outcome
    #: who is asking (a user name, or ``anonymous``)
    actor: str
    #: the status a refusal is answered with (401 or 403)
    status: int = 200
    #: what the caller is told (refusals)
    message: str = ""
    #: why, for the audit log (refusals)
    reason: str = ""
    #: until when the decision holds (``time.monotonic``)
    until: float = 0.0
    #: the caller's policy roles (allowed requests)
    roles: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Session:
    """The enforcement point's session, from its signed cookie."""

    user: str
    cookie_id: str
    expires: float


class Enforcer:
    """Decides, caches and records; one per hub (see the module docstring for the steps)."""

    def __init__(
        self,
        plane: ControlPlane,
        *,
        settings: dict[str, Any],
        cache_seconds: float,
        session_seconds: float,
    ) -> None:
        self._plane = plane
        self._settings = settings
        self._cache_seconds = cache_seconds
        self.session_seconds = session_seconds
        self._cache: dict[tuple[str, ...], Decision] = {}
        self._granted: Counter[tuple[str, str, str]] = Counter()
        #: the files of users' servers, as the servers see them
        self.files = ServerFiles(settings["users"], settings["db"])
        #: the roles each caller held at their last allowed request (for the egress reports)
        self.roles_of: dict[str, frozenset[str]] = {}

    # -- (0)-(4) ------------------------------------------------------------------------

    async def decide(self, target: Target, method: str, credential: Credential) -> Decision:
        """The decision for ``credential`` on ``target`` (cached for a few seconds)."""
        now = time.monotonic()
        key = (credential.kind, credential.digest, target.owner, target.server, target.route)
        cached = self._cache.get(key)
        if cached is not None and cached.until > now:
            decision = cached
        else:
            decision = await self._decide(target, method, credential)
            decision = replace(decision, until=now + self._cache_seconds)
            if len(self._cache) > 10_000:
                self._cache = {k: v for k, v in self._cache.items() if v.until > now}
            self._cache[key] = decision
        if decision.outcome == "allow" and target.route == "files":
            decision = self._file_rule(decision, target, method)
        if decision.outcome == "allow":
            self._granted[(decision.actor, target.owner, target.route)] += 1
            self.roles_of[decision.actor] = decision.roles
        else:
            self._plane.record(
                decision.actor,
                "proxy.refused",
                server=target.owner,
                route=target.route,
                method=method,
                path=target.path[:200],
                reason=decision.reason,
            )
        return decision

    def _file_rule(self, decision: Decision, target: Target, method: str) -> Decision:
        """(5) the raw-file rule of the caller's roles (never cached: sizes change)."""
        if method.upper() not in RULED_METHODS:
            return decision
        rule = file_rule(decision.roles, self._plane.config.roles)
        size: int | None = None
        unknown = False
        if rule.limit:  # a size limit: how big is the file, as the server sees it?
            try:
                found = self.files.stat(target.owner, target.file)
            except UnresolvablePath:
                unknown = True
            else:
                size = found.st_size if found is not None else None
        message = refusal(rule, target.file or target.path, size, unknown=unknown)
        if message is None:
            return decision
        return Decision("refuse", decision.actor, 403, message, rule.audit_name)

    async def _decide(self, target: Target, method: str, credential: Credential) -> Decision:
        # (1) who is asking
        if credential.kind == "none":
            return Decision("sign-in", ANONYMOUS, 401, "Sign in to the hub first.", "anonymous")
        if credential.kind == "token":
            identity = await self._token_identity(credential.value, target)
        else:
            identity = await self._session_identity(credential.value)
        if isinstance(identity, Decision):
            return identity
        name, roles = identity
        # (3) the policy
        principal = Principal(name=name, roles=roles)
        decision = self._plane.policy.with_audit(None).authorize(
            principal,
            "access_server",
            f"server:{target.owner}",
            {"route": target.route, "method": method.upper()},
        )
        if not decision.allowed:
            return Decision(
                "refuse",
                name,
                403,
                f"You may not use {target.owner}'s server: {decision.reason}.",
                f"policy: {decision.policy_id or 'deny by default'}",
            )
        return Decision("allow", name, roles=roles)

    async def _token_identity(
        self, token: str, target: Target
    ) -> tuple[str, frozenset[str]] | Decision:
        """(1)+(2) for a hub API token: valid, unexpired, a user's, scoped to this server."""
        db = self._settings["db"]
        found = orm.APIToken.find(db, token)
        if found is None:
            return Decision("refuse", ANONYMOUS, 401, "This token is not valid.", "bad-token")
        expires = found.expires_at
        if expires is not None and expires.replace(tzinfo=UTC) < datetime.now(UTC):
            return Decision("refuse", ANONYMOUS, 401, "This token has expired.", "expired-token")
        if found.user is None:
            return Decision(
                "refuse", ANONYMOUS, 403, "Services do not use servers.", "service-token"
            )
        name = found.user.name
        granted = scopes.get_scopes_for(found)
        owner = self._orm_user(target.owner)
        groups = {group.name for group in owner.groups} if owner is not None else set()
        wanted = {
            "access:servers",
            f"access:servers!user={target.owner}",
            f"access:servers!server={target.owner}/{target.server}",
            *(f"access:servers!group={group}" for group in groups),
        }
        if not wanted & granted:
            return Decision(
                "refuse",
                name,
                403,
                f"This token may not be used for {target.owner}'s server "
                "(it lacks the access:servers scope for it).",
                "token-scope",
            )
        user = self._settings["users"][found.user]
        return name, granted_roles(await user.get_auth_state() or {})

    async def _session_identity(self, value: str) -> tuple[str, frozenset[str]] | Decision:
        """(1)+(2) for the session cookie: signed by the hub, current, within its age."""
        session = read_session(self._settings["cookie_secret"], value)
        if session is None or session.expires < time.time():
            return Decision("sign-in", ANONYMOUS, 401, "Your session ended.", "session-expired")
        orm_user = self._orm_user(session.user)
        if orm_user is None or orm_user.cookie_id != session.cookie_id:
            return Decision("sign-in", ANONYMOUS, 401, "You have signed out.", "session-ended")
        user = self._settings["users"][orm_user]
        auth_state = await user.get_auth_state() or {}
        started = (auth_state.get("ztlab") or {}).get("authenticated_at")
        max_age = self._plane.config.login.session_max_age_seconds
        if not isinstance(started, int | float) or time.time() - started > max_age:
            return Decision(
                "sign-in", session.user, 401, "Your sign-in is too old.", "session-max-age"
            )
        return session.user, granted_roles(auth_state)

    def _orm_user(self, name: str) -> Any:
        return orm.User.find(self._settings["db"], name)

    # -- helpers for the handlers -------------------------------------------------------

    def is_directory(self, owner: str, path: str) -> bool:
        """Whether ``path`` is a directory of the owner's server (a listing, not a file)."""
        return self.files.is_directory(owner, path)

    def flush_summary(self) -> None:
        """Record the allowed requests since the last call, per caller and server."""
        granted, self._granted = self._granted, Counter()
        by_pair: dict[tuple[str, str], dict[str, int]] = {}
        for (actor, owner, route), count in granted.items():
            by_pair.setdefault((actor, owner), {})[route] = count
        for (actor, owner), routes in sorted(by_pair.items()):
            self._plane.record(actor, "proxy.access.summary", server=owner, requests=routes)


@dataclass(frozen=True, slots=True)
class Credential:
    """What the request brought to prove who it is."""

    kind: Literal["token", "session", "none"]
    value: str = ""

    @property
    def digest(self) -> str:
        """A key for the decision cache that does not keep the credential itself."""
        return hashlib.sha256(self.value.encode()).hexdigest() if self.value else ""


def credential_of(headers: Any, query: str, cookies: dict[str, str]) -> Credential:
    """The credential of the original request: a token first, then the session cookie.

    A token in the query (``?token=``) counts only for a browser's WebSocket, which cannot
    send headers, as JupyterHub's servers accept it: anywhere else a URL with a token would
    end up in histories, referrers and logs.
    """
    authorization = headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() in ("token", "bearer") and value.strip():
        return Credential("token", value.strip())
    token = parse_qs(query).get("token", [""])[0]
    if token and headers.get("Sec-Fetch-Mode", "") == "websocket":
        return Credential("token", token)
    session = cookies.get(SESSION_COOKIE)
    if session:
        return Credential("session", session)
    return Credential("none")


def write_session(secret: bytes, user: str, cookie_id: str, seconds: float) -> str:
    """A signed session value for the enforcement point's cookie."""
    payload = json.dumps({"u": user, "c": cookie_id, "e": time.time() + seconds})
    return web.create_signed_value(secret, SESSION_COOKIE, payload).decode("ascii")


def read_session(secret: bytes, value: str) -> Session | None:
    """The session in a cookie value, or ``None`` if it is not one the hub signed."""
    raw = web.decode_signed_value(secret, SESSION_COOKIE, value, max_age_days=1)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        return Session(user=str(data["u"]), cookie_id=str(data["c"]), expires=float(data["e"]))
    except (ValueError, KeyError, TypeError):
        return None


# -- the handlers ------------------------------------------------------------------------


class EnforceHandler(web.RequestHandler):
    """``/hub/ztlab/enforce``: Traefik's forwardAuth asks here before each request."""

    def initialize(self, enforcer: Enforcer) -> None:
        self.enforcer = enforcer

    def check_xsrf_cookie(self) -> None:
        """Traefik asks with GET; nothing here changes state for the caller."""

    async def get(self) -> None:
        """200 to let the request through; otherwise the answer the client gets."""
        headers = self.request.headers
        uri = headers.get("X-Forwarded-Uri", "")
        method = headers.get("X-Forwarded-Method", "GET")
        base_url = self.settings.get("base_url", "/")
        target = parse_target(uri, base_url=base_url, is_directory=self.enforcer.is_directory)
        if target is None:
            self._refuse(403, "Not a request for a user's server.")
            return
        cookies = {name: morsel.value for name, morsel in self.request.cookies.items()}
        credential = credential_of(headers, urlsplit(uri).query, cookies)
        decision = await self.enforcer.decide(target, method, credential)
        if decision.outcome == "allow":
            # Traefik puts these on the request it forwards: the server and the access log
            # (the egress accounting) see who asked and the route class decided here
            self.set_header("X-Ztlab-Actor", decision.actor)
            self.set_header("X-Ztlab-Server", target.owner)
            self.set_header("X-Ztlab-Route", target.route)
            if credential.kind == "session":
                self._renew(credential.value, target)
            self.set_status(204)
            self.finish()
            return
        # Traefik returns this answer to the client as it is; the header tells a client (and
        # the egress tests) that the enforcement point, not the server, answered
        self.set_header("X-Ztlab-Decision", decision.outcome)
        if decision.outcome == "sign-in" and _is_browser(headers):
            self.redirect(self._sign_in_url(uri))
            return
        self._refuse(decision.status, decision.message)

    def _renew(self, value: str, target: Target) -> None:
        """Past half its life, the session cookie is renewed (Traefik adds it to the reply)."""
        secret = self.settings["cookie_secret"]
        session = read_session(secret, value)
        if session is None:
            return
        if session.expires - time.time() > self.enforcer.session_seconds / 2:
            return
        fresh = write_session(
            secret, session.user, session.cookie_id, self.enforcer.session_seconds
        )
        self.set_cookie(SESSION_COOKIE, fresh, **_cookie_options(self, target.owner))

    def _sign_in_url(self, uri: str) -> str:
        """Where a browser goes to get a session: absolute, on the public host."""
        headers = self.request.headers
        proto = headers.get("X-Forwarded-Proto", "http")
        host = headers.get("X-Forwarded-Host", self.request.host)
        base_url = self.settings.get("base_url", "/").rstrip("/")
        return f"{proto}://{host}{base_url}/hub/ztlab/enforce/session?next={quote(uri, safe='')}"

    def _refuse(self, status: int, message: str) -> None:
        self.set_status(status)
        if _is_browser(self.request.headers):
            self.set_header("Content-Type", "text/html; charset=utf-8")
            base_url = self.settings.get("base_url", "/")
            self.finish(refusal_page(status, message, base_url=base_url))
        else:
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"status": status, "message": message}))


class SessionHandler(BaseHandler):  # type: ignore[misc]
    """``/hub/ztlab/enforce/session?next=/user/NAME/...``: after the hub's own sign-in, the
    enforcement point's session cookie for that server's path, then back to ``next``."""

    def initialize(self, enforcer: Enforcer) -> None:
        self.enforcer = enforcer

    @web.authenticated
    async def get(self) -> None:
        """Set the cookie and go on."""
        next_url = self.get_argument("next", "")
        base_url = self.settings.get("base_url", "/")
        target = parse_target(next_url, base_url=base_url)
        if target is None or not next_url.startswith("/") or next_url.startswith("//"):
            raise web.HTTPError(400, "next must be a path on a user's server")
        user = self.current_user
        value = write_session(
            self.settings["cookie_secret"],
            user.name,
            user.orm_user.cookie_id,
            self.enforcer.session_seconds,
        )
        self.set_cookie(SESSION_COOKIE, value, **_cookie_options(self, target.owner))
        self.redirect(next_url)


def _cookie_options(handler: Any, owner: str) -> dict[str, Any]:
    base_url = handler.settings.get("base_url", "/").rstrip("/")
    secure = handler.request.headers.get("X-Forwarded-Proto", handler.request.protocol) == "https"
    return {
        "path": f"{base_url}/user/{quote(owner)}/",
        "httponly": True,
        "samesite": "Lax",
        "secure": secure,
    }


def _is_browser(headers: Any) -> bool:
    """A browser's navigation (sent to sign in) rather than an API client (told 401)."""
    if headers.get("Sec-Fetch-Mode") == "navigate":
        return True
    return "text/html" in headers.get("Accept", "")


_REFUSAL_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Refused</title>
</head><body><h1>{status}: refused by the hub</h1><p>{message}</p>
<p><a href="{home}">Back to the hub</a></p></body></html>"""


def refusal_page(status: int, message: str, *, base_url: str = "/") -> str:
    """The page a browser gets for a refusal: the message, and the way back to the hub
    under the hub's ``base_url``."""
    home = f"{base_url.rstrip('/')}/hub/home"
    return _REFUSAL_PAGE.format(
        status=status, message=html.escape(message), home=html.escape(home, quote=True)
    )


def enforce_handlers(enforcer: Enforcer) -> list[tuple[str, Any, dict[str, Any]]]:
    """The enforcement point's handlers, relative to the hub prefix."""
    return [
        (r"/ztlab/enforce", EnforceHandler, {"enforcer": enforcer}),
        (r"/ztlab/enforce/session", SessionHandler, {"enforcer": enforcer}),
    ]
