"""A development OpenID provider on 127.0.0.1, its launcher, and a scripted login client.

The provider (``server.mjs``) runs ``oidc-provider`` on Node with a real login form, PKCE,
``amr``/``acr`` per user, a ``groups`` claim and refresh tokens; :class:`DevIdP` writes its
state and starts it; :func:`idp_login` logs in through it without a browser. For
development and tests only: passwords are kept in a plain JSON file.
"""

from ztlab.dev.idp.flow import LoginFlowError, LoginRejectedError, idp_login
from ztlab.dev.idp.launcher import (
    NPM_INSTALL_COMMAND,
    DevIdP,
    DevIdPError,
    DevIdPNotInstalledError,
    OIDCClient,
    demo_users,
    generate_signing_jwk,
    public_jwks,
    run_forever,
)

__all__ = [
    "NPM_INSTALL_COMMAND",
    "DevIdP",
    "DevIdPError",
    "DevIdPNotInstalledError",
    "LoginFlowError",
    "LoginRejectedError",
    "OIDCClient",
    "demo_users",
    "generate_signing_jwk",
    "idp_login",
    "public_jwks",
    "run_forever",
]
