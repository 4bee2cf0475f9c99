"""The compute backend seam (pools come next): lookup and definition-time checks."""

from __future__ import annotations

import pytest

from ztlab.common.errors import ConfigError
from ztlab.hub.compute.backend import ComputeBackend, compute_backend


def test_no_compute_backend_is_installed_yet_and_the_error_says_so() -> None:
    with pytest.raises(ConfigError, match=r"compute.backend: no compute backend 'local'"):
        compute_backend("local")


def test_a_backend_missing_a_method_fails_when_it_is_defined() -> None:
    with pytest.raises(TypeError, match="must implement close, clusters, start, stop"):

        class Nothing(ComputeBackend):
            pass
