"""A client of the hub's REST API with a hub token: what kernels and the command line share.

The kernel's dataset and model clients (:mod:`ztlab.extensions`) and the ``ztlab data`` and
``ztlab model`` commands all talk to ``…/hub/api`` the same way: JSON in and out, the token
in ``Authorization``, the hub's JSON errors (``{"status", "message", "hint"}``) turned into
:class:`HubAPIError`. It imports only the standard library, so a command that asks the hub
one question starts fast.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from typing import Any

from ztlab.common.errors import UsageError, ZtlabError


class HubAPIError(UsageError):
    """The hub refused the request (400, 403, 404, 409): ``message`` and ``hint`` are its."""

    def __init__(self, message: str, *, status: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class HubUnreachable(ZtlabError):
    """The hub could not be reached, or failed (5xx)."""


class HubAPI:
    """``…/hub/api``, called with a hub token."""

    def __init__(self, api_url: str, token: str, *, context: ssl.SSLContext | None = None) -> None:
        """``api_url`` ends in ``/hub/api``."""
        self.api_url = api_url.rstrip("/")
        self._token = token
        self._context = context

    @classmethod
    def from_environment(cls) -> HubAPI:
        """From ``JUPYTERHUB_API_URL``, ``JUPYTERHUB_API_TOKEN`` and ``JUPYTERHUB_SSL_*``
        (what a user's server and its kernels are given)."""
        url = os.environ["JUPYTERHUB_API_URL"]
        token = os.environ["JUPYTERHUB_API_TOKEN"]
        context = None
        ca = os.environ.get("JUPYTERHUB_SSL_CLIENT_CA")
        if url.startswith("https:") and ca:
            context = ssl.create_default_context(cafile=ca)
            cert, key = (
                os.environ.get("JUPYTERHUB_SSL_CERTFILE"),
                os.environ.get("JUPYTERHUB_SSL_KEYFILE"),
            )
            if cert and key:
                context.load_cert_chain(cert, key)
        return cls(url, token, context=context)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """``method`` ``API_URL + path`` with the hub token; the JSON answer."""
        data = json.dumps(body).encode() if body is not None else None
        return json.loads(self.fetch(path, method=method, data=data) or b"null")

    def fetch(
        self, path: str, *, method: str = "GET", data: bytes | None = None, timeout: float = 60
    ) -> bytes:
        """``method`` ``API_URL + path`` with the hub token; the answer's bytes as sent (a
        signed file keeps its digest). The hub's JSON errors raise :class:`HubAPIError`
        (4xx) or :class:`HubUnreachable` (5xx, no answer)."""
        request = urllib.request.Request(  # noqa: S310 - the hub's own API URL
            f"{self.api_url}{path}",
            data=data,
            method=method,
            headers={"Authorization": f"token {self._token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self._context) as answer:  # noqa: S310
                return bytes(answer.read())
        except urllib.error.HTTPError as exc:
            try:
                answer = json.loads(exc.read())
                message, hint = answer.get("message"), answer.get("hint")
            except (ValueError, AttributeError):
                message, hint = exc.reason, None
            if 400 <= exc.code < 500:
                raise HubAPIError(str(message), status=exc.code, hint=hint) from exc
            raise HubUnreachable(f"the hub answered {exc.code}: {message}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise HubUnreachable(f"cannot reach the hub's API at {self.api_url}: {exc}") from exc
