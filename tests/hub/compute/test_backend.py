"""The compute backend seam: lookup and definition-time checks."""

from __future__ import annotations

import pytest

from ztlab.common.errors import ConfigError
from ztlab.hub.compute.backend import ComputeBackend, compute_backend
from ztlab.hub.compute.local import LocalComputeBackend


def test_local_is_the_installed_backend_and_an_unknown_name_says_so() -> None:
    assert compute_backend("local") is LocalComputeBackend
    with pytest.raises(ConfigError, match=r"compute.backend: no compute backend 'gateway-x'"):
        compute_backend("gateway-x")


def test_a_backend_missing_a_method_fails_when_it_is_defined() -> None:
    with pytest.raises(TypeError, match="must implement close, clusters, open, renew, start, stop"):

        class Nothing(ComputeBackend):
            pass
