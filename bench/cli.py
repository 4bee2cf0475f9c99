"""The command line as a user meets it: start-up, whole-process hashing, a hub round trip.

Every figure is a whole process, started as a user starts it, timed from ``fork`` to exit;
each is the median of several runs, its baseline run interleaved with it in the same run:

- ``ztlab data fingerprint --help`` against ``python -c pass`` (the interpreter alone);
- ``ztlab data fingerprint`` of 2 GiB in 2,016 page-cached files (512 MiB in 504 with
  ``--quick``) against ``find DIR -type f -print0 | xargs -0 b3sum``;
- ``ztlab data list`` against a real hub on loopback (the development provider, a token from
  a real login), against the same request made by ``python -c`` with ``urllib``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests

from bench._table import Row
from bench.login import SECRET, _port, _stop, _ztlab_hub
from ztlab.dev.idp.flow import idp_login
from ztlab.dev.idp.launcher import DevIdP

MIB = 1024 * 1024
ZTLAB = str(Path(sys.executable).with_name("ztlab"))


def _whole(argv: list[str], **kwargs: object) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
        return time.perf_counter() - start

    return run


def _medians(repeats: int, runs: dict[str, Callable[[], float]]) -> dict[str, float]:
    """The median of each whole-process run, the runs interleaved (one warm-up each)."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            samples[name].append(run())
    return {name: statistics.median(values) for name, values in samples.items()}


def _dataset(root: Path, files: int, total: int) -> None:
    size = total // files
    block = os.urandom(size + files)
    for index in range(files):
        folder = root / f"d{index % 16:02d}"
        folder.mkdir(exist_ok=True)
        (folder / f"f{index:04d}.bin").write_bytes(block[index : index + size])


def _warm(root: Path) -> None:
    for path in root.rglob("*.bin"):
        path.read_bytes()


def run(*, quick: bool = False) -> list[Row]:
    return _startup(quick) + _fingerprint(quick) + _hub_round_trip(quick)


def _startup(quick: bool) -> list[Row]:
    times = _medians(
        10 if quick else 30,
        {
            "help": _whole([ZTLAB, "data", "fingerprint", "--help"]),
            "python": _whole([sys.executable, "-c", "pass"]),
        },
    )
    return [
        Row(
            "cli",
            "start-up: ztlab data fingerprint --help",
            times["help"] * 1000,
            "ms",
            "< 60 ms",
            f"python -c pass: {times['python'] * 1000:.1f} ms",
            times["help"] / times["python"],
        )
    ]


def _fingerprint(quick: bool) -> list[Row]:
    files, total = (504, 512 * MIB) if quick else (2016, 2048 * MIB)
    b3sum = shutil.which("b3sum")
    if b3sum is None:
        raise RuntimeError("b3sum is not installed (make bench installs it)")
    with tempfile.TemporaryDirectory(prefix="ztlab-bench-cli-") as tmp:
        root = Path(tmp) / "data"
        root.mkdir()
        _dataset(root, files, total)
        _warm(root)
        out = Path(tmp) / "manifest.json"
        times = _medians(
            5,
            {
                "ztlab": _whole([ZTLAB, "data", "fingerprint", str(root), "--out", str(out)]),
                "b3sum": _whole(
                    ["sh", "-c", f"find {root} -type f -print0 | xargs -0 {b3sum} >/dev/null"]
                ),
            },
        )
    gib = total / 1024**3
    return [
        Row(
            "cli",
            f"ztlab data fingerprint, whole process, {gib:g} GiB in {files:,} files",
            total / times["ztlab"] / 1e9,
            "GB/s",
            ">= 0.9x b3sum",
            f"find | xargs b3sum: {times['b3sum']:.3f} s",
            times["b3sum"] / times["ztlab"],
        ),
        Row(
            "cli",
            "ztlab data fingerprint, wall time",
            times["ztlab"],
            "s",
            "",
            f"find | xargs b3sum: {times['b3sum']:.3f} s",
            times["ztlab"] / times["b3sum"],
        ),
    ]


def _hub_round_trip(quick: bool) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="ztlab-bench-cli-hub-") as tmp:
        root = Path(tmp)
        root.chmod(0o700)
        hub_url = f"http://127.0.0.1:{_port()}"
        idp = DevIdP(
            users={
                "lena": {
                    "password": "lena-password",
                    "email": "lena@example.org",
                    "name": "Lena",
                    "groups": ["ml-trainers"],
                    "amr": ["pwd", "otp"],
                    "acr": "urn:ztlab:mfa",
                    "disabled": False,
                }
            },
            clients=[
                {
                    "client_id": "ztlab-hub",
                    "client_secret": SECRET,
                    "redirect_uris": [f"{hub_url}/hub/oauth_callback"],
                }
            ],
            state_dir=root / "idp",
            port=_port(),
        )
        idp.start()
        hub = None
        try:
            hub = _ztlab_hub(root / "hub", hub_url, idp.issuer)
            session = requests.Session()
            idp_login(
                session,
                f"{hub_url}/hub/oauth_login",
                username="lena",
                password="lena-password",
                follow_redirects=True,
            )
            made = session.post(
                f"{hub_url}/hub/api/users/lena/tokens",
                json={"note": "bench cli", "expires_in": 3600},
                headers={"X-XSRFToken": session.cookies.get("_xsrf") or ""},
                timeout=30,
            )
            made.raise_for_status()
            token_file = root / "token"
            token_file.write_text(made.json()["token"])
            token_file.chmod(0o600)
            api = f"{hub_url}/hub/api"
            plain = (
                "import urllib.request, sys; urllib.request.urlopen(urllib.request.Request("
                f"'{api}/ztlab/datasets', headers={{'Authorization': 'token ' + "
                f"open('{token_file}').read()}})).read()"
            )
            times = _medians(
                10 if quick else 20,
                {
                    "ztlab": _whole(
                        [ZTLAB, "data", "list", "--hub-url", api, "--token-file", str(token_file)]
                    ),
                    "urllib": _whole([sys.executable, "-c", plain]),
                },
            )
        finally:
            if hub is not None:
                _stop(hub)
            idp.stop()
    return [
        Row(
            "cli",
            "ztlab data list: hub round trip on loopback, whole process",
            times["ztlab"],
            "s",
            "< 0.3 s",
            f"python urllib GET: {times['urllib'] * 1000:.0f} ms",
            times["ztlab"] / times["urllib"],
        )
    ]
