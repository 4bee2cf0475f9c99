"""Signing and approving registered model versions (the control plane's side).

Signing ``NAME`` version ``V`` (:meth:`ModelService.sign`), in order:

(1) the version's run must have been created through the hub (:meth:`record_run`): its
    owner, the *trainer*, is who the hub authenticated, not what the client claimed;
(2) the policy decision ``sign_model`` on ``model:NAME@V`` with ``context.trainer``
    (by default only the trainer signs their own version);
(3) lineage: every dataset input of the run must carry ztlab's tags and name a registered
    dataset version with the same root digest, which the trainer may read;
(4) the control plane hashes the artifacts straight from its artifact store and signs them
    in the OpenSSF model-signing format with its key; the statement also names the
    trainer, the run and the datasets; the bundle is stored here and its digest tagged on
    the version (``ztlab.signature``); ``model.sign`` is audited.

Approving (:meth:`approve`) re-verifies the bundle against the artifacts as they are now,
re-checks lineage, asks the policy (``approve_model`` with the trainer in the context: the
two-person rule is a policy), then sets the protected alias through MLflow's API, which
only the control plane can reach unproxied, and records who approved what, when and why.
Every refusal is audited too.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztlab.common.attest import PrivateKey, key_id
from ztlab.common.attest.model import parse_bundle, sign_model, verify_model
from ztlab.common.auditlog.sink import AuditSink
from ztlab.common.errors import ZtlabError
from ztlab.hub.models.mlflow import MlflowError, MlflowREST, artifact_path, remote_artifact_uri
from ztlab.hub.policy import PolicyEngine, Principal
from ztlab.hub.private import private_directory, private_file


class ModelServiceError(ZtlabError):
    """A signing or approval request that is refused; ``status`` is the HTTP status."""

    def __init__(self, message: str, *, status: int = 400, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


@dataclass(frozen=True)
class Signature:
    """A stored signature of a model version."""

    name: str
    version: str
    trainer: str
    run_id: str
    bundle: str
    digest: str
    signed_at: float


_DDL = (
    "CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, owner TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS signatures (
        name TEXT NOT NULL, version TEXT NOT NULL, trainer TEXT NOT NULL, run_id TEXT NOT NULL,
        bundle TEXT NOT NULL, digest TEXT NOT NULL, signed_at REAL NOT NULL,
        PRIMARY KEY (name, version))""",
    """CREATE TABLE IF NOT EXISTS approvals (
        id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, version TEXT NOT NULL,
        alias TEXT NOT NULL, action TEXT NOT NULL, actor TEXT NOT NULL, reason TEXT NOT NULL,
        at REAL NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS user_roles (user TEXT PRIMARY KEY, roles TEXT NOT NULL)",
)


class ModelService:
    """Signatures, approvals and run ownership, in one SQLite file (mode 0600)."""

    def __init__(
        self,
        *,
        store: Path,
        mlflow: MlflowREST,
        key: PrivateKey,
        policy: PolicyEngine,
        audit: AuditSink,
        datasets: Any,
        protected_aliases: Sequence[str],
        artifacts_destination: str | None = None,
    ) -> None:
        """Open (creating) ``store/models.sqlite``."""
        private_directory(store, what="model store", error=ModelServiceError)
        path = private_file(
            store / "models.sqlite", what="model signature database", error=ModelServiceError
        )
        self.store = store
        self.mlflow = mlflow
        self._key = key
        self.keyid = key_id(key.public_key())
        self._policy = policy
        self._audit = audit
        self._datasets = datasets
        self.protected_aliases = tuple(protected_aliases)
        self.artifacts_destination = artifacts_destination
        self._lock = threading.Lock()
        self._introduced: set[tuple[str, bool]] = set()
        self._roles_seen: dict[str, frozenset[str]] = {}
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        for statement in _DDL:
            self._db.execute(statement)

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- runs -------------------------------------------------------------------------

    def record_run(self, run_id: str, owner: str) -> None:
        """The hub saw ``owner`` create ``run_id`` (called by the MLflow proxy)."""
        self._query("INSERT OR IGNORE INTO runs (run_id, owner) VALUES (?, ?)", (run_id, owner))

    def run_owner(self, run_id: str) -> str | None:
        """Who created ``run_id`` through the hub, if anyone did."""
        rows = self._query("SELECT owner FROM runs WHERE run_id = ?", (run_id,))
        return str(rows[0][0]) if rows else None

    # -- helpers ----------------------------------------------------------------------

    def _refuse(
        self, actor: str, action: str, name: str, version: str, message: str, status: int = 403
    ) -> ModelServiceError:
        self._audit.record(
            actor=actor,
            action=f"{action}.refused",
            detail={"model": f"{name}@{version}", "reason": message},
        )
        return ModelServiceError(message, status=status)

    def _artifact_uri(self, version: dict[str, Any]) -> str:
        """The ``mlflow-artifacts:/...`` URI of a model version's files."""
        source = str(version.get("source", ""))
        if source.startswith("models:/m-"):
            info = self.mlflow.logged_model(source.removeprefix("models:/"))["info"]
            return str(info["artifact_uri"])
        if source.startswith("mlflow-artifacts:"):
            return source
        raise ModelServiceError(
            f"cannot locate the artifacts of {version.get('name')} version "
            f"{version.get('version')} (source {source!r})",
            status=400,
        )

    @contextlib.contextmanager
    def artifacts(self, version: dict[str, Any]) -> Iterator[Path]:
        """A local directory with the version's files, read straight from the store.

        The local store is read in place. From object storage (``artifacts_destination``,
        e.g. ``s3://...``) the files are fetched with MLflow's artifact repository for that
        store (the hub's own credentials, not through the MLflow server) into a private
        directory under ``<store>/staging`` that is removed afterwards.
        """
        uri = self._artifact_uri(version)
        if self.artifacts_destination is None:
            yield artifact_path(self.store, uri)
            return
        remote = remote_artifact_uri(self.artifacts_destination, uri)
        staging = private_directory(
            self.store / "staging", what="artifact staging directory", error=ModelServiceError
        )
        with tempfile.TemporaryDirectory(dir=staging) as local:
            try:
                registry: Any = importlib.import_module(
                    "mlflow.store.artifact.artifact_repository_registry"
                )
                registry.get_artifact_repository(remote).download_artifacts("", dst_path=local)
            except ImportError as exc:
                raise ModelServiceError(
                    f"cannot read {remote}: {exc}",
                    status=500,
                    hint="install the object-storage client: pip install 'zerotrust-lab[s3]'",
                ) from exc
            except Exception as exc:  # botocore and MLflow errors share no base
                raise ModelServiceError(
                    f"cannot read the artifacts at {remote}: {exc}", status=502
                ) from exc
            yield Path(local)

    def _lineage(self, trainer: str, run: dict[str, Any]) -> list[dict[str, str]]:
        """The run's datasets, each checked against the registry; raises when one is not."""
        from ztlab.hub.datasets import DatasetNotFound, RegistryDenied

        inputs = (run.get("inputs") or {}).get("dataset_inputs") or []
        checked: list[dict[str, str]] = []
        principal = Principal(name=trainer, roles=self._roles_of(trainer))
        for item in inputs:
            tags = {t["key"]: t["value"] for t in item.get("tags", [])}
            name = item.get("dataset", {}).get("name", "?")
            ref, root = tags.get("ztlab.dataset"), tags.get("ztlab.root")
            if not ref or not root:
                raise ModelServiceError(
                    f"the run read dataset {name!r}, which is not a registered dataset "
                    "(no ztlab lineage)",
                    hint="train on data read with ztlab.datasets.open(...)",
                )
            try:
                registered = self._datasets.get(principal, ref)
            except (DatasetNotFound, RegistryDenied) as exc:
                raise ModelServiceError(
                    f"the run read {ref}, which the trainer cannot read: {exc.message}"
                ) from exc
            if registered.root != root:
                raise ModelServiceError(
                    f"the run read {ref} with root {root[:16]}..., but the registered root "
                    f"is {registered.root[:16]}... (tampered data or a forged input)"
                )
            checked.append({"dataset": ref, "root": root})
        return checked

    def _roles_of(self, user: str) -> frozenset[str]:
        rows = self._query("SELECT roles FROM user_roles WHERE user = ?", (user,))
        return frozenset(json.loads(rows[0][0])) if rows else frozenset()

    def introduced(self, user: str, *, writer: bool) -> bool:
        """Whether :meth:`introduce` has been done for ``user`` in this role."""
        return (user, writer) in self._introduced

    def introduce(self, user: str, *, writer: bool) -> None:
        """Make ``user`` known to MLflow; a writer may also run in MLflow's ``Default``
        experiment (id 0, which nobody created and so nobody manages)."""
        if (user, writer) in self._introduced:
            return
        self.mlflow.create_user(user)
        if writer:
            try:
                self.mlflow.grant(user, "experiment", "0", "EDIT")
            except MlflowError as exc:
                if exc.code != "RESOURCE_ALREADY_EXISTS":
                    raise
        self._introduced.add((user, writer))

    def remember_roles(self, user: str, roles: frozenset[str]) -> None:
        """The roles the hub last saw ``user`` with (for lineage checks made later)."""
        if self._roles_seen.get(user) == roles:
            return
        self._roles_seen[user] = roles
        self._query(
            "INSERT OR REPLACE INTO user_roles (user, roles) VALUES (?, ?)",
            (user, json.dumps(sorted(roles))),
        )

    def signature(self, name: str, version: str) -> Signature | None:
        """The stored signature of ``name`` version ``version``."""
        rows = self._query(
            "SELECT name, version, trainer, run_id, bundle, digest, signed_at FROM signatures "
            "WHERE name = ? AND version = ?",
            (name, version),
        )
        return Signature(*rows[0]) if rows else None

    def signed_versions(self) -> list[Signature]:
        """Every signed version, newest first."""
        rows = self._query(
            "SELECT name, version, trainer, run_id, bundle, digest, signed_at FROM signatures "
            "ORDER BY signed_at DESC"
        )
        return [Signature(*row) for row in rows]

    # -- signing ----------------------------------------------------------------------

    def sign(
        self, principal: Principal, name: str, version: str, *, on_register: bool = False
    ) -> Signature:
        """Hash the artifacts from the store, check lineage, sign; see the module docstring.

        A version signed already (e.g. when it was registered) is re-verified against its
        artifacts and its signature returned. ``on_register``: the hub signs as the version
        is registered (recorded in the audit record).
        """
        self.remember_roles(principal.name, principal.roles)
        model_version = self.mlflow.model_version(name, version)
        run_id = str(model_version.get("run_id") or "")
        trainer = self.run_owner(run_id) if run_id else None
        if trainer is None:
            raise self._refuse(
                principal.name,
                "model.sign",
                name,
                version,
                f"{name} version {version} comes from a run the hub did not see created",
            )
        decision = self._policy.authorize(
            principal, "sign_model", f"model:{name}@{version}", {"trainer": trainer}
        )
        if not decision.allowed:
            raise self._refuse(
                principal.name, "model.sign", name, version, f"not allowed: {decision.reason}"
            )
        if self.signature(name, version) is not None:
            return self.verify_now(name, version)
        try:
            datasets = self._lineage(trainer, self.mlflow.run(run_id))
        except ModelServiceError as exc:
            raise self._refuse(principal.name, "model.sign", name, version, exc.message) from exc
        with self.artifacts(model_version) as directory:
            bundle = sign_model(
                directory,
                self._key,
                mmap=False,  # the hub must not map files a trainer's upload may truncate
                extra={
                    "model": name,
                    "version": version,
                    "trainer": trainer,
                    "run_id": run_id,
                    "datasets": datasets,
                },
            )
        text = json.dumps(bundle, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()
        now = time.time()
        try:
            self._query(
                "INSERT INTO signatures (name, version, trainer, run_id, bundle, digest, "
                "signed_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, version, trainer, run_id, text, digest, now),
            )
        except sqlite3.IntegrityError:  # signed meanwhile by a concurrent request
            return self.verify_now(name, version)
        self.mlflow.set_version_tag(name, version, "ztlab.signature", digest)
        self._audit.record(
            actor=principal.name,
            action="model.sign",
            detail={
                "model": f"{name}@{version}",
                "trainer": trainer,
                "run_id": run_id,
                "datasets": datasets,
                "bundle_sha256": digest,
                "keyid": self.keyid,
                "on_register": on_register,
            },
        )
        return Signature(name, version, trainer, run_id, text, digest, now)

    def verify_now(self, name: str, version: str) -> Signature:
        """Re-verify the stored bundle against the artifacts as they are now."""
        stored = self.signature(name, version)
        if stored is None:
            raise ModelServiceError(f"{name} version {version} is not signed", status=409)
        with self.artifacts(self.mlflow.model_version(name, version)) as directory:
            check = verify_model(
                directory,
                parse_bundle(stored.bundle),
                {self.keyid: self._key.public_key()},
                mmap=False,
            )
        if not check.ok:
            changed = [m[0] for m in check.modified] + check.missing + check.extra
            changed += [r.path for r in check.refused]
            raise ModelServiceError(
                f"the artifacts of {name} version {version} changed since signing: "
                + ", ".join(changed[:10]),
                status=409,
            )
        return stored

    # -- approvals --------------------------------------------------------------------

    def approve(
        self, principal: Principal, name: str, version: str, reason: str, alias: str
    ) -> None:
        """Re-verify, re-check lineage, decide (two-person rule), set ``alias``, record."""
        if alias not in self.protected_aliases:
            raise ModelServiceError(
                f"{alias!r} is not a protected alias ({', '.join(self.protected_aliases)})"
            )
        if not reason.strip():
            raise ModelServiceError("an approval needs a reason")
        stored = self.signature(name, version)
        if stored is None:
            raise self._refuse(
                principal.name, "model.approve", name, version, "the version is not signed", 409
            )
        decision = self._policy.authorize(
            principal, "approve_model", f"model:{name}@{version}", {"trainer": stored.trainer}
        )
        if not decision.allowed:
            raise self._refuse(
                principal.name, "model.approve", name, version, f"not allowed: {decision.reason}"
            )
        try:
            self.verify_now(name, version)
            self._lineage(stored.trainer, self.mlflow.run(stored.run_id))
        except ModelServiceError as exc:
            raise self._refuse(
                principal.name, "model.approve", name, version, exc.message, exc.status
            ) from exc
        self.mlflow.set_alias(name, alias, version)
        self._record(principal.name, name, version, alias, "approve", reason)

    def reject(self, principal: Principal, name: str, version: str, reason: str) -> None:
        """Record a rejection (an approver who is not the trainer)."""
        stored = self.signature(name, version)
        trainer = stored.trainer if stored else ""
        decision = self._policy.authorize(
            principal, "approve_model", f"model:{name}@{version}", {"trainer": trainer}
        )
        if not decision.allowed:
            raise self._refuse(
                principal.name, "model.reject", name, version, f"not allowed: {decision.reason}"
            )
        self._record(principal.name, name, version, "", "reject", reason)

    def revoke(self, principal: Principal, name: str, alias: str, reason: str) -> None:
        """Remove a protected alias (an approver)."""
        current = self.mlflow.alias(name, alias)
        if current is None:
            raise ModelServiceError(f"{name} has no alias {alias!r}", status=404)
        version = str(current["version"])
        stored = self.signature(name, version)
        decision = self._policy.authorize(
            principal,
            "approve_model",
            f"model:{name}@{version}",
            {"trainer": stored.trainer if stored else ""},
        )
        if not decision.allowed:
            raise self._refuse(
                principal.name, "model.revoke", name, version, f"not allowed: {decision.reason}"
            )
        self.mlflow.delete_alias(name, alias)
        self._record(principal.name, name, version, alias, "revoke", reason)

    def _record(
        self, actor: str, name: str, version: str, alias: str, action: str, reason: str
    ) -> None:
        self._query(
            "INSERT INTO approvals (name, version, alias, action, actor, reason, at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (name, version, alias, action, actor, reason, time.time()),
        )
        self._audit.record(
            actor=actor,
            action=f"model.{action}",
            detail={"model": f"{name}@{version}", "alias": alias, "reason": reason},
        )

    def approved_version(self, name: str, alias: str) -> str | None:
        """The version the approval service last pointed ``alias`` at (``None``: revoked)."""
        rows = self._query(
            "SELECT version, action FROM approvals WHERE name = ? AND alias = ? "
            "ORDER BY id DESC LIMIT 1",
            (name, alias),
        )
        if not rows or rows[0][1] != "approve":
            return None
        return str(rows[0][0])

    def history(self, name: str, version: str) -> list[dict[str, Any]]:
        """Approvals, rejections and revocations of a version, oldest first."""
        rows = self._query(
            "SELECT alias, action, actor, reason, at FROM approvals WHERE name = ? AND version = ? "
            "ORDER BY id",
            (name, version),
        )
        return [
            {"alias": a, "action": act, "actor": who, "reason": why, "at": at}
            for a, act, who, why, at in rows
        ]

    # -- what a notebook run made (ztlab.hub.runs) ----------------------------------------

    def versions_of_run(self, mlflow_run_id: str) -> list[tuple[str, str]]:
        """The registered versions (name, version) made from MLflow run ``mlflow_run_id``."""
        answer = self.mlflow.call(
            "GET", "model-versions/search", {"filter": f"run_id='{mlflow_run_id}'"}
        )
        return [(str(v["name"]), str(v["version"])) for v in answer.get("model_versions", []) or []]

    def lineage_of_run(self, mlflow_run_id: str, trainer: str) -> list[dict[str, str]]:
        """The datasets MLflow run ``mlflow_run_id`` read (``dataset``, ``root``,
        ``algorithm``), each checked against the registry as for signing (raises
        :class:`ModelServiceError` when one is not)."""
        checked = self._lineage(trainer, self.mlflow.run(mlflow_run_id))
        principal = Principal(name=trainer, roles=self._roles_of(trainer))
        for item in checked:
            item["algorithm"] = self._datasets.get(principal, item["dataset"]).algorithm
        return checked

    def withdraw(self, name: str, version: str, *, actor: str, reason: str) -> None:
        """Delete a registered version and its signature (a failed run's model): the
        registry keeps no half-made model; ``model.withdrawn`` is audited."""
        self.mlflow.call("DELETE", "model-versions/delete", {"name": name, "version": version})
        self._query("DELETE FROM signatures WHERE name = ? AND version = ?", (name, version))
        self._audit.record(
            actor=actor,
            action="model.withdrawn",
            detail={"model": f"{name}@{version}", "reason": reason},
        )

    def store_run_file(self, mlflow_run_id: str, name: str, data: bytes) -> str:
        """Store ``data`` as artifact ``ztlab/NAME`` of MLflow run ``mlflow_run_id``, in the
        artifact store itself (the control plane's write); returns its artifact path."""
        info = self.mlflow.run(mlflow_run_id)["info"]
        uri = str(info["artifact_uri"]).rstrip("/") + "/ztlab"
        if self.artifacts_destination is None:
            folder = artifact_path(self.store, uri)
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / name
            tmp = target.with_name(f".{name}.tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        else:
            remote = remote_artifact_uri(self.artifacts_destination, uri)
            registry: Any = importlib.import_module(
                "mlflow.store.artifact.artifact_repository_registry"
            )
            with tempfile.TemporaryDirectory() as local:
                path = Path(local) / name
                path.write_bytes(data)
                registry.get_artifact_repository(remote).log_artifact(str(path))
        return f"ztlab/{name}"

    def tag_run(self, mlflow_run_id: str, key: str, value: str) -> None:
        """Set a tag on an MLflow run as the control plane."""
        self.mlflow.call(
            "POST", "runs/set-tag", {"run_id": mlflow_run_id, "key": key, "value": value}
        )

    def end_run(self, mlflow_run_id: str, status: str) -> None:
        """Mark an MLflow run ``FINISHED`` or ``FAILED`` (one left open by a killed run)."""
        run = self.mlflow.run(mlflow_run_id)
        if run["info"].get("status") == "RUNNING":
            self.mlflow.call(
                "POST",
                "runs/update",
                {"run_id": mlflow_run_id, "status": status, "end_time": int(time.time() * 1000)},
            )
