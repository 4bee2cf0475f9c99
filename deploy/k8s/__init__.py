"""Kubernetes: the roles, quotas and GPU pools of ``ztlab.toml`` for Zero to JupyterHub.

:func:`render_values` gives the z2jh Helm values (a profile per role and GPU pool, the
filter that offers each user only their roles' profiles, non-root and capability-free
servers); :func:`render_network_policies` the NetworkPolicies that fence user servers
in; :func:`write_files` writes both, as ``ztlab k8s render`` does. See
:mod:`ztlab.deploy.k8s.render` for what is rendered and what the cluster must provide.
"""

from ztlab.deploy.k8s.render import (
    EXTRA_CONFIG_KEY,
    NETWORK_POLICIES_FILE,
    VALUES_FILE,
    EgressRule,
    K8sOptions,
    Peer,
    Profile,
    RenderedFiles,
    dump_yaml,
    dump_yaml_documents,
    parse_egress_rule,
    parse_peer,
    profile_filter_snippet,
    profile_list,
    profiles,
    render_network_policies,
    render_values,
    write_files,
)

__all__ = [
    "EXTRA_CONFIG_KEY",
    "NETWORK_POLICIES_FILE",
    "VALUES_FILE",
    "EgressRule",
    "K8sOptions",
    "Peer",
    "Profile",
    "RenderedFiles",
    "dump_yaml",
    "dump_yaml_documents",
    "parse_egress_rule",
    "parse_peer",
    "profile_filter_snippet",
    "profile_list",
    "profiles",
    "render_network_policies",
    "render_values",
    "write_files",
]
