"""The lease backend seam: chosen by configuration, checked when a backend is defined."""

from __future__ import annotations

import pytest

from ztlab.common.errors import ConfigError
from ztlab.hub.gpu.backend import LeaseBackend, lease_backend
from ztlab.hub.gpu.leases import LeaseBroker


def test_the_local_backend_is_the_lease_broker() -> None:
    assert lease_backend("local") is LeaseBroker


def test_an_unknown_backend_names_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"ztlab.toml: gpu.lease_backend: .*'slurm'.*local"):
        lease_backend("slurm")


def test_a_backend_missing_a_method_fails_when_it_is_defined() -> None:
    with pytest.raises(TypeError, match=r"must implement .*grant.*release_server"):

        class Half(LeaseBackend):
            def close(self) -> None:
                pass


def test_a_backend_without_hand_over_checks_fails_when_it_is_defined() -> None:
    before = ("open", "grant", "release", "release_server", "expire", "active", "close")
    methods = {name: LeaseBroker.__dict__[name] for name in before}
    with pytest.raises(
        TypeError,
        match=r"Old must implement clear_handover, handover_checks, hold_handover, "
        r"pending_handovers, release_hold, require_handover_checks$",
    ):
        type("Old", (LeaseBackend,), methods)
