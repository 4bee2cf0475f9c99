"""A model version's run provenance, and the rule that refuses approving one that does not verify.

A version trained by a notebook run (``ztlab run``, a schedule) has the run's signed SLSA
provenance. The run service (:meth:`~ztlab.hub.runs.service.RunService.provenance_of_model`)
finds it through the version's MLflow run and verifies it; this module asks it, and holds
the one rule the approvals API (:mod:`ztlab.hub.api.models`) and page
(:mod:`ztlab.hub.pages.approvals`) share: **a version whose run's provenance does not verify
is not approved** (409, recorded as ``model.approve.refused``). A version not trained by a
run, or a hub without runs, is approved as before.

The run service is reached through a small protocol, so this service package does not
import the run service (which is given the model service).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ztlab.hub.models.service import ModelServiceError, Signature

__all__ = [
    "ProvenanceSource",
    "VersionProvenance",
    "approval_refusal",
    "check_approvable",
    "provenance_of_version",
]


class VersionProvenance(Protocol):
    """What the run service answers about a version's run
    (:class:`~ztlab.hub.runs.service.ModelProvenance`)."""

    #: the run (a :class:`~ztlab.hub.runs.store.RunRecord`)
    @property
    def run(self) -> Any: ...

    @property
    def verified(self) -> bool: ...

    #: why it does not verify (empty when it does)
    @property
    def problem(self) -> str: ...

    #: the decoded in-toto statement (empty when the envelope could not be read)
    @property
    def statement(self) -> dict[str, Any]: ...

    def as_json(self) -> dict[str, Any]:
        """For the API."""
        ...


class ProvenanceSource(Protocol):
    """The run service, as far as model provenance goes."""

    def provenance_of_model(self, name: str, version: str, run_id: str) -> VersionProvenance | None:
        """The verified provenance of the run behind MLflow run ``run_id``, or ``None``."""
        ...


def provenance_of_version(
    runs: ProvenanceSource | None, signature: Signature | None
) -> VersionProvenance | None:
    """The provenance of the run that trained a signed version, verified now; ``None`` for
    an unsigned version, one not trained by a run, or a hub that runs no notebooks."""
    if runs is None or signature is None or not signature.run_id:
        return None
    return runs.provenance_of_model(signature.name, signature.version, signature.run_id)


def approval_refusal(provenance: VersionProvenance | None) -> str | None:
    """Why a version may not be approved because of its run's provenance (``None``: it may)."""
    if provenance is None or provenance.verified:
        return None
    return (
        f"the provenance of run {provenance.run.id}, which trained this version, does not "
        f"verify: {provenance.problem}"
    )


def check_approvable(
    runs: ProvenanceSource | None,
    models: Any,
    *,
    actor: str,
    name: str,
    version: str,
    record: Callable[..., None],
) -> VersionProvenance | None:
    """Refuse approving ``name`` ``version`` when it came from a run whose provenance does
    not verify: record ``model.approve.refused`` and raise :class:`ModelServiceError` (409).
    Call it before :meth:`~ztlab.hub.models.service.ModelService.approve`, in a thread (it
    reads SQLite and the stored envelope). Returns the provenance checked, if any."""
    provenance = provenance_of_version(runs, models.signature(name, version))
    problem = approval_refusal(provenance)
    if problem is not None:
        record(actor, "model.approve.refused", model=f"{name}@{version}", reason=problem)
        raise ModelServiceError(
            problem,
            status=409,
            hint="see the run's page (/hub/ztlab/runs/ID); retrain the version with a new run",
        )
    return provenance
