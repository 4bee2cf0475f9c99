"""Render ``ztlab.toml`` for Zero to JupyterHub (z2jh) and KubeSpawner.

The roles, quotas and GPU pools that govern one shared GPU server also govern a
Kubernetes cluster. Everything here is pure data: a validated :class:`ZtlabConfig` and
a :class:`K8sOptions` in, plain dicts out, YAML text on request. Nothing talks to a
cluster and KubeSpawner is not imported.

What is rendered
================

**Helm values** (:func:`render_values`) for the z2jh chart:

* ``singleuser.profileList``: one profile per role (every role may start a server),
  with the role's quota as KubeSpawner settings in ``kubespawner_override``; a role with
  ``max_gpus > 0`` also gets one profile per GPU pool it may use, which asks for
  ``nvidia.com/gpu`` and is pinned to the pool's nodes (see :func:`profile_list`).
  Every profile runs as a non-root user without privilege escalation, with all Linux
  capabilities dropped, the runtime's default seccomp profile, no Kubernetes API token,
  and a hard run time (``activeDeadlineSeconds``) of the role's ``max_server_hours``.
* ``hub.extraConfig``: a short Python snippet (:func:`profile_filter_snippet`) that
  turns the profile list into a callable offering each user only the profiles of the
  roles they hold (JupyterHub groups ``ztlab-role-NAME``). KubeSpawner validates the
  requested profile against the same filtered list, so it holds for API requests too.
* ``hub.config.KubeSpawner``: the same security settings as defaults, so a server
  started without a profile is no weaker.
* ``singleuser.networkPolicy.enabled: false``: the chart's own policy is replaced by
  :func:`render_network_policies` (NetworkPolicies add up, and the chart's would widen
  ours: egress to the proxy and, by default, to the internet).
* ``singleuser.cloudMetadata.blockWithIptables: false``: the chart would add a
  privileged init container to block the cloud metadata server; the egress policy
  already blocks it, and privileged containers are what we keep out.
* ``cull.maxAge``: the longest ``max_server_hours`` of any role, as a backstop.

**NetworkPolicies** (:func:`render_network_policies`) for the user servers
(``component: singleuser-server``): deny everything, then allow ingress to the notebook
port from the hub and proxy pods only, and egress to the hub API (8081), to DNS (53)
and to the control-plane services given in :attr:`K8sOptions.control_plane`. No other
pod, another user's server included, can reach a server or be reached from it.

Cluster prerequisites
=====================

* A CNI that enforces NetworkPolicy (Calico, Cilium, ...); otherwise the policies are
  accepted and ignored.
* GPU nodes labelled with their pool (``ztlab.io/gpu-pool=NAME``, see
  :attr:`K8sOptions.pool_label`) and tainted ``nvidia.com/gpu:NoSchedule`` so that only
  GPU profiles land there; the NVIDIA device plugin advertises ``nvidia.com/gpu``.
* ``networkpolicies.yaml`` applied in the release's namespace together with the chart.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import yaml

from ztlab.common.config import RoleConfig, ZtlabConfig, format_size
from ztlab.common.errors import ConfigError, UsageError
from ztlab.hub.identity import ROLE_GROUP_PREFIX

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

#: file names written by :func:`write_files`
VALUES_FILE: Final = "values.yaml"
NETWORK_POLICIES_FILE: Final = "networkpolicies.yaml"

#: key of the profile filter under ``hub.extraConfig``; z2jh runs the snippets in key
#: order, and ``zz-`` makes ours run after any other that sets ``profile_list``
EXTRA_CONFIG_KEY: Final = "zz-ztlab-profile-filter.py"

#: z2jh's pod labels (``jupyterhub.matchLabels``) and KubeSpawner's component label
_APP_LABEL: Final = "jupyterhub"
_SINGLEUSER_COMPONENT: Final = "singleuser-server"
#: the name KubeSpawner gives the notebook container's port
_NOTEBOOK_PORT: Final = "notebook-port"

#: tolerations z2jh gives user pods (``scheduling.userPods.tolerations``); a profile's
#: ``tolerations`` replaces the list, so GPU profiles repeat them
_Z2JH_USER_TOLERATIONS: Final = (
    {
        "key": "hub.jupyter.org/dedicated",
        "operator": "Equal",
        "value": "user",
        "effect": "NoSchedule",
    },
    {
        "key": "hub.jupyter.org_dedicated",
        "operator": "Equal",
        "value": "user",
        "effect": "NoSchedule",
    },
)

_DNS_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_LABEL_NAME_RE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z")
_DNS_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_RESOURCE_NAME_RE = re.compile(
    r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?\Z"
)

_Protocol = Literal["TCP", "UDP", "SCTP"]
_PROTOCOLS: Final[dict[str, _Protocol]] = {"TCP": "TCP", "UDP": "UDP", "SCTP": "SCTP"}


# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------


def _check_label_key(key: str, what: str) -> None:
    prefix, _, name = key.rpartition("/")
    if (
        not _LABEL_NAME_RE.match(name)
        or (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.match(prefix)))
        or (not prefix and "/" in key)
    ):
        raise UsageError(
            f"{what}: {json.dumps(key)} is not a Kubernetes label key; expected "
            '[PREFIX/]NAME such as "app" or "app.kubernetes.io/name"'
        )


def _check_label_value(value: str, what: str) -> None:
    if value and not _LABEL_NAME_RE.match(value):
        raise UsageError(
            f"{what}: {json.dumps(value)} is not a Kubernetes label value; expected up to "
            '63 letters, digits, "-", "_" and ".", starting and ending with a letter or digit'
        )


def _check_namespace(namespace: str, what: str) -> None:
    if not _DNS_LABEL_RE.match(namespace):
        raise UsageError(
            f"{what}: {json.dumps(namespace)} is not a Kubernetes namespace; expected up to "
            '63 lower-case letters, digits and "-", starting and ending with a letter or digit'
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Peer:
    """One side of a network rule: pods chosen by labels, or a block of IP addresses.

    ``Peer(pod_labels={"app": "mlflow"})`` is the pods so labelled in the policy's own
    namespace; add ``namespace="ztlab-system"`` for another namespace (empty
    ``pod_labels``: every pod there); ``Peer(cidr="10.0.5.0/24")`` is an IP block.
    """

    pod_labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    namespace: str | None = None
    cidr: str | None = None

    def __post_init__(self) -> None:
        if self.cidr is not None:
            if self.pod_labels or self.namespace is not None:
                raise UsageError("a network peer is either pods (labels, namespace) or a CIDR")
            try:
                network = ipaddress.ip_network(self.cidr, strict=True)
            except ValueError:
                raise UsageError(
                    f"{json.dumps(self.cidr)} is not a network; "
                    'expected a CIDR such as "10.0.5.0/24"'
                ) from None
            object.__setattr__(self, "cidr", str(network))
            return
        if not self.pod_labels and self.namespace is None:
            raise UsageError(
                "a network peer needs pod labels, a namespace or a CIDR (an empty selector "
                "would allow every pod)"
            )
        for key, value in self.pod_labels.items():
            _check_label_key(key, "pod label")
            _check_label_value(value, f"pod label {key}")
        if self.namespace is not None:
            _check_namespace(self.namespace, "namespace")
        object.__setattr__(self, "pod_labels", dict(self.pod_labels))

    def to_k8s(self) -> dict[str, Any]:
        """The peer as a NetworkPolicy ``from``/``to`` entry."""
        if self.cidr is not None:
            return {"ipBlock": {"cidr": self.cidr}}
        peer: dict[str, Any] = {}
        if self.namespace is not None:
            peer["namespaceSelector"] = {
                "matchLabels": {"kubernetes.io/metadata.name": self.namespace}
            }
        peer["podSelector"] = {"matchLabels": dict(self.pod_labels)} if self.pod_labels else {}
        return peer

    def __str__(self) -> str:
        if self.cidr is not None:
            return self.cidr
        labels = ",".join(f"{k}={v}" for k, v in self.pod_labels.items())
        return f"{labels}@{self.namespace}" if self.namespace is not None else labels


@dataclass(frozen=True, slots=True, kw_only=True)
class EgressRule:
    """Egress the user servers are allowed: to ``peer`` on ``port``/``protocol``."""

    peer: Peer
    port: int
    protocol: _Protocol = "TCP"

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not 1 <= self.port <= 65535:
            raise UsageError(f"port {self.port} is out of range; expected 1 to 65535")
        if self.protocol not in _PROTOCOLS:
            raise UsageError(f"protocol {self.protocol!r}: expected TCP, UDP or SCTP")

    def to_k8s(self) -> dict[str, Any]:
        """The rule as a NetworkPolicy ``egress`` entry."""
        return {
            "to": [self.peer.to_k8s()],
            "ports": [{"port": self.port, "protocol": self.protocol}],
        }


_PEER_HELP = (
    'expected LABEL=VALUE[,LABEL=VALUE][@NAMESPACE] (e.g. "app=mlflow@ztlab-system"), '
    '@NAMESPACE (every pod there) or a CIDR (e.g. "10.0.5.0/24")'
)


def parse_peer(text: str) -> Peer:
    """A :class:`Peer` from its command-line spelling.

    ``app=mlflow`` (pods in the policy's namespace), ``app=mlflow@ztlab-system`` (pods
    in another namespace), ``@ztlab-system`` (every pod there) or ``10.0.5.0/24``.
    """
    spec = text.strip()
    if not spec:
        raise UsageError(f"empty network peer; {_PEER_HELP}")
    if "=" not in spec and "@" not in spec:
        try:
            return Peer(cidr=spec)
        except UsageError as exc:
            raise UsageError(f"{json.dumps(text)}: {exc.message}; {_PEER_HELP}") from None
    selector, at, namespace = spec.partition("@")
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in selector.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(
                f"{json.dumps(text)}: {json.dumps(item)} is not LABEL=VALUE; {_PEER_HELP}"
            )
        if key in labels:
            raise UsageError(f"{json.dumps(text)}: label {json.dumps(key)} is given twice")
        labels[key] = value
    try:
        return Peer(pod_labels=labels, namespace=namespace if at else None)
    except UsageError as exc:
        raise UsageError(f"{json.dumps(text)}: {exc.message}") from None


def parse_egress_rule(text: str) -> EgressRule:
    """An :class:`EgressRule` from ``PEER:PORT[/PROTOCOL]`` (PEER as in :func:`parse_peer`).

    ``app=mlflow@ztlab-system:5000``, ``10.0.5.10/32:443``, ``@ztlab-system:8786/tcp``.
    """
    peer_text, colon, port_text = text.strip().rpartition(":")
    port_text, slash, protocol = port_text.partition("/")
    if not colon or not port_text.isdigit():
        raise UsageError(
            f"{json.dumps(text)} is not PEER:PORT[/PROTOCOL]; e.g. "
            '"app=mlflow@ztlab-system:5000" or "10.0.5.10/32:443"'
        )
    proto = _PROTOCOLS.get(protocol.upper() if slash else "TCP")
    if proto is None:
        raise UsageError(
            f"{json.dumps(text)}: protocol {json.dumps(protocol)}: expected tcp, udp or sctp"
        )
    peer = parse_peer(peer_text)
    try:
        return EgressRule(peer=peer, port=int(port_text), protocol=proto)
    except UsageError as exc:
        raise UsageError(f"{json.dumps(text)}: {exc.message}") from None


def _default_dns() -> tuple[Peer, ...]:
    return (Peer(pod_labels={"k8s-app": "kube-dns"}, namespace="kube-system"),)


@dataclass(frozen=True, slots=True, kw_only=True)
class K8sOptions:
    """How to render: what the cluster looks like and what the config cannot say.

    Frozen; derive a variant with :func:`dataclasses.replace`. Every field has a default
    that suits a z2jh release in its own namespace.
    """

    #: namespace of the release, written into the NetworkPolicies; ``None``: the one
    #: ``kubectl apply -n`` chooses
    namespace: str | None = None
    #: Helm release name; when set, the policies also match z2jh's ``release`` label
    release: str | None = None
    #: user id the servers run as; never 0
    uid: int = 1000
    #: group that owns mounted volumes (``fsGroup``); never 0
    fs_gid: int = 100
    #: requests as a fraction of the limits, in (0, 1]; 1 gives the Guaranteed QoS
    #: class (no overcommit: one user's load cannot starve another's)
    guarantee: float = 1.0
    #: extended resource that counts GPUs
    gpu_resource: str = "nvidia.com/gpu"
    #: node label that names the GPU pool of a node
    pool_label: str = "ztlab.io/gpu-pool"
    #: port of the hub API the servers call
    hub_port: int = 8081
    #: where the cluster DNS runs (port 53, UDP and TCP)
    dns: tuple[Peer, ...] = field(default_factory=_default_dns)
    #: control-plane services the servers may call (MLflow, Dask Gateway, a package mirror)
    control_plane: tuple[EgressRule, ...] = ()

    def __post_init__(self) -> None:
        if self.namespace is not None:
            _check_namespace(self.namespace, "namespace")
        if self.release is not None:
            _check_label_value(self.release, "release")
            if not self.release:
                raise UsageError("release: expected a Helm release name, got an empty string")
        for name in ("uid", "fs_gid"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UsageError(
                    f"{name}: expected an integer > 0 (servers never run as root), got {value!r}"
                )
        if not (isinstance(self.guarantee, int | float) and 0 < self.guarantee <= 1):
            raise UsageError(f"guarantee: expected a fraction in (0, 1], got {self.guarantee!r}")
        if not _RESOURCE_NAME_RE.match(self.gpu_resource):
            raise UsageError(
                f"gpu_resource: {json.dumps(self.gpu_resource)} is not an extended resource "
                'name such as "nvidia.com/gpu"'
            )
        _check_label_key(self.pool_label, "pool_label")
        if isinstance(self.hub_port, bool) or not 1 <= self.hub_port <= 65535:
            raise UsageError(f"hub_port: {self.hub_port} is out of range; expected 1 to 65535")
        if not self.dns:
            raise UsageError("dns: expected at least one peer (servers need name resolution)")
        object.__setattr__(self, "dns", tuple(self.dns))
        object.__setattr__(self, "control_plane", tuple(self.control_plane))


# --------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Profile:
    """One entry of ``singleuser.profileList``: a role, maybe on a GPU pool."""

    slug: str
    role: str
    #: the GPU pool, or ``None`` for the role's CPU-only profile
    pool: str | None
    gpus: int
    display_name: str
    description: str
    kubespawner_override: dict[str, Any]

    def to_kubespawner(self) -> dict[str, Any]:
        """The profile as KubeSpawner (and z2jh's ``profileList``) reads it."""
        return {
            "display_name": self.display_name,
            "description": self.description,
            "slug": self.slug,
            "kubespawner_override": self.kubespawner_override,
        }


def _memory(size: int) -> str | int:
    """A size as KubeSpawner's ``mem_limit`` reads it: ``"32G"``, or bytes."""
    text = format_size(size)
    return text if text[-1] in "KMGT" else size


def _cpus(value: float) -> float:
    return round(value, 3)


def _container_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        # Jupyter writes to its home, /tmp and pip's caches; a read-only root file
        # system would need volumes for each. The other settings keep it contained.
        "readOnlyRootFilesystem": False,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security_context() -> dict[str, Any]:
    return {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def _security_settings(options: K8sOptions) -> dict[str, Any]:
    """KubeSpawner settings every server gets, whatever its role."""
    return {
        "uid": options.uid,
        "fs_gid": options.fs_gid,
        "privileged": False,
        "allow_privilege_escalation": False,
        "automount_service_account_token": False,
        "container_security_context": _container_security_context(),
        "pod_security_context": _pod_security_context(),
    }


def _plural(n: int | float, one: str, many: str) -> str:
    return f"{n:g} {one if n == 1 else many}"


def _hours(hours: float) -> str:
    return _plural(hours, "hour", "hours")


def _override(
    role_name: str,
    role: RoleConfig,
    options: K8sOptions,
    *,
    pool: str | None = None,
    gpus: int = 0,
) -> dict[str, Any]:
    """KubeSpawner settings of one profile: the role's quota, on ``pool`` if given."""
    settings: dict[str, Any] = {
        "cpu_limit": _cpus(role.cpus),
        "cpu_guarantee": _cpus(role.cpus * options.guarantee),
        "mem_limit": _memory(role.memory),
        "mem_guarantee": _memory(max(1, math.floor(role.memory * options.guarantee))),
        **_security_settings(options),
        # the pod is stopped (DeadlineExceeded) this long after it started
        "extra_pod_config": {
            "activeDeadlineSeconds": max(1, math.ceil(role.max_server_hours * 3600))
        },
    }
    labels = {"ztlab.io/role": role_name}
    if pool is None:
        # An image built on nvidia/cuda sets NVIDIA_VISIBLE_DEVICES=all; on a node whose
        # default runtime is NVIDIA's, that would expose every GPU of the node.
        settings["environment"] = {"NVIDIA_VISIBLE_DEVICES": "void"}
    else:
        labels[options.pool_label] = pool
        settings["extra_resource_limits"] = {options.gpu_resource: str(gpus)}
        settings["node_selector"] = {options.pool_label: pool}
        settings["tolerations"] = [
            {"key": options.gpu_resource, "operator": "Exists", "effect": "NoSchedule"},
            *(dict(t) for t in _Z2JH_USER_TOLERATIONS),
        ]
    settings["extra_labels"] = labels
    return settings


def profiles(config: ZtlabConfig, options: K8sOptions | None = None) -> list[Profile]:
    """Every profile, roles in configuration order, each role's pools after its CPU one.

    Each role gets a CPU-only profile (slug: the role name). A role with ``max_gpus > 0``
    also gets one profile per pool that lists it (slug ``ROLE-gpu-POOL``) with
    ``min(max_gpus, GPUs in the pool)`` GPUs, a node selector for the pool and a
    toleration for the GPU taint. Raises :class:`ConfigError` if two slugs collide.
    """
    options = options or K8sOptions()
    out: list[Profile] = []
    for role_name, role in config.roles.items():
        size = f"{_plural(role.cpus, 'CPU', 'CPUs')}, {format_size(role.memory)} memory"
        stops = f"Stopped after {_hours(role.max_server_hours)}."
        out.append(
            Profile(
                slug=role_name,
                role=role_name,
                pool=None,
                gpus=0,
                display_name=f"{role_name}: {size}, no GPU",
                description=" ".join(filter(None, [role.description, stops])),
                kubespawner_override=_override(role_name, role, options),
            )
        )
        if role.max_gpus <= 0:
            continue
        for pool_name, pool in config.gpu.pools.items():
            if role_name not in pool.roles or not pool.gpus:
                continue
            gpus = min(role.max_gpus, len(pool.gpus))
            out.append(
                Profile(
                    slug=f"{role_name}-gpu-{pool_name}",
                    role=role_name,
                    pool=pool_name,
                    gpus=gpus,
                    display_name=(
                        f"{role_name}: {size}, {_plural(gpus, 'GPU', 'GPUs')} from pool {pool_name}"
                    ),
                    description=" ".join(filter(None, [pool.description, role.description, stops])),
                    kubespawner_override=_override(
                        role_name, role, options, pool=pool_name, gpus=gpus
                    ),
                )
            )
    seen: dict[str, Profile] = {}
    for profile in out:
        if profile.slug in seen:
            first = seen[profile.slug]
            raise ConfigError(
                f'profile "{profile.slug}" would be both role {first.role}'
                f"{f' on pool {first.pool}' if first.pool else ''} and role {profile.role}"
                f"{f' on pool {profile.pool}' if profile.pool else ''}",
                hint="rename the role or the pool",
            )
        seen[profile.slug] = profile
    return out


def profile_list(config: ZtlabConfig, options: K8sOptions | None = None) -> list[dict[str, Any]]:
    """``singleuser.profileList``: :func:`profiles` as KubeSpawner reads them."""
    return [p.to_kubespawner() for p in profiles(config, options)]


# --------------------------------------------------------------------------------------
# The profile filter (hub.extraConfig)
# --------------------------------------------------------------------------------------

_SNIPPET_TEMPLATE: Final = """\
# ztlab: offer each user only the profiles of the roles they hold.
#
# Rendered by `ztlab k8s render` from ztlab.toml: re-render rather than edit.
# singleuser.profileList (c.KubeSpawner.profile_list) has one profile per role, and one
# per GPU pool for a role that may use GPUs. This replaces the list with a callable
# (KubeSpawner >= 7 accepts one) returning the profiles of the roles named by the user's
# JupyterHub groups "{prefix}ROLE". KubeSpawner checks a requested profile against
# the same filtered list, so no other profile can be asked for through the API either.
# A user who holds no role gets no server; a profile not listed below is offered to
# nobody; a profile listed below but missing from profileList stops the hub at start.


def _ztlab_install_profile_filter(c):
    import copy

    from tornado import web

    prefix = {prefix}
    role_of = {role_of}
    profiles = c.KubeSpawner.profile_list
    if not isinstance(profiles, list) or not profiles:
        raise ValueError("ztlab: singleuser.profileList is empty; render it with ztlab k8s render")
    profiles = [dict(p) for p in profiles]
    missing = sorted(set(role_of) - {{p.get("slug") for p in profiles}})
    if missing:
        raise ValueError(f"ztlab: profiles missing from singleuser.profileList: {{missing}}")

    def ztlab_profile_list(spawner):
        held = set()
        for group in spawner.user.groups:
            name = getattr(group, "name", group)
            if isinstance(name, str) and name.startswith(prefix):
                held.add(name[len(prefix) :])
        offered = [p for p in profiles if role_of.get(p.get("slug")) in held]
        if not offered:
            raise web.HTTPError(403, "user %s holds no ztlab role", spawner.user.name)
        return copy.deepcopy(offered)

    c.KubeSpawner.profile_list = ztlab_profile_list


_ztlab_install_profile_filter(c)
del _ztlab_install_profile_filter
"""


def profile_filter_snippet(roles_by_slug: Mapping[str, str]) -> str:
    """The ``hub.extraConfig`` snippet restricting profiles to the roles a user holds.

    ``roles_by_slug`` maps each profile slug to the role that may use it (see
    :func:`profiles`). The snippet runs in z2jh's ``jupyterhub_config.py``, where ``c``
    is the configuration; it needs nothing but ``tornado``, which JupyterHub brings.
    """
    # JSON strings are Python string literals; slugs and roles are plain names anyway
    entries = "".join(
        f"        {json.dumps(slug)}: {json.dumps(role)},\n" for slug, role in roles_by_slug.items()
    )
    role_of = "{\n" + entries + "    }"
    return _SNIPPET_TEMPLATE.format(prefix=json.dumps(ROLE_GROUP_PREFIX), role_of=role_of)


# --------------------------------------------------------------------------------------
# Helm values
# --------------------------------------------------------------------------------------


def render_values(config: ZtlabConfig, options: K8sOptions | None = None) -> dict[str, Any]:
    """z2jh Helm values for ``config``: profiles, their filter, security defaults.

    Merge the result with the release's own values (image, ingress, login); keys set
    here are the ones ztlab governs.
    """
    options = options or K8sOptions()
    rendered = profiles(config, options)
    longest = max(math.ceil(role.max_server_hours * 3600) for role in config.roles.values())
    return {
        "hub": {
            "config": {"KubeSpawner": _security_settings(options)},
            "extraConfig": {
                EXTRA_CONFIG_KEY: profile_filter_snippet({p.slug: p.role for p in rendered}),
            },
        },
        "singleuser": {
            "uid": options.uid,
            "fsGid": options.fs_gid,
            "allowPrivilegeEscalation": False,
            "cloudMetadata": {"blockWithIptables": False},
            "networkPolicy": {"enabled": False},
            "profileList": [p.to_kubespawner() for p in rendered],
        },
        "cull": {"enabled": True, "maxAge": longest},
    }


# --------------------------------------------------------------------------------------
# NetworkPolicies
# --------------------------------------------------------------------------------------


def _component_labels(component: str, options: K8sOptions) -> dict[str, str]:
    labels = {"app": _APP_LABEL, "component": component}
    if options.release is not None:
        labels["release"] = options.release
    return labels


def _policy(name: str, spec: dict[str, Any], options: K8sOptions) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if options.namespace is not None:
        metadata["namespace"] = options.namespace
    metadata["labels"] = {
        "app.kubernetes.io/managed-by": "ztlab",
        "app.kubernetes.io/part-of": "ztlab",
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
        "spec": spec,
    }


def render_network_policies(options: K8sOptions | None = None) -> list[dict[str, Any]]:
    """NetworkPolicies that fence the user servers in; three manifests.

    1. ``ztlab-singleuser-default-deny``: no traffic in or out of a user server unless
       another policy allows it; this is what keeps users' servers apart.
    2. ``ztlab-singleuser-ingress``: to the notebook port, from the hub and proxy pods.
    3. ``ztlab-singleuser-egress``: to the hub API, to DNS and to the control plane.
    """
    options = options or K8sOptions()
    servers = {"matchLabels": _component_labels(_SINGLEUSER_COMPONENT, options)}
    hub = {"podSelector": {"matchLabels": _component_labels("hub", options)}}
    proxy = {"podSelector": {"matchLabels": _component_labels("proxy", options)}}
    egress: list[dict[str, Any]] = [
        {"to": [hub], "ports": [{"port": options.hub_port, "protocol": "TCP"}]},
        {
            "to": [peer.to_k8s() for peer in options.dns],
            "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
        },
        *(rule.to_k8s() for rule in options.control_plane),
    ]
    return [
        _policy(
            "ztlab-singleuser-default-deny",
            {"podSelector": servers, "policyTypes": ["Ingress", "Egress"]},
            options,
        ),
        _policy(
            "ztlab-singleuser-ingress",
            {
                "podSelector": servers,
                "policyTypes": ["Ingress"],
                "ingress": [
                    {"from": [hub, proxy], "ports": [{"port": _NOTEBOOK_PORT, "protocol": "TCP"}]}
                ],
            },
            options,
        ),
        _policy(
            "ztlab-singleuser-egress",
            {"podSelector": servers, "policyTypes": ["Egress"], "egress": egress},
            options,
        ),
    ]


# --------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Safe YAML with block style, keys in insertion order and multi-line strings as ``|``."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _header(lines: Iterable[str]) -> str:
    return "".join(f"# {line}".rstrip() + "\n" for line in lines)


def dump_yaml(document: Any, *, header: Sequence[str] = ()) -> str:
    """One YAML document, ``header`` lines as comments above it."""
    body = yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    return _header(header) + body


def dump_yaml_documents(documents: Iterable[Any], *, header: Sequence[str] = ()) -> str:
    """Several YAML documents, each starting with ``---``."""
    body = yaml.dump_all(
        documents,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        explicit_start=True,
        width=100,
    )
    return _header(header) + body


@dataclass(frozen=True, slots=True)
class RenderedFiles:
    """What :func:`write_files` wrote."""

    values: Path
    network_policies: Path
    profiles: int
    policies: int


def write_files(
    config: ZtlabConfig,
    out_dir: Path,
    options: K8sOptions | None = None,
    *,
    source: str = "ztlab.toml",
) -> RenderedFiles:
    """Write ``values.yaml`` and ``networkpolicies.yaml`` into ``out_dir`` (created).

    Raises :class:`UsageError` when the directory or a file cannot be written.
    """
    options = options or K8sOptions()
    values = render_values(config, options)
    policies = render_network_policies(options)
    stamp = f"Rendered by `ztlab k8s render` from {source}; re-render rather than edit."
    values_text = dump_yaml(
        values,
        header=[
            "Zero to JupyterHub values: ztlab roles, quotas and GPU pools.",
            stamp,
            "Use with the release's own values: helm upgrade --install ... -f values.yaml.",
            f"Apply {NETWORK_POLICIES_FILE} too: singleuser.networkPolicy is off because",
            "those policies replace the chart's.",
        ],
    )
    policies_text = dump_yaml_documents(
        policies,
        header=[
            "NetworkPolicies for the user servers of a ztlab Zero to JupyterHub release.",
            stamp,
            "kubectl apply -n NAMESPACE -f networkpolicies.yaml",
        ],
    )
    values_path = out_dir / VALUES_FILE
    policies_path = out_dir / NETWORK_POLICIES_FILE
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        values_path.write_text(values_text, encoding="utf-8")
        policies_path.write_text(policies_text, encoding="utf-8")
    except OSError as exc:
        where = exc.filename or out_dir
        raise UsageError(f"{where}: cannot write: {exc.strerror or exc}") from exc
    return RenderedFiles(
        values=values_path,
        network_policies=policies_path,
        profiles=len(values["singleuser"]["profileList"]),
        policies=len(policies),
    )
