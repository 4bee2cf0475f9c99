"""The policy engine: loading policies as code, checking requests, explaining, auditing."""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztlab.common.errors import PolicyError, UsageError
from ztlab.hub.policy import AUDIT_ACTION, PolicyEngine, Principal, default_policy_files

SCHEMA = default_policy_files()["schema.cedarschema"]

GOOD = """\
@id("trainer-lease-gpu")
@reason("trainers lease GPUs")
permit (principal in Ztlab::Role::"trainer", action == Ztlab::Action::"lease_gpu", resource);
"""


class ListSink:
    """An :class:`AuditSink` that keeps what it is given."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def record(self, *, actor: str, action: str, detail: Mapping[str, Any]) -> None:
        with self.lock:
            self.records.append({"actor": actor, "action": action, "detail": dict(detail)})


class FailingSink:
    def record(self, *, actor: str, action: str, detail: Mapping[str, Any]) -> None:
        raise RuntimeError("audit log is gone")


def trainer(name: str = "alice") -> Principal:
    return Principal(name=name, roles=frozenset({"trainer"}))


def write(directory: Path, files: Mapping[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine.defaults()


# --- loading -------------------------------------------------------------------------------


def test_from_directory_uses_its_own_schema_or_the_shipped_one(tmp_path: Path) -> None:
    only_policies = write(tmp_path / "a", {"gpu.cedar": GOOD})
    engine = PolicyEngine.from_directory(only_policies)
    assert engine.policy_ids == ("trainer-lease-gpu",)
    assert len(engine.actions) == 15
    assert engine.authorize(trainer(), "lease_gpu", "pool:research").allowed
    assert not engine.authorize(trainer(), "join_pool", "pool:research").allowed

    small_schema = """
    namespace Ztlab {
      entity Role; entity User in [Role] { name: String }; entity Pool;
      action lease_gpu appliesTo { principal: User, resource: Pool };
    }
    """
    own = write(tmp_path / "b", {"gpu.cedar": GOOD, "schema.cedarschema": small_schema})
    engine = PolicyEngine.from_directory(str(own))
    assert engine.actions == ("lease_gpu",)


def test_defaults_load_and_validate(engine: PolicyEngine) -> None:
    assert len(engine.policy_ids) == len(set(engine.policy_ids)) == 38
    assert engine.resource_kinds("lease_gpu") == ("pool",)
    assert engine.resource_kinds("spawn_server") == ("server",)
    assert engine.policy_reason("two-person-rule").startswith("a model version is approved")


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    bad = GOOD + '\n@id("b")\n@reason("r")\npermit (principal, action resource);\n'
    directory = write(tmp_path, {"good.cedar": GOOD, "broken.cedar": bad})
    with pytest.raises(PolicyError) as info:
        PolicyEngine.from_directory(directory)
    message = info.value.message
    assert f"{directory / 'broken.cedar'}:5: syntax error" in message
    assert "unexpected token" in message
    assert info.value.exit_code == 2


def test_unterminated_policy_names_file_and_line(tmp_path: Path) -> None:
    directory = write(tmp_path, {"x.cedar": GOOD + '\n// tail\n@id("x")\npermit (principal,'})
    with pytest.raises(PolicyError, match=r"x\.cedar:6: syntax error"):
        PolicyEngine.from_directory(directory)


@pytest.mark.parametrize(
    ("policy", "problem"),
    [
        (
            'permit (principal, action == Ztlab::Action::"lease_gpus", resource);',
            'unrecognized action `Ztlab::Action::"lease_gpus"`',
        ),
        (
            'permit (principal, action == Ztlab::Action::"sign_model", resource)\n'
            'when { context.trainr == "a" };',
            "attribute `trainr` in context",
        ),
        (
            'permit (principal, action == Ztlab::Action::"lease_gpu", resource)\n'
            'when { principal.nam == "a" };',
            "attribute `nam` on entity type `Ztlab::User` not found",
        ),
        (
            'permit (principal, action == Ztlab::Action::"sign_model", resource)\n'
            'when { context.trainer == "a" };',
            "optional attribute `trainer`",
        ),
        (
            'permit (principal, action == Ztlab::Action::"lease_gpu", resource is Ztlab::Dataset);',
            "unable to find an applicable action",
        ),
    ],
    ids=["action-typo", "context-typo", "principal-attribute-typo", "unguarded-optional", "kind"],
)
def test_schema_violation_names_file_line_and_problem(
    tmp_path: Path, policy: str, problem: str
) -> None:
    text = GOOD + f'\n@id("broken")\n@reason("r")\n{policy}\n'
    directory = write(tmp_path, {"rules.cedar": text})
    with pytest.raises(PolicyError) as info:
        PolicyEngine.from_directory(directory)
    message = info.value.message
    assert message.startswith(f"{directory / 'rules.cedar'}:5: policy 'broken' does not match")
    assert problem in message
    assert "policy0" not in message


def test_missing_id_names_file_and_line(tmp_path: Path) -> None:
    text = GOOD + '\n// no id\n@reason("r")\npermit (principal, action, resource);\n'
    directory = write(tmp_path, {"noid.cedar": text})
    with pytest.raises(PolicyError, match=r'noid\.cedar:6: policy has no @id\("\.\.\."\)'):
        PolicyEngine.from_directory(directory)


def test_missing_reason_is_rejected(tmp_path: Path) -> None:
    directory = write(tmp_path, {"r.cedar": '@id("x")\npermit (principal, action, resource);'})
    with pytest.raises(PolicyError, match=r"r\.cedar:1: policy 'x' has no @reason"):
        PolicyEngine.from_directory(directory)


def test_duplicate_id_names_both_places(tmp_path: Path) -> None:
    directory = write(tmp_path, {"a.cedar": GOOD, "b.cedar": "\n\n" + GOOD})
    with pytest.raises(PolicyError) as info:
        PolicyEngine.from_directory(directory)
    assert info.value.message == (
        f"{directory / 'b.cedar'}:3: duplicate @id 'trainer-lease-gpu', "
        f"already used at {directory / 'a.cedar'}:1"
    )


def test_ids_must_be_plain_names(tmp_path: Path) -> None:
    directory = write(
        tmp_path,
        {"a.cedar": '@id("two words")\n@reason("r")\npermit (principal, action, resource);'},
    )
    with pytest.raises(PolicyError, match=r"a\.cedar:1: @id 'two words' is not a plain name"):
        PolicyEngine.from_directory(directory)


def test_templates_are_rejected(tmp_path: Path) -> None:
    text = '@id("t")\n@reason("r")\npermit (principal == ?principal, action, resource);'
    with pytest.raises(PolicyError, match=r"t\.cedar:1: policy is a template"):
        PolicyEngine.from_directory(write(tmp_path, {"t.cedar": text}))


def test_semicolons_in_strings_and_comments_do_not_split_policies(tmp_path: Path) -> None:
    text = (
        '// a comment; with "quotes\n'
        '@id("x")\n@reason("one; two \\" three")\n'
        'permit (principal in Ztlab::Role::"trainer", action == Ztlab::Action::"lease_gpu", '
        'resource) when { "a;b" like "*;*" };\n'
        '@id("y")\n@reason("y")\npermit (principal, action == Ztlab::Action::"read_audit", '
        "resource) unless { true };\n"
    )
    engine = PolicyEngine.from_directory(write(tmp_path, {"s.cedar": text}))
    assert engine.policy_ids == ("x", "y")
    assert engine.policy_reason("x") == 'one; two " three'


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        ({}, "holds no policy files"),
        ({"empty.cedar": "// nothing here\n"}, "no policies in"),
        (
            {"a.cedar": GOOD, "schema.cedarschema": "namespace Ztlab { entity"},
            "invalid Cedar schema",
        ),
        (
            {"a.cedar": GOOD, "schema.cedarschema": "namespace Ztlab { entity Pool; }"},
            "must declare entity types Ztlab::User and Ztlab::Role",
        ),
        (
            {
                "a.cedar": GOOD,
                "schema.cedarschema": (
                    "namespace Ztlab { entity Role; entity User in [Role] { name: String };"
                    " entity Pool { size: Long };"
                    " action lease_gpu appliesTo { principal: User, resource: Pool }; }"
                ),
            },
            "resource type Ztlab::Pool must be a plain entity type",
        ),
        (
            {
                "a.cedar": GOOD,
                "schema.cedarschema": (
                    "namespace Ztlab { entity Role; entity User in [Role] { name: String };"
                    " entity Pool;"
                    " action lease_gpu appliesTo { principal: User, resource: Pool,"
                    " context: { who: User } }; }"
                ),
            },
            "context of action 'lease_gpu'.who has type Ztlab::User",
        ),
    ],
    ids=["no-files", "no-policies", "schema-syntax", "no-user", "resource-attrs", "entity-context"],
)
def test_bad_policy_directories(tmp_path: Path, files: dict[str, str], problem: str) -> None:
    directory = write(tmp_path / "p", files)
    with pytest.raises(PolicyError, match=re.escape(problem)) as info:
        PolicyEngine.from_directory(directory)
    if "schema.cedarschema" in files:
        assert str(directory / "schema.cedarschema") in info.value.message


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist or is not a directory"):
        PolicyEngine.from_directory(tmp_path / "nope")


def test_policy_error_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        PolicyEngine(schema=SCHEMA, policies={"x.cedar": "permit (principal, action"})


# --- requests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "resource", "context", "message"),
    [
        (
            "lease",
            "pool:research",
            None,
            "unknown action 'lease'; expected one of: access_server, approve_model,",
        ),
        (
            "lease_gpu",
            "dataset:mnist@3",
            None,
            "action 'lease_gpu' applies to pool resources (pool:NAME), got 'dataset:mnist@3'",
        ),
        ("lease_gpu", "research", None, "malformed resource 'research': expected KIND:NAME"),
        ("lease_gpu", "pool:", None, "malformed resource 'pool:'"),
        ("lease_gpu", ":research", None, "malformed resource ':research'"),
        ("lease_gpu", "pool:my pool", None, "malformed resource 'pool:my pool'"),
        ("lease_gpu", "Pool:research", None, "malformed resource 'Pool:research'"),
        (
            "lease_gpu",
            "gpu:a100",
            None,
            "unknown resource kind 'gpu' in 'gpu:a100'; action 'lease_gpu' applies to pool",
        ),
        (
            "lease_gpu",
            "pool:research",
            {"gpu": 2},
            "unknown context key 'gpu' for action 'lease_gpu'; "
            "expected keys: gpus (Long), source_ip (ipaddr)",
        ),
        (
            "lease_gpu",
            "pool:research",
            {"gpus": "2"},
            "context key 'gpus' of action 'lease_gpu' must be a Long, got str '2'",
        ),
        (
            "lease_gpu",
            "pool:research",
            {"gpus": True},
            "context key 'gpus' of action 'lease_gpu' must be a Long, got bool True",
        ),
        (
            "lease_gpu",
            "pool:research",
            {"gpus": 2**63},
            "context key 'gpus' of action 'lease_gpu' is out of the Long range",
        ),
        (
            "sign_model",
            "model:churn@7",
            {"trainer": 7},
            "context key 'trainer' of action 'sign_model' must be a String, got int 7",
        ),
        (
            "spawn_server",
            "server:alice",
            {"source_ip": "10.0.0.300"},
            "context key 'source_ip' of action 'spawn_server' must be an ipaddr",
        ),
        ("read_audit", "audit:main", {"trainer": "x"}, "unknown context key 'trainer'"),
    ],
)
def test_bad_requests_are_rejected(
    engine: PolicyEngine,
    action: str,
    resource: str,
    context: dict[str, Any] | None,
    message: str,
) -> None:
    with pytest.raises(PolicyError) as info:
        engine.authorize(trainer(), action, resource, context)
    assert message in info.value.message
    assert info.value.exit_code == 2


def test_context_must_be_a_mapping(engine: PolicyEngine) -> None:
    with pytest.raises(PolicyError, match="must be a mapping, got list"):
        engine.authorize(trainer(), "lease_gpu", "pool:research", [("gpus", 1)])  # type: ignore[arg-type]


def test_valid_context_values_are_accepted(engine: PolicyEngine) -> None:
    for ip in ("10.0.0.1", "10.0.0.0/8", "::1", "2001:db8::/32"):
        decision = engine.authorize(
            trainer(), "lease_gpu", "pool:research", {"source_ip": ip, "gpus": 8}
        )
        assert decision.allowed, ip
    assert engine.authorize(trainer(), "lease_gpu", "pool:research", {}).allowed


@pytest.mark.parametrize(
    ("name", "roles", "message"),
    [
        ("", frozenset(), "invalid principal name ''"),
        ("al ice", frozenset(), "invalid principal name 'al ice'"),
        ("alice", "trainer", "must be a set of role names, got 'trainer'"),
        ("alice", frozenset({"trainer admin"}), "invalid role 'trainer admin'"),
        ("alice", frozenset({""}), "invalid role ''"),
        ("alice", frozenset({'Ztlab::Role::"admin"'}), "a role is a plain name"),
    ],
)
def test_principals_are_checked(name: str, roles: Any, message: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(message)):
        Principal(name=name, roles=roles)


def test_principal_roles_become_a_frozenset() -> None:
    principal = Principal(name="alice", roles=["trainer", "trainer"])  # type: ignore[arg-type]
    assert principal.roles == frozenset({"trainer"})
    assert isinstance(principal.roles, frozenset)


def test_roles_are_not_cached_across_principals_with_the_same_name(engine: PolicyEngine) -> None:
    assert engine.authorize(trainer("sam"), "lease_gpu", "pool:research").allowed
    viewer = Principal(name="sam", roles=frozenset({"viewer"}))
    assert not engine.authorize(viewer, "lease_gpu", "pool:research").allowed
    assert engine.authorize(trainer("sam"), "lease_gpu", "pool:research").allowed


@settings(max_examples=200, deadline=None)
@given(
    name=st.text(min_size=1, max_size=20).filter(lambda s: not re.search(r"[\s\x00-\x1f\x7f]", s)),
    roles=st.frozensets(st.sampled_from(["admin", "trainer", "approver", "viewer", "x-y.z"])),
    resource_name=st.text(min_size=1, max_size=20).filter(
        lambda s: not re.search(r"[\s\x00-\x1f\x7f]", s)
    ),
)
def test_any_well_formed_request_gets_a_decision(
    name: str, roles: frozenset[str], resource_name: str
) -> None:
    engine = PolicyEngine.defaults()
    principal = Principal(name=name, roles=roles)
    decision = engine.authorize(principal, "spawn_server", f"server:{resource_name}")
    assert decision.allowed is (resource_name == name and bool(roles - {"x-y.z"}))
    gpu = engine.authorize(principal, "lease_gpu", f"pool:{resource_name}")
    assert gpu.allowed is ("trainer" in roles)


# --- decisions and their explanations ------------------------------------------------------

CUSTOM_SCHEMA = """
namespace Ztlab {
  type Limits = { max_gpus: Long, labels?: Set<String> };
  entity Role;
  entity User in [Role] { name: String };
  entity Pool;
  entity ModelVersion;
  action model_ops;
  action "promote_model" in [model_ops] appliesTo {
    principal: User,
    resource: ModelVersion,
    context: { score?: decimal, limits?: Limits, tags?: Set<String> },
  };
  action lease_gpu appliesTo { principal: User, resource: Pool, context: { gpus?: Long } };
}
"""

CUSTOM_POLICIES = """
@id("ops-model-ops")
@reason("operators run model operations")
permit (principal in Ztlab::Role::"ops", action in Ztlab::Action::"model_ops", resource);

@id("anyone-leases")
@reason("anyone may lease")
permit (principal, action == Ztlab::Action::"lease_gpu", resource);

@id("overflowing-guardrail")
@reason("a guardrail that fails to evaluate for large requests")
forbid (principal, action == Ztlab::Action::"lease_gpu", resource)
when { context has gpus && context.gpus * 4611686018427387904 > 10 };
"""


@pytest.fixture(scope="module")
def custom() -> PolicyEngine:
    return PolicyEngine(schema=CUSTOM_SCHEMA, policies={"custom.cedar": CUSTOM_POLICIES})


def test_custom_schema_facts(custom: PolicyEngine) -> None:
    assert custom.actions == ("lease_gpu", "promote_model")
    assert custom.resource_kinds("promote_model") == ("model_version",)


def test_action_groups_and_structured_context(custom: PolicyEngine) -> None:
    ops = Principal(name="olga", roles=frozenset({"ops"}))
    context = {"score": "0.95", "limits": {"max_gpus": 2, "labels": ["a"]}, "tags": {"x", "y"}}
    decision = custom.authorize(ops, "promote_model", "model_version:churn@7", context)
    assert (decision.allowed, decision.policy_id) == (True, "ops-model-ops")


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({"limits": {"labels": []}}, "context key 'limits.max_gpus' (Long) is required"),
        ({"limits": {"max_gpus": "2"}}, "context key 'limits.max_gpus' of action"),
        ({"limits": {"max_gpus": 1, "x": 1}}, "unknown context key 'limits.x'"),
        ({"tags": ["a", 1]}, "context key 'tags[]' of action 'promote_model' must be a String"),
        ({"tags": "a"}, "context key 'tags' of action 'promote_model' must be a Set<String>"),
        ({"score": "1.23456"}, "must be a decimal"),
    ],
)
def test_structured_context_errors(
    custom: PolicyEngine, context: dict[str, Any], message: str
) -> None:
    ops = Principal(name="olga", roles=frozenset({"ops"}))
    with pytest.raises(PolicyError, match=re.escape(message)):
        custom.authorize(ops, "promote_model", "model_version:churn@7", context)


def test_evaluation_errors_fail_closed(custom: PolicyEngine) -> None:
    user = Principal(name="u", roles=frozenset())
    assert custom.authorize(user, "lease_gpu", "pool:p", {"gpus": 0}).allowed
    decision = custom.authorize(user, "lease_gpu", "pool:p", {"gpus": 4})
    assert not decision.allowed
    assert decision.policy_id is None
    assert decision.reason.startswith("denied: a policy failed to evaluate, failing closed")
    assert "overflowing-guardrail" in decision.reason
    assert "overflow" in decision.reason


# --- audit ---------------------------------------------------------------------------------


def test_every_decision_is_audited_once(engine: PolicyEngine) -> None:
    sink = ListSink()
    audited = PolicyEngine.defaults(audit=sink)
    approver = Principal(name="bob", roles=frozenset({"approver", "viewer"}))
    self_approval = audited.authorize(
        approver, "approve_model", "model:churn@7", {"trainer": "bob"}
    )
    assert len(sink.records) == 1
    audited.authorize(trainer(), "lease_gpu", "pool:research", {"gpus": 2})
    assert sink.records == [
        {
            "actor": "bob",
            "action": AUDIT_ACTION,
            "detail": {
                "roles": ["approver", "viewer"],
                "action": "approve_model",
                "resource": "model:churn@7",
                "allowed": False,
                "policy_id": "two-person-rule",
                "reason": self_approval.reason,
                "context": {"trainer": "bob"},
            },
        },
        {
            "actor": "alice",
            "action": "policy.decision",
            "detail": {
                "roles": ["trainer"],
                "action": "lease_gpu",
                "resource": "pool:research",
                "allowed": True,
                "policy_id": "trainer-lease-gpu",
                "reason": "permitted by policy 'trainer-lease-gpu': trainers lease GPUs to train "
                "models",
                "context": {"gpus": 2},
            },
        },
    ]
    # an engine without a sink decides the same and records nothing anywhere
    assert engine.authorize(approver, "approve_model", "model:churn@7", {"trainer": "bob"}) == (
        self_approval
    )
    assert len(sink.records) == 2


def test_rejected_requests_are_not_decisions_and_not_audited() -> None:
    sink = ListSink()
    engine = PolicyEngine.defaults(audit=sink)
    with pytest.raises(PolicyError):
        engine.authorize(trainer(), "lease_gpu", "dataset:mnist@3")
    assert sink.records == []


def test_an_audit_failure_propagates() -> None:
    engine = PolicyEngine.defaults(audit=FailingSink())
    with pytest.raises(RuntimeError, match="audit log is gone"):
        engine.authorize(trainer(), "lease_gpu", "pool:research")


def test_concurrent_decisions_are_all_audited() -> None:
    sink = ListSink()
    engine = PolicyEngine.defaults(audit=sink)

    def work(n: int) -> None:
        for i in range(50):
            principal = trainer(f"user{n}-{i % 5}")
            assert engine.authorize(principal, "lease_gpu", "pool:research").allowed

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(sink.records) == 400
    assert all(r["detail"]["allowed"] for r in sink.records)
