"""Model artifacts in S3-compatible object storage: MLflow writes there, the signing service
reads the files straight from the bucket (not through MLflow), and tampering in the bucket
is caught at approval and at load.

The object store is moto's S3 server on 127.0.0.1 (a real HTTP S3 API); the hub and its
MLflow server get test credentials through the environment, as a deployment would.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dataset_fixtures import add_tables
from tests.hub.test_datasets_e2e import DataStack, _user
from tests.hub.test_models_e2e import TRAIN, kernel_env, ready
from tests.hubstack import running_stack
from tests.kernel_session import secure_kernel

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BUCKET = "ztlab-models"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "ztlab-test",
    "AWS_SECRET_ACCESS_KEY": "ztlab-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    boto3 = pytest.importorskip("boto3", reason="make test installs boto3 (the [s3] extra)")
    server_module = pytest.importorskip("moto.server", reason="make test installs moto")
    port = _free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        client.create_bucket(Bucket=BUCKET)
        client.endpoint = f"http://127.0.0.1:{port}"
        yield client
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture(scope="module")
def s3_stack(tmp_path_factory: pytest.TempPathFactory, s3: Any) -> Iterator[DataStack]:
    root = tmp_path_factory.mktemp("s3-stack")
    store = root / "store"
    (store / "iris" / "1").mkdir(parents=True)
    add_tables(store / "iris" / "1", rows=400)
    with running_stack(
        root,
        extra_config=f'\n[datasets]\nstorage_roots = ["{store}"]\n',
        extra_users={
            "sam": _user("sam", ["data-stewards"]),
            "paul": _user("paul", ["model-approvers"]),
        },
        pool="10.224.0.0/16",
        table="ztlab_test_s3",
        models=True,
        models_extra=(
            f'artifacts_destination = "s3://{BUCKET}/mlflow"\ns3_endpoint_url = "{s3.endpoint}"\n'
        ),
    ) as stack:
        yield ready(DataStack(stack, store))


def _objects(s3: Any) -> dict[str, int]:
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="mlflow/").get("Contents", [])
    return {item["Key"]: item["Size"] for item in listed}


def test_signing_reads_the_bucket_and_catches_tampering_there(
    s3_stack: DataStack, s3: Any, tmp_path: Path
) -> None:
    data, stack = s3_stack, s3_stack.stack
    with secure_kernel(tmp_path, kernel_env(data, "alice")) as alice:
        alice.ok(TRAIN.format(name="cloudy", extra=""), timeout=240)
        # the files went to the bucket, not to the hub's disk
        keys = _objects(s3)
        weights = [k for k in keys if "/artifacts/model." in k]
        assert len(weights) == 1, keys
        local = stack.state_dir / "mlflow" / "artifacts"
        assert not local.exists() or not any(p.is_file() for p in local.rglob("*"))
        # signed as it was registered, from the bucket's files
        shown = data.call("alice", "GET", "/models/cloudy/1").json()
        assert shown["signed"] is True, shown
        record = stack.wait_record("model.sign", actor="alice")
        assert record.detail["on_register"] is True
        # a byte flipped in the bucket after signing: the approval is refused
        (key,) = weights
        original = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        s3.put_object(Bucket=BUCKET, Key=key, Body=original[:-1] + bytes([original[-1] ^ 1]))
        refused = data.call("paul", "POST", "/models/cloudy/1/approve", {"reason": "ok"})
        assert refused.status_code == 409, refused.text
        assert key.rsplit("/", 1)[1] in refused.json()["message"]
        stack.wait_record("model.approve.refused", actor="paul")
        s3.put_object(Bucket=BUCKET, Key=key, Body=original)
        approved = data.call("paul", "POST", "/models/cloudy/1/approve", {"reason": "eval ok"})
        assert approved.status_code == 200, approved.text
        out = alice.ok(
            "m = zm.load('models:/cloudy@production', flavor='sklearn')\nprint(type(m).__name__)",
            timeout=120,
        )
        assert out.strip().endswith("LogisticRegression")
        # tampered after approval: the kernel refuses to deserialise it
        s3.put_object(Bucket=BUCKET, Key=key, Body=original[:-1] + bytes([original[-1] ^ 1]))
        outcome = alice.run("zm.load('models:/cloudy@production', flavor='sklearn')")
        assert outcome.ename == "ModelIntegrityError"
        s3.put_object(Bucket=BUCKET, Key=key, Body=original)
    # nothing fetched for signing is left behind
    staging = stack.state_dir / "mlflow" / "staging"
    assert not any(staging.iterdir())
