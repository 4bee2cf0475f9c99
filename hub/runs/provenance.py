"""A run's signed provenance: what it made, the statement about it, and its check for a model.

:func:`collect_outputs` gathers what a run made through the MLflow runs its token created
(each registered version must be signed already; each dataset input is checked against the
registry); :func:`run_statement` writes the SLSA provenance and the subjects it is about
(see :mod:`ztlab.common.attest.provenance` for the format); :func:`model_provenance`
verifies a stored envelope for the approvals page, the model API and ``ztlab model
status``: the control plane's signature, and that it names the version being decided on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ztlab import __version__
from ztlab.common.attest import PublicKey
from ztlab.common.attest.dsse import Envelope, SignatureError
from ztlab.common.attest.provenance import Resource, RunProvenance, verify_run_provenance
from ztlab.common.attest.statement import Subject
from ztlab.common.errors import ZtlabError
from ztlab.hub.runs.store import RunRecord, RunStoreError
from ztlab.hub.timestamps import utc_iso

__all__ = [
    "ModelProvenance",
    "RunOutputs",
    "collect_outputs",
    "environment_resource",
    "model_provenance",
    "run_statement",
]


@dataclass(frozen=True)
class ModelProvenance:
    """What the approvals page and ``ztlab model status`` show of a version's run."""

    run: RunRecord
    verified: bool
    problem: str
    statement: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        """For the API."""
        return {
            "run": self.run.as_json(),
            "verified": self.verified,
            "problem": self.problem,
            "statement": self.statement,
        }


@dataclass(frozen=True)
class RunOutputs:
    """What a run made: signed model versions and the registered datasets it read."""

    #: (name, version, SHA-256 of the version's signature bundle)
    models: list[tuple[str, str, str]] = field(default_factory=list)
    #: ``NAME@V`` -> ``{"dataset", "root", "algorithm"}``
    datasets: dict[str, dict[str, str]] = field(default_factory=dict)


def collect_outputs(models: Any, mlflow_runs: Iterable[str], owner: str) -> RunOutputs:
    """What the MLflow runs made (``models``: the model service, or ``None``); raises
    :class:`RunStoreError` for a registered version the control plane did not sign."""
    outputs = RunOutputs()
    if models is None:
        return outputs
    for mlflow_run in mlflow_runs:
        for item in models.lineage_of_run(mlflow_run, owner):
            outputs.datasets[item["dataset"]] = item
        for name, version in models.versions_of_run(mlflow_run):
            signature = models.signature(name, version)
            if signature is None:
                raise RunStoreError(
                    f"the run registered {name} version {version}, which the control plane "
                    "did not sign (see the model.sign.refused record)"
                )
            outputs.models.append((name, version, signature.digest))
    return outputs


def environment_resource(environment: tuple[str, str] | None) -> Resource | None:
    """``environment:NAME`` with its ``sha256:HEX`` digest, as a SLSA resource."""
    if environment is None:
        return None
    name, digest = environment
    algorithm, _, value = digest.partition(":")
    return Resource(name=f"environment:{name}", digest={algorithm: value})


def run_statement(
    run: RunRecord,
    *,
    executed_sha: str,
    outputs: RunOutputs,
    environment: tuple[str, str] | None,
    builder_id: str,
    finished: float,
) -> tuple[RunProvenance, list[Subject]]:
    """The provenance of a run whose every cell ran, and the subjects it is about (the
    executed notebook and each model version, by its signature bundle's digest)."""
    provenance = RunProvenance(
        run_id=run.id,
        owner=run.owner,
        notebook=Resource(name=run.notebook_name, digest={"sha256": run.notebook_sha256}),
        parameters=dict(run.parameters),
        builder_id=builder_id,
        builder_version=__version__,
        started_on=utc_iso(run.started_at or finished),
        finished_on=utc_iso(finished),
        datasets=tuple(
            Resource(name=f"dataset:{ref}", digest={item["algorithm"]: item["root"]})
            for ref, item in sorted(outputs.datasets.items())
        ),
        environment=environment_resource(environment),
        git_commit=run.git_commit,
        schedule=run.schedule_name,
        pool=run.pool,
        gpus=run.gpus,
        byproducts=(Resource(name="executed.ipynb", digest={"sha256": executed_sha}),),
    )
    subjects = [Subject(name="executed.ipynb", digest={"sha256": executed_sha})]
    subjects += [
        Subject(name=f"models:/{name}/{version}", digest={"sha256": digest})
        for name, version, digest in outputs.models
    ]
    return provenance, subjects


def model_provenance(
    run: RunRecord, envelope: bytes | ZtlabError, *, name: str, version: str, keyid: str,
    key: PublicKey,
) -> ModelProvenance:  # fmt: skip
    """Verify ``run``'s stored envelope (or the error reading it) for model ``name``
    version ``version``: signed by ``key``, and naming the version among its subjects."""
    if isinstance(envelope, ZtlabError):
        return ModelProvenance(run=run, verified=False, problem=envelope.message, statement={})
    try:
        parsed = Envelope.from_dict(json.loads(envelope))
        checked = verify_run_provenance(parsed, {keyid: key})
    except (SignatureError, ValueError) as exc:
        message = getattr(exc, "message", str(exc))
        return ModelProvenance(run=run, verified=False, problem=message, statement={})
    statement = json.loads(parsed.payload)
    if not any(s.name == f"models:/{name}/{version}" for s in checked.subjects):
        return ModelProvenance(
            run=run,
            verified=False,
            problem=f"run {run.id}'s provenance does not name {name} version {version}",
            statement=statement,
        )
    return ModelProvenance(run=run, verified=True, problem="", statement=statement)
