"""Environments as control-plane objects: define, build, retire, verify, and who sees which.

Every change is a policy decision (``manage_environment`` on ``environment:NAME``) and an
audit record; using one is ``use_environment`` (the spawner asks for each ready build when
a server starts: an environment the policy does not grant is neither mounted into the
sandbox nor listed as a kernel). Builds run in a thread of the hub, one at a time, and log
to ``<state_dir>/logs/environments/NAME-BUILD.log``; a build a stopped hub interrupted is
marked failed at the next start. Retiring an environment stops new servers from getting
it; running servers keep their mount until they stop, and build folders are never removed
while the registry lists them.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ztlab.common.config import ZtlabConfig
from ztlab.common.errors import UsageError, ZtlabError
from ztlab.hub.environments.build import BuildFailed, BuildPlan, build, check, runtime_digest
from ztlab.hub.environments.registry import BuildRow, Definition, EnvironmentRegistry
from ztlab.hub.policy import PolicyEngine, Principal
from ztlab.hub.private import state_directory

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}\Z")
#: the definitions shipped with ztlab (``hub/environments/definitions/NAME.txt``)
SHIPPED = ("base", "gpu")
#: the actor of what the control plane does on its own
SYSTEM = "ztlab-hub"


class EnvironmentDenied(ZtlabError):
    """The policy does not allow this environment action."""

    status = 403


@dataclass(frozen=True, slots=True)
class Usable:
    """A ready build a user may use: mounted into their sandbox, listed as a kernel."""

    name: str
    path: Path
    digest: str


#: ``(index_url_with_token_context)``: yields the gateway's index URL for one build
IndexFor = Callable[[str], Any]


class EnvironmentService:
    """Definitions, builds and decisions (the hub's one instance)."""

    def __init__(
        self,
        config: ZtlabConfig,
        *,
        policy: PolicyEngine,
        record: Callable[..., None],
        registry: EnvironmentRegistry,
    ) -> None:
        self.config = config
        self.policy = policy
        self.record = record
        self.registry = registry
        #: set by the hub once the package gateway listens: a context manager giving the
        #: index URL (with a one-time token) a build installs from
        self.index_for: IndexFor | None = None
        self._building = threading.Lock()
        for row in registry.interrupted():
            registry.finish_build(row.name, row.build, error="interrupted: the hub stopped")
        for name in SHIPPED:
            try:
                registry.definition(name)
            except ZtlabError:
                registry.define(
                    name, shipped_requirements(name), layer_on=None, description="", by=SYSTEM
                )

    # -- decisions ---------------------------------------------------------------------------

    def _require(self, principal: Principal, name: str) -> None:
        decision = self.policy.authorize(principal, "manage_environment", f"environment:{name}")
        if not decision.allowed:
            raise EnvironmentDenied(
                f"{principal.name} may not manage environment {name}: {decision.reason}",
                hint="environments are managed by admins",
            )

    def usable(self, principal: Principal) -> list[Usable]:
        """The ready, unretired builds ``principal`` may use (each an audited decision)."""
        found = []
        for definition in self.registry.definitions():
            if definition.retired:
                continue
            row = self.registry.current(definition.name)
            if row is None or row.digest is None or not Path(row.path).is_dir():
                continue
            resource = f"environment:{definition.name}"
            if self.policy.authorize(principal, "use_environment", resource).allowed:
                found.append(Usable(definition.name, Path(row.path), row.digest))
        return found

    def visible(self, principal: Principal) -> list[Definition]:
        """Definitions ``principal`` may use or manage."""
        shown = []
        for definition in self.registry.definitions():
            resource = f"environment:{definition.name}"
            for action in ("use_environment", "manage_environment"):
                if self.policy.authorize(principal, action, resource).allowed:
                    shown.append(definition)
                    break
        return shown

    # -- changes -----------------------------------------------------------------------------

    def define(
        self,
        principal: Principal,
        name: str,
        requirements: str,
        *,
        layer_on: str | None = None,
        description: str = "",
    ) -> Definition:
        """Add or replace the definition ``name`` (built by :meth:`start_build`)."""
        check_name(name)
        self._require(principal, name)
        _check_requirements(requirements)
        definition = self.registry.define(
            name, requirements, layer_on=layer_on, description=description, by=principal.name
        )
        self.record(
            principal.name,
            "environment.defined",
            environment=name,
            requirements=requirements,
            layer_on=layer_on,
        )
        return definition

    def retire(self, principal: Principal, name: str) -> Definition:
        """Retire ``name``: no new server gets it; running kernels keep working."""
        self._require(principal, name)
        definition = self.registry.retire(name, by=principal.name)
        self.record(principal.name, "environment.retired", environment=name)
        return definition

    def start_build(
        self, principal: Principal, name: str, *, layer_on: str | None = None
    ) -> BuildRow:
        """Start building ``name`` in a thread; the build's row (status ``building``)."""
        self._require(principal, name)
        return self._start(name, by=principal.name, layer_on=layer_on)

    def ensure_base(self) -> BuildRow | None:
        """Build ``base`` (as the control plane) when it has no ready build, or when the
        kernel runtime it layers on changed since (ztlab or its dependencies upgraded): a
        hub offers its users a current kernel environment without an admin's step."""
        definition = self.registry.definition("base")
        if definition.retired:
            return None
        current = self.registry.current("base")
        if current is not None:
            try:
                lock, _, _ = self.registry.locked(current)
            except (ZtlabError, OSError):
                lock = None  # an unreadable or changed lock: build afresh, never fail the hub
            if lock is not None and lock.runtime == runtime_digest():
                return None
        return self._start("base", by=SYSTEM, layer_on=None)

    def _start(self, name: str, *, by: str, layer_on: str | None) -> BuildRow:
        definition = self.registry.definition(name)
        if self.index_for is None:
            raise UsageError(
                "environments are built through the package proxy, and this hub runs none",
                hint="set [packages] enabled = true",
            )
        if not self._building.acquire(blocking=False):
            raise UsageError("another environment is being built", hint="try again when it ends")
        try:
            row = self.registry.start_build(name, root=self.config.environments.root, by=by)
        except BaseException:
            self._building.release()
            raise
        layer = layer_on or definition.layer_on
        self.record(
            by, "environment.build_started", environment=name, build=row.build, layer_on=layer
        )
        thread = threading.Thread(
            target=self._build,
            args=(definition, row, layer, by),
            name=f"ztlab-env-build-{name}",
            daemon=True,
        )
        thread.start()
        return row

    def log_file(self, name: str, build: int) -> Path:
        """A build's log."""
        return self.config.state_dir / "logs" / "environments" / f"{name}-{build}.log"

    def _build(self, definition: Definition, row: BuildRow, layer: str | None, by: str) -> None:
        log_path = self.log_file(row.name, row.build)
        state_directory(log_path.parent)
        try:
            with log_path.open("a", encoding="utf-8") as log_file:
                log_file.flush()
                log_path.chmod(0o600)

                def log(line: str) -> None:
                    log_file.write(line + "\n")
                    log_file.flush()

                assert self.index_for is not None
                with self.index_for(f"environment {row.name} build {row.build} (by {by})") as url:
                    plan = BuildPlan(
                        name=row.name,
                        build=str(row.build),
                        requirements=definition.requirements,
                        root=self.config.environments.root,
                        index_url=url,
                        layer_on=layer,
                    )
                    try:
                        built = build(plan, log=log)
                    except ZtlabError as exc:
                        log(f"[failed] {exc.message}")
                        raise
                    except Exception as exc:
                        log(f"[failed] {exc!r}")
                        raise BuildFailed("build", repr(exc)) from exc
            self.registry.finish_build(
                row.name,
                row.build,
                lock=built.lock,
                manifests=(built.files, *built.layers),
            )
            self.record(
                by,
                "environment.built",
                environment=row.name,
                build=row.build,
                digest=built.lock.digest,
                files=built.lock.files.count,
                distributions=len(built.lock.distributions),
            )
        except ZtlabError as exc:
            self.registry.finish_build(row.name, row.build, error=exc.message)
            self.record(
                by,
                "environment.build_failed",
                environment=row.name,
                build=row.build,
                error=exc.message,
            )
        finally:
            self._building.release()

    def close(self) -> None:
        """Close the registry."""
        self.registry.close()

    def verify(self, principal: Principal, name: str) -> tuple[BuildRow, list[str]]:
        """Compare the current build of ``name`` with its lock; the differences."""
        self._require(principal, name)
        row = self.registry.current(name)
        if row is None:
            raise UsageError(
                f"environment {name} has no ready build", hint=f"ztlab env build {name}"
            )
        lock, files, layers = self.registry.locked(row)
        problems = check(Path(row.path), lock, files, layers)
        self.record(
            principal.name,
            "environment.verified",
            environment=name,
            build=row.build,
            digest=lock.digest,
            ok=not problems,
            problems=problems[:20],
        )
        return row, problems


def check_name(name: str) -> str:
    """An environment name: lowercase letters, digits, ``-`` and ``_``, 32 at most."""
    if not _NAME.match(name):
        raise UsageError(
            f"{name!r} is not an environment name",
            hint="use lowercase letters, digits, - and _ (32 characters at most)",
        )
    return name


def _check_requirements(text: str) -> None:
    """Each line a requirement (or a comment): a bad line is named."""
    from packaging.requirements import InvalidRequirement, Requirement

    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#")[0].strip()
        if not line:
            continue
        if line.startswith("-"):
            raise UsageError(
                f"requirements line {number}: {line!r}: pip options are not allowed",
                hint="the index is the package proxy; list requirements only",
            )
        try:
            Requirement(line)
        except InvalidRequirement as exc:
            raise UsageError(f"requirements line {number}: {line!r}: {exc}") from exc


def shipped_requirements(name: str) -> str:
    """The requirements of a shipped definition."""
    folder = resources.files("ztlab.hub.environments") / "definitions"
    return (folder / f"{name}.txt").read_text(encoding="utf-8")
