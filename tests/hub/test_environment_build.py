"""Building an environment without a hub: layers, kernelspec, lock, and what changes break it.

The build here installs nothing (no requirements), so it needs no package proxy: the
environment layers on a given interpreter's packages (the ``--layer-on`` mode a GPU machine
uses for its PyTorch and CuPy) and on the kernel runtime. What is installed through the
proxy is tested end to end in ``test_packages_e2e.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.package_index import make_wheel
from ztlab.common.envlock import LOCK_NAME, LockError, parse_lock
from ztlab.hub.environments.build import (
    BuildFailed,
    BuildPlan,
    build,
    check,
    runtime_site,
    site_packages,
)

pytestmark = pytest.mark.slow  # hashes the kernel runtime (the venv, ~2 GB) per build


@pytest.fixture(scope="module")
def other_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An interpreter with a package of its own (``tinylayer``), as a GPU machine's Python
    has PyTorch: a venv of the same Python version."""
    prefix = tmp_path_factory.mktemp("other") / "python"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(prefix)
    wheel = make_wheel(prefix.parent, "tinylayer", "4.2", payload=b"L" * 1000)
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site_packages(prefix))
    return prefix / "bin" / "python"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, other_python: Path) -> tuple[BuildPlan, object]:
    root = tmp_path_factory.mktemp("envs")
    plan = BuildPlan(
        name="layered",
        build="1",
        requirements="# nothing to install: the layers hold it\n",
        root=root,
        index_url="http://127.0.0.1:9/simple/",  # never asked: nothing to install
        layer_on=str(other_python),
    )
    lines: list[str] = []
    return plan, build(plan, log=lines.append)


def _python(plan: BuildPlan) -> str:
    return str(plan.path / "bin" / "python")


def test_the_environment_sees_its_layers_in_order(built: tuple[BuildPlan, object]) -> None:
    plan, result = built
    out = subprocess.run(
        [
            _python(plan),
            "-B",
            "-c",
            "import tinylayer, ztlab.kernels.launch, ipykernel; print(tinylayer.VERSION)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "4.2"
    lock = result.lock  # type: ignore[attr-defined]
    layers = [layer.path for layer in lock.layers]
    other_site = str(site_packages(Path(plan.layer_on or "").parent.parent))
    assert layers == [other_site, str(runtime_site())]
    assert lock.distributions["tinylayer"] == "4.2"
    assert lock.python == ".".join(map(str, sys.version_info[:3]))


def test_the_kernelspec_starts_through_the_launcher(built: tuple[BuildPlan, object]) -> None:
    plan, _ = built
    spec = json.loads(
        (plan.path / "share/jupyter/kernels/ztlab-env-layered/kernel.json").read_text()
    )
    assert spec["argv"] == [_python(plan), "-m", "ztlab.kernels.launch", "-f", "{connection_file}"]


def test_the_lock_in_the_folder_is_the_lock_and_read_only(built: tuple[BuildPlan, object]) -> None:
    plan, result = built
    copy = parse_lock((plan.path / LOCK_NAME).read_text())
    assert copy.digest == result.lock.digest  # type: ignore[attr-defined]
    modes = {p.stat().st_mode & 0o222 for p in plan.path.rglob("*") if not p.is_symlink()}
    assert modes <= {0o200}  # written only by root, the control plane


def test_a_lock_whose_content_was_changed_is_refused(built: tuple[BuildPlan, object]) -> None:
    plan, _ = built
    body = json.loads((plan.path / LOCK_NAME).read_text())
    body["distributions"]["tinylayer"] = "9.9"
    with pytest.raises(LockError, match="is not the digest of its contents"):
        parse_lock(json.dumps(body), source="tampered.json")


def test_the_build_matches_its_lock_until_a_file_changes(built: tuple[BuildPlan, object]) -> None:
    plan, result = built
    lock, files, layers = result.lock, result.files, result.layers  # type: ignore[attr-defined]
    assert check(plan.path, lock, files, layers) == []

    # a flipped byte in the environment's own folder
    target = plan.path / "share/jupyter/kernels/ztlab-env-layered/kernel.json"
    original = target.read_bytes()
    target.write_bytes(original.replace(b"launch", b"lunch"))
    try:
        problems = check(plan.path, lock, files, layers)
    finally:
        target.write_bytes(original)
    assert problems == [f"modified {plan.path}/share/jupyter/kernels/ztlab-env-layered/kernel.json"]

    # a changed file in a layer, and a file added to the folder
    layer_file = site_packages(Path(plan.layer_on or "").parent.parent) / "tinylayer/__init__.py"
    layer_original = layer_file.read_bytes()
    layer_file.write_bytes(b"VERSION = 'evil'\n")
    extra = plan.path / "lib" / "sneaky.pth"
    extra.write_text("import os\n")
    try:
        problems = check(plan.path, lock, files, layers)
    finally:
        layer_file.write_bytes(layer_original)
        extra.unlink()
    assert f"extra {plan.path}/lib/sneaky.pth" in problems
    assert any(p.startswith("modified ") and p.endswith("tinylayer/__init__.py") for p in problems)

    # a changed link (the interpreter) is a difference too
    link = plan.path / "bin" / "python"
    target_before = str(link.readlink())
    link.unlink()
    link.symlink_to("/bin/sh")
    try:
        problems = check(plan.path, lock, files, layers)
    finally:
        link.unlink()
        link.symlink_to(target_before)
    assert problems == [f"link bin/python: {target_before!r} -> '/bin/sh'"]


def test_bytecode_the_interpreters_write_in_a_layer_is_not_a_difference(
    built: tuple[BuildPlan, object],
) -> None:
    plan, result = built
    layer = site_packages(Path(plan.layer_on or "").parent.parent)
    cache = layer / "tinylayer" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "__init__.cpython-311.pyc").write_bytes(b"bytecode")
    try:
        assert check(plan.path, result.lock, result.files, result.layers) == []  # type: ignore[attr-defined]
    finally:
        (cache / "__init__.cpython-311.pyc").unlink()


def test_another_python_version_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "python9"
    fake.write_text("#!/bin/sh\necho '[[3, 99], []]'\n")
    fake.chmod(0o755)
    plan = BuildPlan(
        name="wrong",
        build="1",
        requirements="",
        root=tmp_path / "envs",
        index_url="http://127.0.0.1:9/simple/",
        layer_on=str(fake),
    )
    with pytest.raises(BuildFailed, match=r"layers: .*python9 is Python 3\.99"):
        build(plan, log=lambda line: None)
    assert not plan.path.exists()  # a failed build leaves no folder


def test_a_new_registry_never_reuses_a_build_folder_left_on_the_root(tmp_path: Path) -> None:
    from ztlab.hub.environments.registry import EnvironmentRegistry

    root = tmp_path / "envs"
    (root / "base" / "1").mkdir(parents=True)  # left by a state directory started afresh
    (root / "base" / "7").mkdir()
    registry = EnvironmentRegistry(tmp_path / "state" / "environments")
    try:
        row = registry.start_build("base", root=root, by="ztlab-hub")
    finally:
        registry.close()
    assert row.build == 8
    assert row.path == str(root / "base" / "8")


def test_a_hub_builds_base_again_when_the_kernel_runtime_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextlib
    import time

    from ztlab.common.config import parse_config
    from ztlab.hub.environments import EnvironmentRegistry, EnvironmentService
    from ztlab.hub.environments import service as service_module
    from ztlab.hub.policy import PolicyEngine

    root = tmp_path / "envs"
    config = parse_config(
        {"state_dir": str(tmp_path / "state"), "environments": {"root": str(root)}}
    )
    records: list[tuple[str, str]] = []
    service = EnvironmentService(
        config,
        policy=PolicyEngine.defaults(),
        record=lambda actor, action, **detail: records.append((actor, action)),
        registry=EnvironmentRegistry(tmp_path / "state" / "environments"),
    )
    service.index_for = lambda label: contextlib.nullcontext("http://127.0.0.1:9/simple/")

    def built(build: int) -> None:
        deadline = time.monotonic() + 120
        while service.registry.build("base", build).status == "building":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert service.registry.build("base", build).status == "ready"

    try:
        first = service.ensure_base()
        assert first is not None
        built(first.build)
        assert service.ensure_base() is None  # current: nothing to do
        monkeypatch.setattr(service_module, "runtime_digest", lambda: "sha256:upgraded")
        again = service.ensure_base()
        assert again is not None
        assert again.build == first.build + 1
        built(again.build)
    finally:
        service.close()
    assert ("ztlab-hub", "environment.built") in records
