"""Telling a run's owner that it did not succeed: a webhook (``[runs] notify_url``).

Failures are also on the runs page, in ``ztlab run list`` and in the audit log; the webhook
is for whatever the site routes alerts through (Alertmanager, chat). The document names
the run, its owner, schedule, attempt, status, message and failing cell, and links its page.
Posting happens on a thread of its own, three tries a few seconds apart; a delivery that
fails is logged.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from typing import Any, Final

from ztlab.hub.runs.store import RunRecord

__all__ = ["failure_document", "post_json"]

_log = logging.getLogger("ztlab.runs")
#: tries per document
ATTEMPTS: Final = 3


def failure_document(run: RunRecord, *, page: str) -> dict[str, Any]:
    """The webhook's JSON about ``run`` (``page``: the URL of its page on the hub)."""
    return {
        "kind": "ztlab.run",
        "status": run.status,
        "run": run.id,
        "owner": run.owner,
        "schedule": run.schedule_name,
        "attempt": run.attempt,
        "message": run.message,
        "failed_cell": run.failed_cell,
        "url": page,
    }


def post_json(url: str, document: dict[str, Any], *, backoff: float = 1.0) -> threading.Thread:
    """POST ``document`` to ``url`` from a new thread (returned, started)."""
    body = json.dumps(document).encode()

    def post() -> None:
        for attempt in range(ATTEMPTS):
            try:
                request = urllib.request.Request(  # noqa: S310 - an admin's http(s) URL
                    url, data=body, headers={"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(request, timeout=5):  # noqa: S310
                    return
            except OSError as exc:
                _log.warning("run webhook %s: attempt %d failed: %s", url, attempt + 1, exc)
                time.sleep(backoff * 2**attempt)

    thread = threading.Thread(target=post, name="ztlab-run-notify", daemon=True)
    thread.start()
    return thread
