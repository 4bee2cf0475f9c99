"""The MLflow proxy checks one canonical spelling of each path."""

from __future__ import annotations

import pytest
from tornado import web

from ztlab.hub.api.models import canonical


@pytest.mark.parametrize(
    "path",
    [
        "api/2.0/mlflow/../mlflow/registered-models/alias",
        "api/2.0/mlflow/./registered-models/alias",
        "api/2.0/mlflow/registered-models//alias",
        "api/2.0/mlflow/registered-models/alias/",
        "api/2.0/../2.0/mlflow/registered-models/alias",
        "/api/2.0/mlflow/registered-models/alias",
        "graphql",
        "static-files/index.html",
        "get-artifact",
        "",
    ],
)
def test_other_spellings_and_other_routes_are_not_forwarded(path: str) -> None:
    with pytest.raises(web.HTTPError) as caught:
        canonical(path)
    assert caught.value.status_code == 404


def test_the_ui_alias_of_a_route_is_checked_as_the_route() -> None:
    assert canonical("ajax-api/2.0/mlflow/registered-models/alias") == (
        "api/2.0/mlflow/registered-models/alias"
    )
    assert canonical("api/2.0/mlflow-artifacts/artifacts/") == "api/2.0/mlflow-artifacts/artifacts/"
    assert canonical("health") == "health"


@pytest.mark.parametrize(
    "path",
    [
        "api/2.0/mlflow/users/create",
        "ajax-api/2.0/mlflow/users/update-admin",
        "api/2.0/mlflow/users/delete",
        "api/3.0/mlflow/roles/create",
        "api/3.0/mlflow/users/roles/list",
    ],
)
def test_user_and_role_administration_is_refused(path: str) -> None:
    with pytest.raises(web.HTTPError) as caught:
        canonical(path)
    assert caught.value.status_code == 403


def test_the_caller_may_see_and_share_what_mlflow_lets_them() -> None:
    for path in [
        "api/2.0/mlflow/users/current",
        "api/3.0/mlflow/users/permissions/grant",
        "api/3.0/mlflow/users/permissions/revoke",
    ]:
        assert canonical(path) == path
