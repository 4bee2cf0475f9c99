"""Tests for ``ztlab.deploy.gateway``, ``ztlab.deploy.gateway_quota`` and ``ztlab k8s gateway``.

The rendered configuration is run the ways a gateway runs it:

* as the ``dask-gateway`` chart does (its settings in a traitlets ``Config``, then
  ``gateway.extraConfig``), with ``KubeBackend``: the backend it configures turns a
  user's options into a ``KubeClusterConfig``, the chart's controller makes the worker pod
  of it (``KubeController.make_pod``), and the pod is validated against the Kubernetes
  schema. Nothing talks to a cluster.
* by a real ``dask-gateway-server`` with its local backend (``UnsafeLocalBackend``: no
  per-user accounts) and password authentication, driven by the ``dask_gateway`` client:
  pools offered per user, clusters started, refusals past each limit, the lifetime sweep.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask_gateway_server.models as dgs_models
import pytest
import yaml
from click.testing import CliRunner
from traitlets.config import Config

from ztlab.cli.k8s import k8s_group
from ztlab.common.config import ZtlabConfig, load_config, parse_config
from ztlab.common.errors import UsageError
from ztlab.deploy import gateway_quota
from ztlab.deploy.gateway import (
    GATEWAY_CONFIG_FILE,
    GATEWAY_EXTRA_CONFIG_KEY,
    GATEWAY_VALUES_FILE,
    IMAGE_PLACEHOLDER,
    GatewayOptions,
    Toleration,
    parse_image,
    parse_node_selector,
    parse_toleration,
    python_literal,
    quota_policy,
    quota_source,
    render_gateway_config,
    render_gateway_values,
)
from ztlab.deploy.gateway_quota import (
    Held,
    QuotaExceeded,
    QuotaPolicy,
    Request,
    merge_json,
    quota_backend,
)
from ztlab.deploy.k8s import K8sOptions

K8S_VERSION = "1.32"
GIB = 1024**3
VENV_BIN = Path(sys.executable).parent

#: pool a: one cluster per user; pool b: open to viewers too, clusters live 3.6 seconds;
#: pool closed: runs no clusters. trainer may hold 2 GPUs, viewer none.
CONFIG_TABLES: dict[str, Any] = {
    "roles": {"trainer": {"max_gpus": 2}},
    "groups": {"ml": ["trainer"], "guests": ["viewer"]},
    "gpu": {
        "pools": {
            "a": {
                "description": "Pool A.",
                "gpus": ["0", "1"],
                "roles": ["trainer"],
                "max_clusters": 1,
                "max_workers": 2,
                "max_cluster_gpus": 2,
                "worker_memory": "1G",
                "worker_cpus": 1.5,
            },
            "b": {
                "gpus": ["2"],
                "roles": ["trainer", "viewer"],
                "max_clusters": 2,
                "max_workers": 2,
                "max_cluster_gpus": 2,
                "worker_memory": "1G",
                "cluster_hours": 0.001,
            },
            "closed": {"gpus": ["3"], "roles": ["trainer"], "max_clusters": 0},
        }
    },
}

#: who is in which identity-provider group (the e2e gateway's authenticator reports them)
USER_GROUPS: dict[str, list[str]] = {
    "alice": ["ml"],
    "bob": ["ml"],
    "carol": ["guests"],
    "dave": [],
    "erin": ["ztlab-role-trainer"],  # as ztlab's hub names role groups
}


@pytest.fixture(scope="module")
def config() -> ZtlabConfig:
    return parse_config(CONFIG_TABLES)


@pytest.fixture(scope="module")
def policy(config: ZtlabConfig) -> QuotaPolicy:
    return QuotaPolicy(quota_policy(config))


def user(name: str) -> Any:
    """A gateway user with the groups of :data:`USER_GROUPS`."""
    return dgs_models.User(name, groups=USER_GROUPS[name])


# --------------------------------------------------------------------------------------
# The policy rendered from ztlab.toml
# --------------------------------------------------------------------------------------


def test_policy_carries_pools_roles_and_groups(config: ZtlabConfig) -> None:
    data = quota_policy(config)
    assert data["role_group_prefix"] == "ztlab-role-"
    assert data["groups"] == {"ml": ["trainer"], "guests": ["viewer"]}
    assert data["roles"]["trainer"] == 2
    assert data["roles"]["viewer"] == 0
    assert list(data["pools"]) == ["a", "b", "closed"]
    a = data["pools"]["a"]
    assert (a["gpus"], a["max_clusters"], a["max_workers"], a["max_cluster_gpus"]) == (2, 1, 2, 2)
    assert (a["worker_memory"], a["worker_cores"]) == (GIB, 1.5)
    assert a["kubernetes"] == {
        "gpu_resource": "nvidia.com/gpu",
        "node_selector": {"nvidia.com/gpu.present": "true", "ztlab.io/gpu-pool": "a"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "labels": {"ztlab.io/gpu-pool": "a"},
    }
    # the pool label is the one `ztlab k8s render` pins GPU profiles with
    assert GatewayOptions().pool_label == K8sOptions().pool_label


def test_placement_options_replace_a_pools_defaults(config: ZtlabConfig) -> None:
    options = GatewayOptions(
        node_selectors={"a": {"cloud.google.com/gke-accelerator": "nvidia-l4"}},
        tolerations={"a": [Toleration(key="dedicated", value="gpu", effect="NoExecute")]},
        gpu_resource="nvidia.com/mig-1g.10gb",
    )
    pools = quota_policy(config, options)["pools"]
    assert pools["a"]["kubernetes"]["node_selector"] == {
        "cloud.google.com/gke-accelerator": "nvidia-l4"
    }
    assert pools["a"]["kubernetes"]["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoExecute"}
    ]
    assert pools["b"]["kubernetes"]["node_selector"]["ztlab.io/gpu-pool"] == "b"
    assert pools["b"]["kubernetes"]["tolerations"][0]["key"] == "nvidia.com/mig-1g.10gb"
    assert quota_policy(config, GatewayOptions(backend="local"))["pools"]["a"]["kubernetes"] is None


@pytest.mark.parametrize("what", ["node_selectors", "tolerations"])
def test_placement_for_an_unknown_pool_is_refused(config: ZtlabConfig, what: str) -> None:
    given: Any = (
        {"nope": {"k": "v"}} if what == "node_selectors" else {"nope": [Toleration(key="k")]}
    )
    with pytest.raises(UsageError, match='there is no GPU pool "nope"'):
        quota_policy(config, GatewayOptions(**{what: given}))


def test_python_literal_round_trips(config: ZtlabConfig) -> None:
    data = quota_policy(config)
    assert ast.literal_eval(python_literal(data)) == data
    tricky = {"a'b": ['"', "\\", "\n", None, True, 1.5, -2, []], "": {}}
    assert ast.literal_eval(python_literal(tricky)) == tricky


def test_the_embedded_module_is_this_one() -> None:
    assert quota_source() == Path(gateway_quota.__file__).read_text(encoding="utf-8")
    # it runs in the gateway without ztlab: nothing but the standard library and
    # dask_gateway_server
    tree = ast.parse(quota_source())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"dask_gateway_server", "__future__"}


def test_merge_json_merges_as_the_controller_does() -> None:
    from dask_gateway_server.backends.kubernetes import utils

    base = {"env": [{"name": "A"}], "resources": {"limits": {"cpu": "1"}}, "x": 1}
    extra = {"env": [{"name": "B"}], "resources": {"limits": {"nvidia.com/gpu": "1"}}, "x": 2}
    assert merge_json(base, extra) == utils.merge_json_objects(base, extra)
    assert base["env"] == [{"name": "A"}]  # unchanged


# --------------------------------------------------------------------------------------
# The limits
# --------------------------------------------------------------------------------------


def test_options_offer_the_pools_of_the_users_roles(policy: QuotaPolicy) -> None:
    def offered(name: str) -> dict[str, Any]:
        spec = policy.cluster_options(user(name)).get_specification()
        return {field["field"]: field for field in spec}

    alice = offered("alice")
    assert alice["pool"]["spec"]["options"] == ["a", "b"]  # closed runs no clusters
    assert "Pool A." in alice["pool"]["label"]
    assert (alice["workers"]["spec"]["min"], alice["workers"]["spec"]["max"]) == (1, 2)
    assert (alice["gpus"]["default"], alice["gpus"]["spec"]["max"]) == (1, 2)
    assert offered("erin")["pool"]["spec"]["options"] == ["a", "b"]
    carol = offered("carol")
    assert carol["pool"]["spec"]["options"] == ["b"]
    assert carol["gpus"]["default"] == 0  # viewer holds no GPU
    assert offered("dave") == {}


@pytest.mark.parametrize(
    ("name", "request_", "held", "message"),
    [
        ("alice", Request("a", 1, 1), [Held("c1", "a", 1, 1)], "Pool a allows 1 cluster per user"),
        ("alice", Request("a", 3, 0), [], "Pool a allows 2 workers per user over all clusters"),
        (
            "alice",
            Request("b", 1, 0),
            [Held("c1", "b", 2, 0)],
            "Pool b allows 2 workers per user over all clusters (max_workers); alice asked "
            "for a cluster of up to 1 and holds 2 workers (c1 (2 workers x 0 GPUs))",
        ),
        (
            "alice",
            Request("b", 2, 1),
            [Held("c1", "b", 1, 0), Held("c2", "a", 1, 1)],
            "Pool b allows 2 workers",
        ),
        (
            "alice",
            Request("b", 2, 1),
            [Held("c2", "a", 1, 1)],
            "Role trainer (group ml) may hold at most 2 GPUs (max_gpus); alice asked for "
            "2 x 1 = 2 GPUs and holds 1 GPU in Dask clusters (c2 (1 worker x 1 GPU))",
        ),
        ("alice", Request("a", 2, 2), [], "Pool a allows 2 GPUs per user for clusters"),
        ("alice", Request("b", 1, 2), [], "Pool b has 1 GPU; a worker cannot have 2"),
        ("alice", Request("closed", 1, 0), [], "Pool closed runs no clusters"),
        ("alice", Request("zzz", 1, 0), [], "There is no GPU pool 'zzz'"),
        ("carol", Request("a", 1, 0), [], "carol may not use pool a: it is open to role(s) "),
        ("carol", Request("b", 1, 1), [], "Role viewer (group guests) may hold at most 0 GPUs"),
        ("dave", Request(None, 1, 0), [], "User dave may use no GPU pool"),
        ("erin", Request("a", 1, 1), [Held("c1", "a", 1, 1)], "Pool a allows 1 cluster"),
    ],
)
def test_each_limit_refuses_with_its_name(
    policy: QuotaPolicy, name: str, request_: Request, held: list[Held], message: str
) -> None:
    with pytest.raises(QuotaExceeded) as caught:
        policy.check(user(name), request_, held)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)  # it travels as an HTTP reason


@pytest.mark.parametrize(
    ("name", "request_", "held"),
    [
        ("alice", Request("a", 2, 1), []),
        ("alice", Request("b", 1, 1), [Held("c1", "a", 1, 1), Held("c2", "b", 1, 0)]),
        ("bob", Request("a", 1, 1), []),
        ("carol", Request("b", 2, 0), []),
        ("erin", Request("b", 2, 1), []),
    ],
)
def test_requests_within_the_limits_pass(
    policy: QuotaPolicy, name: str, request_: Request, held: list[Held]
) -> None:
    policy.check(user(name), request_, held)


# --------------------------------------------------------------------------------------
# The configuration as the dask-gateway chart runs it, with KubeBackend
# --------------------------------------------------------------------------------------


def chart_config(values: Mapping[str, Any]) -> Config:
    """The gateway configuration the chart's ``dask_gateway_config.py`` makes of ``values``.

    What the chart sets before ``gateway.extraConfig`` (backend, image, the worker pod
    and container settings of ``gateway.backend.worker``), then the snippets by key.
    """
    c = Config()
    c.DaskGateway.backend_class = "dask_gateway_server.backends.kubernetes.KubeBackend"
    c.KubeBackend.gateway_instance = "dask-gateway"
    image = values["gateway"]["backend"]["image"]
    c.KubeClusterConfig.image = f"{image['name']}:{image['tag']}"
    # the release's own gateway.backend.worker.extraPodConfig / extraContainerConfig
    c.KubeClusterConfig.worker_extra_pod_config = {"priorityClassName": "dask"}
    c.KubeClusterConfig.worker_extra_container_config = {"env": [{"name": "SITE", "value": "x"}]}
    for key, code in sorted(values["gateway"]["extraConfig"].items()):
        exec(compile(code, key, "exec"), {"c": c})
    return c


@pytest.fixture(scope="module")
def values(config: ZtlabConfig) -> dict[str, Any]:
    return render_gateway_values(config, GatewayOptions(image="ghcr.io/example/dask-cuda:1.0"))


def kube_worker_pod(c: Config, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The worker pod the chart's controller makes for ``name`` asking for ``options``."""
    from dask_gateway_server.backends.kubernetes.controller import KubeController
    from dask_gateway_server.utils import FrozenAttrDict

    backend = c.DaskGateway.backend_class(config=c)
    _, cluster_config = asyncio.run(backend.process_cluster_options(user(name), options))
    c.KubeController.gateway_instance = "dask-gateway"
    controller = KubeController(config=c)
    pod: dict[str, Any] = controller.make_pod(
        "jhub", "abc123", FrozenAttrDict(cluster_config.to_dict()), is_worker=True
    )
    return pod


def validate(manifest: Mapping[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(dict(manifest), K8S_VERSION, strict=True)


def test_values_use_jupyterhub_auth_and_one_replica(values: dict[str, Any]) -> None:
    gateway = values["gateway"]
    assert gateway["replicas"] == 1
    assert gateway["auth"] == {
        "type": "jupyterhub",
        "jupyterhub": {
            "jupyterhubServiceName": "dask-gateway",
            "apiTokenFromSecretKey": "hub.services.dask-gateway.apiToken",
        },
    }
    assert gateway["backend"]["image"] == {"name": "ghcr.io/example/dask-cuda", "tag": "1.0"}
    assert list(gateway["extraConfig"]) == [GATEWAY_EXTRA_CONFIG_KEY]


def test_values_without_an_image_hold_a_placeholder(config: ZtlabConfig) -> None:
    image = render_gateway_values(config)["gateway"]["backend"]["image"]
    assert (image["name"], image["tag"]) == IMAGE_PLACEHOLDER
    with pytest.raises(UsageError, match="kubernetes backend"):
        render_gateway_values(config, GatewayOptions(backend="local"))


def test_the_chart_runs_the_configuration(values: dict[str, Any]) -> None:
    c = chart_config(values)
    backend_class = c.DaskGateway.backend_class
    assert backend_class.__name__ == "ZtlabKubeBackend"
    assert [k.__name__ for k in backend_class.__mro__[:3]] == [
        "ZtlabKubeBackend",
        "QuotaBackendMixin",
        "KubeBackend",
    ]
    backend = backend_class(config=c)
    spec = asyncio.run(backend.get_cluster_options(user("alice"))).get_specification()
    assert [f["field"] for f in spec] == ["pool", "workers", "gpus"]


def test_a_gpu_worker_gets_the_pools_resources_and_placement(values: dict[str, Any]) -> None:
    pod = kube_worker_pod(chart_config(values), "alice", {"pool": "a", "workers": 2, "gpus": 1})
    validate(pod)
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["image"] == "ghcr.io/example/dask-cuda:1.0"
    resources = container["resources"]
    assert resources["limits"] == {"cpu": "1.500", "memory": str(GIB), "nvidia.com/gpu": "1"}
    assert resources["requests"] == resources["limits"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true", "ztlab.io/gpu-pool": "a"}
    assert spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["metadata"]["labels"]["ztlab.io/gpu-pool"] == "a"
    # the release's own settings are extended, not replaced
    assert spec["priorityClassName"] == "dask"
    assert {"name": "SITE", "value": "x"} in container["env"]
    assert not any(e["name"] == "NVIDIA_VISIBLE_DEVICES" for e in container["env"])


def test_a_worker_without_gpus_sees_none_and_stays_off_gpu_nodes(values: dict[str, Any]) -> None:
    pod = kube_worker_pod(chart_config(values), "carol", {"pool": "b", "workers": 2, "gpus": 0})
    validate(pod)
    (container,) = pod["spec"]["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "nodeSelector" not in pod["spec"]
    assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"} in container["env"]


def test_the_cluster_config_caps_workers_and_sizes_the_scheduler(values: dict[str, Any]) -> None:
    c = chart_config(values)
    backend = c.DaskGateway.backend_class(config=c)
    options = {"pool": "a", "workers": 2, "gpus": 1}
    _, cluster_config = asyncio.run(backend.process_cluster_options(user("alice"), options))
    assert cluster_config.cluster_max_workers == 2
    assert cluster_config.worker_memory == GIB
    assert cluster_config.worker_cores == 1.5
    assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"} in (
        cluster_config.scheduler_extra_container_config["env"]
    )


def test_the_handler_refuses_a_pool_the_user_may_not_use(values: dict[str, Any]) -> None:
    from dask_gateway_server.backends.base import PublicException

    c = chart_config(values)
    backend = c.DaskGateway.backend_class(config=c)
    with pytest.raises(PublicException, match="'a' is not a valid option for pool"):
        asyncio.run(backend.process_cluster_options(user("carol"), {"pool": "a"}))
    with pytest.raises(PublicException, match="User dave may use no GPU pool"):
        asyncio.run(backend.process_cluster_options(user("dave"), {}))


# --------------------------------------------------------------------------------------
# The backend mixin, on a stand-in backend
# --------------------------------------------------------------------------------------


class StandInBackend:
    """What the mixin uses of a gateway backend. ``lagging``: ``list_clusters`` does not
    show new clusters yet (as KubeBackend before its informer sees them)."""

    cluster_options: Any = None

    def __init__(self) -> None:
        self.log = logging.getLogger("test.gateway")
        self.clusters: dict[str, Any] = {}
        self.lagging = False
        self.stopped: list[str] = []

    async def setup(self, app: Any) -> None:
        pass

    async def cleanup(self) -> None:
        pass

    async def list_clusters(self, username: str | None = None, statuses: Any = None) -> list[Any]:
        if self.lagging:
            return []
        wanted = set(statuses or gateway_quota.ACTIVE_STATUSES[:2])
        return [
            c
            for c in self.clusters.values()
            if c.status in wanted and username in (None, c.username)
        ]

    async def start_cluster(self, user: Any, cluster_options: Any) -> str:
        await asyncio.sleep(0.01)  # another request could run here
        name = f"c{len(self.clusters)}"
        options = self.cluster_options(user).parse_options(cluster_options)
        self.clusters[name] = dgs_models.Cluster(
            name=name,
            username=user.name,
            token="",
            options=options,
            config={},
            status=dgs_models.ClusterStatus.PENDING,
            start_time=int(time.time() * 1000),
        )
        return name

    async def stop_cluster(self, cluster_name: str, failed: bool = False) -> None:
        self.stopped.append(cluster_name)
        self.clusters[cluster_name].status = dgs_models.ClusterStatus.STOPPED


def stand_in(policy: QuotaPolicy) -> Any:
    backend = quota_backend(StandInBackend, policy, ztlab_sweep_seconds=3600)()
    backend.cluster_options = policy.cluster_options
    return backend


def test_clusters_the_backend_does_not_list_yet_still_count(policy: QuotaPolicy) -> None:
    async def run() -> None:
        backend = stand_in(policy)
        await backend.setup(None)
        backend.lagging = True
        await backend.start_cluster(user("alice"), {"pool": "a", "gpus": 1})
        with pytest.raises(QuotaExceeded, match="Pool a allows 1 cluster"):
            await backend.start_cluster(user("alice"), {"pool": "a"})
        await backend.start_cluster(user("bob"), {"pool": "a"})
        backend.lagging = False
        assert [h.name for h in await backend.ztlab_held("alice")] == ["c0"]
        assert "c0" not in backend._ztlab_pending  # listed now: counted once
        await backend.cleanup()

    asyncio.run(run())


def test_concurrent_requests_cannot_both_take_the_last_place(policy: QuotaPolicy) -> None:
    async def run() -> None:
        backend = stand_in(policy)
        await backend.setup(None)
        results = await asyncio.gather(
            *(backend.start_cluster(user("alice"), {"pool": "a"}) for _ in range(4)),
            return_exceptions=True,
        )
        assert sum(isinstance(r, str) for r in results) == 1
        assert sum(isinstance(r, QuotaExceeded) for r in results) == 3
        await backend.cleanup()

    asyncio.run(run())


def test_the_sweep_stops_clusters_past_their_pools_hours(policy: QuotaPolicy) -> None:
    async def run() -> None:
        backend = stand_in(policy)
        await backend.setup(None)
        old = await backend.start_cluster(user("carol"), {"pool": "b", "gpus": 0})
        young = await backend.start_cluster(user("alice"), {"pool": "a"})
        backend.clusters[old].start_time -= 4_000  # pool b: 3.6 seconds
        backend.clusters[young].start_time -= 4_000  # pool a: 8 hours
        assert await backend.ztlab_sweep() == [old]
        assert backend.stopped == [old]
        await backend.cleanup()

    asyncio.run(run())


def test_a_backend_with_other_cluster_options_does_not_start(policy: QuotaPolicy) -> None:
    async def run() -> None:
        backend = stand_in(policy)
        backend.cluster_options = lambda user: None
        with pytest.raises(ValueError, match="cluster_options was replaced"):
            await backend.setup(None)

    asyncio.run(run())


# --------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------


def test_parse_node_selector() -> None:
    assert parse_node_selector("a=nvidia.com/gpu.product=A100") == (
        "a",
        "nvidia.com/gpu.product",
        "A100",
    )
    for bad in ("a", "a=key", "=k=v", "a=bad key=v", "a=k=bad value"):
        with pytest.raises(UsageError):
            parse_node_selector(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a=nvidia.com/gpu:NoSchedule", {"key": "nvidia.com/gpu", "operator": "Exists",
                                         "effect": "NoSchedule"}),
        ("a=dedicated=gpu:NoExecute", {"key": "dedicated", "operator": "Equal", "value": "gpu",
                                       "effect": "NoExecute"}),
        ("a=dedicated=gpu", {"key": "dedicated", "operator": "Equal", "value": "gpu"}),
        ("a=dedicated", {"key": "dedicated", "operator": "Exists"}),
    ],
)  # fmt: skip
def test_parse_toleration(text: str, expected: dict[str, str]) -> None:
    pool, toleration = parse_toleration(text)
    assert pool == "a"
    assert toleration.to_k8s() == expected


@pytest.mark.parametrize("text", ["a", "a=", "a=k:", "a=k:Sometimes", "a=bad key"])
def test_parse_toleration_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_toleration(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ghcr.io/x/y:1.0", ("ghcr.io/x/y", "1.0")),
        ("ghcr.io/x/y", ("ghcr.io/x/y", "")),
        ("registry:5000/x/y", ("registry:5000/x/y", "")),
        ("registry:5000/x/y:2", ("registry:5000/x/y", "2")),
        ("x/y@sha256:" + "a" * 64, ("x/y@sha256:" + "a" * 64, "")),
    ],
)
def test_parse_image(text: str, expected: tuple[str, str]) -> None:
    assert parse_image(text) == expected


@pytest.mark.parametrize(
    "changes",
    [
        {"image": "Not An Image"},
        {"hub_api_url": "hub:8081"},
        {"service_name": "bad name"},
        {"gpu_resource": "gpu"},
        {"pool_label": "bad label/"},
        {"backend": "yarn"},
    ],
)
def test_options_refuse_malformed_values(changes: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        GatewayOptions(**changes)


# --------------------------------------------------------------------------------------
# ztlab k8s gateway
# --------------------------------------------------------------------------------------

GOOD_TOML = """\
[roles.trainer]
max_gpus = 2

[groups]
ml = ["trainer"]

[gpu.pools.research]
gpus = ["0", "1"]
roles = ["trainer"]
"""


def write_config(directory: Path, text: str) -> Path:
    path = directory / "ztlab.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o644)
    return path


def test_gateway_writes_values_and_config(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD_TOML)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        k8s_group,
        [
            "gateway",
            str(path),
            "--out",
            str(out),
            "--image",
            "ghcr.io/example/dask-cuda:1.0",
            "--hub-api-url",
            "http://hub:8081/hub/api",
            "--node-selector",
            "research=nvidia.com/gpu.product=A100",
            "--node-selector",
            "research=zone=a",
            "--toleration",
            "research=dedicated=gpu:NoSchedule",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"{out / GATEWAY_VALUES_FILE}: 1 GPU pools" in result.output
    values = yaml.safe_load((out / GATEWAY_VALUES_FILE).read_text())
    options = GatewayOptions(
        image="ghcr.io/example/dask-cuda:1.0",
        hub_api_url="http://hub:8081/hub/api",
        node_selectors={"research": {"nvidia.com/gpu.product": "A100", "zone": "a"}},
        tolerations={"research": [Toleration(key="dedicated", value="gpu", effect="NoSchedule")]},
    )
    assert values == render_gateway_values(load_config(path), options, source=str(path))
    code = (out / GATEWAY_CONFIG_FILE).read_text()
    assert code == values["gateway"]["extraConfig"][GATEWAY_EXTRA_CONFIG_KEY]
    assert values["gateway"]["auth"]["jupyterhub"]["apiUrl"] == "http://hub:8081/hub/api"
    text = (out / GATEWAY_VALUES_FILE).read_text()
    assert f"    {GATEWAY_EXTRA_CONFIG_KEY}: |\n" in text  # the configuration stays readable
    assert "access:services!service=dask-gateway" in text  # what the hub must grant


def test_gateway_prints_the_values_without_out(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD_TOML)
    result = CliRunner().invoke(k8s_group, ["gateway", str(path), "--service-name", ""])
    assert result.exit_code == 0, result.output
    assert "gateway.backend.image is a placeholder" in result.output
    values = yaml.safe_load(result.output)
    assert values["gateway"]["auth"] == {"type": "jupyterhub", "jupyterhub": {}}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--node-selector", "nope=a=b"], 'there is no GPU pool "nope"'),
        (["--node-selector", "research"], "POOL=KEY=VALUE"),
        (["--toleration", "research=k:Never"], "effect"),
        (["--image", "Bad Image"], "NAME[:TAG]"),
        (["--hub-api-url", "hub"], "http://"),
    ],
)
def test_gateway_exits_2_on_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    path = write_config(tmp_path, GOOD_TOML)
    out = tmp_path / "out"
    result = CliRunner().invoke(k8s_group, ["gateway", str(path), "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ")
    assert message in result.output
    assert not out.exists()


def test_gateway_help_documents_the_command() -> None:
    result = CliRunner().invoke(k8s_group, ["gateway", "--help"])
    assert result.exit_code == 0
    for word in ("max_clusters", "max_cluster_gpus", "max_gpus", "--node-selector", "--out"):
        assert word in result.output


# --------------------------------------------------------------------------------------
# A real dask-gateway-server with the local backend
# --------------------------------------------------------------------------------------

PASSWORD = "not-a-secret"  # SimpleAuthenticator's shared password

#: appended to the rendered configuration: where to listen, how to start schedulers and
#: workers, who is in which group (SimpleAuthenticator reports no groups), and a sweep
#: every half second
_LOCAL_SETTINGS = """

# -- test settings -------------------------------------------------------------------
import sys

from dask_gateway_server.auth import SimpleAuthenticator

USER_GROUPS = {groups!r}


class GroupsAuthenticator(SimpleAuthenticator):
    async def authenticate(self, request):
        user = await super().authenticate(request)
        user.groups = set(USER_GROUPS.get(user.name, ()))
        return user


c.DaskGateway.authenticator_class = GroupsAuthenticator
c.SimpleAuthenticator.password = {password!r}
c.DaskGateway.address = "127.0.0.1:{api_port}"
c.Proxy.address = "127.0.0.1:{proxy_port}"
c.LocalBackend.clusters_directory = {clusters!r}
c.ClusterConfig.scheduler_cmd = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
c.ClusterConfig.worker_cmd = [sys.executable, "-m", "distributed.cli.dask_worker"]
c.DaskGateway.backend_class.ztlab_sweep_seconds = 0.5
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningGateway:
    address: str
    log: Path

    @contextlib.contextmanager
    def client(self, name: str) -> Iterator[Any]:
        """A ``dask_gateway.Gateway`` for user ``name``, closed on exit."""
        from dask_gateway import BasicAuth, Gateway

        gateway = Gateway(self.address, auth=BasicAuth(name, PASSWORD))
        try:
            yield gateway
        finally:
            gateway.close()
            # Gateway.__del__ would close it again and fail on the stopped loop (an
            # unraisable exception, raised wherever the garbage collector runs it)
            del gateway._loop_runner


def _processes_under(directory: Path) -> list[int]:
    """Processes (schedulers, workers) whose working directory is under ``directory``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (proc / "cwd").readlink().is_relative_to(directory):
                pids.append(int(proc.name))
    return pids


@pytest.fixture
def local_gateway(config: ZtlabConfig, tmp_path: Path) -> Iterator[RunningGateway]:
    server = VENV_BIN / "dask-gateway-server"
    assert server.exists(), f"{server} is missing: `make venv-dev` installs dask-gateway-server"
    clusters = tmp_path / "clusters"
    api_port, proxy_port = free_port(), free_port()
    code = render_gateway_config(config, GatewayOptions(backend="unsafe-local"))
    code += _LOCAL_SETTINGS.format(
        groups=USER_GROUPS,
        password=PASSWORD,
        api_port=api_port,
        proxy_port=proxy_port,
        clusters=str(clusters),
    )
    config_file = tmp_path / "dask_gateway_config.py"
    config_file.write_text(code, encoding="utf-8")
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(server), "-f", str(config_file)],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    address = f"http://127.0.0.1:{proxy_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"dask-gateway-server exited:\n{log.read_text()[-4000:]}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{address}/api/health", timeout=2) as response,
            ):
                if response.status == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"dask-gateway-server did not answer:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield RunningGateway(address=address, log=log)
    finally:
        # SIGTERM: the gateway stops its clusters (stop_clusters_on_shutdown) and exits
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        for pid in _processes_under(clusters):  # schedulers run in sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _wait_for(predicate: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _active(gateway: Any) -> list[str]:
    """Names of the user's clusters that still count: pending, running or stopping."""
    return [c.name for c in gateway.list_clusters(status=["pending", "running", "stopping"])]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_real_gateway_offers_pools_and_enforces_the_quotas(
    local_gateway: RunningGateway,
) -> None:
    from dask_gateway import GatewayWarning
    from dask_gateway.client import ClusterStatus

    started: list[tuple[Any, str]] = []

    def start(gateway: Any, **options: Any) -> str:
        # submit, not new_cluster: a GatewayCluster (a refused one too) has a Gateway of
        # its own whose finalizer talks to the server whenever the garbage collector runs
        name: str = gateway.submit(**options)
        started.append((gateway, name))
        _wait_for(
            lambda: gateway.get_cluster(name).status == ClusterStatus.RUNNING, f"{name} to run"
        )
        return name

    with (
        local_gateway.client("alice") as alice,
        local_gateway.client("bob") as bob,
        local_gateway.client("carol") as carol,
        local_gateway.client("dave") as dave,
    ):
        try:
            # the pools each user's roles may use; "closed" (max_clusters 0) for nobody
            assert alice.cluster_options()._fields["pool"].options == ("a", "b")
            assert carol.cluster_options()._fields["pool"].options == ("b",)
            assert dict(dave.cluster_options()) == {}
            with pytest.raises(ValueError, match="User dave may use no GPU pool"):
                dave.submit()

            first = start(alice, pool="a", workers=1, gpus=1)
            # per user and pool: max_clusters
            with pytest.raises(
                ValueError, match=r"Pool a allows 1 cluster per user \(max_clusters\)"
            ):
                alice.submit(pool="a", workers=1, gpus=0)
            # per group: trainer (from group ml) may hold 2 GPUs, and alice holds 1
            with pytest.raises(
                ValueError, match=r"Role trainer \(group ml\) may hold at most 2 GPUs \(max_gpus\)"
            ):
                alice.submit(pool="b", workers=2, gpus=1)
            with pytest.raises(
                ValueError, match=r"Role viewer \(group guests\) may hold at most 0"
            ):
                carol.submit(pool="b", workers=1, gpus=1)
            # another user still gets a cluster in pool a
            second = start(bob, pool="a", workers=2, gpus=1)
            assert [c.options for c in bob.list_clusters()] == [
                {"pool": "a", "workers": 2, "gpus": 1}
            ]
            # a cluster scales no further than it was counted for
            with pytest.warns(GatewayWarning, match="exceed resource limit of 1 workers"):
                alice.scale_cluster(first, 3)

            # a pool's cluster_hours: carol's CPU cluster in pool b lives 3.6 seconds
            short = start(carol, pool="b", workers=1, gpus=0)
            _wait_for(lambda: not _active(carol), "the sweep to stop a cluster past its hours")
            assert f"ztlab: stopping cluster {short} of user carol" in local_gateway.log.read_text()

            # once stopped, alice's first cluster no longer counts
            alice.stop_cluster(first)
            _wait_for(lambda: not _active(alice), f"{first} to stop")
            third = start(alice, pool="a", workers=1, gpus=0)
            for gateway, name in ((bob, second), (alice, third)):
                gateway.stop_cluster(name)
            _wait_for(lambda: not _active(alice) and not _active(bob), "the clusters to stop")
        finally:
            for gateway, name in started:
                with contextlib.suppress(Exception):
                    gateway.stop_cluster(name)
    log = local_gateway.log.read_text()
    assert "Backend: 'ztlab_gateway_quota.ZtlabUnsafeLocalBackend'" in log
