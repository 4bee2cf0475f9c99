"""``/hub/api/ztlab/models`` and ``/hub/api/ztlab/mlflow``: signing, approvals, and MLflow.

The MLflow tracking server listens on 127.0.0.1; users and kernels reach it here, with a hub
token (MLflow's client sends ``MLFLOW_TRACKING_TOKEN`` as ``Authorization: Bearer``). The
proxy:

- refuses setting or deleting a protected alias for everyone (only the approval service,
  which calls MLflow directly, moves them), recording ``model.alias.refused``;
- lets only users the policy allows to ``register_model`` write (create runs, log, register);
  everyone else with a token reads;
- stamps runs and logged models with the authenticated user (``user_id``, ``mlflow.user``)
  and remembers the owner; writes to another user's run or model artifacts are refused;
- shows MLflow who is asking (:mod:`ztlab.hub.models.mlflow_auth`) so that MLflow's own
  permissions (READ / EDIT / MANAGE per experiment and registered model) apply, and
  drops every other header a client sends;
- forwards only MLflow's REST and artifact APIs, with canonical paths (no ``.``/``..``
  segments; ``ajax-api`` is checked as ``api``); MLflow's user and role administration is
  refused (identities come from the hub).

=======  ==================================================  ================================
method   path (under ``/hub/api/ztlab``)                      what
=======  ==================================================  ================================
POST     ``/models/NAME/VERSION/sign``                       sign (the trainer; lineage checked)
GET      ``/models/NAME/VERSION``                            signature, trainer, approvals,
                                                             the run's provenance (verified)
POST     ``/models/NAME/VERSION/approve``                    ``{"reason", "alias"}`` approve
                                                             (409 if its run's provenance
                                                             does not verify)
POST     ``/models/NAME/VERSION/reject``                     ``{"reason"}``
POST     ``/models/NAME/aliases/ALIAS/revoke``               ``{"reason"}`` remove the alias
GET      ``/models/NAME/aliases/ALIAS``                      the approved version and bundle
*        ``/mlflow/...``                                     MLflow's REST API, authenticated
=======  ==================================================  ================================
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.parse
from typing import Any, cast

from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httputil import HTTPHeaders, parse_response_start_line
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from ztlab.common.errors import ZtlabError
from ztlab.hub.api.base import ZtlabAPIHandler
from ztlab.hub.models.mlflow_auth import CONTROL_USER
from ztlab.hub.models.provenance import check_approvable, provenance_of_version

_NAME = r"([A-Za-z0-9][A-Za-z0-9_.-]{0,127})"
_VERSION = r"([0-9]{1,9})"
_READ_POSTS = {
    "api/2.0/mlflow/runs/search",
    "api/2.0/mlflow/experiments/search",
    "api/2.0/mlflow/logged-models/search",
    "api/2.0/mlflow/experiments/get-by-name",
}
_HOP_HEADERS = {"connection", "transfer-encoding", "content-encoding", "content-length"}
#: what the proxy forwards: MLflow's REST and artifact APIs (``ajax-api`` is the UI's alias)
_FORWARDED = re.compile(r"(?:ajax-)?api/[23]\.0/mlflow(?:-artifacts)?/.*|health|version")
#: MLflow's user administration a user may reach (the rest is refused: users are the hub's)
_USER_PATHS = {
    "api/2.0/mlflow/users/current",
    "api/3.0/mlflow/users/current/permissions",
    "api/3.0/mlflow/users/permissions/grant",
    "api/3.0/mlflow/users/permissions/revoke",
    "api/3.0/mlflow/users/permissions/get",
    "api/3.0/mlflow/users/permissions/list",
}
_GRANT = "api/3.0/mlflow/users/permissions/grant"
_NEW_VERSION = "api/2.0/mlflow/model-versions/create"
_QUOTE_SAFE = "/-_.~!$&'()*+,;=:@"


def canonical(path: str) -> str:
    """The path as the proxy checks it; ``HTTPError(404)`` if it is not forwarded at all.

    ``ajax-api/...`` (the MLflow UI's alias of every REST route) is checked as ``api/...``;
    ``.``, ``..`` and empty segments (a trailing ``/`` outside artifact listings) are
    refused so that no spelling of a refused route reaches MLflow.
    """
    segments = path.split("/")
    trailing = segments[-1] == "" and "/mlflow-artifacts/" not in f"/{path}"
    if any(part in (".", "..") for part in segments) or "" in segments[:-1] or trailing:
        raise web.HTTPError(404, f"{path!r} is not a canonical MLflow API path.")
    if not _FORWARDED.fullmatch(path):
        raise web.HTTPError(404, f"{path!r} is not part of MLflow's REST API.")
    checked = path.removeprefix("ajax-")
    if (
        "/mlflow/users/" in checked
        or "/mlflow/roles/" in checked
        or checked.endswith("/mlflow/users")
    ) and checked not in _USER_PATHS:
        raise web.HTTPError(
            403, "MLflow's users and roles are the hub's: manage them in the hub, not here."
        )
    return checked


class _ModelsHandler(ZtlabAPIHandler):
    @property
    def service(self) -> Any:
        """The hub's model service, or a 404 where the hub runs without ``[models]``."""
        if self.plane.models is None:
            raise web.HTTPError(404, "This hub has no model registry ([models] enabled = false).")
        return self.plane.models

    async def act(self, call: Any, *args: Any, status: int = 200) -> None:
        """Run a service call in a thread; reply with its result or its error."""
        try:
            result = await asyncio.to_thread(call, *args)
        except ZtlabError as error:
            await self.fail(error)
            return
        await self.reply(result if result is not None else {"ok": True}, status)


class SignHandler(_ModelsHandler):
    """Sign a version (its trainer)."""

    async def post(self, name: str, version: str) -> None:
        """``POST .../sign``."""
        principal = await self.principal()

        def sign() -> dict[str, Any]:
            signature = self.service.sign(principal, name, version)
            return {"digest": signature.digest, "trainer": signature.trainer}

        await self.act(sign, status=201)


class VersionHandler(_ModelsHandler):
    """A version's signature, approval history, and the provenance of the run that trained
    it (``null`` when no notebook run did)."""

    async def get(self, name: str, version: str) -> None:
        """``GET .../NAME/VERSION``."""
        await self.principal()

        def show() -> dict[str, Any]:
            stored = self.service.signature(name, version)
            provenance = provenance_of_version(self.plane.runs, stored)
            return {
                "signed": stored is not None,
                "trainer": stored.trainer if stored else None,
                "bundle": json.loads(stored.bundle) if stored else None,
                "history": self.service.history(name, version),
                "provenance": provenance.as_json() if provenance is not None else None,
            }

        await self.act(show)


class DecisionHandler(_ModelsHandler):
    """Approve or reject a version; a version from a run whose provenance does not verify
    is not approved (409)."""

    async def post(self, name: str, version: str, action: str) -> None:
        """``POST .../approve`` or ``.../reject`` with ``{"reason", "alias"}``."""
        principal = await self.principal()
        body = self.body()
        reason = body.get("reason")
        if not isinstance(reason, str) or not reason.strip():
            raise web.HTTPError(400, 'Expected {"reason": "why"} (a reason is required).')
        if action == "approve":
            alias = body.get("alias") or self.service.protected_aliases[0]

            def approve() -> None:
                check_approvable(
                    self.plane.runs,
                    self.service,
                    actor=principal.name,
                    name=name,
                    version=version,
                    record=self.plane.record,
                )
                self.service.approve(principal, name, version, reason, alias)

            await self.act(approve)
        else:
            await self.act(self.service.reject, principal, name, version, reason)


class AliasHandler(_ModelsHandler):
    """The approved version behind an alias, with its bundle (for verified loading)."""

    async def get(self, name: str, alias: str) -> None:
        """``GET .../aliases/ALIAS``: 409 unless the approval service set it."""
        await self.principal()

        def resolve() -> dict[str, Any]:
            from ztlab.hub.models.service import ModelServiceError

            current = self.service.mlflow.alias(name, alias)
            approved = self.service.approved_version(name, alias)
            if current is None or approved is None:
                raise ModelServiceError(f"{name}@{alias} is not approved", status=404)
            version = str(current["version"])
            if version != approved:
                raise ModelServiceError(
                    f"{name}@{alias} points at version {version}, but version {approved} is "
                    "the approved one (the alias was moved outside the approval service)",
                    status=409,
                )
            stored = self.service.signature(name, version)
            return {
                "version": version,
                "bundle": json.loads(stored.bundle) if stored else None,
                "history": self.service.history(name, version),
            }

        await self.act(resolve)

    async def post(self, name: str, alias: str) -> None:
        """``POST .../aliases/ALIAS/revoke`` (routed here with ``revoke``)."""
        principal = await self.principal()
        reason = self.body().get("reason")
        if not isinstance(reason, str) or not reason.strip():
            raise web.HTTPError(400, 'Expected {"reason": "why"} (a reason is required).')
        await self.act(self.service.revoke, principal, name, alias, reason)


_ARTIFACTS = "api/2.0/mlflow-artifacts/artifacts/"
#: largest JSON request the proxy buffers; artifact uploads are streamed instead
_MAX_BUFFERED = 64 * 1024 * 1024
#: largest artifact upload (streamed through, never held in memory)
_MAX_ARTIFACT = 256 * 1024**3


@web.stream_request_body
class MlflowProxyHandler(_ModelsHandler):
    """MLflow's REST API (and artifact service) behind the hub's authentication."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")

    def check_xsrf_cookie(self) -> None:
        """Token-authenticated API calls only (MLflow's client sends a bearer token)."""
        if self.get_auth_token() is None:
            super().check_xsrf_cookie()

    async def prepare(self) -> None:
        """Authenticate; an artifact upload is checked now and streamed to MLflow."""
        await super().prepare()
        self._buffer = bytearray()
        self._queue: asyncio.Queue[bytes | None] | None = None
        self._upload: Any = None
        self._writer = False
        self._raw = self.path_args[0] if self.path_args else ""
        # a refused path is answered once the body has been read: answering (and closing)
        # while the client still sends makes the proxy in front report a broken connection
        self._refused: web.HTTPError | None = None
        try:
            path = self._checked = canonical(self._raw)
        except web.HTTPError as refused:
            self._refused, self._checked = refused, ""
            return
        if self.request.method != "PUT" or not path.startswith(_ARTIFACTS):
            return
        principal = await self._caller()
        self._guard(principal, "PUT", path, {}, {})
        self.request.connection.set_max_body_size(_MAX_ARTIFACT)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=16)
        self._queue = queue

        async def produce(write: Any) -> None:
            while (chunk := await queue.get()) is not None:
                await write(chunk)

        headers = {
            "Content-Type": self.request.headers.get("Content-Type", ""),
            **self.service.mlflow.headers_for(principal.name),
        }
        if "Content-Length" in self.request.headers:
            headers["Content-Length"] = self.request.headers["Content-Length"]
        self._upload = asyncio.ensure_future(
            AsyncHTTPClient().fetch(
                HTTPRequest(
                    self._upstream(),
                    method="PUT",
                    body_producer=cast(Any, produce),
                    headers=headers,
                    request_timeout=3600,
                ),
                raise_error=False,
            )
        )

    async def data_received(self, chunk: bytes) -> None:
        """Stream an upload on; buffer anything else (up to 64 MiB)."""
        if self._queue is not None:
            await self._queue.put(chunk)
            return
        self._buffer += chunk
        if len(self._buffer) > _MAX_BUFFERED:
            raise web.HTTPError(413, "Request too large for the MLflow API.")

    def _upstream(self) -> str:
        quoted = urllib.parse.quote(self._raw, safe=_QUOTE_SAFE)
        url = f"{self.service.mlflow.base_url}/{quoted}"
        return f"{url}?{self.request.query}" if self.request.query else url

    async def _caller(self) -> Any:
        """The authenticated principal, known to MLflow (writers may use ``Default``)."""
        principal = await self.principal()
        if principal.name == CONTROL_USER:
            raise web.HTTPError(403, f"{CONTROL_USER!r} is reserved for the control plane.")
        service = self.service
        service.remember_roles(principal.name, principal.roles)
        self._writer = (
            self.plane.policy.with_audit(None)
            .authorize(principal, "register_model", "model:mlflow@any")
            .allowed
        )
        if service.introduced(principal.name, writer=self._writer):
            return principal
        try:
            await asyncio.to_thread(service.introduce, principal.name, writer=self._writer)
        except ZtlabError as error:
            await self.fail(error)
            raise web.Finish() from error
        return principal

    def _guard(
        self,
        principal: Any,
        method: str,
        path: str,
        args: dict[str, Any],
        query: dict[str, str],
    ) -> None:
        """Refuse protected aliases, writes by readers, and writes to others' runs."""
        service = self.service
        if path.endswith("/mlflow/registered-models/alias") and method not in ("GET", "HEAD"):
            alias = args.get("alias") or query.get("alias")
            if alias in service.protected_aliases:
                self.plane.record(
                    principal.name,
                    "model.alias.refused",
                    model=args.get("name") or query.get("name"),
                    alias=alias,
                )
                raise web.HTTPError(
                    403, f"The alias {alias!r} is protected: only an approval sets or removes it."
                )
        if method in ("GET", "HEAD") or path in _READ_POSTS:
            return
        if not self._writer:
            raise web.HTTPError(403, f"{principal.name} may only read MLflow.")
        tags = [args] if path.endswith("/runs/set-tag") else list(args.get("tags") or [])
        if (
            path.endswith(("/runs/set-tag", "/runs/log-batch", "/runs/delete-tag"))
            and any(
                isinstance(t, dict) and str(t.get("key", "")).startswith("ztlab.") for t in tags
            )
        ) or (path.endswith("/runs/delete-tag") and str(args.get("key", "")).startswith("ztlab.")):
            raise web.HTTPError(403, "Tags named ztlab.* are the control plane's to set.")
        owner_of = args.get("run_id") or query.get("run_id") or args.get("run_uuid")
        parts = path.split("/")
        if path.startswith(_ARTIFACTS) and len(parts) > 5:
            owner_of = parts[6] if parts[5] == "models" and len(parts) > 6 else parts[5]
        elif path.startswith("api/2.0/mlflow/logged-models/") and len(parts) > 4:
            owner_of = parts[4]
        if owner_of:
            owner = service.run_owner(str(owner_of))
            if owner is not None and owner != principal.name:
                raise web.HTTPError(403, f"{owner_of} belongs to {owner}.")

    def _relay(self, response: Any) -> None:
        self.set_status(response.code if response.code != 599 else 502)
        for key, value in response.headers.get_all():
            if key.lower() not in _HOP_HEADERS:
                self.set_header(key, value)
        self.finish(response.body or b"")

    def _refuse_now(self) -> None:
        """Raise the refusal :meth:`prepare` found, if any."""
        if self._refused is not None:
            raise self._refused

    async def _forward(self) -> None:
        self._refuse_now()
        path = self._checked
        principal = await self._caller()
        service = self.service
        method = self.request.method or "GET"
        query = dict(urllib.parse.parse_qsl(self.request.query))
        raw = bytes(self._buffer)
        body: Any = None
        if raw and "json" in self.request.headers.get("Content-Type", ""):
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        args = body if isinstance(body, dict) else {}
        self._guard(principal, method, path, args, query)
        run_of_token = self.run_of_token()
        if path == "api/2.0/mlflow/runs/create" and isinstance(body, dict):
            body["user_id"] = principal.name
            body["tags"] = [
                t
                for t in body.get("tags", [])
                if t.get("key") != "mlflow.user" and not str(t.get("key", "")).startswith("ztlab.")
            ]
            body["tags"].append({"key": "mlflow.user", "value": principal.name})
            if run_of_token is not None:
                body["tags"].append({"key": "ztlab.run", "value": run_of_token})
        payload = json.dumps(body).encode() if isinstance(body, dict) else raw
        headers = {
            k: v
            for k, v in self.request.headers.get_all()
            if k.lower() in ("content-type", "accept")
        }
        headers.update(service.mlflow.headers_for(principal.name))
        if path == _GRANT:
            await self._introduce(args.get("username"))
        request = HTTPRequest(
            self._upstream(),
            method=method,
            body=payload if method in ("POST", "PUT", "PATCH") else None,
            headers=headers,
            request_timeout=600,
            allow_nonstandard_methods=True,
            decompress_response=False,
        )
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        if response.code == 200 and method == "POST":
            try:
                answer = json.loads(response.body or b"{}")
            except ValueError:
                answer = {}
            created = None
            if path == "api/2.0/mlflow/runs/create":
                created = answer.get("run", {}).get("info", {}).get("run_id")
            elif path == "api/2.0/mlflow/logged-models":
                created = answer.get("model", {}).get("info", {}).get("model_id")
            if created:
                service.record_run(str(created), principal.name)
                runs = self.plane.runs
                if run_of_token is not None and runs is not None and "runs/create" in path:
                    runs.attach_mlflow_run(run_of_token, str(created))
            if path == _NEW_VERSION and self.plane.config.models.sign_on_register:
                await self._sign_new_version(principal, answer)
        await self.plane.flush()
        self._relay(response)

    async def _sign_new_version(self, principal: Any, answer: Any) -> None:
        """Sign a version MLflow just registered; say how it went in ``X-Ztlab-Signature``."""
        version = answer.get("model_version", {}) if isinstance(answer, dict) else {}
        name, number = version.get("name"), version.get("version")
        if not name or not number:
            return
        try:
            signed = await asyncio.to_thread(
                self.service.sign, principal, str(name), str(number), on_register=True
            )
        except ZtlabError as error:
            # the version stays registered but unsigned; the refusal is audited
            said = " ".join(error.message.split()).encode("ascii", "replace").decode()
            self.set_header("X-Ztlab-Signature", f"refused: {said}"[:500])
            return
        self.set_header("X-Ztlab-Signature", f"sha256:{signed.digest}")

    async def _introduce(self, username: Any) -> None:
        """Make a hub user known to MLflow before a grant names them."""
        if not isinstance(username, str) or self.find_user(username) is None:
            raise web.HTTPError(404, f"No hub user {username!r} to grant a permission to.")
        if username == CONTROL_USER:
            raise web.HTTPError(403, f"{CONTROL_USER!r} is reserved for the control plane.")
        await asyncio.to_thread(self.service.mlflow.create_user, username)

    async def get(self, path: str) -> None:
        """Forward; an artifact download is streamed back, never held in memory."""
        if self._checked.startswith(_ARTIFACTS):
            await self._download()
            return
        await self._forward()

    async def _download(self) -> None:
        self._refuse_now()
        principal = await self._caller()
        self._guard(principal, "GET", self._checked, {}, {})
        started = False
        status: list[Any] = []
        headers = HTTPHeaders()

        def on_header(line: str) -> None:
            if not status:
                status.append(parse_response_start_line(line.strip()))
            elif line.strip():
                headers.parse_line(line)

        def on_chunk(chunk: bytes) -> None:
            nonlocal started
            if not started:
                started = True
                self.set_status(status[0].code if status else 200)
                for key, value in headers.get_all():
                    if key.lower() not in _HOP_HEADERS:
                        self.set_header(key, value)
            self.write(chunk)
            self.flush()

        client = SimpleAsyncHTTPClient(force_instance=True, max_body_size=_MAX_ARTIFACT)
        try:
            response = await client.fetch(
                HTTPRequest(
                    self._upstream(),
                    headers=self.service.mlflow.headers_for(principal.name),
                    header_callback=on_header,
                    streaming_callback=on_chunk,
                    request_timeout=3600,
                    decompress_response=False,
                ),
                raise_error=False,
            )
        finally:
            client.close()
        if not started:
            self.set_status(response.code if response.code != 599 else 502)
        self.finish()

    async def head(self, path: str) -> None:
        """Forward."""
        await self._forward()

    async def post(self, path: str) -> None:
        """Forward."""
        await self._forward()

    async def put(self, path: str) -> None:
        """Finish a streamed upload, or forward."""
        if self._queue is not None:
            await self._queue.put(None)
            self._relay(await self._upload)
            return
        await self._forward()

    async def patch(self, path: str) -> None:
        """Forward."""
        await self._forward()

    async def delete(self, path: str) -> None:
        """Forward."""
        await self._forward()

    def on_connection_close(self) -> None:
        """Abandon a streamed upload whose client went away."""
        if self._queue is not None and self._upload is not None:
            self._upload.cancel()


def model_handlers() -> list[tuple[str, Any]]:
    """The handlers, relative to the hub prefix (``/hub``)."""
    return [
        (rf"/api/ztlab/models/{_NAME}/{_VERSION}/sign", SignHandler),
        (rf"/api/ztlab/models/{_NAME}/{_VERSION}/(approve|reject)", DecisionHandler),
        (rf"/api/ztlab/models/{_NAME}/{_VERSION}", VersionHandler),
        (rf"/api/ztlab/models/{_NAME}/aliases/([A-Za-z0-9_-]+)/revoke", AliasHandler),
        (rf"/api/ztlab/models/{_NAME}/aliases/([A-Za-z0-9_-]+)", AliasHandler),
        (r"/api/ztlab/mlflow/(.*)", MlflowProxyHandler),
    ]
