"""The page a browser gets when the enforcement point refuses a request."""

from __future__ import annotations

from ztlab.hub.proxy.enforce import refusal_page


def test_the_way_back_follows_the_hubs_base_url() -> None:
    page = refusal_page(403, "not yours", base_url="/lab-a/")
    assert '<a href="/lab-a/hub/home">Back to the hub</a>' in page
    assert '<a href="/hub/home">' in refusal_page(403, "not yours")


def test_the_message_is_escaped() -> None:
    page = refusal_page(403, "<script>alert(1)</script>", base_url="/")
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "<h1>403: refused by the hub</h1>" in page
