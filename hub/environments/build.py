"""Building one environment: a venv layered on the kernel runtime, installed through the
package proxy, locked.

A build of environment ``NAME`` lives in ``<root>/NAME/<build>`` (``[environments] root``)
and is made in fixed steps, each logged to the build's log:

1. **venv** -- ``python -m venv --without-pip`` from the kernel runtime's interpreter;
2. **layers** -- ``_ztlab_layers.pth`` in its ``site-packages`` adds, in order, the site
   directories of ``--layer-on PYTHON`` (an interpreter whose packages, PyTorch and CuPy
   say, the build should use rather than download; it must be the same Python version) and
   of the kernel runtime (the venv ztlab runs from: IPython, the ztlab kernel extension,
   pandas...). Packages installed in the environment come first, then the layers in order;
3. **install** -- ``pip install -r`` the definition's requirements, through the package
   gateway with a one-time build token (every file hash-checked and audited), pip's own
   configuration files ignored (``--isolated``); pip installs only what the layers lack;
4. **kernelspec** -- ``share/jupyter/kernels/ztlab-env-NAME/kernel.json``, which starts
   the kernel through :mod:`ztlab.kernels.launch` (the user's own layer on top);
5. **lock** -- every file hashed (:mod:`ztlab.common.envlock`), the folder made read-only,
   the lock written into it and returned.

A step that fails raises :class:`BuildFailed` naming the step, and the folder is removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from ztlab.common.envlock import LOCK_NAME, EnvironmentLock, TreeSummary
from ztlab.common.errors import UsageError
from ztlab.common.manifest import Manifest, VerifyResult, fingerprint, verify

#: the layers file in an environment's ``site-packages``
LAYERS_PTH: Final = "_ztlab_layers.pth"
#: kernelspec names are ``ztlab-env-NAME``
KERNEL_PREFIX: Final = "ztlab-env-"

Log = Callable[[str], None]


class BuildFailed(UsageError):
    """A build step failed; ``step`` names it."""

    def __init__(self, step: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"{step}: {message}", hint=hint)
        self.step = step


@dataclass(frozen=True, slots=True)
class BuildPlan:
    """What to build, and where."""

    name: str
    build: str
    requirements: str
    root: Path
    #: the gateway's simple index, with the build token (``http://build:TOKEN@…/simple/``)
    index_url: str
    #: another interpreter whose packages the environment layers on (``--layer-on``)
    layer_on: str | None = None

    @property
    def path(self) -> Path:
        """The build's folder."""
        return self.root / self.name / self.build


@dataclass(frozen=True, slots=True)
class Built:
    """A finished build: its lock and the manifests behind it (kept by the control plane)."""

    lock: EnvironmentLock
    files: Manifest
    layers: tuple[Manifest, ...]


def runtime_site() -> Path:
    """The kernel runtime's ``site-packages`` (the venv ztlab runs from)."""
    return Path(sysconfig.get_paths()["purelib"])


def runtime_digest() -> str:
    """SHA-256 over the kernel runtime's distributions (each ``RECORD`` file, which lists
    every installed file with its hash): it changes when the runtime is upgraded."""
    import hashlib

    digest = hashlib.sha256()
    for record in sorted(runtime_site().glob("*.dist-info/RECORD")):
        digest.update(record.parent.name.encode() + b"\0" + record.read_bytes() + b"\0")
    return "sha256:" + digest.hexdigest()


def site_packages(prefix: Path) -> Path:
    """``PREFIX/lib/pythonX.Y/site-packages`` of a venv made by this interpreter."""
    return prefix / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def layer_sites(layer_on: str | None) -> list[Path]:
    """The site directories an environment reads, after its own."""
    sites = []
    if layer_on:
        sites += _interpreter_sites(layer_on)
    sites.append(runtime_site())
    return sites


def _interpreter_sites(python: str) -> list[Path]:
    """The existing site directories of ``python``, which must be this Python version."""
    script = (
        "import json, site, sys; "
        "print(json.dumps([list(sys.version_info[:2]), site.getsitepackages()]))"
    )
    try:
        out = subprocess.run(
            [python, "-I", "-B", "-c", script],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildFailed("layers", f"cannot run {python}: {exc}") from exc
    version, sites = json.loads(out)
    if tuple(version) != sys.version_info[:2]:
        ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
        raise BuildFailed(
            "layers",
            f"{python} is Python {version[0]}.{version[1]}; the kernel runtime is Python {ours}",
            hint="--layer-on takes an interpreter of the same Python version",
        )
    return [Path(site) for site in sites if Path(site).is_dir()]


def build(plan: BuildPlan, *, log: Log) -> Built:
    """Run every step of ``plan``; on failure the folder is removed."""
    target = plan.path
    if target.exists():
        raise BuildFailed("venv", f"{target} exists already")
    target.parent.mkdir(parents=True, exist_ok=True)
    plan.root.chmod(0o755)
    target.parent.chmod(0o755)
    try:
        sites = layer_sites(plan.layer_on)
        log(f"[venv] {target}")
        venv.EnvBuilder(with_pip=False, symlinks=True).create(target)
        own = site_packages(target)
        log("[layers] " + ", ".join(str(site) for site in sites))
        (own / LAYERS_PTH).write_text(
            "".join(f"import site; site.addsitedir({str(site)!r})\n" for site in sites)
        )
        _install(plan, target, log=log)
        log("[kernelspec] " + KERNEL_PREFIX + plan.name)
        write_kernelspec(target, plan.name)
        log("[lock] hashing the environment and its layers")
        built = lock(plan, target, sites)
        (target / LOCK_NAME).write_text(built.lock.to_json())
        _read_only(target)
        log(f"[done] {plan.name} build {plan.build}: {built.lock.digest}")
        return built
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def _install(plan: BuildPlan, target: Path, *, log: Log) -> None:
    requirements = "".join(
        line + "\n" for line in plan.requirements.splitlines() if line.split("#")[0].strip()
    )
    if not requirements:
        log("[install] nothing to install (the layers hold everything)")
        return
    req_file = target / "ztlab-requirements.txt"
    req_file.write_text(plan.requirements)
    argv = [
        str(target / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--isolated",
        "--no-input",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "--no-cache-dir",
        "--index-url",
        plan.index_url,
        "--trusted-host",  # the gateway is on this host (its service address), over http
        urlsplit(plan.index_url).netloc.rpartition("@")[2],
        "-r",
        str(req_file),
    ]
    log("[install] pip install -r " + req_file.name)
    env = {
        "PATH": f"{target / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(target),
        "PIP_CONFIG_FILE": os.devnull,
        "LANG": "C.UTF-8",
    }
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert process.stdout is not None
    tail: list[str] = []
    for line in process.stdout:
        line = _redact(line.rstrip())
        log("  " + line)
        tail = [*tail[-30:], line]
    if process.wait() != 0:
        raise BuildFailed(
            "install",
            "pip could not install the requirements:\n" + "\n".join(_pip_errors(tail)),
            hint="a package the mirror lacks, or a version range nothing satisfies; "
            "the build log has pip's whole output",
        )


def _redact(line: str) -> str:
    """pip's output without the build token."""
    return re.sub(r"//[^/@\s]*@", "//***@", line)


def _pip_errors(tail: list[str]) -> list[str]:
    errors = [line for line in tail if line.startswith("ERROR") or "Client Error" in line]
    return errors or tail[-5:]


def write_kernelspec(target: Path, name: str) -> Path:
    """The environment's kernelspec (started through :mod:`ztlab.kernels.launch`)."""
    folder = target / "share" / "jupyter" / "kernels" / (KERNEL_PREFIX + name)
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [
            str(target / "bin" / "python"),
            "-m",
            "ztlab.kernels.launch",
            "-f",
            "{connection_file}",
        ],
        "display_name": f"Python 3 ({name})",
        "language": "python",
        "metadata": {"debugger": False, "ztlab": {"secure": True, "environment": name}},
    }
    path = folder / "kernel.json"
    path.write_text(json.dumps(spec, indent=1) + "\n")
    return path


def unhashed(root: Path, *, layer: bool) -> tuple[dict[str, str], set[str]]:
    """Symbolic links under ``root`` (path -> target) and the paths a manifest skips: the
    links, the lock, and in a layer compiled bytecode."""
    links: dict[str, str] = {}
    skip: set[str] = set()
    for folder, dirs, files in os.walk(root):
        for entry in [*dirs, *files]:
            full = Path(folder) / entry
            rel = str(full.relative_to(root))
            if full.is_symlink():
                links[rel] = str(full.readlink())
                skip.add(rel)
            elif layer and entry.endswith(".pyc"):
                skip.add(rel)
    if not layer:
        skip.add(LOCK_NAME)
    return links, skip


def lock(plan: BuildPlan, target: Path, sites: Collection[Path]) -> Built:
    """Hash the build's folder and its layers; the lock and its manifests."""
    links, skip = unhashed(target, layer=False)
    files = fingerprint(target, exclude=skip)
    layers = []
    summaries = []
    for site in sites:
        _, layer_skip = unhashed(site, layer=True)
        manifest = fingerprint(site, exclude=layer_skip)
        layers.append(manifest)
        summaries.append(_summary(manifest, str(site)))
    the_lock = EnvironmentLock(
        name=plan.name,
        build=plan.build,
        python=".".join(map(str, sys.version_info[:3])),
        requirements=plan.requirements,
        files=_summary(files, ""),
        links=links,
        layers=tuple(summaries),
        distributions=distributions(target),
        runtime=runtime_digest(),
    )
    return Built(lock=the_lock, files=files, layers=tuple(layers))


def _summary(manifest: Manifest, path: str) -> TreeSummary:
    return TreeSummary(
        root=manifest.root, count=len(manifest.entries), size=manifest.total_size, path=path
    )


def distributions(target: Path) -> dict[str, str]:
    """Every distribution the environment's interpreter sees (the first one on its path)."""
    script = (
        "import importlib.metadata as m, json, re\n"
        "seen = {}\n"
        "for d in m.distributions():\n"
        "    name = re.sub(r'[-_.]+', '-', (d.metadata['Name'] or '')).lower()\n"
        "    if name and name not in seen: seen[name] = d.version\n"
        "print(json.dumps(seen, sort_keys=True))\n"
    )
    out = subprocess.run(
        [str(target / "bin" / "python"), "-B", "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    ).stdout
    found: dict[str, str] = json.loads(out)
    return found


def _read_only(target: Path) -> None:
    """Readable by everyone, writable by nobody but root."""
    for folder, dirs, files in os.walk(target):
        for entry in [*dirs, *files]:
            full = Path(folder) / entry
            if not full.is_symlink():
                executable = full.stat().st_mode & 0o111
                full.chmod(0o755 if entry in dirs else 0o644 | executable)
    target.chmod(0o755)


def check(
    target: Path, lock_: EnvironmentLock, files: Manifest, layers: Collection[Manifest]
) -> list[str]:
    """What differs between a build's folder (and layers) and its lock: one line each."""
    problems: list[str] = []
    links, skip = unhashed(target, layer=False)
    for path in sorted(set(links) | set(lock_.links)):
        if links.get(path) != lock_.links.get(path):
            problems.append(f"link {path}: {lock_.links.get(path)!r} -> {links.get(path)!r}")
    problems += _differences(verify(target, files, exclude=skip), str(target))
    for summary, manifest in zip(lock_.layers, layers, strict=True):
        site = Path(summary.path)
        if not site.is_dir():
            problems.append(f"layer {site}: missing")
            continue
        _, layer_skip = unhashed(site, layer=True)
        problems += _differences(verify(site, manifest, exclude=layer_skip), str(site))
    return problems


def _differences(result: VerifyResult, where: str) -> list[str]:
    lines = [f"modified {where}/{entry.path}" for entry in result.modified]
    lines += [f"missing {where}/{entry.path}" for entry in result.missing]
    lines += [f"extra {where}/{entry.path}" for entry in result.extra]
    lines += [f"unsafe {where}/{entry.path}: {entry.reason}" for entry in result.unsafe]
    return lines
