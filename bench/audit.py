"""Audit log: durable appends per second (group commit) and verification rate.

Baselines in the same run: one write+fsync per record (what an append costs without group
commit) and plain SHA-256 over the same records file (the floor for any verifier).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from pathlib import Path

from bench._table import Row
from ztlab.common.auditlog.paths import public_key_path
from ztlab.common.auditlog.verify import verify_log
from ztlab.common.keys import load_ed25519_public_key
from ztlab.hub.audit import AuditLog

DETAIL = {
    "principal": "alice",
    "action": "lease_gpu",
    "resource": "pool:research",
    "allowed": True,
    "policy_id": "trainer-lease-gpu",
}


def _durable_appends(path: Path, total: int, threads: int) -> float:
    with AuditLog.open(path, checkpoint_interval=2.0) as log:
        per_thread = total // threads

        def worker() -> None:
            for _ in range(per_thread):
                log.append("alice", "policy.decision", DETAIL)

        workers = [threading.Thread(target=worker) for _ in range(threads)]
        start = time.perf_counter()
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        elapsed = time.perf_counter() - start
    return per_thread * threads / elapsed


def _fsync_per_record(path: Path, total: int) -> float:
    line = b'{"seq":0,"prev":"' + b"0" * 64 + b'","detail":' + repr(DETAIL).encode() + b"}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        start = time.perf_counter()
        for _ in range(total):
            os.write(fd, line)
            os.fsync(fd)
        return total / (time.perf_counter() - start)
    finally:
        os.close(fd)


def _hash_file(path: Path) -> float:
    start = time.perf_counter()
    count = 0
    with path.open("rb") as handle:
        for line in handle:
            hashlib.sha256(b"\x00" + line[:-1]).digest()
            count += 1
    return count / (time.perf_counter() - start)


def run(*, quick: bool = False) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        base = Path(tmp)
        total = 4_000 if quick else 40_000
        baseline = _fsync_per_record(base / "plain.jsonl", total // 10)
        for threads in (16, 64):
            rate = _durable_appends(base / f"audit-{threads}.jsonl", total, threads)
            rows.append(
                Row(
                    "audit",
                    f"durable appends, {threads} threads",
                    rate,
                    "/s",
                    target=">= 5,000/s",
                    baseline=f"fsync each: {baseline:,.0f}/s",
                    ratio=rate / baseline,
                )
            )
        # verification over a larger log, built with few big batches
        big = base / "verify.jsonl"
        records = 20_000 if quick else 400_000
        with AuditLog.open(big, checkpoint_interval=0.5) as log:
            futures = [log.submit("alice", "policy.decision", DETAIL) for _ in range(records)]
            for future in futures:
                future.result()
        key = load_ed25519_public_key(public_key_path(big))
        verify_log(big, public_key=key)  # warm the page cache
        start = time.perf_counter()
        report = verify_log(big, public_key=key)
        rate = report.records / (time.perf_counter() - start)
        floor = _hash_file(big)
        rows.append(
            Row(
                "audit",
                f"verify ({report.records:,} records, {report.checkpoints} checkpoints)",
                rate,
                "records/s",
                target=">= 200,000/s",
                baseline=f"SHA-256 only: {floor:,.0f}/s",
                ratio=rate / floor,
            )
        )
    return rows
