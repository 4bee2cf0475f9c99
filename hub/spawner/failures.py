"""Why a server did not start, said to the user at the stage where it happened.

A spawn runs fixed stages (``decide``, ``account``, ``lease``, ``sandbox``, ``start``); a
failure in any of them is a :class:`SpawnFailed` naming the stage, with a message that says
what failed and what to do. JupyterHub shows :attr:`SpawnFailed.jupyterhub_message` on the
spawn page and in the REST API's answer, instead of a bare "500 Internal Server Error"; the
spawner records each failure as ``server.spawn_failed`` with its stage.
"""

from __future__ import annotations

from typing import Literal

from tornado import web

#: the stages of a spawn, in order
Stage = Literal["decide", "account", "lease", "sandbox", "start"]

_STATUS: dict[str, int] = {
    "decide": 403,  # the policy said no
    "account": 500,
    "lease": 409,  # a quota or the pool: the request conflicts with what is held
    "sandbox": 500,
    "start": 500,
}


class SpawnFailed(web.HTTPError):
    """A spawn stage failed; ``jupyterhub_message`` is what the user sees."""

    def __init__(self, stage: Stage, message: str, *, hint: str | None = None) -> None:
        super().__init__(_STATUS[stage], f"spawn failed at stage {stage}: {message}")
        self.stage: Stage = stage
        self.message = message
        self.hint = hint
        self.jupyterhub_message = _sentence(message) + (f" {_sentence(hint)}" if hint else "")


def _sentence(text: str) -> str:
    """``text`` with a capital first letter and a full stop."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


class SpawnRefused(SpawnFailed):
    """The policy engine refused the spawn (stage ``decide``); the message says why."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__("decide", message, hint=hint)
