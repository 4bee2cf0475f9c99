"""Runs and their provenance where people look: the runs pages, the approvals page and API
rule, and ``ztlab model status``.

A real :class:`~ztlab.hub.runs.service.RunService` (its database, its signing key) runs
notebooks through a launcher that pretends to execute them; the pages are the real
handlers and templates (JupyterHub's ``page.html`` stubbed), rendered with autoescape as
the hub does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jinja2
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec
from tornado import web
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

import ztlab.hub.pages as pages_package
from ztlab.cli import model as model_cli
from ztlab.common.config import parse_config
from ztlab.hub.models.provenance import approval_refusal, check_approvable
from ztlab.hub.models.service import ModelServiceError, Signature
from ztlab.hub.pages.approvals import ModelsPage, provenance_row
from ztlab.hub.pages.runs import RunsPage, provenance_view
from ztlab.hub.policy import PolicyEngine, Principal
from ztlab.hub.runs import RunRecord, RunService

TEMPLATES = Path(pages_package.__file__).parent / "templates"
EVIL = "<script>alert(1)</script>"
DATASET_ROOT = "ab" * 32


def _notebook(*outputs: list[dict[str, Any]]) -> bytes:
    cells = [
        {"cell_type": "code", "source": "x = 1", "metadata": {}, "outputs": list(o)}
        for o in outputs
    ]
    return json.dumps({"cells": cells, "metadata": {}, "nbformat": 4}).encode()


FAILED_NOTEBOOK = _notebook(
    [],
    [
        {
            "output_type": "error",
            "ename": "ValueError",
            "evalue": EVIL,
            "traceback": ["\x1b[0;31mValueError\x1b[0m: " + EVIL],
        }
    ],
)


class Records:
    """The audit records the services and handlers wrote."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, actor: str, action: str, **detail: Any) -> None:
        self.items.append((actor, action, detail))

    def record(self, *, actor: str, action: str, detail: Any) -> None:
        self.items.append((actor, action, dict(detail)))

    def actions(self, action: str) -> list[dict[str, Any]]:
        return [detail for _, name, detail in self.items if name == action]


@dataclass
class Handle:
    """A run that "ran": exit status and executed notebook chosen by the test."""

    status: int
    notebook: bytes
    cgroup: str = "ztl-test-run"
    environment: tuple[str, str] | None = ("base", "sha256:" + "cd" * 32)

    def wait(self, timeout: float | None) -> int | None:
        return self.status

    def kill(self) -> None:
        pass

    def executed(self, limit: int) -> bytes | None:
        return self.notebook

    def said(self) -> str:
        return ""

    def memory_exceeded(self) -> int | None:
        return None


@dataclass
class Launcher:
    """Starts nothing; the next run "executes" as :attr:`outcome` says and, like a
    notebook logging to MLflow through the hub, creates MLflow run ``mlflow-<ID>``."""

    service: RunService
    outcome: tuple[int, bytes] = (0, _notebook([]))

    def start(
        self, run: RunRecord, principal: Any, lease: Any, notebook: bytes, *, seconds: float
    ) -> Handle:
        self.service.attach_mlflow_run(run.id, f"mlflow-{run.id}")
        return Handle(*self.outcome)

    def end(self, run: RunRecord) -> None:
        pass


@dataclass
class Models:
    """The model service as the run service and the approvals use it: every MLflow run
    registered ``churn`` at the next version, trained on one dataset."""

    signatures: dict[tuple[str, str], Signature] = field(default_factory=dict)
    approved: list[tuple[str, str]] = field(default_factory=list)
    protected_aliases: tuple[str, ...] = ("champion",)

    def lineage_of_run(self, mlflow_run: str, owner: str) -> list[dict[str, str]]:
        return [{"dataset": "mnist@3", "algorithm": "blake3", "root": DATASET_ROOT}]

    def versions_of_run(self, mlflow_run: str) -> list[tuple[str, str]]:
        for (name, version), signature in self.signatures.items():
            if signature.run_id == mlflow_run:
                return [(name, version)]
        version = str(len(self.signatures) + 1)
        self.signatures[("churn", version)] = Signature(
            "churn", version, "alice", mlflow_run, "{}", "ef" * 32, 0.0
        )
        return [("churn", version)]

    def signature(self, name: str, version: str) -> Signature | None:
        return self.signatures.get((name, version))

    def signed_versions(self) -> list[Signature]:
        return list(self.signatures.values())

    def history(self, name: str, version: str) -> list[dict[str, Any]]:
        return []

    def approve(self, principal: Any, name: str, version: str, reason: str, alias: str) -> None:
        self.approved.append((name, version))

    def store_run_file(self, *args: Any) -> None:
        pass

    def tag_run(self, *args: Any) -> None:
        pass

    def end_run(self, *args: Any) -> None:
        pass

    def withdraw(self, *args: Any, **kwargs: Any) -> None:
        pass


ALICE = Principal(name="alice", roles=frozenset({"trainer"}))
BOB = Principal(name="bob", roles=frozenset({"trainer"}))
ADMIN = Principal(name="root", roles=frozenset({"admin"}))


@dataclass
class World:
    runs: RunService
    launcher: Launcher
    models: Models
    records: Records

    def run(
        self, principal: Principal = ALICE, *, name: str = "train.ipynb", **kw: Any
    ) -> RunRecord:
        """Submit a run and let it finish."""
        run = self.runs.submit(
            principal,
            notebook_name=name,
            notebook=_notebook([]),
            parameters=kw.pop("parameters", {"epochs": 3}),
            **kw,
        )
        assert self.runs.tick() == [run.id]
        done = self.runs.wait(run.id, timeout=30)
        assert done is not None
        return done


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    config = parse_config({"state_dir": str(tmp_path / "state"), "runs": {"enabled": True}})
    records = Records()
    models = Models()
    service = RunService(
        config,
        policy=PolicyEngine.defaults(audit=records),
        record=records,
        key=ec.generate_private_key(ec.SECP256R1()),
        models=models,
    )
    launcher = Launcher(service)
    service.launcher = launcher
    service.vouch = lambda owner: Principal(
        name=owner, roles=frozenset({"admin"} if owner == "root" else {"trainer"})
    )
    try:
        yield World(service, launcher, models, records)
    finally:
        service.close()


# -- pages, rendered as the hub renders them -------------------------------------------------


class _Connection:
    context: Any = None

    def set_close_callback(self, callback: Any) -> None:
        pass


class _User:
    def __init__(self, principal: Principal) -> None:
        self.name = principal.name
        self._roles = sorted(principal.roles)

    async def get_auth_state(self) -> dict[str, Any]:
        return {"ztlab": {"roles": self._roles}}


_ENV = jinja2.Environment(
    loader=jinja2.ChoiceLoader(
        [
            jinja2.DictLoader({"page.html": "<html>{% block main %}{% endblock %}</html>"}),
            jinja2.FileSystemLoader(str(TEMPLATES)),
        ]
    ),
    autoescape=True,
    enable_async=True,
)


def _page(cls: type[Any], plane: Any, principal: Principal, uri: str) -> Any:
    """A page handler of ``cls`` for ``uri``, signed in as ``principal``, its HTML kept."""

    class Page(cls):  # type: ignore[misc, valid-type]
        html = ""
        status = 200

        def set_default_headers(self) -> None:
            pass  # JupyterHub's need the hub's settings

        @property
        def plane(self) -> Any:
            return plane

        async def render_template(self, name: str, **ns: Any) -> str:
            return await _ENV.get_template(name).render_async(base_url="/hub/", **ns)

        @property
        def xsrf_token(self) -> bytes:
            return b"token"

        def finish(self, chunk: Any = None) -> Any:
            type(self).html = chunk or ""

        def set_status(self, status: int, reason: str | None = None) -> None:
            self.status = status

    request = HTTPServerRequest(
        start_line=RequestStartLine("GET", uri, "HTTP/1.1"),
        headers=HTTPHeaders({"Host": "127.0.0.1"}),
        connection=_Connection(),
    )
    handler = Page(web.Application(), request)
    handler._jupyterhub_user = _User(principal)
    return handler


def _plane(world: World | None, models: Any = None) -> Any:
    records = world.records if world else Records()

    async def flush() -> None:
        pass

    return SimpleNamespace(
        runs=world.runs if world else None,
        models=models if models is not None else (world.models if world else None),
        record=records,
        flush=flush,
    )


def _get(world: World | None, principal: Principal, uri: str, *args: str) -> str:
    handler = _page(RunsPage, _plane(world), principal, uri)
    asyncio.run(handler.get(*args))
    return str(handler.html)


def test_the_list_shows_the_users_runs_and_schedules_and_marks_failures(world: World) -> None:
    ok = world.run(ALICE)
    world.launcher.outcome = (1, FAILED_NOTEBOOK)
    failed = world.run(ALICE, name="evil-<b>.ipynb")
    theirs = world.run(BOB)
    html = _get(world, ALICE, "/hub/ztlab/runs")
    assert f'href="/hub/ztlab/runs/{ok.id}"' in html
    assert f'id="run-{failed.id}" class="table-danger"' in html
    assert '<span class="badge text-bg-danger run-status">failed</span>' in html
    assert theirs.id not in html  # bob's run is not alice's to see
    assert "<b>" not in html
    assert "evil-&lt;b&gt;.ipynb" in html
    # newest first
    assert html.index(failed.id) < html.index(ok.id)


def test_admins_see_everyones_runs_only_when_they_ask(world: World) -> None:
    mine = world.run(ADMIN)
    alices = world.run(ALICE)
    assert alices.id not in _get(world, ADMIN, "/hub/ztlab/runs")
    both = _get(world, ADMIN, "/hub/ztlab/runs?all=1")
    assert mine.id in both
    assert alices.id in both
    # ?all=1 means nothing for a user who is not an admin
    assert mine.id not in _get(world, ALICE, "/hub/ztlab/runs?all=1")


def test_a_run_that_succeeded_shows_its_verified_provenance(world: World) -> None:
    run = world.run(ALICE, parameters={"epochs": 3, "note": EVIL})
    assert run.status == "succeeded", run.message
    html = _get(world, ALICE, f"/hub/ztlab/runs/{run.id}", run.id)
    assert 'id="run-provenance-check" class="alert alert-success"' in html
    assert f"sha256:{run.notebook_sha256}" in html
    assert "mnist@3" in html
    assert f"blake3:{DATASET_ROOT}" in html
    assert "models:/churn/1" in html
    assert "environment" in html
    assert "base" in html
    assert f"/hub/api/ztlab/runs/{run.id}/provenance" in html
    assert f"/hub/api/ztlab/runs/{run.id}/notebook" in html
    assert EVIL not in html  # the parameter is shown escaped
    assert "&lt;script&gt;" in html
    # every field of the run's JSON is on the page
    for key in run.as_json():
        assert f"<code>{key}</code>" in html


def test_a_tampered_provenance_is_shown_as_not_verifying(world: World) -> None:
    run = world.run(ALICE)
    path = world.runs.outputs / run.id / "provenance.dsse.json"
    path.write_bytes(path.read_bytes() + b" ")  # no longer the envelope the hub stored
    html = _get(world, ALICE, f"/hub/ztlab/runs/{run.id}", run.id)
    assert 'id="run-provenance-check" class="alert alert-danger"' in html
    assert "changed on disk" in html


def test_a_failed_run_shows_its_cell_and_traceback_escaped(world: World) -> None:
    world.launcher.outcome = (1, FAILED_NOTEBOOK)
    run = world.run(ALICE)
    assert run.status == "failed"
    assert run.failed_cell == 1
    html = _get(world, ALICE, f"/hub/ztlab/runs/{run.id}", run.id)
    assert 'id="run-failure" class="alert alert-danger"' in html
    traceback = html.split('<pre id="run-traceback" class="border p-2">')[1].split("</pre>")[0]
    assert "ValueError: &lt;script&gt;alert(1)&lt;/script&gt;" in traceback
    assert "\x1b" not in html
    assert EVIL not in html
    assert "No signed provenance" in html


def test_someone_elses_run_is_forbidden_and_unknown_runs_are_not_found(world: World) -> None:
    run = world.run(ALICE)
    with pytest.raises(web.HTTPError) as caught:
        _get(world, BOB, f"/hub/ztlab/runs/{run.id}", run.id)
    assert caught.value.status_code == 403
    assert run.id in _get(world, ADMIN, f"/hub/ztlab/runs/{run.id}", run.id)
    with pytest.raises(web.HTTPError) as missing:
        _get(world, ALICE, "/hub/ztlab/runs/0123456789ab", "0123456789ab")
    assert missing.value.status_code == 404


def test_a_hub_without_runs_has_no_runs_page() -> None:
    with pytest.raises(web.HTTPError) as caught:
        _get(None, ALICE, "/hub/ztlab/runs")
    assert caught.value.status_code == 404
    assert "runs no notebooks" in str(caught.value.log_message)


def test_the_schedules_are_listed_above_the_runs(world: World) -> None:
    from ztlab.common.schedule import ScheduleSpec

    spec = ScheduleSpec.parse({"name": "nightly", "cron": "0 3 * * *", "timezone": "Europe/Berlin"})
    world.runs.add_schedule(ALICE, spec, notebook_name="train.ipynb", notebook=_notebook([]))
    world.runs.set_paused(ALICE, "alice", "nightly", True)
    html = _get(world, ALICE, "/hub/ztlab/runs")
    row = html.split('id="schedule-alice-nightly"')[1].split("</tr>")[0]
    assert "<code>0 3 * * *</code>" in row
    assert "Europe/Berlin" in row
    assert "paused" in row
    assert "nightly" not in _get(world, BOB, "/hub/ztlab/runs")


# -- the approval rule, shared by the API and the page ----------------------------------------


def test_a_version_from_a_verified_run_is_approvable(world: World) -> None:
    run = world.run(ALICE)
    provenance = check_approvable(
        world.runs, world.models, actor="paul", name="churn", version="1", record=world.records
    )
    assert provenance is not None
    assert provenance.verified
    assert provenance.run.id == run.id
    assert approval_refusal(provenance) is None
    view = provenance_view(provenance.statement)
    assert view["parameters"] == {"epochs": 3}
    assert view["datasets"] == [{"name": "mnist@3", "digest": f"blake3:{DATASET_ROOT}"}]


def test_a_version_whose_run_provenance_does_not_verify_is_refused(world: World) -> None:
    run = world.run(ALICE)
    path = world.runs.outputs / run.id / "provenance.dsse.json"
    path.write_bytes(path.read_bytes() + b" ")  # the stored envelope is no longer the signed one
    with pytest.raises(ModelServiceError) as caught:
        check_approvable(
            world.runs, world.models, actor="paul", name="churn", version="1", record=world.records
        )
    assert caught.value.status == 409
    assert run.id in caught.value.message
    assert "does not verify" in caught.value.message
    refused = world.records.actions("model.approve.refused")
    assert refused == [{"model": "churn@1", "reason": caught.value.message}]


def test_a_provenance_that_does_not_name_the_version_is_refused(world: World) -> None:
    world.run(ALICE)
    # version 2 claims the first run's MLflow run, but the run's provenance names version 1
    first = world.models.signatures[("churn", "1")]
    world.models.signatures[("churn", "2")] = Signature(
        "churn", "2", "alice", first.run_id, "{}", "00" * 32, 0.0
    )
    with pytest.raises(ModelServiceError, match="does not name churn version 2"):
        check_approvable(
            world.runs, world.models, actor="paul", name="churn", version="2", record=world.records
        )


def test_versions_not_trained_by_a_run_are_approved_as_before(world: World) -> None:
    world.models.signatures[("other", "1")] = Signature(
        "other", "1", "alice", "a-notebook-of-her-own", "{}", "00" * 32, 0.0
    )
    assert (
        check_approvable(
            world.runs, world.models, actor="paul", name="other", version="1", record=world.records
        )
        is None
    )
    assert (
        check_approvable(
            None, world.models, actor="paul", name="other", version="1", record=world.records
        )
        is None
    )


def _models_page(world: World, principal: Principal, uri: str) -> Any:
    return _page(ModelsPage, _plane(world), principal, uri)


def _bundle() -> str:
    import base64

    statement = {"predicate": {"ztlab": {"datasets": [{"dataset": "mnist@3"}]}}}
    payload = base64.b64encode(json.dumps(statement).encode()).decode()
    return json.dumps({"dsseEnvelope": {"payload": payload}})


def test_the_approvals_page_shows_provenance_and_refuses_what_does_not_verify(
    world: World,
) -> None:
    good = world.run(ALICE, parameters={"epochs": 5})
    bad = world.run(ALICE)
    for key, signature in list(world.models.signatures.items()):
        world.models.signatures[key] = Signature(
            signature.name, signature.version, "alice", signature.run_id, _bundle(), "ef", 0.0
        )
    path = world.runs.outputs / bad.id / "provenance.dsse.json"
    path.write_bytes(path.read_bytes() + b" ")
    page = _models_page(world, ADMIN, "/hub/ztlab/models")
    asyncio.run(page.get())
    html = str(page.html)
    first = html.split('id="model-churn-1"')[1].split("</tr>")[0]
    second = html.split('id="model-churn-2"')[1].split("</tr>")[0]
    assert '<span class="badge text-bg-success">verified</span>' in first
    assert f'href="/hub/ztlab/runs/{good.id}"' in first
    assert "by alice" in first
    assert f"sha256:{good.notebook_sha256[:12]}" in first
    assert "<code>epochs</code>" in first
    assert "mnist@3" in first
    assert f"blake3:{DATASET_ROOT[:12]}" in first
    assert "does not verify" in second
    assert "changed on disk" in second
    assert "disabled" in second
    # the form is not the only guard: a posted approval of version 2 is refused
    post = _models_page(world, ADMIN, "/hub/ztlab/models/churn/2")
    post.get_body_argument = lambda name, default="": {
        "action": "approve",
        "reason": "looks fine",
    }.get(name, default)
    asyncio.run(post.post("churn", "2"))
    assert post.status == 409
    assert world.models.approved == []
    assert 'id="models-message" class="alert alert-danger"' in str(post.html)
    assert world.records.actions("model.approve.refused")[0]["model"] == "churn@2"
    # and version 1 is approved
    post = _models_page(world, ADMIN, "/hub/ztlab/models/churn/1")
    post.get_body_argument = lambda name, default="": {
        "action": "approve",
        "reason": "looks fine",
    }.get(name, default)
    asyncio.run(post.post("churn", "1"))
    assert world.models.approved == [("churn", "1")]


def test_a_provenance_row_falls_back_on_the_run_when_the_statement_is_unreadable(
    world: World,
) -> None:
    run = world.run(ALICE)
    (world.runs.outputs / run.id / "provenance.dsse.json").unlink()
    provenance = world.runs.provenance_of_model("churn", "1", f"mlflow-{run.id}")
    row = provenance_row(provenance)
    assert row is not None
    assert row["verified"] is False
    assert row["notebook"] == "train.ipynb"
    assert row["sha256"] == run.notebook_sha256
    assert row["datasets"] == [{"dataset": "mnist@3", "root": DATASET_ROOT}]


# -- ztlab model status --------------------------------------------------------------------


def _status(monkeypatch: pytest.MonkeyPatch, provenance: Any) -> str:
    answer = {"signed": False, "trainer": None, "bundle": None, "history": []}
    if provenance is not ...:
        answer["provenance"] = provenance
    monkeypatch.setattr(model_cli, "_call", lambda *args, **kwargs: answer)
    result = CliRunner().invoke(model_cli.model_group, ["status", "churn", "1"])
    assert result.exit_code == 0, result.output
    return result.output


def test_model_status_prints_the_provenance(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    run = world.run(ALICE, parameters={"epochs": 3, "lr": 0.5})
    provenance = world.runs.provenance_of_model("churn", "1", f"mlflow-{run.id}")
    assert provenance is not None
    out = _status(monkeypatch, json.loads(json.dumps(provenance.as_json())))
    assert out.splitlines() == [
        "churn 1: not signed",
        f"  provenance: verified (run {run.id} by alice, by hand, notebook train.ipynb "
        f"sha256:{run.notebook_sha256[:12]}…)",
        "    parameters: epochs=3, lr=0.5",
        f"    dataset mnist@3 blake3:{DATASET_ROOT[:16]}…",
    ]


def test_model_status_says_when_the_provenance_does_not_verify(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = _status(
        monkeypatch,
        {"run": {"id": "0123456789ab", "owner": "alice"}, "verified": False,
         "problem": "bad signature", "statement": {}},
    )  # fmt: skip
    assert "  provenance: DOES NOT VERIFY: bad signature" in out.splitlines()
    # a hub that predates run provenance, or a version no run trained: nothing more
    assert _status(monkeypatch, ...) == "churn 1: not signed\n"
    assert _status(monkeypatch, None) == "churn 1: not signed\n"
