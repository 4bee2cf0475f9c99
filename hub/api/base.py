"""What every handler of the control plane's API shares: who calls, JSON in and out."""

from __future__ import annotations

import json
from typing import Any

from jupyterhub.apihandlers.base import APIHandler
from tornado import web

from ztlab.common.errors import UsageError, ZtlabError
from ztlab.hub.controlplane import ControlPlane, control_plane
from ztlab.hub.identity import DATA_SCOPE, RUN_TOKEN_NOTE, user_principal


class ZtlabAPIHandler(APIHandler):  # type: ignore[misc]
    """Token or cookie authentication, the data scope, and JSON errors.

    Answers wait until the request's audit records are on disk (:meth:`reply`,
    :meth:`fail`), so a client never sees an answer whose record a crash could lose.
    """

    @property
    def plane(self) -> ControlPlane:
        """The hub's control plane."""
        return control_plane(self.settings)

    async def principal(self) -> Any:
        """The calling user as a policy principal, or a 403."""
        user = self.current_user
        if user is None:
            raise web.HTTPError(403, "Missing or invalid credentials.")
        if getattr(user, "kind", "user") != "user":
            raise web.HTTPError(403, "Only users may use the control plane's API, not services.")
        if DATA_SCOPE not in getattr(self, "expanded_scopes", set()):
            raise web.HTTPError(
                403, f"This token lacks the {DATA_SCOPE} scope (make a token that has it)."
            )
        return await user_principal(user)

    def run_of_token(self) -> str | None:
        """The notebook run whose token made this request (``None``: not a run's)."""
        token = self.get_token()
        note = getattr(token, "note", None) or ""
        return note.removeprefix(RUN_TOKEN_NOTE) if note.startswith(RUN_TOKEN_NOTE) else None

    def body(self) -> dict[str, Any]:
        """The request's JSON object, or a 400."""
        try:
            data = json.loads(self.request.body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise web.HTTPError(400, f"The request body is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise web.HTTPError(400, "The request body must be a JSON object.")
        return data

    async def reply(self, data: Any, status: int = 200) -> None:
        """Finish with ``data`` as JSON, once the request's audit records are durable."""
        await self.plane.flush()
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))

    async def fail(self, error: ZtlabError) -> None:
        """Finish with the error's status, message and hint (records durable first)."""
        status = getattr(error, "status", 400 if isinstance(error, UsageError) else 500)
        await self.reply({"status": status, "message": error.message, "hint": error.hint}, status)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """JSON errors like ours for tornado's own (403, 404, 500)."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = getattr(exc, "log_message", None) or self._reason
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": status_code, "message": message, "hint": None}))
