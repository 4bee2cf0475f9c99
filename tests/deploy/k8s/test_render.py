"""Tests for ``ztlab.deploy.k8s`` and ``ztlab k8s render``.

The rendered values are checked the way a cluster would use them: a traitlets ``Config``
is built from them as z2jh's ``jupyterhub_config.py`` does (``singleuser.*``,
``hub.config``, then the ``hub.extraConfig`` snippets), KubeSpawner itself is configured
from it, a profile is chosen through ``user_options`` and ``load_user_options``, and
KubeSpawner's ``get_pod_manifest`` builds the pod. Pods and NetworkPolicies are then
validated against the Kubernetes OpenAPI schemas that ``kubernetes-validate`` ships
(strict: unknown fields are errors). Nothing talks to a cluster: KubeSpawner reads a
kubeconfig whose server (``kubernetes.invalid``) cannot resolve, and is never asked to
call it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from tornado import web
from traitlets.config import Config

from ztlab.cli.k8s import k8s_group
from ztlab.common.config import ZtlabConfig, load_config, parse_config
from ztlab.common.errors import ConfigError, UsageError
from ztlab.deploy.k8s import (
    EXTRA_CONFIG_KEY,
    EgressRule,
    K8sOptions,
    Peer,
    parse_egress_rule,
    parse_peer,
    profile_filter_snippet,
    profiles,
    render_network_policies,
    render_values,
)

#: Kubernetes version whose schemas the manifests must satisfy: z2jh 4's oldest
K8S_VERSION = "1.32"
GIB = 1024**3

#: two pools; a custom GPU role; viewer is listed on a pool but has no GPU quota
CONFIG_TABLES: dict[str, Any] = {
    "roles": {
        "big": {
            "description": "Large jobs.",
            "max_gpus": 4,
            "memory": "64G",
            "cpus": 16,
            "max_server_hours": 1.5,
        },
    },
    "groups": {"ml": ["trainer"], "hpc": ["big", "viewer"]},
    "gpu": {
        "pools": {
            "research": {
                "description": "A100s.",
                "gpus": ["0", "1", "2"],
                "roles": ["trainer", "big"],
            },
            "inference": {"gpus": ["3"], "roles": ["trainer", "viewer"]},
        }
    },
}

#: slug -> (role, pool, GPUs)
EXPECTED_PROFILES = {
    "admin": ("admin", None, 0),
    "data-steward": ("data-steward", None, 0),
    "trainer": ("trainer", None, 0),
    "trainer-gpu-research": ("trainer", "research", 1),
    "trainer-gpu-inference": ("trainer", "inference", 1),
    "approver": ("approver", None, 0),
    "viewer": ("viewer", None, 0),
    "big": ("big", None, 0),
    "big-gpu-research": ("big", "research", 3),
}


@pytest.fixture(scope="module")
def config() -> ZtlabConfig:
    return parse_config(CONFIG_TABLES)


@pytest.fixture(scope="module", autouse=True)
def offline_kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A kubeconfig naming a server that cannot exist: KubeSpawner loads it, calls nothing."""
    path = tmp_path_factory.mktemp("kube") / "config"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "offline", "cluster": {"server": "https://kubernetes.invalid:6443"}}
                ],
                "users": [{"name": "offline", "user": {"token": "unused"}}],
                "contexts": [
                    {
                        "name": "offline",
                        "context": {"cluster": "offline", "user": "offline", "namespace": "jhub"},
                    }
                ],
                "current-context": "offline",
            }
        )
    )
    try:
        from kubernetes_asyncio.config import kube_config
    except ImportError:  # the tests that need it skip themselves
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        # read when kubernetes_asyncio is imported, so $KUBECONFIG would come too late
        mp.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
        mp.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not "in cluster"
        yield


# --------------------------------------------------------------------------------------
# KubeSpawner, configured from the values as z2jh does it
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Group:
    """What JupyterHub's ``user.groups`` holds: objects with a ``name``."""

    name: str


@dataclasses.dataclass
class UserInGroups:
    """A hub user as KubeSpawner reads one: name, id, URL and JupyterHub groups."""

    name: str
    groups: list[Group]
    id: int = 7

    @property
    def url(self) -> str:
        return f"/user/{self.name}/"

    @property
    def escaped_name(self) -> str:
        return self.name


def role_user(*roles: str, name: str = "alice") -> UserInGroups:
    """A user in the JupyterHub groups ``ztlab-role-ROLE`` (what the authenticator sets)."""
    return UserInGroups(name, [Group(f"ztlab-role-{role}") for role in roles])


def z2jh_config(values: Mapping[str, Any]) -> Config:
    """The hub configuration z2jh's ``jupyterhub_config.py`` makes of ``values``.

    Only what the rendered values touch, in z2jh's order: ``singleuser.*`` traits, then
    ``hub.config`` sections, then the ``hub.extraConfig`` snippets by key.
    """
    c = Config()
    singleuser = values["singleuser"]
    c.KubeSpawner.uid = singleuser["uid"]
    c.KubeSpawner.fs_gid = singleuser["fsGid"]
    c.KubeSpawner.allow_privilege_escalation = singleuser["allowPrivilegeEscalation"]
    c.KubeSpawner.profile_list = singleuser["profileList"]
    for section, settings in values["hub"]["config"].items():
        c[section].update(settings)
    for key, code in sorted(values["hub"]["extraConfig"].items()):
        exec(compile(code, key, "exec"), {"c": c})
    return c


async def _pod(values: Mapping[str, Any], user: UserInGroups, slug: str) -> dict[str, Any]:
    kubespawner = pytest.importorskip("kubespawner", reason="needs jupyterhub-kubespawner")
    from kubernetes_asyncio.client import ApiClient

    spawner = kubespawner.KubeSpawner(_mock=True, config=z2jh_config(values), user=user)
    spawner.user_options = {"profile": slug}
    await spawner.load_user_options()
    pod = await spawner.get_pod_manifest()
    async with ApiClient() as api:
        manifest: dict[str, Any] = api.sanitize_for_serialization(pod)
    return manifest


def pod_manifest(values: Mapping[str, Any], user: UserInGroups, slug: str) -> dict[str, Any]:
    """The pod KubeSpawner would create for ``user`` choosing profile ``slug``."""
    return asyncio.run(_pod(values, user, slug))


def offered(values: Mapping[str, Any], user: UserInGroups) -> list[str]:
    """Slugs of the profiles the hub configured by ``values`` offers ``user``."""
    spawner_like = dataclasses.make_dataclass("SpawnerLike", [("user", UserInGroups)])(user)
    profile_list = z2jh_config(values).KubeSpawner.profile_list
    return [p["slug"] for p in profile_list(spawner_like)]


def validate(manifest: Mapping[str, Any]) -> None:
    """Raise unless ``manifest`` satisfies its Kubernetes schema (strict)."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="needs kubernetes-validate (the Kubernetes schemas)"
    )
    kubernetes_validate.validate(dict(manifest), K8S_VERSION, strict=True)


# --------------------------------------------------------------------------------------
# Profiles and pods
# --------------------------------------------------------------------------------------


def test_one_profile_per_role_and_one_per_gpu_pool_of_a_gpu_role(config: ZtlabConfig) -> None:
    got = {p.slug: (p.role, p.pool, p.gpus) for p in profiles(config)}
    assert got == EXPECTED_PROFILES
    assert list(got) == list(EXPECTED_PROFILES)  # roles in order, pools after their role


@pytest.fixture(scope="module")
def values(config: ZtlabConfig) -> dict[str, Any]:
    return render_values(config)


@pytest.mark.parametrize("slug", list(EXPECTED_PROFILES))
def test_each_profile_makes_a_valid_confined_pod(
    config: ZtlabConfig, values: dict[str, Any], slug: str
) -> None:
    role_name, pool, gpus = EXPECTED_PROFILES[slug]
    role = config.roles[role_name]
    pod = pod_manifest(values, role_user(role_name), slug)
    validate(pod)

    spec = pod["spec"]
    (container,) = spec["containers"]
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert int(limits["memory"]) == role.memory
    assert int(requests["memory"]) == role.memory  # guarantee 1: Guaranteed QoS
    assert float(limits["cpu"]) == role.cpus
    assert float(requests["cpu"]) == role.cpus
    if pool is None:
        assert "nvidia.com/gpu" not in limits
        assert "nodeSelector" not in spec
        assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"} in container["env"]
    else:
        assert limits["nvidia.com/gpu"] == str(gpus)
        assert spec["nodeSelector"] == {"ztlab.io/gpu-pool": pool}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ]
        assert pod["metadata"]["labels"]["ztlab.io/gpu-pool"] == pool

    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == 1000
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not context.get("privileged", False)
    assert spec["securityContext"]["fsGroup"] == 100
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    assert spec["activeDeadlineSeconds"] == round(role.max_server_hours * 3600)
    assert pod["metadata"]["labels"]["ztlab.io/role"] == role_name
    assert pod["metadata"]["labels"]["component"] == "singleuser-server"


def test_guarantee_below_one_requests_a_fraction_of_the_limits(config: ZtlabConfig) -> None:
    values = render_values(config, K8sOptions(guarantee=0.25, uid=1234, fs_gid=5678))
    pod = pod_manifest(values, role_user("trainer"), "trainer-gpu-research")
    validate(pod)
    (container,) = pod["spec"]["containers"]
    resources = container["resources"]
    assert int(resources["limits"]["memory"]) == 32 * GIB
    assert int(resources["requests"]["memory"]) == 8 * GIB
    assert float(resources["requests"]["cpu"]) == 2.0
    assert container["securityContext"]["runAsUser"] == 1234
    assert pod["spec"]["securityContext"]["fsGroup"] == 5678


def test_a_profile_of_a_role_not_held_cannot_be_requested(values: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="No such profile: big-gpu-research"):
        pod_manifest(values, role_user("trainer"), "big-gpu-research")


def test_without_a_role_no_server_starts(values: dict[str, Any]) -> None:
    user = UserInGroups("mallory", [Group("ml"), Group("ztlab-role-")])
    with pytest.raises(web.HTTPError) as caught:
        pod_manifest(values, user, "viewer")
    assert caught.value.status_code == 403


# --------------------------------------------------------------------------------------
# The profile filter snippet
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("roles", "expected"),
    [
        (["viewer"], ["viewer"]),
        (["trainer"], ["trainer", "trainer-gpu-research", "trainer-gpu-inference"]),
        (["big", "viewer"], ["viewer", "big", "big-gpu-research"]),
        (["approver", "no-such-role"], ["approver"]),
    ],
)
def test_filter_offers_exactly_the_profiles_of_held_roles(
    values: dict[str, Any], roles: Sequence[str], expected: list[str]
) -> None:
    assert offered(values, role_user(*roles)) == expected


def test_filter_ignores_groups_that_only_look_like_roles(values: dict[str, Any]) -> None:
    user = UserInGroups(
        "eve", [Group("trainer"), Group("xztlab-role-admin"), Group("ZTLAB-ROLE-admin")]
    )
    with pytest.raises(web.HTTPError):
        offered(values, user)


def test_filter_accepts_group_names_as_strings(values: dict[str, Any]) -> None:
    user = UserInGroups("bob", ["ztlab-role-viewer"])  # type: ignore[list-item]
    assert offered(values, user) == ["viewer"]


def test_filter_offers_unknown_profiles_to_nobody(values: dict[str, Any]) -> None:
    extra = {"display_name": "sneaky", "slug": "sneaky", "kubespawner_override": {"uid": 0}}
    tampered = {**values, "singleuser": {**values["singleuser"]}}
    tampered["singleuser"]["profileList"] = [*values["singleuser"]["profileList"], extra]
    everyone = role_user(*{role for role, _, _ in EXPECTED_PROFILES.values()})
    assert "sneaky" not in offered(tampered, everyone)
    assert sorted(offered(tampered, everyone)) == sorted(EXPECTED_PROFILES)


@pytest.mark.parametrize("profile_list", [[], "missing"])
def test_filter_stops_the_hub_without_its_profiles(
    values: dict[str, Any], profile_list: object
) -> None:
    c = Config()
    if profile_list != "missing":
        c.KubeSpawner.profile_list = profile_list
    with pytest.raises(ValueError, match="profileList is empty"):
        exec(values["hub"]["extraConfig"][EXTRA_CONFIG_KEY], {"c": c})
    c.KubeSpawner.profile_list = values["singleuser"]["profileList"][:2]
    with pytest.raises(ValueError, match=r"profiles missing from singleuser\.profileList"):
        exec(values["hub"]["extraConfig"][EXTRA_CONFIG_KEY], {"c": c})


def test_filter_snippet_is_standalone_python() -> None:
    code = profile_filter_snippet({"a": "x", 'b"c': "y"})
    compile(code, "snippet.py", "exec")
    assert '"b\\"c": "y"' in code


# --------------------------------------------------------------------------------------
# Values and NetworkPolicies
# --------------------------------------------------------------------------------------


def test_values_hand_network_policy_and_metadata_blocking_to_ztlab(
    values: dict[str, Any],
) -> None:
    singleuser = values["singleuser"]
    assert singleuser["networkPolicy"] == {"enabled": False}
    assert singleuser["cloudMetadata"] == {"blockWithIptables": False}
    assert values["cull"] == {"enabled": True, "maxAge": 24 * 3600}
    spawner = values["hub"]["config"]["KubeSpawner"]
    assert spawner["automount_service_account_token"] is False
    assert spawner["container_security_context"]["capabilities"] == {"drop": ["ALL"]}


@pytest.fixture(scope="module")
def options() -> K8sOptions:
    return K8sOptions(
        namespace="jhub",
        release="lab",
        control_plane=(
            parse_egress_rule("app.kubernetes.io/name=mlflow@ztlab-system:5000"),
            parse_egress_rule("10.0.5.10/32:3128"),
        ),
    )


def test_network_policies_are_valid(options: K8sOptions) -> None:
    policies = render_network_policies(options)
    assert [p["metadata"]["name"] for p in policies] == [
        "ztlab-singleuser-default-deny",
        "ztlab-singleuser-ingress",
        "ztlab-singleuser-egress",
    ]
    for policy in policies:
        validate(policy)
        assert policy["metadata"]["namespace"] == "jhub"
        assert policy["spec"]["podSelector"] == {
            "matchLabels": {"app": "jupyterhub", "component": "singleuser-server", "release": "lab"}
        }


def test_default_deny_has_no_rules(options: K8sOptions) -> None:
    spec = render_network_policies(options)[0]["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in spec
    assert "egress" not in spec


def test_ingress_only_from_hub_and_proxy(options: K8sOptions) -> None:
    (rule,) = render_network_policies(options)[1]["spec"]["ingress"]
    assert [peer["podSelector"]["matchLabels"]["component"] for peer in rule["from"]] == [
        "hub",
        "proxy",
    ]
    assert all(set(peer) == {"podSelector"} for peer in rule["from"])  # this namespace only
    assert rule["ports"] == [{"port": "notebook-port", "protocol": "TCP"}]


def test_egress_only_to_hub_dns_and_control_plane(options: K8sOptions) -> None:
    hub, dns, mlflow, proxy = render_network_policies(options)[2]["spec"]["egress"]
    assert hub["ports"] == [{"port": 8081, "protocol": "TCP"}]
    assert hub["to"] == [
        {
            "podSelector": {
                "matchLabels": {"app": "jupyterhub", "component": "hub", "release": "lab"}
            }
        }
    ]
    assert dns["ports"] == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    assert dns["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]
    assert mlflow["to"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}
    assert proxy == {
        "to": [{"ipBlock": {"cidr": "10.0.5.10/32"}}],
        "ports": [{"port": 3128, "protocol": "TCP"}],
    }


def test_server_pods_are_selected_by_the_policies(values: dict[str, Any]) -> None:
    """The policies' selector matches the labels KubeSpawner puts on a server pod."""
    pod = pod_manifest(values, role_user("viewer"), "viewer")
    selector = render_network_policies()[0]["spec"]["podSelector"]["matchLabels"]
    labels = {**pod["metadata"]["labels"], "app": "jupyterhub"}  # z2jh's common_labels
    assert selector.items() <= labels.items()


# --------------------------------------------------------------------------------------
# Options and peers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("app=mlflow", Peer(pod_labels={"app": "mlflow"})),
        ("a=b,c=d@ns-1", Peer(pod_labels={"a": "b", "c": "d"}, namespace="ns-1")),
        ("@ztlab-system", Peer(namespace="ztlab-system")),
        ("10.0.0.0/8", Peer(cidr="10.0.0.0/8")),
        ("fd00::/8", Peer(cidr="fd00::/8")),
    ],
)
def test_parse_peer(text: str, expected: Peer) -> None:
    assert parse_peer(text) == expected
    assert parse_peer(str(expected)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "@",
        "app",
        "=x",
        "a=b,a=c",
        "a=b@Bad_NS",
        "bad key=x",
        "a=-x-",
        "10.0.0.1/8",
        "300.0.0.0/8",
    ],
)
def test_parse_peer_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_peer(text)


def test_parse_egress_rule() -> None:
    assert parse_egress_rule("k8s-app=kube-dns@kube-system:53/udp") == EgressRule(
        peer=Peer(pod_labels={"k8s-app": "kube-dns"}, namespace="kube-system"),
        port=53,
        protocol="UDP",
    )
    assert parse_egress_rule("fd00::/8:443").peer == Peer(cidr="fd00::/8")


@pytest.mark.parametrize("text", ["app=x", "app=x:", "app=x:0", "app=x:70000", "app=x:80/icmp"])
def test_parse_egress_rule_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_egress_rule(text)


@pytest.mark.parametrize(
    "changes",
    [
        {"uid": 0},
        {"fs_gid": 0},
        {"uid": -5},
        {"guarantee": 0.0},
        {"guarantee": 1.5},
        {"namespace": "Not_A_Namespace"},
        {"release": ""},
        {"gpu_resource": "gpu"},
        {"pool_label": "bad label"},
        {"hub_port": 0},
        {"dns": ()},
    ],
)
def test_options_refuse_unsafe_or_malformed_values(changes: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        K8sOptions(**changes)


def test_slugs_that_collide_are_refused() -> None:
    tables = {
        "roles": {"trainer-gpu-research": {}},
        "gpu": {"pools": {"research": {"gpus": ["0"], "roles": ["trainer"]}}},
    }
    with pytest.raises(ConfigError, match='profile "trainer-gpu-research"'):
        profiles(parse_config(tables))


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------


def write_config(directory: Path, text: str) -> Path:
    path = directory / "ztlab.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o644)
    return path


GOOD_TOML = """\
[roles.trainer]
max_gpus = 2

[gpu.pools.research]
gpus = ["0", "1"]
roles = ["trainer"]
"""


def test_render_writes_values_and_policies(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD_TOML)
    out = tmp_path / "out" / "k8s"
    result = CliRunner().invoke(
        k8s_group,
        [
            "render",
            str(path),
            "--out",
            str(out),
            "--namespace",
            "jhub",
            "--allow-egress",
            "app=mlflow@ztlab-system:5000",
            "--dns",
            "10.96.0.10/32",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"{out / 'values.yaml'}: 6 profiles" in result.output
    values = yaml.safe_load((out / "values.yaml").read_text())
    assert values == render_values(load_config(path), K8sOptions(namespace="jhub"))
    trainer_gpu = next(
        p for p in values["singleuser"]["profileList"] if p["slug"] == "trainer-gpu-research"
    )
    assert trainer_gpu["kubespawner_override"]["extra_resource_limits"] == {"nvidia.com/gpu": "2"}
    text = (out / "values.yaml").read_text()
    assert f"    {EXTRA_CONFIG_KEY}: |\n" in text  # the snippet stays readable
    policies = list(yaml.safe_load_all((out / "networkpolicies.yaml").read_text()))
    assert len(policies) == 3
    for policy in policies:
        validate(policy)
    egress = policies[2]["spec"]["egress"]
    assert egress[1]["to"] == [{"ipBlock": {"cidr": "10.96.0.10/32"}}]
    assert egress[2]["ports"] == [{"port": 5000, "protocol": "TCP"}]


def test_render_reads_ztlab_config_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZTLAB_CONFIG", str(write_config(tmp_path, GOOD_TOML)))
    result = CliRunner().invoke(k8s_group, ["render", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "networkpolicies.yaml").is_file()


@pytest.mark.parametrize(
    ("toml", "args", "message"),
    [
        ('[gpu.pools.p]\ngpus = ["0"]\nroles = ["nobody"]\n', [], 'role "nobody" does not exist'),
        ("state_dir = 3\n", [], "state_dir"),
        (GOOD_TOML, ["--allow-egress", "app=mlflow"], "PEER:PORT"),
        (GOOD_TOML, ["--uid", "0"], "uid"),
        (GOOD_TOML, ["--dns", "not a peer"], "not a network"),
    ],
)
def test_render_exits_2_on_bad_input(
    tmp_path: Path, toml: str, args: list[str], message: str
) -> None:
    path = write_config(tmp_path, toml)
    out = tmp_path / "out"
    result = CliRunner().invoke(k8s_group, ["render", str(path), "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ")
    assert message in result.output
    assert not out.exists()


def test_render_exits_2_when_the_config_is_missing(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        k8s_group, ["render", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2
    assert "error: " in result.output


def test_render_requires_out() -> None:
    result = CliRunner().invoke(k8s_group, ["render"])
    assert result.exit_code == 2
    assert "--out" in result.output
