"""``MFAOAuthenticator``: OpenID Connect login that verifies everything and enforces MFA.

Built on OAuthenticator's ``GenericOAuthenticator``; JupyterHub's fixed outer method
(``get_authenticated_user``) stays as it is and we override named stages only:

1. **verify token** -- :meth:`get_token_info`: every token response from the provider is
   checked here; its ID token is verified (signature against the provider's JWKS, ``iss``,
   ``aud``/``azp``, ``exp``/``iat``, ``nonce``) before anything else reads it.
2. **identify** -- :meth:`token_to_user`: userinfo from the provider, whose ``sub`` must be
   the ID token's.
3. **map roles** -- :meth:`update_auth_model`: provider groups become policy roles
   (``[groups]`` in ``ztlab.toml``) and JupyterHub groups bound to least-privilege RBAC
   roles.
4. **decide** -- :meth:`check_allowed`: no mapped role, no access.
5. **check MFA** -- :meth:`mfa_requirement`, asked by the callback handler: the provider's
   ``amr``/``acr`` prove a second factor, or the hub's TOTP step-up must pass before any
   session cookie is set.

Sessions are short and re-checked: :meth:`refresh_user` ends sessions past their maximum or
idle age and re-asks the provider (a disabled account or a removed group ends access).
Every step is audited.
"""

from __future__ import annotations

import ipaddress
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from oauthenticator.generic import GenericOAuthenticator
from traitlets import default

from ztlab.common.config.model import LoginConfig
from ztlab.hub.controlplane import ControlPlane, control_plane
from ztlab.hub.identity import role_groups
from ztlab.hub.login.idtoken import IdTokenError, IdTokenVerifier, tornado_fetch
from ztlab.hub.login.state import LoginRefused, PendingLogin, expected_nonce


class MFAOAuthenticator(GenericOAuthenticator):  # type: ignore[misc]
    """OpenID Connect login with verified ID tokens, enforced MFA and least-privilege roles.

    Registered as the JupyterHub authenticator ``ztlab-mfa``. It has no settings of its own:
    ``[login]`` and ``[groups]`` of ``ztlab.toml`` reach it through the control plane
    (:attr:`plane`), and ``ztlab hub`` sets OAuthenticator's traits (client id and secret,
    scopes, callback URL) from the same file. It keeps only login: the audit log and the
    TOTP store it uses are the control plane's.
    """

    login_service = "your organisation's sign-in"

    @default("enable_pkce")
    def _enable_pkce_default(self) -> bool:
        return True

    @default("enable_auth_state")
    def _enable_auth_state_default(self) -> bool:
        return True

    @default("manage_groups")
    def _manage_groups_default(self) -> bool:
        return True

    @default("refresh_pre_spawn")
    def _refresh_pre_spawn_default(self) -> bool:
        return True

    @default("auth_state_groups_key")
    def _auth_state_groups_key_default(self) -> Any:
        return role_groups

    @default("scope")
    def _scope_default(self) -> list[str]:
        return ["openid", "profile", "email", "groups", "offline_access"]

    @default("username_claim")
    def _username_claim_default(self) -> str:
        return "preferred_username"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._verifier: IdTokenVerifier | None = None
        self._pending: dict[str, PendingLogin] = {}
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None

    # -- the control plane and its settings -----------------------------------------------

    @property
    def plane(self) -> ControlPlane:
        """The hub's control plane (from the hub's tornado settings)."""
        return control_plane(self.parent.tornado_settings)

    @property
    def login_settings(self) -> LoginConfig:
        """``[login]`` of ztlab.toml."""
        return self.plane.config.login

    def record(self, actor: str, action: str, **detail: Any) -> None:
        """Queue one audit record in the control plane's log (never blocks on disk)."""
        self.plane.record(actor or "anonymous", action, **detail)

    async def provider(self) -> IdTokenVerifier:
        """The provider's verifier, from its discovery document (fetched once)."""
        if self._verifier is None:
            fetch = tornado_fetch(validate_cert=self.validate_server_cert)
            self._verifier = await IdTokenVerifier.from_discovery(
                self.login_settings.issuer,
                client_id=self.client_id,
                fetch=fetch,
                leeway_seconds=self.login_settings.id_token_leeway_seconds,
            )
            metadata = self._verifier.metadata
            self.authorize_url = metadata["authorization_endpoint"]
            self.token_url = metadata["token_endpoint"]
            self.userdata_url = metadata["userinfo_endpoint"]
        return self._verifier

    # -- context checks -----------------------------------------------------------------

    def check_network(self, client_ip: str) -> None:
        """Refuse clients outside ``allowed_networks``."""
        if self._networks is None:
            self._networks = [
                ipaddress.ip_network(n, strict=False) for n in self.login_settings.allowed_networks
            ]
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            address = None
        if address is None or not any(address in network for network in self._networks):
            self.record("", "login.refused", reason="network", client_ip=client_ip)
            raise LoginRefused(
                "network",
                f"Sign-in is not allowed from your network address ({client_ip}).",
            )

    # -- stage 1: verify every token response --------------------------------------------

    async def get_token_info(self, handler: Any, params: Mapping[str, Any]) -> dict[str, Any]:
        """Exchange a code or refresh token, then verify the ID token it returned."""
        verifier = await self.provider()
        token_info: dict[str, Any] = await super().get_token_info(handler, params)
        id_token = token_info.get("id_token")
        if not isinstance(id_token, str):
            self.record("", "login.refused", reason="no-id-token")
            raise LoginRefused("no-id-token", "The identity provider returned no ID token.")
        refreshing = params.get("grant_type") == "refresh_token"
        nonce = None if refreshing else expected_nonce.get()
        if not refreshing and nonce is None:
            self.record("", "login.refused", reason="nonce-missing")
            raise LoginRefused("nonce-missing", "This sign-in was not started by the hub.")
        try:
            claims = await verifier.verify(id_token, nonce=nonce)
        except IdTokenError as exc:
            self.record("", "login.refused", reason=f"id-token-{exc.reason}", error=exc.message)
            raise LoginRefused(
                f"id-token-{exc.reason}",
                "The identity provider's answer could not be verified, so you were not "
                f"signed in ({exc.reason}).",
            ) from exc
        token_info["ztlab_claims"] = claims
        return token_info

    # -- stage 2: who is it ----------------------------------------------------------------

    async def token_to_user(self, token_info: dict[str, Any]) -> dict[str, Any]:
        """Userinfo from the provider; its ``sub`` must be the verified ID token's."""
        claims = token_info.get("ztlab_claims")
        if not isinstance(claims, dict):
            raise LoginRefused("unverified", "The sign-in was not verified.")
        user_info: dict[str, Any] = await super().token_to_user(token_info)
        if user_info.get("sub") != claims.get("sub"):
            self.record("", "login.refused", reason="sub-mismatch")
            raise LoginRefused("sub-mismatch", "The identity provider's answers disagree.")
        return {**claims, **user_info, "ztlab_claims": claims}

    # -- stage 3: roles ----------------------------------------------------------------------

    def roles_for(self, groups: list[str]) -> list[str]:
        """Policy roles for a list of provider groups (sorted, without duplicates)."""
        mapping = self.plane.config.groups
        return sorted({role for group in groups for role in mapping.get(group, [])})

    async def update_auth_model(self, auth_model: dict[str, Any]) -> dict[str, Any]:
        """Map provider groups to roles; keep the login's context in the auth state."""
        auth_state = auth_model["auth_state"]
        user_info = auth_state.get(self.user_auth_state_key) or {}
        groups = user_info.get(self.login_settings.groups_claim) or []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            groups = []
        claims = user_info.get("ztlab_claims", {})
        auth_state["ztlab"] = {
            "groups": groups,
            "roles": self.roles_for(groups),
            "amr": list(claims.get("amr") or []),
            "acr": claims.get("acr"),
        }
        auth_model["admin"] = False
        return auth_model

    # -- stage 4: decide -------------------------------------------------------------------

    async def check_allowed(self, username: str, auth_model: dict[str, Any] | None) -> bool:
        """Allowed exactly when the user's provider groups map to at least one role."""
        if auth_model is None:
            return False
        roles = auth_model["auth_state"]["ztlab"]["roles"]
        if not roles:
            groups = auth_model["auth_state"]["ztlab"]["groups"]
            self.record(username, "login.refused", reason="no-role", groups=groups)
            raise LoginRefused(
                "no-role",
                "You are signed in at your identity provider, but none of your groups "
                "gives you a role here. Ask an administrator for access.",
            )
        return True

    # -- stage 5: MFA ----------------------------------------------------------------------

    def mfa_requirement(
        self,
        auth_model: dict[str, Any],
        *,
        client_ip: str,
        user_agent: str,
        previous: Mapping[str, Any] | None,
    ) -> tuple[Literal["satisfied", "step-up"], str]:
        """Whether the provider proved a second factor, or the hub must ask for TOTP."""
        state = auth_model["auth_state"]["ztlab"]
        amr = set(state["amr"])
        login = self.login_settings
        provider_mfa = bool(amr & set(login.accepted_amr)) or (
            state["acr"] is not None and state["acr"] in login.accepted_acr
        )
        if not provider_mfa:
            return "step-up", "the identity provider did not prove a second factor"
        if login.step_up_on_new_context and previous:
            if previous.get("client_ip") != client_ip:
                return "step-up", "new network address since the last sign-in"
            if previous.get("user_agent") != user_agent:
                return "step-up", "new browser since the last sign-in"
        return "satisfied", "provider"

    def remember_pending(self, pending: PendingLogin) -> str:
        """Keep a login that owes a TOTP step-up; return its random id."""
        self._expire_pending()
        pending_id = secrets.token_urlsafe(32)
        self._pending[pending_id] = pending
        return pending_id

    def pending(self, pending_id: str | None) -> PendingLogin | None:
        """The pending login with this id, if it has not expired."""
        self._expire_pending()
        return self._pending.get(pending_id) if pending_id else None

    def forget_pending(self, pending_id: str) -> None:
        """Drop a pending login (finished or abandoned)."""
        self._pending.pop(pending_id, None)

    def _expire_pending(self) -> None:
        deadline = time.monotonic() - self.login_settings.pending_login_seconds
        for key in [k for k, p in self._pending.items() if p.created < deadline]:
            del self._pending[key]

    def stamp_session(
        self, auth_model: dict[str, Any], *, method: str, client_ip: str, user_agent: str
    ) -> None:
        """Record when and from where this session was established."""
        auth_model["auth_state"]["ztlab"].update(
            authenticated_at=time.time(),
            mfa=method,
            client_ip=client_ip,
            user_agent=user_agent,
        )

    # -- sessions --------------------------------------------------------------------------

    async def refresh_user(self, user: Any, handler: Any = None, **kwargs: Any) -> Any:
        """End sessions past their maximum or idle age; re-check the user at the provider."""
        auth_state = await user.get_auth_state() or {}
        ztlab_state = auth_state.get("ztlab") or {}
        started = ztlab_state.get("authenticated_at")
        now = time.time()
        login = self.login_settings
        if not isinstance(started, int | float) or now - started > login.session_max_age_seconds:
            self.record(user.name, "session.expired", reason="max-age")
            return False
        last_activity = getattr(user, "last_activity", None)
        if isinstance(last_activity, datetime):
            idle = now - last_activity.replace(tzinfo=last_activity.tzinfo or UTC).timestamp()
            if idle > login.session_idle_seconds:
                self.record(user.name, "session.expired", reason="idle", idle_seconds=int(idle))
                return False
        try:
            # after a hub restart a refresh can come before any login: discover first
            await self.provider()
            refreshed = await super().refresh_user(user, handler, **kwargs)
        except LoginRefused as exc:
            self.record(user.name, "session.refresh_refused", reason=exc.refusal)
            return False
        if refreshed is False or refreshed is True:
            if refreshed is False:
                self.record(user.name, "session.refresh_refused", reason="provider")
            return refreshed
        new_state = refreshed["auth_state"]["ztlab"]
        if not new_state["roles"]:
            self.record(user.name, "session.refresh_refused", reason="no-role")
            return False
        # keep the original login's context (time, factor, address) across refreshes
        for key in ("authenticated_at", "mfa", "client_ip", "user_agent", "amr", "acr"):
            if key in ztlab_state:
                new_state[key] = ztlab_state[key]
        if new_state["roles"] != ztlab_state.get("roles"):
            self.record(
                user.name,
                "session.roles_changed",
                old=ztlab_state.get("roles"),
                new=new_state["roles"],
            )
        return refreshed

    async def vouch(self, user: Any) -> frozenset[str]:
        """The user's roles as the provider says now, for work done for them while they are
        away (a scheduled run): no session-age rule, the provider is asked with the tokens
        of their last login. Raises :class:`UsageError` saying why it will not vouch (a
        disabled account, an expired refresh token, no role left); a change of roles is
        saved and recorded (``session.roles_changed``)."""
        from ztlab.common.errors import UsageError
        from ztlab.hub.identity import granted_roles

        auth_state = await user.get_auth_state() or {}
        ztlab_state = auth_state.get("ztlab") or {}
        try:
            await self.provider()
            refreshed = await super().refresh_user(user, None)
        except LoginRefused as exc:
            self.record(user.name, "session.refresh_refused", reason=exc.refusal)
            raise UsageError(
                f"the identity provider no longer vouches for {user.name}: {exc.jupyterhub_message}"
            ) from exc
        if refreshed is False:
            self.record(user.name, "session.refresh_refused", reason="provider")
            raise UsageError(
                f"the identity provider no longer vouches for {user.name} (the account is "
                "disabled, or its sign-in expired)",
                hint=f"{user.name} signs in to the hub again",
            )
        if refreshed is True:
            return granted_roles(auth_state)
        new_state = refreshed["auth_state"]["ztlab"]
        for key in ("authenticated_at", "mfa", "client_ip", "user_agent", "amr", "acr"):
            if key in ztlab_state:
                new_state[key] = ztlab_state[key]
        if new_state["roles"] != ztlab_state.get("roles"):
            self.record(
                user.name, "session.roles_changed", old=ztlab_state.get("roles"),
                new=new_state["roles"],
            )  # fmt: skip
        await user.save_auth_state(refreshed["auth_state"])
        if not new_state["roles"]:
            raise UsageError(f"{user.name} holds no role at the identity provider any more")
        return granted_roles(refreshed["auth_state"])

    def get_handlers(self, app: Any) -> list[tuple[str, Any]]:
        """Our login, callback, sign-out and MFA step-up handlers."""
        from ztlab.hub.login.handlers import (
            MFACallbackHandler,
            MFALoginHandler,
            SignOutHandler,
            StepUpHandler,
        )

        return [
            (r"/oauth_login", MFALoginHandler),
            (r"/oauth_callback", MFACallbackHandler),
            (r"/logout", SignOutHandler),
            (r"/ztlab/mfa", StepUpHandler),
        ]


def utc_now() -> str:
    """Now, as an ISO timestamp (for templates)."""
    return datetime.now(UTC).isoformat(timespec="seconds")
