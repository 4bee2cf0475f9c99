"""Route classes: what a request to a user's server is for (the rules and the egress
accounting both depend on them)."""

from __future__ import annotations

import pytest

from ztlab.hub.proxy.routes import ROUTE_CLASSES, classify, parse_target


@pytest.mark.parametrize(
    ("path", "query", "expected"),
    [
        ("files/data/secret.csv", "", ("files", "data/secret.csv")),
        ("files/a/../secret.csv", "", ("files", "secret.csv")),
        ("view/report.html", "", ("files", "report.html")),
        ("nbconvert/html/nb.ipynb", "download=true", ("files", "nb.ipynb")),
        ("api/contents/secret.csv", "type=file&format=text&content=1", ("files", "secret.csv")),
        ("api/contents/secret.csv", "", ("files", "secret.csv")),
        # a notebook, unless its raw bytes are asked for
        ("api/contents/work/nb.ipynb", "type=notebook&content=1", ("notebooks", "")),
        ("api/contents/data.ipynb", "type=file&format=base64", ("files", "data.ipynb")),
        ("api/contents/data.ipynb", "format=text", ("files", "data.ipynb")),
        # listings, checkpoints and metadata carry no file's bytes
        ("api/contents", "content=1", ("notebooks", "")),
        ("api/contents/nb.ipynb/checkpoints", "", ("notebooks", "")),
        ("api/contents/secret.csv", "content=0", ("notebooks", "")),
        ("api/kernels/abc/channels", "", ("kernels", "")),
        ("api/sessions", "", ("kernels", "")),
        ("api/terminals", "", ("terminals", "")),
        ("terminals/websocket/1", "", ("terminals", "")),
        ("lab", "", ("other", "")),
        ("api/status", "", ("other", "")),
    ],
)
def test_classify(path: str, query: str, expected: tuple[str, str]) -> None:
    assert classify(path, query) == expected
    assert expected[0] in ROUTE_CLASSES


def test_a_directory_listing_is_not_a_file() -> None:
    def is_directory(path: str) -> bool:
        return path == "data"

    assert classify("api/contents/data", is_directory=is_directory) == ("notebooks", "")
    assert classify("api/contents/data.csv", is_directory=is_directory) == ("files", "data.csv")


def test_parse_target() -> None:
    target = parse_target("/user/una/files/x%20y.csv?download=1")
    assert target is not None
    assert (target.owner, target.route, target.file) == ("una", "files", "x y.csv")
    assert parse_target("/hub/api/users") is None
    assert parse_target("/user/") is None
    # a path that is not canonical is not a target (refused at the enforcement point)
    assert parse_target("/user/una/files/../../otto/x") is None
    assert parse_target("/user/una/./files/x") is None
    with_base = parse_target("/jh/user/una/lab", base_url="/jh/")
    assert with_base is not None
    assert with_base.owner == "una"
