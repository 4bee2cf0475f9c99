"""Scheduled and one-off notebook runs through the real hub, MLflow and the owner's sandbox.

``rita`` trains (trainer, never starts a server here), ``abe`` approves, ``stew`` registers
the dataset. Every run executes in rita's sandbox (cgroup ``ztl-rita-run-ID``, a token for
the run only) with papermill and the secure kernel; schedules fire from the control plane.
"""

from __future__ import annotations

import base64
import json
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
import requests

from tests.dataset_fixtures import add_tables
from tests.hub.test_datasets_e2e import DataStack, _user
from tests.hub.test_monitor_e2e import GPU0, write_trace
from tests.hubstack import nvidia_nodes, remove_accounts, running_stack
from ztlab.common.attest.dsse import Envelope, SignatureError
from ztlab.common.attest.provenance import verify_run_provenance
from ztlab.common.keys import key_id, public_key_from_pem
from ztlab.hub.sandbox.cgroups import CgroupManager

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

USERS = ("rita", "abe", "stew")
FINAL = ("succeeded", "failed", "refused", "skipped", "missed", "interrupted", "cancelled")

TRAIN = [
    "import mlflow, os, ztlab.datasets as zd, ztlab.models as zm\n"
    "from sklearn.linear_model import LogisticRegression",
    # the run's GPU is open to it, the other one fenced off by its cgroup
    "leased = os.environ.get('CUDA_VISIBLE_DEVICES')\n"
    "def opens(minor):\n"
    "    try:\n"
    "        os.close(os.open(f'/dev/nvidia{minor}', os.O_RDONLY))\n"
    "    except PermissionError:\n"
    "        return 'fenced'\n"
    "    except OSError:\n"
    "        return 'open'\n"
    "    return 'open'\n"
    "print('gpu', leased, [opens(m) for m in (0, 1)])",
    "ds = zd.open('iris@1')\n"
    "with mlflow.start_run() as run:\n"
    "    frame = ds.read_parquet('tables/train.parquet')\n"
    "    model = LogisticRegression(C=C).fit(frame[['x1', 'x2']], frame['label'])\n"
    "    mlflow.sklearn.log_model(model, name='model', registered_model_name=model_name)\n"
    "print('trained', run.info.run_id)",
]


def notebook(*cells: str, parameters: str = "C = 1.0\nmodel_name = 'churn'") -> bytes:
    """A notebook: a parameters cell, then ``cells``."""
    made = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]})]
    made += [nbformat.v4.new_code_cell(cell) for cell in cells]
    return nbformat.writes(nbformat.v4.new_notebook(cells=made)).encode()


class RunsStack(DataStack):
    """The hub, with helpers for runs."""

    def __init__(self, stack: Any, store: Path, trace: Path) -> None:
        super().__init__(stack, store)
        self.trace = trace

    def ask(self, user: str, method: str, path: str, body: Any = None) -> requests.Response:
        return requests.request(
            method,
            f"{self.api_url}{path}",
            json=body,
            headers={"Authorization": f"token {self.token(user)}"},
            timeout=120,
        )

    @property
    def api_url(self) -> str:
        return f"{self.stack.hub_url}/hub/api/ztlab"

    def submit(self, user: str, data: bytes, **fields: Any) -> dict[str, Any]:
        body = {"notebook": {"name": "train.ipynb", "content": base64.b64encode(data).decode()}}
        answer = self.ask(user, "POST", "/runs", {**body, **fields})
        assert answer.status_code == 201, answer.text
        return dict(answer.json())

    def schedule(self, user: str, data: bytes, **fields: Any) -> dict[str, Any]:
        body = {"notebook": {"name": "train.ipynb", "content": base64.b64encode(data).decode()}}
        answer = self.ask(user, "POST", "/schedules", {**body, **fields})
        assert answer.status_code == 201, answer.text
        return dict(answer.json())

    def run(self, run_id: str, user: str = "rita") -> dict[str, Any]:
        answer = self.ask(user, "GET", f"/runs/{run_id}")
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def wait_run(self, run_id: str, statuses: tuple[str, ...] = FINAL, timeout: float = 300) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.run(run_id)
            if run["status"] in statuses:
                return run
            time.sleep(0.5)
        log = self.stack.state_dir / "logs" / "runs" / f"{run_id}.log"
        shown = log.read_text()[-3000:] if log.exists() else "(no log)"
        raise AssertionError(f"run {run_id} stayed {run['status']}:\n{shown}")

    def runs_of(self, schedule: str) -> list[dict[str, Any]]:
        answer = self.ask("rita", "GET", f"/runs?schedule={schedule}")
        return list(answer.json()["runs"])

    def wait_fire(self, schedule: str, *, after: int = 0, timeout: float = 90) -> dict[str, Any]:
        """The first run of ``schedule`` beyond the ``after`` it had."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = self.runs_of(schedule)
            if len(runs) > after:
                return runs[-after - 1] if after else runs[-1]
            time.sleep(0.5)
        raise AssertionError(f"{schedule} did not fire:\n{self.stack.hub_log.read_text()[-3000:]}")

    def session_get(self, user: str, path: str) -> requests.Response:
        session = self.stack.session()
        assert self.stack.login(session, user).status_code == 200
        return session.get(f"{self.stack.hub_url}{path}", timeout=30)

    def server_running(self, user: str) -> bool:
        model = requests.get(
            f"{self.stack.hub_url}/hub/api/users/{user}",
            headers={"Authorization": f"token {self.token(user)}"},
            timeout=30,
        ).json()
        return bool(model.get("servers"))


def cgroup_procs(name: str) -> list[int]:
    cgroup = CgroupManager.detect(parent="ztlab").get(name)
    return sorted(cgroup.procs()) if cgroup is not None else []


@pytest.fixture(scope="module")
def runs_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunsStack]:
    root = tmp_path_factory.mktemp("runs-stack")
    trace = root / "trace.json"
    write_trace(trace, {})
    # the dataset lives where rita's account reaches it through her sandbox's mount
    store = Path(tempfile.mkdtemp(prefix="ztlab-runs-data-"))
    (store / "iris" / "1").mkdir(parents=True)
    add_tables(store / "iris" / "1", rows=400)
    subprocess.run(["chmod", "-R", "a+rX", str(store)], check=True)
    remove_accounts(*USERS)
    users = {
        "rita": _user("rita", ["ml-trainers"]),
        "abe": _user("abe", ["model-approvers"]),
        "stew": _user("stew", ["data-stewards"]),
    }
    extra = f"""pids_max = 400
[roles.trainer]
max_gpus = 1

[gpu.pools.research]
gpus = ["0", "1"]
roles = ["trainer"]

[gpu.monitor]
source = "replay"
trace = "{trace}"
interval_seconds = 0.5

[datasets]
storage_roots = ["{store}"]

[runs]
tick_seconds = 0.5
"""
    try:
        with (
            nvidia_nodes(0, 1),
            running_stack(
                root,
                extra_config=extra,
                extra_users=users,
                pool="10.234.0.0/16",
                table="ztlab_test_runs",
                models=True,
            ) as stack,
        ):
            data = RunsStack(stack, store, trace)
            deadline = time.monotonic() + 90
            while data.call("rita", "GET", "/mlflow/health").status_code != 200:
                assert time.monotonic() < deadline, stack.hub_log.read_text()[-3000:]
                time.sleep(0.5)
            path = str(store / "iris" / "1")
            answer = data.call("stew", "POST", "/datasets", {"ref": "iris@1", "path": path})
            assert answer.status_code == 201, answer.text
            yield data
    finally:
        remove_accounts(*USERS)
        shutil.rmtree(store, ignore_errors=True)


def test_a_schedule_trains_in_the_sandbox_and_an_approver_approves_after_its_provenance(
    runs_stack: RunsStack, tmp_path: Path
) -> None:
    data, stack = runs_stack, runs_stack.stack
    source = notebook(*TRAIN)
    added = data.schedule(
        "rita", source, name="nightly", cron="* * * * * */5", parameters={"C": 0.5},
        pool="research", gpus=1,
    )  # fmt: skip
    assert added["next_run"]
    assert added["notebook"]["sha256"]
    first = data.wait_fire("nightly")
    paused = data.ask("rita", "POST", "/schedules/rita/nightly/pause")
    assert paused.status_code == 200
    assert paused.json()["paused"] is True
    assert not data.server_running("rita")  # her interactive server is not running
    run = data.wait_run(first["id"])
    log = (stack.state_dir / "logs" / "runs" / f"{run['id']}.log").read_text()
    assert run["status"] == "succeeded", f"{run['message']}\n{run['traceback']}\n{log[-3000:]}"
    assert run["models"] == ["churn@1"]
    assert run["datasets"][0]["dataset"] == "iris@1"
    assert not data.server_running("rita")
    started = stack.details("run.started")[-1]
    assert started["cgroup"] == f"ztl-rita-run-{run['id']}"
    assert started["gpus"]
    assert cgroup_procs(started["cgroup"]) == []  # nothing of the run is left
    assert not (Path("/run/ztlab/runs") / run["id"]).exists()  # its folder (and key) neither
    assert not list(stack.state_dir.rglob(f"run-{run['id']}"))  # nor its certificate
    executed = data.ask("rita", "GET", f"/runs/{run['id']}/notebook").content
    assert b"'fenced'" in executed
    assert b"'open'" in executed
    # the run's token was for the run only, and is gone
    tokens = requests.get(
        f"{stack.hub_url}/hub/api/users/rita/tokens",
        headers={"Authorization": f"token {data.token('rita')}"},
        timeout=30,
    ).json()
    assert not [t for t in tokens["api_tokens"] if str(t.get("note", "")).startswith("ztlab-run:")]
    # the provenance verifies with the project's verifier, with what rita holds
    envelope_bytes = data.ask("rita", "GET", f"/runs/{run['id']}/provenance").content
    trust = data.ask("rita", "GET", "/provenance/trust").json()
    key = public_key_from_pem(trust["public_key"].encode())
    registered = data.call("rita", "GET", "/datasets/iris@1").json()
    datasets = {"dataset:iris@1": {registered["algorithm"]: registered["root"]}}
    envelope = Envelope.from_dict(json.loads(envelope_bytes))
    checked = verify_run_provenance(
        envelope, {key_id(key): key}, notebook=source, parameters={"C": 0.5}, datasets=datasets
    )
    assert checked.provenance.schedule == "nightly"
    assert checked.provenance.gpus == 1
    assert "models:/churn/1" in [s.name for s in checked.subjects]
    for wrong in ({"parameters": {"C": 0.6}}, {"notebook": source + b" "}):
        with pytest.raises(SignatureError):
            verify_run_provenance(envelope, {key_id(key): key}, **wrong)  # type: ignore[arg-type]
    # ... and its envelope with a generic DSSE verifier (securesystemslib)
    from securesystemslib.dsse import Envelope as GenericEnvelope
    from securesystemslib.signer import SSlibKey

    generic = GenericEnvelope.from_dict(json.loads(envelope_bytes))
    sslib_key = SSlibKey.from_crypto(key, keyid=key_id(key))  # type: ignore[arg-type]
    assert set(generic.verify([sslib_key], 1)) == {sslib_key.keyid}
    # stored with the MLflow run and in the audit log
    mlflow_run = run_id_of(data, "churn", "1")
    tags = {
        t["key"]: t["value"]
        for t in data.call(
            "rita", "GET", f"/mlflow/api/2.0/mlflow/runs/get?run_id={mlflow_run}"
        ).json()["run"]["data"]["tags"]
    }
    assert tags["ztlab.run"] == run["id"]
    assert tags["ztlab.provenance"] == f"sha256:{run['provenance_sha256']}"
    stored = list((stack.state_dir / "mlflow" / "artifacts").rglob("ztlab/provenance.dsse.json"))
    assert [p.read_bytes() for p in stored] == [envelope_bytes]
    audited = [d for d in stack.details("run.provenance") if d["run"] == run["id"]]
    assert audited
    assert audited[0]["envelope"] == json.loads(envelope_bytes)
    # the approver sees the provenance, verified, then approves
    shown = data.call("abe", "GET", "/models/churn/1").json()
    assert shown["provenance"]["verified"] is True, shown["provenance"]
    assert shown["provenance"]["run"]["id"] == run["id"]
    assert data.ask("abe", "GET", f"/runs/{run['id']}").status_code == 200  # the run behind it
    approved = data.call("abe", "POST", "/models/churn/1/approve", {"reason": "provenance ok"})
    assert approved.status_code == 200, approved.text
    # offline, with the command line
    (tmp_path / "p.json").write_bytes(envelope_bytes)
    (tmp_path / "k.pem").write_text(trust["public_key"])
    (tmp_path / "train.ipynb").write_bytes(source)
    ztlab = str(Path(sys.executable).with_name("ztlab"))
    verify = [ztlab, "run", "verify", str(tmp_path / "p.json"), "--key", str(tmp_path / "k.pem")]
    good = subprocess.run(
        [*verify, "--notebook", str(tmp_path / "train.ipynb"), "-p", "C", "0.5"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert good.returncode == 0, good.stdout + good.stderr
    bad = subprocess.run([*verify, "-p", "C", "0.7"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1, bad.stdout + bad.stderr


def run_id_of(data: RunsStack, name: str, version: str) -> str:
    answer = data.call(
        "rita", "GET", f"/mlflow/api/2.0/mlflow/model-versions/get?name={name}&version={version}"
    ).json()
    return str(answer["model_version"]["run_id"])


def test_a_failing_cell_fails_the_run_and_withdraws_its_model(runs_stack: RunsStack) -> None:
    data, stack = runs_stack, runs_stack.stack
    source = notebook(TRAIN[0], TRAIN[2], "raise RuntimeError('evaluation below threshold')")
    submitted = data.submit("rita", source, parameters={"model_name": "halfway"})
    run = data.wait_run(submitted["id"])
    assert run["status"] == "failed"
    assert run["failed_cell"] == 3
    assert "RuntimeError: evaluation below threshold" in run["message"]
    assert "evaluation below threshold" in run["traceback"]
    failed = next(d for d in stack.details("run.failed") if d["run"] == run["id"])
    assert failed["models_withdrawn"] == ["halfway@1"]
    stack.wait_record("model.withdrawn")
    gone = data.call(
        "rita", "GET", "/mlflow/api/2.0/mlflow/model-versions/get?name=halfway&version=1"
    )
    assert gone.status_code == 404
    assert data.ask("rita", "GET", f"/runs/{run['id']}/provenance").status_code == 404


STEAL = (
    "import os, ssl, urllib.error, urllib.request\n"
    "token = os.environ['JUPYTERHUB_API_TOKEN']\n"
    "open(os.path.expanduser('~/stolen-run-token'), 'w').write(token)\n"
    "tls = ssl.create_default_context(cafile=os.environ['JUPYTERHUB_SSL_CLIENT_CA'])\n"
    "env = os.environ\n"
    "tls.load_cert_chain(env['JUPYTERHUB_SSL_CERTFILE'], env['JUPYTERHUB_SSL_KEYFILE'])\n"
    "def status(method, path):\n"
    "    request = urllib.request.Request(\n"
    "        os.environ['JUPYTERHUB_API_URL'] + path, method=method,\n"
    "        data=b'{}' if method == 'POST' else None,\n"
    "        headers={'Authorization': f'token {token}', 'Content-Type': 'application/json'})\n"
    "    try:\n"
    "        return urllib.request.urlopen(request, context=tls).status\n"
    "    except urllib.error.HTTPError as error:\n"
    "        return error.code\n"
    "print('make-token', status('POST', '/users/rita/tokens'))\n"
    "print('start-server', status('POST', '/users/rita/server'))\n"
    "print('own-runs', status('GET', '/ztlab/runs'))"
)


def test_a_runs_token_is_for_the_run_only_and_dies_with_it(runs_stack: RunsStack) -> None:
    data = runs_stack
    run = data.wait_run(data.submit("rita", notebook(STEAL))["id"])
    assert run["status"] == "succeeded", run
    executed = data.ask("rita", "GET", f"/runs/{run['id']}/notebook").text
    assert "make-token 403" in executed  # nothing of JupyterHub's: no token, no server
    assert "start-server 403" in executed
    assert "own-runs 200" in executed  # the control plane's API, as rita (policy applies)
    home = Path(pwd.getpwnam("ztl-rita").pw_dir)
    stolen = (home / "stolen-run-token").read_text()
    replayed = requests.get(
        f"{data.api_url}/runs", headers={"Authorization": f"token {stolen}"}, timeout=30
    )
    assert replayed.status_code == 403  # revoked when the run ended


def test_users_cannot_forge_the_tags_that_tie_mlflow_runs_to_runs(runs_stack: RunsStack) -> None:
    data = runs_stack
    forged_run = data.runs_of("nightly")[-1]["id"]
    created = data.call(
        "rita",
        "POST",
        "/mlflow/api/2.0/mlflow/runs/create",
        {"experiment_id": "0", "tags": [{"key": "ztlab.run", "value": forged_run}]},
    )
    assert created.status_code == 200, created.text
    mlflow_run = created.json()["run"]["info"]["run_id"]
    tags = {
        t["key"]: t["value"]
        for t in data.call("rita", "GET", f"/mlflow/api/2.0/mlflow/runs/get?run_id={mlflow_run}")
        .json()["run"]["data"]
        .get("tags", [])
    }
    assert "ztlab.run" not in tags  # only a run's own token gets one
    for path, body in (
        ("runs/set-tag", {"run_id": mlflow_run, "key": "ztlab.provenance", "value": "sha256:0"}),
        ("runs/log-batch", {"run_id": mlflow_run, "tags": [{"key": "ztlab.run", "value": "x"}]}),
        ("runs/delete-tag", {"run_id": mlflow_run, "key": "ztlab.run"}),
    ):
        refused = data.call("rita", "POST", f"/mlflow/api/2.0/mlflow/{path}", body)
        assert refused.status_code == 403, (path, refused.text)


def test_a_tampered_dataset_fails_the_run(runs_stack: RunsStack) -> None:
    data = runs_stack
    target = next((data.store / "iris" / "1").rglob("*.parquet"))
    original = target.read_bytes()
    target.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        submitted = data.submit("rita", notebook(*TRAIN), parameters={"model_name": "tampered"})
        run = data.wait_run(submitted["id"])
    finally:
        target.write_bytes(original)
    assert run["status"] == "failed"
    assert run["failed_cell"] == 3
    assert target.name in run["traceback"] or "digest" in run["traceback"].lower()
    assert run["models"] == []


def test_a_quota_refusal_is_clean_and_said(runs_stack: RunsStack) -> None:
    data, stack = runs_stack, runs_stack.stack
    submitted = data.submit("rita", notebook("print(1)"), pool="research", gpus=2)
    run = data.wait_run(submitted["id"])
    assert run["status"] == "failed"
    assert "no GPU for the run" in run["message"]
    assert "1" in run["message"]  # the quota it hit
    assert cgroup_procs(f"ztl-rita-run-{run['id']}") == []
    assert [d for d in stack.details("run.failed") if d["run"] == run["id"]]


def test_a_schedule_whose_owner_lost_the_role_or_was_disabled_does_not_run(
    runs_stack: RunsStack,
) -> None:
    data, stack = runs_stack, runs_stack.stack
    data.schedule("rita", notebook("print('ran')"), name="watch", cron="* * * * * */5")
    stack.idp.set_user("rita", groups=["viewers"])
    try:
        run = data.wait_run(data.wait_fire("watch")["id"], timeout=120)
        assert run["status"] == "refused", run
        assert "may not run notebooks" in run["message"]
        stack.idp.set_user("rita", groups=["ml-trainers"], disabled=True)
        seen = len(data.runs_of("watch"))
        later = data.wait_run(data.wait_fire("watch", after=seen)["id"], timeout=120)
        assert later["status"] == "refused", later
        assert "no longer vouches" in later["message"]
    finally:
        stack.idp.set_user("rita", groups=["ml-trainers"], disabled=False)
        data.tokens.pop("rita", None)  # she signs in again: the hub learns her role back
        data.ask("rita", "DELETE", "/schedules/rita/watch")
    refused = [d for d in stack.details("run.refused") if d.get("schedule") == "watch"]
    assert len(refused) >= 2


LONG = (
    "import os, time\n"
    "marker = os.path.expanduser('~/long-marker')\n"
    "first = not os.path.exists(marker)\n"
    "open(marker, 'w').close()\n"
    "time.sleep(300 if first else 0)\n"
    "print('attempt done, first =', first)"
)


def test_a_hub_killed_mid_run_interrupts_it_and_the_retry_runs_alone(
    runs_stack: RunsStack,
) -> None:
    data, stack = runs_stack, runs_stack.stack
    data.schedule(
        "rita", notebook(LONG), name="long", cron="* * * * * */5", retries=1,
        retry_backoff_seconds=0, concurrency="skip",
    )  # fmt: skip
    first = data.wait_run(data.wait_fire("long")["id"], statuses=("running",), timeout=120)
    data.ask("rita", "POST", "/schedules/rita/long/pause")
    cgroup = f"ztl-rita-run-{first['id']}"
    deadline = time.monotonic() + 60
    while not cgroup_procs(cgroup) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cgroup_procs(cgroup), "the run's processes are in its cgroup"
    stack.hub.kill(signal.SIGKILL)
    assert cgroup_procs(cgroup), "a killed hub leaves the run's sandbox running"
    stack.hub.start()  # (the API tokens made before are in its database still)
    interrupted = data.wait_run(first["id"])
    assert interrupted["status"] == "interrupted"
    assert cgroup_procs(cgroup) == []  # ended before anything else started
    runs = [r for r in data.runs_of("long") if r["attempt"] == 2]
    assert len(runs) == 1
    retry = data.wait_run(runs[0]["id"])
    assert retry["status"] == "succeeded", retry
    assert retry["started_at"] >= interrupted["finished_at"]  # never two at once
    executed = data.ask("rita", "GET", f"/runs/{retry['id']}/notebook").content
    assert b"first = False" in executed
    assert [d for d in stack.details("run.interrupted") if d["run"] == first["id"]]


def test_the_gpu_monitor_stops_a_run_on_a_gpu_it_holds_no_lease_for(
    runs_stack: RunsStack,
) -> None:
    data, stack = runs_stack, runs_stack.stack
    submitted = data.submit("rita", notebook("import time; time.sleep(300)"))
    run = data.wait_run(submitted["id"], statuses=("running",), timeout=120)
    cgroup = f"ztl-rita-run-{run['id']}"
    deadline = time.monotonic() + 60
    while not cgroup_procs(cgroup) and time.monotonic() < deadline:
        time.sleep(0.2)
    since = stack.audit_size()
    write_trace(
        data.trace, {GPU0: [{"pid": cgroup_procs(cgroup)[0], "used_memory": 1 << 30, "sm": 99}]}
    )
    try:
        done = data.wait_run(run["id"], timeout=120)
    finally:
        write_trace(data.trace, {})
    assert done["status"] == "cancelled", done
    assert "GPU monitor" in done["message"]
    alert = next(a for a in stack.details("gpu.alert", since) if a["kind"] == "unleased_process")
    assert (alert["user"], alert["server"]) == ("rita", f"run-{run['id']}")
    assert cgroup_procs(cgroup) == []


def test_history_lists_runs_with_status_and_links(runs_stack: RunsStack) -> None:
    data = runs_stack
    listing = data.ask("rita", "GET", "/runs?limit=100").json()["runs"]
    statuses = {r["status"] for r in listing}
    assert {"succeeded", "failed", "refused", "interrupted"} <= statuses
    assert all(r["owner"] == "rita" for r in listing)
    # another user sees none of them, and cannot read one
    assert data.ask("abe", "GET", "/runs").json()["runs"] == []
    assert data.ask("abe", "GET", f"/runs/{listing[0]['id']}").status_code == 403
    page = data.session_get("rita", "/hub/ztlab/runs")
    assert page.status_code == 200
    assert listing[0]["id"] in page.text
