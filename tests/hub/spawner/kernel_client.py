"""Run code in a user's kernel through the hub, as the user's browser would.

REST to start a kernel on the user's server (behind the proxy), then the kernel's
websocket channels for ``execute_request``. Used by the isolation tests: the attacks run
where a user's code runs.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass

import requests
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect


@dataclass
class Execution:
    """What one cell printed, and how it ended."""

    stdout: str
    stderr: str
    status: str
    error: str


class KernelSession:
    """A kernel on ``user``'s server, reached with an API ``token``."""

    def __init__(self, hub_url: str, user: str, token: str, kernel: str | None = None) -> None:
        """A new kernel of the kernelspec ``kernel`` (default: the server's default)."""
        self.base = f"{hub_url}/user/{user}"
        self.ws_base = self.base.replace("http://", "ws://", 1)
        self.headers = {"Authorization": f"token {token}"}
        response = requests.post(
            f"{self.base}/api/kernels",
            headers=self.headers,
            json={"name": kernel} if kernel else {},
            timeout=60,
        )
        response.raise_for_status()
        self.kernel_id = response.json()["id"]

    def execute(self, code: str, timeout: float = 60) -> Execution:
        return asyncio.run(self._execute(code, timeout))

    async def _execute(self, code: str, timeout: float) -> Execution:
        request = HTTPRequest(
            f"{self.ws_base}/api/kernels/{self.kernel_id}/channels", headers=self.headers
        )
        conn = await websocket_connect(request)
        msg_id = uuid.uuid4().hex
        conn.write_message(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "username": "test",
                        "session": uuid.uuid4().hex,
                        "msg_type": "execute_request",
                        "version": "5.3",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "channel": "shell",
                    "content": {
                        "code": code,
                        "silent": False,
                        "store_history": False,
                        "user_expressions": {},
                        "allow_stdin": False,
                        "stop_on_error": True,
                    },
                }
            )
        )
        out, err, status, error = [], [], "", ""
        idle = replied = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while not (idle and replied):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError(f"no answer from the kernel in {timeout} s")
                raw = await asyncio.wait_for(conn.read_message(), remaining)
                if raw is None:
                    raise ConnectionError("the kernel's websocket closed")
                msg = json.loads(raw)
                state = msg.get("content", {}).get("execution_state")
                if msg.get("msg_type") == "status" and state in ("restarting", "dead"):
                    status = state  # the kernel died under us (e.g. killed for memory)
                    break
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream":
                    (out if content["name"] == "stdout" else err).append(content["text"])
                elif kind == "error":
                    error = f"{content['ename']}: {content['evalue']}"
                elif kind == "status" and content["execution_state"] == "idle":
                    idle = True
                elif kind == "execute_reply":
                    status = content["status"]
                    replied = True
        finally:
            conn.close()
        return Execution("".join(out), "".join(err), status, error)

    def close(self) -> None:
        requests.delete(
            f"{self.base}/api/kernels/{self.kernel_id}", headers=self.headers, timeout=30
        )
