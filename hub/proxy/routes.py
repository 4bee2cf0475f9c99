"""What a request to a user's server is for: whose server, and which class of route.

The enforcement point decides on the path as the proxy saw it (``X-Forwarded-Uri``), and
the egress accounting counts bytes by the same classes, so both call :func:`classify`:

==============  ============================================================================
class           routes (under ``/user/NAME/``)
==============  ============================================================================
``files``       raw files: ``files/``, ``view/``, ``nbconvert/`` downloads, and the contents
                API for anything that is not a notebook or a directory listing
``notebooks``   the contents API for notebooks (``*.ipynb``, unless asked for as a raw
                file or in a ``format``), checkpoints, directory listings, and metadata
                (``content=0``)
``kernels``     the kernel and session APIs, and the kernels' WebSockets
``terminals``   terminals and their WebSockets
``other``       everything else: JupyterLab's pages and assets, ``api/status``, ...
==============  ============================================================================
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import unquote, urlsplit

RouteClass = Literal["files", "notebooks", "kernels", "terminals", "other"]

#: every route class, in the order the docs and metrics list them
ROUTE_CLASSES: Final[tuple[RouteClass, ...]] = (
    "files",
    "notebooks",
    "kernels",
    "terminals",
    "other",
)


@dataclass(frozen=True, slots=True)
class Target:
    """A request to a user's server, as the enforcement point sees it."""

    #: whose server
    owner: str
    #: the server's name (empty: the default server)
    server: str
    #: the path inside the server, without the ``/user/NAME/`` prefix (no leading ``/``)
    path: str
    #: the class of route (:data:`ROUTE_CLASSES`)
    route: RouteClass
    #: for ``files`` routes: the file's path relative to the server's root (else empty)
    file: str


def parse_target(
    uri: str, *, base_url: str = "/", is_directory: Callable[[str, str], bool] | None = None
) -> Target | None:
    """The server and route a request's URI (path and query) is for; ``None`` when it is
    not a request to a user's server, or its path is not canonical (``.``/``..``).

    ``is_directory(owner, path)`` says whether a contents-API path is a directory in the
    owner's server (a listing, not a file's bytes); without it every such path that is not
    a notebook counts as a file.
    """
    parts = urlsplit(uri)
    prefix = base_url.rstrip("/") + "/user/"
    path = unquote(parts.path)
    if not path.startswith(prefix):
        return None
    rest = path[len(prefix) :]
    owner, _, inner = rest.partition("/")
    if not owner:
        return None
    if any(segment in (".", "..") for segment in inner.split("/")):
        return None
    check = (lambda path: is_directory(owner, path)) if is_directory is not None else None
    route, file = classify(inner, parts.query, is_directory=check)
    return Target(owner=owner, server="", path=inner, route=route, file=file)


def classify(
    path: str, query: str = "", *, is_directory: Callable[[str], bool] | None = None
) -> tuple[RouteClass, str]:
    """The class of ``path`` (relative to the server's base URL) and, for raw file routes,
    the file it serves. A contents-API path is a notebook route only when it names a
    notebook, a checkpoint or (``is_directory``) a directory: anything else may be a file's
    bytes, whatever its name."""
    head, _, tail = path.partition("/")
    if head in ("files", "view"):
        return "files", _clean(tail)
    if head == "nbconvert":
        # nbconvert/FORMAT/PATH: an export of a notebook, downloaded as a file
        _, _, notebook = tail.partition("/")
        return "files", _clean(notebook)
    if head == "terminals" or path.startswith("api/terminals"):
        return "terminals", ""
    if path.startswith(("api/kernels", "api/sessions", "api/kernelspecs")):
        return "kernels", ""
    if path.startswith("api/contents"):
        rest = path[len("api/contents") :].strip("/")
        if not rest or "/checkpoints" in f"/{rest}" or "content=0" in query.split("&"):
            return "notebooks", ""  # listings, checkpoints, metadata without content
        if rest.endswith(".ipynb") and not _asks_raw(query):
            return "notebooks", ""
        if is_directory is not None and is_directory(_clean(rest)):
            return "notebooks", ""
        return "files", _clean(rest)
    return "other", ""


def _asks_raw(query: str) -> bool:
    """Whether a contents-API query asks for a file's raw bytes (``type=file``, a format)."""
    params = set(query.split("&"))
    return "type=file" in params or any(p.startswith("format=") for p in params)


def _clean(path: str) -> str:
    return posixpath.normpath(path).lstrip("/") if path else ""
