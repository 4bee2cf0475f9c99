"""Crash test: SIGKILL a writer at random moments, again and again.

Every record the writer acknowledged must be present, byte for byte, and the log must
verify after every kill (a torn last line is reported, and quarantined by the next writer).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.auditlog_helpers import record_lines, verify
from ztlab.common.auditlog.record import record_leaf_hash

WRITER = textwrap.dedent(
    """
    import sys, threading
    from ztlab.hub.audit import AuditLog
    log = AuditLog.open(sys.argv[1], checkpoint_interval=0.05)
    lock = threading.Lock()
    def work(name):
        n = 0
        while True:
            receipt = log.append(name, "crash.test", {"n": n, "pad": "x" * (n % 300)})
            with lock:
                sys.stdout.write(f"{receipt.seq} {receipt.leaf_hash}\\n")
                sys.stdout.flush()
            n += 1
    for i in range(4):
        threading.Thread(target=work, args=(f"writer{i}",), daemon=True).start()
    threading.Event().wait()
    """
)


@pytest.mark.slow
def test_sigkill_in_a_loop_loses_no_acknowledged_record(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    rng = random.Random(20261126)
    acknowledged: dict[int, str] = {}
    kills = 25
    for _ in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(log_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        # let it write for a random while, then kill it without warning
        time.sleep(rng.uniform(0.3, 0.9))
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err.decode()
        for line in out.decode().splitlines():
            seq, leaf = line.split()
            acknowledged[int(seq)] = leaf

        report = verify(log_path)  # raises if the log does not verify
        lines = record_lines(log_path)
        complete = [line for line in lines if line.endswith(b"\n")]
        assert report.records == len(complete)
        for seq, leaf in acknowledged.items():
            assert seq < len(complete), f"acknowledged record {seq} is missing"
            assert record_leaf_hash(complete[seq][:-1]).hex() == leaf
    assert len(acknowledged) > kills * 10  # the writers really did work between kills
