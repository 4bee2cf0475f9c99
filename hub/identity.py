"""Who a hub user is to the control plane: policy roles, JupyterHub groups and scopes.

The identity provider's groups become policy roles at login (``[groups]`` in ztlab.toml,
kept in the user's auth state); each role is carried by a JupyterHub group bound to the
fewest JupyterHub scopes it needs. Everything that asks the policy engine about a hub user
(spawners, the API, the pages) turns the user into a :class:`~ztlab.hub.policy.Principal`
here, so the roles the policy sees are exactly the ones the provider granted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ztlab.hub.policy import Principal

#: the JupyterHub custom scope a token needs for the control plane's API
DATA_SCOPE = "custom:ztlab:data"

#: JupyterHub group that carries each policy role (RBAC roles are bound to these groups)
ROLE_GROUP_PREFIX = "ztlab-role-"

#: the fewest JupyterHub scopes each policy role needs; admins administer servers and
#: users and read the hub's metrics (egress among them) but get no ``access:servers``
#: (they cannot open anybody's notebook)
RBAC_SCOPES: dict[str, list[str]] = {
    "admin": ["admin-ui", "list:users", "read:users", "admin:servers", "read:hub", "read:metrics"],
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
    # the control plane's API (each action is still a policy decision)
    DATA_SCOPE,
]

#: what a server's token (inherited by its kernels) may do: the control plane's API
SERVER_TOKEN_SCOPES = ["users:activity!user", "access:servers!server", DATA_SCOPE]
#: what a notebook run's token may do: the control plane's API, nothing of JupyterHub's
RUN_TOKEN_SCOPES = [DATA_SCOPE]
#: the note of a run's token is this, then the run's id
RUN_TOKEN_NOTE = "ztlab-run:"  # noqa: S105 - a note, not a secret


def granted_roles(auth_state: Mapping[str, Any]) -> frozenset[str]:
    """The policy roles the identity provider granted at the last login or refresh."""
    return frozenset((auth_state.get("ztlab") or {}).get("roles") or [])


async def user_principal(user: Any) -> Principal:
    """A hub user (anything with ``name`` and ``get_auth_state``) as a policy principal."""
    return Principal(name=user.name, roles=granted_roles(await user.get_auth_state() or {}))


def role_groups(auth_state: Mapping[str, Any]) -> list[str]:
    """The JupyterHub groups of a user's policy roles (``ztlab-role-NAME``)."""
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
