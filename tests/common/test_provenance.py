"""Signed run provenance: SLSA Provenance v1 in an in-toto statement in DSSE.

Checked with our own verifier, and with upstream tools: in-toto-attestation's SLSA
Provenance v1 and Statement v1 message types (which refuse unknown fields) and
securesystemslib's generic DSSE verifier.
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ztlab.common.attest.dsse import Envelope, SignatureError, sign_envelope
from ztlab.common.attest.provenance import (
    PROVENANCE_PREDICATE,
    RUN_BUILD_TYPE,
    Resource,
    RunProvenance,
    notebook_digest,
    sign_run_provenance,
    verify_run_provenance,
)
from ztlab.common.attest.statement import Statement, Subject
from ztlab.common.keys import PublicKey, key_id

KEY = ec.generate_private_key(ec.SECP256R1())
ATTACKER = ec.generate_private_key(ec.SECP256R1())
NOTEBOOK = b'{"cells": [{"cell_type": "code", "source": "epochs = 3"}], "nbformat": 4}'
MNIST = {"blake3": "a" * 64}
COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODEL = Subject("model/churn/7/model.pkl", {"sha256": "b" * 64})


def _trusted() -> dict[str, PublicKey]:
    return {key_id(KEY.public_key()): KEY.public_key()}


def _provenance(**changes: Any) -> RunProvenance:
    run = RunProvenance(
        run_id="run-7f3a",
        owner="alice",
        notebook=Resource("train.ipynb", notebook_digest(NOTEBOOK), uri="git+https://x/y"),
        parameters={"epochs": 3, "lr": 0.01},
        builder_id="https://hub.example.org/ztlab",
        builder_version="0.5.0",
        started_on="2026-12-06T14:00:00Z",
        finished_on="2026-12-06T14:05:30.250Z",
        datasets=(Resource("dataset:mnist@3", MNIST),),
        environment=Resource("environment:base", {"sha256": "c" * 64}),
        git_commit=COMMIT,
        schedule="nightly",
        pool="research",
        gpus=1,
        byproducts=(Resource("executed.ipynb", {"sha256": "d" * 64}),),
    )
    return replace(run, **changes)


def _envelope(run: RunProvenance | None = None) -> Envelope:
    return sign_run_provenance(run or _provenance(), [MODEL], KEY)


def _resigned(envelope: Envelope, change: Any) -> Envelope:
    """The statement changed by ``change`` and signed again by ``KEY`` (a well-signed lie)."""
    data = json.loads(envelope.payload)
    change(data)
    payload = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return sign_envelope(payload, KEY, payload_type=envelope.payload_type)


def test_a_signed_run_verifies_and_reads_back() -> None:
    verified = verify_run_provenance(
        _envelope(),
        _trusted(),
        notebook=NOTEBOOK,
        parameters={"lr": 0.01, "epochs": 3},
        datasets={"dataset:mnist@3": MNIST},
    )
    assert verified.keyid == key_id(KEY.public_key())
    assert verified.subjects == (MODEL,)
    run = verified.provenance
    assert run == _provenance()
    assert run.git_commit == COMMIT


def test_the_statement_is_slsa_provenance_v1_as_upstream_reads_it() -> None:
    from google.protobuf import json_format
    from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
    from in_toto_attestation.v1 import statement_pb2

    statement = json.loads(_envelope().payload)
    assert statement["predicateType"] == PROVENANCE_PREDICATE
    # unknown fields are refused by ParseDict: the predicate is exactly SLSA's shape
    parsed = json_format.ParseDict(statement["predicate"], provenance_pb2.Provenance())
    assert parsed.build_definition.build_type == RUN_BUILD_TYPE
    assert parsed.run_details.metadata.invocation_id == "run-7f3a"
    assert parsed.build_definition.resolved_dependencies[0].digest["gitCommit"] == COMMIT
    json_format.ParseDict(statement, statement_pb2.Statement())
    with pytest.raises(json_format.ParseError):
        json_format.ParseDict({**statement["predicate"], "extra": 1}, provenance_pb2.Provenance())


def test_the_envelope_verifies_with_a_generic_dsse_verifier() -> None:
    from securesystemslib.dsse import Envelope as SslibEnvelope
    from securesystemslib.exceptions import VerificationError
    from securesystemslib.signer import SSlibKey

    envelope = _envelope()
    public = SSlibKey.from_crypto(KEY.public_key(), keyid=key_id(KEY.public_key()))
    generic = SslibEnvelope.from_dict(envelope.to_dict())
    assert set(generic.verify([public], 1)) == {public.keyid}
    stranger = SSlibKey.from_crypto(ATTACKER.public_key(), keyid=key_id(KEY.public_key()))
    with pytest.raises(VerificationError):
        generic.verify([stranger], 1)


def test_a_flipped_payload_byte_fails() -> None:
    envelope = _envelope()
    payload = bytearray(envelope.payload)
    payload[payload.index(b"epochs") + 1] ^= 0x01
    with pytest.raises(SignatureError):
        verify_run_provenance(replace(envelope, payload=bytes(payload)), _trusted())


def test_another_key_is_not_trusted() -> None:
    forged = sign_run_provenance(_provenance(), [MODEL], ATTACKER)
    with pytest.raises(SignatureError):
        verify_run_provenance(forged, _trusted())


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"notebook": NOTEBOOK.replace(b"3", b"4")}, "not the one run run-7f3a executed"),
        ({"parameters": {"epochs": 4, "lr": 0.01}}, "parameters are not those of run"),
        ({"parameters": {"epochs": 3}}, "parameters are not those of run"),
        ({"datasets": {"dataset:mnist@3": {"blake3": "e" * 64}}}, "datasets of run"),
        ({"datasets": {"dataset:mnist@4": MNIST}}, "datasets of run"),
        ({"datasets": {}}, "datasets of run"),
    ],
)
def test_a_changed_notebook_byte_parameter_or_dataset_digest_fails(
    given: dict[str, Any], message: str
) -> None:
    with pytest.raises(SignatureError, match=message):
        verify_run_provenance(_envelope(), _trusted(), **given)


NOTEBOOK_DEPENDENCY = ["predicate", "buildDefinition", "resolvedDependencies", 0]


def _set(path: list[Any], value: Any) -> Any:
    def change(data: dict[str, Any]) -> None:
        target: Any = data
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set(["predicateType"], "https://slsa.dev/provenance/v0.2"), "not SLSA provenance v1"),
        (_set(["predicate", "buildDefinition", "buildType"], "https://x/y"), "buildType"),
        (
            _set(["predicate", "runDetails", "metadata", "startedOn"], "yesterday"),
            "startedOn is not an RFC 3339",
        ),
        (
            _set(["predicate", "buildDefinition", "resolvedDependencies"], []),
            "resolvedDependencies",
        ),
        (
            _set(["predicate", "buildDefinition", "resolvedDependencies", 0, "digest"], MNIST),
            "first dependency is not its notebook",
        ),
        (
            _set(["predicate", "buildDefinition", "resolvedDependencies", 1, "name"], "model:x"),
            "something other than",
        ),
        (_set(["predicate", "buildDefinition", "internalParameters", "gpus"], -1), "gpus"),
        (_set(["predicate", "runDetails", "builder", "version"], "0.5"), "builder.version"),
        (_set([*NOTEBOOK_DEPENDENCY, "digest", "gitCommit"], "main"), "gitCommit"),
    ],
)  # fmt: skip
def test_a_malformed_statement_fails_naming_the_field(change: Any, message: str) -> None:
    with pytest.raises(SignatureError, match=message):
        verify_run_provenance(_resigned(_envelope(), change), _trusted())


def test_a_run_without_optional_parts_round_trips() -> None:
    run = _provenance(
        datasets=(), environment=None, git_commit=None, schedule=None, pool=None, gpus=0,
        byproducts=(),
    )  # fmt: skip
    assert verify_run_provenance(_envelope(run), _trusted()).provenance == run


def test_a_dataset_statement_is_not_run_provenance() -> None:
    statement = Statement((MODEL,), "https://zerotrust-lab.dev/attestations/x/v1", {})
    envelope = sign_envelope(statement.to_bytes(), KEY, payload_type="application/vnd.in-toto+json")
    with pytest.raises(SignatureError, match="not SLSA provenance v1"):
        verify_run_provenance(envelope, _trusted())
    assert base64.b64decode(envelope.to_dict()["payload"]) == statement.to_bytes()


def test_a_statement_needs_a_subject() -> None:
    with pytest.raises(ValueError, match="at least one subject"):
        sign_run_provenance(_provenance(), [], KEY)
