"""``ztlab run`` and ``ztlab schedule``: what works without a hub, and the client side.

Offline: ``ztlab run verify`` on a freshly signed envelope, and every way it must fail (a
flipped notebook byte, a changed parameter or dataset digest, another key, a changed
executed notebook); ``-p`` values; schedules refused before any network call. The client
side of a run (waiting, the summary, the exit status; byte-exact downloads) runs against a
fake hub API and a small local HTTP server.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec

from ztlab.cli import run as run_cli
from ztlab.cli.main import cli
from ztlab.cli.run import parameter_value, parse_dataset_option, parse_parameters
from ztlab.common.attest.provenance import (
    Resource,
    RunProvenance,
    notebook_digest,
    sign_run_provenance,
)
from ztlab.common.attest.statement import Subject
from ztlab.common.errors import UsageError
from ztlab.common.keys import key_id, public_key_pem

KEY = ec.generate_private_key(ec.SECP256R1())
ATTACKER = ec.generate_private_key(ec.SECP256R1())
NOTEBOOK = json.dumps(
    {"cells": [{"cell_type": "code", "source": "epochs = 3", "metadata": {}, "outputs": []}],
     "metadata": {}, "nbformat": 4, "nbformat_minor": 5},
    indent=1,
).encode()  # fmt: skip
EXECUTED = NOTEBOOK.replace(b'"outputs": []', b'"outputs": [{"output_type": "stream"}]')
MNIST_ROOT = "a" * 64
MODEL_DIGEST = "b" * 64


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def signed(tmp_path: Path) -> dict[str, Path]:
    """An envelope signed as the control plane signs a run's, its key, and what it names."""
    provenance = RunProvenance(
        run_id="3f2a9c0d1e4b",
        owner="alice",
        notebook=Resource("train.ipynb", notebook_digest(NOTEBOOK)),
        parameters={"epochs": 3, "lr": 0.01, "tags": ["a", "b"]},
        builder_id="https://hub.example.org/hub/ztlab/runs",
        builder_version="0.6.0",
        started_on="2026-12-06T14:00:00Z",
        finished_on="2026-12-06T14:05:30Z",
        datasets=(Resource("dataset:mnist@3", {"blake3": MNIST_ROOT}),),
        environment=Resource("environment:base", {"sha256": "c" * 64}),
        git_commit="0123456789abcdef0123456789abcdef01234567",
        schedule="nightly",
        pool="research",
        gpus=1,
        byproducts=(Resource("executed.ipynb", {"sha256": hashlib.sha256(EXECUTED).hexdigest()}),),
    )
    subjects = [
        Subject("executed.ipynb", {"sha256": hashlib.sha256(EXECUTED).hexdigest()}),
        Subject("models:/churn/7", {"sha256": MODEL_DIGEST}),
    ]
    paths = {
        "envelope": tmp_path / "p.json",
        "key": tmp_path / "k.pem",
        "attacker": tmp_path / "other.pem",
        "notebook": tmp_path / "train.ipynb",
        "executed": tmp_path / "executed.ipynb",
    }
    paths["envelope"].write_text(sign_run_provenance(provenance, subjects, KEY).to_json())
    paths["key"].write_text(public_key_pem(KEY.public_key()))
    paths["attacker"].write_text(public_key_pem(ATTACKER.public_key()))
    paths["notebook"].write_bytes(NOTEBOOK)
    paths["executed"].write_bytes(EXECUTED)
    return paths


def _verify(signed: dict[str, Path], *extra: str) -> tuple[int, str, str]:
    return invoke("run", "verify", str(signed["envelope"]), "--key", str(signed["key"]), *extra)


FULL = ("-p", "epochs", "3", "-p", "lr", "0.01", "-p", "tags", '["a", "b"]')


def test_verify_a_fresh_envelope_with_everything_checked(signed: dict[str, Path]) -> None:
    code, stdout, stderr = _verify(
        signed,
        "--notebook", str(signed["notebook"]),
        "--executed", str(signed["executed"]),
        *FULL,
        "--dataset", f"mnist@3=blake3:{MNIST_ROOT}",
    )  # fmt: skip
    assert code == 0, stderr
    first = stdout.splitlines()[0]
    assert first == (
        f"verified: run 3f2a9c0d1e4b of alice, notebook train.ipynb "
        f"sha256:{hashlib.sha256(NOTEBOOK).hexdigest()}, signed by {key_id(KEY.public_key())}"
    )
    assert '{"epochs": 3, "lr": 0.01, "tags": ["a", "b"]} (checked)' in stdout
    assert f"mnist@3 blake3:{MNIST_ROOT} (checked)" in stdout
    assert f"models:/churn/7 sha256:{MODEL_DIGEST}" in stdout
    assert "0123456789abcdef0123456789abcdef01234567" in stdout


def test_verify_without_checks_and_as_json(signed: dict[str, Path]) -> None:
    code, stdout, _ = _verify(signed, "--json")
    assert code == 0
    answer = json.loads(stdout)
    assert answer["verified"] is True
    assert answer["checked"] == []
    assert answer["run"] == "3f2a9c0d1e4b"
    assert answer["keyid"] == key_id(KEY.public_key())
    assert answer["datasets"] == {"dataset:mnist@3": {"blake3": MNIST_ROOT}}
    assert set(answer["subjects"]) == {"executed.ipynb", "models:/churn/7"}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("-p", "epochs", "4", "-p", "lr", "0.01", "-p", "tags", '["a", "b"]'), "parameters"),
        (("-p", "epochs", "3", "-p", "lr", "0.01"), "parameters"),  # one left out
        (("-p", "epochs", '"3"', "-p", "lr", "0.01", "-p", "tags", '["a","b"]'), "parameters"),
        (("--dataset", f"mnist@3=blake3:{'e' * 64}"), "datasets of run"),
        (("--dataset", f"mnist@4=blake3:{MNIST_ROOT}"), "datasets of run"),
    ],
)
def test_verify_fails_on_a_changed_parameter_or_dataset(
    signed: dict[str, Path], arguments: tuple[str, ...], message: str
) -> None:
    code, stdout, stderr = _verify(signed, *arguments)
    assert code == 1
    assert stdout == ""
    assert stderr.startswith(f"FAIL: {signed['envelope']}: ")
    assert message in stderr


def test_verify_fails_on_a_flipped_notebook_byte(signed: dict[str, Path]) -> None:
    data = bytearray(NOTEBOOK)
    data[data.index(b"3")] ^= 0x01  # epochs = 2
    signed["notebook"].write_bytes(bytes(data))
    code, _, stderr = _verify(signed, "--notebook", str(signed["notebook"]))
    assert code == 1
    assert "not the one run 3f2a9c0d1e4b executed" in stderr


def test_verify_fails_on_another_executed_notebook(signed: dict[str, Path]) -> None:
    signed["executed"].write_bytes(EXECUTED + b"\n")
    code, _, stderr = _verify(signed, "--executed", str(signed["executed"]))
    assert code == 1
    assert "is not the executed notebook of run 3f2a9c0d1e4b" in stderr


def test_verify_fails_with_another_key(signed: dict[str, Path]) -> None:
    code, stdout, stderr = invoke(
        "run", "verify", str(signed["envelope"]), "--key", str(signed["attacker"])
    )
    assert code == 1
    assert "verified" not in stdout
    assert stderr.startswith("FAIL: ")


def test_verify_fails_on_a_flipped_envelope_byte(signed: dict[str, Path]) -> None:
    envelope = json.loads(signed["envelope"].read_text())
    payload = bytearray(base64.b64decode(envelope["payload"]))
    payload[payload.index(b'"epochs":3') + len('"epochs":')] = ord("9")
    envelope["payload"] = base64.b64encode(bytes(payload)).decode()
    signed["envelope"].write_text(json.dumps(envelope))
    code, _, stderr = _verify(signed)
    assert code == 1
    assert stderr.startswith("FAIL: ")


def test_verify_bad_input_exits_2(signed: dict[str, Path], tmp_path: Path) -> None:
    code, _, stderr = _verify(signed, "--dataset", "mnist@3")
    assert code == 2
    assert "NAME@VERSION=ALGORITHM:HEX" in stderr
    code, _, stderr = invoke(
        "run", "verify", str(signed["envelope"]), "--key", str(tmp_path / "missing.pem")
    )
    assert code == 2
    assert "missing.pem" in stderr


# -- parameters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3", 3),
        ("0.01", 0.01),
        ("-2", -2),
        ("true", True),
        ("false", False),
        ("null", None),
        ("[1, 2]", [1, 2]),
        ('{"a": 1}', {"a": 1}),
        ('"3"', "3"),
        ("alice", "alice"),
        ("True", "True"),
        ("NaN", "NaN"),
        ("Infinity", "Infinity"),
        ("2026-12-06", "2026-12-06"),
        ("", ""),
        ("[1, 2", "[1, 2"),
    ],
)
def test_parameter_values_are_json_when_they_are_json(text: str, value: Any) -> None:
    assert parameter_value(text) == value
    assert type(parameter_value(text)) is type(value)


def test_parameters_are_checked_as_the_hub_checks_them() -> None:
    assert parse_parameters([("epochs", "3"), ("name", "alice")]) == {
        "epochs": 3,
        "name": "alice",
    }
    with pytest.raises(UsageError, match="given twice"):
        parse_parameters([("epochs", "3"), ("epochs", "4")])
    with pytest.raises(UsageError, match="not a parameter name"):
        parse_parameters([("bad-name", "1")])


def test_dataset_options() -> None:
    assert parse_dataset_option(f"mnist@3=blake3:{MNIST_ROOT}") == (
        "dataset:mnist@3",
        {"blake3": MNIST_ROOT},
    )
    for bad in ("mnist=blake3:" + MNIST_ROOT, "mnist@3=" + MNIST_ROOT, "mnist@3=blake3:xyz"):
        with pytest.raises(UsageError):
            parse_dataset_option(bad)


# -- schedules are checked before anything is sent ---------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def nowhere() -> dict[str, str]:
    """A hub URL nothing listens on, and a token (so only the network could fail)."""
    return {"ZTLAB_TOKEN": "t0ken", "JUPYTERHUB_API_URL": ""}


def _add(notebook: Path, *options: str, env: dict[str, str]) -> tuple[int, str, str]:
    url = f"http://127.0.0.1:{_closed_port()}/hub/api"
    return invoke("schedule", "add", "nightly", str(notebook), *options, "--hub-url", url, env=env)


def test_schedule_add_refuses_a_bad_cron_before_the_network(
    signed: dict[str, Path], nowhere: dict[str, str]
) -> None:
    code, _, stderr = _add(signed["notebook"], "--cron", "0 25 * * *", env=nowhere)
    assert code == 2
    assert "schedule.cron: '0 25 * * *' is not a valid cron expression" in stderr
    assert "reach" not in stderr
    code, _, stderr = _add(signed["notebook"], "--cron", "0 2 * *", env=nowhere)
    assert code == 2
    assert "is not a five-field cron expression" in stderr


def test_schedule_add_refuses_an_unknown_time_zone_before_the_network(
    signed: dict[str, Path], nowhere: dict[str, str]
) -> None:
    code, _, stderr = _add(
        signed["notebook"], "--cron", "0 2 * * *", "--timezone", "Mars/Olympus", env=nowhere
    )
    assert code == 2
    assert "'Mars/Olympus' is not a time zone" in stderr
    assert "reach" not in stderr


def test_schedule_add_refuses_a_bad_name_or_notebook_before_the_network(
    signed: dict[str, Path], nowhere: dict[str, str], tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/hub/api"
    code, _, stderr = invoke(
        "schedule", "add", "Nightly!", str(signed["notebook"]), "--cron", "0 2 * * *",
        "--hub-url", url, env=nowhere,
    )  # fmt: skip
    assert code == 2
    assert "is not a schedule name" in stderr
    not_a_notebook = tmp_path / "notes.txt"
    not_a_notebook.write_text("hello")
    code, _, stderr = _add(not_a_notebook, "--cron", "0 2 * * *", env=nowhere)
    assert code == 2
    assert "not a notebook" in stderr


def test_a_valid_schedule_does_go_to_the_hub(
    signed: dict[str, Path], nowhere: dict[str, str]
) -> None:
    """The control: the same call with a good cron expression tries the network."""
    code, _, stderr = _add(
        signed["notebook"], "--cron", "0 2 * * *", "--timezone", "Europe/Berlin", env=nowhere
    )
    assert code == 1
    assert "cannot reach the hub's API" in stderr


# -- the client side of a run, against a fake API ----------------------------------------------


class FakeAPI:
    """Answers the calls ``ztlab run`` makes; the run's statuses come from ``states``."""

    api_url = "http://hub.invalid/hub/api"

    def __init__(self, states: list[dict[str, Any]]) -> None:
        self.states = states
        self.calls: list[tuple[str, str, Any]] = []

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        self.calls.append((method, path, body))
        if method == "POST" and path == "/ztlab/runs":
            return self.states[0]
        if method == "GET" and path.startswith("/ztlab/runs/"):
            return self.states.pop(0) if len(self.states) > 1 else self.states[0]
        if method == "GET" and path == "/ztlab/schedules":
            return {"schedules": [{"owner": "alice", "name": "nightly"}]}
        if method == "POST" and path.endswith("/pause"):
            return {}
        raise AssertionError(f"unexpected call {method} {path}")


def _run(status: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": "3f2a9c0d1e4b",
        "owner": "alice",
        "status": status,
        "notebook": {"name": "train.ipynb", "sha256": hashlib.sha256(NOTEBOOK).hexdigest()},
        "message": "",
        "duration_seconds": None,
        "failed_cell": None,
        "traceback": "",
        "models": [],
        "datasets": [],
        "executed_sha256": None,
        "provenance_sha256": None,
        **fields,
    }


Install = Callable[[list[dict[str, Any]]], FakeAPI]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Install:
    """Makes the commands talk to a :class:`FakeAPI` (and not sleep between polls)."""
    monkeypatch.setattr(run_cli, "_sleep", lambda seconds: None)

    def install(states: list[dict[str, Any]]) -> FakeAPI:
        api = FakeAPI(states)
        monkeypatch.setattr(run_cli, "hub_client", lambda *args: api)
        monkeypatch.setattr("ztlab.cli.schedule.hub_client", lambda *args: api)
        return api

    return install


def test_a_run_that_fails_prints_its_cell_and_exits_1(
    fake: Install, signed: dict[str, Path]
) -> None:
    api = fake(
        [
            _run("queued"),
            _run("starting"),
            _run("running"),
            _run("running"),
            _run(
                "failed",
                message="cell 2 raised ValueError: bad lr",
                failed_cell=2,
                traceback="Traceback (most recent call last):\nValueError: bad lr",
                duration_seconds=4.25,
            ),
        ]
    )
    code, stdout, stderr = invoke(
        "run", str(signed["notebook"]), "-p", "epochs", "3", "-p", "lr", "oops", "--gpus", "1",
        "--git-commit", "0123456789ABCDEF0123456789abcdef01234567",
    )  # fmt: skip
    assert code == 1
    method, path, body = api.calls[0]
    assert (method, path) == ("POST", "/ztlab/runs")
    assert base64.b64decode(body["notebook"]["content"]) == NOTEBOOK
    assert body["notebook"]["name"] == "train.ipynb"
    assert body["parameters"] == {"epochs": 3, "lr": "oops"}
    assert body["gpus"] == 1
    assert body["git_commit"] == "0123456789abcdef0123456789abcdef01234567"
    changes = [line.split("] ", 1)[1] for line in stderr.splitlines()]
    assert changes == [
        "run 3f2a9c0d1e4b queued",
        "run 3f2a9c0d1e4b starting",
        "run 3f2a9c0d1e4b running",
        "run 3f2a9c0d1e4b failed: cell 2 raised ValueError: bad lr",
    ]
    assert stdout.startswith("run 3f2a9c0d1e4b failed after 4.2 s: cell 2 raised ValueError")
    assert "failed cell 2" in stdout
    assert "    ValueError: bad lr" in stdout


def test_a_run_that_succeeds_prints_its_summary(fake: Install, signed: dict[str, Path]) -> None:
    fake(
        [
            _run("queued"),
            _run(
                "succeeded",
                duration_seconds=12.0,
                models=["churn@7"],
                executed_sha256="d" * 64,
                provenance_sha256="e" * 64,
            ),
        ]
    )
    code, stdout, _ = invoke("run", str(signed["notebook"]))
    assert code == 0
    assert stdout.startswith("run 3f2a9c0d1e4b succeeded in 12.0 s")
    assert "models      churn@7" in stdout
    assert f"provenance  sha256:{'e' * 64}" in stdout
    api = fake([_run("queued")])
    code, stdout, _ = invoke("run", str(signed["notebook"]), "--no-wait", "--json")
    assert [call[:2] for call in api.calls] == [("POST", "/ztlab/runs")]
    assert code == 0
    assert json.loads(stdout)["status"] == "queued"


def test_run_refuses_bad_input_before_the_hub(
    fake: Install, signed: dict[str, Path], tmp_path: Path
) -> None:
    api = fake([_run("queued")])
    code, _, stderr = invoke("run", str(tmp_path / "nope.ipynb"))
    assert code == 2
    assert "no such notebook" in stderr
    code, _, stderr = invoke("run", str(signed["notebook"]), "--git-commit", "main")
    assert code == 2
    assert "not a full commit hash" in stderr
    code, _, stderr = invoke("run", "show", "../../etc")
    assert code == 2
    assert "not a run id" in stderr
    assert api.calls == []


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(folder), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_the_git_commit_is_head_only_for_a_clean_tracked_notebook(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "a@example.org")
    _git(repo, "config", "user.name", "A")
    notebook = repo / "train.ipynb"
    notebook.write_bytes(NOTEBOOK)
    assert run_cli.git_commit_of(notebook) is None  # untracked
    _git(repo, "add", "train.ipynb")
    _git(repo, "commit", "-q", "-m", "x")
    assert run_cli.git_commit_of(notebook) == _git(repo, "rev-parse", "HEAD")
    notebook.write_bytes(NOTEBOOK + b"\n")
    assert run_cli.git_commit_of(notebook) is None  # changed
    notebook.write_bytes(NOTEBOOK)
    ignored = repo / "scratch.ipynb"
    (repo / ".git" / "info" / "exclude").write_text("scratch.ipynb\n")
    ignored.write_bytes(NOTEBOOK)
    assert run_cli.git_commit_of(ignored) is None  # ignored: porcelain would say nothing
    outside = tmp_path / "alone.ipynb"
    outside.write_bytes(NOTEBOOK)
    assert run_cli.git_commit_of(outside) is None


def test_a_bare_schedule_name_is_looked_up_among_yours(fake: Install) -> None:
    api = fake([_run("queued")])
    code, stdout, _ = invoke("schedule", "pause", "nightly")
    assert code == 0
    assert stdout == "schedule alice/nightly paused\n"
    assert api.calls[-1][:2] == ("POST", "/ztlab/schedules/alice/nightly/pause")
    code, _, stderr = invoke("schedule", "pause", "weekly")
    assert code == 2
    assert "you have no schedule 'weekly'" in stderr


# -- downloads are byte for byte ------------------------------------------------------------------


@pytest.fixture
def hub(signed: dict[str, Path]) -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server answering like the hub's run files and trust key."""
    envelope = signed["envelope"].read_bytes()
    public = KEY.public_key()
    trust = json.dumps({"keyid": key_id(public), "public_key": public_key_pem(public)}).encode()
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(f"{self.path} {self.headers.get('Authorization')}")
            answers = {
                "/hub/api/ztlab/runs/3f2a9c0d1e4b/notebook": EXECUTED,
                "/hub/api/ztlab/runs/3f2a9c0d1e4b/provenance": envelope,
                "/hub/api/ztlab/provenance/trust": trust,
            }
            data = answers.get(self.path)
            if data is None:
                data = json.dumps({"status": 404, "message": "there is no run"}).encode()
                self.send_response(404)
            else:
                self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hub/api", seen
    server.shutdown()
    server.server_close()


def test_downloads_are_byte_exact_and_verify(
    hub: tuple[str, list[str]], signed: dict[str, Path], tmp_path: Path
) -> None:
    url, seen = hub
    env = {"ZTLAB_TOKEN": "t0ken", "JUPYTERHUB_API_URL": ""}
    out, key = tmp_path / "got.json", tmp_path / "got.pem"
    code, _, stderr = invoke(
        "run", "provenance", "3f2a9c0d1e4b", "-o", str(out), "--key-out", str(key),
        "--hub-url", url, env=env,
    )  # fmt: skip
    assert code == 0, stderr
    assert out.read_bytes() == signed["envelope"].read_bytes()
    assert f"sha256:{hashlib.sha256(out.read_bytes()).hexdigest()}" in stderr
    executed = tmp_path / "got.ipynb"
    code, _, stderr = invoke(
        "run", "notebook", "3f2a9c0d1e4b", "-o", str(executed), "--hub-url", url, env=env
    )
    assert code == 0, stderr
    assert executed.read_bytes() == EXECUTED
    assert all(line.endswith(" token t0ken") for line in seen)
    code, stdout, _ = invoke(
        "run", "verify", str(out), "--key", str(key), "--executed", str(executed)
    )
    assert code == 0
    assert stdout.startswith("verified: run 3f2a9c0d1e4b of alice")
    code, _, stderr = invoke("run", "notebook", "aaaaaaaaaaaa", "--hub-url", url, env=env)
    assert code == 2
    assert "there is no run" in stderr
