"""The Binder setup, end to end: what repo2docker would do, in a fresh virtual environment.

A copy of the repository (tracked and new files, as a clone would have them) is installed
into a new venv with ``pip install -r binder/requirements.txt`` from the copy's root;
``binder/postBuild`` makes the signed example dataset under a temporary ``$HOME``; then
``notebooks/dataset-lineage.ipynb`` runs with the venv's papermill under ``binder/start``,
in the venv's ``python3`` kernel and in the secure kernel postBuild installed.

It resolves and downloads about 190 packages (250 MB) from the package index: about 90 s
on a quiet two-core machine, most of it pip. pip's HTTP cache shortens reruns only where the
index answers with cache headers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "notebooks/dataset-lineage.ipynb"
_IGNORED = (".git", "__pycache__", "*.egg-info", "build", "dist", "node_modules", "test-artifacts")
_IGNORED_TOO = (".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", "_build")


def _copy_repository(target: Path) -> None:
    """The files a clone would have: tracked and new, not ignored (links kept as links)."""
    try:
        command = ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others"]
        listed = subprocess.run(
            [*command, "--exclude-standard"],
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(
            ROOT, target, symlinks=True, ignore=shutil.ignore_patterns(*_IGNORED, *_IGNORED_TOO)
        )
        return
    for name in sorted({os.fsdecode(n) for n in listed.split(b"\0") if n}):
        source = ROOT / name
        if not source.is_symlink() and not source.exists():
            continue  # deleted in the working tree
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / name, follow_symlinks=False)


def _clean_environment(home: Path, venv: Path) -> dict[str, str]:
    """This process's environment without what would leak the project venv or a registry."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ZTLAB_", "JUPYTER", "MLFLOW_", "PYTHON", "JUPYTERHUB_"))
        and key not in ("VIRTUAL_ENV", "IPYTHONDIR")
    }
    env["HOME"] = str(home)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["VIRTUAL_ENV"] = str(venv)
    return env


def _run(
    command: list[str], *, cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    elapsed = time.monotonic() - started
    print(f"{elapsed:6.1f}s  {' '.join(command)[:120]}")
    assert done.returncode == 0, (
        f"{command} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    return done


def _texts(notebook: dict[str, object]) -> tuple[str, list[str]]:
    """All text the executed notebook printed or displayed, and its error outputs."""
    texts: list[str] = []
    errors: list[str] = []
    for cell in notebook["cells"]:  # type: ignore[attr-defined]
        for output in cell.get("outputs", []):
            if output["output_type"] == "error":
                errors.append(f"{output['ename']}: {output['evalue']}")
            elif output["output_type"] == "stream":
                texts.append("".join(output["text"]))
            else:
                texts.append("".join(output.get("data", {}).get("text/plain", "")))
    return "\n".join(texts), errors


def test_binder_setup_runs_the_example_notebook(tmp_path: Path) -> None:
    started = time.monotonic()
    repo, venv, home = tmp_path / "repo", tmp_path / "venv", tmp_path / "home"
    repo.mkdir()
    home.mkdir()
    _copy_repository(repo)
    env = _clean_environment(home, venv)

    _run(["/usr/bin/python3", "-m", "venv", str(venv)], cwd=tmp_path, env=env, timeout=120)
    # --no-compile: byte-compiling ~190 packages is most of the install time (about 80 s of
    # 110 s here); the kernel compiles what it imports instead. pip keeps the real HOME: its
    # configuration and its cache (which helps only where the index sends cache headers).
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--prefer-binary"]
    pip.append("--no-compile")
    pip_env = {**env, "HOME": str(Path.home())}
    _run([*pip, "-r", "binder/requirements.txt"], cwd=repo, env=pip_env, timeout=900)
    installed = time.monotonic()
    made = _run(["bash", "binder/postBuild"], cwd=repo, env=env, timeout=120).stdout
    registry = home / "ztlab-demo" / "registry"
    assert (registry / "demo@1.dsse.json").is_file()
    assert (registry / "trusted-keys.pem").is_file()
    assert sorted(p.name for p in (home / "ztlab-demo" / "data").iterdir()) == [
        "labels.csv",
        "test.parquet",
        "train.parquet",
    ]
    assert "PRIVATE" not in "".join(p.read_text() for p in registry.iterdir())
    roots = [line.split()[1] for line in made.splitlines() if line.startswith("  root ")]
    assert len(roots) == 1, made
    root = roots[0]

    specs = json.loads(
        _run(
            [str(venv / "bin" / "jupyter"), "kernelspec", "list", "--json"],
            cwd=repo,
            env=env,
            timeout=60,
        ).stdout
    )["kernelspecs"]
    for name in ("python3", "ztlab-secure"):
        assert Path(specs[name]["resource_dir"]).is_relative_to(venv), specs[name]

    for kernel in ("python3", "ztlab-secure"):
        output = tmp_path / f"executed-{kernel}.ipynb"
        papermill = ["binder/start", str(venv / "bin" / "papermill"), NOTEBOOK, str(output)]
        options = ["-k", kernel, "-p", "tracking_uri", "", "--cwd", str(repo / "notebooks")]
        _run([*papermill, *options], cwd=repo, env=env, timeout=300)
        text, errors = _texts(json.loads(output.read_text(encoding="utf-8")))
        assert errors == [], errors
        assert f"<Dataset demo@1: 3 files, blake3 root {root[:16]}..., signed by " in text
        assert "signed by binder/make_demo_dataset.py" in text
        assert f"input: demo@1 digest {root[:32]}" in text
        assert f"ztlab.root {root}" in text
        assert "DatasetIntegrityError: demo@1: 1 file(s) do not match the signed manifest" in text
        assert "modified: train.parquet: expected" in text
        assert "the original demo@1 still verifies" in text
        assert "UnverifiedReadWarning" not in text
    print(
        f"binder test: {installed - started:.1f}s to install, "
        f"{time.monotonic() - installed:.1f}s for postBuild and the notebook runs"
    )
