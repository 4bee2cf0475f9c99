"""Spawn failures name their stage and say what to do."""

from __future__ import annotations

import pytest

from ztlab.hub.spawner.failures import SpawnFailed, SpawnRefused
from ztlab.hub.spawner.sandbox import _tools


def test_a_missing_sandbox_program_fails_the_sandbox_stage_with_the_package() -> None:
    with pytest.raises(SpawnFailed) as caught:
        _tools("/nonexistent/bwrap")
    assert caught.value.stage == "sandbox"
    assert caught.value.status_code == 500
    assert "/nonexistent/bwrap is not installed" in caught.value.jupyterhub_message
    assert "bubblewrap" in caught.value.jupyterhub_message


def test_the_message_is_sentences_and_the_status_follows_the_stage() -> None:
    refused = SpawnRefused("your server may not start: no policy permits it", hint="ask")
    assert refused.stage == "decide"
    assert refused.status_code == 403
    assert refused.jupyterhub_message == "Your server may not start: no policy permits it. Ask."
    assert SpawnFailed("lease", "pool full").status_code == 409
