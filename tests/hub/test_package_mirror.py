"""devpi-server's start: what of the hub's environment it keeps (to reach the upstream)."""

from __future__ import annotations

import pytest

from ztlab.hub.packages import mirror


def test_the_machines_certificate_authorities_and_proxies_reach_devpi(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a TLS-inspecting gateway's CA: without it devpi's upstream fetches fail verification
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "not-for-devpi")
    env = mirror._environment()
    assert env["SSL_CERT_FILE"] == "/etc/ssl/certs/ca-certificates.crt"
    assert env["HTTPS_PROXY"] == "http://proxy.internal:3128"
    assert "JUPYTERHUB_API_TOKEN" not in env
