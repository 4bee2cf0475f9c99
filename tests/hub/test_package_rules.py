"""The package allowlist: role rules, approved requests, and what a refusal says."""

from __future__ import annotations

import pytest

from ztlab.common.config import parse_config
from ztlab.common.config.model import InvalidConfigError
from ztlab.hub.packages.rules import PackageRules, Rule

ROLE_RULES = {"trainer": ["torch>=2.4,<3", "Requests"], "admin": ["*"], "viewer": []}


def test_a_listed_package_in_its_range_is_allowed_by_its_rule() -> None:
    rules = PackageRules.for_user({"trainer"}, ROLE_RULES)
    verdict = rules.check("torch", "2.5.1")
    assert verdict.allowed
    assert verdict.rule == "torch>=2.4,<3 (role trainer)"
    # names are compared normalised (PEP 503), and a rule without a range allows any version
    assert rules.check("requests", "0.1").allowed


def test_a_version_outside_the_range_names_the_range_and_how_to_ask() -> None:
    verdict = PackageRules.for_user({"trainer"}, ROLE_RULES).check("torch", "3.0")
    assert not verdict.allowed
    assert "torch 3.0 is outside the allowed versions" in verdict.message
    assert "(role trainer)" in verdict.message
    assert 'ztlab packages request torch==3.0 --reason "what it is for"' in verdict.message


def test_a_package_off_the_list_says_so() -> None:
    verdict = PackageRules.for_user({"viewer"}, ROLE_RULES).check("numpy", "2.0")
    assert not verdict.allowed
    assert verdict.message.startswith("numpy is not on the package allowlist of your roles")


def test_roles_unite_and_star_allows_everything() -> None:
    rules = PackageRules.for_user({"viewer", "admin"}, ROLE_RULES)
    assert rules.check("anything", "1.0").allowed
    assert rules.check("anything", "1.0").rule == "* (role admin)"


def test_an_approved_request_extends_the_list() -> None:
    approved = [Rule("numpy==2.0", "request 7")]
    rules = PackageRules.for_user({"viewer"}, ROLE_RULES, approved)
    assert rules.check("numpy", "2.0").allowed
    assert not rules.check("numpy", "2.1").allowed


def test_a_file_with_a_version_that_does_not_parse_is_refused() -> None:
    verdict = PackageRules.for_user({"admin"}, ROLE_RULES).check("x", "not a version")
    assert not verdict.allowed


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("torch>=", "is not a package rule"),
        ("torch @ https://example.org/t.whl", "no URL, extras or environment marker"),
        ("torch[cuda]", "no URL, extras or environment marker"),
    ],
)
def test_a_bad_rule_in_the_configuration_names_the_key(rule: str, expected: str) -> None:
    with pytest.raises(InvalidConfigError) as caught:
        parse_config({"roles": {"trainer": {"packages": [rule]}}})
    text = str(caught.value)
    assert "roles.trainer.packages[0]" in text or "roles.trainer.packages.0" in text, text
    assert expected in text
