"""The dataset registry through the real hub: API, command line, and a kernel using it.

One stack (provider, hub, proxy) for the module. ``sam`` is a data steward, ``alice`` a
trainer, ``vera`` a viewer; each gets a hub API token the way a user would (the token API,
with the session cookie and XSRF header).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.dataset_fixtures import add_tables, make_dataset
from tests.hubstack import LoginStack, running_stack
from tests.kernel_session import secure_kernel
from ztlab.common.attest import Envelope, load_public_keys, verify_signed_manifest
from ztlab.common.manifest import fingerprint

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MFA = {"amr": ["pwd", "otp"], "acr": "urn:ztlab:mfa"}


def _user(name: str, groups: list[str]) -> dict[str, object]:
    return {
        "password": f"{name}-password",
        "email": f"{name}@example.org",
        "name": name.capitalize(),
        "groups": groups,
        "disabled": False,
        **MFA,
    }


class DataStack:
    def __init__(self, stack: LoginStack, store: Path) -> None:
        self.stack = stack
        self.store = store
        self.api = f"{stack.hub_url}/hub/api"
        self.tokens: dict[str, str] = {}

    def token(self, user: str, scopes: list[str] | None = None) -> str:
        if scopes is None and user in self.tokens:
            return self.tokens[user]
        session = self.stack.session()
        self.stack.login(session, user)
        session.get(f"{self.stack.hub_url}/hub/token", timeout=10)
        body: dict[str, object] = {"note": "e2e", "expires_in": 3600}
        if scopes is not None:
            body["scopes"] = scopes
        answer = session.post(
            f"{self.api}/users/{user}/tokens",
            json=body,
            headers={"X-XSRFToken": session.cookies.get("_xsrf") or ""},
            timeout=10,
        )
        assert answer.status_code == 201, answer.text
        token = str(answer.json()["token"])
        if scopes is None:
            self.tokens[user] = token
        return token

    def call(
        self, user: str | None, method: str, path: str, body: object = None
    ) -> requests.Response:
        headers = {"Authorization": f"token {self.token(user)}"} if user else {}
        return requests.request(
            method, f"{self.api}/ztlab{path}", json=body, headers=headers, timeout=60
        )


@pytest.fixture(scope="module")
def data_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataStack]:
    root = tmp_path_factory.mktemp("data-stack")
    store = root / "store"
    store.mkdir()
    with running_stack(
        root,
        extra_config=f'\n[datasets]\nstorage_roots = ["{store}"]\n',
        extra_users={"sam": _user("sam", ["data-stewards"]), "vera": _user("vera", ["viewers"])},
        pool="10.221.0.0/16",
        table="ztlab_test_data",
    ) as stack:
        yield DataStack(stack, store)


@pytest.fixture(scope="module")
def mnist(data_stack: DataStack) -> Path:
    """``mnist@1`` registered by the steward."""
    directory = data_stack.store / "mnist" / "1"
    directory.mkdir(parents=True)
    make_dataset(directory, small=40, large=1)
    add_tables(directory)
    answer = data_stack.call("sam", "POST", "/datasets", {"ref": "mnist@1", "path": str(directory)})
    assert answer.status_code == 201, answer.text
    return directory


def test_registration_is_fingerprinted_signed_and_audited(
    data_stack: DataStack, mnist: Path
) -> None:
    stack = data_stack.stack
    record = stack.wait_record("dataset.register", actor="sam")
    assert record.detail["dataset"] == "mnist@1"
    assert record.detail["root"] == fingerprint(mnist).root
    # state and keys are the control plane's alone
    for path in (
        stack.state_dir / "datasets" / "registry.sqlite",
        stack.state_dir / "keys" / "attest-p256.key",
    ):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((stack.state_dir / "datasets").stat().st_mode) == 0o700

    shown = data_stack.call("alice", "GET", "/datasets/mnist@1")
    assert shown.status_code == 200
    pub = stack.state_dir / "keys" / "attest-p256.key.pub"
    signed = verify_signed_manifest(
        Envelope.from_dict(shown.json()["envelope"]),
        load_public_keys([pub]),
        expected_ref="mnist@1",
    )
    assert signed.registered_by == "sam"
    assert signed.manifest.root == fingerprint(mnist).root
    keys = data_stack.call("alice", "GET", "/keys").json()["keys"]
    assert [k["pem"] for k in keys] == [pub.read_text()]
    listed = data_stack.call("alice", "GET", "/datasets").json()["datasets"]
    assert [d["ref"] for d in listed] == ["mnist@1"]
    # reading is an audited policy decision
    decision = stack.wait_record("policy.decision", actor="alice")
    assert decision is not None


def test_refusals(data_stack: DataStack, mnist: Path) -> None:
    again = data_stack.call("sam", "POST", "/datasets", {"ref": "mnist@1", "path": str(mnist)})
    assert again.status_code == 409
    assert "immutable" in again.json()["hint"]
    trainer = data_stack.call("alice", "POST", "/datasets", {"ref": "mnist@2", "path": str(mnist)})
    assert trainer.status_code == 403
    assert "may not register mnist@2" in trainer.json()["message"]
    outside = data_stack.call("sam", "POST", "/datasets", {"ref": "etc@1", "path": "/etc"})
    assert outside.status_code == 400
    assert "outside the dataset storage roots" in outside.json()["message"]
    assert data_stack.call("vera", "GET", "/datasets/mnist@1").status_code == 403
    assert data_stack.call("vera", "GET", "/datasets").json()["datasets"] == []
    assert data_stack.call("alice", "GET", "/datasets/nope@1").status_code == 404
    assert data_stack.call(None, "GET", "/datasets").status_code == 403
    narrow = data_stack.token("alice", scopes=["read:users:name!user"])
    answer = requests.get(
        f"{data_stack.api}/ztlab/datasets",
        headers={"Authorization": f"token {narrow}"},
        timeout=10,
    )
    assert answer.status_code == 403
    assert "custom:ztlab:data" in answer.json()["message"]
    bad = data_stack.call("alice", "POST", "/datasets/mnist@1/reports", {"nonsense": "x"})
    assert bad.status_code == 400


def test_command_line_register_list_show(
    data_stack: DataStack, mnist: Path, tmp_path: Path
) -> None:
    directory = data_stack.store / "iris" / "2"
    directory.mkdir(parents=True)
    add_tables(directory, rows=100)
    ztlab = Path(sys.executable).with_name("ztlab")
    tokens = {}
    for user in ("sam", "alice"):
        tokens[user] = tmp_path / f"{user}.token"
        tokens[user].write_text(data_stack.token(user))
    common = ["--hub-url", data_stack.api]

    def run(user: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(ztlab), "data", *args, *common, "--token-file", str(tokens[user])],
            capture_output=True,
            text=True,
            timeout=120,
            env={k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")},
        )

    done = run("sam", "register", "iris@2", str(directory))
    assert done.returncode == 0, done.stderr
    assert "registered iris@2" in done.stdout
    listed = run("alice", "list")
    assert "iris@2" in listed.stdout
    assert "mnist@1" in listed.stdout
    envelope = tmp_path / "iris.dsse.json"
    shown = run("alice", "show", "iris@2", "--out", str(envelope))
    assert shown.returncode == 0, shown.stderr
    assert "signature  OK" in shown.stdout
    pub = data_stack.stack.state_dir / "keys" / "attest-p256.key.pub"
    verified = subprocess.run(
        [
            str(ztlab),
            "data",
            "verify",
            str(directory),
            "--signed",
            str(envelope),
            "--public-key",
            str(pub),
            "--ref",
            "iris@2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    denied = run("alice", "register", "iris@3", str(directory))
    assert denied.returncode == 2
    assert "may not register" in denied.stderr


def test_kernel_reads_through_the_hub_and_reports_tampering(
    data_stack: DataStack, mnist: Path, tmp_path: Path
) -> None:
    stack = data_stack.stack
    env = {
        "JUPYTERHUB_API_URL": data_stack.api,
        "JUPYTERHUB_API_TOKEN": data_stack.token("alice"),
        "ZTLAB_TRUSTED_KEYS": (stack.state_dir / "keys" / "attest-p256.key.pub").read_text(),
        "ZTLAB_LOCAL_REGISTRY": "",
    }
    with secure_kernel(tmp_path, env) as kernel:
        out = kernel.ok(
            "import ztlab.datasets as zd\n"
            "ds = zd.open('mnist@1')\n"
            "print(ds.read_parquet('tables/train.parquet').shape)"
        )
        assert "(5000, 4)" in out
        since = stack.audit_size()
        table = mnist / "tables" / "labels.csv"
        original = table.read_bytes()
        try:
            table.write_bytes(original.replace(b"k1", b"k2", 1))
            outcome = kernel.run("ds.read_csv('tables/labels.csv')")
            assert outcome.ename == "DatasetIntegrityError"
            record = stack.wait_record("dataset.verify.failed", actor="alice", since=since)
            assert record.detail["dataset"] == "mnist@1"
            assert record.detail["file"] == "tables/labels.csv"
            assert record.detail["reported_by"] == "kernel"
            assert record.detail["expected"] != record.detail["actual"]
        finally:
            table.write_bytes(original)
        # a plain open() of a dataset file is flagged in the kernel and in the audit log
        outcome = kernel.run(f"open({str(mnist / 'empty.txt')!r}).close()")
        assert "UnverifiedReadWarning" in outcome.stderr
        flagged = stack.wait_record("dataset.read.unverified", actor="alice", since=since)
        assert flagged.detail["file"].endswith("empty.txt")
        # a manifest signed by another key is refused even when the hub serves it
        kernel.ok(
            "from cryptography.hazmat.primitives.asymmetric import ec\n"
            "from ztlab.common.attest import public_key_pem\n"
            "import os\n"
            "os.environ['ZTLAB_TRUSTED_KEYS'] = public_key_pem("
            "ec.generate_private_key(ec.SECP256R1()).public_key())"
        )
        refused = kernel.run("zd.open('mnist@1')")
        assert refused.ename == "DatasetIntegrityError"
    assert json.loads(json.dumps(record.detail))  # JSON-clean
