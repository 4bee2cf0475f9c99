"""What a login carries between its steps: the refusal, the pending login, the nonce.

Shared by the authenticator and its web handlers (neither imports the other's module).
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from tornado import web

#: the nonce the current login's callback expects (set by the callback handler)
expected_nonce: ContextVar[str | None] = ContextVar("ztlab_expected_nonce", default=None)


class LoginRefused(web.HTTPError):
    """A refused login: ``reason`` is the audit code, the message is what the user sees."""

    def __init__(self, reason: str, message: str, *, status: int = 403) -> None:
        super().__init__(status, f"login refused ({reason})")
        self.refusal = reason
        self.jupyterhub_message = message


@dataclass
class PendingLogin:
    """A login that passed the provider but still owes the hub a second factor."""

    auth_model: dict[str, Any]
    next_url: str
    client_ip: str
    user_agent: str
    why: str
    created: float = field(default_factory=time.monotonic)
