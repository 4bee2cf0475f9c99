"""The login stack shared by the login end-to-end tests (one per test session)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.hubstack import LoginStack, running_stack


@pytest.fixture(scope="session")
def login_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoginStack]:
    with running_stack(tmp_path_factory.mktemp("login-stack")) as stack:
        yield stack
