"""in-toto Statement v1: what a signature is about (subjects) and what it says (predicate).

https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ztlab.common.attest.dsse import SignatureError

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"


@dataclass(frozen=True)
class Subject:
    """A named artifact and its digests (algorithm -> lowercase hex)."""

    name: str
    digest: dict[str, str]


@dataclass(frozen=True)
class Statement:
    """A parsed statement; ``predicate`` is left as JSON for the predicate's own parser."""

    subjects: tuple[Subject, ...]
    predicate_type: str
    predicate: dict[str, Any]

    def to_bytes(self) -> bytes:
        """Deterministic JSON (sorted keys, no spaces): the bytes that get signed."""
        data = {
            "_type": STATEMENT_TYPE,
            "subject": [{"name": s.name, "digest": dict(s.digest)} for s in self.subjects],
            "predicateType": self.predicate_type,
            "predicate": self.predicate,
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8"
        )

    @classmethod
    def from_bytes(cls, payload: bytes) -> Statement:
        """Parse a statement; :class:`SignatureError` when it is not an in-toto v1 statement."""
        try:
            data = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SignatureError(f"the signed payload is not JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("_type") != STATEMENT_TYPE:
            raise SignatureError(
                f"the signed payload is not an in-toto statement ({STATEMENT_TYPE})"
            )
        subjects = []
        raw_subjects = data.get("subject")
        if not isinstance(raw_subjects, list) or not raw_subjects:
            raise SignatureError("the statement names no subject")
        for raw in raw_subjects:
            if (
                not isinstance(raw, dict)
                or not isinstance(raw.get("name"), str)
                or not isinstance(raw.get("digest"), dict)
                or not all(isinstance(v, str) for v in raw["digest"].values())
            ):
                raise SignatureError("the statement has a malformed subject")
            subjects.append(Subject(raw["name"], dict(raw["digest"])))
        if not isinstance(data.get("predicateType"), str) or not isinstance(
            data.get("predicate"), dict
        ):
            raise SignatureError("the statement lacks predicateType or predicate")
        return cls(tuple(subjects), data["predicateType"], data["predicate"])
