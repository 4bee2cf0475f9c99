"""The login's web handlers: start (PKCE, state, nonce), callback, and the TOTP step-up.

No session cookie and no API token exist for a user until both factors have been proven:
the callback sets the hub's login cookie only when the provider proved MFA; otherwise it
keeps the verified login server-side, keyed by a random id in a short-lived signed cookie,
and the step-up page sets the login cookie once the TOTP (or a recovery) code is right.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Concatenate, Literal, Protocol, TypeVar

from jupyterhub.handlers.base import BaseHandler
from jupyterhub.utils import new_token
from oauthenticator.oauth2 import (
    OAuthCallbackHandler,
    OAuthLoginHandler,
    OAuthLogoutHandler,
    _deserialize_state,
    _serialize_state,
)
from tornado import web

from ztlab.common.config.model import LoginConfig
from ztlab.hub.controlplane import ControlPlane, control_plane
from ztlab.hub.login.state import LoginRefused, PendingLogin, expected_nonce
from ztlab.hub.mfa.totp import TotpError, TotpStoreError

PENDING_COOKIE = "ztlab-mfa-pending"


class LoginSteps(Protocol):
    """What the handlers ask of the authenticator
    (:class:`~ztlab.hub.login.authenticator.MFAOAuthenticator`)."""

    client_id: str
    scope: list[str]
    extra_authorize_params: dict[str, Any]

    @property
    def login_settings(self) -> LoginConfig: ...

    def record(self, actor: str, action: str, **detail: Any) -> None: ...

    async def provider(self) -> Any: ...

    def check_network(self, client_ip: str) -> None: ...

    def get_callback_url(self, handler: Any = None) -> str: ...

    async def get_authenticated_user(self, handler: Any, data: Any) -> Any: ...

    def mfa_requirement(
        self,
        auth_model: dict[str, Any],
        *,
        client_ip: str,
        user_agent: str,
        previous: Mapping[str, Any] | None,
    ) -> tuple[Literal["satisfied", "step-up"], str]: ...

    def remember_pending(self, pending: PendingLogin) -> str: ...

    def pending(self, pending_id: str | None) -> PendingLogin | None: ...

    def forget_pending(self, pending_id: str) -> None: ...

    def stamp_session(
        self, auth_model: dict[str, Any], *, method: str, client_ip: str, user_agent: str
    ) -> None: ...


_Handler = TypeVar("_Handler", bound="_Base")


def refusals_on_disk(
    method: Callable[Concatenate[_Handler, ...], Awaitable[None]],
) -> Callable[Concatenate[_Handler, ...], Awaitable[None]]:
    """A refused login is answered only once its audit record is durable."""

    @functools.wraps(method)
    async def handle(self: _Handler, *args: Any, **kwargs: Any) -> None:
        try:
            await method(self, *args, **kwargs)
        except LoginRefused:
            await self.plane.flush()
            raise

    return handle


class _Base:
    """Helpers shared by our handlers (mixed into JupyterHub's BaseHandler)."""

    authenticator: LoginSteps
    request: Any
    settings: dict[str, Any]

    @property
    def plane(self) -> ControlPlane:
        """The hub's control plane."""
        return control_plane(self.settings)

    def client_context(self) -> tuple[str, str]:
        """The client's address and browser.

        Not ``request.remote_ip``: with JupyterHub's ``xheaders`` on, tornado takes it from
        ``X-Real-Ip`` or the first hop a client may write itself. The address is the last
        ``X-Forwarded-For`` entry, the one the proxy (Traefik) sets for the peer it saw, or
        the socket's peer when there is no proxy in between.
        """
        hops = [
            hop.strip()
            for header in self.request.headers.get_list("X-Forwarded-For")
            for hop in header.split(",")
            if hop.strip()
        ]
        if hops:
            ip = hops[-1]
        else:
            address = getattr(self.request.connection.context, "address", None)
            ip = str(address[0]) if isinstance(address, tuple) and address else ""
        agent = self.request.headers.get("User-Agent", "")[:512]
        return ip, agent


class MFALoginHandler(_Base, OAuthLoginHandler):  # type: ignore[misc]
    """``/hub/oauth_login``: redirect to the provider with PKCE, state and a nonce."""

    @refusals_on_disk
    async def get(self) -> None:
        client_ip, _ = self.client_context()
        self.authenticator.check_network(client_ip)
        await self.authenticator.provider()
        redirect_uri = self.authenticator.get_callback_url(self)
        params = dict(self.authenticator.extra_authorize_params)
        state_id = self._generate_state_id()
        nonce = secrets.token_urlsafe(32)
        code_verifier, code_challenge = self._generate_pkce_params()
        params.update(
            code_challenge=code_challenge,
            code_challenge_method="S256",
            nonce=nonce,
            state=_serialize_state({"state_id": state_id}),
        )
        self.set_state_cookie(
            _serialize_state(
                {
                    "state_id": state_id,
                    "next_url": self._get_next_url(),
                    "code_verifier": code_verifier,
                    "nonce": nonce,
                }
            )
        )
        self.authorize_redirect(
            redirect_uri=redirect_uri,
            client_id=self.authenticator.client_id,
            scope=self.authenticator.scope,
            extra_params=params,
            response_type="code",
        )


class MFACallbackHandler(_Base, OAuthCallbackHandler):  # type: ignore[misc]
    """``/hub/oauth_callback``: verify everything, then log in or ask for the step-up."""

    @refusals_on_disk
    async def get(self) -> None:
        authenticator = self.authenticator
        client_ip, user_agent = self.client_context()
        authenticator.check_network(client_ip)
        try:
            self.check_arguments()
        except web.HTTPError as exc:
            reason = (exc.log_message or "bad callback").lower().replace(" ", "-")
            authenticator.record("", "login.refused", reason=reason, client_ip=client_ip)
            raise LoginRefused(
                reason,
                "This sign-in could not be completed (the answer from the identity provider "
                "did not match the sign-in the hub started). Please sign in again.",
                status=400,
            ) from exc
        state = _deserialize_state(self.get_state_cookie())
        token = expected_nonce.set(state.get("nonce"))
        try:
            auth_model = await authenticator.get_authenticated_user(self, None)
        finally:
            expected_nonce.reset(token)
        if auth_model is None:
            authenticator.record("", "login.refused", reason="not-allowed", client_ip=client_ip)
            raise LoginRefused("not-allowed", "You are not allowed to use this hub.")
        name = auth_model["name"]
        previous = await _previous_context(self, name)
        verdict, why = authenticator.mfa_requirement(
            auth_model, client_ip=client_ip, user_agent=user_agent, previous=previous
        )
        if verdict == "satisfied":
            await finish_login(self, auth_model, method="provider", next_url=self.get_next_url())
            return
        pending_id = authenticator.remember_pending(
            PendingLogin(
                auth_model=auth_model,
                next_url=self.get_next_url(),
                client_ip=client_ip,
                user_agent=user_agent,
                why=why,
            )
        )
        authenticator.record(name, "login.mfa_required", why=why, client_ip=client_ip)
        self.set_secure_cookie(
            PENDING_COOKIE,
            pending_id,
            expires_days=authenticator.login_settings.pending_login_seconds / 86400,
            httponly=True,
            path=self.hub.base_url,
        )
        self.redirect(self.hub.base_url + "ztlab/mfa")


async def _previous_context(handler: Any, name: str) -> dict[str, Any] | None:
    user = handler.find_user(name)
    if user is None:
        return None
    state = await user.get_auth_state() or {}
    ztlab_state = state.get("ztlab")
    return ztlab_state if isinstance(ztlab_state, dict) else None


async def finish_login(
    handler: Any, auth_model: dict[str, Any], *, method: str, next_url: str
) -> None:
    """Both factors are proven: create the session and go where the user was going."""
    client_ip, user_agent = handler.client_context()
    handler.authenticator.stamp_session(
        auth_model, method=method, client_ip=client_ip, user_agent=user_agent
    )
    user = await handler.auth_to_user(auth_model)
    handler.set_login_cookie(user)
    handler.authenticator.record(
        user.name,
        "login.success",
        mfa=method,
        roles=auth_model["auth_state"]["ztlab"]["roles"],
        client_ip=client_ip,
    )
    await handler.plane.flush()  # the session exists once its record is on disk
    handler.redirect(next_url)


class StepUpHandler(_Base, BaseHandler):  # type: ignore[misc]
    """``/hub/ztlab/mfa``: TOTP enrollment (QR code shown once) or the TOTP code prompt."""

    def _pending(self) -> tuple[str, PendingLogin]:
        raw = self.get_secure_cookie(PENDING_COOKIE, max_age_days=1)
        pending_id = raw.decode() if raw else None
        pending = self.authenticator.pending(pending_id)
        if pending_id is None or pending is None:
            self.authenticator.record("", "login.refused", reason="no-pending-login")
            raise LoginRefused(
                "no-pending-login",
                "Your sign-in has expired or was not started. Please sign in again.",
                status=400,
            )
        client_ip, user_agent = self.client_context()
        if (client_ip, user_agent) != (pending.client_ip, pending.user_agent):
            self.authenticator.forget_pending(pending_id)
            self.authenticator.record(
                pending.auth_model["name"], "login.refused", reason="context-changed"
            )
            raise LoginRefused(
                "context-changed", "Your sign-in moved to another browser or address."
            )
        return pending_id, pending

    @refusals_on_disk
    async def get(self) -> None:
        _, pending = self._pending()
        await self._render(pending)

    @refusals_on_disk
    async def post(self) -> None:
        pending_id, pending = self._pending()
        name = pending.auth_model["name"]
        code = self.get_body_argument("code", "").strip()
        totp = self.plane.totp
        try:
            if self.get_body_argument("stage", "") == "enroll":
                totp.confirm_enrollment(name, code)
                method = "totp"
            else:
                method = totp.verify(name, code)
        except TotpError as exc:
            self.set_status(423 if exc.reason == "locked" else 403)
            await self._render(pending, error=exc.message)
            return
        except TotpStoreError as exc:
            self.authenticator.record(name, "login.refused", reason="totp-store")
            raise LoginRefused(
                "totp-store",
                "Your second factor cannot be checked. Ask an administrator to reset it.",
            ) from exc
        self.authenticator.forget_pending(pending_id)
        self.clear_cookie(PENDING_COOKIE, path=self.hub.base_url)
        await finish_login(self, pending.auth_model, method=method, next_url=pending.next_url)

    async def _render(self, pending: PendingLogin, error: str | None = None) -> None:
        name = pending.auth_model["name"]
        totp = self.plane.totp
        enrollment = None
        if not totp.is_enrolled(name) and error is None:
            enrollment = totp.begin_enrollment(name)
        html = await self.render_template(
            "ztlab-mfa.html",
            username=name,
            why=pending.why,
            enrollment=enrollment,
            enrolling=not totp.is_enrolled(name),
            error=error,
            xsrf=self.xsrf_token.decode("ascii"),
            action=self.hub.base_url + "ztlab/mfa",
        )
        self.finish(html)


class SignOutHandler(_Base, OAuthLogoutHandler):  # type: ignore[misc]
    """``/hub/logout``: JupyterHub's sign-out, which also ends every session of the user.

    The user's ``cookie_id`` is rotated: the hub's login cookies of every browser, and the
    enforcement point's session cookies (bound to it), stop working at once.
    """

    async def default_handle_logout(self) -> None:
        """JupyterHub's clean-up, then a new cookie id (recorded before the answer)."""
        user = self.current_user
        await super().default_handle_logout()
        if user is None:
            return
        user.orm_user.cookie_id = new_token()
        self.db.commit()
        self.plane.record(user.name, "session.signed_out")
        await self.plane.flush()
