"""Runs: a notebook run through the hub against plain papermill on the same notebook.

One ``ztlab hub`` with ``[sandbox] enabled = true`` (its own address pool and nftables
table), the development identity provider, no MLflow and no package proxy, and one user of
group ``ml-trainers`` with an API token made after a real login. The notebook is the same
bytes for both: a ``parameters`` cell ``n = 10``, ``total = sum(range(n))``, ``print(total)``
(kernelspec ``ztlab-secure``, language python), run with ``n = 1000``:

- ours: ``POST /hub/api/ztlab/runs`` with the notebook (base64) and ``{"n": 1000}``, then
  ``GET /hub/api/ztlab/runs/ID`` every 50 ms; timed from the POST to the first final status
  (all of it: the provider vouching for the user again, the policy decision, the run's
  cgroup, network namespace, token and certificate, bubblewrap, papermill in the sandbox, the
  executed notebook read back, hashed and signed into the provenance). The run's own
  ``duration_seconds`` is reported too, for context: ``started_at`` is set when the
  scheduler claims the run (status ``starting``), so it holds all of the above but the
  POST's own handling and the polling;
- the baseline: ``python -m papermill IN OUT -p n 1000 -k ztlab-secure --no-progress-bar``
  as a process on the same machine (the runs' kernelspec, found with the servers' Jupyter
  data directory; ``python3`` if that kernel does not start outside the sandbox, which the
  row then says), timed from its start to its exit.

Both outputs are checked for ``499500``. A first run of each (the run's one creates the
account and the network namespace) is a warm-up: the run's is reported apart. Then the pairs
take turns, which goes first alternating, so that both see the same machine state; the
overhead is the median of the pairs' differences. Target: under 1.5 s added at p50.
Everything the run made -- the account, cgroups, network namespace, service address, the
nftables table, runs' folders -- is removed at the end, also when a measurement failed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from bench._table import Row, percentile
from bench.login import _port, _stop
from bench.login import _ztlab_hub as login_ztlab_hub
from bench.spawn import SECRET, Hub, _api_session, _cgroup_parents, _idp_user, _remove_unix_user
from ztlab.dev.idp.launcher import DevIdP
from ztlab.hub.runs.store import FINAL
from ztlab.hub.spawner.runs import RUN_DIR
from ztlab.hub.spawner.serverenv import DATA_DIR
from ztlab.kernels.kernelspec import KERNEL_NAME

POOL = "10.241.0.0/16"  # no test's or other suite's pool (10.213-10.234 are taken)
TABLE = "ztlab_bench_runs"  # our own nftables table ([sandbox] firewall_table)
USER = "zbrun0"
N = 1000
EXPECTED = str(sum(range(N)))  # what the notebook prints
POLL_S = 0.05
TIMEOUT_S = 180.0


def _notebook() -> bytes:
    """The notebook both sides run (a parameters cell, then the work and its output)."""
    sources = {"parameters": "n = 10", "work": "total = sum(range(n))", "output": "print(total)"}
    cells: list[dict[str, Any]] = [
        {
            "cell_type": "code",
            "execution_count": None,
            "id": name,
            "metadata": {"tags": ["parameters"]} if name == "parameters" else {},
            "outputs": [],
            "source": source,
        }
        for name, source in sources.items()
    ]
    notebook = {
        "cells": cells,
        "metadata": {
            "kernelspec": {"name": KERNEL_NAME, "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    return json.dumps(notebook, indent=1).encode()


def _printed(executed: bytes) -> bool:
    """Whether the executed notebook's last cell printed the sum for ``n = N``."""
    outputs = json.loads(executed)["cells"][-1].get("outputs", [])
    return any(EXPECTED in "".join(out.get("text", "")) for out in outputs)


# -- ours: a run through the hub -----------------------------------------------------------------


def _run_once(
    api: requests.Session, hub: Hub, notebook: bytes, ids: list[str]
) -> tuple[float, Any]:
    """Seconds from the POST to the first final status, and the run's JSON then."""
    body: dict[str, Any] = {
        "notebook": {"name": "bench.ipynb", "content": base64.b64encode(notebook).decode()},
        "parameters": {"n": N},
    }
    runs = f"{hub.url}/hub/api/ztlab/runs"
    start = time.perf_counter()
    response = api.post(runs, json=body, timeout=TIMEOUT_S)
    if response.status_code != 201:
        raise RuntimeError(f"POST {runs}: {response.status_code} {response.text}")
    run_id = str(response.json()["id"])
    ids.append(run_id)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        answer = api.get(f"{runs}/{run_id}", timeout=TIMEOUT_S)
        answer.raise_for_status()
        run = answer.json()
        if run["status"] in FINAL:
            elapsed = time.perf_counter() - start
            break
        time.sleep(POLL_S)
    else:
        raise RuntimeError(f"run {run_id} did not end in {TIMEOUT_S:g} s: {run['status']}")
    if run["status"] != "succeeded":
        log = hub.root / "state" / "logs" / "runs" / f"{run_id}.log"
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no run log)"
        raise RuntimeError(
            f"run {run_id} ended {run['status']}: {run['message']}\n{run['traceback']}\n{tail}"
        )
    executed = api.get(f"{runs}/{run_id}/notebook", timeout=TIMEOUT_S)
    executed.raise_for_status()
    if not _printed(executed.content):
        raise RuntimeError(f"run {run_id}: the executed notebook does not print {EXPECTED}")
    return elapsed, run


# -- the baseline: papermill as a process --------------------------------------------------------


def _papermill(folder: Path, kernel: str) -> tuple[float, str]:
    """Seconds plain papermill takes on ``folder/input.ipynb``, and its error output when it
    failed (an empty string when it ran and printed the sum)."""
    source, target = folder / "input.ipynb", folder / "executed.ipynb"
    target.unlink(missing_ok=True)
    env = {**os.environ, "JUPYTER_DATA_DIR": str(Path(sys.prefix) / DATA_DIR)}
    argv = [sys.executable, "-m", "papermill", str(source), str(target)]
    argv += ["-p", "n", str(N), "-k", kernel, "--no-progress-bar"]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, env=env, cwd=folder, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        return elapsed, done.stderr.decode(errors="replace")[-3000:] or f"exit {done.returncode}"
    if not _printed(target.read_bytes()):
        return elapsed, f"the executed notebook does not print {EXPECTED}"
    return elapsed, ""


def _baseline_kernel(folder: Path) -> tuple[str, float]:
    """The kernel the baseline uses -- the runs' own when it starts here, else ``python3`` --
    and its warm-up run's time."""
    elapsed, error = _papermill(folder, KERNEL_NAME)
    if not error:
        return KERNEL_NAME, elapsed
    print(
        f"bench runs: papermill with {KERNEL_NAME} failed, using python3:\n{error}", file=sys.stderr
    )
    elapsed, error = _papermill(folder, "python3")
    if error:
        raise RuntimeError(f"plain papermill failed:\n{error}")
    return "python3", elapsed


# -- clean-up ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _cleanup(hub: Hub, ids: list[str]) -> Iterator[None]:
    """Stop the hub; remove the account, its cgroups (the server's and the runs'), the runs'
    folders, the network namespace, service address and table this suite made."""
    from ztlab.hub.sandbox.cgroups import CgroupManager
    from ztlab.hub.sandbox.netns import NetworkSegments

    parents = _cgroup_parents()
    account = f"ztl-{USER}"
    try:
        yield
    finally:
        if hub.proc is not None:
            _stop(hub.proc)
        subprocess.run(["pkill", "-KILL", "-u", account], check=False, capture_output=True)
        with contextlib.suppress(Exception):
            cgroups = CgroupManager.detect(parent="ztlab")
            for name in cgroups.names():
                if name == account or name.startswith(f"{account}-run-"):
                    cgroup = cgroups.get(name)
                    try:
                        if cgroup is not None:
                            cgroup.kill_all()
                            cgroup.remove()
                    except Exception as exc:  # keep cleaning the others
                        print(f"bench runs: cgroup {name}: {exc}", file=sys.stderr)
            for parent in cgroups.parent_paths:  # the parent too, when this suite made it
                if parent not in parents:
                    with contextlib.suppress(OSError):
                        parent.rmdir()
        for run_id in ids:
            shutil.rmtree(RUN_DIR / run_id, ignore_errors=True)
        state = hub.root / "state" / "sandbox" / "netns.json"
        try:  # the pool and table are this suite's alone
            NetworkSegments(pool=POOL, table=TABLE, state_file=state).teardown()
        except Exception as exc:
            print(f"bench runs: network teardown: {exc}", file=sys.stderr)
        _remove_unix_user(account)


# -- the suite -----------------------------------------------------------------------------------


def run(*, quick: bool = False) -> list[Row]:
    pairs = 3 if quick else 7
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        root = Path(tmp)
        root.chmod(0o700)
        hub = Hub("ztlab", f"http://127.0.0.1:{_port()}", root / "ztlab")
        idp = DevIdP(
            users={USER: _idp_user(USER)},
            clients=[
                {
                    "client_id": "ztlab-hub",
                    "client_secret": SECRET,
                    "redirect_uris": [f"{hub.url}/hub/oauth_callback"],
                }
            ],
            state_dir=root / "idp",
        )
        idp.start()
        ids: list[str] = []
        rows: list[Row] = []
        try:
            with _cleanup(hub, ids):
                hub.proc = login_ztlab_hub(
                    hub.root,
                    hub.url,
                    idp.issuer,
                    extra=textwrap.dedent(f"""
                    [sandbox]
                    enabled = true
                    address_pool = "{POOL}"
                    firewall_table = "{TABLE}"
                    [packages]
                    enabled = false
                    [runs]
                    tick_seconds = 1
                    """),
                )
                try:
                    rows = _measure(hub, root / "papermill", pairs, ids)
                except Exception:
                    log = hub.root / "hub.log"
                    if log.exists():
                        lines = log.read_text(errors="replace").splitlines()
                        quiet = [x for x in lines if " GET /hub/api/ztlab/runs/" not in x]
                        tail = "\n".join(quiet[-60:])
                        print(f"--- hub log ---\n{tail}", file=sys.stderr)
                    raise
        finally:
            idp.stop()
    return rows


def _measure(hub: Hub, folder: Path, pairs: int, ids: list[str]) -> list[Row]:
    notebook = _notebook()
    folder.mkdir()
    (folder / "input.ipynb").write_bytes(notebook)
    api = _api_session(hub, USER)
    first, _ = _run_once(api, hub, notebook, ids)  # the account and namespace are made
    kernel, base_first = _baseline_kernel(folder)
    print(f"bench runs: warm-up: ours {first:.2f} s, papermill ({kernel}) {base_first:.2f} s",
          file=sys.stderr)  # fmt: skip
    ours: list[float] = []
    own: list[float] = []
    base: list[float] = []
    for index in range(pairs):

        def one_run() -> None:
            elapsed, run = _run_once(api, hub, notebook, ids)
            ours.append(elapsed)
            if isinstance(run.get("duration_seconds"), int | float):
                own.append(float(run["duration_seconds"]))

        def one_papermill() -> None:
            elapsed, error = _papermill(folder, kernel)
            if error:
                raise RuntimeError(f"plain papermill failed:\n{error}")
            base.append(elapsed)

        for action in (one_run, one_papermill) if index % 2 == 0 else (one_papermill, one_run):
            action()
        print(
            f"bench runs: pair {index + 1}/{pairs}: ours {ours[-1]:.2f} s "
            f"(own duration {own[-1] if own else float('nan'):.2f} s), "
            f"papermill {base[-1]:.2f} s",
            file=sys.stderr,
        )
    return _rows(ours, own, base, first, kernel)


def _rows(
    ours: list[float], own: list[float], base: list[float], first: float, kernel: str
) -> list[Row]:
    def p50(values: list[float]) -> float:
        return percentile(values, 0.5)

    def p95(values: list[float]) -> float:
        return percentile(values, 0.95)

    plain = f"papermill -k {kernel}" + (
        "" if kernel == KERNEL_NAME else f" ({KERNEL_NAME} did not start)"
    )
    overhead = [mine - theirs for mine, theirs in zip(ours, base, strict=True)]
    rows = [
        Row(
            "runs",
            "run POST-to-final p50",
            p50(ours),
            "s",
            target="overhead < 1.5 s",
            baseline=f"{plain}: {p50(base):.3f} s",
            ratio=p50(ours) / p50(base),
        ),
        Row(
            "runs",
            "run POST-to-final p95",
            p95(ours),
            "s",
            baseline=f"papermill p95: {p95(base):.3f} s",
            ratio=p95(ours) / p95(base),
        ),
        Row("runs", f"plain {plain} p50", p50(base), "s"),
        Row(
            "runs",
            f"run overhead p50 (ours - papermill, {len(overhead)} pairs)",
            p50(overhead),
            "s",
            target="< 1.5 s",
            baseline=f"papermill: {p50(base):.3f} s",
            ratio=p50(ours) / p50(base),
        ),
    ]
    if own:
        rows.append(
            Row(
                "runs",
                "run's own duration p50 (started_at..finished_at)",
                p50(own),
                "s",
                baseline=f"papermill: {p50(base):.3f} s",
                ratio=p50(own) / p50(base),
            )
        )
    rows.append(Row("runs", "first run (new account, network namespace)", first, "s"))
    return rows
