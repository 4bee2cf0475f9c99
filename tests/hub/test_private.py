"""Control-plane state files: created private, loose or foreign ones refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ztlab.common.errors import ConfigError, ZtlabError
from ztlab.hub.models.mlflow import MlflowREST
from ztlab.hub.models.service import ModelService, ModelServiceError
from ztlab.hub.private import (
    private_directory,
    private_file,
    read_private_file,
    state_directory,
    state_file,
)

NOBODY = 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_files_and_directories_are_private(tmp_path: Path) -> None:
    folder = private_directory(tmp_path / "a" / "b", what="store")
    assert mode(folder) == 0o700
    secret = private_file(folder / "key", what="key", content=b"s3cret")
    assert mode(secret) == 0o600
    assert secret.read_bytes() == b"s3cret"
    # an existing file is kept as it is, never rewritten
    private_file(secret, what="key", content=b"other")
    assert read_private_file(secret, what="key") == b"s3cret"


def test_loose_or_foreign_state_is_refused_with_the_fix(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    with pytest.raises(ZtlabError, match=r"the store is readable .* \(mode 0755\)") as caught:
        private_directory(loose, what="store")
    assert caught.value.hint == f"chmod 700 {loose}"
    shared = tmp_path / "db"
    shared.write_bytes(b"")
    shared.chmod(0o640)
    with pytest.raises(ZtlabError, match=r"mode 0640\); expected 0600"):
        private_file(shared, what="database")
    with pytest.raises(ZtlabError, match=r"mode 0640\); expected 0600"):
        read_private_file(shared, what="database")
    shared.chmod(0o600)
    os.chown(shared, NOBODY, NOBODY)
    with pytest.raises(ZtlabError, match=f"owned by uid {NOBODY}"):
        private_file(shared, what="database")


def test_a_symlinked_state_file_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    target.chmod(0o600)
    link = tmp_path / "db"
    link.symlink_to(target)
    with pytest.raises(ZtlabError, match="cannot open the database"):
        private_file(link, what="database")


def test_the_hub_tightens_what_it_owns_and_refuses_what_it_does_not(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    assert mode(state_directory(state)) == 0o700
    cookie = state / "cookie"
    cookie.write_bytes(b"x")
    cookie.chmod(0o644)
    assert mode(state_file(cookie)) == 0o600
    os.chown(cookie, NOBODY, NOBODY)
    cookie.chmod(0o644)
    with pytest.raises(ConfigError, match=r"state file is readable .* \(mode 0644\)"):
        state_file(cookie)


def test_the_model_store_refuses_a_database_others_can_read(tmp_path: Path) -> None:
    store = private_directory(tmp_path / "mlflow", what="store")
    (store / "models.sqlite").write_bytes(b"")
    (store / "models.sqlite").chmod(0o644)
    with pytest.raises(ModelServiceError, match=r"model signature database .*\(mode 0644\)"):
        ModelService(
            store=store,
            mlflow=MlflowREST("http://127.0.0.1:9"),
            key=None,  # type: ignore[arg-type]
            policy=None,  # type: ignore[arg-type]
            audit=None,  # type: ignore[arg-type]
            datasets=None,
            protected_aliases=["production"],
        )
