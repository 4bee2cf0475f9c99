"""Signed models and approvals with the real MLflow server behind the real hub.

``alice`` trains (trainer), ``paul`` approves (approver), ``tess`` is both (for the
two-person rule), ``sam`` registers datasets (steward), ``vera`` only views. Training runs
in a real kernel with MLflow's own client pointed at the hub's authenticated endpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec

from tests.dataset_fixtures import add_tables
from tests.hub.test_datasets_e2e import DataStack, _user
from tests.hubstack import running_stack
from tests.kernel_session import Kernel, secure_kernel
from ztlab.common.attest import public_key_pem

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TRAIN = """
import mlflow, ztlab.datasets as zd, ztlab.models as zm
from sklearn.linear_model import LogisticRegression
ds = zd.open('iris@1')
with mlflow.start_run() as run:
    frame = ds.read_parquet('tables/train.parquet')
    {extra}
    model = LogisticRegression().fit(frame[['x1', 'x2']], frame['label'])
    mlflow.sklearn.log_model(model, name='model', registered_model_name={name!r})
print('trained', run.info.run_id)
"""


@pytest.fixture(scope="module")
def models_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataStack]:
    root = tmp_path_factory.mktemp("models-stack")
    store = root / "store"
    (store / "iris" / "1").mkdir(parents=True)
    add_tables(store / "iris" / "1", rows=400)
    users = {
        "sam": _user("sam", ["data-stewards"]),
        "vera": _user("vera", ["viewers"]),
        "paul": _user("paul", ["model-approvers"]),
        "tess": _user("tess", ["ml-trainers", "model-approvers"]),
    }
    with running_stack(
        root,
        extra_config=f'\n[datasets]\nstorage_roots = ["{store}"]\n',
        extra_users=users,
        pool="10.222.0.0/16",
        table="ztlab_test_models",
        models=True,
    ) as stack:
        yield ready(DataStack(stack, store))


def ready(data: DataStack) -> DataStack:
    """Wait for MLflow behind the hub; register ``iris@1`` (as ``sam``)."""
    deadline = time.monotonic() + 90
    while data.call("alice", "GET", "/mlflow/health").status_code != 200:
        assert time.monotonic() < deadline, data.stack.hub_log.read_text()[-3000:]
        time.sleep(0.5)
    path = str(data.store / "iris" / "1")
    answer = data.call("sam", "POST", "/datasets", {"ref": "iris@1", "path": path})
    assert answer.status_code == 201, answer.text
    return data


def kernel_env(data: DataStack, user: str) -> dict[str, str]:
    token = data.token(user)
    pub = data.stack.state_dir / "keys" / "attest-p256.key.pub"
    return {
        "JUPYTERHUB_API_URL": data.api,
        "JUPYTERHUB_API_TOKEN": token,
        "MLFLOW_TRACKING_URI": f"{data.api}/ztlab/mlflow",
        "MLFLOW_TRACKING_TOKEN": token,
        "ZTLAB_TRUSTED_KEYS": pub.read_text(),
        "ZTLAB_LOCAL_REGISTRY": "",
        "GIT_PYTHON_REFRESH": "quiet",
    }


@pytest.fixture(scope="module")
def alice(models_stack: DataStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    with secure_kernel(tmp_path_factory.mktemp("alice"), kernel_env(models_stack, "alice")) as k:
        yield k


def artifacts(data: DataStack, name: str, version: str) -> Path:
    """The model version's files in the hub's artifact store."""
    found = sorted((data.stack.state_dir / "mlflow" / "artifacts").glob("*/models/m-*/artifacts"))
    answer = data.call(
        "alice", "GET", f"/mlflow/api/2.0/mlflow/model-versions/get?name={name}&version={version}"
    ).json()
    model_id = answer["model_version"]["source"].removeprefix("models:/")
    (match,) = [path for path in found if path.parent.name == model_id]
    return match


def test_train_sign_approve_load(models_stack: DataStack, alice: Kernel) -> None:
    data, stack = models_stack, models_stack.stack
    out = alice.ok(TRAIN.format(name="churn", extra=""), timeout=240)
    assert "trained" in out
    # registering through the hub signed the version at once (sign_on_register)
    shown = data.call("alice", "GET", "/models/churn/1").json()
    assert shown["signed"] is True
    assert shown["trainer"] == "alice"
    record = stack.wait_record("model.sign", actor="alice")
    assert record.detail["datasets"][0]["dataset"] == "iris@1"
    assert record.detail["on_register"] is True
    # asking again re-verifies and returns the same signature
    signed = alice.ok("print(zm.sign('churn', 1))")
    assert "'trainer': 'alice'" in signed
    assert shown["bundle"] == data.call("alice", "GET", "/models/churn/1").json()["bundle"]
    # a user cannot move the protected alias through MLflow's API, whoever they are
    for user in ("alice", "paul"):
        moved = data.call(
            user,
            "POST",
            "/mlflow/api/2.0/mlflow/registered-models/alias",
            {"name": "churn", "alias": "production", "version": "1"},
        )
        assert moved.status_code == 403
    stack.wait_record("model.alias.refused", actor="paul")
    # only an approver who is not the trainer approves
    assert data.call("sam", "POST", "/models/churn/1/approve", {"reason": "ok"}).status_code == 403
    approved = data.call("paul", "POST", "/models/churn/1/approve", {"reason": "reviewed eval"})
    assert approved.status_code == 200, approved.text
    stack.wait_record("model.approve", actor="paul")
    out = alice.ok(
        "m = zm.load('models:/churn@production', flavor='sklearn')\n"
        "print(type(m).__name__, m.predict(frame[['x1', 'x2']].head(3)).shape)",
        timeout=120,
    )
    assert out.strip() == "LogisticRegression (3,)"
    # the command line: status, then revoke; a revoked alias no longer loads
    token = Path(tempfile.mkdtemp()) / "paul.token"
    token.write_text(data.token("paul"))
    ztlab = [str(Path(sys.executable).with_name("ztlab")), "model"]
    hub = ["--hub-url", data.api, "--token-file", str(token)]
    shown = subprocess.run(
        [*ztlab, "status", "churn", "1", *hub], capture_output=True, text=True, timeout=60
    )
    assert "signed; trained by alice" in shown.stdout, shown.stderr
    assert "dataset iris@1" in shown.stdout
    assert "approve production by paul: reviewed eval" in shown.stdout
    revoked = subprocess.run(
        [*ztlab, "revoke", "churn", "production", "--reason", "drift", *hub],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert revoked.returncode == 0, revoked.stderr
    stack.wait_record("model.revoke", actor="paul")
    outcome = alice.run("zm.load('models:/churn@production', flavor='sklearn')")
    assert outcome.ename == "ModelRefused"
    assert "not approved" in (outcome.evalue or "")


def test_tampered_artifacts_are_refused_at_approval_and_at_load(
    models_stack: DataStack, alice: Kernel
) -> None:
    data, stack = models_stack, models_stack.stack
    alice.ok(TRAIN.format(name="fraud", extra=""), timeout=240)
    alice.ok("zm.sign('fraud', 1)")
    files = artifacts(data, "fraud", "1")
    target = next(p for p in files.iterdir() if p.name.startswith("model."))
    original = target.read_bytes()
    target.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    refused = data.call("paul", "POST", "/models/fraud/1/approve", {"reason": "looks fine"})
    assert refused.status_code == 409
    assert target.name in refused.json()["message"]
    stack.wait_record("model.approve.refused", actor="paul")
    target.write_bytes(original)
    conda = files / "conda.yaml"
    kept = conda.read_bytes()
    conda.unlink()  # a file removed after signing
    refused = data.call("paul", "POST", "/models/fraud/1/approve", {"reason": "looks fine"})
    assert refused.status_code == 409
    assert "conda.yaml" in refused.json()["message"]
    conda.write_bytes(kept)
    assert data.call("paul", "POST", "/models/fraud/1/approve", {"reason": "ok"}).status_code == 200
    target.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # a byte flipped after approval
    try:
        outcome = alice.run("zm.load('models:/fraud@production', flavor='sklearn')")
        assert outcome.ename == "ModelIntegrityError"
        assert target.name in (outcome.evalue or "")
    finally:
        target.write_bytes(original)
    (files / "extra.py").write_text("import os  # added after approval")
    try:
        outcome = alice.run("zm.load('models:/fraud@production', flavor='sklearn')")
        assert outcome.ename == "ModelIntegrityError"
        assert "extra.py" in (outcome.evalue or "")
    finally:
        (files / "extra.py").unlink()
    # a bundle checked against another key is refused
    other = public_key_pem(ec.generate_private_key(ec.SECP256R1()).public_key())
    alice.ok(
        "import os; saved = os.environ['ZTLAB_TRUSTED_KEYS']\n"
        f"os.environ['ZTLAB_TRUSTED_KEYS'] = {other!r}"
    )
    try:
        outcome = alice.run("zm.load('models:/fraud@production', flavor='sklearn')")
        assert outcome.ename == "SignatureError"
    finally:
        alice.ok("os.environ['ZTLAB_TRUSTED_KEYS'] = saved")


def test_self_approval_is_refused(models_stack: DataStack, tmp_path: Path) -> None:
    data, stack = models_stack, models_stack.stack
    with secure_kernel(tmp_path, kernel_env(data, "tess")) as tess:
        tess.ok(TRAIN.format(name="selfie", extra=""), timeout=240)
        tess.ok("zm.sign('selfie', 1)")
    answer = data.call("tess", "POST", "/models/selfie/1/approve", {"reason": "mine, trust me"})
    assert answer.status_code == 403
    assert "two-person" in answer.json()["message"]
    stack.wait_record("model.approve.refused", actor="tess")
    # the approvals page: the same rule for tess; paul approves with a form
    for user, expected in (("tess", "two-person"), ("paul", "approved selfie version 1")):
        session = stack.session()
        stack.login(session, user)
        page = session.get(f"{stack.hub_url}/hub/ztlab/models", timeout=30)
        assert page.status_code == 200
        assert 'id="model-selfie-1"' in page.text
        decided = session.post(
            f"{stack.hub_url}/hub/ztlab/models/selfie/1",
            data={
                "_xsrf": session.cookies.get("_xsrf") or "",
                "action": "approve",
                "reason": "page review",
            },
            timeout=60,
        )
        assert expected in decided.text, decided.text[-2000:]
    stack.wait_record("model.approve", actor="paul")


def test_unregistered_or_forged_lineage_is_refused(models_stack: DataStack, alice: Kernel) -> None:
    stack = models_stack.stack
    before = stack.audit_size()
    alice.ok(
        TRAIN.format(
            name="leaky", extra="mlflow.log_input(mlflow.data.from_pandas(frame, name='raw'))"
        ),
        timeout=240,
    )
    # registered, but not signed when it was registered: the refusal is audited
    assert models_stack.call("alice", "GET", "/models/leaky/1").json()["signed"] is False
    refusal = stack.wait_record("model.sign.refused", actor="alice", since=before)
    assert "not a registered dataset" in refusal.detail["reason"]
    outcome = alice.run("zm.sign('leaky', 1)")
    assert outcome.status == "error"
    assert "not a registered dataset" in (outcome.evalue or "")
    forged = (
        "from mlflow.data.meta_dataset import MetaDataset\n"
        "    from mlflow.data.sources import LocalArtifactDatasetSource\n"
        "    mlflow.log_input(MetaDataset(LocalArtifactDatasetSource('/x'), name='iris@1', "
        "digest='0'*32), tags={'ztlab.dataset': 'iris@1', 'ztlab.root': '0'*64})"
    )
    alice.ok(TRAIN.format(name="forged", extra=forged), timeout=240)
    outcome = alice.run("zm.sign('forged', 1)")
    assert "registered root" in (outcome.evalue or "")
    stack.wait_record("model.sign.refused", actor="alice")


def test_only_writers_write_and_only_to_their_own_runs(
    models_stack: DataStack, alice: Kernel
) -> None:
    data = models_stack
    created = data.call("vera", "POST", "/mlflow/api/2.0/mlflow/experiments/create", {"name": "v"})
    assert created.status_code == 403
    run_id = alice.ok(
        "import mlflow\nwith mlflow.start_run() as own:\n    pass\nprint(own.info.run_id)"
    ).split()[-1]  # MLflow prints links to the run first
    with_tess = data.call(
        "tess",
        "POST",
        "/mlflow/api/2.0/mlflow/runs/log-metric",
        {"run_id": run_id, "key": "accuracy", "value": 1.0, "timestamp": 0, "step": 0},
    )
    assert with_tess.status_code == 403, with_tess.text
    assert "belongs to alice" in with_tess.json()["message"]
    listed = data.call(
        "vera", "POST", "/mlflow/api/2.0/mlflow/experiments/search", {"max_results": 10}
    )
    assert listed.status_code == 200
    # no token, no MLflow
    bare = requests.get(f"{data.api}/ztlab/mlflow/api/2.0/mlflow/experiments/search", timeout=10)
    assert bare.status_code == 403
    assert os.environ.get("MLFLOW_TRACKING_URI") is None


def test_large_artifacts_stream_through_the_hub(models_stack: DataStack, alice: Kernel) -> None:
    """Over the hub's 100 MB request limit: uploads are streamed, not buffered."""
    out = alice.ok(
        "import os, mlflow, tempfile, hashlib\n"
        "blob = os.path.join(tempfile.mkdtemp(), 'weights.bin')\n"
        "with open(blob, 'wb') as h:\n"
        "    for _ in range(15): h.write(os.urandom(10 * 1024 * 1024))\n"
        "with mlflow.start_run() as big:\n"
        "    mlflow.log_artifact(blob)\n"
        "back = mlflow.artifacts.download_artifacts(run_id=big.info.run_id, "
        "artifact_path='weights.bin')\n"
        "same = open(back, 'rb').read() == open(blob, 'rb').read()\n"
        "print('same', same, os.path.getsize(back))",
        timeout=300,
    )
    assert out.split()[-2:] == ["True", str(150 * 1024 * 1024)]


def test_mlflow_answers_only_the_hub_and_only_for_the_token_holder(
    models_stack: DataStack,
) -> None:
    data, stack = models_stack, models_stack.stack
    port = _mlflow_port(stack.state_dir)
    direct = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5"
    # another process on the machine that connects to MLflow directly: refused
    assert requests.get(direct, timeout=10).status_code == 401
    forged = {"X-Ztlab-User": "alice", "X-Ztlab-Proxy-Key": "guess"}
    assert requests.get(direct, headers=forged, timeout=10).status_code == 401
    # the same forged headers sent through the hub are dropped: vera stays vera
    me = requests.get(
        f"{data.api}/ztlab/mlflow/api/2.0/mlflow/users/current",
        headers={"Authorization": f"token {data.token('vera')}", **forged},
        timeout=30,
    )
    assert me.status_code == 200, me.text
    assert me.json()["user"]["username"] == "vera"
    assert me.json()["user"]["is_admin"] is False
    # MLflow's user administration is the hub's, not MLflow's
    for path, body in [
        ("api/2.0/mlflow/users/create", {"username": "mallory", "password": "x" * 16}),
        ("api/2.0/mlflow/users/update-admin", {"username": "alice", "is_admin": True}),
        ("ajax-api/2.0/mlflow/users/update-admin", {"username": "alice", "is_admin": True}),
        ("api/3.0/mlflow/roles/create", {"name": "r", "workspace": "default"}),
    ]:
        refused = data.call("alice", "POST", f"/mlflow/{path}", body)
        assert refused.status_code == 403, (path, refused.text)
        assert "the hub's" in refused.json()["message"]


def test_experiments_are_the_creators_until_they_grant_more(models_stack: DataStack) -> None:
    data = models_stack
    base = "/mlflow/api/2.0/mlflow"
    created = data.call("alice", "POST", f"{base}/experiments/create", {"name": "alice-only"})
    assert created.status_code == 200, created.text
    experiment = created.json()["experiment_id"]
    # default READ: tess (a trainer) sees alice's experiment but cannot run in it
    seen = data.call("tess", "GET", f"{base}/experiments/get?experiment_id={experiment}")
    assert seen.status_code == 200
    run = {"experiment_id": experiment}
    assert data.call("tess", "POST", f"{base}/runs/create", run).status_code == 403
    # nor give herself (or anyone) more: granting needs MANAGE on the experiment
    grant = "/mlflow/api/3.0/mlflow/users/permissions/grant"
    edit = {
        "username": "tess",
        "resource_type": "experiment",
        "resource_id": experiment,
        "permission": "EDIT",
    }
    assert data.call("tess", "POST", grant, edit).status_code == 403
    assert data.call("vera", "POST", grant, {**edit, "username": "vera"}).status_code == 403
    # a grant to someone who is not a hub user is refused by the hub
    stranger = data.call("alice", "POST", grant, {**edit, "username": "nobody-here"})
    assert stranger.status_code == 404
    # alice (MANAGE as the creator) grants EDIT; now tess may run there
    granted = data.call("alice", "POST", grant, edit)
    assert granted.status_code == 200, granted.text
    ran = data.call("tess", "POST", f"{base}/runs/create", run)
    assert ran.status_code == 200, ran.text
    # the run is tess's: alice's MANAGE on the experiment does not make it hers to write
    logged = data.call(
        "alice",
        "POST",
        f"{base}/runs/log-metric",
        {
            "run_id": ran.json()["run"]["info"]["run_id"],
            "key": "m",
            "value": 1.0,
            "timestamp": 0,
        },
    )
    assert logged.status_code == 403
    assert "belongs to tess" in logged.json()["message"]


def test_no_spelling_of_a_protected_alias_route_reaches_mlflow(
    models_stack: DataStack, alice: Kernel
) -> None:
    data, stack = models_stack, models_stack.stack
    alice.ok(TRAIN.format(name="spelled", extra=""), timeout=240)
    body = {"name": "spelled", "alias": "production", "version": "1"}
    # (dot segments may already be removed by the HTTP client or the proxy in front of
    # the hub; whichever layer sees them, the alias must stay unset)
    for path in [
        "ajax-api/2.0/mlflow/registered-models/alias",
        "api/2.0/mlflow/%2E%2E/mlflow/registered-models/alias",
        "api/2.0/mlflow/registered-models//alias",
        "api/2.0/mlflow/registered-models/alias%2F",
        "ajax-api/2.0/mlflow/./registered-models/alias",
        "graphql",
    ]:
        answer = data.call("alice", "POST", f"/mlflow/{path}", body)
        assert answer.status_code in (403, 404), (path, answer.status_code, answer.text[:300])
    # refused paths are answered after the request body is read (answering first makes
    # tornado close a connection with unread data, which the proxy in front may see as a
    # reset and turn into its own HTML 503): the answer is ours, also for a large body
    large = {**body, "padding": "x" * (8 * 1024 * 1024)}
    for path in ("graphql", "api/2.0/mlflow/users/create"):
        answer = data.call("alice", "POST", f"/mlflow/{path}", large)
        assert answer.status_code in (403, 404), (path, answer.status_code, answer.text[:300])
        assert answer.headers["Content-Type"].startswith("application/json")
    stack.wait_record("model.alias.refused", actor="alice")
    alias = "/mlflow/api/2.0/mlflow/registered-models/alias"
    unset = data.call("alice", "GET", f"{alias}?name=spelled&alias=production")
    assert unset.status_code in (400, 404), unset.text
    assert "alias production not found" in unset.json()["message"]


def _mlflow_port(state_dir: Path) -> int:
    """The MLflow port the stack's hub was configured with."""
    import tomllib

    config = tomllib.loads((state_dir.parent / "ztlab.toml").read_text())
    return int(config["models"]["mlflow_port"])
