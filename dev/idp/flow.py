"""A scripted (browserless) login through an OpenID provider's HTML login form.

:func:`idp_login` does what a browser does when someone signs in to a relying party (the hub,
or a stand-in): it follows the relying party's redirect to the provider, fills in the login
form (fields ``login`` and ``password``), submits any further form the provider shows
(a consent page, a ``form_post`` response), and follows the provider's redirect back. It is
written for the development IdP (``server.mjs``) but only relies on plain HTML forms.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import requests

from ztlab.common.errors import ZtlabError

__all__ = ["LoginFlowError", "LoginRejectedError", "idp_login"]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_STEPS = 40


class LoginFlowError(ZtlabError):
    """The scripted login did not go as a browser's would: an error page, a loop, a timeout."""


class LoginRejectedError(LoginFlowError):
    """The provider showed its login form again: wrong password, unknown or disabled user.

    ``idp_error`` is the error text the provider showed (empty if it showed none).
    """

    def __init__(self, message: str, *, idp_error: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.idp_error = idp_error


@dataclass
class _Form:
    action: str | None
    method: str
    fields: list[tuple[str, str, str]] = field(default_factory=list)  # (name, value, type)
    submits: list[tuple[str, str]] = field(default_factory=list)  # (name, value)

    def has_field(self, name: str) -> bool:
        return any(n == name for n, _, _ in self.fields)

    @property
    def is_login(self) -> bool:
        return self.has_field("login") and self.has_field("password")


class _PageParser(HTMLParser):
    """Collects the forms of a page, the text of its error elements and its visible text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[_Form] = []
        self.errors: list[str] = []
        self.text: list[str] = []
        self._form: _Form | None = None
        self._error_tag: str | None = None
        self._error_depth = 0
        self._error_text: list[str] = []
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        if tag in ("script", "style"):
            self._skip_depth += 1
        if self._error_tag is not None:
            if tag == self._error_tag:
                self._error_depth += 1
        elif (
            a.get("id") == "error"
            or "error" in a.get("class", "").split()
            or a.get("role") == "alert"
        ):
            self._error_tag, self._error_depth, self._error_text = tag, 1, []
        if tag == "form":
            self._form = _Form(action=a.get("action") or None, method=a.get("method", "get"))
            self.forms.append(self._form)
        elif self._form is not None and tag in ("input", "button", "select", "textarea"):
            name = a.get("name", "")
            kind = a.get("type", "submit" if tag == "button" else "text").lower()
            if kind == "submit":
                if name:
                    self._form.submits.append((name, a.get("value", "")))
            elif name and (kind not in ("checkbox", "radio") or "checked" in a):
                self._form.fields.append((name, a.get("value", ""), kind))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip_depth:
            self._skip_depth -= 1
        if tag == "form":
            self._form = None
        if self._error_tag == tag:
            self._error_depth -= 1
            if self._error_depth == 0:
                text = " ".join("".join(self._error_text).split())
                if text:
                    self.errors.append(text)
                self._error_tag = None

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            return
        if self._error_tag is not None:
            self._error_text.append(data)
        self.text.append(data)

    @property
    def visible_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def _parse(html: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(html)
    parser.close()
    return parser


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _location(resp: requests.Response) -> str | None:
    if resp.status_code in _REDIRECTS and "location" in resp.headers:
        return urljoin(resp.url, resp.headers["location"])
    return None


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def idp_login(
    session: requests.Session,
    start_url: str,
    *,
    username: str,
    password: str,
    timeout: float = 30,
    follow_redirects: bool = False,
) -> requests.Response:
    """Sign in as ``username`` starting at the relying party's ``start_url``.

    Steps, as a browser takes them:

    1. GET ``start_url`` (e.g. the hub's ``/hub/oauth_login``) and follow its redirects; the
       first redirect to another origin names the provider.
    2. At the provider: follow its redirects; on a page with a login form (fields ``login``
       and ``password``) submit the credentials; on a page with another form (consent,
       ``form_post``) submit it as it is; a page without a form is an error page.
    3. Follow the provider's redirect back to the relying party and return the first
       response that is not a redirect to the provider (with ``follow_redirects``, keep
       following the relying party's own redirects until a response is no redirect).

    Cookies accumulate in ``session``; if the provider already has a session for someone,
    no form is shown and ``username``/``password`` are not used. Raises
    :class:`LoginRejectedError` if the login form comes back (with the provider's error
    text) and :class:`LoginFlowError` for an error page, a redirect loop or the timeout.
    """
    deadline = time.monotonic() + timeout
    idp_origin: str | None = None
    visited_idp = False
    submitted_login = False

    def send(method: str, url: str, data: list[tuple[str, str]] | None = None) -> requests.Response:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LoginFlowError(f"login as {username!r}: no answer within {timeout:g} s")
        try:
            return session.request(method, url, data=data, allow_redirects=False, timeout=remaining)
        except requests.RequestException as exc:
            raise LoginFlowError(f"login as {username!r}: {method} {url} failed: {exc}") from exc

    def at_idp(url: str) -> bool:
        return idp_origin is not None and _origin(url) == idp_origin

    resp = send("GET", start_url)
    for _ in range(_MAX_STEPS):
        if at_idp(resp.url):
            visited_idp = True
        target = _location(resp)
        if target is not None:
            if not visited_idp and idp_origin is None and _origin(target) != _origin(resp.url):
                idp_origin = _origin(target)  # the relying party sends us to the provider
            if at_idp(target) or at_idp(resp.url) or not visited_idp or follow_redirects:
                resp = send("GET", target)
                continue
            return resp  # the relying party's answer after the provider handed back

        page = _parse(resp.text) if "html" in resp.headers.get("content-type", "") else None
        login_form = next((f for f in page.forms if f.is_login), None) if page else None
        if login_form is not None and idp_origin is None:
            idp_origin, visited_idp = _origin(resp.url), True  # started at the provider
        if not at_idp(resp.url):
            return resp  # the relying party answered without redirecting
        assert page is not None or login_form is None

        if login_form is not None:
            assert page is not None
            if submitted_login:
                idp_error = "; ".join(page.errors)
                raise LoginRejectedError(
                    f"login as {username!r} refused by the identity provider"
                    + (f": {idp_error}" if idp_error else " (the login form came back)"),
                    idp_error=idp_error,
                )
            data = [(n, v) for n, v, _ in login_form.fields if n not in ("login", "password")]
            data += [("login", username), ("password", password), *login_form.submits[:1]]
            resp = send(login_form.method.upper(), urljoin(resp.url, login_form.action), data)
            submitted_login = True
            continue

        post_form = (
            next((f for f in page.forms if f.method.lower() == "post"), None) if page else None
        )
        if post_form is not None and resp.status_code == 200:
            data = [(n, v) for n, v, _ in post_form.fields] + post_form.submits[:1]
            resp = send("POST", urljoin(resp.url, post_form.action), data)
            continue

        detail = "; ".join(page.errors) if page and page.errors else ""
        detail = detail or (page.visible_text if page else resp.text)
        raise LoginFlowError(
            f"login as {username!r}: the identity provider answered {resp.status_code} at "
            f"{resp.url} without a form: {_short(detail)}"
        )
    raise LoginFlowError(f"login as {username!r}: more than {_MAX_STEPS} steps (a redirect loop?)")
