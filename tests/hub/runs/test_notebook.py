"""Reading what a run's notebook became: the owner's file, read defensively."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat

from ztlab.hub.runs.notebook import TRACEBACK_CHARS, failed_cell, read_owned_file


def test_a_regular_file_is_read_up_to_its_limit(tmp_path: Path) -> None:
    path = tmp_path / "executed.ipynb"
    path.write_bytes(b"x" * 100)
    assert read_owned_file(path, limit=100) == b"x" * 100
    assert read_owned_file(path, limit=99) is None  # too large: not kept, not half kept


def test_a_link_planted_by_the_run_is_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("the control plane's")
    link = tmp_path / "executed.ipynb"
    link.symlink_to(secret)
    assert read_owned_file(link, limit=1 << 20) is None


def test_a_fifo_or_a_folder_is_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "executed.ipynb"
    os.mkfifo(fifo)
    assert read_owned_file(fifo, limit=1 << 20) is None  # and it does not block
    assert read_owned_file(tmp_path, limit=1 << 20) is None
    assert read_owned_file(tmp_path / "missing", limit=1 << 20) is None


def _executed(*outputs: list[dict[str, object]], papermill_cells: bool = True) -> bytes:
    cells = []
    if papermill_cells:
        banner = nbformat.v4.new_markdown_cell("An Exception was encountered")
        banner.metadata["tags"] = ["papermill-error-cell-tag"]
        cells.append(banner)
    for output in outputs:
        cell = nbformat.v4.new_code_cell("x")
        cell.outputs = [nbformat.from_dict(o) for o in output]
        cells.append(cell)
    return nbformat.writes(nbformat.v4.new_notebook(cells=cells)).encode()


def test_the_failing_cell_counts_the_notebooks_own_cells() -> None:
    error = {
        "output_type": "error",
        "ename": "ValueError",
        "evalue": "bad",
        "traceback": ["\x1b[0;31mValueError\x1b[0m: bad"],
    }
    data = _executed([], [{"output_type": "stream", "name": "stdout", "text": "ok"}], [error])
    found = failed_cell(data)
    assert found is not None
    assert (found.index, found.error) == (2, "ValueError: bad")
    assert found.traceback == "ValueError: bad"  # colours removed


def test_a_long_traceback_keeps_its_end_and_nothing_breaks_on_garbage() -> None:
    error = {"output_type": "error", "ename": "E", "evalue": "v", "traceback": ["y" * 50_000]}
    found = failed_cell(_executed([error], papermill_cells=False))
    assert found is not None
    assert len(found.traceback) <= TRACEBACK_CHARS + 4
    assert failed_cell(b"not json") is None
    assert failed_cell(json.dumps({"cells": "no"}).encode()) is None
    assert failed_cell(_executed([])) is None
