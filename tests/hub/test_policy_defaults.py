"""The shipped default policies, cell by cell: roles x actions x resources.

Every cell is written out: ``A:<id>`` allowed by that policy, ``F:<id>`` forbidden by
that guardrail, ``D`` denied by default (no policy permits it).

``respond_to_alert`` has its own table: its principal is an alert's subject (whose process
or GPU it is), not a user asking to do something, so it is not among what a user may do.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import pytest

from ztlab.common.errors import PolicyError
from ztlab.hub.monitor import findings
from ztlab.hub.policy import Decision, PolicyEngine, Principal, _cedar, default_policy_files

ROLES = ("admin", "data-steward", "trainer", "approver", "viewer", "", "auditor")
"""Columns of the table: the five shipped roles, no role at all, an unknown role."""

# case -> (action, resource, context); "{me}" is the requesting user's name
CASES: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "spawn_own_server": ("spawn_server", "server:{me}", None),
    "spawn_other_server": ("spawn_server", "server:mallory", None),
    "access_own_server": ("access_server", "server:{me}", {"route": "files", "method": "GET"}),
    "access_other_server": ("access_server", "server:mallory", {"route": "other"}),
    "lease_gpu": ("lease_gpu", "pool:research", {"gpus": 2}),
    "join_pool": ("join_pool", "pool:research", None),
    "read_dataset": ("read_dataset", "dataset:mnist@3", None),
    "register_dataset": ("register_dataset", "dataset:mnist@3", None),
    "register_own_model": ("register_model", "model:churn@7", {"trainer": "{me}"}),
    "register_model_no_trainer": ("register_model", "model:churn@7", None),
    "register_others_model": ("register_model", "model:churn@7", {"trainer": "mallory"}),
    "sign_own_model": ("sign_model", "model:churn@7", {"trainer": "{me}"}),
    "sign_others_model": ("sign_model", "model:churn@7", {"trainer": "mallory"}),
    "sign_model_no_trainer": ("sign_model", "model:churn@7", None),
    "approve_others_model": ("approve_model", "model:churn@7", {"trainer": "mallory"}),
    "approve_own_model": ("approve_model", "model:churn@7", {"trainer": "{me}"}),
    "approve_model_no_trainer": ("approve_model", "model:churn@7", None),
    "run_schedule": ("run_schedule", "schedule:nightly", None),
    "read_audit": ("read_audit", "audit:main", None),
    "use_base_environment": ("use_environment", "environment:base", None),
    "use_gpu_environment": ("use_environment", "environment:gpu", None),
    "manage_environment": ("manage_environment", "environment:gpu", None),
    "approve_package": ("approve_package", "package:requests", None),
}

D = "D"
NO_GPU = "F:admins-do-not-compute"
OWN_SERVER = "F:own-server-only"
TWO_PERSON = "F:two-person-rule"
SIGN_OWN = "F:sign-own-models-only"
REGISTER_OWN = "F:register-own-models-only"
OWN_USE = "F:own-server-use-only"

# fmt: off
TABLE: dict[str, tuple[str, ...]] = {
    #                             admin                  data-steward                      trainer                     approver                      viewer                 none          auditor  # noqa: E501
    "spawn_own_server":          ("A:admin-spawn-server", "A:data-steward-spawn-server", "A:trainer-spawn-server", "A:approver-spawn-server", "A:viewer-spawn-server", D, D),  # noqa: E501
    "spawn_other_server":        (OWN_SERVER, OWN_SERVER, OWN_SERVER, OWN_SERVER, OWN_SERVER, OWN_SERVER, OWN_SERVER),  # noqa: E501
    "access_own_server":         ("A:admin-use-server", "A:data-steward-use-server", "A:trainer-use-server", "A:approver-use-server", "A:viewer-use-server", D, D),  # noqa: E501
    "access_other_server":       (OWN_USE, OWN_USE, OWN_USE, OWN_USE, OWN_USE, OWN_USE, OWN_USE),
    "lease_gpu":                 (NO_GPU, D, "A:trainer-lease-gpu", D, D, D, D),
    "join_pool":                 (NO_GPU, D, "A:trainer-join-pool", D, D, D, D),
    "read_dataset":              (D, "A:data-steward-read-dataset", "A:trainer-read-dataset", D, D, D, D),  # noqa: E501
    "register_dataset":          (D, "A:data-steward-register-dataset", D, D, D, D, D),
    "register_own_model":        (D, D, "A:trainer-register-model", D, D, D, D),
    "register_model_no_trainer": (D, D, "A:trainer-register-model", D, D, D, D),
    "register_others_model":     (REGISTER_OWN, REGISTER_OWN, REGISTER_OWN, REGISTER_OWN, REGISTER_OWN, REGISTER_OWN, REGISTER_OWN),  # noqa: E501
    "sign_own_model":            (D, D, "A:trainer-sign-model", D, D, D, D),
    "sign_others_model":         (SIGN_OWN, SIGN_OWN, SIGN_OWN, SIGN_OWN, SIGN_OWN, SIGN_OWN, SIGN_OWN),  # noqa: E501
    "sign_model_no_trainer":     (SIGN_OWN, SIGN_OWN, SIGN_OWN, SIGN_OWN, SIGN_OWN, SIGN_OWN, SIGN_OWN),  # noqa: E501
    "approve_others_model":      (D, D, D, "A:approver-approve-model", D, D, D),
    "approve_own_model":         (TWO_PERSON, TWO_PERSON, TWO_PERSON, TWO_PERSON, TWO_PERSON, TWO_PERSON, TWO_PERSON),  # noqa: E501
    "approve_model_no_trainer":  (TWO_PERSON, TWO_PERSON, TWO_PERSON, TWO_PERSON, TWO_PERSON, TWO_PERSON, TWO_PERSON),  # noqa: E501
    "run_schedule":              ("A:admin-run-schedule", D, "A:trainer-run-schedule", D, D, D, D),
    "read_audit":                ("A:admin-read-audit", D, D, D, D, D, D),
    "use_base_environment":      ("A:admin-use-base-environment", "A:data-steward-use-base-environment", "A:trainer-use-base-environment", "A:approver-use-base-environment", "A:viewer-use-base-environment", D, D),  # noqa: E501
    "use_gpu_environment":       (D, D, "A:trainer-use-environments", D, D, D, D),
    "manage_environment":        ("A:admin-manage-environments", D, D, D, D, D, D),
    "approve_package":           ("A:admin-approve-packages", D, D, D, D, D, D),
}
# fmt: on


ALERT_KINDS = (
    "unleased_process",
    "outside_cgroup",
    "miner",
    "baseline",
    "idle_full_load",
    "xid_error",
    "ecc_error",
    "handover_dirty",
)
ALERT_RESPONSES = ("notify", "stop_server", "revoke_lease")
NOTIFY = "A:alert-notify"
STOP = "A:alert-stop-intruder"
REVOKE = "A:alert-revoke-broken-lease"

# alert kind -> the expected cell of (notify, stop_server, revoke_lease), the same for every
# subject's roles (the no-role column is the ztlab-unattributed principal)
ALERT_TABLE: dict[str, tuple[str, str, str]] = {
    "unleased_process": (NOTIFY, STOP, REVOKE),
    "outside_cgroup": (NOTIFY, D, D),
    "miner": (NOTIFY, STOP, REVOKE),
    "baseline": (NOTIFY, D, D),
    "idle_full_load": (NOTIFY, D, D),
    "xid_error": (NOTIFY, D, D),
    "ecc_error": (NOTIFY, D, D),
    "handover_dirty": (NOTIFY, D, D),
}


def _alert_request(kind: str, response: str) -> tuple[str, str, dict[str, Any]]:
    context = {"response": response, "severity": "critical", "pool": "research"}
    return "respond_to_alert", f"alert:{kind}", context


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine.defaults()


def _request(case: str, me: str) -> tuple[str, str, dict[str, Any] | None]:
    action, resource, context = CASES[case]
    if context is not None:
        context = {k: (v.format(me=me) if isinstance(v, str) else v) for k, v in context.items()}
    return action, resource.format(me=me), context


def _principal(*roles: str, name: str = "alice") -> Principal:
    return Principal(name=name, roles=frozenset(r for r in roles if r))


def _assert_cell(decision: Decision, expected: str, where: str) -> None:
    if expected == D:
        assert not decision.allowed, where
        assert decision.policy_id is None, where
        assert decision.reason.startswith("denied by default: no policy permits roles ["), where
        return
    effect, policy_id = expected.split(":", 1)
    assert decision.policy_id == policy_id, where
    if effect == "A":
        assert decision.allowed, where
        assert decision.reason.startswith(f"permitted by policy '{policy_id}': "), where
    else:
        assert not decision.allowed, where
        assert decision.reason.startswith(f"forbidden by policy '{policy_id}': "), where


def test_table_covers_every_action_and_every_policy(engine: PolicyEngine) -> None:
    assert {action for action, _, _ in CASES.values()} | {"respond_to_alert"} == set(engine.actions)
    assert set(TABLE) == set(CASES)
    assert all(len(row) == len(ROLES) for row in TABLE.values())
    assert set(ALERT_TABLE) == set(ALERT_KINDS) == set(findings.ALERT_KINDS)
    cells = [cell for row in TABLE.values() for cell in row]
    cells += [cell for row in ALERT_TABLE.values() for cell in row]
    decisive = {cell.split(":", 1)[1] for cell in cells if cell != D}
    assert decisive == set(engine.policy_ids)


@pytest.mark.parametrize("kind", ALERT_KINDS)
@pytest.mark.parametrize("column", range(len(ROLES)), ids=[r or "no-role" for r in ROLES])
def test_default_alert_responses(engine: PolicyEngine, kind: str, column: int) -> None:
    role = ROLES[column]
    name = "alice" if role else "ztlab-unattributed"
    for response, expected in zip(ALERT_RESPONSES, ALERT_TABLE[kind], strict=True):
        decision = engine.authorize(_principal(role, name=name), *_alert_request(kind, response))
        _assert_cell(decision, expected, f"{response} to {kind} for {role or 'no role'}")


def test_an_admins_own_miner_is_stopped_too(engine: PolicyEngine) -> None:
    """No role is spared a response: the subject of a miner alert is stopped, admin or not."""
    for roles in (("admin",), ("admin", "trainer"), ("approver", "data-steward", "viewer")):
        for response in ("stop_server", "revoke_lease"):
            decision = engine.authorize(
                _principal(*roles, name="root"), *_alert_request("miner", response)
            )
            assert decision.allowed, (roles, response)


def test_alert_responses_need_a_response_and_only_known_context(engine: PolicyEngine) -> None:
    with pytest.raises(PolicyError, match="context key 'response' \\(String\\) is required"):
        engine.authorize(_principal("trainer"), "respond_to_alert", "alert:miner", {})
    with pytest.raises(PolicyError, match="unknown context key 'gpus'"):
        engine.authorize(
            _principal("trainer"),
            "respond_to_alert",
            "alert:miner",
            {"response": "notify", "gpus": 1},
        )
    with pytest.raises(PolicyError, match="applies to alert resources"):
        engine.authorize(
            _principal("trainer"), "respond_to_alert", "pool:research", {"response": "notify"}
        )
    # an unknown response is permitted by nothing
    unknown = engine.authorize(
        _principal("admin"), "respond_to_alert", "alert:miner", {"response": "reboot_host"}
    )
    assert (unknown.allowed, unknown.policy_id) == (False, None)


@pytest.mark.parametrize("case", list(TABLE))
@pytest.mark.parametrize("column", range(len(ROLES)), ids=[r or "no-role" for r in ROLES])
def test_default_policy_table(engine: PolicyEngine, case: str, column: int) -> None:
    role = ROLES[column]
    action, resource, context = _request(case, "alice")
    decision = engine.authorize(_principal(role), action, resource, context)
    _assert_cell(decision, TABLE[case][column], f"{case} as {role or 'no role'}")


def test_user_without_roles_is_denied_everything(engine: PolicyEngine) -> None:
    for case in CASES:
        action, resource, context = _request(case, "nobody")
        decision = engine.authorize(_principal(name="nobody"), action, resource, context)
        assert not decision.allowed, case


def test_viewer_may_only_spawn_and_use_own_server_in_the_base_environment(
    engine: PolicyEngine,
) -> None:
    allowed = {
        case
        for case in CASES
        if engine.authorize(_principal("viewer", name="vera"), *_request(case, "vera")).allowed
    }
    assert allowed == {"spawn_own_server", "access_own_server", "use_base_environment"}


def test_reason_texts(engine: PolicyEngine) -> None:
    viewer = _principal("viewer", name="vera")
    assert engine.authorize(viewer, "lease_gpu", "pool:research").reason == (
        "denied by default: no policy permits roles [viewer] to lease_gpu on pool:research"
    )
    trainer = _principal("trainer")
    assert engine.authorize(trainer, "lease_gpu", "pool:research").reason == (
        "permitted by policy 'trainer-lease-gpu': trainers lease GPUs to train models"
    )
    self_approval = engine.authorize(
        _principal("approver", name="bob"), "approve_model", "model:churn@7", {"trainer": "bob"}
    )
    assert self_approval.reason.startswith("forbidden by policy 'two-person-rule': ")
    assert "someone other than its trainer" in self_approval.reason
    both = engine.authorize(
        _principal("trainer", "approver"), "read_audit", "audit:main", {"source_ip": "10.1.2.3"}
    )
    assert both.reason == (
        "denied by default: no policy permits roles [approver, trainer] to read_audit on audit:main"
    )


def test_two_person_rule(engine: PolicyEngine) -> None:
    approver = _principal("approver", name="bob")
    other = engine.authorize(approver, "approve_model", "model:churn@7", {"trainer": "alice"})
    assert other.allowed
    assert other.policy_id == "approver-approve-model"
    own = engine.authorize(approver, "approve_model", "model:churn@7", {"trainer": "bob"})
    assert not own.allowed
    assert own.policy_id == "two-person-rule"
    # the guardrail binds admins too, whatever other role they hold
    admin = _principal("admin", "approver", name="root")
    denied = engine.authorize(admin, "approve_model", "model:churn@7", {"trainer": "root"})
    assert (denied.allowed, denied.policy_id) == (False, "two-person-rule")


def test_trainer_signs_only_own_models(engine: PolicyEngine) -> None:
    trainer = _principal("trainer", name="alice")
    own = engine.authorize(trainer, "sign_model", "model:churn@7", {"trainer": "alice"})
    assert (own.allowed, own.policy_id) == (True, "trainer-sign-model")
    other = engine.authorize(trainer, "sign_model", "model:churn@7", {"trainer": "bob"})
    assert (other.allowed, other.policy_id) == (False, "sign-own-models-only")


def test_gpu_pools_are_for_trainers_only(engine: PolicyEngine) -> None:
    for denied in (("admin",), ("admin", "data-steward", "approver", "viewer")):
        decision = engine.authorize(_principal(*denied), "lease_gpu", "pool:research")
        assert (decision.allowed, decision.policy_id) == (False, "admins-do-not-compute")
    for allowed in (("trainer",), ("admin", "trainer")):
        decision = engine.authorize(_principal(*allowed), "join_pool", "pool:research")
        assert (decision.allowed, decision.policy_id) == (True, "trainer-join-pool")


@pytest.mark.parametrize(
    "roles",
    [
        pair
        for pair in combinations([r for r in ROLES if r], 2)
        if "auditor" not in pair  # the unknown role adds nothing, covered by the table
    ],
    ids=lambda pair: "+".join(pair),
)
def test_multiple_roles_grant_the_union(engine: PolicyEngine, roles: tuple[str, str]) -> None:
    for case, row in TABLE.items():
        cells = [row[ROLES.index(role)] for role in roles]
        action, resource, context = _request(case, "alice")
        decision = engine.authorize(_principal(*roles), action, resource, context)
        forbids = [cell for cell in cells if cell.startswith("F:")]
        union_allows = any(cell.startswith("A:") for cell in cells)
        if case in ("lease_gpu", "join_pool") and "trainer" in roles:
            expected = True  # admins-do-not-compute spares a user who is also a trainer
        else:
            expected = union_allows and not forbids
        assert decision.allowed is expected, f"{case} as {'+'.join(roles)}"


def test_unknown_role_matches_nothing_but_does_not_hurt(engine: PolicyEngine) -> None:
    decision = engine.authorize(_principal("trainer", "wizard"), "lease_gpu", "pool:research")
    assert decision.allowed
    for case in CASES:
        assert not engine.authorize(_principal("wizard"), *_request(case, "alice")).allowed


def test_decisions_match_the_unsliced_policy_set(engine: PolicyEngine) -> None:
    """Evaluating only the policies whose scope names the action changes no decision."""
    loaded = engine._loaded
    roles = [r for r in ROLES if r]
    for size in range(len(roles) + 1):
        for combo in combinations(roles, size):
            principal = _principal(*combo)
            entities = engine._entities(principal.name, principal.roles)
            requests = [_request(case, "alice") for case in CASES]
            requests += [
                _alert_request(kind, response)
                for kind in ALERT_KINDS
                for response in ALERT_RESPONSES
            ]
            for action, resource, context in requests:
                kind, _, name = resource.partition(":")
                request = {
                    "principal": {"type": "Ztlab::User", "id": "alice"},
                    "action": {"type": "Ztlab::Action", "id": action},
                    "resource": {"type": loaded.facts.kind_types[kind], "id": name},
                    "context": context or {},
                }
                full = _cedar.is_authorized(request, loaded.policy_set, entities)
                sliced = engine.authorize(principal, action, resource, context)
                assert (full.decision == "Allow") is sliced.allowed, (combo, resource, context)


def test_defaults_ship_one_file_per_role_and_the_schema() -> None:
    files = default_policy_files()
    assert next(iter(files)) == "schema.cedarschema"
    assert set(files) == {
        "schema.cedarschema",
        "admin.cedar",
        "data-steward.cedar",
        "trainer.cedar",
        "approver.cedar",
        "viewer.cedar",
        "guardrails.cedar",
        "monitor.cedar",
    }
    assert "forbid" in files["guardrails.cedar"]
    assert "forbid" not in files["trainer.cedar"]
    # responses to alerts spare no role (a miner in an admin's server is still stopped)
    assert "forbid (" not in files["monitor.cedar"]
