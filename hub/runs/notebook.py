"""Reading what a run's notebook became: which cell failed and why.

The executed notebook is written by papermill in the owner's sandbox, so it is the owner's
file: it is read with a size limit, without following a link, and parsed defensively. What
it says about a failure is shown to its owner; nothing in it decides anything.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

__all__ = ["CellFailure", "failed_cell", "read_owned_file"]

#: most characters of a traceback kept with a run
TRACEBACK_CHARS: Final = 8000
_ANSI: Final = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: tags of the cells papermill adds (the error banner, the injected parameters)
_PAPERMILL_CELLS: Final = frozenset({"papermill-error-cell-tag", "injected-parameters"})


@dataclass(frozen=True)
class CellFailure:
    """The first cell whose output is an error."""

    #: index of the cell in the notebook as it was given (0-based; papermill's own cells
    #: are not counted)
    index: int
    #: ``ValueError: ...``
    error: str
    #: the traceback, ANSI colours removed, at most :data:`TRACEBACK_CHARS`
    traceback: str


def read_owned_file(path: Path, *, limit: int) -> bytes | None:
    """The bytes of a regular file a user wrote (``None`` when missing, a link, not a
    regular file, or larger than ``limit``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        chunks = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        return data if len(data) <= limit else None
    finally:
        os.close(fd)


def failed_cell(notebook: bytes) -> CellFailure | None:
    """The first cell with an ``error`` output in an executed notebook, if any."""
    try:
        document: Any = json.loads(notebook)
    except ValueError:
        return None
    cells = document.get("cells") if isinstance(document, dict) else None
    if not isinstance(cells, list):
        return None
    index = -1
    for cell in cells:
        tags = (cell.get("metadata") or {}).get("tags") if isinstance(cell, dict) else None
        if isinstance(tags, list) and _PAPERMILL_CELLS.intersection(map(str, tags)):
            continue  # cells papermill added: the index is the run's own notebook's
        index += 1
        outputs = cell.get("outputs") if isinstance(cell, dict) else None
        for output in outputs if isinstance(outputs, list) else []:
            if not isinstance(output, dict) or output.get("output_type") != "error":
                continue
            name, value = str(output.get("ename", "Error")), str(output.get("evalue", ""))
            lines = output.get("traceback")
            text = "\n".join(str(x) for x in lines) if isinstance(lines, list) else ""
            text = _ANSI.sub("", text)
            if len(text) > TRACEBACK_CHARS:
                text = "...\n" + text[-TRACEBACK_CHARS:]
            return CellFailure(index=index, error=f"{name}: {value}"[:500], traceback=text)
    return None
