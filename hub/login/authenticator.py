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
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from oauthenticator.generic import GenericOAuthenticator
from tornado import web
from traitlets import Bool, Dict, Float, Integer, List, Unicode, default

from ztlab.hub.login.idtoken import IdTokenError, IdTokenVerifier, tornado_fetch
from ztlab.hub.login.totp import TotpStore

if TYPE_CHECKING:
    from ztlab.hub.audit import AuditLog
    from ztlab.hub.datasets import DatasetRegistry
    from ztlab.hub.models.service import ModelService
    from ztlab.hub.policy import PolicyEngine
    from ztlab.hub.policy import Principal as PolicyPrincipal

#: the nonce the current login's callback expects (set by the callback handler)
expected_nonce: ContextVar[str | None] = ContextVar("ztlab_expected_nonce", default=None)

#: JupyterHub group that carries each policy role (RBAC roles are bound to these groups)
ROLE_GROUP_PREFIX = "ztlab-role-"

#: the fewest JupyterHub scopes each policy role needs; admins administer servers and
#: users but get no ``access:servers`` (they cannot open anybody's notebook)
RBAC_SCOPES: dict[str, list[str]] = {
    "admin": ["admin-ui", "list:users", "read:users", "admin:servers", "read:hub"],
    "data-steward": [],
    "trainer": [],
    "approver": [],
    "viewer": [],
}

#: scopes of JupyterHub's ``user`` role for everyone who logs in: their own server only
USER_SCOPES = [
    "read:users:name!user",
    "read:users:groups!user",
    "read:users:activity!user",
    "users:activity!user",
    "read:servers!user",
    "servers!user",
    "access:servers!user",
    "read:tokens!user",
    "tokens!user",
    # the control plane's dataset API (each action is still a policy decision)
    "custom:ztlab:data",
]


class LoginRefused(web.HTTPError):
    """A refused login: ``reason`` is the audit code, the message is what the user sees."""

    def __init__(self, reason: str, message: str, *, status: int = 403) -> None:
        super().__init__(status, f"login refused ({reason})")
        self.refusal = reason
        self.jupyterhub_message = message


@dataclass
class PendingLogin:
    """A login that passed the provider but still owes the hub a second factor."""

    auth_model: dict[str, Any]
    next_url: str
    client_ip: str
    user_agent: str
    why: str
    created: float = field(default_factory=time.monotonic)


class MFAOAuthenticator(GenericOAuthenticator):  # type: ignore[misc]
    """OpenID Connect login with verified ID tokens, enforced MFA and least-privilege roles.

    Configure it like any JupyterHub authenticator; ``ztlab hub`` sets every trait from
    ``ztlab.toml`` (``[login]``, ``[groups]``).
    """

    login_service = "your organisation's sign-in"

    issuer = Unicode(
        "",
        config=True,
        help="""The OpenID provider's issuer URL.

        The discovery document at ``{issuer}/.well-known/openid-configuration`` gives the
        authorize, token, userinfo and JWKS endpoints, and its ``issuer`` must equal this
        exactly. Example: ``c.MFAOAuthenticator.issuer = "https://idp.example.org/realms/lab"``.
        Added in 0.1.
        """,
    )

    accepted_amr = List(
        Unicode(),
        default_value=["mfa", "otp", "hwk"],
        config=True,
        help="""``amr`` values (RFC 8176) that prove a second factor at the provider.

        A login whose ID token shows none of these and no accepted ``acr`` must pass the
        hub's TOTP step-up. Example: ``c.MFAOAuthenticator.accepted_amr = ["mfa"]``.
        Added in 0.1.
        """,
    )

    accepted_acr = List(
        Unicode(),
        default_value=[],
        config=True,
        help="""``acr`` values that prove a second factor at the provider.

        Example: ``c.MFAOAuthenticator.accepted_acr = ["urn:ztlab:mfa"]``. Added in 0.1.
        """,
    )

    group_roles = Dict(
        key_trait=Unicode(),
        value_trait=List(Unicode()),
        default_value={},
        config=True,
        help="""Policy roles granted to each provider group (``[groups]`` in ztlab.toml).

        A user whose groups map to no role is refused. Example:
        ``c.MFAOAuthenticator.group_roles = {"ml-team": ["trainer"]}``. Added in 0.1.
        """,
    )

    groups_claim = Unicode(
        "groups",
        config=True,
        help="""Claim (userinfo or ID token) listing the user's provider groups.

        Example: ``c.MFAOAuthenticator.groups_claim = "roles"``. Added in 0.1.
        """,
    )

    allowed_networks = List(
        Unicode(),
        default_value=["127.0.0.0/8", "::1/128"],
        config=True,
        help="""Client networks allowed to log in; other addresses are refused.

        Example: ``c.MFAOAuthenticator.allowed_networks = ["10.20.0.0/16"]``. Added in 0.1.
        """,
    )

    step_up_on_new_context = Bool(
        True,
        config=True,
        help="""Ask for the hub's TOTP code when the address or browser changed since the
        user's last login, even when the provider proved MFA (risk-based step-up).

        Example: ``c.MFAOAuthenticator.step_up_on_new_context = False``. Added in 0.1.
        """,
    )

    session_max_age_seconds = Integer(
        8 * 3600,
        config=True,
        help="""Longest a session lasts after login; older sessions must log in again.

        Example: ``c.MFAOAuthenticator.session_max_age_seconds = 3600``. Added in 0.1.
        """,
    )

    session_idle_seconds = Integer(
        3600,
        config=True,
        help="""A session unused this long must log in again.

        Example: ``c.MFAOAuthenticator.session_idle_seconds = 900``. Added in 0.1.
        """,
    )

    id_token_leeway_seconds = Float(
        30.0,
        config=True,
        help="""Clock skew tolerated when checking ``exp``, ``iat`` and ``nbf``.

        Example: ``c.MFAOAuthenticator.id_token_leeway_seconds = 10``. Added in 0.1.
        """,
    )

    audit_log = Unicode(
        "",
        config=True,
        help="""The control plane's audit log (records file); every login step is recorded.

        Example: ``c.MFAOAuthenticator.audit_log = "/var/lib/ztlab/audit/audit.jsonl"``.
        Added in 0.1.
        """,
    )

    audit_signing_key = Unicode(
        "",
        config=True,
        help="""The audit log's Ed25519 signing key. Added in 0.1.""",
    )

    audit_origin = Unicode(
        "ztlab.local/audit",
        config=True,
        help="""The audit log's checkpoint origin. Added in 0.1.""",
    )

    dataset_registry = Unicode(
        "",
        config=True,
        help="""SQLite file of registered dataset versions (mode 0600).

        Example:
        ``c.MFAOAuthenticator.dataset_registry = "/var/lib/ztlab/datasets/registry.sqlite"``.
        Added in 0.2.
        """,
    )

    attestation_key = Unicode(
        "",
        config=True,
        help="""ECDSA P-256 key that signs dataset manifests (created on first use).

        Example: ``c.MFAOAuthenticator.attestation_key = "/var/lib/ztlab/keys/attest-p256.key"``.
        Added in 0.2.
        """,
    )

    models_store = Unicode(
        "",
        config=True,
        help="""Directory of MLflow's database and artifacts, signatures and approvals.

        Example: ``c.MFAOAuthenticator.models_store = "/var/lib/ztlab/mlflow"``. Added in 0.2.
        """,
    )

    mlflow_url = Unicode(
        "",
        config=True,
        help="""The MLflow server the hub forwards to (127.0.0.1 only).

        Example: ``c.MFAOAuthenticator.mlflow_url = "http://127.0.0.1:5001"``. Added in 0.2.
        """,
    )

    artifacts_destination = Unicode(
        "",
        config=True,
        help="""Object storage holding MLflow's artifacts (``s3://BUCKET/PREFIX``), or empty.

        Empty: the artifacts are under ``models_store``. Otherwise the signing service reads
        them straight from there with the hub's own credentials.
        Example: ``c.MFAOAuthenticator.artifacts_destination = "s3://ml/ztlab"``. Added in 0.2.
        """,
    )

    sign_on_register = Bool(
        True,
        config=True,
        help="""Sign each model version when it is registered through the hub's MLflow API.

        The registering user must be the run's trainer; a refusal (lineage, policy) leaves
        the version unsigned and is audited as ``model.sign.refused``.
        Example: ``c.MFAOAuthenticator.sign_on_register = False``. Added in 0.2.
        """,
    )

    protected_aliases = List(
        Unicode(),
        ["production"],
        config=True,
        help="""Registered-model aliases only the approval service may move.

        Example: ``c.MFAOAuthenticator.protected_aliases = ["production"]``. Added in 0.2.
        """,
    )

    dataset_storage_roots = List(
        Unicode(),
        config=True,
        help="""Directories datasets may be registered from.

        Example: ``c.MFAOAuthenticator.dataset_storage_roots = ["/srv/datasets"]``. Added in 0.2.
        """,
    )

    audit_checkpoint_interval = Float(
        2.0, config=True, help="""Seconds between signed audit checkpoints. Added in 0.1."""
    )

    totp_db = Unicode(
        "",
        config=True,
        help="""SQLite database of TOTP enrollments (mode 0600). Added in 0.1.""",
    )

    totp_key = Unicode(
        "",
        config=True,
        help="""Key that encrypts TOTP secrets at rest (mode 0600). Added in 0.1.""",
    )

    totp_max_failures = Integer(
        5, config=True, help="""Wrong TOTP codes in a row before a lockout. Added in 0.1."""
    )

    totp_lockout_seconds = Integer(
        900, config=True, help="""How long a TOTP lockout lasts. Added in 0.1."""
    )

    policy_directory = Unicode(
        "",
        config=True,
        help="""Directory of Cedar policies for the hub's decisions (empty: shipped defaults).

        Example: ``c.MFAOAuthenticator.policy_directory = "/etc/ztlab/policies"``.
        Added in 0.1.
        """,
    )

    pending_login_seconds = Integer(
        300,
        config=True,
        help="""How long a login may wait on its TOTP step-up before it starts over.

        Added in 0.1.
        """,
    )

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
        return _role_groups

    @default("scope")
    def _scope_default(self) -> list[str]:
        return ["openid", "profile", "email", "groups", "offline_access"]

    @default("username_claim")
    def _username_claim_default(self) -> str:
        return "preferred_username"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._verifier: IdTokenVerifier | None = None
        self._audit_log: AuditLog | None = None
        self._totp: TotpStore | None = None
        self._policy: PolicyEngine | None = None
        self._registry: DatasetRegistry | None = None
        self._models: ModelService | None = None
        self._pending: dict[str, PendingLogin] = {}
        self._networks = [ipaddress.ip_network(n, strict=False) for n in self.allowed_networks]

    # -- control-plane resources --------------------------------------------------------

    @property
    def audit(self) -> AuditLog:
        """The audit log, opened on first use (the hub process is its only writer)."""
        if self._audit_log is None:
            from ztlab.hub.audit import AuditLog

            if not self.audit_log:
                raise RuntimeError("MFAOAuthenticator.audit_log is not configured")
            self._audit_log = AuditLog.open(
                self.audit_log,
                key_path=self.audit_signing_key or None,
                origin=self.audit_origin,
                checkpoint_interval=self.audit_checkpoint_interval,
            )
        return self._audit_log

    @property
    def totp(self) -> TotpStore:
        """The TOTP store, opened on first use."""
        if self._totp is None:
            if not self.totp_db or not self.totp_key:
                raise RuntimeError("MFAOAuthenticator.totp_db and totp_key must be configured")
            self._totp = TotpStore.open(
                Path(self.totp_db),
                key_path=Path(self.totp_key),
                audit=self.audit,
                max_failures=self.totp_max_failures,
                lockout_seconds=self.totp_lockout_seconds,
            )
        return self._totp

    @property
    def policy_engine(self) -> PolicyEngine:
        """The policy decision point, auditing to the hub's audit log."""
        if self._policy is None:
            from ztlab.hub.policy import PolicyEngine

            self._policy = (
                PolicyEngine.from_directory(self.policy_directory, audit=self.audit)
                if self.policy_directory
                else PolicyEngine.defaults(audit=self.audit)
            )
        return self._policy

    @property
    def dataset_registry_store(self) -> DatasetRegistry:
        """The dataset registry, opened on first use (signing key created if missing)."""
        if self._registry is None:
            from ztlab.hub.attest import load_or_create_attestation_key
            from ztlab.hub.datasets import DatasetRegistry

            if not self.dataset_registry or not self.attestation_key:
                raise RuntimeError(
                    "MFAOAuthenticator.dataset_registry and attestation_key must be configured"
                )
            self._registry = DatasetRegistry(
                path=Path(self.dataset_registry),
                key=load_or_create_attestation_key(Path(self.attestation_key)),
                policy=self.policy_engine,
                audit=self.audit,
                storage_roots=[Path(p) for p in self.dataset_storage_roots],
            )
        return self._registry

    @property
    def model_service(self) -> ModelService:
        """Model signing and approvals, opened on first use."""
        if self._models is None:
            from ztlab.hub.attest import load_or_create_attestation_key
            from ztlab.hub.models.mlflow import MlflowREST, proxy_key
            from ztlab.hub.models.service import ModelService

            if not self.models_store or not self.mlflow_url:
                raise RuntimeError("MFAOAuthenticator.models_store and mlflow_url must be set")
            self._models = ModelService(
                store=Path(self.models_store),
                mlflow=MlflowREST(self.mlflow_url, key=proxy_key(Path(self.models_store))),
                key=load_or_create_attestation_key(Path(self.attestation_key)),
                policy=self.policy_engine,
                audit=self.audit,
                datasets=self.dataset_registry_store,
                protected_aliases=list(self.protected_aliases),
                artifacts_destination=self.artifacts_destination or None,
            )
        return self._models

    def record(self, actor: str, action: str, **detail: Any) -> None:
        """Queue one audit record (never blocks on disk)."""
        self.audit.record(actor=actor or "anonymous", action=action, detail=detail)

    async def provider(self) -> IdTokenVerifier:
        """The provider's verifier, from its discovery document (fetched once)."""
        if self._verifier is None:
            fetch = tornado_fetch(validate_cert=self.validate_server_cert)
            self._verifier = await IdTokenVerifier.from_discovery(
                self.issuer,
                client_id=self.client_id,
                fetch=fetch,
                leeway_seconds=self.id_token_leeway_seconds,
            )
            metadata = self._verifier.metadata
            self.authorize_url = metadata["authorization_endpoint"]
            self.token_url = metadata["token_endpoint"]
            self.userdata_url = metadata["userinfo_endpoint"]
        return self._verifier

    # -- context checks -----------------------------------------------------------------

    def check_network(self, client_ip: str) -> None:
        """Refuse clients outside ``allowed_networks``."""
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
        return sorted({role for group in groups for role in self.group_roles.get(group, [])})

    async def update_auth_model(self, auth_model: dict[str, Any]) -> dict[str, Any]:
        """Map provider groups to roles; keep the login's context in the auth state."""
        auth_state = auth_model["auth_state"]
        user_info = auth_state.get(self.user_auth_state_key) or {}
        groups = user_info.get(self.groups_claim) or []
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
        provider_mfa = bool(amr & set(self.accepted_amr)) or (
            state["acr"] is not None and state["acr"] in self.accepted_acr
        )
        if not provider_mfa:
            return "step-up", "the identity provider did not prove a second factor"
        if self.step_up_on_new_context and previous:
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
        deadline = time.monotonic() - self.pending_login_seconds
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
        if not isinstance(started, int | float) or now - started > self.session_max_age_seconds:
            self.record(user.name, "session.expired", reason="max-age")
            return False
        last_activity = getattr(user, "last_activity", None)
        if isinstance(last_activity, datetime):
            idle = now - last_activity.replace(tzinfo=last_activity.tzinfo or UTC).timestamp()
            if idle > self.session_idle_seconds:
                self.record(user.name, "session.expired", reason="idle", idle_seconds=int(idle))
                return False
        try:
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

    def get_handlers(self, app: Any) -> list[tuple[str, Any]]:
        """Our login, callback and MFA step-up handlers."""
        from ztlab.hub.api import api_handlers
        from ztlab.hub.login.handlers import MFACallbackHandler, MFALoginHandler, StepUpHandler

        return [
            (r"/oauth_login", MFALoginHandler),
            (r"/oauth_callback", MFACallbackHandler),
            (r"/ztlab/mfa", StepUpHandler),
            # the control plane's API lives in the hub process, next to the audit writer
            *api_handlers(),
        ]


def granted_roles(auth_state: Mapping[str, Any]) -> frozenset[str]:
    """The policy roles the identity provider granted at the last login or refresh."""
    return frozenset((auth_state.get("ztlab") or {}).get("roles") or [])


async def user_principal(user: Any) -> PolicyPrincipal:
    """A hub user (anything with ``name`` and ``get_auth_state``) as a policy principal."""
    from ztlab.hub.policy import Principal

    return Principal(name=user.name, roles=granted_roles(await user.get_auth_state() or {}))


def _role_groups(auth_state: Mapping[str, Any]) -> list[str]:
    roles = (auth_state.get("ztlab") or {}).get("roles") or []
    return [ROLE_GROUP_PREFIX + role for role in roles]


def rbac_roles(role_names: list[str]) -> list[dict[str, Any]]:
    """JupyterHub ``load_roles``: the ``user`` role limited to one's own server, and one
    role per policy role bound to its group."""
    roles: list[dict[str, Any]] = [
        {"name": "user", "description": "Everyone who signed in", "scopes": USER_SCOPES}
    ]
    for name in role_names:
        scopes = RBAC_SCOPES.get(name, [])
        if scopes:
            roles.append(
                {
                    "name": f"ztlab-{name}",
                    "description": f"zerotrust-lab role {name}",
                    "scopes": scopes,
                    "groups": [ROLE_GROUP_PREFIX + name],
                }
            )
    return roles


def utc_now() -> str:
    """Now, as an ISO timestamp (for templates)."""
    return datetime.now(UTC).isoformat(timespec="seconds")
