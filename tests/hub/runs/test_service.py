"""The run service: each step of a run, its refusals, failures, recovery and provenance.

Runs execute real notebooks with papermill and a real kernel. The sandbox is the one
boundary replaced here: :class:`UnsandboxedLauncher` starts ``ztlab.kernels.run`` as a plain
child process (the sandboxed launcher runs through the real hub in ``test_runs_e2e.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

from ztlab.common.attest.dsse import Envelope, SignatureError
from ztlab.common.attest.provenance import verify_run_provenance
from ztlab.common.config import parse_config
from ztlab.common.schedule import ScheduleError
from ztlab.hub.keys import load_or_create_attestation_key
from ztlab.hub.policy import PolicyEngine, Principal
from ztlab.hub.runs import RunRefused, RunService, RunStoreError
from ztlab.hub.runs.store import RunRecord

pytestmark = pytest.mark.slow

ALICE = Principal(name="alice", roles=frozenset({"trainer"}))


def notebook(*sources: str, parameters: str = "epochs = 1") -> bytes:
    """A notebook with a parameters cell and ``sources`` as code cells."""
    cells = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]})]
    cells += [nbformat.v4.new_code_cell(source) for source in sources]
    document = nbformat.v4.new_notebook(cells=cells)
    document.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nbformat.writes(document).encode()


class UnsandboxedRun:
    """A run started as a plain child process."""

    def __init__(self, process: subprocess.Popen[bytes], folder: Path) -> None:
        self.process = process
        self.folder = folder
        self.cgroup = "none"
        self.environment = None

    def wait(self, timeout: float | None) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        self.process.kill()

    def executed(self, limit: int) -> bytes | None:
        path = self.folder / "executed.ipynb"
        return path.read_bytes() if path.is_file() else None

    def said(self) -> str:
        return ""

    def memory_exceeded(self) -> int | None:
        return self.memory

    #: what memory_exceeded says (the test sets it: no cgroup here)
    memory: int | None = None


class UnsandboxedLauncher:
    """Starts ``ztlab.kernels.run`` for a run as a child of the test, kernel ``python3``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[str] = []
        self.ended: list[str] = []
        #: what the runs' handles say of their memory limit (set by a test)
        self.memory_exceeded: int | None = None

    def start(
        self, run: RunRecord, principal: Principal, lease: Any, notebook: bytes, *, seconds: float
    ) -> UnsandboxedRun:
        folder = self.root / run.id
        folder.mkdir(parents=True)
        (folder / "input.ipynb").write_bytes(notebook)
        request = {"parameters": dict(run.parameters), "kernel": "python3", "cwd": str(folder)}
        (folder / "request.json").write_text(json.dumps(request))
        process = subprocess.Popen(
            [sys.executable, "-m", "ztlab.kernels.run", str(folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.started.append(run.id)
        handle = UnsandboxedRun(process, folder)
        handle.memory = self.memory_exceeded
        return handle

    def end(self, run: RunRecord) -> None:
        self.ended.append(run.id)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[RunService, list[tuple[str, str, dict[str, Any]]]]]:
    config = parse_config(
        {"state_dir": str(tmp_path / "state"), "runs": {"tick_seconds": 0.2}}, source="test"
    )
    records: list[tuple[str, str, dict[str, Any]]] = []

    def record(actor: str, action: str, **detail: Any) -> None:
        records.append((actor, action, detail))

    runs = RunService(
        config,
        policy=PolicyEngine.defaults(),
        record=record,
        key=load_or_create_attestation_key(tmp_path / "attest.key"),
    )
    roles = {"alice": frozenset({"trainer"}), "vera": frozenset({"viewer"})}

    def vouch(owner: str) -> Principal:
        if owner not in roles:
            raise RunRefused(f"the identity provider no longer vouches for {owner}")
        return Principal(name=owner, roles=roles[owner])

    runs.vouch = vouch
    runs.launcher = UnsandboxedLauncher(tmp_path / "folders")
    runs.roles = roles  # type: ignore[attr-defined]  # the test changes them
    yield runs, records
    runs.close()


def _run(runs: RunService, run: RunRecord) -> RunRecord:
    runs.tick()
    done = runs.wait(run.id, timeout=120)
    assert done is not None
    return done


def actions(records: list[tuple[str, str, dict[str, Any]]]) -> list[str]:
    return [action for _, action, _ in records]


def test_a_run_executes_the_notebook_with_its_parameters_and_signs_provenance(
    service: Any, tmp_path: Path
) -> None:
    runs, records = service
    data = notebook("assert epochs == 3, epochs", "print('trained')")
    run = runs.submit(ALICE, notebook_name="train.ipynb", notebook=data, parameters={"epochs": 3})
    done = _run(runs, run)
    assert done.status == "succeeded", done.message
    assert done.executed_sha256
    assert done.provenance_sha256
    assert actions(records) == ["run.queued", "run.started", "run.provenance", "run.succeeded"]
    envelope = Envelope.from_dict(json.loads(runs.provenance(ALICE, run.id)))
    checked = verify_run_provenance(
        envelope,
        {runs.keyid: runs.key.public_key()},
        notebook=data,
        parameters={"epochs": 3},
        datasets={},
    )
    assert checked.provenance.run_id == run.id
    assert checked.provenance.owner == "alice"
    assert [s.name for s in checked.subjects] == ["executed.ipynb"]
    executed = runs.executed_notebook(ALICE, run.id)
    assert checked.subjects[0].digest["sha256"] == done.executed_sha256
    assert b"trained" in executed
    # what the provenance says holds against a changed notebook byte or parameter
    with pytest.raises(SignatureError, match="notebook"):
        verify_run_provenance(
            envelope, {runs.keyid: runs.key.public_key()}, notebook=data.replace(b"3", b"4")
        )
    with pytest.raises(SignatureError, match="parameters"):
        verify_run_provenance(
            envelope, {runs.keyid: runs.key.public_key()}, parameters={"epochs": 4}
        )
    provenance = next(d for _, a, d in records if a == "run.provenance")
    assert provenance["envelope"] == json.loads(runs.provenance(ALICE, run.id))


def test_a_failing_cell_fails_the_run_naming_the_cell_with_its_traceback(service: Any) -> None:
    runs, records = service
    data = notebook("x = 1", "raise ValueError('bad batch 7')", "print('never')")
    done = _run(runs, runs.submit(ALICE, notebook_name="t.ipynb", notebook=data, parameters={}))
    assert done.status == "failed"
    assert done.failed_cell == 2
    assert "cell 2 raised ValueError: bad batch 7" in done.message
    assert "ValueError" in done.traceback
    assert "\x1b" not in done.traceback
    assert done.provenance_sha256 is None
    failed = next(d for _, a, d in records if a == "run.failed")
    assert failed["failed_cell"] == 2
    assert failed["models_withdrawn"] == []
    with pytest.raises(RunStoreError, match="no provenance"):
        runs.provenance(ALICE, done.id)


def test_a_role_without_run_schedule_is_refused_when_it_starts(service: Any) -> None:
    runs, records = service
    run = runs.submit(ALICE, notebook_name="t.ipynb", notebook=notebook(), parameters={})
    runs.roles["alice"] = frozenset({"viewer"})  # she lost the trainer role meanwhile
    done = _run(runs, run)
    assert done.status == "refused"
    assert "may not run notebooks" in done.message
    assert runs.launcher.started == []  # nothing ran
    assert "run.refused" in actions(records)


def test_an_owner_the_provider_no_longer_vouches_for_is_refused(service: Any) -> None:
    runs, _ = service
    run = runs.submit(ALICE, notebook_name="t.ipynb", notebook=notebook(), parameters={})
    del runs.roles["alice"]  # disabled at the identity provider
    done = _run(runs, run)
    assert done.status == "refused"
    assert "no longer vouches" in done.message


def test_a_viewer_cannot_start_a_run_or_read_anothers(service: Any) -> None:
    runs, _ = service
    vera = Principal(name="vera", roles=frozenset({"viewer"}))
    with pytest.raises(RunRefused, match="may not run notebooks"):
        runs.submit(vera, notebook_name="t.ipynb", notebook=notebook(), parameters={})
    run = runs.submit(ALICE, notebook_name="t.ipynb", notebook=notebook(), parameters={})
    with pytest.raises(RunRefused):
        runs.get(vera, run.id)
    admin = Principal(name="erin", roles=frozenset({"admin"}))
    assert runs.get(admin, run.id).id == run.id


def test_an_approver_reads_a_run_that_made_a_model_to_approve_and_nothing_else(
    service: Any,
) -> None:
    runs, _ = service
    bob = Principal(name="bob", roles=frozenset({"approver"}))
    vera = Principal(name="vera", roles=frozenset({"viewer"}))
    plain = runs.submit(ALICE, notebook_name="t.ipynb", notebook=notebook(), parameters={})
    trained = runs.submit(ALICE, notebook_name="t.ipynb", notebook=notebook(), parameters={})
    runs.store.update(trained.id, expect=("queued",), models=["churn@1"])
    assert runs.get(bob, trained.id).id == trained.id
    with pytest.raises(RunRefused):
        runs.get(bob, plain.id)  # it made no model bob decides on
    with pytest.raises(RunRefused):
        runs.get(vera, trained.id)
    with pytest.raises(RunRefused):
        runs.cancel(bob, trained.id)  # reading is not managing
    alice_approver = Principal(name="alice", roles=frozenset({"approver"}))
    assert runs.get(alice_approver, trained.id).owner == "alice"  # her own, as owner


def test_a_notebook_that_is_not_one_is_refused_before_it_is_kept(service: Any) -> None:
    runs, _ = service
    with pytest.raises(ScheduleError, match="not a notebook"):
        runs.submit(ALICE, notebook_name="t.ipynb", notebook=b"print(1)", parameters={})
    with pytest.raises(RunStoreError, match="parameter name"):
        runs.submit(ALICE, notebook_name="t.ipynb", notebook=notebook(), parameters={"a b": 1})
    assert list(runs.notebooks.iterdir()) == []


def test_a_cancelled_run_stops_and_says_so(service: Any) -> None:
    runs, records = service
    data = notebook("import time; time.sleep(60)")
    run = runs.submit(ALICE, notebook_name="t.ipynb", notebook=data, parameters={})
    runs.tick()
    deadline = time.monotonic() + 60
    while (runs.store.get(run.id) or run).status != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    runs.cancel(ALICE, run.id, reason="wrong data")
    done = runs.wait(run.id, timeout=60)
    assert done is not None
    assert done.status == "cancelled"
    assert done.message == "wrong data"
    assert any(a == "run.cancelled" and actor == "alice" for actor, a, _ in records)


def test_runs_a_dead_scheduler_left_are_interrupted_then_retried_by_their_policy(
    tmp_path: Path, service: Any
) -> None:
    runs, records = service
    from ztlab.common.schedule import ScheduleSpec

    spec = ScheduleSpec.parse({"name": "hourly", "cron": "0 * * * *", "retries": 1})
    runs.add_schedule(ALICE, spec, notebook_name="t.ipynb", notebook=notebook())
    schedule = runs.store.schedule("alice", "hourly")
    assert schedule is not None
    (fired,) = runs.store.fire_due(schedule.next_due + 1, on_time_seconds=300)
    runs.store.claim(fired.id)
    runs.store.update(fired.id, expect=("starting",), status="running")
    # the scheduler that claimed it died here; the next one opens the same database
    (ended,) = runs.recover()
    assert ended.status == "interrupted"
    assert "restarted" in ended.message
    assert runs.launcher.ended == [fired.id]  # its sandbox and token were ended first
    retries = [r for r in runs.store.runs(schedule_id=schedule.id) if r.attempt == 2]
    assert len(retries) == 1
    assert retries[0].status == "queued"
    assert retries[0].not_before >= time.time() + 50  # after its back-off
    assert "run.interrupted" in actions(records)
    # a second recovery finds nothing: the run is never ended (or retried) twice
    assert runs.recover() == []


def test_a_failed_scheduled_run_is_retried_until_its_retries_are_spent(service: Any) -> None:
    runs, _ = service
    from ztlab.common.schedule import ScheduleSpec

    spec = ScheduleSpec.parse(
        {"name": "flaky", "cron": "0 * * * *", "retries": 1, "retry_backoff_seconds": 0}
    )
    runs.add_schedule(ALICE, spec, notebook_name="t.ipynb", notebook=notebook("1/0"))
    schedule = runs.store.schedule("alice", "flaky")
    assert schedule is not None
    moment = schedule.next_due + 1
    runs.tick(now=moment)
    first = runs.store.runs(schedule_id=schedule.id)[-1]
    runs.wait(first.id, timeout=120)
    runs.tick(now=time.time() + 1)
    attempts = runs.store.runs(schedule_id=schedule.id)
    second = next(r for r in attempts if r.attempt == 2)
    done = runs.wait(second.id, timeout=120)
    assert done is not None
    assert done.status == "failed"
    runs.tick(now=time.time() + 1)
    assert sorted(r.attempt for r in runs.store.runs(schedule_id=schedule.id)) == [1, 2]


def test_schedules_in_the_configuration_are_added_changed_and_removed_to_match(
    tmp_path: Path,
) -> None:
    first = tmp_path / "retrain.ipynb"
    first.write_bytes(notebook("print(1)"))
    records: list[tuple[str, str, dict[str, Any]]] = []

    def open_with(schedules: list[dict[str, Any]]) -> RunService:
        config = parse_config(
            {"state_dir": str(tmp_path / "state"), "runs": {"schedules": schedules}},
            source="test",
        )
        runs = RunService(
            config,
            policy=PolicyEngine.defaults(),
            record=lambda actor, action, **detail: records.append((actor, action, detail)),
            key=load_or_create_attestation_key(tmp_path / "attest.key"),
        )
        runs.sync_configured()
        return runs

    nightly = {"name": "nightly", "owner": "alice", "notebook": str(first), "cron": "0 2 * * *"}
    runs = open_with([nightly])
    (added,) = runs.store.schedules()
    assert (added.owner, added.name, added.source) == ("alice", "nightly", "config")
    with pytest.raises(RunStoreError, match=r"ztlab\.toml"):
        runs.remove_schedule(ALICE, "alice", "nightly")  # only the file removes it
    runs.close()
    first.write_bytes(notebook("print(2)"))  # the notebook changed: kept anew when reopened
    runs = open_with([{**nightly, "timezone": "Europe/Berlin"}])
    (changed,) = runs.store.schedules()
    assert changed.id == added.id
    assert changed.spec.timezone == "Europe/Berlin"
    assert changed.notebook_sha256 != added.notebook_sha256
    runs.close()
    first.unlink()
    runs = open_with([])
    assert runs.store.schedules() == []
    assert [a for _, a, _ in records].count("schedule.removed") == 1
    runs.close()
    with pytest.raises(RunStoreError, match="cannot read"):
        open_with([nightly])  # a configured notebook that is gone stops the hub, naming it


def test_a_failed_run_is_posted_to_the_owners_webhook(tmp_path: Path) -> None:
    import http.server
    import threading

    received: list[dict[str, Any]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    runs = _service(tmp_path, notify_url=f"http://127.0.0.1:{server.server_port}/hook")
    try:
        data = notebook("raise KeyError('label')")
        done = _run(runs, runs.submit(ALICE, notebook_name="t.ipynb", notebook=data, parameters={}))
        deadline = time.monotonic() + 30
        while not received and time.monotonic() < deadline:
            time.sleep(0.1)
        assert received == [
            {
                "kind": "ztlab.run",
                "status": "failed",
                "run": done.id,
                "owner": "alice",
                "schedule": None,
                "attempt": 1,
                "message": done.message,
                "failed_cell": 1,
                "url": f"http://127.0.0.1:8000/hub/ztlab/runs/{done.id}",
            }
        ]
    finally:
        runs.close()
        server.shutdown()


def _service(tmp_path: Path, **settings: Any) -> RunService:
    config = parse_config(
        {"state_dir": str(tmp_path / "state"), "runs": {"tick_seconds": 0.2, **settings}},
        source="test",
    )
    runs = RunService(
        config,
        policy=PolicyEngine.defaults(),
        record=lambda *args, **detail: None,
        key=load_or_create_attestation_key(tmp_path / "attest.key"),
    )
    runs.vouch = lambda owner: ALICE
    runs.launcher = UnsandboxedLauncher(tmp_path / "folders")
    return runs


def test_a_run_past_its_time_is_stopped_and_fails_saying_so(tmp_path: Path) -> None:
    runs = _service(tmp_path, max_hours=0.001)  # 3.6 s
    try:
        data = notebook("import time; time.sleep(120)")
        started = time.monotonic()
        done = _run(runs, runs.submit(ALICE, notebook_name="t.ipynb", notebook=data, parameters={}))
        assert done.status == "failed"
        assert "ran past [runs] max_hours (0.001 h)" in done.message
        assert time.monotonic() - started < 60
    finally:
        runs.close()


def test_one_user_runs_at_most_max_active_at_once(tmp_path: Path) -> None:
    runs = _service(tmp_path, max_active_per_user=1)
    try:
        slow = notebook("import time; time.sleep(3)")
        first = runs.submit(ALICE, notebook_name="t.ipynb", notebook=slow, parameters={})
        second = runs.submit(ALICE, notebook_name="t.ipynb", notebook=slow, parameters={})
        assert runs.tick() == [first.id]
        assert runs.tick() == []  # the second waits for the first
        runs.wait(first.id, timeout=120)
        assert runs.tick() == [second.id]
        done = runs.wait(second.id, timeout=120)
        assert done is not None
        assert done.status == "succeeded"
        first_done = runs.store.get(first.id)
        assert first_done is not None
        assert done.started_at is not None
        assert done.started_at >= (first_done.finished_at or 0)
    finally:
        runs.close()


def test_a_run_its_memory_limit_stopped_says_so(tmp_path: Path) -> None:
    runs = _service(tmp_path)
    runs.launcher.memory_exceeded = 512 * 2**20  # type: ignore[union-attr]
    try:
        data = notebook("raise MemoryError()")
        done = _run(runs, runs.submit(ALICE, notebook_name="t.ipynb", notebook=data, parameters={}))
        assert done.status == "failed"
        assert "stopped by its memory limit (512 MiB" in done.message
    finally:
        runs.close()
