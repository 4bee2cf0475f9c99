"""A real package index for tests: hand-made wheels served as a PEP 503 simple index.

The package proxy's mirror (devpi-server) fetches from it over HTTP on 127.0.0.1, as it
would from PyPI, so the tests never leave the machine. :func:`make_wheel` writes a valid
pure-Python wheel (``NAME/__init__.py`` with ``VERSION``, an optional payload, metadata and
a RECORD with every file's hash) that pip and uv install.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import threading
import zipfile
from collections.abc import Iterable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def make_wheel(
    folder: Path,
    name: str,
    version: str,
    *,
    payload: bytes = b"",
    requires: Iterable[str] = (),
) -> Path:
    """``folder/NAME-VERSION-py3-none-any.whl``; ``payload`` goes into ``NAME/blob.bin``."""
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n".encode(),
        f"{module}/blob.bin": payload,
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
            + "".join(f"Requires-Dist: {r}\n" for r in requires)
        ).encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: ztlab-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = [
        f"{path},sha256={_b64(hashlib.sha256(data).digest())},{len(data)}"
        for path, data in files.items()
    ]
    files[f"{dist_info}/RECORD"] = ("\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n").encode()
    wheel = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class SimpleIndex:
    """A folder of wheels as a PEP 503 index (``/NAME/`` pages with ``#sha256=`` links)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._server: ThreadingHTTPServer | None = None
        root.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, version: str, **kwargs: object) -> Path:
        """Add a wheel (see :func:`make_wheel`) and rewrite the pages."""
        folder = self.root / name
        folder.mkdir(exist_ok=True)
        wheel = make_wheel(folder, name, version, **kwargs)  # type: ignore[arg-type]
        self._pages()
        return wheel

    def _pages(self) -> None:
        projects = sorted(p for p in self.root.iterdir() if p.is_dir())
        for project in projects:
            links = "".join(
                f'<a href="{w.name}#sha256={hashlib.sha256(w.read_bytes()).hexdigest()}">'
                f"{w.name}</a>\n"
                for w in sorted(project.glob("*.whl"))
            )
            (project / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
        index = "".join(f'<a href="{p.name}/">{p.name}</a>\n' for p in projects)
        (self.root / "index.html").write_text(f"<html><body>\n{index}</body></html>\n")

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Serve the index on 127.0.0.1 until the block ends (or :meth:`stop`); its URL."""
        handler = functools.partial(_QuietHandler, directory=str(self.root))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{self._server.server_address[1]}/"
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop serving: the index is gone, as an upstream out of reach."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass
