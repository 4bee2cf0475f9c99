"""The package gateway: the sandboxes' only route to packages, in the hub's process.

Users' servers point ``pip`` and ``uv`` here (``PIP_INDEX_URL``, ``UV_DEFAULT_INDEX``:
``http://SERVICE_IP:PORT/simple/``); the sandbox's firewall opens this port and the hub's
API, nothing else. For every request the gateway:

1. **knows the caller** by the source address: each sandbox has its own network namespace
   and address (:meth:`~ztlab.hub.sandbox.netns.NetworkSegments.owner_of`, read for each
   request), which the user inside cannot change; an environment build of the control
   plane shows a one-time token instead. An unknown address is refused.
2. **decides** with the caller's rules (:class:`~ztlab.hub.packages.rules.PackageRules`):
   a project page lists the allowed files; versions outside the allowed range are listed
   as yanked, with the rule as the reason (pip then installs them only when pinned with
   ``==``, and the download is refused with the rule); a project off the list keeps its
   files, whose downloads are refused with the rule and how to ask. pip shows the refusal
   as ``403 Client Error: <the rule> for url``.
3. **checks** each file it serves: the download is decided again (a page is never
   trusted), fetched from the mirror into a private temporary file, and its SHA-256
   compared with the one the index lists; a file that differs (a tampered cache) is
   refused, never served.
4. **records** every file served (``package.served``: project, version, file, SHA-256,
   who, when) and every refusal (``package.refused``) in the audit log, on disk before
   the first byte goes out.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import html
import json
import os
import secrets
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin

from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from tornado import httpclient, web
from tornado.httpserver import HTTPServer

from ztlab.hub.packages.approvals import PackageRequests
from ztlab.hub.packages.mirror import PackageMirror
from ztlab.hub.packages.rules import PackageRules, Rule, Verdict

#: media type of the PEP 691 JSON simple API (what the gateway asks the mirror for)
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
#: bytes read from the mirror and written to the client at a time
CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks: a user (by sandbox address) or an environment build (by token)."""

    name: str
    rules: PackageRules
    source_ip: str


#: ``user name -> roles``, asked of the hub for each request
RolesLookup = Callable[[str], Awaitable[frozenset[str]]]
#: ``(actor, action, detail)``, the control plane's audit record
Recorder = Callable[..., None]


class PackageGateway:
    """The gateway's state: the mirror, the rules, the address book and build tokens."""

    def __init__(
        self,
        *,
        mirror: PackageMirror,
        requests: PackageRequests,
        role_rules: dict[str, list[str]],
        roles_of: RolesLookup,
        owner_of: Callable[[str], str | None],
        record: Recorder,
        flush: Callable[[], Awaitable[None]],
        temp_dir: Path,
    ) -> None:
        self.mirror = mirror
        self.requests = requests
        self.role_rules = role_rules
        self._roles_of = roles_of
        self._owner_of = owner_of
        self._builds: dict[str, str] = {}
        self.record = record
        self.flush = flush
        self.temp_dir = temp_dir
        self._server: HTTPServer | None = None
        self._client: httpclient.AsyncHTTPClient | None = None

    @property
    def client(self) -> httpclient.AsyncHTTPClient:
        """The HTTP client that asks the mirror (files of any size: wheels of GBs)."""
        if self._client is None:
            self._client = httpclient.AsyncHTTPClient(force_instance=True, max_body_size=1 << 40)
        return self._client

    # -- serving -----------------------------------------------------------------------------

    def listen(self, address: str, port: int) -> None:
        """Serve on ``address:port``."""
        app = web.Application(
            [
                (r"/", _IndexHandler),
                (r"/simple/?", _IndexHandler),
                (r"/simple/([^/]+)/?", _ProjectHandler),
                (r"/files/([^/]+)/([^/]+)", _FileHandler),
            ],
            gateway=self,
        )
        self._server = HTTPServer(app, xheaders=False, max_buffer_size=1 << 20)
        self._server.listen(port, address)

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- callers -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def build_token(self, label: str) -> Iterator[str]:
        """A token that lets an environment build (``label`` names it in the audit log)
        install any package the mirror has, for as long as the block runs."""
        token = secrets.token_urlsafe(24)
        self._builds[token] = label
        try:
            yield token
        finally:
            self._builds.pop(token, None)

    async def caller(self, source_ip: str, authorization: str) -> Caller | None:
        """The caller of a request, or ``None`` when the gateway does not know it."""
        if authorization.startswith("Basic "):
            with contextlib.suppress(ValueError):
                _, _, token = base64.b64decode(authorization[6:]).decode().partition(":")
                label = self._builds.get(token)
                if label is not None:
                    return Caller(label, PackageRules([Rule("*", "environment build")]), source_ip)
            return None
        user = await asyncio.to_thread(self._owner_of, source_ip)
        if user is None:
            return None
        roles = await self._roles_of(user)
        rules = await asyncio.to_thread(
            PackageRules.of_user, user, roles, self.role_rules, self.requests
        )
        return Caller(user, rules, source_ip)

    async def project_files(self, project: str) -> list[dict[str, Any]] | None:
        """The mirror's files of ``project`` (PEP 691 entries, URLs made absolute), or
        ``None`` when the mirror has no such project."""
        await asyncio.to_thread(self.mirror.ensure_ready)
        url = f"{self.mirror.index_url}{quote(project)}/"
        try:
            response = await self.client.fetch(
                url, headers={"Accept": SIMPLE_JSON}, request_timeout=120, raise_error=True
            )
        except httpclient.HTTPClientError as exc:
            if exc.code == 404:
                return None
            raise
        files: list[dict[str, Any]] = json.loads(response.body).get("files", [])
        for entry in files:
            entry["url"] = urljoin(url, entry["url"])
        return files


def file_version(filename: str) -> str | None:
    """The version in a wheel's or sdist's file name (``None`` if it has none)."""
    try:
        if filename.endswith(".whl"):
            return str(parse_wheel_filename(filename)[1])
        return str(parse_sdist_filename(filename)[1])
    except (InvalidWheelFilename, InvalidSdistFilename):
        return None


class _GatewayHandler(web.RequestHandler):
    @property
    def gateway(self) -> PackageGateway:
        gateway: PackageGateway = self.settings["gateway"]
        return gateway

    async def known_caller(self) -> Caller:
        caller = await self.gateway.caller(
            self.request.remote_ip or "", self.request.headers.get("Authorization", "")
        )
        if caller is None:
            self.refuse(403, "this address is not a user's server known to the package proxy")
        assert caller is not None
        return caller

    def refuse(self, status: int, message: str) -> None:
        """End with ``status``; pip prints the HTTP reason, so it carries the message (in
        words where tornado refuses a character: ``<`` in a version range)."""
        reason = message.replace("\r", " ").replace("\n", " ")
        reason = reason.replace("<=", " at most ").replace("<", " below ")
        self.set_status(status, reason=reason.encode("latin-1", "replace").decode("latin-1"))
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(message + "\n")
        raise web.Finish()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(f"{status_code} {self._reason}\n")


class _IndexHandler(_GatewayHandler):
    async def get(self) -> None:
        await self.known_caller()
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(
            "<!DOCTYPE html><html><body><p>zerotrust-lab package proxy: ask for "
            "/simple/PROJECT/ (the project list is not published).</p></body></html>"
        )


class _ProjectHandler(_GatewayHandler):
    async def get(self, project: str) -> None:
        caller = await self.known_caller()
        name = canonicalize_name(project)
        files = await self.gateway.project_files(name)
        if files is None:
            self.refuse(404, f"the package proxy has no project {name}")
        assert files is not None
        anywhere = bool(caller.rules.for_project(name))
        links = []
        for entry in files:
            filename = entry["filename"]
            version = file_version(filename)
            verdict = caller.rules.check(name, version)
            if not verdict.allowed and not anywhere:
                yanked: str | None = None  # off the list: the download says why
            elif not verdict.allowed:
                yanked = verdict.message
            else:
                yanked = _yank_reason(entry.get("yanked"))
            sha256 = (entry.get("hashes") or {}).get("sha256", "")
            attrs = [f'href="/files/{name}/{quote(filename)}#sha256={sha256}"']
            requires = entry.get("requires-python")
            if requires:
                attrs.append(f'data-requires-python="{html.escape(requires)}"')
            if yanked is not None:
                attrs.append(f'data-yanked="{html.escape(yanked)}"')
            links.append(f"<a {' '.join(attrs)}>{html.escape(filename)}</a><br>")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(
            "<!DOCTYPE html><html><head><meta name='pypi:repository-version' content='1.0'>"
            f"<title>Links for {name}</title></head><body><h1>Links for {name}</h1>\n"
            + "\n".join(links)
            + "\n</body></html>\n"
        )


def _yank_reason(value: Any) -> str | None:
    if value is True:
        return ""
    if isinstance(value, str) and value:
        return value
    return None


class _FileHandler(_GatewayHandler):
    async def get(self, project: str, filename: str) -> None:
        gateway = self.gateway
        caller = await self.known_caller()
        name = canonicalize_name(project)
        version = file_version(filename)
        verdict = caller.rules.check(name, version)
        if not verdict.allowed:
            await self._refused(caller, verdict, filename, verdict.message)
        files = await gateway.project_files(name) or []
        entry = next((f for f in files if f["filename"] == filename), None)
        expected = ((entry or {}).get("hashes") or {}).get("sha256")
        if entry is None or not expected:
            await self._refused(
                caller, verdict, filename, f"{filename} is not a file of {name} in the index"
            )
        assert entry is not None
        assert isinstance(expected, str)
        with _private_temp(gateway.temp_dir) as spool:
            digest = hashlib.sha256()
            size = 0

            def take(chunk: bytes) -> None:
                nonlocal size
                digest.update(chunk)
                spool.write(chunk)
                size += len(chunk)

            try:
                await gateway.client.fetch(
                    entry["url"], streaming_callback=take, request_timeout=3600
                )
            except httpclient.HTTPClientError as exc:
                self.refuse(502, f"the package mirror could not give {filename}: {exc}")
            actual = digest.hexdigest()
            if actual != expected:
                await self._refused(
                    caller,
                    verdict,
                    filename,
                    f"{filename} differs from the index (sha256 {actual[:16]}…, the index "
                    f"lists {expected[:16]}…): the mirror's copy was changed; refused and "
                    "recorded",
                    sha256=actual,
                    expected=expected,
                )
            gateway.record(
                caller.name,
                "package.served",
                project=name,
                version=version,
                filename=filename,
                sha256=actual,
                size=size,
                rule=verdict.rule,
                source_ip=caller.source_ip,
            )
            await gateway.flush()  # on disk before the first byte goes out
            self.set_header("Content-Type", "application/octet-stream")
            self.set_header("Content-Length", str(size))
            spool.seek(0)
            while chunk := spool.read(CHUNK):
                self.write(chunk)
                await self.flush()
        self.finish()

    async def _refused(
        self,
        caller: Caller,
        verdict: Verdict,
        filename: str,
        message: str,
        **hashes: str,
    ) -> None:
        self.gateway.record(
            caller.name,
            "package.refused",
            project=verdict.project,
            version=verdict.version,
            filename=filename,
            reason=message,
            source_ip=caller.source_ip,
            **hashes,
        )
        await self.gateway.flush()
        self.refuse(409 if hashes else 403, message)


@contextlib.contextmanager
def _private_temp(folder: Path) -> Iterator[Any]:
    """A temporary file only the control plane can read, removed afterwards."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=folder, prefix="download-")
    Path(path).unlink()
    with os.fdopen(fd, "w+b") as handle:
        yield handle
