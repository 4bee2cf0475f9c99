"""Policy decisions: decisions per second and p50/p99 latency on one core.

Baseline in the same run: ``cedarpy.is_authorized`` given the same policies as text on every
call, without schema validation (how cedarpy is used when nothing is cached). Our engine also
checks each request against the schema in Python.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import cedarpy

from bench._table import Row, percentile
from ztlab.hub.audit import AuditLog
from ztlab.hub.policy import PolicyEngine, Principal, default_policy_files

REQUESTS = [
    (Principal(name="alice", roles=frozenset({"trainer"})), "lease_gpu", "pool:research", {}),
    (Principal(name="bob", roles=frozenset({"viewer"})), "lease_gpu", "pool:research", {}),
    (
        Principal(name="carol", roles=frozenset({"approver"})),
        "approve_model",
        "model:churn@7",
        {"trainer": "alice"},
    ),
    (
        Principal(name="carol", roles=frozenset({"approver"})),
        "approve_model",
        "model:churn@7",
        {"trainer": "carol"},
    ),
    (
        Principal(name="dave", roles=frozenset({"data-steward"})),
        "register_dataset",
        "dataset:mnist@3",
        {},
    ),
    (Principal(name="erin", roles=frozenset({"admin"})), "read_audit", "audit:main", {}),
]


def _engine_latencies(engine: PolicyEngine, count: int) -> list[float]:
    samples: list[float] = []
    clock = time.perf_counter_ns
    for index in range(count):
        principal, action, resource, context = REQUESTS[index % len(REQUESTS)]
        start = clock()
        engine.authorize(principal, action, resource, context)
        samples.append((clock() - start) / 1000)
    return samples


def _raw_cedar_rate(count: int) -> float:
    files = default_policy_files()
    files.pop("schema.cedarschema")
    policies = "\n".join(files.values())
    entities = json.dumps(
        [
            {
                "uid": {"type": "Ztlab::User", "id": "alice"},
                "attrs": {"name": "alice"},
                "parents": [{"type": "Ztlab::Role", "id": "trainer"}],
            },
            {"uid": {"type": "Ztlab::Role", "id": "trainer"}, "attrs": {}, "parents": []},
            {"uid": {"type": "Ztlab::Pool", "id": "research"}, "attrs": {}, "parents": []},
        ]
    )
    request = {
        "principal": 'Ztlab::User::"alice"',
        "action": 'Ztlab::Action::"lease_gpu"',
        "resource": 'Ztlab::Pool::"research"',
        "context": {},
    }
    start = time.perf_counter()
    for _ in range(count):
        result = cedarpy.is_authorized(request, policies, entities)
    elapsed = time.perf_counter() - start
    assert result.allowed
    return count / elapsed


def run(*, quick: bool = False) -> list[Row]:
    count = 5_000 if quick else 50_000
    engine = PolicyEngine.defaults()
    _engine_latencies(engine, 1_000)  # warm caches
    start = time.perf_counter()
    samples = _engine_latencies(engine, count)
    rate = count / (time.perf_counter() - start)
    baseline = _raw_cedar_rate(max(500, count // 10))
    with (
        tempfile.TemporaryDirectory(dir="/var/tmp") as tmp,
        AuditLog.open(Path(tmp) / "audit.jsonl") as log,
    ):
        audited = PolicyEngine.defaults(audit=log)
        start = time.perf_counter()
        _engine_latencies(audited, count)
        audited_rate = count / (time.perf_counter() - start)
    return [
        Row(
            "policy",
            "decisions, one core (no audit sink)",
            rate,
            "/s",
            target=">= 10,000/s",
            baseline=f"cedarpy, text each call: {baseline:,.0f}/s",
            ratio=rate / baseline,
        ),
        Row(
            "policy",
            "decisions, every one audited (group commit)",
            audited_rate,
            "/s",
            target=">= 10,000/s",
            baseline=f"unaudited: {rate:,.0f}/s",
            ratio=audited_rate / rate,
        ),
        Row("policy", "decision latency p50", percentile(samples, 0.50), "us"),
        Row("policy", "decision latency p99", percentile(samples, 0.99), "us", target="< 1,000 us"),
    ]
