"""Render ``ztlab.toml``'s GPU pools for Dask Gateway on Kubernetes, with their quotas.

Users on a Kubernetes deployment (``ztlab k8s render``) get Dask clusters from a Dask
Gateway (the ``dask-gateway`` Helm chart) in the same GPU pools, under the same limits as
on one machine. Everything here is pure data: a validated :class:`ZtlabConfig` and a
:class:`GatewayOptions` in, a dict and Python source out. Nothing talks to a cluster.

What is rendered
================

**The gateway configuration** (:func:`render_gateway_config`), Python that
dask-gateway-server runs with ``c`` its configuration:

* ``c.Backend.cluster_options``: a function of the user offering ``pool`` (the pools
  their roles may use), ``workers`` (the most workers the cluster may scale to, its
  ``cluster_max_workers``) and ``gpus`` (GPUs per worker). Its handler maps the pool to
  worker cores and memory (``worker_cpus``, ``worker_memory``) and, for GPU workers, to
  the ``nvidia.com/gpu`` request and limit, a node selector and tolerations (per pool:
  ``--node-selector`` / ``--toleration``, else the GPU nodes of the pool,
  ``nvidia.com/gpu.present=true`` and ``ztlab.io/gpu-pool=POOL``, with the
  ``nvidia.com/gpu:NoSchedule`` taint tolerated). Workers without a GPU, and schedulers,
  get ``NVIDIA_VISIBLE_DEVICES=void``. The chart's own ``gateway.backend.*`` pod and
  container settings are extended, not replaced.
* ``c.DaskGateway.backend_class``: the backend with ztlab's quota check
  (:mod:`ztlab.deploy.gateway_quota`, whose source is embedded: the gateway image needs
  nothing but dask-gateway-server). It refuses a cluster past the pool's per-user
  ``max_clusters``, ``max_workers`` or ``max_cluster_gpus``, or past the largest
  ``max_gpus`` of the roles the user's groups grant (JupyterHub groups
  ``ztlab-role-ROLE``, as ztlab's hub sets them, or the ``[groups]`` of ``ztlab.toml``),
  and stops clusters older than their pool's ``cluster_hours``.

**Helm values** (:func:`render_gateway_values`) for the ``dask-gateway`` chart: JupyterHub
authentication, one gateway replica (the quota check counts in one process), the worker
image, and the configuration above as ``gateway.extraConfig``.

What the quota check cannot see
===============================

It counts clusters of this gateway only: GPUs a user holds through a JupyterHub server
(a z2jh GPU profile), another gateway, or pods started by other means do not count
against the roles' ``max_gpus`` here. It counts a cluster's caps (``workers`` and
``workers * gpus``), not the workers running. It knows the groups the authenticator
reports: a JupyterHub token that may not read the user's groups gets no pool.
``allow_sharing`` and ``certificate_minutes`` have no counterpart (a gateway cluster has
its own TLS credentials and belongs to one user).
"""

from __future__ import annotations

import importlib.resources
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from ztlab.common.config import ZtlabConfig
from ztlab.common.errors import UsageError
from ztlab.deploy.k8s.render import _check_label_key, _check_label_value, dump_yaml
from ztlab.hub.identity import ROLE_GROUP_PREFIX

__all__ = [
    "BACKENDS",
    "DEFAULT_SERVICE_NAME",
    "GATEWAY_CONFIG_FILE",
    "GATEWAY_EXTRA_CONFIG_KEY",
    "GATEWAY_VALUES_FILE",
    "IMAGE_PLACEHOLDER",
    "GatewayOptions",
    "RenderedGateway",
    "Toleration",
    "gateway_values_text",
    "parse_image",
    "parse_node_selector",
    "parse_toleration",
    "python_literal",
    "quota_policy",
    "quota_source",
    "render_gateway_config",
    "render_gateway_values",
    "write_gateway_files",
]

#: file names written by :func:`write_gateway_files`
GATEWAY_VALUES_FILE: Final = "gateway-values.yaml"
GATEWAY_CONFIG_FILE: Final = "dask_gateway_config.py"

#: key of the configuration under ``gateway.extraConfig``; the chart runs the snippets
#: in key order, after its own settings, and ``zz-`` makes ours run after the others
GATEWAY_EXTRA_CONFIG_KEY: Final = "zz-ztlab-gateway.py"

#: the name JupyterHub knows the gateway by (``hub.services.NAME`` in z2jh); tokens need
#: ``access:services!service=NAME``
DEFAULT_SERVICE_NAME: Final = "dask-gateway"

#: stands for the schedulers' and workers' image until ``--image`` names one
IMAGE_PLACEHOLDER: Final = ("registry.invalid/replace-me/dask-gateway-cuda", "replace-me")

#: the backends the configuration can wrap: name -> (module, class)
BACKENDS: Final[Mapping[str, tuple[str, str]]] = {
    "kubernetes": ("dask_gateway_server.backends.kubernetes", "KubeBackend"),
    "local": ("dask_gateway_server.backends.local", "LocalBackend"),
    "unsafe-local": ("dask_gateway_server.backends.local", "UnsafeLocalBackend"),
}
Backend = Literal["kubernetes", "local", "unsafe-local"]

#: ``KubeClusterConfig`` settings the handler extends (the chart sets them from
#: ``gateway.backend.*``)
_EXTENDED_SETTINGS: Final = (
    "worker_extra_container_config",
    "worker_extra_pod_config",
    "worker_extra_pod_labels",
    "scheduler_extra_container_config",
)

#: the label the GPU feature discovery of NVIDIA's GPU operator puts on GPU nodes
_GPU_PRESENT_LABEL: Final = ("nvidia.com/gpu.present", "true")

_EFFECTS: Final = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_RESOURCE_NAME_RE = re.compile(
    r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?\Z"
)
_IMAGE_RE = re.compile(r"[a-z0-9]([-a-z0-9._/:]*[a-z0-9])?(@sha256:[0-9a-f]{64})?\Z")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")


# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Toleration:
    """A pod toleration: of taint ``key`` (``=value``, else any value) with ``effect``
    (``None``: every effect)."""

    key: str
    value: str | None = None
    effect: str | None = None

    def __post_init__(self) -> None:
        _check_label_key(self.key, "toleration")
        if self.value is not None:
            _check_label_value(self.value, f"toleration {self.key}")
        if self.effect is not None and self.effect not in _EFFECTS:
            raise UsageError(
                f"toleration {self.key}: effect {json.dumps(self.effect)} is not one of "
                f"{', '.join(_EFFECTS)}"
            )

    def to_k8s(self) -> dict[str, str]:
        """The toleration as a pod spec has it."""
        out = {"key": self.key}
        if self.value is None:
            out["operator"] = "Exists"
        else:
            out.update(operator="Equal", value=self.value)
        if self.effect is not None:
            out["effect"] = self.effect
        return out


def _pool_and_rest(text: str, what: str, expected: str) -> tuple[str, str]:
    pool, eq, rest = text.strip().partition("=")
    if not eq or not pool or not rest:
        raise UsageError(f"{what} {json.dumps(text)} is not {expected}")
    return pool, rest


def parse_node_selector(text: str) -> tuple[str, str, str]:
    """``POOL=KEY=VALUE`` -> ``(pool, key, value)``: pool's GPU workers need that label."""
    expected = 'POOL=KEY=VALUE, e.g. "research=cloud.google.com/gke-accelerator=nvidia-l4"'
    pool, rest = _pool_and_rest(text, "node selector", expected)
    key, eq, value = rest.partition("=")
    if not eq or not key:
        raise UsageError(f"node selector {json.dumps(text)} is not {expected}")
    _check_label_key(key, f"node selector of pool {pool}")
    _check_label_value(value, f"node selector {key} of pool {pool}")
    return pool, key, value


def parse_toleration(text: str) -> tuple[str, Toleration]:
    """``POOL=KEY[=VALUE][:EFFECT]`` -> ``(pool, toleration)``."""
    expected = 'POOL=KEY[=VALUE][:EFFECT], e.g. "research=nvidia.com/gpu:NoSchedule"'
    pool, rest = _pool_and_rest(text, "toleration", expected)
    taint, colon, effect = rest.rpartition(":") if ":" in rest else (rest, "", "")
    key, eq, value = taint.partition("=")
    if not key or (colon and not effect):
        raise UsageError(f"toleration {json.dumps(text)} is not {expected}")
    try:
        toleration = Toleration(
            key=key, value=value if eq else None, effect=effect if colon else None
        )
    except UsageError as exc:
        raise UsageError(f"toleration {json.dumps(text)}: {exc.message}") from None
    return pool, toleration


def parse_image(text: str) -> tuple[str, str]:
    """``NAME[:TAG]`` or ``NAME@sha256:DIGEST`` -> ``(name, tag)`` as the chart takes them."""
    spec = text.strip()
    name, colon, tag = spec.rpartition(":")
    if not colon or "/" in tag or "@" in spec:
        name, tag = spec, ""
    if not _IMAGE_RE.match(name) or (tag and not _TAG_RE.match(tag)):
        raise UsageError(
            f"image {json.dumps(text)} is not NAME[:TAG], e.g. "
            '"ghcr.io/example/dask-gateway-cuda:2026.3.0"'
        )
    return name, tag


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayOptions:
    """How to render what ``ztlab.toml`` cannot say. Frozen; every field has a default."""

    #: the backend the quota check wraps; the Helm values are for ``kubernetes`` only
    backend: Backend = "kubernetes"
    #: the schedulers' and workers' image, ``NAME[:TAG]``; ``None``: a placeholder
    image: str | None = None
    #: JupyterHub's API URL (``http://hub:8081/hub/api``); ``None``: the chart infers it
    #: from the ``hub`` service in the same namespace
    hub_api_url: str | None = None
    #: the gateway's JupyterHub service name; tokens then need
    #: ``access:services!service=NAME``. ``None``: any token of a hub user is accepted
    service_name: str | None = DEFAULT_SERVICE_NAME
    #: extended resource that counts GPUs
    gpu_resource: str = "nvidia.com/gpu"
    #: node label that names the GPU pool of a node (as ``ztlab k8s render`` has it)
    pool_label: str = "ztlab.io/gpu-pool"
    #: pool -> node labels its GPU workers need; replaces the pool's default selector
    node_selectors: Mapping[str, Mapping[str, str]] = field(default_factory=dict, hash=False)
    #: pool -> tolerations of its GPU workers; replaces the default GPU toleration
    tolerations: Mapping[str, Sequence[Toleration]] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise UsageError(
                f"backend {json.dumps(self.backend)}: expected one of {', '.join(BACKENDS)}"
            )
        if self.image is not None:
            parse_image(self.image)
        if self.hub_api_url is not None:
            parts = urlsplit(self.hub_api_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UsageError(
                    f"hub API URL {json.dumps(self.hub_api_url)}: expected an http:// or "
                    'https:// URL such as "http://hub:8081/hub/api"'
                )
        if self.service_name is not None and not re.fullmatch(
            r"[A-Za-z0-9][A-Za-z0-9._-]*", self.service_name
        ):
            raise UsageError(
                f"service name {json.dumps(self.service_name)}: expected letters, digits, "
                '".", "_" and "-"'
            )
        if not _RESOURCE_NAME_RE.match(self.gpu_resource):
            raise UsageError(
                f"gpu_resource: {json.dumps(self.gpu_resource)} is not an extended resource "
                'name such as "nvidia.com/gpu"'
            )
        _check_label_key(self.pool_label, "pool_label")
        for pool, labels in self.node_selectors.items():
            for key, value in labels.items():
                _check_label_key(key, f"node selector of pool {pool}")
                _check_label_value(value, f"node selector {key} of pool {pool}")
        object.__setattr__(
            self, "node_selectors", {p: dict(s) for p, s in self.node_selectors.items()}
        )
        object.__setattr__(self, "tolerations", {p: tuple(t) for p, t in self.tolerations.items()})

    @property
    def kubernetes(self) -> bool:
        """Whether the backend runs clusters on Kubernetes (placement is rendered)."""
        return self.backend == "kubernetes"

    def check_pools(self, config: ZtlabConfig) -> None:
        """Raise :class:`UsageError` if a selector or toleration names no pool of ``config``."""
        known = ", ".join(config.gpu.pools) or "none"
        for what, given in (
            ("--node-selector", self.node_selectors),
            ("--toleration", self.tolerations),
        ):
            for pool in given:
                if pool not in config.gpu.pools:
                    raise UsageError(
                        f"{what}: there is no GPU pool {json.dumps(pool)} (pools: {known})"
                    )


# --------------------------------------------------------------------------------------
# The quota policy
# --------------------------------------------------------------------------------------


def _placement(name: str, options: GatewayOptions) -> dict[str, Any]:
    selector = options.node_selectors.get(name) or {
        _GPU_PRESENT_LABEL[0]: _GPU_PRESENT_LABEL[1],
        options.pool_label: name,
    }
    tolerations = options.tolerations.get(name) or (
        Toleration(key=options.gpu_resource, effect="NoSchedule"),
    )
    return {
        "gpu_resource": options.gpu_resource,
        "node_selector": dict(selector),
        "tolerations": [t.to_k8s() for t in tolerations],
        "labels": {options.pool_label: name},
    }


def quota_policy(config: ZtlabConfig, options: GatewayOptions | None = None) -> dict[str, Any]:
    """The data :class:`ztlab.deploy.gateway_quota.QuotaPolicy` is built from.

    Plain values only (it is written into the configuration as a Python literal): the
    role-group prefix, ``[groups]``, each role's ``max_gpus`` and each pool's limits,
    worker size and, on Kubernetes, placement. Pools without GPUs are left out.
    """
    options = options or GatewayOptions()
    options.check_pools(config)
    pools: dict[str, Any] = {}
    for name, pool in config.gpu.pools.items():
        if not pool.gpus:
            continue
        pools[name] = {
            "description": pool.description,
            "roles": list(pool.roles),
            "gpus": len(pool.gpus),
            "max_clusters": pool.max_clusters,
            "max_workers": pool.max_workers,
            "max_cluster_gpus": pool.max_cluster_gpus,
            "worker_memory": pool.worker_memory,
            "worker_cores": pool.worker_cpus,
            "cluster_hours": pool.cluster_hours,
            "kubernetes": _placement(name, options) if options.kubernetes else None,
        }
    return {
        "role_group_prefix": ROLE_GROUP_PREFIX,
        "groups": {group: list(roles) for group, roles in config.groups.items()},
        "roles": {name: role.max_gpus for name, role in config.roles.items()},
        "pools": pools,
    }


def quota_source() -> str:
    """The source of :mod:`ztlab.deploy.gateway_quota`, as embedded in the configuration."""
    source = importlib.resources.files("ztlab.deploy").joinpath("gateway_quota.py")
    text = source.read_text(encoding="utf-8")
    if "'''" in text or text.rstrip("\n").endswith("\\"):
        # it is embedded in r'''...''': neither may occur
        raise AssertionError("gateway_quota.py cannot be embedded in a raw ''' string")
    return text


# --------------------------------------------------------------------------------------
# The gateway configuration
# --------------------------------------------------------------------------------------

_CONFIG_TEMPLATE: Final = """\
# ztlab: GPU pools with per-user and per-group quotas for Dask Gateway.
#
# Rendered by `ztlab k8s gateway` from {source}: re-render rather than edit.
# c.Backend.cluster_options offers each user the pools their roles may use (groups
# "{prefix}ROLE" or the [groups] of ztlab.toml), workers (the most the cluster may
# scale to) and GPUs per worker; its handler sets the pool's worker resources:
# {what}.
# c.DaskGateway.backend_class is {base} with ztlab's quota check, which refuses a
# cluster past the pool's per-user max_clusters, max_workers or max_cluster_gpus, or
# past the largest max_gpus of the user's roles, and stops clusters older than the
# pool's cluster_hours. The check's module (ztlab.deploy.gateway_quota) is embedded
# below; it needs only dask-gateway-server.

_ZTLAB_QUOTA_SOURCE = r'''{module}'''

_ZTLAB_POLICY = {policy}


def _ztlab_gateway(c, source, policy):
    import sys
    import types

    from {base_module} import {base} as base

    module = types.ModuleType("ztlab_gateway_quota")
    sys.modules[module.__name__] = module
    exec(compile(source, "ztlab_gateway_quota.py", "exec"), module.__dict__)
    defaults = {{}}
    for key in {defaults}:
        if key in c.KubeClusterConfig:
            value = c.KubeClusterConfig[key]
            # a LazyConfigValue when set with .update() or .append()
            defaults[key] = value.get_value({{}}) if hasattr(value, "get_value") else value
    quota = module.QuotaPolicy(policy, defaults=defaults)
    c.Backend.cluster_options = quota.cluster_options
    c.DaskGateway.backend_class = module.quota_backend(base, quota)


_ztlab_gateway(c, _ZTLAB_QUOTA_SOURCE, _ZTLAB_POLICY)
del _ztlab_gateway, _ZTLAB_QUOTA_SOURCE, _ZTLAB_POLICY
"""


def python_literal(value: Any, level: int = 0) -> str:
    """``value`` (dicts, lists, strings, numbers, booleans, ``None``) as Python source,
    one item a line, indented by four spaces a level."""
    pad, inner = "    " * level, "    " * (level + 1)
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        items = "".join(
            f"{inner}{python_literal(str(k))}: {python_literal(v, level + 1)},\n"
            for k, v in value.items()
        )
        return "{\n" + items + pad + "}"
    if isinstance(value, list | tuple):
        if not value:
            return "[]"
        items = "".join(f"{inner}{python_literal(v, level + 1)},\n" for v in value)
        return "[\n" + items + pad + "]"
    if value is None or isinstance(value, bool | int | str):
        return repr(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{value!r} has no Python literal")
        return repr(value)
    raise TypeError(f"no Python literal for {type(value).__name__}")


def render_gateway_config(
    config: ZtlabConfig, options: GatewayOptions | None = None, *, source: str = "ztlab.toml"
) -> str:
    """The dask-gateway-server configuration (Python run with ``c`` the configuration).

    It sets ``c.Backend.cluster_options`` and ``c.DaskGateway.backend_class`` (see the
    module's docstring); everything else (addresses, authentication, the image) is the
    chart's, or the caller's outside Kubernetes.
    """
    options = options or GatewayOptions()
    base_module, base = BACKENDS[options.backend]
    policy = python_literal(quota_policy(config, options))
    defaults = python_literal(list(_EXTENDED_SETTINGS) if options.kubernetes else [], 1)
    what = (
        f"cores, memory, {options.gpu_resource} limit, node selector and tolerations"
        if options.kubernetes
        else "cores and memory (GPUs are counted, not assigned, outside Kubernetes)"
    )
    return _CONFIG_TEMPLATE.format(
        source=source.replace("\n", " "),
        prefix=ROLE_GROUP_PREFIX,
        what=what,
        base=base,
        base_module=base_module,
        module=quota_source(),
        policy=policy,
        defaults=defaults,
    )


# --------------------------------------------------------------------------------------
# Helm values
# --------------------------------------------------------------------------------------


def render_gateway_values(
    config: ZtlabConfig, options: GatewayOptions | None = None, *, source: str = "ztlab.toml"
) -> dict[str, Any]:
    """Helm values for the ``dask-gateway`` chart; merge with the release's own values.

    Keys set here are the ones ztlab governs: JupyterHub authentication, one gateway
    replica (the quota check counts what one process sees), the backend image (a
    placeholder unless :attr:`GatewayOptions.image`), and the configuration as
    ``gateway.extraConfig``.
    """
    options = options or GatewayOptions()
    if not options.kubernetes:
        raise UsageError(
            f"Helm values are for the kubernetes backend, not {options.backend}; "
            "render the configuration alone with render_gateway_config"
        )
    name, tag = parse_image(options.image) if options.image else IMAGE_PLACEHOLDER
    jupyterhub: dict[str, Any] = {}
    if options.hub_api_url is not None:
        jupyterhub["apiUrl"] = options.hub_api_url
    if options.service_name is not None:
        jupyterhub["jupyterhubServiceName"] = options.service_name
        # where z2jh keeps the token it makes for hub.services.NAME
        jupyterhub["apiTokenFromSecretKey"] = f"hub.services.{options.service_name}.apiToken"
    return {
        "gateway": {
            "replicas": 1,
            "auth": {"type": "jupyterhub", "jupyterhub": jupyterhub},
            "backend": {"image": {"name": name, "tag": tag}},
            "extraConfig": {
                GATEWAY_EXTRA_CONFIG_KEY: render_gateway_config(config, options, source=source)
            },
        }
    }


def _values_header(options: GatewayOptions, stamp: str) -> list[str]:
    service = options.service_name
    lines = [
        "Dask Gateway values: ztlab's GPU pools, with per-user and per-group quotas.",
        stamp,
        "helm upgrade --install dask-gateway dask-gateway --repo https://helm.dask.org \\",
        f"    --namespace NAMESPACE -f {GATEWAY_VALUES_FILE}",
    ]
    if options.image is None:
        lines += [
            "gateway.backend.image is a placeholder: render with --image NAME:TAG (an image",
            "with dask-gateway, distributed and, for GPU workers, CUDA).",
        ]
    lines += [
        "The JupyterHub (z2jh) release in the same namespace needs, in its values:",
    ]
    if service is not None:
        access = f"access:services!service={service}"
        lines += [
            f"  hub.services.{service}: {{display: false}}  (z2jh makes the API token this",
            "    chart reads from the hub secret)",
            f'  hub.loadRoles.user.scopes: [self, "{access}"]',
            "  hub.loadRoles.server.scopes: [users:activity!user, access:servers!server,",
            f'    read:users:groups!user, "{access}"]',
        ]
    else:
        lines += [
            "  hub.services.dask-gateway: {display: false}",
            "  hub.loadRoles.server.scopes: [users:activity!user, access:servers!server,",
            "    read:users:groups!user]",
        ]
    lines += [
        "The gateway reads each user's groups with the user's token: a token that may not",
        "read them (read:users:groups) is offered no pool. The user servers' NetworkPolicy",
        "(ztlab k8s render) must allow egress to the gateway's proxy: --allow-egress.",
    ]
    return lines


@dataclass(frozen=True, slots=True)
class RenderedGateway:
    """What :func:`write_gateway_files` wrote."""

    values: Path
    config: Path
    pools: int


def write_gateway_files(
    config: ZtlabConfig,
    out_dir: Path,
    options: GatewayOptions | None = None,
    *,
    source: str = "ztlab.toml",
) -> RenderedGateway:
    """Write ``gateway-values.yaml`` and ``dask_gateway_config.py`` into ``out_dir``.

    The configuration file is the values' ``gateway.extraConfig``, for review or for a
    gateway deployed without the chart. Raises :class:`UsageError` when the directory or
    a file cannot be written.
    """
    options = options or GatewayOptions()
    values = render_gateway_values(config, options, source=source)
    code: str = values["gateway"]["extraConfig"][GATEWAY_EXTRA_CONFIG_KEY]
    stamp = f"Rendered by `ztlab k8s gateway` from {source}; re-render rather than edit."
    values_text = dump_yaml(values, header=_values_header(options, stamp))
    values_path = out_dir / GATEWAY_VALUES_FILE
    config_path = out_dir / GATEWAY_CONFIG_FILE
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        values_path.write_text(values_text, encoding="utf-8")
        config_path.write_text(code, encoding="utf-8")
    except OSError as exc:
        where = exc.filename or out_dir
        raise UsageError(f"{where}: cannot write: {exc.strerror or exc}") from exc
    return RenderedGateway(
        values=values_path, config=config_path, pools=len(quota_policy(config, options)["pools"])
    )


def gateway_values_text(
    config: ZtlabConfig, options: GatewayOptions | None = None, *, source: str = "ztlab.toml"
) -> str:
    """``gateway-values.yaml`` as text (what ``ztlab k8s gateway`` prints without --out)."""
    options = options or GatewayOptions()
    stamp = f"Rendered by `ztlab k8s gateway` from {source}; re-render rather than edit."
    return dump_yaml(
        render_gateway_values(config, options, source=source),
        header=_values_header(options, stamp),
    )
