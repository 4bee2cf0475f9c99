"""Execute one notebook with papermill, inside its owner's sandbox (a scheduled or one-off run).

The control plane starts ``python -I -m ztlab.kernels.run FOLDER`` as the owner's account,
in the run's own cgroup and the owner's network namespace, with the environment of a
server (hub token for this run only, dataset mounts, MLflow through the hub). ``FOLDER``
(the run's folder, the only writable place besides the home) holds:

- ``input.ipynb`` -- the notebook, written by the control plane from the copy it keeps;
- ``request.json`` -- ``{"parameters": {...}, "kernel": "NAME", "cwd": "/home/..."}``.

It writes ``executed.ipynb`` (saved after every cell, so a run killed mid-way keeps what
ran) and exits 0 when every cell ran, 3 when a cell raised, 4 when the run could not start
(no kernel, unreadable notebook). Nothing it writes is trusted: the control plane reads the
executed notebook itself to say which cell failed, and hashes it for the provenance.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

#: exit statuses (the control plane reads them)
OK, CELL_FAILED, NOT_STARTED = 0, 3, 4


def main(argv: list[str]) -> int:
    """Run ``FOLDER/input.ipynb`` into ``FOLDER/executed.ipynb``."""
    if len(argv) != 1:
        print("usage: python -m ztlab.kernels.run FOLDER", file=sys.stderr)
        return NOT_STARTED
    folder = Path(argv[0])
    try:
        request: dict[str, Any] = json.loads((folder / "request.json").read_text())
        import papermill
        from papermill.exceptions import PapermillExecutionError
    except (OSError, ValueError, ImportError) as exc:
        print(f"ztlab run: cannot start: {exc}", file=sys.stderr)
        return NOT_STARTED
    print(f"ztlab run: executing {request.get('name', 'input.ipynb')} with kernel "
          f"{request['kernel']}", flush=True)  # fmt: skip
    try:
        papermill.execute_notebook(
            str(folder / "input.ipynb"),
            str(folder / "executed.ipynb"),
            parameters=request.get("parameters") or {},
            kernel_name=request["kernel"],
            language="python",
            cwd=request.get("cwd"),
            progress_bar=False,
            log_output=True,
            request_save_on_cell_execute=True,
        )
    except PapermillExecutionError as exc:
        print(
            f"ztlab run: cell {exc.cell_index} (execution count {exc.exec_count}) raised "
            f"{exc.ename}: {exc.evalue}",
            file=sys.stderr,
        )
        return CELL_FAILED
    except Exception as exc:
        print(f"ztlab run: the run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return NOT_STARTED
    print("ztlab run: every cell ran", flush=True)
    return OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
