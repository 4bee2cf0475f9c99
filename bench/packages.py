"""Installing through the package proxy, and starting a kernel in an environment.

``python -m bench packages``. Two comparisons, each against a baseline run in the same
process:

- **install**: ``pip install`` of a 10 MB wheel through the package proxy (the real
  gateway, in this process, in front of a real devpi-server that mirrors a local index;
  the file hash-checked and recorded on each download) against ``pip install`` of the same
  wheel from a local file. Both into a fresh target, no pip cache, alternating, median of
  each. Target: under 1.5x. The first download through the proxy (devpi fetching from its
  upstream) is reported on its own.
- **kernel start**: a kernel of a built environment (its launcher makes the user's layer,
  then IPython starts with the environment's layers on its path) against the kernel
  started directly from the kernel runtime's venv, to the first reply to
  ``kernel_info``. The ``gpu`` environment needs a GPU machine's PyTorch and CuPy: here an
  environment layered on a second interpreter stands in for it (the same two-layer path).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import venv
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench._table import Row, median

MIB = 1 << 20


def run(*, quick: bool = False) -> list[Row]:
    return run_install(quick=quick) + run_kernel_start(quick=quick)


# -- install ------------------------------------------------------------------------------


@contextmanager
def _proxy(root: Path, upstream: str) -> Iterator[str]:
    """devpi-server and the gateway, the caller on 127.0.0.1 allowed everything."""
    from bench.login import _port as free_port
    from ztlab.common.config import parse_config
    from ztlab.hub.packages import PackageMirror, PackageRequests
    from ztlab.hub.packages.gateway import PackageGateway

    config = parse_config(
        {
            "state_dir": str(root / "state"),
            "packages": {"port": free_port(), "devpi_port": free_port(), "upstream": upstream},
        }
    )
    mirror = PackageMirror(config)
    mirror.start()
    requests_store = PackageRequests(root / "state" / "packages" / "requests.sqlite")
    loop = asyncio.new_event_loop()
    records: list[Any] = []

    async def flush() -> None:
        return None

    async def roles_of(name: str) -> frozenset[str]:
        return frozenset({"bench"})

    gateway = PackageGateway(
        mirror=mirror,
        requests=requests_store,
        role_rules={"bench": ["*"]},
        roles_of=roles_of,
        owner_of=lambda address: "bench" if address == "127.0.0.1" else None,
        record=lambda *args, **kwargs: records.append((args, kwargs)),
        flush=flush,
        temp_dir=root / "state" / "packages" / "tmp",
    )
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        gateway.listen("127.0.0.1", config.packages.port)
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        mirror.ensure_ready()
        yield f"http://127.0.0.1:{config.packages.port}/simple/"
    finally:
        loop.call_soon_threadsafe(gateway.stop)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        mirror.stop()
        requests_store.close()


def _pip(*args: str) -> float:
    target = tempfile.mkdtemp(prefix="ztlab-bench-target-")
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    env.pop("PIP_FIND_LINKS", None)
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--isolated",
            "--no-cache-dir",
            "--no-deps",
            "--disable-pip-version-check",
            "--target",
            target,
            *args,
        ],
        check=True,
        env=env,
    )
    elapsed = time.perf_counter() - started
    shutil.rmtree(target)
    return elapsed


def run_install(*, quick: bool = False) -> list[Row]:
    from tests.package_index import SimpleIndex

    repeats = 3 if quick else 7
    with tempfile.TemporaryDirectory(prefix="ztlab-bench-packages-") as tmp:
        root = Path(tmp)
        index = SimpleIndex(root / "upstream")
        wheel = index.add("benchwheel", "1.0", payload=os.urandom(10 * MIB))
        with index.serve() as upstream, _proxy(root, upstream) as proxy:
            through = ["--index-url", proxy, "--trusted-host", proxy.split("/")[2], "benchwheel"]
            first = _pip(*through)
            local, proxied = [], []
            for _ in range(repeats):
                local.append(_pip("--no-index", str(wheel)))
                proxied.append(_pip(*through))
            size = wheel.stat().st_size / MIB
    ratio = median(proxied) / median(local)
    return [
        Row(
            "packages",
            f"pip install, {size:.0f} MB wheel, through the proxy (median of {repeats})",
            median(proxied) * 1000,
            "ms",
            target="< 1.5x",
            baseline=f"from a local file: {median(local) * 1000:.0f} ms",
            ratio=ratio,
        ),
        Row(
            "packages",
            "  first download (devpi fetches from its upstream)",
            first * 1000,
            "ms",
            baseline=f"from a local file: {median(local) * 1000:.0f} ms",
            ratio=first / median(local),
        ),
    ]


# -- kernel start -------------------------------------------------------------------------


def _kernel_start(argv: list[str], home: Path) -> float:
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import KernelManager

    manager = KernelManager()
    manager._kernel_spec = KernelSpec(argv=argv, language="python", display_name="bench")
    env = {**os.environ, "HOME": str(home)}
    started = time.perf_counter()
    manager.start_kernel(env=env)
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        elapsed = time.perf_counter() - started
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    return elapsed


def _launcher(env: Path) -> list[str]:
    """An environment's kernel command (what its kernelspec says)."""
    return [str(env / "bin" / "python"), "-m", "ztlab.kernels.launch", "-f", "{connection_file}"]


def run_kernel_start(*, quick: bool = False) -> list[Row]:
    import zipfile

    from tests.package_index import make_wheel
    from ztlab.hub.environments.build import BuildPlan, build, site_packages
    from ztlab.kernels.kernelspec import kernelspec

    repeats = 3 if quick else 7
    with tempfile.TemporaryDirectory(prefix="ztlab-bench-envs-") as tmp:
        root = Path(tmp)
        other = root / "other"
        venv.EnvBuilder(with_pip=False, symlinks=True).create(other)
        with zipfile.ZipFile(make_wheel(root, "stand_in", "1.0")) as archive:
            archive.extractall(site_packages(other))
        envs: dict[str, Path] = {}
        for name, layer_on in (("base", None), ("layered", str(other / "bin" / "python"))):
            plan = BuildPlan(
                name=name,
                build="1",
                requirements="",
                root=root / "envs",
                index_url="http://127.0.0.1:9/simple/",
                layer_on=layer_on,
            )
            build(plan, log=lambda line: None)
            envs[name] = plan.path
        home = root / "home"
        home.mkdir()
        # the kernel servers had before environments: the runtime's ztlab-secure kernelspec
        # (IPython with the ztlab extension), started directly
        direct = kernelspec()["argv"]
        commands = {
            "direct": direct,
            **{name: _launcher(path) for name, path in envs.items()},
        }
        _kernel_start(commands["base"], home)  # makes the user's layer once, warms caches
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(repeats):
            for name, argv in commands.items():
                times[name].append(_kernel_start(argv, home))
    base = median(times["direct"])
    return [
        Row(
            "packages",
            f"kernel start, environment base (launcher + layer, median of {repeats})",
            median(times["base"]) * 1000,
            "ms",
            baseline=f"ztlab-secure, direct: {base * 1000:.0f} ms",
            ratio=median(times["base"]) / base,
        ),
        Row(
            "packages",
            "kernel start, environment layered on a second interpreter (gpu's path)",
            median(times["layered"]) * 1000,
            "ms",
            baseline=f"environment base: {median(times['base']) * 1000:.0f} ms",
            ratio=median(times["layered"]) / median(times["base"]),
        ),
    ]
