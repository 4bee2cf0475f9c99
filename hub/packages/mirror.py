"""devpi-server as the package mirror: a process the control plane runs on 127.0.0.1.

devpi-server (https://devpi.net) mirrors the upstream index (``[packages] upstream``) on
demand and keeps every file it served in its cache, so the environment installs offline
what it installed once (``[packages] offline`` turns upstream fetches off). It listens on
127.0.0.1 only: no sandbox can reach it. Users' servers reach the gateway
(:mod:`ztlab.hub.packages.gateway`), which asks this mirror, decides and checks.

State under ``<state_dir>/packages`` (0700): ``devpi/`` (devpi's server directory),
``devpi-root`` (the password of devpi's ``root`` account, which alone may change the mirror
index) and ``devpi-secret`` (devpi's signing secret), both 0600. The mirror index is
``root/mirror``; its ``mirror_url`` is set from the configuration at every start.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ztlab.common.config import ZtlabConfig
from ztlab.common.errors import ZtlabError
from ztlab.hub.private import state_directory, state_file
from ztlab.hub.processes import LocalService

#: the process's name under ``<state_dir>/run`` and ``<state_dir>/logs``
NAME = "devpi"
#: the devpi index that mirrors the upstream
INDEX = "root/mirror"


class MirrorError(ZtlabError):
    """The package mirror could not be started or set up."""


class PackageMirror(LocalService):
    """Start, set up, watch and stop devpi-server (``[packages]``)."""

    name = NAME
    port_key = "packages.devpi_port"

    def __init__(self, config: ZtlabConfig, *, config_source: str = "ztlab.toml") -> None:
        super().__init__(config.packages.devpi_port, config.state_dir, config_source=config_source)
        self._config = config
        self._ready = False

    @property
    def folder(self) -> Path:
        """``<state_dir>/packages``."""
        return self._config.state_dir / "packages"

    @property
    def server_dir(self) -> Path:
        """devpi's server directory (its database and the cached files)."""
        return self.folder / "devpi"

    @property
    def index_url(self) -> str:
        """The mirror index's simple API, ending in ``/+simple/``."""
        return f"{self.url}/{INDEX}/+simple/"

    def start(self) -> None:
        """Initialise devpi's directory once, then start devpi-server (not waiting)."""
        self.prepare()
        state_directory(self.folder)
        password = self._secret("devpi-root")
        secret_file = self.folder / "devpi-secret"
        if not secret_file.exists():
            state_file(secret_file, content=secrets.token_urlsafe(48).encode())
        if not (self.server_dir / ".serverversion").exists():
            self._init(password)
        argv = [
            _program("devpi-server"),
            "--serverdir",
            str(self.server_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self._config.packages.devpi_port),
            "--secretfile",
            str(secret_file),
            "--restrict-modify",
            "root",
            "--threads",
            "8",
        ]
        if self._config.packages.offline:
            argv.append("--offline-mode")
        self._ready = False
        self._process.start(argv, env=_environment())

    def _init(self, password: str) -> None:
        result = subprocess.run(
            [
                _program("devpi-init"),
                "--serverdir",
                str(self.server_dir),
                "--no-root-pypi",
                f"--root-passwd={password}",
            ],
            capture_output=True,
            text=True,
            env=_environment(),
            check=False,
            timeout=120,
        )
        if result.returncode != 0:
            raise MirrorError(
                f"devpi-init failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}",
                hint=f"remove {self.server_dir} to start the mirror afresh (its cache is lost)",
            )

    def _secret(self, name: str) -> str:
        path = self.folder / name
        if not path.exists():
            state_file(path, content=secrets.token_hex(32).encode())
        return path.read_text().strip()

    def stop(self) -> None:
        """Stop devpi-server (the next start sets the index up again)."""
        super().stop()
        self._ready = False

    def ensure_ready(self, timeout: float = 60.0) -> None:
        """Wait until devpi answers, then make ``root/mirror`` mirror the configured upstream
        (blocking: call it from a thread)."""
        if self._ready:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._call("GET", "/+api")
                break
            except MirrorError:
                if time.monotonic() > deadline or not self.running():
                    raise MirrorError(
                        f"the package mirror (devpi-server on {self.url}) did not start",
                        hint=f"its log: {self.log_file}\n{self._process.log_tail(15)}",
                    ) from None
                time.sleep(0.2)
        login = self._call(
            "POST", "/+login", {"user": "root", "password": self._secret("devpi-root")}
        )
        auth = base64.b64encode(f"root:{login['result']['password']}".encode()).decode()
        upstream = self._config.packages.upstream
        try:
            current = self._call("GET", f"/{INDEX}")["result"]
        except MirrorError:
            current = None
        if current is None:
            self._call("PUT", f"/{INDEX}", {"type": "mirror", "mirror_url": upstream}, auth=auth)
        elif current.get("mirror_url") != upstream:
            self._call("PATCH", f"/{INDEX}", [f"mirror_url={upstream}"], auth=auth)
        self._ready = True

    def _call(self, method: str, path: str, body: Any = None, *, auth: str | None = None) -> Any:
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if auth is not None:
            headers["X-Devpi-Auth"] = auth
        request = urllib.request.Request(  # noqa: S310 - devpi on 127.0.0.1
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers=headers,
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise MirrorError(f"devpi answered {exc.code} to {method} {path}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise MirrorError(f"cannot reach devpi-server at {self.url}: {exc}") from exc


def _program(name: str) -> str:
    """A program installed with ztlab (devpi-server's scripts live in the same venv)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise MirrorError(
            f"{name} is not installed next to {sys.executable}",
            hint="install ztlab's dependencies (`make venv` installs devpi-server)",
        )
    return str(path)


#: what devpi-server keeps of the hub's environment to reach the upstream: the machine's
#: certificate authorities (a TLS-inspecting gateway's among them) and its proxies
PASSED_THROUGH = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)


def _environment() -> dict[str, str]:
    import os

    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
    }
    env.update({name: os.environ[name] for name in PASSED_THROUGH if name in os.environ})
    return env
