"""Signed provenance of a notebook run: SLSA Provenance v1 in an in-toto Statement in DSSE.

The statement (predicate type :data:`PROVENANCE_PREDICATE`, build type
:data:`RUN_BUILD_TYPE`)::

    {"_type": "https://in-toto.io/Statement/v1",
     "subject": [{"name": "model/churn/7/model.pkl", "digest": {"sha256": "…"}}, …],
     "predicateType": "https://slsa.dev/provenance/v1",
     "predicate": {
       "buildDefinition": {
         "buildType": "https://zerotrust-lab.dev/buildtypes/notebook-run/v1",
         "externalParameters": {
           "notebook": {"name": "train.ipynb", "digest": {"sha256": "…"}},
           "parameters": {"epochs": 3}, "schedule": "nightly"},
         "internalParameters": {"owner": "alice", "pool": "research", "gpus": 1},
         "resolvedDependencies": [
           {"name": "train.ipynb", "uri": "…", "digest": {"sha256": "…", "gitCommit": "…"}},
           {"name": "dataset:mnist@3", "digest": {"blake3": "<manifest root>"}},
           {"name": "environment:base", "digest": {"sha256": "<lock digest>"}}]},
       "runDetails": {
         "builder": {"id": "https://hub.example.org/ztlab", "version": {"ztlab": "0.5.0"}},
         "metadata": {"invocationId": "run-…", "startedOn": "…Z", "finishedOn": "…Z"},
         "byproducts": [{"name": "executed.ipynb", "digest": {"sha256": "…"}}]}}}

(https://slsa.dev/spec/v1.0/provenance) is the payload of a DSSE envelope
(``application/vnd.in-toto+json``) signed by the control plane, like dataset and model
statements, so one key and one generic verifier serve all three.

:func:`verify_run_provenance` follows numbered steps: (1) a trusted key's signature on the
envelope; (2) an in-toto v1 statement of SLSA provenance v1 with this build type; (3) every
field well formed; (4) what the caller has in hand (the notebook's bytes, the parameters,
the dataset digests) is what the statement says. Any failure raises
:class:`~ztlab.common.attest.dsse.SignatureError` naming the field.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ztlab.common.attest.dsse import (
    IN_TOTO_PAYLOAD_TYPE,
    Envelope,
    SignatureError,
    sign_envelope,
    verify_envelope,
)
from ztlab.common.attest.statement import Statement, Subject
from ztlab.common.keys import PrivateKey, PublicKey

__all__ = [
    "PROVENANCE_PREDICATE",
    "RUN_BUILD_TYPE",
    "Resource",
    "RunProvenance",
    "VerifiedRun",
    "notebook_digest",
    "sign_run_provenance",
    "verify_run_provenance",
]

PROVENANCE_PREDICATE: Final = "https://slsa.dev/provenance/v1"
#: what a notebook run is, as a SLSA build type (its parameters are documented in docs/)
RUN_BUILD_TYPE: Final = "https://zerotrust-lab.dev/buildtypes/notebook-run/v1"

_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z\Z")
_HEX = re.compile(r"[0-9a-f]{40,128}\Z")


def notebook_digest(data: bytes) -> dict[str, str]:
    """The digest set a notebook is named by: SHA-256 of its bytes."""
    return {"sha256": hashlib.sha256(data).hexdigest()}


@dataclass(frozen=True)
class Resource:
    """A SLSA ResourceDescriptor: a named artifact and its digests (algorithm -> hex)."""

    name: str
    digest: Mapping[str, str]
    uri: str = ""

    def to_json(self) -> dict[str, Any]:
        """The descriptor as SLSA writes it (``uri`` only when known)."""
        data: dict[str, Any] = {"name": self.name, "digest": dict(self.digest)}
        if self.uri:
            data["uri"] = self.uri
        return data


@dataclass(frozen=True)
class RunProvenance:
    """What a run was: its inputs, who ran it where, and what it produced."""

    #: the run's id (``invocationId``)
    run_id: str
    #: the hub user whose run it was
    owner: str
    notebook: Resource
    parameters: Mapping[str, Any]
    #: ``https://…`` naming this control plane
    builder_id: str
    builder_version: str
    #: RFC 3339 UTC (``2026-12-06T14:05:00Z``)
    started_on: str
    finished_on: str
    datasets: tuple[Resource, ...] = ()
    environment: Resource | None = None
    #: the git commit the notebook came from, where known
    git_commit: str | None = None
    schedule: str | None = None
    pool: str | None = None
    gpus: int = 0
    #: the executed notebook, models and other outputs
    byproducts: tuple[Resource, ...] = field(default_factory=tuple)

    def predicate(self) -> dict[str, Any]:
        """The SLSA Provenance v1 predicate."""
        notebook = self.notebook.to_json()
        if self.git_commit:
            notebook["digest"] = {**notebook["digest"], "gitCommit": self.git_commit}
        external: dict[str, Any] = {
            "notebook": {"name": self.notebook.name, "digest": dict(self.notebook.digest)},
            "parameters": dict(self.parameters),
        }
        if self.schedule:
            external["schedule"] = self.schedule
        internal: dict[str, Any] = {"owner": self.owner, "gpus": self.gpus}
        if self.pool:
            internal["pool"] = self.pool
        dependencies = [notebook, *(d.to_json() for d in self.datasets)]
        if self.environment is not None:
            dependencies.append(self.environment.to_json())
        return {
            "buildDefinition": {
                "buildType": RUN_BUILD_TYPE,
                "externalParameters": external,
                "internalParameters": internal,
                "resolvedDependencies": dependencies,
            },
            "runDetails": {
                "builder": {"id": self.builder_id, "version": {"ztlab": self.builder_version}},
                "metadata": {
                    "invocationId": self.run_id,
                    "startedOn": self.started_on,
                    "finishedOn": self.finished_on,
                },
                "byproducts": [b.to_json() for b in self.byproducts],
            },
        }


@dataclass(frozen=True)
class VerifiedRun:
    """A verified statement: who signed it, what it names, and the provenance itself."""

    keyid: str
    subjects: tuple[Subject, ...]
    provenance: RunProvenance


def sign_run_provenance(
    provenance: RunProvenance, subjects: Sequence[Subject], key: PrivateKey
) -> Envelope:
    """The envelope signing ``provenance`` about ``subjects`` (at least one) with ``key``."""
    if not subjects:
        raise ValueError("a provenance statement needs at least one subject")
    statement = Statement(
        subjects=tuple(subjects),
        predicate_type=PROVENANCE_PREDICATE,
        predicate=provenance.predicate(),
    )
    return sign_envelope(statement.to_bytes(), key, payload_type=IN_TOTO_PAYLOAD_TYPE)


# --- verification -------------------------------------------------------------------------


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SignatureError(f"the provenance's {where} is not an object")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise SignatureError(f"the provenance's {where} is not a non-empty string")
    return value


def _resource(value: Any, where: str) -> Resource:
    data = _object(value, where)
    digest = _object(data.get("digest"), f"{where}.digest")
    if not digest or not all(isinstance(v, str) and v for v in digest.values()):
        raise SignatureError(f"the provenance's {where}.digest holds no digest")
    uri = data.get("uri", "")
    if not isinstance(uri, str):
        raise SignatureError(f"the provenance's {where}.uri is not a string")
    return Resource(name=_text(data.get("name"), f"{where}.name"), digest=digest, uri=uri)


def _time(value: Any, where: str) -> str:
    text = _text(value, where)
    if not _TIME.match(text):
        raise SignatureError(f"the provenance's {where} is not an RFC 3339 UTC time: {text!r}")
    return text


def _parse(predicate: dict[str, Any]) -> RunProvenance:
    """(3) every field of the predicate, as this build type writes it."""
    build = _object(predicate.get("buildDefinition"), "buildDefinition")
    if build.get("buildType") != RUN_BUILD_TYPE:
        raise SignatureError(
            f"the provenance's buildType is {build.get('buildType')!r}, not {RUN_BUILD_TYPE}"
        )
    external = _object(build.get("externalParameters"), "externalParameters")
    internal = _object(build.get("internalParameters"), "internalParameters")
    parameters = _object(external.get("parameters"), "externalParameters.parameters")
    notebook = _resource(external.get("notebook"), "externalParameters.notebook")
    raw_dependencies = build.get("resolvedDependencies")
    if not isinstance(raw_dependencies, list) or not raw_dependencies:
        raise SignatureError("the provenance's resolvedDependencies is not a non-empty list")
    dependencies = [
        _resource(d, f"resolvedDependencies[{i}]") for i, d in enumerate(raw_dependencies)
    ]
    first = dependencies[0]
    git_commit = first.digest.get("gitCommit")
    if first.name != notebook.name or {
        k: v for k, v in first.digest.items() if k != "gitCommit"
    } != dict(notebook.digest):
        raise SignatureError("the provenance's first dependency is not its notebook")
    if git_commit is not None and not _HEX.match(git_commit):
        raise SignatureError(f"the provenance's gitCommit is not a commit: {git_commit!r}")
    datasets = tuple(d for d in dependencies[1:] if d.name.startswith("dataset:"))
    environments = [d for d in dependencies[1:] if d.name.startswith("environment:")]
    if len(datasets) + len(environments) != len(dependencies) - 1 or len(environments) > 1:
        raise SignatureError(
            "the provenance's resolvedDependencies hold something other than the notebook, "
            "datasets and one environment"
        )
    details = _object(predicate.get("runDetails"), "runDetails")
    builder = _object(details.get("builder"), "runDetails.builder")
    version = _object(builder.get("version"), "runDetails.builder.version")
    metadata = _object(details.get("metadata"), "runDetails.metadata")
    raw_byproducts = details.get("byproducts", [])
    if not isinstance(raw_byproducts, list):
        raise SignatureError("the provenance's byproducts is not a list")
    gpus = internal.get("gpus", 0)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        raise SignatureError("the provenance's internalParameters.gpus is not a count")
    schedule = external.get("schedule")
    pool = internal.get("pool")
    return RunProvenance(
        run_id=_text(metadata.get("invocationId"), "runDetails.metadata.invocationId"),
        owner=_text(internal.get("owner"), "internalParameters.owner"),
        notebook=Resource(name=notebook.name, digest=dict(notebook.digest), uri=first.uri),
        parameters=parameters,
        builder_id=_text(builder.get("id"), "runDetails.builder.id"),
        builder_version=_text(version.get("ztlab"), "runDetails.builder.version.ztlab"),
        started_on=_time(metadata.get("startedOn"), "runDetails.metadata.startedOn"),
        finished_on=_time(metadata.get("finishedOn"), "runDetails.metadata.finishedOn"),
        datasets=datasets,
        environment=environments[0] if environments else None,
        git_commit=git_commit,
        schedule=_text(schedule, "externalParameters.schedule") if schedule is not None else None,
        pool=_text(pool, "internalParameters.pool") if pool is not None else None,
        gpus=gpus,
        byproducts=tuple(
            _resource(b, f"runDetails.byproducts[{i}]") for i, b in enumerate(raw_byproducts)
        ),
    )


def verify_run_provenance(
    envelope: Envelope,
    trusted: dict[str, PublicKey],
    *,
    notebook: bytes | None = None,
    parameters: Mapping[str, Any] | None = None,
    datasets: Mapping[str, Mapping[str, str]] | None = None,
) -> VerifiedRun:
    """Verify a run's signed provenance (steps in the module docstring).

    With ``notebook`` (its bytes), ``parameters`` or ``datasets`` (``"dataset:NAME@V"`` ->
    digest set), what the statement says must match them exactly.
    """
    # (1) a trusted signature over the DSSE pre-authentication encoding
    keyid = verify_envelope(envelope, trusted, payload_type=IN_TOTO_PAYLOAD_TYPE)
    # (2) an in-toto statement of SLSA provenance v1
    statement = Statement.from_bytes(envelope.payload)
    if statement.predicate_type != PROVENANCE_PREDICATE:
        raise SignatureError(
            f"the statement is a {statement.predicate_type!r}, not SLSA provenance v1"
        )
    # (3) every field well formed
    provenance = _parse(statement.predicate)
    # (4) what the caller holds is what was run
    if notebook is not None and notebook_digest(notebook) != {
        k: v for k, v in provenance.notebook.digest.items() if k == "sha256"
    }:
        raise SignatureError(
            f"the notebook is not the one run {provenance.run_id} executed "
            f"(its SHA-256 differs from the provenance's)"
        )
    if parameters is not None and _canonical(parameters) != _canonical(provenance.parameters):
        raise SignatureError(
            f"the parameters are not those of run {provenance.run_id}: "
            f"{_canonical(provenance.parameters)}"
        )
    if datasets is not None:
        recorded = {d.name: dict(d.digest) for d in provenance.datasets}
        wanted = {name: dict(digest) for name, digest in datasets.items()}
        if recorded != wanted:
            raise SignatureError(
                f"the datasets of run {provenance.run_id} differ: it used "
                f"{sorted(recorded)} with their digests, not {sorted(wanted)} as given"
            )
    return VerifiedRun(keyid=keyid, subjects=statement.subjects, provenance=provenance)


def _canonical(value: Mapping[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
