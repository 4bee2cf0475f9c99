"""The kernel extension tags MLflow runs with the kernel's environment (a real MLflow
tracking store in a folder), once per run, and only in an environment's kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from ztlab.extensions import environment


def test_a_run_is_tagged_with_the_environment_and_its_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("ZTLAB_ENVIRONMENT", "gpu")
    monkeypatch.setenv("ZTLAB_ENVIRONMENT_DIGEST", "sha256:" + "ab" * 32)
    assert environment.tag_active_run() is False  # no run yet
    with mlflow.start_run() as run:
        assert environment.tag_active_run() is True
        assert environment.tag_active_run() is False  # once per run
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["ztlab.environment"] == "gpu"
    assert tags["ztlab.environment_digest"] == "sha256:" + "ab" * 32


def test_outside_an_environment_nothing_is_tagged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZTLAB_ENVIRONMENT", raising=False)
    assert environment.environment_tags() == {}
    assert environment.layer_conflicts() == []
