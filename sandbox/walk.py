"""A tiny HTTP "user" for headless walks through the portal and the sandbox consent pages.

It keeps cookies (``requests.Session``), reads HTML forms with the standard library parser and
submits them as a browser would (hidden fields such as the CSRF token included). Used by
``make demo-once`` and by the tests; no JavaScript is needed anywhere in the portal.
"""
from __future__ import annotations

import dataclasses
from html.parser import HTMLParser
from urllib.parse import urljoin

import requests

from resources import redaction

redaction.install("urllib3.connectionpool")  # its DEBUG log prints callback URLs with codes


@dataclasses.dataclass
class Form:
    """A parsed ``<form>``: ``action`` (absolute URL), ``method``, input ``fields`` (name -> value),
    and ``buttons`` (``(name, value)`` of each named submit button, in order)."""

    action: str
    method: str
    fields: dict[str, str]
    buttons: list[tuple[str, str]]
    text: str = ""

    def button(self, wanted: str) -> tuple[str, str] | None:
        """The submit button whose name or value is ``wanted``."""
        for name, value in self.buttons:
            if wanted in (name, value):
                return name, value
        return None


class _FormParser(HTMLParser):
    def __init__(self, base_url: str):
        super().__init__()
        self.base_url = base_url
        self.forms: list[Form] = []
        self._current: Form | None = None
        self._select: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form":
            self._current = Form(urljoin(self.base_url, attrs.get("action") or self.base_url),
                                 (attrs.get("method") or "get").lower(), {}, [])
            self.forms.append(self._current)
        elif self._current is None:
            return
        elif tag == "input" and attrs.get("name"):
            kind = (attrs.get("type") or "text").lower()
            if kind == "submit":
                self._current.buttons.append((attrs["name"], attrs.get("value", "")))
            elif kind in ("checkbox", "radio"):
                if "checked" in attrs:
                    self._current.fields[attrs["name"]] = attrs.get("value", "on")
            else:
                self._current.fields[attrs["name"]] = attrs.get("value") or ""
        elif tag == "button" and attrs.get("name"):
            self._current.buttons.append((attrs["name"], attrs.get("value", "")))
        elif tag == "select" and attrs.get("name"):
            self._select = attrs["name"]
        elif tag == "option" and self._select and ("selected" in attrs or self._select not in self._current.fields):
            self._current.fields[self._select] = attrs.get("value", "")
        elif tag == "textarea" and attrs.get("name"):
            self._current.fields[attrs["name"]] = ""

    def handle_endtag(self, tag):
        if tag == "form":
            self._current = None
        elif tag == "select":
            self._select = None

    def handle_data(self, data):
        if self._current is not None:
            self._current.text += data


def parse_forms(html: str, base_url: str) -> list[Form]:
    """Every form of a page, in document order."""
    parser = _FormParser(base_url)
    parser.feed(html)
    return parser.forms


class Walker:
    """A cookie-keeping HTTP client that fills and submits forms.

    Args:
        timeout: seconds per request.
    """

    def __init__(self, timeout: float = 30.0):
        self.http = requests.Session()
        self.http.trust_env = False  # never through a proxy: everything here is on loopback
        self.timeout = timeout
        self.last: requests.Response | None = None

    def get(self, url: str, **kwargs) -> requests.Response:
        self.last = self.http.get(url, timeout=self.timeout, **kwargs)
        return self.last

    def post(self, url: str, **kwargs) -> requests.Response:
        self.last = self.http.post(url, timeout=self.timeout, **kwargs)
        return self.last

    def form(self, response: requests.Response | None = None, *, action_contains: str = "",
             button: str = "") -> Form:
        """The first form on the page whose action contains ``action_contains`` (and that has the
        named ``button`` when given).

        Raises:
            LookupError: no such form (the message lists the forms found).
        """
        response = response or self.last
        forms = parse_forms(response.text, response.url)
        for form in forms:
            if action_contains in form.action and (not button or form.button(button)):
                return form
        raise LookupError(f"no form with action containing {action_contains!r} on {response.url} "
                          f"(status {response.status_code}); forms: {[f.action for f in forms]}")

    def submit(self, form: Form, values: dict[str, str] | None = None, *, button: str = "",
               allow_redirects: bool = True) -> requests.Response:
        """Submit ``form`` with its own fields overridden by ``values``; ``button`` (a button's name or
        value) adds that submit button's name=value pair, as a click on it would."""
        data = dict(form.fields)
        data.update(values or {})
        if button:
            pressed = form.button(button)
            if pressed is None:
                raise LookupError(f"no button {button!r} in the form posting to {form.action}")
            data[pressed[0]] = pressed[1]
        if form.method == "post":
            return self.post(form.action, data=data, allow_redirects=allow_redirects)
        return self.get(form.action, params=data, allow_redirects=allow_redirects)
