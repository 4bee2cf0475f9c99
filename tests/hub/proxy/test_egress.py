"""Egress accounting from Traefik's access log: what counts, and when it is reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ztlab.hub.proxy.egress import EgressMeter

M = 1024**2
DAY = 1_796_000_000.0  # a fixed "now"


def _line(path: str, size: int, *, route: str | None = "files", actor: str | None = "una",
          origin: int = 200) -> str:  # fmt: skip
    # the access log has no path (its query may hold a token): the server is a header
    entry: dict[str, Any] = {
        "DownstreamContentSize": size,
        "OriginStatus": origin,
        "RouterName": "router__2Fuser__2Funa__2F@file",
    }
    if route is not None:
        entry["request_X-Ztlab-Route"] = route
    if actor is not None:
        entry["request_X-Ztlab-Actor"] = actor
    if path.startswith("/user/"):
        entry["request_X-Ztlab-Server"] = path.split("/")[2]
    return json.dumps(entry) + "\n"


class _Recorder:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, actor: str, action: str, **detail: Any) -> None:
        self.records.append((actor, action, detail))


def _meter(log: Path, recorder: _Recorder, *, every: int = 10 * M) -> EgressMeter:
    return EgressMeter(log, record=recorder, report_bytes=lambda actor: every, clock=lambda: DAY)


def test_counts_what_the_hub_let_through(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text(
        _line("/user/una/files/a.csv", 1000)
        + _line("/user/una/api/contents/nb.ipynb?content=1", 500, route="notebooks")
        + _line("/user/una/files/a.csv", 1000)
        # a refused request: no route from the hub, no origin (forged headers change nothing)
        + _line("/user/una/files/a.csv", 90, route="files", origin=0)
        + _line("/user/una/files/a.csv", 90, route=None)
        # the hub's own pages are not a server's egress
        + _line("/hub/home", 5000)
        + "not json\n"
    )
    recorder = _Recorder()
    meter = _meter(log, recorder)
    assert meter.poll() == 3
    assert meter.bytes[("una", "una", "files")] == 2000
    assert meter.bytes[("una", "una", "notebooks")] == 500
    assert meter.requests[("una", "una", "files")] == 2
    assert recorder.records == []


def test_partial_lines_and_a_new_log(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    whole = _line("/user/una/files/a.csv", 100)
    log.write_text(whole + whole[:20])
    meter = _meter(log, _Recorder())
    assert meter.poll() == 1
    with log.open("a") as handle:
        handle.write(whole[20:])
    assert meter.poll() == 1
    # Traefik started again with a new log: read from its start
    log.unlink()
    log.write_text(_line("/user/una/files/b.csv", 7))
    assert meter.poll() == 1
    assert meter.bytes[("una", "una", "files")] == 207


def test_start_at_end_skips_what_an_earlier_hub_counted(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text(_line("/user/una/files/a.csv", 100))
    meter = _meter(log, _Recorder())
    meter.start_at_end()
    assert meter.poll() == 0


def test_each_multiple_of_the_report_size_is_recorded_once(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text(_line("/user/una/files/a.csv", 6 * M) * 3)
    recorder = _Recorder()
    meter = _meter(log, recorder)
    meter.poll()
    assert [(a, act, d["bytes_today"]) for a, act, d in recorder.records] == [
        ("una", "proxy.egress", 12 * M)
    ]
    [(_, _, detail)] = recorder.records
    assert detail["server"] == "una"
    assert detail["routes"] == {"files": 12 * M}
    assert detail["report_every"] == 10 * M
    with log.open("a") as handle:
        handle.write(_line("/user/una/api/kernels", 9 * M, route="kernels"))
    meter.poll()
    assert [d["bytes_today"] for _, _, d in recorder.records] == [12 * M, 27 * M]


def test_websocket_bytes_are_counted_from_the_counters_log(tmp_path: Path) -> None:
    """Traefik logs 0 bytes for a WebSocket; the wscount plugin's lines carry them."""
    access, websockets = tmp_path / "access.log", tmp_path / "websockets.log"
    access.write_text(_line("/user/una/api/kernels/k/channels", 0, route="kernels"))
    recorder = _Recorder()
    meter = EgressMeter(
        access,
        record=recorder,
        report_bytes=lambda actor: 2 * M,
        websocket_log=websockets,
        clock=lambda: DAY,
    )
    entry = {"actor": "una", "server": "una", "route": "kernels", "bytes": M}
    lines = [json.dumps(entry), json.dumps({**entry, "bytes": M + 5})]
    lines += [json.dumps({**entry, "actor": ""}), json.dumps({**entry, "bytes": "9"}), "{"]
    websockets.write_text("\n".join(lines) + "\n")
    assert meter.poll() == 3  # the access-log line (0 bytes) and two counter lines
    assert meter.bytes[("una", "una", "kernels")] == 2 * M + 5
    [(actor, action, detail)] = recorder.records
    assert (actor, action, detail["routes"]) == ("una", "proxy.egress", {"kernels": 2 * M + 5})
