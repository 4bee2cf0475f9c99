"""Raw-file rules: the most generous of a user's roles, and messages that name the rule."""

from __future__ import annotations

from ztlab.common.config.model import RoleConfig
from ztlab.hub.proxy.rules import file_rule, refusal

M = 1024**2
ROLES = {
    "viewer": RoleConfig(raw_files="refuse"),
    "approver": RoleConfig(raw_files="10M"),
    "trainer": RoleConfig(raw_files="100M"),
    "data-steward": RoleConfig(raw_files="allow"),
}


def test_the_most_generous_rule_applies() -> None:
    assert file_rule(frozenset({"viewer"}), ROLES).limit == 0
    assert file_rule(frozenset({"viewer", "approver"}), ROLES).role == "approver"
    assert file_rule(frozenset({"approver", "trainer"}), ROLES).limit == 100 * M
    assert file_rule(frozenset({"viewer", "data-steward"}), ROLES).limit is None
    # no role (or only unknown ones): refused
    assert file_rule(frozenset(), ROLES).limit == 0
    assert file_rule(frozenset({"ghost"}), ROLES).limit == 0


def test_refusals_name_the_rule() -> None:
    viewer = file_rule(frozenset({"viewer"}), ROLES)
    message = refusal(viewer, "secret.csv", 10)
    assert message is not None
    assert '[roles.viewer] raw_files = "refuse"' in message
    assert viewer.audit_name == "rule: roles.viewer.raw_files"
    trainer = file_rule(frozenset({"trainer"}), ROLES)
    assert refusal(trainer, "small.csv", 100 * M) is None
    big = refusal(trainer, "big.csv", 150 * M)
    assert big == (
        "big.csv is 150 MiB; your roles allow raw files up to 100 MiB (rule [roles.trainer] "
        'raw_files = "100M").'
    )
    # a missing file goes through (the server answers 404); an unknown size does not
    assert refusal(trainer, "gone.csv", None) is None
    unknown = refusal(trainer, "loop.csv", None, unknown=True)
    assert unknown is not None
    assert "could not be checked" in unknown
    steward = file_rule(frozenset({"data-steward"}), ROLES)
    assert refusal(steward, "huge.bin", 10**12) is None
