"""``/hub/api/ztlab/environments`` and ``/hub/api/ztlab/packages``: what ``ztlab env`` and
``ztlab packages`` call.

=======  ==================================================  ===================================
method   path                                                what
=======  ==================================================  ===================================
GET      ``/api/ztlab/environments``                         environments the caller may use or
                                                             manage, with their current build
POST     ``/api/ztlab/environments``                         define ``{"name", "requirements",
                                                             "layer_on"?, "description"?}`` (201)
GET      ``/api/ztlab/environments/NAME``                    one, its builds and its lock
POST     ``/api/ztlab/environments/NAME/builds``             start a build ``{"layer_on"?}`` (202)
GET      ``/api/ztlab/environments/NAME/builds/N``           a build and its log (``?since=LINE``)
POST     ``/api/ztlab/environments/NAME/retire``             retire it
POST     ``/api/ztlab/environments/NAME/verify``             compare the build with its lock
GET      ``/api/ztlab/packages/rules``                       the caller's package allowlist
GET      ``/api/ztlab/packages/requests``                    requests (admins: all; others: own)
POST     ``/api/ztlab/packages/requests``                    ``{"requirement", "reason"}`` (201)
POST     ``/api/ztlab/packages/requests/ID``                 ``{"decision": "approve"|"deny",
                                                             "note"?, "role"?}`` (admins)
=======  ==================================================  ===================================
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tornado import web

from ztlab.common.errors import UsageError, ZtlabError
from ztlab.hub.api.base import ZtlabAPIHandler

_NAME = r"([a-z0-9][a-z0-9_-]{0,31})"


class _EnvironmentsAPIHandler(ZtlabAPIHandler):
    @property
    def service(self) -> Any:
        """The environment service, or a 404 on a hub without the package proxy."""
        if self.plane.environments is None:
            raise web.HTTPError(404, "This hub has no environments ([packages] enabled = false).")
        return self.plane.environments

    async def act(self, call: Any, *args: Any, status: int = 200, **kwargs: Any) -> Any:
        """Run a service call in a thread; its result, or the error answered (``None``)."""
        try:
            return await asyncio.to_thread(call, *args, **kwargs)
        except ZtlabError as error:
            await self.fail(error)
            return None


def _definition(service: Any, definition: Any) -> dict[str, Any]:
    current = service.registry.current(definition.name)
    return {
        "name": definition.name,
        "requirements": definition.requirements,
        "layer_on": definition.layer_on,
        "description": definition.description,
        "defined_by": definition.defined_by,
        "retired": definition.retired,
        "current": current.as_json() if current is not None else None,
    }


class EnvironmentsHandler(_EnvironmentsAPIHandler):
    """List and define environments."""

    async def get(self) -> None:
        """Definitions the caller may use or manage."""
        principal = await self.principal()
        service = self.service
        shown = await asyncio.to_thread(service.visible, principal)
        await self.reply({"environments": [_definition(service, d) for d in shown]})

    async def post(self) -> None:
        """Define (or redefine) an environment."""
        principal = await self.principal()
        body = self.body()
        name, requirements = body.get("name"), body.get("requirements")
        if not isinstance(name, str) or not isinstance(requirements, str):
            raise web.HTTPError(400, 'Expected {"name": "NAME", "requirements": "TEXT"}.')
        definition = await self.act(
            self.service.define,
            principal,
            name,
            requirements,
            layer_on=body.get("layer_on") or None,
            description=str(body.get("description") or ""),
        )
        if definition is not None:
            await self.reply(_definition(self.service, definition), 201)


class EnvironmentHandler(_EnvironmentsAPIHandler):
    """One environment, its builds and its current lock."""

    async def get(self, name: str) -> None:
        principal = await self.principal()
        service = self.service
        visible = await asyncio.to_thread(service.visible, principal)
        definition = next((d for d in visible if d.name == name), None)
        if definition is None:
            raise web.HTTPError(404, f"There is no environment {name} you may use.")
        answer = _definition(service, definition)
        answer["builds"] = [row.as_json() for row in service.registry.builds(name)]
        current = service.registry.current(name)
        if current is not None:
            lock, _, _ = await asyncio.to_thread(service.registry.locked, current)
            answer["lock"] = {
                "digest": lock.digest,
                "python": lock.python,
                "files": lock.files.count,
                "bytes": lock.files.size,
                "layers": [layer.path for layer in lock.layers],
                "distributions": lock.distributions,
            }
        await self.reply(answer)


class BuildsHandler(_EnvironmentsAPIHandler):
    """Start a build."""

    async def post(self, name: str) -> None:
        principal = await self.principal()
        body = self.body()
        row = await self.act(
            self.service.start_build, principal, name, layer_on=body.get("layer_on") or None
        )
        if row is not None:
            await self.reply(row.as_json(), 202)


class BuildHandler(_EnvironmentsAPIHandler):
    """A build's status and log lines from ``since``."""

    async def get(self, name: str, build: str) -> None:
        principal = await self.principal()
        service = self.service
        if not any(d.name == name for d in await asyncio.to_thread(service.visible, principal)):
            raise web.HTTPError(404, f"There is no environment {name} you may use.")
        row = await self.act(service.registry.build, name, int(build))
        if row is None:
            return
        since = int(self.get_argument("since", "0"))
        lines = _log_lines(service.log_file(name, int(build)))
        await self.reply({**row.as_json(), "log": lines[since:], "log_lines": len(lines)})


def _log_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []


class RetireHandler(_EnvironmentsAPIHandler):
    async def post(self, name: str) -> None:
        principal = await self.principal()
        definition = await self.act(self.service.retire, principal, name)
        if definition is not None:
            await self.reply(_definition(self.service, definition))


class VerifyHandler(_EnvironmentsAPIHandler):
    async def post(self, name: str) -> None:
        principal = await self.principal()
        result = await self.act(self.service.verify, principal, name)
        if result is not None:
            row, problems = result
            await self.reply(
                {"build": row.as_json(), "ok": not problems, "problems": problems[:200]}
            )


class _PackagesAPIHandler(ZtlabAPIHandler):
    @property
    def requests(self) -> Any:
        if self.plane.package_requests is None:
            raise web.HTTPError(404, "This hub has no package proxy ([packages] enabled = false).")
        return self.plane.package_requests

    def may_decide(self, principal: Any, project: str) -> bool:
        decision = self.plane.policy.authorize(principal, "approve_package", f"package:{project}")
        return bool(decision.allowed)


class RulesHandler(_PackagesAPIHandler):
    """The caller's allowlist: their roles' rules and their approved requests."""

    async def get(self) -> None:
        from ztlab.hub.packages.rules import PackageRules, role_rules

        principal = await self.principal()
        rules = await asyncio.to_thread(
            PackageRules.of_user,
            principal.name,
            principal.roles,
            role_rules(self.plane.config.roles),
            self.requests,
        )
        await self.reply(
            {"rules": [{"requirement": r.requirement, "source": r.source} for r in rules.rules]}
        )


class RequestsHandler(_PackagesAPIHandler):
    """File a request; list requests."""

    async def get(self) -> None:
        principal = await self.principal()
        status = self.get_argument("status", None)
        mine_only = not self.may_decide(principal, "any")
        rows = self.requests.all(user=principal.name if mine_only else None, status=status)
        await self.reply({"requests": [row.as_json() for row in rows]})

    async def post(self) -> None:
        from packaging.requirements import InvalidRequirement, Requirement

        principal = await self.principal()
        body = self.body()
        requirement, reason = body.get("requirement"), body.get("reason")
        if not isinstance(requirement, str) or not isinstance(reason, str) or not reason.strip():
            raise web.HTTPError(400, 'Expected {"requirement": "NAME[==VERSION]", "reason": ".."}.')
        try:
            parsed = Requirement(requirement)
        except InvalidRequirement as exc:
            await self.fail(UsageError(f"{requirement!r} is not a requirement: {exc}"))
            return
        row = self.requests.file(user=principal.name, requirement=str(parsed), reason=reason)
        self.plane.record(
            principal.name,
            "package.requested",
            request=row.id,
            requirement=row.requirement,
            reason=reason,
        )
        await self.reply(row.as_json(), 201)


class RequestHandler(_PackagesAPIHandler):
    """An admin's decision on one request."""

    async def post(self, request_id: str) -> None:
        from packaging.requirements import Requirement

        principal = await self.principal()
        body = self.body()
        decision = body.get("decision")
        if decision not in ("approve", "deny"):
            raise web.HTTPError(400, 'Expected {"decision": "approve" or "deny"}.')
        try:
            row = self.requests.get(int(request_id))
        except ZtlabError as error:
            await self.fail(error)
            return
        project = Requirement(row.requirement).name
        if not self.may_decide(principal, project):
            raise web.HTTPError(403, f"{principal.name} may not decide package requests.")
        role = body.get("role") or None
        if role is not None and role not in self.plane.config.roles:
            await self.fail(UsageError(f"there is no role {role!r}"))
            return
        try:
            row = self.requests.decide(
                row.id,
                approve=decision == "approve",
                by=principal.name,
                note=str(body.get("note") or ""),
                role=role,
            )
        except ZtlabError as error:
            await self.fail(error)
            return
        self.plane.record(
            principal.name,
            "package.request_decided",
            request=row.id,
            requirement=row.requirement,
            user=row.user,
            decision=row.status,
            scope=row.scope,
            note=row.note or "",
        )
        await self.reply(row.as_json())


def environment_handlers() -> list[tuple[str, Any]]:
    """The handlers, relative to the hub prefix (``/hub``)."""
    return [
        (r"/api/ztlab/environments", EnvironmentsHandler),
        (rf"/api/ztlab/environments/{_NAME}", EnvironmentHandler),
        (rf"/api/ztlab/environments/{_NAME}/builds", BuildsHandler),
        (rf"/api/ztlab/environments/{_NAME}/builds/([0-9]+)", BuildHandler),
        (rf"/api/ztlab/environments/{_NAME}/retire", RetireHandler),
        (rf"/api/ztlab/environments/{_NAME}/verify", VerifyHandler),
        (r"/api/ztlab/packages/rules", RulesHandler),
        (r"/api/ztlab/packages/requests", RequestsHandler),
        (r"/api/ztlab/packages/requests/([0-9]+)", RequestHandler),
    ]
