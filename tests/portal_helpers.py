"""Helpers for the portal tests: a served app, an HTML form parser, and an offline fake platform.

``FakeConnector`` is a connector that never leaves the process: its "consent page" is skipped (the
test reads the state from the redirect and calls the callback itself), codes are single-use, and
``list_accounts`` can be told to fail. It lets the portal's own logic be tested independently of any
real platform module; the Google tests use the real connector against the sandbox.
"""
from __future__ import annotations

import dataclasses
import secrets
import threading
import time
import types
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import requests
from flask import session
from werkzeug.serving import make_server

from resources.platforms.base import Account, Connector, OAuthCallbackError, PlatformError

FAKE_ACCESS_TOKEN_PREFIX = "fake-access-SECRET-"


class FakeConnector(Connector):
    """An in-process platform: authorize URL on a closed port (never contacted), one-use codes."""

    id = "fake"
    display_name = "Fake Ads"
    #: codes the fake provider accepts (consumed on use, like a real provider)
    valid_codes: set[str] = set()
    #: when set, list_accounts raises this
    accounts_error: Exception | None = None

    @classmethod
    def settings_class(cls):
        return types.SimpleNamespace

    def oauth_registration(self) -> dict[str, Any]:
        return {"client_id": "fake-client", "client_secret": "fake-secret",
                "authorize_url": "http://127.0.0.1:9/fake/authorize",
                "access_token_url": "http://127.0.0.1:9/fake/token",
                "client_kwargs": {"scope": "ads.read", "code_challenge_method": "S256"}}

    @classmethod
    def issue_code(cls) -> str:
        code = "code-" + secrets.token_hex(8)
        cls.valid_codes.add(code)
        return code

    def finish_authorization(self, oauth_client, request) -> dict[str, Any]:
        if request.args.get("error"):
            raise OAuthCallbackError(f"provider error: {request.args['error']}")
        state = request.args.get("state")
        state_data = oauth_client.framework.get_state_data(session, state)
        oauth_client.framework.clear_state_data(session, state)
        if state_data is None:
            raise OAuthCallbackError("state does not match this browser session")
        code = request.args.get("code")
        if code not in self.valid_codes:
            raise OAuthCallbackError("invalid_grant: the code is invalid or was already used")
        self.valid_codes.discard(code)
        return {"access_token": FAKE_ACCESS_TOKEN_PREFIX + secrets.token_hex(8),
                "refresh_token": "fake-refresh-SECRET-" + secrets.token_hex(8),
                "token_type": "Bearer", "expires_at": int(time.time()) + 3600, "scope": "ads.read"}

    def list_accounts(self, token: dict[str, Any]) -> list[Account]:
        if self.accounts_error is not None:
            raise self.accounts_error
        return [Account(id="1001", name="Fake Shop EU", currency="EUR", time_zone="Europe/Berlin"),
                Account(id="1002", name="Fake Shop JP", currency="JPY", time_zone="Asia/Tokyo")]


class UnconfiguredConnector(FakeConnector):
    """A registered platform without client credentials: shown as "not configured"."""

    id = "offline"
    display_name = "Offline Ads"

    def is_configured(self) -> bool:
        return False


def reset_fakes() -> None:
    FakeConnector.valid_codes = set()
    FakeConnector.accounts_error = None


# ---- HTML forms --------------------------------------------------------------------------------
@dataclasses.dataclass
class Form:
    action: str
    method: str
    fields: dict[str, str]
    buttons: list[dict[str, str]]
    text: str = ""


class _FormParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.forms: list[Form] = []
        self._current: Form | None = None
        self._button: dict | None = None

    def handle_starttag(self, tag, attrs):
        attrs = {k: (v or "") for k, v in attrs}
        if tag == "form":
            self._current = Form(attrs.get("action", ""), attrs.get("method", "get").lower(), {}, [])
        elif self._current is None:
            return
        elif tag == "input":
            kind = attrs.get("type", "text").lower()
            if kind == "submit":
                self._current.buttons.append({"name": attrs.get("name", ""), "value": attrs.get("value", ""),
                                              "text": attrs.get("value", "")})
            elif kind in ("checkbox", "radio"):
                if "checked" in attrs and attrs.get("name"):
                    self._current.fields[attrs["name"]] = attrs.get("value", "on")
            elif attrs.get("name"):
                self._current.fields[attrs["name"]] = attrs.get("value", "")
        elif tag == "button":
            self._button = {"name": attrs.get("name", ""), "value": attrs.get("value", ""), "text": ""}
        elif tag in ("select", "textarea") and attrs.get("name"):
            self._current.fields.setdefault(attrs["name"], "")

    def handle_data(self, data):
        if self._button is not None:
            self._button["text"] += data
        if self._current is not None:
            self._current.text += data

    def handle_endtag(self, tag):
        if tag == "button" and self._button is not None and self._current is not None:
            self._button["text"] = self._button["text"].strip()
            self._current.buttons.append(self._button)
            self._button = None
        elif tag == "form" and self._current is not None:
            self.forms.append(self._current)
            self._current = None


def parse_forms(html: str) -> list[Form]:
    """Every form of a page with its action, method, input values and submit buttons."""
    parser = _FormParser()
    parser.feed(html)
    return parser.forms


def find_form(html: str, action_part: str) -> Form:
    """The first form whose action contains ``action_part``."""
    for form in parse_forms(html):
        if action_part in form.action:
            return form
    raise AssertionError(f"no form with action containing {action_part!r}")


# ---- the served portal -------------------------------------------------------------------------
class _Dispatch:
    """WSGI app whose target is set after the server is bound (the URL must be known first)."""

    app = None

    def __call__(self, environ, start_response):
        return self.app(environ, start_response)


@dataclasses.dataclass
class Portal:
    """A portal served over real HTTP on a free loopback port, and a browser-like session."""

    url: str
    app: Any
    db: Any
    http: requests.Session

    def abs(self, path: str) -> str:
        return urljoin(self.url + "/", path)

    def get(self, path: str, **kw) -> requests.Response:
        return self.http.get(self.abs(path), **kw)

    def post(self, path: str, data: dict | None = None, **kw) -> requests.Response:
        return self.http.post(self.abs(path), data=data or {}, **kw)

    def csrf_from(self, path: str, action_part: str | None = None) -> str:
        """The CSRF token of a form on a page."""
        page = self.get(path)
        assert page.status_code == 200, page.text
        form = find_form(page.text, action_part or path)
        return form.fields["csrf_token"]

    def submit(self, page_path: str, action_part: str, extra: dict | None = None,
               allow_redirects: bool = True) -> requests.Response:
        """Load a page, fill the form whose action contains ``action_part`` and post it."""
        page = self.get(page_path)
        assert page.status_code == 200, page.text
        form = find_form(page.text, action_part)
        data = {**form.fields, **(extra or {})}
        return self.http.post(self.abs(form.action or page_path), data=data, allow_redirects=allow_redirects)

    def signup(self, email: str, password: str = "correct horse battery", **kw) -> requests.Response:
        return self.submit("/signup", "/signup",
                           {"email": email, "password": password, "password_confirm": password}, **kw)

    def login(self, email: str, password: str = "correct horse battery", next_: str | None = None,
              **kw) -> requests.Response:
        page = "/login" + (f"?next={requests.utils.quote(next_, safe='')}" if next_ else "")
        return self.submit(page, "/login", {"email": email, "password": password}, **kw)

    def logout(self) -> requests.Response:
        return self.submit("/connections", "/logout")

    def new_browser(self) -> "Portal":
        """Another client (no cookies) on the same server."""
        return dataclasses.replace(self, http=requests.Session())


def serve(create) -> tuple[str, Any, callable]:
    """Bind a threaded server on a free port, then build the app with ``create(url)``.

    Returns (url, app, stop).
    """
    dispatch = _Dispatch()
    server = make_server("127.0.0.1", 0, dispatch, threaded=True)
    url = f"http://127.0.0.1:{server.port}"
    dispatch.app = create(url)
    thread = threading.Thread(target=server.serve_forever, name="portal-test-server", daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()

    return url, dispatch.app, stop


def query_of(url: str) -> dict[str, str]:
    """The query parameters of a URL (first value of each)."""
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
